// The real relay for the client tests: `python -m server` (the built-in offline model, or
// `python -m server.mock_upstream` as its upstream) on free ports with a SQLite file of its own, and a TCP
// proxy between client and server that records every request and WebSocket frame the client sends and can
// cut, stall, end early or add to an answer: what a network (or a server under load) does that the server
// cannot be told to do.
//
// The Python is $DELTARELAY_SERVER_PYTHON (scripts/test's installed wheel, when set) or the checkout's
// .venv/bin/python (the editable install scripts/test makes first).

import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import net from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import { createSSEParser } from '../deltarelay.js'

export const PYTHON = process.env.DELTARELAY_SERVER_PYTHON || fileURLToPath(new URL('../../.venv/bin/python', import.meta.url))
export const MESSAGE_PATH = '/api/command-center/message'
export const STREAMS_PATH = '/api/command-center/streams/'

async function freePort() {
  const server = net.createServer().listen(0, '127.0.0.1')
  await once(server, 'listening')
  const { port } = server.address()
  await new Promise((resolve) => server.close(resolve))
  return port
}

/** A child process whose output is kept, to show when it fails. */
function launch(args, env, cwd) {
  const child = spawn(PYTHON, args, { env, cwd, stdio: ['ignore', 'pipe', 'pipe'] })
  child.output = ''
  child.stdout.on('data', (data) => (child.output += data))
  child.stderr.on('data', (data) => (child.output += data))
  return child
}

/** Wait until `url` answers, or fail with the process's output. */
async function ready(child, url) {
  const deadline = Date.now() + 30_000
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`${child.spawnargs.join(' ')} exited at start:\n${child.output}`)
    try {
      await fetch(url)
      return
    } catch {
      await new Promise((resolve) => setTimeout(resolve, 50))
    }
  }
  throw new Error(`${child.spawnargs.join(' ')} did not start in 30 s:\n${child.output}`)
}

function stop(child) {
  if (child.exitCode !== null) return Promise.resolve()
  const exited = once(child, 'exit')
  child.kill('SIGTERM')
  return exited
}

/**
 * Start a relay: `python -m server` on a free port with a SQLite file in a new temp directory, an agent
 * "helper" besides the default one (or `agents`, the agents file's JSON), and RELAY_OFFLINE_DELAY_MS=0 (the offline model answers at once).
 * `env` adds or overrides settings; `upstream`: arguments for `python -m server.mock_upstream`, which is
 * then started on a free port and made the relay's Messages API. Returns { url, close() }.
 */
export async function startServer({ env = {}, upstream = null, agents = null } = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'deltarelay-client-test-'))
  const children = []
  const clean = Object.fromEntries(
    Object.entries(process.env).filter(
      ([name]) => !/^(ANTHROPIC_|RELAY_|DATABASE_URL)/.test(name) && !name.toLowerCase().endsWith('_proxy'),
    ),
  )
  const cwd = process.env.DELTARELAY_SERVER_CWD || dir // outside the checkout, for an installed wheel
  writeFileSync(join(dir, 'agents.json'), JSON.stringify(agents ?? { agents: [{ id: 'helper', system: 'Be helpful.' }] }))
  const settings = {
    DATABASE_URL: `sqlite:///${join(dir, 'relay.db')}`,
    RELAY_OFFLINE_DELAY_MS: '0',
    RELAY_AGENTS_FILE: join(dir, 'agents.json'),
    PYTHONUNBUFFERED: '1',
  }
  try {
    if (upstream) {
      const port = await freePort()
      const mock = launch(['-m', 'server.mock_upstream', '--port', '' + port, '--delay-ms', '0', ...upstream], clean, cwd)
      children.push(mock)
      await ready(mock, `http://127.0.0.1:${port}/stats`)
      Object.assign(settings, { ANTHROPIC_BASE_URL: `http://127.0.0.1:${port}`, ANTHROPIC_API_KEY: 'sk-client-tests' })
    }
    const port = await freePort()
    const relay = launch(['-m', 'server', '--port', '' + port], { ...clean, ...settings, ...env }, cwd)
    children.push(relay)
    await ready(relay, `http://127.0.0.1:${port}/healthz`)
    return {
      url: `http://127.0.0.1:${port}`,
      port,
      async close() {
        await Promise.all(children.map(stop))
        rmSync(dir, { recursive: true, force: true })
      },
    }
  } catch (error) {
    await Promise.all(children.map(stop))
    rmSync(dir, { recursive: true, force: true })
    throw error
  }
}

