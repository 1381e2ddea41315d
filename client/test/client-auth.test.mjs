// createClient({ getToken }) against a real relay that takes HS256 JWTs (RELAY_JWT_SECRET, no leeway), through
// the harness's proxy: the token on each transport, refresh ahead of exp on an open socket, one new token per
// refusal, a stream resumed exactly after re-authentication, and a connection cut during a refresh.

import assert from 'node:assert/strict'
import { createHmac } from 'node:crypto'
import { after, afterEach, before, beforeEach, test as nodeTest } from 'node:test'

import { WebSocket as UndiciWebSocket } from 'undici'

import { createClient as create } from '../deltarelay.js'
import { FetchEventSource, MESSAGE_PATH, collect, logOf, startProxy, startServer } from './harness.mjs'

const test = (name, fn) => nodeTest(name, { timeout: 30_000 }, fn)

const SECRET = 'client-auth-tests-secret-of-at-least-32-bytes'
const JWT_ENV = { RELAY_JWT_SECRET: SECRET, RELAY_JWT_LEEWAY_SECONDS: '0' }

/** An HS256 JWT (a test helper: the client never signs anything). `life`: seconds from now to exp. */
function mint({ life = 600, sub = 'alice', secret = SECRET, ...claims } = {}) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url')
  const now = Math.floor(Date.now() / 1000)
  const signed = `${part({ alg: 'HS256', typ: 'JWT' })}.${part({ sub, name: 'Alice', iat: now, exp: now + life, ...claims })}`
  return `${signed}.${createHmac('sha256', secret).update(signed).digest('base64url')}`
}

/** A getToken that hands out `tokens()` and counts its calls (`.calls`, `.tokens`). */
function tokenSource(next = () => mint()) {
  const source = async () => {
    source.calls++
    const token = await next(source.calls)
    source.tokens.push(token)
    return token
  }
  source.calls = 0
  source.tokens = []
  return source
}

class Socket extends (globalThis.WebSocket ?? UndiciWebSocket) {
  static instances = []
  constructor(url) {
    super(url)
    Socket.instances.push(this)
  }
}

let server, relay, slow, slowRelay
before(async () => {
  ;[server, slow] = await Promise.all([
    startServer({ env: JWT_ENV }),
    // About 6 s per answer: longer than the short tokens below live.
    startServer({ env: { ...JWT_ENV, RELAY_OFFLINE_DELAY_MS: '100', RELAY_OFFLINE_WORDS: '60' } }),
  ])
  ;[relay, slowRelay] = await Promise.all([startProxy(server.port), startProxy(slow.port)])
})
after(async () => {
  await Promise.all([relay?.close(), slowRelay?.close()])
  await Promise.all([server?.close(), slow?.close()])
})
beforeEach(() => (Socket.instances.length = 0))
// Every client is closed after its test: an open socket goes on refreshing its token, and its frames would
// count in the next test's.
const clients = []
const createClient = (options) => {
  const client = create(options)
  clients.push(client)
  return client
}
afterEach(() => {
  for (const client of clients.splice(0)) client.close()
})

const FAST = { baseMs: 20, maxMs: 100 }
const wsClient = (getToken, proxy = relay, options = {}) =>
  createClient({ baseUrl: proxy.url, transport: 'websocket', WebSocket: Socket, getToken, reconnect: FAST, ...options })
const sseClient = (getToken, proxy = relay) => createClient({ baseUrl: proxy.url, transport: 'sse', getToken, reconnect: FAST })
const bearer = () => ({ Authorization: 'Bearer ' + mint() })
const text = (events) => events.filter((e) => e.event === 'chunk').map((e) => e.data.text).join('')
const isPost = (r) => r.method === 'POST' && r.path === MESSAGE_PATH
const isUpgrade = (r) => r.headers.upgrade === 'websocket'
const framesSince = (proxy, start) => proxy.frames.slice(start)
const authFrames = (frames) => frames.filter((f) => f.type === 'auth')

/** The stream heard exactly the server's log: every event once, in order, no gap. */
async function assertExact(stream, heard, srv = server) {
  const result = await stream.done
  const log = await logOf(srv.url, stream.streamId, bearer())
  assert.equal(result.error, null, JSON.stringify(result.error))
  assert.equal(result.text, text(log))
  assert.deepEqual((await heard.finished).iterated, log)
  return log
}

test('without credentials the relay refuses: the client surfaces its 401', async () => {
  const stream = sseClient(undefined).send('who am I')
  const { error } = await stream.done
  assert.equal(error.code, 'unauthorized')
})

