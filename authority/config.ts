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
import { DEFAULT_KEY_LABELS, defaultPkcs11Workers, type Pkcs11KeysConfig } from './ca/pkcs11-ca-key.ts';
import type { CaName } from './ca/index.ts';

/**
 * Where the CA keys live. file: encrypted PKCS#8 files in `<dataDir>/ca` (or ca_material rows
 * with PostgreSQL), decrypted with caPassphrase. pkcs11: keys in a PKCS#11 token (an HSM),
 * certificates in `<dataDir>/ca`. keyvault: Azure Key Vault keys (its own connector).
 */
export type CaKeysConfig = { store: 'file' } | Pkcs11KeysConfig | ({ store: 'keyvault' } & Record<string, unknown>);
export type CaKeysConfigInput = { store?: 'file' | 'pkcs11' | 'keyvault'; keyLabels?: Partial<Record<CaName, string>> } & Record<string, unknown>;

export interface AuthorityConfig {
  /** CA material (SQLite mode), the admin token and the SQLite file live here. */
  dataDir: string;
  /** Encrypts the CA private keys at rest (caKeys.store "file"). Env: LEAFGATE_CA_PASSPHRASE. */
  caPassphrase: string;
  /** Where the CA keys live: file (default), pkcs11 (an HSM), keyvault. */
  caKeys: CaKeysConfig;
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
}

export type AuthorityConfigInput = Partial<Omit<AuthorityConfig, 'policies' | 'listen' | 'gatewaySubCa' | 'iotHub' | 'dps' | 'caKeys'>> & {
  caKeys?: CaKeysConfigInput;
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
    caKeys: resolveCaKeys(input.caKeys),
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
 * `caKeys`: defaults and validation in one place. The PIN is never part of the configuration:
 * only the file or the environment variable it is read from at start.
 */
export function resolveCaKeys(input: CaKeysConfigInput | undefined): CaKeysConfig {
  const store = input?.store ?? 'file';
  const bad = (what: string) => new LeafgateError('internal', `caKeys: ${what}`);
  if (store === 'file') return { store };
  if (store === 'keyvault') return { ...input, store } as CaKeysConfig;
  if (store !== 'pkcs11') throw bad(`store must be "file", "pkcs11" or "keyvault", not ${JSON.stringify(store)}`);
  const i = input as Partial<Pkcs11KeysConfig> & { pin?: unknown };
  if ('pin' in i) throw bad('a PIN is never written in the configuration: use pinFile or pinEnv');
  const str = (v: unknown, name: string, required: boolean) => {
    if (v === undefined && !required) return undefined;
    if (typeof v !== 'string' || !v) throw bad(`${name} must be a non-empty string`);
    return v;
  };
  const keyLabels = { ...DEFAULT_KEY_LABELS, ...(i.keyLabels ?? {}) };
  for (const [name, label] of Object.entries(keyLabels)) str(label, `keyLabels.${name}`, true);
  if (new Set(Object.values(keyLabels)).size !== Object.keys(keyLabels).length) throw bad('keyLabels must differ from one CA to another');
  const keyType = i.keyType ?? 'ec-256';
  if (!['ec-256', 'ec-384', 'rsa-3072'].includes(keyType)) throw bad('keyType must be ec-256, ec-384 or rsa-3072');
  const workers = i.workers ?? defaultPkcs11Workers();
  if (!Number.isInteger(workers) || workers < 1 || workers > 16) throw bad('workers must be an integer from 1 to 16');
  return {
    store, module: str(i.module, 'module', true)!, tokenLabel: str(i.tokenLabel, 'tokenLabel', true)!, pinFile: str(i.pinFile, 'pinFile', false),
    pinEnv: str(i.pinEnv, 'pinEnv', false), keyLabels, keyType, workers,
  };
}

export function loadAuthorityConfigFile(path: string): AuthorityConfigInput {
  try {
    return JSON.parse(readFileSync(path, 'utf8')) as AuthorityConfigInput;
  } catch (err) {
    throw new LeafgateError('internal', `cannot read config ${path}: ${(err as Error).message}`, { cause: err });
  }
}
