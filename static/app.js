// The demo chat page: conversations from the REST API, answers streamed by the deltarelay client, both through
// the client. A conversation is a tree of messages; the pane shows its active path, each message with its
// controls (edit, copy, regenerate, continue, "‹ 2/3 ›" among its siblings). A user's text is only ever
// inserted as text; an answer is rendered as Markdown by markdown.js, which never lets the model's text become
// markup of its own (no HTML, no script, no javascript: link).

import { createClient } from '/client/deltarelay.js'
import { markdownView, safeHref } from '/static/markdown.js'

const $ = (id) => document.getElementById(id)
const app = $('app')
const list = $('conversation-list')
const listStatus = $('conversation-list-status')
const messages = $('messages')
const emptyState = $('empty-state')
const title = $('conversation-title')
const total = $('conversation-total')
const contextMeter = $('context-meter')
const contextNote = $('context-note')
const form = $('composer')
const input = $('message-input')
const sendButton = $('send')
const stopButton = $('stop')
const forceSSE = $('force-sse')
const toggleSidebar = $('toggle-sidebar')
const status = $('status')
const template = $('message-template')
const search = $('conversation-search')
const loadOlderButton = $('load-older')
const attachInput = $('attach-input')
const attachButton = $('attach')
const composerAttachments = $('composer-attachments')
const params = new URLSearchParams(location.search)

// The server's keepalive interval, for the client's stall watchdog: ?keepaliveMs=1000 or
// <body data-keepalive-ms="1000"> (match RELAY_KEEPALIVE_SECONDS); default 15 s.
const keepaliveMs = Number(params.get('keepaliveMs') || document.body.dataset.keepaliveMs) || undefined

// One client per transport choice, so each keeps its own socket and fallback memory.
const clients = new Map()
const clientFor = (transport) => {
  if (!clients.has(transport)) clients.set(transport, createClient({ transport, keepaliveMs }))
  return clients.get(transport)
}
// The REST calls go through the client's helpers too (errors with a status and a code).
const api = clientFor('auto')

let conversationId = null // the open conversation; null for a new one
let view = 0 // bumped whenever the message pane shows something else
let spent = money('0') // the running total of the open conversation
// Per conversation, what its last answer's request used of the model's context window (this page's answers
// only: the REST API does not give the window): {tokens, window, truncated}.
const contexts = new Map()
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


// ---- The conversation list: newest first, a page at a time, searched by title ---------------------------

// ?pageSize=N: conversations per page of the list (default 50, the server's).
const pageSize = Number(params.get('pageSize')) || undefined
let listCursor = null // the next (older) page's cursor; null when the list is whole
let listQuery = ''

async function refreshList() {
  const query = listQuery
  try {
    const page = await api.listConversations({ limit: pageSize, q: query })
    if (query !== listQuery) return // a newer search is under way
    list.replaceChildren(...page.conversations.map(conversationItem))
    setCursor(page.nextBefore)
    listStatus.hidden = page.conversations.length > 0
    listStatus.textContent = query ? 'No conversation has that in its title.' : 'No conversations yet.'
    const open = page.conversations.find((c) => c.id === conversationId)
    if (open && !renaming()) title.textContent = open.title || 'Untitled'
  } catch (error) {
    listStatus.hidden = false
    listStatus.textContent = `Could not load conversations: ${error.message}`
  }
}

async function loadOlder() {
  const query = listQuery
  loadOlderButton.disabled = true
  try {
    const page = await api.listConversations({ limit: pageSize, before: listCursor, q: query })
    if (query !== listQuery) return
    const shown = new Set([...list.querySelectorAll('[data-conversation-id]')].map((a) => a.dataset.conversationId))
    list.append(...page.conversations.filter((c) => !shown.has(c.id)).map(conversationItem))
    setCursor(page.nextBefore)
  } catch (error) {
    listStatus.hidden = false
    listStatus.textContent = `Could not load older conversations: ${error.message}`
  } finally {
    loadOlderButton.disabled = false
  }
}

function setCursor(cursor) {
  listCursor = cursor ?? null
  loadOlderButton.hidden = listCursor === null
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
  name.dataset.testid = 'conversation-name'
  name.textContent = conversation.title || 'Untitled'
  const details = document.createElement('span')
  details.className = 'conversation-details'
  const cost = conversation.totalCost == null ? '' : ` · ${formatMoney(money(conversation.totalCost))}`
  const count = conversation.messageCount === 1 ? '1 message' : `${conversation.messageCount} messages`
  details.textContent = `${count}${cost} · ${formatDate(conversation.updatedAt)}`
  link.append(name, details)
  const actions = document.createElement('div')
  actions.className = 'conversation-actions'
  actions.append(
    actionButton('Rename', 'rename', 'rename-conversation', `Rename “${name.textContent}”`),
    actionButton('Delete', 'delete', 'delete-conversation', `Delete “${name.textContent}”`),
  )
  const item = document.createElement('li')
  item.className = 'conversation'
  item.dataset.conversationId = conversation.id
  item.append(link, actions)
  return item
}

