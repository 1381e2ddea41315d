// deltarelay client: one ES module, no dependencies; packaging minifies it (npm run build).
//
// Streams a relay answer over one shared WebSocket, or over SSE (a fetch POST
// whose body is parsed incrementally) or EventSource when the socket is not an
// option. Whatever the transport, a stream gives the same events with the same
// data, and a dropped connection is resumed from the last event id it saw.
// Public surface: createClient and createSSEParser, nothing else.

const MESSAGE_PATH = '/api/command-center/message'
const STREAMS_PATH = '/api/command-center/streams/'
const EVENTS = ['start', 'chunk', 'thinking', 'cost', 'done', 'error']
// A 204 to a resume: the stream has ended, and there is nothing after the last event seen.
const ended = () => ({ code: 'not_resumable', message: 'The stream has ended', retryable: false })

const networkError = (message) => ({ code: 'network_error', message, retryable: true })

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
  constructor(transport, body) {
    super()
    this.transport = this._home = transport
    this.state = 'connecting'
    this.text = this.thinking = ''
    this.streamId = this.conversationId = this.messageId = this.model = null
    this.cost = this.stopReason = this.error = null
    this.lastEventId = this._attempt = this._lostAt = 0
    this.finished = false
    this.done = new Promise((resolve) => (this._resolve = resolve))
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
    } else if (event === 'chunk') this.text += data.text
    else if (event === 'thinking') this.thinking += data.text
    else if (event === 'cost') this.cost = data
    else if (event === 'done') {
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
      const { text, thinking, cost, stopReason, messageId, conversationId, error } = this
      this._resolve({ text, thinking, cost, stopReason, messageId, conversationId, error })
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

  const client = {
    transport: null,

    send(message, { conversationId, agentId } = {}) {
      const stream = new Stream(mode, { message, agentId, conversationId })
      stream._cancel = () => cancel(stream)
      live.add(stream)
      stream.done.then(() => live.delete(stream))
      client.transport = mode
      start(stream)
      return stream
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
      fetchImpl(base + path, { method: 'POST' }).then((res) => (stream._cancelSent = res.ok), () => {})
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
  function socketFailed(stream, conn) {
    if (!auto || conn?.open) return lost(stream, conn)
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
    conn.send(resume ? { type: 'resume', streamId, lastEventId, requestId } : { type: 'message', ...stream._body, requestId })
    if (conn.open) connected(stream)
  }

  function connect() {
    const url = new URL(base + '/api/command-center/ws', globalThis.location?.href)
    url.protocol = url.protocol.replace('http', 'ws')
    const ws = new WS(url.href)
    const queue = []
    let dog
    const conn = {
      open: false,
      byRequest: new Map(),
      byStream: new Map(),
      send(frame) {
        frame = JSON.stringify(frame)
        conn.open ? ws.send(frame) : queue.push(frame)
      },
      drop(stream) {
        for (const map of [conn.byRequest, conn.byStream]) for (const [key, s] of map) if (s === stream) map.delete(key)
      },
      close: () => fail(),
    }
    // A hanging upgrade counts as a failed one.
    const opening = later(() => fail(), wsOpenTimeoutMs)
    ws.onopen = () => {
      clearTimeout(opening)
      conn.open = true
      dog = watchdog(fail)
      for (const frame of queue.splice(0)) ws.send(frame)
      for (const stream of conn.byRequest.values()) connected(stream)
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
      const stream = conn.byStream.get(streamId) || conn.byRequest.get(requestId)
      if (!stream) return // a keepalive, a pong, or an error about a frame no stream owns
      if (event === 'start') conn.byStream.set(streamId ?? data.streamId, stream)
      deliver(stream, conn, event, data, id)
    }
    const fail = (ws.onerror = ws.onclose = () => {
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null
      clearTimeout(opening)
      dog?.stop()
      if (socket === conn) socket = null
      try {
        ws.close()
      } catch {}
      // A socket that never carried a frame: WebSockets do not get through here.
      if (auto && !socketWorked) mode = 'sse'
      const streams = new Set([...conn.byRequest.values(), ...conn.byStream.values()])
      conn.byRequest.clear()
      conn.byStream.clear()
      for (const stream of streams) socketFailed(stream, conn)
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
        ? fetchImpl(base + STREAMS_PATH + encodeURIComponent(stream.streamId), {
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
      const res = await fetchImpl(url, { headers: { Accept: 'application/json' } })
      if (stream._conn === conn) {
        if (res.status === 204) return stream._push('error', ended())
        if (res.status >= 400 && res.status < 500 && res.status !== 429) return stream._push('error', await httpError(res))
      }
      res.body?.cancel()
    } catch {}
    lost(stream, conn)
  }

  function post(path, body, accept, signal) {
    return fetchImpl(base + path, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: accept },
      body: JSON.stringify(body),
      signal,
    })
  }

  return client
}

async function httpError(res) {
  let body
  try {
    body = (await res.json()).error
  } catch {}
  return {
    code: 'http_error',
    message: 'HTTP ' + res.status,
    retryable: res.status === 429 || res.status >= 500,
    ...body,
  }
}
