/**
 * Authority configuration: one typed object from defaults, a JSON file and the environment,
 * validated at start-up and frozen. Defaults are documented in README (Configuration).
 */
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { checkConfig, configError, readJsonConfig, type Schema } from '../config-schema/index.ts';
import { DEFAULT_POLICY, POLICY_OVERRIDE_SCHEMA, mergePolicy, validatePolicy, type DevicePolicy } from './policy/index.ts';
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
}

export type AuthorityConfigInput = Partial<Omit<AuthorityConfig, 'policies' | 'listen' | 'gatewaySubCa' | 'iotHub' | 'dps'>> & {
  /** Older name of `database` (a SQLite file). */
  databaseFile?: string;
  dps?: Partial<NonNullable<AuthorityConfig['dps']>> & { connectionString: string };
  iotHub?: Partial<NonNullable<AuthorityConfig['iotHub']>> & { connectionString: string };
  gatewaySubCa?: Partial<AuthorityConfig['gatewaySubCa']>;
  listen?: Partial<AuthorityConfig['listen']>;
  policies?: Record<string, Partial<DevicePolicy> & { manufacturerCAFiles?: string[] }>;
};

const int = (description: string, min: number, max: number, def?: number): Schema => ({ type: 'integer', minimum: min, maximum: max, description, ...(def !== undefined ? { default: def } : {}) });
const localEndpoint: Schema = {
  type: 'object', additionalProperties: false, required: ['host', 'port', 'ca'],
  properties: {
    host: { type: 'string', minLength: 1, description: 'Tests and the demo only: host of a local stand-in.' },
    port: int('Tests and the demo only: port of a local stand-in.', 1, 65535),
    ca: { type: 'string', minLength: 1, description: 'Tests and the demo only: PEM of the stand-in\'s CA.' },
  },
};

/** What an authority config file may hold (every key optional; unknown keys refused). */
export const AUTHORITY_CONFIG_SCHEMA: Schema = {
  type: 'object',
  additionalProperties: false,
  properties: {
    dataDir: { type: 'string', minLength: 1, default: '.leafgate/authority', env: 'LEAFGATE_AUTHORITY_DATA', description: 'CA material (SQLite mode), the admin token and the SQLite file.' },
    caPassphrase: { type: 'string', secret: true, env: 'LEAFGATE_CA_PASSPHRASE', description: 'Encrypts the CA private keys at rest (at least 12 characters). Prefer the environment variable to the file.' },
    listen: {
      type: 'object', additionalProperties: false,
      properties: {
        host: { type: 'string', minLength: 1, default: '0.0.0.0', env: 'LEAFGATE_AUTHORITY_HOST', description: 'HTTPS listen address.' },
        port: { ...int('HTTPS port (0: any free port).', 0, 65535, 8443), env: 'LEAFGATE_AUTHORITY_PORT' },
      },
    },
    hostnames: { type: 'array', minItems: 1, items: { type: 'string', minLength: 1 }, default: ['localhost', '127.0.0.1', '::1'], description: 'Names (DNS or IP) in the authority\'s TLS certificate.' },
    organization: { type: 'string', minLength: 1, default: 'leafgate', description: 'Organization in CA names.' },
    crlBaseUrl: {
      type: 'string', pattern: '^https?://[^\\s/?#]+(/[^\\s?#]*)?$', expected: 'an http(s) URL without query or fragment', env: 'LEAFGATE_CRL_BASE_URL',
      description: 'Base URL of the CRLs ({base}/v1/crl/{ca}.crl), written into issued certificates as their CRL distribution point. Default: https://{first hostname}:{listening port}.',
    },
    database: { type: 'string', minLength: 1, env: 'LEAFGATE_DATABASE_URL', description: 'A SQLite file path (default <dataDir>/authority.db) or a postgres:// URL shared by several authority nodes (?schema=NAME selects a schema).' },
    databaseFile: { type: 'string', minLength: 1, description: 'Older name of database (a SQLite file).' },
    databaseFsync: { type: 'boolean', default: true, description: 'SQLite: acknowledge a transaction only once the WAL is fsynced (false: synchronous=NORMAL alone).' },
    challengeTtlSeconds: int('Lifetime of an authentication challenge (seconds).', 1, 3600, 120),
    csrDeadlineSeconds: int('Time a device has after authenticating to send its CSR (seconds).', 1, 86_400, 600),
    gatewayCertDays: int('Lifetime of a gateway certificate (days).', 1, 825, 90),
    gatewaySubCa: {
      type: 'object', additionalProperties: false,
      properties: {
        validityDays: int('Lifetime of a gateway Sub-CA (IoT Edge CA), days.', 1, 3650, 90),
        permittedDns: { type: 'array', items: { type: 'string', minLength: 1 }, default: ['edgehub'], description: 'dNSName name constraints of gateway Sub-CAs ({gatewayId} replaced).' },
      },
    },
    crlValidityHours: int('Lifetime of a CRL (nextUpdate - thisUpdate); reissued at half of it.', 1, 8760, 24),
    renewalScanSeconds: int('How often due renewals are announced to gateways (seconds).', 1, 86_400, 300),
    bodyLimitBytes: int('Max request body on the HTTPS API (bytes).', 1024, 16 * 1024 * 1024, 64 * 1024),
    adminToken: { type: 'string', secret: true, minLength: 16, env: 'LEAFGATE_ADMIN_TOKEN', description: 'Admin API bearer token; default: the environment, else <dataDir>/admin-token.' },
    iotHub: {
      type: 'object', additionalProperties: false,
      properties: {
        connectionString: { type: 'string', secret: true, pattern: 'HostName=', expected: 'an IoT Hub connection string (HostName=...;SharedAccessKeyName=...;SharedAccessKey=...)', env: 'LEAFGATE_IOTHUB_CONNECTION_STRING', description: 'Azure IoT Hub registry connector (service connection string); off when absent.' },
        authentication: { enum: ['selfSigned', 'certificateAuthority'], default: 'selfSigned', description: 'selfSigned (thumbprints per device) or certificateAuthority (the hub trusts our device CA).' },
        edgeDeviceId: { type: 'string', minLength: 1, default: '{gatewayId}', description: 'IoT Hub id of a gateway\'s edge device; {gatewayId} is replaced.' },
        localEndpoint,
      },
    },
    dps: {
      type: 'object', additionalProperties: false,
      properties: {
        connectionString: { type: 'string', secret: true, pattern: 'HostName=', expected: 'a DPS service connection string (HostName=...;SharedAccessKeyName=...;SharedAccessKey=...)', env: 'LEAFGATE_DPS_CONNECTION_STRING', description: 'Azure DPS connector; off when absent.' },
        mode: { enum: ['individual', 'group'], default: 'individual', description: 'individual: one enrollment per device; group: one enrollment group on the device CA.' },
        iotHubHostName: { type: 'string', minLength: 1, description: 'IoT Hub that DPS assigns devices to.' },
        localEndpoint,
      },
    },
    defaultGroup: { type: 'string', minLength: 1, default: 'default', description: 'Group used when a device names none (must have a policy).' },
    policies: { type: 'object', additionalProperties: POLICY_OVERRIDE_SCHEMA, description: 'Device policies by group, each an override of the default policy.' },
  },
};

