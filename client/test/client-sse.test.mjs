// The client over SSE (fetch POST) and EventSource, against a real relay (harness.mjs) through a TCP proxy.

import assert from 'node:assert/strict'
import { after, before, test as nodeTest } from 'node:test'

import { createClient } from '../deltarelay.js'
import { FetchEventSource, MESSAGE_PATH, collect, logOf, savedAnswer, startProxy, startServer } from './harness.mjs'
import { RECORDED_BYTES, RECORDED_EVENTS, TEXT, fetchByteByByte, fetchPieces, sse, DONE } from './recorded.mjs'

// The timeout only guards against a hang: nothing here waits on a clock.
const test = (name, fn) => nodeTest(name, { timeout: 30_000 }, fn)

let server, relay, slow, slowRelay, failing, limited
before(async () => {
  ;[server, slow, failing, limited] = await Promise.all([
    startServer(),
    startServer({ env: { RELAY_OFFLINE_DELAY_MS: '40' } }), // answers that are still running when cancelled
    startServer({ upstream: ['--error', 'overloaded-midstream'] }),
    startServer({ env: { RELAY_LIMIT_REQUESTS_PER_MINUTE: '1' } }),
  ])
  relay = await startProxy(server.port)
  slowRelay = await startProxy(slow.port)
})
after(async () => {
  await Promise.all([relay?.close(), slowRelay?.close()])
  await Promise.all([server, slow, failing, limited].map((s) => s?.close()))
})

const sseClient = (options) => createClient({ baseUrl: relay.url, transport: 'sse', ...options })
const isPost = (r) => r.method === 'POST' && r.path === MESSAGE_PATH
const text = (events) => events.filter((e) => e.event === 'chunk').map((e) => e.data.text).join('')
const dataOf = (events, name) => events.findLast((e) => e.event === name)?.data

/** A conversation with one answer, made with a plain POST: its id. */
async function conversation(url) {
  const res = await fetch(url + MESSAGE_PATH, {
    method: 'POST',
    headers: { Accept: 'application/json' },
    body: JSON.stringify({ message: 'first', agentId: 'helper' }),
  })
  return (await res.json()).conversationId
}

test('sse stream delivers every event to listeners, on() callbacks and the async iterator', async () => {
  const conversationId = await conversation(server.url)
  const client = sseClient()
  const stream = client.send('hi', { conversationId, agentId: 'helper' })
  assert.equal(stream.transport, 'sse')
  assert.equal(client.transport, 'sse')
  const heard = collect(stream)

  const result = await stream.done
  await heard.finished
  const log = await logOf(server.url, stream.streamId)
  assert.deepEqual(heard.iterated, log)
  const named = log.map(({ event, data }) => ({ event, data }))
  assert.deepEqual(heard.listeners, named)
  assert.deepEqual(heard.callbacks, named)
  const saved = await savedAnswer(server.url, conversationId)
  assert.deepEqual(result, {
    text: saved.content,
    thinking: '',
    cost: dataOf(log, 'cost'),
    stopReason: 'end_turn',
    messageId: saved.id,
    userMessageId: saved.parentId, // the start event's: the message answered
    conversationId,
    error: null,
    truncatedMessages: 0, // the whole conversation was sent
  })
  assert.ok(result.text.length > 0)
  assert.equal(stream.text, saved.content)
  assert.equal(stream.streamId, log[0].data.streamId)
  assert.equal(stream.model, log[0].data.model)
  assert.equal(stream.lastEventId, log.length)
  assert.equal(stream.finished, true)

  const request = relay.requests.at(-1)
  assert.equal(request.path, '/api/command-center/message')
  assert.equal(request.headers.accept, 'text/event-stream')
  assert.equal(request.headers['content-type'], 'application/json')
  assert.deepEqual(JSON.parse(request.body), { message: 'hi', agentId: 'helper', conversationId })
})

