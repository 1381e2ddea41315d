// The client over SSE (fetch POST) and EventSource, against an in-process relay.

import assert from 'node:assert/strict'
import { after, before, test as nodeTest } from 'node:test'

import { createClient } from '../deltarelay.js'
import {
  COST,
  DONE,
  FetchEventSource,
  RECORDED_BYTES,
  RECORDED_EVENTS,
  START,
  TEXT,
  collect,
  sse,
  startRelay,
} from './relay.mjs'

// The timeout only guards against a hang: nothing here waits on a clock.
const test = (name, fn) => nodeTest(name, { timeout: 10_000 }, fn)

let relay
before(async () => (relay = await startRelay()))
after(() => relay.close())

const sseClient = () => createClient({ baseUrl: relay.baseUrl, transport: 'sse' })

test('sse stream delivers every event to listeners, on() callbacks and the async iterator', async () => {
  const client = sseClient()
  const stream = client.send('hi', { conversationId: 'c1', agentId: 'helper' })
  assert.equal(stream.transport, 'sse')
  assert.equal(client.transport, 'sse')
  const heard = collect(stream)

  const result = await stream.done
  await heard.finished
  assert.deepEqual(heard.iterated, RECORDED_EVENTS)
  const named = RECORDED_EVENTS.map(({ event, data }) => ({ event, data }))
  assert.deepEqual(heard.listeners, named)
  assert.deepEqual(heard.callbacks, named)
  assert.deepEqual(result, {
    text: TEXT,
    thinking: 'Let me think.',
    cost: COST,
    stopReason: 'end_turn',
    messageId: 'm1',
    conversationId: 'c1',
    error: null,
  })
  assert.equal(stream.text, TEXT)
  assert.equal(stream.streamId, START.streamId)
  assert.equal(stream.model, START.model)
  assert.equal(stream.lastEventId, 7)
  assert.equal(stream.finished, true)

  const request = relay.requests.at(-1)
  assert.equal(request.path, '/api/command-center/message')
  assert.equal(request.headers.accept, 'text/event-stream')
  assert.equal(request.headers['content-type'], 'application/json')
  assert.deepEqual(JSON.parse(request.body), { message: 'hi', agentId: 'helper', conversationId: 'c1' })
})

test('sse stream gives the same events when the body is split at every byte position', async () => {
  const client = sseClient()
  for (let at = 1; at < RECORDED_BYTES.length; at++) {
    const stream = client.send(`split:${at}`)
    const heard = collect(stream)
    const result = await stream.done
    assert.equal(result.text, TEXT, `split at ${at}`)
    assert.deepEqual((await heard.finished).iterated, RECORDED_EVENTS, `split at ${at}`)
  }
})

/** A fetch that answers with these bytes, one network chunk per byte. */
const fetchByteByByte = (bytes) => async () =>
  new Response(
    new ReadableStream({
      start(controller) {
        for (const byte of bytes) controller.enqueue(Uint8Array.of(byte))
        controller.close()
      },
    }),
    { headers: { 'Content-Type': 'text/event-stream' } },
  )

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
  const stream = sseClient().send('bad')
  const heard = collect(stream)
  const result = await stream.done
  const error = { code: 'invalid_request', message: 'message must not be empty', retryable: false }
  assert.deepEqual(result.error, error)
  assert.deepEqual((await heard.finished).iterated, [{ event: 'error', id: null, data: error }])
  assert.deepEqual(heard.listeners, [{ event: 'error', data: error }])
})

test('a 429 body is a retryable error that keeps retryAfter', async () => {
  const { error } = await sseClient().send('limit').done
  assert.deepEqual(error, { code: 'rate_limited', message: 'slow down', retryable: true, retryAfter: 3 })
})

