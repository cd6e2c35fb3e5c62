/**
 * protocol/pkix/csr.ts: our CSRs are checked by `openssl req -verify`, OpenSSL's CSRs are
 * parsed by us, and a seeded mutation fuzzer checks that parseCsrDer never accepts a request
 * that OpenSSL refuses.
 */
import { throwsDer } from './support/der.ts';
import assert from 'node:assert/strict';
import { generateKeyPairSync, sign, verify, type KeyObject } from 'node:crypto';
import { test } from 'node:test';
import * as der from '../protocol/pkix/der.ts';
import { DerError } from '../protocol/pkix/der.ts';
import { buildCsr, encodeName, parseCsr, parseCsrDer, type ParsedCsr } from '../protocol/pkix/csr.ts';
import { OID } from '../protocol/pkix/oids.ts';
import { spkiDerOfKey } from '../protocol/pkix/keys.ts';
import { EcVerifyPool } from '../protocol/pkix/verify-pool.ts';
import { fromPem, toPem } from '../protocol/pkix/pem.ts';
import { prng, workdir, type Workdir } from './support/openssl.ts';

interface Pair {
  label: string;
  privateKey: KeyObject;
  publicKey: KeyObject;
}

const PAIRS: Pair[] = [
  { label: 'EC P-256', ...generateKeyPairSync('ec', { namedCurve: 'P-256' }) },
  { label: 'EC P-384', ...generateKeyPairSync('ec', { namedCurve: 'P-384' }) },
  { label: 'RSA-2048', ...generateKeyPairSync('rsa', { modulusLength: 2048 }) },
];
const [P256, P384, RSA] = PAIRS;

const csrDer = (pem: string) => fromPem(pem, 'CERTIFICATE REQUEST');


/** OpenSSL's verdict on a DER CSR: parses and the self-signature verifies. */
function opensslAccepts(w: Workdir, csr: Buffer, name = 'verdict.der'): boolean {
  w.write(name, csr);
  const r = w.tryOpenssl(['req', '-inform', 'DER', '-in', name, '-verify', '-noout']);
  // openssl 3.0 exits 0 on "self-signature verify failure": the stderr line decides
  return r.status === 0 && /verify OK/.test(r.stderr);
}

function ourVerdict(csr: Buffer): { accepted: boolean; error?: unknown } {
  try {
    parseCsrDer(csr);
    return { accepted: true };
  } catch (error) {
    return { accepted: false, error };
  }
}

// ---- hand-made requests, for inputs that buildCsr never produces ------------------------------

const ext = (oid: string, value: Buffer, critical = false) =>
  critical ? der.seq(der.oid(oid), der.bool(true), der.octetString(value)) : der.seq(der.oid(oid), der.octetString(value));
const extensionRequest = (...exts: Buffer[]) => der.seq(der.oid(OID.extensionRequest), der.setOf(der.seq(...exts)));

interface CraftOptions {
  version?: Buffer;
  subject?: Buffer;
  attributes?: Buffer[];
  /** AlgorithmIdentifier DER; default matches the key. */
  algorithm?: Buffer;
  hash?: string;
  unusedBits?: number;
}

function craft(pair: Pair, o: CraftOptions = {}): Buffer {
  const spki = pair.publicKey.export({ type: 'spki', format: 'der' });
  const info = der.seq(o.version ?? der.integer(0), o.subject ?? encodeName('dev-1'), spki, der.contextTag(0, Buffer.concat(o.attributes ?? [])));
  const isEc = pair.publicKey.asymmetricKeyType === 'ec';
  const algorithm = o.algorithm ?? (isEc ? der.seq(der.oid(OID.ecdsaWithSHA256)) : der.seq(der.oid(OID.sha256WithRSAEncryption), der.nullValue()));
  const signature = sign(o.hash ?? 'sha256', info, pair.privateKey);
  return der.seq(info, algorithm, der.bitString(signature, o.unusedBits ?? 0));
}

/** A request made by `openssl req -new` from a config file and key file in `w`. */
function opensslCsr(w: Workdir, opts: { keyFile: string; subject?: string; challenge?: string; addext?: string[]; digest?: string; out: string }): Buffer {
  const cnf = [
    '[req]',
    'prompt = no',
    'distinguished_name = dn',
    ...(opts.challenge ? ['attributes = attrs'] : []),
    '[dn]',
    ...(opts.subject ?? 'CN=dev-1').split('/').map((kv) => kv.replace('=', ' = ')),
    ...(opts.challenge ? ['[attrs]', `challengePassword = ${opts.challenge}`] : []),
  ].join('\n');
  w.write(`${opts.out}.cnf`, cnf + '\n');
  const args = ['req', '-new', '-config', `${opts.out}.cnf`, '-key', opts.keyFile, '-outform', 'DER', '-out', `${opts.out}.der`];
  for (const a of opts.addext ?? []) args.push('-addext', a);
  if (opts.digest) args.push(`-${opts.digest}`);
  w.openssl(args);
  return w.read(`${opts.out}.der`);
}

