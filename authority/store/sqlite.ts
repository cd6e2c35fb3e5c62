/**
 * The embedded store: one SQLite file (better-sqlite3), WAL journal so a crash never leaves
 * a half-written transaction, migrations from ./migrations applied in order at open.
 */
import Database from 'better-sqlite3';
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { AuditEntry, AuditRow, AuthorityStore, AuthSessionRow, CertificateRow, ChallengeRow, CrlRow, DeviceRow, GatewayRow, RegistryTarget, RequestRow } from './types.ts';

const MIGRATIONS_DIR = join(dirname(fileURLToPath(import.meta.url)), 'migrations');

export function listMigrations(): Array<{ version: number; sql: string; name: string }> {
  return readdirSync(MIGRATIONS_DIR)
    .filter((f) => /^\d+_.+\.sql$/.test(f))
    .sort()
    .map((name) => ({ version: Number(name.split('_')[0]), sql: readFileSync(join(MIGRATIONS_DIR, name), 'utf8'), name }));
}

type Row = Record<string, any>;

const json = (v: unknown) => JSON.stringify(v);
const parse = (v: string | null) => (v == null ? null : JSON.parse(v));

function toDevice(r: Row | undefined): DeviceRow | null {
  if (!r) return null;
  return {
    id: r.id, groupName: r.group_name, method: r.method, status: r.status, gatewayId: r.gateway_id, ddkgSalt: r.ddkg_salt,
    ddkgPublicKey: r.ddkg_public_key, birthCertFingerprint: r.birth_cert_fingerprint, hubState: r.hub_state ?? null, createdAt: r.created_at, updatedAt: r.updated_at,
  };
}

function toCert(r: Row): CertificateRow {
  return {
    serial: r.serial, subjectId: r.subject_id, kind: r.kind, fingerprint: r.fingerprint, notBefore: r.not_before, notAfter: r.not_after,
    status: r.status, requestId: r.request_id, pem: r.pem, revokedAt: r.revoked_at, revocationReason: r.revocation_reason, createdAt: r.created_at,
  };
}

export class SqliteStore implements AuthorityStore {
  private readonly db: Database.Database;
  private readonly stmts: Record<string, Database.Statement>;