function actionButton(label, action, testid, description) {
  const button = document.createElement('button')
  button.type = 'button'
  button.className = 'button button-quiet button-small'
  button.dataset.action = action
  button.dataset.testid = testid
  button.textContent = label
  if (description) button.setAttribute('aria-label', description)
  return button
}

function formatDate(iso) {
  const date = new Date(iso)
  if (Number.isNaN(date.getTime())) return ''
  const sameDay = date.toDateString() === new Date().toDateString()
  return sameDay
    ? date.toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' })
    : date.toLocaleDateString(undefined, { month: 'short', day: 'numeric' })
}

const renaming = () => !!list.querySelector('[data-testid=rename-input]')

/** Rename in place: the title becomes a field; Enter (or Save) renames, Escape leaves it as it was. */
function startRename(item) {
  const link = item.querySelector('.conversation-link')
  const old = link.querySelector('.conversation-name').textContent
  const editor = document.createElement('form')
  editor.className = 'conversation-editor'
  const field = document.createElement('input')
  field.type = 'text'
  field.value = old
  field.maxLength = 200
  field.required = true
  field.dataset.testid = 'rename-input'
  field.setAttribute('aria-label', 'New title')
  const save = actionButton('Save', 'save-rename', 'rename-save')
  save.type = 'submit'
  const cancel = actionButton('Cancel', 'cancel-rename', 'rename-cancel')
  const problem = document.createElement('p')
  problem.className = 'conversation-problem'
  problem.hidden = true
  editor.append(field, save, cancel, problem)
  const close = () => editor.replaceWith(link)
  cancel.addEventListener('click', close)
  field.addEventListener('keydown', (event) => event.key === 'Escape' && close())
  editor.addEventListener('submit', async (event) => {
    event.preventDefault()
    try {
      const renamed = await api.renameConversation(item.dataset.conversationId, field.value)
      link.querySelector('.conversation-name').textContent = renamed.title
      if (renamed.id === conversationId) title.textContent = renamed.title
      close()
    } catch (error) {
      problem.hidden = false
      problem.textContent = error.code === 'invalid_request' ? 'A title has 1 to 200 characters.' : error.message
    }
  })
  link.replaceWith(editor)
  field.select()
}

/** Delete after a confirmation in place: the conversation, its messages, and any answer it is writing. */
function confirmDelete(item) {
  if (item.querySelector('.conversation-confirm')) return
  const confirm = document.createElement('div')
  confirm.className = 'conversation-confirm'
  confirm.setAttribute('role', 'alertdialog')
  confirm.setAttribute('aria-label', 'Delete this conversation?')
  const question = document.createElement('p')
  question.textContent = 'Delete this conversation and all its messages?'
  const yes = actionButton('Delete', 'confirm-delete', 'confirm-delete')
  yes.classList.add('button-danger')
  const no = actionButton('Keep it', 'cancel-delete', 'cancel-delete')
  confirm.append(question, yes, no)
  no.addEventListener('click', () => confirm.remove())
  yes.addEventListener('click', async () => {
    const id = item.dataset.conversationId
    yes.disabled = true
    try {
      await api.deleteConversation(id)
      item.remove()
      if (id === conversationId) {
        history.pushState(null, '', location.pathname + location.search)
        showNewConversation()
      }
      status.textContent = 'Conversation deleted.'
      refreshList() // the page fills up from the older ones
    } catch (error) {
      question.textContent = `Could not delete it: ${error.message}`
      yes.disabled = false
    }
  })
  item.append(confirm)
  no.focus()
}

// ---- Opening conversations: a tree of messages, of which the page shows the active path ----------------

function conversationFromHash() {
  const match = location.hash.match(/^#c=(.+)$/)
  return match ? decodeURIComponent(match[1]) : null
}

// The open conversation's messages by id, and the last message of the path shown.
let tree = new Map()
let activeLeafId = null
// The articles of this conversation's messages, shown or not (a branch switched away from keeps its own).
let articles = new Map()

function showConversation(id, heading) {
  view++
  conversationId = id
  tree = new Map()
  activeLeafId = null
  articles = new Map()
  spent = money('0')
  total.value = formatMoney(spent)
  showContext(contexts.get(id))
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
    const body = await api.getMessages(id)
    if (opened !== view) return
    title.textContent = body.conversation.title || 'Untitled'
    learnTree(body)
    showPath()
    messages.scrollTop = messages.scrollHeight
  } catch (error) {
    if (opened !== view) return
    title.textContent = 'Conversation not available'
    emptyState.hidden = false
    emptyState.textContent = `Could not open this conversation: ${error.message}`
  }
}

