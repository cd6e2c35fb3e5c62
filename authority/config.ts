/**
 * Authority configuration: one typed object from defaults, a JSON file and the environment,
 * validated at start-up and frozen. Defaults are documented in README (Configuration).
 */
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { LeafgateError } from '../protocol/index.ts';
import { DEFAULT_POLICY, mergePolicy, validatePolicy, type DevicePolicy } from './policy/index.ts';
import { isPostgresUrl } from './store/index.ts';
import { pgConfig } from './store/sql.ts';

export interface AuthorityConfig {
  /** CA material (SQLite mode), the admin token and the SQLite file live here. */
  dataDir: string;
  /** Encrypts the CA private keys at rest. Env: LEAFGATE_CA_PASSPHRASE. */
  caPassphrase: string;
  listen: { host: string; port: number };
  /** Names (DNS or IP) in the authority's TLS certificate. */
  hostnames: string[];
  /** Organization in CA names. */
  organization: string;
  /**
   * Base URL of the CRLs (`{base}/v1/crl/{ca}.crl`), written into issued certificates as
   * their CRL distribution point. Default: https://{first hostname}:{listening port}.
   */
  crlBaseUrl?: string;
  /**
   * The store: a SQLite file path (default `<dataDir>/authority.db`, one node) or a
   * postgres:// URL that several authority nodes share (`?schema=NAME` selects a schema).
   * Env: LEAFGATE_DATABASE_URL. The old key `databaseFile` is still read.
   */
  database: string;
  /**
   * SQLite store: a transaction (issuance, renewal, revocation, a stored answer, gateway
   * enrollment) is acknowledged only once the WAL is fsynced, one fsync per group commit,
   * off the event loop. false: synchronous=NORMAL
   * alone (never corrupt, but a power cut can lose the last commits). PostgreSQL: its own
   * synchronous_commit applies.
   */
  databaseFsync: boolean;
  challengeTtlSeconds: number;
  /** Time a device has after authenticating to send its CSR. */
  csrDeadlineSeconds: number;
  /** Lifetime of a gateway certificate. */
  gatewayCertDays: number;
  /** Gateway Sub-CAs (IoT Edge edge CA): lifetime and dNSName name constraints ({gatewayId} replaced). */
  gatewaySubCa: { validityDays: number; permittedDns: string[] };
  /** Lifetime of a CRL (nextUpdate - thisUpdate); it is reissued at half of it. */
  crlValidityHours: number;
  /** How often due renewals are announced to gateways. */
  renewalScanSeconds: number;
  /** Max request body on the HTTPS API. */
  bodyLimitBytes: number;
  /** Admin API bearer token; default: LEAFGATE_ADMIN_TOKEN, else `<dataDir>/admin-token`. */
  adminToken?: string;
  /** Azure IoT Hub registry connector; off when absent. */
  iotHub?: {
    connectionString: string;
    /** selfSigned (thumbprints per device, default) or certificateAuthority (hub trusts our device CA). */
    authentication: 'selfSigned' | 'certificateAuthority';
    /** IoT Hub id of a gateway's edge device; `{gatewayId}` is replaced. */
    edgeDeviceId: string;
    /** The hub's tier (F1, B1, B2, B3, S1, S2, S3; default S1) and units (default 1): they set the registry quota. */
    tier: HubTier;
    units: number;
    /**
     * Identity registry operations per minute leafgate allows itself; default the tier's
     * quota (100/min/unit for F1, B1, S1, B2, S2; 5,000/min/unit for B3, S3) times units.
     */
    registryOperationsPerMinute: number;
    /** Per-device retry: failed attempts before a row is parked (sync-failed), first back-off, cap. */
    sync: SyncRetryConfig;
    /** Tests only: a local hub stand-in. */
    localEndpoint?: { host: string; port: number; ca: string };
  };
  /** Azure DPS connector; off when absent. */
  dps?: {
    connectionString: string;
    /** individual: one enrollment per device; group: one enrollment group on the device CA. */
    mode: 'individual' | 'group';
    iotHubHostName?: string;
    /** DPS service units (default 1). */
    units: number;
    /** DPS service operations per minute leafgate allows itself; default 1,000/min per unit. */
    operationsPerMinute: number;
    sync: SyncRetryConfig;
    /** Tests only: a local DPS stand-in. */
    localEndpoint?: { host: string; port: number; ca: string };
  };
  /** Group used when a device names none. */
  defaultGroup: string;
  policies: Record<string, DevicePolicy>;
}

