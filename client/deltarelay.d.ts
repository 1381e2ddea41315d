// Types for deltarelay.js: the relay's wire events and the client's public surface.

export type Transport = 'websocket' | 'sse' | 'eventsource'

export interface StartData {
  streamId: string
  conversationId: string
  model: string
  /** The answer being written: a new one, or for a continue the answer continued. */
  messageId: string
  /** The user message the answer answers (its parent): new for a send, existing for a regenerate or continue. */
  userMessageId: string
  parentId: string
  /** How many of the conversation's oldest messages this request leaves out to fit the model's context window. */
  truncatedMessages: number
}

export interface TextData {
  text: string
}

export interface CostData {
  inputTokens: number
  outputTokens: number
  cacheCreationInputTokens: number
  cacheReadInputTokens: number
  /** Dollars; null when the model's price is unknown. */
  totalCost: number | null
  model: string
  estimated?: true
  /** The request's input tokens as the model counted them (input + cache writes + cache reads). */
  contextTokens?: number
  /** The model's context window in tokens. */
  contextWindow?: number
  /** The oldest messages the request that answered left out (more than start's after a retry for length). */
  truncatedMessages?: number
}

export interface DoneData {
  conversationId: string
  messageId: string | null
  /** "end_turn", "max_tokens", "cancelled"... */
  stopReason: string | null
}

export interface ErrorData {
  /**
   * The server's code, or "network_error" when the connection was lost; "unauthorized" when, with
   * getToken, a new token was refused too; a send's failed attachment upload: the upload's code (413
   * too_large, 415...), or "upload_failed" when the file could not even be read.
   */
  code: string
  message: string
  retryable: boolean
  /** Seconds to wait before retrying. */
  retryAfter?: number
  messageId?: string
  /** context_too_long: the input tokens (estimated, or as the model counted them) and the model's window. */
  inputTokens?: number
  contextWindow?: number
  /** A send whose attachment upload failed: the upload's HTTP status (0 when no answer came). */
  status?: number
}

/** A tool call's input as it streams: `partialJson` pieces, joined in order, make the input's JSON text. */
export interface ToolInputData {
  id: string
  partialJson: string
}

/** A call of one of the agent's own tools, its input complete (`{}` for none). */
export interface ToolUseData {
  id: string
  name: string
  input: Record<string, unknown>
}

/** A content block of a tool result, as the app's tool endpoint gave it (text, image...). */
export interface ContentBlock {
  type: string
  [field: string]: unknown
}

/** What the app's tool endpoint answered for the call `id` (an error when it failed, timed out or said so). */
export interface ToolResultData {
  id: string
  isError: boolean
  content: string | ContentBlock[]
}

/**
 * One citation of the answer's text, at the point of the text where it arrived. `index`: its number in the
 * answer, 1-based, in stream order, across tool rounds.
 */
export interface CitationData {
  index: number
  /** null for a citation of a document (then documentTitle). */
  url: string | null
  title: string | null
  citedText: string
  documentTitle?: string | null
}

/** A server tool call: `web_search` (query: the search) or `web_fetch` (query: the URL fetched). */
export interface SearchData {
  id: string
  name: 'web_search' | 'web_fetch' | (string & {})
  query: string
}

export interface SearchResult {
  url: string
  title: string | null
}

/** What the server tool call `id` found; `error`: the API's error_code when it failed. */
export interface SearchResultsData {
  id: string
  results: SearchResult[]
  error?: string
}

export interface EventDataMap {
  start: StartData
  chunk: TextData
  thinking: TextData
  tool_input: ToolInputData
  tool_use: ToolUseData
  tool_result: ToolResultData
  citation: CitationData
  search: SearchData
  search_results: SearchResultsData
  cost: CostData
  done: DoneData
  error: ErrorData
}

export type EventName = keyof EventDataMap

/** One event as the async iterator yields it; id is null only for an error no server event carried. */
export type StreamMessage = {
  [K in EventName]: { event: K; id: number | null; data: EventDataMap[K] }
}[EventName]