/** The server's messages (all, or a path) and active leaf; the conversation's total spent, every branch's. */
function learnTree(body) {
  for (const message of body.messages) tree.set(message.id, message)
  activeLeafId = body.activeLeafId ?? body.messages.at(-1)?.id ?? null
  if (body.conversation?.totalCost != null) {
    spent = money(body.conversation.totalCost)
    total.value = formatMoney(spent)
  }
}

/** After an answer: the tree again, so that new messages get their controls and siblings their counts. */
async function reloadTree() {
  const shownIn = view
  try {
    const body = await api.getMessages(conversationId)
    if (shownIn !== view) return
    learnTree(body)
    showPath()
  } catch {} // the answer stays on screen; its controls come with the next load
}

function activePath() {
  const path = []
  for (let message = tree.get(activeLeafId); message; message = tree.get(message.parentId)) path.unshift(message)
  return path
}

/** The siblings of `message` (itself included), oldest first. */
function siblingsOf(message) {
  return [...tree.values()]
    .filter((m) => (m.parentId ?? null) === (message.parentId ?? null))
    .sort((a, b) => a.siblingIndex - b.siblingIndex)
}

/** The pane shows the active path: the articles it has already are kept as they are, the others made. */
function showPath() {
  const path = activePath()
  const shown = path.map((message) => {
    let entry = articles.get(message.id)
    if (!entry) articles.set(message.id, (entry = showStoredMessage(message)))
    else if (message.role === 'assistant') setMeta(entry, message)
    setControls(entry, message)
    return entry.article
  })
  messages.replaceChildren(emptyState, ...shown)
  emptyState.hidden = shown.length > 0
}

// ---- Messages ---------------------------------------------------------------

function addMessage(role, state) {
  const article = template.content.firstElementChild.cloneNode(true)
  article.dataset.role = role
  if (role === 'assistant') article.dataset.state = state
  article.querySelector('.message-role').textContent = role === 'user' ? 'You' : 'Assistant'
  emptyState.hidden = true
  messages.append(article)
  const text = article.querySelector('.message-text')
  const citations = new Map() // index -> the citation event's data
  return {
    article,
    text,
    citations,
    steps: article.querySelector('.message-steps'),
    tools: new Map(), // tool call id -> its box
    searches: new Map(), // server tool call id -> its box
    attachments: article.querySelector('.message-attachments'),
    view: role === 'assistant' ? markdownView(text, keepScrolledDown, (fragment) => placeCitations(fragment, citations)) : null,
    thinking: article.querySelector('.thinking'),
    thinkingText: article.querySelector('.thinking-text'),
    status: article.querySelector('.message-status'),
    meta: article.querySelector('.message-meta'),
    actions: article.querySelector('.message-actions'),
  }
}

function showStoredMessage(message) {
  const shown = addMessage(message.role, message.status)
  shown.article.dataset.messageId = message.id
  if (message.role !== 'assistant') {
    shown.text.textContent = message.content
    for (const block of message.blocks?.flatMap((m) => (Array.isArray(m.content) ? m.content : [])) ?? []) {
      if (block.source?.type === 'attachment') showStoredAttachment(shown, block)
    }
    return shown
  }
  shown.view.set(message.blocks ? showStoredBlocks(shown, message.blocks) ?? message.content : message.content)
  shown.view.flush()
  if (message.thinking) {
    shown.thinking.hidden = false
    shown.thinkingText.textContent = message.thinking
  }
  if (message.status === 'error') setStatus(shown, 'error', 'This answer failed.')
  if (message.status === 'cancelled') setStatus(shown, 'note', 'Stopped.')
  if (message.status === 'interrupted') setStatus(shown, 'note', 'Interrupted before it finished.')
  if (message.status === 'streaming') setStatus(shown, 'note', 'Still being written…')
  if (message.stopReason === 'max_tokens') setStatus(shown, 'note', 'Cut off at the length limit.')
  setMeta(shown, message)
  return shown
}

// ---- Citations, searches and tool calls ------------------------------------------------------------------

// A citation's place in an answer's Markdown text: private-use characters that no answer shows, turned into a
// numbered link once the text is rendered (so the model's text never becomes markup).
const MARK = /\uE000(\d+)\uE001/g
const citationMark = (index) => `\uE000${index}\uE001`
/** An answer's text as it is copied: "[n]" where its citations are. */
const plainText = (marked) => marked.replace(MARK, '[$1]')

/** Each citation mark of a rendered answer becomes a superscript "[n]": a link to its source, its title the tooltip. */
function placeCitations(fragment, citations) {
  const walker = document.createTreeWalker(fragment, NodeFilter.SHOW_TEXT)
  const found = []
  for (let node; (node = walker.nextNode()); ) if (node.data.includes('\uE000')) found.push(node)
  for (const node of found) {
    const parts = node.data.split(/\uE000(\d+)\uE001/)
    node.replaceWith(...parts.map((part, i) => (i % 2 ? citationLink(Number(part), citations.get(Number(part))) : part)))
  }
}

