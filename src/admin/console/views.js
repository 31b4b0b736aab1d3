// The console's views. Each is mount(main, ui) → unmount: it draws into `main`, refreshes
// itself while shown, and stops when unmounted. `ui.notify(text, kind)` shows a message.

import { call, get, qs, stream } from './api.js';
import { h, fill, table, kv, bytes, count, rate, duration, time, badge, Rates } from './dom.js';

const enc = encodeURIComponent;

// Runs `draw` now and every `ms` while mounted; errors are shown in `box`.
function poll(ms, draw, box) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    try {
      await draw();
    } catch (e) {
      fill(box, h('p.error', String(e.message || e)));
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}

function pager(next, go) {
  return next ? h('button.quiet.small', { type: 'button', onclick: () => go(next) }, 'Next page →') : null;
}

// ---------------------------------------------------------------- overview
const overviewRates = new Rates();

export function overview(main) {
  const box = h('div');
  fill(main, h('h2', 'Overview'), box);
  return poll(2000, async () => {
    const o = await get('/api/v1/overview');
    const r = (k, v) => overviewRates.rate(k, v);
    const c = o.connections;
    fill(box, 
      h('div.cards',
        h('div.card#card-connections', h('h3', 'Connections'),
          h('div.big', count(c.connected)), h('div.muted', `connected · ${count(c.parked)} parked · ${count(c.open)} open sockets`),
          h('div.muted', `accepted ${rate(r('accepted', c.accepted_total))}`)),
        h('div.card', h('h3', 'Messages in'),
          h('div.big', rate(r('received', o.messages.received_total))),
          h('div.muted', `${count(o.messages.received_total)} since start`)),
        h('div.card', h('h3', 'Delivered to subscribers'),
          h('div.big', rate(r('local', o.messages.delivered_local_total))),
          h('div.muted', `${count(o.messages.delivered_local_total)} since start`)),
        h('div.card', h('h3', 'Store'),
          o.store ? [h('div.big', bytes(o.store.bytes)), h('div.muted.mono', o.store.path),
            o.store.failure ? h('div.bad', o.store.failure) : null] : h('div.muted', 'no store configured'),
          h('div.muted', `${count(o.retained)} retained · ${o.dead_letters === null ? 'no' : count(o.dead_letters)} dead letters`)),
        h('div.card', h('h3', 'Gateway'),
          h('div.big', `v${o.version}`), h('div.muted', `up ${duration(o.uptime_seconds)}`),
          h('div.muted', `${o.traces.active}/${o.traces.max} traces · ${count(o.traces.dropped_total)} trace events dropped`))),
      h('div.split',
        h('div.panel', h('h3', 'Messages in and out, per rule and target'),
          table([
            { title: 'Rule', cell: t => t.rule },
            { title: 'In', num: true, cell: t => rate(r(`m:${t.rule}:${t.target}`, t.rule_matched_total)) },
            { title: 'Target', cell: t => h('span.mono', t.target) },
            { title: 'Forwarded', num: true, cell: t => rate(r(`f:${t.target}`, t.forwarded_total)) },
            { title: 'Failed', num: true, cell: t => {
              const x = r(`x:${t.target}`, t.failed_total);
              return h(x > 0 ? 'span.bad' : 'span', rate(x));
            } },
            { title: 'Total', num: true, cell: t => `${count(t.forwarded_total)} / ${count(t.failed_total)}` },
          ], o.targets, { empty: 'No rules.' })),
        h('div',
          h('div.panel', h('h3', 'Sinks'),
            table([
              { title: 'System', cell: s => s.name },
              { title: 'State', cell: s => [badge(s.ok, 'ok', 'down'), ' ', h('span.muted', s.state)] },
            ], o.systems, { empty: 'No AMQP brokers, HTTP endpoints or bridges.' })),
          h('div.panel', h('h3', 'Sources'),
            table([
              { title: 'Source', cell: s => s.name },
              { title: 'State', cell: s => badge(s.connected, 'consuming', 'down') },
              { title: 'Delivered', num: true, cell: s => rate(r(`s:${s.name}`, s.delivered_total)) },
            ], o.sources, { empty: 'No sources.' })),
          o.spools.length ? h('div.panel', h('h3', 'Spools'),
            table([
              { title: 'Target', cell: s => h('span.mono', s.target) },
              { title: 'Messages', num: true, cell: s => count(s.messages) },
              { title: 'Bytes', num: true, cell: s => bytes(s.bytes) },
            ], o.spools)) : null)));
  }, box);
}

