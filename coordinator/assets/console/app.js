// The console's entry point: reports script errors visibly, checks the session, and routes
// `#/` (sweeps), `#/sweep/ID` and `#/workers` to their pages.

import { api, el, fill, HttpError, session } from './dom.js';
import { renderLogin, renderSweeps, renderWorkers } from './pages.js';
import { renderSweep } from './sweep.js';

const errors = document.getElementById('errors');
function report(message) {
  errors.hidden = false;
  errors.append(`${message}\n`);
}
window.addEventListener('error', (event) => report(`error: ${event.message}`));
window.addEventListener('unhandledrejection', (event) => {
  const reason = event.reason;
  if (reason instanceof HttpError && reason.status === 401) { start(); return; }
  report(`error: ${reason && reason.message ? reason.message : reason}`);
});

const main = document.getElementById('main');
let leave = null;

function who() {
  const node = document.getElementById('who');
  if (!session.required) { fill(node, 'open (no tokens)'); return; }
  const out = el('button', { class: 'secondary', id: 'logout', onclick: async () => { await api('/api/logout', { method: 'POST' }); session.role = null; start(); } }, 'Sign out');
  fill(node, `signed in: ${session.role} `, out);
}

function route() {
  if (leave) { leave(); leave = null; }
  const hash = location.hash || '#/';
  const [path, search] = hash.slice(1).split('?');
  const params = new URLSearchParams(search || '');
  const sweep = path.match(/^\/sweep\/(.+)$/);
  if (sweep) leave = renderSweep(main, decodeURIComponent(sweep[1]));
  else if (path === '/workers') leave = renderWorkers(main);
  else leave = renderSweeps(main, params);
}

async function start() {
  if (leave) { leave(); leave = null; }
  Object.assign(session, await api('/api/session'));
  if (session.required && !session.role) {
    fill(document.getElementById('who'));
    renderLogin(main, start);
    return;
  }
  who();
  route();
}

window.addEventListener('hashchange', () => { if (!session.required || session.role) route(); });
start();
