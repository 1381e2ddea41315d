// Test doubles for the client tests: a recorded relay stream, a small
// in-process relay speaking the SSE side of the protocol (node:http), a fake
// WebSocket that plays frames, and an EventSource built on fetch.

import { once } from 'node:events'
import { createServer } from 'node:http'

import { createSSEParser } from '../deltarelay.js'

export const START = { streamId: 's1', conversationId: 'c1', model: 'claude-haiku-4-5' }
export const COST = {
  inputTokens: 31,
  outputTokens: 22,
  cacheCreationInputTokens: 0,
  cacheReadInputTokens: 0,
  totalCost: 0.00001395,
  model: 'claude-haiku-4-5',
}
export const DONE = { conversationId: 'c1', messageId: 'm1', stopReason: 'end_turn' }
export const TEXT = 'Hello 🙂 line\u2028sep naïve 我現在'

/**
 * One relay answer as a server writes it: a BOM, keepalive comments, LF, CRLF
 * and lone-CR line ends, data split over two lines, multi-byte characters.
 */
export const RECORDED = [
  '\uFEFF: keepalive\n\n',
  `id: 1\nevent: start\ndata: ${JSON.stringify(START)}\n\n`,
  'id: 2\r\nevent: thinking\r\ndata: {"text":"Let me think."}\r\n\r\n',
  ': keepalive\n\n',
  'id: 3\revent: chunk\rdata: {"text":"Hello 🙂"}\r\r',
  'id: 4\nevent: chunk\ndata: {"text":\ndata: " line\u2028sep naïve"}\n\n',
  'id: 5\r\nevent: chunk\r\ndata: {"text":" 我現在"}\r\n\r\n',
  `id: 6\nevent: cost\ndata: ${JSON.stringify(COST)}\n\n`,
  `id: 7\nevent: done\ndata: ${JSON.stringify(DONE)}\n\n`,
].join('')
export const RECORDED_BYTES = Buffer.from(RECORDED)

/** The events RECORDED carries, as the async iterator yields them. */
export const RECORDED_EVENTS = [
  { event: 'start', id: 1, data: START },
  { event: 'thinking', id: 2, data: { text: 'Let me think.' } },
  { event: 'chunk', id: 3, data: { text: 'Hello 🙂' } },
  { event: 'chunk', id: 4, data: { text: ' line\u2028sep naïve' } },
  { event: 'chunk', id: 5, data: { text: ' 我現在' } },
  { event: 'cost', id: 6, data: COST },
  { event: 'done', id: 7, data: DONE },
]

export function sse(id, event, data) {
  return `id: ${id}\nevent: ${event}\ndata: ${JSON.stringify(data)}\n\n`
}

const tick = () => new Promise((resolve) => setImmediate(resolve))
const GONE = { code: 'not_resumable', message: 'stream expired', retryable: false, messageId: 'm7' }

/**
 * A relay on a free loopback port. The message text picks the answer:
 *   "split:N"  RECORDED written as two pieces split at byte N
 *   "bad"      400 {"error": {...}}        "limit"  429 with retryAfter
 *   "fail"     start, then an error event
 *   "dupes"    events with repeated ids
 *   "hang"     start and a chunk, then waits for the cancel endpoint
 *   "KIND:N,M" a resumable answer (RECORDED's events; over SSE stream id "p1",
 *              "p2"...): the POST goes up to event N, the first GET
 *              /streams/{id} up to M, and so on; later GETs serve the rest
 *              after Last-Event-ID (or ?lastEventId). Over EventSource the POST
 *              carries nothing, so the first GET goes up to N. After its cut,
 *              a connection of KIND
 *                drop       ends
 *                stall      stays open and silent until the client goes
 *                keepalive  sends ": keepalive" every 10 ms for 150 ms, then the rest
 *                slow       sends slow_consumer (with the stream's last id, as the server does) and ends
 *                gone       ends; every later connection gets a 404 not_resumable error (messageId m7),
 *                           as the server answers for an expired stream
 *                ended      ends; every later connection gets a 204, as the server answers a cursor at
 *                           the last event of a finished stream
 *                cancel     ends; later connections wait for the cancel endpoint, then
 *                           get an estimated cost and done "cancelled"
 *   "nostart"  a keepalive comment, then the body ends
 *   anything else: RECORDED
 * With Accept: application/json the POST answers 202 and GET
 * /api/command-center/streams/{id} streams the same answer; "drop" makes the
 * first GET end after two events, so EventSource reconnects with Last-Event-ID.
 * `requests` records every request (method, path, query, headers, body) in order.
 */
