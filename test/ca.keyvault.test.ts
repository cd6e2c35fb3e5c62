/**
 * caKeys.store "keyvault": the device CA's key in Azure Key Vault, the root, the infrastructure
 * CA and the edge issuer as encrypted file keys in <dataDir>/ca. The REAL @azure/keyvault-keys
 * and @azure/identity clients talk HTTPS to the wire-level stand-in (test/support/
 * keyvault-standin.ts), which counts the sign operations it performs. `authority init` (the
 * CLI) creates the vault key and the hierarchy; an authority started on it onboards a device
 * through a real gateway and mqtt.js with a certificate the vault signed (openssl verifies the
 * chain), signs its CRL through the vault after a revocation, turns a throttled vault into
 * `pending` (classic flow) or `authority_unavailable` with `retryAfterMs` (compact flow), then
 * one certificate; a device CA certificate of another key and the configuration mistakes refuse
 * to start with what to do; with PostgreSQL the nodes share the CA in ca_material, the device
 * CA's row without a key.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { createPublicKey, generateKeyPairSync, X509Certificate } from 'node:crypto';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import pino from 'pino';
import { ConfigError } from '../config-schema/index.ts';
import { LeafgateError, pkix, type CertMessage } from '../protocol/index.ts';
import { resolveAuthorityConfig, startAuthority, type AuthorityConfigInput } from '../authority/index.ts';
import { BACKDATE_MS, LocalCa, openCa } from '../authority/ca/index.ts';
import { KeyVaultStandin } from './support/keyvault-standin.ts';
import { startStack } from './support/stack.ts';
import { authenticate, bootstrap, csrFor, rid } from './support/mqtt.ts';
import { OPENSSL } from './support/openssl.ts';
import { pgSchema } from './support/pg.ts';
import { assertRefusalAudited } from './support/refusals.ts';

const PASSPHRASE = 'kv-test-passphrase-0123';
const KEY = 'leafgate-device-ca';
const silent = pino({ level: 'silent' });

interface Vault {
  kv: KeyVaultStandin;
  dir: string;
  secretFile: string;
  caFile: string;
  /** caKeys for this vault: a service principal whose secret is in a file, the stand-in's CA trusted. */
  caKeys(extra?: Record<string, unknown>): NonNullable<AuthorityConfigInput['caKeys']>;
  config(dataDir: string, extra?: Record<string, unknown>, input?: AuthorityConfigInput): ReturnType<typeof resolveAuthorityConfig>;
}

async function vault(t: TestContext, opts?: Parameters<typeof KeyVaultStandin.start>[0]): Promise<Vault> {
  const kv = await KeyVaultStandin.start(opts);
  t.after(() => kv.close());
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-kv-ca-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const secretFile = join(dir, 'client-secret');
  writeFileSync(secretFile, `${kv.clientSecret}\n`, { mode: 0o600 });
  const caFile = join(dir, 'vault-ca.pem');
  writeFileSync(caFile, kv.ca);
  const caKeys = (extra: Record<string, unknown> = {}) => ({
    store: 'keyvault' as const,
    keyvault: {
      vaultUrl: kv.vaultUrl, keyName: KEY,
      credential: { kind: 'clientSecret' as const, tenantId: kv.tenantId, clientId: kv.clientId, clientSecretFile: secretFile, authorityHost: kv.authorityHost },
      // The stand-in is https://127.0.0.1:port, not *.vault.azure.net, under a test CA.
      tlsCaFile: caFile, disableChallengeResourceVerification: true,
      ...extra,
    },
  });
  const config = (dataDir: string, extra: Record<string, unknown> = {}, input: AuthorityConfigInput = {}) =>
    resolveAuthorityConfig({ dataDir, caPassphrase: PASSPHRASE, listen: { host: '127.0.0.1', port: 0 }, caKeys: caKeys(extra), ...input }, {});
  return { kv, dir, secretFile, caFile, caKeys, config };
}

/** `authority init` in process (what the CLI calls): the vault key and the hierarchy. */
async function init(v: Vault, dataDir: string, extra: Record<string, unknown> = {}): Promise<void> {
  const { ca } = await openCa(v.config(dataDir, extra), { create: true, logger: silent });
  await ca.close();
}

const spkiOf = (k: { export(o: { type: 'spki'; format: 'der' }): Buffer }) => k.export({ type: 'spki', format: 'der' });
const vaultPublicKey = (kv: KeyVaultStandin, name = KEY) => createPublicKey(kv.keys.get(name)!.at(-1)!.privateKey);
const creates = (kv: KeyVaultStandin) => kv.requests.filter((r) => r.method === 'POST' && r.path.endsWith('/create') && r.status === 200).length;