test('sse stream gives the same events when the body is split at every byte position', async () => {
  // The recorded answer (every line end, a BOM, comments), and the bytes the relay really wrote for one.
  const stream = sseClient().send('split me')
  await stream.done
  const log = await logOf(server.url, stream.streamId)
  const served = Buffer.from(log.map((e) => sse(e.id, e.event, e.data)).join(''))
  for (const [bytes, events] of [[RECORDED_BYTES, RECORDED_EVENTS], [served, log]]) {
    for (let at = 1; at < bytes.length; at++) {
      const split = createClient({ transport: 'sse', fetch: fetchPieces([bytes.subarray(0, at), bytes.subarray(at)]) })
      const stream = split.send('hi')
      const heard = collect(stream)
      assert.equal((await stream.done).text, text(events), `split at ${at}`)
      assert.deepEqual((await heard.finished).iterated, events, `split at ${at}`)
    }
  }
})

test('sse stream decodes a body delivered byte by byte, multi-byte characters included', async () => {
  const stream = createClient({ transport: 'sse', fetch: fetchByteByByte(RECORDED_BYTES) }).send('hi')
  const heard = collect(stream)
  assert.equal((await stream.done).text, TEXT)
  assert.deepEqual((await heard.finished).iterated, RECORDED_EVENTS)
})

test('sse stream strips one leading BOM only: after a second one, "id" is an unknown field', async () => {
  const body = '\uFEFF\uFEFFid: 1\nevent: chunk\ndata: {"text":"a"}\n\n' + sse(2, 'done', DONE)
  const stream = createClient({ transport: 'sse', fetch: fetchByteByByte(Buffer.from(body)) }).send('hi')
  const heard = collect(stream)
  assert.equal((await stream.done).text, 'a')
  assert.deepEqual((await heard.finished).iterated.map((m) => m.id), [null, 2])
})

test('a 4xx JSON body becomes an error event with the server code and message', async () => {
  const stream = sseClient().send('')
  const heard = collect(stream)
  const result = await stream.done
  const error = { code: 'invalid_request', message: 'message must not be empty', retryable: false }
  assert.deepEqual(result.error, error)
  assert.deepEqual((await heard.finished).iterated, [{ event: 'error', id: null, data: error }])
  assert.deepEqual(heard.listeners, [{ event: 'error', data: error }])
})

test('a 429 body is a retryable error that keeps retryAfter', async () => {
  const client = createClient({ baseUrl: limited.url, transport: 'sse' })
  assert.equal((await client.send('the one this minute allows').done).error, null)
  const { error } = await client.send('one too many').done
  assert.equal(error.code, 'rate_limited')
  assert.equal(error.retryable, true)
  assert.match(error.message, /too many requests/)
  assert.ok(error.retryAfter > 0, `retryAfter ${error.retryAfter}`)
})

test('with reconnect off (maxAttempts 0), a body that ends before done is a retryable network_error', async () => {
  relay.plan(isPost, { sse: (e) => (e.id > 2 ? 'cut' : undefined) })
  const stream = sseClient({ reconnect: { maxAttempts: 0 } }).send('cut after a chunk')
  const heard = collect(stream)
  const result = await stream.done
  assert.equal(result.error.code, 'network_error')
  assert.equal(result.error.retryable, true)
  assert.equal(stream.state, 'error')
  const names = (await heard.finished).iterated.map((m) => m.event)
  assert.deepEqual(names, ['start', 'chunk', 'error'])
  assert.equal(relay.requests.at(-1).method, 'POST', 'no resume was tried')
})

test('a server error event ends the stream with its code and message', async () => {
  const stream = createClient({ baseUrl: failing.url, transport: 'sse' }).send('fail half way')
  const result = await stream.done
  const log = await logOf(failing.url, stream.streamId)
  const error = dataOf(log, 'error')
  assert.equal(error.code, 'overloaded')
  assert.equal(error.retryable, true)
  assert.deepEqual(result.error, error)
  assert.equal(result.messageId, error.messageId)
  assert.ok(result.text.length > 0, 'the text before the error')
  assert.equal(result.text, text(log))
  assert.equal(stream.lastEventId, log.at(-1).id)
})

test('an unreachable server becomes a retryable network_error, never a rejection', async () => {
  const refused = async () => {
    throw new TypeError('fetch failed')
  }
  const result = await createClient({ transport: 'sse', fetch: refused }).send('hi').done
  assert.equal(result.error.code, 'network_error')
  assert.equal(result.error.retryable, true)
})

