// Dropped connections: the client resumes from its last event id on every transport,
// with backoff, a stall watchdog, and an immediate retry when the page comes back.

import assert from 'node:assert/strict'
import { after, before, beforeEach, test as nodeTest } from 'node:test'

import { createClient } from '../deltarelay.js'
import { COST, DONE, FakeSocket, FetchEventSource, RECORDED_EVENTS, TEXT, collect, startRelay } from './relay.mjs'

// The timeout only guards against a hang. Clocks here are tens of milliseconds.
const test = (name, fn) => nodeTest(name, { timeout: 10_000 }, fn)

let relay
before(async () => (relay = await startRelay()))
after(() => relay.close())
beforeEach(() => (FakeSocket.instances.length = 0))

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
const sseClient = (options) => createClient({ baseUrl: relay.baseUrl, transport: 'sse', reconnect: FAST, ...options })
const esClient = () =>
  createClient({ baseUrl: relay.baseUrl, transport: 'eventsource', EventSource: FetchEventSource, reconnect: FAST })
const requestsOf = (stream) => relay.requests.filter((r) => r.path.includes(stream.streamId))
const ids = (heard) => heard.iterated.map((m) => m.id)

// ---- SSE (fetch) ----------------------------------------------------------------

test('sse: a body that ends mid-answer is resumed with GET /streams/{id} and Last-Event-ID', async () => {
  const stream = sseClient().send('drop:2')
  const heard = collect(stream)
  const seen = lifecycle(stream)
  const result = await stream.done
  assert.equal(result.text, TEXT)
  assert.equal(result.error, null)
  assert.deepEqual(ids(await heard.finished), [1, 2, 3, 4, 5, 6, 7])
  assert.deepEqual(heard.iterated.slice(1), RECORDED_EVENTS.slice(1))
  assert.deepEqual(seen, [['reconnecting', 1, 'reconnecting'], ['reconnected', 1, 'streaming', 'sse']])
  assert.equal(stream.state, 'done')

  const [get] = requestsOf(stream)
  assert.equal(get.method, 'GET')
  assert.equal(get.headers['last-event-id'], '2')
  assert.equal(get.headers.accept, 'text/event-stream')
})

test('sse: a resume that drops before any new event resumes from the same id again', async () => {
  const stream = sseClient().send('drop:2,2,5')
  const heard = collect(stream)
  const seen = lifecycle(stream)
  assert.equal((await stream.done).text, TEXT)
  assert.deepEqual(ids(await heard.finished), [1, 2, 3, 4, 5, 6, 7])
  assert.deepEqual(requestsOf(stream).map((r) => r.headers['last-event-id']), ['2', '2', '5'])
  // The backoff grows while nothing new arrives, and starts over after news.
  assert.deepEqual(seen.filter(([name]) => name === 'reconnecting').map(([, attempt]) => attempt), [1, 2, 1])
})

test('sse: the stall watchdog gives up on a silent connection and resumes', async () => {
  const stream = sseClient({ stallTimeoutMs: 40 }).send('stall:3')
  const heard = collect(stream)
  const seen = lifecycle(stream)
  assert.equal((await stream.done).text, TEXT)
  assert.deepEqual(ids(await heard.finished), [1, 2, 3, 4, 5, 6, 7])
  assert.deepEqual(requestsOf(stream).map((r) => r.headers['last-event-id']), ['3'])
  assert.equal(seen[0][0], 'reconnecting')
})

test('sse: keepalive comments keep the stall watchdog quiet', async () => {
  // keepaliveMs 40 -> stall after 100 ms; the answer is silent but for keepalives for 150 ms.
  const stream = sseClient({ keepaliveMs: 40 }).send('keepalive:3')
  const seen = lifecycle(stream)
  assert.equal((await stream.done).text, TEXT)
  assert.deepEqual(seen, [])
  assert.deepEqual(requestsOf(stream), [], 'no resume')
})

