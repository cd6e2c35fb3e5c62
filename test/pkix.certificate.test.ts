/**
 * protocol/pkix/certificate.ts through the built-in CA: issued certificates pass
 * `openssl verify -x509_strict`, carry the profile's extensions, and have the same ASN.1 shape
 * (and byte-identical extensions) as a reference certificate made by `openssl x509 -req`.
 */
import assert from 'node:assert/strict';
import { createHash, generateKeyPairSync, X509Certificate, type KeyObject } from 'node:crypto';
import { test } from 'node:test';
import { LocalCa, type IssuedCertificate } from '../authority/ca/index.ts';
import * as der from '../protocol/pkix/der.ts';
import { encodeCertificate, keyIdentifier, newSerial, spkiDerOf, subjectDerOf, type CertificateProfile } from '../protocol/pkix/certificate.ts';
import { buildCsr, certificateSubject, encodeName, parseCsr, type ParsedCsr } from '../protocol/pkix/csr.ts';
import { OID } from '../protocol/pkix/oids.ts';
import { fromPem, toPem } from '../protocol/pkix/pem.ts';
import { asn1Shape, workdir, type Workdir } from './support/openssl.ts';

const PASSPHRASE = 'a-passphrase-of-length';
const DAY = 86_400_000;

const KEYS = {
  'EC P-256': generateKeyPairSync('ec', { namedCurve: 'P-256' }),
  'EC P-384': generateKeyPairSync('ec', { namedCurve: 'P-384' }),
  'RSA-2048': generateKeyPairSync('rsa', { modulusLength: 2048 }),
};
type KeyLabel = keyof typeof KEYS;

/** A fresh CA with root.pem, device-ca.pem and infra-ca.pem written into the work directory. */
interface Fixture {
  w: Workdir;
  ca: LocalCa;
}

function setup(t: Parameters<typeof workdir>[0]): Fixture {
  const w = workdir(t);
  const ca = LocalCa.open(w.path('ca'), PASSPHRASE);
  w.write('root.pem', ca.root.pem);
  w.write('device-ca.pem', ca.deviceCa.pem);
  w.write('infra-ca.pem', ca.infraCa.pem);
  return { w, ca };
}

function csrFor(label: KeyLabel, cn: string, sans?: { dns?: string[]; uri?: string[]; ip?: string[] }): { pem: string; parsed: ParsedCsr; privateKey: KeyObject } {
  const { privateKey, publicKey } = KEYS[label];
  const pem = buildCsr({ commonName: cn, privateKey, publicKey, sans });
  return { pem, parsed: parseCsr(pem), privateKey };
}

function issueDevice(ca: LocalCa, csr: ParsedCsr, opts: { notBefore?: Date; notAfter?: Date; sans?: { dns?: string[]; uri?: string[]; ip?: string[] } } = {}): Promise<IssuedCertificate> {
  const now = new Date();
  return ca.issue('device', {
    subjectDer: csr.subjectDer,
    spkiDer: csr.spkiDer,
    profile: { kind: 'device', keyType: csr.key.keyType },
    sans: opts.sans ?? csr.sans,
    notBefore: opts.notBefore ?? new Date(now.getTime() - 5 * 60_000),
    notAfter: opts.notAfter ?? new Date(now.getTime() + 30 * DAY),
  });
}

/** `openssl verify` output and status. */
function verify(w: Workdir, args: string[]): { ok: boolean; out: string } {
  const r = w.tryOpenssl(['verify', ...args]);
  return { ok: r.status === 0 && /: OK\n?$/.test(r.stdout.trim() + '\n'), out: r.stdout + r.stderr };
}

/** The value lines under an extension heading in `openssl x509 -text`. */
function extText(text: string, heading: string): { critical: boolean; value: string } | undefined {
  const m = text.match(new RegExp(`X509v3 ${heading}: ?(critical)?\\s*\\n\\s+([^\\n]*(?:\\n {16,}[^\\n]*)*)`));
  return m ? { critical: m[1] === 'critical', value: m[2].replace(/\s*\n\s*/g, ' ').trim() } : undefined;
}