// ---------------------------------------------------------------- clients
export function clients(main, ui) {
  // The subscriptions view links here with a client id to look for.
  let search = sessionStorage.getItem('mqgate.search') || '';
  sessionStorage.removeItem('mqgate.search');
  let after = '';
  let selected = null;
  const list = h('div.panel');
  const detail = h('div.panel#client-detail', h('p.empty', 'Select a client.'));
  const input = h('input#client-search', { type: 'search', value: search, placeholder: 'client id or user', oninput: () => { search = input.value.trim(); after = ''; refresh(); } });
  fill(main, h('h2', 'Clients'), h('div.toolbar', input, h('span.muted#client-count')), h('div.split', list, detail));

  async function disconnect(id) {
    if (!confirm(`Disconnect ${id}?`)) return;
    const r = await call('DELETE', `/api/v1/clients/${enc(id)}`);
    ui.notify(r.ok ? `Disconnected ${id}` : `Disconnect failed: ${r.data.error}`, r.ok ? 'ok' : 'bad');
    refresh();
  }

  async function show(id) {
    selected = id;
    const r = await call('GET', `/api/v1/clients/${enc(id)}`);
    if (!r.ok) {
      fill(detail, h('p.error', r.data.error));
      return;
    }
    const c = r.data;
    fill(detail, 
      h('h3', 'Client'),
      kv([
        ['Client id', h('span.mono', c.client_id)], c.node ? ['Node', c.node] : null, ['User', c.user],
        ['State', c.connected ? 'connected' : (c.parked ? 'parked (away)' : '—')],
        ['Address', c.peer], ['Protocol', c.protocol], ['Keepalive', c.keep_alive === null ? null : `${c.keep_alive} s`],
        ['Connected at', time(c.connected_at)], ['Session', c.session_id],
        c.parked ? ['Expires in', duration(c.expires_in)] : null,
        c.parked ? ['Queued', count(c.queued)] : null,
      ]),
      h('h3.gap', `Subscriptions (${c.subscriptions.length})`),
      table([
        { title: 'Filter', cell: s => h('span.mono', s.filter) },
        { title: 'QoS', num: true, cell: s => s.qos },
        { title: 'Queued', num: true, cell: s => count(s.queued) },
      ], c.subscriptions, { empty: 'No subscriptions.' }),
      c.remote ? h('p.muted', `Connected on node ${c.node}: its details and subscriptions are on that node.`) : null,
      c.connected && !c.remote ? h('p', h('button.danger', { type: 'button', onclick: () => disconnect(c.client_id) }, 'Disconnect')) : null);
  }

  async function draw() {
    const p = await get(`/api/v1/clients${qs({ search, after, limit: 100 })}`);
    document.getElementById('client-count').textContent = `${count(p.count)} matching`;
    // In a cluster: where each client is (the others' clients are known by id and node only).
    const cluster = p.clients.some(c => c.node);
    fill(list, 
      table([
        { title: 'Client id', cell: c => h('span.mono', c.client_id) },
        cluster ? { title: 'Node', cell: c => c.remote ? h('span.badge', c.node) : c.node } : null,
        { title: 'User', cell: c => c.user ?? h('span.muted', 'anonymous') },
        { title: 'State', cell: c => c.connected ? badge(true, 'connected') : h('span.badge.warn', 'parked') },
        { title: 'Address', cell: c => c.peer ?? '—' },
        { title: 'Protocol', cell: c => c.protocol ?? '—' },
        { title: 'Since', cell: c => time(c.connected_at) },
        { title: '', cls: 'actions', cell: c => [
          h('button.quiet.small', { type: 'button', onclick: () => show(c.client_id) }, 'Details'),
          c.connected && !c.remote ? h('button.danger.small', { type: 'button', dataset: { disconnect: c.client_id }, onclick: () => disconnect(c.client_id) }, 'Disconnect') : null,
        ] },
      ].filter(Boolean), p.clients, { empty: search ? 'No client matches.' : 'No clients.', rowAttrs: c => ({ class: c.client_id === selected ? 'selected' : null, dataset: { client: c.client_id } }) }),
      h('div.toolbar', after ? h('button.quiet.small', { type: 'button', onclick: () => { after = ''; refresh(); } }, '← First page') : null,
        pager(p.next_after, n => { after = n; refresh(); })));
  }
  let stop = poll(3000, draw, list);
  function refresh() { stop(); stop = poll(3000, draw, list); }
  return () => stop();
}