test('sse: not_resumable ends the stream with that error, and it does not try again', async () => {
  const stream = sseClient().send('gone:4')
  const result = await stream.done
  assert.equal(result.error.code, 'not_resumable')
  assert.equal(result.error.retryable, false)
  assert.equal(result.messageId, 'm7')
  assert.equal(result.text, 'Hello 🙂 line\u2028sep naïve')
  assert.equal(stream.state, 'error')
  await new Promise((resolve) => setTimeout(resolve, 20))
  assert.equal(requestsOf(stream).length, 1)
})

test('sse: a 204 to a resume ends the stream with not_resumable, and it does not try again', async () => {
  const stream = sseClient().send('ended:4')
  const result = await stream.done
  assert.equal(result.error.code, 'not_resumable')
  assert.equal(result.error.retryable, false)
  assert.equal(result.text, 'Hello 🙂 line\u2028sep naïve')
  await new Promise((resolve) => setTimeout(resolve, 20))
  assert.equal(requestsOf(stream).length, 1)
})

test('sse: slow_consumer is not an end: it resumes from the last id it really saw', async () => {
  const stream = sseClient().send('slow:3')
  const heard = collect(stream)
  const result = await stream.done
  assert.equal(result.error, null)
  assert.equal(result.text, TEXT)
  assert.deepEqual(ids(await heard.finished), [1, 2, 3, 4, 5, 6, 7])
  // Not the id 7 the slow_consumer event carried.
  assert.deepEqual(requestsOf(stream).map((r) => r.headers['last-event-id']), ['3'])
})

test('sse: a body that ends before start is a network_error, and the message is not sent again', async () => {
  const count = relay.requests.length
  const stream = sseClient().send('nostart')
  const seen = lifecycle(stream)
  const result = await stream.done
  assert.equal(result.error.code, 'network_error')
  assert.deepEqual(seen, [])
  await new Promise((resolve) => setTimeout(resolve, 20))
  assert.deepEqual(relay.requests.slice(count).map((r) => r.method + ' ' + r.path), ['POST /api/command-center/message'])
})

test('sse: cancel while reconnecting posts to the cancel endpoint and reconnects at once for the done', async () => {
  // A backoff of a minute: only the cancel can make this finish in time.
  const stream = sseClient({ reconnect: { baseMs: 60_000, maxMs: 60_000 } }).send('cancel:3')
  stream.on('reconnecting', () => stream.cancel())
  const result = await stream.done
  assert.equal(result.stopReason, 'cancelled')
  assert.equal(result.cost.estimated, true)
  assert.equal(stream.state, 'cancelled')
  const [cancel, get] = requestsOf(stream)
  assert.equal(cancel.method + ' ' + cancel.path, `POST /api/command-center/streams/${stream.streamId}/cancel`)
  assert.equal(get.method, 'GET')
  assert.equal(get.headers['last-event-id'], '3')
})

test('sse: it gives up after maxAttempts failed resumes with network_error', async () => {
  const offlineGets = (url, init) => (init?.method === 'POST' ? fetch(url, init) : Promise.reject(new TypeError('offline')))
  const client = sseClient({ fetch: offlineGets, reconnect: { ...FAST, maxAttempts: 3 } })
  const stream = client.send('drop:2')
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
    const first = client.send('drop:2')
    await new Promise((resolve) => first.on('reconnecting', resolve))
    document.dispatchEvent(new Event('visibilitychange'))
    assert.equal((await first.done).text, TEXT)

    const second = client.send('drop:2')
    await new Promise((resolve) => second.on('reconnecting', resolve))
    window.dispatchEvent(new Event('online'))
    assert.equal((await second.done).text, TEXT)
    client.close()
  } finally {
    delete globalThis.document
    delete globalThis.window
  }
})

// ---- EventSource --------------------------------------------------------------------

test('eventsource: a resume that drops before any new event resumes from the same id again', async () => {
  const stream = esClient().send('drop:2,2')
  const heard = collect(stream)
  const seen = lifecycle(stream)
  assert.equal((await stream.done).text, TEXT)
  assert.deepEqual(ids(await heard.finished), [1, 2, 3, 4, 5, 6, 7])
  const gets = requestsOf(stream).filter((r) => r.method === 'GET')
  assert.deepEqual(gets.map((r) => r.query), ['', '?lastEventId=2', '?lastEventId=2'])
  assert.deepEqual(seen.at(-1), ['reconnected', 2, 'streaming', 'eventsource'])
  assert.ok(FetchEventSource.instances.every((source) => source.readyState === 2), 'every source closed')
})