function citationLink(index, citation) {
  const sup = document.createElement('sup')
  sup.className = 'citation'
  sup.dataset.testid = 'citation'
  const href = safeHref(citation?.url)
  const mark = document.createElement(href ? 'a' : 'span')
  mark.textContent = `[${index}]`
  const source = citation?.title || citation?.documentTitle || citation?.url || 'source'
  mark.title = citation?.citedText ? `${source}: “${citation.citedText}”` : source
  mark.setAttribute('aria-label', `Source ${index}: ${source}`)
  if (href) {
    mark.href = href
    mark.target = '_blank'
    mark.rel = 'noopener noreferrer nofollow'
  }
  sup.append(mark)
  return sup
}

function showSteps(shown) {
  shown.steps.hidden = false
}

const SEARCH_VERBS = { web_search: ['Searching the web for', 'Searched the web for'], web_fetch: ['Fetching', 'Fetched'] }

/** A collapsible "Searched the web for …" with its sources; a search event, or a stored server_tool_use. */
function showSearch(shown, { id, name, query }) {
  const step = document.createElement('details')
  step.className = 'step step-search'
  step.dataset.testid = 'search-step'
  const summary = document.createElement('summary')
  const verbs = SEARCH_VERBS[name] ?? [`Using ${name}:`, `Used ${name}:`]
  summary.textContent = `${verbs[0]} “${query}”…`
  const sources = document.createElement('ol')
  sources.className = 'sources'
  sources.dataset.testid = 'search-sources'
  step.append(summary, sources)
  shown.steps.append(step)
  shown.searches.set(id, { step, summary, sources, done: `${verbs[1]} “${query}”` })
  showSteps(shown)
}

function showSearchResults(shown, { id, results, error }) {
  const search = shown.searches.get(id)
  if (!search) return
  search.summary.textContent = error ? `${search.done}: failed (${error})` : `${search.done} · ${results.length === 1 ? '1 source' : `${results.length} sources`}`
  if (error) search.step.dataset.error = 'true'
  search.sources.replaceChildren(...results.map(({ url, title }) => {
    const item = document.createElement('li')
    const href = safeHref(url)
    const link = document.createElement(href ? 'a' : 'span')
    link.textContent = title || url
    if (href) {
      link.href = href
      link.target = '_blank'
      link.rel = 'noopener noreferrer nofollow'
    }
    const host = document.createElement('span')
    host.className = 'source-host'
    try {
      host.textContent = new URL(url).hostname
    } catch {}
    item.append(link, host)
    return item
  }))
}

/** The box of the tool call `id`: its name, its input (typing, then whole) and its result. */
function toolBox(shown, id) {
  let box = shown.tools.get(id)
  if (box) return box
  const step = document.createElement('details')
  step.className = 'step step-tool'
  step.dataset.testid = 'tool-call'
  step.open = true
  const summary = document.createElement('summary')
  const name = document.createElement('code')
  name.dataset.testid = 'tool-name'
  name.textContent = '…'
  const state = document.createElement('span')
  state.dataset.testid = 'tool-state'
  state.textContent = ' running…'
  summary.append('Tool ', name, state)
  const inputLabel = document.createElement('p')
  inputLabel.className = 'step-label'
  inputLabel.textContent = 'Input'
  const input = document.createElement('pre')
  input.dataset.testid = 'tool-input'
  const resultLabel = document.createElement('p')
  resultLabel.className = 'step-label'
  resultLabel.textContent = 'Result'
  resultLabel.hidden = true
  const result = document.createElement('pre')
  result.dataset.testid = 'tool-result'
  result.hidden = true
  step.append(summary, inputLabel, input, resultLabel, result)
  shown.steps.append(step)
  showSteps(shown)
  box = { step, name, state, input, typed: '', resultLabel, result }
  shown.tools.set(id, box)
  return box
}

function showToolUse(shown, { id, name, input }) {
  const box = toolBox(shown, id)
  box.name.textContent = name
  box.input.textContent = JSON.stringify(input, null, 2)
}

function showToolResult(shown, { id, isError, content }) {
  const box = toolBox(shown, id)
  const text = typeof content === 'string'
    ? content
    : (content ?? []).map((block) => (block.type === 'text' ? block.text : `[${block.type}]`)).join('\n')
  box.result.textContent = text
  box.result.dataset.error = String(!!isError)
  box.result.hidden = box.resultLabel.hidden = false
  box.state.textContent = isError ? ' failed' : ' done'
  box.step.dataset.error = String(!!isError)
  box.step.open = false
}

/**
 * A saved answer's blocks (its API messages: assistant content, and the user tool_result messages between its
 * rounds) shown as the stream showed them: searches with their sources, tool calls with input and result, the
 * text with its citations numbered in order. Returns the answer's marked text, or null when the blocks have none.
 */
