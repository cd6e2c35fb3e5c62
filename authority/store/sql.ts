/**
 * One small SQL layer under the store, so every query is written once: `?` placeholders,
 * portable SQL, rows as plain objects. Two drivers:
 *
 * - SQLite (better-sqlite3, the embedded default). The binding is synchronous, but the
 *   store's transactions are async functions: while one awaits, other requests run. A
 *   statement of another request that slipped into an open BEGIN would commit or roll back
 *   with it, so every statement outside a transaction waits until none is open. Transactions
 *   are *group-committed*: those that arrive while one batch is executing join it, each in its
 *   own SAVEPOINT (a failing one rolls back alone), and all share one COMMIT; a caller's
 *   promise settles only after that COMMIT. The commit is the biggest fixed cost of an
 *   issuance, so under concurrent load it is paid once per batch instead of once per request.
 * - PostgreSQL (pg Pool). `?` becomes `$1..`; int8 columns (epoch milliseconds, counts) are
 *   parsed to numbers; a transaction holds one pooled client from BEGIN to COMMIT. Pool and
 *   client errors are turned into `authority_unavailable` (HTTP 503) and logged, never an
 *   unhandled 'error' event.
 */
import { createHash } from 'node:crypto';
import Database from 'better-sqlite3';
import { closeSync, fstatSync, fsync, fsyncSync, openSync, statSync } from 'node:fs';
import { dirname } from 'node:path';
import pg from 'pg';
import { LeafgateError } from '../../protocol/index.ts';

export type Row = Record<string, any>;
export type Dialect = 'sqlite' | 'postgres';

export interface RunResult {
  /** Rows changed (INSERT/UPDATE/DELETE), or rows returned by a RETURNING clause. */
  changes: number;
  rows: Row[];
}

/** What a query can be sent to: the driver itself, or the handle of one open transaction. */
export interface Queryable {
  readonly dialect: Dialect;
  query<T extends Row = Row>(sql: string, params?: readonly unknown[]): Promise<T[]>;
  one<T extends Row = Row>(sql: string, params?: readonly unknown[]): Promise<T | undefined>;
  run(sql: string, params?: readonly unknown[]): Promise<RunResult>;
}

export interface SqlDriver extends Queryable {
  /**
   * Runs `fn` in a transaction: committed if it resolves, rolled back if it throws. `fn` must
   * only await queries on `tx` (never the network): the SQLite driver holds other writers,
   * and the PostgreSQL driver a pooled connection, until it is done.
   */
  transaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T>;
  /** Applies a multi-statement script (migrations) in one transaction. */
  migrate(migrations: Array<{ version: number; name: string; sql: string }>): Promise<number[]>;
  /**
   * Runs `fn` only if no other node runs a job of the same name at this moment (PostgreSQL:
   * a session advisory lock taken with try-lock, namespaced by schema). Answers
   * `{ ran: false }` without waiting when another node holds it. SQLite is one process:
   * it always runs (callers already keep one pass at a time in-process).
   */
  exclusive<T>(name: string, fn: () => Promise<T>): Promise<{ ran: true; value: T } | { ran: false }>;
  close(): Promise<void>;
}

/** `?` -> `$1, $2, ...`, leaving quoted strings and identifiers alone. */
export function toPgPlaceholders(sql: string): string {
  let out = '';
  let n = 0;
  let quote: string | null = null;
  for (const ch of sql) {
    if (quote) {
      if (ch === quote) quote = null;
      out += ch;
    } else if (ch === "'" || ch === '"') {
      quote = ch;
      out += ch;
    } else if (ch === '?') out += `$${++n}`;
    else out += ch;
  }
  return out;
}

/**
 * The few DDL words that differ, rewritten per dialect so that the migration files stay one
 * set. Written in SQLite's spelling; for PostgreSQL:
 *   INTEGER PRIMARY KEY AUTOINCREMENT -> BIGSERIAL PRIMARY KEY   (audit_log.seq)
 *   BLOB                              -> BYTEA
 * Nothing else is rewritten: the rest of the files must be portable SQL.
 */
export function rewriteDdl(sql: string, dialect: Dialect): string {
  if (dialect === 'sqlite') return sql;
  return sql.replace(/\bINTEGER\s+PRIMARY\s+KEY\s+AUTOINCREMENT\b/gi, 'BIGSERIAL PRIMARY KEY').replace(/\bBLOB\b/g, 'BYTEA');
}

