/**
 * protocol/pkix/chain.ts verifyChain: good paths and the ways a path fails. It never throws
 * for a bad chain; it answers {ok: false, reason}.
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync, X509Certificate } from 'node:crypto';
import { test } from 'node:test';
import { LocalCa } from '../authority/ca/index.ts';
import { verifyChain, parseCertificates } from '../protocol/pkix/chain.ts';
import { encodeCertificate, keyIdentifier, newSerial } from '../protocol/pkix/certificate.ts';
import { buildCsr, parseCsr } from '../protocol/pkix/csr.ts';
import { toPem } from '../protocol/pkix/pem.ts';
import { workdir, type Workdir } from './support/openssl.ts';

const PASSPHRASE = 'a-passphrase-of-length';
const DAY = 86_400_000;

const leafKey = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const leafCsr = parseCsr(buildCsr({ commonName: 'dev-1', privateKey: leafKey.privateKey, publicKey: leafKey.publicKey }));

async function issueLeaf(ca: LocalCa, notBefore: Date, notAfter: Date): Promise<X509Certificate> {
  const issued = await ca.issue('device', { subjectDer: leafCsr.subjectDer, spkiDer: leafCsr.spkiDer, profile: { kind: 'device', keyType: 'ec' }, notBefore, notAfter });
  return new X509Certificate(issued.pem);
}

test('verifyChain', async (t) => {
  const w: Workdir = workdir(t);
  // created 30 days ago, so that a leaf can have lived and expired within the CA's lifetime
  const ca = LocalCa.open(w.path('ca'), PASSPHRASE, { now: new Date(Date.now() - 30 * DAY) });
  const root = ca.root.certificate;
  const deviceCa = ca.deviceCa.certificate;
  const infraCa = ca.infraCa.certificate;
  const now = Date.now();
  const leaf = await issueLeaf(ca, new Date(now - 60_000), new Date(now + 30 * DAY));

  await t.test('ok: leaf -> device CA -> root', () => {
    const r = verifyChain(leaf, [deviceCa], [root]);
    assert.equal(r.ok, true, r.reason);
    assert.equal(r.reason, undefined);
    assert.deepEqual(r.path.map((c) => c.fingerprint256), [leaf.fingerprint256, deviceCa.fingerprint256, root.fingerprint256]);
  });

  await t.test('ok: extra and unrelated intermediates are ignored, PEM bundles parse', () => {
    const bundle = parseCertificates([ca.infraCa.pem, ca.deviceCa.pem, ca.root.pem].join(''));
    assert.equal(bundle.length, 3);
    const r = verifyChain(leaf, bundle, parseCertificates(ca.root.pem));
    assert.equal(r.ok, true, r.reason);
    assert.equal(r.path.length, 3);
    assert.equal(r.path[1].fingerprint256, deviceCa.fingerprint256);
  });

  await t.test('ok: an intermediate checked directly against the root, and the root against itself', () => {
    const r = verifyChain(deviceCa, [], [root]);
    assert.equal(r.ok, true, r.reason);
    assert.deepEqual(r.path.map((c) => c.fingerprint256), [deviceCa.fingerprint256, root.fingerprint256]);
    const self = verifyChain(root, [], [root]);
    assert.equal(self.ok, true, self.reason);
    assert.equal(self.path.length, 1, 'a self-signed anchor is not added twice');
  });

  await t.test('expired leaf', async () => {
    const expired = await issueLeaf(ca, new Date(now - 10 * DAY), new Date(now - DAY));
    const r = verifyChain(expired, [deviceCa], [root]);
    assert.equal(r.ok, false);
    assert.match(r.reason ?? '', /certificate CN=dev-1 is not valid at /);
    assert.equal(r.path.length, 1);
    // and it was fine while it was valid
    assert.equal(verifyChain(expired, [deviceCa], [root], new Date(now - 2 * DAY)).ok, true);
  });

  await t.test('not yet valid leaf', async () => {
    const future = await issueLeaf(ca, new Date(now + DAY), new Date(now + 10 * DAY));
    const r = verifyChain(future, [deviceCa], [root]);
    assert.equal(r.ok, false);
    assert.match(r.reason ?? '', /is not valid at/);
  });

  await t.test('a time after the CAs expire fails on the leaf\'s window first, then on the CA\'s', () => {
    const later = new Date(new Date(deviceCa.validTo).getTime() + DAY);
    const r = verifyChain(leaf, [deviceCa], [root], later);
    assert.equal(r.ok, false);
    assert.match(r.reason ?? '', /not valid at/);
    const r2 = verifyChain(deviceCa, [], [root], later);
    assert.equal(r2.ok, false);
    assert.match(r2.reason ?? '', /CN=leafgate Device CA is not valid at/);
  });

  await t.test('wrong anchor: another CA, even one with the same names', (t2) => {
    const other = LocalCa.open(workdir(t2).path('other-ca'), PASSPHRASE);
    assert.equal(other.root.certificate.subject, root.subject, 'same subject name, different key');
    const r = verifyChain(leaf, [deviceCa], [other.root.certificate]);
    assert.equal(r.ok, false);
    assert.equal(r.reason, 'no issuer found among the trusted certificates');
    assert.deepEqual(r.path.map((c) => c.fingerprint256), [leaf.fingerprint256, deviceCa.fingerprint256]);
    // the right intermediate name from the wrong CA does not help either
    const r2 = verifyChain(leaf, [other.deviceCa.certificate], [other.root.certificate]);
    assert.equal(r2.ok, false);
    assert.equal(r2.reason, 'no issuer found among the trusted certificates');
    // no anchors at all
    assert.equal(verifyChain(leaf, [deviceCa], []).ok, false);
  });

  await t.test('missing or wrong intermediate', () => {
    assert.equal(verifyChain(leaf, [], [root]).reason, 'no issuer found among the trusted certificates');
    assert.equal(verifyChain(leaf, [infraCa], [root]).reason, 'no issuer found among the trusted certificates');
  });

  await t.test('an intermediate used as the anchor is enough (partial chain)', () => {
    const r = verifyChain(leaf, [], [deviceCa]);
    assert.equal(r.ok, true, r.reason);
    assert.equal(r.path.length, 2);
  });

  await t.test('non-CA issuer: a device certificate signing another certificate', () => {
    // our device certificate has keyUsage digitalSignature only, so OpenSSL's checkIssued
    // already refuses it as an issuer (no keyCertSign)
    const child = encodeCertificate({
      serial: newSerial(),
      subjectDer: leafCsr.subjectDer,
      spkiDer: generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ type: 'spki', format: 'der' }),
      notBefore: new Date(now - 60_000),
      notAfter: new Date(now + DAY),
      profile: { kind: 'device', keyType: 'ec' },
      issuer: { subjectDer: leafCsr.subjectDer, keyId: keyIdentifier(leafCsr.spkiDer), privateKey: leafKey.privateKey },
    });
    const c = new X509Certificate(child);
    assert.ok(c.verify(leaf.publicKey), 'the signature itself is fine');
    const r = verifyChain(c, [leaf, deviceCa], [root]);
    assert.equal(r.ok, false);
    assert.match(r.reason ?? '', /^(issuer is not a CA|no issuer found among the trusted certificates)$/);
    const r2 = verifyChain(c, [], [leaf]);
    assert.equal(r2.ok, false);
    assert.match(r2.reason ?? '', /^(anchor is not a CA|no issuer found among the trusted certificates)$/);
  });

  await t.test('non-CA issuer without keyUsage: refused for being no CA', (t2) => {
    // made with openssl so that the issuer has basicConstraints CA:FALSE and no keyUsage at all
    const o = workdir(t2);
    o.openssl(['ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', 'ee.key']);
    o.write('ee.ext', '[v3]\nbasicConstraints = critical, CA:FALSE\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n');
    o.openssl(['req', '-new', '-key', 'ee.key', '-subj', '/CN=not-a-ca', '-out', 'ee.csr']);
    o.write('root.pem', ca.root.pem);
    o.openssl(['x509', '-req', '-in', 'ee.csr', '-CA', 'root.pem', '-CAkey', w.path('ca/root.key.pem'), '-passin', `pass:${PASSPHRASE}`, '-extfile', 'ee.ext', '-extensions', 'v3', '-days', '2', '-out', 'ee.pem']);
    o.openssl(['ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', 'child.key']);
    o.openssl(['req', '-new', '-key', 'child.key', '-subj', '/CN=child', '-out', 'child.csr']);
    o.write('child.ext', '[v3]\nbasicConstraints = critical, CA:FALSE\n');
    o.openssl(['x509', '-req', '-in', 'child.csr', '-CA', 'ee.pem', '-CAkey', 'ee.key', '-extfile', 'child.ext', '-extensions', 'v3', '-days', '1', '-out', 'child.pem']);
    const ee = new X509Certificate(o.read('ee.pem'));
    const child = new X509Certificate(o.read('child.pem'));
    assert.equal(ee.ca, false);
    assert.ok(child.checkIssued(ee) && child.verify(ee.publicKey));
    assert.equal(o.tryOpenssl(['verify', '-CAfile', 'root.pem', '-untrusted', 'ee.pem', 'child.pem']).status === 0, false, 'openssl refuses it too');

    const r = verifyChain(child, [ee], [root]);
    assert.equal(r.ok, false);
    assert.equal(r.reason, 'issuer is not a CA');
    const r2 = verifyChain(child, [], [ee]);
    assert.equal(r2.ok, false);
    assert.equal(r2.reason, 'anchor is not a CA');
  });

  await t.test('a tampered leaf does not verify against its issuer', () => {
    const raw = Buffer.from(leaf.raw);
    const at = raw.indexOf(Buffer.from('dev-1'));
    raw[at + 4] = '2'.charCodeAt(0);
    const forged = new X509Certificate(raw);
    const r = verifyChain(forged, [deviceCa], [root]);
    assert.equal(r.ok, false);
    assert.equal(r.reason, 'no issuer found among the trusted certificates');
  });

  await t.test('a loop of cross-signed issuers ends with a reason, not a hang', () => {
    // two CAs that name each other as issuer: A signed by B, B signed by A
    const a = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const b = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const spkiA = a.publicKey.export({ type: 'spki', format: 'der' });
    const spkiB = b.publicKey.export({ type: 'spki', format: 'der' });
    const nameA = parseCsr(buildCsr({ commonName: 'Loop A', privateKey: a.privateKey, publicKey: a.publicKey })).subjectDer;
    const nameB = parseCsr(buildCsr({ commonName: 'Loop B', privateKey: b.privateKey, publicKey: b.publicKey })).subjectDer;
    const mk = (subjectDer: Buffer, spkiDer: Buffer, issuer: { subjectDer: Buffer; keyId: Buffer; privateKey: typeof a.privateKey }) =>
      new X509Certificate(toPem(encodeCertificate({ serial: newSerial(), subjectDer, spkiDer, notBefore: new Date(now - 60_000), notAfter: new Date(now + DAY), profile: { kind: 'intermediate', pathLen: 5 }, issuer }), 'CERTIFICATE'));
    const certA = mk(nameA, spkiA, { subjectDer: nameB, keyId: keyIdentifier(spkiB), privateKey: b.privateKey });
    const certB = mk(nameB, spkiB, { subjectDer: nameA, keyId: keyIdentifier(spkiA), privateKey: a.privateKey });
    const r = verifyChain(leaf, [deviceCa, certA, certB], [certA]);
    assert.equal(r.ok, false);
    const r2 = verifyChain(certA, [certB, certA], []);
    assert.equal(r2.ok, false);
    assert.equal(r2.reason, 'chain too long');
    assert.equal(r2.path.length, 9);
  });
});
