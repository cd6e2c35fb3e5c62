/**
 * The operator dashboard in a real browser: headless Chromium (Debian's /usr/bin/chromium)
 * driven by puppeteer-core against a real authority over HTTPS. Login, every page, every
 * action (a revocation through the UI then lands in the store and the CRL at /v1/crl), and
 * the attacks: no session, forged/missing CSRF token, another Origin, device-supplied strings
 * carrying markup, the session cookie's flags, the CSP. No mocks, no sleeps: puppeteer waits
 * for navigations and selectors.
 *
 * DASHBOARD_SCREENSHOTS=/some/dir saves each page at laptop and phone widths.
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync, createPublicKey } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import puppeteer, { type Browser, type Page } from 'puppeteer-core';
import { pkix } from '../protocol/index.ts';
import { hashEnrollmentCode } from '../authority/auth-methods/index.ts';
import { resolveAuthorityConfig, startAuthority } from '../authority/index.ts';
import { CSP } from '../authority/dashboard/routes.ts';
import { rawHttps } from './support/http.ts';
import { logger, startStack, type Stack } from './support/stack.ts';

const ADMIN_TOKEN = 'dashboard-test-admin-token-0123456789';
const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const WAIT = { timeout: 60_000 };
const SHOTS = process.env.DASHBOARD_SCREENSHOTS;
// Device-supplied strings that would run script if they ever reached the page as markup.
const XSS_SCRIPT = '<script>window.__xss=1</script>';
const XSS_IMG = '"><img src=x onerror="window.__xss=2">';
const XSS_ID = `evil${XSS_IMG}${XSS_SCRIPT}`;

function launch(): Promise<Browser> {
  return puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    acceptInsecureCerts: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
}

/** Every page records CSP violations and the script markers before any of its own code runs. */
async function newPage(browser: Browser): Promise<Page> {
  const page = await browser.newPage();
  await page.evaluateOnNewDocument(() => {
    (window as any).__csp = [];
    document.addEventListener('securitypolicyviolation', (e) => (window as any).__csp.push(`${e.violatedDirective} ${e.blockedURI}`));
  });
  page.setDefaultTimeout(60_000);
  return page;
}

async function shoot(page: Page, name: string): Promise<void> {
  if (!SHOTS) return;
  mkdirSync(SHOTS, { recursive: true });
  for (const [w, h, tag] of [[1366, 900, 'laptop'], [390, 844, 'phone']] as const) {
    await page.setViewport({ width: w, height: h });
    await page.screenshot({ path: join(SHOTS, `${name}-${tag}.png`) as `${string}.png`, fullPage: true });
  }
  await page.setViewport({ width: 1366, height: 900 });
}

/** Clicks and waits for the navigation it starts. */
async function clickAndWait(page: Page, selector: string) {
  const [res] = await Promise.all([page.waitForNavigation(WAIT), page.click(selector)]);
  return res;
}

/** Inert page: no marker set by injected script, no CSP violation (an escaped string triggers none). */
async function assertInert(page: Page, where: string) {
  const state = await page.evaluate(() => ({ xss: (window as any).__xss, csp: (window as any).__csp as string[], imgs: document.querySelectorAll('img').length, scripts: [...document.scripts].map((s) => s.src) }));
  assert.equal(state.xss, undefined, `${where}: injected script ran`);
  assert.deepEqual(state.csp, [], `${where}: CSP violations ${state.csp.join('; ')}`);
  assert.equal(state.imgs, 0, `${where}: an injected <img> became an element`);
  assert.ok(state.scripts.every((s) => s.endsWith('/dashboard/static/dashboard.js')), `${where}: only the dashboard's script: ${state.scripts.join(', ')}`);
}

const rawRequest = rawHttps;

async function crlLists(stack: Stack, serial: string): Promise<boolean> {
  const r = await rawRequest(`${stack.authority.url}/v1/crl.pem`, {});
  assert.equal(r.status, 200);
  const crl = pkix.parseCrl(r.text, createPublicKey(stack.authority.ca.deviceCa.pem));
  return crl.revoked.has(serial);
}

