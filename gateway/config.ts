/** Gateway configuration: defaults, JSON file, environment; validated and frozen at start. */
import { resolve } from 'node:path';
import { LIMITS } from '../protocol/index.ts';
import { checkConfig, configError, type Schema } from '../config-schema/index.ts';
import { DEFAULT_RATE_LIMITS, type RateLimitConfig } from '../plugins/index.ts';

export interface GatewayConfig {
  /** Identity files from enrollment live here. */
  dataDir: string;
  listen: { host: string; port: number };
  /** A bootstrap session that has not onboarded in this time is closed. */
  bootstrapTimeoutMs: number;
  /** Hard cap on one MQTT packet (closes the connection). */
  maxPacketBytes: number;
  /** Polite caps (down/error payload_too_large). */
  onboardingPayloadBytes: number;
  telemetryPayloadBytes: number;
  handshakeTimeoutMs: number;
  connectTimeoutMs: number;
  /** TLS session tickets for device connections (off: 16 kB less per idle connection). */
  tlsSessionTickets: boolean;
  maxConnections: number;
  /** Keepalive must be 1..this (seconds). */
  keepaliveMaxSeconds: number;
  /** How often the CRL is fetched even without a push. */
  crlRefreshMs: number;
  /**
   * A CRL past its nextUpdate (authority unreachable for long): `keep` keeps enforcing the
   * last one and raises an alarm (log + metric; the safe default: the site keeps working),
   * `refuse` refuses certificate logins until a fresh CRL arrives.
   */
  staleCrlPolicy: 'keep' | 'refuse';
  /** Clock difference to the authority tolerated before the gateway complains loudly. */
  maxClockSkewMs: number;
  /** Requests in flight to the authority at once (the outbox drains with this bound). */
  authorityConcurrency: number;
  /** Requests waiting for an authority slot beyond this are refused with rate_limited. */
  authorityQueueMax: number;
  /** A device whose request waited this long for a slot is told `pending`. */
  pendingAfterMs: number;
  /** Time a device has to answer a renewal instruction. */
  renewalCsrDeadlineMs: number;
  /** The gateway certificate (and edge CA) is renewed once this fraction of its lifetime passed. */
  certRenewAfterFraction: number;
  /** Keep an Azure IoT Edge CA (Sub-CA) in <dataDir>/edge-ca. */
  edgeCa: boolean;
  identityCheckMs: number;
  /** IoT Edge module: explicit connection string and CA (else the IoT Edge environment, if any). */
  module?: { connectionString?: string; ca?: string; reportIntervalMs?: number };
  /** /metrics, /healthz, /readyz. */
  http: { host: string; port: number };
  rateLimits: RateLimitConfig;
  /**
   * Gateway cluster: broker sessions, outbox, shared limits and the CRL in Redis. Off (all
   * embedded) when absent. Env: LEAFGATE_REDIS_URL, LEAFGATE_REDIS_PREFIX.
   */
  redis?: { url: string; keyPrefix: string; startTimeoutMs: number };
}

export type GatewayConfigInput = Partial<Omit<GatewayConfig, 'listen' | 'http' | 'rateLimits' | 'redis'>> & {
  redis?: { url: string; keyPrefix?: string; startTimeoutMs?: number };
  listen?: Partial<GatewayConfig['listen']>;
  http?: Partial<GatewayConfig['http']>;
  rateLimits?: Partial<RateLimitConfig>;
};

const int = (description: string, min: number, def?: number, extra: Partial<Schema> = {}): Schema => ({ type: 'integer', minimum: min, description, ...(def !== undefined ? { default: def } : {}), ...extra });
const port = (description: string, def: number, env: string): Schema => ({ type: 'integer', minimum: 0, maximum: 65535, default: def, env, description });
const limit = (description: string, d: { points: number; durationSeconds: number }): Schema => ({
  type: 'object', additionalProperties: false, description,
  // The window may be under a second (a per-connection token bucket refills continuously).
  properties: { points: int(`${description}: events allowed per window`, 1, d.points), durationSeconds: { type: 'number', exclusiveMinimum: 0, default: d.durationSeconds, description: `${description}: window (seconds)` } },
});

