// One relay answer as a server may write it, for the tests that feed the client bytes themselves (a fetch
// that answers with them): a BOM, keepalive comments, LF, CRLF and lone-CR line ends, data split over two
// lines, multi-byte characters. deltarelay's server writes LF only; proxies and other servers need not.

export const START = { streamId: 's1', conversationId: 'c1', model: 'claude-haiku-4-5' }
export const COST = {
  inputTokens: 31,
  outputTokens: 22,
  cacheCreationInputTokens: 0,
  cacheReadInputTokens: 0,
  totalCost: 0.00001395,
  model: 'claude-haiku-4-5',
}
export const DONE = { conversationId: 'c1', messageId: 'm1', stopReason: 'end_turn' }
export const TEXT = 'Hello 🙂 line\u2028sep naïve 我現在'

export const RECORDED = [
  '\uFEFF: keepalive\n\n',
  `id: 1\nevent: start\ndata: ${JSON.stringify(START)}\n\n`,
  'id: 2\r\nevent: thinking\r\ndata: {"text":"Let me think."}\r\n\r\n',
  ': keepalive\n\n',
  'id: 3\revent: chunk\rdata: {"text":"Hello 🙂"}\r\r',
  'id: 4\nevent: chunk\ndata: {"text":\ndata: " line\u2028sep naïve"}\n\n',
  'id: 5\r\nevent: chunk\r\ndata: {"text":" 我現在"}\r\n\r\n',
  `id: 6\nevent: cost\ndata: ${JSON.stringify(COST)}\n\n`,
  `id: 7\nevent: done\ndata: ${JSON.stringify(DONE)}\n\n`,
].join('')
export const RECORDED_BYTES = Buffer.from(RECORDED)

/** The events RECORDED carries, as the async iterator yields them. */
export const RECORDED_EVENTS = [
  { event: 'start', id: 1, data: START },
  { event: 'thinking', id: 2, data: { text: 'Let me think.' } },
  { event: 'chunk', id: 3, data: { text: 'Hello 🙂' } },
  { event: 'chunk', id: 4, data: { text: ' line\u2028sep naïve' } },
  { event: 'chunk', id: 5, data: { text: ' 我現在' } },
  { event: 'cost', id: 6, data: COST },
  { event: 'done', id: 7, data: DONE },
]

export function sse(id, event, data) {
  return `id: ${id}\nevent: ${event}\ndata: ${JSON.stringify(data)}\n\n`
}

/** A fetch that answers every request with `pieces` (byte arrays), one network chunk each. */
export const fetchPieces = (pieces) => async () =>
  new Response(
    new ReadableStream({
      start(controller) {
        for (const piece of pieces) controller.enqueue(piece)
        controller.close()
      },
    }),
    { headers: { 'Content-Type': 'text/event-stream' } },
  )

/** A fetch that answers with these bytes, one network chunk per byte. */
export const fetchByteByByte = (bytes) => fetchPieces([...bytes].map((byte) => Uint8Array.of(byte)))
