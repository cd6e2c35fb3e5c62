/**
 * What the rate-limit plugin keeps per connection: one token bucket per packet class
 * (publish, checked on every publish; subscribe, unsubscribe, ping, ack -- made on the
 * first such packet) and the strikes (limited packets the client ignored), counted over a
 * fixed window: a client that mixes admitted packets in its flood is not forgiven by them.
 * One object per connection, found by a WeakMap lookup -- skipped when the hooks of one
 * publish ask for the same client in turn.
 */
import { performance } from 'node:perf_hooks';
import { TokenBucket } from './token-bucket.ts';

/** Packet classes with a budget besides PUBLISH. */
export type PacketClass = 'subscribe' | 'unsubscribe' | 'ping' | 'ack';

interface ConnectionState {
  bucket: TokenBucket | undefined;
  /** What the bucket was sized from; another object (new limits) restarts it. */
  sizedBy: object | undefined;
  /** The other classes' buckets, made when first needed; restarted like `bucket`. */
  others: Partial<Record<PacketClass, TokenBucket>> | undefined;
  othersSizedBy: object | undefined;
  strikes: number;
  /** Start of the current strike window (monotonic ms). */
  strikesSince: number;
}

let clock = -1;
const expireClock = (): void => {
  clock = -1;
};

/**
 * performance.now(), read once per synchronous run: aedes handles every packet of one socket
 * read in one go, so the publishes of a read share one clock reading, dropped when the run
 * ends (a microtask). Monotonic: a wall clock stepped back (NTP on a gateway that booted with
 * a wrong RTC) must not freeze a refill, nor a step forward grant a burst.
 */
export function runClock(): number {
  if (clock < 0) {
    clock = performance.now();
    queueMicrotask(expireClock);
  }
  return clock;
}

export class ConnectionLimits {
  private readonly states = new WeakMap<object, ConnectionState>();
  private lastClient: object | undefined;
  private lastState: ConnectionState | undefined;

  private state(client: object): ConnectionState {
    if (client === this.lastClient) return this.lastState!;
    let s = this.states.get(client);
    if (s === undefined) {
      s = { bucket: undefined, sizedBy: undefined, others: undefined, othersSizedBy: undefined, strikes: 0, strikesSince: 0 };
      this.states.set(client, s);
    }
    this.lastClient = client;
    this.lastState = s;
    return s;
  }

  /**
   * One publish against the connection's budget: 0 when allowed, else the milliseconds until
   * the next one would be. `sizedBy` identifies the limits in force: when it changes, the
   * bucket starts again, full, at the new size.
   */
  takePublish(client: object, limit: { points: number; durationSeconds: number }, sizedBy: object): number {
    const s = this.state(client);
    const now = runClock();
    if (s.sizedBy !== sizedBy) {
      s.bucket = new TokenBucket(limit, now);
      s.sizedBy = sizedBy;
    }
    return s.bucket!.take(now);
  }

  /**
   * `cost` packets of class `kind` against the connection's budget for it: 0 when allowed,
   * else the milliseconds until they would be (the tokens there were are spent).
   */
  take(client: object, kind: PacketClass, limit: { points: number; durationSeconds: number }, sizedBy: object, cost = 1): number {
    const s = this.state(client);
    const now = runClock();
    if (s.othersSizedBy !== sizedBy || s.others === undefined) {
      s.others = {};
      s.othersSizedBy = sizedBy;
    }
    const bucket = (s.others[kind] ??= new TokenBucket(limit, now));
    for (let i = 0; i < cost; i++) {
      const wait = bucket.take(now);
      if (wait !== 0) return wait;
    }
    return 0;
  }

  /**
   * One more ignored limit; returns how many in the current window of `windowMs` (a fixed
   * window starting at the first strike after the previous one ended). Admitted packets in
   * between do not reset it.
   */
  strike(client: object, windowMs: number): number {
    const s = this.state(client);
    const now = runClock();
    if (s.strikes === 0 || now - s.strikesSince >= windowMs) {
      s.strikes = 0;
      s.strikesSince = now;
    }
    return ++s.strikes;
  }
}