/**
 * asn1parse shape of a certificate with every extension value (the OCTET STRING under
 * extnValue) parsed too, so the comparison covers the insides of the extensions.
 */
function deepShape(w: Workdir, file: string): string[] {
  const out = w.openssl(['asn1parse', '-inform', 'PEM', '-in', file]);
  const shape: string[] = [];
  let inExtensions = false;
  for (const line of out.split('\n')) {
    const [s] = asn1Shape(line);
    if (!s) continue;
    shape.push(s);
    if (s === '2 cons cont [ 3 ]') inExtensions = true;
    if (s.startsWith('1 ')) inExtensions = false;
    const m = line.match(/^\s*(\d+):d=5 .*prim: OCTET STRING/);
    if (inExtensions && m) {
      const inner = asn1Shape(w.openssl(['asn1parse', '-inform', 'PEM', '-in', file, '-strparse', m[1]]));
      for (const i of inner) shape.push(`  extnValue: ${i}`);
    }
  }
  return shape;
}

/** DER of the [3] extensions of a certificate. */
function extensionsDer(certDer: Buffer): Buffer {
  const [tbs] = der.children(der.parseDer(certDer));
  const ext = der.children(tbs).find((n) => n.tag === 0xa3);
  assert.ok(ext, 'certificate has extensions');
  return ext.raw;
}

test('CA certificates pass openssl verify -x509_strict and carry the CA profile', (t) => {
  const { w, ca } = setup(t);
  w.write('edge-issuer.pem', ca.edgeIssuer.pem);
  for (const name of ['root.pem', 'device-ca.pem', 'infra-ca.pem', 'edge-issuer.pem']) {
    const r = verify(w, ['-x509_strict', '-CAfile', 'root.pem', name]);
    assert.ok(r.ok, `${name}: ${r.out}`);
  }
  // an issuing CA cannot stand in for the root
  assert.equal(verify(w, ['-x509_strict', '-CAfile', 'device-ca.pem', 'infra-ca.pem']).ok, false);

  const rootText = w.openssl(['x509', '-in', 'root.pem', '-noout', '-text']);
  assert.match(rootText, /Version: 3 \(0x2\)/);
  assert.deepEqual(extText(rootText, 'Basic Constraints'), { critical: true, value: 'CA:TRUE' });
  assert.deepEqual(extText(rootText, 'Key Usage'), { critical: true, value: 'Digital Signature, Certificate Sign, CRL Sign' });
  const rootSki = extText(rootText, 'Subject Key Identifier');
  assert.equal(rootSki?.critical, false);
  assert.equal(rootSki?.value.replace(/:/g, ''), ca.root.keyId.toString('hex').toUpperCase());
  assert.equal(extText(rootText, 'Authority Key Identifier'), undefined, 'self-signed root: AKI omitted (RFC 5280 4.2.1.1 MAY)');
  assert.match(rootText, /Issuer: CN = leafgate Root CA\n/);
  assert.match(rootText, /Subject: CN = leafgate Root CA\n/);

  // Each intermediate's extendedKeyUsage limits what verifiers accept below it (OpenSSL and Go
  // apply a CA's EKU to its chain): device certificates are clients only.
  const CLIENT = 'TLS Web Client Authentication';
  const BOTH = 'TLS Web Server Authentication, TLS Web Client Authentication';
  for (const [file, cn, cert, pathLen, eku] of [
    ['device-ca.pem', 'leafgate Device CA', ca.deviceCa, 0, CLIENT],
    ['infra-ca.pem', 'leafgate Infrastructure CA', ca.infraCa, 0, BOTH],
    ['edge-issuer.pem', 'leafgate Edge CA Issuer', ca.edgeIssuer, 1, BOTH],
  ] as const) {
    const text = w.openssl(['x509', '-in', file, '-noout', '-text']);
    assert.deepEqual(extText(text, 'Basic Constraints'), { critical: true, value: `CA:TRUE, pathlen:${pathLen}` }, file);
    assert.deepEqual(extText(text, 'Key Usage'), { critical: true, value: 'Digital Signature, Certificate Sign, CRL Sign' }, file);
    assert.equal(extText(text, 'Subject Key Identifier')?.value.replace(/:/g, ''), cert.keyId.toString('hex').toUpperCase());
    assert.deepEqual(extText(text, 'Authority Key Identifier'), { critical: false, value: rootSki!.value }, `${file}: AKI = root SKI`);
    assert.match(text, new RegExp(`Subject: CN = ${cn}\\n`));
    assert.match(text, /Issuer: CN = leafgate Root CA\n/);
    assert.deepEqual(extText(text, 'Extended Key Usage'), { critical: false, value: eku }, file);
    assert.ok(new Date(cert.certificate.validTo) <= new Date(ca.root.certificate.validTo), 'issuing CA does not outlive the root');
  }
});