function showStoredBlocks(shown, blocks) {
  let text = null
  for (const message of blocks) {
    for (const block of Array.isArray(message.content) ? message.content : []) {
      if (block.type === 'text') {
        text = (text ?? '') + block.text
        for (const citation of block.citations ?? []) {
          const index = shown.citations.size + 1
          shown.citations.set(index, {
            index,
            url: citation.url ?? null,
            title: citation.title ?? null,
            citedText: citation.cited_text ?? '',
            documentTitle: citation.document_title ?? null,
          })
          text += citationMark(index)
        }
      } else if (block.type === 'server_tool_use') {
        showSearch(shown, { id: block.id, name: block.name, query: block.input?.query ?? block.input?.url ?? '' })
      } else if (block.type === 'web_search_tool_result' || block.type === 'web_fetch_tool_result') {
        const content = block.content
        const failed = content && !Array.isArray(content) && /_error$/.test(content.type ?? '')
        const results = failed ? [] : [].concat(content ?? []).map((r) => ({ url: r.url, title: r.title ?? null }))
        showSearchResults(shown, { id: block.tool_use_id, results, error: failed ? content.error_code : undefined })
      } else if (block.type === 'tool_use') {
        showToolUse(shown, block)
      } else if (block.type === 'tool_result') {
        showToolResult(shown, { id: block.tool_use_id, isError: !!block.is_error, content: block.content })
      }
    }
  }
  return text
}

// ---- Attachments: picked, dropped or pasted into the composer; shown in the messages ---------------------

const ACCEPTED = ['image/png', 'image/jpeg', 'image/gif', 'image/webp', 'application/pdf']
let pending = [] // the composer's attachments: {file, url}

function addPending(files) {
  for (const file of files) {
    if (!ACCEPTED.includes(file.type)) {
      status.textContent = `${file.name || 'That file'} is not an image (PNG, JPEG, GIF, WebP) or a PDF.`
      continue
    }
    pending.push({ file, url: file.type.startsWith('image/') ? URL.createObjectURL(file) : null })
  }
  showPending()
}

function showPending() {
  composerAttachments.replaceChildren(...pending.map((entry) => {
    const item = attachmentItem({ name: entry.file.name || 'pasted image', url: entry.url, kind: entry.url ? 'image' : 'document' })
    const remove = actionButton('×', 'remove-attachment', 'remove-attachment', `Remove ${entry.file.name || 'pasted image'}`)
    remove.addEventListener('click', () => {
      pending = pending.filter((p) => p !== entry)
      if (entry.url) URL.revokeObjectURL(entry.url)
      showPending()
      input.focus()
    })
    item.append(remove)
    return item
  }))
  composerAttachments.hidden = pending.length === 0
}

/** One attachment: an image's thumbnail (an object URL), or a file chip with the name. */
function attachmentItem({ name, url, kind }) {
  const item = document.createElement('li')
  item.className = 'attachment'
  item.dataset.testid = 'attachment'
  item.dataset.kind = kind
  if (url) {
    const image = document.createElement('img')
    image.src = url
    image.alt = name
    image.dataset.testid = 'attachment-thumbnail'
    item.append(image)
  } else {
    const badge = document.createElement('span')
    badge.className = 'attachment-kind'
    badge.setAttribute('aria-hidden', 'true')
    badge.textContent = kind === 'document' ? 'PDF' : 'IMG'
    item.append(badge)
  }
  const label = document.createElement('span')
  label.className = 'attachment-name'
  label.dataset.testid = 'attachment-name'
  label.textContent = name
  item.append(label)
  return item
}

function showAttachment(shown, attachment) {
  shown.attachments.hidden = false
  const item = attachmentItem(attachment)
  shown.attachments.append(item)
  return item
}

/** A stored ref {type, source: {type: attachment, id}} in `shown`: its bytes from GET /api/attachments/{id}. */
function showStoredAttachment(shown, block) {
  const item = showAttachment(shown, { name: block.type === 'document' ? 'PDF document' : 'Image', url: null, kind: block.type })
  fetch('/api/attachments/' + encodeURIComponent(block.source.id)).then(async (res) => {
    if (!res.ok) throw new Error(`HTTP ${res.status}`)
    const name = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(res.headers.get('Content-Disposition') ?? '')?.[1]
    const label = item.querySelector('.attachment-name')
    if (name) label.textContent = decodeURIComponent(name)
    if (block.type !== 'image') return
    const image = document.createElement('img')
    image.src = URL.createObjectURL(await res.blob())
    image.alt = label.textContent
    image.dataset.testid = 'attachment-thumbnail'
    item.firstElementChild.replaceWith(image)
  }).catch(() => (item.title = 'This attachment could not be loaded.'))
}

/**
 * A message's controls, from the tree: "‹ 2/3 ›" among its siblings; edit (a user message); copy,
 * regenerate and, for an answer cut off at max_tokens or stopped, continue.
 */
