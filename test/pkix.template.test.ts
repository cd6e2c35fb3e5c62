/**
 * protocol/pkix/certificate.ts CertificateTemplate (the issuance hot path) against the generic
 * encoder: for the same inputs the TBSCertificate is byte-identical, `openssl x509 -text`
 * reads the same fields, and `openssl verify` accepts what the template signs (sync and on
 * the threadpool). LocalCa.issue / issueAsync go through templates: their output re-encodes
 * identically with the generic encoder.
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync, X509Certificate } from 'node:crypto';
import { test } from 'node:test';
import { LocalCa } from '../authority/ca/index.ts';
import * as der from '../protocol/pkix/der.ts';
import { CertificateTemplate, encodeCertificate, newSerial, type CertificateInput, type CertificateProfile, type TemplateFields } from '../protocol/pkix/certificate.ts';
import { buildCsr, parseCsr } from '../protocol/pkix/csr.ts';
import { toPem } from '../protocol/pkix/pem.ts';
import { workdir, type Workdir } from './support/openssl.ts';

const PASSPHRASE = 'a-passphrase-of-length';
const DAY = 86_400_000;

const CSRS = {
  ec256: parseCsr(buildCsr({ commonName: 'dev-1', ...generateKeyPairSync('ec', { namedCurve: 'P-256' }) })),
  ec384: parseCsr(buildCsr({ commonName: 'dev-384', ...generateKeyPairSync('ec', { namedCurve: 'P-384' }) })),
  rsa: parseCsr(buildCsr({ commonName: 'dev-rsa', ...generateKeyPairSync('rsa', { modulusLength: 2048 }) })),
};

const SAN_CASES: Array<TemplateFields['sans']> = [
  undefined,
  { dns: [], uri: [] },
  { dns: ['dev-1.devices.example'] },
  { dns: ['a.example', 'b.example'], uri: ['urn:leafgate:device:dev-1'], ip: ['10.0.0.7', 'fd00::1'] },
  // long enough that the SAN, the extensions and the TBS need two-octet lengths
  { dns: Array.from({ length: 12 }, (_, i) => `device-${i}.a-rather-long-subdomain.devices.example`) },
];

const VALIDITIES: Array<[Date, Date]> = [
  [new Date(Date.now() - 300_000), new Date(Date.now() + 365 * DAY)],
  [new Date('2049-12-31T23:59:59Z'), new Date('2050-01-01T00:00:00Z')], // UTCTime / GeneralizedTime
  [new Date('1999-06-30T12:00:00Z'), new Date('2060-02-29T00:00:00Z')],
];

/** TBSCertificate DER of a certificate. */
const tbsOf = (certDer: Buffer) => der.children(der.parseDer(certDer))[0].raw;

/** `openssl x509 -noout -text` without the signature value (ECDSA signatures differ every time). */
function certText(w: Workdir, certDer: Buffer, name: string): string {
  w.write(name, toPem(certDer, 'CERTIFICATE'));
  const text = w.openssl(['x509', '-in', name, '-noout', '-text']);
  const cut = text.lastIndexOf('Signature Value:');
  assert.ok(cut > 0, 'openssl prints a signature value');
  return text.slice(0, cut);
}

