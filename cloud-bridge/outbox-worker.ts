/**
 * Sends outbox entries to the authority in order, with capped exponential backoff and full
 * jitter while it is unreachable, and delivers each answer to the device exactly once per
 * completion (a device that missed it gets it again when it subscribes or re-asks).
 */
import type { Logger } from 'pino';
import { toLeafgateError, type CertMessage, type DownKind, type ErrorBody } from '../protocol/index.ts';
import type { AuthorityClient } from './authority-client.ts';
import type { AuthorityGate } from './authority-gate.ts';
import type { Outbox, OutboxEntry } from './outbox.ts';

export interface OutboxWorkerOptions {
  outbox: Outbox;
  authority: AuthorityClient;
  /** Shared bound on requests in flight to the authority. */
  gate: AuthorityGate;
  publish(deviceId: string, kind: DownKind, body: unknown): void;
  /** An answer is only published (and marked delivered) while the device is connected. */
  isConnected(deviceId: string): boolean;
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
      this.drain();
    });
  }

  private drain(): void {
    const free = (this.opts.concurrency ?? 16) - this.inflight.size;
    if (free <= 0) return;
    // In seq order: a queue that built up while the authority was away drains in arrival order.
    for (const entry of this.opts.outbox.due(Date.now(), free + this.inflight.size)) {
      if (this.inflight.size >= (this.opts.concurrency ?? 16)) break;
      if (this.inflight.has(entry.seq)) continue;
      this.inflight.add(entry.seq);
      void this.send(entry).finally(() => {
        this.inflight.delete(entry.seq);
        this.kick();
      });
    }
  }

  private async send(entry: OutboxEntry): Promise<void> {
    const path = entry.kind === 'renew' ? '/v1/devices/renew' : '/v1/devices/csr';
    try {
      const cert = await this.opts.gate.run(() => this.opts.authority.post<CertMessage>(path, entry.body));
      if (this.opts.outbox.finish(entry.seq, 'done', cert as unknown as Record<string, unknown>, Date.now())) this.deliver({ ...entry, state: 'done', response: cert as unknown as Record<string, unknown> });
      this.opts.onAnswer?.({ entry, ok: true });
    } catch (err) {
      const e = toLeafgateError(err);
      const age = Date.now() - entry.createdAt;
      if (TRANSIENT.has(e.code) && age < (this.opts.maxAgeMs ?? 7 * 86_400_000)) {
        const cap = Math.min(this.opts.maxBackoffMs ?? 60_000, (this.opts.baseBackoffMs ?? 500) * 2 ** Math.min(entry.attempts, 20));
        const delay = Math.max(e.retryAfterMs ?? 0, Math.round(cap / 2 + Math.random() * (cap / 2)));
        this.opts.outbox.reschedule(entry.seq, Date.now() + delay);
        if (entry.attempts === 0) this.opts.publish(entry.deviceId, 'pending', { requestId: entry.requestId, retryAfterMs: delay });
        this.opts.logger.info({ deviceId: entry.deviceId, requestId: entry.requestId, code: e.code, attempt: entry.attempts + 1, retryInMs: delay }, 'authority did not answer; request stays queued');
        return;
      }
      const body: ErrorBody = e.toBody(entry.requestId);
      if (this.opts.outbox.finish(entry.seq, 'failed', body as unknown as Record<string, unknown>, Date.now())) this.deliver({ ...entry, state: 'failed', response: body as unknown as Record<string, unknown> });
      this.opts.onAnswer?.({ entry, ok: false, code: e.code });
    }
  }

  /** Every queued entry is due now (the authority link just came back). */
  retryAllNow(): void {
    this.opts.outbox.retryAllNow(Date.now());
    this.kick();
  }

  /** Publishes the stored answer of a final entry (or `pending` for a queued one). */
  deliver(entry: OutboxEntry): void {
    // Not connected: the answer stays undelivered and goes out when the device subscribes.
    if (!this.opts.isConnected(entry.deviceId)) return;
    if (entry.state === 'queued') {
      this.opts.publish(entry.deviceId, 'pending', { requestId: entry.requestId, retryAfterMs: Math.max(1000, entry.nextAttemptAt - Date.now()) });
      return;
    }
    this.opts.publish(entry.deviceId, entry.state === 'done' ? 'cert' : 'error', entry.response);
    // A certificate counts as delivered only once the device shows it has it (it connects
    // with it, see OnboardingRelay.deliverStored): a device that dropped right after asking
    // gets it again. An error can always be asked again, so it is sent once.
    if (entry.state === 'failed') this.opts.outbox.markDelivered(entry.seq, Date.now());
  }

  markDelivered(entry: OutboxEntry): void {
    this.opts.outbox.markDelivered(entry.seq, Date.now());
  }
}
