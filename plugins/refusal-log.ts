/**
 * How refusals are reported without letting a flood of refused packets turn into a flood
 * of log lines and `down/error` messages: per connection, the first `logFirst` refusals are
 * logged, then one line per `logEveryMs` carrying how many were left out since the last;
 * `down/error` answers are a token bucket per connection (`answers`). One small object per
 * connection that was ever refused, in a WeakMap: gone with the connection.
 */
import { runClock } from './connection-limits.ts';
import { TokenBucket } from './token-bucket.ts';

export interface RefusalLogLimits {
  logFirst: number;
  logEveryMs: number;
  /** down/error answers per connection. */
  answers: { points: number; durationSeconds: number };
}

export const DEFAULT_REFUSAL_LOG: RefusalLogLimits = {
  logFirst: 5,
  logEveryMs: 10_000,
  answers: { points: 10, durationSeconds: 10 },
};

interface State {
  seen: number;
  suppressed: number;
  lastLogAt: number;
  answers: TokenBucket;
}

export interface RefusalVerdict {
  /** Log this refusal. */
  log: boolean;
  /** Refusals not logged since the previous logged one (to put in this line). */
  suppressed: number;
  /** Answer it on down/error. */
  answer: boolean;
}

export class RefusalSampler {
  private readonly states = new WeakMap<object, State>();
  constructor(private readonly limits: RefusalLogLimits = DEFAULT_REFUSAL_LOG) {}

  /** One refusal on `client`'s connection: whether to log it and whether to answer it. */
  note(client: object): RefusalVerdict {
    const now = runClock();
    let s = this.states.get(client);
    if (s === undefined) {
      s = { seen: 0, suppressed: 0, lastLogAt: now, answers: new TokenBucket(this.limits.answers, now) };
      this.states.set(client, s);
    }
    s.seen++;
    const answer = s.answers.take(now) === 0;
    if (s.seen <= this.limits.logFirst || now - s.lastLogAt >= this.limits.logEveryMs) {
      const suppressed = s.suppressed;
      s.suppressed = 0;
      s.lastLogAt = now;
      return { log: true, suppressed, answer };
    }
    s.suppressed++;
    return { log: false, suppressed: 0, answer };
  }
}
