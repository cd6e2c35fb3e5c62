/**
 * An authority and a gateway as separate processes, started through the real CLI exactly
 * as an operator would: `authority start`, `authority token`, `gateway enroll`,
 * `gateway start`, each with a JSON config in a temp dir, on 127.0.0.1 and port 0.
 */
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ManufacturerCa } from '../device/index.ts';
import { freePort, log, removeDirLater, runNode, spawnNode, type SpawnedNode } from './common.ts';

export const BENCH_PASSPHRASE = 'bench-passphrase-0123456789';
const CLI = 'bin/leafgate.ts';
/** The gateway's production start script. */
export const GATEWAY_LAUNCHER = 'bin/leafgate-gateway';

export interface ProcStack {
  dir: string;
  authority: SpawnedNode & { url: string; fingerprint: string; dataDir: string; configFile: string };
  /** The gateway process (a placeholder with pid 0 when startGateway was false). */
  gateway: SpawnedNode & { port: number; httpPort: number; dataDir: string; configFile: string };
  gatewayId: string;
  manufacturer: ManufacturerCa;
  /** Trust anchor devices use for the gateway's TLS certificate. */
  rootPem: string;
  deviceCaPem: string;
  /** Directory of the authority's CA (LocalCa.open with BENCH_PASSPHRASE). */
  caDir: string;
  /** Prometheus text of the gateway's /metrics. */
  gatewayMetrics(): Promise<string>;
  close(): Promise<void>;
}

export interface ProcStackOptions {
  keep: boolean;
  /** Merged into the gateway's JSON config. */
  gateway?: Record<string, unknown>;
  /** Merged into the default device policy. */
  policy?: Record<string, unknown>;
  /** False: enroll the gateway but do not start it (the caller runs it in-process). */
  startGateway?: boolean;
  /** Extra node flags for the gateway / authority (e.g. --cpu-prof). */
  gatewayNodeArgs?: string[];
  authorityNodeArgs?: string[];
  /** Extra environment of the gateway process (e.g. allocator settings to try). */
  gatewayEnv?: NodeJS.ProcessEnv;
}

/** A metric value from Prometheus text (first sample whose name and labels match). */
export function metricValue(text: string, name: string, labels = ''): number {
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const rest = line.slice(name.length);
    if (labels ? rest.startsWith(`{${labels}}`) : rest.startsWith(' ')) return Number(line.trim().split(/\s+/).pop());
  }
  return NaN;
}

export async function startProcStack(opts: ProcStackOptions): Promise<ProcStack> {
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-bench-'));
  removeDirLater(dir, opts.keep);
  const env = { LEAFGATE_CA_PASSPHRASE: BENCH_PASSPHRASE, LEAFGATE_LOG_LEVEL: process.env.BENCH_LOG_LEVEL ?? 'warn' };
  const manufacturer = ManufacturerCa.create('Bench Manufacturer CA');
  const manufacturerFile = join(dir, 'manufacturer-ca.pem');
  writeFileSync(manufacturerFile, manufacturer.pem);

  const authorityDir = join(dir, 'authority');
  const authorityConfig = join(dir, 'authority.json');
  writeFileSync(authorityConfig, JSON.stringify({
    dataDir: authorityDir,
    listen: { host: '127.0.0.1', port: 0 },
    hostnames: ['localhost', '127.0.0.1'],
    policies: {
      default: {
        manufacturerCAFiles: [manufacturerFile],
        ddkg: { enrollment: 'allow-list', allowList: ['bench-*'] },
        ...opts.policy,
      },
    },
  }, null, 2));
  log('starting authority');
  const authority = spawnNode(CLI, ['authority', 'start', '--config', authorityConfig], { env, name: 'authority', nodeArgs: opts.authorityNodeArgs });
  const [, url] = await authority.waitFor(/authority listening on (\S+)/, 120_000);
  const [, fingerprint] = await authority.waitFor(/root fingerprint[^:]*: (\S+)/);

  const gatewayId = 'gw-bench';
  const token = (await runNode(CLI, ['authority', 'token', '--config', authorityConfig, '--gateway', gatewayId], { env, name: 'authority token' })).trim();
  const gatewayDir = join(dir, 'gateway');
  await runNode(CLI, ['gateway', 'enroll', '--data-dir', gatewayDir, '--authority', url, `--token=${token}`, '--fingerprint', fingerprint, '--id', gatewayId, '--hostname', '127.0.0.1', '--hostname', 'localhost'], { env, name: 'gateway enroll' });

  const gatewayConfig = join(dir, 'gateway.json');
  const writeGatewayConfig = (httpPort: number) => writeFileSync(gatewayConfig, JSON.stringify({
    dataDir: gatewayDir,
    listen: { host: '127.0.0.1', port: 0 },
    http: { host: '127.0.0.1', port: httpPort },
    ...opts.gateway,
  }, null, 2));
  let httpPort = await freePort();
  writeGatewayConfig(httpPort);
  let gateway: SpawnedNode;
  let port = '0';
  if (opts.startGateway === false) {
    gateway = { child: undefined as never, pid: 0, waitFor: () => Promise.reject(new Error('no gateway process')), stderrTail: () => '', stop: async () => undefined };
  } else {
    // The /metrics port was free a moment ago; if something took it meanwhile, pick another.
    for (let attempt = 1; ; attempt++) {
      log('starting gateway');
      // As production starts it (the Dockerfile's ENTRYPOINT): file-descriptor limit,
      // allocator and node flags are set by bin/leafgate-gateway.
      gateway = spawnNode(GATEWAY_LAUNCHER, ['start', '--config', gatewayConfig], { env: { ...env, ...opts.gatewayEnv }, name: 'gateway', launcher: true, nodeArgs: opts.gatewayNodeArgs });
      try {
        [, port] = await gateway.waitFor(/serving MQTT over TLS on port (\d+)/, 120_000);
        break;
      } catch (err) {
        if (attempt >= 3 || !/EADDRINUSE/.test(String((err as Error).message))) throw err;
        httpPort = await freePort();
        writeGatewayConfig(httpPort);
      }
    }
  }

  const stack: ProcStack = {
    dir,
    authority: Object.assign(authority, { url, fingerprint, dataDir: authorityDir, configFile: authorityConfig }),
    gateway: Object.assign(gateway, { port: Number(port), httpPort, dataDir: gatewayDir, configFile: gatewayConfig }),
    gatewayId,
    manufacturer,
    rootPem: readFileSync(join(gatewayDir, 'root-ca.pem'), 'utf8'),
    deviceCaPem: readFileSync(join(gatewayDir, 'device-ca.pem'), 'utf8'),
    caDir: join(authorityDir, 'ca'),
    async gatewayMetrics() {
      const res = await fetch(`http://127.0.0.1:${httpPort}/metrics`);
      return res.text();
    },
    async close() {
      await gateway.stop();
      await authority.stop();
    },
  };
  return stack;
}
