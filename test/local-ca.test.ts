/**
 * authority/ca/local-ca.ts: passphrase handling, encrypted key files, reopening, validity
 * clamping and serial numbers.
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync, X509Certificate } from 'node:crypto';
import { chmodSync, existsSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { test } from 'node:test';
import { LocalCa, fingerprint, BACKDATE_MS } from '../authority/ca/index.ts';
import { LeafgateError } from '../protocol/errors.ts';
import * as der from '../protocol/pkix/der.ts';
import { buildCsr, parseCsr } from '../protocol/pkix/csr.ts';
import { workdir } from './support/openssl.ts';

const PASSPHRASE = 'a-passphrase-of-length';
const DAY = 86_400_000;
const NAMES = ['root', 'device-ca', 'infra-ca'] as const;

const deviceKey = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const csr = parseCsr(buildCsr({ commonName: 'dev-1', privateKey: deviceKey.privateKey, publicKey: deviceKey.publicKey }));

async function issue(ca: LocalCa, notBefore: Date, notAfter: Date) {
  return ca.issue('device', { subjectDer: csr.subjectDer, spkiDer: csr.spkiDer, profile: { kind: 'device', keyType: 'ec' }, notBefore, notAfter });
}

function rejectsWith(fn: () => unknown, code: string, message: RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof LeafgateError, `expected LeafgateError, got ${String(err)}`);
    assert.equal(err.code, code);
    assert.match(err.message, message);
    return true;
  });
}

test('first open creates root, device CA and infrastructure CA with encrypted 0600 keys', (t) => {
  const w = workdir(t);
  const dir = w.path('ca');
  const now = new Date();
  const ca = LocalCa.open(dir, PASSPHRASE);
  assert.equal(statSync(dir).mode & 0o777, 0o700);
  for (const name of NAMES) {
    const keyPath = `${dir}/${name}.key.pem`;
    const key = readFileSync(keyPath, 'utf8');
    assert.match(key, /^-----BEGIN ENCRYPTED PRIVATE KEY-----\n/);
    assert.doesNotMatch(key, /BEGIN (EC |RSA )?PRIVATE KEY/);
    assert.equal(statSync(keyPath).mode & 0o777, 0o600, `${name}.key.pem mode`);
    // openssl reads it with the passphrase, and not without
    const pub = w.openssl(['pkey', '-in', keyPath, '-passin', `pass:${PASSPHRASE}`, '-pubout']);
    assert.equal(pub, w.openssl(['x509', '-in', `${dir}/${name}.crt.pem`, '-noout', '-pubkey']));
    assert.notEqual(w.tryOpenssl(['pkey', '-in', keyPath, '-passin', 'pass:wrong-passphrase-xx', '-pubout']).status, 0);
    const asn1 = w.openssl(['asn1parse', '-in', keyPath]);
    assert.match(asn1, /:PBES2/);
    assert.match(asn1, /:aes-256-cbc/);
  }
  assert.equal(ca.root.certificate.ca, true);
  assert.equal(ca.deviceCa.certificate.ca, true);
  assert.equal(ca.root.certificate.subject, 'CN=leafgate Root CA');
  assert.equal(ca.deviceCa.certificate.issuer, 'CN=leafgate Root CA');
  assert.ok(ca.deviceCa.certificate.verify(ca.root.certificate.publicKey));
  assert.ok(ca.infraCa.certificate.verify(ca.root.certificate.publicKey));
  // backdated by BACKDATE_MS; root 20 years, issuing CAs 10 years
  const from = new Date(ca.root.certificate.validFrom).getTime();
  assert.ok(Math.abs(from - (now.getTime() - BACKDATE_MS)) < 2000);
  assert.equal(new Date(ca.root.certificate.validTo).getUTCFullYear(), now.getUTCFullYear() + 20);
  assert.equal(new Date(ca.deviceCa.certificate.validTo).getUTCFullYear(), now.getUTCFullYear() + 10);
  assert.deepEqual(ca.bundle(), { root: ca.root.pem, deviceCa: ca.deviceCa.pem, infraCa: ca.infraCa.pem, edgeIssuer: ca.edgeIssuer.pem });
});

test('the organization option names the CAs', (t) => {
  const w = workdir(t);
  const ca = LocalCa.open(w.path('ca'), PASSPHRASE, { organization: 'Acme' });
  assert.equal(ca.root.certificate.subject, 'CN=Acme Root CA');
  assert.equal(ca.deviceCa.certificate.subject, 'CN=Acme Device CA');
  assert.equal(ca.infraCa.certificate.subject, 'CN=Acme Infrastructure CA');
});

test('reopening with the same passphrase loads the same CAs', async (t) => {
  const w = workdir(t);
  const dir = w.path('ca');
  const first = LocalCa.open(dir, PASSPHRASE);
  const files = NAMES.map((n) => readFileSync(`${dir}/${n}.key.pem`, 'utf8') + readFileSync(`${dir}/${n}.crt.pem`, 'utf8'));
  const again = LocalCa.open(dir, PASSPHRASE);
  assert.equal(again.root.certificate.fingerprint256, first.root.certificate.fingerprint256);
  assert.equal(again.deviceCa.certificate.fingerprint256, first.deviceCa.certificate.fingerprint256);
  assert.equal(again.infraCa.certificate.fingerprint256, first.infraCa.certificate.fingerprint256);
  assert.ok(again.deviceCa.keyId.equals(first.deviceCa.keyId));
  assert.ok(again.deviceCa.subjectDer.equals(first.deviceCa.subjectDer));
  assert.deepEqual(NAMES.map((n) => readFileSync(`${dir}/${n}.key.pem`, 'utf8') + readFileSync(`${dir}/${n}.crt.pem`, 'utf8')), files, 'files are not rewritten');
  // a certificate issued after reopening chains to the original root
  const issued = await issue(again, new Date(), new Date(Date.now() + DAY));
  const x = new X509Certificate(issued.pem);
  assert.ok(x.verify(first.deviceCa.certificate.publicKey));
  assert.ok(x.checkIssued(first.deviceCa.certificate));
});

test('a wrong passphrase is refused with a clear error', (t) => {
  const w = workdir(t);
  const dir = w.path('ca');
  LocalCa.open(dir, PASSPHRASE);
  rejectsWith(() => LocalCa.open(dir, 'another-passphrase-entirely'), 'internal', /cannot decrypt .*root\.key\.pem: wrong CA passphrase\?/);
  // the failed attempt changed nothing on disk
  assert.ok(LocalCa.open(dir, PASSPHRASE));
});

test('passphrases shorter than 12 characters are refused before anything is written', (t) => {
  const w = workdir(t);
  for (const bad of ['', 'short', '12345678901']) {
    const dir = w.path(`ca-${bad.length}`);
    rejectsWith(() => LocalCa.open(dir, bad), 'internal', /at least 12 characters/);
    assert.equal(existsSync(dir), false);
  }
  rejectsWith(() => LocalCa.open(w.path('ca-x'), undefined as unknown as string), 'internal', /at least 12/);
  assert.ok(LocalCa.open(w.path('ca-12'), '123456789012'), 'exactly 12 characters is enough');
});

test('a key that does not belong to its certificate is refused', (t) => {
  const w = workdir(t);
  const dir = w.path('ca');
  LocalCa.open(dir, PASSPHRASE);
  writeFileSync(`${dir}/device-ca.key.pem`, readFileSync(`${dir}/infra-ca.key.pem`));
  rejectsWith(() => LocalCa.open(dir, PASSPHRASE), 'internal', /device-ca\.key\.pem does not match .*device-ca\.crt\.pem/);
});

test('a key left without its certificate (crash between the writes) is replaced on the next start', (t) => {
  const w = workdir(t);
  const dir = w.path('ca');
  const first = LocalCa.open(dir, PASSPHRASE);
  rmSync(`${dir}/infra-ca.crt.pem`);
  const again = LocalCa.open(dir, PASSPHRASE);
  assert.equal(again.root.certificate.fingerprint256, first.root.certificate.fingerprint256);
  assert.notEqual(again.infraCa.certificate.fingerprint256, first.infraCa.certificate.fingerprint256);
  assert.ok(again.infraCa.certificate.verify(again.root.certificate.publicKey));
  assert.equal(statSync(`${dir}/infra-ca.key.pem`).mode & 0o777, 0o600);
});

test('a regenerated root does not leave issuing CAs that no longer chain to it', {
}, (t) => {
  const w = workdir(t);
  const dir = w.path('ca');
  LocalCa.open(dir, PASSPHRASE);
  rmSync(`${dir}/root.crt.pem`);
  let ca: LocalCa;
  try {
    ca = LocalCa.open(dir, PASSPHRASE);
  } catch (err) {
    assert.ok(err instanceof LeafgateError, String(err)); // refusing to start is a fine answer
    return;
  }
  assert.ok(ca.deviceCa.certificate.verify(ca.root.certificate.publicKey), 'device CA chains to the root in use');
  assert.ok(ca.infraCa.certificate.verify(ca.root.certificate.publicKey), 'infra CA chains to the root in use');
});

test('a replaced key file ends up 0600 even when the old file was not', {
}, (t) => {
  const w = workdir(t);
  const dir = w.path('ca');
  LocalCa.open(dir, PASSPHRASE);
  rmSync(`${dir}/infra-ca.crt.pem`);
  chmodSync(`${dir}/infra-ca.key.pem`, 0o644);
  LocalCa.open(dir, PASSPHRASE);
  assert.equal(statSync(`${dir}/infra-ca.key.pem`).mode & 0o777, 0o600);
});

test('CA keys are encrypted with PBES2 + scrypt, as the module comment says', (t) => {
  const w = workdir(t);
  const dir = w.path('ca');
  LocalCa.open(dir, PASSPHRASE);
  const asn1 = w.openssl(['asn1parse', '-in', `${dir}/root.key.pem`]);
  assert.match(asn1, /:scrypt\n/);
  assert.match(asn1, /:PBES2\n/);
});

test('notAfter is clamped to the issuing CA\'s notAfter', async (t) => {
  const w = workdir(t);
  const ca = LocalCa.open(w.path('ca'), PASSPHRASE);
  const caEnd = new Date(ca.deviceCa.certificate.validTo);
  const now = new Date();

  const long = await issue(ca, now, new Date(now.getTime() + 100 * 365 * DAY));
  assert.equal(long.notAfter.getTime(), caEnd.getTime());
  assert.equal(new Date(new X509Certificate(long.pem).validTo).getTime(), caEnd.getTime());

  const justPast = await issue(ca, now, new Date(caEnd.getTime() + 1000));
  assert.equal(new Date(new X509Certificate(justPast.pem).validTo).getTime(), caEnd.getTime());

  const exact = await issue(ca, now, caEnd);
  assert.equal(new Date(new X509Certificate(exact.pem).validTo).getTime(), caEnd.getTime());

  const inside = new Date(now.getTime() + 30 * DAY + 123);
  const short = await issue(ca, now, inside);
  assert.equal(short.notAfter.getTime(), Math.floor(inside.getTime() / 1000) * 1000, 'reported notAfter is the encoded second');
  assert.equal(new Date(new X509Certificate(short.pem).validTo).getTime(), short.notAfter.getTime());
  assert.equal(new Date(new X509Certificate(short.pem).validFrom).getTime(), short.notBefore.getTime());

  // the infrastructure CA clamps to its own end
  const infra = await ca.issue('infra', { subjectDer: csr.subjectDer, spkiDer: csr.spkiDer, profile: { kind: 'server', keyType: 'ec' }, notBefore: now, notAfter: new Date(now.getTime() + 100 * 365 * DAY) });
  assert.equal(infra.notAfter.getTime(), new Date(ca.infraCa.certificate.validTo).getTime());
});

test('serial numbers are positive, 16 octets and unique across 1,000 issuances', async (t) => {
  const w = workdir(t);
  const ca = LocalCa.open(w.path('ca'), PASSPHRASE);
  const now = new Date();
  const later = new Date(now.getTime() + DAY);
  const serials = new Set<string>();
  const started = Date.now();
  for (let i = 0; i < 1000; i++) {
    const issued = await issue(ca, now, later);
    assert.match(issued.serial, /^[0-9A-F]{32}$/);
    const [tbs] = der.children(der.parseDer(issued.der));
    const serialNode = der.children(tbs)[1];
    const value = der.decodeInteger(serialNode);
    assert.ok(value > 0n, `serial ${issued.serial} is positive`);
    assert.ok(serialNode.value.length <= 20, 'RFC 5280: at most 20 octets');
    assert.equal(value, BigInt('0x' + issued.serial));
    assert.equal(issued.fingerprint256, fingerprint(issued.der));
    if (i % 100 === 0) assert.equal(new X509Certificate(issued.der).serialNumber, issued.serial);
    serials.add(issued.serial);
  }
  assert.equal(serials.size, 1000);
  t.diagnostic(`1000 issuances in ${Date.now() - started} ms`);
  // the CA certificates have positive serials too
  for (const c of [ca.root, ca.deviceCa, ca.infraCa]) assert.ok(der.decodeInteger(der.children(der.children(der.parseDer(c.certificate.raw))[0])[1]) > 0n);
});
