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
import { DEFAULT_KEY_LABELS, defaultPkcs11Workers, type Pkcs11KeysConfig } from './ca/pkcs11-ca-key.ts';
import type { CaName } from './ca/index.ts';
import { resolveKeyVaultStoreConfig, type KeyVaultStoreConfig, type KeyVaultStoreConfigInput } from './ca/keyvault-key.ts';
import { EST_DEFAULTS, type EstCaConfig } from './ca/est-ca.ts';
import { GATEWAY_AUTHORITY_TIMEOUT_MS } from '../protocol/index.ts';

/**
 * Where the CA keys live. file: encrypted PKCS#8 files in `<dataDir>/ca` (or ca_material rows
 * with PostgreSQL), decrypted with caPassphrase. pkcs11: keys in a PKCS#11 token (an HSM),
 * certificates in `<dataDir>/ca`. keyvault: the device CA's key in Azure Key Vault, the other CA
 * keys encrypted files in `<dataDir>/ca` (with PostgreSQL: ca_material rows, the device CA's with an empty key).
 */
export type CaKeysConfig = { store: 'file' } | Pkcs11KeysConfig | KeyVaultKeysConfig;
/** caKeys.store "keyvault": the device CA key in Key Vault, root/infra-ca/edge-issuer encrypted files in <dataDir>/ca. */
export type KeyVaultKeysConfig = { store: 'keyvault'; keyvault: KeyVaultStoreConfig };
export type CaKeysConfigInput = { store?: 'file' | 'pkcs11' | 'keyvault'; keyLabels?: Partial<Record<CaName, string>>; keyvault?: KeyVaultStoreConfigInput } & Record<string, unknown>;