// ---------------------------------------------------------------- subscriptions
export function subscriptions(main) {
  let search = '';
  let after = '';
  const list = h('div.panel');
  const input = h('input', { type: 'search', placeholder: 'filter contains', oninput: () => { search = input.value.trim(); after = ''; refresh(); } });
  const total = h('span.muted');
  fill(main, h('h2', 'Subscriptions'), h('div.toolbar', input, total), list);
  async function draw() {
    const p = await get(`/api/v1/subscriptions${qs({ search, after, limit: 200 })}`);
    total.textContent = `${count(p.count)} matching`;
    fill(list, 
      table([
        { title: 'Filter', cell: s => h('span.mono', s.filter) },
        { title: 'Client', cell: s => s.client_id ? h('a', { href: '#clients', onclick: () => sessionStorage.setItem('mqgate.search', s.client_id) }, s.client_id) : '—' },
        { title: 'QoS', num: true, cell: s => s.qos },
        { title: 'Options', cell: s => [s.no_local ? 'no local ' : '', s.retain_as_published ? 'retain as published ' : '', s.subscription_id ? `id ${s.subscription_id}` : ''].join('') || '—' },
        { title: 'Queued', num: true, cell: s => count(s.queued) },
      ], p.subscriptions, { empty: 'No subscriptions.' }),
      h('div.toolbar', after ? h('button.quiet.small', { type: 'button', onclick: () => { after = ''; refresh(); } }, '← First page') : null,
        pager(p.next_after, n => { after = n; refresh(); })));
  }
  let stop = poll(3000, draw, list);
  function refresh() { stop(); stop = poll(3000, draw, list); }
  return () => stop();
}

