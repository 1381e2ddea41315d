// The embedding app's page: deltarelay's client with getToken, which fetches a JWT from this app's backend.
import { createClient } from '/client/deltarelay.js'

const relayUrl = document.querySelector('meta[name=relay-url]').content
const form = document.getElementById('ask')
const question = document.getElementById('question')
const answer = document.getElementById('answer')
const status = document.getElementById('status')

/** A JWT for the signed-in user, from the app's own backend (its session cookie goes along). */
async function getToken() {
  const res = await fetch('/token', { cache: 'no-store' })
  if (!res.ok) throw new Error('GET /token: HTTP ' + res.status)
  return (await res.json()).token
}

// The relay is on another origin: its WebSocket takes this page's origin (RELAY_ALLOWED_ORIGINS) and the token
// in its first frame. SSE and EventSource would need the relay behind this app's origin (no CORS).
const client = createClient({ baseUrl: relayUrl, transport: 'websocket', getToken })

form.addEventListener('submit', (event) => {
  event.preventDefault()
  const text = question.value.trim()
  if (!text) return
  answer.textContent = ''
  answer.dataset.state = 'streaming'
  status.textContent = 'Streaming…'
  const stream = client.send(text)
  stream.on('chunk', ({ text }) => answer.append(text))
  stream.on('reconnecting', () => (status.textContent = 'Reconnecting…'))
  stream.on('reconnected', () => (status.textContent = 'Streaming…'))
  stream.done.then(({ error, cost }) => {
    answer.dataset.state = error ? 'error' : 'complete'
    status.textContent = error ? `Error: ${error.code}: ${error.message}` : `Done${cost?.totalCost != null ? ` ($${cost.totalCost})` : ''}`
  })
})
