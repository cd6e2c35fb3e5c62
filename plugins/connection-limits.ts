/**
 * What the rate-limit plugin keeps per connection: the publish budget (a token bucket,
 * checked on every publish) and the strikes (limited publishes the client ignored). One
 * object per connection, found by a WeakMap lookup -- skipped when the hooks of one publish
 * ask for the same client in turn.
 */
import { performance } from 'node:perf_hooks';
import { TokenBucket } from './token-bucket.ts';

interface ConnectionState {
  bucket: TokenBucket | undefined;
  /** What the bucket was sized from; another object (new limits) restarts it. */
  sizedBy: object | undefined;
  strikes: number;
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
      s = { bucket: undefined, sizedBy: undefined, strikes: 0 };
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

  /** One more ignored limit; returns how many in a row. */
  strike(client: object): number {
    return ++this.state(client).strikes;
  }

  /** An admitted publish: the client backed off. */
  forgive(client: object): void {
    const s = client === this.lastClient ? this.lastState : this.states.get(client);
    if (s !== undefined && s.strikes !== 0) s.strikes = 0;
  }
}
