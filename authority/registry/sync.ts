/**
 * The loop every external-registry connector shares: work is derived from certificate rows
 * not yet synced to this target (so a crash loses nothing), one pass at a time, with capped
 * exponential backoff that honours Retry-After after a 429/5xx, and an audit row per call.
 */
import type { Logger } from 'pino';
import type { AuthorityStore, CertificateRow, RegistryTarget } from '../store/index.ts';

export interface RegistrySyncOptions {
  store: AuthorityStore;
  logger: Logger;
  pollMs?: number;
  maxBackoffMs?: number;
  now?: () => number;
}

interface SdkError extends Error {
  response?: { statusCode?: number; headers?: Record<string, string | string[] | undefined> };
  statusCode?: number;
}

export function statusOf(err: unknown): number | undefined {
  const e = err as SdkError;
  return e?.response?.statusCode ?? e?.statusCode;
}

export abstract class RegistrySync {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | null = null;
  private backoffUntil = 0;
  private failures = 0;

  constructor(protected readonly base: RegistrySyncOptions, protected readonly target: RegistryTarget) {}

  protected now(): number {
    return this.base.now?.() ?? Date.now();
  }

  protected abstract syncCertificate(cert: CertificateRow): Promise<void>;
  protected abstract removeDevice(deviceId: string): Promise<void>;
  /** Work that is not per certificate (e.g. a DPS enrollment group); runs first in a pass. */
  protected async prepare(): Promise<void> {}

  start(): void {
    this.timer = setInterval(() => void this.sync(), this.base.pollMs ?? 1000);
    this.timer.unref();
    void this.sync();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  /** One pass over pending work; concurrent calls share it. Resolves when done or backing off. */
  sync(): Promise<void> {
    this.running ??= this.pass().finally(() => {
      this.running = null;
    });
    return this.running;
  }

  private async pass(): Promise<void> {
    if (this.now() < this.backoffUntil) return;
    const store = this.base.store;
    try {
      // One node at a time per target: two nodes syncing the same rows would both create the
      // device and both audit it. The other node skips this pass (try-lock, no waiting).
      await store.exclusive(`registry-sync:${this.target}`, async () => {
        await this.prepare();
        for (const cert of await store.listHubPending(50, this.target)) await this.syncCertificate(cert);
        for (const deviceId of await store.listHubDecommissioned(50, this.target)) {
          await this.removeDevice(deviceId);
          await store.setDeviceHubState(deviceId, 'deleted', this.target);
        }
      });
      this.failures = 0;
    } catch (err) {
      const e = err as SdkError;
      const retryAfter = Number([e.response?.headers?.['retry-after']].flat()[0]);
      const backoff = Math.min(this.base.maxBackoffMs ?? 60_000, 500 * 2 ** this.failures++);
      this.backoffUntil = this.now() + Math.max(Number.isFinite(retryAfter) ? retryAfter * 1000 : 0, backoff);
      this.base.logger.warn({ target: this.target, status: statusOf(e), err: e.message, retryInMs: this.backoffUntil - this.now() }, 'registry sync paused');
    }
  }

  /** Audits one call; statuses in `tolerated` count as done (e.g. 404 on delete). */
  protected async call<T>(action: string, deviceId: string, fn: () => Promise<T>, tolerated: number[] = []): Promise<T | null> {
    const at = this.now();
    try {
      const r = await fn();
      await this.base.store.appendAudit({ at, action, outcome: 'ok', deviceId });
      return r;
    } catch (err) {
      const status = statusOf(err);
      if (status !== undefined && tolerated.includes(status)) {
        await this.base.store.appendAudit({ at, action, outcome: 'ok', deviceId, detail: { status } });
        return null;
      }
      await this.base.store.appendAudit({ at, action, outcome: 'error', code: 'authority_unavailable', deviceId, detail: { status: status ?? null, message: (err as Error).message } });
      throw err;
    }
  }
}
