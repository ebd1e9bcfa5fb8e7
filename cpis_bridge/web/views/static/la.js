// Progressive enhancement for the duty-team view: GOV.UK Frontend's components. Pages work without it.
import { initAll } from './govuk/govuk-frontend.min.js'

document.body.classList.add('js-enabled', 'govuk-frontend-supported')
initAll()
