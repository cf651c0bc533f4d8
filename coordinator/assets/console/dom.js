// DOM building and API calls shared by the pages. Everything a user or worker wrote is put on
// the page as text (textContent or attribute values), never parsed as HTML.

/** Builds an element: attributes (on* become listeners), then children (strings become text). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  append(node, children);
  return node;
}

/** Appends children (nodes, or values shown as text). */
export function append(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Replaces a node's children. */
export function fill(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

/** Who is signed in: role `client` or `viewer`, and the session's CSRF token. */
export const session = { required: false, role: null, csrf: null };

/** An API call that failed with an HTTP status. */
export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Calls the JSON API; POSTs carry the session's CSRF token. */
export async function api(path, options = {}) {
  const method = options.method || 'GET';
  const headers = {};
  if (method !== 'GET') {
    headers['content-type'] = 'application/json';
    if (session.csrf) headers['x-csrf-token'] = session.csrf;
  }
  const response = await fetch(path, { method, headers, body: options.body, credentials: 'same-origin' });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    data = null;
  }
  if (!response.ok) throw new HttpError(response.status, (data && data.error) || response.statusText);
  return data;
}

/** A query string from the non-empty values of `params`. */
export function qs(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== '') search.set(key, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : '';
}

/** A number for a table: 4 significant digits, or scientific when tiny or huge. */
export function num(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return '–';
  const magnitude = Math.abs(value);
  if (magnitude !== 0 && (magnitude < 1e-3 || magnitude >= 1e5)) return value.toExponential(3);
  return Number(value.toPrecision(4)).toString();
}

/** Seconds as `1h 02m`, `3m 05s` or `12s`. */
export function duration(seconds) {
  if (seconds === null || seconds === undefined) return '–';
  const s = Math.round(seconds);
  if (s >= 3600) return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
  if (s >= 60) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, '0')}s`;
  return `${s}s`;
}

/** A Unix time in milliseconds as local date and time. */
export function time(ms) {
  if (!ms) return '–';
  return new Date(ms).toLocaleString();
}

/** A state badge. */
export function badge(state) {
  return el('span', { class: `badge ${state}` }, state);
}

/** Calls `run` at most once per `ms`, after the last of a burst of calls. */
export function debounce(ms, run) {
  let timer = null;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(run, ms);
  };
}
