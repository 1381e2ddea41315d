// What an app with a bundler writes: the package by name, its types from the package itself.
import {
  createClient, createSSEParser, type Attachment, type Client, type CitationData, type MessagesPage, type RelayError,
  type RelayStream, type SSEEvent, type StreamMessage, type StreamResult,
} from 'deltarelay'

const client: Client = createClient({ baseUrl: 'https://relay.example', transport: 'sse' })
// An app's own users: a JWT from its backend, for every request and the socket.
createClient({ getToken: async () => (await (await fetch('/token')).json()).token as string })
// @ts-expect-error: getToken returns a promise of the token, not the token
createClient({ getToken: () => 'a.jwt.token' })
// @ts-expect-error: a transport the types do not know (this line fails tsc if the types resolve to `any`)
createClient({ transport: 'carrier-pigeon' })

const events: SSEEvent[] = []
const parser = createSSEParser((event) => events.push(event))
parser.feed('id: 1\nevent: chunk\ndata: {"text": "Hel')
parser.feed('lo"}\n\n')

async function answer(text: string): Promise<string> {
  const result: StreamResult = await client.send(text).done
  return result.text
}

// Branches: edit, regenerate and continue give the stream a send gives; the REST helpers are typed. Never
// called: the bundle runs without a relay.
async function branch(conversationId: string, answerId: string): Promise<string | null> {
  const edited: RelayStream = client.send('again', { conversationId, parentMessageId: null })
  await client.regenerate(answerId).done
  const tree: MessagesPage = await client.getMessages(conversationId)
  const { messages } = await client.setActiveLeaf(conversationId, tree.messages[0].id)
  await client.renameConversation(conversationId, messages[0].content.slice(0, 80))
  const { nextBefore } = await client.listConversations({ limit: 10, q: 'fruit' })
  try {
    await client.deleteConversation(conversationId)
  } catch (error) {
    const { status, code } = error as RelayError
    return `${status} ${code}`
  }
  // @ts-expect-error: the only path the API knows is "active"
  await client.getMessages(conversationId, { path: 'all' })
  return (await client.continue(answerId).done).text + edited.userMessageId + nextBefore
}

// Tools, web search, citations and attachments: each event typed by its name. Never called either.
async function rich(file: Blob): Promise<string> {
  const uploaded: Attachment = await client.uploadAttachment(file)
  const stream = client.send('[search] and [tool]', { attachments: [file, { id: uploaded.id }, { name: 'a.png', mediaType: 'image/png', data: 'iVBORw0KGgo=' }] })
  const links: CitationData[] = []
  stream
    .on('tool_input', ({ id, partialJson }) => id + partialJson)
    .on('tool_use', ({ name, input }) => name + Object.keys(input).length)
    .on('tool_result', ({ isError, content }) => (isError ? 'failed' : typeof content === 'string' ? content : content[0].type))
    .on('citation', (citation) => links.push(citation))
    .on('search', ({ name, query }) => name + query)
    .on('search_results', ({ results, error }) => results.map((r) => r.url).join() + (error ?? ''))
  // @ts-expect-error: a tool_use's data has no partialJson
  stream.on('tool_use', ({ partialJson }) => partialJson)
  for await (const message of stream as AsyncIterable<StreamMessage>) {
    if (message.event === 'citation') return `[${message.data.index}] ${message.data.url ?? message.data.documentTitle}`
  }
  const { messages } = await client.getMessages('c1')
  const refs = messages[0].blocks?.[0].content.filter((block) => block.type === 'image') ?? []
  // @ts-expect-error: an attachment is a Blob, base64 with a name and type, or an id
  client.send('x', { attachments: ['not a file'] })
  return links.map((c) => c.index).join() + refs.length
}

// Run after bundling: the bundle holds the package's code, not just its types.
console.log(JSON.stringify({ send: typeof client.send, answer: typeof answer, events }))
