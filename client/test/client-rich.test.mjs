// Tool calls, web searches and citations through every transport, and attachments uploaded before the send.
//
// The relay here is the real server with its offline model; the proxy in front of it (harness.mjs) puts the
// new events in place of some of the answer's chunks, under the chunks' own ids, on every connection: what a
// relay whose log holds them sends. So the client's dispatch, resume and de-duplication of each new event are
// tested on WebSocket, SSE and EventSource. client-rich-server.test.mjs has the relay make them itself.

import assert from 'node:assert/strict'
import { after, before, test as nodeTest } from 'node:test'

import { WebSocket as UndiciWebSocket } from 'undici'

import { createClient } from '../deltarelay.js'
import { EVENT_NAMES, FetchEventSource, MESSAGE_PATH, collect, logOf, startProxy, startServer } from './harness.mjs'
import { fetchPieces, sse } from './recorded.mjs'

// The timeout only guards against a hang: nothing here waits on a clock.
const test = (name, fn) => nodeTest(name, { timeout: 30_000 }, fn)
const WS = globalThis.WebSocket ?? UndiciWebSocket

let server, relay
before(async () => {
  server = await startServer()
  relay = await startProxy(server.port)
})
after(async () => {
  await relay?.close()
  await server?.close()
})

// The events put in place of the chunks with ids 3, 4, ...: one of each kind, a tool call's input in two pieces,
// a failed tool, a citation of a document, and characters that are more than one byte.
const RICH = [
  { event: 'search', data: { id: 'srvtoolu_1', name: 'web_search', query: 'how relays resume 🙂' } },
  {
    event: 'search_results',
    data: { id: 'srvtoolu_1', results: [{ url: 'https://example.com/a', title: 'Resuming streams' }, { url: 'https://example.org/b', title: 'Über SSE' }] },
  },
  { event: 'citation', data: { index: 1, url: 'https://example.com/a', title: 'Resuming streams', citedText: 'from the last id' } },
  { event: 'tool_input', data: { id: 'toolu_1', partialJson: '{"ci' } },
  { event: 'tool_input', data: { id: 'toolu_1', partialJson: 'ty": "Oslo"}' } },
  { event: 'tool_use', data: { id: 'toolu_1', name: 'get_weather', input: { city: 'Oslo' } } },
  { event: 'tool_result', data: { id: 'toolu_1', isError: false, content: '4 °C, rain' } },
  { event: 'tool_use', data: { id: 'toolu_2', name: 'get_weather', input: {} } },
  { event: 'tool_result', data: { id: 'toolu_2', isError: true, content: [{ type: 'text', text: 'The tool timed out' }] } },
  { event: 'search_results', data: { id: 'srvtoolu_2', results: [], error: 'max_uses_exceeded' } },
  { event: 'citation', data: { index: 2, url: null, title: null, citedText: 'page 3', documentTitle: 'Manual.pdf' } },
]
const FIRST = 3 // the id RICH[0] takes: after start (1) and one chunk (2)
const richAt = (id) => RICH[id - FIRST]
const NEW_NAMES = ['tool_input', 'tool_use', 'tool_result', 'citation', 'search', 'search_results']

/** A proxy hook that, on SSE and on the socket, sends RICH's events instead of the chunks with their ids. */
const rewrite = {
  persistent: true,
  sse: (e) => (richAt(e.id) ? { inject: sse(e.id, richAt(e.id).event, richAt(e.id).data), then: 'drop' } : undefined),
  ws: (f) => (richAt(f.id) ? { inject: JSON.stringify({ ...f, ...richAt(f.id) }), then: 'drop' } : undefined),
}
/** ... and loses the connection right after event `n`, once. */
const rewriteAndCutAfter = (n) => ({
  sse: (e) => (e.id > n ? 'cut' : rewrite.sse(e)),
  ws: (f) => (f.id > n ? 'cut' : rewrite.ws(f)),
})
/** The server's log as the client must see it: RICH's events in place of those chunks. */
const expected = (log) => log.map((e) => (richAt(e.id) ? { ...e, ...richAt(e.id) } : e))

const FAST = { baseMs: 1, maxMs: 4 }
const clients = {
  websocket: () => createClient({ baseUrl: relay.url, transport: 'websocket', WebSocket: WS, reconnect: FAST }),
  sse: () => createClient({ baseUrl: relay.url, transport: 'sse', reconnect: FAST }),
  eventsource: () => createClient({ baseUrl: relay.url, transport: 'eventsource', EventSource: FetchEventSource, reconnect: FAST }),
}
const anyRequest = () => true
const isPost = (r) => r.method === 'POST' && r.path === MESSAGE_PATH
const isGet = (r) => r.method === 'GET' // a socket's upgrade, or an EventSource's stream

