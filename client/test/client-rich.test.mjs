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