for (const label of Object.keys(KEYS) as KeyLabel[]) {
  test(`device certificate for an ${label} CSR verifies as sslclient and shows the device profile`, async (t) => {
    const { w, ca } = setup(t);
    const sans = { dns: ['dev-1.devices.example'], uri: ['urn:leafgate:device:dev-1'], ip: ['10.0.0.7'] };
    const { parsed } = csrFor(label, 'dev-1', sans);
    const issued = await issueDevice(ca, parsed);
    w.write('leaf.pem', issued.pem);

    const ok = verify(w, ['-x509_strict', '-purpose', 'sslclient', '-CAfile', 'root.pem', '-untrusted', 'device-ca.pem', 'leaf.pem']);
    assert.ok(ok.ok, ok.out);
    assert.equal(verify(w, ['-x509_strict', '-purpose', 'sslserver', '-CAfile', 'root.pem', '-untrusted', 'device-ca.pem', 'leaf.pem']).ok, false, 'a device certificate is not a server certificate');
    assert.equal(verify(w, ['-x509_strict', '-purpose', 'sslclient', '-CAfile', 'root.pem', '-untrusted', 'infra-ca.pem', 'leaf.pem']).ok, false, 'issued by the device CA only');
    assert.equal(verify(w, ['-x509_strict', '-purpose', 'sslclient', '-CAfile', 'root.pem', 'leaf.pem']).ok, false, 'needs the intermediate');

    const text = w.openssl(['x509', '-in', 'leaf.pem', '-noout', '-text']);
    assert.match(text, /Version: 3 \(0x2\)/);
    assert.match(text, /Subject: CN = dev-1\n/);
    assert.match(text, /Issuer: CN = leafgate Device CA\n/);
    assert.match(text, label === 'EC P-384' ? /Public-Key: \(384 bit\)/ : label === 'RSA-2048' ? /Public-Key: \(2048 bit\)/ : /Public-Key: \(256 bit\)/);
    assert.match(text, /Signature Algorithm: ecdsa-with-SHA256/, 'signed by the P-256 device CA');
    assert.deepEqual(extText(text, 'Basic Constraints'), { critical: true, value: 'CA:FALSE' });
    // RFC 5280 4.2.1.12: clientAuth is consistent with digitalSignature; keyEncipherment is a server's (RSA key transport)
    assert.deepEqual(extText(text, 'Key Usage'), { critical: true, value: 'Digital Signature' });
    assert.deepEqual(extText(text, 'Extended Key Usage'), { critical: false, value: 'TLS Web Client Authentication' });
    const ski = extText(text, 'Subject Key Identifier');
    assert.equal(ski?.value.replace(/:/g, ''), keyIdentifier(parsed.spkiDer).toString('hex').toUpperCase());
    const caText = w.openssl(['x509', '-in', 'device-ca.pem', '-noout', '-text']);
    assert.equal(extText(text, 'Authority Key Identifier')?.value, extText(caText, 'Subject Key Identifier')?.value, 'AKI equals the issuer SKI');
    assert.deepEqual(extText(text, 'Subject Alternative Name'), { critical: false, value: 'DNS:dev-1.devices.example, URI:urn:leafgate:device:dev-1, IP Address:10.0.0.7' });

    // X509Certificate agrees, and the certificate carries the CSR's subject and key verbatim
    const x = new X509Certificate(issued.pem);
    assert.equal(x.ca, false);
    assert.equal(x.serialNumber, issued.serial);
    assert.equal(x.fingerprint256, issued.fingerprint256);
    assert.ok(x.checkIssued(ca.deviceCa.certificate));
    assert.ok(x.verify(ca.deviceCa.certificate.publicKey));
    assert.ok(subjectDerOf(issued.der).equals(parsed.subjectDer));
    assert.ok(spkiDerOf(issued.der).equals(parsed.spkiDer));
    assert.deepEqual(certificateSubject(issued.der), [[OID.commonName, 'dev-1']]);
    assert.ok(x.checkPrivateKey(csrFor(label, 'dev-1').privateKey));
    assert.deepEqual(issued.chain, [ca.deviceCa.pem, ca.root.pem]);
    assert.ok(fromPem(issued.pem, 'CERTIFICATE').equals(issued.der));
  });
}

