// Dropped connections: the client resumes from its last event id on every transport, with backoff, a stall
// watchdog, and an immediate retry when the page comes back. Against real relays (harness.mjs); the TCP
// proxy between them loses, stalls and ends connections where a test says.

import assert from 'node:assert/strict'
import { after, before, beforeEach, test as nodeTest } from 'node:test'

import { WebSocket as UndiciWebSocket } from 'undici'

import { createClient } from '../deltarelay.js'
import { FetchEventSource, MESSAGE_PATH, collect, logOf, savedAnswer, startProxy, startServer } from './harness.mjs'

// The timeout only guards against a hang. Clocks here are tens of milliseconds.
const test = (name, fn) => nodeTest(name, { timeout: 30_000 }, fn)

class Socket extends (globalThis.WebSocket ?? UndiciWebSocket) {
  static instances = []
  constructor(url) {
    super(url)
    Socket.instances.push(this)
  }
  static get last() {
    return Socket.instances.at(-1)
  }
}

// server: answers at once. slow: two words 800 ms apart, a keepalive every 50 ms while silent (still running
// when a test cancels it). forgetful: a finished stream is forgotten (not resumable) at once.
let server, relay, slow, slowRelay, forgetful, forgetfulRelay
before(async () => {
  ;[server, slow, forgetful] = await Promise.all([
    startServer(),
    startServer({ env: { RELAY_OFFLINE_DELAY_MS: '800', RELAY_OFFLINE_WORDS: '2', RELAY_KEEPALIVE_SECONDS: '0.05' } }),
    startServer({ env: { RELAY_STREAM_RETENTION_SECONDS: '0.001' } }),
  ])
  ;[relay, slowRelay, forgetfulRelay] = await Promise.all([server, slow, forgetful].map((s) => startProxy(s.port)))
})
after(async () => {
  await Promise.all([relay, slowRelay, forgetfulRelay].map((p) => p?.close()))
  await Promise.all([server, slow, forgetful].map((s) => s?.close()))
})
beforeEach(() => (Socket.instances.length = 0))

/** Wait (in 1 ms steps) until check() is true. */
async function until(check) {
  while (!check()) await new Promise((resolve) => setTimeout(resolve, 1))
}

/** Record a stream's lifecycle: its reconnecting/reconnected events and state changes. */
function lifecycle(stream) {
  const seen = []
  stream.on('reconnecting', (d) => seen.push(['reconnecting', d.attempt, stream.state]))
  stream.on('reconnected', (d) => seen.push(['reconnected', d.attempt, stream.state, d.transport]))
  return seen
}

const FAST = { baseMs: 1, maxMs: 4 }
const sseClient = (options, proxy = relay) =>
  createClient({ baseUrl: proxy.url, transport: 'sse', reconnect: FAST, ...options })
const esClient = (proxy = relay) =>
  createClient({ baseUrl: proxy.url, transport: 'eventsource', EventSource: FetchEventSource, reconnect: FAST })
const requestsOf = (stream, proxy = relay) => proxy.requests.filter((r) => r.path.includes(stream.streamId))
const ids = (heard) => heard.iterated.map((m) => m.id)
const text = (events) => events.filter((e) => e.event === 'chunk').map((e) => e.data.text).join('')
const isPost = (r) => r.method === 'POST' && r.path === MESSAGE_PATH
const isGet = (r) => r.method === 'GET'
const isUpgrade = (r) => r.headers.upgrade === 'websocket'
/** A hook that loses the connection right after event `n` (or before the first event after it). */
const cutAfter = (n) => ({
  sse: (e) => (e.id === n ? { inject: e.text, then: 'cut' } : e.id > n ? 'cut' : undefined),
  ws: (f) => (f.id === n ? { inject: JSON.stringify(f), then: 'cut' } : f.id > n ? 'cut' : undefined),
})
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

// ---- SSE (fetch) ----------------------------------------------------------------