function writeKey(w: Workdir, name: string, pair: Pair): string {
  return w.write(name, pair.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string);
}

// ---- buildCsr -> openssl --------------------------------------------------------------------

const SANS = { dns: ['a.example', 'dev-1.devices.example'], uri: ['urn:leafgate:device:dev-1'], ip: ['10.0.0.1', 'fd00::1', '2001:db8:0:0:1::ab'] };

for (const pair of PAIRS) {
  for (const withSans of [false, true]) {
    test(`buildCsr ${pair.label} ${withSans ? 'with' : 'without'} SANs verifies with openssl req -verify`, (t) => {
      const w = workdir(t);
      const pem = buildCsr({ commonName: 'dev-1', privateKey: pair.privateKey, publicKey: pair.publicKey, sans: withSans ? SANS : undefined });
      w.write('req.pem', pem);
      const r = w.tryOpenssl(['req', '-in', 'req.pem', '-verify', '-noout']);
      assert.equal(r.status, 0, r.stderr);
      assert.match(r.stderr, /self-signature verify OK/);

      const text = w.openssl(['req', '-in', 'req.pem', '-noout', '-text']);
      assert.match(text, /Version: 1 \(0x0\)/);
      assert.match(text, /Subject: CN = dev-1\n/);
      assert.match(text, pair === P384 ? /Signature Algorithm: ecdsa-with-SHA384/ : pair === RSA ? /Signature Algorithm: sha256WithRSAEncryption/ : /Signature Algorithm: ecdsa-with-SHA256/);
      if (withSans) {
        assert.match(
          text,
          /X509v3 Subject Alternative Name: \n\s+DNS:a\.example, DNS:dev-1\.devices\.example, URI:urn:leafgate:device:dev-1, IP Address:10\.0\.0\.1, IP Address:FD00:0:0:0:0:0:0:1, IP Address:2001:DB8:0:0:1:0:0:AB\n/,
        );
      } else {
        // openssl 3.0 prints an empty "Requested Extensions:" heading even with no attributes
        assert.match(text, /Attributes:\n\s+\(none\)\n/);
        assert.doesNotMatch(text, /X509v3/);
      }

      // and our own parser reads back what we wrote
      const parsed = parseCsr(pem);
      assert.equal(parsed.commonName, 'dev-1');
      assert.deepEqual(parsed.subject, [[OID.commonName, 'dev-1']]);
      assert.equal(parsed.key.keyType, pair === RSA ? 'rsa' : 'ec');
      assert.equal(parsed.key.keySize, pair === RSA ? 2048 : pair === P384 ? 384 : 256);
      assert.deepEqual(parsed.sans, withSans
        ? { dns: SANS.dns, uri: SANS.uri, ip: ['10.0.0.1', 'fd00:0:0:0:0:0:0:1', '2001:db8:0:0:1:0:0:ab'], email: [] }
        : { dns: [], uri: [], ip: [], email: [] });
      assert.deepEqual(parsed.requestedExtensions, withSans ? [{ oid: OID.subjectAltName, critical: false }] : []);
      assert.ok(parsed.der.equals(csrDer(pem)));
    });
  }
}

test('IPv6 SANs in their compressed forms encode to 16 octets', (t) => {
  const w = workdir(t);
  const cases: Array<[string, string]> = [
    ['::1', '0:0:0:0:0:0:0:1'],
    ['::', '0:0:0:0:0:0:0:0'],
    ['1::', '1:0:0:0:0:0:0:0'],
    ['fe80::1:2', 'fe80:0:0:0:0:0:1:2'],
    ['2001:DB8::8:800:200C:417A', '2001:db8:0:0:8:800:200c:417a'],
    ['1:2:3:4:5:6:7:8', '1:2:3:4:5:6:7:8'],
    ['1:2:3:4:5:6:7::', '1:2:3:4:5:6:7:0'],
  ];
  const pem = buildCsr({ commonName: 'dev-1', privateKey: P256.privateKey, publicKey: P256.publicKey, sans: { ip: cases.map(([ip]) => ip) } });
  assert.deepEqual(parseCsr(pem).sans.ip, cases.map(([, text]) => text));
  w.write('req.pem', pem);
  const text = w.openssl(['req', '-in', 'req.pem', '-noout', '-text']);
  assert.match(text, new RegExp(cases.map(([, t2]) => `IP Address:${t2.toUpperCase()}`).join(', ')));
  throwsDer(() => buildCsr({ commonName: 'x', privateKey: P256.privateKey, publicKey: P256.publicKey, sans: { ip: ['10.0.0.256'] } }), /bad IP address/);
  throwsDer(() => buildCsr({ commonName: 'x', privateKey: P256.privateKey, publicKey: P256.publicKey, sans: { ip: ['dev-1.example'] } }), /bad IP address/);
});