function deviceRequest(cn: string, days = 30) {
  const now = Date.now();
  const pair = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  return { subjectDer: pkix.encodeName(cn), spkiDer: spkiOf(pair.publicKey), profile: { kind: 'device', keyType: 'ec' } as const, notBefore: new Date(now - BACKDATE_MS), notAfter: new Date(now + days * 86_400_000) };
}

function opensslVerify(cwd: string, files: Record<string, string>, args: string[]) {
  for (const [name, text] of Object.entries(files)) writeFileSync(join(cwd, name), text);
  return spawnSync(OPENSSL, ['verify', '-x509_strict', ...args], { cwd, encoding: 'utf8' });
}

/** Starting an authority fails; the error is one line (a LeafgateError or a ConfigError). */
async function startFails(config: ReturnType<typeof resolveAuthorityConfig>): Promise<Error> {
  const err = await startAuthority(config, { logger: silent }).then(
    async (a) => {
      await a.close();
      return null;
    },
    (e: unknown) => e,
  );
  assert.ok(err instanceof Error, `expected a refusal, got ${String(err)}`);
  assert.doesNotMatch(err.message, /\n/, 'one line');
  return err;
}

test('init creates the device CA key in the vault (EC-HSM P-256, key_ops sign) and file keys for the others; start opens them without creating anything; issuance signs through the vault', async (t) => {
  const v = await vault(t);
  const data = join(v.dir, 'authority');
  await init(v, data);
  const stored = v.kv.keys.get(KEY)!;
  assert.equal(stored.length, 1);
  assert.deepEqual([stored[0].kty, stored[0].crv, stored[0].keyOps], ['EC-HSM', 'P-256', ['sign']]);
  // The device CA has a certificate and no key file; the others have encrypted keys (openssl reads them with the passphrase).
  assert.deepEqual(readdirSync(join(data, 'ca')).sort(), ['device-ca.crt.pem', 'edge-issuer.crt.pem', 'edge-issuer.key.pem', 'infra-ca.crt.pem', 'infra-ca.key.pem', 'root.crt.pem', 'root.key.pem']);
  assert.match(readFileSync(join(data, 'ca', 'infra-ca.key.pem'), 'utf8'), /BEGIN ENCRYPTED PRIVATE KEY/);
  const deviceCaCert = new X509Certificate(readFileSync(join(data, 'ca', 'device-ca.crt.pem')));
  assert.ok(spkiOf(deviceCaCert.publicKey).equals(spkiOf(vaultPublicKey(v.kv))), 'the device CA certificate is for the vault key');
  const chain = opensslVerify(join(data, 'ca'), {}, ['-CAfile', 'root.crt.pem', 'device-ca.crt.pem', 'infra-ca.crt.pem', 'edge-issuer.crt.pem']);
  assert.equal(chain.status, 0, chain.stdout + chain.stderr);

  // A second init changes nothing: same key (no new version), same certificates.
  const before = readFileSync(join(data, 'ca', 'device-ca.crt.pem'), 'utf8');
  await init(v, data);
  assert.equal(v.kv.keys.get(KEY)!.length, 1);
  assert.equal(creates(v.kv), 1);
  assert.equal(readFileSync(join(data, 'ca', 'device-ca.crt.pem'), 'utf8'), before);

  // Start: nothing created; the device CA signs through the vault, the others in process.
  const { ca } = await openCa(v.config(data), { logger: silent });
  t.after(() => ca.close());
  assert.equal(creates(v.kv), 1);
  assert.equal(ca.deviceCa.privateKey, null, 'the device CA key is not in this process');
  assert.match(ca.describeKeys()['device-ca'], new RegExp(`^keyvault:${v.kv.vaultUrl}/keys/${KEY}/[0-9a-f]{32}$`));
  assert.deepEqual([ca.describeKeys().root, ca.describeKeys()['infra-ca'], ca.describeKeys()['edge-issuer']], ['file', 'file', 'file']);
  assert.ok(ca.infraCa.privateKey, 'a file key keeps the in-process fast path');
  const signs = v.kv.signs;
  const cert = await ca.issue('device', deviceRequest('kv-unit-1', 365 * 30));
  assert.equal(v.kv.signs, signs + 1, 'one sign operation in the vault per device certificate');
  assert.ok(new X509Certificate(cert.pem).verify(vaultPublicKey(v.kv)), 'signed by the vault key');
  assert.equal(new X509Certificate(cert.pem).validTo, ca.deviceCa.certificate.validTo, 'never past the device CA');
  // Gateways and the authority's TLS are not the vault's business.
  const gw = await ca.issue('infra', { ...deviceRequest('gw-unit'), profile: { kind: 'gateway', keyType: 'ec' } });
  assert.ok(new X509Certificate(gw.pem).verify(ca.infraCa.certificate.publicKey));
  assert.equal(v.kv.signs, signs + 1);
  // The file keys beside the vault key take the CA passphrase as the file store does.
  await assert.rejects(openCa(v.config(data, {}, { caPassphrase: 'another-passphrase-1' }), { logger: silent }), /cannot decrypt .*root\.key\.pem: wrong CA passphrase\?/);
  await assert.rejects(openCa(v.config(data, {}, { caPassphrase: 'short' }), { logger: silent }), /CA passphrase must have at least 12 characters/);
});

