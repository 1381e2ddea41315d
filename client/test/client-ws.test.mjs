// The client over WebSocket (a fake socket the test plays), and its fallback to SSE.

import assert from 'node:assert/strict'
import { after, before, beforeEach, test as nodeTest } from 'node:test'

import { createClient } from '../deltarelay.js'
import { COST, DONE, FakeSocket, RECORDED_EVENTS, RefusedSocket, TEXT, collect, startRelay } from './relay.mjs'

// The timeout only guards against a hang: nothing here waits on a clock.
const test = (name, fn) => nodeTest(name, { timeout: 10_000 }, fn)

let relay
before(async () => (relay = await startRelay()))
after(() => relay.close())
beforeEach(() => (FakeSocket.instances.length = 0))

const frame = (streamId, id, event, data, requestId) => ({ event, streamId, id, data, requestId })
const start = (streamId, requestId) =>
  frame(streamId, 1, 'start', { streamId, conversationId: 'c-' + streamId, model: 'm' }, requestId)

test('auto falls back to SSE when the socket cannot open, and remembers it', async () => {
  const client = createClient({ baseUrl: relay.baseUrl, WebSocket: RefusedSocket })
  const stream = client.send('hi')
  assert.equal(stream.transport, 'websocket')
  const heard = collect(stream)

  const result = await stream.done
  assert.equal(result.text, TEXT)
  assert.deepEqual((await heard.finished).iterated, RECORDED_EVENTS)
  assert.equal(stream.transport, 'sse')
  assert.equal(client.transport, 'sse')
  assert.equal(relay.requests.at(-1).path, '/api/command-center/message')

  const second = client.send('hi again')
  assert.equal(second.transport, 'sse')
  assert.equal((await second.done).text, TEXT)
  assert.equal(FakeSocket.instances.length, 1, 'no second socket after the fallback')
})

test('auto never sends a message twice: a socket that opened and closed unheard ends it, and SSE takes later ones', async () => {
  const client = createClient({ baseUrl: relay.baseUrl, WebSocket: FakeSocket })
  const stream = client.send('hi')
  const socket = FakeSocket.last
  socket.open()
  assert.equal(socket.sent.length, 1, 'the message went out: the server may be answering it')
  const before = relay.requests.length
  socket.fail()
  const result = await stream.done
  assert.equal(result.error.code, 'network_error')
  assert.equal(relay.requests.length, before, 'not posted again over SSE')

  const next = client.send('hi again')
  assert.equal(next.transport, 'sse')
  assert.equal((await next.done).text, TEXT)
  assert.equal(FakeSocket.instances.length, 1)
})

test('auto falls back to SSE when the upgrade hangs past wsOpenTimeoutMs', async () => {
  const client = createClient({ baseUrl: relay.baseUrl, WebSocket: FakeSocket, wsOpenTimeoutMs: 20 })
  const stream = client.send('hi')
  assert.equal((await stream.done).text, TEXT)
  assert.equal(stream.transport, 'sse')
  assert.equal(FakeSocket.last.closed, true)
  assert.equal(client.send('later').transport, 'sse')
})

test('auto falls back to SSE when the WebSocket constructor throws', async () => {
  class Blocked {
    constructor() {
      throw new Error('blocked by Content-Security-Policy')
    }
  }
  const stream = createClient({ baseUrl: relay.baseUrl, WebSocket: Blocked }).send('hi')
  assert.equal((await stream.done).text, TEXT)
  assert.equal(stream.transport, 'sse')
})

test('a forced websocket transport reports a failed socket as network_error instead of falling back', async () => {
  const client = createClient({ baseUrl: relay.baseUrl, transport: 'websocket', WebSocket: RefusedSocket })
  const stream = client.send('hi')
  const result = await stream.done
  assert.equal(result.error.code, 'network_error')
  assert.equal(result.error.retryable, true)
  assert.equal(stream.transport, 'websocket')
})

test('websocket url follows baseUrl: http becomes ws, https becomes wss', () => {
  createClient({ baseUrl: 'http://relay.test:8000/', WebSocket: FakeSocket }).send('hi')
  assert.equal(FakeSocket.last.url, 'ws://relay.test:8000/api/command-center/ws')
  createClient({ baseUrl: 'https://relay.test', WebSocket: FakeSocket }).send('hi')
  assert.equal(FakeSocket.last.url, 'wss://relay.test/api/command-center/ws')
})

test('websocket stream plays start, chunks, cost and done in order', async () => {
  const client = createClient({ baseUrl: 'http://relay.test', WebSocket: FakeSocket })
  const stream = client.send('hi', { conversationId: 'c1', agentId: 'helper' })
  const heard = collect(stream)
  const socket = FakeSocket.last
  socket.open()
  const [sent] = socket.sent
  assert.deepEqual(sent, { type: 'message', message: 'hi', agentId: 'helper', conversationId: 'c1', requestId: sent.requestId })
  assert.equal(typeof sent.requestId, 'string')

  for (const { event, id, data } of RECORDED_EVENTS) {
    socket.play(frame('s1', id, event, data, event === 'start' ? sent.requestId : undefined))
  }
  const result = await stream.done
  assert.equal(result.text, TEXT)
  assert.deepEqual(result.cost, COST)
  assert.equal(result.stopReason, DONE.stopReason)
  assert.equal(result.messageId, DONE.messageId)
  assert.equal(result.error, null)
  assert.deepEqual((await heard.finished).iterated, RECORDED_EVENTS)
  assert.equal(stream.transport, 'websocket')
  assert.equal(client.transport, 'websocket')
})