/** What a gateway config file may hold (every key optional; unknown keys refused). */
export const GATEWAY_CONFIG_SCHEMA: Schema = {
  type: 'object',
  additionalProperties: false,
  properties: {
    dataDir: { type: 'string', minLength: 1, default: '.leafgate/gateway', env: 'LEAFGATE_GATEWAY_DATA', description: 'Identity files from enrollment, the outbox and the cached CRL.' },
    listen: {
      type: 'object', additionalProperties: false,
      properties: {
        host: { type: 'string', minLength: 1, default: '0.0.0.0', env: 'LEAFGATE_GATEWAY_HOST', description: 'MQTT over TLS listen address.' },
        port: port('MQTT over TLS port (0: any free port).', 8883, 'LEAFGATE_GATEWAY_PORT'),
      },
    },
    bootstrapTimeoutMs: int('A bootstrap session that has not onboarded in this time is closed (ms).', 1, 120_000),
    maxPacketBytes: int('Hard cap on one MQTT packet (the connection is closed).', 1024, 256 * 1024),
    onboardingPayloadBytes: int('Cap on onboarding payloads (down/error payload_too_large); <= maxPacketBytes.', 1, LIMITS.onboardingPayloadBytes),
    telemetryPayloadBytes: int('Cap on telemetry payloads; <= maxPacketBytes.', 1, LIMITS.telemetryPayloadBytes),
    handshakeTimeoutMs: int('TLS handshake deadline (ms).', 1, 10_000),
    connectTimeoutMs: int('MQTT CONNECT deadline after the handshake (ms).', 1, 10_000),
    tlsSessionTickets: { type: 'boolean', default: false, description: 'TLS session tickets for device connections (off: 16 kB less per idle connection).' },
    maxConnections: int('Connections accepted at once.', 1, 50_000),
    keepaliveMaxSeconds: int('Keepalive must be 1..this (seconds).', 1, 1200, { maximum: 65535 }),
    crlRefreshMs: int('How often the CRL is fetched even without a push (ms).', 10, 5 * 60_000),
    staleCrlPolicy: { enum: ['keep', 'refuse'], default: 'keep', description: 'A CRL past its nextUpdate: keep enforcing the last one and alarm (keep), or refuse certificate logins until a fresh one arrives (refuse).' },
    maxClockSkewMs: int('Clock difference to the authority tolerated before the gateway complains (ms).', 0, 5 * 60_000),
    authorityConcurrency: int('Requests in flight to the authority at once.', 1, 16),
    authorityQueueMax: int('Requests waiting for an authority slot beyond this are refused with rate_limited.', 0, 20_000),
    pendingAfterMs: int('A device whose request waited this long for a slot is told `pending` (ms).', 0, 1000),
    renewalCsrDeadlineMs: int('Time a device has to answer a renewal instruction (ms).', 10, 10 * 60_000),
    certRenewAfterFraction: { type: 'number', exclusiveMinimum: 0, exclusiveMaximum: 1, default: 2 / 3, description: 'The gateway certificate (and Edge CA) is renewed once this fraction of its lifetime passed.' },
    edgeCa: { type: 'boolean', default: false, env: 'LEAFGATE_GATEWAY_EDGE_CA', description: 'Keep an Azure IoT Edge CA (Sub-CA) in <dataDir>/edge-ca (env: 1 to enable).' },
    identityCheckMs: int('How often the gateway certificate and Edge CA are checked for renewal (ms).', 10, 3_600_000),
    module: {
      type: 'object', additionalProperties: false,
      properties: {
        connectionString: { type: 'string', secret: true, minLength: 1, env: 'LEAFGATE_MODULE_CONNECTION_STRING', description: 'IoT Edge module connection string (else the IoT Edge environment, if any).' },
        ca: { type: 'string', minLength: 1, description: 'PEM of the CA that signed edgeHub (with connectionString).' },
        reportIntervalMs: int('Module twin status report interval (ms).', 10),
      },
    },
    http: {
      type: 'object', additionalProperties: false,
      properties: {
        host: { type: 'string', minLength: 1, default: '0.0.0.0', env: 'LEAFGATE_GATEWAY_HTTP_HOST', description: '/metrics, /healthz, /readyz listen address.' },
        port: port('/metrics, /healthz, /readyz port.', 9464, 'LEAFGATE_GATEWAY_HTTP_PORT'),
      },
    },
    rateLimits: {
      type: 'object', additionalProperties: false,
      properties: {
        connectionsPerAddress: limit('Connections per source address', DEFAULT_RATE_LIMITS.connectionsPerAddress),
        publishesPerClient: limit('Publishes per client', DEFAULT_RATE_LIMITS.publishesPerClient),
        onboardingsPerDevice: limit('Onboardings per device', DEFAULT_RATE_LIMITS.onboardingsPerDevice),
        csrsPerDevice: limit('CSRs per device', DEFAULT_RATE_LIMITS.csrsPerDevice),
        concurrentOnboardings: int('Onboardings in progress at once on this gateway.', 1, DEFAULT_RATE_LIMITS.concurrentOnboardings),
        subscribesPerClient: limit('SUBSCRIBE filters per connection', DEFAULT_RATE_LIMITS.subscribesPerClient),
        unsubscribesPerClient: limit('UNSUBSCRIBE filters per connection', DEFAULT_RATE_LIMITS.unsubscribesPerClient),
        pingsPerClient: limit('PINGREQs per connection', DEFAULT_RATE_LIMITS.pingsPerClient),
        acksPerClient: limit('PUBACK/PUBREC/PUBREL/PUBCOMP per connection', DEFAULT_RATE_LIMITS.acksPerClient),
        abuseDisconnectAfter: int('Rate-limited packets within abuseWindowSeconds after which the client is disconnected.', 1, DEFAULT_RATE_LIMITS.abuseDisconnectAfter),
        abuseWindowSeconds: int('Window over which rate-limit strikes count (seconds): an admitted packet does not reset them.', 1, DEFAULT_RATE_LIMITS.abuseWindowSeconds),
      },
    },
    redis: {
      type: 'object', additionalProperties: false, required: ['url'],
      properties: {
        url: { type: 'string', secret: true, pattern: '^rediss?://', expected: 'a redis:// or rediss:// URL', env: 'LEAFGATE_REDIS_URL', description: 'Gateway cluster: broker sessions, outbox, shared limits and the CRL in this Redis (redis:// or rediss://). Off when absent.' },
        keyPrefix: { type: 'string', pattern: '^[A-Za-z0-9:_.-]{1,64}$', expected: '1-64 characters of A-Z a-z 0-9 : _ . -', default: 'leafgate:', env: 'LEAFGATE_REDIS_PREFIX', description: 'Key prefix in that Redis, one per site.' },
        startTimeoutMs: int('Time Redis has to answer at start before the gateway gives up (ms).', 100, 10_000),
      },
    },
  },
};