export async function startRelay() {
  const requests = []
  const cancels = []
  const streams = new Map() // streamId -> message
  const hanging = new Map() // streamId -> res waiting for cancel
  const cancelled = new Set() // streamIds whose cancel came before their GET
  const gets = new Map() // streamId -> GET count
  let plans = 0

  const server = createServer(async (req, res) => {
    const url = new URL(req.url, 'http://relay')
    let body = ''
    for await (const piece of req) body += piece
    requests.push({ method: req.method, path: url.pathname, query: url.search, headers: req.headers, body })

    const cancel = url.pathname.match(/^\/api\/command-center\/streams\/([^/]+)\/cancel$/)
    if (req.method === 'POST' && cancel) {
      const streamId = decodeURIComponent(cancel[1])
      cancels.push(streamId)
      res.writeHead(202, { 'Content-Type': 'application/json' }).end('{}')
      const waiting = hanging.get(streamId)
      hanging.delete(streamId)
      if (waiting) waiting()
      else cancelled.add(streamId)
      return
    }

    const get = url.pathname.match(/^\/api\/command-center\/streams\/([^/]+)$/)
    if (req.method === 'GET' && get) {
      const streamId = decodeURIComponent(get[1])
      const after = Number(req.headers['last-event-id'] || url.searchParams.get('lastEventId') || 0)
      gets.set(streamId, (gets.get(streamId) || 0) + 1)
      if (!streams.has(streamId)) return error(res, 404, { code: 'not_resumable', message: 'unknown stream' })
      const kind = /^(\w+):[\d,]+$/.exec(streams.get(streamId))?.[1]
      if (gets.get(streamId) > 0 && kind === 'gone') return error(res, 404, GONE)
      if (gets.get(streamId) > 0 && kind === 'ended') return res.writeHead(204).end()
      return answer(streams.get(streamId), res, { after, streamId, first: gets.get(streamId) === 1 })
    }

    if (req.method === 'POST' && url.pathname === '/api/command-center/message') {
      const { message } = JSON.parse(body)
      if (message === 'bad') return error(res, 400, { code: 'invalid_request', message: 'message must not be empty' })
      if (message === 'limit') return error(res, 429, { code: 'rate_limited', message: 'slow down', retryAfter: 3 })
      if (req.headers.accept === 'application/json') {
        const streamId = 'es' + (streams.size + 1)
        streams.set(streamId, message)
        if (/^\w+:[\d,]+$/.test(message)) gets.set(streamId, -1) // the first GET is connection 0
        res.writeHead(202, { 'Content-Type': 'application/json' })
        return res.end(JSON.stringify({ streamId, conversationId: 'c1' }))
      }
      const planned = /^\w+:[\d,]+$/.test(message) && !message.startsWith('split:')
      const streamId = planned ? 'p' + ++plans : 's1'
      streams.set(streamId, message)
      if (planned) gets.set(streamId, 0)
      return answer(message, res, { after: 0, streamId })
    }
    error(res, 404, { code: 'not_found', message: 'no such route' })
  })

  function error(res, status, body) {
    res.writeHead(status, { 'Content-Type': 'application/json' }).end(JSON.stringify({ error: body }))
  }

  async function answer(message, res, { after, streamId, first }) {
    res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-store' })
    res.flushHeaders()
    const start = { ...START, streamId }
    if (message.startsWith('split:')) {
      const at = Number(message.slice(6))
      res.write(RECORDED_BYTES.subarray(0, at))
      await tick()
      return res.end(RECORDED_BYTES.subarray(at))
    }
    if (message === 'fail') {
      const failure = { code: 'overloaded', message: 'Overloaded', retryable: true, messageId: 'm2' }
      return res.end(sse(1, 'start', start) + sse(2, 'chunk', { text: 'Hel' }) + sse(3, 'error', failure))
    }
    if (message === 'dupes') {
      const events = [sse(1, 'start', start), sse(2, 'chunk', { text: 'a' }), sse(2, 'chunk', { text: 'A' })]
      events.push(sse(1, 'start', start), sse(3, 'chunk', { text: 'b' }), sse(4, 'done', DONE))
      return res.end(events.join(''))
    }
    if (message === 'hang') {
      res.write(sse(1, 'start', start) + sse(2, 'chunk', { text: 'Hel' }))
      const done = () => res.end(sse(3, 'done', { conversationId: 'c1', messageId: 'm9', stopReason: 'cancelled' }))
      return cancelled.has(streamId) ? done() : hanging.set(streamId, done)
    }
    if (message === 'nostart') return res.end(': keepalive\n\n')
    const events = RECORDED_EVENTS.map((e) => sse(e.id, e.event, e.event === 'start' ? start : e.data))
    const plan = message.match(/^(\w+):([\d,]+)$/)
    if (plan && plan[1] !== 'split') return planned(res, plan[1], plan[2].split(',').map(Number), events, after, streamId)
    if (message === 'drop' && first) return res.end(events.slice(0, 2).join(''))
    res.end(events.filter((_, i) => i + 1 > after).join(''))
  }

  async function planned(res, kind, cuts, events, after, streamId) {
    // 0 for the POST (or an EventSource's first GET), then 1, 2... for the next GETs
    const connection = gets.get(streamId)
    const cut = connection < cuts.length ? cuts[connection] : Infinity
    if (connection > 0 && kind === 'cancel' && cut === Infinity) {
      const estimated = { ...COST, outputTokens: 2, estimated: true }
      const done = () => res.end(sse(after + 1, 'cost', estimated) + sse(after + 2, 'done', { ...DONE, stopReason: 'cancelled' }))
      return cancelled.has(streamId) ? done() : hanging.set(streamId, done)
    }
    res.write(events.slice(after, Math.min(cut, events.length)).join(''))
    if (cut >= events.length) return res.end()
    if (kind === 'stall') return // silent until the client gives up on it
    if (kind === 'keepalive') {
      for (let i = 0; i < 15; i++) {
        await new Promise((resolve) => setTimeout(resolve, 10))
        res.write(': keepalive\n\n')
      }
      return res.end(events.slice(cut).join(''))
    }
    if (kind === 'slow') {
      const slow = { code: 'slow_consumer', message: 'this connection fell behind', retryable: true }
      return res.end(sse(events.length, 'error', slow))
    }
    res.end()
  }

  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  return {
    baseUrl: `http://127.0.0.1:${server.address().port}`,
    requests,
    cancels,
    close() {
      server.closeAllConnections() // a stream a failed test left hanging
      return new Promise((resolve) => server.close(resolve))
    },
  }
}

