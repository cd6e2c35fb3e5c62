/**
 * The durable outbox: a CSR accepted from a device is written here before the broker
 * acknowledges it, then sent to the authority until it has an answer. One SQLite file in
 * WAL mode; an accepted request is on disk (the WAL fsynced) before accept() resolves, so
 * it survives a crash or a power cut; (device, requestId) is unique, so a request is
 * completed exactly once and a repeat gets the stored answer.
 */
import Database from 'better-sqlite3';
import { createHash } from 'node:crypto';
import { accessSync, closeSync, constants, fstatSync, fsync, fsyncSync, openSync, statSync, statfsSync } from 'node:fs';
import { dirname } from 'node:path';
import { LeafgateError } from '../protocol/index.ts';

export type OutboxKind = 'csr' | 'renew';
export type OutboxState = 'queued' | 'done' | 'failed';

export interface OutboxEntry {
  seq: number;
  deviceId: string;
  requestId: string;
  kind: OutboxKind;
  body: Record<string, unknown>;
  bodyHash: string;
  state: OutboxState;
  attempts: number;
  nextAttemptAt: number;
  response: Record<string, unknown> | null;
  createdAt: number;
  deliveredAt: number | null;
}

const SCHEMA = `
CREATE TABLE IF NOT EXISTS outbox (
  seq             INTEGER PRIMARY KEY AUTOINCREMENT,
  device_id       TEXT NOT NULL,
  request_id      TEXT NOT NULL,
  kind            TEXT NOT NULL,
  body            TEXT NOT NULL,
  body_hash       TEXT NOT NULL,
  state           TEXT NOT NULL,
  attempts        INTEGER NOT NULL DEFAULT 0,
  next_attempt_at BIGINT NOT NULL,
  response        TEXT,
  created_at      BIGINT NOT NULL,
  completed_at    BIGINT,
  delivered_at    BIGINT,
  UNIQUE (device_id, request_id)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at, seq);
CREATE INDEX IF NOT EXISTS outbox_undelivered ON outbox (device_id, delivered_at);
CREATE TABLE IF NOT EXISTS outbox_probe (id INTEGER PRIMARY KEY, at BIGINT NOT NULL);
`;

type Row = Record<string, any>;

const toEntry = (r: Row): OutboxEntry => ({
  seq: r.seq, deviceId: r.device_id, requestId: r.request_id, kind: r.kind, body: JSON.parse(r.body), bodyHash: r.body_hash, state: r.state,
  attempts: r.attempts, nextAttemptAt: r.next_attempt_at, response: r.response ? JSON.parse(r.response) : null, createdAt: r.created_at, deliveredAt: r.delivered_at,
});

/**
 * What the relay and the worker need from an outbox. The embedded SQLite outbox answers
 * synchronously; the Redis one (a gateway cluster) with promises; callers await both.
 */
export interface OutboxStore {
  /** True when due() leases what it returns (shared by several gateways). */
  readonly leasing?: boolean;
  get(deviceId: string, requestId: string): OutboxEntry | null | Promise<OutboxEntry | null>;
  accept(deviceId: string, requestId: string, kind: OutboxKind, body: Record<string, unknown>, now: number): { entry: OutboxEntry; isNew: boolean } | Promise<{ entry: OutboxEntry; isNew: boolean }>;
  /**
   * Entries due now, claimed for this worker: in a cluster each is leased for `leaseMs`, so
   * two gateways do not send the same request at once (the authority's idempotency would
   * make that harmless, but it costs a round trip).
   */
  due(now: number, limit: number, leaseMs?: number): OutboxEntry[] | Promise<OutboxEntry[]>;
  finish(seq: number, state: 'done' | 'failed', response: Record<string, unknown>, now: number): boolean | Promise<boolean>;
  reschedule(seq: number, nextAttemptAt: number): void | Promise<void>;
  retryAllNow(now: number): void | Promise<void>;
  markDelivered(seq: number, now: number): void | Promise<void>;
  undelivered(deviceId: string): OutboxEntry[] | Promise<OutboxEntry[]>;
  pendingCount(): number | Promise<number>;
  /** Queued requests and the creation time of the oldest (null when none or not known). */
  backlog?(): { count: number; oldestCreatedAt: number | null } | Promise<{ count: number; oldestCreatedAt: number | null }>;
  /**
   * False while the store cannot take new requests (disk full, read-only, write errors):
   * the gateway is then not ready and devices are told `gateway_unavailable`.
   */
  writable?(): boolean;
  purge(before: number): number | Promise<number>;
  close(): void | Promise<void>;
}

/** The retry hint given to a device whose CSR could not be stored. */
export const STORE_RETRY_AFTER_MS = 5_000;
/** Below this much free space on the outbox's file system the gateway reports itself not ready. */
export const MIN_FREE_BYTES = 1024 * 1024;

const storeUnavailable = (what: string, err: unknown) =>
  new LeafgateError('gateway_unavailable', `outbox ${what} failed: ${(err as Error).message}`, { retryAfterMs: STORE_RETRY_AFTER_MS });

