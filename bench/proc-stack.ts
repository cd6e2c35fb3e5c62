/**
 * Authorities and gateways as separate processes, started through the real CLI exactly as
 * an operator would: `authority start`, `authority token`, `gateway enroll`,
 * `gateway start`, each with a JSON config in a temp dir, on 127.0.0.1 and port 0.
 *
 * By default one authority (SQLite in its data dir) and one gateway (embedded broker
 * state). The scale-out topology of docker-compose.yml is the same call with
 * `authorities: 2, database: 'postgres://...'` (both nodes on one database, same CA
 * passphrase and admin token) and `gateways: 2, redis: {url, keyPrefix}` (both gateways on
 * one Redis prefix); gateway i is enrolled against authority i % authorities and talks to
 * that node from then on.
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

export type AuthorityProc = SpawnedNode & { url: string; fingerprint: string; dataDir: string; configFile: string };
export type GatewayProc = SpawnedNode & {
  id: string;
  port: number;
  httpPort: number;
  dataDir: string;
  configFile: string;
  /** The authority node this gateway was enrolled against (and talks to). */
  authorityUrl: string;
  /** Prometheus text of this gateway's /metrics. */
  metrics(): Promise<string>;
};

export interface ProcStack {
  dir: string;
  /** The first authority node. */
  authority: AuthorityProc;
  authorities: AuthorityProc[];
  /** The first gateway process (a placeholder with pid 0 when startGateway was false). */
  gateway: GatewayProc;
  gateways: GatewayProc[];
  gatewayId: string;
  gatewayIds: string[];
  manufacturer: ManufacturerCa;
  /** Trust anchor devices use for the gateway's TLS certificate. */
  rootPem: string;
  deviceCaPem: string;
  /** Directory of the authority's CA (LocalCa.open with BENCH_PASSPHRASE; SQLite only). */
  caDir: string;
  /** What every child got in its environment: CA passphrase, log level, admin token. */
  env: NodeJS.ProcessEnv;
  /** Prometheus text of a gateway's /metrics (the first by default). */
  gatewayMetrics(index?: number): Promise<string>;
  close(): Promise<void>;
}

