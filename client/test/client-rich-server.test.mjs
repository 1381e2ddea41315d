// The relay itself making tool calls, web searches, citations and attachment blocks (issue 19), through the
// client on each transport: the offline model answers "[tool]" with a call of the agent's first tool, which the
// relay posts to a local toolsUrl (this file's server, checking the HMAC), and "[search]" with a web search and
// citations. The attachments go up once (POST /api/attachments) and a resume sends no bytes again.

import assert from 'node:assert/strict'
import { createHmac } from 'node:crypto'
import { once } from 'node:events'
import http from 'node:http'
import { after, before, test as nodeTest } from 'node:test'
import { crc32, deflateSync } from 'node:zlib'

import { WebSocket as UndiciWebSocket } from 'undici'

import { createClient } from '../deltarelay.js'
import { FetchEventSource, collect, logOf, startProxy, startServer } from './harness.mjs'

// The timeout only guards against a hang: nothing here waits on a clock.
const test = (name, fn) => nodeTest(name, { timeout: 30_000 }, fn)
const WS = globalThis.WebSocket ?? UndiciWebSocket
const SECRET = 'tools-secret-for-client-tests'

/** A 1x1 PNG, as a browser's File would hold it. */
function png() {
  const part = (type, data) => {
    const body = Buffer.concat([Buffer.from(type), data])
    const length = Buffer.alloc(4)
    length.writeUInt32BE(data.length)
    const crc = Buffer.alloc(4)
    crc.writeUInt32BE(crc32(body))
    return Buffer.concat([length, body, crc])
  }
  const header = Buffer.from([0, 0, 0, 1, 0, 0, 0, 1, 8, 2, 0, 0, 0])
  const pixels = deflateSync(Buffer.from([0, 200, 80, 40]))
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), part('IHDR', header), part('IDAT', pixels), part('IEND', Buffer.alloc(0))])
}

let tools, calls, server, relay
before(async () => {
  calls = []
  // The app's tool endpoint: checks the signature, answers every call of get_weather.
  tools = http.createServer(async (req, res) => {
    let body = ''
    for await (const part of req) body += part
    const signature = 'sha256=' + createHmac('sha256', SECRET).update(body).digest('hex')
    if (req.headers['x-deltarelay-signature'] !== signature) return res.writeHead(401).end()
    calls.push(JSON.parse(body))
    res.writeHead(200, { 'Content-Type': 'application/json' }).end(JSON.stringify({ content: 'It is 4 °C and raining.', isError: false }))
  }).listen(0, '127.0.0.1')
  await once(tools, 'listening')
  const agents = {
    agents: [{
      id: 'researcher',
      system: 'Answer with the tools.',
      serverTools: [{ type: 'web_search', maxUses: 3 }],
      tools: [{
        name: 'get_weather',
        description: 'The weather in a city now.',
        input_schema: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
      }],
      toolsUrl: `http://127.0.0.1:${tools.address().port}/tools`,
    }],
  }
  server = await startServer({ agents, env: { RELAY_TOOLS_SECRET: SECRET } })
  relay = await startProxy(server.port)
})
after(async () => {
  await relay?.close()
  await server?.close()
  tools?.close()
})

const FAST = { baseMs: 1, maxMs: 4 }
const clients = {
  websocket: () => createClient({ baseUrl: relay.url, transport: 'websocket', WebSocket: WS, reconnect: FAST }),
  sse: () => createClient({ baseUrl: relay.url, transport: 'sse', reconnect: FAST }),
  eventsource: () => createClient({ baseUrl: relay.url, transport: 'eventsource', EventSource: FetchEventSource, reconnect: FAST }),
}
const of = (events, name) => events.filter((e) => e.event === name).map((e) => e.data)

