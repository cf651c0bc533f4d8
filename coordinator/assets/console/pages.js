// The sign-in form, the sweeps list and the workers page.

import { api, badge, debounce, duration, el, fill, HttpError, num, qs, session, time } from './dom.js';

const PAGE = 50;

/** The sign-in form: the client or the viewer token, kept as an HttpOnly session cookie. */
export function renderLogin(main, onSignedIn) {
  const token = el('input', { type: 'password', id: 'token', placeholder: 'client or viewer token', autocomplete: 'off' });
  const message = el('p', { id: 'login-error', class: 'error' });
  const form = el('form', { class: 'card login', id: 'login' },
    el('h1', {}, 'Sign in'),
    el('p', { class: 'muted' }, 'Paste the client token (full rights) or the viewer token (read only).'),
    token, el('button', { type: 'submit' }, 'Sign in'), message);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    try {
      const answer = await api('/api/login', { method: 'POST', body: JSON.stringify({ token: token.value }) });
      Object.assign(session, answer);
      onSignedIn();
    } catch (error) {
      message.textContent = error instanceof HttpError && error.status === 401 ? 'That token is not accepted.' : error.message;
    }
  });
  fill(main, form);
  token.focus();
}

function stageSummary(stages) {
  return el('div', { class: 'stagelist' }, stages.map((stage) => el('div', {},
    el('progress', { max: stage.total || 1, value: stage.ended }),
    ` ${stage.stage} ${stage.ended}/${stage.total}`)));
}

/** The sweeps list: filter by state and name, a page at a time, refreshed when sweeps change. */
export function renderSweeps(main, params) {
  const offset = Number(params.get('offset') || 0);
  const state = params.get('state') || '';
  const q = params.get('q') || '';
  const stateSelect = el('select', { name: 'state', id: 'filter-state' },
    ['', 'running', 'succeeded', 'failed', 'cancelled'].map((s) => el('option', { value: s, selected: s === state }, s || 'any state')));
  const nameInput = el('input', { name: 'q', id: 'filter-name', placeholder: 'name or id', value: q });
  const form = el('form', { class: 'filters' }, stateSelect, nameInput, el('button', { type: 'submit' }, 'Filter'));
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    location.hash = `#/${qs({ state: stateSelect.value, q: nameInput.value })}`;
  });
  const body = el('tbody', { id: 'sweeps-body' });
  const pager = el('div', { class: 'pager' });
  fill(main, el('h1', {}, 'Sweeps'), form,
    el('table', { id: 'sweeps' }, el('thead', {}, el('tr', {}, ['Name', 'State', 'Progress by stage', 'Created', 'Duration', 'Winner'].map((h) => el('th', {}, h)))), body),
    pager);

  async function load() {
    const page = await api(`/api/sweeps${qs({ state, q, offset, limit: PAGE })}`);
    fill(body, page.sweeps.map((sweep) => el('tr', { 'data-sweep': sweep.id },
      el('td', {}, el('a', { href: `#/sweep/${encodeURIComponent(sweep.id)}`, class: 'sweep-name' }, sweep.name), el('div', { class: 'muted' }, sweep.id)),
      el('td', {}, badge(sweep.state)),
      el('td', {}, stageSummary(sweep.stages)),
      el('td', {}, time(sweep.created_ms)),
      el('td', {}, duration(sweep.duration_s)),
      el('td', {}, sweep.winner || '–'))));
    if (page.sweeps.length === 0) body.append(el('tr', {}, el('td', { colspan: 6, class: 'muted' }, 'No sweeps match.')));
    const go = (to) => { location.hash = `#/${qs({ state, q, offset: to })}`; };
    fill(pager,
      el('button', { class: 'secondary', disabled: offset === 0, onclick: () => go(Math.max(0, offset - PAGE)) }, 'Previous'),
      el('span', { class: 'muted' }, page.total === 0 ? '0 sweeps' : `${offset + 1}–${Math.min(offset + PAGE, page.total)} of ${page.total.toLocaleString()}`),
      el('button', { class: 'secondary', disabled: offset + PAGE >= page.total, onclick: () => go(offset + PAGE) }, 'Next'));
  }
  const events = new EventSource('/api/events?kinds=submitted,state');
  events.addEventListener('submitted', debounce(300, load));
  events.addEventListener('state', debounce(1000, load));
  events.addEventListener('lagged', debounce(1000, load));
  load();
  return () => events.close();
}

/** How a worker's life so far splits between its phases, largest first: "train 81% · data 9% · …". */
function phaseShares(phases) {
  const total = Object.values(phases).reduce((sum, seconds) => sum + seconds, 0);
  if (!(total > 0)) return '–';
  return Object.entries(phases)
    .sort((a, b) => b[1] - a[1])
    .filter(([, seconds]) => seconds / total >= 0.005)
    .map(([phase, seconds]) => `${phase} ${Math.round((100 * seconds) / total)}%`)
    .join(' · ');
}

/** The workers page: each worker, its device, what it runs, time by phase, when it was last heard of. */
export function renderWorkers(main) {
  const body = el('tbody', { id: 'workers-body' });
  const headings = ['Worker', 'Name', 'Device', 'Current trial', 'Epoch', 'Time by phase', 'Last seen'];
  fill(main, el('h1', {}, 'Workers'),
    el('table', { id: 'workers' }, el('thead', {}, el('tr', {}, headings.map((h) => el('th', {}, h)))), body));
  async function load() {
    const page = await api('/api/workers');
    fill(body, page.workers.map((worker) => {
      const trial = worker.trial;
      const device = worker.allow_commands ? `${worker.device || '?'} (commands)` : (worker.device || '?');
      return el('tr', {},
        el('td', {}, worker.id),
        el('td', {}, worker.name),
        el('td', { class: 'device' }, device),
        el('td', {}, trial ? el('a', { href: `#/sweep/${encodeURIComponent(trial.sweep_id)}` }, `${trial.name} (${trial.sweep_id})`) : 'idle'),
        el('td', {}, trial ? `${trial.epochs}/${trial.planned_epochs}` : '–'),
        el('td', { class: 'phases', title: JSON.stringify(worker.phases) }, phaseShares(worker.phases || {})),
        el('td', { class: 'num' }, `${num(worker.last_seen_s)} s ago`));
    }));
    if (page.workers.length === 0) body.append(el('tr', {}, el('td', { colspan: headings.length, class: 'muted' }, 'No worker has registered.')));
  }
  const events = new EventSource('/api/events?kinds=state,epochs');
  events.onmessage = null;
  const refresh = debounce(500, load);
  for (const kind of ['state', 'epochs', 'lagged']) events.addEventListener(kind, refresh);
  load();
  return () => events.close();
}