export type HubTier = 'F1' | 'B1' | 'B2' | 'B3' | 'S1' | 'S2' | 'S3';

export interface SyncRetryConfig {
  /** Failed attempts of one device before it is parked as sync-failed (default 10). */
  maxAttempts: number;
  /** First back-off of a failing device, doubled per attempt (default 5000 ms). */
  retryBaseMs: number;
  /** Cap of that back-off (default 3600000 ms = 1 h). */
  retryMaxMs: number;
}

/**
 * Identity registry operations (create, retrieve, list, update, delete) per minute per unit,
 * "IoT Hub quotas and throttling" (learn.microsoft.com/azure/iot-hub/iot-hub-devguide-quotas-throttling):
 * 1.67/s/unit (100/min/unit) on Free, B1, S1, B2, S2; 83.33/s/unit (5,000/min/unit) on B3, S3.
 */
export const HUB_REGISTRY_OPS_PER_MINUTE_PER_UNIT: Readonly<Record<HubTier, number>> = { F1: 100, B1: 100, S1: 100, B2: 100, S2: 100, B3: 5000, S3: 5000 };
/** DPS: 1,000 operations/min per service unit; every service API call is one operation (Azure docs, includes/iot-dps-limits.md). */
export const DPS_OPS_PER_MINUTE_PER_UNIT = 1000;

type SyncRetryInput = Partial<SyncRetryConfig>;

export type AuthorityConfigInput = Partial<Omit<AuthorityConfig, 'policies' | 'listen' | 'gatewaySubCa' | 'iotHub' | 'dps'>> & {
  /** Older name of `database` (a SQLite file). */
  databaseFile?: string;
  dps?: Partial<Omit<NonNullable<AuthorityConfig['dps']>, 'sync'>> & { connectionString: string; sync?: SyncRetryInput };
  iotHub?: Partial<Omit<NonNullable<AuthorityConfig['iotHub']>, 'sync'>> & { connectionString: string; sync?: SyncRetryInput };
  gatewaySubCa?: Partial<AuthorityConfig['gatewaySubCa']>;
  listen?: Partial<AuthorityConfig['listen']>;
  policies?: Record<string, Partial<DevicePolicy> & { manufacturerCAFiles?: string[] }>;
};