/** Collect a stream three ways at once: listeners, on() callbacks, the async iterator. */
export function collect(stream) {
  const heard = { listeners: [], callbacks: [], iterated: [] }
  for (const name of ['start', 'chunk', 'thinking', 'cost', 'done', 'error']) {
    stream.addEventListener(name, (e) => heard.listeners.push({ event: e.type, data: e.detail }))
    stream.on(name, (data) => heard.callbacks.push({ event: name, data }))
  }
  heard.finished = (async () => {
    for await (const message of stream) heard.iterated.push(message)
    return heard
  })()
  return heard
}

/** A WebSocket stand-in: records what the client sends; the test plays the server. */
export class FakeSocket {
  static instances = []

  constructor(url) {
    this.url = url
    this.sent = []
    this.readyState = 0 // CONNECTING
    FakeSocket.instances.push(this)
  }

  static get last() {
    return FakeSocket.instances.at(-1)
  }

  get closed() {
    return this.readyState === 3
  }

  open() {
    this.readyState = 1
    this.onopen?.({})
  }

  /** The server sends one frame (an object is sent as JSON text). */
  play(frame) {
    this.onmessage?.({ data: typeof frame === 'string' ? frame : JSON.stringify(frame) })
  }

  /** The connection fails: error then close, as browsers report it. */
  fail() {
    this.readyState = 3
    this.onerror?.({})
    this.onclose?.({ code: 1006 })
  }

  send(text) {
    // As in browsers: sending before open (or after close) throws.
    if (this.readyState !== 1) throw new Error('InvalidStateError: the socket is not open')
    this.sent.push(JSON.parse(text))
  }

  close() {
    this.readyState = 3
  }
}

/** A socket that cannot connect: it fails as soon as the client has set it up. */
export class RefusedSocket extends FakeSocket {
  constructor(url) {
    super(url)
    queueMicrotask(() => this.fail())
  }
}

/**
 * A minimal EventSource over fetch: named MessageEvents with lastEventId,
 * a plain "error" Event on connection loss, reconnection with Last-Event-ID
 * after a dropped body, and CLOSED (2) after a non-200 answer or a failed connect.
 */
export class FetchEventSource extends EventTarget {
  static instances = []

  constructor(url) {
    super()
    this.url = url
    this.readyState = 0
    this.lastEventId = ''
    this.controller = new AbortController()
    FetchEventSource.instances.push(this)
    this.connect()
  }

  async connect() {
    const headers = { Accept: 'text/event-stream' }
    if (this.lastEventId) headers['Last-Event-ID'] = this.lastEventId
    try {
      const res = await fetch(this.url, { headers, signal: this.controller.signal })
      if (res.status !== 200) {
        this.readyState = 2
        return this.dispatchEvent(new Event('error'))
      }
      this.readyState = 1
      this.onopen?.(new Event('open'))
      const parser = createSSEParser((e) => {
        if (this.readyState === 2) return
        this.lastEventId = e.id
        this.dispatchEvent(new MessageEvent(e.event, { data: e.data, lastEventId: e.id }))
      })
      const decoder = new TextDecoder()
      for await (const bytes of res.body) parser.feed(decoder.decode(bytes, { stream: true }))
    } catch {}
    if (this.readyState === 2) return
    // Unlike a browser, give up at once when no connection could be made:
    // a test double must not retry forever.
    const wasOpen = this.readyState === 1
    this.readyState = wasOpen ? 0 : 2
    this.dispatchEvent(new Event('error'))
    if (wasOpen && this.readyState === 0) this.connect()
  }

  close() {
    this.readyState = 2
    this.controller.abort()
  }
}
