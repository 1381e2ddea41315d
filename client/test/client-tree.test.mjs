// Conversations as trees through the client: edit (send with parentMessageId), regenerate and continue on
// every transport, each the same stream object as a send (resumed, and falling back to SSE, as a send is),
// and the REST helpers, whose errors carry the HTTP status and the server's code. Against real relays
// (harness.mjs) through the recording TCP proxy.

import assert from 'node:assert/strict'
import { after, before, test as nodeTest } from 'node:test'

import { WebSocket as UndiciWebSocket } from 'undici'

import { createClient } from '../deltarelay.js'
import { FetchEventSource, MESSAGE_PATH, collect, logOf, startProxy, startServer } from './harness.mjs'

// The timeout only guards against a hang: nothing here waits on a clock.
const test = (name, fn) => nodeTest(name, { timeout: 30_000 }, fn)
const Socket = globalThis.WebSocket ?? UndiciWebSocket

// server: answers at once. slow: 40 words 50 ms apart, still running when a test cancels it or asks again.
let server, relay, slow, slowRelay
before(async () => {
  ;[server, slow] = await Promise.all([
    startServer(),
    startServer({ env: { RELAY_OFFLINE_DELAY_MS: '50', RELAY_OFFLINE_WORDS: '40' } }),
  ])
  ;[relay, slowRelay] = await Promise.all([startProxy(server.port), startProxy(slow.port)])
})
after(async () => {
  await Promise.all([relay?.close(), slowRelay?.close()])
  await Promise.all([server?.close(), slow?.close()])
})

const FAST = { baseMs: 1, maxMs: 4 }
const TRANSPORTS = {
  websocket: (proxy) => createClient({ baseUrl: proxy.url, transport: 'websocket', WebSocket: Socket, reconnect: FAST }),
  sse: (proxy) => createClient({ baseUrl: proxy.url, transport: 'sse', reconnect: FAST }),
  eventsource: (proxy) =>
    createClient({ baseUrl: proxy.url, transport: 'eventsource', EventSource: FetchEventSource, reconnect: FAST }),
}
const text = (events) => events.filter((e) => e.event === 'chunk').map((e) => e.data.text).join('')
const isPost = (r) => r.method === 'POST' && r.path === MESSAGE_PATH
const isUpgrade = (r) => r.headers.upgrade === 'websocket'
const cutAfter = (n) => ({
  sse: (e) => (e.id === n ? { inject: e.text, then: 'cut' } : e.id > n ? 'cut' : undefined),
  ws: (f) => (f.id === n ? { inject: JSON.stringify(f), then: 'cut' } : f.id > n ? 'cut' : undefined),
})

/** What the client sent for its latest command: the WebSocket frame, or the POST body, without requestId. */
function lastCommand(proxy, transport) {
  if (transport === 'websocket') {
    const { requestId, ...frame } = proxy.frames.findLast((f) => f.type !== 'auth')
    return frame
  }
  return JSON.parse(proxy.requests.findLast(isPost).body)
}

/** A finished answer in a new conversation: { conversationId, userMessageId, answerId }. */
async function conversationWith(client, message) {
  const result = await client.send(message).done
  assert.equal(result.error, null)
  const { messages } = await client.getMessages(result.conversationId)
  return { conversationId: result.conversationId, userMessageId: messages.at(-2).id, answerId: result.messageId }
}

/** A stream heard to its end, checked against the server's own log of it: what a send guarantees. */
async function wholeStream(stream, url = server.url) {
  const heard = collect(stream)
  const result = await stream.done
  assert.equal(result.error, null, JSON.stringify(result.error))
  const log = await logOf(url, stream.streamId)
  assert.deepEqual((await heard.finished).iterated, log)
  assert.equal(result.text, text(log))
  return { result, log, start: log[0].data }
}

