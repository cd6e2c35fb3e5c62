/**
 * Shapes traffic toward the authority: at most `concurrency` requests in flight, the rest
 * wait in arrival order. A site that comes back from a power cut sends thousands of
 * onboardings at once; they queue here instead of overrunning the authority, and a device
 * whose request waits longer than `pendingAfterMs` is told `pending` with a retry hint.
 */
import { LeafgateError } from '../protocol/index.ts';

export class AuthorityGate {
  private inFlight = 0;
  private readonly queue: Array<() => void> = [];
  /** Highest number of requests in flight ever seen (tests and metrics check the bound). */
  maxInFlight = 0;
  /** Recent average service time, for retryAfterMs estimates. */
  private avgMs = 20;

  constructor(private readonly opts: { concurrency: number; maxQueue: number; pendingAfterMs: number }) {}

  get queued(): number {
    return this.queue.length;
  }

  get active(): number {
    return this.inFlight;
  }

  /** Expected wait for a request that joins the queue now. */
  estimateWaitMs(): number {
    return Math.ceil(((this.queue.length + 1) / this.opts.concurrency) * this.avgMs) + 250;
  }

  /**
   * Runs `fn` when a slot is free. `onPending` is called once if it had to wait longer than
   * pendingAfterMs. A full queue refuses with rate_limited and a retry hint.
   */
  async run<T>(fn: () => Promise<T>, onPending?: (retryAfterMs: number) => void): Promise<T> {
    if (this.inFlight >= this.opts.concurrency) {
      if (this.queue.length >= this.opts.maxQueue) throw new LeafgateError('rate_limited', 'authority queue is full', { retryAfterMs: this.estimateWaitMs() });
      let timer: NodeJS.Timeout | undefined;
      if (onPending) timer = setTimeout(() => onPending(this.estimateWaitMs()), this.opts.pendingAfterMs);
      await new Promise<void>((resolve) => this.queue.push(resolve));
      clearTimeout(timer);
    } else this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    const started = performance.now();
    try {
      return await fn();
    } finally {
      this.avgMs = this.avgMs * 0.9 + (performance.now() - started) * 0.1;
      const next = this.queue.shift();
      // The slot passes straight to the next waiter, so inFlight never exceeds the bound.
      if (next) next();
      else this.inFlight--;
    }
  }
}
