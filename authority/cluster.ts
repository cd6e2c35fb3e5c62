/**
 * Cross-node signals for authority nodes that share one PostgreSQL database. Gateways hold
 * their event stream (SSE) on one node each, so what one node does (a revocation, the
 * renewal scan) must reach the gateways of every node: the node that acts sends a small
 * NOTIFY on the deployment's channel, every other node LISTENs and acts locally (reloads the
 * CRL from the store and pushes it; runs the renewal announcement for its own gateways).
 *
 * Messages carry no state that matters: the store is the truth, a message only says "look
 * again". A node that missed messages (its LISTEN connection dropped) resyncs when it
 * reconnects, and the CRL is also re-read on a timer (authority/revocation.ts). NOTIFY
 * payloads are capped at 8000 bytes by PostgreSQL, hence no lists of devices here.
 *
 * On the embedded SQLite default there is one node: LocalBus does nothing.
 */
import { randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import pg from 'pg';
import type { PostgresDriver } from './store/index.ts';

export type ClusterMessage = { type: 'crl'; crlNumber: string; revoked: string[] } | { type: 'renewal-scan' };

export interface ClusterBus {
  readonly nodeId: string;
  /** Tells the other nodes; never throws (a lost message is caught up by the timers). */
  publish(msg: ClusterMessage): Promise<void>;
  /** Messages from the other nodes (never this node's own). */
  onMessage(handler: (msg: ClusterMessage) => void): void;
  /** After a reconnect: messages may have been missed, look again. */
  onResync(handler: () => void): void;
  close(): Promise<void>;
}

export class LocalBus implements ClusterBus {
  readonly nodeId = randomBytes(8).toString('hex');
  async publish(): Promise<void> {}
  onMessage(): void {}
  onResync(): void {}
  async close(): Promise<void> {}
}

const HEX_SERIAL = /^[0-9A-F]{1,64}$/;
const MAX_PAYLOAD = 7900;

/** A notification payload is input like any other: only well-formed messages pass. */
export function parseClusterMessage(payload: string | undefined): (ClusterMessage & { origin: string }) | null {
  if (!payload || payload.length > MAX_PAYLOAD) return null;
  let m: any;
  try {
    m = JSON.parse(payload);
  } catch {
    return null;
  }
  if (!m || typeof m !== 'object' || typeof m.origin !== 'string') return null;
  if (m.type === 'renewal-scan') return { type: 'renewal-scan', origin: m.origin };
  if (m.type === 'crl' && typeof m.crlNumber === 'string' && /^\d{1,40}$/.test(m.crlNumber) && Array.isArray(m.revoked) && m.revoked.length <= 200 && m.revoked.every((s: unknown) => typeof s === 'string' && HEX_SERIAL.test(s))) {
    return { type: 'crl', crlNumber: m.crlNumber, revoked: m.revoked, origin: m.origin };
  }
  return null;
}

export class PgBus implements ClusterBus {
  readonly nodeId = randomBytes(8).toString('hex');
  private client: pg.Client | null = null;
  private readonly handlers: Array<(msg: ClusterMessage) => void> = [];
  private readonly resyncs: Array<() => void> = [];
  private closed = false;
  private retryMs = 500;
  private timer: NodeJS.Timeout | undefined;

  private constructor(
    private readonly driver: PostgresDriver,
    private readonly channel: string,
    private readonly logger: Logger,
  ) {}

  /** LISTENs on the deployment's channel (one per schema); fails if the database cannot be reached. */
  static async start(driver: PostgresDriver, logger: Logger): Promise<PgBus> {
    const bus = new PgBus(driver, await driver.channel(), logger);
    await bus.listen();
    return bus;
  }

  private async listen(): Promise<void> {
    const client = this.driver.newClient();
    // Without these listeners a dropped connection would be an unhandled 'error' event.
    client.on('error', (err) => this.lost(client, err));
    client.on('end', () => this.lost(client));
    client.on('notification', (n) => {
      if (n.channel !== this.channel) return;
      const msg = parseClusterMessage(n.payload);
      if (!msg) {
        this.logger.warn({ channel: n.channel }, 'ignored a malformed cluster notification');
        return;
      }
      if (msg.origin === this.nodeId) return;
      const { origin: _o, ...rest } = msg;
      for (const h of this.handlers) h(rest as ClusterMessage);
    });
    try {
      await client.connect();
      await client.query(`LISTEN "${this.channel}"`);
    } catch (err) {
      client.removeAllListeners('end');
      await client.end().catch(() => undefined);
      throw err;
    }
    this.client = client;
    this.retryMs = 500;
  }

  private lost(client: pg.Client, err?: Error): void {
    if (this.client !== client || this.closed) return;
    this.client = null;
    this.logger.warn({ err: err?.message }, 'cluster event connection lost; reconnecting');
    void client.end().catch(() => undefined);
    this.reconnectLater();
  }

  private reconnectLater(): void {
    if (this.closed || this.timer) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.listen().then(
        () => {
          this.logger.info('cluster event connection restored');
          for (const r of this.resyncs) r();
        },
        (err: Error) => {
          this.logger.warn({ err: err.message, retryInMs: this.retryMs }, 'cluster event connection failed');
          this.retryMs = Math.min(this.retryMs * 2, 10_000);
          this.reconnectLater();
        },
      );
    }, this.retryMs);
    this.timer.unref();
  }

  async publish(msg: ClusterMessage): Promise<void> {
    try {
      await this.driver.run('SELECT pg_notify(?, ?)', [this.channel, JSON.stringify({ ...msg, origin: this.nodeId })]);
    } catch (err) {
      this.logger.warn({ type: msg.type, err: (err as Error).message }, 'could not notify the other authority nodes; they catch up on their timers');
    }
  }

  onMessage(handler: (msg: ClusterMessage) => void): void {
    this.handlers.push(handler);
  }

  onResync(handler: () => void): void {
    this.resyncs.push(handler);
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    const c = this.client;
    this.client = null;
    if (c) await c.end().catch(() => undefined);
  }
}
