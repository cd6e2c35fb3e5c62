/**
 * Sends outbox entries to the authority in order, with capped exponential backoff and full
 * jitter while it is unreachable, and delivers each answer to the device exactly once per
 * completion (a device that missed it gets it again when it subscribes or re-asks).
 */
import type { Logger } from 'pino';
import { toLeafgateError, type CertMessage, type DownKind, type ErrorBody } from '../protocol/index.ts';
import type { AuthorityClient } from './authority-client.ts';
import type { AuthorityGate } from './authority-gate.ts';
import type { OutboxStore, OutboxEntry } from './outbox.ts';

export interface OutboxWorkerOptions {
  outbox: OutboxStore;
  authority: AuthorityClient;
  /** Shared bound on requests in flight to the authority. */
  gate: AuthorityGate;
  publish(deviceId: string, kind: DownKind, body: unknown): void;
  /**
   * An answer is only published (and an error marked delivered) while the device is
   * connected: to this gateway, or in a cluster to any of them.
   */
  isConnected(deviceId: string): boolean | Promise<boolean>;
  logger: Logger;
  /** Requests in flight to the authority at once. */
  concurrency?: number;
  baseBackoffMs?: number;
  maxBackoffMs?: number;
  /** A request still unanswered after this long fails with authority_unavailable. */
  maxAgeMs?: number;
  /** How often due entries are looked for (also kicked on every new entry). */
  pollMs?: number;
  onAnswer?(e: { entry: OutboxEntry; ok: boolean; code?: string }): void;
}

/** Codes that mean "try again later", not "no". */
const TRANSIENT = new Set(['authority_unavailable', 'internal', 'rate_limited']);

export class OutboxWorker {
  private readonly inflight = new Set<number>();
  private timer: NodeJS.Timeout | undefined;
  private scheduled = false;
  private stopped = false;

  constructor(private readonly opts: OutboxWorkerOptions) {}

  start(): void {
    this.stopped = false;
    this.timer = setInterval(() => this.kick(), this.opts.pollMs ?? 1000);
    this.timer.unref();
    this.kick();
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
  }

  get inFlight(): number {
    return this.inflight.size;
  }

