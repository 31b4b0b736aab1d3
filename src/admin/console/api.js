// The admin API as the console uses it: JSON calls and the live trace's event stream, each
// with `Authorization: Bearer TOKEN` (the token is kept in sessionStorage: this tab only).

const KEY = 'mqgate.token';

export function token() {
  return sessionStorage.getItem(KEY) || '';
}

export function setToken(value) {
  if (value) sessionStorage.setItem(KEY, value);
  else sessionStorage.removeItem(KEY);
}

// Called with no argument when the server answers 401 (wrong or missing token).
let onUnauthorized = () => {};
export function whenUnauthorized(f) {
  onUnauthorized = f;
}

function headers(extra) {
  const h = { Accept: 'application/json', ...extra };
  const t = token();
  if (t) h.Authorization = `Bearer ${t}`;
  return h;
}

// One call: resolves to {status, ok, data} (data: the JSON answer, or {error: text}).
// Requests that change state carry `Content-Type: application/json`, as the guard wants.
export async function call(method, path, body) {
  const write = method !== 'GET' && method !== 'HEAD';
  const res = await fetch(path, {
    method,
    headers: headers(write ? { 'Content-Type': 'application/json' } : {}),
    body: body === undefined ? (write ? '' : undefined) : JSON.stringify(body),
    cache: 'no-store',
    credentials: 'omit',
  });
  const text = await res.text();
  let data;
  try {
    data = text ? JSON.parse(text) : {};
  } catch {
    data = { error: text.trim() || res.statusText };
  }
  if (res.status === 401) onUnauthorized();
  return { status: res.status, ok: res.ok, data };
}

// GET that throws on failure (for views that only read).
export async function get(path) {
  const r = await call('GET', path);
  if (!r.ok) throw new Error(`${path}: ${r.status} ${r.data.error || ''}`.trim());
  return r.data;
}

// A query string from an object, skipping empty values.
export function qs(params) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== '') p.set(k, String(v));
  }
  const s = p.toString();
  return s ? `?${s}` : '';
}

// Server-sent events over fetch (EventSource cannot send the Authorization header). Calls
// onEvent(name, data) per event until `signal` aborts or the server ends the stream.
// The buffer of an unfinished event is bounded: a line longer than 1 MiB is dropped.
export async function stream(path, onEvent, signal) {
  const res = await fetch(path, {
    headers: headers({ Accept: 'text/event-stream' }),
    cache: 'no-store',
    credentials: 'omit',
    signal,
  });
  if (res.status === 401) onUnauthorized();
  if (!res.ok) {
    const text = await res.text();
    let message = text;
    try { message = JSON.parse(text).error; } catch { /* plain text */ }
    throw new Error(`${res.status}: ${message}`);
  }
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n/g, '\n');
    let end;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let name = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith(':')) continue; // keep-alive comment
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'event') name = val;
        else if (field === 'data') data.push(val);
      }
      if (data.length) onEvent(name, data.join('\n'));
    }
    if (buf.length > 1 << 20) buf = '';
  }
}
