// deltarelay client: one ES module, no dependencies; packaging minifies it (npm run build).
//
// Streams a relay answer over one shared WebSocket, or over SSE (a fetch POST
// whose body is parsed incrementally) or EventSource when the socket is not an
// option. Whatever the transport, a stream gives the same events with the same
// data, and a dropped connection is resumed from the last event id it saw.
// An answer is asked for by a send, a regenerate or a continue: one command with
// the same fields in a WebSocket frame and in the POST body. The conversations'
// REST calls are methods of the client too.
// Public surface: createClient and createSSEParser, nothing else.

const MESSAGE_PATH = '/api/command-center/message'
const STREAMS_PATH = '/api/command-center/streams/'
const CONVERSATIONS_PATH = '/api/conversations'
const ATTACHMENTS_PATH = '/api/attachments'
// Every answer event a server sends; an EventSource hears only the names it listens to.
const EVENTS = ['start', 'chunk', 'thinking', 'tool_input', 'tool_use', 'tool_result', 'citation', 'search', 'search_results', 'cost', 'done', 'error']
// A 204 to a resume: the stream has ended, and there is nothing after the last event seen.
const ended = () => ({ code: 'not_resumable', message: 'The stream has ended', retryable: false })

const networkError = (message) => ({ code: 'network_error', message, retryable: true })
// What the server says of a credential it does not take (an HTTP 401's code, or an error frame's).
const REFUSALS = ['unauthorized', 'token_expired']
const UNAUTHORIZED = 4401 // the close code of a socket whose credential was refused or expired

/**
 * What the client reads of a JWT: its `exp` (and `iat`) claims, from the payload (base64url JSON), not
 * verified (the server does that). A refresh is due at exp - min(30 s, max(1 s, 10% of the lifetime), half
 * the lifetime): a second at least for the round trip, never more than half the token's life; the lifetime is
 * exp - iat (exp - now without iat). A token without a readable exp is never refreshed ahead.
 */
function claimsOf(token) {
  let exp = null
  let iat = null
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')
    const payload = JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(part), (c) => c.charCodeAt(0))))
    if (Number.isFinite(payload.exp)) exp = payload.exp * 1000
    if (Number.isFinite(payload.iat)) iat = payload.iat * 1000
  } catch {}
  const lifetime = exp === null ? 0 : exp - Math.min(iat ?? Date.now(), Date.now())
  return { exp, refreshAt: exp === null ? Infinity : exp - Math.min(30000, Math.max(1000, lifetime / 10), lifetime / 2) }
}

/**
 * A WHATWG-conforming incremental SSE parser: text in, events out.
 *
 * Line ends are LF, CRLF and a lone CR, and nothing else (not U+2028, not
 * U+0085). A CR ending one feed and an LF starting the next are one line end.
 * One BOM is stripped at the very start. An event without a terminating blank
 * line is never dispatched.
 */
export function createSSEParser(onEvent, onRetry) {
  let rest, skipLF, atStart, data, type, lastId

  function reset() {
    rest = data = type = lastId = ''
    skipLF = false
    atStart = true
  }

  function line(text) {
    if (!text) {
      // A blank line dispatches; an event with no data field is dropped.
      if (data) onEvent({ event: type || 'message', data: data.slice(0, -1), id: lastId })
      data = type = ''
      return
    }
    const colon = text.indexOf(':')
    if (colon === 0) return // a comment, e.g. ": keepalive"
    const field = colon < 0 ? text : text.slice(0, colon)
    const value = colon < 0 ? '' : text.slice(colon + (text[colon + 1] === ' ' ? 2 : 1))
    if (field === 'data') data += value + '\n'
    else if (field === 'event') type = value
    else if (field === 'id') { if (!value.includes('\0')) lastId = value }
    else if (field === 'retry') { if (/^\d+$/.test(value)) onRetry?.(+value) }
  }

  function feed(text) {
    if (!text) return
    if (atStart) {
      atStart = false
      if (text[0] === '\uFEFF') text = text.slice(1)
    }
    let start = skipLF && text[0] === '\n' ? 1 : 0
    const ends = /\r\n?|\n/g
    ends.lastIndex = start
    for (let m; (m = ends.exec(text)); start = ends.lastIndex) {
      line(rest + text.slice(start, m.index))
      rest = ''
    }
    rest += text.slice(start)
    skipLF = text[text.length - 1] === '\r'
  }

  reset()
  return { feed, reset }
}

