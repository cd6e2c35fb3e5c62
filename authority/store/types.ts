/** Rows and the store contract. Both engines (SQLite, PostgreSQL) pass one suite: test/store.test.ts. */
import type { AuthMethod } from '../../protocol/index.ts';
import type { CaName, IssuerName } from '../ca/index.ts';
export type { CaName, IssuerName };

/** Which CA signs a certificate of each kind today. */
export const ISSUER_OF_KIND: Readonly<Record<CertificateRow['kind'], CaName>> = { device: 'device-ca', gateway: 'infra-ca', server: 'infra-ca', subca: 'edge-issuer', ca: 'root', 'edge-identity': 'infra-ca' };

export interface DeviceRow {
  id: string;
  groupName: string;
  method: AuthMethod;
  status: 'registered' | 'enrolled' | 'disabled';
  gatewayId: string | null;
  ddkgSalt: string | null;
  ddkgPublicKey: string | null;
  birthCertFingerprint: string | null;
  /** Where the device stands in the external registry (IoT Hub), if one is configured. */
  hubState?: 'present' | 'disabled' | 'deleted' | null;
  /** The same for DPS (individual enrollments). `disabled` means leafgate disabled it. */
  dpsState?: 'present' | 'disabled' | 'deleted' | null;
  createdAt: number;
  updatedAt: number;
}

/** The device fields that authentication and enrollment change. */
export type DevicePatch = Partial<Pick<DeviceRow, 'status' | 'gatewayId' | 'ddkgPublicKey' | 'birthCertFingerprint'>>;

export interface ChallengeRow {
  id: string;
  deviceId: string;
  gatewayId: string;
  method: AuthMethod;
  nonce: string;
  context: Record<string, unknown>;
  expiresAt: number;
  usedAt: number | null;
}

export interface AuthSessionRow {
  id: string;
  deviceId: string;
  gatewayId: string;
  instruction: Record<string, unknown>;
  expiresAt: number;
  usedAt: number | null;
}

export interface RequestRow {
  deviceId: string;
  requestId: string;
  kind: 'register' | 'auth' | 'csr' | 'renew' | 'enroll';
  bodyHash: string;
  response: Record<string, unknown>;
  createdAt: number;
}

export interface CertificateRow {
  serial: string;
  subjectId: string;
  /** ca: an intermediate of the hierarchy (the root signed it; the root CRL lists it once revoked). */
  /** edge-identity: a gateway's IoT Edge device identity (EST `identity`), apart from its leafgate certificate. */
  kind: 'device' | 'gateway' | 'server' | 'subca' | 'ca' | 'edge-identity';
  /** The CA that signed it; by default the one that signs its kind (see ISSUER_OF_KIND); `external-ca`: the EST connector's CA. */
  issuer?: IssuerName;
  fingerprint: string;
  notBefore: number;
  notAfter: number;
  status: 'active' | 'superseded' | 'revoked';
  requestId: string | null;
  pem: string;
  revokedAt: number | null;
  revocationReason: number | null;
  createdAt: number;
}

/** A certificate not yet reflected in an external registry, with its failed attempts there. */
export interface PendingCertificateRow extends CertificateRow {
  syncAttempts: number;
}

/** A certificate whose registry sync is parked after too many failed attempts. */
export interface SyncFailureRow {
  target: RegistryTarget;
  serial: string;
  deviceId: string;
  status: CertificateRow['status'];
  attempts: number;
  failedAt: number;
  error: string | null;
}

/** A certificate due for renewal, with the gateway its device is enrolled through. */
export interface DueCertificateRow extends CertificateRow {
  gatewayId: string | null;
}

export interface AuditEntry {
  at: number;
  action: string;
  outcome: 'ok' | 'refused' | 'error';
  code?: string | null;
  deviceId?: string | null;
  gatewayId?: string | null;
  requestId?: string | null;
  serial?: string | null;
  detail?: Record<string, unknown> | null;
}

export interface AuditRow extends AuditEntry {
  seq: number;
}