test('device certificate from an openssl-made CSR verifies too', async (t) => {
  const { w, ca } = setup(t);
  w.openssl(['ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', 'dev.key']);
  w.openssl(['req', '-new', '-key', 'dev.key', '-subj', '/CN=dev-7', '-out', 'dev.csr']);
  const parsed = parseCsr(w.read('dev.csr').toString());
  const issued = await issueDevice(ca, parsed);
  w.write('leaf.pem', issued.pem);
  const r = verify(w, ['-x509_strict', '-purpose', 'sslclient', '-CAfile', 'root.pem', '-untrusted', 'device-ca.pem', 'leaf.pem']);
  assert.ok(r.ok, r.out);
  // the key in the certificate is the device's: openssl agrees the private key matches
  const certPub = w.openssl(['x509', '-in', 'leaf.pem', '-noout', '-pubkey']);
  const keyPub = w.openssl(['pkey', '-in', 'dev.key', '-pubout']);
  assert.equal(certPub, keyPub);
});

test('gateway and server profiles from the infrastructure CA', async (t) => {
  const { w, ca } = setup(t);
  const { parsed } = csrFor('EC P-256', 'gw-1', { dns: ['gw-1.example'] });
  const now = Date.now();
  for (const [kind, eku, purposes] of [
    ['gateway', 'TLS Web Client Authentication, TLS Web Server Authentication', ['sslclient', 'sslserver']],
    ['server', 'TLS Web Server Authentication', ['sslserver']],
  ] as const) {
    const issued = await ca.issue('infra', {
      subjectDer: parsed.subjectDer,
      spkiDer: parsed.spkiDer,
      profile: { kind, keyType: 'ec' },
      sans: parsed.sans,
      notBefore: new Date(now - 60_000),
      notAfter: new Date(now + DAY),
    });
    assert.deepEqual(issued.chain, [ca.infraCa.pem, ca.root.pem]);
    w.write(`${kind}.pem`, issued.pem);
    for (const purpose of purposes) {
      const r = verify(w, ['-x509_strict', '-purpose', purpose, '-CAfile', 'root.pem', '-untrusted', 'infra-ca.pem', `${kind}.pem`]);
      assert.ok(r.ok, `${kind} ${purpose}: ${r.out}`);
    }
    const text = w.openssl(['x509', '-in', `${kind}.pem`, '-noout', '-text']);
    assert.deepEqual(extText(text, 'Extended Key Usage'), { critical: false, value: eku });
    assert.match(text, /Issuer: CN = leafgate Infrastructure CA\n/);
  }
});