test('with reconnect off (maxAttempts 0), a body that ends before done is a retryable network_error', async () => {
  const stream = createClient({ baseUrl: relay.baseUrl, transport: 'sse', reconnect: { maxAttempts: 0 } }).send('drop:2')
  const heard = collect(stream)
  const result = await stream.done
  assert.equal(result.error.code, 'network_error')
  assert.equal(result.error.retryable, true)
  assert.equal(stream.state, 'error')
  const names = (await heard.finished).iterated.map((m) => m.event)
  assert.deepEqual(names, ['start', 'thinking', 'error'])
  assert.equal(relay.requests.at(-1).method, 'POST', 'no resume was tried')
})

test('a server error event ends the stream with its code and message', async () => {
  const stream = sseClient().send('fail')
  const result = await stream.done
  assert.deepEqual(result.error, { code: 'overloaded', message: 'Overloaded', retryable: true, messageId: 'm2' })
  assert.equal(result.messageId, 'm2')
  assert.equal(result.text, 'Hel')
  assert.equal(stream.lastEventId, 3)
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
  const stream = sseClient().send('dupes')
  const heard = collect(stream)
  const result = await stream.done
  assert.equal(result.text, 'ab')
  const ids = (await heard.finished).iterated.map((m) => m.id)
  assert.deepEqual(ids, [1, 2, 3, 4])
})

test('cancel before start waits for the stream id, then posts to the cancel endpoint', async () => {
  const stream = sseClient().send('hang')
  stream.cancel()
  const result = await stream.done
  assert.equal(result.stopReason, 'cancelled')
  assert.equal(result.text, 'Hel')
  assert.equal(result.error, null)
  assert.deepEqual(relay.cancels.slice(-1), ['s1'])
  assert.equal(relay.requests.at(-1).path, '/api/command-center/streams/s1/cancel')
})

test('a listener can iterate late and still sees every event', async () => {
  const stream = sseClient().send('hi')
  await stream.done
  const seen = []
  for await (const message of stream) seen.push(message)
  assert.deepEqual(seen, RECORDED_EVENTS)
})

const esClient = () => createClient({ baseUrl: relay.baseUrl, transport: 'eventsource', EventSource: FetchEventSource })

test('eventsource transport posts for a stream id, then reads GET /streams/{id}', async () => {
  const client = esClient()
  const stream = client.send('hi')
  assert.equal(client.transport, 'eventsource')
  const heard = collect(stream)
  const result = await stream.done
  assert.equal(result.text, TEXT)
  assert.deepEqual(result.cost, COST)
  assert.match(stream.streamId, /^es\d+$/)
  const source = FetchEventSource.instances.at(-1)
  assert.equal(source.url, `${relay.baseUrl}/api/command-center/streams/${stream.streamId}`)
  assert.equal(source.readyState, 2, 'closed after done, so it does not reconnect')
  const post = relay.requests.findLast((r) => r.method === 'POST')
  assert.equal(post.headers.accept, 'application/json')
  const ids = (await heard.finished).iterated.map((m) => m.id)
  assert.deepEqual(ids, [1, 2, 3, 4, 5, 6, 7])
  assert.deepEqual(heard.iterated.at(-1).data, DONE)
})

test('eventsource transport resumes after a dropped connection without repeating events', async () => {
  const stream = esClient().send('drop')
  const heard = collect(stream)
  const result = await stream.done
  assert.equal(result.text, TEXT)
  const ids = (await heard.finished).iterated.map((m) => m.id)
  assert.deepEqual(ids, [1, 2, 3, 4, 5, 6, 7])
  // The client reconnects itself, from its own last id: an EventSource cannot set the header.
  const gets = relay.requests.filter((r) => r.method === 'GET' && r.path.endsWith(stream.streamId))
  assert.deepEqual(gets.map((r) => r.query), ['', '?lastEventId=2'])
})

test('eventsource transport turns a 4xx on the POST into an error event', async () => {
  const { error } = await esClient().send('bad').done
  assert.equal(error.code, 'invalid_request')
  assert.equal(error.message, 'message must not be empty')
})

test('eventsource transport cancels through the cancel endpoint', async () => {
  const stream = esClient().send('hang')
  stream.cancel()
  const result = await stream.done
  assert.equal(result.stopReason, 'cancelled')
  assert.equal(relay.cancels.at(-1), stream.streamId)
})