test('template TBS is byte-identical to the generic encoder for every profile, key, SAN set and validity', (t) => {
  const w = workdir(t);
  const ca = LocalCa.open(w.path('ca'), PASSPHRASE);
  const profiles: Array<[CertificateProfile, keyof typeof CSRS]> = [
    [{ kind: 'device', keyType: 'ec' }, 'ec256'],
    [{ kind: 'device', keyType: 'ec' }, 'ec384'],
    [{ kind: 'device', keyType: 'rsa' }, 'rsa'],
    [{ kind: 'gateway', keyType: 'ec' }, 'ec256'],
    [{ kind: 'server', keyType: 'rsa' }, 'rsa'],
    [{ kind: 'intermediate', pathLen: 0 }, 'ec256'],
    [{ kind: 'intermediate', pathLen: 0, nameConstraints: { dns: ['gw-1.local', '.gw-1.local'], ip: ['192.0.2.7', '2001:db8::1'] }, eku: ['serverAuth', 'clientAuth'] }, 'ec384'],
    [{ kind: 'root' }, 'ec256'],
  ];
  let compared = 0;
  for (const [profile, csrName] of profiles) {
    const csr = CSRS[csrName];
    for (const issuingCa of [ca.deviceCa, ca.root]) {
      // the device CA with a CRL distribution point, the root without
      const crlUrl = issuingCa === ca.deviceCa ? 'https://authority.example:8443/v1/crl/device-ca.crl' : undefined;
      const issuer = { subjectDer: issuingCa.subjectDer, keyId: issuingCa.keyId, privateKey: issuingCa.privateKey!, crlUrl };
      const template = new CertificateTemplate(profile, issuer);
      for (const sans of SAN_CASES) {
        for (const [notBefore, notAfter] of VALIDITIES) {
          const fields: TemplateFields = { serial: newSerial(), subjectDer: csr.subjectDer, spkiDer: csr.spkiDer, notBefore, notAfter, sans };
          const input: CertificateInput = { ...fields, profile, issuer };
          const generic = encodeCertificate(input);
          const tbs = template.encodeTbs(fields);
          assert.ok(tbs.equals(tbsOf(generic)), `${JSON.stringify(profile)} ${csrName} ${JSON.stringify(sans)} ${notBefore.toISOString()}: TBS differs`);
          // and the signed certificate around it has the generic layout
          const signed = template.encode(fields);
          assert.ok(tbsOf(signed).equals(tbs));
          const [, alg, sig] = der.children(der.parseDer(signed));
          const [, galg, gsig] = der.children(der.parseDer(generic));
          assert.ok(alg.raw.equals(galg.raw));
          assert.equal(sig.tag, gsig.tag);
          assert.ok(new X509Certificate(signed).verify(issuingCa.certificate.publicKey), 'signature verifies');
          compared++;
        }
      }
    }
  }
  t.diagnostic(`${compared} template/generic pairs compared`);
  // serials of every length the INTEGER encoder can meet (leading zero octets, top bit set)
  const template = new CertificateTemplate({ kind: 'device', keyType: 'ec' }, { subjectDer: ca.deviceCa.subjectDer, keyId: ca.deviceCa.keyId, privateKey: ca.deviceCa.privateKey! });
  for (const serial of [Buffer.from([1]), Buffer.from([0x80]), Buffer.from([0, 0, 0x7f, 1]), Buffer.alloc(20, 0xff)]) {
    const fields: TemplateFields = { serial, subjectDer: CSRS.ec256.subjectDer, spkiDer: CSRS.ec256.spkiDer, notBefore: VALIDITIES[0][0], notAfter: VALIDITIES[0][1] };
    const generic = encodeCertificate({ ...fields, profile: { kind: 'device', keyType: 'ec' }, issuer: { subjectDer: ca.deviceCa.subjectDer, keyId: ca.deviceCa.keyId, privateKey: ca.deviceCa.privateKey! } });
    assert.ok(template.encodeTbs(fields).equals(tbsOf(generic)), `serial ${serial.toString('hex')}`);
  }
});

