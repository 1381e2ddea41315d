// deltarelay client: one ES module, no dependencies, no build step.
//
// Streams a relay answer over one shared WebSocket, or over SSE (a fetch POST
// whose body is parsed incrementally) or EventSource when the socket is not an
// option. Whatever the transport, a stream gives the same events with the same
// data. Public surface: createClient and createSSEParser, nothing else.

const MESSAGE_PATH = '/api/command-center/message'
const STREAMS_PATH = '/api/command-center/streams/'
const EVENTS = ['start', 'chunk', 'thinking', 'cost', 'done', 'error']

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
 * ignored, so a resumed connection can replay from any point.
 */
class Stream extends EventTarget {
  constructor(transport, body) {
    super()
    this.transport = transport
    this.text = this.thinking = ''
    this.streamId = this.conversationId = this.messageId = this.model = null
    this.cost = this.stopReason = this.error = null
    this.lastEventId = 0
    this.finished = false
    this.done = new Promise((resolve) => (this._resolve = resolve))
    this._body = body
    this._log = []
    this._cancel = this._stop = () => {}
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

  _learnId(streamId) {
    if (this.streamId) return
    this.streamId = streamId
    if (this._cancelled) this._cancel() // cancel() came before the id did
  }

  _push(event, data, id) {
    if (this.finished) return
    if (id == null || id === '') id = null
    else if ((id = +id) <= this.lastEventId) return
    else this.lastEventId = id

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
      this._stop()
    }
    this._log.push({ event, id, data })
    const wake = this._wake
    this._next = this._wake = null
    wake?.()
    this.dispatchEvent(new CustomEvent(event, { detail: data }))
    if (end) {
      const { text, thinking, cost, stopReason, messageId, conversationId, error } = this
      this._resolve({ text, thinking, cost, stopReason, messageId, conversationId, error })
    }
  }
}

/**
 * A relay client. transport: "auto" (WebSocket, falling back to SSE by
 * itself), "websocket", "sse" or "eventsource". WebSocket, fetch and
 * EventSource default to the globals and can be passed in (tests, Node).
 */