/**
 * A TCP proxy on a free port in front of `target` (a port on 127.0.0.1). Every HTTP request through it is
 * recorded in `requests` ({ method, path, query, headers (lower-case names), body }), and every WebSocket
 * frame the client sends, decoded, in `frames`.
 *
 * `plan(match, hook)`: the next request for which match(request) holds is answered through `hook`, once
 * (`{ persistent: true }` in the hook: every such request). `{ refuse: true }`: the proxy answers it with a
 * 403 itself; `{ hang: true }`: it is never passed on nor answered; `{ cursor: () => id }`: the server is asked
 * for the events after `id` instead of the request's Last-Event-ID. The hook sees the answer an event at a time:
 * `sse(event)` for each SSE event or comment block of a response ({ id, event, data, text }), `ws(frame)`
 * for each text frame the server sends on an upgraded connection (decoded JSON), `wsClient(frame)` for each
 * the client sends, and says what happens to it:
 *   undefined  passed on
 *   'drop'     left out
 *   'stall'    left out, and everything after it: the connection stays open and silent until the client goes
 *   'end'      left out, and the response ends there cleanly (SSE: its last chunk), as if the server ended it
 *   'cut'      left out, and both connections are destroyed: the client sees its connection lost
 *   { inject: text, then }  `text` (SSE bytes, or a WebSocket text frame's payload; or a list of them) goes out first, then
 *              `then` (one of the above) applies to the event itself
 */