test('the key types init creates: EC P-384 (ES384) and RSA 3072, software keys with hsm false; an existing key is used as it is', async (t) => {
  const v = await vault(t);
  await init(v, join(v.dir, 'p384'), { keyName: 'p384', keyType: 'ec-384', hsm: false });
  assert.deepEqual([v.kv.keys.get('p384')![0].kty, v.kv.keys.get('p384')![0].crv], ['EC', 'P-384']);
  await init(v, join(v.dir, 'rsa'), { keyName: 'rsa', keyType: 'rsa-3072' });
  const rsa = v.kv.keys.get('rsa')![0];
  assert.equal(rsa.kty, 'RSA-HSM');
  assert.equal(createPublicKey(rsa.privateKey).asymmetricKeyDetails?.modulusLength, 3072);
  // A key made out of band (az keyvault key create) is taken, whatever keyType says.
  v.kv.addKey('existing', 'EC-HSM', { crv: 'P-256', keyOps: ['sign', 'verify'] });
  await init(v, join(v.dir, 'existing'), { keyName: 'existing', keyType: 'rsa-3072' });
  assert.equal(v.kv.keys.get('existing')!.length, 1);

  for (const name of ['p384', 'rsa', 'existing']) {
    const { ca } = await openCa(v.config(join(v.dir, name), { keyName: name }), { logger: silent });
    try {
      const cert = new X509Certificate((await ca.issue('device', deviceRequest(`kv-${name}`))).pem);
      assert.ok(cert.verify(vaultPublicKey(v.kv, name)), `${name}: signed by the vault key`);
      assert.ok(cert.checkIssued(ca.deviceCa.certificate));
    } finally {
      await ca.close();
    }
  }
});

test('a device-ca.crt.pem that is not for the vault key refuses start and says what to do; doing it (move it away, init) works, under the same root', async (t) => {
  const v = await vault(t);
  // An authority that ran on file keys moves its device CA key to the vault: its device-ca.crt.pem is for the file key.
  const data = join(v.dir, 'switched');
  LocalCa.open(join(data, 'ca'), PASSPHRASE);
  const rootBefore = readFileSync(join(data, 'ca', 'root.crt.pem'), 'utf8');
  v.kv.addKey(KEY, 'EC-HSM', { crv: 'P-256', keyOps: ['sign'] });
  const err = await startFails(v.config(data));
  assert.ok(err instanceof LeafgateError);
  assert.match(err.message, new RegExp(`the device-ca key \\(keyvault:${v.kv.vaultUrl}/keys/${KEY}/[0-9a-f]{32}\\) does not match .*device-ca\\.crt\\.pem: configure the key \\(and key version\\) that certificate was made for, or move .*device-ca\\.crt\\.pem away and run \`leafgate authority init\``));
  // The same refusal at init: it never replaces a certificate on its own.
  await assert.rejects(init(v, data), /does not match/);

  renameSync(join(data, 'ca', 'device-ca.crt.pem'), join(data, 'ca', 'device-ca.crt.pem.file-key'));
  await init(v, data);
  assert.equal(readFileSync(join(data, 'ca', 'root.crt.pem'), 'utf8'), rootBefore, 'the root stays');
  const { ca } = await openCa(v.config(data), { logger: silent });
  t.after(() => ca.close());
  assert.ok(spkiOf(ca.deviceCa.certificate.publicKey).equals(spkiOf(vaultPublicKey(v.kv))));

  // A key rotated in the vault (a new current version) no longer matches the certificate: refused the same way;
  // the version pinned in caKeys.keyvault.keyVersion keeps the authority on the certificate's key.
  const version = v.kv.keys.get(KEY)!.at(-1)!.version;
  v.kv.addKey(KEY, 'EC-HSM', { crv: 'P-256', keyOps: ['sign'] });
  assert.match((await startFails(v.config(data))).message, /does not match/);
  const pinned = await openCa(v.config(data, { keyVersion: version }), { logger: silent });
  await pinned.ca.close();
});

