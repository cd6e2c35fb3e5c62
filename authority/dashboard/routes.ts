/**
 * The operator dashboard: server-rendered HTML under /dashboard, one static CSS and one small
 * JS file, no build step at run time and nothing fetched from elsewhere.
 *
 * Security, as for the admin API (docs/security.md "The dashboard"):
 * - login with the admin token (SHA-256 then timingSafeEqual, as admin.ts), or, only when
 *   `dashboard.trustedHeader` is set, the user a reverse proxy names in that header;
 * - a server-side session (./sessions.ts) named by a random id in a cookie that is HttpOnly,
 *   Secure, SameSite=Strict, __Host- prefixed, with an absolute and an idle expiry;
 * - every POST carries the session's synchronizer token and an Origin (or Referer) equal to
 *   the dashboard's own origin; else 403 and nothing is done;
 * - a strict Content-Security-Policy on every answer (no inline script or style at all);
 * - every string a device or gateway chose goes through the one escaping function (./html.ts);
 * - every action is audited with the operator (`detail.actor`: dashboard:admin, dashboard:<user>).
 */
import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { LeafgateError, isValidDeviceId, pkix } from '../../protocol/index.ts';
import { hashAdminToken } from '../api/admin.ts';
import type { DashboardConfig } from '../config.ts';
import type { GatewayEnrollment } from '../gateways.ts';
import type { Revocation } from '../revocation.ts';
import { DEVICE_STATES, type DashboardQueries, type DeviceState } from '../store/dashboard.ts';
import type { AuditRow, AuthorityStore } from '../store/index.ts';
import { barChart } from './charts.ts';
import { csrfField, href, html, layout, relative, seg, when, type SafeHtml } from './html.ts';
import { SESSION_COOKIE, SessionStore, parseCookies, sameSecret, type Session } from './sessions.ts';
import { timingSafeEqual } from 'node:crypto';

export interface DashboardDeps {
  store: AuthorityStore;
  queries: DashboardQueries;
  revocation: Revocation;
  enrollment: Pick<GatewayEnrollment, 'createToken'>;
  /** A ddkg one-time code bound to a device and group (the secret; only its hash is stored). */
  createEnrollmentCode(deviceId: string, group: string, ttlSeconds: number): Promise<string>;
  adminTokenHash: Buffer;
  config: DashboardConfig;
  /** Policy groups, for the ddkg code form. */
  groups: string[];
  now?: () => number;
}

export const CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
const COOKIE = `__Host-${SESSION_COOKIE}`;
const PAGE = 50;
const STATIC_DIR = join(dirname(fileURLToPath(import.meta.url)), 'static');
const STATIC: Record<string, { body: Buffer; type: string }> = {
  'dashboard.css': { body: readFileSync(join(STATIC_DIR, 'dashboard.css')), type: 'text/css; charset=utf-8' },
  'dashboard.js': { body: readFileSync(join(STATIC_DIR, 'dashboard.js')), type: 'text/javascript; charset=utf-8' },
};
const REASONS = Object.keys(pkix.REVOCATION_REASONS) as pkix.RevocationReason[];

class Refused extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
  }
}

declare module 'fastify' {
  interface FastifyRequest {
    dashboardSession?: Session | null;
  }
}

type Form = Record<string, string | undefined>;

function field(form: Form, name: string, max = 256): string {
  const v = form[name];
  if (typeof v !== 'string') return '';
  if (v.length > max) throw new Refused(400, `${name} is too long`);
  return v.trim();
}

function query(req: FastifyRequest): Form {
  const q = req.query as Record<string, unknown>;
  const out: Form = {};
  for (const [k, v] of Object.entries(q ?? {})) if (typeof v === 'string' && v.length <= 256) out[k] = v.trim();
  return out;
}

/**
 * The dashboard's routes; registered by the API server (or the dashboard's own server)
 * with prefix /dashboard.
 */
