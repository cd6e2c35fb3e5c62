/**
 * The outbox of a gateway cluster, in Redis: every gateway of a site sees every accepted
 * request, so a device that sent its CSR through gateway A and reconnects to gateway B gets
 * its answer from B. A queued request is sent by the gateway that accepted it (the authority
 * binds a device's authentication to that gateway), or by a replacement node with its identity.
 *
 * Layout (all keys under the cluster's prefix, `ob:` here):
 *   ob:seq            INCR counter, the arrival order
 *   ob:e:<seq>        hash: one entry; body and response are JSON strings
 *   ob:idx            hash: JSON [deviceId, requestId] -> seq, the idempotency key
 *   ob:due:<gateway>  zset: queued entries of the gateway that accepted them, by next
 *                     attempt time (member: zero-padded seq, so ties drain in arrival order)
 *   ob:u:<deviceId>   zset: final answers not yet known to have reached the device
 *   ob:done           zset: final entries by completion time, for purge
 * Each step that touches several keys is one Lua script, so it is atomic against the other
 * gateways. Durability is Redis's: run it with `appendonly yes` (and `appendfsync always`
 * for the guarantee the embedded outbox gives with synchronous=FULL); see README.
 *
 * The connection must be made with enableOfflineQueue=false: while Redis is down a command
 * fails at once, the device is told `gateway_unavailable` with a retry hint, and its PUBACK
 * is not sent; nothing is accepted that is not stored.
 */
import type { Redis } from 'ioredis';
import { LeafgateError } from '../protocol/index.ts';
import { hashRequestBody, type OutboxEntry, type OutboxKind, type OutboxStore } from './outbox.ts';

const ACCEPT = `
local p = ARGV[1]
local s = redis.call('HGET', p .. 'idx', ARGV[2])
if s then return {tonumber(s), 0} end
s = redis.call('INCR', p .. 'seq')
redis.call('HSET', p .. 'e:' .. s, 'seq', s, 'deviceId', ARGV[3], 'requestId', ARGV[4], 'kind', ARGV[5], 'body', ARGV[6], 'bodyHash', ARGV[7],
  'state', 'queued', 'attempts', 0, 'nextAttemptAt', ARGV[8], 'createdAt', ARGV[8], 'idx', ARGV[2], 'owner', ARGV[9])
redis.call('HSET', p .. 'idx', ARGV[2], s)
redis.call('ZADD', p .. 'due:' .. ARGV[9], ARGV[8], string.format('%016d', s))
redis.call('ZADD', p .. 'age:' .. ARGV[9], ARGV[8], string.format('%016d', s))
return {s, 1}`;

// Leases what it returns: the score moves to now + lease, so another gateway's claim skips it
// until this one answers, reschedules, or dies (then the lease runs out and it is due again).
const CLAIM = `
local p = ARGV[1]
local q = p .. 'due:' .. ARGV[5]
local m = redis.call('ZRANGEBYSCORE', q, '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, v in ipairs(m) do redis.call('ZADD', q, ARGV[4], v) end
return m`;

const FINISH = `
local p = ARGV[1]
local k = p .. 'e:' .. ARGV[2]
if redis.call('HGET', k, 'state') ~= 'queued' then return 0 end
redis.call('HSET', k, 'state', ARGV[3], 'response', ARGV[4], 'completedAt', ARGV[5])
local m = string.format('%016d', tonumber(ARGV[2]))
redis.call('ZREM', p .. 'due:' .. redis.call('HGET', k, 'owner'), m)
redis.call('ZREM', p .. 'age:' .. redis.call('HGET', k, 'owner'), m)
redis.call('ZADD', p .. 'u:' .. redis.call('HGET', k, 'deviceId'), ARGV[2], m)
redis.call('ZADD', p .. 'done', ARGV[5], m)
return 1`;

