/**
 * The authority store over either SQL driver (./sql.ts): every query is written once, with
 * `?` placeholders and portable SQL, for the embedded SQLite default and for PostgreSQL.
 * Migrations from ./migrations are applied in order at open (see openStore).
 *
 * Portability notes, so the next query stays portable too:
 * - epoch milliseconds are BIGINT and come back as numbers on both engines;
 * - crl_number is read as text (CAST) and turned into a bigint, never through a double;
 * - a parameter multiplied with a BIGINT column is CAST to DOUBLE PRECISION, or PostgreSQL
 *   would infer it as bigint and refuse 0.6667;
 * - "insert unless present" is INSERT .. ON CONFLICT DO NOTHING and its change count.
 */
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { LeafgateError } from '../../protocol/index.ts';
import { PostgresDriver, SqliteDriver, isPostgresUrl, redactUrl, type Queryable, type Row, type SqlDriver } from './sql.ts';
import { ISSUER_OF_KIND } from './types.ts';
import type {
  DashboardSessionRow, ExternalClaimRow,
  AuditEntry, AuditRow, AuthorityStore, AuthSessionRow, CaMaterialRow, CaName, IssuerName, CertificateRow, ChallengeRow, CrlRow, DevicePatch, DeviceRow, DueCertificateRow, GatewayRow, PendingCertificateRow, RegistryTarget, RequestRow, SyncFailureRow,
} from './types.ts';

const MIGRATIONS_DIR = join(dirname(fileURLToPath(import.meta.url)), 'migrations');

export function listMigrations(): Array<{ version: number; sql: string; name: string }> {
  return readdirSync(MIGRATIONS_DIR)
    .filter((f) => /^\d+_.+\.sql$/.test(f))
    .sort()
    .map((name) => ({ version: Number(name.split('_')[0]), sql: readFileSync(join(MIGRATIONS_DIR, name), 'utf8'), name }));
}

const json = (v: unknown) => JSON.stringify(v);
const parse = (v: string | null) => (v == null ? null : JSON.parse(v));

function toDevice(r: Row | undefined): DeviceRow | null {
  if (!r) return null;
  return {
    id: r.id, groupName: r.group_name, method: r.method, status: r.status, gatewayId: r.gateway_id, ddkgSalt: r.ddkg_salt,
    ddkgPublicKey: r.ddkg_public_key, birthCertFingerprint: r.birth_cert_fingerprint, hubState: r.hub_state ?? null, dpsState: r.dps_state ?? null, createdAt: r.created_at, updatedAt: r.updated_at,
  };
}

function toCert(r: Row): CertificateRow {
  return {
    serial: r.serial, subjectId: r.subject_id, kind: r.kind, fingerprint: r.fingerprint, notBefore: r.not_before, notAfter: r.not_after,
    status: r.status, requestId: r.request_id, pem: r.pem, revokedAt: r.revoked_at, revocationReason: r.revocation_reason, createdAt: r.created_at,
    issuer: r.issuer ?? ISSUER_OF_KIND[r.kind as CertificateRow['kind']],
  };
}

const TARGETS: Record<RegistryTarget, true> = { hub: true, dps: true };
function target(t: RegistryTarget): RegistryTarget {
  if (!TARGETS[t]) throw new Error(`unknown registry target ${String(t)}`);
  return t;
}