test('eventsource: slow_consumer resumes from the last id seen; not_resumable ends the stream', async () => {
  const slow = esClient().send('slow:3')
  assert.equal((await slow.done).text, TEXT)
  assert.deepEqual(requestsOf(slow).filter((r) => r.method === 'GET').map((r) => r.query), ['', '?lastEventId=3'])

  // The refused resume (404) closes the EventSource; one fetch of the same URL reads why, and that is the end.
  const gone = esClient().send('gone:2')
  const { error, messageId } = await gone.done
  assert.equal(error.code, 'not_resumable')
  assert.equal(messageId, 'm7')
  const gets = requestsOf(gone)
  assert.deepEqual(gets.map((r) => [r.query, r.headers.accept]),
    [['', 'text/event-stream'], ['?lastEventId=2', 'text/event-stream'], ['?lastEventId=2', 'application/json']])
})

test('eventsource: a 204 to a resume ends the stream with not_resumable, and it does not try again', async () => {
  const stream = esClient().send('ended:2')
  const { error } = await stream.done
  assert.equal(error.code, 'not_resumable')
  await new Promise((resolve) => setTimeout(resolve, 20))
  assert.equal(requestsOf(stream).length, 3)
  assert.ok(FetchEventSource.instances.every((source) => source.readyState === 2), 'every source closed')
})

// ---- WebSocket ------------------------------------------------------------------------

const frame = (streamId, id, event, data, requestId) => ({ event, streamId, id, data, requestId })
const startFrame = (streamId, requestId) =>
  frame(streamId, 1, 'start', { streamId, conversationId: 'c1', model: 'm' }, requestId)
const wsClient = (options) =>
  createClient({ baseUrl: relay.baseUrl, WebSocket: FakeSocket, reconnect: FAST, ...options })

/** Play RECORDED_EVENTS from id `from` to `to` on a socket, as stream `streamId`. */
function playRecorded(socket, streamId, from, to = RECORDED_EVENTS.length) {
  for (const { event, id, data } of RECORDED_EVENTS.slice(from - 1, to)) {
    socket.play(frame(streamId, id, event, event === 'start' ? { ...data, streamId } : data))
  }
}

test('websocket: one new socket resumes every open stream from its own last id; one without start gets network_error', async () => {
  const client = wsClient()
  const a = client.send('first')
  const b = client.send('second')
  const c = client.send('third')
  const heardA = collect(a)
  const heardB = collect(b)
  const seenA = lifecycle(a)
  const socket = FakeSocket.last
  socket.open()
  const [ra, rb] = socket.sent.map((f) => f.requestId)
  socket.play(startFrame('sa', ra))
  playRecorded(socket, 'sa', 2, 4)
  socket.play(startFrame('sb', rb))
  playRecorded(socket, 'sb', 2, 2)
  socket.fail()

  assert.equal((await c.done).error.code, 'network_error')
  await until(() => FakeSocket.instances.length === 2)
  const again = FakeSocket.last
  again.open()
  await until(() => again.sent.length === 2)
  const resumes = again.sent.map(({ type, streamId, lastEventId }) => ({ type, streamId, lastEventId }))
  assert.deepEqual(resumes.sort((x, y) => x.streamId.localeCompare(y.streamId)), [
    { type: 'resume', streamId: 'sa', lastEventId: 4 },
    { type: 'resume', streamId: 'sb', lastEventId: 2 },
  ])
  assert.equal(a.state, 'streaming')
  playRecorded(again, 'sa', 4) // the server replays from after 4; a repeat of 4 is ignored
  playRecorded(again, 'sb', 3)
  const [resultA, resultB] = await Promise.all([a.done, b.done])
  assert.equal(resultA.text, TEXT)
  assert.equal(resultB.text, TEXT)
  assert.deepEqual(ids(await heardA.finished), [1, 2, 3, 4, 5, 6, 7])
  assert.deepEqual(ids(await heardB.finished), [1, 2, 3, 4, 5, 6, 7])
  assert.deepEqual(seenA, [['reconnecting', 1, 'reconnecting'], ['reconnected', 1, 'streaming', 'websocket']])
  assert.equal(FakeSocket.instances.length, 2, 'one socket for both resumes')
  assert.equal(a.state, 'done')
})

