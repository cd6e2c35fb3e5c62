/**
 * The durable outbox: a CSR accepted from a device is written here before the broker
 * acknowledges it, then sent to the authority until it has an answer. One SQLite file,
 * WAL with synchronous=FULL, so an accepted request survives a crash or a power cut;
 * (device, requestId) is unique, so a request is completed exactly once and a repeat gets
 * the stored answer.
 */
import Database from 'better-sqlite3';
import { createHash } from 'node:crypto';
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
  purge(before: number): number | Promise<number>;
  close(): void | Promise<void>;
}

export const hashRequestBody = (body: unknown) => createHash('sha256').update(JSON.stringify(body)).digest('hex');

export class Outbox implements OutboxStore {
  private readonly db: Database.Database;
  /** Same file, synchronous=NORMAL: for updates whose loss a crash repairs by itself. */
  private readonly lazy: Database.Database;
  private readonly st: Record<string, Database.Statement>;

  constructor(file: string) {
    this.db = new Database(file);
    this.db.pragma('journal_mode = WAL');
    // FULL: an accepted request is on disk (fsync) before the device's PUBACK is written.
    this.db.pragma('synchronous = FULL');
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
      purge: l("DELETE FROM outbox WHERE state != 'queued' AND completed_at < ?"),
    };
  }

  get(deviceId: string, requestId: string): OutboxEntry | null {
    const r = this.st.get.get(deviceId, requestId) as Row | undefined;
    return r ? toEntry(r) : null;
  }

  /**
   * Stores a new request, or returns the existing one for the same (device, requestId) and
   * body. The same requestId with another body is a conflict.
   */
  accept(deviceId: string, requestId: string, kind: OutboxKind, body: Record<string, unknown>, now: number): { entry: OutboxEntry; isNew: boolean } {
    const hash = hashRequestBody(body);
    const isNew = this.st.insert.run(deviceId, requestId, kind, JSON.stringify(body), hash, now, now).changes === 1;
    const entry = this.get(deviceId, requestId)!;
    if (!isNew && entry.bodyHash !== hash) throw new LeafgateError('request_conflict', `requestId ${requestId} was already used for another request`);
    return { entry, isNew };
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

  /** Drops final entries older than `before` (answers are kept for re-queries until then). */
  purge(before: number): number {
    return this.st.purge.run(before).changes;
  }

  close(): void {
    this.lazy.close();
    this.db.close();
  }
}
