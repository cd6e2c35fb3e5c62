/**
 * A synchronous token bucket, for budgets that belong to one connection (publishes per
 * client): checked on every publish, so it must cost no promise and no store. It holds
 * `points` tokens and refills `points` per `durationSeconds`, continuously: a device may
 * burst up to `points`, and sustain `points / durationSeconds` per second. Being per
 * connection, it never needs a shared store (Redis) in a cluster. Times are milliseconds
 * on a monotonic clock (performance.now(), see connection-limits.ts).
 */
export class TokenBucket {
  private tokens: number;
  private last: number;
  private readonly perMs: number;
  private readonly capacity: number;
  private readonly durationMs: number;

  constructor(limit: { points: number; durationSeconds: number }, now: number) {
    this.capacity = limit.points;
    this.durationMs = limit.durationSeconds * 1000;
    this.perMs = limit.points / this.durationMs;
    this.tokens = limit.points;
    this.last = now;
  }

  /** Takes one token: 0 when allowed, else the milliseconds until one is available (>= 1). */
  take(now: number): number {
    let tokens = this.tokens;
    if (now > this.last) {
      tokens += (now - this.last) * this.perMs;
      if (tokens > this.capacity) tokens = this.capacity;
      this.last = now;
    }
    if (tokens >= 1) {
      this.tokens = tokens - 1;
      return 0;
    }
    this.tokens = tokens;
    return this.perMs > 0 ? Math.max(1, Math.ceil((1 - tokens) / this.perMs)) : Math.max(1, this.durationMs);
  }
}