/**
 * One answer being streamed. An EventTarget (CustomEvent, `.detail` = data),
 * with on(name, fn) callbacks and async iteration of {event, id, data}.
 *
 * Events carry ids 1, 2, 3...; an id not above lastEventId is a replay and is
 * ignored, so a resumed connection can replay from any point. `reconnecting`
 * and `reconnected` are events too, but not part of the iterated answer.
 */
class Stream extends EventTarget {
  // frame: the command as a WebSocket frame (without its requestId); body: the same command as the POST body.
  constructor(transport, frame, body) {
    super()
    this.transport = this._home = transport
    this.state = 'connecting'
    this.text = this.thinking = ''
    this.streamId = this.conversationId = this.messageId = this.model = null
    this.userMessageId = this.parentId = null
    this.truncatedMessages = 0
    // A continue writes on into an answer that exists: its id is known before the start.
    if (frame?.type === 'continue') this.messageId = frame.messageId
    this.cost = this.stopReason = this.error = null
    this.lastEventId = this._attempt = this._lostAt = 0
    this.finished = false
    this.done = new Promise((resolve) => (this._resolve = resolve))
    this._frame = frame
    this._body = body
    this._log = []
    this._conn = this._timer = null
  }

  on(name, fn) {
    this.addEventListener(name, (e) => fn(e.detail, e))
    return this
  }

  cancel() {
    if (this.finished) return
    // Still uploading its attachments: nothing was sent, so nothing is answered.
    if (!this._frame) return this._push('done', { conversationId: this._conversation ?? null, messageId: null, stopReason: 'cancelled' })
    this._cancelled = true
    if (this.streamId) this._cancel()
  }

  async *[Symbol.asyncIterator]() {
    for (let i = 0; ; i++) {
      while (i >= this._log.length) {
        if (this.finished) return
        await (this._next ||= new Promise((wake) => (this._wake = wake)))
      }
      yield this._log[i]
    }
  }

  _emit(name, detail) {
    this.dispatchEvent(new CustomEvent(name, { detail }))
  }

  _learnId(streamId) {
    if (this.streamId) return
    this.streamId = streamId
    if (this._cancelled) this._cancel() // cancel() came before the id did
  }

  _push(event, data, id) {
    if (this.finished) return
    // No id (or the id 0 of a server's "cannot resume" answer) is never a replay.
    if ((id = +id || null)) {
      if (id <= this.lastEventId) return
      this.lastEventId = id
      this._attempt = this._lostAt = 0 // news: the connection works
    }
    if (this.state === 'connecting') this.state = 'streaming'

    if (event === 'start') {
      this._learnId(data.streamId)
      this.conversationId = data.conversationId
      this.model = data.model
      this.messageId = data.messageId ?? this.messageId
      this.userMessageId = data.userMessageId ?? null
      this.parentId = data.parentId ?? null
      this.truncatedMessages = data.truncatedMessages ?? 0
    } else if (event === 'chunk') this.text += data.text
    else if (event === 'thinking') this.thinking += data.text
    else if (event === 'cost') {
      this.cost = data
      // A retry after the model refused the request for length leaves out more than start said.
      this.truncatedMessages = data.truncatedMessages ?? this.truncatedMessages
    } else if (event === 'done') {
      this.stopReason = data.stopReason
      this.messageId = data.messageId
      this.conversationId = data.conversationId ?? this.conversationId
    } else if (event === 'error') {
      this.error = data
      this.messageId = data.messageId ?? this.messageId
    }

    const end = event === 'done' || event === 'error'
    if (end) {
      this.finished = true
      this.state = this.error ? 'error' : this.stopReason === 'cancelled' ? 'cancelled' : 'done'
      this._conn?.drop(this)
      clearTimeout(this._timer)
    }
    this._log.push({ event, id, data })
    const wake = this._wake
    this._next = this._wake = null
    wake?.()
    this._emit(event, data)
    if (end) {
      const { text, thinking, cost, stopReason, messageId, userMessageId, conversationId, error, truncatedMessages } = this
      this._resolve({ text, thinking, cost, stopReason, messageId, userMessageId, conversationId, error, truncatedMessages })
    }
  }
}

