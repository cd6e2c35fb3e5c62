/**
 * CA keys in a PKCS#11 token: the whole hierarchy in a real SoftHSM2 token made for this file
 * in a temp directory (SOFTHSM2_CONF points at a conf with its own tokendir: no global
 * state). `authority init` generates the keys in the token and signs the CA certificates
 * through it; an authority on the token issues a device certificate end to end through the
 * real stack, which passes `openssl verify -x509_strict -crl_check_all` with CRLs the token
 * signed; a revocation signs a new CRL through the token; refusals at start name their
 * cause; the PIN never reaches a log; a token that stops signing is authority_unavailable.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import pino from 'pino';
import { LeafgateError, pkix } from '../protocol/index.ts';
import { Pkcs11Token, resolveAuthorityConfig, startAuthority } from '../authority/index.ts';
import { BACKDATE_MS, CA_NAMES, DEFAULT_KEY_LABELS } from '../authority/ca/index.ts';
import { startStack } from './support/stack.ts';
import { OPENSSL } from './support/openssl.ts';

const MODULE = '/usr/lib/softhsm/libsofthsm2.so';
const skip = existsSync(MODULE) ? false : `SoftHSM2 is not installed (${MODULE} absent): apt-get install softhsm2`;

const TOKEN = 'leafgate-ca';
const PIN = 'pin-7Q2x9Lw4';
const SO_PIN = 'so-pin-3K8m';

// One token directory for this file, made before anything initializes the module in this process.
const root = mkdtempSync(join(tmpdir(), 'leafgate-softhsm-'));
process.on('exit', () => rmSync(root, { recursive: true, force: true }));
if (!skip) {
  mkdirSync(join(root, 'tokens'));
  writeFileSync(join(root, 'softhsm2.conf'), `directories.tokendir = ${join(root, 'tokens')}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n`);
  process.env.SOFTHSM2_CONF = join(root, 'softhsm2.conf');
  const r = spawnSync('softhsm2-util', ['--init-token', '--free', '--label', TOKEN, '--so-pin', SO_PIN, '--pin', PIN], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`softhsm2-util --init-token failed: ${r.stderr}`);
}
const pinFile = join(root, 'pin');
writeFileSync(pinFile, PIN + '\n', { mode: 0o600 });
const wrongPinFile = join(root, 'wrong-pin');
writeFileSync(wrongPinFile, 'not-the-pin-0000\n', { mode: 0o600 });

const DATA = join(root, 'authority');
const caKeys = (extra: Record<string, unknown> = {}) => ({ store: 'pkcs11' as const, module: MODULE, tokenLabel: TOKEN, pinFile, workers: 2, ...extra });

function cli(...args: string[]) {
  return spawnSync(process.execPath, ['--import', 'tsx', 'bin/leafgate.ts', 'authority', ...args], {
    encoding: 'utf8', env: { ...process.env, LEAFGATE_LOG_LEVEL: 'silent', LEAFGATE_CA_PASSPHRASE: '' }, timeout: 120_000,
  });
}

function openssl(args: string[], cwd: string) {
  return spawnSync(OPENSSL, args, { cwd, encoding: 'utf8' });
}

/** A data directory of its own holding the CA certificates `init` made (the token is the same). */
function dataDirWithCertificates(name: string): string {
  const dir = join(root, name);
  mkdirSync(join(dir, 'ca'), { recursive: true });
  for (const f of readdirSync(join(DATA, 'ca'))) writeFileSync(join(dir, 'ca', f), readFileSync(join(DATA, 'ca', f)));
  return dir;
}

/** Starting an authority fails; the error is a LeafgateError on one line. */
async function startFails(caKeysInput: Record<string, unknown>, env: NodeJS.ProcessEnv = {}): Promise<string> {
  const config = resolveAuthorityConfig({ dataDir: dataDirWithCertificates(`refused-${Math.random().toString(36).slice(2)}`), caKeys: caKeysInput, listen: { host: '127.0.0.1', port: 0 } }, env);
  const lines: string[] = [];
  const logger = pino({ level: 'trace' }, new Writable({ write: (c, _e, cb) => (lines.push(String(c)), cb()) }));
  const err = await startAuthority(config, { logger }).then(
    async (a) => {
      await a.close();
      return null;
    },
    (e: unknown) => e,
  );
  assert.ok(err instanceof LeafgateError, `expected a refusal, got ${String(err)}`);
  assert.doesNotMatch(err.message, /\n/, 'one line');
  assert.ok(!lines.join('').includes(PIN), 'the PIN is not logged');
  return err.message;
}

