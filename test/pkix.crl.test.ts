/**
 * pkix.parseCrl refuses every CRL whose signature does not verify with the issuer's key, not
 * only a truncated one: well-formed DER with the signature bytes altered, a TBSCertList
 * altered under a genuine signature, and a CRL that names the issuer (same name, same
 * authorityKeyIdentifier) but was signed by another key. Each is checked with openssl too,
 * so the refusal is not an artefact of our own codec.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { pkix } from '../protocol/index.ts';
import { throwsDer } from './support/der.ts';

const { der } = pkix;

/** A self-signed CA (the issuer of the CRLs below). */
function makeCa(keyType: 'ec' | 'rsa') {
  const pair = keyType === 'ec' ? generateKeyPairSync('ec', { namedCurve: 'P-256' }) : generateKeyPairSync('rsa', { modulusLength: 2048 });
  const spki = pair.publicKey.export({ type: 'spki', format: 'der' });
  const name = pkix.encodeName('Test Device CA');
  const keyId = pkix.keyIdentifier(spki);
  const now = Date.now();
  const certDer = pkix.encodeCertificate({
    serial: pkix.newSerial(), subjectDer: name, spkiDer: spki, notBefore: new Date(now - 3600_000), notAfter: new Date(now + 86_400_000),
    profile: { kind: 'root' }, issuer: { subjectDer: name, keyId, privateKey: pair.privateKey },
  });
  return { ...pair, name, keyId, pem: pkix.toPem(certDer, 'CERTIFICATE') };
}

function crl(ca: { name: Buffer; keyId: Buffer }, key: KeyObject, crlNumber: bigint, serials: string[]): Buffer {
  const now = Date.now();
  return pkix.encodeCrl({
    issuerDer: ca.name, issuerKeyId: ca.keyId, issuerKey: key, crlNumber, thisUpdate: new Date(now - 60_000), nextUpdate: new Date(now + 3600_000),
    entries: serials.map((serial) => ({ serial, revokedAt: new Date(now - 60_000), reason: 1 })),
  });
}

/** CertificateList = SEQUENCE { tbs, algorithm, signature BIT STRING }, re-assembled from parts. */
function parts(crlDer: Buffer): { tbs: Buffer; alg: Buffer; sig: Buffer } {
  const [tbs, alg, sig] = der.children(der.parseDer(crlDer));
  return { tbs: tbs.raw, alg: alg.raw, sig: sig.raw };
}

/** openssl's own verdict on the CRL's signature against the CA certificate. */
function opensslVerifies(dir: string, caPem: string, crlDer: Buffer): boolean {
  writeFileSync(join(dir, 'ca.pem'), caPem);
  writeFileSync(join(dir, 'crl.der'), crlDer);
  const r = spawnSync('openssl', ['crl', '-inform', 'DER', '-in', join(dir, 'crl.der'), '-CAfile', join(dir, 'ca.pem'), '-noout'], { encoding: 'utf8' });
  return r.status === 0 && /verify OK/.test(r.stdout + r.stderr);
}

for (const keyType of ['ec', 'rsa'] as const) {
  test(`parseCrl (${keyType}): a genuine CRL verifies; altered signature, altered content or another signer is refused`, (t) => {
    const dir = mkdtempSync(join(tmpdir(), 'lg-crl-'));
    t.after(() => rmSync(dir, { recursive: true, force: true }));
    const ca = makeCa(keyType);
    const genuine = crl(ca, ca.privateKey, 7n, ['0A1B2C', '7F00FF']);

    // Positive control: the genuine CRL parses, with its number and entries, and openssl agrees.
    const ok = pkix.parseCrl(genuine, ca.publicKey);
    assert.equal(ok.crlNumber, 7n);
    assert.deepEqual([...ok.revoked.keys()].sort(), ['0A1B2C', '7F00FF']);
    assert.ok(opensslVerifies(dir, ca.pem, genuine), 'openssl verifies the genuine CRL');
    // Also as PEM.
    assert.equal(pkix.parseCrl(pkix.crlToPem(genuine), ca.publicKey).crlNumber, 7n);

    // 1. The signature's last byte flipped: same length, still well-formed DER.
    const flipped = Buffer.from(genuine);
    flipped[flipped.length - 1] ^= 0x01;
    const f = der.children(der.parseDer(flipped));
    assert.equal(f.length, 3, 'still a well-formed CertificateList');
    throwsDer(() => pkix.parseCrl(flipped, ca.publicKey), /signature does not verify/, 'signature byte altered');
    assert.equal(opensslVerifies(dir, ca.pem, flipped), false, 'openssl refuses it too');

    // 2. A genuine signature over another TBSCertList: the attacker drops the revoked entries
    //    and raises the number, keeping the signature of the genuine CRL.
    const emptied = parts(crl(ca, ca.privateKey, 8n, []));
    const g = parts(genuine);
    const spliced = der.seq(emptied.tbs, g.alg, g.sig);
    throwsDer(() => pkix.parseCrl(spliced, ca.publicKey), /signature does not verify/, 'content altered under a genuine signature');
    assert.equal(opensslVerifies(dir, ca.pem, spliced), false);

    // 3. Same issuer name, same authorityKeyIdentifier, signed by another key of the same type.
    const other = makeCa(keyType);
    const forged = crl(ca, other.privateKey, 9n, []);
    assert.deepEqual(pkix.parseCrl(forged, other.publicKey).issuerDer, ca.name, 'it names the genuine issuer');
    throwsDer(() => pkix.parseCrl(forged, ca.publicKey), /signature does not verify/, 'signed by another key');
    assert.equal(opensslVerifies(dir, ca.pem, forged), false);

    // 4. The signature of another key type (an EC signature on an RSA-named CRL and back).
    const cross = makeCa(keyType === 'ec' ? 'rsa' : 'ec');
    throwsDer(() => pkix.parseCrl(crl(ca, cross.privateKey, 10n, []), ca.publicKey), /signature does not verify|not accepted/, 'another key type');
  });
}

