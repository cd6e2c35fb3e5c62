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
    /** Tests and the demo only: a local hub stand-in. */
    localEndpoint?: { host: string; port: number; ca: string };
  };
  /** Azure DPS connector; off when absent. */
  dps?: {
    connectionString: string;
    /** individual: one enrollment per device; group: one enrollment group on the device CA. */
    mode: 'individual' | 'group';
    iotHubHostName?: string;
    /** Tests only: a local DPS stand-in. */
    localEndpoint?: { host: string; port: number; ca: string };
  };
  /** Group used when a device names none. */
  defaultGroup: string;
  policies: Record<string, DevicePolicy>;
  /** The operator dashboard (authority/dashboard/); README "The dashboard". */
  dashboard: DashboardConfig;
}

export interface DashboardConfig {
  /** Default true. Env: LEAFGATE_DASHBOARD_ENABLED=false turns it off. */
  enabled: boolean;
  /** Its own HTTPS port (no client-certificate request); default: the API's listener under /dashboard. */
  listen?: { host: string; port: number };
  /**
   * Reverse-proxy mode: a request carrying this header (e.g. X-Forwarded-User) is logged in as
   * its value. Only honoured when set; only set it when the proxy strips the header from
   * clients and nothing else can reach the dashboard.
   */
  trustedHeader?: string;
  /** The origin POSTs must come from (e.g. https://pki.example.com behind a proxy); default https://{Host header}. */
  publicOrigin?: string;
  /** Absolute lifetime of a session, and how long it survives unused. */
  sessionMinutes: number;
  idleMinutes: number;
  /** "Expiring" in the overview and the device filter: within this many days. */
  expiringDays: number;
}

export type AuthorityConfigInput = Partial<Omit<AuthorityConfig, 'policies' | 'listen' | 'gatewaySubCa' | 'iotHub' | 'dps' | 'dashboard'>> & {
  dashboard?: Partial<DashboardConfig>;
  /** Older name of `database` (a SQLite file). */
  databaseFile?: string;
  dps?: Partial<NonNullable<AuthorityConfig['dps']>> & { connectionString: string };
  iotHub?: Partial<NonNullable<AuthorityConfig['iotHub']>> & { connectionString: string };
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
    iotHub: input.iotHub?.connectionString ?? env.LEAFGATE_IOTHUB_CONNECTION_STRING
      ? {
          connectionString: input.iotHub?.connectionString ?? env.LEAFGATE_IOTHUB_CONNECTION_STRING!,
          authentication: input.iotHub?.authentication ?? 'selfSigned',
          edgeDeviceId: input.iotHub?.edgeDeviceId ?? '{gatewayId}',
          localEndpoint: input.iotHub?.localEndpoint,
        }
      : undefined,
    dps: input.dps?.connectionString ?? env.LEAFGATE_DPS_CONNECTION_STRING
      ? {
          connectionString: input.dps?.connectionString ?? env.LEAFGATE_DPS_CONNECTION_STRING!,
          mode: input.dps?.mode ?? 'individual',
          iotHubHostName: input.dps?.iotHubHostName,
          localEndpoint: input.dps?.localEndpoint,
        }
      : undefined,
    policies,
    dashboard: {
      enabled: input.dashboard?.enabled ?? !/^(false|0|off|no)$/i.test(env.LEAFGATE_DASHBOARD_ENABLED ?? ''),
      listen: input.dashboard?.listen,
      trustedHeader: input.dashboard?.trustedHeader || undefined,
      publicOrigin: input.dashboard?.publicOrigin,
      sessionMinutes: input.dashboard?.sessionMinutes ?? 480,
      idleMinutes: input.dashboard?.idleMinutes ?? 30,
      expiringDays: input.dashboard?.expiringDays ?? 30,
    },
  };
  const d = cfg.dashboard;
  if (typeof d.enabled !== 'boolean') throw new LeafgateError('internal', 'dashboard.enabled must be true or false');
  if (d.trustedHeader !== undefined && !/^[A-Za-z0-9-]{1,64}$/.test(d.trustedHeader)) throw new LeafgateError('internal', 'dashboard.trustedHeader must be a header name');
  if (d.publicOrigin !== undefined && !/^https:\/\/[^\s/?#]+$/.test(d.publicOrigin)) throw new LeafgateError('internal', 'dashboard.publicOrigin must be an https origin (scheme, host, port; no path)');
  if (d.listen && (!Number.isInteger(d.listen.port) || d.listen.port < 0 || d.listen.port > 65535 || typeof d.listen.host !== 'string')) throw new LeafgateError('internal', 'dashboard.listen needs host and port');
  for (const k of ['sessionMinutes', 'idleMinutes', 'expiringDays'] as const) if (!Number.isInteger(d[k]) || d[k] < 1) throw new LeafgateError('internal', `dashboard.${k} must be a positive integer`);
  if (!cfg.policies[cfg.defaultGroup]) throw new LeafgateError('internal', `defaultGroup ${cfg.defaultGroup} has no policy`);
  if (typeof cfg.database !== 'string' || !cfg.database) throw new LeafgateError('internal', 'database must be a file path or a postgres:// URL');
  if (isPostgresUrl(cfg.database)) pgConfig(cfg.database); // validates it (scheme, schema name) without connecting
  else if (/^[a-z][a-z0-9+.-]*:\/\//i.test(cfg.database)) throw new LeafgateError('internal', 'database: only postgres:// URLs or SQLite file paths are supported');
  if (typeof cfg.databaseFsync !== 'boolean') throw new LeafgateError('internal', 'databaseFsync must be true or false');
  if (cfg.crlBaseUrl !== undefined && !/^https?:\/\/[^\s/?#]+(\/[^\s?#]*)?$/.test(cfg.crlBaseUrl)) throw new LeafgateError('internal', 'crlBaseUrl must be an http(s) URL without query');
  if (!Number.isInteger(cfg.listen.port) || cfg.listen.port < 0 || cfg.listen.port > 65535) throw new LeafgateError('internal', 'listen.port is invalid');
  return Object.freeze(cfg);
}

export function loadAuthorityConfigFile(path: string): AuthorityConfigInput {
  try {
    return JSON.parse(readFileSync(path, 'utf8')) as AuthorityConfigInput;
  } catch (err) {
    throw new LeafgateError('internal', `cannot read config ${path}: ${(err as Error).message}`, { cause: err });
  }
}