test('authority init generates the four CA keys in the token (sensitive, never extractable) and signs the hierarchy through it', { skip }, () => {
  const r = cli('init', '--data-dir', DATA, '--pkcs11-module', MODULE, '--token-label', TOKEN, '--pin-file', pinFile);
  assert.equal(r.status, 0, r.stderr + r.stdout);
  assert.match(r.stdout, /CA hierarchy ready/);
  assert.match(r.stdout, new RegExp(`device-ca\\s+key pkcs11:${TOKEN}/leafgate-device-ca`));
  assert.ok(!(r.stdout + r.stderr).includes(PIN), 'the PIN is not printed');
  // Certificates only: no key file is ever written.
  assert.deepEqual(readdirSync(join(DATA, 'ca')).sort(), CA_NAMES.map((n) => `${n}.crt.pem`).sort());

  const token = Pkcs11Token.open(MODULE, TOKEN, PIN);
  try {
    const { p11, pk, session } = token.raw;
    for (const name of CA_NAMES) {
      const key = token.key(DEFAULT_KEY_LABELS[name]);
      assert.ok(key, `${name} key in the token`);
      assert.deepEqual([key.sensitive, key.extractable], [true, false], `${name}: CKA_SENSITIVE true, CKA_EXTRACTABLE false`);
      // The certificate's key is the token's key.
      const cert = new X509Certificate(readFileSync(join(DATA, 'ca', `${name}.crt.pem`)));
      assert.ok(cert.publicKey.export({ type: 'spki', format: 'der' }).equals(key.publicKey.export({ type: 'spki', format: 'der' })), `${name} certificate holds the token's public key`);
      // Asking the token for the private value is refused.
      p11.C_FindObjectsInit(session, [{ type: pk.CKA_CLASS, value: pk.CKO_PRIVATE_KEY }, { type: pk.CKA_LABEL, value: DEFAULT_KEY_LABELS[name] }]);
      const handle = p11.C_FindObjects(session)!;
      p11.C_FindObjectsFinal(session);
      assert.throws(() => p11.C_GetAttributeValue(session, handle, [{ type: pk.CKA_VALUE }]), /CKR_ATTRIBUTE_SENSITIVE/);
    }
  } finally {
    token.close();
  }
  // The root signed the intermediates through the token: openssl agrees.
  const v = openssl(['verify', '-x509_strict', '-CAfile', 'root.crt.pem', 'device-ca.crt.pem', 'infra-ca.crt.pem', 'edge-issuer.crt.pem'], join(DATA, 'ca'));
  assert.equal(v.status, 0, v.stdout + v.stderr);

  // A second init finds the keys and certificates and changes nothing.
  const before = readFileSync(join(DATA, 'ca', 'device-ca.crt.pem'), 'utf8');
  const again = cli('init', '--data-dir', DATA, '--pkcs11-module', MODULE, '--token-label', TOKEN, '--pin-file', pinFile);
  assert.equal(again.status, 0, again.stderr);
  assert.equal(readFileSync(join(DATA, 'ca', 'device-ca.crt.pem'), 'utf8'), before);
});