export function dashboardPlugin(deps: DashboardDeps) {
  const now = deps.now ?? Date.now;
  const cfg = deps.config;
  const sessions = new SessionStore(deps.store, { sessionMs: cfg.sessionMinutes * 60_000, idleMs: cfg.idleMinutes * 60_000, now });
  const header = cfg.trustedHeader?.toLowerCase();

  return async function dashboard(app: FastifyInstance): Promise<void> {
    app.addContentTypeParser('application/x-www-form-urlencoded', { parseAs: 'string', bodyLimit: 32 * 1024 }, (_req, body, done) => {
      const form: Form = {};
      for (const [k, v] of new URLSearchParams(body as string)) if (!(k in form)) form[k] = v;
      done(null, form);
    });

    app.addHook('onSend', async (_req, reply, payload) => {
      void reply.header('content-security-policy', CSP)
        .header('x-content-type-options', 'nosniff')
        .header('x-frame-options', 'DENY')
        .header('referrer-policy', 'same-origin')
        .header('cross-origin-opener-policy', 'same-origin')
        .header('cross-origin-resource-policy', 'same-origin');
      if (!reply.getHeader('cache-control')) void reply.header('cache-control', 'no-store');
      return payload;
    });

    app.setErrorHandler((err: Error & { statusCode?: number }, req, reply) => {
      const status = err instanceof Refused ? err.status : err instanceof LeafgateError ? err.status : err.statusCode && err.statusCode < 500 ? err.statusCode : 500;
      if (status >= 500) req.log.error({ err }, 'dashboard request failed');
      const message = status >= 500 ? 'internal error (see the authority log)' : err.message;
      const s = req.dashboardSession;
      void reply.status(status).type('text/html; charset=utf-8').send(layout({ title: status === 403 ? 'Refused' : 'Error', operator: s?.operator, csrf: s?.csrf },
        html`<p class="flash error" role="alert">${status}: ${message}</p><p><a href="/dashboard">Back to the overview</a></p>`));
    });
    app.setNotFoundHandler((req, reply) => {
      void reply.status(404).type('text/html; charset=utf-8').send(layout({ title: 'Not found' }, html`<p>No page ${req.url.slice(0, 200)}.</p><p><a href="/dashboard">Overview</a></p>`));
    });

    // Who is asking: the session of the cookie, or (proxy mode) the user the proxy names.
    app.addHook('onRequest', async (req, reply) => {
      const path = req.url.split('?')[0];
      if (path.startsWith('/dashboard/static/')) return;
      let s = await sessions.get(parseCookies(req.headers.cookie)[COOKIE]);
      if (header) {
        const raw = req.headers[header];
        const user = typeof raw === 'string' && /^[\x21-\x7e]{1,128}$/.test(raw) ? raw : null;
        if (user && (!s || s.via !== 'header' || s.operator !== `dashboard:${user}`)) {
          s = await sessions.create(`dashboard:${user}`, 'header');
          setCookie(reply, s.id, sessions.maxAgeSeconds);
        }
      }
      req.dashboardSession = s;
      if (s || path === '/dashboard/login') return;
      // No session: pages send the browser to the login form; a POST is refused outright.
      if (req.method === 'GET' || req.method === 'HEAD') return reply.redirect('/dashboard/login', 303);
      throw new Refused(403, 'no session: log in first');
    });

    // CSRF: every POST but the login form needs the session's token, and every POST an Origin
    // (or, failing that, a Referer) of the dashboard itself.
    app.addHook('preHandler', async (req) => {
      if (req.method !== 'POST') return;
      checkOrigin(req);
      if (req.url.split('?')[0] === '/dashboard/login') return;
      const form = (req.body ?? {}) as Form;
      const s = req.dashboardSession;
      if (!s || typeof form.csrf !== 'string' || !sameSecret(form.csrf, s.csrf)) throw new Refused(403, 'missing or wrong CSRF token: reload the page and try again');
    });

    function checkOrigin(req: FastifyRequest) {
      const expected = cfg.publicOrigin ?? `https://${req.headers.host ?? ''}`;
      const origin = req.headers.origin;
      if (typeof origin === 'string' && origin !== 'null') {
        if (origin !== expected) throw new Refused(403, 'cross-origin request refused');
        return;
      }
      const referer = req.headers.referer;
      let refOrigin: string | null = null;
      try {
        refOrigin = typeof referer === 'string' ? new URL(referer).origin : null;
      } catch {
        refOrigin = null;
      }
      if (refOrigin !== expected) throw new Refused(403, 'request without a same-origin Origin or Referer refused');
    }

    function setCookie(reply: FastifyReply, id: string, maxAge: number) {
      void reply.header('set-cookie', `${COOKIE}=${id}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=${maxAge}`);
    }

    const page = (reply: FastifyReply, req: FastifyRequest, title: string, nav: string, body: SafeHtml, status = 200) => {
      const s = req.dashboardSession!;
      return reply.status(status).type('text/html; charset=utf-8').send(layout({ title, nav, operator: s.operator, csrf: s.csrf }, body));
    };

    app.get('/static/:file', async (req, reply) => {
      const f = STATIC[(req.params as { file: string }).file];
      if (!f) throw new Refused(404, 'no such file');
      return reply.type(f.type).header('cache-control', 'public, max-age=3600').send(f.body);
    });

    // ---- login / logout ----
    app.get('/login', async (req, reply) => {
      if (req.dashboardSession) return reply.redirect('/dashboard', 303);
      const q = query(req);
      return reply.type('text/html; charset=utf-8').send(layout({ title: 'Log in' }, html`
${q.failed ? html`<p class="flash error" role="alert">That token is not the admin token.</p>` : ''}
<form class="card narrow" method="post" action="/dashboard/login">
  <label for="token">Admin token</label>
  <input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
  <p class="hint">The authority's admin token (LEAFGATE_ADMIN_TOKEN or &lt;data dir&gt;/admin-token).</p>
  <button type="submit">Log in</button>
</form>`));
    });

    app.post('/login', async (req, reply) => {
      const form = (req.body ?? {}) as Form;
      const token = field(form, 'token', 1024);
      if (!token || !timingSafeEqual(hashAdminToken(token), deps.adminTokenHash)) return reply.redirect('/dashboard/login?failed=1', 303);
      const old = req.dashboardSession;
      if (old) await sessions.destroy(old.id);
      const s = await sessions.create('dashboard:admin', 'token');
      setCookie(reply, s.id, sessions.maxAgeSeconds);
      await deps.store.appendAudit({ at: now(), action: 'dashboard-login', outcome: 'ok', detail: { actor: s.operator, via: 'token' } });
      return reply.redirect('/dashboard', 303);
    });

    app.post('/logout', async (req, reply) => {
      const s = req.dashboardSession!;
      await sessions.destroy(s.id);
      setCookie(reply, '', 0);
      return reply.redirect('/dashboard/login', 303);
    });

    // ---- overview ----
    app.get('/', async (req, reply) => {
      const t = now();
      const q = query(req);
      const range = q.range === '14d' ? '14d' : '48h';
      const [gateways, counts, day, week, activity, expiry] = await Promise.all([
        deps.queries.gateways(t, 50),
        deps.queries.deviceCounts(t, cfg.expiringDays),
        deps.queries.auditCounts(t - 86_400_000),
        deps.queries.auditCounts(t - 7 * 86_400_000),
        range === '14d' ? deps.queries.activitySeries(t, 86_400_000, 14) : deps.queries.activitySeries(t, 3_600_000, 48),
        deps.queries.expirySeries(t, 12),
      ]);
      const stat = (label: string, value: number, link: string) => html`<li><a href="${link}"><span class="n">${value}</span> <span class="l">${label}</span></a></li>`;
      return page(reply, req, 'Overview', 'overview', html`
<section aria-labelledby="h-devices"><h2 id="h-devices">Devices</h2>
<ul class="stats">
${stat('registered', counts.registered, href('/devices', { state: 'registered' }))}
${stat('enrolled', counts.enrolled, href('/devices', { state: 'enrolled' }))}
${stat('with an active certificate', counts.active, href('/certificates', { status: 'active', kind: 'device' }))}
${stat(`expiring within ${cfg.expiringDays} d`, counts.expiring, href('/devices', { state: 'expiring' }))}
${stat('with a revoked certificate', counts.revoked, href('/devices', { state: 'revoked' }))}
${stat('decommissioned', counts.decommissioned, href('/devices', { state: 'disabled' }))}
${stat('cloud sync failed', counts.syncFailed, href('/sync'))}
</ul></section>
<section aria-labelledby="h-activity"><h2 id="h-activity">Issuance and refusals</h2>
<table class="compact"><thead><tr><th scope="col"></th><th scope="col">issued</th><th scope="col">renewed</th><th scope="col">refused</th><th scope="col">errors</th></tr></thead>
<tbody><tr><th scope="row">last 24 h</th><td class="num">${day.issued}</td><td class="num">${day.renewed}</td><td class="num"><a href="${href('/audit', { outcome: 'refused' })}">${day.refused}</a></td><td class="num">${day.errors}</td></tr>
<tr><th scope="row">last 7 d</th><td class="num">${week.issued}</td><td class="num">${week.renewed}</td><td class="num">${week.refused}</td><td class="num">${week.errors}</td></tr></tbody></table>
<p class="tabs">Plot: <a href="${href('/', { range: '48h' })}"${range === '48h' ? html` aria-current="true"` : ''}>last 48 hours</a> · <a href="${href('/', { range: '14d' })}"${range === '14d' ? html` aria-current="true"` : ''}>last 14 days</a></p>
${barChart({
  title: range === '14d' ? 'Onboardings and refusals per day' : 'Onboardings and refusals per hour',
  labels: activity.map((b) => (range === '14d' ? new Date(b.start).toISOString().slice(5, 10) : new Date(b.start).toISOString().slice(11, 13) + 'h')),
  series: [{ name: 'onboarded', cls: 's1', values: activity.map((b) => b.onboarded) }, { name: 'refused', cls: 's2', values: activity.map((b) => b.refused) }],
  caption: range === '14d' ? 'Per UTC day, from the audit log.' : 'Per hour (UTC), from the audit log.',
})}
</section>
<section aria-labelledby="h-expiry"><h2 id="h-expiry">Certificate expiries, next 12 weeks</h2>
${barChart({
  title: 'Active certificates expiring per week',
  labels: expiry.map((b) => new Date(b.start).toISOString().slice(5, 10)),
  series: [{ name: 'devices', cls: 's1', values: expiry.map((b) => b.devices) }, { name: 'gateways and CAs', cls: 's3', values: expiry.map((b) => b.others) }],
  caption: 'Weeks starting at the date shown (UTC).',
})}
</section>
<section aria-labelledby="h-gateways"><h2 id="h-gateways">Gateways</h2>
${gatewayTable(gateways, t)}
<p><a href="/dashboard/gateways">All gateways and their actions</a></p>
</section>`);
    });

    function gatewayTable(gateways: Awaited<ReturnType<DashboardQueries['gateways']>>, t: number, actions?: SafeHtml[]) {
      if (!gateways.length) return html`<p>No gateway yet.</p>`;
      return html`<div class="scroll"><table><thead><tr><th scope="col">gateway</th><th scope="col">status</th><th scope="col">certificate expires</th><th scope="col">Edge CA expires</th><th scope="col">last contact</th>${actions ? html`<th scope="col">actions</th>` : ''}</tr></thead><tbody>
${gateways.map((g, i) => html`<tr><td><a href="${href('/devices', { gateway: g.id })}">${g.id}</a></td><td><span class="badge ${g.status}">${g.status}</span></td>
<td>${g.certSerial ? html`<a href="${href('/certificates/' + seg(g.certSerial))}">${relative(g.certNotAfter, t)}</a>` : '—'}</td><td>${relative(g.edgeCaNotAfter, t)}</td><td title="${when(g.lastSeen)}">${relative(g.lastSeen, t)}</td>${actions ? html`<td>${actions[i]}</td>` : ''}</tr>`)}
</tbody></table></div>`;
    }

    const reasonSelect = (id: string) => html`<label for="${id}">Reason</label><select id="${id}" name="reason">${REASONS.map((r) => html`<option value="${r}"${r === 'unspecified' ? html` selected` : ''}>${r}</option>`)}</select>`;

    // ---- gateways ----
    // Devices whose IoT Hub or DPS sync failed past its attempt limit (parked), and the retry.
    app.get('/sync', async (req, reply) => {
      const s = req.dashboardSession!;
      const t = now();
      const rows = await deps.store.listSyncFailed({ limit: 500 });
      const q = query(req);
      const retry = (target: string, device: string | undefined, label: string) => html`<form method="post" action="/dashboard/actions/retry-sync">${csrfField(s.csrf)}<input type="hidden" name="target" value="${target}">${device ? html`<input type="hidden" name="device" value="${device}">` : ''}<button type="submit">${label}</button></form>`;
      return page(reply, req, 'Cloud sync', 'sync', html`
${flash(q.done)}
<p>Devices whose registration in IoT Hub or DPS failed past the attempt limit. The others keep syncing; these wait for an operator (fix the cause, then retry).</p>
${rows.length ? html`<div class="actions">${[...new Set(rows.map((r) => r.target))].map((target) => retry(target, undefined, `Retry all failed ${target === 'hub' ? 'IoT Hub' : 'DPS'} syncs…`))}</div>
<table><thead><tr><th scope="col">device</th><th scope="col">target</th><th scope="col">certificate</th><th scope="col">attempts</th><th scope="col">failed</th><th scope="col">last error</th><th scope="col"></th></tr></thead>
<tbody>${rows.map((r) => html`<tr><td><a href="${href('/devices/' + seg(r.deviceId))}">${r.deviceId}</a></td><td>${r.target}</td><td><a href="${href('/certificates/' + seg(r.serial))}">${r.serial.slice(0, 12)}…</a> (${r.status})</td><td class="num">${r.attempts}</td><td title="${when(r.failedAt)}">${relative(r.failedAt, t)}</td><td>${r.error ?? ''}</td><td>${retry(r.target, r.deviceId, 'Retry…')}</td></tr>`)}</tbody></table>` : html`<p>No failed sync.</p>`}`);
    });

    app.post('/actions/retry-sync', async (req, reply) => {
      const form = req.body as Form;
      const target = field(form, 'target', 8);
      if (target !== 'hub' && target !== 'dps') throw new Refused(400, 'target must be hub or dps');
      const device = typeof form.device === 'string' && form.device !== '' ? field(form, 'device', 128) : undefined;
      if (device !== undefined && !isValidDeviceId(device)) throw new Refused(400, 'not a device id');
      const what = device ? html`the failed ${target} sync of device <strong>${device}</strong>` : html`every failed ${target} sync`;
      if (form.confirm !== 'yes') return confirmPage(req, reply, 'retry-sync', { target, ...(device ? { device } : {}) }, html`Retry ${what} with a fresh set of attempts?`, 'Retry');
      const count = await deps.store.retrySyncFailed(target, device);
      await deps.store.appendAudit({ at: now(), action: 'sync-retry', outcome: 'ok', deviceId: device ?? null, detail: { target, count, actor: req.dashboardSession!.operator } });
      return reply.redirect(href('/sync', { done: 'sync-retried' }), 303);
    });

    app.get('/gateways', async (req, reply) => {
      const s = req.dashboardSession!;
      const t = now();
      const gateways = await deps.queries.gateways(t, 500);
      const actions = gateways.map((g, i) => g.status === 'active'
        ? html`<form class="inline" method="post" action="/dashboard/actions/revoke-gateway">${csrfField(s.csrf)}<input type="hidden" name="gateway" value="${g.id}">${reasonSelect(`gw-reason-${i}`)} <button type="submit" class="danger">Revoke…</button></form>`
        : html`<span class="muted">disabled</span>`);
      return page(reply, req, 'Gateways', 'gateways', html`
${gatewayTable(gateways, t, actions)}
<h2 id="h-token">Create a gateway enrollment token</h2>
<form class="card" method="post" action="/dashboard/actions/enrollment-token" aria-labelledby="h-token">${csrfField(s.csrf)}
  <label for="tok-gw">Gateway id</label><input id="tok-gw" name="gateway" required maxlength="128" pattern="[A-Za-z0-9][A-Za-z0-9._:\\-]*">
  <label for="tok-ttl">Valid for (hours)</label><input id="tok-ttl" name="ttlHours" type="number" min="1" max="720" value="24" required>
  <button type="submit">Create token</button>
</form>`);
    });

    // ---- devices ----
    app.get('/devices', async (req, reply) => {
      const s = req.dashboardSession!;
      const q = query(req);
      const t = now();
      const state = (DEVICE_STATES as readonly string[]).includes(q.state ?? '') ? (q.state as DeviceState) : undefined;
      const rows = await deps.queries.devices({ idPrefix: q.id || undefined, gatewayId: q.gateway || undefined, state, after: q.after || undefined, limit: PAGE + 1, now: t, expiringDays: cfg.expiringDays });
      const more = rows.length > PAGE;
      const list = rows.slice(0, PAGE);
      return page(reply, req, 'Devices', 'devices', html`
<form class="filters" method="get" action="/dashboard/devices" role="search">
  <div><label for="f-id">Id starts with</label><input id="f-id" name="id" value="${q.id}"></div>
  <div><label for="f-gw">Gateway</label><input id="f-gw" name="gateway" value="${q.gateway}"></div>
  <div><label for="f-state">State</label><select id="f-state" name="state"><option value="">any</option>${DEVICE_STATES.map((st) => html`<option value="${st}"${st === state ? html` selected` : ''}>${st === 'disabled' ? 'decommissioned' : st === 'expiring' ? `expiring within ${cfg.expiringDays} d` : st}</option>`)}</select></div>
  <div><button type="submit">Filter</button></div>
</form>
<div class="scroll"><table id="devices"><thead><tr><th scope="col">device</th><th scope="col">group</th><th scope="col">method</th><th scope="col">status</th><th scope="col">gateway</th><th scope="col">certificate expires</th></tr></thead><tbody>
${list.map((d) => html`<tr><td><a href="${href('/devices/' + seg(d.id))}">${d.id}</a></td><td>${d.groupName}</td><td>${d.method}</td><td><span class="badge ${d.status}">${d.status === 'disabled' ? 'decommissioned' : d.status}</span></td><td>${d.gatewayId ?? '—'}</td><td title="${when(d.certNotAfter)}">${relative(d.certNotAfter, t)}</td></tr>`)}
</tbody></table></div>
${list.length === 0 ? html`<p>No device matches.</p>` : ''}
${more ? html`<p class="pager"><a rel="next" href="${href('/devices', { id: q.id, gateway: q.gateway, state, after: list[list.length - 1].id })}">Next page</a></p>` : ''}
<h2 id="h-code">Create a ddkg one-time code</h2>
<form class="card" method="post" action="/dashboard/actions/enrollment-code" aria-labelledby="h-code">${csrfField(s.csrf)}
  <label for="code-dev">Device id</label><input id="code-dev" name="device" required maxlength="128">
  <label for="code-group">Group</label><select id="code-group" name="group">${deps.groups.map((g) => html`<option value="${g}">${g}</option>`)}</select>
  <label for="code-ttl">Valid for (hours)</label><input id="code-ttl" name="ttlHours" type="number" min="1" max="2160" value="168" required>
  <button type="submit">Create code</button>
</form>`);
    });

    app.get('/devices/:id', async (req, reply) => {
      const s = req.dashboardSession!;
      const id = (req.params as { id: string }).id;
      const t = now();
      const device = await deps.store.getDevice(id);
      if (!device) throw new Refused(404, 'no such device');
      const [certs, audit] = await Promise.all([deps.queries.certificates({ subjectId: id, limit: 50 }), deps.queries.audit({ deviceId: id, limit: PAGE })]);
      const q = query(req);
      return page(reply, req, `Device ${id}`, 'devices', html`
${flash(q.done)}
<dl class="facts">
<dt>Id</dt><dd>${device.id}</dd><dt>Status</dt><dd><span class="badge ${device.status}">${device.status === 'disabled' ? 'decommissioned' : device.status}</span></dd>
<dt>Group</dt><dd>${device.groupName}</dd><dt>Method</dt><dd>${device.method}</dd><dt>Gateway</dt><dd>${device.gatewayId ?? '—'}</dd>
<dt>IoT Hub</dt><dd>${device.hubState ?? '—'}</dd><dt>Created</dt><dd>${when(device.createdAt)}</dd><dt>Updated</dt><dd>${when(device.updatedAt)}</dd>
</dl>
<h2>Certificates</h2>
${certTable(certs, t)}
<h2>Actions</h2>
<div class="actions">
<form class="card" method="post" action="/dashboard/actions/revoke-device">${csrfField(s.csrf)}<input type="hidden" name="device" value="${device.id}">
  <p>Revoke every active certificate of this device.</p>${reasonSelect('dev-reason')} <button type="submit" class="danger">Revoke certificates…</button></form>
${device.status !== 'disabled' ? html`<form class="card" method="post" action="/dashboard/actions/decommission">${csrfField(s.csrf)}<input type="hidden" name="device" value="${device.id}">
  <p>Decommission: revoke its certificates and disable the device for good.</p>${reasonSelect('dec-reason')} <button type="submit" class="danger">Decommission…</button></form>` : ''}
</div>
<h2>Audit trail</h2>
${auditTable(audit, t)}
${audit.length === PAGE ? html`<p class="pager"><a href="${href('/audit', { device: id, before: audit[audit.length - 1].seq })}">Older entries</a></p>` : ''}`);
    });

    function flash(done: string | undefined) {
      const text: Record<string, string> = {
        revoked: 'Revoked: the certificates are on the next CRL.', decommissioned: 'Decommissioned.', 'gateway-revoked': 'Gateway disabled and its certificates revoked.',
        'sync-retried': 'Sync retried: the devices are back in the queue with a fresh set of attempts.',
      };
      return done && text[done] ? html`<p class="flash ok" role="status">${text[done]}</p>` : '';
    }

    function certTable(certs: Awaited<ReturnType<DashboardQueries['certificates']>>, t: number) {
      if (!certs.length) return html`<p>No certificate.</p>`;
      return html`<div class="scroll"><table class="certs"><thead><tr><th scope="col">serial</th><th scope="col">subject</th><th scope="col">kind</th><th scope="col">status</th><th scope="col">not after</th><th scope="col">issued</th></tr></thead><tbody>
${certs.map((c) => html`<tr><td class="mono"><a href="${href('/certificates/' + seg(c.serial))}">${c.serial}</a></td><td>${c.kind === 'device' ? html`<a href="${href('/devices/' + seg(c.subjectId))}">${c.subjectId}</a>` : c.subjectId}</td><td>${c.kind}</td><td><span class="badge ${c.status}">${c.status}</span>${c.hubError ? html` <span class="badge revoked" title="${c.hubError}">sync failed</span>` : ''}</td><td title="${when(c.notAfter)}">${relative(c.notAfter, t)}</td><td>${when(c.createdAt)}</td></tr>`)}
</tbody></table></div>`;
    }

    function auditTable(rows: AuditRow[], t: number) {
      if (!rows.length) return html`<p>No audit entry.</p>`;
      return html`<div class="scroll"><table class="audit"><thead><tr><th scope="col">#</th><th scope="col">when</th><th scope="col">action</th><th scope="col">outcome</th><th scope="col">device</th><th scope="col">gateway</th><th scope="col">serial</th><th scope="col">detail</th></tr></thead><tbody>
${rows.map((r) => html`<tr><td class="num">${r.seq}</td><td title="${relative(r.at, t)}">${when(r.at)}</td><td>${r.action}</td><td><span class="badge ${r.outcome}">${r.outcome}</span>${r.code ? html` <span class="code">${r.code}</span>` : ''}</td>
<td>${r.deviceId ? html`<a href="${href('/devices/' + seg(r.deviceId))}">${r.deviceId}</a>` : ''}</td><td>${r.gatewayId ?? ''}</td><td class="mono">${r.serial ? html`<a href="${href('/certificates/' + seg(r.serial))}">${r.serial}</a>` : ''}</td>
<td class="detail">${r.detail ? JSON.stringify(r.detail) : ''}</td></tr>`)}
</tbody></table></div>`;
    }

    // ---- certificates ----
    app.get('/certificates', async (req, reply) => {
      const q = query(req);
      const t = now();
      if (q.serial) {
        const serial = q.serial.replace(/:/g, '').toUpperCase();
        if (/^[0-9A-F]{1,64}$/.test(serial) && (await deps.queries.certificate(serial))) return reply.redirect(href('/certificates/' + seg(serial)), 303);
      }
      let before: { createdAt: number; serial: string } | undefined;
      const m = /^(\d{1,16})\.([0-9A-F]{1,64})$/.exec(q.before ?? '');
      if (m) before = { createdAt: Number(m[1]), serial: m[2] };
      const status = ['active', 'superseded', 'revoked'].includes(q.status ?? '') ? q.status : undefined;
      const kind = ['device', 'gateway', 'server', 'subca', 'ca'].includes(q.kind ?? '') ? q.kind : undefined;
      const rows = await deps.queries.certificates({ subjectId: q.subject || undefined, status, kind, before, limit: PAGE + 1 });
      const more = rows.length > PAGE;
      const list = rows.slice(0, PAGE);
      const last = list[list.length - 1];
      const opt = (v: string, cur: string | undefined) => html`<option value="${v}"${v === cur ? html` selected` : ''}>${v}</option>`;
      return page(reply, req, 'Certificates', 'certificates', html`
<form class="filters" method="get" action="/dashboard/certificates" role="search">
  <div><label for="c-serial">Serial</label><input id="c-serial" name="serial" value="${q.serial}" class="mono"></div>
  <div><label for="c-subject">Subject (device or gateway id)</label><input id="c-subject" name="subject" value="${q.subject}"></div>
  <div><label for="c-status">Status</label><select id="c-status" name="status"><option value="">any</option>${['active', 'superseded', 'revoked'].map((v) => opt(v, status))}</select></div>
  <div><label for="c-kind">Kind</label><select id="c-kind" name="kind"><option value="">any</option>${['device', 'gateway', 'subca', 'server', 'ca'].map((v) => opt(v, kind))}</select></div>
  <div><button type="submit">Filter</button></div>
</form>
${q.serial ? html`<p class="flash error" role="alert">No certificate with serial ${q.serial}.</p>` : ''}
${certTable(list, t)}
${more ? html`<p class="pager"><a rel="next" href="${href('/certificates', { subject: q.subject, status, kind, before: `${last.createdAt}.${last.serial}` })}">Next page</a></p>` : ''}`);
    });

    app.get('/certificates/:serial', async (req, reply) => {
      const s = req.dashboardSession!;
      const serial = (req.params as { serial: string }).serial.toUpperCase();
      const t = now();
      const c = /^[0-9A-F]{1,64}$/.test(serial) ? await deps.queries.certificate(serial) : null;
      if (!c) throw new Refused(404, 'no such certificate');
      let x: X509Certificate | null = null;
      try {
        x = new X509Certificate(c.pem);
      } catch {
        x = null;
      }
      const audit = await deps.queries.audit({ serial, limit: PAGE });
      const q = query(req);
      return page(reply, req, `Certificate ${serial}`, 'certificates', html`
${flash(q.done)}
<dl class="facts">
<dt>Serial</dt><dd class="mono">${c.serial}</dd>
<dt>Subject id</dt><dd>${c.kind === 'device' ? html`<a href="${href('/devices/' + seg(c.subjectId))}">${c.subjectId}</a>` : c.subjectId}</dd>
<dt>Kind</dt><dd>${c.kind}</dd><dt>Issuer</dt><dd>${c.issuer}</dd>
<dt>Status</dt><dd><span class="badge ${c.status}">${c.status}</span>${c.revokedAt ? html` at ${when(c.revokedAt)} (reason ${REASONS.find((r) => pkix.REVOCATION_REASONS[r] === c.revocationReason) ?? c.revocationReason})` : ''}</dd>
<dt>Not before</dt><dd>${when(c.notBefore)}</dd><dt>Not after</dt><dd>${when(c.notAfter)} (${relative(c.notAfter, t)})</dd>
<dt>SHA-256</dt><dd class="mono wrap">${c.fingerprint}</dd>
${x ? html`<dt>Subject</dt><dd class="wrap">${x.subject.replace(/\n/g, ', ')}</dd><dt>Issuer name</dt><dd class="wrap">${x.issuer.replace(/\n/g, ', ')}</dd>
<dt>SANs</dt><dd class="wrap">${x.subjectAltName ?? '—'}</dd><dt>Key</dt><dd>${x.publicKey.asymmetricKeyType}${x.publicKey.asymmetricKeyDetails?.namedCurve ? ` ${x.publicKey.asymmetricKeyDetails.namedCurve}` : x.publicKey.asymmetricKeyDetails?.modulusLength ? ` ${x.publicKey.asymmetricKeyDetails.modulusLength}` : ''}</dd>` : ''}
${c.hubError ? html`<dt>IoT Hub sync</dt><dd>failed: ${c.hubError}</dd>` : ''}
</dl>
${c.status === 'active' ? html`<h2>Actions</h2><form class="card" method="post" action="/dashboard/actions/revoke-certificate">${csrfField(s.csrf)}<input type="hidden" name="serial" value="${c.serial}">
  ${reasonSelect('cert-reason')} <button type="submit" class="danger">Revoke…</button></form>` : ''}
<details><summary>PEM</summary><pre class="pem">${c.pem}</pre></details>
<h2>Audit trail</h2>
${auditTable(audit, t)}`);
    });

    // ---- audit log ----
    app.get('/audit', async (req, reply) => {
      const q = query(req);
      const t = now();
      const before = /^\d{1,15}$/.test(q.before ?? '') ? Number(q.before) : undefined;
      const outcome = ['ok', 'refused', 'error'].includes(q.outcome ?? '') ? q.outcome : undefined;
      const [rows, actions] = await Promise.all([
        deps.queries.audit({ action: q.action || undefined, outcome, deviceId: q.device || undefined, gatewayId: q.gateway || undefined, serial: q.serial ? q.serial.replace(/:/g, '').toUpperCase() : undefined, before, limit: PAGE + 1 }),
        deps.queries.auditActions(),
      ]);
      const more = rows.length > PAGE;
      const list = rows.slice(0, PAGE);
      return page(reply, req, 'Audit log', 'audit', html`
<form class="filters" method="get" action="/dashboard/audit" role="search">
  <div><label for="a-action">Action</label><select id="a-action" name="action"><option value="">any</option>${actions.map((a) => html`<option value="${a}"${a === q.action ? html` selected` : ''}>${a}</option>`)}</select></div>
  <div><label for="a-outcome">Outcome</label><select id="a-outcome" name="outcome"><option value="">any</option>${['ok', 'refused', 'error'].map((o) => html`<option value="${o}"${o === outcome ? html` selected` : ''}>${o}</option>`)}</select></div>
  <div><label for="a-device">Device</label><input id="a-device" name="device" value="${q.device}"></div>
  <div><label for="a-gateway">Gateway</label><input id="a-gateway" name="gateway" value="${q.gateway}"></div>
  <div><label for="a-serial">Serial</label><input id="a-serial" name="serial" value="${q.serial}" class="mono"></div>
  <div><button type="submit">Filter</button></div>
</form>
${auditTable(list, t)}
${more ? html`<p class="pager"><a rel="next" href="${href('/audit', { action: q.action, outcome, device: q.device, gateway: q.gateway, serial: q.serial, before: list[list.length - 1].seq })}">Older entries</a></p>` : ''}`);
    });

    // ---- actions (POST, CSRF-checked above; the destructive ones ask for confirmation) ----
    const confirmPage = (req: FastifyRequest, reply: FastifyReply, action: string, fields: Record<string, string>, what: SafeHtml, button: string) => {
      const s = req.dashboardSession!;
      return page(reply, req, 'Confirm', '', html`
<div class="card confirm" role="alertdialog" aria-labelledby="confirm-what"><p id="confirm-what">${what}</p>
<form method="post" action="/dashboard/actions/${action}">${csrfField(s.csrf)}${Object.entries(fields).map(([k, v]) => html`<input type="hidden" name="${k}" value="${v}">`)}<input type="hidden" name="confirm" value="yes">
<button type="submit" class="danger" autofocus>${button}</button> <a href="/dashboard">Cancel</a></form></div>`);
    };
    const reasonOf = (form: Form): pkix.RevocationReason => {
      const r = field(form, 'reason', 64) || 'unspecified';
      if (!(REASONS as string[]).includes(r)) throw new Refused(400, 'unknown revocation reason');
      return r as pkix.RevocationReason;
    };

    app.post('/actions/revoke-certificate', async (req, reply) => {
      const form = req.body as Form;
      const serial = field(form, 'serial', 80).replace(/:/g, '').toUpperCase();
      const reason = reasonOf(form);
      if (!/^[0-9A-F]{2,64}$/.test(serial)) throw new Refused(400, 'serial must be hex');
      const c = await deps.queries.certificate(serial);
      if (!c) throw new Refused(404, 'no such certificate');
      if (form.confirm !== 'yes') return confirmPage(req, reply, 'revoke-certificate', { serial, reason }, html`Revoke certificate <strong class="mono">${serial}</strong> of ${c.kind} <strong>${c.subjectId}</strong> (reason ${reason})? This cannot be undone.`, 'Revoke certificate');
      await deps.revocation.revokeSerial(serial, reason, req.dashboardSession!.operator);
      return reply.redirect(href('/certificates/' + seg(serial), { done: 'revoked' }), 303);
    });

    app.post('/actions/revoke-device', async (req, reply) => {
      const form = req.body as Form;
      const deviceId = field(form, 'device', 128);
      const reason = reasonOf(form);
      const device = isValidDeviceId(deviceId) ? await deps.store.getDevice(deviceId) : null;
      if (!device) throw new Refused(404, 'no such device');
      if (form.confirm !== 'yes') return confirmPage(req, reply, 'revoke-device', { device: deviceId, reason }, html`Revoke every active certificate of device <strong>${deviceId}</strong> (reason ${reason})?`, 'Revoke certificates');
      await revokeDevice(deviceId, reason, false, req.dashboardSession!.operator);
      return reply.redirect(href('/devices/' + seg(deviceId), { done: 'revoked' }), 303);
    });

    app.post('/actions/decommission', async (req, reply) => {
      const form = req.body as Form;
      const deviceId = field(form, 'device', 128);
      const reason = reasonOf(form);
      const device = isValidDeviceId(deviceId) ? await deps.store.getDevice(deviceId) : null;
      if (!device) throw new Refused(404, 'no such device');
      if (form.confirm !== 'yes') return confirmPage(req, reply, 'decommission', { device: deviceId, reason }, html`Decommission device <strong>${deviceId}</strong>: revoke its certificates (reason ${reason}) and disable it for good?`, 'Decommission');
      await revokeDevice(deviceId, reason, true, req.dashboardSession!.operator);
      return reply.redirect(href('/devices/' + seg(deviceId), { done: 'decommissioned' }), 303);
    });

    app.post('/actions/revoke-gateway', async (req, reply) => {
      const form = req.body as Form;
      const gatewayId = field(form, 'gateway', 128);
      const reason = reasonOf(form);
      const gateway = isValidDeviceId(gatewayId) ? await deps.store.getGateway(gatewayId) : null;
      if (!gateway) throw new Refused(404, 'no such gateway');
      if (form.confirm !== 'yes') return confirmPage(req, reply, 'revoke-gateway', { gateway: gatewayId, reason }, html`Revoke gateway <strong>${gatewayId}</strong> (reason ${reason})? It is refused at once, its certificate and Edge CA go on the CRLs, and its devices lose their gateway.`, 'Revoke gateway');
      const actor = req.dashboardSession!.operator;
      // As the admin API's revoke --gateway: disabled first, then its certificates revoked.
      await deps.store.setGatewayStatus(gatewayId, 'disabled', { at: now(), action: 'disable-gateway', outcome: 'ok', gatewayId, detail: { reason, actor } });
      for (const kind of ['gateway', 'subca'] as const) {
        for (const c of await deps.store.listCertificates({ subjectId: gatewayId, status: 'active', kind })) await deps.revocation.revokeSerial(c.serial, reason, actor);
      }
      return reply.redirect(href('/gateways', { done: 'gateway-revoked' }), 303);
    });

    app.post('/actions/enrollment-token', async (req, reply) => {
      const form = req.body as Form;
      const gatewayId = field(form, 'gateway', 128);
      const hours = Number(field(form, 'ttlHours', 8) || 24);
      if (!isValidDeviceId(gatewayId)) throw new Refused(400, 'gateway id is not allowed');
      if (!Number.isInteger(hours) || hours < 1 || hours > 720) throw new Refused(400, 'ttlHours must be 1..720');
      const token = await deps.enrollment.createToken(gatewayId, hours * 3600);
      await deps.store.appendAudit({ at: now(), action: 'create-enrollment-token', outcome: 'ok', gatewayId, detail: { actor: req.dashboardSession!.operator, ttlHours: hours } });
      return secretPage(req, reply, 'Gateway enrollment token', html`One-time enrollment token for gateway <strong>${gatewayId}</strong>, valid ${hours} h:`, token,
        html`<code>leafgate gateway enroll --token … --gateway-id ${gatewayId}</code>`);
    });

    app.post('/actions/enrollment-code', async (req, reply) => {
      const form = req.body as Form;
      const deviceId = field(form, 'device', 128);
      const group = field(form, 'group', 128);
      const hours = Number(field(form, 'ttlHours', 8) || 168);
      if (!isValidDeviceId(deviceId)) throw new Refused(400, 'device id is not allowed');
      if (!deps.groups.includes(group)) throw new Refused(400, 'unknown group');
      if (!Number.isInteger(hours) || hours < 1 || hours > 2160) throw new Refused(400, 'ttlHours must be 1..2160');
      const code = await deps.createEnrollmentCode(deviceId, group, hours * 3600);
      await deps.store.appendAudit({ at: now(), action: 'create-enrollment-code', outcome: 'ok', deviceId, detail: { actor: req.dashboardSession!.operator, group, ttlHours: hours } });
      return secretPage(req, reply, 'ddkg one-time code', html`One-time ddkg enrollment code for device <strong>${deviceId}</strong> (group ${group}), valid ${hours} h:`, code, html`Give it to the device's installer; it is used once.`);
    });

    function secretPage(req: FastifyRequest, reply: FastifyReply, title: string, what: SafeHtml, secret: string, how: SafeHtml) {
      void reply.header('cache-control', 'no-store');
      return page(reply, req, title, '', html`<div class="card secret"><p>${what}</p>
<p><output id="secret" class="mono wrap">${secret}</output> <button type="button" class="copy" data-copy="secret" hidden>Copy</button></p>
<p class="flash warn" role="status">Shown once: the authority keeps only its hash. Copy it now.</p><p>${how}</p></div>`);
    }

    async function revokeDevice(deviceId: string, reason: pkix.RevocationReason, decommission: boolean, actor: string) {
      const active = await deps.store.listCertificates({ subjectId: deviceId, status: 'active', kind: 'device' });
      for (const c of active) await deps.revocation.revokeSerial(c.serial, reason, actor);
      if (decommission) {
        const t = now();
        await deps.store.updateDevice(deviceId, { status: 'disabled' }, t);
        await deps.store.appendAudit({ at: t, action: 'decommission', outcome: 'ok', deviceId, detail: { revoked: active.length, reason, actor } });
      }
    }
  };
}