test('events whose id is not above the last one are ignored', async () => {
  // The proxy plays a replay: after event 2, events 2 and 1 again, with other data.
  let start
  relay.plan(isPost, {
    sse(e) {
      if (e.event === 'start') start = e.text
      if (e.id === 2) return { inject: e.text + e.text.replace(/"text":"/, '"text":"again ') + start, then: 'drop' }
    },
  })
  const stream = sseClient().send('dupes')
  const heard = collect(stream)
  const result = await stream.done
  const log = await logOf(server.url, stream.streamId)
  assert.equal(result.text, text(log))
  const ids = (await heard.finished).iterated.map((m) => m.id)
  assert.deepEqual(ids, log.map((e) => e.id))
})

test('cancel before start waits for the stream id, then posts to the cancel endpoint', async () => {
  const stream = createClient({ baseUrl: slowRelay.url, transport: 'sse' }).send('cancel me')
  stream.cancel()
  const result = await stream.done
  assert.equal(result.stopReason, 'cancelled')
  assert.equal(result.error, null)
  const saved = await savedAnswer(slow.url, result.conversationId)
  assert.equal(saved.status, 'cancelled')
  assert.equal(result.text, saved.content)
  assert.deepEqual(slowRelay.cancels.slice(-1), [stream.streamId])
  assert.equal(slowRelay.requests.at(-1).path, `/api/command-center/streams/${stream.streamId}/cancel`)
})

test('a listener can iterate late and still sees every event', async () => {
  const stream = sseClient().send('hi')
  await stream.done
  const seen = []
  for await (const message of stream) seen.push(message)
  assert.deepEqual(seen, await logOf(server.url, stream.streamId))
})

const esClient = (url = relay.url) =>
  createClient({ baseUrl: url, transport: 'eventsource', EventSource: FetchEventSource })

test('eventsource transport posts for a stream id, then reads GET /streams/{id}', async () => {
  const client = esClient()
  const stream = client.send('hi')
  assert.equal(client.transport, 'eventsource')
  const heard = collect(stream)
  const result = await stream.done
  const log = await logOf(server.url, stream.streamId)
  const saved = await savedAnswer(server.url, result.conversationId)
  assert.equal(result.text, saved.content)
  assert.deepEqual(result.cost, dataOf(log, 'cost'))
  assert.match(stream.streamId, /^[0-9a-f]{32}$/)
  const source = FetchEventSource.instances.at(-1)
  assert.equal(source.url, `${relay.url}/api/command-center/streams/${stream.streamId}`)
  assert.equal(source.readyState, 2, 'closed after done, so it does not reconnect')
  const post = relay.requests.findLast((r) => r.method === 'POST')
  assert.equal(post.headers.accept, 'application/json')
  const ids = (await heard.finished).iterated.map((m) => m.id)
  assert.deepEqual(ids, log.map((e) => e.id))
  assert.deepEqual(heard.iterated.at(-1).data, dataOf(log, 'done'))
})

test('eventsource transport resumes after a dropped connection without repeating events', async () => {
  relay.plan((r) => r.method === 'GET', { sse: (e) => (e.id > 2 ? 'cut' : undefined) })
  const stream = esClient().send('drop')
  const heard = collect(stream)
  const result = await stream.done
  const log = await logOf(server.url, stream.streamId)
  assert.equal(result.text, text(log))
  const ids = (await heard.finished).iterated.map((m) => m.id)
  assert.deepEqual(ids, log.map((e) => e.id))
  // The client reconnects itself, from its own last id: an EventSource cannot set the header.
  const gets = relay.requests.filter((r) => r.method === 'GET' && r.path.endsWith(stream.streamId))
  assert.deepEqual(gets.map((r) => r.query), ['', '?lastEventId=2'])
})

test('eventsource transport turns a 4xx on the POST into an error event', async () => {
  const { error } = await esClient().send('').done
  assert.equal(error.code, 'invalid_request')
  assert.equal(error.message, 'message must not be empty')
})

test('eventsource transport cancels through the cancel endpoint', async () => {
  const stream = esClient(slowRelay.url).send('cancel me')
  stream.cancel()
  const result = await stream.done
  assert.equal(result.stopReason, 'cancelled')
  assert.equal(slowRelay.cancels.at(-1), stream.streamId)
})