export function createClient(options = {}) {
  const {
    baseUrl = '',
    WebSocket: WS = globalThis.WebSocket,
    EventSource: ES = globalThis.EventSource,
    fetch: fetchImpl = (...args) => globalThis.fetch(...args),
  } = options
  const base = baseUrl.replace(/\/+$/, '')
  let mode = options.transport || 'auto'
  if (mode === 'auto' && !WS) mode = 'sse'
  let socket = null
  let requests = 0
  const live = new Set()

  const client = {
    transport: null,

    send(message, { conversationId, agentId } = {}) {
      const stream = new Stream(mode === 'auto' ? 'websocket' : mode, { message, agentId, conversationId })
      live.add(stream)
      stream.done.then(() => live.delete(stream))
      start(stream)
      return stream
    },

    /** Ends every open stream with network_error and closes the socket. */
    close() {
      const conn = socket
      socket = null
      for (const stream of live) stream._push('error', networkError('Client closed'))
      conn?.close()
    },
  }

  function start(stream) {
    client.transport = stream.transport
    if (stream.transport === 'websocket') {
      try {
        return viaSocket(stream)
      } catch {
        return socketFailed(stream, false)
      }
    }
    ;(stream.transport === 'eventsource' ? viaEventSource : viaFetch)(stream)
  }

  // A socket that never worked means WebSockets do not get through here:
  // in auto mode, send over SSE instead, now and for later streams.
  function socketFailed(stream, heard) {
    if (heard || mode !== 'auto') return stream._push('error', networkError('Connection lost'))
    mode = stream.transport = 'sse'
    start(stream)
  }

  function viaSocket(stream) {
    const conn = (socket ||= connect())
    const requestId = 'r' + ++requests
    conn.byRequest.set(requestId, stream)
    stream._cancel = () => conn.send({ type: 'cancel', streamId: stream.streamId })
    stream._stop = () => {
      conn.byRequest.delete(requestId)
      conn.byStream.delete(stream.streamId)
    }
    conn.send({ type: 'message', ...stream._body, requestId })
  }

  function connect() {
    const url = new URL(base + '/api/command-center/ws', globalThis.location?.href)
    url.protocol = url.protocol.replace('http', 'ws')
    const ws = new WS(url.href)
    const queue = []
    let open = false
    let heard = false
    const conn = {
      byRequest: new Map(),
      byStream: new Map(),
      send(frame) {
        frame = JSON.stringify(frame)
        open ? ws.send(frame) : queue.push(frame)
      },
      close: () => ws.close(),
    }
    ws.onopen = () => {
      open = true
      for (const frame of queue.splice(0)) ws.send(frame)
    }
    ws.onmessage = (e) => {
      heard = true
      let frame
      try {
        frame = JSON.parse(e.data)
      } catch {
        return
      }
      const { event, streamId, requestId, id, data } = frame
      const stream = conn.byStream.get(streamId) || conn.byRequest.get(requestId)
      if (!stream) return // a pong, or an error about a frame no stream owns
      if (event === 'start') conn.byStream.set(streamId ?? data.streamId, stream)
      stream._push(event, data, id)
    }
    ws.onerror = ws.onclose = () => {
      if (socket !== conn) return
      socket = null
      const streams = [...conn.byRequest.values()]
      conn.byRequest.clear()
      conn.byStream.clear()
      try {
        ws.close()
      } catch {}
      for (const stream of streams) socketFailed(stream, heard)
    }
    return conn
  }

  function post(path, body, accept, signal) {
    return fetchImpl(base + path, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: accept },
      body: JSON.stringify(body),
      signal,
    })
  }

  function cancelOverHttp(stream) {
    const path = STREAMS_PATH + encodeURIComponent(stream.streamId) + '/cancel'
    fetchImpl(base + path, { method: 'POST' }).catch(() => {})
  }

  async function viaFetch(stream) {
    const abort = new AbortController()
    stream._stop = () => abort.abort()
    stream._cancel = () => cancelOverHttp(stream)
    try {
      const res = await post(MESSAGE_PATH, stream._body, 'text/event-stream', abort.signal)
      if (!res.ok) return stream._push('error', await httpError(res))
      const parser = createSSEParser((e) => stream._push(e.event, JSON.parse(e.data), e.id))
      // ignoreBOM: keep a BOM in the text, so the parser strips exactly one.
      const decoder = new TextDecoder('utf-8', { ignoreBOM: true })
      const reader = res.body.getReader()
      for (let r; !(r = await reader.read()).done; ) parser.feed(decoder.decode(r.value, { stream: true }))
      parser.feed(decoder.decode())
    } catch {}
    stream._push('error', networkError('The connection closed before the answer finished'))
  }

  async function viaEventSource(stream) {
    let source
    stream._stop = () => source?.close() // or EventSource reconnects after done
    stream._cancel = () => cancelOverHttp(stream)
    try {
      const res = await post(MESSAGE_PATH, stream._body, 'application/json')
      if (!res.ok) return stream._push('error', await httpError(res))
      const { streamId, conversationId } = await res.json()
      if (stream.finished) return
      stream.conversationId = conversationId
      source = new ES(base + STREAMS_PATH + encodeURIComponent(streamId))
      for (const name of EVENTS) {
        source.addEventListener(name, (e) => {
          // A server "error" event has data; a failed connection has none,
          // and EventSource retries by itself unless it has given up (CLOSED).
          if (e.data != null) stream._push(name, JSON.parse(e.data), e.lastEventId)
          else if (source.readyState === 2) stream._push('error', networkError('Connection lost'))
        })
      }
      stream._learnId(streamId)
    } catch {
      stream._push('error', networkError('Request failed'))
    }
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
