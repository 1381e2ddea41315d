// The demo chat page: conversations from the REST API, answers streamed by the deltarelay client. A user's
// text is only ever inserted as text; an answer is rendered as Markdown by markdown.js, which never lets
// the model's text become markup of its own (no HTML, no script, no javascript: link).

import { createClient } from '/client/deltarelay.js'
import { markdownView } from '/static/markdown.js'

const $ = (id) => document.getElementById(id)
const app = $('app')
const list = $('conversation-list')
const listStatus = $('conversation-list-status')
const messages = $('messages')
const emptyState = $('empty-state')
const title = $('conversation-title')
const total = $('conversation-total')
const form = $('composer')
const input = $('message-input')
const sendButton = $('send')
const stopButton = $('stop')
const forceSSE = $('force-sse')
const toggleSidebar = $('toggle-sidebar')
const status = $('status')
const template = $('message-template')

// The server's keepalive interval, for the client's stall watchdog: ?keepaliveMs=1000 or
// <body data-keepalive-ms="1000"> (match RELAY_KEEPALIVE_SECONDS); default 15 s.
const keepaliveMs = Number(new URLSearchParams(location.search).get('keepaliveMs') || document.body.dataset.keepaliveMs) || undefined

// One client per transport choice, so each keeps its own socket and fallback memory.
const clients = new Map()
const clientFor = (transport) => {
  if (!clients.has(transport)) clients.set(transport, createClient({ transport, keepaliveMs }))
  return clients.get(transport)
}

let conversationId = null // the open conversation; null for a new one
let view = 0 // bumped whenever the message pane shows something else
let spent = money('0') // the running total of the open conversation
let active = null // the answer being streamed, one at a time: {stream, stop}

// ---- Money: exact decimals, never floats -------------------------------------

/** A cost from the API, a decimal string (REST) or a JSON number (cost event), as {units, scale}. */
function money(value) {
  const text = typeof value === 'number' ? plainDecimal(value) : String(value)
  const [whole, fraction = ''] = text.split('.')
  return { units: BigInt(whole + fraction), scale: fraction.length }
}

function addMoney(a, b) {
  const scale = Math.max(a.scale, b.scale)
  const units = a.units * 10n ** BigInt(scale - a.scale) + b.units * 10n ** BigInt(scale - b.scale)
  return { units, scale }
}

/** "$0.00001395", "$0.0123", "$1.50": every significant digit, at least two decimals. */
function formatMoney({ units, scale }) {
  const digits = units.toString().padStart(scale + 1, '0')
  const whole = digits.slice(0, digits.length - scale)
  const fraction = digits.slice(digits.length - scale).replace(/0+$/, '').padEnd(2, '0')
  return `$${whole}.${fraction}`
}

/** A JSON number's shortest decimal text without an exponent (1.395e-7 -> "0.0000001395"). */
function plainDecimal(number) {
  const [mantissa, exponent = '0'] = String(number).split('e')
  const [whole, fraction = ''] = mantissa.split('.')
  const digits = whole + fraction
  const point = whole.length + Number(exponent)
  if (point <= 0) return '0.' + '0'.repeat(-point) + digits
  if (point >= digits.length) return digits + '0'.repeat(point - digits.length)
  return digits.slice(0, point) + '.' + digits.slice(point)
}

// ---- REST -------------------------------------------------------------------

async function getJSON(path) {
  const res = await fetch(path, { headers: { Accept: 'application/json' } })
  const body = await res.json().catch(() => null)
  if (!res.ok) throw new Error(body?.error?.message || `HTTP ${res.status}`)
  return body
}

async function refreshList() {
  try {
    const { conversations } = await getJSON('/api/conversations')
    list.replaceChildren(...conversations.map(conversationItem))
    listStatus.hidden = conversations.length > 0
    listStatus.textContent = 'No conversations yet.'
  } catch (error) {
    listStatus.hidden = false
    listStatus.textContent = `Could not load conversations: ${error.message}`
  }
}

