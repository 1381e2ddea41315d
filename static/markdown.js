// Model output as Markdown, never trusted: marked (static/vendor/marked.esm.js) turns the text into HTML in
// which every piece of raw HTML the text contained is escaped, so it shows as text; only http(s) and mailto
// links become links, and images become links to them (the page's CSP loads no image from elsewhere);
// DOMPurify (static/vendor/purify.es.js) then keeps only the elements and attributes Markdown makes. No
// inline script or style comes out of here, so the page's CSP stays as strict as it is.

import { Marked } from './vendor/marked.esm.js'
import DOMPurify from './vendor/purify.es.js'

const ESCAPES = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }
const escapeHTML = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c])

/** `href` as a link may carry it (http, https or mailto, absolute), or null: javascript:, data:, relative... */
export function safeHref(href) {
  const text = String(href ?? '').trim()
  if (!/^(?:https?:\/\/|mailto:)/i.test(text)) return null
  try {
    const url = new URL(text)
    return ['http:', 'https:', 'mailto:'].includes(url.protocol) ? url.href : null
  } catch {
    return null
  }
}

const markdown = new Marked({
  gfm: true,
  async: false,
  renderer: {
    // Raw HTML in the text (a block or inline tag, a comment) is text to show, never markup.
    html({ text, block }) {
      return block ? `<p>${escapeHTML(text.trim())}</p>` : escapeHTML(text)
    },
    link({ href, title, tokens }) {
      const inner = this.parser.parseInline(tokens)
      const url = safeHref(href)
      if (!url) return inner
      return `<a href="${escapeHTML(url)}"${title ? ` title="${escapeHTML(title)}"` : ''}>${inner}</a>`
    },
    // An image is not loaded: it is a link to it, named by its alt text.
    image({ href, text }) {
      const url = safeHref(href)
      const label = escapeHTML(text || 'image')
      return url ? `<a href="${escapeHTML(url)}" class="image-link">${label}</a>` : label
    },
    checkbox({ checked }) {
      return checked ? '☑ ' : '☐ '
    },
  },
})

// What marked makes of Markdown, and nothing else: no form, no input, no img, no style.
const SANITIZE = {
  ALLOWED_TAGS: ['a', 'blockquote', 'br', 'code', 'del', 'em', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'hr', 'li',
    'ol', 'p', 'pre', 'strong', 'table', 'tbody', 'td', 'th', 'thead', 'tr', 'ul'],
  // DOMPurify's own URI check stays (its ALLOWED_URI_REGEXP would test every attribute, align too); the
  // links' schemes are narrowed to http, https and mailto below.
  ALLOWED_ATTR: ['href', 'title', 'class', 'align', 'start'],
  RETURN_DOM_FRAGMENT: true,
}

/**
 * `text` rendered as Markdown: a DocumentFragment of sanitized elements. Links open in a new tab without
 * an opener or a referrer; each code block has a copy button (`.copy-code`, its text copied by the page);
 * tables scroll sideways inside their own box.
 */
export function renderMarkdown(text) {
  const fragment = DOMPurify.sanitize(markdown.parse(text), SANITIZE)
  // The line ends between blocks are not text of the answer (its textContent is the text shown).
  for (const node of [...fragment.childNodes]) if (node.nodeType === Node.TEXT_NODE && !node.data.trim()) node.remove()
  for (const link of fragment.querySelectorAll('a')) {
    // DOMPurify checked the scheme already; this is the second lock on the same door.
    if (!safeHref(link.getAttribute('href'))) {
      link.replaceWith(...link.childNodes)
      continue
    }
    link.target = '_blank'
    link.rel = 'noopener noreferrer nofollow'
  }
  for (const pre of fragment.querySelectorAll('pre')) {
    const block = document.createElement('div')
    block.className = 'code-block'
    const copy = document.createElement('button')
    copy.type = 'button'
    copy.className = 'button button-quiet copy-code'
    copy.dataset.testid = 'copy-code'
    copy.textContent = 'Copy'
    pre.replaceWith(block)
    block.append(copy, pre)
  }
  for (const table of fragment.querySelectorAll('table')) {
    const box = document.createElement('div')
    box.className = 'table-box'
    table.replaceWith(box)
    box.append(table)
  }
  return fragment
}

/**
 * Shows Markdown text in `element`, rendering at most once per animation frame however often set() is
 * called: a stream of tokens costs one parse and one DOM update a frame. An update keeps the element's
 * leading children that are unchanged (the finished paragraphs) and replaces only the rest, so earlier
 * blocks neither flicker nor lose a selection. `onRender` runs after each update (to keep a pane scrolled).
 * `decorate(fragment)`, if given, changes each rendering before it is compared and shown (the page's citations).
 */
export function markdownView(element, onRender, decorate) {
  let text = ''
  let shown = null
  let frame = 0
  const render = () => {
    frame = 0
    if (text === shown) return
    shown = text
    const fragment = renderMarkdown(text)
    decorate?.(fragment)
    update(element, fragment)
    onRender?.()
  }
  return {
    get text() {
      return text
    },
    /** The whole text so far; it is on screen by the next frame. */
    set(value) {
      text = value
      frame ||= requestAnimationFrame(render)
    },
    /** Renders now (the stream ended): what is on screen is the whole text. */
    flush() {
      if (frame) cancelAnimationFrame(frame)
      render()
    },
  }
}

function update(element, fragment) {
  const next = [...fragment.childNodes]
  const now = [...element.childNodes]
  let same = 0
  while (same < next.length && same < now.length && now[same].isEqualNode(next[same])) same++
  for (const node of now.slice(same)) node.remove()
  element.append(...next.slice(same))
}
