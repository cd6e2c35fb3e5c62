/** Gateway configuration: defaults, JSON file, environment; validated and frozen at start. */
import { resolve } from 'node:path';
import { LeafgateError, LIMITS } from '../protocol/index.ts';
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

export function resolveGatewayConfig(input: GatewayConfigInput, env: NodeJS.ProcessEnv = process.env): Readonly<GatewayConfig> {
  const cfg: GatewayConfig = {
    dataDir: resolve(input.dataDir ?? env.LEAFGATE_GATEWAY_DATA ?? '.leafgate/gateway'),
    listen: { host: input.listen?.host ?? env.LEAFGATE_GATEWAY_HOST ?? '0.0.0.0', port: input.listen?.port ?? Number(env.LEAFGATE_GATEWAY_PORT ?? 8883) },
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
    http: { host: input.http?.host ?? env.LEAFGATE_GATEWAY_HTTP_HOST ?? '0.0.0.0', port: input.http?.port ?? Number(env.LEAFGATE_GATEWAY_HTTP_PORT ?? 9464) },
    rateLimits: { ...DEFAULT_RATE_LIMITS, ...input.rateLimits },
  };
  const redisUrl = input.redis?.url ?? env.LEAFGATE_REDIS_URL;
  if (redisUrl) cfg.redis = { url: redisUrl, keyPrefix: input.redis?.keyPrefix ?? env.LEAFGATE_REDIS_PREFIX ?? 'leafgate:', startTimeoutMs: input.redis?.startTimeoutMs ?? 10_000 };
  const bad = (m: string) => {
    throw new LeafgateError('internal', `gateway config: ${m}`);
  };
  if (!Number.isInteger(cfg.listen.port) || cfg.listen.port < 0 || cfg.listen.port > 65535) bad('listen.port is invalid');
  if (cfg.onboardingPayloadBytes > cfg.maxPacketBytes || cfg.telemetryPayloadBytes > cfg.maxPacketBytes) bad('payload caps must not exceed maxPacketBytes');
  if (cfg.staleCrlPolicy !== 'keep' && cfg.staleCrlPolicy !== 'refuse') bad('staleCrlPolicy must be keep or refuse');
  if (!(cfg.certRenewAfterFraction > 0 && cfg.certRenewAfterFraction < 1)) bad('certRenewAfterFraction must be in (0, 1)');
  if (!Number.isInteger(cfg.http.port) || cfg.http.port < 0 || cfg.http.port > 65535) bad('http.port is invalid');
  for (const k of ['bootstrapTimeoutMs', 'handshakeTimeoutMs', 'connectTimeoutMs', 'maxConnections', 'keepaliveMaxSeconds', 'crlRefreshMs', 'authorityConcurrency'] as const) if (!(cfg[k] > 0)) bad(`${k} must be > 0`);
  if (cfg.redis) {
    let u: URL | undefined;
    try {
      u = new URL(cfg.redis.url);
    } catch {
      bad('redis url is not a URL');
    }
    if (u!.protocol !== 'redis:' && u!.protocol !== 'rediss:') bad('redis url must start with redis:// or rediss://');
    if (!/^[A-Za-z0-9:_.-]{1,64}$/.test(cfg.redis.keyPrefix)) bad('redis keyPrefix must be 1-64 characters of A-Z a-z 0-9 : _ . -');
  }
  return Object.freeze(cfg);
}
