import { randomBytes, X509Certificate } from 'node:crypto';
import { chmodSync, copyFileSync, existsSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { GatewayEnrollment, LocalCa, openCa as openConfiguredCa, isPostgresUrl, loadAuthorityConfigFile, openStore, resolveAuthorityConfig, startAuthority, type AuthorityConfigInput } from '../authority/index.ts';
import { hashEnrollmentCode } from '../authority/auth-methods/index.ts';
import { AuthorityEvents, Revocation } from '../authority/index.ts';
import { intOption, parse, serveUntilSignal, urlOption, UsageError } from './cli.ts';
import { printTable } from './table.ts';
import { loadAdminToken } from '../authority/index.ts';
import { request as httpsRequest } from 'node:https';
import { LeafgateError, isErrorCode } from '../protocol/index.ts';

const USAGE = `leafgate authority <command> [options]

Commands:
  start        run the authority (HTTPS API with mutual TLS for gateways)
  init         create the CA hierarchy (root, device CA, infrastructure CA, edge issuer);
               with --offline-root DIR the root key is moved to DIR after a root CRL
               valid --crl-days days is signed: the authority then runs without it.
               With --pkcs11-module the four keys are generated in the token (never
               extractable) and the certificates signed through it; with --keyvault-url
               the device CA key is created in (or taken from) Key Vault and its
               certificate signed by the root
  root-crl     sign the root's CRL with an offline root key: --root-key FILE [--crl-days N]
  migrate      list what an upgrade left to do (Sub-CAs signed by the root itself, ...)
  token        create a one-time gateway enrollment token
  code         create a one-time ddkg enrollment code for a device
  fingerprint  print the root CA's SHA-256 fingerprint (gateways pin it)
  devices      list devices                          (admin API; --status sync-failed: devices
               whose IoT Hub / DPS sync is parked after too many failed attempts)
  sync         list parked cloud syncs [--target hub|dps]; --retry [--device ID] un-parks them
  certs        list certificates [--expiring 7d]     (admin API)
  revoke       revoke --serial HEX | --device ID [--decommission] | --gateway ID
               | --certificate FILE  [--reason R]
  policies     show the device policies              (admin API)
  audit        show the audit log [--device ID]      (admin API)

Options:
  --config FILE      JSON configuration (see README, Configuration)
  --data-dir DIR     data directory (default .leafgate/authority, env LEAFGATE_AUTHORITY_DATA)
  --host HOST        listen address (start; default 0.0.0.0)
  --port N           listen port (start; default 8443, env LEAFGATE_AUTHORITY_PORT)
  --database DB      SQLite file (default <data-dir>/authority.db) or postgres://user@host/db
                     shared by several authority nodes (env LEAFGATE_DATABASE_URL)
  --gateway ID       gateway id (token; revoke: its certificate and Sub-CA, and disable it)
  --device ID        device id (code)
  --group NAME       device group (code; default: the default group)
  --ttl SECONDS      validity of a token or code (default 86400 / 604800)
  --authority URL    admin API base URL (default https://localhost:<port>)
  --serial HEX       certificate serial (revoke; any certificate the authority issued)
  --certificate FILE PEM of a device certificate of the external issuing CA (revoke; also
                     one leafgate has no record of: issued outside leafgate, or an orphan)
  --offline-root DIR move the root key there (init)
  --root-key FILE    the offline root key (root-crl)
  --crl-days N       validity of a root CRL signed offline (init, root-crl; default 180)
  --pkcs11-module SO CA keys in a PKCS#11 token (HSM) through this module, e.g.
                     /usr/lib/softhsm/libsofthsm2.so (init, start; same as caKeys.store
                     "pkcs11" in the config file, whose keyLabels/keyType/workers apply)
  --token-label L    the token's label (with --pkcs11-module)
  --pin-file FILE    file holding the token's user PIN (with --pkcs11-module; else the
                     PIN comes from LEAFGATE_PKCS11_PIN). Never give a PIN on the command line
  --keyvault-url URL the device CA key in Azure Key Vault, https://<vault>.vault.azure.net
                     (init, start; same as caKeys.store "keyvault" in the config file, whose
                     caKeys.keyvault settings apply; env LEAFGATE_KEYVAULT_URL)
  --keyvault-key NAME  the key's name in the vault (env LEAFGATE_KEYVAULT_KEY)
  --keyvault-key-type T  the key init creates when it does not exist: ec-256 (default),
                     ec-384, rsa-3072 (HSM-protected unless caKeys.keyvault.hsm is false)
  --client-secret-file FILE  sign in as a service principal whose client secret is in FILE
                     (tenant and client id: AZURE_TENANT_ID, AZURE_CLIENT_ID or the config);
                     else AZURE_CLIENT_SECRET, else the managed identity. Never give the
                     secret itself on the command line
  --reason R         unspecified, keyCompromise, affiliationChanged, superseded,
                     cessationOfOperation, certificateHold, privilegeWithdrawn
  --decommission     revoke and disable the device (revoke --device)
  --expiring SPAN    only active certificates ending within SPAN, e.g. 7d, 12h (certs)
  --status S         filter by status (devices, certs)
  --target T         hub or dps (sync)
  --retry            un-park failed syncs for a fresh set of attempts (sync)
  --limit N          rows (default 100)
  --json             JSON instead of a table
  -h, --help         this text

CA keys (config caKeys.store): "file" (default) keeps them encrypted in <data-dir>/ca with
the passphrase from LEAFGATE_CA_PASSPHRASE (at least 12 characters); "pkcs11" keeps them
in a token, where they are generated by init and never leave it (certificates stay in
<data-dir>/ca); a token absent, a wrong PIN or a missing key stops the start with its
cause. "keyvault" keeps the device CA's key in Azure Key Vault (init creates it, needing the
Key Vault Crypto Officer role, or uses an existing one; start needs Key Vault Crypto User)
and the other CA keys encrypted in <data-dir>/ca (the root may be offline), or in the
database with PostgreSQL (every node given the same key). Admin commands authenticate with LEAFGATE_ADMIN_TOKEN or <data-dir>/admin-token.

Device certificates from an enterprise CA (config deviceIssuer, type "est"): leafgate checks
each CSR against its policy, then forwards it over EST (RFC 7030) with a TLS client
certificate and/or HTTP Basic (password from deviceIssuer.passwordFile or
LEAFGATE_EST_PASSWORD, never the command line); gateway certificates stay on leafgate's CA.
EST has no revocation call: revoke says, for such a certificate, to revoke it at that CA.
A certificate of that CA that leafgate did not deliver (issued outside leafgate, an answer
lost on the way) is cut at the gateways with revoke --certificate FILE.

Environment: LEAFGATE_CA_PASSPHRASE, LEAFGATE_ADMIN_TOKEN, LEAFGATE_AUTHORITY_DATA,
  LEAFGATE_AUTHORITY_HOST, LEAFGATE_AUTHORITY_PORT, LEAFGATE_DATABASE_URL,
  LEAFGATE_CRL_BASE_URL, LEAFGATE_IOTHUB_CONNECTION_STRING, LEAFGATE_DPS_CONNECTION_STRING,
  LEAFGATE_VERIFY_WORKERS, LEAFGATE_LOG_LEVEL, LEAFGATE_DRAIN_TIMEOUT_MS,
  LEAFGATE_PKCS11_PIN, LEAFGATE_KEYVAULT_URL, LEAFGATE_KEYVAULT_KEY, AZURE_TENANT_ID,
  AZURE_CLIENT_ID, AZURE_CLIENT_SECRET, AZURE_AUTHORITY_HOST, LEAFGATE_EST_PASSWORD; a key of
  --config wins over its variable.
`;

/** `leafgate authority <command> --help`: what it does, its options, an example. */
const SUB: Array<[string, string, string, string]> = [
  ['start', 'Runs the authority (HTTPS API, mutual TLS for gateways). Exits 1 with one line when a part cannot start, 2 on a bad configuration.', '--config FILE --data-dir DIR --database DB --host HOST --port N --pkcs11-module SO --token-label L --pin-file FILE --keyvault-url URL --keyvault-key NAME --client-secret-file FILE', 'LEAFGATE_CA_PASSPHRASE=... leafgate authority start --config /etc/leafgate/authority.json'],
  ['init', 'Creates the CA hierarchy (root, device CA, infrastructure CA, edge issuer); with --offline-root DIR the root key moves to DIR after a root CRL valid --crl-days days is signed.', '--config FILE --data-dir DIR --database DB --offline-root DIR --crl-days N --pkcs11-module SO --token-label L --pin-file FILE --keyvault-url URL --keyvault-key NAME --keyvault-key-type T --client-secret-file FILE', 'leafgate authority init --offline-root /media/usb/leafgate-root'],
  ['root-crl', 'Signs the root CRL with the offline root key.', '--root-key FILE --crl-days N', 'leafgate authority root-crl --root-key /media/usb/leafgate-root/root.key.pem'],
  ['migrate', 'Lists what an upgrade left to do (Sub-CAs signed by the root itself, ...).', '--config FILE --data-dir DIR --database DB', 'leafgate authority migrate'],
  ['token', 'Creates a one-time gateway enrollment token.', '--gateway ID --ttl SECONDS (default 86400)', 'leafgate authority token --gateway site-1'],
  ['code', 'Creates a one-time ddkg enrollment code for a device.', '--device ID --group NAME --ttl SECONDS (default 604800)', 'leafgate authority code --device sensor-1 --group lab'],
  ['fingerprint', 'Prints the root CA\'s SHA-256 fingerprint (gateways pin it at enrollment).', '--data-dir DIR --database DB', 'leafgate authority fingerprint'],
  ['devices', 'Lists devices (admin API).', '--authority URL --status S --limit N --json', 'leafgate authority devices --status active --json'],
  ['certs', 'Lists certificates (admin API).', '--authority URL --expiring SPAN --status S --limit N --json', 'leafgate authority certs --expiring 7d'],
  ['revoke', 'Revokes a certificate, a device\'s certificates or a gateway (admin API).', '--serial HEX | --device ID [--decommission] | --gateway ID | --certificate FILE; --reason R', 'leafgate authority revoke --device sensor-1 --reason keyCompromise'],
  ['policies', 'Shows the device policies (admin API).', '--authority URL --json', 'leafgate authority policies --json'],
  ['audit', 'Shows the audit log (admin API).', '--authority URL --device ID --limit N --json', 'leafgate authority audit --device sensor-1'],
];
const HELP: Record<string, string> = Object.fromEntries(
  SUB.map(([name, what, options, example]) => [name, `leafgate authority ${name} [options]\n\n${what}\n\nOptions: ${options}\n  (each described in leafgate authority --help)\n\nExample:\n  ${example}\n`]),
);

function configFrom(values: Record<string, any>): ReturnType<typeof resolveAuthorityConfig> {
  const file: AuthorityConfigInput = values.config ? loadAuthorityConfigFile(values.config) : {};
  return resolveAuthorityConfig({
    ...file,
    ...(values['data-dir'] ? { dataDir: values['data-dir'] } : {}),
    ...(values.database ? { database: values.database } : {}),
    ...(values['pkcs11-module'] || values['token-label'] || values['pin-file'] ? { caKeys: pkcs11Options(values, file) } : {}),
    ...(KEYVAULT_FLAGS.some((f) => values[f] !== undefined) ? { caKeys: keyVaultOptions(values, file) } : {}),
    listen: { ...file.listen, ...(values.host ? { host: values.host } : {}), ...(values.port !== undefined ? { port: intOption(values.port, 'port', 0, 65535) } : {}) },
  });
}

/** --pkcs11-module / --token-label / --pin-file over the config file's caKeys (labels, key type, workers). */
function pkcs11Options(values: Record<string, any>, file: AuthorityConfigInput): NonNullable<AuthorityConfigInput['caKeys']> {
  const base = file.caKeys?.store === 'pkcs11' ? file.caKeys : {};
  const module = values['pkcs11-module'] ?? base.module;
  const tokenLabel = values['token-label'] ?? base.tokenLabel;
  if (!module || !tokenLabel) throw new UsageError('--pkcs11-module and --token-label go together (or come from caKeys in the config file)');
  return { ...base, store: 'pkcs11', module, tokenLabel, ...(values['pin-file'] ? { pinFile: values['pin-file'] } : {}) };
}

const KEYVAULT_FLAGS = ['keyvault-url', 'keyvault-key', 'keyvault-key-type', 'client-secret-file'] as const;

/**
 * --keyvault-url / --keyvault-key / --keyvault-key-type / --client-secret-file over the config
 * file's caKeys.keyvault (credential, pacing). The client secret itself has no option: a file,
 * or AZURE_CLIENT_SECRET.
 */
function keyVaultOptions(values: Record<string, any>, file: AuthorityConfigInput): NonNullable<AuthorityConfigInput['caKeys']> {
  if (values['pkcs11-module'] || values['token-label'] || values['pin-file']) throw new UsageError('the --keyvault-* options and the --pkcs11-* options are two key stores: give one of them');
  const base = file.caKeys?.store === 'keyvault' ? (file.caKeys.keyvault ?? {}) : {};
  const kv: Record<string, unknown> = { ...base };
  if (values['keyvault-url'] !== undefined) kv.vaultUrl = values['keyvault-url'];
  if (values['keyvault-key'] !== undefined) kv.keyName = values['keyvault-key'];
  if (values['keyvault-key-type'] !== undefined) kv.keyType = values['keyvault-key-type'];
  if (values['client-secret-file'] !== undefined) {
    // A service principal: tenant and client id from the config file's credential or AZURE_TENANT_ID / AZURE_CLIENT_ID.
    const cred = (base as { credential?: Record<string, unknown> }).credential;
    kv.credential = { ...(cred?.kind === 'clientSecret' ? cred : {}), kind: 'clientSecret', clientSecretFile: values['client-secret-file'] };
  }
  return { store: 'keyvault', keyvault: kv };
}

export async function authorityCommand(argv: string[]): Promise<number> {
  const parsed = parse(argv, {
    config: { type: 'string' }, 'data-dir': { type: 'string' }, database: { type: 'string' }, host: { type: 'string' }, port: { type: 'string' },
    gateway: { type: 'string' }, device: { type: 'string' }, group: { type: 'string' }, ttl: { type: 'string' },
    authority: { type: 'string' }, serial: { type: 'string' }, certificate: { type: 'string' }, reason: { type: 'string' }, decommission: { type: 'boolean' },
    expiring: { type: 'string' }, status: { type: 'string' }, limit: { type: 'string' }, json: { type: 'boolean' },
    target: { type: 'string' }, retry: { type: 'boolean' },
    'offline-root': { type: 'string' }, 'root-key': { type: 'string' }, 'crl-days': { type: 'string' },
    'pkcs11-module': { type: 'string' }, 'token-label': { type: 'string' }, 'pin-file': { type: 'string' },
    'keyvault-url': { type: 'string' }, 'keyvault-key': { type: 'string' }, 'keyvault-key-type': { type: 'string' }, 'client-secret-file': { type: 'string' },
  }, USAGE, HELP);
  if (!parsed) return 0;
  const [command = 'start'] = parsed.positionals;
  if (!HELP[command]) throw new UsageError(`unknown command ${command}\n\n${USAGE}`);
  const v = parsed.values;
  if (v.authority !== undefined) urlOption(v.authority, 'authority');
  const config = configFrom(v);
  switch (command) {
    case 'start': {
      const authority = await startAuthority(config);
      // Handlers before the "listening" line (see gateway start).
      const served = serveUntilSignal(() => authority.close());
      process.stdout.write(`authority listening on ${authority.url}\nroot fingerprint (pin it when enrolling gateways): ${authority.rootFingerprint}\n`);
      await served;
      return 0;
    }
    case 'token': {
      if (!v.gateway) throw new UsageError('--gateway ID is required');
      const store = await openStore(config.database);
      try {
        // The CA is opened only to fail early on a wrong passphrase; tokens do not need it.
        const ca = await openCa(config, store);
        try {
          const token = await new GatewayEnrollment({ store, ca, certDays: config.gatewayCertDays, subCa: config.gatewaySubCa }).createToken(v.gateway, intOption(v.ttl, 'ttl', 60) ?? 86_400);
          process.stdout.write(`${token}\n`);
        } finally {
          await ca.close();
        }
      } finally {
        await store.close();
      }
      return 0;
    }
    case 'code': {
      if (!v.device) throw new UsageError('--device ID is required');
      const store = await openStore(config.database);
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
    case 'init':
    case 'root-crl':
    case 'migrate':
      return caCommand(command, v, config);
    case 'fingerprint': {
      process.stdout.write(`${new X509Certificate(await rootPem(config)).fingerprint256}\n`);
      return 0;
    }
    case 'devices':
    case 'certs':
    case 'policies':
    case 'audit':
    case 'revoke':
    case 'sync':
      return adminCommand(command, v, config);
    default:
      throw new UsageError(`unknown command ${command}\n\n${USAGE}`);
  }
}

/**
 * The hierarchy's offline operations. `init` makes (or completes) the CA; with
 * --offline-root it signs a long-lived root CRL and moves the root key out of the data
 * directory, after which the running authority holds only the intermediates' keys.
 * `root-crl` re-signs that CRL with the offline key (before it expires, and after revoking
 * an intermediate). `migrate` lists what an upgrade left for the operator.
 */
async function caCommand(command: 'init' | 'root-crl' | 'migrate', v: Record<string, any>, config: ReturnType<typeof resolveAuthorityConfig>): Promise<number> {
  // init on a new data directory: the SQLite file lives there.
  if (!isPostgresUrl(config.database)) mkdirSync(config.dataDir, { recursive: true, mode: 0o700 });
  const store = await openStore(config.database);
  let ca: LocalCa | undefined;
  try {
    // root-crl only signs: it never makes a missing key (in a token or a vault) or certificate.
    ca = await openCa(config, store, command !== 'root-crl');
    const days = intOption(v['crl-days'], 'crl-days', 1, 3650) ?? 180;
    const signRootCrl = async () => {
      const revocation = new Revocation({ store, ca: ca!, events: new AuthorityEvents(), crlValidityHours: days * 24 });
      const crl = await revocation.reissue([], 'root');
      process.stdout.write(`root CRL #${crl.crlNumber} signed, valid until ${crl.nextUpdate.toISOString()}\n`);
    };
    if (command === 'init') {
      process.stdout.write(`CA hierarchy ready; root fingerprint ${ca.root.certificate.fingerprint256}\n`);
      if (config.caKeys.store === 'pkcs11') {
        const k = config.caKeys;
        for (const [name, where] of Object.entries(ca.describeKeys())) process.stdout.write(`  ${name.padEnd(12)} key ${where}\n`);
        process.stdout.write(`run the authority with this in its config file (the PIN from the pinFile or ${k.pinEnv ?? 'LEAFGATE_PKCS11_PIN'}):\n` +
          `  "caKeys": ${JSON.stringify({ store: 'pkcs11', module: k.module, tokenLabel: k.tokenLabel, ...(k.pinFile ? { pinFile: k.pinFile } : {}), keyLabels: k.keyLabels })}\n`);
      }
      if (config.caKeys.store === 'keyvault') {
        const k = config.caKeys.keyvault;
        for (const [name, where] of Object.entries(ca.describeKeys())) process.stdout.write(`  ${name.padEnd(12)} key ${where}\n`);
        // The credential as configured (a file name at most, never a secret); the key version pinned.
        const keyVersion = ca.deviceCa.key.description.split('/').pop();
        process.stdout.write(`run the authority with this in its config file (it needs Key Vault Crypto User on the key; the passphrase of the other CA keys from LEAFGATE_CA_PASSPHRASE):\n` +
          `  "caKeys": ${JSON.stringify({ store: 'keyvault', keyvault: { vaultUrl: k.vaultUrl, keyName: k.keyName, keyVersion, credential: k.credential } })}\n`);
      }
      const dest = v['offline-root'];
      if (!dest) return 0;
      if (config.caKeys.store === 'pkcs11') throw new UsageError('--offline-root moves a root key file; a root key in a token stays in the token (keep the token offline, or give the running authority a token without the root key)');
      if (isPostgresUrl(config.database)) throw new UsageError('--offline-root works on a file CA (SQLite); with PostgreSQL keep the root key out of ca_material by running init on the first node\'s files before it adopts them');
      const keyPath = join(config.dataDir, 'ca', 'root.key.pem');
      if (!existsSync(keyPath)) throw new UsageError('the root key is already offline');
      await signRootCrl();
      mkdirSync(dest, { recursive: true, mode: 0o700 });
      const target = join(dest, 'root.key.pem');
      copyFileSync(keyPath, target);
      chmodSync(target, 0o600);
      rmSync(keyPath);
      process.stdout.write(`root key moved to ${target}: keep it offline; sign the next root CRL before ${days} days with \`leafgate authority root-crl --root-key ${target}\`\n`);
      return 0;
    }
    if (command === 'root-crl') {
      if (!v['root-key']) throw new UsageError('root-crl needs --root-key FILE');
      if (!ca.root.key) ca = ca.withRootKey(readFileSync(v['root-key'], 'utf8'), config.caPassphrase);
      await signRootCrl();
      return 0;
    }
    const legacy = (await store.listCertificates({ kind: 'subca', status: 'active', limit: 1_000_000 })).filter((c) => c.issuer === 'root' && c.notAfter > Date.now());
    if (!legacy.length) process.stdout.write('nothing to migrate\n');
    for (const c of legacy) {
      process.stdout.write(`Sub-CA ${c.serial} of gateway ${c.subjectId} was signed by the root itself (valid until ${new Date(c.notAfter).toISOString()}): run \`leafgate gateway subca\` on that gateway, then \`leafgate authority revoke --serial ${c.serial} --reason superseded\` where the root key is\n`);
    }
    return 0;
  } finally {
    await ca?.close();
    await store.close();
  }
}

/** The CA: files in the data directory, a PKCS#11 token (caKeys), or the cluster's CA in PostgreSQL. */
async function openCa(config: ReturnType<typeof resolveAuthorityConfig>, store: Awaited<ReturnType<typeof openStore>>, create = false): Promise<LocalCa> {
  if (!isPostgresUrl(config.database)) return (await openConfiguredCa(config, { create })).ca;
  const rows = await store.getCaMaterial();
  if (!rows.length && !create) throw new LeafgateError('internal', 'the database holds no CA yet: start an authority node first');
  return (await openConfiguredCa(config, { shared: store, create })).ca;
}

/** The root certificate (public): from the data directory, or from the cluster's database. */
async function rootPem(config: ReturnType<typeof resolveAuthorityConfig>): Promise<string> {
  if (!isPostgresUrl(config.database)) return readFileSync(join(config.dataDir, 'ca', 'root.crt.pem'), 'utf8');
  const store = await openStore(config.database);
  try {
    const root = (await store.getCaMaterial()).find((r) => r.name === 'root');
    if (!root) throw new LeafgateError('internal', 'the database holds no CA yet: start an authority node first');
    return root.certPem;
  } finally {
    await store.close();
  }
}

/** Calls the admin API over HTTPS, trusting the authority's root from the data directory. */
function adminCall(base: string, ca: string, token: string, method: string, path: string, body?: unknown): Promise<unknown> {
  const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
  return new Promise((resolve, reject) => {
    const req = httpsRequest(new URL(path, base), {
      method, ca, headers: { authorization: `Bearer ${token}`, ...(payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {}) },
    }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        let parsed: any;
        try {
          parsed = JSON.parse(Buffer.concat(chunks).toString('utf8'));
        } catch {
          return reject(new Error(`admin API answered ${res.statusCode} without JSON`));
        }
        if ((res.statusCode ?? 500) >= 400) return reject(new LeafgateError(isErrorCode(parsed.code) ? parsed.code : 'internal', `admin API ${res.statusCode}: ${parsed.message}`));
        resolve(parsed);
      });
    });
    req.on('error', reject);
    req.end(payload);
  });
}