// ---------------------------------------------------------------- retained
export function retained(main, ui) {
  let filter = '#';
  let after = '';
  const list = h('div.panel');
  const detail = h('div.panel#retained-detail', h('p.empty', 'Select a message.'));
  const input = h('input#retained-filter', { value: filter, placeholder: 'topic filter, e.g. sensors/#' });
  const total = h('span.muted');
  const form = h('form.toolbar', { onsubmit: e => { e.preventDefault(); filter = input.value.trim() || '#'; after = ''; refresh(); } },
    input, h('button', { type: 'submit' }, 'Show'), total);
  fill(main, h('h2', 'Retained messages'), form, h('div.split', list, detail));

  async function remove(topic) {
    if (!confirm(`Delete the retained message of ${topic}?`)) return;
    const r = await call('DELETE', `/api/v1/retained${qs({ topic })}`);
    ui.notify(r.ok ? `Deleted the retained message of ${topic}` : `Delete failed: ${r.data.error}`, r.ok ? 'ok' : 'bad');
    fill(detail, h('p.empty', 'Select a message.'));
    refresh();
  }
  function show(m) {
    fill(detail, h('h3', 'Retained message'),
      kv([['Topic', h('span.mono', m.topic)], ['QoS', m.qos], ['Set by', m.client_id], ['User', m.user],
        ['Size', bytes(m.payload_bytes)], ['Content type', m.content_type],
        ['Expiry', m.message_expiry_interval === null ? null : `${m.message_expiry_interval} s`],
        m.user_properties.length ? ['User properties', m.user_properties.map(([k, v]) => `${k}=${v}`).join(', ')] : null]),
      h('h3.gap', 'Payload'), h('pre#retained-payload', m.payload_preview),
      h('p', h('button.danger', { type: 'button', onclick: () => remove(m.topic) }, 'Delete')));
  }
  async function draw() {
    const r = await call('GET', `/api/v1/retained${qs({ filter, after, limit: 100 })}`);
    if (!r.ok) throw new Error(r.data.error);
    const p = r.data;
    total.textContent = `${count(p.count)} topics retained`;
    fill(list, 
      table([
        { title: 'Topic', cell: m => h('span.mono', m.topic) },
        { title: 'QoS', num: true, cell: m => m.qos },
        { title: 'Size', num: true, cell: m => bytes(m.payload_bytes) },
        { title: 'Payload', cell: m => h('span.mono', m.payload_preview.length > 60 ? `${m.payload_preview.slice(0, 60)}…` : m.payload_preview) },
        { title: '', cls: 'actions', cell: m => [
          h('button.quiet.small', { type: 'button', onclick: () => show(m) }, 'View'),
          h('button.danger.small', { type: 'button', dataset: { delete: m.topic }, onclick: () => remove(m.topic) }, 'Delete'),
        ] },
      ], p.retained, { empty: 'No retained message matches.', rowAttrs: m => ({ dataset: { topic: m.topic } }) }),
      h('div.toolbar', after ? h('button.quiet.small', { type: 'button', onclick: () => { after = ''; refresh(); } }, '← First page') : null,
        pager(p.next_after, n => { after = n; refresh(); })));
  }
  let stop = poll(5000, draw, list);
  function refresh() { stop(); stop = poll(5000, draw, list); }
  return () => stop();
}

// ---------------------------------------------------------------- rules
const ruleRates = new Rates();

export function rules(main) {
  const box = h('div');
  fill(main, h('h2', 'Rules and targets'), box);
  return poll(2000, async () => {
    const p = await get('/api/v1/rules');
    fill(box, p.rules.length ? p.rules.map(rule => h('div.panel', { dataset: { rule: rule.name } },
      h('h3.name', rule.name),
      kv([['Filter', h('span.mono', rule.filter)], ['Ack', rule.ack], ['Condition', rule.conditional ? 'when: …' : 'none'],
        ['Messages in', h('span', rate(ruleRates.rate(`m:${rule.name}`, rule.matched_total)), ' · ', count(rule.matched_total), ' total')],
        ['Errors', count(rule.errors_total)], ['Skipped by condition', count(rule.skipped_total)]]),
      table([
        { title: 'Target', cell: t => h('span.mono', t.id) },
        { title: 'Forwarded', num: true, cell: t => rate(ruleRates.rate(`f:${t.id}`, t.forwarded_total)) },
        { title: 'Failed', num: true, cell: t => { const x = ruleRates.rate(`x:${t.id}`, t.failed_total); return h(x > 0 ? 'span.bad' : 'span', rate(x)); } },
        { title: 'Forwarded total', num: true, cell: t => count(t.forwarded_total) },
        { title: 'Failed total', num: true, cell: t => count(t.failed_total) },
      ], rule.targets))) : h('p.empty', 'No rules configured.'));
  }, box);
}

