// What an app with a bundler writes: the package by name, its types from the package itself.
import { createClient, createSSEParser, type Client, type SSEEvent, type StreamResult } from 'deltarelay'

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

// Run after bundling: the bundle holds the package's code, not just its types.
console.log(JSON.stringify({ send: typeof client.send, answer: typeof answer, events }))