/** External registries mirrored from the certificates table. */
export type RegistryTarget = 'hub' | 'dps';

export interface CrlRow {
  issuer: string;
  crlNumber: bigint;
  thisUpdate: number;
  nextUpdate: number;
  der: Buffer;
}

/** One CA of the built-in CA as stored for a cluster: certificate and encrypted PKCS#8 key, PEM. */
export interface CaMaterialRow {
  name: CaName;
  certPem: string;
  keyPem: string;
  createdAt: number;
}

export interface GatewayRow {
  id: string;
  status: 'active' | 'disabled';
  certSerial: string | null;
  certFingerprint: string | null;
  createdAt: number;
  updatedAt: number;
}

/**
 * Domain-level operations; each one that changes several rows is atomic in the store, so
 * callers never hold a transaction across an await.
 */
export interface DashboardSessionRow {
  idHash: string;
  operator: string;
  via: 'token' | 'header';
  csrf: string;
  createdAt: number;
  lastUsedAt: number;
}

/** A node's claim on a request before it is forwarded to an external CA (EST). */
export interface ExternalClaimRow {
  deviceId: string;
  requestId: string;
  /** Who holds it: the node's id (several authority nodes on one PostgreSQL database). */
  node: string;
  claimedAt: number;
  expiresAt: number;
}

export interface AuthorityStore {
  close(): Promise<void>;
  /** Resolves when the database answers; authority_unavailable when it cannot be reached. */
  ping(): Promise<void>;

  createEnrollmentToken(tokenHash: string, gatewayId: string, expiresAt: number): Promise<void>;
  /** The gateway id of a usable token, without using it (the CSR is checked before the token is spent). */
  peekEnrollmentToken(tokenHash: string, now: number): Promise<string | null>;
  /** Marks the token used and returns its gateway id; null when unknown, used or expired. */
  consumeEnrollmentToken(tokenHash: string, now: number): Promise<string | null>;
  /** Records the gateway and its certificate (one transaction with the audit row). */
  /**
   * Records the gateway and its certificate (one transaction with the audit row); every other
   * active certificate of the same kind of that gateway becomes superseded (a renewal ends the
   * old identity: the authority accepts only the current one).
   */
  recordGatewayEnrollment(gatewayId: string, cert: CertificateRow, audit: AuditEntry, opts?: { updateGatewayCert?: boolean }): Promise<void>;
  getGateway(id: string): Promise<GatewayRow | null>;
  listGateways(): Promise<GatewayRow[]>;
  /** Disables (or re-enables) a gateway; a disabled gateway is refused by the authority. */
  setGatewayStatus(id: string, status: GatewayRow['status'], audit: AuditEntry): Promise<boolean>;
  /** Records the intermediates of the hierarchy as certificates the root issued (kept if present). */
  ensureCertificates(rows: CertificateRow[]): Promise<void>;

  getDevice(id: string): Promise<DeviceRow | null>;
  /** Inserts the device; returns false when it already exists. */
  insertDevice(row: DeviceRow): Promise<boolean>;
  updateDevice(id: string, patch: DevicePatch, now: number): Promise<void>;

  createEnrollmentCode(codeHash: string, deviceId: string, groupName: string, expiresAt: number): Promise<void>;
  /** Atomically consumes a code bound to the device and group; false when unknown, used or expired. */
  consumeEnrollmentCode(codeHash: string, deviceId: string, groupName: string, now: number): Promise<boolean>;

  insertChallenge(row: ChallengeRow): Promise<void>;
  getChallenge(id: string): Promise<ChallengeRow | null>;
  /** Atomically marks the challenge used; false when it already was (a replay). */
  useChallenge(id: string, now: number): Promise<boolean>;

  insertAuthSession(row: AuthSessionRow): Promise<void>;
  /** Newest unused, unexpired session of the device. */
  getLiveAuthSession(deviceId: string, now: number): Promise<AuthSessionRow | null>;