test('sse: a body that ends mid-answer is resumed with GET /streams/{id} and Last-Event-ID', async () => {
  relay.plan(isPost, cutAfter(2))
  const stream = sseClient().send('drop after 2')
  const heard = collect(stream)
  const seen = lifecycle(stream)
  const result = await stream.done
  const log = await logOf(server.url, stream.streamId)
  assert.equal(result.text, text(log))
  assert.equal(result.error, null)
  assert.deepEqual(ids(await heard.finished), log.map((e) => e.id))
  assert.deepEqual(heard.iterated.slice(1), log.slice(1))
  assert.deepEqual(seen, [['reconnecting', 1, 'reconnecting'], ['reconnected', 1, 'streaming', 'sse']])
  assert.equal(stream.state, 'done')

  const [get] = requestsOf(stream)
  assert.equal(get.method, 'GET')
  assert.equal(get.headers['last-event-id'], '2')
  assert.equal(get.headers.accept, 'text/event-stream')
})

test('sse: a resume that drops before any new event resumes from the same id again', async () => {
  relay.plan(isPost, cutAfter(2))
  relay.plan(isGet, cutAfter(2))
  relay.plan(isGet, cutAfter(5))
  const stream = sseClient().send('drop after 2, 2 and 5')
  const heard = collect(stream)
  const seen = lifecycle(stream)
  const result = await stream.done
  const log = await logOf(server.url, stream.streamId)
  assert.equal(result.text, text(log))
  assert.deepEqual(ids(await heard.finished), log.map((e) => e.id))
  assert.deepEqual(requestsOf(stream).map((r) => r.headers['last-event-id']), ['2', '2', '5'])
  // The backoff grows while nothing new arrives, and starts over after news.
  assert.deepEqual(seen.filter(([name]) => name === 'reconnecting').map(([, attempt]) => attempt), [1, 2, 1])
})

test('sse: the stall watchdog gives up on a silent connection and resumes', async () => {
  relay.plan(isPost, { sse: (e) => (e.id > 3 ? 'stall' : undefined) })
  const stream = sseClient({ stallTimeoutMs: 100 }).send('stall after 3')
  const heard = collect(stream)
  const seen = lifecycle(stream)
  const result = await stream.done
  const log = await logOf(server.url, stream.streamId)
  assert.equal(result.text, text(log))
  assert.deepEqual(ids(await heard.finished), log.map((e) => e.id))
  assert.deepEqual(requestsOf(stream).map((r) => r.headers['last-event-id']), ['3'])
  assert.equal(seen[0][0], 'reconnecting')
})

test('sse: keepalive comments keep the stall watchdog quiet', async () => {
  // keepaliveMs 200 -> stall after 500 ms; the answer is silent but for keepalives (every 50 ms) for 800 ms.
  const stream = sseClient({ keepaliveMs: 200 }, slowRelay).send('keepalive')
  const seen = lifecycle(stream)
  const result = await stream.done
  assert.equal(result.text, text(await logOf(slow.url, stream.streamId)))
  assert.equal(result.error, null)
  assert.deepEqual(seen, [])
  assert.deepEqual(requestsOf(stream, slowRelay), [], 'no resume')
})

test('sse: not_resumable ends the stream with that error, and it does not try again', async () => {
  const passed = []
  // Lost at the stream's end (the server forgets it 1 ms later), resumed 150 to 300 ms after.
  forgetfulRelay.plan(isPost, { sse: (e) => (e.event === 'done' ? 'cut' : e.id > 4 ? 'drop' : void passed.push(e)) })
  const stream = sseClient({ reconnect: { baseMs: 300, maxMs: 300 } }, forgetfulRelay).send('gone after 4')
  const result = await stream.done
  assert.equal(result.error.code, 'not_resumable')
  assert.equal(result.error.retryable, false)
  const saved = await savedAnswer(forgetful.url, result.conversationId)
  assert.equal(result.messageId, saved.id)
  assert.equal(result.text, text(passed))
  assert.equal(stream.state, 'error')
  await sleep(20)
  assert.equal(requestsOf(stream, forgetfulRelay).length, 1)
})

test('sse: a 204 to a resume ends the stream with not_resumable, and it does not try again', async () => {
  // The resume asks for the events after the stream's last one: the server answers 204.
  let last = 0
  relay.plan(isPost, { sse: (e) => ((last = e.id ?? last), e.event === 'done' ? 'cut' : e.id > 4 ? 'drop' : undefined) })
  relay.plan(isGet, { cursor: () => last })
  const stream = sseClient().send('ended after 4')
  const result = await stream.done
  assert.equal(result.error.code, 'not_resumable')
  assert.equal(result.error.retryable, false)
  const log = await logOf(server.url, stream.streamId)
  assert.equal(result.text, text(log.slice(0, 4)))
  await sleep(20)
  assert.equal(requestsOf(stream).length, 1)
})

