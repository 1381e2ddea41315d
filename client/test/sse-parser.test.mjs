// createSSEParser against the shared SSE vectors, fed the way the fetch path
// feeds it: bytes decoded by a streaming TextDecoder, in any split.

import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { test } from 'node:test'

import { createSSEParser } from '../deltarelay.js'

// The one copy of the vectors, which the Python decoder's tests (tests/test_protocol_sse.py) read too.
const { vectors } = JSON.parse(readFileSync(new URL('../../tests/data/sse-vectors.json', import.meta.url), 'utf8'))

/** Run byte chunks through decoder and parser as client/deltarelay.js does. */
function parse(byteChunks) {
  const events = []
  const parser = createSSEParser((e) => events.push(e))
  const decoder = new TextDecoder('utf-8', { ignoreBOM: true })
  for (const bytes of byteChunks) parser.feed(decoder.decode(bytes, { stream: true }))
  parser.feed(decoder.decode())
  return events
}

/** Compare as the vectors do: null event means "message"; id only where asserted. */
function normalize(events, expected) {
  return events.map((e, i) => {
    const out = { event: e.event === 'message' ? null : e.event, data: e.data }
    if (expected[i] && 'id' in expected[i]) out.id = e.id
    return out
  })
}

function* splits(bytes) {
  yield [bytes]
  yield Array.from(bytes, (b) => Uint8Array.of(b))
  for (let i = 1; i < bytes.length; i++) yield [bytes.subarray(0, i), bytes.subarray(i)]
}

const concat = (chunks) => Buffer.concat(chunks.map((c) => Buffer.from(c)))

/** The same stream with every LF turned into CRLF or a lone CR: the events must not change. */
function lineEndingVariants(bytes) {
  const variants = { original: bytes }
  if (!bytes.includes(0x0d)) {
    const text = bytes.toString('latin1') // byte-preserving
    variants.crlf = Buffer.from(text.replaceAll('\n', '\r\n'), 'latin1')
    variants.cr = Buffer.from(text.replaceAll('\n', '\r'), 'latin1')
  }
  return variants
}

for (const vector of vectors) {
  const chunks = vector.chunks_b64.map((c) => Buffer.from(c, 'base64'))

  test(`sse vector ${vector.name}: network chunks as recorded`, () => {
    const events = parse(chunks)
    assert.deepEqual(normalize(events, vector.expected), vector.expected)
  })

  for (const [ending, bytes] of Object.entries(lineEndingVariants(concat(chunks)))) {
    test(`sse vector ${vector.name} (${ending} line ends): same events whole, byte by byte and split at every position`, () => {
      for (const split of splits(bytes)) {
        const events = parse(split)
        assert.deepEqual(normalize(events, vector.expected), vector.expected, `chunks: ${split.map((c) => c.length)}`)
      }
    })
  }
}

test('parser treats a CR ending one feed and an LF starting the next as one line end', () => {
  const events = []
  const parser = createSSEParser((e) => events.push(e))
  for (const piece of ['data: a\r', '\ndata: b\r', '', '\n\r', '\n']) parser.feed(piece)
  assert.deepEqual(events, [{ event: 'message', data: 'a\nb', id: '' }])
})

test('parser splits lines on CR and LF only, never on U+2028, U+2029 or U+0085', () => {
  const events = []
  const parser = createSSEParser((e) => events.push(e))
  parser.feed('data: one\u2028two\u2029three\u0085four\u000bfive\u000csix\n\n')
  assert.deepEqual(events, [{ event: 'message', data: 'one\u2028two\u2029three\u0085four\u000bfive\u000csix', id: '' }])
})

test('parser keeps the last event id across events and reports retry', () => {
  const events = []
  const retries = []
  const parser = createSSEParser((e) => events.push(e), (ms) => retries.push(ms))
  parser.feed('retry: 1500\nretry: 1.5\nretry: x\nid: 7\nevent: chunk\ndata: {}\n\ndata: next\n\n')
  assert.deepEqual(retries, [1500])
  assert.deepEqual(events, [
    { event: 'chunk', data: '{}', id: '7' },
    { event: 'message', data: 'next', id: '7' },
  ])
})

test('parser reset forgets a half-read event and strips a BOM again', () => {
  const events = []
  const parser = createSSEParser((e) => events.push(e))
  parser.feed('\uFEFFid: 3\ndata: lost')
  parser.reset()
  parser.feed('\uFEFFdata: kept\n\n')
  assert.deepEqual(events, [{ event: 'message', data: 'kept', id: '' }])
})

test('parser drops an event that has no data field', () => {
  const events = []
  const parser = createSSEParser((e) => events.push(e))
  parser.feed('event: chunk\nid: 1\n\ndata: x\n\n')
  assert.deepEqual(events, [{ event: 'message', data: 'x', id: '1' }])
})