for (const transport of Object.keys(clients)) {
  test(`${transport}: every new event reaches listeners, on() callbacks and the iterator, in order, with its data`, async () => {
    const drop = relay.plan(anyRequest, rewrite)
    try {
      const client = clients[transport]()
      const stream = client.send('a long enough question for the offline model to answer in many chunks')
      const heard = collect(stream)
      const result = await stream.done
      assert.equal(result.error, null)
      const want = expected(await logOf(server.url, stream.streamId))
      const { iterated, listeners, callbacks } = await heard.finished
      assert.deepEqual(iterated, want)
      const plain = want.map(({ event, data }) => ({ event, data }))
      assert.deepEqual(listeners, plain)
      assert.deepEqual(callbacks, plain)
      for (const name of NEW_NAMES) assert.ok(iterated.some((e) => e.event === name), `no ${name} event came through`)
      assert.equal(stream.transport, transport)
      client.close()
    } finally {
      drop()
    }
  })

  // Cut in the middle of a tool call's input and right after search results: the resumed connection carries
  // on from the last id, and nothing is seen twice or lost.
  for (const [where, n] of [['mid tool input', FIRST + 3], ['after search results', FIRST + 1]]) {
    test(`${transport}: a connection lost ${where} resumes with each new event exactly once`, async () => {
      // Plans are tried in the order they were made: the first connection is cut, every one is rewritten.
      relay.plan(transport === 'sse' ? isPost : isGet, rewriteAndCutAfter(n))
      const drop = relay.plan(anyRequest, rewrite)
      try {
        const client = clients[transport]()
        const stream = client.send('a long enough question for the offline model to answer in many chunks, cut')
        let reconnected = 0
        stream.on('reconnected', () => reconnected++)
        const heard = collect(stream)
        const result = await stream.done
        assert.equal(result.error, null)
        assert.ok(reconnected >= 1, 'the connection was never lost')
        const want = expected(await logOf(server.url, stream.streamId))
        assert.deepEqual((await heard.finished).iterated, want)
        client.close()
      } finally {
        drop()
      }
    })
  }
}

// ---- Attachments: uploaded first, then only their ids go with the command ------------------------------------

/**
 * A fetch that answers POST /api/attachments itself, as the relay does ({id, name, mediaType, size}, ids att_1,
 * att_2... in the order the uploads came), and passes everything else to the real fetch. `uploads`: what each
 * upload sent (headers, and the multipart `file` part). `answer(file)`: another answer (a Response), or a promise.
 */
function uploadingFetch(answer = null) {
  const uploads = []
  const fetch = async (url, init = {}) => {
    if (!String(url).endsWith('/api/attachments')) return globalThis.fetch(url, init)
    const file = init.body.get('file')
    uploads.push({ method: init.method, headers: init.headers, file, bytes: new Uint8Array(await file.arrayBuffer()) })
    const custom = answer && (await answer(file))
    if (custom) return custom
    const body = { id: 'att_' + uploads.length, name: file.name, mediaType: file.type, size: file.size }
    return new Response(JSON.stringify(body), { status: 201, headers: { 'Content-Type': 'application/json' } })
  }
  return { fetch, uploads }
}

const PNG = Uint8Array.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13])
const PDF_BASE64 = Buffer.from('%PDF-1.4\n%âãÏÓ\n').toString('base64')

test('uploadAttachment posts the file as the multipart field "file", with the bearer token, and gives the answer', async () => {
  const { fetch, uploads } = uploadingFetch()
  const client = createClient({ baseUrl: relay.url, fetch, getToken: async () => 'a.b.c' })
  const png = new File([PNG], 'cat 🙂.png', { type: 'image/png' })
  assert.deepEqual(await client.uploadAttachment(png), { id: 'att_1', name: 'cat 🙂.png', mediaType: 'image/png', size: PNG.length })
  assert.deepEqual(await client.uploadAttachment({ name: 'manual.pdf', mediaType: 'application/pdf', data: PDF_BASE64 }),
    { id: 'att_2', name: 'manual.pdf', mediaType: 'application/pdf', size: Buffer.from(PDF_BASE64, 'base64').length })
  assert.deepEqual(uploads.map((u) => [u.method, u.headers.Authorization, u.headers['Content-Type']]),
    [['POST', 'Bearer a.b.c', undefined], ['POST', 'Bearer a.b.c', undefined]]) // fetch sets the multipart boundary
  assert.deepEqual(uploads[0].bytes, PNG)
  assert.deepEqual(Buffer.from(uploads[1].bytes), Buffer.from(PDF_BASE64, 'base64'))
  assert.equal(uploads[1].file.type, 'application/pdf')
})

test('uploadAttachment rejects with the server\'s code and the HTTP status, as the REST helpers do', async () => {
  const refusal = () => new Response(JSON.stringify({ error: { code: 'unsupported_media_type', message: 'Not an image or a PDF', retryable: false } }), { status: 415 })
  const client = createClient({ baseUrl: relay.url, fetch: uploadingFetch(refusal).fetch })
  await assert.rejects(client.uploadAttachment(new Blob(['plain text'], { type: 'image/png' })), (error) => {
    assert.ok(error instanceof Error)
    assert.deepEqual([error.status, error.code, error.message, error.retryable], [415, 'unsupported_media_type', 'Not an image or a PDF', false])
    return true
  })
})