const RESCHEDULE = `
local p = ARGV[1]
local k = p .. 'e:' .. ARGV[2]
if redis.call('HGET', k, 'state') ~= 'queued' then return 0 end
redis.call('HINCRBY', k, 'attempts', 1)
redis.call('HSET', k, 'nextAttemptAt', ARGV[3])
redis.call('ZADD', p .. 'due:' .. redis.call('HGET', k, 'owner'), ARGV[3], string.format('%016d', tonumber(ARGV[2])))
return 1`;

const DELIVERED = `
local p = ARGV[1]
local k = p .. 'e:' .. ARGV[2]
local d = redis.call('HGET', k, 'deviceId')
if not d then return 0 end
redis.call('HSET', k, 'deliveredAt', ARGV[3])
redis.call('ZREM', p .. 'u:' .. d, string.format('%016d', tonumber(ARGV[2])))
return 1`;

const RETRY_ALL = `
local p = ARGV[1]
local q = p .. 'due:' .. ARGV[3]
local m = redis.call('ZRANGEBYSCORE', q, '(' .. ARGV[2], '+inf')
for _, v in ipairs(m) do redis.call('ZADD', q, ARGV[2], v) end
return #m`;

const PURGE = `
local p = ARGV[1]
local m = redis.call('ZRANGEBYSCORE', p .. 'done', '-inf', '(' .. ARGV[2], 'LIMIT', 0, 1000)
for _, v in ipairs(m) do
  local k = p .. 'e:' .. tonumber(v)
  local d = redis.call('HMGET', k, 'deviceId', 'idx')
  if d[1] then
    redis.call('HDEL', p .. 'idx', d[2])
    redis.call('ZREM', p .. 'u:' .. d[1], v)
  end
  redis.call('DEL', k)
  redis.call('ZREM', p .. 'done', v)
end
return #m`;

type Scripted = Redis & Record<'lgObAccept' | 'lgObClaim' | 'lgObFinish' | 'lgObReschedule' | 'lgObDelivered' | 'lgObRetryAll' | 'lgObPurge', (...args: (string | number)[]) => Promise<unknown>>;

function toEntry(h: Record<string, string>): OutboxEntry | null {
  if (!h.seq) return null;
  return {
    seq: Number(h.seq), deviceId: h.deviceId!, requestId: h.requestId!, kind: h.kind as OutboxKind, body: JSON.parse(h.body!), bodyHash: h.bodyHash!,
    state: h.state as OutboxEntry['state'], attempts: Number(h.attempts), nextAttemptAt: Number(h.nextAttemptAt),
    response: h.response ? JSON.parse(h.response) : null, createdAt: Number(h.createdAt), deliveredAt: h.deliveredAt ? Number(h.deliveredAt) : null,
  };
}

/** Redis errors become a coded, retryable refusal: the device sends again later. */
function unavailable(err: unknown): LeafgateError {
  if (err instanceof LeafgateError) return err;
  return new LeafgateError('gateway_unavailable', `gateway cluster store unavailable: ${(err as Error).message}`, { retryAfterMs: 5_000 });
}

export class RedisOutbox implements OutboxStore {
  readonly leasing = true;
  private readonly r: Scripted;
  /** Index key of a (device, requestId) pair; stored in the entry too, for purge. */
  private static field = (deviceId: string, requestId: string) => JSON.stringify([deviceId, requestId]);

  /**
   * `owner` is the gateway id that accepted a request: only that gateway (any node holding
   * its identity) sends it, because the authority binds a device's authentication to the
   * gateway it went through. Every gateway of the cluster reads and delivers any answer.
   */
  constructor(redis: Redis, private readonly prefix: string, private readonly owner: string) {
    const r = redis as Scripted;
    const define = (name: string, lua: string) => {
      if (!(name in r)) r.defineCommand(name, { numberOfKeys: 0, lua });
    };
    define('lgObAccept', ACCEPT);
    define('lgObClaim', CLAIM);
    define('lgObFinish', FINISH);
    define('lgObReschedule', RESCHEDULE);
    define('lgObDelivered', DELIVERED);
    define('lgObRetryAll', RETRY_ALL);
    define('lgObPurge', PURGE);
    this.r = r;
    this.prefix = `${prefix}ob:`;
  }