export interface ProcStackOptions {
  keep: boolean;
  /** Merged into every gateway's JSON config. */
  gateway?: Record<string, unknown>;
  /** Merged into the default device policy. */
  policy?: Record<string, unknown>;
  /** File-descriptor limit for the gateway processes (bin/leafgate-gateway raises it to the hard limit anyway). */
  gatewayNofile?: number;
  /** Extra environment of the gateway processes (e.g. allocator settings to try). */
  gatewayEnv?: NodeJS.ProcessEnv;
  /** False: enroll the gateway(s) but do not start them (the caller runs one in-process). */
  startGateway?: boolean;
  /** Extra node flags for the gateways / authorities (e.g. --cpu-prof). */
  gatewayNodeArgs?: string[] | ((index: number) => string[] | undefined);
  authorityNodeArgs?: string[] | ((index: number) => string[] | undefined);
  /** Authority nodes (default 1); more than one needs a PostgreSQL `database`. */
  authorities?: number;
  /** The authorities' store: a postgres:// URL (default: SQLite in the first node's data dir). */
  database?: string;
  /** Gateway processes (default 1); more than one needs `redis`. */
  gateways?: number;
  /** Gateway ids (default gw-bench, gw-bench-2, ...). */
  gatewayIds?: string[];
  /** The gateway cluster's Redis, written into every gateway's JSON config. */
  redis?: { url: string; keyPrefix: string };
  /** LEAFGATE_ADMIN_TOKEN for every authority node (default: each node makes its own file). */
  adminToken?: string;
  /** LEAFGATE_CA_PASSPHRASE (default BENCH_PASSPHRASE). */
  passphrase?: string;
  /** The manufacturer CA the policy trusts (default: a new one). */
  manufacturer?: ManufacturerCa;
  /** Prefix of the temp directory (default leafgate-bench-). */
  tmpPrefix?: string;
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

const argsFor = (a: ProcStackOptions['gatewayNodeArgs'], i: number) => (typeof a === 'function' ? a(i) : a);

export async function startProcStack(opts: ProcStackOptions): Promise<ProcStack> {
  const nAuthorities = opts.authorities ?? 1;
  const nGateways = opts.gateways ?? 1;
  if (nAuthorities < 1 || nGateways < 1) throw new Error('at least one authority and one gateway');
  if (nAuthorities > 1 && !opts.database?.startsWith('postgres')) throw new Error('several authority nodes need a PostgreSQL database');
  if (nGateways > 1 && !opts.redis) throw new Error('several gateways need a Redis');
  if (nGateways > 1 && opts.startGateway === false) throw new Error('startGateway: false runs one gateway only');

  const dir = mkdtempSync(join(tmpdir(), opts.tmpPrefix ?? 'leafgate-bench-'));
  removeDirLater(dir, opts.keep);
  // Explicit, so that a LEAFGATE_* variable of the caller's shell never changes the topology:
  // the store and Redis come from the JSON configs below.
  const env: NodeJS.ProcessEnv = {
    LEAFGATE_CA_PASSPHRASE: opts.passphrase ?? BENCH_PASSPHRASE,
    LEAFGATE_LOG_LEVEL: process.env.BENCH_LOG_LEVEL ?? 'warn',
    LEAFGATE_ADMIN_TOKEN: opts.adminToken ?? '',
    LEAFGATE_DATABASE_URL: '',
    LEAFGATE_REDIS_URL: '',
    LEAFGATE_REDIS_PREFIX: '',
  };
  const manufacturer = opts.manufacturer ?? ManufacturerCa.create('Bench Manufacturer CA');
  const manufacturerFile = join(dir, 'manufacturer-ca.pem');
  writeFileSync(manufacturerFile, manufacturer.pem);

  // ---------------------------------------------------------------- authorities
  const sqliteFile = join(dir, 'authority', 'authority.db');
  const authorityConfigs = Array.from({ length: nAuthorities }, (_, i) => {
    const dataDir = join(dir, i === 0 ? 'authority' : `authority-${i + 1}`);
    const configFile = join(dir, i === 0 ? 'authority.json' : `authority-${i + 1}.json`);
    writeFileSync(configFile, JSON.stringify({
      dataDir,
      database: opts.database ?? sqliteFile,
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
    return { dataDir, configFile };
  });
  // Nodes on one PostgreSQL database start together (the first to store the CA wins, the
  // others load it; migrations run once under an advisory lock), as in docker-compose.
  log(nAuthorities > 1 ? `starting ${nAuthorities} authority nodes` : 'starting authority');
  const authorities: AuthorityProc[] = await Promise.all(authorityConfigs.map(async ({ dataDir, configFile }, i) => {
    const name = nAuthorities > 1 ? `authority-${i + 1}` : 'authority';
    const p = spawnNode(CLI, ['authority', 'start', '--config', configFile], { env, name, nodeArgs: argsFor(opts.authorityNodeArgs, i) });
    const [, url] = await p.waitFor(/authority listening on (\S+)/, 120_000);
    const [, fingerprint] = await p.waitFor(/root fingerprint[^:]*: (\S+)/);
    return Object.assign(p, { url, fingerprint, dataDir, configFile });
  }));
  const fingerprint = authorities[0].fingerprint;
  for (const a of authorities) if (a.fingerprint !== fingerprint) throw new Error(`authority nodes disagree on the root: ${a.fingerprint} != ${fingerprint}`);

  // ---------------------------------------------------------------- gateways
  const gatewayIds = opts.gatewayIds ?? Array.from({ length: nGateways }, (_, i) => (i === 0 ? 'gw-bench' : `gw-bench-${i + 1}`));
  if (gatewayIds.length !== nGateways) throw new Error('gatewayIds must name every gateway');
  const gateways: GatewayProc[] = await Promise.all(gatewayIds.map(async (gatewayId, i) => {
    const name = nGateways > 1 ? `gateway-${i + 1}` : 'gateway';
    const authority = authorities[i % nAuthorities];
    const token = (await runNode(CLI, ['authority', 'token', '--config', authority.configFile, '--gateway', gatewayId], { env, name: `authority token ${gatewayId}` })).trim();
    const dataDir = join(dir, i === 0 ? 'gateway' : `gateway-${i + 1}`);
    // `--token=...`: a base64url token may start with '-', which `--token -x...` would take
    // for an option (node:util parseArgs refuses it as ambiguous).
    await runNode(CLI, ['gateway', 'enroll', '--data-dir', dataDir, '--authority', authority.url, `--token=${token}`, '--fingerprint', fingerprint, '--id', gatewayId, '--hostname', '127.0.0.1', '--hostname', 'localhost'], { env, name: `gateway enroll ${gatewayId}` });

    const configFile = join(dir, i === 0 ? 'gateway.json' : `gateway-${i + 1}.json`);
    const writeConfig = (httpPort: number) => writeFileSync(configFile, JSON.stringify({
      dataDir,
      listen: { host: '127.0.0.1', port: 0 },
      http: { host: '127.0.0.1', port: httpPort },
      ...(opts.redis ? { redis: { url: opts.redis.url, keyPrefix: opts.redis.keyPrefix } } : {}),
      ...opts.gateway,
    }, null, 2));
    let httpPort = await freePort();
    writeConfig(httpPort);
    let p: SpawnedNode;
    let port = '0';
    if (opts.startGateway === false) {
      p = { child: undefined as never, pid: 0, waitFor: () => Promise.reject(new Error('no gateway process')), stderrTail: () => '', stop: async () => undefined };
    } else {
      // The /metrics port was free a moment ago; if something took it meanwhile, pick another.
      for (let attempt = 1; ; attempt++) {
        log(`starting ${name}`);
        // As production starts it (the Dockerfile's ENTRYPOINT): file-descriptor limit,
        // allocator and node flags are set by bin/leafgate-gateway.
        p = spawnNode(GATEWAY_LAUNCHER, ['start', '--config', configFile], { env: { ...env, ...opts.gatewayEnv }, name, launcher: true, nodeArgs: argsFor(opts.gatewayNodeArgs, i) });
        try {
          [, port] = await p.waitFor(/serving MQTT over TLS on port (\d+)/, 120_000);
          break;
        } catch (err) {
          if (attempt >= 3 || !/EADDRINUSE/.test(String((err as Error).message))) throw err;
          httpPort = await freePort();
          writeConfig(httpPort);
        }
      }
    }
    return Object.assign(p, {
      id: gatewayId, port: Number(port), httpPort, dataDir, configFile, authorityUrl: authority.url,
      async metrics() {
        const res = await fetch(`http://127.0.0.1:${httpPort}/metrics`);
        return res.text();
      },
    });
  }));

  const stack: ProcStack = {
    dir,
    authority: authorities[0],
    authorities,
    gateway: gateways[0],
    gateways,
    gatewayId: gatewayIds[0],
    gatewayIds,
    manufacturer,
    rootPem: readFileSync(join(gateways[0].dataDir, 'root-ca.pem'), 'utf8'),
    deviceCaPem: readFileSync(join(gateways[0].dataDir, 'device-ca.pem'), 'utf8'),
    caDir: join(authorities[0].dataDir, 'ca'),
    env,
    gatewayMetrics: (index = 0) => gateways[index].metrics(),
    async close() {
      await Promise.all(gateways.map((g) => g.stop()));
      await Promise.all(authorities.map((a) => a.stop()));
    },
  };
  return stack;
}