function setControls(shown, message) {
  const controls = []
  const siblings = siblingsOf(message)
  if (siblings.length > 1) {
    const at = siblings.findIndex((m) => m.id === message.id)
    const nav = document.createElement('span')
    nav.className = 'siblings'
    const prev = actionButton('‹', 'previous', 'sibling-previous', 'Previous version')
    const next = actionButton('›', 'next', 'sibling-next', 'Next version')
    prev.disabled = at === 0
    next.disabled = at === siblings.length - 1
    const position = document.createElement('span')
    position.className = 'sibling-position'
    position.dataset.testid = 'sibling-position'
    position.textContent = `${at + 1}/${siblings.length}`
    nav.append(prev, position, next)
    controls.push(nav)
  }
  if (message.role === 'user') controls.push(actionButton('Edit', 'edit', 'edit-message', 'Edit this message'))
  else {
    controls.push(actionButton('Copy', 'copy', 'copy-message', 'Copy this answer'))
    controls.push(actionButton('Regenerate', 'regenerate', 'regenerate', 'Write this answer again'))
    if (message.stopReason === 'max_tokens' || message.stopReason === 'cancelled') {
      controls.push(actionButton('Continue', 'continue', 'continue', 'Continue this answer'))
    }
  }
  shown.actions.replaceChildren(...controls)
  shown.actions.hidden = false
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

/** The context meter and the "not sent" note of the open conversation; `context` undefined hides both. */
function showContext(context) {
  contextMeter.hidden = !context?.window
  if (context?.window) {
    $('context-used').value = Math.min(context.tokens / context.window, 1)
    $('context-figures').value = `${context.tokens.toLocaleString('en-US')} / ${context.window.toLocaleString('en-US')} tokens`
    contextMeter.title = `This conversation's last request used ${context.tokens} of the model's ${context.window} tokens.`
  }
  const truncated = context?.truncated ?? 0
  contextNote.hidden = truncated === 0
  contextNote.textContent = truncated === 1
    ? '1 earlier message is not sent to the model.'
    : `${truncated} earlier messages are not sent to the model.`
}

function learnContext(id, change) {
  const context = { ...contexts.get(id), ...change }
  contexts.set(id, context)
  if (id === conversationId) showContext(context)
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

/** Everything after `article` on screen goes: a new branch starts there. */
function cutAfter(article) {
  while (article?.nextElementSibling) article.nextElementSibling.remove()
}

/** An inline editor in a user message; sending makes a sibling of it, with its own answer. */
function startEdit(shown, message) {
  if (shown.article.querySelector('.message-editor')) return
  const editor = document.createElement('form')
  editor.className = 'message-editor'
  const field = document.createElement('textarea')
  field.value = message.content
  field.rows = Math.min(8, message.content.split('\n').length + 1)
  field.required = true
  field.dataset.testid = 'edit-input'
  field.setAttribute('aria-label', 'Edited message')
  const save = actionButton('Send', 'save-edit', 'edit-send')
  save.type = 'submit'
  save.classList.add('button-primary')
  const cancel = actionButton('Cancel', 'cancel-edit', 'edit-cancel')
  editor.append(field, save, cancel)
  const close = () => {
    editor.remove()
    shown.text.hidden = shown.actions.hidden = false
  }
  cancel.addEventListener('click', close)
  field.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') close()
    else if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault()
      editor.requestSubmit()
    }
  })
  editor.addEventListener('submit', (event) => {
    event.preventDefault()
    if (!field.value.trim() || active) return
    close()
    // The edited message's place: everything from it on gives way to the new branch.
    cutAfter(shown.article.previousElementSibling ?? emptyState)
    answer({ kind: 'send', text: field.value, parentMessageId: message.parentId ?? null })
  })
  shown.text.hidden = shown.actions.hidden = true
  shown.text.after(editor)
  field.focus()
}

// ---- Answering: a send, an edit, a regenerate or a continue, one at a time ------------------------------

/**
 * Streams one answer into the pane. kind "send" (text, and parentMessageId for an edit) adds the user
 * message and a new answer; "regenerate" adds a new answer after the user message of `messageId`;
 * "continue" writes on into the answer `messageId`. The pane has been cut to where the answer goes.
 */