test('the root kept offline: start runs on the vault key and the intermediates; a device CA to make needs the root key', async (t) => {
  const v = await vault(t);
  const data = join(v.dir, 'offline');
  await init(v, data);
  mkdirSync(join(v.dir, 'usb'));
  renameSync(join(data, 'ca', 'root.key.pem'), join(v.dir, 'usb', 'root.key.pem'));
  const { ca } = await openCa(v.config(data), { logger: silent });
  assert.equal(ca.describeKeys().root, 'offline');
  assert.ok(new X509Certificate((await ca.issue('device', deviceRequest('kv-offline'))).pem).verify(vaultPublicKey(v.kv)));
  await ca.close();
  // A device CA certificate for a new key cannot be signed without the root key.
  rmSync(join(data, 'ca', 'device-ca.crt.pem'));
  await assert.rejects(init(v, data, { keyName: 'another' }), /the device-ca CA is missing and the root key is offline/);
  // At start a missing certificate says to run init; so does a missing file key.
  await assert.rejects(openCa(v.config(data), { logger: silent }), /device-ca\.crt\.pem is missing: run `leafgate authority init` with the same key store first/);
  await assert.rejects(openCa(v.config(join(v.dir, 'empty')), { logger: silent }), /root\.crt\.pem is missing: run `leafgate authority init`/);
  assert.equal(existsSync(join(v.dir, 'empty', 'ca', 'root.key.pem')), false, 'start writes no key');
  // An intermediate's certificate without its key file is never papered over with a new key, not even by init.
  renameSync(join(data, 'ca', 'infra-ca.key.pem'), join(v.dir, 'usb', 'infra-ca.key.pem'));
  await assert.rejects(init(v, data), /infra-ca\.key\.pem is missing \(its certificate .*infra-ca\.crt\.pem is there\): restore the key file/);
  assert.equal(existsSync(join(data, 'ca', 'infra-ca.key.pem')), false);
});

test('configuration refusals name the key: unknown keys, a client secret, a vault URL, settings of another store', async (t) => {
  const v = await vault(t);
  const data = join(v.dir, 'cfg');
  // Untyped on purpose: these are the mistakes a hand-written JSON file makes.
  const refused = (input: Record<string, unknown>, message: RegExp, env: NodeJS.ProcessEnv = {}) =>
    assert.throws(() => resolveAuthorityConfig({ dataDir: data, caPassphrase: PASSPHRASE, ...input } as AuthorityConfigInput, env), (err: Error) => {
      assert.ok(err instanceof ConfigError, String(err));
      assert.match(err.message, message);
      return true;
    });
  const kv = v.caKeys().keyvault as Record<string, any>;
  refused({ caKeys: { store: 'keyvault', keyvault: { ...kv, vaultURL: kv.vaultUrl } } }, /caKeys\.keyvault\.vaultURL: unknown key \(did you mean vaultUrl\?\)/);
  refused({ caKeys: { store: 'keyvault', keyvault: { ...kv, credential: { ...kv.credential, clientSecret: 'S3cret-in-config' } } } }, /caKeys\.keyvault\.credential\.clientSecret: must be absent: a client secret is never written in the configuration; use clientSecretFile or AZURE_CLIENT_SECRET$/);
  assert.throws(() => resolveAuthorityConfig({ dataDir: data, caKeys: { store: 'keyvault', keyvault: { ...kv, credential: { ...kv.credential, clientSecret: 'S3cret-in-config' } } } }, {}), (e: Error) => !e.message.includes('S3cret-in-config'));
  refused({ caKeys: { store: 'keyvault', keyvault: { ...kv, vaultUrl: 'http://v.vault.azure.net' } } }, /caKeys\.keyvault\.vaultUrl \(env LEAFGATE_KEYVAULT_URL\): must be https:\/\/\{vault\}\.vault\.azure\.net/);
  refused({ caKeys: { store: 'keyvault', keyvault: { ...kv, vaultUrl: undefined } } }, /caKeys\.keyvault\.vaultUrl: must be https:\/\/\{vault\}\.vault\.azure\.net \(env LEAFGATE_KEYVAULT_URL\)/);
  refused({ caKeys: { store: 'keyvault', keyvault: { ...kv, keyVersion: 'latest' } } }, /caKeys\.keyvault\.keyVersion: must be a key version \(32 hex digits\)/);
  refused({ caKeys: { store: 'keyvault', keyvault: { ...kv, keyType: 'ec-521' } } }, /caKeys\.keyvault\.keyType: must be one of "ec-256", "ec-384", "rsa-3072"/);
  refused({ caKeys: { store: 'keyvault', keyvault: { ...kv, maxWaitMs: 0 } } }, /caKeys\.keyvault\.maxWaitMs: must be >= 1/);
  refused({ caKeys: { store: 'keyvault', keyvault: { ...kv, credential: { kind: 'password' } } } }, /caKeys\.keyvault\.credential\.kind: must be one of "managedIdentity", "clientSecret"/);
  refused({ caKeys: { store: 'keyvault', keyvault: { ...kv, credential: { kind: 'managedIdentity', clientSecretFile: '/x' } } } }, /caKeys\.keyvault\.credential\.clientSecretFile: is for kind clientSecret/);
  refused({ caKeys: { store: 'keyvault', vaultUrl: kv.vaultUrl, keyName: KEY } }, /caKeys\.vaultUrl: unknown key for store "keyvault" \(its settings go under caKeys\.keyvault\)/);
  refused({ caKeys: { keyvault: kv } }, /caKeys\.keyvault: is set but caKeys\.store is "file": add "store": "keyvault"/);
  // The environment fills in the vault and the key; the default credential follows AZURE_CLIENT_SECRET.
  const fromEnv = resolveAuthorityConfig({ dataDir: data, caKeys: { store: 'keyvault' } }, { LEAFGATE_KEYVAULT_URL: 'https://v.vault.azure.net/', LEAFGATE_KEYVAULT_KEY: 'k1' });
  assert.deepEqual(fromEnv.caKeys, { store: 'keyvault', keyvault: { vaultUrl: 'https://v.vault.azure.net', keyName: 'k1', keyType: 'ec-256', hsm: true, credential: { kind: 'managedIdentity' }, disableChallengeResourceVerification: false } });
  refused({ caKeys: { store: 'keyvault' } }, /caKeys\.keyvault\.keyName: must be 1-127 letters/, { LEAFGATE_KEYVAULT_URL: 'https://v.vault.azure.net', LEAFGATE_KEYVAULT_KEY: 'a/b' });
  refused({ caKeys: { store: 'keyvault' } }, /caKeys\.keyvault\.vaultUrl/, { LEAFGATE_KEYVAULT_URL: 'https://v.vault.azure.net/path', LEAFGATE_KEYVAULT_KEY: 'k1' });

  // Past validation, what the vault or Entra refuses stops the start with its cause, and no secret in it.
  const wrongSecret = join(v.dir, 'wrong-secret');
  writeFileSync(wrongSecret, 'Wr0ng-client-secret-value\n');
  mkdirSync(join(data, 'ca'), { recursive: true });
  const lines: string[] = [];
  const logger = pino({ level: 'trace' }, new Writable({ write: (c, _e, cb) => (lines.push(String(c)), cb()) }));
  const config = v.config(data, { credential: { ...kv.credential, clientSecretFile: wrongSecret } });
  const err = await startAuthority(config, { logger }).then(async (a) => (await a.close(), null), (e: unknown) => e as Error);
  assert.ok(err instanceof LeafgateError && /cannot read Key Vault key leafgate-device-ca/.test(err.message), String(err));
  assert.ok(![err.message, ...lines].some((l) => l.includes('Wr0ng-client-secret-value') || l.includes(v.kv.clientSecret)), 'no secret in the error or the log');
  assert.equal((await startFails(v.config(data, { tlsCaFile: join(v.dir, 'absent.pem') }))).message, `cannot read caKeys.keyvault.tlsCaFile ${join(v.dir, 'absent.pem')}: ENOENT`);
});

