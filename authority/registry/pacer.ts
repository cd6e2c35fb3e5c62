/**
 * Keeps calls to a cloud registry under its quota: a token bucket of `perMinute` calls with a
 * small burst, on an injectable clock (tests drive it without waiting for real minutes).
 *
 * IoT Hub's identity registry operations (create, retrieve, list, update, delete) are
 * throttled per hub at 100/min/unit on Free, B1, S1, B2, S2 and 5,000/min/unit on B3, S3
 * ("IoT Hub quotas and throttling", learn.microsoft.com/azure/iot-hub/iot-hub-devguide-quotas-throttling);
 * DPS allows 1,000 operations/min/service unit, each service API call being one operation
 * (includes/iot-dps-limits.md of the Azure docs). Beyond them both answer 429.
 */
export interface PacerOptions {
  perMinute: number;
  /** Calls that may go back to back after a quiet period (default 1: evenly spaced). */
  burst?: number;
  now?: () => number;
  sleep?: (ms: number) => Promise<void>;
}

export class Pacer {
  private tokens: number;
  private last: number;
  private readonly burst: number;
  private readonly msPerToken: number;
  private chain: Promise<void> = Promise.resolve();

  constructor(private readonly opts: PacerOptions) {
    if (!Number.isFinite(opts.perMinute) || opts.perMinute <= 0) throw new RangeError('perMinute must be positive');
    this.burst = Math.max(1, opts.burst ?? 1);
    this.msPerToken = 60_000 / opts.perMinute;
    this.tokens = this.burst;
    this.last = this.now();
  }

  private now(): number {
    return this.opts.now?.() ?? Date.now();
  }

  /** Resolves when one more call may be made (callers are served in order). */
  take(): Promise<void> {
    const turn = this.chain.then(() => this.wait());
    this.chain = turn.catch(() => undefined);
    return turn;
  }

  private async wait(): Promise<void> {
    for (;;) {
      const now = this.now();
      this.tokens = Math.min(this.burst, this.tokens + (now - this.last) / this.msPerToken);
      this.last = now;
      if (this.tokens >= 1) {
        this.tokens -= 1;
        return;
      }
      const ms = Math.ceil((1 - this.tokens) * this.msPerToken);
      await (this.opts.sleep ?? ((d: number) => new Promise<void>((r) => setTimeout(r, d).unref())))(ms);
    }
  }
}