export interface AuthorityConfig {
  /** CA material (SQLite mode), the admin token and the SQLite file live here. */
  dataDir: string;
  /** Encrypts the CA private keys at rest (caKeys.store "file"). Env: LEAFGATE_CA_PASSPHRASE. */
  caPassphrase: string;
  /** Where the CA keys live: file (default), pkcs11 (an HSM), keyvault. */
  caKeys: CaKeysConfig;
  /**
   * Who signs device certificates: absent, leafgate's own device CA; `{type: "est", ...}`, an
   * external (enterprise) CA over EST (RFC 7030) with leafgate as its registration authority
   * (authority/ca/est-ca.ts; README "External CA over EST").
   */
  deviceIssuer?: EstCaConfig;
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

export type AuthorityConfigInput = Partial<Omit<AuthorityConfig, 'policies' | 'listen' | 'gatewaySubCa' | 'iotHub' | 'dps' | 'caKeys' | 'dashboard' | 'deviceIssuer'>> & {
  caKeys?: CaKeysConfigInput;
  deviceIssuer?: Partial<Omit<EstCaConfig, 'type'>> & { type: 'est' };
  dashboard?: Partial<DashboardConfig>;
  /** Older name of `database` (a SQLite file). */
  databaseFile?: string;
  dps?: Partial<Omit<NonNullable<AuthorityConfig['dps']>, 'sync'>> & { connectionString: string; sync?: SyncRetryInput };
  iotHub?: Partial<Omit<NonNullable<AuthorityConfig['iotHub']>, 'sync'>> & { connectionString: string; sync?: SyncRetryInput };
  gatewaySubCa?: Partial<AuthorityConfig['gatewaySubCa']>;
  listen?: Partial<AuthorityConfig['listen']>;
  policies?: Record<string, Partial<DevicePolicy> & { manufacturerCAFiles?: string[] }>;
};

const int = (description: string, min: number, max: number, def?: number): Schema => ({ type: 'integer', minimum: min, maximum: max, description, ...(def !== undefined ? { default: def } : {}) });
/** Per-device retry of failed registry writes, the same for IoT Hub and DPS. */
const syncRetry: Schema = {
  type: 'object', additionalProperties: false, description: 'Per-device retry of failed registry writes.',
  properties: {
    maxAttempts: int('Attempts before a device is parked as sync-failed.', 1, 1000, 10),
    retryBaseMs: int('First retry delay of a failed device (ms), doubled each attempt.', 1, 86_400_000, 5000),
    retryMaxMs: int('Longest retry delay of a failed device (ms).', 1, 86_400_000, 3_600_000),
  },
};
const localEndpoint: Schema = {
  type: 'object', additionalProperties: false, required: ['host', 'port', 'ca'],
  properties: {
    host: { type: 'string', minLength: 1, description: 'Tests and the demo only: host of a local stand-in.' },
    port: int('Tests and the demo only: port of a local stand-in.', 1, 65535),
    ca: { type: 'string', minLength: 1, description: 'Tests and the demo only: PEM of the stand-in\'s CA.' },
  },
};

/** `caKeys.keyvault` (store "keyvault"): the device CA key in Azure Key Vault; docs/azure.md section 2d. */
const KEYVAULT_SCHEMA: Schema = {
  type: 'object', additionalProperties: false, description: 'The device CA key in Azure Key Vault (caKeys.store "keyvault").',
  properties: {
    vaultUrl: { type: 'string', pattern: '^https://[^/\\s]+/?$', expected: 'https://{vault}.vault.azure.net', env: 'LEAFGATE_KEYVAULT_URL', description: 'The vault (caKeys.store "keyvault"; required).' },
    keyName: { type: 'string', pattern: '^[A-Za-z0-9-]{1,127}$', expected: '1-127 letters, digits and dashes', env: 'LEAFGATE_KEYVAULT_KEY', description: 'The device CA key\'s name in the vault (required).' },
    keyVersion: { type: 'string', pattern: '^[0-9a-f]{32}$', expected: 'a key version (32 hex digits)', description: 'Pin a key version; default: the current version at start (a rotated key then needs a new device CA certificate: authority init).' },
    keyType: { enum: ['ec-256', 'ec-384', 'rsa-3072'], default: 'ec-256', description: 'The key `authority init` creates when the key does not exist (an existing key of EC P-256/P-384 or RSA 2048-4096 is used as it is).' },
    hsm: { type: 'boolean', default: true, description: 'init creates an HSM-protected key (EC-HSM/RSA-HSM, Premium vault); false: a software key (Standard vault).' },
    credential: {
      type: 'object', additionalProperties: false, required: ['kind'], description: 'How the authority signs in to Microsoft Entra ID.',
      properties: {
        kind: { enum: ['managedIdentity', 'clientSecret'], description: 'managedIdentity (on Azure, no secret) or clientSecret (a service principal). Default: clientSecret when AZURE_CLIENT_SECRET is set, else managedIdentity.' },
        clientId: { type: 'string', minLength: 1, description: 'The service principal\'s application id, or a user-assigned managed identity\'s client id (env AZURE_CLIENT_ID).' },
        tenantId: { type: 'string', minLength: 1, description: 'clientSecret: the Entra tenant (env AZURE_TENANT_ID).' },
        clientSecretFile: { type: 'string', minLength: 1, description: 'clientSecret: file holding the client secret (else env AZURE_CLIENT_SECRET); the secret itself is never in the configuration.' },
        authorityHost: { type: 'string', pattern: '^https://[^\\s]+$', expected: 'an https URL', description: 'clientSecret: the Entra authority host of a sovereign cloud (env AZURE_AUTHORITY_HOST; default login.microsoftonline.com).' },
        clientSecret: { not: {}, secret: true, expected: 'absent: a client secret is never written in the configuration; use clientSecretFile or AZURE_CLIENT_SECRET', description: 'Refused: use clientSecretFile or AZURE_CLIENT_SECRET.' },
      },
    },
    signsPer10s: int('Sign calls per 10 s the authority allows itself (default 1,000, half of an HSM vault\'s 2,000).', 1, 100_000),
    maxInFlight: int('Sign calls in flight at once (default 16).', 1, 1024),
    maxWaitMs: int('Longest a signature may wait (queue, throttling, retries) before the request answers authority_unavailable with retryAfterMs (default 10000).', 1, 600_000),
    tlsCaFile: { type: 'string', minLength: 1, description: 'PEM file of the CA certificates trusted for the vault and the token endpoint instead of the system\'s (a TLS-inspecting proxy, Azure Stack Hub, tests).' },
    disableChallengeResourceVerification: { type: 'boolean', default: false, description: 'Only for a vault reached under a name that does not end with its challenge\'s resource domain (a custom private DNS name, tests).' },
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
    caKeys: {
      type: 'object', additionalProperties: true,
      description: 'Where the CA keys live: {"store": "file"} (default: encrypted PKCS#8 in <dataDir>/ca, or ca_material rows with PostgreSQL); {"store": "pkcs11", "module": "/usr/lib/softhsm/libsofthsm2.so", "tokenLabel": "...", "pinFile": "/run/secrets/hsm-pin"} (or pinEnv, default LEAFGATE_PKCS11_PIN; never a PIN here), optional keyLabels (root, device-ca, infra-ca, edge-issuer; default leafgate-<name>), keyType for init (ec-256, ec-384, rsa-3072), workers (signing threads, one token session each); see "CA keys in an HSM"; {"store": "keyvault", "keyvault": {...}}: the device CA key in Azure Key Vault, the other CA keys encrypted files in <dataDir>/ca or ca_material rows with PostgreSQL (docs/azure.md, "The device CA key in Azure Key Vault").',
      properties: { store: { enum: ['file', 'pkcs11', 'keyvault'], default: 'file', description: 'file, pkcs11 or keyvault.' }, keyvault: KEYVAULT_SCHEMA },
    },
    deviceIssuer: {
      type: 'object', additionalProperties: false, required: ['type', 'url', 'serverCaFile', 'caChainFile'],
      description: 'Who signs device certificates. Absent: leafgate\'s own device CA. {"type": "est", ...}: an external (enterprise) CA over EST (RFC 7030), leafgate acting as its registration authority; gateway certificates and Sub-CAs stay on leafgate\'s CA. See "External CA over EST".',
      properties: {
        type: { enum: ['est'], description: 'est: RFC 7030 simpleenroll / simplereenroll.' },
        url: { type: 'string', secret: true, pattern: '^https://[^\\s/?#@]+/?$', expected: 'an https URL of the EST server (scheme, host, port; no user or password: they would be in every log line)', description: 'The EST server; /.well-known/est[/label]/... is appended.' },
        label: { type: 'string', pattern: '^[A-Za-z0-9._~-]{1,64}$', expected: 'an EST CA label (RFC 7030 3.2.2)', description: 'The CA label: /.well-known/est/{label}/simpleenroll.' },
        serverCaFile: { type: 'string', minLength: 1, description: 'PEM trust anchor(s) of the EST server\'s TLS certificate.' },
        caChainFile: { type: 'string', minLength: 1, description: 'PEM chain of the CA that signs device certificates: issuing CA first, root last. Returned certificates must chain to it; gateways and devices get it.' },
        clientCertFile: { type: 'string', minLength: 1, description: 'TLS client certificate (PEM) leafgate authenticates with (with clientKeyFile).' },
        clientKeyFile: { type: 'string', minLength: 1, description: 'Its private key (PEM, unencrypted; keep it mode 0600).' },
        username: { type: 'string', minLength: 1, pattern: '^[^:]*$', expected: 'a user name without a colon', description: 'HTTP Basic user name (the password comes from passwordFile or passwordEnv, never from here).' },
        passwordFile: { type: 'string', minLength: 1, description: 'File whose first line is the HTTP Basic password.' },
        passwordEnv: { type: 'string', pattern: '^[A-Za-z_][A-Za-z0-9_]*$', expected: 'an environment variable name', description: 'Environment variable holding the HTTP Basic password (default LEAFGATE_EST_PASSWORD).' },
        timeoutMs: int('Longest one EST call may take, connection to the last byte of the answer (ms); then the request is retried from the gateway\'s queue.', 100, 600_000, 30_000),
        retryAfterSeconds: int('Retry hint given while the EST server is unreachable or refuses leafgate\'s credentials (seconds); also how long the circuit breaker stays open before one probe.', 1, 86_400, 30),
        answerWithinMs: int('Longest a gateway\'s request waits for the EST call (ms): then it is answered authority_unavailable with retryAfterMs while the call goes on, and the retry gets the stored certificate. At most the gateway\'s request timeout (15 s) minus 1 s.', 100, GATEWAY_AUTHORITY_TIMEOUT_MS - 1000, EST_DEFAULTS.answerWithinMs),
        maxConcurrent: int('EST calls in flight at once per authority node; one more is answered authority_unavailable with retryAfterMs (it waits in the gateway\'s queue).', 1, 1000, 8),
        failureThreshold: int('Consecutive EST failures (no connection, no answer, HTTP 502/503/504) that open the circuit breaker: requests then fail fast for retryAfterSeconds, then one probe.', 1, 1000, 5),
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
    // Hours, possibly fractional (a short-lived CRL: tests use one second).
    crlValidityHours: { type: 'number', exclusiveMinimum: 0, maximum: 8760, default: 24, description: 'Lifetime of a CRL (nextUpdate - thisUpdate), hours; reissued at half of it.' },
    renewalScanSeconds: int('How often due renewals are announced to gateways (seconds).', 1, 86_400, 300),
    bodyLimitBytes: int('Max request body on the HTTPS API (bytes).', 1024, 16 * 1024 * 1024, 64 * 1024),
    adminToken: { type: 'string', secret: true, minLength: 16, env: 'LEAFGATE_ADMIN_TOKEN', description: 'Admin API bearer token; default: the environment, else <dataDir>/admin-token.' },
    iotHub: {
      type: 'object', additionalProperties: false,
      properties: {
        connectionString: { type: 'string', secret: true, pattern: 'HostName=', expected: 'an IoT Hub connection string (HostName=...;SharedAccessKeyName=...;SharedAccessKey=...)', env: 'LEAFGATE_IOTHUB_CONNECTION_STRING', description: 'Azure IoT Hub registry connector (service connection string); off when absent.' },
        authentication: { enum: ['selfSigned', 'certificateAuthority'], default: 'selfSigned', description: 'selfSigned (thumbprints per device) or certificateAuthority (the hub trusts our device CA).' },
        edgeDeviceId: { type: 'string', minLength: 1, default: '{gatewayId}', description: 'IoT Hub id of a gateway\'s edge device; {gatewayId} is replaced.' },
        tier: { enum: ['F1', 'B1', 'B2', 'B3', 'S1', 'S2', 'S3'], default: 'S1', description: 'IoT Hub tier: sets the registry operations quota (100/min/unit up to S2 and B2, 5,000/min/unit on S3 and B3).' },
        units: int('IoT Hub units.', 1, 200, 1),
        registryOperationsPerMinute: { type: 'integer', minimum: 1, description: 'Registry operations per minute leafgate paces itself to (default: the tier\'s quota times units).' },
        sync: syncRetry,
        localEndpoint,
      },
    },
    dps: {
      type: 'object', additionalProperties: false,
      properties: {
        connectionString: { type: 'string', secret: true, pattern: 'HostName=', expected: 'a DPS service connection string (HostName=...;SharedAccessKeyName=...;SharedAccessKey=...)', env: 'LEAFGATE_DPS_CONNECTION_STRING', description: 'Azure DPS connector; off when absent.' },
        mode: { enum: ['individual', 'group'], default: 'individual', description: 'individual: one enrollment per device; group: one enrollment group on the device CA.' },
        iotHubHostName: { type: 'string', minLength: 1, description: 'IoT Hub that DPS assigns devices to.' },
        units: int('DPS units.', 1, 200, 1),
        operationsPerMinute: { type: 'integer', minimum: 1, description: 'DPS operations per minute leafgate paces itself to (default: 1,000 per unit).' },
        sync: syncRetry,
        localEndpoint,
      },
    },
    dashboard: {
      type: 'object', additionalProperties: false, description: 'The operator dashboard (README "The dashboard").',
      properties: {
        enabled: { type: 'boolean', default: true, env: 'LEAFGATE_DASHBOARD_ENABLED', description: 'Serve the dashboard (same credential as the admin API); env: false turns it off.' },
        listen: {
          type: 'object', additionalProperties: false, required: ['host', 'port'], description: 'Its own HTTPS port; default: the API listener under /dashboard.',
          properties: { host: { type: 'string', minLength: 1, description: 'Listen address.' }, port: int('Port.', 0, 65535) },
        },
        trustedHeader: { type: 'string', pattern: '^[A-Za-z0-9-]{1,64}$', expected: 'a header name', description: 'Reverse-proxy mode: the header carrying the logged-in user (only honoured when set).' },
        publicOrigin: { type: 'string', pattern: '^https://[^\\s/?#]+$', expected: 'an https origin (scheme, host, port; no path)', description: 'The origin POSTs must come from; default https://{Host header}.' },
        sessionMinutes: int('Absolute lifetime of a dashboard session (minutes).', 1, 10_080, 480),
        idleMinutes: int('Idle lifetime of a dashboard session (minutes).', 1, 10_080, 30),
        expiringDays: int('"Expiring" in the overview and the device filter: within this many days.', 1, 3650, 30),
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
    caKeys: resolveCaKeys(input.caKeys, env),
    ...(input.deviceIssuer ? { deviceIssuer: resolveDeviceIssuer(input.deviceIssuer) } : {}),
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
    // An empty variable is an unset one (a shell's VAR= ).
    adminToken: input.adminToken ?? (env.LEAFGATE_ADMIN_TOKEN || undefined),
    ...resolveAzureConfig(input, env),
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
  // Again with the environment applied (policies were checked above): a bad variable is named like a bad key.
  checkConfig(AUTHORITY_CONFIG_SCHEMA, { ...cfg, policies: {}, iotHub: stripUndefined(cfg.iotHub), dps: stripUndefined(cfg.dps), crlBaseUrl: cfg.crlBaseUrl, adminToken: cfg.adminToken }, 'authority config (with the environment)');
  const source = 'authority config';
  // A DPS enrollment group is made on leafgate's device CA: certificates of an external CA would never match it.
  if (cfg.deviceIssuer && cfg.dps?.mode === 'group') configError(source, 'dps.mode', 'must be "individual" with deviceIssuer: the enrollment group would name leafgate\'s device CA, not the external CA that signs the devices');
  if (!cfg.policies[cfg.defaultGroup]) configError(source, 'defaultGroup', `must name a group of policies (${Object.keys(cfg.policies).join(', ')}), got ${JSON.stringify(cfg.defaultGroup)}`);
  try {
    if (isPostgresUrl(cfg.database)) pgConfig(cfg.database); // validates it (scheme, schema name) without connecting
  } catch (err) {
    configError(source, 'database', (err as Error).message);
  }
  if (!isPostgresUrl(cfg.database) && /^[a-z][a-z0-9+.-]*:\/\//i.test(cfg.database)) configError(source, 'database', 'must be a postgres:// URL or a SQLite file path');
  return Object.freeze(cfg);
}

/**
 * The iotHub and dps sections: defaults, then validation. Unknown keys and values are refused
 * with the key named (a typo such as `authentication: "x509"` must not start a connector that
 * fails on every device). Kept in one function so that it moves as a unit.
 */
export function resolveAzureConfig(input: AuthorityConfigInput, env: NodeJS.ProcessEnv = process.env): Pick<AuthorityConfig, 'iotHub' | 'dps'> {
  const fail = (key: string, why: string): never => configError('authority config', key, why);
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

/**
 * `caKeys`: defaults and validation in one place. The PIN is never part of the configuration:
 * only the file or the environment variable it is read from at start.
 */
export function resolveCaKeys(input: CaKeysConfigInput | undefined, env: NodeJS.ProcessEnv = process.env): CaKeysConfig {
  const store = input?.store ?? 'file';
  const bad = (what: string): never => configError('authority config', 'caKeys', what);
  if (input?.keyvault !== undefined && store !== 'keyvault') configError('authority config', 'caKeys.keyvault', `is set but caKeys.store is ${JSON.stringify(store)}: add "store": "keyvault" (or remove caKeys.keyvault)`);
  if (store === 'file') return { store };
  if (store === 'keyvault') {
    // Every other key of caKeys belongs to another store (pkcs11's module, tokenLabel, ...): refused, not ignored.
    for (const k of Object.keys(input ?? {})) if (k !== 'store' && k !== 'keyvault') configError('authority config', `caKeys.${k}`, 'unknown key for store "keyvault" (its settings go under caKeys.keyvault)');
    return { store, keyvault: resolveKeyVaultStoreConfig(input?.keyvault as KeyVaultStoreConfigInput | undefined, env) };
  }
  if (store !== 'pkcs11') bad(`store must be "file", "pkcs11" or "keyvault", not ${JSON.stringify(store)}`);
  const i = input as Partial<Pkcs11KeysConfig> & { pin?: unknown };
  if ('pin' in i) bad('a PIN is never written in the configuration: use pinFile or pinEnv');
  const str = (v: unknown, name: string, required: boolean): string | undefined => {
    if (v === undefined && !required) return undefined;
    if (typeof v !== 'string' || !v) return bad(`${name} must be a non-empty string`);
    return v;
  };
  const keyLabels = { ...DEFAULT_KEY_LABELS, ...(i.keyLabels ?? {}) };
  for (const [name, label] of Object.entries(keyLabels)) str(label, `keyLabels.${name}`, true);
  if (new Set(Object.values(keyLabels)).size !== Object.keys(keyLabels).length) bad('keyLabels must differ from one CA to another');
  const keyType = i.keyType ?? 'ec-256';
  if (!['ec-256', 'ec-384', 'rsa-3072'].includes(keyType)) bad('keyType must be ec-256, ec-384 or rsa-3072');
  const workers = i.workers ?? defaultPkcs11Workers();
  if (!Number.isInteger(workers) || workers < 1 || workers > 16) bad('workers must be an integer from 1 to 16');
  return {
    store, module: str(i.module, 'module', true)!, tokenLabel: str(i.tokenLabel, 'tokenLabel', true)!, pinFile: str(i.pinFile, 'pinFile', false),
    pinEnv: str(i.pinEnv, 'pinEnv', false), keyLabels, keyType, workers,
  };
}

/** `deviceIssuer`: defaults and the rules the schema cannot say. Files are read at start (EstCa). */
export function resolveDeviceIssuer(input: NonNullable<AuthorityConfigInput['deviceIssuer']>): EstCaConfig {
  const bad = (what: string): never => configError('authority config', 'deviceIssuer', what);
  if ((input.clientCertFile === undefined) !== (input.clientKeyFile === undefined)) bad('clientCertFile and clientKeyFile go together');
  if (input.username === undefined && input.clientCertFile === undefined) bad('needs a TLS client certificate (clientCertFile, clientKeyFile) or HTTP Basic (username with passwordFile or passwordEnv)');
  if (input.username === undefined && (input.passwordFile !== undefined || input.passwordEnv !== undefined)) bad('passwordFile and passwordEnv need a username');
  if (input.passwordFile !== undefined && input.passwordEnv !== undefined) bad('passwordFile or passwordEnv, not both');
  return stripUndefined({
    type: 'est', url: input.url!, label: input.label, serverCaFile: input.serverCaFile!, caChainFile: input.caChainFile!,
    clientCertFile: input.clientCertFile, clientKeyFile: input.clientKeyFile, username: input.username, passwordFile: input.passwordFile, passwordEnv: input.passwordEnv,
    timeoutMs: input.timeoutMs ?? EST_DEFAULTS.timeoutMs, retryAfterSeconds: input.retryAfterSeconds ?? EST_DEFAULTS.retryAfterSeconds,
    answerWithinMs: input.answerWithinMs ?? EST_DEFAULTS.answerWithinMs, maxConcurrent: input.maxConcurrent ?? EST_DEFAULTS.maxConcurrent, failureThreshold: input.failureThreshold ?? EST_DEFAULTS.failureThreshold,
  })!;
}

function stripUndefined<T extends object>(o: T | undefined): T | undefined {
  return o && (Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T);
}

/** Reads a JSON config file; its content is checked by resolveAuthorityConfig. */
export function loadAuthorityConfigFile(path: string): AuthorityConfigInput {
  return readJsonConfig(path) as AuthorityConfigInput;
}