test('IPv4-embedded IPv6 and zone ids encode to 16 octets or are refused', {
}, () => {
  for (const [ip, expected] of [['::ffff:192.0.2.1', '0:0:0:0:0:ffff:c000:201'], ['64:ff9b::10.0.0.1', '64:ff9b:0:0:0:0:a00:1']]) {
    let pem: string;
    try {
      pem = buildCsr({ commonName: 'dev-1', privateKey: P256.privateKey, publicKey: P256.publicKey, sans: { ip: [ip] } });
    } catch (err) {
      assert.ok(err instanceof DerError, `${ip}: ${String(err)}`);
      continue; // refusing is acceptable too
    }
    assert.deepEqual(parseCsr(pem).sans.ip, [expected]);
  }
  // a zone id has no place in an iPAddress SAN: refuse
  throwsDer(() => buildCsr({ commonName: 'x', privateKey: P256.privateKey, publicKey: P256.publicKey, sans: { ip: ['fe80::1%eth0'] } }));
});

// ---- openssl req -new -> parseCsr ------------------------------------------------------------

for (const pair of PAIRS) {
  test(`parseCsr reads an openssl ${pair.label} request with SANs and a challengePassword`, (t) => {
    const w = workdir(t);
    const keyFile = writeKey(w, 'key.pem', pair);
    const csr = opensslCsr(w, { keyFile, challenge: 'not-a-secret-1234', addext: ['subjectAltName=DNS:a.example,IP:10.0.0.1'], out: 'req' });
    const parsed = parseCsr(toPem(csr, 'CERTIFICATE REQUEST'));
    assert.equal(parsed.commonName, 'dev-1');
    assert.deepEqual(parsed.subject, [[OID.commonName, 'dev-1']]);
    if (pair === RSA) assert.deepEqual(parsed.key, { keyType: 'rsa', keySize: 2048, publicExponent: 65537 });
    else if (pair === P384) assert.deepEqual(parsed.key, { keyType: 'ec', keySize: 384, curve: 'secp384r1' });
    else assert.deepEqual(parsed.key, { keyType: 'ec', keySize: 256, curve: 'prime256v1' });
    assert.equal(parsed.signatureAlgorithm, pair === RSA ? OID.sha256WithRSAEncryption : OID.ecdsaWithSHA256);
    assert.deepEqual(parsed.sans, { dns: ['a.example'], uri: [], ip: ['10.0.0.1'], email: [] });
    // challengePassword is skipped, only the extensionRequest shows up
    assert.deepEqual(parsed.requestedExtensions, [{ oid: OID.subjectAltName, critical: false }]);
    assert.ok(parsed.spkiDer.equals(pair.publicKey.export({ type: 'spki', format: 'der' })));
    assert.ok(parsed.publicKey.equals(pair.publicKey));
    assert.ok(parsed.subjectDer.equals(encodeName('dev-1')), 'openssl encodes CN as UTF8String as we do');
  });
}

test('parseCsr reports every subject attribute and every requested extension with its critical flag', (t) => {
  const w = workdir(t);
  const keyFile = writeKey(w, 'key.pem', P256);
  const csr = opensslCsr(w, {
    keyFile,
    subject: 'C=DE/O=Acme/OU=Sensors/CN=dev-1/serialNumber=SN-0042',
    addext: ['basicConstraints=critical,CA:TRUE', 'keyUsage=critical,digitalSignature', 'extendedKeyUsage=clientAuth', 'subjectAltName=email:ops@example.com,URI:urn:x,DNS:a.example'],
    out: 'req',
  });
  const parsed = parseCsrDer(csr);
  assert.deepEqual(parsed.subject, [
    [OID.countryName, 'DE'],
    [OID.organizationName, 'Acme'],
    [OID.organizationalUnitName, 'Sensors'],
    [OID.commonName, 'dev-1'],
    [OID.serialNumber, 'SN-0042'],
  ]);
  assert.equal(parsed.commonName, 'dev-1');
  assert.deepEqual(parsed.sans, { dns: ['a.example'], uri: ['urn:x'], ip: [], email: ['ops@example.com'] });
  assert.deepEqual(parsed.requestedExtensions, [
    { oid: OID.basicConstraints, critical: true },
    { oid: OID.keyUsage, critical: true },
    { oid: OID.extKeyUsage, critical: false },
    { oid: OID.subjectAltName, critical: false },
  ]);
});