export async function startProxy(target) {
  const requests = []
  const frames = []
  const plans = []
  const sockets = new Set()

  function hookFor(request) {
    const index = plans.findIndex(({ match }) => match(request))
    if (index < 0) return null
    const { hook } = plans[index]
    if (!hook.persistent) plans.splice(index, 1)
    return hook
  }

  const server = net.createServer((client) => {
    const upstream = net.connect(target, '127.0.0.1')
    sockets.add(client).add(upstream)
    client.setNoDelay(true)
    upstream.setNoDelay(true)
    const destroy = () => {
      client.destroy()
      upstream.destroy()
    }
    // A close from either side is passed on; the client's side ends gracefully, so what was written arrives.
    const cut = () => {
      upstream.destroy()
      client.end()
    }
    client.on('error', destroy).on('close', () => upstream.destroy())
    let held = false
    upstream.on('error', cut).on('close', () => held || client.end())
    const responders = [] // hooks of the requests sent, in order: HTTP/1.1 answers in order
    let upgradedHook = null

    // client -> server: forwarded as it comes, and parsed to record it
    let toServer = Buffer.alloc(0)
    let websocket = false
    client.on('data', (data) => {
      toServer = Buffer.concat([toServer, data])
      for (;;) {
        if (websocket) {
          const frame = readFrame(toServer)
          if (!frame) break
          toServer = toServer.subarray(frame.size)
          const decoded = frame.opcode === 1 ? JSON.parse(frame.payload.toString()) : null
          if (decoded) frames.push(decoded)
          const action = decoded && upgradedHook?.wsClient ? upgradedHook.wsClient(decoded) : undefined
          if (action === 'drop') continue
          upstream.write(frame.raw)
          continue
        }
        const end = toServer.indexOf('\r\n\r\n')
        if (end < 0) break
        const [line, ...lines] = toServer.subarray(0, end).toString('latin1').split('\r\n')
        const headers = {}
        for (const field of lines) {
          const colon = field.indexOf(':')
          headers[field.slice(0, colon).trim().toLowerCase()] = field.slice(colon + 1).trim()
        }
        const length = Number(headers['content-length'] || 0)
        if (toServer.length < end + 4 + length) break
        const [method, target] = line.split(' ')
        const url = new URL(target, 'http://relay')
        const body = toServer.subarray(end + 4, end + 4 + length).toString()
        const request = { method, path: url.pathname, query: url.search, headers, body }
        requests.push(request)
        const hook = hookFor(request)
        const raw = toServer.subarray(0, end + 4 + length)
        toServer = toServer.subarray(end + 4 + length)
        if (hook?.refuse) {
          // As a proxy that blocks WebSockets (or a server that refuses the request) answers.
          upstream.destroy()
          return client.end('HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n')
        }
        if (hook?.hang) {
          held = true // never passed on, never answered
          return upstream.destroy()
        }
        responders.push(hook)
        if (hook?.cursor) {
          // The server is asked for the events after another id than the client's (after a trim, say).
          const at = hook.cursor()
          const head = raw.subarray(0, end + 4).toString('latin1')
          const moved = head.replace(/(\r\nlast-event-id:)[^\r]*/i, `$1 ${at}`).replace(/([?&]lastEventId=)\d+/, `$1${at}`)
          upstream.write(Buffer.concat([Buffer.from(moved, 'latin1'), raw.subarray(end + 4)]))
        } else {
          upstream.write(raw)
        }
        if ((headers.upgrade || '').toLowerCase() === 'websocket') websocket = true
      }
    })

    // server -> client: each response decoded (chunked bodies, WebSocket frames), shown to its hook, re-sent
    let fromServer = Buffer.alloc(0)
    let response = null // { hook, mode: 'chunked' | 'length' | 'ws' | 'raw', left, events: string, stalled }
    upstream.on('data', (data) => {
      fromServer = Buffer.concat([fromServer, data])
      while (fromServer.length && !client.destroyed) {
        if (!response) {
          const end = fromServer.indexOf('\r\n\r\n')
          if (end < 0) return
          let head = fromServer.subarray(0, end + 4)
          const text = head.toString('latin1').toLowerCase()
          const status = Number(text.split(' ')[1])
          const hook = responders.shift() ?? null
          const length = /\r\ncontent-length: *(\d+)/.exec(text)
          const mode = status === 101 ? 'ws' : /\r\ntransfer-encoding: *chunked/.test(text) ? 'chunked' : length ? 'length' : 'raw'
          response = { hook, mode, left: length ? Number(length[1]) : Infinity, pending: '', stalled: false }
          if (mode === 'ws') upgradedHook = hook
          // One request per connection: an answer the proxy ended early leaves no connection to reuse.
          else head = Buffer.from(head.toString('latin1').replace(/\r\nconnection:[^\r]*/i, '').replace(/\r\n\r\n$/, '\r\nconnection: close\r\n\r\n'), 'latin1')
          client.write(head)
          fromServer = fromServer.subarray(end + 4)
          if (mode === 'length' && response.left === 0) response = null
          continue
        }
        if (response.mode === 'ws') {
          const frame = readFrame(fromServer)
          if (!frame) return
          fromServer = fromServer.subarray(frame.size)
          if (response.stalled) continue
          const decoded = frame.opcode === 1 ? JSON.parse(frame.payload.toString()) : null
          const action = decoded && response.hook?.ws ? response.hook.ws(decoded) : undefined
          apply(action, frame.raw, (text) => client.write(textFrame(text)), cut)
          continue
        }
        if (response.mode === 'chunked') {
          const end = fromServer.indexOf('\r\n')
          if (end < 0) return
          const size = parseInt(fromServer.subarray(0, end).toString(), 16)
          if (fromServer.length < end + 2 + size + 2) return
          const data = fromServer.subarray(end + 2, end + 2 + size)
          fromServer = fromServer.subarray(end + 2 + size + 2)
          if (size === 0) {
            if (!response.stalled) sendBody(response.pending, true)
            response = null
            continue
          }
          sendBody(data.toString(), false)
          continue
        }
        // content-length or raw: passed on as it is, never looked into
        const part = fromServer.subarray(0, Math.min(fromServer.length, response.left))
        fromServer = fromServer.subarray(part.length)
        response.left -= part.length
        client.write(part)
        if (response.left === 0) response = null
      }
    })

    /** SSE text of a chunked body: whole event blocks go to the hook, the rest waits for more. */
    function sendBody(text, last) {
      if (response.stalled) return
      response.pending += text
      let out = ''
      for (let end; (end = response.pending.search(/\n\n/)) >= 0; ) {
        const block = response.pending.slice(0, end + 2)
        response.pending = response.pending.slice(end + 2)
        const action = response.hook?.sse ? response.hook.sse(parseBlock(block)) : undefined
        let done = false
        apply(action, block, (injected) => (out += injected), () => (done = 'cut'), () => (done = 'end'), (kept) => (out += kept))
        if (done || response.stalled) {
          if (out) client.write(chunk(out))
          if (done === 'end') client.write('0\r\n\r\n')
          if (done) cut()
          return
        }
      }
      if (last) out += response.pending
      if (out) client.write(chunk(out))
      if (last) client.write('0\r\n\r\n')
    }

    /** Carry out a hook's action on one event (`raw`, passed on by `pass`, or written to the client). */
    function apply(action, raw, inject, cut, end = cut, pass = (bytes) => client.write(bytes)) {
      if (action && typeof action === 'object') {
        for (const text of [].concat(action.inject)) inject(text)
        action = action.then
      }
      if (action === undefined) return pass(raw)
      if (action === 'drop') return
      if (action === 'stall') return (response.stalled = true)
      if (action === 'end') return end()
      if (action === 'cut') return cut()
      throw new Error('unknown proxy action ' + action)
    }
  })

  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    requests,
    frames,
    /** The streams a cancel was posted for, in order. */
    get cancels() {
      return requests.map((r) => /^\/api\/command-center\/streams\/([^/]+)\/cancel$/.exec(r.path)?.[1]).filter(Boolean)
    },
    /** Returns a function that drops the plan (for a persistent one). */
    plan(match, hook) {
      const entry = { match, hook }
      plans.push(entry)
      return () => plans.includes(entry) && plans.splice(plans.indexOf(entry), 1)
    },
    close() {
      plans.length = 0
      for (const socket of sockets) socket.destroy()
      return new Promise((resolve) => server.close(resolve))
    },
  }
}