for (const [transport, make] of Object.entries(TRANSPORTS)) {
  test(`${transport}: an edit is a send with parentMessageId, beside the message it replaces`, async () => {
    const client = make(relay)
    const first = await conversationWith(client, 'first question')
    const second = await client.send('second question', { conversationId: first.conversationId }).done

    const edit = client.send('second question, edited', { conversationId: first.conversationId, parentMessageId: first.answerId })
    const { result, start } = await wholeStream(edit)
    assert.deepEqual(lastCommand(relay, transport), {
      ...(transport === 'websocket' ? { type: 'message' } : {}),
      message: 'second question, edited', conversationId: first.conversationId, parentMessageId: first.answerId,
    })
    assert.equal(start.messageId, result.messageId)
    assert.equal(edit.userMessageId, start.userMessageId)
    assert.equal(edit.parentId, start.userMessageId)

    const { messages, activeLeafId } = await client.getMessages(first.conversationId)
    const edited = messages.find((m) => m.id === edit.userMessageId)
    const replaced = messages.find((m) => m.content === 'second question')
    assert.equal(edited.parentId, first.answerId)
    assert.equal(replaced.parentId, first.answerId)
    assert.deepEqual([replaced.siblingIndex, edited.siblingIndex, edited.siblingCount], [0, 1, 2])
    assert.equal(activeLeafId, result.messageId)
    assert.notEqual(second.messageId, result.messageId)
    client.close()
  })

  test(`${transport}: parentMessageId null starts a new first message`, async () => {
    const client = make(relay)
    const first = await conversationWith(client, 'a root')
    const root = client.send('another root', { conversationId: first.conversationId, parentMessageId: null })
    await wholeStream(root)
    assert.equal(lastCommand(relay, transport).parentMessageId, null, 'null is sent, not left out')
    const { messages } = await client.getMessages(first.conversationId)
    const roots = messages.filter((m) => m.parentId === null)
    assert.deepEqual(roots.map((m) => [m.content, m.siblingIndex, m.siblingCount]), [['a root', 0, 2], ['another root', 1, 2]])
    client.close()
  })

  test(`${transport}: regenerate streams a new answer beside the old one, to the same user message`, async () => {
    const client = make(relay)
    const first = await conversationWith(client, 'say it again')
    const again = client.regenerate(first.answerId)
    assert.equal(again.messageId, null, 'a regenerated answer is a new message: its id comes with start')
    const { result, start } = await wholeStream(again)
    assert.deepEqual(lastCommand(relay, transport),
      transport === 'websocket' ? { type: 'regenerate', messageId: first.answerId } : { regenerate: first.answerId })
    assert.notEqual(result.messageId, first.answerId)
    assert.equal(start.userMessageId, first.userMessageId)
    assert.equal(again.parentId, first.userMessageId)
    assert.equal(result.conversationId, first.conversationId)

    const { messages, activeLeafId } = await client.getMessages(first.conversationId)
    const answers = messages.filter((m) => m.parentId === first.userMessageId)
    assert.deepEqual(answers.map((m) => [m.id, m.siblingIndex, m.siblingCount]),
      [[first.answerId, 0, 2], [result.messageId, 1, 2]])
    assert.equal(activeLeafId, result.messageId)
    assert.equal(answers[1].content, result.text)
    client.close()
  })

  test(`${transport}: continue appends to a cancelled answer, its chunks only the new text`, async () => {
    const client = make(slowRelay)
    const stream = client.send('stop me early')
    await new Promise((resolve) => stream.on('chunk', resolve))
    stream.cancel()
    const cut = await stream.done
    assert.equal(cut.stopReason, 'cancelled')

    const more = client.continue(cut.messageId)
    assert.equal(more.messageId, cut.messageId, 'a continue knows its answer from the outset')
    const { result, start, log } = await wholeStream(more, slow.url)
    assert.deepEqual(lastCommand(slowRelay, transport),
      transport === 'websocket' ? { type: 'continue', messageId: cut.messageId } : { continue: cut.messageId })
    assert.equal(start.messageId, cut.messageId)
    assert.equal(result.messageId, cut.messageId)
    assert.equal(log.filter((e) => e.event === 'done').length, 1)
    assert.ok(result.text.length > 0)

    const { messages } = await client.getMessages(cut.conversationId)
    const answer = messages.find((m) => m.id === cut.messageId)
    assert.equal(answer.content, cut.text + result.text)
    assert.equal(messages.filter((m) => m.role === 'assistant').length, 1, 'no new message')
    client.close()
  })

  test(`${transport}: continue of a finished answer, and a regenerate of an unknown one, end with the server's error`, async () => {
    const client = make(relay)
    const first = await conversationWith(client, 'complete already')
    const refused = await client.continue(first.answerId).done
    assert.equal(refused.error.code, 'not_continuable')
    assert.equal(refused.error.retryable, false)
    const unknown = await client.regenerate('no-such-message').done
    assert.equal(unknown.error.code, 'not_found')
    client.close()
  })

  test(`${transport}: a regenerate while the conversation is answering is refused as busy, with the running stream`, async () => {
    const client = make(slowRelay)
    const first = await conversationWith(client, 'first')
    const running = client.send('a long one', { conversationId: first.conversationId })
    await new Promise((resolve) => running.on('start', resolve))
    const busy = await client.regenerate(first.answerId).done
    assert.equal(busy.error.code, 'busy')
    assert.equal(busy.error.streamId, running.streamId)
    running.cancel()
    await running.done
    client.close()
  })
}

test('websocket: a regenerate whose socket drops mid-answer resumes where it was', async () => {
  const first = await conversationWith(TRANSPORTS.sse(relay), 'resume the regenerated one')
  relay.plan(isUpgrade, cutAfter(4)) // the new client's first socket
  const client = TRANSPORTS.websocket(relay)
  const again = client.regenerate(first.answerId)
  const reconnected = new Promise((resolve) => again.on('reconnected', resolve))
  const { result } = await wholeStream(again)
  await reconnected
  assert.equal(relay.frames.findLast((f) => f.type === 'resume')?.streamId, again.streamId)
  assert.notEqual(result.messageId, first.answerId)
  client.close()
})

