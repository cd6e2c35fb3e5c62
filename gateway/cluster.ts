/**
 * The gateway cluster link: several gateway processes of one site share one Redis.
 *
 * - broker: aedes-persistence-redis (sessions, subscriptions, retained, QoS 1 in flight)
 *   and mqemitter-redis (a publish on one gateway reaches subscribers on all), so a device
 *   may land on any gateway behind the load balancer;
 * - limits: RateLimiterRedis for the budgets that must hold site-wide (connections per
 *   address, onboardings and CSRs per device), with an in-memory insurance limiter that
 *   takes over while Redis is down, so an outage never locks the site out;
 * - the outbox (cloud-bridge/outbox-redis.ts), so any gateway completes and delivers;
 * - presence: which device is connected to which gateway, so an answer finished on A is
 *   published for a device on B;
 * - the device CRL, re-shared between gateways: a gateway that gets a newer CRL stores it
 *   and announces its number; the others fetch it from Redis, check its signature against
 *   the device CA themselves (Redis is not trusted for revocation), and close the
 *   sessions it revokes even when their own authority link is down. The authority's list of
 *   the external device CA's revocations (EST) is shared the same way under its own key and
 *   channel (`crl:external-devices`).
 *
 * Every ioredis connection has an error listener: an outage is a log line and a metric,
 * never an unhandled 'error' event. Application commands fail fast (no offline queue) so a
 * device gets `gateway_unavailable` instead of a hung request; the broker's persistence
 * keeps ioredis's queue, so its work resumes when Redis returns.
 */
import { randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { Redis, type RedisOptions } from 'ioredis';
import type { Logger } from 'pino';
import { RateLimiterMemory, RateLimiterRedis } from 'rate-limiter-flexible';
import createPersistence from 'aedes-persistence-redis';
import createMq from 'mqemitter-redis';
import msgpack from 'msgpack-lite';
import type { LimiterFactory } from '../plugins/index.ts';
import { RedisOutbox } from '../cloud-bridge/outbox-redis.ts';

export interface ClusterConfig {
  /** redis://[user:pass@]host:port[/db] or rediss://... */
  url: string;
  /** Prefix of every key and channel, so several sites (or tests) can share one Redis. */
  keyPrefix: string;
  /** How long start-up waits for Redis before it fails. */
  startTimeoutMs?: number;
}

const CRL_SET = `
local cur = redis.call('HGET', KEYS[1], 'number')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'number', ARGV[1], 'der', ARGV[2])
return 1`;

// A presence value is `<nodeId>|<kind>|<certificate fingerprint>`; only its own node drops it.
const PRESENCE_DROP = `
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v and string.sub(v, 1, #ARGV[2] + 1) == ARGV[2] .. '|' then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0`;

// The presence entry of a device, only if the gateway that wrote it is alive (its heartbeat
// key exists): one round trip on the CONNECT path instead of two.
const PRESENCE_LIVE = `
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return false end
local node = string.match(v, '^([^|]*)|')
if node and redis.call('EXISTS', ARGV[2] .. node) == 1 then return v end
return false`;

/** How a device is held on another gateway of the cluster. */
export interface RemoteHolder {
  nodeId: string;
  kind: 'bootstrap' | 'operational';
  certFingerprint?: string;
}

const HEARTBEAT_TTL_MS = 30_000;

/** The revocation lists shared in the cluster: the device CA's CRL, the external-CA list. */
export type SharedCrlName = 'device-ca' | 'external-devices';

export class GatewayCluster extends EventEmitter<{ crl: [crlNumber: bigint, list: SharedCrlName]; link: [up: boolean] }> {
  /** This process in the cluster; also its aedes broker id. */
  readonly nodeId = randomUUID();
  readonly outbox: RedisOutbox;
  readonly limiters: LimiterFactory;
  /** Application commands: outbox, presence, CRL, limits. Fails fast while Redis is down. */
  private readonly cmd: Redis;
  private readonly sub: Redis;
  private readonly crlChannel: string;
  private closing = false;
  private up = false;
  private db: Redis | undefined;
  private watchdog: NodeJS.Timeout | undefined;
  private heartbeat: NodeJS.Timeout | undefined;
  private bus: (LocalFirstBus & { close(cb: () => void): void; subConn: Redis }) | undefined;

  constructor(private readonly config: ClusterConfig, gatewayId: string, private readonly logger: Logger) {
    super();
    this.cmd = this.connect('commands', { enableOfflineQueue: false, maxRetriesPerRequest: 1 });
    this.sub = this.connect('events', {});
    this.crlChannel = `${config.keyPrefix}crl`;
    this.cmd.defineCommand('lgCrlSet', { numberOfKeys: 1, lua: CRL_SET });
    this.cmd.defineCommand('lgPresenceDrop', { numberOfKeys: 1, lua: PRESENCE_DROP });
    this.cmd.defineCommand('lgPresenceLive', { numberOfKeys: 1, lua: PRESENCE_LIVE });
    this.outbox = new RedisOutbox(this.cmd, config.keyPrefix, gatewayId);
    this.cmd.on('ready', () => this.setLink(true));
    this.cmd.on('end', () => this.setLink(false));
    this.cmd.on('close', () => this.setLink(false));
    this.sub.on('message', (channel: string, message: string) => {
      const list: SharedCrlName | undefined = channel === this.crlChannel ? 'device-ca' : channel === this.crlKey('external-devices') ? 'external-devices' : undefined;
      if (!list) return;
      try {
        this.emit('crl', BigInt(message), list);
      } catch {
        this.logger.warn({ channel }, 'ignoring a malformed CRL announcement');
      }
    });
    // Site-wide budgets (the per-connection publish budget is a local token bucket anyway).
    this.limiters = (name, limit) =>
      new RateLimiterRedis({
        storeClient: this.cmd,
        keyPrefix: `${config.keyPrefix}${name}`,
        points: limit.points,
        duration: limit.durationSeconds,
        rejectIfRedisNotReady: true,
        insuranceLimiter: new RateLimiterMemory({ keyPrefix: name, points: limit.points, duration: limit.durationSeconds }),
      });
  }

  /** The Redis connections are up (the readiness check and the metric read this). */
  get connected(): boolean {
    return this.up;
  }

  private setLink(up: boolean): void {
    if (this.up === up) return;
    this.up = up;
    if (up) this.logger.info({ redis: redact(this.config.url) }, 'cluster link to Redis is up');
    else if (!this.closing) this.logger.error({ redis: redact(this.config.url) }, 'cluster link to Redis is down: CSRs are refused with gateway_unavailable, limits fall back to per-gateway memory');
    this.emit('link', up);
  }

  private connect(role: string, extra: RedisOptions): Redis {
    const r = new Redis(this.config.url, {
      lazyConnect: false,
      // Reconnect forever with a capped backoff: Redis coming back is the normal end of an outage.
      retryStrategy: (times) => Math.min(200 * times, 5_000),
      ...extra,
    });
    let last = '';
    r.on('error', (err: Error) => {
      // ioredis repeats the same error on every reconnect attempt; log each kind once.
      if (this.closing || err.message === last) return;
      last = err.message;
      this.logger.warn({ role, err: err.message }, 'Redis connection error');
    });
    r.on('ready', () => {
      last = '';
    });
    return r;
  }

  /** Waits for the first connection (start-up fails clearly when Redis is not there). */
  async ready(timeoutMs = this.config.startTimeoutMs ?? 10_000): Promise<void> {
    const wait = (r: Redis) =>
      r.status === 'ready'
        ? Promise.resolve()
        : new Promise<void>((resolve, reject) => {
            const t = setTimeout(() => reject(new Error(`Redis at ${redact(this.config.url)} did not answer within ${timeoutMs} ms`)), timeoutMs);
            r.once('ready', () => {
              clearTimeout(t);
              resolve();
            });
          });
    await Promise.all([wait(this.cmd), wait(this.sub)]);
    await this.sub.subscribe(this.crlChannel, this.crlKey('external-devices'));
    this.setLink(true);
    this.beat();
    this.heartbeat = setInterval(() => this.beat(), HEARTBEAT_TTL_MS / 3);
    this.heartbeat.unref();
  }

  /** aedes options: shared persistence and message bus; each gets its own connections. */
  brokerOptions(): { persistence: unknown; mq: unknown; id: string } {
    // The persistence's keys carry the prefix; bus channels are MQTT topics (ioredis does not
    // prefix channels), and device ids are unique per site anyway.
    const db = this.connect('broker-persistence', { keyPrefix: this.config.keyPrefix });
    this.db = db;
    const persistence = createPersistence({ conn: db });
    // A bounded retry on the bus: a message that cannot reach the other gateways within a
    // few seconds is dropped there (answers are also in the outbox, so nothing is lost) rather
    // than replayed long after, when the echo filter below no longer remembers it.
    const mq = createMq({
      subConn: this.connect('broker-bus-sub', {}),
      pubConn: this.connect('broker-bus-pub', { maxRetriesPerRequest: 5 }),
      ttlLRUCache: 5 * 60_000,
    }) as unknown as LocalFirstBus;
    // mqemitter-redis re-emits connection errors on `state`; without a listener they would crash the process.
    mq.state.on('error', (err: Error) => this.logger.debug({ err: err.message }, 'Redis bus error'));
    localFirst(mq, this.logger);
    this.bus = mq as typeof this.bus;
    return { persistence, mq, id: this.nodeId };
  }

  /** Records that a device is connected here. Best effort: a miss only delays an answer. */
  present(deviceId: string, kind: 'bootstrap' | 'operational', certFingerprint = ''): void {
    this.cmd.hset(`${this.config.keyPrefix}presence`, deviceId, `${this.nodeId}|${kind}|${certFingerprint}`).catch(() => undefined);
  }

  absent(deviceId: string): void {
    (this.cmd as unknown as { lgPresenceDrop(k: string, d: string, n: string): Promise<number> })
      .lgPresenceDrop(`${this.config.keyPrefix}presence`, deviceId, this.nodeId)
      .catch(() => undefined);
  }

  /** Is the device connected to some gateway of the cluster? Unknown (Redis down) counts as yes. */
  async isPresent(deviceId: string): Promise<boolean> {
    try {
      return (await this.cmd.hexists(`${this.config.keyPrefix}presence`, deviceId)) === 1;
    } catch {
      return true;
    }
  }

  /**
   * The session holding this id on another live gateway, if any. An entry of a gateway
   * whose heartbeat has lapsed (it crashed) does not count, so a dead node never locks a
   * device out. Unknown (Redis down) is undefined: the local rules still apply.
   */
  async remoteHolder(deviceId: string): Promise<RemoteHolder | undefined> {
    try {
      const v = await (this.cmd as unknown as { lgPresenceLive(k: string, d: string, nodePrefix: string): Promise<string | null> })
        .lgPresenceLive(`${this.config.keyPrefix}presence`, deviceId, `${this.config.keyPrefix}node:`);
      if (!v) return undefined;
      const [nodeId = '', kind, certFingerprint] = v.split('|');
      if (nodeId === this.nodeId || (kind !== 'bootstrap' && kind !== 'operational')) return undefined;
      return { nodeId, kind, certFingerprint: certFingerprint || undefined };
    } catch {
      return undefined;
    }
  }

  /** This node is alive: refreshed well within its expiry. */
  private beat(): void {
    this.cmd.set(`${this.config.keyPrefix}node:${this.nodeId}`, String(Date.now()), 'PX', HEARTBEAT_TTL_MS).catch(() => undefined);
  }

  /** Redis key (and announcement channel) of a shared list. */
  private crlKey(list: SharedCrlName): string {
    return list === 'device-ca' ? `${this.config.keyPrefix}crl` : `${this.config.keyPrefix}crl:${list}`;
  }

  /** Shares a verified CRL; announces it when it is newer than the shared one. */
  async shareCrl(crlNumber: bigint, der: Buffer, list: SharedCrlName = 'device-ca'): Promise<void> {
    try {
      const stored = await (this.cmd as unknown as { lgCrlSet(k: string, n: string, d: Buffer): Promise<number> }).lgCrlSet(this.crlKey(list), crlNumber.toString(), der);
      if (stored === 1) await this.cmd.publish(this.crlKey(list), crlNumber.toString());
    } catch (err) {
      this.logger.warn({ err: (err as Error).message }, 'CRL could not be shared with the cluster');
    }
  }

  /** The shared CRL (DER), unverified: the caller checks its signature. */
  async sharedCrl(list: SharedCrlName = 'device-ca'): Promise<Buffer | null> {
    try {
      return await this.cmd.hgetBuffer(this.crlKey(list), 'der');
    } catch {
      return null;
    }
  }

  /**
   * Called before the broker closes. With Redis down, the broker's own shutdown (client
   * clean-up in the persistence, quit() of the bus) would wait for Redis forever; cutting
   * those connections makes each pending call fail at once instead.
   */
  async releaseBroker(): Promise<void> {
    if (!this.bus) return;
    this.closing = true;
    const bus = this.bus;
    const cut = () => {
      this.db?.disconnect();
      bus.subConn.disconnect();
      bus.pubConn.disconnect();
    };
    if (this.db?.status === 'ready' && bus.pubConn.status === 'ready') {
      // Redis is there: a normal close. If it goes away meanwhile, cut after a bound.
      this.watchdog = setTimeout(cut, 3_000);
      this.watchdog.unref();
      return;
    }
    this.db?.disconnect();
    // mqemitter-redis's close waits for an 'end' that a connection stuck reconnecting may
    // never emit; once it has started, the broker's own close() of the bus returns at once.
    await Promise.race([
      new Promise<void>((resolve) => bus.close(() => resolve())),
      new Promise<void>((resolve) => setTimeout(resolve, 500).unref()),
    ]);
    cut();
  }

  async close(): Promise<void> {
    this.closing = true;
    clearTimeout(this.watchdog);
    clearInterval(this.heartbeat);
    if (this.cmd.status === 'ready') await this.cmd.del(`${this.config.keyPrefix}node:${this.nodeId}`).catch(() => undefined);
    const bye = (r: Redis) =>
      r.status === 'ready' ? Promise.race([r.quit().catch(() => undefined), new Promise((resolve) => setTimeout(resolve, 1000).unref())]) : undefined;
    await Promise.all([bye(this.cmd), bye(this.sub)]);
    this.cmd.disconnect();
    this.sub.disconnect();
  }
}

interface LocalFirstBus {
  state: EventEmitter;
  closed?: boolean;
  pubConn: Redis;
  _cache: { set(id: string, v: boolean): void };
  _emit(msg: { topic: string }, done?: (err?: Error) => void): void;
  emit(msg: { topic: string }, done?: (err?: Error) => void): void;
}

/**
 * mqemitter-redis delivers every message through Redis, even to subscribers of the same
 * process: with Redis down, a gateway could not even answer its own devices. Here a message
 * is delivered locally at once and sent to the other gateways through Redis; its id is
 * remembered so that the copy coming back from Redis is not delivered twice. (The same
 * packet shape and echo filter as mqemitter-redis 7; its tests in cluster.gateway pin it.)
 */
const msgpackEncode = (v: unknown): Buffer => msgpack.encode(v);

function localFirst(mq: LocalFirstBus, logger: Logger): void {
  mq.emit = function emit(msg, done) {
    if (this.closed) return done?.(new Error('mqemitter-redis is closed'));
    const packet = { id: randomUUID(), msg };
    this._cache.set(packet.id, true);
    this._emit(msg, done);
    this.pubConn.publish(msg.topic, msgpackEncode(packet)).catch((err: Error) => {
      logger.debug({ topic: msg.topic, err: err.message }, 'message not sent to the other gateways (Redis unavailable)');
    });
  };
}

/** A URL for logs, without its password. */
export function redact(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return '(invalid Redis URL)';
  }
}