test('websocket: getToken before the socket, its token the first frame, the message after authenticated', async () => {
  const start = relay.frames.length
  const getToken = tokenSource()
  const client = wsClient(getToken)
  const stream = client.send('hello with a token')
  const heard = collect(stream)
  await assertExact(stream, heard)
  const frames = framesSince(relay, start)
  assert.equal(getToken.calls, 1)
  assert.deepEqual(frames[0], { type: 'auth', token: getToken.tokens[0] })
  assert.equal(frames[1].type, 'message')
  assert.equal(Socket.instances.length, 1)
  // A second stream on the same socket needs no new token.
  const second = client.send('again')
  await assertExact(second, collect(second))
  assert.equal(getToken.calls, 1)
  assert.equal(authFrames(framesSince(relay, start)).length, 1)
  client.close()
})

test('sse: getToken before the POST, the token as Authorization: Bearer', async () => {
  const start = relay.requests.length
  const getToken = tokenSource()
  const stream = sseClient(getToken).send('hello over sse')
  await assertExact(stream, collect(stream))
  const posts = relay.requests.slice(start).filter(isPost)
  assert.equal(getToken.calls, 1)
  assert.equal(posts.length, 1)
  assert.equal(posts[0].headers.authorization, 'Bearer ' + getToken.tokens[0])
})

test('sse: a 401 token_expired gets exactly one new token and one retry', async () => {
  const start = relay.requests.length
  const getToken = tokenSource((n) => (n === 1 ? mint({ life: -5 }) : mint()))
  const stream = sseClient(getToken).send('expired first')
  await assertExact(stream, collect(stream))
  const posts = relay.requests.slice(start).filter(isPost)
  assert.equal(getToken.calls, 2)
  assert.deepEqual(posts.map((r) => r.headers.authorization), getToken.tokens.map((t) => 'Bearer ' + t))
})

test('websocket: a refused first token gets exactly one new token, and the message goes on a new socket', async () => {
  const start = relay.frames.length
  const getToken = tokenSource((n) => (n === 1 ? mint({ life: -5 }) : mint()))
  const stream = wsClient(getToken).send('expired socket token')
  await assertExact(stream, collect(stream))
  const frames = framesSince(relay, start)
  assert.equal(getToken.calls, 2)
  assert.deepEqual(authFrames(frames).map((f) => f.token), getToken.tokens)
  assert.equal(frames.filter((f) => f.type === 'message').length, 1) // sent once, after the good token
  assert.equal(Socket.instances.length, 2)
})

test('sse: a getToken that keeps returning bad tokens ends in one unauthorized error, no loop', async () => {
  const start = relay.requests.length
  const getToken = tokenSource(() => mint({ secret: 'another-secret-another-secret-another' }))
  const stream = sseClient(getToken).send('bad signature')
  const heard = collect(stream)
  const { error } = await stream.done
  assert.equal(error.code, 'unauthorized')
  assert.equal(error.retryable, false)
  assert.equal(getToken.calls, 2)
  assert.equal(relay.requests.slice(start).filter(isPost).length, 2)
  assert.deepEqual((await heard.finished).iterated.map((m) => m.event), ['error'])
})

test('websocket: a getToken that keeps returning bad tokens ends in one unauthorized error, no loop', async () => {
  const start = relay.frames.length
  const getToken = tokenSource(() => 'not.a.jwt')
  const stream = wsClient(getToken).send('garbage token')
  const heard = collect(stream)
  const { error } = await stream.done
  assert.equal(error.code, 'unauthorized')
  assert.equal(getToken.calls, 2)
  assert.equal(authFrames(framesSince(relay, start)).length, 2)
  assert.equal(framesSince(relay, start).filter((f) => f.type === 'message').length, 0)
  assert.deepEqual((await heard.finished).iterated.map((m) => m.event), ['error'])
  await new Promise((resolve) => setTimeout(resolve, 300))
  assert.equal(getToken.calls, 2) // and nothing more afterwards
})

