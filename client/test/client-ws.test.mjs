// The client over a real WebSocket to a real relay (harness.mjs) through a TCP proxy, and its fallback to SSE.

import assert from 'node:assert/strict'
import { after, before, beforeEach, test as nodeTest } from 'node:test'

import { WebSocket as UndiciWebSocket } from 'undici'

import { createClient } from '../deltarelay.js'
import { MESSAGE_PATH, collect, logOf, savedAnswer, startProxy, startServer } from './harness.mjs'

// The timeout only guards against a hang: nothing here waits on a clock.
const test = (name, fn) => nodeTest(name, { timeout: 30_000 }, fn)

/** The platform's WebSocket (undici's, as Node 22 has it built in), counting the sockets the client opens. */
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

let server, relay, slow, slowRelay
before(async () => {
  ;[server, slow] = await Promise.all([startServer(), startServer({ env: { RELAY_OFFLINE_DELAY_MS: '10' } })])
  ;[relay, slowRelay] = await Promise.all([startProxy(server.port), startProxy(slow.port)])
})
after(async () => {
  await Promise.all([relay?.close(), slowRelay?.close()])
  await Promise.all([server?.close(), slow?.close()])
})
beforeEach(() => (Socket.instances.length = 0))

const isUpgrade = (r) => r.headers.upgrade === 'websocket'
const isPost = (r) => r.method === 'POST' && r.path === MESSAGE_PATH
const text = (events) => events.filter((e) => e.event === 'chunk').map((e) => e.data.text).join('')
const dataOf = (events, name) => events.findLast((e) => e.event === name)?.data
const closed = (socket) => socket.readyState >= 2 // CLOSING or CLOSED

test('auto falls back to SSE when the socket cannot open, and remembers it', async () => {
  relay.plan(isUpgrade, { refuse: true })
  const client = createClient({ baseUrl: relay.url, WebSocket: Socket })
  const stream = client.send('hi')
  assert.equal(stream.transport, 'websocket')
  const heard = collect(stream)

  const result = await stream.done
  const log = await logOf(server.url, stream.streamId)
  assert.equal(result.text, text(log))
  assert.deepEqual((await heard.finished).iterated, log)
  assert.equal(stream.transport, 'sse')
  assert.equal(client.transport, 'sse')
  assert.equal(relay.requests.at(-1).path, '/api/command-center/message')

  const second = client.send('hi again')
  assert.equal(second.transport, 'sse')
  assert.equal((await second.done).text, text(await logOf(server.url, second.streamId)))
  assert.equal(Socket.instances.length, 1, 'no second socket after the fallback')
})

test('auto never sends a message twice: a socket that opened and closed unheard ends it, and SSE takes later ones', async () => {
  relay.plan(isUpgrade, { ws: () => 'cut' }) // the server's first frame: the socket is lost before the client hears it
  const frames = relay.frames.length
  const client = createClient({ baseUrl: relay.url, WebSocket: Socket })
  const posts = relay.requests.filter(isPost).length
  const stream = client.send('hi')
  const result = await stream.done
  assert.equal(result.error.code, 'network_error')
  const sent = relay.frames.slice(frames)
  assert.deepEqual(sent.map((f) => [f.type, f.message]), [['message', 'hi']], 'the message went out: the server may be answering it')
  assert.equal(relay.requests.filter(isPost).length, posts, 'not posted again over SSE')

  const next = client.send('hi again')
  assert.equal(next.transport, 'sse')
  assert.equal((await next.done).text, text(await logOf(server.url, next.streamId)))
  assert.equal(Socket.instances.length, 1)
})

test('auto falls back to SSE when the upgrade hangs past wsOpenTimeoutMs', async () => {
  relay.plan(isUpgrade, { hang: true })
  const client = createClient({ baseUrl: relay.url, WebSocket: Socket, wsOpenTimeoutMs: 200 })
  const stream = client.send('hi')
  assert.equal((await stream.done).text, text(await logOf(server.url, stream.streamId)))
  assert.equal(stream.transport, 'sse')
  assert.equal(closed(Socket.last), true)
  assert.equal(client.send('later').transport, 'sse')
})

