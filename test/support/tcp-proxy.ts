/**
 * A TCP forwarder on port 0 that a test can cut: it simulates a network partition between
 * two real components (e.g. one gateway and the authority) while both keep running.
 */
import net from 'node:net';
import { once } from 'node:events';

export interface TcpProxy {
  port: number;
  /** Drops every live connection and refuses new ones until heal(). */
  cut(): void;
  heal(): void;
  close(): Promise<void>;
}

export async function startTcpProxy(target: { host: string; port: number }): Promise<TcpProxy> {
  const live = new Set<net.Socket>();
  let broken = false;
  const server = net.createServer((inbound) => {
    if (broken) return inbound.destroy();
    const outbound = net.connect(target.port, target.host);
    live.add(inbound);
    live.add(outbound);
    const drop = () => {
      inbound.destroy();
      outbound.destroy();
      live.delete(inbound);
      live.delete(outbound);
    };
    inbound.on('error', drop).on('close', drop);
    outbound.on('error', drop).on('close', drop);
    inbound.pipe(outbound);
    outbound.pipe(inbound);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as net.AddressInfo).port;
  const cut = () => {
    broken = true;
    for (const s of live) s.destroy();
    live.clear();
  };
  return {
    port,
    cut,
    heal() {
      broken = false;
    },
    async close() {
      cut();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

export interface TcpBalancer {
  port: number;
  /** Connections forwarded to each backend (by index). */
  served: number[];
  /** Backend connects that failed, after which the balancer tried the next backend. */
  failovers: number;
  close(): Promise<void>;
}

/**
 * A round-robin TCP load balancer on port 0, like HAProxy in `mode tcp` in front of the
 * gateways: TLS passes through untouched. Each inbound connection goes to the next backend;
 * a backend that refuses (or does not answer within `connectTimeoutMs`) is marked down for
 * `downMs` and the connection is tried on the next one, so a dead gateway is skipped rather
 * than handed to a device. The inbound socket stays paused until its backend is connected,
 * so the device's first bytes (the ClientHello) wait in the kernel, not here.
 */
export async function startTcpBalancer(
  backends: Array<{ host: string; port: number }>,
  opts: { connectTimeoutMs?: number; downMs?: number } = {},
): Promise<TcpBalancer> {
  if (!backends.length) throw new Error('no backends');
  const connectTimeoutMs = opts.connectTimeoutMs ?? 2000;
  const downMs = opts.downMs ?? 2000;
  const downUntil = backends.map(() => 0);
  const live = new Set<net.Socket>();
  let next = 0;
  const lb: TcpBalancer = { port: 0, served: backends.map(() => 0), failovers: 0, close: async () => undefined };

  /** Backends in round-robin order from the next one, those marked down last. */
  const order = (): number[] => {
    const start = next++ % backends.length;
    const all = backends.map((_, k) => (start + k) % backends.length);
    const now = Date.now();
    return [...all.filter((i) => downUntil[i] <= now), ...all.filter((i) => downUntil[i] > now)];
  };

  const connectTo = (i: number): Promise<net.Socket | undefined> =>
    new Promise((resolve) => {
      const s = net.connect(backends[i].port, backends[i].host);
      const timer = setTimeout(() => s.destroy(new Error('connect timeout')), connectTimeoutMs);
      s.once('connect', () => {
        clearTimeout(timer);
        s.removeAllListeners('error');
        resolve(s);
      });
      s.once('error', () => {
        clearTimeout(timer);
        s.destroy();
        resolve(undefined);
      });
    });

  const server = net.createServer({ pauseOnConnect: true }, (inbound) => {
    live.add(inbound);
    let gone = false;
    inbound.on('error', () => undefined);
    inbound.once('close', () => {
      gone = true;
      live.delete(inbound);
    });
    void (async () => {
      for (const i of order()) {
        const outbound = await connectTo(i);
        if (gone) {
          outbound?.destroy();
          return;
        }
        if (!outbound) {
          lb.failovers++;
          downUntil[i] = Date.now() + downMs;
          continue;
        }
        downUntil[i] = 0;
        lb.served[i]++;
        live.add(outbound);
        const drop = () => {
          inbound.destroy();
          outbound.destroy();
          live.delete(outbound);
        };
        inbound.on('close', drop);
        outbound.on('error', drop).on('close', drop);
        inbound.pipe(outbound);
        outbound.pipe(inbound);
        return;
      }
      inbound.destroy(); // every backend is down
    })();
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  lb.port = (server.address() as net.AddressInfo).port;
  lb.close = async () => {
    for (const s of live) s.destroy();
    live.clear();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  };
  return lb;
}