test('two concurrent streams share one socket and are routed by requestId and streamId', async () => {
  const client = createClient({ baseUrl: 'http://relay.test', WebSocket: FakeSocket })
  const a = client.send('first')
  const b = client.send('second')
  assert.equal(FakeSocket.instances.length, 1)
  const socket = FakeSocket.last
  socket.open()
  const [ra, rb] = socket.sent.map((f) => f.requestId)
  assert.notEqual(ra, rb)

  socket.play(start('sb', rb))
  socket.play(start('sa', ra))
  socket.play(frame('sa', 2, 'chunk', { text: 'A1' }))
  socket.play(frame('sb', 2, 'chunk', { text: 'B1' }))
  socket.play(frame('sb', 3, 'chunk', { text: 'B2' }))
  socket.play(frame('sa', 3, 'chunk', { text: 'A2' }))
  socket.play(frame('sb', 4, 'done', { conversationId: 'c-sb', messageId: 'mb', stopReason: 'end_turn' }))
  socket.play(frame('sa', 4, 'done', { conversationId: 'c-sa', messageId: 'ma', stopReason: 'end_turn' }))

  const [resultA, resultB] = await Promise.all([a.done, b.done])
  assert.equal(resultA.text, 'A1A2')
  assert.equal(resultB.text, 'B1B2')
  assert.equal(resultA.messageId, 'ma')
  assert.equal(resultB.conversationId, 'c-sb')
  assert.equal(a.streamId, 'sa')
  assert.equal(b.streamId, 'sb')

  // The socket stays open for the client's next stream.
  client.send('third')
  assert.equal(FakeSocket.instances.length, 1)
  assert.equal(socket.sent.at(-1).message, 'third')
})

test('an error frame that rejects a message ends only that stream', async () => {
  const client = createClient({ baseUrl: 'http://relay.test', WebSocket: FakeSocket })
  const good = client.send('fine')
  const bad = client.send('')
  const socket = FakeSocket.last
  socket.open()
  const [rGood, rBad] = socket.sent.map((f) => f.requestId)
  const rejection = { code: 'invalid_request', message: 'message must not be empty', retryable: false }
  socket.play({ event: 'error', streamId: null, id: null, data: rejection, requestId: rBad })
  assert.deepEqual((await bad.done).error, rejection)

  socket.play(start('s1', rGood))
  socket.play(frame('s1', 2, 'chunk', { text: 'ok' }))
  socket.play(frame('s1', 3, 'done', DONE))
  const result = await good.done
  assert.equal(result.text, 'ok')
  assert.equal(result.error, null)
})

test('frames that are not JSON, pongs, unknown streams and replayed ids are ignored', async () => {
  const client = createClient({ baseUrl: 'http://relay.test', WebSocket: FakeSocket })
  const stream = client.send('hi')
  const socket = FakeSocket.last
  socket.open()
  const { requestId } = socket.sent[0]
  socket.play('not json')
  socket.play({ event: 'pong' })
  socket.play({ event: 'error', streamId: null, id: null, data: { code: 'invalid_frame', message: 'x', retryable: false } })
  socket.play(start('s1', requestId))
  socket.play(frame('other', 2, 'chunk', { text: 'not mine' }))
  socket.play(frame('s1', 2, 'chunk', { text: 'a' }))
  socket.play(frame('s1', 2, 'chunk', { text: 'a again' }))
  socket.play(frame('s1', 3, 'chunk', { text: 'b' }))
  socket.play(frame('s1', 4, 'done', DONE))
  const result = await stream.done
  assert.equal(result.text, 'ab')
  assert.equal(stream.lastEventId, 4)
})

test('with reconnect off, a socket lost after its first frame ends open streams with network_error; the next send reconnects', async () => {
  const client = createClient({ baseUrl: 'http://relay.test', WebSocket: FakeSocket, reconnect: { maxAttempts: 0 } })
  const stream = client.send('hi')
  const socket = FakeSocket.last
  socket.open()
  socket.play(start('s1', socket.sent[0].requestId))
  socket.play(frame('s1', 2, 'chunk', { text: 'Hel' }))
  socket.fail()
  const result = await stream.done
  assert.equal(result.text, 'Hel')
  assert.equal(result.error.code, 'network_error')
  assert.equal(result.error.retryable, true)
  assert.equal(stream.lastEventId, 2)

  const next = client.send('again')
  assert.equal(next.transport, 'websocket')
  assert.equal(FakeSocket.instances.length, 2)
})

test('cancel before start is sent over the socket once the stream id is known', async () => {
  const client = createClient({ baseUrl: 'http://relay.test', WebSocket: FakeSocket })
  const stream = client.send('hi')
  stream.cancel()
  const socket = FakeSocket.last
  socket.open()
  assert.equal(socket.sent.length, 1)
  socket.play(start('s1', socket.sent[0].requestId))
  assert.deepEqual(socket.sent[1], { type: 'cancel', streamId: 's1' })
  socket.play(frame('s1', 2, 'done', { conversationId: 'c1', messageId: 'm1', stopReason: 'cancelled' }))
  assert.equal((await stream.done).stopReason, 'cancelled')
  stream.cancel()
  assert.equal(socket.sent.length, 2, 'cancel after the end sends nothing')
})

test('close ends open streams with network_error and closes the socket', async () => {
  const client = createClient({ baseUrl: 'http://relay.test', WebSocket: FakeSocket })
  const stream = client.send('hi')
  const socket = FakeSocket.last
  socket.open()
  client.close()
  assert.equal((await stream.done).error.code, 'network_error')
  assert.equal(socket.closed, true)
})
