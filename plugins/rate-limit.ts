/**
 * Rate limits (rate-limiter-flexible): connection attempts per source address (checked on
 * the raw TCP connection, before any TLS work), publishes per client, onboarding attempts
 * per device (and source address) per hour, CSRs per device per day, and concurrent
 * onboardings per gateway.
 *
 * A bootstrap connection only claims its device id, so nothing it does without proof may
 * spend the real device's budgets: its register attempts count against the id *from its
 * address* (a hostile client elsewhere on the network cannot lock a device out of
 * onboarding for an hour), and its CSRs count only once the authority has accepted its
 * challenge answer (before that the outbox refuses them as `not_authenticated`, and the
 * per-connection publish budget bounds a flood).
 * Every other packet type a client can send has a per-connection budget too (SUBSCRIBE
 * filters, UNSUBSCRIBE filters, PINGREQ, PUBACK/PUBREC/PUBREL/PUBCOMP), checked by the
 * broker before aedes handles the packet (`packetBudget`); a packet over its budget is
 * dropped unanswered.
 * A limited device gets `down/error` with `rate_limited` and `retryAfterMs` (at a bounded
 * rate, see refusal-log.ts); a client that keeps going after being limited
 * (`abuseDisconnectAfter` limited packets within `abuseWindowSeconds`, whatever it sent in
 * between) is disconnected. Limiters are built by one factory so a
 * cluster swaps the memory store for Redis in one place; the publish budget is per
 * connection and checked on every publish, so it is a synchronous in-memory token bucket
 * (plugins/connection-limits.ts) and never goes through the factory.
 */
import type { Client } from 'aedes';
import { RateLimiterMemory, RateLimiterRes, type RateLimiterAbstract } from 'rate-limiter-flexible';
import { ConnectionLimits, type PacketClass } from './connection-limits.ts';
import type { DeviceSession, SessionRegistry } from './sessions.ts';
import { parsedTopicOf } from './topic-memo.ts';
import { PublishRefusal, type BrokerPlugin } from './types.ts';

export interface Limit {
  points: number;
  durationSeconds: number;
}

export interface RateLimitConfig {
  connectionsPerAddress: Limit;
  publishesPerClient: Limit;
  onboardingsPerDevice: Limit;
  csrsPerDevice: Limit;
  concurrentOnboardings: number;
  /** SUBSCRIBE filters per connection (each filter of a SUBSCRIBE costs one point). */
  subscribesPerClient: Limit;
  /** UNSUBSCRIBE filters per connection. */
  unsubscribesPerClient: Limit;
  /** PINGREQ per connection. */
  pingsPerClient: Limit;
  /** PUBACK, PUBREC, PUBREL and PUBCOMP per connection, together. */
  acksPerClient: Limit;
  /** Rate-limited packets (of any type) within abuseWindowSeconds after which the client is disconnected. */
  abuseDisconnectAfter: number;
  abuseWindowSeconds: number;
}

export const DEFAULT_RATE_LIMITS: RateLimitConfig = {
  connectionsPerAddress: { points: 200, durationSeconds: 10 },
  publishesPerClient: { points: 100, durationSeconds: 1 },
  onboardingsPerDevice: { points: 20, durationSeconds: 3600 },
  csrsPerDevice: { points: 10, durationSeconds: 86_400 },
  concurrentOnboardings: 1000,
  // A device subscribes to its down/ tree (or a few kinds) once per connection.
  subscribesPerClient: { points: 20, durationSeconds: 10 },
  unsubscribesPerClient: { points: 20, durationSeconds: 10 },
  // Keepalive is at least 1 s: a PINGREQ a second, with room for a client that pings early.
  pingsPerClient: { points: 10, durationSeconds: 5 },
  // Acks answer the broker's deliveries and the device's QoS 2 publishes (PUBREL): bounded
  // by the publish budget and the down/ traffic.
  acksPerClient: { points: 200, durationSeconds: 1 },
  abuseDisconnectAfter: 20,
  abuseWindowSeconds: 10,
};

/** mqtt-packet command -> budget. */
const PACKET_BUDGETS: Record<string, { kind: PacketClass; limit: 'subscribesPerClient' | 'unsubscribesPerClient' | 'pingsPerClient' | 'acksPerClient' }> = {
  subscribe: { kind: 'subscribe', limit: 'subscribesPerClient' },
  unsubscribe: { kind: 'unsubscribe', limit: 'unsubscribesPerClient' },
  pingreq: { kind: 'ping', limit: 'pingsPerClient' },
  puback: { kind: 'ack', limit: 'acksPerClient' },
  pubrec: { kind: 'ack', limit: 'acksPerClient' },
  pubrel: { kind: 'ack', limit: 'acksPerClient' },
  pubcomp: { kind: 'ack', limit: 'acksPerClient' },
};

export type LimiterFactory = (name: string, limit: Limit) => RateLimiterAbstract;

export const memoryLimiters: LimiterFactory = (name, limit) => new RateLimiterMemory({ keyPrefix: name, points: limit.points, duration: limit.durationSeconds });

export interface RateLimitObserver {
  limited(limit: string): void;
}

export interface RateLimitOptions {
  sessions: SessionRegistry;
  limits: RateLimitConfig;
  factory?: LimiterFactory;
  observer?: RateLimitObserver;
  /** A non-publish packet was over its budget and dropped (tell the device, sampled). */
  onPacketLimited?(client: Client, limit: string, retryAfterMs: number): void;
  /** A client is cut for ignoring its limits (`strikes` within the window). */
  onAbuse?(client: Client, limit: string, strikes: number): void;
}

