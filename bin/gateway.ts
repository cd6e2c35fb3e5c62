import { enrollGateway, isEnrolled, resolveGatewayConfig, startGateway, type GatewayConfigInput } from '../gateway/index.ts';
import { readFileSync } from 'node:fs';
import { readJsonConfig } from '../config-schema/index.ts';
import { join } from 'node:path';
import pino from 'pino';
import { AuthorityClient, GatewayIdentity, edgeCaFiles, identityFiles, issueServerCertificate } from '../cloud-bridge/index.ts';
import { intOption, parse, serveUntilSignal, urlOption, UsageError } from './cli.ts';

const USAGE = `leafgate gateway <command> [options]

Commands:
  start               run the gateway broker (MQTT over TLS) and its cloud bridge
  enroll              enroll with the authority: one-time token + CSR -> gateway certificate
  renew               renew the gateway certificate now (new key, over mTLS)
  subca               get (or renew) the IoT Edge CA: key made here, signed by the authority
  issue-server-cert   issue a TLS server certificate with the local edge CA
                      (--name edgehub [--dns NAME ...] [--ip ADDR ...] [--days 30] [--out DIR])

Options:
  --config FILE          JSON configuration (see README, Configuration)
  --data-dir DIR         identity files (default .leafgate/gateway, env LEAFGATE_GATEWAY_DATA)
  --host HOST            listen address (start; default 0.0.0.0)
  --port N               MQTT TLS port (start; default 8883, env LEAFGATE_GATEWAY_PORT)
  --redis URL            gateway cluster: shared Redis (start; env LEAFGATE_REDIS_URL)
  --redis-prefix P       key prefix in that Redis, one per site (default leafgate:)
  --authority URL        authority base URL (enroll), e.g. https://authority:8443
  --token TOKEN          one-time enrollment token (enroll)
  --fingerprint SHA256   the authority root fingerprint to pin (enroll)
  --id ID                gateway id (enroll)
  --hostname NAME        name or IP devices use to reach this gateway (enroll; repeatable;
                         default localhost and 127.0.0.1)
  --name NAME            subject CN of the server certificate (issue-server-cert)
  --dns NAME, --ip ADDR  SANs (issue-server-cert; repeatable; default: --name)
  --days N               lifetime (issue-server-cert; default 30, capped by the edge CA)
  --out DIR              output directory (issue-server-cert; default <data-dir>/server-certs)
  -h, --help             this text

In production start it through bin/leafgate-gateway (the container's entrypoint): it
raises the open-files soft limit to the hard limit (one descriptor per device connection)
and preloads jemalloc when installed (LEAFGATE_ALLOCATOR=glibc to keep glibc malloc);
LEAFGATE_NODE_FLAGS adds node flags.

Environment: LEAFGATE_GATEWAY_DATA, LEAFGATE_GATEWAY_HOST, LEAFGATE_GATEWAY_PORT,
  LEAFGATE_GATEWAY_HTTP_HOST, LEAFGATE_GATEWAY_HTTP_PORT, LEAFGATE_GATEWAY_EDGE_CA (1),
  LEAFGATE_REDIS_URL, LEAFGATE_REDIS_PREFIX, LEAFGATE_MODULE_CONNECTION_STRING,
  LEAFGATE_LOG_LEVEL, LEAFGATE_DRAIN_TIMEOUT_MS; a key of --config wins over its variable.
`;

const COMMON = `  --config FILE          JSON configuration (README, Configuration)
  --data-dir DIR         identity files (default .leafgate/gateway, env LEAFGATE_GATEWAY_DATA)`;

/** `leafgate gateway <command> --help`. */
const HELP: Record<string, string> = {
  start: `leafgate gateway start [options]

Runs the broker (MQTT over TLS), the cloud bridge and /metrics, /healthz, /readyz. Exits
1 with one line when a part cannot start (port in use, Redis or identity missing), 2 on a
bad configuration; SIGTERM drains and exits within LEAFGATE_DRAIN_TIMEOUT_MS.

Options:
${COMMON}
  --host HOST            listen address (default 0.0.0.0, env LEAFGATE_GATEWAY_HOST)
  --port N               MQTT TLS port (default 8883, env LEAFGATE_GATEWAY_PORT)
  --redis URL            gateway cluster: shared Redis (env LEAFGATE_REDIS_URL)
  --redis-prefix P       key prefix in that Redis, one per site (default leafgate:)

Example:
  leafgate gateway start --data-dir /var/lib/leafgate/gateway --port 8884
`,
  enroll: `leafgate gateway enroll --authority URL --token TOKEN --fingerprint SHA256 --id ID [options]

One-time enrollment: a key made here, a CSR, the token -> the gateway certificate.

Options:
${COMMON}
  --authority URL        authority base URL, e.g. https://authority:8443
  --token TOKEN          one-time enrollment token (leafgate authority token --gateway ID)
  --fingerprint SHA256   the authority root fingerprint to pin (leafgate authority fingerprint)
  --id ID                gateway id
  --hostname NAME        name or IP devices use to reach this gateway (repeatable;
                         default localhost and 127.0.0.1)

Example:
  leafgate gateway enroll --authority https://authority:8443 --token "$TOKEN" \\
    --fingerprint "$FP" --id site-1 --hostname gw1.site.example
`,
  renew: `leafgate gateway renew [options]

Renews the gateway certificate now (new key, over mutual TLS). Needs an enrolled gateway.

Options:
${COMMON}

Example:
  leafgate gateway renew --data-dir /var/lib/leafgate/gateway
`,
  subca: `leafgate gateway subca [options]

Gets (or renews) the IoT Edge CA: key made here, signed by the authority's edge issuer;
prints the /etc/aziot/config.toml snippet. Needs an enrolled gateway.

Options:
${COMMON}

Example:
  leafgate gateway subca --data-dir /var/lib/leafgate/gateway
`,
  'issue-server-cert': `leafgate gateway issue-server-cert --name NAME [options]

Issues a TLS server certificate with the local edge CA (run \`gateway subca\` first).

Options:
${COMMON}
  --name NAME            subject CN
  --dns NAME, --ip ADDR  SANs (repeatable; default: --name)
  --days N               lifetime (default 30, capped by the edge CA)
  --out DIR              output directory (default <data-dir>/server-certs)

Example:
  leafgate gateway issue-server-cert --name edgehub --dns edgehub --ip 10.0.0.5
`,
};