test('unsupported GeneralName forms are recorded so that policy can refuse them', () => {
  // directoryName [4] and registeredID [8]
  const san = der.seq(der.contextTag(4, encodeName('x')), der.tlv(0x88, der.oid('1.2.3').subarray(2)));
  const parsed = parseCsrDer(craft(P256, { attributes: [extensionRequest(ext(OID.subjectAltName, san))] }));
  assert.deepEqual(parsed.sans.uri, ['unsupported:[4]', 'unsupported:[8]']);
});

// ---- refusals ---------------------------------------------------------------------------------

for (const pair of [P256, RSA]) {
  test(`tampered ${pair.label} requests are refused (signature, subject, key)`, (t) => {
    const w = workdir(t);
    const good = csrDer(buildCsr({ commonName: 'dev-1', privateKey: pair.privateKey, publicKey: pair.publicKey, sans: { dns: ['a.example'] } }));
    assert.equal(parseCsrDer(good).commonName, 'dev-1');
    assert.equal(opensslAccepts(w, good), true);

    // last signature octet
    const badSig = Buffer.from(good);
    badSig[badSig.length - 1] ^= 0x01;
    throwsDer(() => parseCsrDer(badSig), /does not verify/);
    assert.equal(opensslAccepts(w, badSig), false);

    // subject dev-1 -> dev-2, same length
    const at = good.indexOf(Buffer.from('dev-1'));
    assert.ok(at > 0);
    const badSubject = Buffer.from(good);
    badSubject[at + 4] = '2'.charCodeAt(0);
    throwsDer(() => parseCsrDer(badSubject), /does not verify/);
    assert.equal(opensslAccepts(w, badSubject), false);

    // SAN a.example -> b.example
    const sanAt = good.indexOf(Buffer.from('a.example'));
    const badSan = Buffer.from(good);
    badSan[sanAt] = 'b'.charCodeAt(0);
    throwsDer(() => parseCsrDer(badSan), /does not verify/);

    // someone else's key in an otherwise intact request
    const other = pair === RSA ? generateKeyPairSync('rsa', { modulusLength: 2048 }) : generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const [info, alg, sig] = der.children(der.parseDer(good));
    const fields = der.children(info);
    const swappedInfo = der.seq(fields[0].raw, fields[1].raw, other.publicKey.export({ type: 'spki', format: 'der' }), fields[3].raw);
    throwsDer(() => parseCsrDer(der.seq(swappedInfo, alg.raw, sig.raw)), /does not verify/);
  });
}

test('SHA-1 signed requests are refused', (t) => {
  const w = workdir(t);
  for (const pair of [P256, RSA]) {
    const keyFile = writeKey(w, `key-${pair.privateKey.asymmetricKeyType}.pem`, pair);
    const csr = opensslCsr(w, { keyFile, digest: 'sha1', out: `sha1-${pair.privateKey.asymmetricKeyType}` });
    assert.equal(opensslAccepts(w, csr), true, 'openssl itself still verifies SHA-1 self-signatures');
    throwsDer(() => parseCsrDer(csr), pair === RSA ? /1\.2\.840\.113549\.1\.1\.5 is not accepted/ : /1\.2\.840\.10045\.4\.1 is not accepted/);
  }
});

test('Ed25519 requests are refused, and buildCsr refuses Ed25519 keys', (t) => {
  const w = workdir(t);
  w.openssl(['genpkey', '-algorithm', 'ed25519', '-out', 'ed.key']);
  const csr = opensslCsr(w, { keyFile: 'ed.key', out: 'ed' });
  assert.equal(opensslAccepts(w, csr), true);
  // well-formed, not a key leafgate signs: NotAcceptedError (policy_violation at the authority)
  throwsDer(() => parseCsrDer(csr), /key algorithm 1\.3\.101\.112 is not accepted/);
  assert.throws(() => parseCsrDer(csr), der.NotAcceptedError);
  const ed = generateKeyPairSync('ed25519');
  throwsDer(() => buildCsr({ commonName: 'x', privateKey: ed.privateKey, publicKey: ed.publicKey }), /ed25519 is not supported/);
});