test('sse: slow_consumer is not an end: it resumes from the last id it really saw', async () => {
  // As the server does it: the error carries the stream's last id, and the answer ends.
  relay.plan(isPost, {
    sse(e) {
      if (e.event === 'done') {
        const slow = { code: 'slow_consumer', message: 'this connection fell behind', retryable: true }
        return { inject: `id: ${e.id}\nevent: error\ndata: ${JSON.stringify(slow)}\n\n`, then: 'end' }
      }
      return e.id > 3 ? 'drop' : undefined
    },
  })
  const stream = sseClient().send('slow after 3')
  const heard = collect(stream)
  const result = await stream.done
  const log = await logOf(server.url, stream.streamId)
  assert.equal(result.error, null)
  assert.equal(result.text, text(log))
  assert.deepEqual(ids(await heard.finished), log.map((e) => e.id))
  // Not the last id the slow_consumer event carried.
  assert.deepEqual(requestsOf(stream).map((r) => r.headers['last-event-id']), ['3'])
})

test('sse: a body that ends before start is a network_error, and the message is not sent again', async () => {
  relay.plan(isPost, { sse: () => 'end' })
  const count = relay.requests.length
  const stream = sseClient().send('ends before start')
  const seen = lifecycle(stream)
  const result = await stream.done
  assert.equal(result.error.code, 'network_error')
  assert.deepEqual(seen, [])
  await sleep(20)
  assert.deepEqual(relay.requests.slice(count).map((r) => r.method + ' ' + r.path), ['POST /api/command-center/message'])
})

test('sse: cancel while reconnecting posts to the cancel endpoint and reconnects at once for the done', async () => {
  // A backoff of a minute: only the cancel can make this finish in time.
  slowRelay.plan(isPost, cutAfter(2))
  const stream = sseClient({ reconnect: { baseMs: 60_000, maxMs: 60_000 } }, slowRelay).send('cancel after 2')
  stream.on('reconnecting', () => stream.cancel())
  const result = await stream.done
  assert.equal(result.stopReason, 'cancelled')
  assert.equal(result.cost.estimated, true)
  assert.equal(stream.state, 'cancelled')
  // One GET, and the cancel (posted again once the GET connects if the first answer had not come back yet).
  const requests = requestsOf(stream, slowRelay).map((r) => [r.method + ' ' + r.path, r.headers['last-event-id']])
  assert.deepEqual([...new Set(requests.map(String))].sort(), [
    [`GET /api/command-center/streams/${stream.streamId}`, '2'],
    [`POST /api/command-center/streams/${stream.streamId}/cancel`, undefined],
  ].map(String))
  assert.equal(requests.filter(([request]) => request.startsWith('GET')).length, 1)
})

test('sse: it gives up after maxAttempts failed resumes with network_error', async () => {
  relay.plan(isPost, cutAfter(2))
  const offlineGets = (url, init) => (init?.method === 'POST' ? fetch(url, init) : Promise.reject(new TypeError('offline')))
  const client = sseClient({ fetch: offlineGets, reconnect: { ...FAST, maxAttempts: 3 } })
  const stream = client.send('drop after 2')
  const seen = lifecycle(stream)
  const result = await stream.done
  assert.equal(result.error.code, 'network_error')
  assert.deepEqual(seen.map(([name, attempt]) => name + attempt), ['reconnecting1', 'reconnecting2', 'reconnecting3'])
  assert.equal(stream.state, 'error')
})

test('the page becoming visible, or the network coming back, retries at once instead of after the backoff', async () => {
  const document = Object.assign(new EventTarget(), { visibilityState: 'visible' })
  const window = new EventTarget()
  Object.assign(globalThis, { document, window })
  try {
    const client = sseClient({ reconnect: { baseMs: 60_000, maxMs: 60_000 } })
    relay.plan(isPost, cutAfter(2))
    const first = client.send('drop after 2')
    await new Promise((resolve) => first.on('reconnecting', resolve))
    document.dispatchEvent(new Event('visibilitychange'))
    assert.equal((await first.done).text, text(await logOf(server.url, first.streamId)))

    relay.plan(isPost, cutAfter(2))
    const second = client.send('drop after 2 again')
    await new Promise((resolve) => second.on('reconnecting', resolve))
    window.dispatchEvent(new Event('online'))
    assert.equal((await second.done).text, text(await logOf(server.url, second.streamId)))
    client.close()
  } finally {
    delete globalThis.document
    delete globalThis.window
  }
})