test('websocket: a short-lived token is refreshed ahead of exp on the open socket', async () => {
  const start = slowRelay.frames.length
  const asked = []
  const getToken = tokenSource(() => (asked.push(Date.now()), mint({ life: 3 })))
  const stream = wsClient(getToken, slowRelay).send('outlive my token')
  const heard = collect(stream)
  await assertExact(stream, heard, slow)
  // The rule: exp - min(30 s, max(1 s, 10% of 3 s), 1.5 s) = a second before each exp (a timer's lateness allowed).
  const exps = getToken.tokens.map((t) => JSON.parse(Buffer.from(t.split('.')[1], 'base64url')).exp * 1000)
  for (let n = 1; n < asked.length; n++) {
    const early = exps[n - 1] - asked[n]
    assert.ok(early > 600 && early < 1050, `token ${n + 1} asked for ${early} ms before the previous one's exp`)
  }
  const auth = authFrames(framesSince(slowRelay, start))
  // About 6 s of answer on 2-3 s tokens, each refreshed a second before its exp: one socket throughout.
  assert.ok(getToken.calls >= 3, `getToken called ${getToken.calls} times`)
  assert.deepEqual(auth.map((f) => f.token), getToken.tokens)
  assert.equal(Socket.instances.length, 1)
  assert.equal(stream.state, 'done')
})

test('websocket: at exp without a new token the socket closes; re-authenticated, the stream resumes exactly', async () => {
  const start = slowRelay.frames.length
  let firstExp = 0
  // The app's token endpoint is down from the refresh on, until after the first token expired.
  const getToken = tokenSource((n) => {
    if (n === 1) {
      const token = mint({ life: 2 })
      firstExp = JSON.parse(Buffer.from(token.split('.')[1], 'base64url')).exp * 1000
      return token
    }
    if (Date.now() < firstExp + 500) throw new Error('token endpoint unreachable')
    return mint()
  })
  const stream = wsClient(getToken, slowRelay).send('expire mid-answer')
  const heard = collect(stream)
  const log = await assertExact(stream, heard, slow)
  const frames = framesSince(slowRelay, start)
  const resume = frames.find((f) => f.type === 'resume')
  assert.ok(resume, 'resumed on a new socket')
  assert.ok(resume.lastEventId > 1 && resume.lastEventId < log.length, `resumed from ${resume.lastEventId}`)
  assert.ok(Socket.instances.length >= 2) // and more while getToken still fails
  assert.equal(frames.filter((f) => f.type === 'message').length, 1)
  // The new socket's first frame is a new token's auth.
  const good = getToken.tokens.at(-1)
  assert.deepEqual(frames[frames.indexOf(resume) - 1], { type: 'auth', token: good })
})

test('websocket: the connection cut during a refresh recovers, with the refreshed token, exactly', async () => {
  const start = slowRelay.frames.length
  const getToken = tokenSource((n) => mint({ life: n === 1 ? 3 : 600 }))
  let authenticated = 0
  // The answer to the refresh's auth frame never arrives: the network goes there.
  slowRelay.plan(isUpgrade, { ws: (f) => (f.event === 'authenticated' && ++authenticated === 2 ? 'cut' : undefined) })
  const stream = wsClient(getToken, slowRelay).send('cut my refresh')
  const heard = collect(stream)
  const seen = []
  stream.on('reconnecting', () => seen.push('reconnecting'))
  stream.on('reconnected', () => seen.push('reconnected'))
  await assertExact(stream, heard, slow)
  assert.equal(authenticated, 2)
  assert.deepEqual(seen, ['reconnecting', 'reconnected'])
  assert.equal(Socket.instances.length, 2)
  assert.equal(getToken.calls, 2) // the refreshed token serves the new socket too
  const auth = authFrames(framesSince(slowRelay, start))
  assert.deepEqual(auth.map((f) => f.token), [getToken.tokens[0], getToken.tokens[1], getToken.tokens[1]])
})

test('websocket: getToken failing during a refresh is tried again, and the socket lives on', async () => {
  const start = slowRelay.frames.length
  const getToken = tokenSource((n) => {
    if (n === 2) throw new Error('token endpoint unreachable') // the first try of the refresh
    return mint({ life: n === 1 ? 4 : 600 })
  })
  const stream = wsClient(getToken, slowRelay).send('retry my refresh')
  await assertExact(stream, collect(stream), slow)
  assert.equal(getToken.calls, 3)
  assert.equal(Socket.instances.length, 1)
  assert.deepEqual(authFrames(framesSince(slowRelay, start)).map((f) => f.token), getToken.tokens)
})

test('sse: a body cut after the token expired resumes with a new token, exactly', async () => {
  const start = slowRelay.requests.length
  const getToken = tokenSource((n) => mint({ life: n === 1 ? 2 : 600 }))
  let expired = false
  setTimeout(() => (expired = true), 3000).unref()
  slowRelay.plan(isPost, { sse: (e) => (expired && e.id ? 'cut' : undefined) })
  const stream = sseClient(getToken, slowRelay).send('resume after expiry')
  await assertExact(stream, collect(stream), slow)
  const requests = slowRelay.requests.slice(start)
  const get = requests.find((r) => r.method === 'GET')
  assert.ok(get, 'resumed')
  assert.equal(get.headers.authorization, 'Bearer ' + getToken.tokens[1])
  assert.equal(getToken.calls, 2)
})