test('structural refusals of hand-made requests', () => {
  assert.equal(parseCsrDer(craft(P256)).commonName, 'dev-1', 'the crafting helper itself makes valid requests');
  assert.equal(parseCsrDer(craft(RSA)).commonName, 'dev-1');
  throwsDer(() => parseCsrDer(craft(P256, { version: der.integer(1) })), /version must be 0/);
  throwsDer(() => parseCsrDer(craft(P256, { algorithm: der.seq(der.oid(OID.sha256WithRSAEncryption), der.nullValue()) })), /does not match the key type/);
  throwsDer(() => parseCsrDer(craft(RSA, { algorithm: der.seq(der.oid(OID.ecdsaWithSHA256)) })), /does not match the key type/);
  throwsDer(() => parseCsrDer(craft(P256, { algorithm: der.seq(der.oid(OID.ecdsaWithSHA256), der.nullValue()) })), /must have no parameters/);
  throwsDer(() => parseCsrDer(craft(P256, { algorithm: der.seq(der.oid('1.2.840.10045.4.3.1')), hash: 'sha224' })), /is not accepted/);
  throwsDer(() => parseCsrDer(craft(P256, { hash: 'sha384' })), /does not verify/, 'digest differs from the algorithm identifier');
  throwsDer(() => parseCsrDer(craft(P256, { attributes: [der.seq(der.oid(OID.extensionRequest), der.seq())] })), /attribute values/);
  throwsDer(() => parseCsrDer(craft(P256, { attributes: [extensionRequest(der.seq(der.oid(OID.subjectAltName), der.integer(1)))] })), /extnValue/);
  throwsDer(() => parseCsrDer(craft(P256, { attributes: [extensionRequest(ext(OID.subjectAltName, der.integer(1)))] })), /GeneralNames/);
  throwsDer(() => parseCsrDer(craft(P256, { subject: der.seq(der.setOf(der.seq(der.oid(OID.commonName)))) })), /attribute value missing/);
  throwsDer(() => parseCsrDer(craft(P256, { subject: der.seq(der.setOf(der.seq(der.oid(OID.commonName), der.integer(5)))) })), /not a string type/);

  const good = craft(P256);
  const [info, alg, sig] = der.children(der.parseDer(good));
  throwsDer(() => parseCsrDer(der.seq(info.raw, alg.raw, sig.raw, der.nullValue())), /unexpected fields after signature/);
  throwsDer(() => parseCsrDer(der.seq(info.raw, alg.raw)), /BIT STRING is missing/);
  throwsDer(() => parseCsrDer(Buffer.concat([good, Buffer.from([0])])), /trailing data/);
  throwsDer(() => parseCsrDer(der.seq(der.seq(...der.children(info).map((c) => c.raw), der.nullValue()), alg.raw, sig.raw)), /unexpected fields in CertificationRequestInfo/);
  const spkiGarbage = der.seq(der.integer(0), encodeName('x'), der.seq(der.seq(der.oid(OID.ecPublicKey)), der.bitString(Buffer.from([4, 1, 2]))), der.contextTag(0, Buffer.alloc(0)));
  throwsDer(() => parseCsrDer(der.seq(spkiGarbage, alg.raw, sig.raw)), /id-ecPublicKey needs exactly one parameter/);

  throwsDer(() => parseCsr('hello'), /no PEM CERTIFICATE REQUEST block/);
  throwsDer(() => parseCsr('-----BEGIN CERTIFICATE REQUEST-----\n%%%\n-----END CERTIFICATE REQUEST-----\n'), /not base64/);
  throwsDer(() => parseCsr('-----BEGIN CERTIFICATE REQUEST-----\n\n-----END CERTIFICATE REQUEST-----\n'), /not base64/);
});

