// Drives mqgate's web console in Debian's headless Chromium (playwright-core, no browser
// download). Run by tests/it/console.rs, which starts the gateway and the MQTT clients and
// acts when this script prints `STEP <name>` on stdout. Every expectation that fails throws:
// the process exits non-zero with the reason, and a screenshot of the page at that moment is
// saved beside the others (ARTIFACTS).
//
// Environment: MQGATE_ADMIN (http://host:port), MQGATE_TOKEN, ARTIFACTS (a directory),
// DEAD_LETTER (the id of the dead letter to replay).

import { chromium } from 'playwright-core';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const admin = process.env.MQGATE_ADMIN;
const token = process.env.MQGATE_TOKEN;
const artifacts = process.env.ARTIFACTS;
const deadLetter = process.env.DEAD_LETTER;
for (const [k, v] of Object.entries({ MQGATE_ADMIN: admin, MQGATE_TOKEN: token, ARTIFACTS: artifacts, DEAD_LETTER: deadLetter })) {
  if (!v) throw new Error(`${k} is not set`);
}
mkdirSync(artifacts, { recursive: true });

const step = name => console.log(`STEP ${name}`);
const WAIT = 20000;

const profile = mkdtempSync(join(tmpdir(), 'mqgate-console-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  viewport: { width: 1400, height: 900 },
});
const page = context.pages()[0] || await context.newPage();
const problems = [];
page.on('pageerror', e => problems.push(`page error: ${e.message}`));
// Failed loads are checked by URL below; any other console error is a problem.
page.on('console', m => {
  if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) problems.push(`console error: ${m.text()}`);
});
// Expected failures: 401 for the login probes (no token, then a wrong one); the reload
// route's refusals (400 invalid, 409 needs a restart) and its absence until issue 15 item 1
// is merged (404/405). Anything else is a problem.
page.on('response', r => {
  const path = new URL(r.url()).pathname;
  const expected = (r.status() === 401 && path === '/api/v1/overview')
    || ([400, 404, 405, 409, 500].includes(r.status()) && path === '/api/v1/reload');
  if (r.status() >= 400 && !expected) problems.push(`${r.request().method()} ${path}: ${r.status()}`);
});
// Requests anywhere but the gateway would be the network at run time (a CDN): none allowed.
page.on('request', r => { if (!r.url().startsWith(admin)) problems.push(`request outside the gateway: ${r.url()}`); });
// The console asks before it disconnects or deletes.
page.on('dialog', d => d.accept());

let shot = 0;
const screenshot = async name => {
  shot += 1;
  await page.screenshot({ path: join(artifacts, `${String(shot).padStart(2, '0')}-${name}.png`), fullPage: true });
};
const noticeSays = async text => {
  await page.locator('#notice', { hasText: text }).waitFor({ timeout: WAIT });
};