/** A timer that does not keep Node alive by itself. */
const later = (fn, ms) => {
  const timer = setTimeout(fn, ms)
  timer.unref?.()
  return timer
}

/**
 * A relay client. transport: "auto" (WebSocket, falling back to SSE by
 * itself), "websocket", "sse" or "eventsource". WebSocket, fetch and
 * EventSource default to the globals and can be passed in (tests, Node).
 *
 * A connection lost before done or error is resumed from the last event id,
 * with exponential backoff and jitter; silence longer than stallTimeoutMs (no
 * event, no keepalive) counts as a lost connection.
 */
export function createClient(options = {}) {
  const {
    baseUrl = '',
    WebSocket: WS = globalThis.WebSocket,
    EventSource: ES = globalThis.EventSource,
    fetch: fetchImpl = (...args) => globalThis.fetch(...args),
    keepaliveMs = 15000,
    stallTimeoutMs = keepaliveMs * 2.5,
    wsOpenTimeoutMs = 5000,
    reconnect: { baseMs = 500, maxMs = 10000, maxAttempts = Infinity, giveUpMs = 120000 } = {},
    getToken = null,
  } = options
  const base = baseUrl.replace(/\/+$/, '')
  const auto = !options.transport || options.transport === 'auto'
  let mode = auto ? (WS ? 'websocket' : 'sse') : options.transport
  let socket = null
  let socketWorked = false // a socket of this client has carried a frame
  let requests = 0
  const live = new Set()
  const doc = globalThis.document
  const win = globalThis.window

  // Back in view or back online: retry every waiting stream now, not after its backoff.
  const retryAll = () => {
    if (!doc || doc.visibilityState !== 'hidden') for (const stream of live) if (stream._timer) retry(stream)
  }
  doc?.addEventListener('visibilitychange', retryAll)
  win?.addEventListener('online', retryAll)

  // The bearer token (with getToken): { token, exp, refreshAt, replacement, refused, fatal }. `replacement`:
  // got because the one before was refused, so a refusal of this one too reaches the caller as unauthorized
  // (one new token per failure, never a loop); it stops being one once the server takes it.
  let cred = null
  let pending = null

  /** The credential to send: the current one, or a new one from getToken when there is none, it was refused,
   * its refresh is due or it is `replace` (a refresh's: a timer may fire a moment before the due time).
   * Callers at the same time share one getToken call. Rejects when getToken does. */
  function credential(replace) {
    if (cred && cred !== replace && !cred.refused && cred.refreshAt > Date.now()) return Promise.resolve(cred)
    return (pending ||= (async () => {
      try {
        const replacement = !!cred?.refused && !cred.fatal
        const token = await getToken()
        if (typeof token !== 'string' || !token) throw new TypeError('getToken returned no token')
        return (cred = { token, ...claimsOf(token), replacement, refused: false, fatal: false })
      } finally {
        pending = null
      }
    })())
  }

  const accepted = (c) => (c.replacement = false)

  /** The server refused `c` (a 401, an error frame, a 4401 close; the same refusal may come twice). True when
   * `c` was already a replacement: the caller gets unauthorized, and the next request starts afresh. */
  function turnedDown(c) {
    if (!c.refused) {
      c.refused = true
      c.fatal = c.replacement
    }
    return c.fatal
  }

  /** fetch, with the bearer token when getToken is set; a 401 gets one new token and one retry. */
  async function request(url, init = {}) {
    if (!getToken) return fetchImpl(url, init)
    for (;;) {
      const c = await credential()
      const res = await fetchImpl(url, { ...init, headers: { ...init.headers, Authorization: 'Bearer ' + c.token } })
      if (res.status !== 401) return accepted(c), res
      if (turnedDown(c)) return (res.refusedAgain = true), res
      res.body?.cancel().catch(() => {})
    }
  }

  // The token an EventSource's session cookie was made from (an EventSource cannot send a header).
  let sessionCred = null

  /** With getToken: a session cookie from the current token (POST /api/session), unless there is one.
   * Resolves to null, or to the server's refusal (a Response) after one new token. */
  async function session() {
    if (!getToken) return null
    for (;;) {
      const c = await credential()
      if (c === sessionCred) return null
      const res = await post('/api/session', { token: c.token }, 'application/json', undefined, fetchImpl)
      if (res.ok) accepted(c), (sessionCred = c)
      else if (res.status !== 401) return res
      else if (turnedDown(c)) return (res.refusedAgain = true), res
      res.body?.cancel().catch(() => {})
      if (res.ok) return null
    }
  }

  /**
   * A stream for one command, started on the client's transport. `prepare` (a send with attachments): resolves
   * to the command's frame once its files are uploaded; the stream starts then, and a failed upload ends it with
   * that error (nothing was sent). A cancel during the upload ends it as cancelled, with nothing sent either.
   */
  function open(frame, body, prepare) {
    const stream = new Stream(mode, frame, body)
    stream._cancel = () => cancel(stream)
    live.add(stream)
    stream.done.then(() => live.delete(stream))
    client.transport = mode
    if (!prepare) start(stream)
    else {
      prepare().then(
        ({ type, ...fields }) => {
          if (stream.finished) return // cancelled during the upload
          stream._frame = { type, ...fields }
          stream._body = fields
          start(stream)
        },
        (error) => stream._push('error', {
          // A REST error's code; anything else (bad base64, say) is upload_failed, not a DOMException's number.
          code: typeof error.code === 'string' ? error.code : 'upload_failed',
          message: error.message || 'The attachment could not be uploaded',
          retryable: error.retryable ?? false,
          ...(error.status !== undefined && { status: error.status }),
        }),
      )
    }
    return stream
  }

  /**
   * One REST call: the parsed JSON of a 2xx answer. Otherwise throws an Error with the server's `code`,
   * `message` and `retryable` and the HTTP `status` (0 and code network_error when no answer came).
   */
  async function rest(method, path, body) {
    const headers = { Accept: 'application/json' }
    // A FormData body sets its own multipart Content-Type (with the boundary).
    const form = typeof FormData !== 'undefined' && body instanceof FormData
    if (body !== undefined && !form) headers['Content-Type'] = 'application/json'
    let res
    try {
      res = await request(base + path, { method, headers, body: body === undefined || form ? body : JSON.stringify(body) })
    } catch (cause) {
      throw Object.assign(new Error('Request failed', { cause }), networkError('Request failed'), { status: 0 })
    }
    if (res.ok) return res.json()
    const error = await httpError(res)
    throw Object.assign(new Error(error.message), error, { status: res.status })
  }

  const conversation = (id) => CONVERSATIONS_PATH + '/' + encodeURIComponent(id)

  const client = {
    transport: null,

    /**
     * parentMessageId: the answer the new message follows (null: a new first message); default the active leaf.
     * attachments: File/Blob, {name, mediaType, data (base64)} or {id} of an uploaded one; each File/Blob and
     * {name, mediaType, data} is uploaded first, so the command carries only `attachmentIds`.
     */
    send(message, { conversationId, agentId, parentMessageId, attachments } = {}) {
      const fields = { message, agentId, conversationId, parentMessageId }
      if (!attachments?.length) return open({ type: 'message', ...fields }, fields)
      const stream = open(null, null, async () => {
        const attachmentIds = await Promise.all(attachments.map((a) => (isUploaded(a) ? a.id : client.uploadAttachment(a).then((u) => u.id))))
        return { type: 'message', ...fields, attachmentIds }
      })
      stream._conversation = conversationId
      return stream
    },

    /**
     * POST /api/attachments (multipart, field `file`): a File/Blob, or {name, mediaType, data (base64)}.
     * Resolves to {id, name, mediaType, size}; rejects like the REST helpers (status, code).
     */
    async uploadAttachment(file) {
      const form = new FormData()
      if (file instanceof Blob) form.append('file', file, file.name || 'attachment')
      else form.append('file', new Blob([fromBase64(file.data)], { type: file.mediaType }), file.name || 'attachment')
      return rest('POST', ATTACHMENTS_PATH, form)
    },

    /** A new answer beside `messageId` (an answer), to the same user message. */
    regenerate(messageId) {
      return open({ type: 'regenerate', messageId }, { regenerate: messageId })
    },

    /** More of the answer `messageId` (stopped at max_tokens, or cancelled): its chunks carry the new text only. */
    continue(messageId) {
      return open({ type: 'continue', messageId }, { continue: messageId })
    },

    listConversations({ limit, before, q } = {}) {
      const query = new URLSearchParams()
      for (const [name, value] of Object.entries({ limit, before, q })) if (value != null && value !== '') query.set(name, value)
      const search = query.toString()
      return rest('GET', CONVERSATIONS_PATH + (search ? '?' + search : ''))
    },

    getMessages(conversationId, { path } = {}) {
      return rest('GET', conversation(conversationId) + '/messages' + (path ? '?path=' + encodeURIComponent(path) : ''))
    },

    setActiveLeaf(conversationId, messageId) {
      return rest('PUT', conversation(conversationId) + '/active-leaf', { messageId })
    },

    renameConversation(conversationId, title) {
      return rest('PATCH', conversation(conversationId), { title })
    },

    deleteConversation(conversationId) {
      return rest('DELETE', conversation(conversationId))
    },

    /** Ends every open stream with network_error and closes the socket. */
    close() {
      for (const stream of live) stream._push('error', networkError('Client closed'))
      socket?.close()
      doc?.removeEventListener('visibilitychange', retryAll)
      win?.removeEventListener('online', retryAll)
    },
  }

  function start(stream, resume) {
    if (stream._home !== 'websocket') return (stream._home === 'sse' ? viaFetch : viaEventSource)(stream, resume)
    try {
      viaSocket(stream, resume)
    } catch {
      socketFailed(stream, null)
    }
  }

  /**
   * The connection `conn` of a stream is gone: resume after a backoff, or end
   * with network_error. A stream with no id yet cannot be resumed, and sending
   * its message again could pay for the answer twice.
   */
  function lost(stream, conn, now) {
    if (stream.finished || stream._conn !== conn) return // already handled
    conn?.drop(stream)
    stream._conn = null
    if (!stream.streamId) return stream._push('error', networkError('The connection closed before the answer started'))
    const attempt = ++stream._attempt
    stream._lostAt ||= Date.now()
    if (attempt > maxAttempts || Date.now() - stream._lostAt >= giveUpMs) {
      return stream._push('error', networkError('The connection was lost and could not be resumed'))
    }
    const delayMs = now ? 0 : Math.round(Math.min(maxMs, baseMs * 2 ** (attempt - 1)) * (0.5 + Math.random() / 2))
    stream.state = 'reconnecting'
    stream._timer = setTimeout(() => retry(stream), delayMs)
    stream._emit('reconnecting', { attempt, delayMs })
  }

  function retry(stream) {
    clearTimeout(stream._timer)
    stream._timer = null
    if (!stream.finished) start(stream, true)
  }

  function connected(stream) {
    if (stream.state !== 'reconnecting') return
    stream.state = 'streaming'
    stream._emit('reconnected', { attempt: stream._attempt, transport: stream.transport })
    if (stream._cancelled && !stream._cancelSent) cancel(stream) // the last try may not have got through
  }

  /** Every event goes through here: slow_consumer is not an end, only a reason to resume. */
  function deliver(stream, conn, event, data, id) {
    connected(stream)
    if (event === 'error' && data.code === 'slow_consumer') lost(stream, conn, true)
    else stream._push(event, data, id)
  }

  function cancel(stream) {
    const conn = stream._conn
    if (conn?.open) {
      stream._cancelSent = true
      conn.send({ type: 'cancel', streamId: stream.streamId })
    } else {
      // No socket open (SSE, or reconnecting): the HTTP endpoint.
      const path = STREAMS_PATH + encodeURIComponent(stream.streamId) + '/cancel'
      request(base + path, { method: 'POST' }).then((res) => (stream._cancelSent = res.ok), () => {})
    }
    if (stream._timer) retry(stream) // reconnect now, so the cancelled done arrives
  }

  /** Calls onStall once nothing has been kick()ed for stallTimeoutMs. */
  function watchdog(onStall) {
    let seen = Date.now()
    let timer
    const check = () => {
      const wait = seen + stallTimeoutMs - Date.now()
      if (wait > 0) timer = later(check, wait)
      else onStall()
    }
    timer = later(check, stallTimeoutMs)
    return { kick: () => (seen = Date.now()), stop: () => clearTimeout(timer) }
  }

  // A socket that never opened carried no frame, so in auto mode SSE can take
  // over: a new stream is posted there, a known one resumed there.
  function socketFailed(stream, conn, now) {
    if (!auto || conn?.open) return lost(stream, conn, now)
    if (!stream.streamId) stream._home = client.transport = 'sse'
    stream._conn = null
    viaFetch(stream, !!stream.streamId)
  }

  function viaSocket(stream, resume) {
    const conn = (socket ||= connect())
    const requestId = 'r' + ++requests
    stream._conn = conn
    stream.transport = 'websocket'
    conn.byRequest.set(requestId, stream)
    if (resume) conn.byStream.set(stream.streamId, stream)
    const { streamId, lastEventId } = stream
    conn.send(resume ? { type: 'resume', streamId, lastEventId, requestId } : { ...stream._frame, requestId })
    if (conn.ready) connected(stream)
  }

  /**
   * The client's socket. With getToken its first frame is `auth` with the token, and nothing else is sent
   * until the server answers `authenticated`; before the token's refresh is due another `auth` frame extends
   * the socket. A refused first token closes the socket (4401): its streams, whose frames never went out,
   * start again at once on a new socket with a new token. A socket closed at its token's expiry resumes its
   * streams at once on a new socket. A new token refused too ends them with unauthorized.
   */
  function connect() {
    const url = new URL(base + '/api/command-center/ws', globalThis.location?.href)
    url.protocol = url.protocol.replace('http', 'ws')
    const ws = new WS(url.href)
    const queue = []
    let dog
    let closed = false
    let refreshTimer = null
    let sent = null // the credential of the last auth frame
    let answered = true // ...and the server has answered it
    let held = null // the credential the server last took on this socket
    let tokenless = false // getToken failed: not a sign that WebSockets do not get through
    let fatal = null // the refusal of a new token: what the streams end with
    const conn = {
      open: false, // the socket is open
      ready: false, // ...and, with getToken, authenticated: frames go out
      byRequest: new Map(),
      byStream: new Map(),
      send(frame) {
        frame = JSON.stringify(frame)
        conn.ready ? ws.send(frame) : queue.push(frame)
      },
      drop(stream) {
        for (const map of [conn.byRequest, conn.byStream]) for (const [key, s] of map) if (s === stream) map.delete(key)
      },
      close: () => fail(),
    }
    const ready = () => {
      conn.ready = true
      for (const frame of queue.splice(0)) ws.send(frame)
      for (const stream of conn.byRequest.values()) connected(stream)
    }
    // The token, first or refreshed. No token (getToken failed): the first makes a lost connection; a
    // refresh is tried again after 1 s or half the time left, whichever is sooner, until 100 ms before
    // exp; then the server closes the socket at exp, and its streams resume on a new one.
    let asking = false // a getToken call of this socket's is under way: one at a time
    async function authenticate(refresh) {
      if (asking) return
      asking = true
      let c
      try {
        c = await credential(refresh && held)
      } catch {
        if (!refresh) return (tokenless = true), fail()
        const left = held.exp - Date.now()
        if (left > 100) refreshTimer = later(() => authenticate(true), Math.min(1000, left / 2))
        return
      } finally {
        asking = false
      }
      if (closed) return
      sent = c
      answered = false
      ws.send(JSON.stringify({ type: 'auth', token: c.token }))
    }
    function authenticated() {
      held = sent
      answered = true
      accepted(held)
      if (!conn.ready) ready()
      clearTimeout(refreshTimer)
      const wait = held.refreshAt - Date.now()
      // At least a second apart, should getToken hand out a token already due (a cached one).
      if (wait < Infinity) refreshTimer = later(() => authenticate(true), Math.max(1000, wait))
    }
    // An unauthorized or token_expired error frame: the answer to the auth frame just sent, or (none
    // outstanding) the notice that the socket's token has expired, before the server closes it.
    function authRefused(data) {
      const c = answered ? held : sent
      answered = true
      if (!c) return
      if (turnedDown(c)) {
        fatal = { ...data, code: 'unauthorized', retryable: false }
        return fail()
      }
      // A refused first token: the server closes the socket, and the streams start again on a new one.
      if (conn.ready) authenticate(true)
    }
    // A hanging upgrade counts as a failed one.
    const opening = later(() => fail(), wsOpenTimeoutMs)
    ws.onopen = () => {
      clearTimeout(opening)
      conn.open = true
      dog = watchdog(fail)
      if (getToken) authenticate()
      else ready()
    }
    ws.onmessage = (e) => {
      dog?.kick() // a keepalive frame is life too
      socketWorked = true
      let frame
      try {
        frame = JSON.parse(e.data)
      } catch {
        return
      }
      const { event, streamId, requestId, id, data } = frame
      if (getToken && event === 'authenticated') return sent && authenticated()
      if (getToken && event === 'error' && streamId == null && requestId == null && REFUSALS.includes(data?.code)) {
        return authRefused(data)
      }
      const stream = conn.byStream.get(streamId) || conn.byRequest.get(requestId)
      if (!stream) return // a keepalive, a pong, or an error about a frame no stream owns
      if (event === 'start') conn.byStream.set(streamId ?? data.streamId, stream)
      deliver(stream, conn, event, data, id)
    }
    const fail = (ws.onerror = ws.onclose = (e) => {
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null
      closed = true
      clearTimeout(opening)
      clearTimeout(refreshTimer)
      dog?.stop()
      if (socket === conn) socket = null
      try {
        ws.close()
      } catch {}
      // Closed for its token (4401): refused before the socket was ready, or expired; with a new token
      // the streams go on at once: started again (nothing of theirs went out) or resumed.
      const forToken = !!getToken && e?.code === UNAUTHORIZED
      const last = held || sent
      if (forToken && !fatal && last && turnedDown(last)) fatal = { code: 'unauthorized', message: 'The token was refused', retryable: false }
      // A socket that never carried a frame: WebSockets do not get through here.
      if (auto && !socketWorked && !tokenless) mode = 'sse'
      const streams = new Set([...conn.byRequest.values(), ...conn.byStream.values()])
      conn.byRequest.clear()
      conn.byStream.clear()
      for (const stream of streams) {
        if (fatal) stream._push('error', fatal)
        else if (forToken && !conn.ready) (stream._conn = null), start(stream, !!stream.streamId)
        else socketFailed(stream, conn, forToken)
      }
    })
    return conn
  }

  async function viaFetch(stream, resume) {
    const abort = new AbortController()
    const conn = { drop: () => abort.abort() }
    stream._conn = conn
    stream.transport = 'sse'
    const dog = watchdog(() => abort.abort())
    try {
      const signal = abort.signal
      const res = await (resume
        ? request(base + STREAMS_PATH + encodeURIComponent(stream.streamId), {
            headers: { Accept: 'text/event-stream', 'Last-Event-ID': '' + stream.lastEventId },
            signal,
          })
        : post(MESSAGE_PATH, stream._body, 'text/event-stream', signal))
      if (!res.ok) {
        // A proxy's 502 while the server restarts is worth another try; a 4xx is an answer.
        if (resume && (res.status >= 500 || res.status === 429)) throw res
        return stream._conn === conn && stream._push('error', await httpError(res))
      }
      if (res.status === 204) return stream._conn === conn && stream._push('error', ended())
      connected(stream)
      const parser = createSSEParser((e) => deliver(stream, conn, e.event, JSON.parse(e.data), e.id))
      // ignoreBOM: keep a BOM in the text, so the parser strips exactly one.
      const decoder = new TextDecoder('utf-8', { ignoreBOM: true })
      const reader = res.body.getReader()
      for (let r; !(r = await reader.read()).done; ) {
        dog.kick() // any bytes, a ": keepalive" comment too
        parser.feed(decoder.decode(r.value, { stream: true }))
      }
      parser.feed(decoder.decode())
    } catch {
    } finally {
      dog.stop()
    }
    lost(stream, conn)
  }

  // EventSource reconnects by itself, but from the id it saw last (a
  // slow_consumer error's id too), at its own pace: close it and resume here.
  // It shows no comments, so it has no stall watchdog.
  async function viaEventSource(stream, resume) {
    stream.transport = 'eventsource'
    if (!resume) {
      try {
        const res = await post(MESSAGE_PATH, stream._body, 'application/json')
        if (!res.ok) return stream._push('error', await httpError(res))
        const { streamId, conversationId } = await res.json()
        stream.conversationId = conversationId
        stream._learnId(streamId)
      } catch {
        return stream._push('error', networkError('Request failed'))
      }
      if (stream.finished) return
    }
    try {
      const refusal = await session()
      if (refusal) return stream._push('error', await httpError(refusal))
    } catch {
      return lost(stream, null)
    }
    if (stream.finished) return
    const cursor = stream.lastEventId ? '?lastEventId=' + stream.lastEventId : ''
    const url = base + STREAMS_PATH + encodeURIComponent(stream.streamId) + cursor
    let source
    try {
      source = new ES(url)
    } catch {
      return lost(stream, null)
    }
    const conn = { drop: () => source.close() }
    stream._conn = conn
    source.onopen = () => connected(stream)
    for (const name of EVENTS) {
      source.addEventListener(name, (e) => {
        // A server "error" event has data; a failed connection has none, and a refused one is CLOSED.
        if (e.data != null) deliver(stream, conn, name, JSON.parse(e.data), e.lastEventId)
        else if (source.readyState === 2) refused(stream, conn, url)
        else lost(stream, conn)
      })
    }
  }

  // An EventSource shows neither the status nor the body of a refusal (204, 404 not_resumable, 401...):
  // ask again with fetch, and end with the server's answer rather than retrying what it refused.
  async function refused(stream, conn, url) {
    try {
      const res = await request(url, { headers: { Accept: 'application/json' } })
      if (stream._conn === conn) {
        if (res.status === 204) return stream._push('error', ended())
        if (res.status >= 400 && res.status < 500 && res.status !== 429) return stream._push('error', await httpError(res))
      }
      if (res.ok) sessionCred = null // taken with the bearer token: the next try makes a new session cookie
      res.body?.cancel()
    } catch {}
    lost(stream, conn)
  }

  function post(path, body, accept, signal, send = request) {
    return send(base + path, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: accept },
      body: JSON.stringify(body),
      signal,
    })
  }

  return client
}

/** An attachment already uploaded ({id}): sent by its id, not uploaded again. */
const isUploaded = (a) => typeof a?.id === 'string' && !(a instanceof Blob) && a.data === undefined

/** Bytes of a base64 string (standard alphabet, padded or not). */
const fromBase64 = (data) => Uint8Array.from(atob(data), (c) => c.charCodeAt(0))

async function httpError(res) {
  let body
  try {
    body = (await res.json()).error
  } catch {}
  const error = { code: 'http_error', message: 'HTTP ' + res.status, retryable: res.status === 429 || res.status >= 500, ...body }
  // getToken's new token was refused too (token_expired again, say): the caller is not authorized.
  if (res.refusedAgain) Object.assign(error, { code: 'unauthorized', retryable: false })
  return error
}