test('extra fields and empty SETs in attributes, extensions and names are refused (openssl refuses the first)', (t) => {
  const w = workdir(t);
  const san = ext(OID.subjectAltName, der.seq(der.tlv(0x82, Buffer.from('a.example'))));
  // values SET emptied, the Extensions left behind as a third Attribute field: we used to read no SAN and accept
  const stray = craft(P256, { attributes: [der.seq(der.oid(OID.extensionRequest), der.tlv(der.TAG.SET, Buffer.alloc(0)), der.seq(san))] });
  assert.equal(opensslAccepts(w, stray), false);
  throwsDer(() => parseCsrDer(stray), /unexpected fields in Attribute/);
  throwsDer(() => parseCsrDer(craft(P256, { attributes: [der.seq(der.oid(OID.extensionRequest), der.tlv(der.TAG.SET, Buffer.alloc(0)))] })), /empty SET/);
  throwsDer(() => parseCsrDer(craft(P256, { attributes: [extensionRequest(der.seq(der.oid(OID.subjectAltName), der.octetString(der.seq()), der.nullValue()))] })), /unexpected fields in Extension/);
  throwsDer(() => parseCsrDer(craft(P256, { attributes: [extensionRequest(der.seq(der.oid(OID.subjectAltName), der.tlv(der.TAG.BOOLEAN, Buffer.alloc(0)), der.octetString(der.seq())))] })), /BOOLEAN must be one octet/);
  throwsDer(() => parseCsrDer(craft(P256, { subject: der.seq(der.setOf(der.seq(der.oid(OID.commonName), der.utf8String('dev-1'), der.nullValue()))) })), /unexpected fields in AttributeTypeAndValue/);
  throwsDer(() => parseCsrDer(craft(P256, { subject: der.seq(der.tlv(der.TAG.SET, Buffer.alloc(0)), der.setOf(der.seq(der.oid(OID.commonName), der.utf8String('dev-1')))) })), /RelativeDistinguishedName: empty SET/);
});

test('a signature BIT STRING with unused bits is refused as openssl refuses it', {
}, (t) => {
  const w = workdir(t);
  for (const unusedBits of [1, 7]) {
    const csr = craft(P256, { unusedBits });
    assert.equal(opensslAccepts(w, csr), false);
    throwsDer(() => parseCsrDer(csr));
  }
});

test('a request with a non-minimal version INTEGER is refused as openssl refuses it', {
}, (t) => {
  const w = workdir(t);
  const csr = craft(P256, { version: Buffer.from([0x02, 0x02, 0x00, 0x00]) });
  assert.equal(opensslAccepts(w, csr), false);
  throwsDer(() => parseCsrDer(csr));
});

test('a signatureAlgorithm with extra fields is refused as openssl refuses it', {
}, (t) => {
  const w = workdir(t);
  const csr = craft(RSA, { algorithm: der.seq(der.oid(OID.sha256WithRSAEncryption), der.nullValue(), der.nullValue()) });
  assert.equal(opensslAccepts(w, csr), false);
  throwsDer(() => parseCsrDer(csr));
});

test('malformed content inside a validly signed request fails with DerError, never RangeError', {
}, () => {
  for (const ipLen of [0, 1, 3, 5, 8, 15, 17, 32]) {
    const san = der.seq(der.tlv(0x87, Buffer.alloc(ipLen, 1)));
    throwsDer(() => parseCsrDer(craft(P256, { attributes: [extensionRequest(ext(OID.subjectAltName, san))] })));
  }
  const bmpSubject = der.seq(der.setOf(der.seq(der.oid(OID.commonName), der.tlv(0x1e, Buffer.from([0, 0x41, 0])))));
  throwsDer(() => parseCsrDer(craft(P256, { subject: bmpSubject })));
});

// ---- mutation fuzzing against openssl -------------------------------------------------------

type Mutator = (base: Buffer, pick: (n: number) => number, i: number) => { m: Buffer; what: string };

/**
 * Applies `perBase` seeded mutations to each base request and compares verdicts. Returns the
 * mutations we accept although openssl refuses them; refusals that are not DerError are
 * collected too. "openssl accepts, we refuse" is allowed and only reported.
 */
function fuzz(t: { diagnostic(m: string): void }, w: Workdir, seed: number, bases: Array<[string, Buffer]>, perBase: number, mutate: Mutator) {
  const started = Date.now();
  const rand = prng(seed);
  const pick = (n: number) => Math.floor(rand() * n);
  const falseAccepts: string[] = [];
  const nonDerErrors: string[] = [];
  const onlyOpenssl: string[] = [];
  const counts = { total: 0, bothAccept: 0, bothReject: 0, onlyOpensslAccepts: 0, ourFalseAccepts: 0, duplicates: 0 };
  for (const [name, base] of bases) {
    assert.equal(ourVerdict(base).accepted, true, `${name} parses`);
    assert.equal(opensslAccepts(w, base), true, `${name} verifies with openssl`);
    const seen = new Set<string>();
    for (let i = 0; i < perBase; i++) {
      const { m, what } = mutate(base, pick, i);
      const key = m.toString('hex');
      if (seen.has(key) || m.equals(base)) {
        counts.duplicates++;
        continue;
      }
      seen.add(key);
      counts.total++;
      const ours = ourVerdict(m);
      const theirs = opensslAccepts(w, m, 'fuzz.der');
      if (!ours.accepted && !(ours.error instanceof DerError)) nonDerErrors.push(`${name}: ${what}: ${String(ours.error)}`);
      if (ours.accepted && theirs) counts.bothAccept++;
      else if (!ours.accepted && !theirs) counts.bothReject++;
      else if (ours.accepted && !theirs) {
        counts.ourFalseAccepts++;
        falseAccepts.push(`${name}: ${what}`);
      } else {
        counts.onlyOpensslAccepts++;
        onlyOpenssl.push(`${name}: ${what}: ${(ours.error as Error).message}`);
      }
    }
  }
  t.diagnostic(`fuzz seed 0x${seed.toString(16)}: ${JSON.stringify(counts)}, ${Date.now() - started} ms`);
  for (const s of onlyOpenssl) t.diagnostic(`info: openssl accepts, we refuse: ${s}`);
  for (const s of falseAccepts) t.diagnostic(`we accept, openssl refuses: ${s}`);
  return { counts, falseAccepts, nonDerErrors };
}