test('auto falls back to SSE when the WebSocket constructor throws', async () => {
  class Blocked {
    constructor() {
      throw new Error('blocked by Content-Security-Policy')
    }
  }
  const stream = createClient({ baseUrl: relay.url, WebSocket: Blocked }).send('hi')
  assert.equal((await stream.done).text, text(await logOf(server.url, stream.streamId)))
  assert.equal(stream.transport, 'sse')
})

test('a forced websocket transport reports a failed socket as network_error instead of falling back', async () => {
  relay.plan(isUpgrade, { refuse: true })
  const posts = relay.requests.filter(isPost).length
  const client = createClient({ baseUrl: relay.url, transport: 'websocket', WebSocket: Socket })
  const stream = client.send('hi')
  const result = await stream.done
  assert.equal(result.error.code, 'network_error')
  assert.equal(result.error.retryable, true)
  assert.equal(stream.transport, 'websocket')
  assert.equal(relay.requests.filter(isPost).length, posts)
})

test('websocket url follows baseUrl: http becomes ws, https becomes wss', () => {
  const urls = []
  class Recorder {
    constructor(url) {
      urls.push(url)
    }
    close() {}
  }
  createClient({ baseUrl: 'http://relay.test:8000/', WebSocket: Recorder }).send('hi')
  createClient({ baseUrl: 'https://relay.test', WebSocket: Recorder }).send('hi')
  assert.deepEqual(urls, ['ws://relay.test:8000/api/command-center/ws', 'wss://relay.test/api/command-center/ws'])
})

/** A conversation with one answer, made with a plain POST: its id. */
async function conversation(url) {
  const res = await fetch(url + MESSAGE_PATH, {
    method: 'POST',
    headers: { Accept: 'application/json' },
    body: JSON.stringify({ message: 'first', agentId: 'helper' }),
  })
  return (await res.json()).conversationId
}

test('websocket stream plays start, chunks, cost and done in order', async () => {
  const conversationId = await conversation(server.url)
  const frames = relay.frames.length
  const client = createClient({ baseUrl: relay.url, WebSocket: Socket })
  const stream = client.send('hi', { conversationId, agentId: 'helper' })
  const heard = collect(stream)
  const result = await stream.done
  const [sent] = relay.frames.slice(frames)
  assert.deepEqual(sent, { type: 'message', message: 'hi', agentId: 'helper', conversationId, requestId: sent.requestId })
  assert.equal(typeof sent.requestId, 'string')

  const log = await logOf(server.url, stream.streamId)
  const saved = await savedAnswer(server.url, conversationId)
  assert.equal(result.text, saved.content)
  assert.deepEqual(result.cost, dataOf(log, 'cost'))
  assert.equal(result.stopReason, 'end_turn')
  assert.equal(result.messageId, saved.id)
  assert.equal(result.error, null)
  assert.deepEqual((await heard.finished).iterated, log)
  assert.equal(stream.transport, 'websocket')
  assert.equal(client.transport, 'websocket')
  client.close()
})

test('two concurrent streams share one socket and are routed by requestId and streamId', async () => {
  // Answers a word every 10 ms: the server interleaves the two streams' frames on the socket.
  const frames = slowRelay.frames.length
  const client = createClient({ baseUrl: slowRelay.url, WebSocket: Socket })
  const a = client.send('first')
  const b = client.send('second')
  assert.equal(Socket.instances.length, 1)
  const [resultA, resultB] = await Promise.all([a.done, b.done])
  const [ra, rb] = slowRelay.frames.slice(frames).map((f) => f.requestId)
  assert.notEqual(ra, rb)
  const savedA = await savedAnswer(slow.url, resultA.conversationId)
  const savedB = await savedAnswer(slow.url, resultB.conversationId)
  assert.match(savedA.content, /“first”/)
  assert.match(savedB.content, /“second”/)
  assert.equal(resultA.text, savedA.content)
  assert.equal(resultB.text, savedB.content)
  assert.equal(resultA.messageId, savedA.id)
  assert.notEqual(resultA.conversationId, resultB.conversationId)
  assert.equal(a.streamId, (await logOf(slow.url, a.streamId))[0].data.streamId)
  assert.equal(b.streamId, (await logOf(slow.url, b.streamId))[0].data.streamId)

  // The socket stays open for the client's next stream.
  const third = client.send('third')
  await third.done
  assert.equal(Socket.instances.length, 1)
  assert.equal(slowRelay.frames.at(-1).message, 'third')
  client.close()
})

