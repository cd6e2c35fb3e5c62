/**
 * dashboard: page latency of the operator dashboard's queries (authority/store/dashboard.ts)
 * on a big SQLite store: --audit rows (default 1,000,000) over 90 days and --devices
 * (default 100,000) with a certificate each, behind 20 gateways; migration 011's indexes in
 * place. The store is filled with plain prepared INSERTs in one transaction (not timed),
 * then each page's queries run --iterations times; one JSON line per query with p50 and p99
 * in milliseconds. The overview line is every query of the overview page together.
 */
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { SqliteStore } from '../authority/index.ts';
import { DashboardQueries } from '../authority/store/dashboard.ts';
import { log, percentiles, removeDirLater } from './common.ts';
import { defineBench } from './types.ts';

const DAY = 86_400_000;

/** Deterministic pseudo-random numbers (mulberry32): the same store for every run. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function fill(file: string, devices: number, auditRows: number, now: number): void {
  const db = new Database(file);
  db.pragma('journal_mode = WAL');
  db.pragma('synchronous = OFF');
  const r = rng(19);
  const id = (i: number) => `dev-${String(i).padStart(7, '0')}`;
  const gw = (i: number) => `gw-${String(i % 20).padStart(2, '0')}`;
  const serial = (i: number, k = 0) => (0x100000 + i * 4 + k).toString(16).toUpperCase().padStart(16, '0');
  db.transaction(() => {
    const g = db.prepare("INSERT INTO gateways (id, status, cert_serial, cert_fingerprint, created_at, updated_at) VALUES (?, 'active', ?, 'fp', ?, ?)");
    const c = db.prepare("INSERT INTO certificates (serial, subject_id, kind, fingerprint, not_before, not_after, status, request_id, pem, created_at, issuer, revoked_at, revocation_reason) VALUES (?, ?, ?, 'fp', ?, ?, ?, NULL, 'PEM', ?, ?, ?, ?)");
    for (let i = 0; i < 20; i++) {
      const s = `FF${String(i).padStart(14, '0')}`;
      g.run(gw(i), s, now - 90 * DAY, now);
      c.run(s, gw(i), 'gateway', now - 30 * DAY, now + 60 * DAY, 'active', now - 30 * DAY, 'infra-ca', null, null);
      c.run(`FE${String(i).padStart(14, '0')}`, gw(i), 'subca', now - 30 * DAY, now + 60 * DAY, 'active', now - 30 * DAY, 'edge-issuer', null, null);
    }
    const d = db.prepare('INSERT INTO devices (id, group_name, method, status, gateway_id, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)');
    for (let i = 0; i < devices; i++) {
      const x = r();
      const status = x < 0.1 ? 'registered' : x < 0.95 ? 'enrolled' : 'disabled';
      const created = now - Math.floor(r() * 90 * DAY);
      d.run(id(i), 'default', r() < 0.7 ? 'pki-signature' : 'ddkg', status, gw(i), created, created);
      if (status === 'registered') continue;
      const nb = created + 60_000;
      const revoked = status === 'disabled' || r() < 0.01;
      c.run(serial(i), id(i), 'device', nb, nb + 120 * DAY, revoked ? 'revoked' : 'active', nb, 'device-ca', revoked ? now - DAY : null, revoked ? 1 : null);
      if (r() < 0.2) c.run(serial(i, 1), id(i), 'device', nb - 30 * DAY, nb + 90 * DAY, 'superseded', nb - 30 * DAY, 'device-ca', null, null);
    }
    const a = db.prepare('INSERT INTO audit_log (at, action, outcome, code, device_id, gateway_id, request_id, serial, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)');
    const actions = ['register', 'auth', 'issue', 'renew'];
    const start = now - 90 * DAY;
    for (let i = 0; i < auditRows; i++) {
      const dev = Math.floor(r() * devices);
      const refused = r() < 0.05;
      const action = actions[Math.floor(r() * actions.length)];
      a.run(start + Math.floor((i / auditRows) * 90 * DAY), action, refused ? 'refused' : 'ok', refused ? 'auth_failed' : null, id(dev), gw(dev), `req-${i}`,
        action === 'issue' || action === 'renew' ? serial(dev) : null, refused ? '{"message":"refused"}' : null);
    }
  })();
  db.pragma('wal_checkpoint(TRUNCATE)');
  db.exec('ANALYZE');
  db.close();
}

export const dashboardBench = defineBench({
  name: 'dashboard',
  description: 'dashboard page queries (p50/p99 ms) on a SQLite store with many audit rows and devices',
  options: {
    devices: { default: 100_000, help: 'devices (each with a certificate unless registered only)' },
    audit: { default: 1_000_000, help: 'audit_log rows, spread over 90 days' },
    iterations: { default: 50, help: 'runs of each page query' },
  },
  async run(opts, emit) {
    const dir = mkdtempSync(join(tmpdir(), 'leafgate-bench-dashboard-'));
    removeDirLater(dir, opts.keep);
    const file = join(dir, 'authority.db');
    const now = Date.now();
    await new SqliteStore(file, { fsync: false }).close(); // creates and migrates (011 included)
    const t0 = performance.now();
    fill(file, opts.devices, opts.audit, now);
    log(`filled ${opts.devices} devices, ${opts.audit} audit rows in ${Math.round((performance.now() - t0) / 1000)} s`);
    emit('fill_seconds', (performance.now() - t0) / 1000, 's');
    const store = new SqliteStore(file, { fsync: false });
    const q = new DashboardQueries(store.db);
    const mid = `dev-${String(Math.floor(opts.devices / 2)).padStart(7, '0')}`;
    const midSeq = Math.floor(opts.audit / 2);
    const pages: Array<[string, () => Promise<unknown>]> = [
      ['overview', () => Promise.all([q.gateways(now, 50), q.deviceCounts(now, 30), q.auditCounts(now - DAY), q.auditCounts(now - 7 * DAY), q.activitySeries(now, 3_600_000, 48), q.expirySeries(now, 12)])],
      ['overview_device_counts', () => q.deviceCounts(now, 30)],
      ['overview_audit_counts_7d', () => q.auditCounts(now - 7 * DAY)],
      ['plot_activity_48h', () => q.activitySeries(now, 3_600_000, 48)],
      ['plot_activity_14d', () => q.activitySeries(now, DAY, 14)],
      ['plot_expiry_12w', () => q.expirySeries(now, 12)],
      ['devices_first_page', () => q.devices({ limit: 51, now, expiringDays: 30 })],
      ['devices_deep_page', () => q.devices({ after: mid, limit: 51, now, expiringDays: 30 })],
      ['devices_by_state', () => q.devices({ state: 'disabled', after: mid, limit: 51, now, expiringDays: 30 })],
      ['devices_expiring', () => q.devices({ state: 'expiring', limit: 51, now, expiringDays: 30 })],
      ['devices_by_gateway', () => q.devices({ gatewayId: 'gw-07', after: mid, limit: 51, now, expiringDays: 30 })],
      ['devices_id_prefix', () => q.devices({ idPrefix: mid.slice(0, -2), limit: 51, now, expiringDays: 30 })],
      ['certificates_first_page', () => q.certificates({ limit: 51 })],
      ['certificates_revoked', () => q.certificates({ status: 'revoked', kind: 'device', limit: 51 })],
      ['certificates_of_device', () => q.certificates({ subjectId: mid, limit: 51 })],
      ['audit_first_page', () => q.audit({ limit: 51 })],
      ['audit_deep_page', () => q.audit({ before: midSeq, limit: 51 })],
      ['audit_by_device', () => q.audit({ deviceId: mid, limit: 51 })],
      ['audit_by_gateway', () => q.audit({ gatewayId: 'gw-07', before: midSeq, limit: 51 })],
      ['audit_refused', () => q.audit({ outcome: 'refused', before: midSeq, limit: 51 })],
      ['audit_by_action', () => q.audit({ action: 'renew', before: midSeq, limit: 51 })],
      ['audit_actions', () => q.auditActions()],
    ];
    try {
      for (const [name, fn] of pages) {
        await fn(); // warm
        const ms: number[] = [];
        for (let i = 0; i < opts.iterations; i++) {
          const s = performance.now();
          await fn();
          ms.push(performance.now() - s);
        }
        const [p50, p99] = percentiles(ms, [50, 99]);
        emit(`${name}_p50_ms`, p50, 'ms', { iterations: opts.iterations });
        emit(`${name}_p99_ms`, p99, 'ms', { iterations: opts.iterations });
      }
    } finally {
      await store.close();
    }
  },
});
