// Types for deltarelay.js: the relay's wire events and the client's public surface.

export type Transport = 'websocket' | 'sse' | 'eventsource'

export interface StartData {
  streamId: string
  conversationId: string
  model: string
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
}

export interface DoneData {
  conversationId: string
  messageId: string | null
  /** "end_turn", "max_tokens", "cancelled"... */
  stopReason: string | null
}

export interface ErrorData {
  /** The server's code, or "network_error" when the connection was lost. */
  code: string
  message: string
  retryable: boolean
  /** Seconds to wait before retrying. */
  retryAfter?: number
  messageId?: string
}

export interface EventDataMap {
  start: StartData
  chunk: TextData
  thinking: TextData
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
  conversationId: string | null
  /** Set when the stream ended with an error event. */
  error: ErrorData | null
}

export interface StreamEventMap {
  start: CustomEvent<StartData>
  chunk: CustomEvent<TextData>
  thinking: CustomEvent<TextData>
  cost: CustomEvent<CostData>
  done: CustomEvent<DoneData>
  error: CustomEvent<ErrorData>
}

export interface RelayStream extends EventTarget, AsyncIterable<StreamMessage> {
  /** The transport in use; in "auto" mode it may turn from "websocket" to "sse" before the first event. */
  readonly transport: Transport
  /** Known from the start event (or, for EventSource, from the POST's answer). */
  readonly streamId: string | null
  readonly conversationId: string | null
  readonly messageId: string | null
  readonly model: string | null
  /** The answer's text so far. */
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
  /** Asks the server to stop; the stream then ends with done, stopReason "cancelled". */
  cancel(): void
  on<K extends EventName>(name: K, fn: (data: EventDataMap[K], event: StreamEventMap[K]) => void): this
  addEventListener<K extends EventName>(
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
}

export interface ClientOptions {
  /** Origin (and path prefix) of the relay; default: this page's origin. */
  baseUrl?: string
  /** Default "auto": WebSocket, falling back to SSE if the socket fails before its first frame. */
  transport?: 'auto' | Transport
  /** Implementations to use instead of the globals (tests, Node). */
  WebSocket?: typeof WebSocket
  EventSource?: typeof EventSource
  fetch?: typeof fetch
}

export interface Client {
  /** The transport of the latest stream; null before the first. */
  readonly transport: Transport | null
  send(message: string, options?: SendOptions): RelayStream
  /** Ends every open stream with a network_error and closes the socket. */
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
