// The usage page: totals, cost per day as a bar chart, and tables by model, agent and (admins) user.
// Everything comes from GET /api/usage; numbers are inserted as text, costs shown exactly as the API gives them.

const $ = (id) => document.getElementById(id)
const SVG = 'http://www.w3.org/2000/svg'
const integer = new Intl.NumberFormat('en-US')

function isoDay(date) {
  return date.toISOString().slice(0, 10)
}

async function getUsage(params) {
  const res = await fetch(`/api/usage?${new URLSearchParams(params)}`, { headers: { Accept: 'application/json' } })
  const body = await res.json().catch(() => null)
  if (res.status === 401) {
    location.href = '/' // the chat page signs in
    throw new Error('sign in first')
  }
  if (!res.ok) throw new Error(body?.error?.message || `HTTP ${res.status}`)
  return body
}

function svg(name, attributes, text) {
  const node = document.createElementNS(SVG, name)
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value))
  if (text !== undefined) node.textContent = text
  return node
}

/** A bar per day; the exact cost of each is in its tooltip and in the totals. */
function drawChart(rows) {
  const width = 720
  const height = 240
  const left = 56
  const bottom = 24
  const top = 12
  const plotWidth = width - left - 8
  const plotHeight = height - top - bottom
  const values = rows.map((row) => Number(row.cost)) // for bar heights only; labels use the exact strings
  const max = Math.max(...values, 0)
  const chart = svg('svg', { viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-labelledby': 'chart-desc' })
  const spent = rows.filter((row) => row.messages > 0).length
  chart.append(svg('desc', { id: 'chart-desc' },
    `Cost per day from ${rows[0]?.key} to ${rows.at(-1)?.key}: ${spent} of ${rows.length} days had answers.`))
  for (const fraction of [0, 0.5, 1]) {
    const y = top + plotHeight * (1 - fraction)
    chart.append(svg('line', { class: 'grid', x1: left, x2: width - 8, y1: y, y2: y }))
    chart.append(svg('text', { x: left - 6, y: y + 4, 'text-anchor': 'end' },
      max === 0 ? (fraction === 0 ? '$0' : '') : `$${(max * fraction).toPrecision(2)}`))
  }
  const slot = plotWidth / Math.max(rows.length, 1)
  rows.forEach((row, index) => {
    const barHeight = max === 0 ? 0 : (values[index] / max) * plotHeight
    const bar = svg('rect', {
      class: 'bar', 'data-testid': 'chart-bar', 'data-day': row.key, 'data-cost': row.cost,
      x: left + index * slot + slot * 0.15, width: Math.max(slot * 0.7, 1),
      y: top + plotHeight - barHeight, height: Math.max(barHeight, row.messages > 0 ? 1 : 0),
    })
    bar.append(svg('title', {}, `${row.key}: $${row.cost}, ${row.messages} answers`))
    chart.append(bar)
  })
  const labelled = rows.length > 1 ? [0, Math.floor((rows.length - 1) / 2), rows.length - 1] : [0]
  for (const index of new Set(labelled)) {
    if (!rows[index]) continue
    chart.append(svg('text', { x: left + index * slot + slot / 2, y: height - 6, 'text-anchor': 'middle' },
      rows[index].key.slice(5)))
  }
  $('chart').replaceChildren(chart)
}

/** An exact decimal string from the API as dollars; a model without a price has none. */
function money(value) {
  return value === null || value === undefined ? '–' : `$${value}`
}

function fillTable(testid, rows) {
  const body = document.querySelector(`[data-testid=${testid}] tbody`)
  body.replaceChildren(...rows.map((row) => {
    const tr = document.createElement('tr')
    for (const value of [row.key, integer.format(row.messages), integer.format(row.inputTokens),
      integer.format(row.outputTokens), integer.format(row.cacheReadInputTokens), money(row.cacheSavings),
      money(row.cost)]) {
      const cell = document.createElement(tr.children.length === 0 ? 'th' : 'td')
      if (tr.children.length === 0) cell.scope = 'row'
      cell.textContent = value
      tr.append(cell)
    }
    return tr
  }))
  if (rows.length === 0) {
    const tr = document.createElement('tr')
    const cell = document.createElement('td')
    cell.colSpan = 7
    cell.textContent = 'No answers in this range.'
    tr.append(cell)
    body.append(tr)
  }
}

async function show(from, to) {
  const status = $('usage-status')
  status.textContent = 'Loading…'
  try {
    const [byDay, byModel, byAgent] = await Promise.all(
      ['day', 'model', 'agent'].map((groupBy) => getUsage({ from, to, groupBy })))
    $('total-cost').textContent = money(byDay.total.cost)
    $('total-messages').textContent = integer.format(byDay.total.messages)
    $('total-input').textContent = integer.format(byDay.total.inputTokens)
    $('total-output').textContent = integer.format(byDay.total.outputTokens)
    $('total-cache-read').textContent = integer.format(byDay.total.cacheReadInputTokens)
    $('total-savings').textContent = money(byDay.total.cacheSavings)
    drawChart(byDay.rows)
    fillTable('by-model', byModel.rows)
    fillTable('by-agent', byAgent.rows)
    const everyone = byDay.scope === 'all'
    $('by-user-section').hidden = !everyone
    if (everyone) fillTable('by-user', (await getUsage({ from, to, groupBy: 'user' })).rows)
    status.textContent = everyone ? 'Showing every user.' : ''
    document.body.dataset.loaded = 'true'
  } catch (error) {
    status.textContent = `Could not load usage: ${error.message}`
  }
}

const today = new Date()
const params = new URLSearchParams(location.search)
$('to').value = params.get('to') || isoDay(today)
$('from').value = params.get('from') || isoDay(new Date(today.getTime() - 29 * 86400000))
$('range').addEventListener('submit', (event) => {
  event.preventDefault()
  history.replaceState(null, '', `?from=${$('from').value}&to=${$('to').value}`)
  show($('from').value, $('to').value)
})
show($('from').value, $('to').value)