test('an error frame that rejects a message ends only that stream', async () => {
  const client = createClient({ baseUrl: relay.url, WebSocket: Socket })
  const good = client.send('fine')
  const bad = client.send('')
  const rejection = { code: 'invalid_request', message: 'message must not be empty', retryable: false }
  assert.deepEqual((await bad.done).error, rejection)
  const result = await good.done
  assert.equal(result.text, (await savedAnswer(server.url, result.conversationId)).content)
  assert.equal(result.error, null)
  client.close()
})

test('frames that are not JSON, pongs, unknown streams and replayed ids are ignored', async () => {
  relay.plan(isUpgrade, {
    ws(frame) {
      if (frame.event === 'start') {
        const stray = { event: 'error', streamId: null, id: null, data: { code: 'invalid_frame', message: 'x', retryable: false } }
        const other = { event: 'chunk', streamId: 'other', id: 2, data: { text: 'not mine' } }
        return { inject: ['not json', '{"event":"pong"}', JSON.stringify(stray), JSON.stringify(frame), JSON.stringify(other)], then: 'drop' }
      }
      if (frame.id === 2) return { inject: [JSON.stringify(frame), JSON.stringify({ ...frame, data: { text: 'again' } })], then: 'drop' }
    },
  })
  const client = createClient({ baseUrl: relay.url, WebSocket: Socket })
  const stream = client.send('hi')
  const result = await stream.done
  const log = await logOf(server.url, stream.streamId)
  assert.equal(result.text, text(log))
  assert.equal(stream.lastEventId, log.at(-1).id)
  client.close()
})

test('with reconnect off, a socket lost after its first frame ends open streams with network_error; the next send reconnects', async () => {
  let seen = 0
  relay.plan(isUpgrade, { ws: () => (++seen > 2 ? 'cut' : undefined) }) // start and one chunk, then the socket is lost
  const client = createClient({ baseUrl: relay.url, WebSocket: Socket, reconnect: { maxAttempts: 0 } })
  const stream = client.send('hi')
  const result = await stream.done
  const log = await logOf(server.url, stream.streamId)
  assert.equal(result.text, log[1].data.text)
  assert.equal(result.error.code, 'network_error')
  assert.equal(result.error.retryable, true)
  assert.equal(stream.lastEventId, 2)

  const next = client.send('again')
  assert.equal(next.transport, 'websocket')
  assert.equal(Socket.instances.length, 2)
  assert.equal((await next.done).error, null)
  client.close()
})

test('cancel before start is sent over the socket once the stream id is known', async () => {
  const frames = slowRelay.frames.length
  const client = createClient({ baseUrl: slowRelay.url, WebSocket: Socket })
  const stream = client.send('hi')
  stream.cancel()
  const result = await stream.done
  assert.equal(result.stopReason, 'cancelled')
  const sent = slowRelay.frames.slice(frames)
  assert.deepEqual(sent.map((f) => f.type), ['message', 'cancel'])
  assert.deepEqual(sent[1], { type: 'cancel', streamId: stream.streamId })
  assert.equal((await savedAnswer(slow.url, result.conversationId)).status, 'cancelled')
  stream.cancel()
  assert.equal(slowRelay.frames.length, frames + 2, 'cancel after the end sends nothing')
  client.close()
})

test('close ends open streams with network_error and closes the socket', async () => {
  const client = createClient({ baseUrl: slowRelay.url, WebSocket: Socket })
  const stream = client.send('hi')
  await new Promise((resolve) => stream.on('start', resolve))
  client.close()
  assert.equal((await stream.done).error.code, 'network_error')
  assert.equal(closed(Socket.last), true)
})