function conversationItem(conversation) {
  const link = document.createElement('a')
  link.href = '#c=' + encodeURIComponent(conversation.id)
  link.className = 'conversation-link'
  link.dataset.testid = 'conversation-item'
  link.dataset.conversationId = conversation.id
  if (conversation.id === conversationId) link.setAttribute('aria-current', 'page')
  const name = document.createElement('span')
  name.className = 'conversation-name'
  name.textContent = conversation.title || 'Untitled'
  const details = document.createElement('span')
  details.className = 'conversation-details'
  const cost = conversation.totalCost == null ? '' : ` · ${formatMoney(money(conversation.totalCost))}`
  const count = conversation.messageCount === 1 ? '1 message' : `${conversation.messageCount} messages`
  details.textContent = `${count}${cost} · ${formatDate(conversation.updatedAt)}`
  link.append(name, details)
  const item = document.createElement('li')
  item.append(link)
  return item
}

function formatDate(iso) {
  const date = new Date(iso)
  if (Number.isNaN(date.getTime())) return ''
  const sameDay = date.toDateString() === new Date().toDateString()
  return sameDay
    ? date.toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' })
    : date.toLocaleDateString(undefined, { month: 'short', day: 'numeric' })
}

// ---- Opening conversations --------------------------------------------------

function conversationFromHash() {
  const match = location.hash.match(/^#c=(.+)$/)
  return match ? decodeURIComponent(match[1]) : null
}

function showConversation(id, heading) {
  view++
  conversationId = id
  spent = money('0')
  total.value = formatMoney(spent)
  title.textContent = heading
  messages.replaceChildren(emptyState)
  emptyState.hidden = id !== null
  for (const link of list.querySelectorAll('a[data-conversation-id]')) {
    if (link.dataset.conversationId === id) link.setAttribute('aria-current', 'page')
    else link.removeAttribute('aria-current')
  }
}

async function openConversation(id) {
  showConversation(id, 'Loading…')
  const opened = view
  try {
    const body = await getJSON(`/api/conversations/${encodeURIComponent(id)}/messages`)
    if (opened !== view) return
    title.textContent = body.conversation.title || 'Untitled'
    for (const message of body.messages) showStoredMessage(message)
    messages.scrollTop = messages.scrollHeight
  } catch (error) {
    if (opened !== view) return
    title.textContent = 'Conversation not available'
    emptyState.hidden = false
    emptyState.textContent = `Could not open this conversation: ${error.message}`
  }
}

function showNewConversation() {
  emptyState.textContent = 'Ask something to start a conversation.'
  showConversation(null, 'New conversation')
}

// ---- Messages ---------------------------------------------------------------

function addMessage(role, state) {
  const article = template.content.firstElementChild.cloneNode(true)
  article.dataset.role = role
  if (role === 'assistant') article.dataset.state = state
  article.querySelector('.message-role').textContent = role === 'user' ? 'You' : 'Assistant'
  emptyState.hidden = true
  messages.append(article)
  return {
    article,
    text: article.querySelector('.message-text'),
    thinking: article.querySelector('.thinking'),
    thinkingText: article.querySelector('.thinking-text'),
    status: article.querySelector('.message-status'),
    meta: article.querySelector('.message-meta'),
  }
}

function showStoredMessage(message) {
  const shown = addMessage(message.role, message.status)
  shown.article.dataset.messageId = message.id
  if (message.role !== 'assistant') {
    shown.text.textContent = message.content
    return
  }
  const view = markdownView(shown.text)
  view.set(message.content)
  view.flush()
  if (message.status === 'error') setStatus(shown, 'error', 'This answer failed.')
  if (message.status === 'cancelled') setStatus(shown, 'note', 'Stopped.')
  if (message.status === 'interrupted') setStatus(shown, 'note', 'Interrupted before it finished.')
  if (message.status === 'streaming') setStatus(shown, 'note', 'Still being written…')
  setMeta(shown, message)
  if (message.totalCost != null) addToTotal(message.totalCost)
}

function setStatus(shown, kind, text) {
  shown.status.hidden = false
  shown.status.dataset.kind = kind
  shown.status.textContent = text
}

/** Tokens in and out and the cost, from a stored message or a cost event. */
function setMeta(shown, usage) {
  if (usage.inputTokens == null && usage.outputTokens == null) return
  const parts = [`${usage.inputTokens ?? 0} in`, `${usage.outputTokens ?? 0} out`]
  if (usage.totalCost == null) parts.push('cost unknown')
  else parts.push((usage.estimated ? '≈ ' : '') + formatMoney(money(usage.totalCost)))
  shown.meta.hidden = false
  shown.meta.textContent = parts.join(' · ')
  if (usage.estimated) shown.meta.title = 'Estimated: the stream ended before the final usage arrived.'
}

function addToTotal(cost) {
  spent = addMoney(spent, money(cost))
  total.value = formatMoney(spent)
}

// The pane follows a growing answer while the reader is at its end; scrolling up stops that.
let pinned = true
const atBottom = () => messages.scrollHeight - messages.scrollTop - messages.clientHeight < 40
messages.addEventListener('scroll', () => (pinned = atBottom()), { passive: true })

function keepScrolledDown() {
  if (pinned) messages.scrollTop = messages.scrollHeight
}

// ---- Sending ----------------------------------------------------------------

async function send(text) {
  const shownIn = view
  const user = addMessage('user')
  user.text.textContent = text
  const answer = addMessage('assistant', 'streaming')
  answer.article.setAttribute('aria-busy', 'true')
  const answerText = markdownView(answer.text, keepScrolledDown)
  const thinkingText = answer.thinkingText.appendChild(document.createTextNode(''))
  messages.scrollTop = messages.scrollHeight
  pinned = true

  const stream = clientFor(forceSSE.checked ? 'sse' : 'auto').send(text, { conversationId: conversationId ?? undefined })
  let stopping = false
  // Works in every state: while reconnecting the client cancels over HTTP and reconnects at once.
  const stop = () => {
    stopping = true
    stream.cancel()
    if (stream.state !== 'reconnecting') setStatus(answer, 'note', 'Stopping…')
  }
  setActive({ stream, stop })
  const sentAt = performance.now()
  let firstAt = null
  const firstToken = () => {
    if (firstAt !== null) return
    firstAt = performance.now()
    $('ttft').value = `${Math.round(firstAt - sentAt)} ms`
  }
  $('ttft').value = '–'
  $('tokens-per-second').value = '–'
  $('transport').value = stream.transport

  stream.on('start', (start) => {
    $('transport').value = stream.transport
    if (shownIn === view && conversationId === null) {
      // A new conversation now has an id: keep it in the URL without reloading it.
      conversationId = start.conversationId
      history.replaceState(null, '', '#c=' + encodeURIComponent(start.conversationId))
      refreshList()
    }
  })
  stream.on('thinking', ({ text }) => {
    firstToken()
    answer.thinking.hidden = false
    thinkingText.appendData(text)
  })
  stream.on('chunk', ({ text }) => {
    firstToken()
    answerText.set(stream.text)
  })
  // The client resumes a lost connection by itself; the answer goes on where it stopped.
  stream.on('reconnecting', ({ attempt }) => {
    answer.article.dataset.state = 'reconnecting'
    const tries = attempt > 1 ? ` (try ${attempt})` : ''
    setStatus(answer, 'reconnecting', `${stopping ? 'Stopping. ' : ''}Connection lost. Reconnecting…${tries}`)
    status.textContent = 'Connection lost. Reconnecting…'
  })
  stream.on('reconnected', ({ transport }) => {
    answer.article.dataset.state = 'streaming'
    $('transport').value = transport
    if (stopping) setStatus(answer, 'note', 'Stopping…')
    else answer.status.hidden = true
    status.textContent = 'Reconnected.'
  })
  stream.on('cost', (cost) => {
    setMeta(answer, cost)
    if (shownIn === view && cost.totalCost != null) addToTotal(cost.totalCost)
  })

  const result = await stream.done
  const doneAt = performance.now()
  answerText.flush()
  answer.status.hidden = true
  const state = result.error ? 'error' : result.stopReason === 'cancelled' ? 'cancelled' : 'complete'
  answer.article.dataset.state = state
  answer.article.removeAttribute('aria-busy')
  if (result.messageId) answer.article.dataset.messageId = result.messageId
  if (result.error) {
    const { code, message, retryable, retryAfter } = result.error
    const advice = retryable ? (retryAfter ? ` Try again in ${retryAfter} s.` : ' Try again.') : ''
    setStatus(answer, 'error', `${message.replace(/\.?$/, '.')}${advice} (${code})`)
    answer.status.dataset.code = code
  } else if (state === 'cancelled') setStatus(answer, 'note', 'Stopped.')
  $('transport').value = stream.transport
  const outputTokens = result.cost?.outputTokens
  if (firstAt !== null && outputTokens && doneAt > firstAt) {
    $('tokens-per-second').value = `${(outputTokens / ((doneAt - firstAt) / 1000)).toFixed(1)} tok/s`
  }
  status.textContent = state === 'complete' ? 'Answer complete.' : state === 'cancelled' ? 'Answer stopped.' : 'Answer failed.'
  setActive(null)
  refreshList()
}

function setActive(answering) {
  active = answering
  sendButton.disabled = answering !== null
  stopButton.disabled = answering === null
  app.dataset.busy = String(answering !== null)
}

// ---- Wiring -------------------------------------------------------------------

form.addEventListener('submit', (event) => {
  event.preventDefault()
  const text = input.value
  if (!text.trim() || active) return
  input.value = ''
  send(text)
})

input.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault()
    form.requestSubmit()
  } else if (event.key === 'Escape' && active) {
    active.stop()
  }
})