const envNumber = (v: string | undefined) => (v === undefined ? undefined : /^-?\d+$/.test(v.trim()) ? Number(v) : v);

export function resolveAuthorityConfig(input: AuthorityConfigInput, env: NodeJS.ProcessEnv = process.env): Readonly<AuthorityConfig> {
  checkConfig(AUTHORITY_CONFIG_SCHEMA, input, 'authority config');
  const dataDir = resolve(input.dataDir ?? env.LEAFGATE_AUTHORITY_DATA ?? '.leafgate/authority');
  const policies: Record<string, DevicePolicy> = {};
  for (const [name, raw] of Object.entries(input.policies ?? { default: {} })) {
    const { manufacturerCAFiles, ...rest } = raw;
    const p = mergePolicy(DEFAULT_POLICY, rest);
    const read = (f: string) => {
      try {
        return readFileSync(f, 'utf8');
      } catch (err) {
        return configError(`policy ${name}`, 'manufacturerCAFiles', `cannot read ${f}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
      }
    };
    if (manufacturerCAFiles?.length) p.pkiSignature.manufacturerCAs = [...p.pkiSignature.manufacturerCAs, ...manufacturerCAFiles.map(read)];
    validatePolicy(name, p);
    policies[name] = p;
  }
  const cfg: AuthorityConfig = {
    dataDir,
    caPassphrase: input.caPassphrase ?? env.LEAFGATE_CA_PASSPHRASE ?? '',
    listen: { host: input.listen?.host ?? env.LEAFGATE_AUTHORITY_HOST ?? '0.0.0.0', port: input.listen?.port ?? (envNumber(env.LEAFGATE_AUTHORITY_PORT) as number) ?? 8443 },
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
  // Again with the environment applied (policies were checked above): a bad variable is named like a bad key.
  checkConfig(AUTHORITY_CONFIG_SCHEMA, { ...cfg, policies: {}, iotHub: stripUndefined(cfg.iotHub), dps: stripUndefined(cfg.dps), crlBaseUrl: cfg.crlBaseUrl, adminToken: cfg.adminToken }, 'authority config (with the environment)');
  const source = 'authority config';
  if (!cfg.policies[cfg.defaultGroup]) configError(source, 'defaultGroup', `must name a group of policies (${Object.keys(cfg.policies).join(', ')}), got ${JSON.stringify(cfg.defaultGroup)}`);
  try {
    if (isPostgresUrl(cfg.database)) pgConfig(cfg.database); // validates it (scheme, schema name) without connecting
  } catch (err) {
    configError(source, 'database', (err as Error).message);
  }
  if (!isPostgresUrl(cfg.database) && /^[a-z][a-z0-9+.-]*:\/\//i.test(cfg.database)) configError(source, 'database', 'must be a postgres:// URL or a SQLite file path');
  return Object.freeze(cfg);
}

function stripUndefined<T extends object>(o: T | undefined): T | undefined {
  return o && (Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T);
}

/** Reads a JSON config file; its content is checked by resolveAuthorityConfig. */
export function loadAuthorityConfigFile(path: string): AuthorityConfigInput {
  return readJsonConfig(path) as AuthorityConfigInput;
}