// ---- EventSource --------------------------------------------------------------------

test('eventsource: a resume that drops before any new event resumes from the same id again', async () => {
  relay.plan(isGet, cutAfter(2))
  relay.plan(isGet, cutAfter(2))
  const stream = esClient().send('drop after 2 and 2')
  const heard = collect(stream)
  const seen = lifecycle(stream)
  const result = await stream.done
  const log = await logOf(server.url, stream.streamId)
  assert.equal(result.text, text(log))
  assert.deepEqual(ids(await heard.finished), log.map((e) => e.id))
  const gets = requestsOf(stream).filter((r) => r.method === 'GET')
  assert.deepEqual(gets.map((r) => r.query), ['', '?lastEventId=2', '?lastEventId=2'])
  assert.deepEqual(seen.at(-1), ['reconnected', 2, 'streaming', 'eventsource'])
  assert.ok(FetchEventSource.instances.every((source) => source.readyState === 2), 'every source closed')
})

test('eventsource: slow_consumer resumes from the last id seen; not_resumable ends the stream', async () => {
  relay.plan(isGet, {
    sse(e) {
      if (e.event === 'done') {
        const slow = { code: 'slow_consumer', message: 'this connection fell behind', retryable: true }
        return { inject: `id: ${e.id}\nevent: error\ndata: ${JSON.stringify(slow)}\n\n`, then: 'end' }
      }
      return e.id > 3 ? 'drop' : undefined
    },
  })
  const slowStream = esClient().send('slow after 3')
  assert.equal((await slowStream.done).text, text(await logOf(server.url, slowStream.streamId)))
  assert.deepEqual(requestsOf(slowStream).filter((r) => r.method === 'GET').map((r) => r.query), ['', '?lastEventId=3'])

  // The refused resume (404) closes the EventSource; one fetch of the same URL reads why, and that is the end.
  forgetfulRelay.plan(isGet, { sse: (e) => (e.event === 'done' ? 'cut' : e.id > 2 ? 'drop' : undefined) })
  const gone = createClient({ baseUrl: forgetfulRelay.url, transport: 'eventsource', EventSource: FetchEventSource,
    reconnect: { baseMs: 300, maxMs: 300 } }).send('gone after 2')
  const { error, messageId, conversationId } = await gone.done
  assert.equal(error.code, 'not_resumable')
  assert.equal(messageId, (await savedAnswer(forgetful.url, conversationId)).id)
  const gets = requestsOf(gone, forgetfulRelay)
  assert.deepEqual(gets.map((r) => [r.query, r.headers.accept]),
    [['', 'text/event-stream'], ['?lastEventId=2', 'text/event-stream'], ['?lastEventId=2', 'application/json']])
})

test('eventsource: a 204 to a resume ends the stream with not_resumable, and it does not try again', async () => {
  let last = 0
  relay.plan(isGet, { sse: (e) => ((last = e.id ?? last), e.event === 'done' ? 'cut' : e.id > 2 ? 'drop' : undefined) })
  const unplan = relay.plan(isGet, { cursor: () => last, persistent: true })
  const stream = esClient().send('ended after 2')
  const { error } = await stream.done
  unplan()
  assert.equal(error.code, 'not_resumable')
  await sleep(20)
  assert.equal(requestsOf(stream).length, 3)
  assert.ok(FetchEventSource.instances.every((source) => source.readyState === 2), 'every source closed')
})

// ---- WebSocket ------------------------------------------------------------------------

const wsClient = (options, proxy = relay) =>
  createClient({ baseUrl: proxy.url, WebSocket: Socket, reconnect: FAST, ...options })