stopButton.addEventListener('click', () => active?.stop())

// A code block's copy button (markdown.js makes it): its code, as text, to the clipboard.
messages.addEventListener('click', (event) => {
  const button = event.target.closest('.copy-code')
  // marked ends a code block with a line end that is not part of the code.
  if (button) copyText(button.parentElement.querySelector('code').textContent.replace(/\n$/, ''), button)
})

async function copyText(text, button) {
  const label = button.textContent
  try {
    await navigator.clipboard.writeText(text)
    button.textContent = 'Copied'
  } catch {
    button.textContent = 'Copy failed'
  }
  setTimeout(() => (button.textContent = label), 1500)
}

$('new-conversation').addEventListener('click', () => {
  if (location.hash) history.pushState(null, '', location.pathname + location.search)
  showNewConversation()
  closeSidebar()
  input.focus()
})

function closeSidebar() {
  app.dataset.sidebar = 'closed'
  toggleSidebar.setAttribute('aria-expanded', 'false')
}

toggleSidebar.addEventListener('click', () => {
  const open = app.dataset.sidebar !== 'open'
  app.dataset.sidebar = open ? 'open' : 'closed'
  toggleSidebar.setAttribute('aria-expanded', String(open))
})

list.addEventListener('click', (event) => {
  if (event.target.closest('a')) closeSidebar()
})

