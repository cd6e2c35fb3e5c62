/**
 * The loop every external-registry connector shares. Work is derived from certificate rows
 * not yet synced to this target (so a crash loses nothing). Each row syncs on its own:
 *
 * - a failure that is the row's own (a 4xx about that device: 400, 404, 409, 412, ...) backs
 *   off that row only (attempt count and next-attempt time in the store) and, past
 *   `maxAttempts`, parks it as failed (`leafgate authority devices --status sync-failed`,
 *   metric leafgate_authority_registry_sync_failed) while the other rows go on;
 * - a failure of the target itself (429, 5xx, 401/403, no answer) pauses the whole target,
 *   honouring Retry-After in both of its forms (delay-seconds or HTTP-date, RFC 9110
 *   section 10.2.3), without counting against the rows;
 * - revocations are listed first (see listHubPending), so a revoked device does not stay
 *   enabled behind a queue of creates;
 * - every call waits for the target's pacer (its quota) and is audited.
 */
import type { Logger } from 'pino';
import type { AuthorityStore, CertificateRow, PendingCertificateRow, RegistryTarget } from '../store/index.ts';
import { Pacer } from './pacer.ts';

export interface RegistrySyncOptions {
  store: AuthorityStore;
  logger: Logger;
  pollMs?: number;
  /** Cap of the target-wide pause after a throttle or an outage without Retry-After. */
  maxBackoffMs?: number;
  /** Failed attempts after which a row is parked as failed (default 10). */
  maxAttempts?: number;
  /** First per-row back-off, doubled per failed attempt (default 5 s). */
  retryBaseMs?: number;
  /** Cap of the per-row back-off (default 1 h). */
  retryMaxMs?: number;
  /** Calls per minute allowed to this target (its quota); unpaced when absent. */
  pacer?: Pacer;
  now?: () => number;
  /** Metrics hooks: a 429 seen, a row synced. */
  onThrottled?: () => void;
  onSynced?: (at: number) => void;
}

interface SdkError extends Error {
  response?: { statusCode?: number; headers?: Record<string, string | string[] | undefined> };
  statusCode?: number;
}

export function statusOf(err: unknown): number | undefined {
  const e = err as SdkError;
  return e?.response?.statusCode ?? e?.statusCode;
}

/**
 * Retry-After as milliseconds from `now`: delay-seconds (`120`) or an HTTP-date
 * (`Fri, 31 Dec 1999 23:59:59 GMT`), RFC 9110 section 10.2.3. undefined when absent or unreadable.
 */
export function parseRetryAfter(value: string | string[] | undefined, now: number): number | undefined {
  const v = [value].flat()[0]?.trim();
  if (!v) return undefined;
  if (/^\d+$/.test(v)) return Number(v) * 1000;
  const at = Date.parse(v);
  return Number.isFinite(at) ? Math.max(0, at - now) : undefined;
}

/** A failure of the target as a whole (throttled, down, credentials), not of one device. */
export function isTargetWide(err: unknown): boolean {
  const s = statusOf(err);
  return s === undefined || s === 401 || s === 403 || s === 408 || s === 429 || s >= 500;
}

export abstract class RegistrySync {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | null = null;
  private pausedUntil = 0;
  private failures = 0;
  /** Last time a row was synced (ms), for the metric. */
  lastSuccessAt: number | null = null;

  constructor(protected readonly base: RegistrySyncOptions, protected readonly target: RegistryTarget) {}

  protected now(): number {
    return this.base.now?.() ?? Date.now();
  }

  protected abstract syncCertificate(cert: CertificateRow): Promise<void>;
  protected abstract removeDevice(deviceId: string): Promise<void>;
  /** Work that is not per certificate (e.g. a DPS enrollment group); runs first in a pass. */
  protected async prepare(): Promise<void> {}

  /** Syncs a batch of due rows; connectors with bulk calls override it. Rows are independent. */
  protected async syncRows(rows: PendingCertificateRow[]): Promise<void> {
    for (const row of rows) await this.syncRow(row);
  }

  /** Decommissioned devices; connectors with bulk calls override it. */
  protected async removeDevices(deviceIds: string[]): Promise<void> {
    for (const id of deviceIds) {
      try {
        await this.removeDevice(id);
        await this.base.store.setDeviceHubState(id, 'deleted', this.target);
      } catch (err) {
        if (isTargetWide(err)) throw err;
        this.base.logger.warn({ target: this.target, deviceId: id, status: statusOf(err), err: (err as Error).message }, 'registry delete failed; retried next pass');
      }
    }
  }