function chunk(text) {
  const bytes = Buffer.from(text)
  return Buffer.concat([Buffer.from(bytes.length.toString(16) + '\r\n'), bytes, Buffer.from('\r\n')])
}

/** One SSE block as the hook sees it: a comment block has no event and no id. */
function parseBlock(text) {
  let parsed = { id: null, event: null, data: null, text }
  createSSEParser((e) => {
    parsed = { id: e.id ? Number(e.id) : null, event: e.event, data: JSON.parse(e.data), text }
  }).feed(text)
  return parsed
}

/** A whole WebSocket frame at the start of `bytes` (masked or not), or null: { opcode, payload, raw, size }. */
function readFrame(bytes) {
  if (bytes.length < 2) return null
  let length = bytes[1] & 0x7f
  let offset = 2
  if (length === 126) {
    if (bytes.length < 4) return null
    length = bytes.readUInt16BE(2)
    offset = 4
  } else if (length === 127) {
    if (bytes.length < 10) return null
    length = Number(bytes.readBigUInt64BE(2))
    offset = 10
  }
  const masked = bytes[1] & 0x80
  const mask = masked ? bytes.subarray(offset, offset + 4) : null
  if (masked) offset += 4
  if (bytes.length < offset + length) return null
  const payload = Buffer.from(bytes.subarray(offset, offset + length))
  if (mask) for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i % 4]
  return { opcode: bytes[0] & 0x0f, payload, raw: bytes.subarray(0, offset + length), size: offset + length }
}