// ---------------------------------------------------------------------------------------------
// SQLite

interface Pending {
  fn: (tx: Queryable) => Promise<unknown>;
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
}

const MAX_BATCH = 512;

function sqliteParams(params: readonly unknown[]): unknown[] {
  return params.map((p) => (p === undefined ? null : typeof p === 'boolean' ? (p ? 1 : 0) : p));
}

/**
 * fsync of a SQLite WAL file on the threadpool. fsync makes the file's data durable whichever
 * descriptor wrote it; SQLite keeps the WAL while a connection is open and restarts it in
 * place after a checkpoint, and should the file ever be replaced (another inode) the
 * descriptor follows. A new WAL file's directory entry is synced once too.
 */
class WalSync {
  private fd: number | undefined;
  private ino: number | undefined;
  inFlight = 0;

  constructor(private readonly path: string) {}

  sync(done: (err: Error | null) => void): void {
    this.inFlight++;
    const finish = (err: Error | null) => {
      this.inFlight--;
      done(err);
    };
    let fd: number;
    try {
      fd = this.descriptor();
    } catch (err) {
      finish(err as Error);
      return;
    }
    fsync(fd, finish);
  }

  private descriptor(): number {
    const ino = statSync(this.path).ino;
    if (this.fd === undefined || this.ino !== ino) {
      // An old descriptor still being synced is left open (a leak of one fd, only ever
      // after the WAL file was replaced under a live connection).
      if (this.fd !== undefined && this.inFlight <= 1) closeSync(this.fd);
      this.fd = openSync(this.path, 'r');
      this.ino = fstatSync(this.fd).ino;
      const dir = openSync(dirname(this.path), 'r');
      try {
        fsyncSync(dir);
      } catch {
        // Some file systems refuse fsync on a directory (EINVAL).
      } finally {
        closeSync(dir);
      }
    }
    return this.fd;
  }

  close(): void {
    if (this.fd !== undefined) closeSync(this.fd);
    this.fd = undefined;
  }
}

export class SqliteDriver implements SqlDriver {
  readonly dialect = 'sqlite' as const;
  private readonly db: Database.Database;
  private readonly statements = new Map<string, Database.Statement>();
  private readonly pending: Pending[] = [];
  /** True from BEGIN to COMMIT of a batch: statements outside it wait. */
  private open = false;
  private scheduled = false;
  private waiters: Array<() => void> = [];
  private closed = false;
  /** Batches committed and transactions in them: group-commit statistics (tests, benchmarks). */
  readonly stats = { batches: 0, transactions: 0 };

  /**
   * Durable commits: a batch's callers hear of their COMMIT only once the WAL is fsynced
   * (one fsync per batch, on the threadpool, so the event loop never waits on the disk), so
   * an issued certificate is on record before its answer leaves, even across a power cut.
   * `fsync: false` keeps synchronous=NORMAL alone: never corrupt, but a power cut (not a
   * process crash) can lose the last commits.
   */
  private readonly wal: WalSync | null;

  constructor(file: string, opts: { fsync?: boolean } = {}) {
    this.db = new Database(file);
    const mode = String(this.db.pragma('journal_mode = WAL', { simple: true })).toLowerCase();
    // A file system that refuses WAL mode: every COMMIT syncs by itself (FULL).
    this.db.pragma(mode === 'wal' || opts.fsync === false ? 'synchronous = NORMAL' : 'synchronous = FULL');
    this.db.pragma('foreign_keys = ON');
    this.db.pragma('busy_timeout = 5000');
    this.wal = mode === 'wal' && opts.fsync !== false ? new WalSync(`${file}-wal`) : null;
  }

  private stmt(sql: string): Database.Statement {
    let s = this.statements.get(sql);
    if (!s) {
      s = this.db.prepare(sql);
      this.statements.set(sql, s);
    }
    return s;
  }

  private execRun(sql: string, params: readonly unknown[]): RunResult {
    const s = this.stmt(sql);
    if (s.reader) {
      const rows = s.all(...sqliteParams(params)) as Row[];
      return { changes: rows.length, rows };
    }
    return { changes: s.run(...sqliteParams(params)).changes, rows: [] };
  }

  private execQuery(sql: string, params: readonly unknown[]): Row[] {
    const s = this.stmt(sql);
    if (!s.reader) {
      s.run(...sqliteParams(params));
      return [];
    }
    return s.all(...sqliteParams(params)) as Row[];
  }

