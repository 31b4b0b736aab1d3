// Small DOM helpers: elements from plain data (text is always set as text, never as HTML),
// tables, numbers and times.

// h('tag.class#id', {attr: value, onclick: f}, child, ...): an element. Children are nodes,
// strings (text nodes) or arrays of those; null and undefined are skipped.
export function h(spec, attrs, ...children) {
  const m = spec.match(/^([a-z0-9]+)?((?:[.#][\w-]+)*)$/i);
  const el = document.createElement((m && m[1]) || 'div');
  for (const part of ((m && m[2]) || '').match(/[.#][\w-]+/g) || []) {
    if (part[0] === '.') el.classList.add(part.slice(1));
    else el.id = part.slice(1);
  }
  if (attrs && (typeof attrs !== 'object' || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k in el && typeof v !== 'string') el[k] = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  append(el, children);
  return el;
}

// Replaces the children of `el` (arrays flattened, as h() does).
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

// A table: columns [{title, cell: row => node|text, num}], rows; `empty` when none.
export function table(columns, rows, { empty = 'Nothing here.', rowAttrs } = {}) {
  if (!rows.length) return h('p.empty', empty);
  return h('table',
    h('thead', h('tr', columns.map(c => h(c.num ? 'th.num' : 'th', c.title)))),
    h('tbody', rows.map(r => h('tr', rowAttrs ? rowAttrs(r) : null,
      columns.map(c => h(c.num ? 'td.num' : (c.cls ? `td.${c.cls}` : 'td'), c.cell(r)))))));
}

// Key/value list.
export function kv(pairs) {
  return h('dl.kv', pairs.filter(p => p).map(([k, v]) => [h('dt', k), h('dd', v ?? '—')]));
}

export function bytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function count(n) {
  return n === null || n === undefined ? '—' : Number(n).toLocaleString('en-US');
}

export function rate(r) {
  if (r === null || r === undefined || Number.isNaN(r)) return '…';
  return r >= 100 ? `${Math.round(r).toLocaleString('en-US')}/s` : `${r.toFixed(1)}/s`;
}

export function duration(s) {
  if (s === null || s === undefined) return 'never';
  const d = Math.floor(s / 86400), hh = Math.floor(s % 86400 / 3600), mm = Math.floor(s % 3600 / 60);
  if (d) return `${d}d ${hh}h`;
  if (hh) return `${hh}h ${mm}m`;
  if (mm) return `${mm}m ${s % 60}s`;
  return `${s}s`;
}

export function time(iso) {
  if (!iso) return '—';
  const t = new Date(iso);
  return Number.isNaN(t.getTime()) ? iso : t.toLocaleString();
}

export function badge(ok, yes, no) {
  return h(ok ? 'span.badge.ok' : 'span.badge.bad', ok ? yes : no);
}

// Rates from successive counter readings: rates.rate(key, total) is per second since the
// last reading of `key` (null on the first).
export class Rates {
  constructor() { this.last = new Map(); }
  rate(key, total) {
    const now = performance.now();
    const prev = this.last.get(key);
    this.last.set(key, { total, now });
    if (!prev || now <= prev.now) return null;
    return Math.max(0, (total - prev.total) * 1000 / (now - prev.now));
  }
}