test('websocket: send uploads each file first, then the frame carries attachmentIds in order and no bytes', async () => {
  const { fetch, uploads } = uploadingFetch()
  const client = createClient({ baseUrl: relay.url, transport: 'websocket', WebSocket: WS, fetch })
  const before = relay.frames.length
  const stream = client.send('what is in these?', {
    attachments: [new File([PNG], 'a.png', { type: 'image/png' }), { id: 'att_kept' }, { name: 'm.pdf', mediaType: 'application/pdf', data: PDF_BASE64 }],
  })
  await stream.done
  const sent = relay.frames.slice(before).filter((f) => f.type === 'message')
  assert.equal(sent.length, 1)
  assert.deepEqual(sent[0].attachmentIds, ['att_1', 'att_kept', 'att_2'])
  assert.equal(sent[0].message, 'what is in these?')
  assert.ok(!('attachments' in sent[0]), 'the frame carries the files themselves')
  assert.equal(uploads.length, 2) // {id} is not uploaded again
  client.close()
})

test('sse: the POST body carries attachmentIds, and a send without attachments carries none', async () => {
  const { fetch } = uploadingFetch()
  const client = createClient({ baseUrl: relay.url, transport: 'sse', fetch })
  const before = relay.requests.length
  await client.send('look', { attachments: [new Blob([PNG], { type: 'image/png' })] }).done
  await client.send('plain').done
  const posts = relay.requests.slice(before).filter(isPost).map((r) => JSON.parse(r.body))
  assert.deepEqual(posts.map((p) => [p.message, p.attachmentIds]), [['look', ['att_1']], ['plain', undefined]])
})

test('a failed upload ends the stream with its error, and the message is never sent', async () => {
  const tooLarge = () => new Response(JSON.stringify({ error: { code: 'too_large', message: 'The file is over 5 MB', retryable: false } }), { status: 413 })
  for (const transport of ['websocket', 'sse']) {
    const client = createClient({ baseUrl: relay.url, transport, WebSocket: WS, fetch: uploadingFetch(tooLarge).fetch })
    const [frames, requests] = [relay.frames.length, relay.requests.length]
    const stream = client.send('never sent', { attachments: [new Blob([PNG], { type: 'image/png' })] })
    const heard = collect(stream)
    const result = await stream.done
    assert.deepEqual(result.error, { code: 'too_large', message: 'The file is over 5 MB', retryable: false, status: 413 })
    assert.equal(stream.state, 'error')
    assert.deepEqual((await heard.finished).iterated, [{ event: 'error', id: null, data: result.error }])
    assert.equal(relay.frames.length, frames, transport)
    assert.equal(relay.requests.length, requests, transport)
    client.close()
  }
})

test('an attachment that is not base64 ends the stream with upload_failed, nothing sent', async () => {
  const { fetch, uploads } = uploadingFetch()
  const client = createClient({ baseUrl: relay.url, transport: 'sse', fetch })
  const requests = relay.requests.length
  const result = await client.send('bad', { attachments: [{ name: 'x.png', mediaType: 'image/png', data: '*not base64*' }] }).done
  assert.equal(result.error.code, 'upload_failed')
  assert.equal(result.error.retryable, false)
  assert.equal(uploads.length, 0)
  assert.equal(relay.requests.length, requests)
})

test('a cancel during the upload ends the stream as cancelled at once, and nothing is sent', async () => {
  let release
  const held = new Promise((resolve) => (release = resolve))
  const { fetch, uploads } = uploadingFetch(() => held.then(() => null))
  const client = createClient({ baseUrl: relay.url, transport: 'sse', fetch })
  const requests = relay.requests.length
  const stream = client.send('stop it', { conversationId: 'c_kept', attachments: [new Blob([PNG], { type: 'image/png' })] })
  while (!uploads.length) await new Promise((resolve) => setTimeout(resolve, 1))
  stream.cancel()
  const result = await stream.done
  assert.deepEqual([stream.state, result.stopReason, result.conversationId, result.error], ['cancelled', 'cancelled', 'c_kept', null])
  release()
  await new Promise((resolve) => setTimeout(resolve, 20)) // the upload's answer comes, and starts nothing
  assert.equal(relay.requests.length, requests)
})

test('the SSE parser and client keep a recorded tool call intact when fed byte by byte', async () => {
  const events = [{ event: 'start', data: { streamId: 's1', conversationId: 'c1', model: 'm' } }, ...RICH,
    { event: 'done', data: { conversationId: 'c1', messageId: 'm1', stopReason: 'end_turn' } }].map((e, i) => ({ ...e, id: i + 1 }))
  const bytes = Buffer.from(events.map((e) => sse(e.id, e.event, e.data)).join(''))
  const client = createClient({ transport: 'sse', fetch: fetchPieces([...bytes].map((byte) => Uint8Array.of(byte))) })
  const heard = collect(client.send('x'))
  assert.deepEqual((await heard.finished).iterated, events)
  assert.deepEqual(EVENT_NAMES.filter((name) => !events.some((e) => e.event === name)), ['chunk', 'thinking', 'cost', 'error'])
})