test('end to end: an authority on the vault key onboards devices through a real gateway and mqtt.js with certificates the vault signed, signs the CRL after a revocation in the vault, and a throttled vault reaches the device as pending (classic) or authority_unavailable with retryAfterMs (compact), then one certificate', async (t) => {
  const v = await vault(t);
  const data = join(v.dir, 'authority');
  await init(v, data);
  // maxWaitMs well above a sign's round trip on a loaded machine, and below the Retry-After the vault answers below.
  const stack = await startStack(t, { authority: { dataDir: data, caPassphrase: PASSPHRASE, caKeys: v.caKeys({ maxWaitMs: 5000 }) } });
  const ca = stack.authority.ca;
  assert.equal(ca.deviceCa.privateKey, null);
  assert.match(ca.deviceCa.key.description, /^keyvault:/);
  const vaultKey = vaultPublicKey(v.kv);
  const w = mkdtempSync(join(v.dir, 'verify-'));

  // 1. A device onboards (compact flow, LeafDevice over mqtt.js); its certificate is the vault's work.
  // (Sign counts here are lower bounds: a call the connector gave up on at maxWaitMs may still have been
  // signed by the vault. One sign per certificate is checked exactly by the first test; what must hold
  // end to end is one certificate per request.)
  let signs = v.kv.signs;
  const id = await stack.device('kv-dev-1', 'pki-signature').onboard();
  assert.ok(v.kv.signs >= signs + 1, 'signed in the vault');
  const leaf = new X509Certificate(id.certificate);
  assert.ok(leaf.verify(vaultKey), 'signed by the key in the vault');
  assert.deepEqual(id.chain.map((p) => p.trim()), [ca.deviceCa.pem.trim(), ca.root.pem.trim()]);
  const ok = opensslVerify(w, { 'root.pem': ca.root.pem, 'device-ca.pem': ca.deviceCa.pem, 'leaf.pem': id.certificate }, ['-purpose', 'sslclient', '-CAfile', 'root.pem', '-untrusted', 'device-ca.pem', 'leaf.pem']);
  assert.equal(ok.status, 0, ok.stdout + ok.stderr);

  // 2. A revocation: the device CA's CRL is signed through the vault and lists the serial; openssl refuses the certificate with it.
  const before = stack.authority.revocation.crl('device-ca');
  signs = v.kv.signs;
  await stack.authority.revocation.revokeSerial(id.serial, 'keyCompromise', 'test');
  const crl = stack.authority.revocation.crl('device-ca');
  assert.ok(crl.crlNumber > before.crlNumber, 'a new CRL');
  assert.ok(v.kv.signs > signs, 'signed in the vault');
  assert.ok(pkix.parseCrl(crl.der, vaultKey).revoked.has(id.serial), 'verified with the vault key, listing the serial');
  const revoked = opensslVerify(w, { 'crls.pem': crl.pem + stack.authority.revocation.crl('root').pem }, ['-crl_check_all', '-CAfile', 'root.pem', '-untrusted', 'device-ca.pem', '-CRLfile', 'crls.pem', 'leaf.pem']);
  assert.notEqual(revoked.status, 0);
  assert.match(revoked.stdout + revoked.stderr, /certificate revoked/);

  // 3. Classic flow, the vault throttles beyond maxWaitMs: the gateway keeps the CSR queued and tells the device
  // `pending` with the vault's Retry-After, then delivers the one certificate when the vault signs.
  const cred = stack.credential('kv-dev-2', 'pki-signature');
  const dev = await bootstrap(t, stack, 'kv-dev-2');
  const instruction = await authenticate(dev, cred);
  v.kv.failNext(1, 429, { 'retry-after': '6' });
  signs = v.kv.signs;
  const requestId = rid('kv');
  await dev.send('csr', { requestId, csr: csrFor(instruction) });
  const first = await dev.nextMessage(['pending', 'cert', 'error'], { requestId, timeoutMs: 60_000 });
  assert.equal(first.kind, 'pending', JSON.stringify(first.body));
  assert.ok(first.body.retryAfterMs >= 6000, `retryAfterMs ${first.body.retryAfterMs}: at least the vault's Retry-After`);
  const cert = await dev.next<CertMessage>('cert', { requestId, timeoutMs: 60_000 });
  assert.ok(new X509Certificate(cert.certificate).verify(vaultKey));
  assert.equal(v.kv.throttled, 1);
  assert.equal(v.kv.earlyRetries, 0, 'nothing reached the vault before its Retry-After');
  assert.ok(v.kv.signs >= signs + 1);
  assert.equal(dev.messages.filter((m) => m.kind === 'error').length, 0);
  assert.equal(dev.messages.filter((m) => m.kind === 'cert').length, 1, 'one certificate delivered');
  assert.equal((await stack.authority.store.listCertificates({ subjectId: 'kv-dev-2' })).length, 1, 'one certificate on record');

  // 4. Compact flow (nothing queued at the gateway): the device gets authority_unavailable with retryAfterMs;
  // the same request re-sent later (its state kept) gets one certificate.
  const state = new Map<string, string>();
  const store = { get: (k: string) => state.get(k), set: (k: string, val: string) => void state.set(k, val), delete: (k: string) => void state.delete(k) };
  v.kv.failNext(1, 429, { 'retry-after': '6' });
  signs = v.kv.signs;
  const refused = await stack.device('kv-dev-3', 'pki-signature', { retries: 0, state: store }).onboard().then(() => null, (e: unknown) => e);
  assert.ok(refused instanceof LeafgateError, String(refused));
  assert.equal(refused.code, 'authority_unavailable');
  assert.ok(refused.retryAfterMs! >= 6000, `retryAfterMs ${refused.retryAfterMs}: at least the vault's Retry-After`);
  const pendingRequest = JSON.parse([...state.values()][0]) as { requestId: string };
  const again = await stack.device('kv-dev-3', 'pki-signature', { retries: 5, state: store }).onboard();
  assert.ok(new X509Certificate(again.certificate).verify(vaultKey));
  const rows = await stack.authority.store.listCertificates({ subjectId: 'kv-dev-3' });
  assert.equal(rows.length, 1, 'one certificate on record');
  assert.equal(rows[0].requestId, pendingRequest.requestId, 'the request of the refused attempt, completed');
  assert.ok(v.kv.signs >= signs + 1);
  assert.equal(v.kv.earlyRetries, 0);
  // The operator sees why in the audit log.
  await assertRefusalAudited(stack, 'kv-dev-3', 'authority_unavailable');
});