async function adminCommand(command: string, v: Record<string, any>, config: ReturnType<typeof resolveAuthorityConfig>): Promise<number> {
  const base = v.authority ?? `https://localhost:${config.listen.port}`;
  const ca = await rootPem(config);
  const token = loadAdminToken(config);
  const q = new URLSearchParams();
  for (const k of ['status', 'expiring', 'limit', 'device', 'target']) if (v[k] !== undefined) q.set(k, String(v[k]));
  const qs = q.size ? `?${q}` : '';
  let rows: any;
  switch (command) {
    case 'devices':
      rows = await adminCall(base, ca, token, 'GET', `/admin/v1/devices${qs}`);
      break;
    case 'certs':
      rows = await adminCall(base, ca, token, 'GET', `/admin/v1/certs${qs}`);
      break;
    case 'policies':
      rows = await adminCall(base, ca, token, 'GET', '/admin/v1/policies');
      if (!v.json) {
        rows = Object.entries(rows as Record<string, any>).map(([group, p]) => ({
          group, methods: p.methods.join(','), cn: p.cnTemplate, keys: p.keys.map((k: any) => `${k.keyType}-${k.keySize}`).join(','),
          validityDays: p.validityDays, maxActiveCerts: p.maxActiveCerts, ddkg: p.ddkg.enrollment, manufacturerCAs: p.pkiSignature.manufacturerCAs.length,
        }));
      }
      break;
    case 'audit':
      rows = await adminCall(base, ca, token, 'GET', `/admin/v1/audit${qs}`);
      if (!v.json) rows = (rows as any[]).map((r) => ({ seq: r.seq, at: r.at, action: r.action, outcome: r.outcome, code: r.code ?? '', device: r.deviceId ?? '', gateway: r.gatewayId ?? '', serial: r.serial ?? '' }));
      break;
    case 'sync':
      rows = v.retry
        ? [await adminCall(base, ca, token, 'POST', '/admin/v1/sync/retry', { target: v.target ?? 'hub', device: v.device })]
        : await adminCall(base, ca, token, 'GET', `/admin/v1/sync${qs}`);
      break;
    case 'revoke': {
      if (!v.serial && !v.device && !v.gateway && !v.certificate) throw new UsageError('revoke needs --serial HEX, --device ID, --gateway ID or --certificate FILE');
      const certificate = v.certificate ? readFileSync(v.certificate, 'utf8') : undefined;
      rows = await adminCall(base, ca, token, 'POST', '/admin/v1/revoke', { serial: v.serial, device: v.device, gateway: v.gateway, certificate, reason: v.reason ?? 'unspecified', decommission: v.decommission === true });
      // Certificates of an external CA (EST): leafgate's gateways refuse them now, the CA does not know.
      for (const r of rows as Array<{ serial: string; externalCa?: { action: string } }>) {
        if (r.externalCa) process.stderr.write(`certificate ${r.serial}: ${r.externalCa.action}\n`);
      }
      if (!v.json) rows = (rows as Array<Record<string, unknown>>).map(({ externalCa, ...r }) => (externalCa ? { ...r, revokeAtExternalCa: 'yes' } : r));
      break;
    }
  }
  if (v.json) process.stdout.write(JSON.stringify(rows, null, 2) + '\n');
  else printTable(rows as Record<string, unknown>[]);
  return 0;
}