export async function gatewayCommand(argv: string[]): Promise<number> {
  const parsed = parse(argv, {
    config: { type: 'string' }, 'data-dir': { type: 'string' }, host: { type: 'string' }, port: { type: 'string' }, redis: { type: 'string' }, 'redis-prefix': { type: 'string' },
    authority: { type: 'string' }, token: { type: 'string' }, fingerprint: { type: 'string' }, id: { type: 'string' }, hostname: { type: 'string', multiple: true },
    name: { type: 'string' }, dns: { type: 'string', multiple: true }, ip: { type: 'string', multiple: true }, days: { type: 'string' }, out: { type: 'string' },
  }, USAGE, HELP);
  if (!parsed) return 0;
  const [command = 'start'] = parsed.positionals;
  if (!HELP[command]) throw new UsageError(`unknown command ${command}\n\n${USAGE}`);
  const v = parsed.values;
  const file = (v.config ? readJsonConfig(v.config) : {}) as GatewayConfigInput;
  const config = resolveGatewayConfig({
    ...file,
    ...(v['data-dir'] ? { dataDir: v['data-dir'] } : {}),
    listen: { ...file.listen, ...(v.host ? { host: v.host } : {}), ...(v.port !== undefined ? { port: intOption(v.port, 'port', 0, 65535) } : {}) },
    ...(v.redis || v['redis-prefix'] ? { redis: { ...file.redis, url: v.redis ?? file.redis?.url ?? process.env.LEAFGATE_REDIS_URL ?? '', ...(v['redis-prefix'] ? { keyPrefix: v['redis-prefix'] } : {}) } } : {}),
  });
  switch (command) {
    case 'enroll': {
      for (const k of ['authority', 'token', 'fingerprint', 'id']) if (!v[k]) throw new UsageError(`--${k} is required for enroll\n\n${HELP.enroll}`);
      urlOption(v.authority, 'authority');
      const res = await enrollGateway({ authorityUrl: v.authority, token: v.token, rootFingerprint: v.fingerprint, gatewayId: v.id, dataDir: config.dataDir, hostnames: v.hostname ?? ['localhost', '127.0.0.1'] });
      process.stdout.write(`enrolled ${v.id}; certificate valid until ${res.notAfter}; identity in ${config.dataDir}\n`);
      return 0;
    }
    case 'start': {
      const gateway = await startGateway(config);
      // The signal handlers first, then the line that says it is up: a supervisor that
      // signals as soon as it reads the line must not meet the default action (killed).
      const served = serveUntilSignal(() => gateway.close());
      process.stdout.write(`gateway ${gateway.gatewayId} serving MQTT over TLS on port ${gateway.port}\n`);
      await served;
      return 0;
    }
    case 'renew':
    case 'subca': {
      if (!isEnrolled(config.dataDir)) throw new Error(`gateway in ${config.dataDir} is not enrolled: run \`leafgate gateway enroll\` first (or give --data-dir)`);
      const files = identityFiles(config.dataDir);
      const meta = JSON.parse(readFileSync(files.meta, 'utf8')) as { gatewayId: string; authorityUrl: string };
      const authority = new AuthorityClient({
        baseUrl: meta.authorityUrl, ca: readFileSync(files.root, 'utf8'), authorityIssuer: readFileSync(files.infraCa, 'utf8'), key: readFileSync(files.key, 'utf8'), cert: readFileSync(files.cert, 'utf8'),
      });
      const identity = new GatewayIdentity({
        dataDir: config.dataDir, gatewayId: meta.gatewayId, authority, logger: pino({ level: 'warn' }), renewAfterFraction: config.certRenewAfterFraction,
        edgeCa: command === 'subca', checkMs: config.identityCheckMs, onRotated: () => undefined,
      });
      try {
        if (command === 'renew') await identity.renewCertificate();
        else await identity.renewEdgeCa();
      } finally {
        authority.close();
      }
      if (command === 'subca') {
        const edge = edgeCaFiles(config.dataDir);
        process.stdout.write(`edge CA written to ${edge.dir}\nAdd to /etc/aziot/config.toml:\n\n${readFileSync(edge.configSnippet, 'utf8')}`);
      } else process.stdout.write(`gateway certificate renewed in ${config.dataDir} (a running gateway picks it up at its next check or restart)\n`);
      return 0;
    }
    case 'issue-server-cert': {
      if (!v.name) throw new UsageError('--name is required');
      const res = issueServerCertificate(config.dataDir, {
        name: v.name, dns: v.dns ?? [], ip: v.ip ?? [], days: intOption(v.days, 'days', 1, 3650) ?? 30, outDir: v.out ?? join(config.dataDir, 'server-certs'),
      });
      process.stdout.write(`server certificate ${res.serial} for ${v.name}, valid until ${res.notAfter}\n  key   ${res.key}\n  cert  ${res.cert}\n  chain ${res.chain}\n`);
      return 0;
    }
    default:
      throw new UsageError(`unknown command ${command}\n\n${USAGE}`);
  }
}