test('dashboard: login, pages, actions and the attacks, in Chromium', { timeout: 600_000 }, async (t) => {
  const stack = await startStack(t, { authority: { adminToken: ADMIN_TOKEN } });
  const { authority } = stack;
  const base = `${authority.url}/dashboard`;
  const origin = new URL(authority.url).origin;

  // Two real devices onboarded through the gateway.
  for (const id of ['dash-dev-1', 'dash-dev-2']) await stack.device(id, 'pki-signature').onboard();
  const certOf = async (id: string) => (await authority.store.listCertificates({ subjectId: id, status: 'active', kind: 'device' }))[0];
  const cert1 = await certOf('dash-dev-1');
  const cert2 = await certOf('dash-dev-2');
  assert.ok(cert1 && cert2);

  // Hostile strings where a device or a gateway chooses them: a stored device id and group, an
  // audit row's code and detail, a certificate's CN.
  const now = Date.now();
  await authority.store.insertDevice({ id: XSS_ID, groupName: `g${XSS_SCRIPT}`, method: 'pki-signature', status: 'registered', gatewayId: `gw${XSS_IMG}`, ddkgSalt: null, ddkgPublicKey: null, birthCertFingerprint: null, createdAt: now, updatedAt: now });
  await authority.store.appendAudit({ at: now, action: 'register', outcome: 'refused', code: `bad${XSS_IMG}`, deviceId: XSS_ID, gatewayId: stack.gatewayId, detail: { message: XSS_SCRIPT, cn: XSS_IMG } });
  const key = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const evilCert = await authority.ca.issue('device', {
    subjectDer: pkix.encodeName(`cn${XSS_IMG}${XSS_SCRIPT}`), spkiDer: key.publicKey.export({ type: 'spki', format: 'der' }), profile: { kind: 'device', keyType: 'ec' },
    notBefore: new Date(now - 60_000), notAfter: new Date(now + 20 * 86_400_000),
  });
  await authority.store.ensureCertificates([{ serial: evilCert.serial, subjectId: XSS_ID, kind: 'device', issuer: 'device-ca', fingerprint: evilCert.fingerprint256, notBefore: now - 60_000, notAfter: evilCert.notAfter.getTime(), status: 'active', requestId: null, pem: evilCert.pem, revokedAt: null, revocationReason: null, createdAt: now }]);
  // Enough audit rows of one device for two pages.
  for (let i = 0; i < 60; i++) await authority.store.appendAudit({ at: now + i, action: 'auth', outcome: 'ok', deviceId: 'dash-dev-1', gatewayId: stack.gatewayId, detail: { i } });

  const browser = await launch();
  t.after(() => browser.close());
  const page = await newPage(browser);

  await t.test('no session: every page redirects to the login form; a POST is refused', async () => {
    for (const p of ['', '/devices', '/audit', `/certificates/${cert1.serial}`]) {
      await page.goto(`${base}${p}`, WAIT);
      assert.equal(new URL(page.url()).pathname, '/dashboard/login', p);
    }
    await shoot(page, 'login');
    const r = await rawRequest(`${base}/actions/revoke-certificate`, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded', origin }, body: `serial=${cert1.serial}&confirm=yes` });
    assert.equal(r.status, 403);
    // The proxy header means nothing unless dashboard.trustedHeader is configured.
    const h = await rawRequest(`${base}/`, { headers: { 'x-forwarded-user': 'mallory' } });
    assert.equal(h.status, 303);
    assert.equal(h.headers.location, '/dashboard/login');
  });

  await t.test('login: a wrong token is refused; the admin token opens a session with a strict cookie', async () => {
    await page.goto(`${base}/login`, WAIT);
    await page.type('#token', 'not-the-token');
    await Promise.all([page.waitForNavigation(WAIT), page.keyboard.press('Enter')]);
    assert.equal(new URL(page.url()).pathname, '/dashboard/login');
    assert.match(await page.$eval('main', (m) => m.textContent!), /not the admin token/);
    assert.equal((await page.cookies()).length, 0);

    // Keyboard only: the token field has focus on load; Enter submits.
    assert.equal(await page.evaluate(() => document.activeElement?.id), 'token');
    await page.keyboard.type(ADMIN_TOKEN);
    const [res] = await Promise.all([page.waitForNavigation(WAIT), page.keyboard.press('Enter')]);
    assert.equal(new URL(page.url()).pathname, '/dashboard');
    assert.equal(res!.headers()['content-security-policy'], CSP);
    assert.equal(CSP, "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'");
    const cookies = await page.cookies();
    assert.equal(cookies.length, 1);
    const c = cookies[0];
    assert.equal(c.name, '__Host-leafgate_dashboard');
    assert.equal(c.httpOnly, true);
    assert.equal(c.secure, true);
    assert.equal(c.sameSite, 'Strict');
    assert.equal(c.path, '/');
    assert.ok(c.value.length >= 43, 'a 256-bit random id');
    // HttpOnly: the page's own script cannot read it.
    assert.equal(await page.evaluate(() => document.cookie), '');
    const login = await authority.store.listAudit({ limit: 5 });
    assert.ok(login.some((r) => r.action === 'dashboard-login' && (r.detail as any)?.actor === 'dashboard:admin'));
  });

  await t.test('overview: counts, gateways, both plots drawn as inline SVG', async () => {
    await page.goto(`${base}`, WAIT);
    const text = await page.$eval('main', (m) => m.textContent!);
    assert.match(text, /registered/);
    assert.match(text, /gw-test/);
    // Two onboardings in the plot of the last 48 hours; active certificates in the expiry plot.
    assert.ok((await page.$$('figure.chart svg rect')).length >= 2);
    const numbers = await page.$$eval('figure.chart table tbody td.num', (tds) => tds.reduce((a, td) => a + Number(td.textContent), 0));
    assert.ok(numbers >= 4, `plots carry the onboardings and expiries: ${numbers}`);
    await assertInert(page, 'overview');
    await shoot(page, 'overview');
    await page.goto(`${base}?range=14d`, WAIT);
    assert.match(await page.$eval('main', (m) => m.textContent!), /per day/);
  });

  await t.test('devices: search by id prefix, gateway and state; the injected device renders as text', async () => {
    await page.goto(`${base}/devices?id=dash-dev`, WAIT);
    let ids = await page.$$eval('#devices tbody tr td:first-child', (tds) => tds.map((td) => td.textContent));
    assert.deepEqual(ids, ['dash-dev-1', 'dash-dev-2']);
    await page.goto(`${base}/devices?state=registered`, WAIT);
    ids = await page.$$eval('#devices tbody tr td:first-child', (tds) => tds.map((td) => td.textContent));
    assert.deepEqual(ids, [XSS_ID]);
    await assertInert(page, 'devices');
    await page.goto(`${base}/devices?gateway=gw-test&state=enrolled`, WAIT);
    ids = await page.$$eval('#devices tbody tr td:first-child', (tds) => tds.map((td) => td.textContent));
    assert.deepEqual(ids, ['dash-dev-1', 'dash-dev-2']);
    await shoot(page, 'devices');

    // The hostile device's own page: id, group, gateway, audit code and detail, all as text.
    await page.goto(`${base}/devices?state=registered`, WAIT);
    await clickAndWait(page, '#devices tbody tr:first-child td:first-child a');
    assert.equal(await page.$eval('h1', (h) => h.textContent), `Device ${XSS_ID}`);
    const main = await page.$eval('main', (m) => m.textContent!);
    for (const s of [XSS_SCRIPT, XSS_IMG, `bad${XSS_IMG}`]) assert.ok(main.includes(s), `shown as text: ${s}`);
    await assertInert(page, 'device page');
    await shoot(page, 'device-hostile');

    // Its certificate: the CN carries the markup, shown as text too.
    await page.goto(`${base}/certificates/${evilCert.serial}`, WAIT);
    // As node:crypto prints a subject: special characters backslash-escaped, shown as text.
    const certText = (await page.$eval('main', (m) => m.textContent!)).replace(/\\/g, '');
    assert.ok(certText.includes(`CN=cn${XSS_IMG}${XSS_SCRIPT}`), 'the CN is shown as text');
    await assertInert(page, 'certificate page');
  });

  await t.test('audit log: filters and keyset pages', async () => {
    await page.goto(`${base}/audit?device=dash-dev-1`, WAIT);
    const first = await page.$$eval('table.audit tbody tr td:first-child', (tds) => tds.map((td) => Number(td.textContent)));
    assert.equal(first.length, 50);
    await shoot(page, 'audit');
    await clickAndWait(page, 'a[rel="next"]');
    const second = await page.$$eval('table.audit tbody tr td:first-child', (tds) => tds.map((td) => Number(td.textContent)));
    assert.ok(second.length > 0);
    assert.ok(Math.min(...first) > Math.max(...second), 'the next page holds older rows only');
    const all = [...first, ...second];
    assert.deepEqual(all, [...all].sort((a, b) => b - a), 'newest first, no row twice');
    await page.goto(`${base}/audit?outcome=refused`, WAIT);
    const outcomes = await page.$$eval('table.audit tbody tr td:nth-child(4) .badge', (b) => b.map((x) => x.textContent));
    assert.ok(outcomes.length >= 1 && outcomes.every((o) => o === 'refused'));
    await assertInert(page, 'audit refused');
  });

  await t.test('CSRF: a forged or missing token is refused with 403 and nothing changes; so is another Origin', async () => {
    const csrf = await page.$eval('input[name="csrf"]', (i) => (i as HTMLInputElement).value);
    // A form the page did not make, submitted from the dashboard's own origin (fetch is
    // blocked by the CSP's default-src 'none' anyway).
    const post = async (fields: Record<string, string>) => {
      const [res] = await Promise.all([
        page.waitForNavigation(WAIT),
        page.evaluate((f) => {
          const form = document.createElement('form');
          form.method = 'post';
          form.action = '/dashboard/actions/revoke-certificate';
          for (const [k, v] of Object.entries(f)) {
            const i = document.createElement('input');
            i.type = 'hidden';
            i.name = k;
            i.value = v;
            form.append(i);
          }
          document.body.append(form);
          form.submit();
        }, fields),
      ]);
      return res!.status();
    };
    assert.equal(await post({ serial: cert2.serial, reason: 'keyCompromise', confirm: 'yes', csrf: 'forged' + csrf.slice(6) }), 403);
    assert.equal(await post({ serial: cert2.serial, reason: 'keyCompromise', confirm: 'yes' }), 403);
    assert.equal((await authority.store.getCertificate(cert2.serial))!.status, 'active');

    // The session's own cookie and token, but from another origin (or with none): refused.
    const cookie = (await page.cookies()).map((c) => `${c.name}=${c.value}`).join('; ');
    const body = new URLSearchParams({ serial: cert2.serial, reason: 'keyCompromise', csrf }).toString();
    const headers = { cookie, 'content-type': 'application/x-www-form-urlencoded' };
    const evil = await rawRequest(`${base}/actions/revoke-certificate`, { method: 'POST', headers: { ...headers, origin: 'https://evil.example' }, body: body + '&confirm=yes' });
    assert.equal(evil.status, 403);
    const none = await rawRequest(`${base}/actions/revoke-certificate`, { method: 'POST', headers, body: body + '&confirm=yes' });
    assert.equal(none.status, 403);
    assert.equal((await authority.store.getCertificate(cert2.serial))!.status, 'active');
    // The same request from the dashboard's origin passes the checks (the confirmation page: nothing done yet).
    const same = await rawRequest(`${base}/actions/revoke-certificate`, { method: 'POST', headers: { ...headers, origin }, body });
    assert.equal(same.status, 200);
    assert.match(same.text, /Revoke certificate/);
    assert.equal((await authority.store.getCertificate(cert2.serial))!.status, 'active');
  });

  await t.test('revoke a certificate through the UI, with a confirmation step: the store and the CRL at /v1/crl', async () => {
    assert.equal(await crlLists(stack, cert1.serial), false);
    await page.goto(`${base}/certificates?serial=${cert1.serial}`, WAIT);
    assert.equal(new URL(page.url()).pathname, `/dashboard/certificates/${cert1.serial}`);
    await shoot(page, 'certificate');
    await page.select('#cert-reason', 'keyCompromise');
    await clickAndWait(page, 'form[action$="revoke-certificate"] button[type="submit"]');
    assert.match(await page.$eval('main', (m) => m.textContent!), /Revoke certificate/);
    assert.equal((await authority.store.getCertificate(cert1.serial))!.status, 'active', 'nothing done before the confirmation');
    await shoot(page, 'confirm');
    await clickAndWait(page, 'button.danger[type="submit"]');
    assert.match(await page.$eval('.flash', (f) => f.textContent!), /Revoked/);
    const row = (await authority.store.getCertificate(cert1.serial))!;
    assert.equal(row.status, 'revoked');
    assert.equal(row.revocationReason, pkix.REVOCATION_REASONS.keyCompromise);
    assert.equal(await crlLists(stack, cert1.serial), true);
    const audit = await authority.store.listAudit({ limit: 20 });
    assert.ok(audit.some((r) => r.action === 'revoke' && r.serial === cert1.serial && (r.detail as any)?.actor === 'dashboard:admin'));
  });

  await t.test('decommission a device through the UI', async () => {
    await page.goto(`${base}/devices/dash-dev-2`, WAIT);
    await clickAndWait(page, 'form[action$="decommission"] button[type="submit"]');
    await clickAndWait(page, 'button.danger[type="submit"]');
    assert.equal(new URL(page.url()).pathname, '/dashboard/devices/dash-dev-2');
    assert.equal((await authority.store.getDevice('dash-dev-2'))!.status, 'disabled');
    assert.equal((await authority.store.getCertificate(cert2.serial))!.status, 'revoked');
    assert.equal(await crlLists(stack, cert2.serial), true);
    const audit = await authority.store.listAudit({ deviceId: 'dash-dev-2', limit: 10 });
    assert.ok(audit.some((r) => r.action === 'decommission' && (r.detail as any)?.actor === 'dashboard:admin'));
  });

  await t.test('a gateway enrollment token and a ddkg one-time code, shown once, usable, audited', async () => {
    await page.goto(`${base}/gateways`, WAIT);
    await page.type('#tok-gw', 'gw-from-dashboard');
    await clickAndWait(page, 'form[action$="enrollment-token"] button[type="submit"]');
    const token = await page.$eval('#secret', (o) => o.textContent!);
    assert.match(token, /^[A-Za-z0-9_-]{20,}$/);
    await shoot(page, 'secret');
    // The token is the gateway's: peeking finds its gateway id (the store holds only a hash).
    const { createHash } = await import('node:crypto');
    assert.equal(await authority.store.peekEnrollmentToken(createHash('sha256').update(`leafgate-gateway-token\n${token}`).digest('hex'), Date.now()), 'gw-from-dashboard');

    await page.goto(`${base}/devices`, WAIT);
    await page.type('#code-dev', 'ddkg-dash-1');
    await page.select('#code-group', 'coded');
    await clickAndWait(page, 'form[action$="enrollment-code"] button[type="submit"]');
    const code = await page.$eval('#secret', (o) => o.textContent!);
    assert.equal(await authority.store.consumeEnrollmentCode(hashEnrollmentCode(code), 'ddkg-dash-1', 'coded', Date.now()), true);
    const audit = await authority.store.listAudit({ limit: 10 });
    assert.ok(audit.some((r) => r.action === 'create-enrollment-token' && r.gatewayId === 'gw-from-dashboard' && (r.detail as any)?.actor === 'dashboard:admin'));
    assert.ok(audit.some((r) => r.action === 'create-enrollment-code' && r.deviceId === 'ddkg-dash-1' && (r.detail as any)?.actor === 'dashboard:admin'));
    assert.ok(!JSON.stringify(audit).includes(token) && !JSON.stringify(audit).includes(code), 'secrets never reach the audit log');
  });

  await t.test('revoke a gateway through the UI', async () => {
    await stack.addGateway('gw-doomed');
    await page.goto(`${base}/gateways`, WAIT);
    await shoot(page, 'gateways');
    await clickAndWait(page, 'form[action$="revoke-gateway"]:has(input[value="gw-doomed"]) button[type="submit"]');
    await clickAndWait(page, 'button.danger[type="submit"]');
    assert.equal((await authority.store.getGateway('gw-doomed'))!.status, 'disabled');
    assert.equal((await authority.store.listCertificates({ subjectId: 'gw-doomed', status: 'active' })).length, 0);
    const audit = await authority.store.listAudit({ limit: 10 });
    assert.ok(audit.some((r) => r.action === 'disable-gateway' && r.gatewayId === 'gw-doomed' && (r.detail as any)?.actor === 'dashboard:admin'));
  });

  await t.test('cloud sync: a device parked after failed IoT Hub syncs is listed and retried through the UI, with a confirmation; audited', async () => {
    const issued = await stack.device('dash-sync', 'pki-signature').onboard();
    await authority.store.recordSyncFailure(issued.serial, 'hub', { attempts: 10, nextAt: null, failedAt: Date.now(), error: `HTTP 400 ${XSS_IMG}`, status: 'active' });
    await page.goto(`${base}/`, WAIT);
    assert.match(await page.content(), /<span class="n">1<\/span> <span class="l">cloud sync failed<\/span>/);
    await page.goto(`${base}/sync`, WAIT);
    const text = await page.$eval('main', (m) => m.textContent ?? '');
    assert.match(text, /dash-sync/);
    assert.ok(text.includes(XSS_IMG), 'the registry\'s error text is shown as text');
    assert.equal(await page.$('main img'), null);
    await clickAndWait(page, 'form[action$="retry-sync"]:has(input[name="device"][value="dash-sync"]) button[type="submit"]');
    assert.equal((await authority.store.listSyncFailed({ target: 'hub' })).length, 1, 'nothing changes before the confirmation');
    await clickAndWait(page, 'button.danger[type="submit"]');
    assert.equal(new URL(page.url()).pathname, '/dashboard/sync');
    assert.deepEqual(await authority.store.listSyncFailed({ target: 'hub' }), [], 'back in the queue');
    const audit = await authority.store.listAudit({ deviceId: 'dash-sync', limit: 10 });
    assert.ok(audit.some((r) => r.action === 'sync-retry' && (r.detail as any)?.actor === 'dashboard:admin' && (r.detail as any)?.count === 1));
  });

  await t.test('logout ends the session server-side', async () => {
    const cookie = (await page.cookies()).map((c) => `${c.name}=${c.value}`).join('; ');
    await clickAndWait(page, 'form.logout button');
    assert.equal(new URL(page.url()).pathname, '/dashboard/login');
    // The old cookie value no longer opens anything.
    const r = await rawRequest(`${base}/`, { headers: { cookie } });
    assert.equal(r.status, 303);
  });
});

test('dashboard: its own port, the trusted proxy header when configured, and off with dashboard.enabled', { timeout: 120_000 }, async (t) => {
  const { mkdtempSync, rmSync } = await import('node:fs');
  const { tmpdir } = await import('node:os');
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-dash-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const base = { caPassphrase: 'test-passphrase-0123456789', adminToken: ADMIN_TOKEN, listen: { host: '127.0.0.1', port: 0 } };
  const a = await startAuthority(resolveAuthorityConfig({ ...base, dataDir: join(dir, 'a'), dashboard: { listen: { host: '127.0.0.1', port: 0 }, trustedHeader: 'X-Forwarded-User' } }, {}), { logger });
  t.after(() => a.close());
  assert.ok(a.dashboardUrl && !a.dashboardUrl.startsWith(a.url));
  const ok = await rawRequest(a.dashboardUrl!, { headers: { 'x-forwarded-user': 'alice' } });
  assert.equal(ok.status, 200);
  assert.match(ok.text, /dashboard:alice/);
  assert.match(String(ok.headers['set-cookie']), /HttpOnly; Secure; SameSite=Strict/);
  const anon = await rawRequest(a.dashboardUrl!, {});
  assert.equal(anon.status, 303);
  // An action in proxy mode is audited with the proxy's user.
  const cookie = String(ok.headers['set-cookie']).split(';')[0];
  const csrf = /name="csrf" value="([^"]+)"/.exec(ok.text)![1];
  const r = await rawRequest(`${a.dashboardUrl}/actions/enrollment-token`, {
    method: 'POST', headers: { cookie, 'x-forwarded-user': 'alice', origin: new URL(a.dashboardUrl!).origin, 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ csrf, gateway: 'gw-alice', ttlHours: '2' }).toString(),
  });
  assert.equal(r.status, 200);
  const audit = await a.store.listAudit({ limit: 5 });
  assert.ok(audit.some((x) => x.action === 'create-enrollment-token' && (x.detail as any)?.actor === 'dashboard:alice'));
  // Not on the API's listener when it has its own port.
  assert.equal((await rawRequest(`${a.url}/dashboard`, {})).status, 404);

  const b = await startAuthority(resolveAuthorityConfig({ ...base, dataDir: join(dir, 'b'), dashboard: { enabled: false } }, {}), { logger });
  t.after(() => b.close());
  assert.equal(b.dashboardUrl, undefined);
  assert.equal((await rawRequest(`${b.url}/dashboard/login`, {})).status, 404);
});