test('an authority on the token issues a device certificate end to end; openssl verifies it with the token-signed CRLs; a revocation re-signs the CRL through the token', { skip }, async (t) => {
  const stack = await startStack(t, { authority: { dataDir: dataDirWithCertificates('stack'), caKeys: caKeys() } });
  t.after(() => stack.close());
  assert.equal(stack.authority.ca.deviceCa.privateKey, null, 'no private key in this process');
  assert.equal(stack.authority.ca.deviceCa.key.description, `pkcs11:${TOKEN}/leafgate-device-ca`);

  const id = await stack.device('hsm-dev-1', 'pki-signature').onboard();
  // A batch of issuances in flight at once goes through the worker sessions.
  const now = Date.now();
  const spki = id.privateKey.asymmetricKeyType === 'ec' ? (await import('node:crypto')).createPublicKey(id.privateKey).export({ type: 'spki', format: 'der' }) : Buffer.alloc(0);
  const many = await Promise.all(Array.from({ length: 40 }, (_, i) => stack.authority.ca.issue('device', {
    subjectDer: pkix.encodeName(`hsm-batch-${i}`), spkiDer: spki, profile: { kind: 'device', keyType: 'ec' }, notBefore: new Date(now - BACKDATE_MS), notAfter: new Date(now + 86_400_000),
  })));
  for (const c of many) assert.ok(new X509Certificate(c.pem).verify(stack.authority.ca.deviceCa.certificate.publicKey));

  const w = mkdtempSync(join(root, 'verify-'));
  const write = (name: string, text: string) => writeFileSync(join(w, name), text);
  write('root.pem', stack.authority.ca.root.pem);
  write('device-ca.pem', stack.authority.ca.deviceCa.pem);
  write('leaf.pem', id.certificate);
  const crls = () => {
    const device = stack.authority.revocation.crl('device-ca');
    const rootCrl = stack.authority.revocation.crl('root');
    write('crls.pem', device.pem + rootCrl.pem);
    return device;
  };
  const first = crls();
  // The CRLs themselves are signed by the token keys.
  for (const [crl, ca] of [['device-ca', stack.authority.ca.deviceCa], ['root', stack.authority.ca.root]] as const) {
    const parsed = pkix.parseCrl(stack.authority.revocation.crl(crl).der, ca.certificate.publicKey);
    assert.ok(parsed.crlNumber >= 1n);
  }
  const verify = () => openssl(['verify', '-x509_strict', '-crl_check_all', '-CAfile', 'root.pem', '-untrusted', 'device-ca.pem', '-CRLfile', 'crls.pem', 'leaf.pem'], w);
  const ok = verify();
  assert.equal(ok.status, 0, ok.stdout + ok.stderr);

  await stack.authority.revocation.revokeSerial(id.serial, 'keyCompromise', 'test');
  const second = crls();
  assert.ok(second.crlNumber > first.crlNumber, 'a new CRL');
  assert.ok(pkix.parseCrl(second.der, stack.authority.ca.deviceCa.certificate.publicKey).revoked.has(id.serial), 'signed by the device CA key in the token, listing the serial');
  const refused = verify();
  assert.notEqual(refused.status, 0);
  assert.match(refused.stdout + refused.stderr, /certificate revoked/);
});