test('websocket: one new socket resumes every open stream from its own last id; one without start gets network_error', async () => {
  // On the first socket: the first stream up to event 4, the second up to 2, the third's start never; then lost.
  const frames = relay.frames.length
  const keep = [4, 2, 0]
  const order = new Map() // streamId -> 0, 1, 2 in the order the client sent the messages
  let ended = 0
  relay.plan(isUpgrade, {
    ws(frame) {
      if (frame.event === 'start') {
        const index = relay.frames.slice(frames).findIndex((f) => f.requestId === frame.requestId)
        order.set(frame.streamId, index)
      }
      if (frame.event === 'done' && ++ended === 3) return 'cut'
      return frame.id > keep[order.get(frame.streamId)] ? 'drop' : undefined
    },
  })
  const client = wsClient()
  const a = client.send('first')
  const b = client.send('second')
  const c = client.send('third')
  const heardA = collect(a)
  const heardB = collect(b)
  const seenA = lifecycle(a)

  assert.equal((await c.done).error.code, 'network_error')
  await until(() => Socket.instances.length === 2)
  const [resultA, resultB] = await Promise.all([a.done, b.done])
  const resumes = relay.frames.slice(frames).filter((f) => f.type === 'resume')
  const cursors = resumes.map(({ type, streamId, lastEventId }) => ({ type, streamId, lastEventId }))
  assert.deepEqual(cursors.sort((x, y) => order.get(x.streamId) - order.get(y.streamId)), [
    { type: 'resume', streamId: a.streamId, lastEventId: 4 },
    { type: 'resume', streamId: b.streamId, lastEventId: 2 },
  ])
  const logA = await logOf(server.url, a.streamId)
  const logB = await logOf(server.url, b.streamId)
  assert.equal(resultA.text, text(logA))
  assert.equal(resultB.text, text(logB))
  assert.deepEqual(ids(await heardA.finished), logA.map((e) => e.id))
  assert.deepEqual(ids(await heardB.finished), logB.map((e) => e.id))
  assert.deepEqual(seenA, [['reconnecting', 1, 'reconnecting'], ['reconnected', 1, 'streaming', 'websocket']])
  assert.equal(Socket.instances.length, 2, 'one socket for both resumes')
  assert.equal(a.state, 'done')
  client.close()
})

test('websocket: a resume that drops before any new event resumes from the same id again', async () => {
  const frames = relay.frames.length
  relay.plan(isUpgrade, cutAfter(3))
  relay.plan(isUpgrade, cutAfter(3))
  const client = wsClient()
  const stream = client.send('drop after 3 and 3')
  const heard = collect(stream)
  const result = await stream.done
  const sent = relay.frames.slice(frames).map((f) => [f.type, f.lastEventId])
  assert.deepEqual(sent, [['message', undefined], ['resume', 3], ['resume', 3]])
  assert.equal(Socket.instances.length, 3)
  const log = await logOf(server.url, stream.streamId)
  assert.equal(result.text, text(log))
  assert.deepEqual(ids(await heard.finished), log.map((e) => e.id))
  client.close()
})

test('websocket: the stall watchdog closes a silent socket and resumes on a new one', async () => {
  const frames = relay.frames.length
  relay.plan(isUpgrade, { ws: (f) => (f.id > 2 ? 'stall' : undefined) })
  const client = wsClient({ stallTimeoutMs: 100 })
  const stream = client.send('stall after 2')
  const result = await stream.done
  assert.equal(closed(Socket.instances[0]), true)
  const resumes = relay.frames.slice(frames).filter((f) => f.type === 'resume')
  assert.deepEqual(resumes.map((f) => [f.type, f.streamId, f.lastEventId]), [['resume', stream.streamId, 2]])
  assert.equal(result.text, text(await logOf(server.url, stream.streamId)))
  client.close()
})

test('websocket: keepalive frames keep the stall watchdog quiet', async () => {
  const client = wsClient({ keepaliveMs: 200 }, slowRelay) // stall after 500 ms; the answer is silent for 800 ms
  const stream = client.send('keepalive')
  const seen = lifecycle(stream)
  const result = await stream.done
  assert.equal(result.text, text(await logOf(slow.url, stream.streamId)))
  assert.deepEqual(seen, [])
  assert.equal(Socket.instances.length, 1)
  client.close()
})

test('websocket: not_resumable for a resume ends the stream with that error, and it does not try again', async () => {
  const frames = forgetfulRelay.frames.length
  // Lost at the stream's end (the server forgets it 1 ms later), resumed 150 to 300 ms after.
  forgetfulRelay.plan(isUpgrade, { ws: (f) => (f.event === 'done' ? 'cut' : f.id > 1 ? 'drop' : undefined) })
  const client = wsClient({ reconnect: { baseMs: 300, maxMs: 300 } }, forgetfulRelay)
  const stream = client.send('gone after start')
  const result = await stream.done
  assert.equal(result.error.code, 'not_resumable')
  assert.equal(result.error.retryable, false)
  assert.equal(result.messageId, (await savedAnswer(forgetful.url, result.conversationId)).id)
  await sleep(20)
  assert.equal(Socket.instances.length, 2)
  assert.deepEqual(forgetfulRelay.frames.slice(frames).map((f) => f.type), ['message', 'resume'])
  client.close()
})