/** `8883` -> 8883; anything else stays a string, so that the error shows what was given. */
const envNumber = (v: string | undefined) => (v === undefined ? undefined : /^-?\d+$/.test(v.trim()) ? Number(v) : v);

/**
 * Defaults, then the config file (`input`), then the environment for keys the file leaves
 * out. Throws ConfigError (exit code 2) naming each bad key and what it expects.
 */
export function resolveGatewayConfig(input: GatewayConfigInput, env: NodeJS.ProcessEnv = process.env): Readonly<GatewayConfig> {
  checkConfig(GATEWAY_CONFIG_SCHEMA, input, 'gateway config');
  const cfg: GatewayConfig = {
    dataDir: resolve(input.dataDir ?? env.LEAFGATE_GATEWAY_DATA ?? '.leafgate/gateway'),
    listen: { host: input.listen?.host ?? env.LEAFGATE_GATEWAY_HOST ?? '0.0.0.0', port: input.listen?.port ?? (envNumber(env.LEAFGATE_GATEWAY_PORT) as number) ?? 8883 },
    bootstrapTimeoutMs: input.bootstrapTimeoutMs ?? 120_000,
    maxPacketBytes: input.maxPacketBytes ?? 256 * 1024,
    onboardingPayloadBytes: input.onboardingPayloadBytes ?? LIMITS.onboardingPayloadBytes,
    telemetryPayloadBytes: input.telemetryPayloadBytes ?? LIMITS.telemetryPayloadBytes,
    handshakeTimeoutMs: input.handshakeTimeoutMs ?? 10_000,
    connectTimeoutMs: input.connectTimeoutMs ?? 10_000,
    tlsSessionTickets: input.tlsSessionTickets ?? false,
    maxConnections: input.maxConnections ?? 50_000,
    keepaliveMaxSeconds: input.keepaliveMaxSeconds ?? 1200,
    crlRefreshMs: input.crlRefreshMs ?? 5 * 60_000,
    staleCrlPolicy: input.staleCrlPolicy ?? 'keep',
    maxClockSkewMs: input.maxClockSkewMs ?? 5 * 60_000,
    authorityConcurrency: input.authorityConcurrency ?? 16,
    authorityQueueMax: input.authorityQueueMax ?? 20_000,
    pendingAfterMs: input.pendingAfterMs ?? 1000,
    renewalCsrDeadlineMs: input.renewalCsrDeadlineMs ?? 10 * 60_000,
    certRenewAfterFraction: input.certRenewAfterFraction ?? 2 / 3,
    edgeCa: input.edgeCa ?? env.LEAFGATE_GATEWAY_EDGE_CA === '1',
    identityCheckMs: input.identityCheckMs ?? 3_600_000,
    module: input.module ?? (env.LEAFGATE_MODULE_CONNECTION_STRING ? { connectionString: env.LEAFGATE_MODULE_CONNECTION_STRING } : undefined),
    http: { host: input.http?.host ?? env.LEAFGATE_GATEWAY_HTTP_HOST ?? '0.0.0.0', port: input.http?.port ?? (envNumber(env.LEAFGATE_GATEWAY_HTTP_PORT) as number) ?? 9464 },
    rateLimits: { ...DEFAULT_RATE_LIMITS, ...input.rateLimits },
  };
  const redisUrl = input.redis?.url ?? env.LEAFGATE_REDIS_URL;
  if (redisUrl) cfg.redis = { url: redisUrl, keyPrefix: input.redis?.keyPrefix ?? env.LEAFGATE_REDIS_PREFIX ?? 'leafgate:', startTimeoutMs: input.redis?.startTimeoutMs ?? 10_000 };
  // Again with the environment applied: a bad variable is named like a bad key.
  checkConfig(GATEWAY_CONFIG_SCHEMA, cfg, 'gateway config (with the environment)');
  const source = 'gateway config';
  if (cfg.onboardingPayloadBytes > cfg.maxPacketBytes) configError(source, 'onboardingPayloadBytes', `must not exceed maxPacketBytes (${cfg.maxPacketBytes})`);
  if (cfg.telemetryPayloadBytes > cfg.maxPacketBytes) configError(source, 'telemetryPayloadBytes', `must not exceed maxPacketBytes (${cfg.maxPacketBytes})`);
  if (cfg.redis) {
    try {
      new URL(cfg.redis.url);
    } catch {
      configError(source, 'redis.url', 'must be a redis:// or rediss:// URL (not a URL)');
    }
  }
  return Object.freeze(cfg);
}