/** An unmasked server text frame. */
function textFrame(text) {
  const payload = Buffer.from(text)
  const head =
    payload.length < 126
      ? Buffer.from([0x81, payload.length])
      : payload.length < 65536
        ? Buffer.from([0x81, 126, payload.length >> 8, payload.length & 0xff])
        : Buffer.alloc(10)
  if (payload.length >= 65536) {
    head.set([0x81, 127])
    head.writeBigUInt64BE(BigInt(payload.length), 2)
  }
  return Buffer.concat([head, payload])
}

/** Every answer event the relay sends. */
export const EVENT_NAMES = ['start', 'chunk', 'thinking', 'tool_input', 'tool_use', 'tool_result', 'citation', 'search',
  'search_results', 'cost', 'done', 'error']

/** Collect a stream three ways at once: listeners, on() callbacks, the async iterator. */
export function collect(stream) {
  const heard = { listeners: [], callbacks: [], iterated: [] }
  for (const name of EVENT_NAMES) {
    stream.addEventListener(name, (e) => heard.listeners.push({ event: e.type, data: e.detail }))
    stream.on(name, (data) => heard.callbacks.push({ event: name, data }))
  }
  heard.finished = (async () => {
    for await (const message of stream) heard.iterated.push(message)
    return heard
  })()
  return heard
}

/**
 * Every event of a stream as the server logged it, read straight from the server (no proxy) once the
 * stream has ended: what a client that lost no connection sees. [{ event, id, data }]. `headers`: a
 * credential, for a server that needs one.
 */
export async function logOf(url, streamId, headers = {}) {
  const res = await fetch(url + STREAMS_PATH + encodeURIComponent(streamId), { headers: { Accept: 'text/event-stream', ...headers } })
  if (res.status !== 200) throw new Error(`GET ${streamId}: HTTP ${res.status}`)
  const events = []
  const parser = createSSEParser((e) => events.push({ event: e.event, id: Number(e.id), data: JSON.parse(e.data) }))
  parser.feed(await res.text())
  return events
}

/** The answer's text and its final state as the server saved them. */
export async function savedAnswer(url, conversationId) {
  const res = await fetch(`${url}/api/conversations/${encodeURIComponent(conversationId)}/messages`)
  const body = await res.json()
  return (body.messages ?? body).findLast((m) => m.role === 'assistant')
}

/**
 * A minimal EventSource over fetch (Node has none): named MessageEvents with lastEventId, a plain "error"
 * Event on connection loss, reconnection with Last-Event-ID after a dropped body, and CLOSED (2) after a
 * non-200 answer or a failed connect. A subclass's static `fetch` is used instead of the global one (one with
 * a cookie jar, say).
 */
export class FetchEventSource extends EventTarget {
  static instances = []

  constructor(url) {
    super()
    this.url = url
    this.readyState = 0
    this.lastEventId = ''
    this.controller = new AbortController()
    FetchEventSource.instances.push(this)
    this.connect()
  }

  async connect() {
    const headers = { Accept: 'text/event-stream' }
    if (this.lastEventId) headers['Last-Event-ID'] = this.lastEventId
    try {
      const res = await (this.constructor.fetch ?? fetch)(this.url, { headers, signal: this.controller.signal })
      if (res.status !== 200) {
        this.readyState = 2
        return this.dispatchEvent(new Event('error'))
      }
      this.readyState = 1
      this.onopen?.(new Event('open'))
      const parser = createSSEParser((e) => {
        if (this.readyState === 2) return
        this.lastEventId = e.id
        this.dispatchEvent(new MessageEvent(e.event, { data: e.data, lastEventId: e.id }))
      })
      const decoder = new TextDecoder()
      for await (const bytes of res.body) parser.feed(decoder.decode(bytes, { stream: true }))
    } catch {}
    if (this.readyState === 2) return
    // Unlike a browser, give up at once when no connection could be made:
    // a test double must not retry forever.
    const wasOpen = this.readyState === 1
    this.readyState = wasOpen ? 0 : 2
    this.dispatchEvent(new Event('error'))
    if (wasOpen && this.readyState === 0) this.connect()
  }

  close() {
    this.readyState = 2
    this.controller.abort()
  }
}