/** What `stream.done` resolves to, however the stream ended; it never rejects. */
export interface StreamResult {
  text: string
  thinking: string
  cost: CostData | null
  stopReason: string | null
  messageId: string | null
  userMessageId: string | null
  conversationId: string | null
  /** The conversation's oldest messages not sent to the model (from start, then cost). */
  truncatedMessages: number
  /**
   * Set when the stream ended with an error event: the server's, or "network_error" when the
   * connection was lost before start (it is never sent twice) or could not be resumed in time.
   */
  error: ErrorData | null
}

/** The connection was lost before done or error; the next try comes after delayMs. */
export interface ReconnectingData {
  /** 1 for the first try since the last new event, then 2, 3... */
  attempt: number
  delayMs: number
}

/** A new connection carries the stream again, from where it was. */
export interface ReconnectedData {
  attempt: number
  /** May differ from before: a WebSocket stream resumes over SSE when no socket opens. */
  transport: Transport
}

/** Events about the connection, not the answer: dispatched and on(), never iterated. */
export interface LifecycleDataMap {
  reconnecting: ReconnectingData
  reconnected: ReconnectedData
}

export type StreamEventDataMap = EventDataMap & LifecycleDataMap

export type StreamEventMap = { [K in keyof StreamEventDataMap]: CustomEvent<StreamEventDataMap[K]> }

/**
 * connecting: before the first event; streaming: events arrive; reconnecting: the connection
 * was lost and is being resumed; then done, cancelled (done with stopReason "cancelled") or error.
 */
export type StreamState = 'connecting' | 'streaming' | 'reconnecting' | 'done' | 'cancelled' | 'error'