  /**
   * Waits until no batch is open (statements outside transactions never join one), and
   * until a batch already scheduled has committed, so that a read issued after a transaction
   * sees it. One wait only: the next batch starts after the waiters ran (setImmediate), so a
   * stream of transactions cannot starve readers.
   */
  private async idle(): Promise<void> {
    if (this.closed) throw new LeafgateError('authority_unavailable', 'the store is closed');
    if (this.open || this.scheduled) await new Promise<void>((r) => this.waiters.push(r));
    while (this.open) await new Promise<void>((r) => this.waiters.push(r));
  }

  async query<T extends Row = Row>(sql: string, params: readonly unknown[] = []): Promise<T[]> {
    await this.idle();
    return this.execQuery(sql, params) as T[];
  }

  async one<T extends Row = Row>(sql: string, params: readonly unknown[] = []): Promise<T | undefined> {
    return (await this.query<T>(sql, params))[0];
  }

  async run(sql: string, params: readonly unknown[] = []): Promise<RunResult> {
    // A write outside a transaction joins the next group commit, so it is as durable as the
    // rest: its caller hears of it after the WAL fsync. As an autocommit under
    // synchronous=NORMAL a power cut could undo it after it was acted on -- a burnt challenge
    // or a consumed one-time code usable again, a CRL number issued twice, an audit line gone.
    if (this.wal && !this.stmt(sql).readonly) return this.transaction((tx) => tx.run(sql, params));
    await this.idle();
    return this.execRun(sql, params);
  }

  transaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T> {
    if (this.closed) return Promise.reject(new LeafgateError('authority_unavailable', 'the store is closed'));
    return new Promise<T>((resolve, reject) => {
      this.pending.push({ fn: fn as Pending['fn'], resolve: resolve as Pending['resolve'], reject });
      // Not at once: the batch starts after this event-loop turn, so that the transactions of
      // every request that completed in it (e.g. signatures finishing together on the
      // threadpool) share its COMMIT. Costs one setImmediate hop per batch.
      if (!this.open && !this.scheduled) {
        this.scheduled = true;
        setImmediate(() => void this.runBatch());
      }
    });
  }

  /**
   * One BEGIN .. COMMIT over every transaction waiting now and every one that arrives while
   * these execute (up to MAX_BATCH), each in its own SAVEPOINT.
   */
  private async runBatch(): Promise<void> {
    this.scheduled = false;
    if (this.open || !this.pending.length) return;
    this.open = true;
    const done: Array<{ p: Pending; ok: boolean; value: unknown }> = [];
    let active = true;
    const tx: Queryable = {
      dialect: 'sqlite',
      query: async <R extends Row>(sql: string, params: readonly unknown[] = []) => {
        if (!active) throw new Error('transaction handle used after its transaction ended');
        return this.execQuery(sql, params) as R[];
      },
      one: async <R extends Row>(sql: string, params: readonly unknown[] = []) => {
        if (!active) throw new Error('transaction handle used after its transaction ended');
        return this.execQuery(sql, params)[0] as R | undefined;
      },
      run: async (sql: string, params: readonly unknown[] = []) => {
        if (!active) throw new Error('transaction handle used after its transaction ended');
        return this.execRun(sql, params);
      },
    };
    let commitError: unknown = null;
    try {
      // IMMEDIATE: take the write lock now (another process, e.g. the CLI, may hold it:
      // busy_timeout waits), never fail later on a read-to-write upgrade.
      this.stmt('BEGIN IMMEDIATE').run();
    } catch (err) {
      commitError = err;
    }
    if (!commitError) {
      while (this.pending.length && done.length < MAX_BATCH) {
        const p = this.pending.shift()!;
        this.stmt('SAVEPOINT tx').run();
        try {
          const value = await p.fn(tx);
          this.stmt('RELEASE tx').run();
          done.push({ p, ok: true, value });
        } catch (err) {
          try {
            this.stmt('ROLLBACK TO tx').run();
            this.stmt('RELEASE tx').run();
          } catch (rollbackErr) {
            commitError = rollbackErr;
          }
          done.push({ p, ok: false, value: err });
          if (commitError) break;
        }
      }
      active = false;
      try {
        if (commitError) throw commitError;
        this.stmt('COMMIT').run();
        this.stats.batches++;
        this.stats.transactions += done.length;
      } catch (err) {
        commitError = err;
        try {
          if (this.db.inTransaction) this.stmt('ROLLBACK').run();
        } catch {
          // The connection rolled back by itself (e.g. SQLITE_FULL).
        }
      }
    }
    active = false;
    if (!commitError && this.wal && done.length) {
      // The next batch may run meanwhile; these callers wait for the disk.
      const batch = done;
      this.open = false;
      this.wal.sync((err) => {
        if (err) for (const d of batch) d.p.reject(new LeafgateError('authority_unavailable', `the store could not sync its log to disk: ${err.message}`));
        else for (const d of batch) (d.ok ? d.p.resolve : d.p.reject)(d.value);
      });
      this.afterBatch();
      return;
    }
    if (commitError) {
      // Nothing of this batch was kept: every caller hears it, including those not started.
      const failed = commitError;
      const notStarted = done.length ? [] : this.pending.splice(0, MAX_BATCH);
      for (const d of done) d.p.reject(d.ok ? failed : d.value);
      for (const p of notStarted) p.reject(failed);
    } else {
      for (const d of done) (d.ok ? d.p.resolve : d.p.reject)(d.value);
    }
    this.open = false;
    this.afterBatch();
  }