export const hashRequestBody = (body: unknown) => createHash('sha256').update(JSON.stringify(body)).digest('hex');

interface PendingAccept {
  deviceId: string;
  requestId: string;
  kind: OutboxKind;
  body: Record<string, unknown>;
  now: number;
  resolve: (v: { entry: OutboxEntry; isNew: boolean }) => void;
  reject: (e: Error) => void;
}

export class Outbox implements OutboxStore {
  private readonly db: Database.Database;
  /** Same file, synchronous=NORMAL: for updates whose loss a crash repairs by itself. */
  private readonly lazy: Database.Database;
  private readonly st: Record<string, Database.Statement>;
  private readonly walPath: string;
  private readonly walMode: boolean;
  private wal: { fd: number; ino: number } | undefined;
  /** Accepts of the current event-loop turn, committed together (group commit). */
  private batch: PendingAccept[] = [];
  private flushing = 0;
  private closed = false;
  /** Set by a failed write, cleared by the next write (or probe) that succeeds. */
  private writeFailed = false;
  private lastProbeAt = 0;
  private readonly dir: string;

  constructor(file: string) {
    this.walPath = `${file}-wal`;
    this.dir = dirname(file);
    this.db = new Database(file);
    // Accepts are durable by an fsync of the WAL that accept() awaits (see flush), one per
    // batch and on the threadpool; a synchronous=FULL commit would block the event loop for
    // the whole fsync (~0.9 ms here) once per CSR. A file system that refuses WAL mode gets
    // synchronous=FULL commits instead.
    this.walMode = String(this.db.pragma('journal_mode = WAL', { simple: true })).toLowerCase() === 'wal';
    this.db.pragma(this.walMode ? 'synchronous = NORMAL' : 'synchronous = FULL');
    this.db.exec(SCHEMA);
    // Answers, retries and delivery marks need no fsync of their own: lost in a power cut,
    // the request is resent, and the authority's idempotency returns the same answer.
    this.lazy = new Database(file);
    this.lazy.pragma('synchronous = NORMAL');
    this.lazy.pragma('busy_timeout = 5000');
    const p = (sql: string) => this.db.prepare(sql);
    const l = (sql: string) => this.lazy.prepare(sql);
    this.st = {
      get: p('SELECT * FROM outbox WHERE device_id = ? AND request_id = ?'),
      insert: p(`INSERT INTO outbox (device_id, request_id, kind, body, body_hash, state, next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?)
        ON CONFLICT (device_id, request_id) DO NOTHING`),
      due: p("SELECT * FROM outbox WHERE state = 'queued' AND next_attempt_at <= ? ORDER BY seq LIMIT ?"),
      complete: l("UPDATE outbox SET state = ?, response = ?, completed_at = ? WHERE seq = ? AND state = 'queued'"),
      reschedule: l("UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ? WHERE seq = ? AND state = 'queued'"),
      delivered: l('UPDATE outbox SET delivered_at = ? WHERE seq = ?'),
      undelivered: p("SELECT * FROM outbox WHERE device_id = ? AND state != 'queued' AND delivered_at IS NULL ORDER BY seq"),
      retryNow: l("UPDATE outbox SET next_attempt_at = ? WHERE state = 'queued' AND next_attempt_at > ?"),
      pending: p("SELECT COUNT(*) AS n FROM outbox WHERE state = 'queued'"),
      backlog: p("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM outbox WHERE state = 'queued'"),
      probe: p('INSERT INTO outbox_probe (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = excluded.at'),
      purge: l("DELETE FROM outbox WHERE state != 'queued' AND completed_at < ?"),
    };
  }

  get(deviceId: string, requestId: string): OutboxEntry | null {
    let r: Row | undefined;
    try {
      r = this.st.get.get(deviceId, requestId) as Row | undefined;
    } catch (err) {
      throw storeUnavailable('read', err);
    }
    return r ? toEntry(r) : null;
  }

  /**
   * Stores a new request, or returns the existing one for the same (device, requestId) and
   * body; resolves once the request is on disk. The same requestId with another body is a
   * conflict.
   *
   * Group commit: the accepts of one event-loop turn go into one transaction, and one fsync
   * of the WAL, run on the threadpool, makes them all durable; only then do they resolve
   * (and the broker send their PUBACKs).
   */
  accept(deviceId: string, requestId: string, kind: OutboxKind, body: Record<string, unknown>, now: number): Promise<{ entry: OutboxEntry; isNew: boolean }> {
    if (this.closed) return Promise.reject(new LeafgateError('gateway_unavailable', 'outbox is closed'));
    return new Promise((resolve, reject) => {
      if (this.batch.push({ deviceId, requestId, kind, body, now, resolve, reject }) === 1) setImmediate(() => this.flush());
    });
  }