export interface RelayStream extends EventTarget, AsyncIterable<StreamMessage> {
  /**
   * The transport in use. In "auto" mode it turns from "websocket" to "sse" when the socket cannot
   * open, before the message is sent or, for one resume, when no socket opens again.
   */
  readonly transport: Transport
  readonly state: StreamState
  /** Known from the start event (or, for EventSource, from the POST's answer). */
  readonly streamId: string | null
  readonly conversationId: string | null
  /** The answer's id: from the start event (a continue's: the continued answer's, from the outset). */
  readonly messageId: string | null
  /** The user message answered, and the answer's parent (the same id): from the start event. */
  readonly userMessageId: string | null
  readonly parentId: string | null
  readonly model: string | null
  /** The conversation's oldest messages not sent to the model: from start, then from cost. */
  readonly truncatedMessages: number
  /** The answer's text so far; for a continue, only the text added. */
  readonly text: string
  readonly thinking: string
  readonly cost: CostData | null
  readonly stopReason: string | null
  readonly error: ErrorData | null
  /** The id of the last event received; 0 before any. Events with an id not above it are ignored. */
  readonly lastEventId: number
  /** True once done or error has arrived. */
  readonly finished: boolean
  readonly done: Promise<StreamResult>
  /**
   * Asks the server to stop; the stream then ends with done, stopReason "cancelled". While
   * reconnecting it posts to the cancel endpoint and reconnects at once to get that done.
   */
  cancel(): void
  on<K extends keyof StreamEventDataMap>(name: K, fn: (data: StreamEventDataMap[K], event: StreamEventMap[K]) => void): this
  addEventListener<K extends keyof StreamEventMap>(
    name: K,
    listener: (event: StreamEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void
  addEventListener(
    name: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void
}

export interface SendOptions {
  conversationId?: string
  agentId?: string
  /**
   * The answer the new message follows, in that conversation: a message beside the one that followed it
   * (an edit is a send with the edited message's parentId); null: a new first message. Omitted: after the
   * conversation's active leaf.
   */
  parentMessageId?: string | null
  /**
   * Images (PNG, JPEG, GIF, WebP) and PDFs for this message. Each File/Blob or {name, mediaType, data} is
   * uploaded first (POST /api/attachments, see uploadAttachment) and the command carries only their ids, so a
   * resume or a fallback never sends the bytes again; an {id} is one uploaded already. A failed upload ends the
   * stream with its error (code and status of the upload's answer), nothing sent.
   */
  attachments?: AttachmentInput[]
}

/** An attachment to send: a File/Blob, bytes as base64 with a name and media type, or an uploaded one's id. */
export type AttachmentInput = Blob | { name: string; mediaType: string; data: string } | { id: string }

/** An uploaded attachment, as POST /api/attachments answers. */
export interface Attachment {
  id: string
  name: string
  /** The media type the server read from the bytes. */
  mediaType: string
  /** Bytes. */
  size: number
}

/** A reference to an uploaded attachment in a message's blocks. */
export interface AttachmentBlock {
  type: 'image' | 'document'
  source: { type: 'attachment'; id: string }
}

/** One API message of those a stored message stands for: content blocks as the Messages API takes them. */
export interface BlockMessage {
  role: 'user' | 'assistant'
  content: Array<AttachmentBlock | ContentBlock>
}

/** A conversation as the REST API gives it. */
export interface Conversation {
  id: string
  title: string | null
  agentId: string | null
  createdAt: string
  updatedAt: string
  messageCount: number
  ownerId: string
  /** Dollars, an exact decimal string; null when a price is unknown. */
  totalCost: string | null
  /** The last message of the active path (the branch shown). */
  activeLeafId: string | null
}

/** A message of a conversation's tree. */
export interface Message {
  id: string
  conversationId: string
  role: 'user' | 'assistant'
  content: string
  thinking: string | null
  model: string | null
  /** "complete", "streaming", "error", "cancelled", "interrupted". */
  status: string
  stopReason: string | null
  inputTokens: number | null
  outputTokens: number | null
  cacheCreationInputTokens: number | null
  cacheReadInputTokens: number | null
  totalCost: string | null
  costEstimated: boolean
  errorCode: string | null
  streamId: string | null
  createdAt: string
  completedAt: string | null
  /** null for a first user message. */
  parentId: string | null
  /** 0-based place among the messages with the same parent, oldest first; of siblingCount. */
  siblingIndex: number
  siblingCount: number
  /**
   * The API messages this message stands for, or null for plain text: a user message's attachment refs and
   * text; an answer's assistant content (text with citations, thinking, tool_use, server tool blocks) and the
   * user tool_result messages between its rounds.
   */
  blocks?: BlockMessage[] | null
}

export interface MessagesPage {
  conversation: Conversation
  activeLeafId: string | null
  /** Every message, parents before children; with path "active", the root..active leaf chain in order. */
  messages: Message[]
}

export interface ConversationList {
  /** Newest updated first. */
  conversations: Conversation[]
  /** The `before` of the next (older) page; null on the last. */
  nextBefore: string | null
}

export interface DeletedConversation {
  id: string
  deleted: true
  /** The answers still generating that the delete cancelled. */
  cancelledStreamIds: string[]
}

/** What a REST helper throws for an answer that is not a 2xx: the server's error, with the HTTP status. */
export interface RelayError extends Error {
  /** The HTTP status; 0 when no answer came (code "network_error"). */
  status: number
  /** "not_found", "invalid_request", "busy", "unauthorized"... */
  code: string
  retryable: boolean
}

export interface ClientOptions {
  /** Origin (and path prefix) of the relay; default: this page's origin. */
  baseUrl?: string
  /** Default "auto": WebSocket, falling back to SSE if the socket fails before its first frame. */
  transport?: 'auto' | Transport
  /**
   * The server's keepalive interval (RELAY_KEEPALIVE_SECONDS, in ms); default 15000. Sets the
   * default stallTimeoutMs.
   */
  keepaliveMs?: number
  /**
   * A connection with no event and no keepalive for this long is taken for dead and resumed;
   * default 2.5 × keepaliveMs. Not for "eventsource": EventSource hides keepalive comments.
   */
  stallTimeoutMs?: number
  /** A WebSocket upgrade that has not opened by then failed (auto mode: SSE instead); default 5000. */
  wsOpenTimeoutMs?: number
  /**
   * Resuming lost connections: try n waits min(maxMs, baseMs × 2^(n-1)), from half to all of
   * it (jitter). After maxAttempts tries, or giveUpMs since the last new event, the stream ends
   * with network_error. Defaults: 500, 10000, Infinity, 120000. maxAttempts 0: never resume.
   * A page coming back into view, or the browser coming back online, retries at once.
   */
  reconnect?: { baseMs?: number; maxMs?: number; maxAttempts?: number; giveUpMs?: number }
  /**
   * Your app's token for this user: an async function returning a JWT the relay takes (RELAY_JWT_SECRET or
   * RELAY_JWKS_URL). Called before the first request or socket, again when the server refuses the token
   * (a 401, `token_expired`: once per refusal; a new token refused too ends the stream with `unauthorized`),
   * and before the token's `exp` while a socket is open: at exp − min(30 s, max(1 s, 10% of its lifetime), half its
   * lifetime), read from the token's own exp and iat claims (not verified client-side). It goes as `Authorization: Bearer` on fetch requests,
   * as the WebSocket's first frame (`{"type": "auth"}`; nothing else is sent before `authenticated`), and
   * for EventSource as a session cookie (`POST /api/session`) first. A rejection counts as a lost
   * connection (resumed with backoff; a refresh is tried again). Without it: the cookie or open mode.
   */
  getToken?: () => Promise<string>
  /** Implementations to use instead of the globals (tests, Node). */
  WebSocket?: typeof WebSocket
  EventSource?: typeof EventSource
  fetch?: typeof fetch
}

export interface Client {
  /** The transport of the latest stream; null before the first. */
  readonly transport: Transport | null
  send(message: string, options?: SendOptions): RelayStream
  /** A new answer beside `messageId` (an answer), to the same user message with the same history. */
  regenerate(messageId: string): RelayStream
  /**
   * More of the answer `messageId`, appended to it: only for one that stopped at max_tokens or was cancelled
   * (else the stream ends with the error `not_continuable`). Its chunks carry only the new text.
   */
  continue(messageId: string): RelayStream
  /**
   * POST /api/attachments (multipart, field `file`, with the bearer token): resolves to the stored attachment,
   * rejects with a RelayError (413 too large, 415 not an image or PDF...).
   */
  uploadAttachment(file: Blob | { name: string; mediaType: string; data: string }): Promise<Attachment>
  // The REST helpers: each resolves to the parsed JSON of a 2xx answer and rejects with a RelayError otherwise.
  /** GET /api/conversations: limit (default 50, at most 200), before (a page's nextBefore), q (in titles). */
  listConversations(options?: { limit?: number; before?: string; q?: string }): Promise<ConversationList>
  /** GET /api/conversations/{id}/messages: every message, or (path "active") the active path. */
  getMessages(conversationId: string, options?: { path?: 'active' }): Promise<MessagesPage>
  /** PUT .../active-leaf: the branch through `messageId` (down its newest children) becomes the active path. */
  setActiveLeaf(conversationId: string, messageId: string): Promise<MessagesPage>
  /** PATCH /api/conversations/{id}: the title, trimmed, 1 to 200 characters (else invalid_request). */
  renameConversation(conversationId: string, title: string): Promise<Conversation>
  /** DELETE /api/conversations/{id}: cancels its running answers, then deletes it and its messages. */
  deleteConversation(conversationId: string): Promise<DeletedConversation>
  /** Ends every open stream with a network_error, closes the socket and stops listening to the page. */
  close(): void
}

export function createClient(options?: ClientOptions): Client

export interface SSEEvent {
  /** "message" when the event had no event field. */
  event: string
  data: string
  /** The last event ID ("" if none was set). */
  id: string
}

export interface SSEParser {
  /** Feed decoded text, in any pieces. */
  feed(text: string): void
  /** Forget everything: the next feed starts a new stream. */
  reset(): void
}

export function createSSEParser(onEvent: (event: SSEEvent) => void, onRetry?: (ms: number) => void): SSEParser