  constructor(file: string) {
    this.db = new Database(file);
    this.db.pragma('journal_mode = WAL');
    this.db.pragma('synchronous = NORMAL'); // with WAL: durable at checkpoint, never corrupt
    this.db.pragma('foreign_keys = ON');
    this.db.pragma('busy_timeout = 5000');
    this.migrate();
    const p = (sql: string) => this.db.prepare(sql);
    this.stmts = {
      insertToken: p('INSERT INTO enrollment_tokens (token_hash, gateway_id, expires_at) VALUES (?, ?, ?)'),
      useToken: p('UPDATE enrollment_tokens SET used_at = ? WHERE token_hash = ? AND used_at IS NULL AND expires_at > ? RETURNING gateway_id'),
      upsertGateway: p(`INSERT INTO gateways (id, status, cert_serial, cert_fingerprint, created_at, updated_at) VALUES (?, 'active', ?, ?, ?, ?)
        ON CONFLICT (id) DO UPDATE SET status = 'active', cert_serial = excluded.cert_serial, cert_fingerprint = excluded.cert_fingerprint, updated_at = excluded.updated_at`),
      getGateway: p('SELECT * FROM gateways WHERE id = ?'),
      getDevice: p('SELECT * FROM devices WHERE id = ?'),
      insertDevice: p(`INSERT INTO devices (id, group_name, method, status, gateway_id, ddkg_salt, ddkg_public_key, birth_cert_fingerprint, created_at, updated_at)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING`),
      insertCode: p('INSERT INTO enrollment_codes (code_hash, device_id, group_name, expires_at) VALUES (?, ?, ?, ?)'),
      useCode: p('UPDATE enrollment_codes SET used_at = ? WHERE code_hash = ? AND device_id = ? AND group_name = ? AND used_at IS NULL AND expires_at > ?'),
      insertChallenge: p('INSERT INTO challenges (id, device_id, gateway_id, method, nonce, context, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)'),
      getChallenge: p('SELECT * FROM challenges WHERE id = ?'),
      useChallenge: p('UPDATE challenges SET used_at = ? WHERE id = ? AND used_at IS NULL'),
      insertSession: p('INSERT INTO auth_sessions (id, device_id, gateway_id, instruction, expires_at) VALUES (?, ?, ?, ?, ?)'),
      liveSession: p('SELECT * FROM auth_sessions WHERE device_id = ? AND used_at IS NULL AND expires_at > ? ORDER BY expires_at DESC LIMIT 1'),
      useSession: p('UPDATE auth_sessions SET used_at = ? WHERE id = ? AND used_at IS NULL'),
      getRequest: p('SELECT * FROM requests WHERE device_id = ? AND request_id = ?'),
      insertRequest: p('INSERT INTO requests (device_id, request_id, kind, body_hash, response, created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING'),
      insertCert: p(`INSERT INTO certificates (serial, subject_id, kind, fingerprint, not_before, not_after, status, request_id, pem, created_at)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`),
      countActive: p("SELECT COUNT(*) AS n FROM certificates WHERE subject_id = ? AND status = 'active' AND not_after > ?"),
      revoke: p("UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ?, hub_synced_at = NULL, dps_synced_at = NULL WHERE serial = ? AND status = 'active'"),
      getCert: p('SELECT * FROM certificates WHERE serial = ?'),
      getCrl: p('SELECT * FROM crls WHERE issuer = ?'),
      saveCrl: p(`INSERT INTO crls (issuer, crl_number, this_update, next_update, der) VALUES (?, ?, ?, ?, ?)
        ON CONFLICT (issuer) DO UPDATE SET crl_number = excluded.crl_number, this_update = excluded.this_update, next_update = excluded.next_update, der = excluded.der
        WHERE excluded.crl_number > crls.crl_number`),
      insertAudit: p('INSERT INTO audit_log (at, action, outcome, code, device_id, gateway_id, request_id, serial, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)'),
    };
  }

  private migrate(): void {
    this.db.exec('CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)');
    const applied = new Set((this.db.prepare('SELECT version FROM schema_migrations').all() as Row[]).map((r) => r.version));
    for (const m of listMigrations()) {
      if (applied.has(m.version)) continue;
      this.db.transaction(() => {
        this.db.exec(m.sql);
        this.db.prepare('INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)').run(m.version, m.name, Date.now());
      })();
    }
  }

  async close(): Promise<void> {
    this.db.close();
  }

  private audit(e: AuditEntry): void {
    this.stmts.insertAudit.run(e.at, e.action, e.outcome, e.code ?? null, e.deviceId ?? null, e.gatewayId ?? null, e.requestId ?? null, e.serial ?? null, e.detail ? json(e.detail) : null);
  }

  private insertCert(c: CertificateRow): void {
    this.stmts.insertCert.run(c.serial, c.subjectId, c.kind, c.fingerprint, c.notBefore, c.notAfter, c.status, c.requestId, c.pem, c.createdAt);
  }

  async createEnrollmentToken(tokenHash: string, gatewayId: string, expiresAt: number): Promise<void> {
    this.stmts.insertToken.run(tokenHash, gatewayId, expiresAt);
  }

  async consumeEnrollmentToken(tokenHash: string, now: number): Promise<string | null> {
    const r = this.stmts.useToken.get(now, tokenHash, now) as Row | undefined;
    return r ? r.gateway_id : null;
  }

  async recordGatewayEnrollment(gatewayId: string, cert: CertificateRow, audit: AuditEntry, opts: { updateGatewayCert?: boolean } = {}): Promise<void> {
    this.db.transaction(() => {
      this.insertCert(cert);
      if (opts.updateGatewayCert !== false) this.stmts.upsertGateway.run(gatewayId, cert.serial, cert.fingerprint, cert.createdAt, cert.createdAt);
      this.audit(audit);
    })();
  }