/** Reference certificate from `openssl x509 -req` with the same extensions as our profile. */
function opensslReference(w: Workdir, o: { csrPem: string; caCert: string; caKey: string; ext: string[]; serialHex: string; name: string }): string {
  w.write(`${o.name}.csr`, o.csrPem);
  w.write(`${o.name}.ext`, ['[v3]', ...o.ext].join('\n') + '\n');
  w.openssl([
    'x509', '-req', '-in', `${o.name}.csr`, '-CA', o.caCert, '-CAkey', o.caKey, '-passin', `pass:${PASSPHRASE}`,
    '-extfile', `${o.name}.ext`, '-extensions', 'v3', '-days', '30', '-set_serial', `0x${o.serialHex}`, '-sha256', '-out', `${o.name}.ref.pem`,
  ]);
  return `${o.name}.ref.pem`;
}

test('ASN.1 shape matches an openssl reference (device EC, device RSA, intermediate, root)', async (t) => {
  const { w, ca } = setup(t);
  const caDir = w.path('ca');
  const differences: string[] = [];

  for (const label of ['EC P-256', 'RSA-2048'] as const) {
    const sans = { dns: ['dev-1.devices.example'], ip: ['10.0.0.7'] };
    const { pem, parsed } = csrFor(label, 'dev-1', sans);
    const issued = await issueDevice(ca, parsed);
    const ours = `ours-${parsed.key.keyType}.pem`;
    w.write(ours, issued.pem);
    const ref = opensslReference(w, {
      name: `ref-${parsed.key.keyType}`,
      csrPem: pem,
      caCert: `${caDir}/device-ca.crt.pem`,
      caKey: `${caDir}/device-ca.key.pem`,
      serialHex: issued.serial,
      ext: [
        'basicConstraints = critical, CA:FALSE',
        'keyUsage = critical, digitalSignature',
        'extendedKeyUsage = clientAuth',
        'subjectKeyIdentifier = hash',
        'authorityKeyIdentifier = keyid',
        'subjectAltName = DNS:dev-1.devices.example, IP:10.0.0.7',
      ],
    });
    const r = verify(w, ['-x509_strict', '-purpose', 'sslclient', '-CAfile', 'root.pem', '-untrusted', 'device-ca.pem', ref]);
    assert.ok(r.ok, `reference itself verifies: ${r.out}`);
    assert.deepEqual(deepShape(w, ours), deepShape(w, ref), `${label}: same tag/depth/type sequence`);
    // stronger: the extensions are byte-identical (SKI method 1 = openssl's "hash")
    const refDer = fromPem(w.read(ref).toString(), 'CERTIFICATE');
    if (!extensionsDer(issued.der).equals(extensionsDer(refDer))) differences.push(`${label}: extensions differ`);
    // same issuer, subject, SPKI and serial bytes; only validity and signature may differ
    const tbsFields = (d: Buffer) => der.children(der.children(der.parseDer(d))[0]).map((n) => n.raw.toString('hex'));
    const [a, b] = [tbsFields(issued.der), tbsFields(refDer)];
    assert.equal(a.length, b.length);
    for (const i of [0, 1, 2, 3, 5, 6]) assert.equal(a[i], b[i], `${label}: TBS field ${i}`);
  }

  // intermediate: CSR for the device CA's own key, signed by the root with the intermediate profile
  const caKey = ca.deviceCa.privateKey!;
  const csrPem = buildCsr({ commonName: 'leafgate Device CA', privateKey: caKey, publicKey: ca.deviceCa.certificate.publicKey });
  w.write('ours-intermediate.pem', ca.deviceCa.pem);
  const ref = opensslReference(w, {
    name: 'ref-intermediate',
    csrPem,
    caCert: `${caDir}/root.crt.pem`,
    caKey: `${caDir}/root.key.pem`,
    serialHex: ca.deviceCa.certificate.serialNumber,
    ext: ['basicConstraints = critical, CA:TRUE, pathlen:0', 'keyUsage = critical, digitalSignature, keyCertSign, cRLSign', 'extendedKeyUsage = clientAuth', 'subjectKeyIdentifier = hash', 'authorityKeyIdentifier = keyid'],
  });
  assert.deepEqual(deepShape(w, 'ours-intermediate.pem'), deepShape(w, ref), 'intermediate: same shape');
  if (!extensionsDer(fromPem(ca.deviceCa.pem, 'CERTIFICATE')).equals(extensionsDer(fromPem(w.read(ref).toString(), 'CERTIFICATE')))) differences.push('intermediate: extensions differ');

  // root: `openssl req -x509` with the root extensions
  w.write('root.ext', ['[v3]', 'basicConstraints = critical, CA:TRUE', 'keyUsage = critical, digitalSignature, keyCertSign, cRLSign', 'subjectKeyIdentifier = hash'].join('\n') + '\n');
  w.openssl(['req', '-x509', '-new', '-key', `${caDir}/root.key.pem`, '-passin', `pass:${PASSPHRASE}`, '-subj', '/CN=leafgate Root CA', '-config', 'root.ext', '-extensions', 'v3', '-days', '30', '-set_serial', `0x${ca.root.certificate.serialNumber}`, '-sha256', '-out', 'ref-root.pem']);
  const rootShape = deepShape(w, 'ref-root.pem');
  assert.ok(rootShape.some((l) => l.startsWith('  extnValue: ')), 'extension values are parsed into the shape');
  // with an explicit -extensions section openssl 3.0 adds no authorityKeyIdentifier to the self-signed root; neither do we
  assert.deepEqual(deepShape(w, 'root.pem'), rootShape, 'root: same shape');
  if (!extensionsDer(fromPem(ca.root.pem, 'CERTIFICATE')).equals(extensionsDer(fromPem(w.read('ref-root.pem').toString(), 'CERTIFICATE')))) differences.push('root: extensions differ');
  t.diagnostic(`differences from the openssl references: ${differences.length ? differences.join('; ') : 'none (same shape, byte-identical extensions; validity and signature values differ by construction)'}`);
  assert.deepEqual(differences, [], 'extensions are byte-identical to the openssl reference');
});