test('parseCrl: a CRL signed with an empty signature BIT STRING is refused', () => {
  const ca = makeCa('ec');
  const g = parts(crl(ca, ca.privateKey, 3n, []));
  const empty = der.seq(g.tbs, g.alg, der.bitString(Buffer.alloc(0)));
  throwsDer(() => pkix.parseCrl(empty, ca.publicKey), /signature does not verify/);
  // The openssl binary is there (the other checks above rely on it).
  assert.match(execFileSync('openssl', ['version'], { encoding: 'utf8' }), /OpenSSL/);
});

test('indirect CRL (RFC 5280 5.3.3): entries of another issuer carry a critical certificateIssuer, the CRL an indirect issuingDistributionPoint; openssl reads both, parseCrl keeps every serial', (t) => {
  const ca = makeCa('ec');
  const external = pkix.encodeName('Enterprise Issuing CA');
  const now = Date.now();
  const derCrl = pkix.encodeCrl({
    issuerDer: ca.name, issuerKeyId: ca.keyId, issuerKey: ca.privateKey, crlNumber: 7n, thisUpdate: new Date(now - 60_000), nextUpdate: new Date(now + 3600_000),
    // Given out of order: the external entry first; the encoder puts the CRL issuer's own first.
    entries: [{ serial: 'EE01', revokedAt: new Date(now - 60_000), reason: 0, certificateIssuerDer: external }, { serial: '0A0B', revokedAt: new Date(now - 60_000), reason: 1 }],
  });
  const parsed = pkix.parseCrl(derCrl, ca.publicKey);
  assert.equal(parsed.revoked.get('0A0B')?.certificateIssuerDer, undefined);
  assert.ok(parsed.revoked.get('EE01')?.certificateIssuerDer?.equals(external));
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-crl-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  writeFileSync(join(dir, 'c.der'), derCrl);
  writeFileSync(join(dir, 'ca.pem'), ca.pem);
  const text = execFileSync('openssl', ['crl', '-inform', 'DER', '-in', 'c.der', '-noout', '-text', '-CAfile', 'ca.pem'], { cwd: dir, encoding: 'utf8', stdio: ['pipe', 'pipe', 'pipe'] });
  assert.match(text, /Issuing Distribution Point: critical\s+Indirect CRL/);
  assert.match(text, /Serial Number: EE01[\s\S]*Certificate Issuer: critical\s+DirName:\/CN=Enterprise Issuing CA/);
  assert.ok(text.indexOf('0A0B') < text.indexOf('EE01'), 'the CRL issuer\'s own entries come first');
  // A plain CRL has no issuingDistributionPoint.
  assert.doesNotMatch(execFileSync('openssl', ['crl', '-inform', 'DER', '-noout', '-text'], { input: crl(ca, ca.privateKey, 1n, ['01']), encoding: 'utf8' }), /Issuing Distribution Point/);
  assert.equal(parsed.indirect, true);
  assert.equal(pkix.parseCrl(crl(ca, ca.privateKey, 1n, ['01']), ca.publicKey).indirect, false);
});

test('indirect: true marks an empty CRL indirect (the external-devices list while nothing is revoked): openssl and parseCrl see the flag', () => {
  const ca = makeCa('ec');
  const now = Date.now();
  const derCrl = pkix.encodeCrl({ issuerDer: ca.name, issuerKeyId: ca.keyId, issuerKey: ca.privateKey, crlNumber: 1n, thisUpdate: new Date(now), nextUpdate: new Date(now + 3600_000), entries: [], indirect: true });
  assert.equal(pkix.parseCrl(derCrl, ca.publicKey).indirect, true);
  assert.match(execFileSync('openssl', ['crl', '-inform', 'DER', '-noout', '-text'], { input: derCrl, encoding: 'utf8' }), /Issuing Distribution Point: critical\s+Indirect CRL/);
});