test('start-up refusals name their cause on one line: token absent, wrong PIN, key missing, no PIN', { skip }, async () => {
  assert.match(await startFails(caKeys({ tokenLabel: 'no-such-token' })), /PKCS#11 token "no-such-token" not found in \/usr\/lib\/softhsm\/libsofthsm2\.so \(tokens present: "leafgate-ca"\)/);
  assert.match(await startFails(caKeys({ pinFile: wrongPinFile })), /PKCS#11 login to token "leafgate-ca" failed: wrong PIN \(CKR_PIN_INCORRECT\)/);
  assert.match(await startFails(caKeys({ keyLabels: { 'device-ca': 'not-there' } })), /PKCS#11 token "leafgate-ca" holds no private key labelled "not-there" \(the device-ca key\)/);
  assert.match(await startFails(caKeys({ module: join(root, 'absent.so') })), /cannot load the PKCS#11 module .*absent\.so/);
  assert.match(await startFails({ ...caKeys(), pinFile: undefined }, {}), /no PKCS#11 PIN: set caKeys\.pinFile or the environment variable LEAFGATE_PKCS11_PIN/);
  assert.match(await startFails(caKeys({ pinFile: join(root, 'no-pin-file') })), /cannot read the PKCS#11 PIN file .*no-pin-file: ENOENT/);
});

test('a CA key that can leave the token is refused at start', { skip }, async () => {
  const token = Pkcs11Token.open(MODULE, TOKEN, PIN);
  try {
    const { p11, pk, session } = token.raw;
    p11.C_GenerateKeyPair(session, { mechanism: pk.CKM_EC_KEY_PAIR_GEN },
      [{ type: pk.CKA_TOKEN, value: true }, { type: pk.CKA_LABEL, value: 'extractable-key' }, { type: pk.CKA_VERIFY, value: true }, { type: pk.CKA_EC_PARAMS, value: pkix.der.oid('1.2.840.10045.3.1.7') }],
      [{ type: pk.CKA_TOKEN, value: true }, { type: pk.CKA_LABEL, value: 'extractable-key' }, { type: pk.CKA_SIGN, value: true }, { type: pk.CKA_PRIVATE, value: true }, { type: pk.CKA_SENSITIVE, value: false }, { type: pk.CKA_EXTRACTABLE, value: true }]);
  } finally {
    token.close();
  }
  assert.match(await startFails(caKeys({ keyLabels: { 'infra-ca': 'extractable-key' } })), /PKCS#11 key "extractable-key" in token "leafgate-ca" is extractable: a CA key must have CKA_SENSITIVE true and CKA_EXTRACTABLE false/);
});

test('the PIN never reaches the log of a start, from a file or from the environment', { skip }, async () => {
  for (const [name, keys, env] of [
    ['pin-file', caKeys(), {}],
    ['pin-env', { ...caKeys(), pinFile: undefined, pinEnv: 'TEST_HSM_PIN' }, { TEST_HSM_PIN: PIN }],
  ] as const) {
    const lines: string[] = [];
    const logger = pino({ level: 'trace' }, new Writable({ write: (c, _e, cb) => (lines.push(String(c)), cb()) }));
    const config = resolveAuthorityConfig({ dataDir: dataDirWithCertificates(`log-${name}`), caKeys: keys, listen: { host: '127.0.0.1', port: 0 } }, env);
    assert.ok(!JSON.stringify(config).includes(PIN), 'the PIN is not part of the configuration');
    // The PIN variable is read from the process environment at start.
    Object.assign(process.env, env);
    const authority = await startAuthority(config, { logger }).finally(() => delete process.env.TEST_HSM_PIN);
    await authority.close();
    const log = lines.join('');
    assert.match(log, /"caKeys":"pkcs11"/, 'the start was logged, with where the keys are');
    assert.match(log, /pkcs11:leafgate-ca\/leafgate-device-ca/);
    assert.ok(!log.includes(PIN), `${name}: the PIN is absent from the log`);
  }
});

// Last: it destroys the device CA key in the token.
test('a token that stops signing answers authority_unavailable with a retry delay, for issuance and CRLs', { skip }, async () => {
  const config = resolveAuthorityConfig({ dataDir: dataDirWithCertificates('gone'), caKeys: caKeys(), listen: { host: '127.0.0.1', port: 0 } }, {});
  const authority = await startAuthority(config, { logger: pino({ level: 'silent' }) });
  try {
    const now = Date.now();
    const spki = authority.ca.deviceCa.certificate.publicKey.export({ type: 'spki', format: 'der' });
    const req = { subjectDer: pkix.encodeName('dev-gone'), spkiDer: spki, profile: { kind: 'device', keyType: 'ec' } as const, notBefore: new Date(now - BACKDATE_MS), notAfter: new Date(now + 86_400_000) };
    await authority.ca.issue('device', req);
    // The key disappears from the token under the running authority.
    const token = Pkcs11Token.open(MODULE, TOKEN, PIN);
    try {
      const { p11, pk, session } = token.raw;
      p11.C_FindObjectsInit(session, [{ type: pk.CKA_CLASS, value: pk.CKO_PRIVATE_KEY }, { type: pk.CKA_LABEL, value: DEFAULT_KEY_LABELS['device-ca'] }]);
      const handle = p11.C_FindObjects(session)!;
      p11.C_FindObjectsFinal(session);
      p11.C_DestroyObject(session, handle);
    } finally {
      token.close();
    }
    for (const attempt of [1, 2]) {
      const err = await authority.ca.issue('device', req).then(() => null, (e: unknown) => e);
      assert.ok(err instanceof LeafgateError, `attempt ${attempt}: ${String(err)}`);
      assert.equal(err.code, 'authority_unavailable');
      assert.equal(typeof err.retryAfterMs, 'number');
      assert.match(err.message, /the CA key pkcs11:leafgate-ca\/leafgate-device-ca did not sign: /);
    }
    await assert.rejects(authority.revocation.reissue([], 'device-ca'), { code: 'authority_unavailable' });
  } finally {
    await authority.close();
  }
});