// ---------------------------------------------------------------- dead letters
export function deadLetters(main, ui) {
  let after = '';
  const list = h('div.panel');
  const detail = h('div.panel#dead-letter-detail', h('p.empty', 'Select a dead letter.'));
  const total = h('span.muted');
  fill(main, h('h2', 'Dead letters'),
    h('div.toolbar', total, h('span.spacer'),
      h('button.quiet', { type: 'button', onclick: () => replayAll() }, 'Replay all'),
      h('button.danger', { type: 'button', onclick: () => purge() }, 'Purge all')),
    h('div.split', list, detail));

  async function replay(id) {
    const r = await call('POST', `/dead-letters/${id}/replay`);
    if (r.ok && r.data.delivered) ui.notify(`Dead letter ${id} replayed to ${r.data.to}${r.data.spooled ? ' (spooled)' : ''}`, 'ok');
    else ui.notify(`Replay of ${id} failed: ${r.data.reason || r.data.error || r.status}`, 'bad');
    fill(detail, h('p.empty', 'Select a dead letter.'));
    refresh();
  }
  async function remove(id) {
    if (!confirm(`Delete dead letter ${id}?`)) return;
    const r = await call('DELETE', `/dead-letters/${id}`);
    ui.notify(r.ok ? `Dead letter ${id} deleted` : `Delete failed: ${r.data.error}`, r.ok ? 'ok' : 'bad');
    fill(detail, h('p.empty', 'Select a dead letter.'));
    refresh();
  }
  async function replayAll() {
    if (!confirm('Replay every dead letter to its target?')) return;
    const r = await call('POST', '/dead-letters/replay');
    ui.notify(r.ok ? `Replayed: ${r.data.delivered} delivered, ${r.data.failed} failed again` : `Replay failed: ${r.data.error}`, r.ok ? 'ok' : 'bad');
    refresh();
  }
  async function purge() {
    if (!confirm('Delete every dead letter? This cannot be undone.')) return;
    const r = await call('DELETE', '/dead-letters');
    ui.notify(r.ok ? `${r.data.removed} dead letters deleted` : `Purge failed: ${r.data.error}`, r.ok ? 'ok' : 'bad');
    refresh();
  }
  async function show(id) {
    const r = await call('GET', `/dead-letters/${id}`);
    if (!r.ok) { fill(detail, h('p.error', r.data.error)); return; }
    const d = r.data;
    const p = d.properties;
    fill(detail, h('h3', `Dead letter ${d.id}`),
      kv([['Failed at', time(d.failed_at)], ['Rule', d.rule], ['Target', h('span.mono', d.target)], ['Reason', h('span.bad', d.reason)],
        ['Topic', h('span.mono', d.topic)], ['QoS', d.qos], ['Retain', d.retain ? 'yes' : 'no'], ['Client', d.client_id], ['User', d.username],
        ['Received at', time(d.received_at)], ['Size', bytes(d.payload_bytes)], ['Content type', p.content_type],
        p.user_properties.length ? ['User properties', p.user_properties.map(([k, v]) => `${k}=${v}`).join(', ')] : null]),
      h('h3.gap', d.payload_utf8 !== null ? 'Payload' : 'Payload (base64)'),
      h('pre#dead-letter-payload', d.payload_utf8 ?? d.payload_base64),
      h('p', h('button', { type: 'button', onclick: () => replay(d.id) }, 'Replay'), ' ',
        h('button.danger', { type: 'button', onclick: () => remove(d.id) }, 'Delete')));
  }
  async function draw() {
    const r = await call('GET', `/dead-letters${qs({ after, limit: 100 })}`);
    if (r.status === 503) { fill(list, h('p.empty', r.data.error)); total.textContent = ''; return; }
    if (!r.ok) throw new Error(r.data.error);
    const p = r.data;
    total.textContent = `${count(p.count)} dead letters kept`;
    fill(list, 
      table([
        { title: 'Id', num: true, cell: l => l.id },
        { title: 'Failed at', cell: l => time(l.failed_at) },
        { title: 'Target', cell: l => h('span.mono', l.target) },
        { title: 'Topic', cell: l => h('span.mono', l.topic) },
        { title: 'Reason', cell: l => h('span.bad', l.reason) },
        { title: '', cls: 'actions', cell: l => [
          h('button.quiet.small', { type: 'button', onclick: () => show(l.id) }, 'Show'),
          h('button.small', { type: 'button', dataset: { replay: l.id }, onclick: () => replay(l.id) }, 'Replay'),
          h('button.danger.small', { type: 'button', onclick: () => remove(l.id) }, 'Delete'),
        ] },
      ], p.dead_letters, { empty: 'No dead letters.', rowAttrs: l => ({ dataset: { letter: l.id } }) }),
      h('div.toolbar', after ? h('button.quiet.small', { type: 'button', onclick: () => { after = ''; refresh(); } }, '← First page') : null,
        pager(p.next_after, n => { after = n; refresh(); })));
  }
  let stop = poll(4000, draw, list);
  function refresh() { stop(); stop = poll(4000, draw, list); }
  return () => stop();
}