try {
  // Log in.
  await page.goto(`${admin}/`);
  await page.locator('#login').waitFor({ state: 'visible', timeout: WAIT });
  await screenshot('login');
  await page.fill('#token', 'wrong-token');
  await page.click('#login-form button[type=submit]');
  await page.locator('#login-error', { hasText: 'refused' }).waitFor({ timeout: WAIT });
  await page.fill('#token', token);
  await page.click('#login-form button[type=submit]');
  await page.locator('#card-connections').waitFor({ timeout: WAIT });
  await page.locator('text=hook/0').first().waitFor({ timeout: WAIT });
  // The second reading makes the rates.
  await page.locator('#card-connections', { hasText: '/s' }).waitFor({ timeout: WAIT });
  await screenshot('overview');

  // A client appears, is looked at, and disconnected.
  await page.click('#nav a[data-view=clients]');
  await page.locator('#client-search').waitFor({ timeout: WAIT });
  step('clients-open');
  const row = page.locator('tr[data-client="console-watch"]');
  await row.waitFor({ timeout: WAIT });
  await row.locator('button', { hasText: 'Details' }).click();
  await page.locator('#client-detail', { hasText: 'lab/#' }).waitFor({ timeout: WAIT });
  await page.locator('#client-detail', { hasText: '5.0' }).waitFor({ timeout: WAIT });
  await screenshot('client');
  await row.locator('button', { hasText: 'Disconnect' }).click();
  await noticeSays('Disconnected console-watch');
  await row.waitFor({ state: 'detached', timeout: WAIT });
  await screenshot('client-disconnected');
  step('client-disconnected');

  // A retained message is shown, then deleted.
  await page.click('#nav a[data-view=retained]');
  await page.fill('#retained-filter', 'lab/#');
  await page.click('form.toolbar button[type=submit]');
  const kept = page.locator('tr[data-topic="lab/console/state"]');
  await kept.waitFor({ timeout: WAIT });
  await kept.locator('button', { hasText: 'View' }).click();
  await page.locator('#retained-payload', { hasText: 'console-retained-42' }).waitFor({ timeout: WAIT });
  await screenshot('retained');
  await kept.locator('button', { hasText: 'Delete' }).click();
  await noticeSays('Deleted the retained message of lab/console/state');
  await kept.waitFor({ state: 'detached', timeout: WAIT });
  step('retained-deleted');

  // A dead letter is shown and replayed (the webhook takes it the second time): it is gone.
  await page.click('#nav a[data-view=dead-letters]');
  const letter = page.locator(`tr[data-letter="${deadLetter}"]`);
  await letter.waitFor({ timeout: WAIT });
  await letter.locator('button', { hasText: 'Show' }).click();
  await page.locator('#dead-letter-payload', { hasText: 'console-dead-7' }).waitFor({ timeout: WAIT });
  await screenshot('dead-letter');
  await letter.locator('button', { hasText: 'Replay' }).click();
  await noticeSays(`Dead letter ${deadLetter} replayed to hook/0`);
  await letter.waitFor({ state: 'detached', timeout: WAIT });
  await page.locator('text=No dead letters.').waitFor({ timeout: WAIT });
  await screenshot('dead-letter-replayed');
  step('dead-letter-replayed');

  // The rule tester: the matching rule and its target's resolved request.
  await page.click('#nav a[data-view=tester]');
  await page.fill('#tester-topic', 'hook/room1/temp');
  await page.fill('#tester-payload', '{"t": 21.5}');
  await page.click('#tester-run');
  const applied = page.locator('.rule.applies[data-rule="hook"]');
  await applied.waitFor({ timeout: WAIT });
  await applied.locator('[data-target="hook/0"]', { hasText: '/in' }).waitFor({ timeout: WAIT });
  if (await page.locator('.rule[data-rule="lab"]').count() !== 0) throw new Error('the tester shows a rule whose filter does not match');
  await screenshot('rule-tester');

  // A live trace sees a published message.
  await page.click('#nav a[data-view=trace]');
  await page.fill('#trace-filter', 'lab/trace/#');
  await page.click('#trace-start');
  await page.locator('#trace-status', { hasText: 'Tracing' }).waitFor({ timeout: WAIT });
  step('trace-started');
  await page.locator('tr[data-topic="lab/trace/1"]', { hasText: 'traced-payload-9' }).first().waitFor({ timeout: WAIT });
  await screenshot('trace');
  step('trace-seen');
  await page.click('#trace-stop');
  await page.locator('#trace-status', { hasText: 'Stopped' }).waitFor({ timeout: WAIT });

  // Reload config: the answer is shown (the route comes with issue 15 item 1: until it is
  // merged the page says there is none; after, the file is unchanged: reloaded).
  await page.click('#reload');
  await page.locator('#notice', { hasText: /Config reloaded|no reload API/ }).waitFor({ timeout: WAIT });
  console.log(`RELOAD ${(await page.locator('#notice').textContent()).replace(/\n/g, ' ')}`);
  await screenshot('reload');

  // Log out: the token is forgotten.
  await page.click('#logout');
  await page.locator('#login').waitFor({ state: 'visible', timeout: WAIT });
  if (problems.length) throw new Error(problems.join('\n'));
  step('done');
} catch (e) {
  await screenshot('failure').catch(() => {});
  console.error(`FAILED: ${e.stack || e}`);
  if (problems.length) console.error(problems.join('\n'));
  process.exitCode = 1;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