/** The CLI in a child process, asynchronously: the stand-in it talks to runs in this process's event loop. */
function cli(args: string[], env: NodeJS.ProcessEnv): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, ['--import', 'tsx', 'bin/leafgate.ts', 'authority', ...args], {
      encoding: 'utf8', env: { ...process.env, LEAFGATE_LOG_LEVEL: 'silent', AZURE_CLIENT_SECRET: '', ...env }, timeout: 120_000,
    }, (err, stdout, stderr) => resolve({ status: err ? (typeof err.code === 'number' ? err.code : null) : 0, stdout, stderr }));
  });
}

test('leafgate authority init --keyvault-url ... creates the vault key (--keyvault-key-type) and the hierarchy; the client secret from a file or AZURE_CLIENT_SECRET is never printed; --help names the options', async (t) => {
  const v = await vault(t);
  const data = join(v.dir, 'cli');
  // What a stand-in needs beyond the options (its CA, its name) stays in the config file.
  const configFile = join(v.dir, 'authority.json');
  writeFileSync(configFile, JSON.stringify({ caKeys: { store: 'keyvault', keyvault: { tlsCaFile: v.caFile, disableChallengeResourceVerification: true } } }));
  const env = { LEAFGATE_CA_PASSPHRASE: PASSPHRASE, AZURE_TENANT_ID: v.kv.tenantId, AZURE_CLIENT_ID: v.kv.clientId, AZURE_AUTHORITY_HOST: v.kv.authorityHost };
  const usb = join(v.dir, 'usb');
  const r = await cli(['init', '--config', configFile, '--data-dir', data, '--keyvault-url', v.kv.vaultUrl, '--keyvault-key', 'cli-key', '--keyvault-key-type', 'ec-384', '--client-secret-file', v.secretFile, '--offline-root', usb], env);
  assert.equal(r.status, 0, r.stderr + r.stdout);
  assert.match(r.stdout, /CA hierarchy ready/);
  // The root key (a file beside the vault key) moves offline after signing a root CRL.
  assert.match(r.stdout, /root CRL #\d+ signed/);
  assert.ok(existsSync(join(usb, 'root.key.pem')) && !existsSync(join(data, 'ca', 'root.key.pem')), 'the root key moved');
  const key = v.kv.keys.get('cli-key')!;
  assert.deepEqual([key.length, key[0].kty, key[0].crv], [1, 'EC-HSM', 'P-384']);
  assert.match(r.stdout, new RegExp(`device-ca\\s+key keyvault:${v.kv.vaultUrl}/keys/cli-key/${key[0].version}`));
  assert.match(r.stdout, /infra-ca\s+key file/);
  // The caKeys to run with, the key version pinned, the credential by file name only.
  const line = r.stdout.split('\n').find((l) => l.includes('"caKeys"'))!;
  const printed = JSON.parse(`{${line.trim()}}`).caKeys;
  assert.deepEqual(printed, { store: 'keyvault', keyvault: { vaultUrl: v.kv.vaultUrl, keyName: 'cli-key', keyVersion: key[0].version, credential: { kind: 'clientSecret', clientSecretFile: v.secretFile } } });
  assert.ok(!(r.stdout + r.stderr).includes(v.kv.clientSecret), 'the secret is not printed');
  const deviceCa = new X509Certificate(readFileSync(join(data, 'ca', 'device-ca.crt.pem')));
  assert.ok(spkiOf(deviceCa.publicKey).equals(spkiOf(vaultPublicKey(v.kv, 'cli-key'))));

  // Again (root offline now) with the secret in AZURE_CLIENT_SECRET (the default credential then): the key and the certificates stay.
  const again = await cli(['init', '--config', configFile, '--data-dir', data, '--keyvault-url', v.kv.vaultUrl, '--keyvault-key', 'cli-key'], { ...env, AZURE_CLIENT_SECRET: v.kv.clientSecret });
  assert.equal(again.status, 0, again.stderr + again.stdout);
  assert.equal(v.kv.keys.get('cli-key')!.length, 1);
  assert.equal(readFileSync(join(data, 'ca', 'device-ca.crt.pem'), 'utf8'), deviceCa.toString());
  assert.ok(!(again.stdout + again.stderr).includes(v.kv.clientSecret));

  // Refusals: two key stores at once; a key type init cannot make (a configuration error, exit 2).
  const both = await cli(['init', '--data-dir', data, '--keyvault-url', v.kv.vaultUrl, '--pkcs11-module', '/x.so', '--token-label', 't'], env);
  assert.notEqual(both.status, 0);
  assert.match(both.stderr, /two key stores/);
  const badType = await cli(['init', '--config', configFile, '--data-dir', data, '--keyvault-url', v.kv.vaultUrl, '--keyvault-key', 'k', '--keyvault-key-type', 'ec-521'], env);
  assert.equal(badType.status, 2, badType.stderr);
  assert.match(badType.stderr, /caKeys\.keyvault\.keyType: must be one of "ec-256", "ec-384", "rsa-3072"/);

  const help = await cli(['--help'], {});
  assert.equal(help.status, 0);
  for (const s of ['--keyvault-url', '--keyvault-key', '--keyvault-key-type', '--client-secret-file', 'AZURE_CLIENT_SECRET', 'LEAFGATE_KEYVAULT_URL', 'Key Vault Crypto User']) assert.ok(help.stdout.includes(s), `--help mentions ${s}`);
});

test('a cluster on PostgreSQL: the first node adopts its CA files (or makes a set) in ca_material with the device CA row keyless; another node signs through the same vault key; a node with another key, or on file keys, refuses to start', async (t) => {
  const v = await vault(t);
  const { url, schema, admin } = await pgSchema(t, 'lgkv');
  const node = (name: string, extra: Record<string, unknown> = {}) => v.config(join(v.dir, name), extra, { database: url });
  // One node on SQLite made by init moves to PostgreSQL: its CA (and the vault key) become the cluster's.
  await init(v, join(v.dir, 'a'));
  const a = await startAuthority(node('a'), { logger: silent });
  t.after(() => a.close());
  assert.equal(a.ca.root.pem, readFileSync(join(v.dir, 'a', 'ca', 'root.crt.pem'), 'utf8'), 'adopted, not made anew');
  const rows = (await admin.query(`SELECT name, key_pem FROM "${schema}".ca_material ORDER BY name`)).rows as Array<{ name: string; key_pem: string }>;
  assert.deepEqual(rows.map((r) => [r.name, r.key_pem === '' ? 'no key' : r.key_pem.startsWith('-----BEGIN ENCRYPTED PRIVATE KEY') ? 'encrypted' : 'other']), [
    ['device-ca', 'no key'], ['edge-issuer', 'encrypted'], ['infra-ca', 'encrypted'], ['root', 'encrypted'],
  ]);

  // A second node, with an empty data directory: the same CA, the device CA signing through the vault.
  const b = await startAuthority(node('b'), { logger: silent });
  t.after(() => b.close());
  assert.equal(b.ca.deviceCa.pem, a.ca.deviceCa.pem);
  assert.equal(b.ca.deviceCa.privateKey, null);
  assert.equal(existsSync(join(v.dir, 'b', 'ca')), false, 'nothing of the CA on the second node\'s disk');
  const signs = v.kv.signs;
  assert.ok(new X509Certificate((await b.ca.issue('device', deviceRequest('kv-cluster-1'))).pem).verify(vaultPublicKey(v.kv)));
  assert.equal(v.kv.signs, signs + 1);

  // A node given another vault key, or none (file keys), refuses with what to do.
  v.kv.addKey('other', 'EC-HSM', { crv: 'P-256', keyOps: ['sign'] });
  assert.match((await startFails(node('c', { keyName: 'other' }))).message, /the device-ca key \(keyvault:.*\/keys\/other\/[0-9a-f]{32}\) does not match the device-ca CA stored in the database: configure the key \(and key version\) the cluster's device CA was made for/);
  const fileNode = resolveAuthorityConfig({ dataDir: join(v.dir, 'd'), caPassphrase: PASSPHRASE, listen: { host: '127.0.0.1', port: 0 }, database: url }, {});
  assert.match((await startFails(fileNode)).message, /the device-ca CA stored in the database has its key outside the database \(Key Vault\): configure the same caKeys \(store "keyvault"\) on this node/);

  // A new cluster (empty database, empty data directory): the set is made in the database, the device CA for the vault key.
  const fresh = await pgSchema(t, 'lgkvn');
  const g = await startAuthority(v.config(join(v.dir, 'g'), {}, { database: fresh.url }), { logger: silent });
  try {
    assert.notEqual(g.ca.root.pem, a.ca.root.pem);
    assert.ok(spkiOf(g.ca.deviceCa.certificate.publicKey).equals(spkiOf(vaultPublicKey(v.kv))));
    assert.ok(g.ca.deviceCa.certificate.verify(g.ca.root.certificate.publicKey));
    assert.deepEqual((await fresh.admin.query(`SELECT key_pem FROM "${fresh.schema}".ca_material WHERE name = 'device-ca'`)).rows, [{ key_pem: '' }]);
    assert.ok(new X509Certificate((await g.ca.issue('device', deviceRequest('kv-cluster-2'))).pem).verify(vaultPublicKey(v.kv)));
  } finally {
    await g.close();
  }

  // A cluster that runs on file keys is not moved to the vault by a node configured so.
  const files = await pgSchema(t, 'lgkvf');
  const fileCluster = await startAuthority(resolveAuthorityConfig({ dataDir: join(v.dir, 'e'), caPassphrase: PASSPHRASE, listen: { host: '127.0.0.1', port: 0 }, database: files.url }, {}), { logger: silent });
  await fileCluster.close();
  const moved = v.config(join(v.dir, 'f'), {}, { database: files.url });
  assert.match((await startFails(moved)).message, /the device-ca CA stored in the database has its key in the database \(file keys\): this cluster cannot move its device CA key to keyvault:.* yet; use caKeys\.store "file" on this node/);
});