for (const transport of Object.keys(clients)) {
  test(`${transport}: "[tool]" streams the call's input, the call, the app's result, then the answer`, async () => {
    const client = clients[transport]()
    const stream = client.send('[tool] What is the weather in Oslo?', { agentId: 'researcher' })
    const heard = collect(stream)
    const result = await stream.done
    assert.equal(result.error, null)
    const { iterated } = await heard.finished
    assert.deepEqual(iterated, await logOf(server.url, stream.streamId))
    const [use] = of(iterated, 'tool_use')
    assert.equal(use.name, 'get_weather')
    const typed = of(iterated, 'tool_input').filter((t) => t.id === use.id).map((t) => t.partialJson).join('')
    assert.deepEqual(JSON.parse(typed || '{}'), use.input)
    assert.deepEqual(of(iterated, 'tool_result'), [{ id: use.id, isError: false, content: 'It is 4 °C and raining.' }])
    assert.deepEqual(calls.at(-1).call, { id: use.id, name: 'get_weather', input: use.input })
    assert.equal(of(iterated, 'start').length, 1)
    assert.ok(result.text.length > 0, 'no answer after the tool result')
    client.close()
  })

  test(`${transport}: "[search]" streams the search, its sources and numbered citations of them`, async () => {
    const client = clients[transport]()
    const stream = client.send('[search] Who maintains deltarelay?', { agentId: 'researcher' })
    const heard = collect(stream)
    const result = await stream.done
    assert.equal(result.error, null)
    const { iterated } = await heard.finished
    assert.deepEqual(iterated, await logOf(server.url, stream.streamId))
    const [search] = of(iterated, 'search')
    assert.equal(search.name, 'web_search')
    assert.ok(search.query.length > 0)
    const [found] = of(iterated, 'search_results')
    assert.equal(found.id, search.id)
    assert.ok(found.results.length > 0)
    const citations = of(iterated, 'citation')
    assert.ok(citations.length > 0)
    assert.deepEqual(citations.map((c) => c.index), citations.map((_, i) => i + 1))
    for (const citation of citations) assert.ok(found.results.some((r) => r.url === citation.url), citation.url)
    client.close()
  })
}

test('websocket: an image goes up once; the message keeps its ref, and a resume sends no bytes again', async () => {
  const client = clients.websocket()
  const image = new File([png()], 'dot.png', { type: 'image/png' })
  const uploaded = await client.uploadAttachment(image)
  assert.match(uploaded.id, /^att_/)
  assert.deepEqual([uploaded.name, uploaded.mediaType, uploaded.size], ['dot.png', 'image/png', image.size])

  const uploadsBefore = relay.requests.filter((r) => r.path === '/api/attachments').length
  const framesBefore = relay.frames.length
  relay.plan((r) => r.headers.upgrade === 'websocket', { ws: (f) => (f.id > 2 ? 'cut' : undefined) })
  const stream = client.send('What is in this picture?', { attachments: [image, { id: uploaded.id }] })
  const heard = collect(stream)
  const result = await stream.done
  assert.equal(result.error, null)
  assert.deepEqual((await heard.finished).iterated, await logOf(server.url, stream.streamId))
  const frames = relay.frames.slice(framesBefore)
  assert.ok(frames.some((f) => f.type === 'resume'), 'the connection was never lost')
  const [sent] = frames.filter((f) => f.type === 'message')
  assert.equal(sent.attachmentIds.length, 2)
  assert.equal(sent.attachmentIds[1], uploaded.id)
  assert.ok(frames.every((f) => !('attachments' in f)))
  assert.equal(relay.requests.filter((r) => r.path === '/api/attachments').length, uploadsBefore + 1)

  const { messages } = await client.getMessages(stream.conversationId)
  const user = messages.find((m) => m.id === result.userMessageId)
  const refs = user.blocks[0].content.filter((b) => b.type === 'image')
  assert.deepEqual(refs.map((b) => b.source), sent.attachmentIds.map((id) => ({ type: 'attachment', id })))
  client.close()
})
