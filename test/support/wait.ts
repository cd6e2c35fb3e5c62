/**
 * Bounded waits for tests: every wait for an event ends with a clear failure instead of
 * hanging the suite. No fixed sleeps anywhere: a test waits for the event it expects.
 */

// Sized for a machine several times slower than a quiet one (CI on a loaded 2-core VM): a bound
// only ever costs time when a test is failing.
export const DEFAULT_WAIT_MS = 20_000;

/** Resolves or rejects with `promise`, or rejects after `ms` with `what` in the message. */
export function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Resolves with the first emission of `event` on `emitter`, bounded by `ms`. */
export function nextEvent<T = unknown>(emitter: NodeJS.EventEmitter, event: string, ms = DEFAULT_WAIT_MS): Promise<T> {
  let handler: ((v: T) => void) | undefined;
  const p = new Promise<T>((resolve) => {
    handler = resolve;
    emitter.once(event, handler);
  });
  return within(p, ms, `event ${event}`).finally(() => emitter.off(event, handler!));
}

/** Polls `fn` every 25 ms until it returns a truthy value (returned), bounded by `ms`. */
export async function until<T>(fn: () => T | undefined | false | null | Promise<T | undefined | false | null>, ms: number, what: string): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}
