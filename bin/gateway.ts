import { enrollGateway, resolveGatewayConfig, startGateway, type GatewayConfigInput } from '../gateway/index.ts';
import { readFileSync } from 'node:fs';
import { intOption, parse, serveUntilSignal, UsageError } from './cli.ts';

const USAGE = `leafgate gateway <command> [options]

Commands:
  start     run the gateway broker (MQTT over TLS) and its cloud bridge
  enroll    enroll with the authority: one-time token + CSR -> gateway certificate

Options:
  --config FILE          JSON configuration (see README, Configuration)
  --data-dir DIR         identity files (default .leafgate/gateway, env LEAFGATE_GATEWAY_DATA)
  --host HOST            listen address (start; default 0.0.0.0)
  --port N               MQTT TLS port (start; default 8883, env LEAFGATE_GATEWAY_PORT)
  --authority URL        authority base URL (enroll), e.g. https://authority:8443
  --token TOKEN          one-time enrollment token (enroll)
  --fingerprint SHA256   the authority root fingerprint to pin (enroll)
  --id ID                gateway id (enroll)
  --hostname NAME        name or IP devices use to reach this gateway (enroll; repeatable;
                         default localhost and 127.0.0.1)
  -h, --help             this text
`;

export async function gatewayCommand(argv: string[]): Promise<number> {
  const parsed = parse(argv, {
    config: { type: 'string' }, 'data-dir': { type: 'string' }, host: { type: 'string' }, port: { type: 'string' },
    authority: { type: 'string' }, token: { type: 'string' }, fingerprint: { type: 'string' }, id: { type: 'string' }, hostname: { type: 'string', multiple: true },
  }, USAGE);
  if (!parsed) return 0;
  const [command = 'start'] = parsed.positionals;
  const v = parsed.values;
  const file: GatewayConfigInput = v.config ? JSON.parse(readFileSync(v.config, 'utf8')) : {};
  const config = resolveGatewayConfig({
    ...file,
    ...(v['data-dir'] ? { dataDir: v['data-dir'] } : {}),
    listen: { ...file.listen, ...(v.host ? { host: v.host } : {}), ...(v.port !== undefined ? { port: intOption(v.port, 'port', 0, 65535) } : {}) },
  });
  switch (command) {
    case 'enroll': {
      for (const k of ['authority', 'token', 'fingerprint', 'id']) if (!v[k]) throw new UsageError(`--${k} is required for enroll`);
      const res = await enrollGateway({ authorityUrl: v.authority, token: v.token, rootFingerprint: v.fingerprint, gatewayId: v.id, dataDir: config.dataDir, hostnames: v.hostname ?? ['localhost', '127.0.0.1'] });
      process.stdout.write(`enrolled ${v.id}; certificate valid until ${res.notAfter}; identity in ${config.dataDir}\n`);
      return 0;
    }
    case 'start': {
      const gateway = await startGateway(config);
      process.stdout.write(`gateway ${gateway.gatewayId} serving MQTT over TLS on port ${gateway.port}\n`);
      await serveUntilSignal(() => gateway.close());
      return 0;
    }
    default:
      throw new UsageError(`unknown command ${command}\n\n${USAGE}`);
  }
}
