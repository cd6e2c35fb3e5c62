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