/** A fetch with one cookie jar, as a browser has for one origin, and an EventSource that uses it. */
function browserLike() {
  const jar = new Map()
  const jarFetch = async (url, init = {}) => {
    const headers = new Headers(init.headers)
    if (jar.size) headers.set('Cookie', [...jar].map(([name, value]) => `${name}=${value}`).join('; '))
    const res = await fetch(url, { ...init, headers })
    for (const line of res.headers.getSetCookie()) {
      const [pair] = line.split(';')
      jar.set(pair.slice(0, pair.indexOf('=')).trim(), pair.slice(pair.indexOf('=') + 1))
    }
    return res
  }
  return { fetch: jarFetch, EventSource: class extends FetchEventSource { static fetch = jarFetch } }
}

test('eventsource: the token goes as a session cookie (POST /api/session), then EventSource streams', async () => {
  const start = relay.requests.length
  const getToken = tokenSource()
  const browser = browserLike()
  const client = createClient({ baseUrl: relay.url, transport: 'eventsource', getToken, reconnect: FAST, ...browser })
  const stream = client.send('hello over eventsource')
  await assertExact(stream, collect(stream))
  const requests = relay.requests.slice(start)
  const [post] = requests.filter(isPost)
  const signIn = requests.find((r) => r.path === '/api/session')
  const get = requests.find((r) => r.method === 'GET' && r.path.includes(stream.streamId))
  assert.equal(getToken.calls, 1)
  assert.equal(post.headers.authorization, 'Bearer ' + getToken.tokens[0])
  assert.deepEqual(JSON.parse(signIn.body), { token: getToken.tokens[0] })
  assert.equal(get.headers.authorization, undefined) // an EventSource cannot send one: the cookie carries it
  assert.match(get.headers.cookie, /=/)
})

test('auto: a socket a proxy refuses falls back to SSE, with the same token as a bearer', async () => {
  const start = relay.requests.length
  relay.plan(isUpgrade, { refuse: true })
  const getToken = tokenSource()
  const stream = createClient({ baseUrl: relay.url, WebSocket: Socket, getToken, reconnect: FAST }).send('no sockets')
  await assertExact(stream, collect(stream))
  assert.equal(stream.transport, 'sse')
  const [post] = relay.requests.slice(start).filter(isPost)
  assert.equal(post.headers.authorization, 'Bearer ' + getToken.tokens[0])
  assert.equal(getToken.calls, 1) // a refused upgrade is not a refused token
})

test('sse: a cancel posts to the cancel endpoint with the bearer token, and the answer ends cancelled', async () => {
  const start = slowRelay.requests.length
  const getToken = tokenSource()
  const stream = sseClient(getToken, slowRelay).send('cancel me')
  stream.on('chunk', () => stream.cancel())
  const result = await stream.done
  assert.equal(result.stopReason, 'cancelled')
  const cancel = slowRelay.requests.slice(start).find((r) => r.path.endsWith('/cancel'))
  assert.equal(cancel.headers.authorization, 'Bearer ' + getToken.tokens[0])
  assert.equal(getToken.calls, 1)
})

test('the REST helpers carry the bearer token, a refused one gets one new token, and a 401 is thrown as unauthorized', async () => {
  const getToken = tokenSource(() => mint({ sub: 'rest-helper-user' })) // a user with no conversation yet
  const client = sseClient(getToken)
  const { conversationId } = await client.send('mine').done
  const page = await client.listConversations({ limit: 5 })
  assert.deepEqual(page.conversations.map((c) => c.id), [conversationId])
  const listed = relay.requests.findLast((r) => r.path === '/api/conversations')
  assert.equal(listed.headers.authorization, 'Bearer ' + getToken.tokens.at(-1))
  assert.equal((await client.renameConversation(conversationId, 'Mine')).title, 'Mine')

  // Every token is refused (signed with another secret): one new token, then the caller's error.
  const refused = tokenSource(() => mint({ secret: 'another-secret-of-at-least-thirty-two-bytes' }))
  const error = await sseClient(refused).getMessages(conversationId).then(() => assert.fail('resolved'), (e) => e)
  assert.deepEqual([error.status, error.code], [401, 'unauthorized'])
  assert.equal(refused.calls, 2)
})