  private afterBatch(): void {
    // Statements that waited run before the next batch starts (setImmediate comes after
    // their microtasks), so a stream of transactions cannot starve readers.
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w();
    if (this.pending.length && !this.scheduled) {
      this.scheduled = true;
      setImmediate(() => void this.runBatch());
    }
  }

  async migrate(migrations: Array<{ version: number; name: string; sql: string }>): Promise<number[]> {
    await this.idle();
    return this.migrateNow(migrations);
  }

  /** Synchronous migration at open, before any query can run (SqliteStore's constructor). */
  migrateNow(migrations: Array<{ version: number; name: string; sql: string }>): number[] {
    if (this.open) throw new Error('cannot migrate inside a transaction');
    this.db.exec('CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)');
    const applied = new Set((this.db.prepare('SELECT version FROM schema_migrations').all() as Row[]).map((r) => Number(r.version)));
    const done: number[] = [];
    for (const m of migrations) {
      if (applied.has(m.version)) continue;
      this.db.transaction(() => {
        this.db.exec(rewriteDdl(m.sql, 'sqlite'));
        this.db.prepare('INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)').run(m.version, m.name, Date.now());
      })();
      done.push(m.version);
    }
    return done;
  }

  async exclusive<T>(_name: string, fn: () => Promise<T>): Promise<{ ran: true; value: T }> {
    return { ran: true, value: await fn() };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    // Let queued transactions finish: their callers were promised an answer.
    while (this.open || this.pending.length || this.scheduled || (this.wal?.inFlight ?? 0) > 0) {
      if (!this.open && this.pending.length) await this.runBatch();
      else await new Promise<void>((r) => setImmediate(r));
    }
    this.closed = true;
    this.db.close();
    this.wal?.close();
  }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

const INT8_OID = 20;
/** Epoch milliseconds and counts fit a double exactly; anything past 2^53 is refused, not rounded. */
function parseInt8(v: string): number {
  const n = Number(v);
  if (!Number.isSafeInteger(n)) throw new Error(`int8 value ${v} does not fit a JavaScript number; read it as text`);
  return n;
}
const pgTypes = {
  getTypeParser(oid: number, format?: string) {
    if (oid === INT8_OID && format !== 'binary') return parseInt8;
    return (pg.types.getTypeParser as (oid: number, format?: string) => unknown)(oid, format);
  },
};

/** Errors that mean "the database cannot be reached", as opposed to a bad query. */
const CONNECTION_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'ENOTFOUND', 'EAI_AGAIN', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EPIPE', '57P01', '57P02', '57P03', '08000', '08001', '08003', '08006', '53300']);

export function isConnectionError(err: unknown): boolean {
  const e = err as { code?: string; message?: string } | null;
  if (!e) return false;
  if (e.code && CONNECTION_CODES.has(e.code)) return true;
  return /Connection terminated|timeout exceeded when trying to connect|Client has encountered a connection error|connection timeout|Cannot use a pool after calling end/i.test(e.message ?? '');
}

/** postgres://user:secret@host/db -> postgres://user@host/db, for messages and logs. */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    u.password = '';
    return u.toString();
  } catch {
    return 'postgres://(unparsable URL)';
  }
}

