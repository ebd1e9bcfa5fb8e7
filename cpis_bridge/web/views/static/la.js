// Progressive enhancement for the duty-team view: GOV.UK Frontend's components, and new notifications added to the
// first page as they arrive (Server-Sent Events). Every page works without it.
import { initAll } from './govuk/govuk-frontend.min.js'

document.body.classList.add('js-enabled', 'govuk-frontend-supported')
initAll()

const table = document.querySelector('table[data-live]')
const announce = document.getElementById('live')
if (table && announce && window.EventSource) {
  const source = new EventSource(table.dataset.live)
  source.addEventListener('ready', () => { table.dataset.liveReady = 'true' })
  source.addEventListener('notification', (event) => {
    const n = JSON.parse(event.data)
    const row = document.createElement('tr')
    row.className = 'govuk-table__row'
    const cell = (content) => {
      const td = document.createElement('td')
      td.className = 'govuk-table__cell'
      td.append(content)
      row.append(td)
    }
    const link = document.createElement('a')
    link.className = 'govuk-link'
    link.href = n.href
    link.textContent = n.seen
    const hidden = document.createElement('span')
    hidden.className = 'govuk-visually-hidden'
    hidden.textContent = ': open notification'
    link.append(hidden)
    cell(link)
    cell(n.nhs)
    cell(n.where)
    cell(n.plans)
    const tag = document.createElement('strong')
    tag.className = 'govuk-tag govuk-tag--red'
    tag.textContent = 'New'
    cell(tag)
    table.tBodies[0].prepend(row)
    document.getElementById('notifications-empty')?.remove()
    announce.textContent = `New notification: a child seen at ${n.where}, ${n.seen}.`
  })
}
