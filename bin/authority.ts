import { randomBytes, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { GatewayEnrollment, LocalCa, SqliteStore, loadAuthorityConfigFile, resolveAuthorityConfig, startAuthority, type AuthorityConfigInput } from '../authority/index.ts';
import { hashEnrollmentCode } from '../authority/auth-methods/index.ts';
import { intOption, parse, serveUntilSignal, UsageError } from './cli.ts';

const USAGE = `leafgate authority <command> [options]

Commands:
  start        run the authority (HTTPS API with mutual TLS for gateways)
  token        create a one-time gateway enrollment token
  code         create a one-time ddkg enrollment code for a device
  fingerprint  print the root CA's SHA-256 fingerprint (gateways pin it)

Options:
  --config FILE      JSON configuration (see README, Configuration)
  --data-dir DIR     data directory (default .leafgate/authority, env LEAFGATE_AUTHORITY_DATA)
  --host HOST        listen address (start; default 0.0.0.0)
  --port N           listen port (start; default 8443, env LEAFGATE_AUTHORITY_PORT)
  --gateway ID       gateway id (token)
  --device ID        device id (code)
  --group NAME       device group (code; default: the default group)
  --ttl SECONDS      validity of a token or code (default 86400 / 604800)
  -h, --help         this text

The CA passphrase comes from LEAFGATE_CA_PASSPHRASE (at least 12 characters).
`;

function configFrom(values: Record<string, any>): ReturnType<typeof resolveAuthorityConfig> {
  const file: AuthorityConfigInput = values.config ? loadAuthorityConfigFile(values.config) : {};
  return resolveAuthorityConfig({
    ...file,
    ...(values['data-dir'] ? { dataDir: values['data-dir'] } : {}),
    listen: { ...file.listen, ...(values.host ? { host: values.host } : {}), ...(values.port !== undefined ? { port: intOption(values.port, 'port', 0, 65535) } : {}) },
  });
}

export async function authorityCommand(argv: string[]): Promise<number> {
  const parsed = parse(argv, {
    config: { type: 'string' }, 'data-dir': { type: 'string' }, host: { type: 'string' }, port: { type: 'string' },
    gateway: { type: 'string' }, device: { type: 'string' }, group: { type: 'string' }, ttl: { type: 'string' },
  }, USAGE);
  if (!parsed) return 0;
  const [command = 'start'] = parsed.positionals;
  const v = parsed.values;
  const config = configFrom(v);
  switch (command) {
    case 'start': {
      const authority = await startAuthority(config);
      process.stdout.write(`authority listening on ${authority.url}\nroot fingerprint (pin it when enrolling gateways): ${authority.rootFingerprint}\n`);
      await serveUntilSignal(() => authority.close());
      return 0;
    }
    case 'token': {
      if (!v.gateway) throw new UsageError('--gateway ID is required');
      const store = new SqliteStore(config.databaseFile);
      try {
        // The CA is opened only to fail early on a wrong passphrase; tokens do not need it.
        const ca = LocalCa.open(join(config.dataDir, 'ca'), config.caPassphrase, { organization: config.organization });
        const token = await new GatewayEnrollment({ store, ca, certDays: config.gatewayCertDays }).createToken(v.gateway, intOption(v.ttl, 'ttl', 60) ?? 86_400);
        process.stdout.write(`${token}\n`);
      } finally {
        await store.close();
      }
      return 0;
    }
    case 'code': {
      if (!v.device) throw new UsageError('--device ID is required');
      const store = new SqliteStore(config.databaseFile);
      try {
        const code = randomBytes(12).toString('base64url');
        const ttl = intOption(v.ttl, 'ttl', 60) ?? 7 * 86_400;
        await store.createEnrollmentCode(hashEnrollmentCode(code), v.device, v.group ?? config.defaultGroup, Date.now() + ttl * 1000);
        process.stdout.write(`${code}\n`);
      } finally {
        await store.close();
      }
      return 0;
    }
    case 'fingerprint': {
      const pem = readFileSync(join(config.dataDir, 'ca', 'root.crt.pem'), 'utf8');
      process.stdout.write(`${new X509Certificate(pem).fingerprint256}\n`);
      return 0;
    }
    default:
      throw new UsageError(`unknown command ${command}\n\n${USAGE}`);
  }
}