// ---------------------------------------------------------------- rule tester
export function tester(main) {
  const f = {
    topic: h('input#tester-topic', { required: true, placeholder: 'sensors/room1/temp', size: 50 }),
    payload: h('textarea#tester-payload', { placeholder: '{"t": 21.5}' }),
    qos: h('select#tester-qos', h('option', { value: '0' }, '0'), h('option', { value: '1', selected: true }, '1'), h('option', { value: '2' }, '2')),
    retain: h('input#tester-retain', { type: 'checkbox' }),
    user: h('input#tester-user', { placeholder: 'anonymous' }),
    client: h('input#tester-client', { placeholder: 'mqgate-http' }),
    props: h('textarea#tester-props', { placeholder: 'name=value, one per line (MQTT 5 user properties)', class: 'short' }),
  };
  const out = h('div#tester-result');
  const form = h('form.panel', { onsubmit: e => { e.preventDefault(); run(); } },
    h('div.form',
      h('label', h('span', 'Topic'), f.topic), h('label', h('span', 'Payload'), f.payload),
      h('label', h('span', 'QoS'), f.qos), h('label', h('span', 'Retain'), f.retain),
      h('label', h('span', 'User'), f.user), h('label', h('span', 'Client id'), f.client),
      h('label', h('span', 'User properties'), f.props)),
    h('p', h('button#tester-run', { type: 'submit' }, 'Where would it go?'),
      h('span.muted', ' Nothing is sent: POST /api/v1/route on the running rules.')));
  fill(main, h('h2', 'Rule tester'), form, out);

  async function run() {
    const body = { topic: f.topic.value, payload: f.payload.value, qos: Number(f.qos.value), retain: f.retain.checked };
    if (f.user.value) body.user = f.user.value;
    if (f.client.value) body.client_id = f.client.value;
    const props = f.props.value.split('\n').map(l => l.trim()).filter(Boolean).map(l => {
      const i = l.indexOf('=');
      return i < 0 ? [l, ''] : [l.slice(0, i), l.slice(i + 1)];
    });
    if (props.length) body.properties = { user_properties: props };
    const r = await call('POST', '/api/v1/route', body);
    if (!r.ok) { fill(out, h('p.error', r.data.error)); return; }
    const rep = r.data;
    const matched = rep.rules.filter(x => x.matches);
    fill(out, 
      h('div.panel',
        h('h3', 'Verdict'),
        kv([['Topic', h('span.mono', rep.topic)],
          ['Topic check', rep.topic_error ? h('span.bad', rep.topic_error) : h('span.ok', 'valid')],
          ['ACL', [badge(rep.acl.publish_allowed, 'publish allowed', 'publish denied'), ' ', rep.acl.user ? `as ${rep.acl.user}` : 'anonymous', ...(rep.acl.notes || []).map(n => h('div.muted', n))]],
          ['Routed', rep.routed ? 'yes' : 'no'],
          ['Local subscribers', h('span.muted', rep.local_subscribers)],
          rep.retained ? ['Retained', rep.retained] : null,
          ['Rules matching', matched.length ? matched.map(x => x.rule).join(', ') : 'none']])),
      matched.map(rule => h(rule.applies ? 'div.panel.rule.applies' : 'div.panel.rule', { dataset: { rule: rule.rule } },
        h('h3.name', `Rule ${rule.rule} — ${rule.applies ? 'applies' : 'does not apply'}`),
        kv([['Filter', h('span.mono', rule.filter)], ['Ack', rule.ack],
          rule.when ? ['Condition', [h('span.mono', rule.when.condition), ' → ', rule.when.held === true ? h('span.ok', 'holds') : h('span.bad', rule.when.error || 'does not hold'),
            ...(rule.when.clauses || []).map(c => h('div.muted.mono', JSON.stringify(c)))]] : null,
          rule.on_error ? ['On error', rule.on_error] : null]),
        rule.targets.map(t => h('div.target', { dataset: { target: t.id } },
          h('h3.gap.name', `→ ${t.kind} target ${t.id}`),
          t.error ? h('p.bad', t.error) : null,
          kv(Object.entries(t.fields).map(([k, v]) => [k, h('span.mono', typeof v === 'string' ? v : JSON.stringify(v))])),
          (t.notes || []).map(n => h('div.muted', n)))))),
      h('details.panel', h('summary', 'Raw answer'), h('pre', JSON.stringify(rep, null, 2))));
  }
  return () => {};
}