  /** Looks for due work on the next turn (coalesces bursts of kicks). */
  kick(): void {
    if (this.scheduled || this.stopped) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      void this.drain();
    });
  }

  private draining = false;

  private again = false;
  private storeDown = false;

  private async drain(): Promise<void> {
    if (this.draining) {
      this.again = true;
      return;
    }
    const max = this.opts.concurrency ?? 16;
    const free = max - this.inflight.size;
    if (free <= 0) return;
    this.draining = true;
    let due: OutboxEntry[];
    try {
      // In seq order: a queue that built up while the authority was away drains in arrival order.
      // A leasing store (Redis) never returns what is in flight; the local one does, so ask for more.
      due = await this.opts.outbox.due(Date.now(), this.opts.outbox.leasing ? free : free + this.inflight.size, this.leaseMs());
    } catch (err) {
      // Once per outage, not once per poll.
      if (!this.storeDown) this.opts.logger.warn({ err: (err as Error).message }, 'outbox unavailable; queued requests wait');
      this.storeDown = true;
      return;
    } finally {
      this.draining = false;
      if (this.again) {
        this.again = false;
        this.kick();
      }
    }
    if (this.storeDown) this.opts.logger.info('outbox available again');
    this.storeDown = false;
    for (const entry of due) {
      if (this.inflight.size >= max) break;
      if (this.inflight.has(entry.seq)) continue;
      this.inflight.add(entry.seq);
      void this.send(entry)
        .catch((err) => this.opts.logger.warn({ err: (err as Error).message, deviceId: entry.deviceId, requestId: entry.requestId }, 'outbox step failed; the entry is retried when its lease ends'))
        .finally(() => {
          this.inflight.delete(entry.seq);
          this.kick();
        });
    }
  }

  /** A claimed entry is someone else's to retry only after the longest a send can take. */
  private leaseMs(): number {
    return Math.max(60_000, (this.opts.maxBackoffMs ?? 60_000) * 2);
  }

  private async send(entry: OutboxEntry): Promise<void> {
    const path = entry.kind === 'renew' ? '/v1/devices/renew' : '/v1/devices/csr';
    try {
      const cert = await this.opts.gate.run(() => this.opts.authority.post<CertMessage>(path, entry.body));
      if (await this.opts.outbox.finish(entry.seq, 'done', cert as unknown as Record<string, unknown>, Date.now())) await this.deliver({ ...entry, state: 'done', response: cert as unknown as Record<string, unknown> });
      this.opts.onAnswer?.({ entry, ok: true });
    } catch (err) {
      const e = toLeafgateError(err);
      const age = Date.now() - entry.createdAt;
      if (TRANSIENT.has(e.code) && age < (this.opts.maxAgeMs ?? 7 * 86_400_000)) {
        const cap = Math.min(this.opts.maxBackoffMs ?? 60_000, (this.opts.baseBackoffMs ?? 500) * 2 ** Math.min(entry.attempts, 20));
        const delay = Math.max(e.retryAfterMs ?? 0, Math.round(cap / 2 + Math.random() * (cap / 2)));
        await this.opts.outbox.reschedule(entry.seq, Date.now() + delay);
        if (entry.attempts === 0) this.opts.publish(entry.deviceId, 'pending', { requestId: entry.requestId, retryAfterMs: delay });
        this.opts.logger.info({ deviceId: entry.deviceId, requestId: entry.requestId, code: e.code, attempt: entry.attempts + 1, retryInMs: delay }, 'authority did not answer; request stays queued');
        return;
      }
      const body: ErrorBody = e.toBody(entry.requestId);
      if (await this.opts.outbox.finish(entry.seq, 'failed', body as unknown as Record<string, unknown>, Date.now())) await this.deliver({ ...entry, state: 'failed', response: body as unknown as Record<string, unknown> });
      this.opts.onAnswer?.({ entry, ok: false, code: e.code });
    }
  }

  /** Every queued entry is due now (the authority link just came back). */
  retryAllNow(): void {
    Promise.resolve(this.opts.outbox.retryAllNow(Date.now()))
      .catch((err) => this.opts.logger.warn({ err: (err as Error).message }, 'outbox unavailable; queued requests are retried on schedule'))
      .finally(() => this.kick());
  }

  /** Re-reads an entry and delivers what it holds now (a repeat of a stored request). */
  async deliverFresh(deviceId: string, requestId: string): Promise<void> {
    try {
      const entry = await this.opts.outbox.get(deviceId, requestId);
      if (entry) await this.deliver(entry);
    } catch (err) {
      this.opts.logger.warn({ err: (err as Error).message, deviceId, requestId }, 'stored answer could not be read');
    }
  }

  /** Publishes the stored answer of a final entry (or `pending` for a queued one). */
  async deliver(entry: OutboxEntry): Promise<void> {
    // Not connected: the answer stays undelivered and goes out when the device subscribes.
    if (!(await this.opts.isConnected(entry.deviceId))) return;
    if (entry.state === 'queued') {
      this.opts.publish(entry.deviceId, 'pending', { requestId: entry.requestId, retryAfterMs: Math.max(1000, entry.nextAttemptAt - Date.now()) });
      return;
    }
    this.opts.publish(entry.deviceId, entry.state === 'done' ? 'cert' : 'error', entry.response);
    // A certificate counts as delivered only once the device shows it has it (it connects
    // with it, see OnboardingRelay.deliverStored): a device that dropped right after asking
    // gets it again. An error can always be asked again, so it is sent once.
    if (entry.state === 'failed') await this.opts.outbox.markDelivered(entry.seq, Date.now());
  }

  async markDelivered(entry: OutboxEntry): Promise<void> {
    await this.opts.outbox.markDelivered(entry.seq, Date.now());
  }
}