export interface PgOptions {
  url: string;
  /** Where the errors of idle connections go (they would otherwise be unhandled 'error' events). */
  onError?: (err: Error) => void;
  /** Pool size per node. */
  max?: number;
  connectionTimeoutMillis?: number;
}

const SCHEMA_NAME = /^[A-Za-z_][A-Za-z0-9_]{0,62}$/;

/**
 * Pool settings from a postgres:// URL. `?schema=NAME` (ours) selects the schema through the
 * connection's search_path, so several deployments (or tests) can share one database.
 */
export function pgConfig(url: string): { config: pg.PoolConfig; schema: string | null } {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new LeafgateError('internal', 'database URL is not a valid postgres:// URL');
  }
  if (u.protocol !== 'postgres:' && u.protocol !== 'postgresql:') throw new LeafgateError('internal', 'database URL must start with postgres:// or postgresql://');
  const schema = u.searchParams.get('schema');
  u.searchParams.delete('schema');
  if (schema !== null && !SCHEMA_NAME.test(schema)) throw new LeafgateError('internal', 'database URL: schema must be a plain identifier');
  const config: pg.PoolConfig = { connectionString: u.toString() };
  if (schema) config.options = `-c search_path=${schema}`;
  return { config, schema };
}

export class PostgresDriver implements SqlDriver {
  readonly dialect = 'postgres' as const;
  readonly pool: pg.Pool;
  readonly schema: string | null;
  readonly url: string;
  private readonly onError: (err: Error) => void;
  private readonly clientConfig: pg.ClientConfig;
  private closed = false;

  constructor(opts: PgOptions) {
    const { config, schema } = pgConfig(opts.url);
    this.clientConfig = { ...config, connectionTimeoutMillis: opts.connectionTimeoutMillis ?? 5000, types: pgTypes };
    this.schema = schema;
    this.url = redactUrl(opts.url);
    this.onError = opts.onError ?? (() => undefined);
    this.pool = new pg.Pool({
      ...config,
      max: opts.max ?? 10,
      connectionTimeoutMillis: opts.connectionTimeoutMillis ?? 5000,
      idleTimeoutMillis: 30_000,
      types: pgTypes,
    });
    // An idle pooled connection that dies (server restart, network) emits 'error' on the
    // pool; without this listener it would crash the process.
    this.pool.on('error', (err) => this.onError(err));
  }

  /** Turns a driver failure into our error: unreachable database -> authority_unavailable (503). */
  private wrap(err: unknown): Error {
    if (err instanceof LeafgateError) return err;
    if (this.closed || isConnectionError(err)) {
      return new LeafgateError('authority_unavailable', `database unavailable (${this.url}): ${(err as Error)?.message ?? err}`, { retryAfterMs: 5000, cause: err });
    }
    return err as Error;
  }

  private async connect(): Promise<pg.PoolClient> {
    let client: pg.PoolClient;
    try {
      client = await this.pool.connect();
    } catch (err) {
      throw this.wrap(err);
    }
    return client;
  }

  private static params(params: readonly unknown[]): unknown[] {
    return params.map((p) => (p === undefined ? null : typeof p === 'bigint' ? p.toString() : p));
  }

  private handle(client: pg.Pool | pg.PoolClient): Queryable {
    const run = async (sql: string, params: readonly unknown[] = []): Promise<RunResult> => {
      try {
        const r = await client.query(toPgPlaceholders(sql), PostgresDriver.params(params));
        return { changes: r.command === 'SELECT' ? r.rows.length : r.rowCount ?? 0, rows: r.rows };
      } catch (err) {
        throw this.wrap(err);
      }
    };
    return {
      dialect: 'postgres',
      run,
      query: async <T extends Row>(sql: string, params?: readonly unknown[]) => (await run(sql, params)).rows as T[],
      one: async <T extends Row>(sql: string, params?: readonly unknown[]) => (await run(sql, params)).rows[0] as T | undefined,
    };
  }

  query<T extends Row = Row>(sql: string, params?: readonly unknown[]): Promise<T[]> {
    return this.handle(this.pool).query<T>(sql, params);
  }

  one<T extends Row = Row>(sql: string, params?: readonly unknown[]): Promise<T | undefined> {
    return this.handle(this.pool).one<T>(sql, params);
  }

  run(sql: string, params?: readonly unknown[]): Promise<RunResult> {
    return this.handle(this.pool).run(sql, params);
  }