test('template certificates (sync and threadpool-signed) pass openssl verify and read field by field like the generic ones', async (t) => {
  const w = workdir(t);
  const ca = LocalCa.open(w.path('ca'), PASSPHRASE);
  w.write('root.pem', ca.root.pem);
  w.write('device-ca.pem', ca.deviceCa.pem);
  w.write('infra-ca.pem', ca.infraCa.pem);
  const cases: Array<{ profile: CertificateProfile; csr: keyof typeof CSRS; ca: 'deviceCa' | 'infraCa'; purpose: string; sans: TemplateFields['sans'] }> = [
    { profile: { kind: 'device', keyType: 'ec' }, csr: 'ec256', ca: 'deviceCa', purpose: 'sslclient', sans: { dns: ['dev-1.devices.example'], uri: ['urn:leafgate:device:dev-1'] } },
    { profile: { kind: 'device', keyType: 'ec' }, csr: 'ec384', ca: 'deviceCa', purpose: 'sslclient', sans: undefined },
    { profile: { kind: 'device', keyType: 'rsa' }, csr: 'rsa', ca: 'deviceCa', purpose: 'sslclient', sans: SAN_CASES[3] },
    { profile: { kind: 'gateway', keyType: 'ec' }, csr: 'ec256', ca: 'infraCa', purpose: 'sslserver', sans: { dns: ['gw-1.example'] } },
    { profile: { kind: 'server', keyType: 'rsa' }, csr: 'rsa', ca: 'infraCa', purpose: 'sslserver', sans: SAN_CASES[4] },
  ];
  for (const [i, c] of cases.entries()) {
    const issuingCa = ca[c.ca];
    const issuer = { subjectDer: issuingCa.subjectDer, keyId: issuingCa.keyId, privateKey: issuingCa.privateKey! };
    const template = new CertificateTemplate(c.profile, issuer);
    const fields: TemplateFields = {
      serial: newSerial(), subjectDer: CSRS[c.csr].subjectDer, spkiDer: CSRS[c.csr].spkiDer, notBefore: new Date(Date.now() - 300_000), notAfter: new Date(Date.now() + 30 * DAY), sans: c.sans,
    };
    const generic = encodeCertificate({ ...fields, profile: c.profile, issuer });
    const reference = certText(w, generic, `generic-${i}.pem`);
    for (const [how, certDer] of [['sync', template.encode(fields)], ['threadpool', await template.encodeAsync(fields)]] as const) {
      const name = `template-${i}-${how}.pem`;
      assert.equal(certText(w, certDer, name), reference, `${how} ${JSON.stringify(c.profile)}: openssl x509 -text reads the same fields`);
      const untrusted = c.ca === 'deviceCa' ? 'device-ca.pem' : 'infra-ca.pem';
      const r = w.tryOpenssl(['verify', '-x509_strict', '-purpose', c.purpose, '-CAfile', 'root.pem', '-untrusted', untrusted, name]);
      assert.ok(r.status === 0 && /: OK$/.test(r.stdout.trim()), `${how} ${JSON.stringify(c.profile)}: ${r.stdout}${r.stderr}`);
    }
  }
});

test('LocalCa.issue output (worker pool, and the threadpool fallback) re-encodes identically with the generic encoder', async (t) => {
  const w = workdir(t);
  const ca = LocalCa.open(w.path('ca'), PASSPHRASE);
  const now = Date.now();
  const req = {
    subjectDer: CSRS.ec256.subjectDer, spkiDer: CSRS.ec256.spkiDer, profile: { kind: 'device', keyType: 'ec' } as const, sans: { dns: ['dev-1.devices.example'], uri: [] },
    notBefore: new Date(now - 300_000), notAfter: new Date(now + 365 * DAY),
  };
  const sync = await ca.issue('device', req);
  const pooled = await ca.issue('device', req);
  const clamped = await ca.issue('device', { ...req, notAfter: new Date(now + 100 * 365 * DAY) });
  assert.equal(clamped.notAfter.getTime(), Math.floor(ca.deviceCa.notAfter.getTime() / 1000) * 1000, 'validity clamped to the issuing CA');
  for (const issued of [sync, pooled, clamped]) {
    const x = new X509Certificate(issued.pem);
    assert.equal(x.serialNumber, issued.serial);
    assert.equal(x.fingerprint256, issued.fingerprint256);
    assert.ok(x.verify(ca.deviceCa.certificate.publicKey));
    assert.ok(der.children(der.parseDer(issued.der))[0].raw.equals(tbsOf(encodeCertificate({
      serial: Buffer.from(issued.serial, 'hex'), subjectDer: req.subjectDer, spkiDer: req.spkiDer, notBefore: req.notBefore, notAfter: issued.notAfter, profile: req.profile, sans: req.sans,
      issuer: { subjectDer: ca.deviceCa.subjectDer, keyId: ca.deviceCa.keyId, privateKey: ca.deviceCa.privateKey! },
    }))));
  }
  assert.notEqual(sync.serial, pooled.serial);
});

test('serials from the pooled CSPRNG are distinct, positive and 16 octets', () => {
  const seen = new Set<string>();
  for (let i = 0; i < 2000; i++) {
    const s = newSerial();
    assert.equal(s.length, 16);
    assert.ok(s[0] > 0 && s[0] < 0x80);
    seen.add(s.toString('hex'));
  }
  assert.equal(seen.size, 2000);
});