export function resolveAuthorityConfig(input: AuthorityConfigInput, env: NodeJS.ProcessEnv = process.env): Readonly<AuthorityConfig> {
  const dataDir = resolve(input.dataDir ?? env.LEAFGATE_AUTHORITY_DATA ?? '.leafgate/authority');
  const policies: Record<string, DevicePolicy> = {};
  for (const [name, raw] of Object.entries(input.policies ?? { default: {} })) {
    const { manufacturerCAFiles, ...rest } = raw;
    const p = mergePolicy(DEFAULT_POLICY, rest);
    if (manufacturerCAFiles?.length) p.pkiSignature.manufacturerCAs = [...p.pkiSignature.manufacturerCAs, ...manufacturerCAFiles.map((f) => readFileSync(f, 'utf8'))];
    validatePolicy(name, p);
    policies[name] = p;
  }
  const cfg: AuthorityConfig = {
    dataDir,
    caPassphrase: input.caPassphrase ?? env.LEAFGATE_CA_PASSPHRASE ?? '',
    listen: { host: input.listen?.host ?? env.LEAFGATE_AUTHORITY_HOST ?? '0.0.0.0', port: input.listen?.port ?? Number(env.LEAFGATE_AUTHORITY_PORT ?? 8443) },
    hostnames: input.hostnames ?? ['localhost', '127.0.0.1', '::1'],
    organization: input.organization ?? 'leafgate',
    crlBaseUrl: input.crlBaseUrl ?? env.LEAFGATE_CRL_BASE_URL,
    database: input.database ?? env.LEAFGATE_DATABASE_URL ?? input.databaseFile ?? join(dataDir, 'authority.db'),
    databaseFsync: input.databaseFsync ?? true,
    challengeTtlSeconds: input.challengeTtlSeconds ?? 120,
    csrDeadlineSeconds: input.csrDeadlineSeconds ?? 600,
    gatewayCertDays: input.gatewayCertDays ?? 90,
    gatewaySubCa: { validityDays: input.gatewaySubCa?.validityDays ?? 90, permittedDns: input.gatewaySubCa?.permittedDns ?? ['edgehub'] },
    bodyLimitBytes: input.bodyLimitBytes ?? 64 * 1024,
    crlValidityHours: input.crlValidityHours ?? 24,
    renewalScanSeconds: input.renewalScanSeconds ?? 300,
    defaultGroup: input.defaultGroup ?? 'default',
    adminToken: input.adminToken ?? env.LEAFGATE_ADMIN_TOKEN,
    ...resolveAzureConfig(input, env),
    policies,
  };
  if (!cfg.policies[cfg.defaultGroup]) throw new LeafgateError('internal', `defaultGroup ${cfg.defaultGroup} has no policy`);
  if (typeof cfg.database !== 'string' || !cfg.database) throw new LeafgateError('internal', 'database must be a file path or a postgres:// URL');
  if (isPostgresUrl(cfg.database)) pgConfig(cfg.database); // validates it (scheme, schema name) without connecting
  else if (/^[a-z][a-z0-9+.-]*:\/\//i.test(cfg.database)) throw new LeafgateError('internal', 'database: only postgres:// URLs or SQLite file paths are supported');
  if (typeof cfg.databaseFsync !== 'boolean') throw new LeafgateError('internal', 'databaseFsync must be true or false');
  if (cfg.crlBaseUrl !== undefined && !/^https?:\/\/[^\s/?#]+(\/[^\s?#]*)?$/.test(cfg.crlBaseUrl)) throw new LeafgateError('internal', 'crlBaseUrl must be an http(s) URL without query');
  if (!Number.isInteger(cfg.listen.port) || cfg.listen.port < 0 || cfg.listen.port > 65535) throw new LeafgateError('internal', 'listen.port is invalid');
  return Object.freeze(cfg);
}

/**
 * The iotHub and dps sections: defaults, then validation. Unknown keys and values are refused
 * with the key named (a typo such as `authentication: "x509"` must not start a connector that
 * fails on every device). Kept in one function so that it moves as a unit.
 */
export function resolveAzureConfig(input: AuthorityConfigInput, env: NodeJS.ProcessEnv = process.env): Pick<AuthorityConfig, 'iotHub' | 'dps'> {
  const fail = (key: string, why: string): never => {
    throw new LeafgateError('internal', `config ${key}: ${why}`);
  };
  const section = (name: string, v: unknown, keys: string[]): Record<string, any> => {
    if (v === undefined) return {};
    if (typeof v !== 'object' || v === null || Array.isArray(v)) fail(name, 'must be an object');
    for (const k of Object.keys(v as object)) if (!keys.includes(k)) fail(`${name}.${k}`, `unknown key (known: ${keys.join(', ')})`);
    return v as Record<string, any>;
  };
  const oneOf = <T extends string>(key: string, v: unknown, allowed: readonly T[], dflt: T): T => {
    if (v === undefined) return dflt;
    if (!allowed.includes(v as T)) fail(key, `${JSON.stringify(v)} is not one of ${allowed.join(', ')}`);
    return v as T;
  };
  const positiveInt = (key: string, v: unknown, dflt: number): number => {
    if (v === undefined) return dflt;
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0) fail(key, `${JSON.stringify(v)} must be a positive integer`);
    return v as number;
  };
  const str = (key: string, v: unknown, dflt?: string): string | undefined => {
    if (v === undefined) return dflt;
    if (typeof v !== 'string' || !v) fail(key, 'must be a non-empty string');
    return v as string;
  };
  const endpoint = (key: string, v: unknown) => {
    if (v === undefined) return undefined;
    const e = section(key, v, ['host', 'port', 'ca']);
    str(`${key}.host`, e.host);
    str(`${key}.ca`, e.ca);
    if (!Number.isInteger(e.port) || e.port <= 0 || e.port > 65535) fail(`${key}.port`, 'must be a port number');
    return e as { host: string; port: number; ca: string };
  };
  const sync = (key: string, v: unknown): SyncRetryConfig => {
    const s = section(key, v, ['maxAttempts', 'retryBaseMs', 'retryMaxMs']);
    return { maxAttempts: positiveInt(`${key}.maxAttempts`, s.maxAttempts, 10), retryBaseMs: positiveInt(`${key}.retryBaseMs`, s.retryBaseMs, 5000), retryMaxMs: positiveInt(`${key}.retryMaxMs`, s.retryMaxMs, 3_600_000) };
  };

  const hubIn = section('iotHub', input.iotHub, ['connectionString', 'authentication', 'edgeDeviceId', 'tier', 'units', 'registryOperationsPerMinute', 'sync', 'localEndpoint']);
  const hubCs = str('iotHub.connectionString', hubIn.connectionString, env.LEAFGATE_IOTHUB_CONNECTION_STRING || undefined);
  let iotHub: AuthorityConfig['iotHub'];
  if (hubCs) {
    const tier = oneOf<HubTier>('iotHub.tier', hubIn.tier, ['F1', 'B1', 'B2', 'B3', 'S1', 'S2', 'S3'], 'S1');
    const units = positiveInt('iotHub.units', hubIn.units, 1);
    iotHub = {
      connectionString: hubCs,
      authentication: oneOf('iotHub.authentication', hubIn.authentication, ['selfSigned', 'certificateAuthority'] as const, 'selfSigned'),
      edgeDeviceId: str('iotHub.edgeDeviceId', hubIn.edgeDeviceId, '{gatewayId}')!,
      tier,
      units,
      registryOperationsPerMinute: positiveInt('iotHub.registryOperationsPerMinute', hubIn.registryOperationsPerMinute, HUB_REGISTRY_OPS_PER_MINUTE_PER_UNIT[tier] * units),
      sync: sync('iotHub.sync', hubIn.sync),
      localEndpoint: endpoint('iotHub.localEndpoint', hubIn.localEndpoint),
    };
  }
  const dpsIn = section('dps', input.dps, ['connectionString', 'mode', 'iotHubHostName', 'units', 'operationsPerMinute', 'sync', 'localEndpoint']);
  const dpsCs = str('dps.connectionString', dpsIn.connectionString, env.LEAFGATE_DPS_CONNECTION_STRING || undefined);
  let dps: AuthorityConfig['dps'];
  if (dpsCs) {
    const units = positiveInt('dps.units', dpsIn.units, 1);
    dps = {
      connectionString: dpsCs,
      mode: oneOf('dps.mode', dpsIn.mode, ['individual', 'group'] as const, 'individual'),
      iotHubHostName: str('dps.iotHubHostName', dpsIn.iotHubHostName),
      units,
      operationsPerMinute: positiveInt('dps.operationsPerMinute', dpsIn.operationsPerMinute, DPS_OPS_PER_MINUTE_PER_UNIT * units),
      sync: sync('dps.sync', dpsIn.sync),
      localEndpoint: endpoint('dps.localEndpoint', dpsIn.localEndpoint),
    };
  }
  return { iotHub, dps };
}

export function loadAuthorityConfigFile(path: string): AuthorityConfigInput {
  try {
    return JSON.parse(readFileSync(path, 'utf8')) as AuthorityConfigInput;
  } catch (err) {
    throw new LeafgateError('internal', `cannot read config ${path}: ${(err as Error).message}`, { cause: err });
  }
}