test('websocket: a resume that drops before any new event resumes from the same id again', async () => {
  const stream = wsClient().send('hi')
  const heard = collect(stream)
  let socket = FakeSocket.last
  socket.open()
  socket.play(startFrame('s1', socket.sent[0].requestId))
  playRecorded(socket, 's1', 2, 3)
  socket.fail()
  for (const count of [2, 3]) {
    await until(() => FakeSocket.instances.length === count)
    socket = FakeSocket.last
    socket.open()
    assert.deepEqual(socket.sent.map((f) => [f.type, f.lastEventId]), [['resume', 3]])
    if (count === 2) socket.fail() // before any event
  }
  playRecorded(socket, 's1', 4)
  assert.equal((await stream.done).text, TEXT)
  assert.deepEqual(ids(await heard.finished), [1, 2, 3, 4, 5, 6, 7])
})

test('websocket: the stall watchdog closes a silent socket and resumes on a new one', async () => {
  const stream = wsClient({ stallTimeoutMs: 30 }).send('hi')
  const socket = FakeSocket.last
  socket.open()
  socket.play(startFrame('s1', socket.sent[0].requestId))
  playRecorded(socket, 's1', 2, 2)
  await until(() => FakeSocket.instances.length === 2)
  assert.equal(socket.closed, true)
  const again = FakeSocket.last
  again.open()
  assert.deepEqual(again.sent.map((f) => [f.type, f.streamId, f.lastEventId]), [['resume', 's1', 2]])
  playRecorded(again, 's1', 3)
  assert.equal((await stream.done).text, TEXT)
})

test('websocket: keepalive frames keep the stall watchdog quiet', async () => {
  const stream = wsClient({ keepaliveMs: 24 }).send('hi') // stall after 60 ms
  const seen = lifecycle(stream)
  const socket = FakeSocket.last
  socket.open()
  socket.play(startFrame('s1', socket.sent[0].requestId))
  for (let i = 0; i < 15; i++) {
    await new Promise((resolve) => setTimeout(resolve, 10))
    socket.play({ event: 'keepalive' })
  }
  playRecorded(socket, 's1', 2)
  assert.equal((await stream.done).text, TEXT)
  assert.deepEqual(seen, [])
  assert.equal(FakeSocket.instances.length, 1)
})

test('websocket: not_resumable for a resume ends the stream with that error, and it does not try again', async () => {
  const stream = wsClient().send('hi')
  const socket = FakeSocket.last
  socket.open()
  socket.play(startFrame('s1', socket.sent[0].requestId))
  socket.fail()
  await until(() => FakeSocket.instances.length === 2)
  const again = FakeSocket.last
  again.open()
  const [resume] = again.sent
  const gone = { code: 'not_resumable', message: 'stream s1 not found or expired', retryable: false, messageId: 'm7' }
  again.play({ event: 'error', streamId: null, id: null, data: gone, requestId: resume.requestId })
  const result = await stream.done
  assert.deepEqual(result.error, gone)
  assert.equal(result.messageId, 'm7')
  await new Promise((resolve) => setTimeout(resolve, 20))
  assert.equal(FakeSocket.instances.length, 2)
  assert.equal(again.sent.length, 1)
})