test('validity: 2049/2050 boundary uses UTCTime/GeneralizedTime and openssl reads both', (t) => {
  const w = workdir(t);
  // a CA created in 2035 has a root until 2055 and issuing CAs until 2045
  const ca = LocalCa.open(w.path('ca2035'), PASSPHRASE, { now: new Date('2035-06-01T00:00:00Z') });
  w.write('root.pem', ca.root.pem);
  w.write('device-ca.pem', ca.deviceCa.pem);
  const rootTimes = der.children(der.children(der.children(der.parseDer(fromPem(ca.root.pem, 'CERTIFICATE')))[0])[4]);
  assert.deepEqual(rootTimes.map((n) => n.tag), [der.TAG.UTC_TIME, der.TAG.GENERALIZED_TIME]);
  assert.equal(rootTimes[1].value.toString(), '20550601000000Z');
  const at = String(Date.UTC(2036, 0, 1) / 1000);
  const r = verify(w, ['-x509_strict', '-attime', at, '-CAfile', 'root.pem', 'device-ca.pem']);
  assert.ok(r.ok, r.out);
  assert.match(w.openssl(['x509', '-in', 'root.pem', '-noout', '-enddate']), /notAfter=Jun {2}1 00:00:00 2055 GMT/);

  // a leaf straddling the boundary, signed directly by the root key
  const { parsed } = csrFor('EC P-256', 'dev-2050');
  const leaf = encodeCertificate({
    serial: newSerial(),
    subjectDer: parsed.subjectDer,
    spkiDer: parsed.spkiDer,
    notBefore: new Date('2049-12-31T23:59:59Z'),
    notAfter: new Date('2050-01-01T00:00:00Z'),
    profile: { kind: 'device', keyType: 'ec' },
    issuer: { subjectDer: ca.root.subjectDer, keyId: ca.root.keyId, privateKey: ca.root.privateKey! },
  });
  w.write('leaf.pem', toPem(leaf, 'CERTIFICATE'));
  const asn1 = w.openssl(['asn1parse', '-in', 'leaf.pem']);
  assert.match(asn1, /UTCTIME\s+:491231235959Z/);
  assert.match(asn1, /GENERALIZEDTIME\s+:20500101000000Z/);
  const x = new X509Certificate(leaf);
  assert.equal(new Date(x.validFrom).toISOString(), '2049-12-31T23:59:59.000Z');
  assert.equal(new Date(x.validTo).toISOString(), '2050-01-01T00:00:00.000Z');
  const ok = verify(w, ['-x509_strict', '-purpose', 'sslclient', '-attime', String(Date.UTC(2049, 11, 31, 23, 59, 59) / 1000), '-CAfile', 'root.pem', 'leaf.pem']);
  assert.ok(ok.ok, ok.out);
});

