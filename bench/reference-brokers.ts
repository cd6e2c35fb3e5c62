/**
 * Reference servers the benchmarks compare the gateway with, on the gateway's own TLS
 * material: Mosquitto (a child process on a free port), bare aedes (broker/ startBroker
 * with no hooks, in this process or, run as a script, in its own process) and bare node TLS
 * (the broker's exact tls.Server options and nothing else: what node's TLS alone costs).
 */
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { connect as netConnect } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import pino from 'pino';
import tls from 'node:tls';
import v8 from 'node:v8';
import { brokerTlsServerOptions, startBroker, TLS_CIPHERS } from '../broker/index.ts';
import { freePort, onCleanup, stopChild } from './common.ts';

export const MOSQUITTO = process.env.BENCH_MOSQUITTO ?? '/usr/sbin/mosquitto';

export function waitForPort(port: number, timeoutMs: number): Promise<void> {
  const until = Date.now() + timeoutMs;
  return new Promise((resolve, reject) => {
    const attempt = () => {
      const s = netConnect(port, '127.0.0.1');
      s.once('connect', () => {
        s.destroy();
        resolve();
      });
      s.once('error', () => {
        s.destroy();
        if (Date.now() > until) reject(new Error(`nothing listens on ${port}`));
        else setTimeout(attempt, 100);
      });
    };
    attempt();
  });
}

export function mosquittoVersion(): Promise<string> {
  return new Promise((resolve) => {
    const v = spawn(MOSQUITTO, ['-h'], { stdio: ['ignore', 'pipe', 'ignore'] });
    let out = '';
    v.stdout!.on('data', (c: Buffer) => (out += c));
    v.on('error', () => resolve('missing'));
    v.on('exit', () => resolve(/version (\S+)/.exec(out)?.[1] ?? 'unknown'));
  });
}

/**
 * Mosquitto with mutual TLS on the gateway's certificate: the same certificate and key,
 * the device CA + root as client anchors, require_certificate, the gateway's cipher list.
 */
export async function startMosquitto(opts: { dir: string; gatewayDir: string; caPems: string[]; tls: '1.2' | '1.3'; nofile?: number }): Promise<{ port: number; pid: number; version: string }> {
  const port = await freePort();
  const caFile = join(opts.dir, 'mosquitto-ca.pem');
  writeFileSync(caFile, opts.caPems.join(''));
  const conf = join(opts.dir, 'mosquitto.conf');
  writeFileSync(conf, [
    'user root', // the key in the temp dir is root's, mode 0600
    'persistence false',
    'log_dest stderr',
    'log_type error',
    'log_type warning',
    'allow_anonymous true',
    'max_queued_messages 100000',
    // As the gateway does on every socket: no Nagle delay on small packets.
    'set_tcp_nodelay true',
    `listener ${port} 127.0.0.1`,
    `cafile ${caFile}`,
    `certfile ${join(opts.gatewayDir, 'gateway.crt.pem')}`,
    `keyfile ${join(opts.gatewayDir, 'gateway.key.pem')}`,
    'require_certificate true',
    `tls_version ${opts.tls === '1.3' ? 'tlsv1.3' : 'tlsv1.2'}`,
    `ciphers ${TLS_CIPHERS}`,
    '',
  ].join('\n'));
  const child = opts.nofile
    ? spawn('bash', ['-c', `n=${opts.nofile}; h=$(ulimit -Hn); if [ "$h" != unlimited ] && [ "$h" -lt "$n" ]; then n=$h; fi; ulimit -n "$n" && exec "$0" -c "$1"`, MOSQUITTO, conf], { stdio: ['ignore', 'ignore', 'pipe'] })
    : spawn(MOSQUITTO, ['-c', conf], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (c: Buffer) => (err = (err + c.toString()).slice(-4000)));
  onCleanup(() => stopChild(child));
  await waitForPort(port, 10_000).catch((e: Error) => {
    throw new Error(`${e.message}: mosquitto did not start: ${err}`);
  });
  return { port, pid: child.pid!, version: await mosquittoVersion() };
}

/** TLS material of an enrolled gateway directory, as startBroker wants it. */
export function gatewayTls(gatewayDir: string): { key: string; cert: string; ca: string[] } {
  return {
    key: readFileSync(join(gatewayDir, 'gateway.key.pem'), 'utf8'),
    cert: readFileSync(join(gatewayDir, 'gateway.crt.pem'), 'utf8'),
    ca: [readFileSync(join(gatewayDir, 'device-ca.pem'), 'utf8'), readFileSync(join(gatewayDir, 'root-ca.pem'), 'utf8')],
  };
}

const CONNACK_ACCEPTED = Buffer.from([0x20, 0x02, 0x00, 0x00]);

/**
 * The floor under the gateway: node's tls.Server with the broker's options, answering the
 * client's first bytes (its CONNECT) with a CONNACK and keeping nothing per connection but
 * what node and OpenSSL keep. No MQTT parser, no session, no plugins.
 */
export async function startNodeTlsReference(t: { key: string; cert: string; ca: string[] }): Promise<tls.Server> {
  const server = tls.createServer(brokerTlsServerOptions(t));
  server.on('secureConnection', (socket) => {
    socket.setNoDelay(true);
    socket.on('error', () => socket.destroy());
    socket.once('data', () => socket.write(CONNACK_ACCEPTED));
  });
  server.on('tlsClientError', (_err, socket) => socket.destroy());
  server.listen({ port: 0, host: '127.0.0.1', backlog: 4096 });
  await new Promise<void>((resolve) => server.once('listening', () => resolve()));
  return server;
}

// Script mode, in its own process: bare aedes (default) or bare node TLS on the gateway's TLS material.
//   node --import tsx bench/reference-brokers.ts <gatewayDir> [aedes|node-tls]
if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const material = gatewayTls(process.argv[2]);
  let stop: () => void;
  if (process.argv[3] === 'node-tls') {
    const server = await startNodeTlsReference(material);
    process.stdout.write(`node-tls serving TLS on port ${(server.address() as { port: number }).port}\n`);
    // Held connections would keep server.close() waiting: a reference server just exits.
    stop = () => process.exit(0);
  } else {
    const broker = await startBroker({ host: '127.0.0.1', port: 0, tls: material, hooks: {}, logger: pino({ level: 'warn' }, pino.destination(2)), maxConnections: 1_000_000 });
    process.stdout.write(`aedes serving MQTT over TLS on port ${broker.port}\n`);
    stop = () => void broker.close().finally(() => process.exit(0));
  }
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
  // SIGUSR1 is node's inspector: the memory report answers SIGUSR2. `memory <n> {json}`, n
  // counting the reports, so that a reader can wait for the one it asked for.
  let reports = 0;
  process.on('SIGUSR2', () => {
    const m = process.memoryUsage();
    const young = v8.getHeapSpaceStatistics().find((sp) => sp.space_name === 'new_space');
    process.stdout.write(`memory ${++reports} ${JSON.stringify({ heapUsedKb: m.heapUsed / 1024, heapTotalKb: m.heapTotal / 1024, externalKb: m.external / 1024, newSpaceKb: (young?.space_size ?? NaN) / 1024 })}\n`);
  });
}