  private async run<T>(f: () => Promise<T>): Promise<T> {
    try {
      return await f();
    } catch (err) {
      throw unavailable(err);
    }
  }

  private async load(seqs: Array<number | string>): Promise<OutboxEntry[]> {
    if (!seqs.length) return [];
    const pipe = this.r.pipeline();
    for (const s of seqs) pipe.hgetall(`${this.prefix}e:${Number(s)}`);
    const results = (await pipe.exec()) ?? [];
    const out: OutboxEntry[] = [];
    for (const [err, h] of results) {
      if (err) throw err;
      const e = toEntry(h as Record<string, string>);
      if (e) out.push(e);
    }
    return out;
  }

  get(deviceId: string, requestId: string): Promise<OutboxEntry | null> {
    return this.run(async () => {
      const seq = await this.r.hget(`${this.prefix}idx`, RedisOutbox.field(deviceId, requestId));
      return seq ? ((await this.load([seq]))[0] ?? null) : null;
    });
  }

  accept(deviceId: string, requestId: string, kind: OutboxKind, body: Record<string, unknown>, now: number): Promise<{ entry: OutboxEntry; isNew: boolean }> {
    return this.run(async () => {
      const hash = hashRequestBody(body);
      const [seq, isNew] = (await this.r.lgObAccept(this.prefix, RedisOutbox.field(deviceId, requestId), deviceId, requestId, kind, JSON.stringify(body), hash, now, this.owner)) as [number, number];
      const [entry] = await this.load([seq]);
      if (!entry) throw new Error(`outbox entry ${seq} vanished`);
      if (!isNew && entry.bodyHash !== hash) throw new LeafgateError('request_conflict', `requestId ${requestId} was already used for another request`);
      return { entry, isNew: isNew === 1 };
    });
  }

  due(now: number, limit: number, leaseMs = 60_000): Promise<OutboxEntry[]> {
    return this.run(async () => this.load((await this.r.lgObClaim(this.prefix, now, limit, now + leaseMs, this.owner)) as string[]));
  }

  finish(seq: number, state: 'done' | 'failed', response: Record<string, unknown>, now: number): Promise<boolean> {
    return this.run(async () => (await this.r.lgObFinish(this.prefix, seq, state, JSON.stringify(response), now)) === 1);
  }

  reschedule(seq: number, nextAttemptAt: number): Promise<void> {
    return this.run(async () => void (await this.r.lgObReschedule(this.prefix, seq, nextAttemptAt)));
  }

  retryAllNow(now: number): Promise<void> {
    return this.run(async () => void (await this.r.lgObRetryAll(this.prefix, now, this.owner)));
  }

  markDelivered(seq: number, now: number): Promise<void> {
    return this.run(async () => void (await this.r.lgObDelivered(this.prefix, seq, now)));
  }

  undelivered(deviceId: string): Promise<OutboxEntry[]> {
    return this.run(async () => this.load(await this.r.zrange(`${this.prefix}u:${deviceId}`, 0, 99)));
  }

  pendingCount(): Promise<number> {
    return this.run(() => this.r.zcard(`${this.prefix}due:${this.owner}`));
  }

  /**
   * The due set is scored by the next attempt, not by age: a second set scored by creation
   * time (kept with it by ACCEPT and FINISH) answers the oldest entry in one read. Entries
   * queued by a version without it are counted but have no age (null when none is known).
   */
  backlog(): Promise<{ count: number; oldestCreatedAt: number | null }> {
    return this.run(async () => {
      const [count, oldest] = await Promise.all([
        this.r.zcard(`${this.prefix}due:${this.owner}`),
        this.r.zrange(`${this.prefix}age:${this.owner}`, 0, 0, 'WITHSCORES'),
      ]);
      return { count, oldestCreatedAt: count > 0 && oldest.length === 2 ? Number(oldest[1]) : null };
    });
  }

  purge(before: number): Promise<number> {
    return this.run(async () => Number(await this.r.lgObPurge(this.prefix, before)));
  }

  /** The connection belongs to the gateway's cluster link, which closes it. */
  close(): void {}
}