function fuzzBases(w: Workdir): Array<[string, Buffer]> {
  return [
    ['openssl EC P-256 with SAN and challengePassword', opensslCsr(w, { keyFile: writeKey(w, 'p256.pem', P256), challenge: 'not-a-secret-1234', addext: ['subjectAltName=DNS:a.example,IP:10.0.0.1'], out: 'base1' })],
    ['leafgate EC P-384 with SANs', csrDer(buildCsr({ commonName: 'dev-1', privateKey: P384.privateKey, publicKey: P384.publicKey, sans: SANS }))],
    ['openssl RSA-2048', opensslCsr(w, { keyFile: writeKey(w, 'rsa.pem', RSA), out: 'base3' })],
  ];
}

test('fuzz: parseCsrDer never accepts a mutated request that openssl rejects (300 seeded mutations anywhere)', (t) => {
  const w = workdir(t);
  const { counts, falseAccepts, nonDerErrors } = fuzz(t, w, 0x1eafe7e, fuzzBases(w), 100, (base, pick, i) => {
    switch (i % 5) {
      case 0:
      case 1: {
        const m = Buffer.from(base);
        const pos = pick(m.length);
        const bit = pick(8);
        m[pos] ^= 1 << bit;
        return { m, what: `flip bit ${bit} at ${pos}` };
      }
      case 2: {
        const cut = pick(base.length);
        return { m: base.subarray(0, cut), what: `truncate to ${cut}` };
      }
      case 3: {
        const pos = pick(base.length + 1);
        const byte = pick(256);
        return { m: Buffer.concat([base.subarray(0, pos), Buffer.from([byte]), base.subarray(pos)]), what: `insert 0x${byte.toString(16)} at ${pos}` };
      }
      default: {
        const pos = pick(base.length);
        return { m: Buffer.concat([base.subarray(0, pos), base.subarray(pos + 1)]), what: `delete byte at ${pos}` };
      }
    }
  });
  assert.ok(counts.total >= 280, `enough distinct mutations (${counts.total})`);
  assert.deepEqual(nonDerErrors, [], 'every refusal is a DerError');
  assert.deepEqual(falseAccepts, [], 'we accepted requests that openssl refuses');
});

test('fuzz: mutations of the unsigned envelope (outer header, signatureAlgorithm, signature BIT STRING header)', {
}, (t) => {
  const w = workdir(t);
  const bases = fuzzBases(w);
  // byte positions that the self-signature does not cover: everything before and after CertificationRequestInfo,
  // minus the signature value itself (a changed value never verifies, on either side)
  const envelope = new Map<Buffer, number[]>();
  for (const [, base] of bases) {
    const outer = der.parseDer(base);
    const [info, alg, sig] = der.children(outer);
    const infoStart = info.raw.byteOffset - base.byteOffset;
    const algStart = alg.raw.byteOffset - base.byteOffset;
    const sigStart = sig.raw.byteOffset - base.byteOffset;
    const sigHeader = sig.raw.length - sig.value.length + 1; // tag, length octets, unused-bits octet
    const positions: number[] = [];
    for (let p = 0; p < infoStart; p++) positions.push(p);
    for (let p = algStart; p < sigStart + sigHeader; p++) positions.push(p);
    envelope.set(base, positions);
  }
  const { counts, falseAccepts, nonDerErrors } = fuzz(t, w, 0xe11e10e, bases, 60, (base, pick, i) => {
    const positions = envelope.get(base)!;
    const pos = positions[pick(positions.length)];
    const m = Buffer.from(base);
    if (i % 3 === 2) {
      m[pos] = pick(256);
      return { m, what: `set 0x${m[pos].toString(16)} at ${pos}` };
    }
    const bit = pick(8);
    m[pos] ^= 1 << bit;
    return { m, what: `flip bit ${bit} at ${pos}` };
  });
  assert.ok(counts.total >= 60, `enough distinct mutations (${counts.total})`);
  assert.deepEqual(nonDerErrors, [], 'every refusal is a DerError');
  assert.deepEqual(falseAccepts, [], 'we accepted requests that openssl refuses');
});