  async transaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T> {
    const client = await this.connect();
    let broken: Error | undefined;
    const onClientError = (err: Error) => {
      broken = err;
    };
    client.on('error', onClientError);
    try {
      await client.query('BEGIN');
      const value = await fn(this.handle(client));
      await client.query('COMMIT');
      return value;
    } catch (err) {
      try {
        await client.query('ROLLBACK');
      } catch (rollbackErr) {
        broken ??= rollbackErr as Error;
      }
      throw this.wrap(err);
    } finally {
      client.off('error', onClientError);
      // A client whose connection failed is destroyed, not returned to the pool.
      client.release(broken);
    }
  }

  private ns: string | null = null;

  /** The schema this deployment lives in: advisory locks and the NOTIFY channel are namespaced by it. */
  async namespace(): Promise<string> {
    this.ns ??= this.schema ?? (await this.one<{ s: string | null }>('SELECT current_schema() AS s'))?.s ?? 'public';
    return this.ns;
  }

  /** Key pair of an advisory lock: (schema, name), so deployments in other schemas never collide. */
  private static readonly LOCK_KEY = 'hashtext(?), hashtext(?)';

  async migrate(migrations: Array<{ version: number; name: string; sql: string }>): Promise<number[]> {
    const client = await this.connect();
    let broken: Error | undefined;
    const onClientError = (err: Error) => {
      broken = err;
    };
    client.on('error', onClientError);
    const q = (sql: string, params: unknown[] = []) => client.query(toPgPlaceholders(sql), params);
    try {
      const ns = await this.namespace();
      await q('BEGIN');
      // Two nodes starting at once: the second waits here until the first has migrated,
      // then finds every version applied. Released at COMMIT/ROLLBACK.
      await q(`SELECT pg_advisory_xact_lock(${PostgresDriver.LOCK_KEY})`, [ns, 'leafgate:migrate']);
      if (this.schema) await q(`CREATE SCHEMA IF NOT EXISTS "${this.schema}"`);
      await q('CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)');
      const applied = new Set((await q('SELECT version FROM schema_migrations')).rows.map((r) => Number(r.version)));
      const done: number[] = [];
      for (const m of migrations) {
        if (applied.has(m.version)) continue;
        // Simple-query protocol (no parameters): a file may hold several statements.
        await client.query(rewriteDdl(m.sql, 'postgres'));
        await q('INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)', [m.version, m.name, Date.now()]);
        done.push(m.version);
      }
      await q('COMMIT');
      return done;
    } catch (err) {
      await client.query('ROLLBACK').catch(() => undefined);
      throw this.wrap(err);
    } finally {
      client.off('error', onClientError);
      client.release(broken);
    }
  }

  async exclusive<T>(name: string, fn: () => Promise<T>): Promise<{ ran: true; value: T } | { ran: false }> {
    // A session lock on a client held for the pass: if this node dies, its connection closes
    // and the lock goes with it, so a crashed node never blocks the others.
    const ns = await this.namespace();
    const client = await this.connect();
    let broken: Error | undefined;
    const onClientError = (err: Error) => {
      broken = err;
    };
    client.on('error', onClientError);
    try {
      let got: boolean;
      try {
        got = (await client.query(`SELECT pg_try_advisory_lock(${toPgPlaceholders(PostgresDriver.LOCK_KEY)}) AS ok`, [ns, name])).rows[0].ok === true;
      } catch (err) {
        throw this.wrap(err);
      }
      if (!got) return { ran: false };
      try {
        return { ran: true, value: await fn() };
      } finally {
        await client.query(`SELECT pg_advisory_unlock(${toPgPlaceholders(PostgresDriver.LOCK_KEY)})`, [ns, name]).catch((err: Error) => {
          broken ??= err;
        });
      }
    } finally {
      client.off('error', onClientError);
      client.release(broken);
    }
  }

  /** A dedicated connection outside the pool (LISTEN needs one); the caller handles its events. */
  newClient(): pg.Client {
    return new pg.Client(this.clientConfig);
  }

  /** The NOTIFY channel of this deployment (one per schema), for the cluster event bus. */
  async channel(): Promise<string> {
    return `leafgate_${createHash('sha256').update(await this.namespace()).digest('hex').slice(0, 16)}`;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.pool.end();
  }
}

/** The driver for a `database` setting: a postgres:// URL, else a SQLite file path. */
export function isPostgresUrl(database: string): boolean {
  return /^postgres(ql)?:\/\//i.test(database);
}
