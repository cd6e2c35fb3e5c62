/**
 * Client process of the connections benchmark (spawned with a raised fd limit, IPC-driven):
 * issues operational certificates for its slice of devices straight from the authority's
 * LocalCa, then opens mutual-TLS connections with a minimal MQTT CONNECT each and holds them
 * idle (keepalive 1200 s, so no PINGREQ during a run).
 */
import { createSecureContext, type SecureContext } from 'node:tls';
import { LocalCa } from '../authority/index.ts';
import { monoMs } from './common.ts';
import { issueBenchIdentity } from './identities.ts';
import { RawMqtt } from './mqtt-raw.ts';

export type ConnCommand =
  | { cmd: 'prepare'; caDir: string; passphrase: string; ids: string[]; chain?: boolean }
  | { cmd: 'connect'; host: string; port: number; sourceAddrs: string[]; concurrency: number; maxVersion: 'TLSv1.2' | 'TLSv1.3'; ids?: string[]; deadline?: number }
  | { cmd: 'close' }
  | { cmd: 'exit' };

export interface ConnectResult {
  ok: number;
  failed: number;
  errors: Record<string, number>;
  firstStart: number;
  lastEnd: number;
  latencies: Float64Array;
  /** Connections that closed after CONNACK while being held. */
  dropped: number;
  /** Connections never attempted because the deadline (monotonic ms) passed. */
  skipped: number;
}

let contexts = new Map<string, SecureContext>();
let open: RawMqtt[] = [];
let dropped = 0;

async function handle(msg: ConnCommand): Promise<unknown> {
  switch (msg.cmd) {
    case 'prepare': {
      const t0 = monoMs();
      const ca = LocalCa.open(msg.caDir, msg.passphrase);
      contexts = new Map();
      const now = Date.now();
      for (const id of msg.ids) {
        const i = await issueBenchIdentity(ca, id, now);
        // Leaf + device CA unless chain is false (the leaf alone, as the protocol now asks).
        // Contexts are built here, not in the timed part.
        contexts.set(id, createSecureContext({ key: i.keyPem, cert: i.certPem + (msg.chain === false ? '' : i.caPem) }));
      }
      return { ms: monoMs() - t0 };
    }
    case 'connect': {
      const ids = msg.ids ?? [...contexts.keys()];
      const r: ConnectResult = { ok: 0, failed: 0, errors: {}, firstStart: Infinity, lastEnd: 0, latencies: new Float64Array(ids.length), dropped: 0, skipped: 0 };
      let next = 0;
      let n = 0;
      const deadline = msg.deadline ?? Infinity;
      const lane = async () => {
        while (next < ids.length) {
          // Past the deadline no new attempt starts; those in flight finish (bounded by their timeout).
          if (monoMs() > deadline) {
            r.skipped = ids.length - next;
            next = ids.length;
            break;
          }
          const i = next++;
          const id = ids[i];
          const t0 = monoMs();
          r.firstStart = Math.min(r.firstStart, t0);
          try {
            const c = await RawMqtt.connect({
              host: msg.host, port: msg.port, clientId: id, secureContext: contexts.get(id), keepalive: 1200, maxVersion: msg.maxVersion,
              // A source address only when there are several: bind() before connect() makes
              // the kernel search the port space for every socket, which grows with the
              // sockets already open (it was most of the clients' CPU at 10,000).
              localAddress: msg.sourceAddrs.length > 1 ? msg.sourceAddrs[i % msg.sourceAddrs.length] : undefined, timeoutMs: Math.max(5_000, Math.min(60_000, deadline - t0 + 10_000)),
            });
            const t1 = monoMs();
            r.latencies[n++] = t1 - t0;
            r.lastEnd = Math.max(r.lastEnd, t1);
            r.ok++;
            c.socket.on('close', () => dropped++);
            open.push(c);
          } catch (err) {
            r.failed++;
            r.lastEnd = Math.max(r.lastEnd, monoMs());
            const key = ((err as { code?: string }).code ?? (err as Error).message.replace(/bench-\S+/, '<id>')).slice(0, 80);
            r.errors[key] = (r.errors[key] ?? 0) + 1;
          }
        }
      };
      await Promise.all(Array.from({ length: Math.min(msg.concurrency, ids.length) }, lane));
      r.latencies = r.latencies.slice(0, n);
      r.dropped = dropped;
      return r;
    }
    case 'close': {
      const all = open;
      open = [];
      for (const c of all) c.socket.removeAllListeners('close');
      // Abrupt close (no DISCONNECT round trip): fast, and the gateway handles both.
      for (const c of all) c.socket.destroy();
      const d = dropped;
      dropped = 0;
      return { closed: all.length, dropped: d };
    }
    case 'exit':
      process.exit(0);
  }
}

if (process.send && process.env.BENCH_CONN_WORKER === '1') {
  process.on('message', (msg: ConnCommand) => {
    handle(msg).then(
      (result) => process.send!({ ok: true, result }),
      (err) => process.send!({ ok: false, message: (err as Error).stack ?? String(err) }),
    );
  });
  process.send({ ok: true, result: 'ready' });
}