// keep the ParsedCsr type import honest for tsc
export type { ParsedCsr };

test('spkiDerOfKey is byte-identical to OpenSSL\'s SPKI export (EC P-256/384/521, RSA, private or public key), and falls back for other types', () => {
  const pairs: Array<{ publicKey: KeyObject; privateKey: KeyObject }> = [];
  for (let i = 0; i < 8; i++) pairs.push(generateKeyPairSync('ec', { namedCurve: 'P-256' }));
  pairs.push(generateKeyPairSync('ec', { namedCurve: 'P-384' }), generateKeyPairSync('ec', { namedCurve: 'P-521' }));
  for (const bits of [1024, 2048, 3072]) pairs.push(generateKeyPairSync('rsa', { modulusLength: bits }));
  pairs.push(generateKeyPairSync('rsa', { modulusLength: 2048, publicExponent: 3 }));
  // A curve without a JWK name and a non-RSA/EC key take OpenSSL's own export.
  pairs.push(generateKeyPairSync('ec', { namedCurve: 'secp256k1' }), generateKeyPairSync('ec', { namedCurve: 'prime192v1' }), generateKeyPairSync('ed25519'));
  for (const { publicKey, privateKey } of pairs) {
    const expected = publicKey.export({ type: 'spki', format: 'der' });
    assert.deepEqual(spkiDerOfKey(publicKey), expected, `${publicKey.asymmetricKeyType} ${publicKey.asymmetricKeyDetails?.namedCurve ?? publicKey.asymmetricKeyDetails?.modulusLength}`);
    assert.deepEqual(spkiDerOfKey(privateKey), expected);
  }
});

test('EC verify pool: verdicts match crypto.verify, an unreadable key is told apart, a lost worker fails only its jobs', async () => {
  const pool = new EcVerifyPool(2);
  try {
    const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const jwk = publicKey.export({ format: 'jwk' });
    const point = Buffer.concat([Buffer.from([4]), Buffer.from(jwk.x!, 'base64url'), Buffer.from(jwk.y!, 'base64url')]);
    const jobs = Array.from({ length: 60 }, (_, i) => {
      const data = Buffer.from(`message ${i}`);
      const signature = sign('sha256', i % 3 === 1 ? Buffer.from('other') : data, privateKey);
      // Every third job has a point off the curve.
      const p = i % 3 === 2 ? Buffer.concat([point.subarray(0, 64), Buffer.from([point[64] ^ 1])]) : point;
      return { crv: 'P-256' as const, point: p, hash: 'sha256', data, signature };
    });
    const verdicts = await Promise.all(jobs.map((j) => pool.verify(j)));
    assert.deepEqual(verdicts, jobs.map((_, i) => ['verified', 'bad-signature', 'bad-key'][i % 3]));
    // A worker fails while a batch is in flight (its 'error' event, as a crash would give):
    // those jobs reject, the next ones get a new worker.
    const inFlight = pool.verify(jobs[0]);
    await new Promise((r) => setImmediate(r));
    const lost = [...(pool as unknown as { workers: Array<{ worker: import('node:worker_threads').Worker }> }).workers];
    for (const w of lost) w.worker.emit('error', new Error('worker crashed'));
    await assert.rejects(inFlight, /worker crashed/);
    await Promise.all(lost.map((w) => w.worker.terminate()));
    assert.equal(await pool.verify(jobs[0]), 'verified');
    assert.equal(await pool.verify(jobs[1]), 'bad-signature');
    // Signatures: the same bytes a verify accepts, the key sent once per worker.
    const signed = await Promise.all(jobs.slice(0, 8).map((j) => pool.sign('sha256', j.data, privateKey)));
    signed.forEach((sig, i) => assert.ok(verify('sha256', jobs[i].data, publicKey, sig)));
    await assert.rejects(pool.sign('sha256', jobs[0].data, publicKey), /signing failed/);
  } finally {
    await pool.close();
  }
});