  getRequest(deviceId: string, requestId: string): Promise<RequestRow | null>;
  /** Stores an answer; false when the (device, requestId) pair already exists. */
  insertRequest(row: RequestRow, audit: AuditEntry): Promise<boolean>;

  /**
   * The issuance commit: request answer, certificate row, auth session consumed, audit row,
   * all or nothing. False when the requestId was taken meanwhile (the caller returns that answer).
   * With `maxActive`, the device's active certificates are counted inside the commit, with
   * the device row locked on PostgreSQL, so that nodes issuing at once cannot together pass
   * the cap; over it, LeafgateError `policy_violation` and nothing is written.
   * With `gatewayId`, the device row moves to that gateway in the same commit (the gateway
   * through which the device holds its certificate is the one that may renew it).
   */
  recordIssuance(args: { request: RequestRow; certificate: CertificateRow; authSessionId: string; audit: AuditEntry; maxActive?: number; gatewayId?: string }): Promise<boolean>;
  /**
   * The compact flow's issuance commit (`enroll`, no auth session): the answer, the challenge
   * burnt (single use: already used -> LeafgateError `replayed`, nothing written), the
   * one-time enrollment code consumed when given (unknown, used or expired ->
   * `enrollment_required`), the device's enrollment fields and gateway, the active-certificate
   * cap (as in recordIssuance), the certificate and the audit row; all or nothing. False when
   * the requestId was taken meanwhile (the caller returns that answer).
   */
  recordCompactIssuance(args: {
    request: RequestRow; certificate: CertificateRow; challengeId: string; consumeCode?: { codeHash: string; groupName: string };
    devicePatch: DevicePatch; maxActive: number; audit: AuditEntry;
  }): Promise<boolean>;
  /**
   * register's commit: the stored answer (the challenge) first, then the device row when
   * given (kept as it is when it exists), the challenge row and the audit row; all or
   * nothing. False when the requestId was taken meanwhile (nothing written).
   */
  recordRegistration(args: { request: RequestRow; device: DeviceRow | null; challenge: ChallengeRow; audit: AuditEntry }): Promise<boolean>;
  /**
   * auth's commit once the signature verified: the one-time enrollment code consumed (when
   * given), the device's enrollment fields, the auth session and the audit row; all or
   * nothing. False when the code is unknown, used or expired (nothing written).
   */
  recordAuthentication(args: { consumeCode?: { codeHash: string; groupName: string }; deviceId: string; devicePatch: DevicePatch; session: AuthSessionRow; audit: AuditEntry; now: number }): Promise<boolean>;
  /** Renewal commit: answer, new certificate, old one superseded, audit; all or nothing. */
  recordRenewal(args: { request: RequestRow; certificate: CertificateRow; supersedes: string; audit: AuditEntry }): Promise<boolean>;
  /**
   * Active device certificates of a group whose renewal window has opened and that are still
   * valid, each with its device's gateway; with `gatewayId`, only that gateway's devices.
   */
  listDueForRenewal(group: string, fraction: number, now: number, limit: number, gatewayId?: string): Promise<DueCertificateRow[]>;
  countActiveCertificates(subjectId: string, now: number): Promise<number>;
  listCertificates(filter: { subjectId?: string; status?: string; kind?: string; expiringBefore?: number; limit?: number }): Promise<CertificateRow[]>;
  listDevices(filter: { status?: string; group?: string; limit?: number }): Promise<DeviceRow[]>;

  /** Marks an active certificate revoked (with the audit row); null when unknown or not active. */
  revokeCertificate(serial: string, reason: number, at: number, audit: AuditEntry): Promise<CertificateRow | null>;
  /**
   * Records a certificate of the external device CA (EST) that leafgate did not deliver (issued
   * outside leafgate, or an orphan of its own requests) as revoked, with the audit row; all or
   * nothing. Marked synced for the registries: leafgate never registered it there. False when
   * the serial is on record already (nothing written).
   */
  recordExternalRevocation(cert: CertificateRow, audit: AuditEntry): Promise<boolean>;
  /** Revoked certificates signed by one CA, for its CRL. */
  listRevoked(issuer: IssuerName): Promise<CertificateRow[]>;
  getCertificate(serial: string): Promise<CertificateRow | null>;
  getCrl(issuer: string): Promise<CrlRow | null>;
  /** Stores the CRL only if its number is higher than the stored one (several nodes may race). */
  saveCrl(row: CrlRow): Promise<boolean>;