window.addEventListener('hashchange', () => {
  const id = conversationFromHash()
  if (id === conversationId) return
  if (id === null) showNewConversation()
  else openConversation(id)
})

// ---- Signing in: the token goes once in a POST body; the session lives in an HttpOnly cookie ----

async function postJSON(method, path, body) {
  const res = await fetch(path, {
    method,
    headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  })
  const answer = await res.json().catch(() => null)
  if (!res.ok) throw new Error(answer?.error?.message || `HTTP ${res.status}`)
  return answer
}

$('sign-in-form').addEventListener('submit', async (event) => {
  event.preventDefault()
  const error = $('sign-in-error')
  const tokenInput = $('token-input')
  try {
    await postJSON('POST', '/api/session', { token: tokenInput.value.trim() })
    tokenInput.value = ''
    // A fresh page: every client and socket starts again with the cookie.
    location.reload()
  } catch (failure) {
    error.hidden = false
    error.textContent = `Could not sign in: ${failure.message}`
  }
})

$('sign-out').addEventListener('click', async () => {
  await postJSON('DELETE', '/api/session').catch(() => null)
  location.reload()
})

async function start() {
  const res = await fetch('/api/session', { headers: { Accept: 'application/json' } })
  if (res.status === 401) {
    $('sign-in').hidden = false
    $('token-input').focus()
    return
  }
  const body = await res.json().catch(() => null)
  const user = body?.user
  if (user && !user.anonymous) {
    $('account').hidden = false
    $('account-name').textContent = user.admin ? `${user.name} (admin)` : user.name
  }
  app.hidden = false
  refreshList()
  const initial = conversationFromHash()
  if (initial !== null) openConversation(initial)
}

start()