  private flush(): void {
    const batch = this.batch;
    this.batch = [];
    if (!batch.length) return;
    const results: Array<{ entry: OutboxEntry; isNew: boolean } | Error> = [];
    try {
      this.db.transaction(() => {
        for (const a of batch) {
          const hash = hashRequestBody(a.body);
          const isNew = this.st.insert.run(a.deviceId, a.requestId, a.kind, JSON.stringify(a.body), hash, a.now, a.now).changes === 1;
          const entry = this.get(a.deviceId, a.requestId)!;
          results.push(!isNew && entry.bodyHash !== hash ? new LeafgateError('request_conflict', `requestId ${a.requestId} was already used for another request`) : { entry, isNew });
        }
      })();
    } catch (err) {
      // Disk full (SQLITE_FULL), read-only (SQLITE_READONLY), I/O error: nothing of this batch
      // was stored (the transaction rolled back), so nothing was acknowledged; the device
      // retries the same request later.
      this.writeFailed = true;
      for (const a of batch) a.reject(storeUnavailable('write', err));
      return;
    }
    const settle = (err: Error | null) => {
      this.flushing--;
      this.writeFailed = err !== null;
      batch.forEach((a, i) => {
        const r = results[i];
        if (err) a.reject(storeUnavailable('fsync', err));
        else if (r instanceof Error) a.reject(r);
        else a.resolve(r);
      });
    };
    this.flushing++;
    if (!this.walMode) {
      // synchronous=FULL: the commit above was durable already.
      settle(null);
      return;
    }
    let fd: number;
    try {
      fd = this.walFd();
    } catch (err) {
      settle(err as Error);
      return;
    }
    fsync(fd, settle);
  }

  /**
   * An fd of the WAL file, to fsync it (fsync makes the file's data durable whichever fd
   * wrote it). SQLite keeps the WAL file while a connection is open and restarts it in
   * place after a checkpoint; should it ever be replaced (another inode), the fd follows.
   */
  private walFd(): number {
    const ino = statSync(this.walPath).ino;
    if (this.wal?.ino !== ino) {
      if (this.wal && this.flushing <= 1) closeSync(this.wal.fd);
      const fd = openSync(this.walPath, 'r');
      this.wal = { fd, ino: fstatSync(fd).ino };
      // A new WAL file's directory entry must be durable too.
      const dir = openSync(dirname(this.walPath), 'r');
      try {
        fsyncDir(dir);
      } finally {
        closeSync(dir);
      }
    }
    return this.wal.fd;
  }

  due(now: number, limit: number): OutboxEntry[] {
    return (this.st.due.all(now, limit) as Row[]).map(toEntry);
  }

  /** Records the final answer (a certificate, or an error body); false if already final. */
  finish(seq: number, state: 'done' | 'failed', response: Record<string, unknown>, now: number): boolean {
    return this.st.complete.run(state, JSON.stringify(response), now, seq).changes === 1;
  }

  reschedule(seq: number, nextAttemptAt: number): void {
    this.st.reschedule.run(nextAttemptAt, seq);
  }

  retryAllNow(now: number): void {
    this.st.retryNow.run(now, now);
  }

  markDelivered(seq: number, now: number): void {
    this.st.delivered.run(now, seq);
  }

  undelivered(deviceId: string): OutboxEntry[] {
    return (this.st.undelivered.all(deviceId) as Row[]).map(toEntry);
  }

  pendingCount(): number {
    return (this.st.pending.get() as Row).n;
  }

  backlog(): { count: number; oldestCreatedAt: number | null } {
    const r = this.st.backlog.get() as Row;
    return { count: r.n, oldestCreatedAt: r.oldest ?? null };
  }

  /**
   * Whether a new request can be stored now: the directory is writable (not a read-only
   * mount), at least MIN_FREE_BYTES are free, and the last write succeeded. After a failed
   * write a probe write (at most once a second) tells when the store works again, so the
   * gateway becomes ready without waiting for a device to try.
   */
  writable(): boolean {
    if (this.closed) return false;
    try {
      accessSync(this.dir, constants.W_OK);
      const fs = statfsSync(this.dir);
      if (fs.bavail * fs.bsize < MIN_FREE_BYTES) return false;
    } catch {
      return false;
    }
    if (this.writeFailed && Date.now() - this.lastProbeAt >= 1000) {
      this.lastProbeAt = Date.now();
      try {
        this.st.probe.run(Date.now());
        this.writeFailed = false;
      } catch {
        // still failing
      }
    }
    return !this.writeFailed;
  }

  /** Drops final entries older than `before` (answers are kept for re-queries until then). */
  purge(before: number): number {
    return this.st.purge.run(before).changes;
  }

  /** Waits for accepts in flight (their fsync), then closes. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.batch.length) this.flush();
    while (this.flushing > 0) await new Promise((r) => setTimeout(r, 5));
    this.lazy.close();
    this.db.close();
    if (this.wal) closeSync(this.wal.fd);
    this.wal = undefined;
  }
}

function fsyncDir(fd: number): void {
  try {
    fsyncSync(fd);
  } catch {
    // Some file systems refuse fsync on a directory (EINVAL); the data fsync still holds.
  }
}