export interface RateLimitPlugin extends BrokerPlugin {
  /** For the broker's TCP accept: false when this address is over its connection budget. */
  acceptConnection(remoteAddress: string): Promise<boolean>;
  activeOnboardings(): number;
  /** Replaces limits at run time (module twin); the counters restart. */
  reconfigure(next: Partial<RateLimitConfig>): void;
  readonly limits: RateLimitConfig;
  /** The per-client publish budget, to run before the ACL so refused publishes count too. */
  publishBudget: BrokerPlugin;
  /**
   * The broker's per-packet gate (broker/ `packetBudget`): false drops the packet; a client
   * past abuseDisconnectAfter is disconnected. PUBLISH and CONNECT pass (their budgets are
   * the publish hooks and the connection admission).
   */
  packetBudget(client: Client, packet: { cmd: string; subscriptions?: unknown[]; unsubscriptions?: unknown[] }): boolean;
}

export function rateLimitPlugin(opts: RateLimitOptions): RateLimitPlugin {
  const make = opts.factory ?? memoryLimiters;
  let l = opts.limits;
  let connections = make('lg:conn', l.connectionsPerAddress);
  let onboardings = make('lg:onb', l.onboardingsPerDevice);
  let csrs = make('lg:csr', l.csrsPerDevice);
  const active = new Set<Client>();
  /** Per connection: the publish budget and the strikes. */
  const perConnection = new ConnectionLimits();

  /** Consumes one point; returns the wait in ms when over the limit, 0 when allowed. */
  const over = async (limiter: RateLimiterAbstract, key: string): Promise<number> => {
    try {
      await limiter.consume(key);
      return 0;
    } catch (res) {
      if (res instanceof RateLimiterRes) return Math.max(1, res.msBeforeNext);
      throw res; // the store failed (e.g. Redis down): not a verdict about the client
    }
  };

  const refuse = (client: Client, limit: string, retryAfterMs: number): never => {
    opts.observer?.limited(limit);
    const n = perConnection.strike(client, l.abuseWindowSeconds * 1000);
    // Past the budget a client that does not back off is cut rather than answered forever.
    if (n > l.abuseDisconnectAfter) {
      opts.onAbuse?.(client, limit, n);
      throw new Error(`rate limit ${limit} ignored ${n} times`);
    }
    throw new PublishRefusal('rate_limited', `rate limit ${limit} reached`, retryAfterMs);
  };

  const onboardingBudget = async (client: Client, session: DeviceSession): Promise<void> => {
    if (session.kind === 'bootstrap' && !active.has(client)) {
      if (active.size >= l.concurrentOnboardings) refuse(client, 'concurrentOnboardings', 5_000);
      active.add(client);
    }
    // The address is part of the key while the id is only claimed (see the header).
    const key = session.kind === 'bootstrap' ? `${session.deviceId}@${session.remoteAddress}` : session.deviceId;
    const wait = await over(onboardings, key);
    if (wait) refuse(client, 'onboardingsPerDevice', wait);
  };

  const csrBudget = async (client: Client, deviceId: string): Promise<void> => {
    const wait = await over(csrs, deviceId);
    if (wait) refuse(client, 'csrsPerDevice', wait);
  };

  return {
    name: 'rate-limit',

    async acceptConnection(remoteAddress) {
      const wait = await over(connections, remoteAddress);
      if (wait) opts.observer?.limited('connectionsPerAddress');
      return wait === 0;
    },

    activeOnboardings: () => active.size,

    reconfigure(next) {
      // New budgets start fresh: counters of the old limits do not carry over.
      l = { ...l, ...next };
      connections = make('lg:conn', l.connectionsPerAddress);
      onboardings = make('lg:onb', l.onboardingsPerDevice);
      csrs = make('lg:csr', l.csrsPerDevice);
    },

    get limits() {
      return l;
    },

    publishBudget: {
      name: 'publish-budget',
      // Synchronous: runs on every publish, before the ACL, so refused publishes count too.
      authorizePublish(client) {
        if (!opts.sessions.get(client)) return;
        // Sized by the whole config object: any reconfigure restarts the budgets.
        const wait = perConnection.takePublish(client, l.publishesPerClient, l);
        if (wait) refuse(client, 'publishesPerClient', wait);
      },
    },

    // Synchronous for telemetry; onboarding kinds consult the shared (possibly remote) limiters.
    authorizePublish(client, packet) {
      const session = opts.sessions.get(client);
      if (!session) return;
      const kind = parsedTopicOf(client, packet.topic)?.kind;
      // Both compact exchanges count (an enroll carries its own proof, so it is not held back
      // until an auth like a classic CSR; keyed like register, a stranger spends only its own).
      if (kind === 'register' || kind === 'begin' || kind === 'enroll') return onboardingBudget(client, session);
      // An unauthenticated bootstrap CSR is refused by the outbox; it must not cost the device.
      if (kind === 'csr' && (session.kind === 'operational' || session.authenticated)) return csrBudget(client, session.deviceId);
    },

    packetBudget(client, packet) {
      const b = PACKET_BUDGETS[packet.cmd];
      if (b === undefined) return true;
      const cost = packet.subscriptions?.length ?? packet.unsubscriptions?.length ?? 1;
      const wait = perConnection.take(client, b.kind, l[b.limit], l, Math.max(1, cost));
      if (wait === 0) return true;
      opts.observer?.limited(b.limit);
      const n = perConnection.strike(client, l.abuseWindowSeconds * 1000);
      if (n > l.abuseDisconnectAfter) {
        opts.onAbuse?.(client, b.limit, n);
        client.conn.destroy();
        return false;
      }
      opts.onPacketLimited?.(client, b.limit, wait);
      return false;
    },

    onDisconnect(client) {
      active.delete(client);
    },
  };
}