test('sse: a continue whose body ends mid-answer resumes from its Last-Event-ID', async () => {
  const client = TRANSPORTS.sse(slowRelay)
  const stream = client.send('stop, then continue')
  await new Promise((resolve) => stream.on('chunk', resolve))
  stream.cancel()
  const cut = await stream.done
  slowRelay.plan(isPost, cutAfter(3))
  const more = client.continue(cut.messageId)
  const { result } = await wholeStream(more, slow.url)
  const resumed = slowRelay.requests.findLast((r) => r.method === 'GET' && r.path.includes(more.streamId))
  assert.equal(resumed.headers['last-event-id'], '3')
  const { messages } = await client.getMessages(cut.conversationId)
  assert.equal(messages.find((m) => m.id === cut.messageId).content, cut.text + result.text)
  client.close()
})

test('auto: a regenerate falls back to SSE when the socket cannot open, and posts the same command', async () => {
  const client = TRANSPORTS.sse(relay)
  const first = await conversationWith(client, 'fall back')
  relay.plan(isUpgrade, { refuse: true })
  const auto = createClient({ baseUrl: relay.url, WebSocket: Socket })
  const again = auto.regenerate(first.answerId)
  assert.equal(again.transport, 'websocket')
  const { result } = await wholeStream(again)
  assert.equal(again.transport, 'sse')
  assert.deepEqual(JSON.parse(relay.requests.findLast(isPost).body), { regenerate: first.answerId })
  assert.notEqual(result.messageId, first.answerId)
  auto.close()
  client.close()
})

// ---- REST helpers ------------------------------------------------------------------------

test('the REST helpers list, page, search, switch branches, rename and delete', async () => {
  const own = await startServer()
  const client = createClient({ baseUrl: own.url, transport: 'sse' })
  try {
    const made = []
    for (const title of ['Apples and pears', 'Bananas', 'Cherry apples']) made.push(await conversationWith(client, title))

    const page1 = await client.listConversations({ limit: 2 })
    assert.deepEqual(page1.conversations.map((c) => c.id), [made[2].conversationId, made[1].conversationId])
    assert.ok(page1.nextBefore)
    const page2 = await client.listConversations({ limit: 2, before: page1.nextBefore })
    assert.deepEqual(page2.conversations.map((c) => c.id), [made[0].conversationId])
    assert.equal(page2.nextBefore, null)
    const found = await client.listConversations({ q: 'APPLES' })
    assert.deepEqual(found.conversations.map((c) => c.title), ['Cherry apples', 'Apples and pears'])

    // Two answers to one message; the active leaf moves between them.
    const { conversationId, answerId } = made[0]
    const again = await client.regenerate(answerId).done
    const active = await client.getMessages(conversationId, { path: 'active' })
    assert.deepEqual(active.messages.map((m) => m.role), ['user', 'assistant'])
    assert.equal(active.activeLeafId, again.messageId)
    const switched = await client.setActiveLeaf(conversationId, answerId)
    assert.equal(switched.activeLeafId, answerId)
    assert.deepEqual(switched.messages.map((m) => m.id), [made[0].userMessageId, answerId])
    assert.equal(switched.conversation.activeLeafId, answerId)

    const renamed = await client.renameConversation(conversationId, '  Fruit  ')
    assert.equal(renamed.title, 'Fruit')
    const deleted = await client.deleteConversation(conversationId)
    assert.deepEqual(deleted, { id: conversationId, deleted: true, cancelledStreamIds: [] })
    assert.deepEqual((await client.listConversations()).conversations.map((c) => c.id),
      [made[2].conversationId, made[1].conversationId])
  } finally {
    client.close()
    await own.close()
  }
})

test('a REST helper throws an Error with the HTTP status and the server code', async () => {
  const client = createClient({ baseUrl: relay.url, transport: 'sse' })
  const { conversationId } = await conversationWith(client, 'errors')
  const refused = async (call, status, code) => {
    const error = await call().then(() => assert.fail('resolved'), (e) => e)
    assert.ok(error instanceof Error)
    assert.deepEqual([error.status, error.code, typeof error.message], [status, code, 'string'])
  }
  await refused(() => client.setActiveLeaf(conversationId, 'no-such-message'), 404, 'not_found')
  await refused(() => client.renameConversation(conversationId, '   '), 400, 'invalid_request')
  await refused(() => client.renameConversation(conversationId, 'x'.repeat(201)), 400, 'invalid_request')
  await refused(() => client.getMessages('no-such-conversation'), 404, 'not_found')
  await client.deleteConversation(conversationId)
  await refused(() => client.getMessages(conversationId), 404, 'not_found')
  await refused(() => client.deleteConversation(conversationId), 404, 'not_found')

  const nowhere = createClient({ baseUrl: 'http://127.0.0.1:1', transport: 'sse' })
  await refused(() => nowhere.listConversations(), 0, 'network_error')
  client.close()
})
