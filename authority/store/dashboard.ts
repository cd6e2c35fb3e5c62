/**
 * Read queries of the operator dashboard (authority/dashboard/), over either SQL driver.
 * Every list is a keyset page (never OFFSET): audit rows by seq, devices by id, certificates
 * by (created_at, serial); each has an index from migration 011 and stays fast with
 * 1,000,000 audit rows and 100,000 devices (bench/dashboard.ts measures it).
 */
import type { Queryable, Row } from './sql.ts';
import { ISSUER_OF_KIND, type AuditRow, type CertificateRow, type DeviceRow, type GatewayRow } from './types.ts';

const DAY = 86_400_000;

export interface GatewayOverview extends GatewayRow {
  certNotAfter: number | null;
  edgeCaNotAfter: number | null;
  /** Time of the newest audit row naming the gateway (its last audited request). */
  lastSeen: number | null;
}

export interface DeviceCounts {
  registered: number;
  enrolled: number;
  decommissioned: number;
  /** Devices with an active, unexpired certificate. */
  active: number;
  /** Devices with an active certificate that expires within the window. */
  expiring: number;
  /** Devices with at least one revoked certificate. */
  revoked: number;
  /** Device certificates whose IoT Hub sync failed (hub_error set). */
  syncFailed: number;
}

export interface DeviceListRow extends DeviceRow {
  /** The latest expiry among its active certificates. */
  certNotAfter: number | null;
}

export type DeviceState = 'registered' | 'enrolled' | 'disabled' | 'expiring' | 'revoked';
export const DEVICE_STATES: readonly DeviceState[] = ['registered', 'enrolled', 'disabled', 'expiring', 'revoked'];

export interface AuditFilter {
  action?: string;
  outcome?: string;
  deviceId?: string;
  gatewayId?: string;
  serial?: string;
  /** Keyset: rows with seq below this one. */
  before?: number;
  limit: number;
}

function toDevice(r: Row): DeviceRow {
  return {
    id: r.id, groupName: r.group_name, method: r.method, status: r.status, gatewayId: r.gateway_id, ddkgSalt: r.ddkg_salt, ddkgPublicKey: r.ddkg_public_key,
    birthCertFingerprint: r.birth_cert_fingerprint, hubState: r.hub_state ?? null, createdAt: Number(r.created_at), updatedAt: Number(r.updated_at),
  };
}

function toCert(r: Row): CertificateRow & { hubError: string | null } {
  return {
    serial: r.serial, subjectId: r.subject_id, kind: r.kind, fingerprint: r.fingerprint, notBefore: Number(r.not_before), notAfter: Number(r.not_after), status: r.status,
    requestId: r.request_id, pem: r.pem, revokedAt: r.revoked_at == null ? null : Number(r.revoked_at), revocationReason: r.revocation_reason, createdAt: Number(r.created_at),
    issuer: r.issuer ?? ISSUER_OF_KIND[r.kind as CertificateRow['kind']], hubError: r.hub_error ?? null,
  };
}

function toAudit(r: Row): AuditRow {
  let detail: Record<string, unknown> | null = null;
  try {
    detail = r.detail == null ? null : JSON.parse(r.detail);
  } catch {
    detail = { unparsable: String(r.detail) };
  }
  return { seq: Number(r.seq), at: Number(r.at), action: r.action, outcome: r.outcome, code: r.code, deviceId: r.device_id, gatewayId: r.gateway_id, requestId: r.request_id, serial: r.serial, detail };
}

const n = (v: unknown) => Number(v ?? 0);

export class DashboardQueries {
  constructor(private readonly db: Queryable) {}

  async gateways(now: number, limit = 500): Promise<GatewayOverview[]> {
    const rows = await this.db.query(
      `SELECT g.*, c.not_after AS cert_not_after FROM gateways g LEFT JOIN certificates c ON c.serial = g.cert_serial ORDER BY g.id LIMIT ?`,
      [limit],
    );
    const edge = await this.db.query(
      "SELECT subject_id, MAX(not_after) AS not_after FROM certificates WHERE status = 'active' AND kind = 'subca' AND not_after > ? GROUP BY subject_id",
      [now],
    );
    const edgeOf = new Map(edge.map((r) => [r.subject_id as string, n(r.not_after)]));
    const out: GatewayOverview[] = [];
    for (const r of rows) {
      const last = await this.db.one('SELECT at FROM audit_log WHERE gateway_id = ? ORDER BY seq DESC LIMIT 1', [r.id]);
      out.push({
        id: r.id, status: r.status, certSerial: r.cert_serial, certFingerprint: r.cert_fingerprint, createdAt: n(r.created_at), updatedAt: n(r.updated_at),
        certNotAfter: r.cert_not_after == null ? null : n(r.cert_not_after), edgeCaNotAfter: edgeOf.get(r.id) ?? null, lastSeen: last ? n(last.at) : null,
      });
    }
    return out;
  }