  async getGateway(id: string): Promise<GatewayRow | null> {
    const r = this.stmts.getGateway.get(id) as Row | undefined;
    return r ? { id: r.id, status: r.status, certSerial: r.cert_serial, certFingerprint: r.cert_fingerprint, createdAt: r.created_at, updatedAt: r.updated_at } : null;
  }

  async getDevice(id: string): Promise<DeviceRow | null> {
    return toDevice(this.stmts.getDevice.get(id) as Row | undefined);
  }

  async insertDevice(d: DeviceRow): Promise<boolean> {
    const r = this.stmts.insertDevice.run(d.id, d.groupName, d.method, d.status, d.gatewayId, d.ddkgSalt, d.ddkgPublicKey, d.birthCertFingerprint, d.createdAt, d.updatedAt);
    return r.changes === 1;
  }

  async updateDevice(id: string, patch: Partial<Pick<DeviceRow, 'status' | 'gatewayId' | 'ddkgPublicKey' | 'birthCertFingerprint'>>, now: number): Promise<void> {
    const cols: Record<string, string> = { status: 'status', gatewayId: 'gateway_id', ddkgPublicKey: 'ddkg_public_key', birthCertFingerprint: 'birth_cert_fingerprint' };
    const keys = Object.keys(patch).filter((k) => k in cols);
    if (!keys.length) return;
    const sql = `UPDATE devices SET ${keys.map((k) => `${cols[k]} = ?`).join(', ')}, updated_at = ? WHERE id = ?`;
    this.db.prepare(sql).run(...keys.map((k) => (patch as Row)[k]), now, id);
  }

  async createEnrollmentCode(codeHash: string, deviceId: string, groupName: string, expiresAt: number): Promise<void> {
    this.stmts.insertCode.run(codeHash, deviceId, groupName, expiresAt);
  }

  async consumeEnrollmentCode(codeHash: string, deviceId: string, groupName: string, now: number): Promise<boolean> {
    return this.stmts.useCode.run(now, codeHash, deviceId, groupName, now).changes === 1;
  }

  async insertChallenge(c: ChallengeRow): Promise<void> {
    this.stmts.insertChallenge.run(c.id, c.deviceId, c.gatewayId, c.method, c.nonce, json(c.context), c.expiresAt);
  }

  async getChallenge(id: string): Promise<ChallengeRow | null> {
    const r = this.stmts.getChallenge.get(id) as Row | undefined;
    if (!r) return null;
    return { id: r.id, deviceId: r.device_id, gatewayId: r.gateway_id, method: r.method, nonce: r.nonce, context: parse(r.context), expiresAt: r.expires_at, usedAt: r.used_at };
  }

  async useChallenge(id: string, now: number): Promise<boolean> {
    return this.stmts.useChallenge.run(now, id).changes === 1;
  }

  async insertAuthSession(s: AuthSessionRow): Promise<void> {
    this.stmts.insertSession.run(s.id, s.deviceId, s.gatewayId, json(s.instruction), s.expiresAt);
  }

  async getLiveAuthSession(deviceId: string, now: number): Promise<AuthSessionRow | null> {
    const r = this.stmts.liveSession.get(deviceId, now) as Row | undefined;
    if (!r) return null;
    return { id: r.id, deviceId: r.device_id, gatewayId: r.gateway_id, instruction: parse(r.instruction), expiresAt: r.expires_at, usedAt: r.used_at };
  }

  async getRequest(deviceId: string, requestId: string): Promise<RequestRow | null> {
    const r = this.stmts.getRequest.get(deviceId, requestId) as Row | undefined;
    if (!r) return null;
    return { deviceId: r.device_id, requestId: r.request_id, kind: r.kind, bodyHash: r.body_hash, response: parse(r.response), createdAt: r.created_at };
  }