test('websocket: slow_consumer resumes on the same socket from the last id', async () => {
  const stream = wsClient().send('hi')
  const heard = collect(stream)
  const socket = FakeSocket.last
  socket.open()
  socket.play(startFrame('s1', socket.sent[0].requestId))
  playRecorded(socket, 's1', 2, 3)
  const slow = { code: 'slow_consumer', message: 'this connection fell behind', retryable: true }
  socket.play(frame('s1', null, 'error', slow))
  await until(() => socket.sent.length === 2)
  assert.deepEqual(socket.sent[1], { type: 'resume', streamId: 's1', lastEventId: 3, requestId: socket.sent[1].requestId })
  playRecorded(socket, 's1', 4)
  const result = await stream.done
  assert.equal(result.text, TEXT)
  assert.equal(result.error, null)
  assert.deepEqual(ids(await heard.finished), [1, 2, 3, 4, 5, 6, 7])
  assert.equal(FakeSocket.instances.length, 1)
})

test('websocket: cancel while reconnecting posts to the cancel endpoint, then the resumed stream ends cancelled', async () => {
  const stream = wsClient({ reconnect: { baseMs: 60_000, maxMs: 60_000 } }).send('hi')
  const socket = FakeSocket.last
  socket.open()
  socket.play(startFrame('ws-cancel', socket.sent[0].requestId))
  playRecorded(socket, 'ws-cancel', 2, 3)
  stream.on('reconnecting', () => stream.cancel())
  socket.fail()
  assert.equal(stream.state, 'reconnecting')
  await until(() => relay.cancels.includes('ws-cancel'))
  assert.equal(relay.requests.at(-1).path, '/api/command-center/streams/ws-cancel/cancel')
  assert.equal(FakeSocket.instances.length, 2, 'reconnecting at once, not after the minute of backoff')
  const again = FakeSocket.last
  again.open()
  assert.deepEqual(again.sent[0], { type: 'resume', streamId: 'ws-cancel', lastEventId: 3, requestId: again.sent[0].requestId })
  again.play(frame('ws-cancel', 4, 'cost', { ...COST, estimated: true }))
  again.play(frame('ws-cancel', 5, 'done', { ...DONE, stopReason: 'cancelled' }))
  const result = await stream.done
  assert.equal(result.stopReason, 'cancelled')
  assert.equal(stream.state, 'cancelled')
})

test('websocket: when no socket can be opened again, auto mode resumes over SSE', async () => {
  // A stream the relay knows, read over the socket first.
  const posted = await fetch(relay.baseUrl + '/api/command-center/message', {
    method: 'POST',
    headers: { Accept: 'application/json' },
    body: JSON.stringify({ message: 'hi' }),
  })
  const { streamId } = await posted.json()
  class BlockedAfterFirst extends FakeSocket {
    constructor(url) {
      super(url)
      if (FakeSocket.instances.length > 1) queueMicrotask(() => this.fail())
    }
  }
  const stream = wsClient({ WebSocket: BlockedAfterFirst }).send('hi')
  const heard = collect(stream)
  const seen = lifecycle(stream)
  const socket = FakeSocket.last
  socket.open()
  socket.play(startFrame(streamId, socket.sent[0].requestId))
  playRecorded(socket, streamId, 2, 2)
  socket.fail()
  const result = await stream.done
  assert.equal(result.text, TEXT)
  assert.deepEqual(ids(await heard.finished), [1, 2, 3, 4, 5, 6, 7])
  assert.equal(stream.transport, 'sse')
  assert.deepEqual(seen.at(-1), ['reconnected', 1, 'streaming', 'sse'])
  const get = relay.requests.findLast((r) => r.path.endsWith(streamId))
  assert.equal(get.headers['last-event-id'], '2')
})

test('stream.state goes connecting, streaming, reconnecting, streaming, done', async () => {
  const stream = wsClient().send('hi')
  const states = [stream.state]
  const note = () => states.at(-1) !== stream.state && states.push(stream.state)
  for (const name of ['start', 'chunk', 'reconnecting', 'reconnected', 'done']) stream.on(name, note)
  const socket = FakeSocket.last
  socket.open()
  socket.play(startFrame('s1', socket.sent[0].requestId))
  socket.fail()
  await until(() => FakeSocket.instances.length === 2)
  FakeSocket.last.open()
  playRecorded(FakeSocket.last, 's1', 2)
  await stream.done
  assert.deepEqual(states, ['connecting', 'streaming', 'reconnecting', 'streaming', 'done'])
})