test('websocket: slow_consumer resumes on the same socket from the last id', async () => {
  // As the server does it: an error for the stream, and none of that reader's events after it; the events
  // the client's resume asks for come in order from 4 (any other copy the proxy still sees is left out).
  const frames = relay.frames.length
  let next = 0
  relay.plan(isUpgrade, {
    ws(frame) {
      if (frame.id == null || (!next && frame.id <= 3)) return undefined
      if (!next) {
        next = 4
        const slow = { code: 'slow_consumer', message: 'this connection fell behind', retryable: true }
        return { inject: JSON.stringify({ event: 'error', streamId: frame.streamId, id: null, data: slow }), then: 'drop' }
      }
      return frame.id === next ? void next++ : 'drop'
    },
  })
  const client = wsClient()
  const stream = client.send('slow after 3')
  const heard = collect(stream)
  const result = await stream.done
  const [, resume] = relay.frames.slice(frames)
  assert.deepEqual(resume, { type: 'resume', streamId: stream.streamId, lastEventId: 3, requestId: resume.requestId })
  const log = await logOf(server.url, stream.streamId)
  assert.equal(result.text, text(log))
  assert.equal(result.error, null)
  assert.deepEqual(ids(await heard.finished), log.map((e) => e.id))
  assert.equal(Socket.instances.length, 1)
  client.close()
})

test('websocket: cancel while reconnecting posts to the cancel endpoint, then the resumed stream ends cancelled', async () => {
  const frames = slowRelay.frames.length
  slowRelay.plan(isUpgrade, cutAfter(2))
  const client = wsClient({ reconnect: { baseMs: 60_000, maxMs: 60_000 } }, slowRelay)
  const stream = client.send('cancel after 2')
  stream.on('reconnecting', () => stream.cancel())
  await until(() => slowRelay.cancels.includes(stream.streamId))
  assert.equal(Socket.instances.length, 2, 'reconnecting at once, not after the minute of backoff')
  const result = await stream.done
  const [, resume] = slowRelay.frames.slice(frames)
  assert.deepEqual(resume, { type: 'resume', streamId: stream.streamId, lastEventId: 2, requestId: resume.requestId })
  assert.equal(result.stopReason, 'cancelled')
  assert.equal(result.cost.estimated, true)
  assert.equal(stream.state, 'cancelled')
  client.close()
})

test('websocket: when no socket can be opened again, auto mode resumes over SSE', async () => {
  relay.plan(isUpgrade, cutAfter(2))
  const unplan = relay.plan(isUpgrade, { refuse: true, persistent: true })
  const client = wsClient()
  const stream = client.send('socket lost after 2')
  const heard = collect(stream)
  const seen = lifecycle(stream)
  const result = await stream.done
  unplan()
  const log = await logOf(server.url, stream.streamId)
  assert.equal(result.text, text(log))
  assert.deepEqual(ids(await heard.finished), log.map((e) => e.id))
  assert.equal(stream.transport, 'sse')
  assert.deepEqual(seen.at(-1), ['reconnected', 1, 'streaming', 'sse'])
  const get = relay.requests.findLast((r) => r.path.endsWith(stream.streamId))
  assert.equal(get.headers['last-event-id'], '2')
  client.close()
})

test('stream.state goes connecting, streaming, reconnecting, streaming, done', async () => {
  relay.plan(isUpgrade, cutAfter(1))
  const client = wsClient()
  const stream = client.send('socket lost after start')
  const states = [stream.state]
  const note = () => states.at(-1) !== stream.state && states.push(stream.state)
  for (const name of ['start', 'chunk', 'reconnecting', 'reconnected', 'done']) stream.on(name, note)
  await stream.done
  assert.deepEqual(states, ['connecting', 'streaming', 'reconnecting', 'streaming', 'done'])
  client.close()
})

const closed = (socket) => socket.readyState >= 2