async function answer({ kind, text, parentMessageId, messageId, attachments = [] }) {
  const shownIn = view
  const client = clientFor(forceSSE.checked ? 'sse' : 'auto')
  let user = null
  let reply
  let before = '' // a continued answer's text so far
  if (kind === 'send') {
    user = addMessage('user')
    user.text.textContent = text
    for (const { file, url } of attachments) showAttachment(user, { name: file.name || 'pasted image', url, kind: url ? 'image' : 'document' })
  }
  if (kind === 'continue') {
    reply = articles.get(messageId)
    // The text on screen keeps its citation marks; the saved text is the same without them.
    before = reply.view.text || (tree.get(messageId)?.content ?? '')
    reply.article.dataset.state = 'streaming'
    reply.status.hidden = true
  } else {
    reply = addMessage('assistant', 'streaming')
  }
  reply.actions.hidden = true
  reply.article.setAttribute('aria-busy', 'true')
  const thinkingText = reply.thinkingText.appendChild(document.createTextNode(''))
  messages.scrollTop = messages.scrollHeight
  pinned = true

  const options = { conversationId: conversationId ?? undefined }
  if (attachments.length) options.attachments = attachments.map((a) => a.file)
  if (parentMessageId !== undefined) options.parentMessageId = parentMessageId
  const stream =
    kind === 'regenerate' ? client.regenerate(messageId) : kind === 'continue' ? client.continue(messageId) : client.send(text, options)
  let stopping = false
  // Works in every state: while reconnecting the client cancels over HTTP and reconnects at once.
  const stop = () => {
    stopping = true
    stream.cancel()
    if (stream.state !== 'reconnecting') setStatus(reply, 'note', 'Stopping…')
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
    if (shownIn !== view) return
    // The messages' ids: the tree, reloaded at the end, finds their articles by them.
    if (start.messageId) {
      reply.article.dataset.messageId = start.messageId
      articles.set(start.messageId, reply)
    }
    if (user && start.userMessageId) {
      user.article.dataset.messageId = start.userMessageId
      articles.set(start.userMessageId, user)
    }
    if (conversationId === null) {
      // A new conversation now has an id: keep it in the URL without reloading it.
      conversationId = start.conversationId
      history.replaceState(null, '', '#c=' + encodeURIComponent(start.conversationId))
      refreshList()
    }
    learnContext(start.conversationId, { truncated: start.truncatedMessages ?? 0 })
  })
  stream.on('thinking', ({ text }) => {
    firstToken()
    reply.thinking.hidden = false
    thinkingText.appendData(text)
  })
  // The answer's text with a mark where each citation arrived (placeCitations makes them links).
  let marked = before
  stream.on('chunk', ({ text }) => {
    firstToken()
    marked += text
    reply.view.set(marked)
  })
  stream.on('citation', (citation) => {
    reply.citations.set(citation.index, citation)
    marked += citationMark(citation.index)
    reply.view.set(marked)
  })
  stream.on('search', (search) => {
    firstToken()
    showSearch(reply, search)
    keepScrolledDown()
  })
  stream.on('search_results', (results) => showSearchResults(reply, results))
  stream.on('tool_input', ({ id, partialJson }) => {
    firstToken()
    const box = toolBox(reply, id)
    box.typed += partialJson
    box.input.textContent = box.typed
    keepScrolledDown()
  })
  stream.on('tool_use', (use) => {
    firstToken()
    showToolUse(reply, use)
    keepScrolledDown()
  })
  stream.on('tool_result', (result) => {
    showToolResult(reply, result)
    keepScrolledDown()
  })
  // The client resumes a lost connection by itself; the answer goes on where it stopped.
  stream.on('reconnecting', ({ attempt }) => {
    reply.article.dataset.state = 'reconnecting'
    const tries = attempt > 1 ? ` (try ${attempt})` : ''
    setStatus(reply, 'reconnecting', `${stopping ? 'Stopping. ' : ''}Connection lost. Reconnecting…${tries}`)
    status.textContent = 'Connection lost. Reconnecting…'
  })
  stream.on('reconnected', ({ transport }) => {
    reply.article.dataset.state = 'streaming'
    $('transport').value = transport
    if (stopping) setStatus(reply, 'note', 'Stopping…')
    else reply.status.hidden = true
    status.textContent = 'Reconnected.'
  })
  stream.on('cost', (cost) => {
    setMeta(reply, cost)
    if (cost.contextWindow && stream.conversationId) {
      learnContext(stream.conversationId,
        { tokens: cost.contextTokens, window: cost.contextWindow, truncated: cost.truncatedMessages ?? 0 })
    }
    if (shownIn === view && cost.totalCost != null) addToTotal(cost.totalCost)
  })

  const result = await stream.done
  const doneAt = performance.now()
  reply.view.flush()
  reply.status.hidden = true
  const state = result.error ? 'error' : result.stopReason === 'cancelled' ? 'cancelled' : 'complete'
  reply.article.dataset.state = state
  reply.article.removeAttribute('aria-busy')
  if (result.messageId) reply.article.dataset.messageId = result.messageId
  if (result.error) {
    const { code, message, retryable, retryAfter } = result.error
    const advice = retryable ? (retryAfter ? ` Try again in ${retryAfter} s.` : ' Try again.') : ''
    setStatus(reply, 'error', `${message.replace(/\.?$/, '.')}${advice} (${code})`)
    reply.status.dataset.code = code
  } else if (state === 'cancelled') setStatus(reply, 'note', 'Stopped.')
  else if (result.stopReason === 'max_tokens') setStatus(reply, 'note', 'Cut off at the length limit.')
  $('transport').value = stream.transport
  const outputTokens = result.cost?.outputTokens
  if (firstAt !== null && outputTokens && doneAt > firstAt) {
    $('tokens-per-second').value = `${(outputTokens / ((doneAt - firstAt) / 1000)).toFixed(1)} tok/s`
  }
  status.textContent = state === 'complete' ? 'Answer complete.' : state === 'cancelled' ? 'Answer stopped.' : 'Answer failed.'
  setActive(null)
  // A command refused before it started (busy, not_continuable, a limit) made no message: its error stays on
  // screen rather than the tree, which has nothing of it.
  if (shownIn === view && conversationId !== null && stream.streamId) await reloadTree()
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
  const attachments = pending
  pending = []
  showPending()
  answer({ kind: 'send', text, attachments })
})