  async deviceCounts(now: number, expiringDays: number): Promise<DeviceCounts> {
    const byStatus = new Map((await this.db.query('SELECT status, COUNT(*) AS n FROM devices GROUP BY status')).map((r) => [r.status as string, n(r.n)]));
    const active = await this.db.one(
      "SELECT COUNT(DISTINCT subject_id) AS n FROM certificates WHERE status = 'active' AND kind = 'device' AND not_after > ?",
      [now],
    );
    const expiring = await this.db.one(
      "SELECT COUNT(DISTINCT subject_id) AS n FROM certificates WHERE status = 'active' AND kind = 'device' AND not_after > ? AND not_after <= ?",
      [now, now + expiringDays * DAY],
    );
    const revoked = await this.db.one("SELECT COUNT(DISTINCT subject_id) AS n FROM certificates WHERE status = 'revoked' AND kind = 'device'");
    // Parked rows (past the attempt limit) of either target; rows still backing off are not failures yet.
    const syncFailed = await this.db.one(
      "SELECT COUNT(*) AS n FROM certificates WHERE kind = 'device' AND ((hub_synced_at IS NULL AND hub_failed_at IS NOT NULL) OR (dps_synced_at IS NULL AND dps_failed_at IS NOT NULL))",
    );
    return {
      registered: byStatus.get('registered') ?? 0, enrolled: byStatus.get('enrolled') ?? 0, decommissioned: byStatus.get('disabled') ?? 0,
      active: n(active?.n), expiring: n(expiring?.n), revoked: n(revoked?.n), syncFailed: n(syncFailed?.n),
    };
  }

  /** Device issuances (`issue`, both flows), renewals and refusals since `since`; gateway enrollments are not device issuances. */
  async auditCounts(since: number): Promise<{ issued: number; renewed: number; refused: number; errors: number }> {
    const rows = await this.db.query('SELECT action, outcome, COUNT(*) AS n FROM audit_log WHERE at >= ? GROUP BY action, outcome', [since]);
    const out = { issued: 0, renewed: 0, refused: 0, errors: 0 };
    for (const r of rows) {
      if (r.outcome === 'refused') out.refused += n(r.n);
      else if (r.outcome === 'error') out.errors += n(r.n);
      else if (r.action === 'issue') out.issued += n(r.n);
      else if (r.action === 'renew') out.renewed += n(r.n);
    }
    return out;
  }

  /** Onboardings (issue ok) and refusals per bucket of `bucketMs`, `buckets` of them ending at `now`. */
  async activitySeries(now: number, bucketMs: number, buckets: number): Promise<Array<{ start: number; onboarded: number; refused: number }>> {
    const start = now - bucketMs * buckets;
    // Grouped by the output alias: PostgreSQL reads `(at - $1) / $2` and `(at - $5) / $6` as two
    // expressions and refuses the query. The CASTs make SQLite divide integers (better-sqlite3
    // binds numbers as REAL), so that its rows are grouped per bucket, not per timestamp.
    const rows = await this.db.query(
      `SELECT (at - CAST(? AS BIGINT)) / CAST(? AS BIGINT) AS b, outcome, COUNT(*) AS n FROM audit_log
        WHERE at >= ? AND at < ? AND ((action = 'issue' AND outcome = 'ok') OR outcome = 'refused') GROUP BY b, outcome`,
      [start, bucketMs, start, now],
    );
    const out = Array.from({ length: buckets }, (_, i) => ({ start: start + i * bucketMs, onboarded: 0, refused: 0 }));
    for (const r of rows) {
      const i = Math.floor(n(r.b));
      if (i < 0 || i >= buckets) continue;
      if (r.outcome === 'refused') out[i].refused += n(r.n);
      else out[i].onboarded += n(r.n);
    }
    return out;
  }

  /** Active certificates expiring per week over the coming `weeks`, devices apart from the rest. */
  async expirySeries(now: number, weeks: number): Promise<Array<{ start: number; devices: number; others: number }>> {
    const week = 7 * DAY;
    // Grouped by the alias, integer division on both engines: see activitySeries.
    const rows = await this.db.query(
      `SELECT (not_after - CAST(? AS BIGINT)) / CAST(? AS BIGINT) AS w, kind, COUNT(*) AS n FROM certificates WHERE status = 'active' AND not_after > ? AND not_after <= ?
        GROUP BY w, kind`,
      [now, week, now, now + weeks * week],
    );
    const out = Array.from({ length: weeks }, (_, i) => ({ start: now + i * week, devices: 0, others: 0 }));
    for (const r of rows) {
      const i = Math.floor(n(r.w));
      if (i < 0 || i >= weeks) continue;
      if (r.kind === 'device') out[i].devices += n(r.n);
      else out[i].others += n(r.n);
    }
    return out;
  }