const SQL = {
  insertToken: 'INSERT INTO enrollment_tokens (token_hash, gateway_id, expires_at) VALUES (?, ?, ?)',
  useToken: 'UPDATE enrollment_tokens SET used_at = ? WHERE token_hash = ? AND used_at IS NULL AND expires_at > ? RETURNING gateway_id',
  upsertGateway: `INSERT INTO gateways (id, status, cert_serial, cert_fingerprint, created_at, updated_at) VALUES (?, 'active', ?, ?, ?, ?)
    ON CONFLICT (id) DO UPDATE SET status = 'active', cert_serial = excluded.cert_serial, cert_fingerprint = excluded.cert_fingerprint, updated_at = excluded.updated_at`,
  getGateway: 'SELECT * FROM gateways WHERE id = ?',
  getDevice: 'SELECT * FROM devices WHERE id = ?',
  insertDevice: `INSERT INTO devices (id, group_name, method, status, gateway_id, ddkg_salt, ddkg_public_key, birth_cert_fingerprint, created_at, updated_at)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING`,
  insertCode: 'INSERT INTO enrollment_codes (code_hash, device_id, group_name, expires_at) VALUES (?, ?, ?, ?)',
  useCode: 'UPDATE enrollment_codes SET used_at = ? WHERE code_hash = ? AND device_id = ? AND group_name = ? AND used_at IS NULL AND expires_at > ?',
  insertChallenge: 'INSERT INTO challenges (id, device_id, gateway_id, method, nonce, context, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)',
  getChallenge: 'SELECT * FROM challenges WHERE id = ?',
  useChallenge: 'UPDATE challenges SET used_at = ? WHERE id = ? AND used_at IS NULL',
  insertSession: 'INSERT INTO auth_sessions (id, device_id, gateway_id, instruction, expires_at) VALUES (?, ?, ?, ?, ?)',
  liveSession: 'SELECT * FROM auth_sessions WHERE device_id = ? AND used_at IS NULL AND expires_at > ? ORDER BY expires_at DESC LIMIT 1',
  useSession: 'UPDATE auth_sessions SET used_at = ? WHERE id = ? AND used_at IS NULL',
  getRequest: 'SELECT * FROM requests WHERE device_id = ? AND request_id = ?',
  insertRequest: 'INSERT INTO requests (device_id, request_id, kind, body_hash, response, created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING',
  insertChain: 'INSERT INTO answer_chains (ref, chain) VALUES (?, ?) ON CONFLICT DO NOTHING',
  getChain: 'SELECT chain FROM answer_chains WHERE ref = ?',
  // No ON CONFLICT: a serial that already exists is an error and rolls the issuance back;
  // the primary key is what guarantees serial uniqueness across nodes.
  insertCert: `INSERT INTO certificates (serial, subject_id, kind, fingerprint, not_before, not_after, status, request_id, pem, created_at, issuer)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
  supersedeOthers: "UPDATE certificates SET status = 'superseded' WHERE subject_id = ? AND kind = ? AND status = 'active' AND serial != ?",
  supersede: "UPDATE certificates SET status = 'superseded' WHERE serial = ? AND status = 'active'",
  countActive: "SELECT COUNT(*) AS n FROM certificates WHERE subject_id = ? AND status = 'active' AND not_after > ?",
  // SQLite without planner statistics takes the covering index certificates_expiry (status,
  // kind, not_after, subject_id) for this count and walks every active certificate (O(fleet)
  // per issuance: ~0.9 ms at 18,000 certificates, growing); the device's own index is the
  // right one. PostgreSQL plans from its statistics.
  countActiveSqlite: "SELECT COUNT(*) AS n FROM certificates INDEXED BY certificates_subject WHERE subject_id = ? AND status = 'active' AND not_after > ?",
  // A revocation is new work for the registries: a fresh set of attempts, even for a row that was parked.
  revoke: "UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ?, hub_synced_at = NULL, dps_synced_at = NULL, hub_attempts = 0, hub_next_at = NULL, hub_failed_at = NULL, dps_attempts = 0, dps_next_at = NULL, dps_failed_at = NULL WHERE serial = ? AND status = 'active'",
  getCert: 'SELECT * FROM certificates WHERE serial = ?',
  getCrl: 'SELECT issuer, CAST(crl_number AS TEXT) AS crl_number, this_update, next_update, der FROM crls WHERE issuer = ?',
  saveCrl: `INSERT INTO crls (issuer, crl_number, this_update, next_update, der) VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (issuer) DO UPDATE SET crl_number = excluded.crl_number, this_update = excluded.this_update, next_update = excluded.next_update, der = excluded.der
    WHERE excluded.crl_number > crls.crl_number`,
  insertAudit: 'INSERT INTO audit_log (at, action, outcome, code, device_id, gateway_id, request_id, serial, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)',
  dueForRenewal: `SELECT c.*, d.gateway_id AS device_gateway_id FROM certificates c JOIN devices d ON d.id = c.subject_id
    WHERE c.kind = 'device' AND c.status = 'active' AND d.group_name = ? AND d.status != 'disabled'
      AND c.not_after > ? AND c.not_before + (c.not_after - c.not_before) * CAST(? AS DOUBLE PRECISION) <= ?
    ORDER BY c.not_after, c.serial LIMIT ?`,
  dueForRenewalOfGateway: `SELECT c.*, d.gateway_id AS device_gateway_id FROM certificates c JOIN devices d ON d.id = c.subject_id
    WHERE c.kind = 'device' AND c.status = 'active' AND d.group_name = ? AND d.status != 'disabled' AND d.gateway_id = ?
      AND c.not_after > ? AND c.not_before + (c.not_after - c.not_before) * CAST(? AS DOUBLE PRECISION) <= ?
    ORDER BY c.not_after, c.serial LIMIT ?`,
  getCaMaterial: 'SELECT name, cert_pem, key_pem, created_at FROM ca_material',
  insertCaMaterial: 'INSERT INTO ca_material (name, cert_pem, key_pem, created_at) VALUES (?, ?, ?, ?) ON CONFLICT (name) DO NOTHING',
  claimJob: `INSERT INTO job_runs (name, last_run_at) VALUES (?, ?)
    ON CONFLICT (name) DO UPDATE SET last_run_at = excluded.last_run_at WHERE job_runs.last_run_at <= ?`,
  // Insert, or take over a claim that has expired (its node crashed): one statement, so two
  // nodes never both get it (PostgreSQL: the second waits on the key, then finds it live).
  claimExternal: `INSERT INTO external_claims (device_id, request_id, node, claimed_at, expires_at) VALUES (?, ?, ?, ?, ?)
    ON CONFLICT (device_id, request_id) DO UPDATE SET node = excluded.node, claimed_at = excluded.claimed_at, expires_at = excluded.expires_at
    WHERE external_claims.expires_at <= excluded.claimed_at`,
  releaseExternal: 'DELETE FROM external_claims WHERE device_id = ? AND request_id = ? AND node = ?',
  getExternal: 'SELECT * FROM external_claims WHERE device_id = ? AND request_id = ?',
} as const;

export const countActiveSql = (dialect: SqlDriver['dialect']): string => (dialect === 'sqlite' ? SQL.countActiveSqlite : SQL.countActive);

function insertDeviceRow(q: Queryable, d: DeviceRow) {
  return q.run(SQL.insertDevice, [d.id, d.groupName, d.method, d.status, d.gatewayId, d.ddkgSalt, d.ddkgPublicKey, d.birthCertFingerprint, d.createdAt, d.updatedAt]);
}

const DEVICE_COLUMNS: Record<string, string> = { status: 'status', gatewayId: 'gateway_id', ddkgPublicKey: 'ddkg_public_key', birthCertFingerprint: 'birth_cert_fingerprint' };

async function updateDeviceRow(q: Queryable, id: string, patch: DevicePatch, now: number): Promise<void> {
  const keys = Object.keys(patch).filter((k) => k in DEVICE_COLUMNS);
  if (!keys.length) return;
  const sql = `UPDATE devices SET ${keys.map((k) => `${DEVICE_COLUMNS[k]} = ?`).join(', ')}, updated_at = ? WHERE id = ?`;
  await q.run(sql, [...keys.map((k) => (patch as Row)[k]), now, id]);
}

function insertChallengeRow(q: Queryable, c: ChallengeRow) {
  return q.run(SQL.insertChallenge, [c.id, c.deviceId, c.gatewayId, c.method, c.nonce, json(c.context), c.expiresAt]);
}

function insertSessionRow(q: Queryable, s: AuthSessionRow) {
  return q.run(SQL.insertSession, [s.id, s.deviceId, s.gatewayId, json(s.instruction), s.expiresAt]);
}

export class SqlStore implements AuthorityStore {
  /** CA chains of stored answers by ref (content-addressed: sha256 of the chain's JSON). */
  private readonly chains = new Map<string, string[]>();
  /** Refs whose answer_chains row a committed transaction of ours wrote (or found). */
  private readonly committedChains = new Set<string>();
  /** Chain JSON -> ref, so that the hash is not recomputed per answer. */
  private readonly chainRefs = new Map<string, string>();

  constructor(readonly db: SqlDriver) {}

  get dialect(): SqlDriver['dialect'] {
    return this.db.dialect;
  }

  /** Applies the migrations not yet applied; returns their versions. */
  migrate(): Promise<number[]> {
    return this.db.migrate(listMigrations());
  }

  async close(): Promise<void> {
    await this.db.close();
  }

  async ping(): Promise<void> {
    await this.db.one('SELECT 1 AS ok');
  }

  private audit(q: Queryable, e: AuditEntry): Promise<unknown> {
    return q.run(SQL.insertAudit, [e.at, e.action, e.outcome, e.code ?? null, e.deviceId ?? null, e.gatewayId ?? null, e.requestId ?? null, e.serial ?? null, e.detail ? json(e.detail) : null]);
  }

  private insertCert(q: Queryable, c: CertificateRow): Promise<unknown> {
    return q.run(SQL.insertCert, [c.serial, c.subjectId, c.kind, c.fingerprint, c.notBefore, c.notAfter, c.status, c.requestId, c.pem, c.createdAt, c.issuer ?? ISSUER_OF_KIND[c.kind]]);
  }

  /**
   * A stored answer's `chain` (the same ~1.2 kB for every certificate of one issuing CA) is
   * written once to answer_chains and referenced as `chainRef`; getRequest puts it back.
   */
  private async insertRequestRow(q: Queryable, r: RequestRow, written: string[]) {
    let response = r.response;
    let chainRow: [ref: string, text: string] | null = null;
    const chain = response?.chain;
    if (Array.isArray(chain) && chain.length > 0 && chain.every((c) => typeof c === 'string')) {
      const text = JSON.stringify(chain);
      let ref = this.chainRefs.get(text);
      if (!ref) {
        ref = createHash('sha256').update(text).digest('hex');
        if (this.chainRefs.size >= 64) this.chainRefs.clear();
        this.chainRefs.set(text, ref);
      }
      // The chain row goes in the same transaction as the answer naming it, until one such
      // transaction is known to have committed (chain rows are never deleted): one that
      // rolls back takes its chain row with it.
      if (!this.committedChains.has(ref)) chainRow = [ref, text];
      const { chain: _inline, ...rest } = response as Record<string, unknown>;
      response = { ...rest, chainRef: ref };
    }
    const result = await q.run(SQL.insertRequest, [r.deviceId, r.requestId, r.kind, r.bodyHash, json(response), r.createdAt]);
    // Only once the answer is in: a requestId taken already returns false and writes nothing
    // (no chain row that no answer names).
    if (result.changes === 1 && chainRow) {
      await q.run(SQL.insertChain, chainRow);
      written.push(chainRow[0]);
    }
    return result;
  }

  /** A transaction that stores answers: the chain rows it wrote are known once it committed. */
  private async answerTransaction<T>(fn: (tx: Queryable, written: string[]) => Promise<T>): Promise<T> {
    const written: string[] = [];
    const value = await this.db.transaction((tx) => fn(tx, written));
    for (const ref of written) this.committedChains.add(ref);
    return value;
  }

  /** The answer as it was given: a `chainRef` replaced by its chain. */
  private async expandAnswer(response: Record<string, unknown>): Promise<Record<string, unknown>> {
    const ref = response?.chainRef;
    if (!response || typeof ref !== 'string') return response;
    let chain = this.chains.get(ref);
    if (!chain) {
      const row = await this.db.one(SQL.getChain, [ref]);
      if (!row) throw new Error(`stored answer names chain ${ref}, which is missing`);
      chain = JSON.parse(row.chain) as string[];
      this.chains.set(ref, chain);
    }
    const { chainRef: _ref, ...rest } = response;
    return { ...rest, chain: [...chain] };
  }

  async createEnrollmentToken(tokenHash: string, gatewayId: string, expiresAt: number): Promise<void> {
    await this.db.run(SQL.insertToken, [tokenHash, gatewayId, expiresAt]);
  }

  async peekEnrollmentToken(tokenHash: string, now: number): Promise<string | null> {
    return (await this.db.one('SELECT gateway_id FROM enrollment_tokens WHERE token_hash = ? AND used_at IS NULL AND expires_at > ?', [tokenHash, now]))?.gateway_id ?? null;
  }

  async consumeEnrollmentToken(tokenHash: string, now: number): Promise<string | null> {
    const r = await this.db.run(SQL.useToken, [now, tokenHash, now]);
    return r.rows[0]?.gateway_id ?? null;
  }

  async recordGatewayEnrollment(gatewayId: string, cert: CertificateRow, audit: AuditEntry, opts: { updateGatewayCert?: boolean } = {}): Promise<void> {
    await this.db.transaction(async (tx) => {
      await tx.run(SQL.supersedeOthers, [gatewayId, cert.kind, cert.serial]);
      await this.insertCert(tx, cert);
      if (opts.updateGatewayCert !== false) await tx.run(SQL.upsertGateway, [gatewayId, cert.serial, cert.fingerprint, cert.createdAt, cert.createdAt]);
      await this.audit(tx, audit);
    });
  }

  async listGateways(): Promise<GatewayRow[]> {
    return (await this.db.query('SELECT * FROM gateways ORDER BY id')).map((r) => ({ id: r.id, status: r.status, certSerial: r.cert_serial, certFingerprint: r.cert_fingerprint, createdAt: r.created_at, updatedAt: r.updated_at }));
  }

  async setGatewayStatus(id: string, status: GatewayRow['status'], audit: AuditEntry): Promise<boolean> {
    return this.db.transaction(async (tx) => {
      if ((await tx.run('UPDATE gateways SET status = ?, updated_at = ? WHERE id = ?', [status, audit.at, id])).changes !== 1) return false;
      await this.audit(tx, audit);
      return true;
    });
  }

  async ensureCertificates(rows: CertificateRow[]): Promise<void> {
    for (const c of rows) {
      if (!(await this.db.one(SQL.getCert, [c.serial]))) await this.insertCert(this.db, c).catch(async (err) => {
        // Another node inserted it meanwhile.
        if (!(await this.db.one(SQL.getCert, [c.serial]))) throw err;
      });
    }
  }

  async getGateway(id: string): Promise<GatewayRow | null> {
    const r = await this.db.one(SQL.getGateway, [id]);
    return r ? { id: r.id, status: r.status, certSerial: r.cert_serial, certFingerprint: r.cert_fingerprint, createdAt: r.created_at, updatedAt: r.updated_at } : null;
  }

  async getDevice(id: string): Promise<DeviceRow | null> {
    return toDevice(await this.db.one(SQL.getDevice, [id]));
  }

  async insertDevice(d: DeviceRow): Promise<boolean> {
    return (await insertDeviceRow(this.db, d)).changes === 1;
  }

  async updateDevice(id: string, patch: DevicePatch, now: number): Promise<void> {
    await updateDeviceRow(this.db, id, patch, now);
  }

  async createEnrollmentCode(codeHash: string, deviceId: string, groupName: string, expiresAt: number): Promise<void> {
    await this.db.run(SQL.insertCode, [codeHash, deviceId, groupName, expiresAt]);
  }

  async consumeEnrollmentCode(codeHash: string, deviceId: string, groupName: string, now: number): Promise<boolean> {
    return (await this.db.run(SQL.useCode, [now, codeHash, deviceId, groupName, now])).changes === 1;
  }

  async insertChallenge(c: ChallengeRow): Promise<void> {
    await insertChallengeRow(this.db, c);
  }

  async getChallenge(id: string): Promise<ChallengeRow | null> {
    const r = await this.db.one(SQL.getChallenge, [id]);
    if (!r) return null;
    return { id: r.id, deviceId: r.device_id, gatewayId: r.gateway_id, method: r.method, nonce: r.nonce, context: parse(r.context), expiresAt: r.expires_at, usedAt: r.used_at };
  }

  async useChallenge(id: string, now: number): Promise<boolean> {
    return (await this.db.run(SQL.useChallenge, [now, id])).changes === 1;
  }

  async insertAuthSession(s: AuthSessionRow): Promise<void> {
    await insertSessionRow(this.db, s);
  }

  async getLiveAuthSession(deviceId: string, now: number): Promise<AuthSessionRow | null> {
    const r = await this.db.one(SQL.liveSession, [deviceId, now]);
    if (!r) return null;
    return { id: r.id, deviceId: r.device_id, gatewayId: r.gateway_id, instruction: parse(r.instruction), expiresAt: r.expires_at, usedAt: r.used_at };
  }

  async getRequest(deviceId: string, requestId: string): Promise<RequestRow | null> {
    const r = await this.db.one(SQL.getRequest, [deviceId, requestId]);
    if (!r) return null;
    return { deviceId: r.device_id, requestId: r.request_id, kind: r.kind, bodyHash: r.body_hash, response: await this.expandAnswer(parse(r.response)), createdAt: r.created_at };
  }

  async insertRequest(q: RequestRow, audit: AuditEntry): Promise<boolean> {
    return this.answerTransaction(async (tx, written) => {
      const ok = (await this.insertRequestRow(tx, q, written)).changes === 1;
      if (ok) await this.audit(tx, audit);
      return ok;
    });
  }

  async recordIssuance(args: { request: RequestRow; certificate: CertificateRow; authSessionId: string; audit: AuditEntry; maxActive?: number; gatewayId?: string }): Promise<boolean> {
    const { request: q, certificate, authSessionId, audit, maxActive, gatewayId } = args;
    return this.answerTransaction(async (tx, written) => {
      // First the answer: on PostgreSQL a concurrent insert of the same (device, requestId) on
      // another node waits here for this one to commit, then does nothing: one certificate.
      if ((await this.insertRequestRow(tx, q, written)).changes !== 1) return false;
      if (maxActive !== undefined) {
        // The cap, counted where it cannot race: SQLite commits one writer at a time; on
        // PostgreSQL the device row's lock queues another node's issuance for the same
        // device behind this commit, and its count then sees this certificate.
        if (tx.dialect === 'postgres') await tx.query('SELECT id FROM devices WHERE id = ? FOR UPDATE', [certificate.subjectId]);
        const active = Number((await tx.one(countActiveSql(tx.dialect), [certificate.subjectId, q.createdAt]))?.n ?? 0);
        if (active >= maxActive) throw new LeafgateError('policy_violation', `device already holds ${active} active certificates (max ${maxActive})`);
      }
      if ((await tx.run(SQL.useSession, [q.createdAt, authSessionId])).changes !== 1) throw new Error('auth session was consumed concurrently');
      if (gatewayId !== undefined) await updateDeviceRow(tx, certificate.subjectId, { gatewayId }, q.createdAt);
      await this.insertCert(tx, certificate);
      await this.audit(tx, audit);
      return true;
    });
  }

  async recordCompactIssuance(args: {
    request: RequestRow; certificate: CertificateRow; challengeId: string; consumeCode?: { codeHash: string; groupName: string };
    devicePatch: DevicePatch; maxActive: number; audit: AuditEntry;
  }): Promise<boolean> {
    const { request: q, certificate, challengeId, consumeCode: code, devicePatch, maxActive, audit } = args;
    const deviceId = certificate.subjectId;
    return this.answerTransaction(async (tx, written) => {
      if ((await this.insertRequestRow(tx, q, written)).changes !== 1) return false;
      // Single use, inside the commit: of two verified answers racing (two nodes), one burns it.
      if ((await tx.run(SQL.useChallenge, [q.createdAt, challengeId])).changes !== 1) throw new LeafgateError('replayed', 'challenge was already answered');
      if (code && (await tx.run(SQL.useCode, [q.createdAt, code.codeHash, deviceId, code.groupName, q.createdAt])).changes !== 1) {
        throw new LeafgateError('enrollment_required', 'enrollmentCode is unknown, used or expired');
      }
      if (tx.dialect === 'postgres') await tx.query('SELECT id FROM devices WHERE id = ? FOR UPDATE', [deviceId]);
      const active = Number((await tx.one(countActiveSql(tx.dialect), [deviceId, q.createdAt]))?.n ?? 0);
      if (active >= maxActive) throw new LeafgateError('policy_violation', `device already holds ${active} active certificates (max ${maxActive})`);
      await updateDeviceRow(tx, deviceId, devicePatch, q.createdAt);
      await this.insertCert(tx, certificate);
      await this.audit(tx, audit);
      return true;
    });
  }

  async recordRegistration(args: { request: RequestRow; device: DeviceRow | null; challenge: ChallengeRow; audit: AuditEntry }): Promise<boolean> {
    const { request: q, device, challenge, audit } = args;
    return this.answerTransaction(async (tx, written) => {
      if ((await this.insertRequestRow(tx, q, written)).changes !== 1) return false;
      if (device) await insertDeviceRow(tx, device);
      await insertChallengeRow(tx, challenge);
      await this.audit(tx, audit);
      return true;
    });
  }

  async recordAuthentication(args: { consumeCode?: { codeHash: string; groupName: string }; deviceId: string; devicePatch: DevicePatch; session: AuthSessionRow; audit: AuditEntry; now: number }): Promise<boolean> {
    const { consumeCode: code, deviceId, devicePatch, session, audit, now } = args;
    return this.db.transaction(async (tx) => {
      if (code && (await tx.run(SQL.useCode, [now, code.codeHash, deviceId, code.groupName, now])).changes !== 1) return false;
      await updateDeviceRow(tx, deviceId, devicePatch, now);
      await insertSessionRow(tx, session);
      await this.audit(tx, audit);
      return true;
    });
  }

  async recordRenewal(args: { request: RequestRow; certificate: CertificateRow; supersedes: string; audit: AuditEntry }): Promise<boolean> {
    const { request: q, certificate, supersedes, audit } = args;
    return this.answerTransaction(async (tx, written) => {
      if ((await this.insertRequestRow(tx, q, written)).changes !== 1) return false;
      if ((await tx.run(SQL.supersede, [supersedes])).changes !== 1) throw new Error('certificate to supersede is no longer active');
      await this.insertCert(tx, certificate);
      await this.audit(tx, audit);
      return true;
    });
  }

  async listDueForRenewal(group: string, fraction: number, now: number, limit: number, gatewayId?: string): Promise<DueCertificateRow[]> {
    const rows = gatewayId === undefined
      ? await this.db.query(SQL.dueForRenewal, [group, now, fraction, now, limit])
      : await this.db.query(SQL.dueForRenewalOfGateway, [group, gatewayId, now, fraction, now, limit]);
    return rows.map((r) => ({ ...toCert(r), gatewayId: r.device_gateway_id ?? null }));
  }

  async countActiveCertificates(subjectId: string, now: number): Promise<number> {
    return Number((await this.db.one(countActiveSql(this.db.dialect), [subjectId, now]))?.n ?? 0);
  }

  async listCertificates(filter: { subjectId?: string; status?: string; kind?: string; expiringBefore?: number; limit?: number }): Promise<CertificateRow[]> {
    const where: string[] = [];
    const args: unknown[] = [];
    if (filter.subjectId) (where.push('subject_id = ?'), args.push(filter.subjectId));
    if (filter.status) (where.push('status = ?'), args.push(filter.status));
    if (filter.kind) (where.push('kind = ?'), args.push(filter.kind));
    if (filter.expiringBefore !== undefined) (where.push('not_after <= ?'), args.push(filter.expiringBefore));
    const sql = `SELECT * FROM certificates ${where.length ? 'WHERE ' + where.join(' AND ') : ''} ORDER BY created_at DESC, serial LIMIT ?`;
    return (await this.db.query(sql, [...args, filter.limit ?? 1000])).map(toCert);
  }

  async revokeCertificate(serial: string, reason: number, at: number, audit: AuditEntry): Promise<CertificateRow | null> {
    return this.db.transaction(async (tx) => {
      if ((await tx.run(SQL.revoke, [at, reason, serial])).changes !== 1) return null;
      await this.audit(tx, audit);
      return toCert((await tx.one(SQL.getCert, [serial]))!);
    });
  }

  async recordExternalRevocation(c: CertificateRow, audit: AuditEntry): Promise<boolean> {
    try {
      return await this.db.transaction(async (tx) => {
        if (await tx.one(SQL.getCert, [c.serial])) return false;
        await tx.run(`INSERT INTO certificates (serial, subject_id, kind, fingerprint, not_before, not_after, status, request_id, pem, created_at, issuer, revoked_at, revocation_reason, hub_synced_at, dps_synced_at)
          VALUES (?, ?, ?, ?, ?, ?, 'revoked', ?, ?, ?, ?, ?, ?, ?, ?)`, [c.serial, c.subjectId, c.kind, c.fingerprint, c.notBefore, c.notAfter, c.requestId, c.pem, c.createdAt, c.issuer ?? ISSUER_OF_KIND[c.kind], c.revokedAt, c.revocationReason, c.createdAt, c.createdAt]);
        await this.audit(tx, audit);
        return true;
      });
    } catch (err) {
      // Another node recorded it meanwhile (primary key).
      if (await this.db.one(SQL.getCert, [c.serial])) return false;
      throw err;
    }
  }

  async listRevoked(issuer: IssuerName): Promise<CertificateRow[]> {
    const rows = await this.db.query("SELECT * FROM certificates WHERE status = 'revoked' AND issuer = ? ORDER BY revoked_at, serial", [issuer]);
    return rows.map(toCert);
  }

  async getCertificate(serial: string): Promise<CertificateRow | null> {
    const r = await this.db.one(SQL.getCert, [serial]);
    return r ? toCert(r) : null;
  }

  async getCrl(issuer: string): Promise<CrlRow | null> {
    const r = await this.db.one(SQL.getCrl, [issuer]);
    // BLOB / BYTEA: a Buffer from both drivers. Empty only for the CRL carried over by
    // migration 006 (next_update 0, so it is reissued before it is served).
    return r ? { issuer: r.issuer, crlNumber: BigInt(r.crl_number), thisUpdate: r.this_update, nextUpdate: r.next_update, der: r.der ? Buffer.from(r.der) : Buffer.alloc(0) } : null;
  }

  async saveCrl(c: CrlRow): Promise<boolean> {
    return (await this.db.run(SQL.saveCrl, [c.issuer, c.crlNumber, c.thisUpdate, c.nextUpdate, c.der])).changes === 1;
  }

  async listDevices(filter: { status?: string; group?: string; limit?: number }): Promise<DeviceRow[]> {
    const where: string[] = [];
    const args: unknown[] = [];
    if (filter.status) (where.push('status = ?'), args.push(filter.status));
    if (filter.group) (where.push('group_name = ?'), args.push(filter.group));
    const sql = `SELECT * FROM devices ${where.length ? 'WHERE ' + where.join(' AND ') : ''} ORDER BY id LIMIT ?`;
    return (await this.db.query(sql, [...args, filter.limit ?? 1000])).map((r) => toDevice(r)!);
  }

  async listHubPending(limit: number, t: RegistryTarget = 'hub', now?: number): Promise<PendingCertificateRow[]> {
    const c = target(t);
    // Revocations first (a revoked device must not stay enabled behind a queue of creates),
    // then oldest first. Parked rows (failed_at) wait for an operator; rows backing off wait
    // for their next attempt time when `now` is given.
    const due = now === undefined ? '' : ` AND (${c}_next_at IS NULL OR ${c}_next_at <= ?)`;
    const rows = await this.db.query(
      `SELECT * FROM certificates WHERE kind = 'device' AND ${c}_synced_at IS NULL AND ${c}_failed_at IS NULL${due} ` +
        `ORDER BY CASE WHEN status = 'revoked' THEN 0 ELSE 1 END, created_at, serial LIMIT ?`,
      now === undefined ? [limit] : [now, limit],
    );
    return rows.map((r) => ({ ...toCert(r), syncAttempts: Number(r[`${c}_attempts`] ?? 0) }));
  }

  async markHubSynced(serial: string, at: number, error?: string, t: RegistryTarget = 'hub', status?: CertificateRow['status']): Promise<void> {
    // Only if the row is still in the state that was synced: a revocation that landed
    // meanwhile (it clears the mark) must be picked up by the next pass, not hidden by this one.
    const cond = status ? ' AND status = ?' : '';
    const args: unknown[] = status ? [serial, status] : [serial];
    if (target(t) === 'hub') await this.db.run(`UPDATE certificates SET hub_synced_at = ?, hub_error = ?, hub_next_at = NULL WHERE serial = ?${cond}`, [at, error ?? null, ...args]);
    else await this.db.run(`UPDATE certificates SET dps_synced_at = ?, dps_error = ?, dps_next_at = NULL WHERE serial = ?${cond}`, [at, error ?? null, ...args]);
  }

  async recordSyncFailure(serial: string, t: RegistryTarget, f: { attempts: number; nextAt: number | null; failedAt: number | null; error: string; status: CertificateRow['status'] }): Promise<void> {
    const c = target(t);
    // Same guard as markHubSynced: a revocation that landed meanwhile reset the row; keep that.
    await this.db.run(
      `UPDATE certificates SET ${c}_attempts = ?, ${c}_next_at = ?, ${c}_failed_at = ?, ${c}_error = ? WHERE serial = ? AND status = ? AND ${c}_synced_at IS NULL`,
      [f.attempts, f.nextAt, f.failedAt, f.error.slice(0, 1000), serial, f.status],
    );
  }

  async listSyncFailed(filter: { target?: RegistryTarget; limit?: number }): Promise<SyncFailureRow[]> {
    const out: SyncFailureRow[] = [];
    for (const t of filter.target ? [target(filter.target)] : (['hub', 'dps'] as const)) {
      const rows = await this.db.query(
        `SELECT serial, subject_id, status, ${t}_attempts AS attempts, ${t}_failed_at AS failed_at, ${t}_error AS error FROM certificates ` +
          `WHERE kind = 'device' AND ${t}_synced_at IS NULL AND ${t}_failed_at IS NOT NULL ORDER BY ${t}_failed_at, serial LIMIT ?`,
        [filter.limit ?? 1000],
      );
      for (const r of rows) out.push({ target: t, serial: r.serial, deviceId: r.subject_id, status: r.status, attempts: Number(r.attempts), failedAt: Number(r.failed_at), error: r.error ?? null });
    }
    return out;
  }

  async retrySyncFailed(t: RegistryTarget, deviceId?: string): Promise<number> {
    const c = target(t);
    const r = await this.db.run(
      `UPDATE certificates SET ${c}_attempts = 0, ${c}_next_at = NULL, ${c}_failed_at = NULL WHERE kind = 'device' AND ${c}_failed_at IS NOT NULL AND ${c}_synced_at IS NULL${deviceId ? ' AND subject_id = ?' : ''}`,
      deviceId ? [deviceId] : [],
    );
    return r.changes;
  }

  async countSync(t: RegistryTarget): Promise<{ pending: number; failed: number }> {
    const c = target(t);
    const r = await this.db.one(
      `SELECT SUM(CASE WHEN ${c}_failed_at IS NULL THEN 1 ELSE 0 END) AS pending, SUM(CASE WHEN ${c}_failed_at IS NOT NULL THEN 1 ELSE 0 END) AS failed ` +
        `FROM certificates WHERE kind = 'device' AND ${c}_synced_at IS NULL`,
    );
    return { pending: Number(r?.pending ?? 0), failed: Number(r?.failed ?? 0) };
  }

  async listHubDecommissioned(limit: number, t: RegistryTarget = 'hub'): Promise<string[]> {
    const col = `${target(t)}_state`;
    const rows = await this.db.query(`SELECT id FROM devices WHERE status = 'disabled' AND ${col} IS NOT NULL AND ${col} != 'deleted' ORDER BY id LIMIT ?`, [limit]);
    return rows.map((r) => r.id);
  }

  async setDeviceHubState(deviceId: string, state: 'present' | 'disabled' | 'deleted', t: RegistryTarget = 'hub'): Promise<void> {
    await this.db.run(`UPDATE devices SET ${target(t)}_state = ? WHERE id = ?`, [state, deviceId]);
  }

  async claimExternalRequest(c: ExternalClaimRow): Promise<boolean> {
    return (await this.db.run(SQL.claimExternal, [c.deviceId, c.requestId, c.node, c.claimedAt, c.expiresAt])).changes === 1;
  }

  async releaseExternalRequest(deviceId: string, requestId: string, node: string): Promise<void> {
    await this.db.run(SQL.releaseExternal, [deviceId, requestId, node]);
  }

  async getExternalClaim(deviceId: string, requestId: string): Promise<ExternalClaimRow | null> {
    const r = await this.db.one(SQL.getExternal, [deviceId, requestId]);
    return r ? { deviceId: r.device_id, requestId: r.request_id, node: r.node, claimedAt: Number(r.claimed_at), expiresAt: Number(r.expires_at) } : null;
  }

  async insertDashboardSession(row: DashboardSessionRow, max: number): Promise<void> {
    await this.db.transaction(async (tx) => {
      await tx.run('INSERT INTO dashboard_sessions (id_hash, operator, via, csrf, created_at, last_used_at) VALUES (?, ?, ?, ?, ?, ?)', [row.idHash, row.operator, row.via, row.csrf, row.createdAt, row.lastUsedAt]);
      // Bounded: past `max` sessions the oldest go (the subquery is NULL below `max`: nothing goes).
      await tx.run('DELETE FROM dashboard_sessions WHERE created_at < (SELECT created_at FROM dashboard_sessions ORDER BY created_at DESC LIMIT 1 OFFSET ?)', [max - 1]);
    });
  }

  async getDashboardSession(idHash: string): Promise<DashboardSessionRow | null> {
    const r = await this.db.one('SELECT * FROM dashboard_sessions WHERE id_hash = ?', [idHash]);
    if (!r) return null;
    return { idHash: r.id_hash, operator: r.operator, via: r.via, csrf: r.csrf, createdAt: Number(r.created_at), lastUsedAt: Number(r.last_used_at) };
  }

  async touchDashboardSession(idHash: string, at: number): Promise<void> {
    await this.db.run('UPDATE dashboard_sessions SET last_used_at = ? WHERE id_hash = ? AND last_used_at < ?', [at, idHash, at]);
  }

  async deleteDashboardSession(idHash: string): Promise<void> {
    await this.db.run('DELETE FROM dashboard_sessions WHERE id_hash = ?', [idHash]);
  }

  async purgeDashboardSessions(createdBefore: number, usedBefore: number): Promise<number> {
    return (await this.db.run('DELETE FROM dashboard_sessions WHERE created_at < ? OR last_used_at < ?', [createdBefore, usedBefore])).changes;
  }

  async appendAudit(entry: AuditEntry): Promise<void> {
    await this.audit(this.db, entry);
  }

  async listAudit(filter: { deviceId?: string; limit?: number }): Promise<AuditRow[]> {
    const rows = filter.deviceId
      ? await this.db.query('SELECT * FROM audit_log WHERE device_id = ? ORDER BY seq DESC LIMIT ?', [filter.deviceId, filter.limit ?? 1000])
      : await this.db.query('SELECT * FROM audit_log ORDER BY seq DESC LIMIT ?', [filter.limit ?? 1000]);
    return rows.map((r) => ({
      seq: r.seq, at: r.at, action: r.action, outcome: r.outcome, code: r.code, deviceId: r.device_id, gatewayId: r.gateway_id, requestId: r.request_id, serial: r.serial, detail: parse(r.detail),
    }));
  }

  async getCaMaterial(): Promise<CaMaterialRow[]> {
    const rows = await this.db.query(SQL.getCaMaterial);
    return rows.map((r) => ({ name: r.name, certPem: r.cert_pem, keyPem: r.key_pem, createdAt: r.created_at }));
  }

  async insertCaMaterialIfAbsent(rows: CaMaterialRow[]): Promise<boolean> {
    // One transaction: the set is written whole or not at all, so a node never finds a root
    // without its issuing CAs. A node racing this one waits on the primary key, then inserts nothing.
    return this.db.transaction(async (tx) => {
      let inserted = 0;
      for (const r of rows) inserted += (await tx.run(SQL.insertCaMaterial, [r.name, r.certPem, r.keyPem, r.createdAt])).changes;
      return inserted === rows.length;
    });
  }

  async claimJob(name: string, now: number, minIntervalMs: number): Promise<boolean> {
    return (await this.db.run(SQL.claimJob, [name, now, now - minIntervalMs])).changes === 1;
  }

  exclusive<T>(name: string, fn: () => Promise<T>): Promise<{ ran: true; value: T } | { ran: false }> {
    return this.db.exclusive(name, fn);
  }
}

/** The embedded store on one SQLite file, migrated when constructed (synchronous, as before). */
export class SqliteStore extends SqlStore {
  /** `fsync: false`: commits are not synced to disk before they are acknowledged (see SqliteDriver). */
  constructor(file: string, opts: { fsync?: boolean } = {}) {
    const driver = new SqliteDriver(file, opts);
    driver.migrateNow(listMigrations());
    super(driver);
  }
}

/**
 * Opens the store a `database` setting names: a postgres:// URL (several authority nodes may
 * share it) or a SQLite file. Migrations are applied before it is returned. A database that
 * cannot be reached is a clear `authority_unavailable` error naming it (without password).
 */
export async function openStore(database: string, opts: { onError?: (err: Error) => void; sqliteFsync?: boolean } = {}): Promise<SqlStore> {
  if (!isPostgresUrl(database)) return new SqliteStore(database, { fsync: opts.sqliteFsync });
  const store = new SqlStore(new PostgresDriver({ url: database, onError: opts.onError }));
  try {
    await store.migrate();
  } catch (err) {
    await store.close().catch(() => undefined);
    if (err instanceof LeafgateError) throw new LeafgateError(err.code, `cannot open the authority database: ${err.message}`, { cause: err });
    throw new LeafgateError('internal', `cannot migrate the authority database ${redactUrl(database)}: ${(err as Error).message}`, { cause: err });
  }
  return store;
}