// Attachments: the button, a drop onto the composer, or images pasted into the message.
attachButton.addEventListener('click', () => attachInput.click())
attachInput.addEventListener('change', () => {
  addPending([...attachInput.files])
  attachInput.value = ''
  input.focus()
})
form.addEventListener('dragover', (event) => {
  if (![...(event.dataTransfer?.types ?? [])].includes('Files')) return
  event.preventDefault()
  form.dataset.dropping = 'true'
})
form.addEventListener('dragleave', (event) => {
  if (!form.contains(event.relatedTarget)) delete form.dataset.dropping
})
form.addEventListener('drop', (event) => {
  delete form.dataset.dropping
  if (!event.dataTransfer?.files.length) return
  event.preventDefault()
  addPending([...event.dataTransfer.files])
})
input.addEventListener('paste', (event) => {
  const files = [...(event.clipboardData?.files ?? [])].filter((file) => file.type.startsWith('image/'))
  if (!files.length) return
  event.preventDefault()
  addPending(files)
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

// A message's controls, and a code block's copy button (markdown.js makes it).
messages.addEventListener('click', (event) => {
  const copyCode = event.target.closest('.copy-code')
  // marked ends a code block with a line end that is not part of the code.
  if (copyCode) return copyText(copyCode.parentElement.querySelector('code').textContent.replace(/\n$/, ''), copyCode)
  const button = event.target.closest('.message-actions [data-action]')
  const article = button?.closest('[data-message-id]')
  const message = article && tree.get(article.dataset.messageId)
  if (!message) return
  const shown = articles.get(message.id)
  const action = button.dataset.action
  if (action === 'copy') return copyText(shown.view ? plainText(shown.view.text) : message.content, button)
  if (active) return // one answer at a time; the controls are back when it is done
  if (action === 'previous' || action === 'next') return switchSibling(message, action === 'next' ? 1 : -1)
  if (action === 'edit') return startEdit(shown, message)
  if (action === 'regenerate') {
    cutAfter(article.previousElementSibling)
    return answer({ kind: 'regenerate', messageId: message.id })
  }
  if (action === 'continue') {
    cutAfter(article)
    return answer({ kind: 'continue', messageId: message.id })
  }
})

/** Shows the sibling `step` away from `message` and the newest branch under it (the server's choice). */
async function switchSibling(message, step) {
  const siblings = siblingsOf(message)
  const target = siblings[siblings.findIndex((m) => m.id === message.id) + step]
  if (!target) return
  const shownIn = view
  try {
    const body = await api.setActiveLeaf(conversationId, target.id)
    if (shownIn !== view) return
    learnTree(body)
    showPath()
  } catch (error) {
    status.textContent = `Could not switch: ${error.message}`
  }
}

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

list.addEventListener('click', (event) => {
  const button = event.target.closest('[data-action]')
  const item = event.target.closest('li.conversation')
  if (button?.dataset.action === 'rename') startRename(item)
  else if (button?.dataset.action === 'delete') confirmDelete(item)
  else if (event.target.closest('a')) closeSidebar()
})

// The title search: the list again once typing pauses.
let searchTimer = null
search.addEventListener('input', () => {
  clearTimeout(searchTimer)
  searchTimer = setTimeout(() => {
    listQuery = search.value.trim()
    refreshList()
  }, 200)
})

loadOlderButton.addEventListener('click', loadOlder)

$('new-conversation').addEventListener('click', () => {
  if (location.hash) history.pushState(null, '', location.pathname + location.search)
  showNewConversation()
  closeSidebar()
  input.focus()
})

function showNewConversation() {
  emptyState.textContent = 'Ask something to start a conversation.'
  showConversation(null, 'New conversation')
}

function closeSidebar() {
  app.dataset.sidebar = 'closed'
  toggleSidebar.setAttribute('aria-expanded', 'false')
}

toggleSidebar.addEventListener('click', () => {
  const open = app.dataset.sidebar !== 'open'
  app.dataset.sidebar = open ? 'open' : 'closed'
  toggleSidebar.setAttribute('aria-expanded', String(open))
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