  /**
   * One page of devices by id. `idPrefix` matches ids starting with it (a range on the
   * primary key on SQLite, whose order is bytewise; LIKE on PostgreSQL, whose collation may not be).
   */
  async devices(f: { idPrefix?: string; gatewayId?: string; state?: DeviceState; after?: string; limit: number; now: number; expiringDays: number }): Promise<DeviceListRow[]> {
    const where: string[] = [];
    const args: unknown[] = [];
    if (f.idPrefix) {
      if (this.db.dialect === 'sqlite') (where.push('id >= ? AND id < ?'), args.push(f.idPrefix, f.idPrefix + '\u{10ffff}'));
      else (where.push("id LIKE ? ESCAPE '\\'"), args.push(f.idPrefix.replace(/[\\%_]/g, (c) => '\\' + c) + '%'));
    }
    if (f.gatewayId) (where.push('gateway_id = ?'), args.push(f.gatewayId));
    if (f.state === 'registered' || f.state === 'enrolled' || f.state === 'disabled') (where.push('status = ?'), args.push(f.state));
    else if (f.state === 'expiring') {
      where.push("id IN (SELECT subject_id FROM certificates WHERE status = 'active' AND kind = 'device' AND not_after > ? AND not_after <= ?)");
      args.push(f.now, f.now + f.expiringDays * DAY);
    } else if (f.state === 'revoked') where.push("id IN (SELECT subject_id FROM certificates WHERE status = 'revoked' AND kind = 'device')");
    if (f.after !== undefined) (where.push('id > ?'), args.push(f.after));
    const rows = await this.db.query(`SELECT * FROM devices ${where.length ? 'WHERE ' + where.join(' AND ') : ''} ORDER BY id LIMIT ?`, [...args, f.limit]);
    const devices = rows.map(toDevice);
    const expiry = new Map<string, number>();
    if (devices.length) {
      const certs = await this.db.query(
        `SELECT subject_id, MAX(not_after) AS not_after FROM certificates WHERE status = 'active' AND subject_id IN (${devices.map(() => '?').join(', ')}) GROUP BY subject_id`,
        devices.map((d) => d.id),
      );
      for (const c of certs) expiry.set(c.subject_id, n(c.not_after));
    }
    return devices.map((d) => ({ ...d, certNotAfter: expiry.get(d.id) ?? null }));
  }

  /** One page of certificates, newest first; keyset (createdAt, serial) of the last row seen. */
  async certificates(f: { subjectId?: string; status?: string; kind?: string; before?: { createdAt: number; serial: string }; limit: number }): Promise<Array<CertificateRow & { hubError: string | null }>> {
    const where: string[] = [];
    const args: unknown[] = [];
    if (f.subjectId) (where.push('subject_id = ?'), args.push(f.subjectId));
    if (f.status) (where.push('status = ?'), args.push(f.status));
    if (f.kind) (where.push('kind = ?'), args.push(f.kind));
    if (f.before) (where.push('(created_at < ? OR (created_at = ? AND serial < ?))'), args.push(f.before.createdAt, f.before.createdAt, f.before.serial));
    const rows = await this.db.query(`SELECT * FROM certificates ${where.length ? 'WHERE ' + where.join(' AND ') : ''} ORDER BY created_at DESC, serial DESC LIMIT ?`, [...args, f.limit]);
    return rows.map(toCert);
  }

  async certificate(serial: string): Promise<(CertificateRow & { hubError: string | null }) | null> {
    const r = await this.db.one('SELECT * FROM certificates WHERE serial = ?', [serial]);
    return r ? toCert(r) : null;
  }

  /** One page of the audit log, newest first (keyset on seq). */
  async audit(f: AuditFilter): Promise<AuditRow[]> {
    const where: string[] = [];
    const args: unknown[] = [];
    if (f.action) (where.push('action = ?'), args.push(f.action));
    if (f.outcome) (where.push('outcome = ?'), args.push(f.outcome));
    if (f.deviceId) (where.push('device_id = ?'), args.push(f.deviceId));
    if (f.gatewayId) (where.push('gateway_id = ?'), args.push(f.gatewayId));
    if (f.serial) (where.push('serial = ?'), args.push(f.serial));
    if (f.before !== undefined) (where.push('seq < ?'), args.push(f.before));
    const rows = await this.db.query(`SELECT * FROM audit_log ${where.length ? 'WHERE ' + where.join(' AND ') : ''} ORDER BY seq DESC LIMIT ?`, [...args, f.limit]);
    return rows.map(toAudit);
  }

  /** The distinct audit actions, for the filter's choices. */
  async auditActions(): Promise<string[]> {
    // A skip-scan over the (action, seq) index: one probe per distinct action.
    const out: string[] = [];
    let last = '';
    for (let i = 0; i < 100; i++) {
      const r = await this.db.one('SELECT action FROM audit_log WHERE action > ? ORDER BY action LIMIT 1', [last]);
      if (!r) break;
      out.push((last = r.action));
    }
    return out;
  }
}