  start(): void {
    this.timer = setInterval(() => void this.sync(), this.base.pollMs ?? 1000);
    this.timer.unref();
    void this.sync();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  /** One pass over due work; concurrent calls share it. Resolves when done or paused. */
  sync(): Promise<void> {
    this.running ??= this.pass().finally(() => {
      this.running = null;
    });
    return this.running;
  }

  private async pass(): Promise<void> {
    if (this.now() < this.pausedUntil) return;
    const store = this.base.store;
    try {
      // One node at a time per target: two nodes syncing the same rows would both create the
      // device and both audit it. The other node skips this pass (try-lock, no waiting).
      await store.exclusive(`registry-sync:${this.target}`, async () => {
        await this.prepare();
        // Drain what is due (a surge drains in one pass, paced), 100 rows at a time (the bulk size).
        // A row seen again in the same state made no progress (e.g. revoked meanwhile: the next
        // pass takes it): stop there rather than loop.
        const seen = new Set<string>();
        for (;;) {
          const rows = (await store.listHubPending(100, this.target, this.now())).filter((r) => !seen.has(`${r.serial}:${r.status}`));
          if (!rows.length) break;
          for (const r of rows) seen.add(`${r.serial}:${r.status}`);
          await this.syncRows(rows);
        }
        const gone = await store.listHubDecommissioned(100, this.target);
        if (gone.length) await this.removeDevices(gone);
      });
      this.failures = 0;
    } catch (err) {
      const e = err as SdkError;
      const retryAfter = parseRetryAfter(e.response?.headers?.['retry-after'], this.now());
      const backoff = Math.min(this.base.maxBackoffMs ?? 60_000, 500 * 2 ** this.failures++);
      this.pausedUntil = this.now() + (retryAfter ?? backoff);
      this.base.logger.warn({ target: this.target, status: statusOf(e), err: e.message, retryInMs: this.pausedUntil - this.now() }, 'registry sync paused');
    }
  }

  /** Syncs one row; a failure of its own backs it off (or parks it), a target-wide one is rethrown. */
  protected async syncRow(row: PendingCertificateRow): Promise<void> {
    try {
      await this.syncCertificate(row);
    } catch (err) {
      if (isTargetWide(err)) throw err;
      await this.rowFailed(row, err);
    }
  }

  /** Marks a row synced and counts it for the metrics. */
  protected async synced(cert: CertificateRow, error?: string): Promise<void> {
    await this.base.store.markHubSynced(cert.serial, this.now(), error, this.target, cert.status);
    this.lastSuccessAt = this.now();
    this.base.onSynced?.(this.lastSuccessAt);
  }

  protected async rowFailed(row: PendingCertificateRow, err: unknown): Promise<void> {
    const attempts = row.syncAttempts + 1;
    const max = this.base.maxAttempts ?? 10;
    const now = this.now();
    const parked = attempts >= max;
    const delay = Math.min(this.base.retryMaxMs ?? 3_600_000, (this.base.retryBaseMs ?? 5000) * 2 ** (attempts - 1));
    const error = `${statusOf(err) ?? ''} ${(err as Error).message ?? String(err)}`.trim();
    await this.base.store.recordSyncFailure(row.serial, this.target, { attempts, nextAt: parked ? null : now + delay, failedAt: parked ? now : null, error, status: row.status });
    this.base.logger.warn({ target: this.target, deviceId: row.subjectId, serial: row.serial, attempts, parked, retryInMs: parked ? null : delay, err: error }, parked ? 'registry sync failed: parked' : 'registry sync failed: backing off this device');
  }

  /** Audits one call after waiting for the pacer; statuses in `tolerated` count as done (e.g. 404 on delete). */
  protected async call<T>(action: string, deviceId: string, fn: () => Promise<T>, tolerated: number[] = []): Promise<T | null> {
    await this.base.pacer?.take();
    const at = this.now();
    try {
      const r = await fn();
      await this.base.store.appendAudit({ at, action, outcome: 'ok', deviceId });
      return r;
    } catch (err) {
      const status = statusOf(err);
      if (status === 429) this.base.onThrottled?.();
      if (status !== undefined && tolerated.includes(status)) {
        await this.base.store.appendAudit({ at, action, outcome: 'ok', deviceId, detail: { status } });
        return null;
      }
      await this.base.store.appendAudit({ at, action, outcome: 'error', code: 'authority_unavailable', deviceId, detail: { status: status ?? null, message: (err as Error).message } });
      throw err;
    }
  }
}