  /**
   * Device certificates not yet reflected in an external registry and not parked: revocations
   * first, then oldest first; with `now`, only those whose next attempt is due.
   */
  listHubPending(limit: number, target?: RegistryTarget, now?: number): Promise<PendingCertificateRow[]>;
  markHubSynced(serial: string, at: number, error?: string, target?: RegistryTarget, status?: CertificateRow['status']): Promise<void>;
  /** One more failed attempt for a row: its next attempt time, or parked (failedAt) past the limit. */
  recordSyncFailure(serial: string, target: RegistryTarget, f: { attempts: number; nextAt: number | null; failedAt: number | null; error: string; status: CertificateRow['status'] }): Promise<void>;
  /** Parked rows (sync failed past the attempt limit). */
  listSyncFailed(filter: { target?: RegistryTarget; limit?: number }): Promise<SyncFailureRow[]>;
  /** Un-parks failed rows (all, or one device's) for a fresh set of attempts; answers how many. */
  retrySyncFailed(target: RegistryTarget, deviceId?: string): Promise<number>;
  /** Unsynced rows: pending (incl. backing off) and parked. */
  countSync(target: RegistryTarget): Promise<{ pending: number; failed: number }>;
  /** Disabled (decommissioned) devices still present in an external registry. */
  listHubDecommissioned(limit: number, target?: RegistryTarget): Promise<string[]>;
  setDeviceHubState(deviceId: string, state: 'present' | 'disabled' | 'deleted', target?: RegistryTarget): Promise<void>;

  /**
   * Takes the claim on (device, requestId) before its CSR is sent to an external CA: true for
   * exactly one caller while the claim lives (INSERT .. ON CONFLICT, across nodes); an expired
   * claim (its node crashed) is taken over in the same statement.
   */
  claimExternalRequest(claim: ExternalClaimRow): Promise<boolean>;
  /** Drops the claim if `node` still holds it (answer committed, or the call failed). */
  releaseExternalRequest(deviceId: string, requestId: string, node: string): Promise<void>;
  getExternalClaim(deviceId: string, requestId: string): Promise<ExternalClaimRow | null>;

  /** Dashboard sessions (authority/dashboard/sessions.ts), keyed by the SHA-256 of the cookie's id. */
  insertDashboardSession(row: DashboardSessionRow, max: number): Promise<void>;
  getDashboardSession(idHash: string): Promise<DashboardSessionRow | null>;
  touchDashboardSession(idHash: string, at: number): Promise<void>;
  deleteDashboardSession(idHash: string): Promise<void>;
  /** Drops sessions created before `createdBefore` or idle since before `usedBefore`. */
  purgeDashboardSessions(createdBefore: number, usedBefore: number): Promise<number>;

  appendAudit(entry: AuditEntry): Promise<void>;
  listAudit(filter: { deviceId?: string; limit?: number }): Promise<AuditRow[]>;

  /** The shared CA (cluster mode): every stored CA row. */
  getCaMaterial(): Promise<CaMaterialRow[]>;
  /** Stores the CA set unless one exists (all rows or none); false when another node's set was there first. */
  insertCaMaterialIfAbsent(rows: CaMaterialRow[]): Promise<boolean>;
  /** Claims a periodic job for the whole cluster: true for exactly one caller per `minIntervalMs`. */
  claimJob(name: string, now: number, minIntervalMs: number): Promise<boolean>;
  /** Runs `fn` unless another node runs a job of that name right now (try-lock; no waiting). */
  exclusive<T>(name: string, fn: () => Promise<T>): Promise<{ ran: true; value: T } | { ran: false }>;
}