// ---------------------------------------------------------------- live trace
export function trace(main, ui) {
  let abort = null;
  let received = 0;
  let dropped = 0;
  const MAX_ROWS = 500;
  const filter = h('input#trace-filter', { value: '#', placeholder: 'topic filter' });
  const sample = h('input#trace-sample', { type: 'number', min: 1, value: 1, class: 'narrow', title: 'one message in N' });
  const start = h('button#trace-start', { type: 'submit' }, 'Start');
  const stop = h('button.quiet#trace-stop', { type: 'button', disabled: true, onclick: () => end() }, 'Stop');
  const status = h('span.muted#trace-status', 'Not running.');
  const rows = h('tbody#trace-rows');
  fill(main, h('h2', 'Live trace'),
    h('form.toolbar', { onsubmit: e => { e.preventDefault(); begin(); } },
      h('label', 'Filter', filter), h('label', 'Sample 1 in', sample), start, stop, status),
    h('div.panel', h('table',
      h('thead', h('tr', ['Time', 'Topic', 'QoS', 'Client', 'User', 'Rules', 'Payload'].map(t => h('th', t)))),
      rows)));

  function showStatus(text) {
    status.textContent = `${text} · ${count(received)} messages${dropped ? ` · ${count(dropped)} dropped (browser too slow)` : ''}`;
  }
  function end(text = 'Stopped') {
    if (abort) abort.abort();
    abort = null;
    start.disabled = false;
    stop.disabled = true;
    showStatus(text);
  }
  async function begin() {
    end('Restarting');
    received = 0;
    dropped = 0;
    fill(rows);
    const controller = new AbortController();
    abort = controller;
    start.disabled = true;
    stop.disabled = false;
    showStatus(`Tracing ${filter.value || '#'}`);
    try {
      await stream(`/api/v1/trace${qs({ filter: filter.value || '#', sample: sample.value || 1 })}`, (name, data) => {
        const ev = JSON.parse(data);
        if (name === 'dropped') { dropped = ev.dropped; showStatus(`Tracing ${filter.value}`); return; }
        received += 1;
        rows.prepend(h('tr', { dataset: { topic: ev.topic } },
          h('td', new Date(ev.at).toLocaleTimeString()), h('td.mono', ev.topic), h('td.num', ev.qos),
          h('td', ev.client_id), h('td', ev.user ?? '—'), h('td', ev.rules.join(', ') || '—'),
          h('td.mono', ev.payload_preview)));
        while (rows.childElementCount > MAX_ROWS) rows.lastElementChild.remove();
        showStatus(`Tracing ${filter.value}`);
      }, controller.signal);
      if (abort === controller) end('The server ended the trace');
    } catch (e) {
      if (abort !== controller) return;
      end('Stopped');
      if (e.name !== 'AbortError') ui.notify(`Trace: ${e.message}`, 'bad');
    }
  }
  return () => end();
}