  async insertRequest(q: RequestRow, audit: AuditEntry): Promise<boolean> {
    return this.db.transaction(() => {
      const ok = this.stmts.insertRequest.run(q.deviceId, q.requestId, q.kind, q.bodyHash, json(q.response), q.createdAt).changes === 1;
      if (ok) this.audit(audit);
      return ok;
    })();
  }

  async recordIssuance(args: { request: RequestRow; certificate: CertificateRow; authSessionId: string; audit: AuditEntry }): Promise<boolean> {
    const { request: q, certificate, authSessionId, audit } = args;
    return this.db.transaction(() => {
      if (this.stmts.insertRequest.run(q.deviceId, q.requestId, q.kind, q.bodyHash, json(q.response), q.createdAt).changes !== 1) return false;
      if (this.stmts.useSession.run(q.createdAt, authSessionId).changes !== 1) throw new Error('auth session was consumed concurrently');
      this.insertCert(certificate);
      this.audit(audit);
      return true;
    })();
  }

  async recordRenewal(args: { request: RequestRow; certificate: CertificateRow; supersedes: string; audit: AuditEntry }): Promise<boolean> {
    const { request: q, certificate, supersedes, audit } = args;
    return this.db.transaction(() => {
      if (this.stmts.insertRequest.run(q.deviceId, q.requestId, q.kind, q.bodyHash, json(q.response), q.createdAt).changes !== 1) return false;
      if (this.db.prepare("UPDATE certificates SET status = 'superseded' WHERE serial = ? AND status = 'active'").run(supersedes).changes !== 1) {
        throw new Error('certificate to supersede is no longer active');
      }
      this.insertCert(certificate);
      this.audit(audit);
      return true;
    })();
  }

  async listDueForRenewal(group: string, fraction: number, now: number, limit: number): Promise<CertificateRow[]> {
    const rows = this.db.prepare(`SELECT c.* FROM certificates c JOIN devices d ON d.id = c.subject_id
      WHERE c.kind = 'device' AND c.status = 'active' AND d.group_name = ? AND d.status != 'disabled'
        AND c.not_after > ? AND c.not_before + (c.not_after - c.not_before) * ? <= ?
      ORDER BY c.not_after LIMIT ?`).all(group, now, fraction, now, limit) as Row[];
    return rows.map(toCert);
  }

  async countActiveCertificates(subjectId: string, now: number): Promise<number> {
    return (this.stmts.countActive.get(subjectId, now) as Row).n;
  }

  async listCertificates(filter: { subjectId?: string; status?: string; kind?: string; expiringBefore?: number; limit?: number }): Promise<CertificateRow[]> {
    const where: string[] = [];
    const args: unknown[] = [];
    if (filter.subjectId) (where.push('subject_id = ?'), args.push(filter.subjectId));
    if (filter.status) (where.push('status = ?'), args.push(filter.status));
    if (filter.kind) (where.push('kind = ?'), args.push(filter.kind));
    if (filter.expiringBefore !== undefined) (where.push('not_after <= ?'), args.push(filter.expiringBefore));
    const sql = `SELECT * FROM certificates ${where.length ? 'WHERE ' + where.join(' AND ') : ''} ORDER BY created_at DESC LIMIT ?`;
    return (this.db.prepare(sql).all(...args, filter.limit ?? 1000) as Row[]).map(toCert);
  }

  async revokeCertificate(serial: string, reason: number, at: number, audit: AuditEntry): Promise<CertificateRow | null> {
    return this.db.transaction(() => {
      if (this.stmts.revoke.run(at, reason, serial).changes !== 1) return null;
      this.audit(audit);
      return toCert(this.stmts.getCert.get(serial) as Row);
    })();
  }

  async listRevoked(kinds: CertificateRow['kind'][]): Promise<CertificateRow[]> {
    const rows = this.db.prepare(`SELECT * FROM certificates WHERE status = 'revoked' AND kind IN (${kinds.map(() => '?').join(', ')}) ORDER BY revoked_at`).all(...kinds) as Row[];
    return rows.map(toCert);
  }

