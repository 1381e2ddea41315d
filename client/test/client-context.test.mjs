// The context window as the client sees it: a relay whose upstream (server.mock_upstream --context-window) holds
// only a few turns, so the relay learns its window from the first refusal, retries shorter, and leaves turns out.

import assert from 'node:assert/strict'
import { after, before, test as nodeTest } from 'node:test'

import { createClient } from '../deltarelay.js'
import { startServer } from './harness.mjs'

const test = (name, fn) => nodeTest(name, { timeout: 30_000 }, fn)

let server
before(async () => {
  server = await startServer({ upstream: ['--context-window', '300', '--words', '5'], env: { RELAY_MAX_TOKENS: '100' } })
})
after(async () => server?.close())

test('truncatedMessages and the context figures come with start, cost and done', async () => {
  // Mutation: not taking truncatedMessages from cost leaves the second answer's 0 (its start's) in the result.
  const client = createClient({ baseUrl: server.url, transport: 'sse' })
  const message = (n) => `${n} ` + 'x'.repeat(400) // 101 tokens by the emulated rule, with its 4 of overhead
  const first = await client.send(message(1), { agentId: 'helper' }).done
  assert.equal(first.error, null)
  assert.equal(first.truncatedMessages, 0)
  assert.equal(first.cost.contextWindow, 200000) // the table's, until the upstream says otherwise
  assert.equal(first.cost.contextTokens, first.cost.inputTokens)

  const conversationId = first.conversationId
  const second = client.send(message(2), { conversationId, agentId: 'helper' })
  let started
  second.on('start', (data) => (started = data.truncatedMessages))
  const result = await second.done
  assert.equal(result.error, null) // the refusal was retried, before any text
  assert.equal(started, 0)
  assert.equal(result.truncatedMessages, 2)
  assert.equal(second.truncatedMessages, 2)
  assert.equal(result.cost.contextWindow, 300) // learned from the refusal
  assert.ok(result.cost.contextTokens + 100 <= 300)

  const third = client.send(message(3), { conversationId, agentId: 'helper' })
  let thirdStart
  third.on('start', (data) => (thirdStart = data.truncatedMessages))
  const last = await third.done
  assert.equal(last.error, null)
  assert.equal(thirdStart, 4) // planned up front now
  assert.equal(last.truncatedMessages, 4)
})