test('name constraints on an intermediate are encoded so that openssl enforces them', (t) => {
  const w = workdir(t);
  const root = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const inter = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const rootSpki = root.publicKey.export({ type: 'spki', format: 'der' });
  const interSpki = inter.publicKey.export({ type: 'spki', format: 'der' });
  const now = Date.now();
  const mk = (subject: string, spkiDer: Buffer, profile: CertificateProfile, issuer: { subjectDer: Buffer; keyId: Buffer; privateKey: KeyObject }, sans?: { dns?: string[] }) =>
    toPem(encodeCertificate({ serial: newSerial(), subjectDer: encodeName(subject), spkiDer, notBefore: new Date(now - 60_000), notAfter: new Date(now + DAY), profile, sans, issuer }), 'CERTIFICATE');
  const rootIssuer = { subjectDer: encodeName('NC Root'), keyId: keyIdentifier(rootSpki), privateKey: root.privateKey };
  const interIssuer = { subjectDer: encodeName('NC Inter'), keyId: keyIdentifier(interSpki), privateKey: inter.privateKey };
  w.write('root.pem', mk('NC Root', rootSpki, { kind: 'root' }, rootIssuer));
  w.write('inter.pem', mk('NC Inter', interSpki, { kind: 'intermediate', pathLen: 0, nameConstraints: { dns: ['devices.example'], ip: [] } }, rootIssuer));
  const text = w.openssl(['x509', '-in', 'inter.pem', '-noout', '-text']);
  assert.match(text, /X509v3 Name Constraints: critical\n\s+Permitted:\n\s+DNS:devices\.example/);
  const leafKey = generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ type: 'spki', format: 'der' });
  // CN is not DNS-like, so only the SAN is checked against the constraint
  w.write('inside.pem', mk('dev inside', leafKey, { kind: 'device', keyType: 'ec' }, interIssuer, { dns: ['a.devices.example'] }));
  w.write('outside.pem', mk('dev outside', leafKey, { kind: 'device', keyType: 'ec' }, interIssuer, { dns: ['a.elsewhere.example'] }));
  const inside = verify(w, ['-x509_strict', '-CAfile', 'root.pem', '-untrusted', 'inter.pem', 'inside.pem']);
  assert.ok(inside.ok, inside.out);
  const outside = verify(w, ['-x509_strict', '-CAfile', 'root.pem', '-untrusted', 'inter.pem', 'outside.pem']);
  assert.equal(outside.ok, false);
  assert.match(outside.out, /permitted subtree violation/);
});

test('keyIdentifier is SHA-1 over the subjectPublicKey bits (RFC 5280 4.2.1.2 method 1)', () => {
  for (const { publicKey } of Object.values(KEYS)) {
    const spki = publicKey.export({ type: 'spki', format: 'der' });
    const bits = der.decodeBitString(der.children(der.parseDer(spki))[1]);
    assert.ok(keyIdentifier(spki).equals(createHash('sha1').update(bits).digest()));
    assert.equal(keyIdentifier(spki).length, 20);
  }
});