  async getCertificate(serial: string): Promise<CertificateRow | null> {
    const r = this.stmts.getCert.get(serial) as Row | undefined;
    return r ? toCert(r) : null;
  }

  async getCrl(issuer: string): Promise<CrlRow | null> {
    const r = this.stmts.getCrl.get(issuer) as Row | undefined;
    return r ? { issuer: r.issuer, crlNumber: BigInt(r.crl_number), thisUpdate: r.this_update, nextUpdate: r.next_update, der: Buffer.from(r.der, 'base64') } : null;
  }

  async saveCrl(c: CrlRow): Promise<boolean> {
    return this.stmts.saveCrl.run(c.issuer, c.crlNumber, c.thisUpdate, c.nextUpdate, c.der.toString('base64')).changes === 1;
  }

  async listDevices(filter: { status?: string; group?: string; limit?: number }): Promise<DeviceRow[]> {
    const where: string[] = [];
    const args: unknown[] = [];
    if (filter.status) (where.push('status = ?'), args.push(filter.status));
    if (filter.group) (where.push('group_name = ?'), args.push(filter.group));
    const sql = `SELECT * FROM devices ${where.length ? 'WHERE ' + where.join(' AND ') : ''} ORDER BY id LIMIT ?`;
    return (this.db.prepare(sql).all(...args, filter.limit ?? 1000) as Row[]).map((r) => toDevice(r)!);
  }

  async listHubPending(limit: number, target: RegistryTarget = 'hub'): Promise<CertificateRow[]> {
    const rows = this.db.prepare(`SELECT * FROM certificates WHERE kind = 'device' AND ${target}_synced_at IS NULL ORDER BY created_at, serial LIMIT ?`).all(limit) as Row[];
    return rows.map(toCert);
  }

  async markHubSynced(serial: string, at: number, error?: string, target: RegistryTarget = 'hub', status?: CertificateRow['status']): Promise<void> {
    // Only if the row is still in the state that was synced: a revocation that landed
    // meanwhile (it clears the mark) must be picked up by the next pass, not hidden by this one.
    const cond = status ? ' AND status = ?' : '';
    const args: unknown[] = status ? [serial, status] : [serial];
    if (target === 'hub') this.db.prepare(`UPDATE certificates SET hub_synced_at = ?, hub_error = ? WHERE serial = ?${cond}`).run(at, error ?? null, ...args);
    else this.db.prepare(`UPDATE certificates SET dps_synced_at = ? WHERE serial = ?${cond}`).run(at, ...args);
  }

  async listHubDecommissioned(limit: number, target: RegistryTarget = 'hub'): Promise<string[]> {
    const rows = this.db.prepare(`SELECT id FROM devices WHERE status = 'disabled' AND ${target}_state IS NOT NULL AND ${target}_state != 'deleted' LIMIT ?`).all(limit) as Row[];
    return rows.map((r) => r.id);
  }

  async setDeviceHubState(deviceId: string, state: 'present' | 'disabled' | 'deleted', target: RegistryTarget = 'hub'): Promise<void> {
    this.db.prepare(`UPDATE devices SET ${target}_state = ? WHERE id = ?`).run(state, deviceId);
  }

  async appendAudit(entry: AuditEntry): Promise<void> {
    this.audit(entry);
  }

  async listAudit(filter: { deviceId?: string; limit?: number }): Promise<AuditRow[]> {
    const rows = (filter.deviceId
      ? this.db.prepare('SELECT * FROM audit_log WHERE device_id = ? ORDER BY seq DESC LIMIT ?').all(filter.deviceId, filter.limit ?? 1000)
      : this.db.prepare('SELECT * FROM audit_log ORDER BY seq DESC LIMIT ?').all(filter.limit ?? 1000)) as Row[];
    return rows.map((r) => ({
      seq: r.seq, at: r.at, action: r.action, outcome: r.outcome, code: r.code, deviceId: r.device_id, gatewayId: r.gateway_id, requestId: r.request_id, serial: r.serial, detail: parse(r.detail),
    }));
  }
}
