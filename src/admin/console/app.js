// The console's shell: login, navigation (the URL's #fragment names the view), notices and
// the Reload config button. The views are in views.js.

import { call, setToken, token, whenUnauthorized } from './api.js';
import { h } from './dom.js';
import * as views from './views.js';

const VIEWS = {
  overview: views.overview,
  clients: views.clients,
  subscriptions: views.subscriptions,
  retained: views.retained,
  rules: views.rules,
  'dead-letters': views.deadLetters,
  tester: views.tester,
  trace: views.trace,
};

const main = document.getElementById('main');
const notice = document.getElementById('notice');
const login = document.getElementById('login');
let unmount = () => {};
let noticeTimer = null;

const ui = {
  notify(text, kind = '') {
    notice.textContent = text;
    notice.className = kind;
    notice.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { notice.hidden = true; }, kind === 'bad' ? 12000 : 6000);
  },
};
notice.addEventListener('click', () => { notice.hidden = true; });

function show() {
  const name = location.hash.slice(1) || 'overview';
  const view = VIEWS[name] || VIEWS.overview;
  unmount();
  for (const a of document.querySelectorAll('#nav a')) {
    a.classList.toggle('active', a.dataset.view === name);
  }
  unmount = view(main, ui) || (() => {});
}

function askToken(message) {
  unmount();
  unmount = () => {};
  main.replaceChildren();
  const err = document.getElementById('login-error');
  err.hidden = !message;
  err.textContent = message || '';
  if (!login.open) login.showModal();
  document.getElementById('token').focus();
}

whenUnauthorized(() => {
  setToken('');
  askToken('The token was refused.');
});

document.getElementById('login-form').addEventListener('submit', async e => {
  e.preventDefault();
  const input = document.getElementById('token');
  setToken(input.value.trim());
  const r = await call('GET', '/api/v1/overview');
  if (r.status === 401) return; // whenUnauthorized asked again
  if (!r.ok) {
    askToken(`The gateway answered ${r.status}: ${r.data.error || ''}`);
    return;
  }
  input.value = '';
  login.close();
  show();
});

document.getElementById('logout').addEventListener('click', () => {
  setToken('');
  askToken('');
});

// What a reload's `changed` says, as lines: the non-empty lists, true flags and non-zero
// counts, by their path (`rules.added: a, b`).
function summary(changed, prefix = '') {
  const out = [];
  for (const [k, v] of Object.entries(changed)) {
    const name = prefix + k;
    if (Array.isArray(v)) {
      if (v.length) out.push(`${name}: ${v.join(', ')}`);
    } else if (v && typeof v === 'object') {
      out.push(...summary(v, `${name}.`));
    } else if (v === true || (typeof v === 'number' && v !== 0 && !name.endsWith('kept'))) {
      out.push(`${name}: ${v}`);
    }
  }
  return out;
}

// POST /api/v1/reload and what it answered: 200 reloaded (hash, what changed), 409 keys
// that need a restart (nothing changed), 400 an invalid file (nothing changed).
document.getElementById('reload').addEventListener('click', async e => {
  const button = e.currentTarget;
  button.disabled = true;
  try {
    const r = await call('POST', '/api/v1/reload');
    const d = r.data;
    if (r.status === 200) {
      const changes = summary(d.changed || {});
      ui.notify(`Config reloaded (hash ${String(d.hash).slice(0, 12)}…)\n${changes.length ? changes.join('\n') : 'nothing changed'}`, 'ok');
    } else if (r.status === 409) {
      ui.notify(`Not reloaded: these keys need a restart: ${(d.keys || []).join(', ')}`, 'bad');
    } else if (r.status === 400) {
      ui.notify(`Not reloaded: the config is invalid:\n${d.error}`, 'bad');
    } else if (r.status === 404 || r.status === 405) {
      ui.notify('This gateway has no reload API (POST /api/v1/reload).', 'bad');
    } else if (r.status === 500) {
      ui.notify(`Not reloaded: ${d.error || d.result}`, 'bad');
    } else if (r.status !== 401) {
      ui.notify(`Reload failed: ${r.status} ${d.error || d.result || ''}`, 'bad');
    }
  } catch (err) {
    ui.notify(`Reload failed: ${err.message}`, 'bad');
  } finally {
    button.disabled = false;
  }
});

window.addEventListener('hashchange', show);

// Without a token configured the API is open (loopback only): no login needed then.
(async () => {
  const r = await call('GET', '/api/v1/overview').catch(() => ({ status: 0 }));
  if (r.status === 200) show();
  else if (r.status !== 401) askToken(token() ? '' : '');
})();

export { h };
