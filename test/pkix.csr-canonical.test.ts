/**
 * "The authority signs only what it checked" (issue 14, point 4): a corpus of odd CSRs, made
 * here with node:crypto, openssl and hand-built DER, each with its outcome -- refused with
 * its exact code (bad_csr: malformed; policy_violation: well-formed but not signed), or
 * accepted and re-encoded, the certificate then carrying the canonical key and a subject
 * built from the checked CN. The second half runs cases through the real stack (MQTT device,
 * gateway, authority) and checks issued certificates with `openssl verify -x509_strict`.
 */
import assert from 'node:assert/strict';
import { createPrivateKey, createPublicKey, ECDH, generateKeyPairSync, sign, X509Certificate, type KeyObject } from 'node:crypto';
import { test } from 'node:test';
import { checkCsrAgainstInstruction, DEFAULT_POLICY } from '../authority/policy/index.ts';
import { LeafgateError, pkix, requestIdOfRaw, type CertMessage, type ErrorCode, type InstructionMessage } from '../protocol/index.ts';
import * as der from '../protocol/pkix/der.ts';
import { encodeName, parseCsrDer, parseCsrDerAsync, type ParsedCsr } from '../protocol/pkix/csr.ts';
import { encodeCertificate, keyIdentifier, newSerial, spkiDerOf, subjectDerOf } from '../protocol/pkix/certificate.ts';
import { encodeCrl, parseCrl } from '../protocol/pkix/crl.ts';
import { OID } from '../protocol/pkix/oids.ts';
import { answerOrError, authenticate, bootstrap, rid } from './support/mqtt.ts';
import { assertNothingIssued, assertRefusalAudited } from './support/refusals.ts';
import { startStack, type Stack } from './support/stack.ts';
import { workdir, type Workdir } from './support/openssl.ts';

const P256 = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const P384 = generateKeyPairSync('ec', { namedCurve: 'P-384' });
const RSA2048 = generateKeyPairSync('rsa', { modulusLength: 2048 });
const spkiOf = (k: KeyObject) => k.export({ type: 'spki', format: 'der' });
const P256_OID = '1.2.840.10045.3.1.7';

const INSTRUCTION: InstructionMessage = {
  requestId: 'r', subject: { commonName: 'dev-1' }, keyType: 'ec', keySize: 256,
  sans: { dns: ['dev-1.devices.example'], uri: ['urn:leafgate:device:dev-1'] }, validityDays: 30, csrDeadline: '2030-01-01T00:00:00Z',
};
const RSA_INSTRUCTION: InstructionMessage = { ...INSTRUCTION, keyType: 'rsa', keySize: 2048 };

const cn = (value: Buffer) => der.seq(der.setOf(der.seq(der.oid(OID.commonName), value)));
const ext = (oid: string, value: Buffer, critical?: Buffer) => der.seq(der.oid(oid), ...(critical ? [critical] : []), der.octetString(value));
const extReq = (...exts: Buffer[]) => der.seq(der.oid(OID.extensionRequest), der.setOf(der.seq(...exts)));
const san = (...names: Buffer[]) => der.seq(...names);
const dns = (s: string | Buffer) => der.tlv(0x82, typeof s === 'string' ? Buffer.from(s, 'latin1') : s);

/** A CSR from parts, self-signed with `privateKey` (sha256). */
function craft(privateKey: KeyObject, opts: { spki?: Buffer; subject?: Buffer; attributes?: Buffer[] } = {}): Buffer {
  const spki = opts.spki ?? spkiOf(createPublicKey(privateKey));
  const info = der.seq(der.integer(0), opts.subject ?? encodeName('dev-1'), spki, der.contextTag(0, Buffer.concat(opts.attributes ?? [])));
  const alg = privateKey.asymmetricKeyType === 'ec' ? der.seq(der.oid(OID.ecdsaWithSHA256)) : der.seq(der.oid(OID.sha256WithRSAEncryption), der.nullValue());
  return der.seq(info, alg, der.bitString(sign('sha256', info, privateKey)));
}

type Outcome = { code: ErrorCode; message: string } | { parsed: ParsedCsr };

/**
 * What the authority does with a CSR, without the wire: parse (both the synchronous parser
 * and the hot path's, which must agree), then the policy check. The NotAcceptedError ->
 * policy_violation, DerError -> bad_csr mapping is the onboarding's (shown end to end below).
 */
async function outcome(csr: Buffer, instruction = INSTRUCTION, policy = DEFAULT_POLICY): Promise<Outcome> {
  const classify = (err: unknown): Outcome => {
    if (err instanceof der.NotAcceptedError) return { code: 'policy_violation', message: err.message };
    if (err instanceof der.DerError) return { code: 'bad_csr', message: err.message };
    if (err instanceof LeafgateError) return { code: err.code, message: err.message };
    throw err;
  };
  let sync: Outcome;
  try {
    sync = { parsed: parseCsrDer(csr) };
  } catch (err) {
    sync = classify(err);
  }
  let result: Outcome;
  try {
    const parsed = await parseCsrDerAsync(csr);
    checkCsrAgainstInstruction(parsed, instruction, policy);
    result = { parsed };
  } catch (err) {
    result = classify(err);
  }
  if ('parsed' in sync && 'parsed' in result) {
    assert.ok(sync.parsed.spkiDer.equals(result.parsed.spkiDer), 'sync and hot-path parsers give the same canonical key');
  } else if (!('parsed' in sync)) {
    assert.ok(!('parsed' in result), `hot path accepted what the sync parser refused: ${sync.message}`);
  }
  return result;
}

async function refusedWith(csr: Buffer, code: ErrorCode, message: RegExp, instruction = INSTRUCTION): Promise<void> {
  const o = await outcome(csr, instruction);
  assert.ok(!('parsed' in o), `expected ${code} (${message}), the CSR was accepted`);
  assert.equal(o.code, code, o.message);
  assert.match(o.message, message);
}

async function accepted(csr: Buffer, instruction = INSTRUCTION): Promise<ParsedCsr> {
  const o = await outcome(csr, instruction);
  if (!('parsed' in o)) assert.fail(`expected acceptance, got ${o.code}: ${o.message}`);
  return o.parsed;
}

/** An issuing CA for the unit cases: the certificate is built the way the authority builds it. */
const CA_KEY = generateKeyPairSync('ec', { namedCurve: 'P-256' });
function issueAsAuthority(csr: ParsedCsr, commonName = 'dev-1'): Buffer {
  const spki = spkiOf(CA_KEY.publicKey);
  return encodeCertificate({
    serial: newSerial(), subjectDer: encodeName(commonName), spkiDer: csr.spkiDer, notBefore: new Date(Date.now() - 60_000), notAfter: new Date(Date.now() + 86_400_000),
    profile: { kind: 'device', keyType: csr.key.keyType }, issuer: { subjectDer: encodeName('unit CA'), keyId: keyIdentifier(spki), privateKey: CA_KEY.privateKey },
  });
}

function explicitP256(w: Workdir): KeyObject {
  w.openssl(['ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-param_enc', 'explicit', '-out', 'explicit.key']);
  return createPrivateKey(w.read('explicit.key'));
}

// ---- keys -------------------------------------------------------------------------------------

test('RSA: e=3 and other exponents outside the policy are policy_violation; 1024 bits too; 65537 with NULL parameters is signed as sent', async () => {
  const e3 = generateKeyPairSync('rsa', { modulusLength: 2048, publicExponent: 3 });
  await refusedWith(craft(e3.privateKey), 'policy_violation', /RSA public exponent must be 65537/, RSA_INSTRUCTION);
  const e17 = generateKeyPairSync('rsa', { modulusLength: 2048, publicExponent: 17 });
  await refusedWith(craft(e17.privateKey), 'policy_violation', /RSA public exponent must be 65537/, RSA_INSTRUCTION);
  const small = generateKeyPairSync('rsa', { modulusLength: 1024 });
  await refusedWith(craft(small.privateKey), 'policy_violation', /key must be RSA-2048, got RSA-1024/, RSA_INSTRUCTION);
  const three = generateKeyPairSync('rsa', { modulusLength: 3072 });
  await refusedWith(craft(three.privateKey), 'policy_violation', /key must be RSA-2048, got RSA-3072/, RSA_INSTRUCTION);
  const ok = await accepted(craft(RSA2048.privateKey), RSA_INSTRUCTION);
  assert.ok(ok.spkiDer.equals(spkiOf(RSA2048.publicKey)));
  assert.deepEqual(ok.key, { keyType: 'rsa', keySize: 2048, publicExponent: 65537 });
});

test('RSA without NULL parameters is accepted and re-encoded with NULL; other parameters, even moduli and bad exponents are bad_csr', async () => {
  const n = der.children(der.parseDer(der.decodeBitString(der.children(der.parseDer(spkiOf(RSA2048.publicKey)))[1])));
  const rsaSpki = (alg: Buffer, ...ints: Buffer[]) => der.seq(alg, der.bitString(der.seq(...ints)));
  const noNull = rsaSpki(der.seq(der.oid(OID.rsaEncryption)), n[0].raw, n[1].raw);
  const parsed = await accepted(craft(RSA2048.privateKey, { spki: noNull }), RSA_INSTRUCTION);
  assert.ok(parsed.spkiDer.equals(spkiOf(RSA2048.publicKey)), 'canonical: rsaEncryption with NULL');
  assert.ok(!parsed.spkiDer.equals(noNull));
  const cert = issueAsAuthority(parsed);
  assert.ok(spkiDerOf(cert).equals(spkiOf(RSA2048.publicKey)));

  await refusedWith(craft(RSA2048.privateKey, { spki: rsaSpki(der.seq(der.oid(OID.rsaEncryption), der.integer(0)), n[0].raw, n[1].raw) }), 'bad_csr', /parameters must be NULL/, RSA_INSTRUCTION);
  const even = Buffer.from(n[0].value);
  even[even.length - 1] &= 0xfe;
  await refusedWith(craft(RSA2048.privateKey, { spki: rsaSpki(der.seq(der.oid(OID.rsaEncryption), der.nullValue()), der.tlv(der.TAG.INTEGER, even), n[1].raw) }), 'bad_csr', /modulus is even/, RSA_INSTRUCTION);
  for (const e of [1, 65536]) {
    await refusedWith(craft(RSA2048.privateKey, { spki: rsaSpki(der.seq(der.oid(OID.rsaEncryption), der.nullValue()), n[0].raw, der.integer(e)) }), 'bad_csr', /public exponent is invalid/, RSA_INSTRUCTION);
  }
});

test('EC: explicit and implicit parameters and other curves are policy_violation; P-384 against a P-256 instruction too', async (t) => {
  const w = workdir(t);
  const explicit = explicitP256(w);
  const explicitSpki = spkiOf(createPublicKey(explicit));
  assert.equal(der.children(der.children(der.parseDer(explicitSpki))[0])[1].tag, der.TAG.SEQUENCE, 'openssl wrote explicit parameters');
  await refusedWith(craft(explicit, { spki: explicitSpki }), 'policy_violation', /explicit EC parameters are not accepted/);
  const point = der.decodeBitString(der.children(der.parseDer(spkiOf(P256.publicKey)))[1]);
  const implicit = der.seq(der.seq(der.oid(OID.ecPublicKey), der.nullValue()), der.bitString(point));
  await refusedWith(craft(P256.privateKey, { spki: implicit }), 'policy_violation', /implicitly specified EC parameters/);
  const k1 = generateKeyPairSync('ec', { namedCurve: 'secp256k1' });
  await refusedWith(craft(k1.privateKey), 'policy_violation', /EC curve 1\.3\.132\.0\.10 \(secp256k1\) is not accepted/);
  await refusedWith(craft(P384.privateKey), 'policy_violation', /key must be EC P-256, got EC P-384/);
  const ed = generateKeyPairSync('ed25519');
  const edInfo = der.seq(der.integer(0), encodeName('dev-1'), spkiOf(ed.publicKey), der.contextTag(0, Buffer.alloc(0)));
  await refusedWith(der.seq(edInfo, der.seq(der.oid('1.3.101.112')), der.bitString(sign(null, edInfo, ed.privateKey))), 'policy_violation', /key algorithm 1\.3\.101\.112 is not accepted/);
});

test('EC: a compressed point is decompressed (P-256 and P-384); the certificate carries the uncompressed canonical key', async () => {
  for (const [pair, instruction] of [[P256, INSTRUCTION], [P384, { ...INSTRUCTION, keySize: 384 }]] as const) {
    const canonical = spkiOf(pair.publicKey);
    const [alg, bits] = der.children(der.parseDer(canonical));
    const crv = pair === P256 ? 'prime256v1' : 'secp384r1';
    const compressed = ECDH.convertKey(der.decodeBitString(bits), crv, undefined, undefined, 'compressed') as Buffer;
    const spki = der.seq(alg.raw, der.bitString(compressed));
    const parsed = await accepted(craft(pair.privateKey, { spki }), instruction);
    assert.ok(parsed.spkiDer.equals(canonical), `${crv}: uncompressed and named curve`);
    assert.ok(parsed.publicKey.equals(pair.publicKey));
    const cert = new X509Certificate(issueAsAuthority(parsed));
    assert.ok(cert.publicKey.equals(pair.publicKey));
    assert.ok(spkiDerOf(cert.raw).equals(canonical));
  }
  // an uncompressed canonical key is used as sent (no copy)
  const csr = craft(P256.privateKey);
  const parsed = await accepted(csr);
  assert.equal(parsed.spkiDer.buffer, csr.buffer, 'the canonical SPKI is a view into the request');
});

test('EC: points off the curve, hybrid points and wrong lengths are bad_csr', async () => {
  const canonical = spkiOf(P256.publicKey);
  const [alg, bits] = der.children(der.parseDer(canonical));
  const point = Buffer.from(der.decodeBitString(bits));
  const offCurve = Buffer.from(point);
  offCurve[64] ^= 0x01;
  await refusedWith(craft(P256.privateKey, { spki: der.seq(alg.raw, der.bitString(offCurve)) }), 'bad_csr', /public key cannot be read/);
  // an x with no point on the curve: about half of all x values
  let x = Buffer.from(point.subarray(1, 33));
  for (;;) {
    x[31] ^= 0x01;
    x = Buffer.from(x);
    try {
      ECDH.convertKey(Buffer.concat([Buffer.from([2]), x]), 'prime256v1');
      x[30] = (x[30] + 1) & 0xff;
    } catch {
      break;
    }
  }
  await refusedWith(craft(P256.privateKey, { spki: der.seq(alg.raw, der.bitString(Buffer.concat([Buffer.from([2]), x]))) }), 'bad_csr', /not on the curve/);
  const hybrid = Buffer.from(point);
  hybrid[0] = 0x06 | (point[64] & 1);
  await refusedWith(craft(P256.privateKey, { spki: der.seq(alg.raw, der.bitString(hybrid)) }), 'bad_csr', /not an uncompressed or compressed P-256 point/);
  await refusedWith(craft(P256.privateKey, { spki: der.seq(der.seq(der.oid(OID.ecPublicKey), der.oid(P256_OID)), der.bitString(point.subarray(0, 64))) }), 'bad_csr', /not an uncompressed or compressed/);
});

// ---- subject ----------------------------------------------------------------------------------

test('subject strings: BMPString, TeletexString and UniversalString are policy_violation; bad PrintableString, IA5String and UTF-8 are bad_csr', async () => {
  await refusedWith(craft(P256.privateKey, { subject: cn(der.tlv(0x1e, Buffer.from('\0d\0e\0v\0-\x001', 'latin1'))) }), 'policy_violation', /string type 0x1e is not accepted/);
  await refusedWith(craft(P256.privateKey, { subject: cn(der.tlv(0x14, Buffer.from('dev-1'))) }), 'policy_violation', /string type 0x14 is not accepted/);
  await refusedWith(craft(P256.privateKey, { subject: cn(der.tlv(0x1c, Buffer.from('000000640000006500000076', 'hex'))) }), 'policy_violation', /string type 0x1c is not accepted/);
  for (const bad of ['dev_1', 'dev@1', 'dev*1', 'dév-1']) {
    await refusedWith(craft(P256.privateKey, { subject: cn(der.tlv(der.TAG.PRINTABLE_STRING, Buffer.from(bad, 'latin1'))) }), 'bad_csr', /PrintableString holds a character outside its set/);
  }
  await refusedWith(craft(P256.privateKey, { subject: cn(der.tlv(der.TAG.IA5_STRING, Buffer.from('dev-1\x80', 'latin1'))) }), 'bad_csr', /IA5String holds an octet above 0x7F/);
  for (const bytes of ['c0af', 'ff', 'eda080', 'f4908080', '64e282']) {
    await refusedWith(craft(P256.privateKey, { subject: cn(der.tlv(der.TAG.UTF8_STRING, Buffer.from(bytes, 'hex'))) }), 'bad_csr', /not valid UTF-8/);
  }
});

test('PrintableString and IA5String CNs are accepted, and the certificate subject is built: CN as UTF8String', async () => {
  for (const value of [der.printableString('dev-1'), der.ia5String('dev-1'), der.utf8String('dev-1')]) {
    const parsed = await accepted(craft(P256.privateKey, { subject: cn(value) }));
    assert.equal(parsed.commonName, 'dev-1');
    assert.ok(parsed.subjectDer.equals(encodeName('dev-1')));
    const cert = issueAsAuthority(parsed, INSTRUCTION.subject.commonName);
    assert.ok(subjectDerOf(cert).equals(encodeName('dev-1')), 'UTF8String CN, not the bytes of the request');
  }
});

// ---- extensions and SANs ----------------------------------------------------------------------

test('critical flag: BOOLEAN other than 0xFF, and an explicit FALSE (the DEFAULT), are bad_csr', async () => {
  const sanValue = san(dns('dev-1.devices.example'));
  for (const v of ['01', '7f', '80']) {
    await refusedWith(craft(P256.privateKey, { attributes: [extReq(ext(OID.subjectAltName, sanValue, der.tlv(der.TAG.BOOLEAN, Buffer.from(v, 'hex'))))] }), 'bad_csr', /BOOLEAN TRUE must be 0xFF/);
  }
  await refusedWith(craft(P256.privateKey, { attributes: [extReq(ext(OID.subjectAltName, sanValue, der.tlv(der.TAG.BOOLEAN, Buffer.from([0]))))] }), 'bad_csr', /DEFAULT and must be omitted/);
  await refusedWith(craft(P256.privateKey, { attributes: [extReq(ext(OID.subjectAltName, sanValue, der.tlv(der.TAG.BOOLEAN, Buffer.from([0xff, 0xff]))))] }), 'bad_csr', /BOOLEAN must be one octet/);
  const ok = await accepted(craft(P256.privateKey, { attributes: [extReq(ext(OID.subjectAltName, sanValue, der.bool(true)))] }));
  assert.deepEqual(ok.requestedExtensions, [{ oid: OID.subjectAltName, critical: true }]);
});

test('BIT STRING padding: non-zero unused bits, unused-bits > 7 and unused bits without content are bad_csr (keyUsage request, key, signature)', async () => {
  const ku = (content: Buffer) => [extReq(ext(OID.keyUsage, der.tlv(der.TAG.BIT_STRING, content)))];
  await refusedWith(craft(P256.privateKey, { attributes: ku(Buffer.from([7, 0x81])) }), 'bad_csr', /padding bits are not zero/);
  await refusedWith(craft(P256.privateKey, { attributes: ku(Buffer.from([8, 0x80])) }), 'bad_csr', /bad unused-bits count/);
  await refusedWith(craft(P256.privateKey, { attributes: ku(Buffer.from([3])) }), 'bad_csr', /unused bits and no content/);
  const ok = await accepted(craft(P256.privateKey, { attributes: ku(Buffer.from([7, 0x80])) }));
  assert.deepEqual(ok.requestedExtensions, [{ oid: OID.keyUsage, critical: false }]);
  // the key's BIT STRING must be octet-aligned
  const [alg, bits] = der.children(der.parseDer(spkiOf(P256.publicKey)));
  const p = Buffer.from(der.decodeBitString(bits));
  p[p.length - 1] &= 0xfe;
  await refusedWith(craft(P256.privateKey, { spki: der.seq(alg.raw, der.tlv(der.TAG.BIT_STRING, Buffer.concat([Buffer.from([1]), p]))) }), 'bad_csr', /must be octet-aligned/);
  p[p.length - 1] |= 0x01;
  await refusedWith(craft(P256.privateKey, { spki: der.seq(alg.raw, der.tlv(der.TAG.BIT_STRING, Buffer.concat([Buffer.from([1]), p]))) }), 'bad_csr', /padding bits are not zero/);
});

test('extensions requested twice, and extensionRequest twice, are bad_csr', async () => {
  const a = ext(OID.subjectAltName, san(dns('dev-1.devices.example')));
  const b = ext(OID.subjectAltName, san(dns('dev-1.devices.example')));
  await refusedWith(craft(P256.privateKey, { attributes: [extReq(a, b)] }), 'bad_csr', /extension 2\.5\.29\.17 is requested twice/);
  const k = ext(OID.keyUsage, der.bitString(Buffer.from([0x80]), 7));
  await refusedWith(craft(P256.privateKey, { attributes: [extReq(k, a, k)] }), 'bad_csr', /extension 2\.5\.29\.15 is requested twice/);
  await refusedWith(craft(P256.privateKey, { attributes: [extReq(a), extReq(k)] }), 'bad_csr', /extensionRequest must appear once/);
  await refusedWith(craft(P256.privateKey, { attributes: [der.seq(der.oid(OID.extensionRequest), der.setOf(der.seq(a), der.seq(k)))] }), 'bad_csr', /extensionRequest must appear once, with one value/);
});

test('SANs: a name requested twice is policy_violation (DNS case-insensitively); IA5 forms above 0x7F are bad_csr', async () => {
  const one = (...names: Buffer[]) => [extReq(ext(OID.subjectAltName, san(...names)))];
  await refusedWith(craft(P256.privateKey, { attributes: one(dns('dev-1.devices.example'), dns('dev-1.devices.example')) }), 'policy_violation', /SAN DNS dev-1\.devices\.example is requested twice/);
  await refusedWith(craft(P256.privateKey, { attributes: one(dns('dev-1.devices.example'), dns('DEV-1.Devices.Example')) }), 'policy_violation', /requested twice/);
  const uri = der.tlv(0x86, Buffer.from('urn:leafgate:device:dev-1'));
  await refusedWith(craft(P256.privateKey, { attributes: one(uri, dns('dev-1.devices.example'), uri) }), 'policy_violation', /SAN URI urn:leafgate:device:dev-1 is requested twice/);
  await refusedWith(craft(P256.privateKey, { attributes: one(dns(Buffer.from('dev-1.devices.exampl\xe9', 'latin1'))) }), 'bad_csr', /IA5String holds an octet above 0x7F/);
  const ok = await accepted(craft(P256.privateKey, { attributes: one(dns('dev-1.devices.example'), uri) }));
  assert.deepEqual(ok.sans, { dns: ['dev-1.devices.example'], uri: ['urn:leafgate:device:dev-1'], ip: [], email: [] });
});

test('nesting deeper than MAX_DEPTH is bad_csr, in an unused attribute and inside an extension value', async () => {
  let deep: Buffer = der.nullValue();
  for (let i = 0; i < der.MAX_DEPTH + 2; i++) deep = der.seq(deep);
  await refusedWith(craft(P256.privateKey, { attributes: [der.seq(der.oid('1.2.3.4'), der.setOf(deep))] }), 'bad_csr', /nesting too deep/);
  // a tolerated extension whose value is never read: its DER is still walked, with the depth carried over
  let inner: Buffer = der.nullValue();
  for (let i = 0; i < der.MAX_DEPTH - 3; i++) inner = der.seq(inner);
  await refusedWith(craft(P256.privateKey, { attributes: [extReq(ext(OID.subjectKeyIdentifier, inner))] }), 'bad_csr', /nesting too deep/);
  // shallow enough: the same shape a few levels less deep is fine
  let shallow: Buffer = der.octetString(Buffer.alloc(20, 1));
  for (let i = 0; i < 3; i++) shallow = der.seq(shallow);
  await accepted(craft(P256.privateKey, { attributes: [der.seq(der.oid('1.2.3.4'), der.setOf(shallow))] }));
});

test('non-DER content in parts the parser does not use (an unknown attribute) is bad_csr', async () => {
  const attr = (v: Buffer) => [der.seq(der.oid(OID.challengePassword), der.setOf(v))];
  await refusedWith(craft(P256.privateKey, { attributes: attr(der.tlv(der.TAG.PRINTABLE_STRING, Buffer.from('pass_word'))) }), 'bad_csr', /PrintableString/);
  await refusedWith(craft(P256.privateKey, { attributes: attr(der.tlv(der.TAG.UTF8_STRING, Buffer.from('ff', 'hex'))) }), 'bad_csr', /UTF-8/);
  await refusedWith(craft(P256.privateKey, { attributes: attr(der.tlv(der.TAG.BOOLEAN, Buffer.from([1]))) }), 'bad_csr', /BOOLEAN/);
  await refusedWith(craft(P256.privateKey, { attributes: attr(der.tlv(der.TAG.OCTET_STRING | 0x20, der.octetString(Buffer.from('x')))) }), 'bad_csr', /constructed flag/);
  await accepted(craft(P256.privateKey, { attributes: attr(der.utf8String('pass word')) }));
});

// ---- keyUsage by profile (RFC 5280 4.2.1.12) ---------------------------------------------------

test('keyUsage matches the extended key usage: RSA device (clientAuth) digitalSignature only; RSA gateway/server keep keyEncipherment; EC digitalSignature', (t) => {
  const w = workdir(t);
  const spki = spkiOf(CA_KEY.publicKey);
  const issuer = { subjectDer: encodeName('unit CA'), keyId: keyIdentifier(spki), privateKey: CA_KEY.privateKey };
  const cases = [
    ['device', 'rsa', 'Digital Signature', 'TLS Web Client Authentication'],
    ['gateway', 'rsa', 'Digital Signature, Key Encipherment', 'TLS Web Client Authentication, TLS Web Server Authentication'],
    ['server', 'rsa', 'Digital Signature, Key Encipherment', 'TLS Web Server Authentication'],
    ['device', 'ec', 'Digital Signature', 'TLS Web Client Authentication'],
    ['gateway', 'ec', 'Digital Signature', 'TLS Web Client Authentication, TLS Web Server Authentication'],
  ] as const;
  for (const [kind, keyType, ku, eku] of cases) {
    const subject = keyType === 'rsa' ? RSA2048 : P256;
    const cert = encodeCertificate({ serial: newSerial(), subjectDer: encodeName('x'), spkiDer: spkiOf(subject.publicKey), notBefore: new Date(Date.now() - 60_000), notAfter: new Date(Date.now() + 86_400_000), profile: { kind, keyType }, issuer });
    w.write('c.der', cert);
    const text = w.openssl(['x509', '-inform', 'DER', '-in', 'c.der', '-noout', '-ext', 'keyUsage,extendedKeyUsage']);
    assert.match(text, new RegExp(`Key Usage: critical\\n\\s+${ku}\\n`), `${kind} ${keyType}`);
    assert.match(text, new RegExp(`Extended Key Usage: \\n\\s+${eku}\\n`), `${kind} ${keyType}`);
  }
});

// ---- CRLs ---------------------------------------------------------------------------------------

test('parseCrl refuses an extension listed twice and a non-DER critical flag', () => {
  const spki = spkiOf(CA_KEY.publicKey);
  const issuerDer = encodeName('unit CA');
  const good = encodeCrl({ issuerDer, issuerKeyId: keyIdentifier(spki), issuerKey: CA_KEY.privateKey, crlNumber: 7n, thisUpdate: new Date(), nextUpdate: new Date(Date.now() + 86_400_000), entries: [] });
  assert.equal(parseCrl(good, CA_KEY.publicKey).crlNumber, 7n);
  // re-sign the TBS with its crlExtensions rewritten
  const resign = (exts: Buffer[]) => {
    const [tbs, alg] = der.children(der.parseDer(good));
    const fields = der.children(tbs).map((f) => f.raw);
    fields[fields.length - 1] = der.contextTag(0, der.seq(...exts));
    const newTbs = der.seq(...fields);
    return der.seq(newTbs, alg.raw, der.bitString(sign('sha256', newTbs, CA_KEY.privateKey)));
  };
  const num = (n: number, critical?: Buffer) => ext(OID.cRLNumber, der.integer(n), critical);
  assert.equal(parseCrl(resign([num(8)]), CA_KEY.publicKey).crlNumber, 8n);
  assert.throws(() => parseCrl(resign([num(8), num(9)]), CA_KEY.publicKey), /extension 2\.5\.29\.20 appears twice/);
  assert.throws(() => parseCrl(resign([num(8, der.tlv(der.TAG.BOOLEAN, Buffer.from([1])))]), CA_KEY.publicKey), /BOOLEAN TRUE must be 0xFF/);
  assert.throws(() => parseCrl(resign([num(8, der.tlv(der.TAG.BOOLEAN, Buffer.from([0])))]), CA_KEY.publicKey), /DEFAULT/);
});

// ---- the requestId of a payload too large to parse ---------------------------------------------

test('requestIdOfRaw: a bounded scan of both ends finds only a valid requestId member', () => {
  const big = 'A'.repeat(20_000);
  assert.equal(requestIdOfRaw(Buffer.from(JSON.stringify({ requestId: 'csr-1', csr: big }))), 'csr-1');
  assert.equal(requestIdOfRaw(Buffer.from(JSON.stringify({ csr: big, requestId: 'csr-2' }))), 'csr-2');
  assert.equal(requestIdOfRaw(`{ "requestId" :\n "csr-3", "csr": "${big}"}`), 'csr-3');
  assert.equal(requestIdOfRaw(Buffer.from(`{"csr":"${big}","x":"${big}","requestId":"csr-4"}`)), 'csr-4');
  // in the middle of a large payload: not scanned
  assert.equal(requestIdOfRaw(Buffer.from(`{"a":"${big}","requestId":"mid","b":"${big}"}`)), undefined);
  // invalid ids, escapes, a string value that merely reads "requestId", overlong ids
  assert.equal(requestIdOfRaw(Buffer.from(JSON.stringify({ requestId: 'bad id', csr: big }))), undefined);
  assert.equal(requestIdOfRaw(Buffer.from(`{"requestId":"a\\u0041","csr":"${big}"}`)), undefined);
  assert.equal(requestIdOfRaw(Buffer.from(`{"x":"requestId","csr":"${big}"}`)), undefined);
  assert.equal(requestIdOfRaw(Buffer.from(JSON.stringify({ requestId: 'x'.repeat(65), csr: big }))), undefined);
  assert.equal(requestIdOfRaw(Buffer.from(JSON.stringify({ requestId: 'x'.repeat(64), csr: big }))), 'x'.repeat(64));
  assert.equal(requestIdOfRaw(Buffer.from(JSON.stringify({ requestId: 7, csr: big }))), undefined);
});

// ---- end to end: the real stack ------------------------------------------------------------------

/** `openssl verify -x509_strict` of an issued certificate against the stack's root and its issuing CA. */
function strictVerify(w: Workdir, cert: CertMessage): void {
  w.write('root.pem', cert.chain[cert.chain.length - 1]);
  w.write('issuing-ca.pem', cert.chain.slice(0, -1).join(''));
  w.write('cert.pem', cert.certificate);
  const r = w.tryOpenssl(['verify', '-x509_strict', '-purpose', 'sslclient', '-CAfile', 'root.pem', '-untrusted', 'issuing-ca.pem', 'cert.pem']);
  assert.equal(r.status, 0, `openssl verify -x509_strict: ${r.stdout}${r.stderr}`);
  assert.match(r.stdout, /cert\.pem: OK/);
}

/** Authenticates `id` and sends `csr(instruction)`; returns the request id and the instruction. */
async function onboardWith(t: Parameters<typeof bootstrap>[0], stack: Stack, id: string, makeCsr: (i: InstructionMessage) => string, keyPreference?: unknown) {
  const dev = await bootstrap(t, stack, id);
  const instruction = await authenticate(dev, stack.credential(id, 'pki-signature'), keyPreference ? { keyPreference } : {});
  const requestId = rid('csr');
  await dev.send('csr', { requestId, csr: makeCsr(instruction) });
  return { dev, requestId, instruction };
}

const pem = (d: Buffer) => pkix.toPem(d, 'CERTIFICATE REQUEST');

test('end to end: refusals reach down/error with their code and requestId, and are audited; nothing is issued', async (t) => {
  const stack = await startStack(t);
  const e3 = generateKeyPairSync('rsa', { modulusLength: 2048, publicExponent: 3 });
  const w = workdir(t);
  const explicit = explicitP256(w);
  const cases: Array<[string, ErrorCode, (i: InstructionMessage) => Buffer, unknown?]> = [
    ['e2e-rsa-e3', 'policy_violation', () => craft(e3.privateKey, { subject: encodeName('e2e-rsa-e3') }), [{ keyType: 'rsa', keySize: 2048 }]],
    ['e2e-explicit', 'policy_violation', () => craft(explicit, { subject: encodeName('e2e-explicit'), spki: spkiOf(createPublicKey(explicit)) })],
    ['e2e-bmp', 'policy_violation', () => craft(P256.privateKey, { subject: cn(der.tlv(0x1e, Buffer.from('e2e-bmp', 'utf16le').swap16())) })],
    ['e2e-dupsan', 'policy_violation', (i) => craft(P256.privateKey, { subject: encodeName('e2e-dupsan'), attributes: [extReq(ext(OID.subjectAltName, san(dns(i.sans.dns[0] ?? 'a.example'), dns(i.sans.dns[0] ?? 'a.example'))))] })],
    ['e2e-bool', 'bad_csr', () => craft(P256.privateKey, { subject: encodeName('e2e-bool'), attributes: [extReq(ext(OID.keyUsage, der.bitString(Buffer.from([0x80]), 7), der.tlv(der.TAG.BOOLEAN, Buffer.from([1]))))] })],
    ['e2e-printable', 'bad_csr', () => craft(P256.privateKey, { subject: cn(der.tlv(der.TAG.PRINTABLE_STRING, Buffer.from('e2e_printable'))) })],
    ['e2e-dupext', 'bad_csr', () => craft(P256.privateKey, { subject: encodeName('e2e-dupext'), attributes: [extReq(ext(OID.keyUsage, der.bitString(Buffer.from([0x80]), 7)), ext(OID.keyUsage, der.bitString(Buffer.from([0x80]), 7)))] })],
  ];
  for (const [id, code, make, pref] of cases) {
    const { dev, requestId } = await onboardWith(t, stack, id, (i) => pem(make(i)), pref);
    const e = await dev.expectError(code, requestId);
    assert.equal(e.requestId, requestId, id);
    await assertRefusalAudited(stack, id, code, { requestId, action: 'csr' });
    await assertNothingIssued(stack, id);
  }
});

test('end to end: a CSR too large for the payload cap gets payload_too_large with its requestId; a PEM over its cap bad_request with its requestId', async (t) => {
  const stack = await startStack(t);
  const id = 'e2e-large';
  const dev = await bootstrap(t, stack, id);
  await authenticate(dev, stack.credential(id, 'pki-signature'));
  const tooLarge = rid('csr');
  const body = `-----BEGIN CERTIFICATE REQUEST-----\n${'QUFB'.repeat(5000)}\n-----END CERTIFICATE REQUEST-----\n`;
  await dev.send('csr', { requestId: tooLarge, csr: body });
  const e = await dev.expectError('payload_too_large', tooLarge);
  assert.equal(e.requestId, tooLarge);
  const pemTooLong = rid('csr');
  await dev.send('csr', { requestId: pemTooLong, csr: `-----BEGIN CERTIFICATE REQUEST-----\n${'QUFB'.repeat(3200)}\n-----END CERTIFICATE REQUEST-----\n` });
  const e2 = await dev.expectError('bad_request', pemTooLong);
  assert.match(e2.message, /csr exceeds/);
  await assertNothingIssued(stack, id);
});

test('end to end: EC, RSA, compressed-point, RSA-without-NULL and PrintableString-CN CSRs are issued with the canonical key and a built subject, and pass openssl verify -x509_strict', async (t) => {
  const stack = await startStack(t);
  const w = workdir(t);
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const ec384 = generateKeyPairSync('ec', { namedCurve: 'P-384' });
  const compressedSpki = (k: KeyObject, crv: string) => {
    const [alg, bits] = der.children(der.parseDer(spkiOf(k)));
    return der.seq(alg.raw, der.bitString(ECDH.convertKey(der.decodeBitString(bits), crv, undefined, undefined, 'compressed') as Buffer));
  };
  const noNullSpki = (k: KeyObject) => {
    const [, bits] = der.children(der.parseDer(spkiOf(k)));
    return der.seq(der.seq(der.oid(OID.rsaEncryption)), bits.raw);
  };
  const withSans = (i: InstructionMessage) => (i.sans.dns.length || i.sans.uri.length ? [extReq(ext(OID.subjectAltName, pkix.encodeSan(i.sans)))] : []);
  const cases: Array<[string, { privateKey: KeyObject; publicKey: KeyObject }, (i: InstructionMessage) => Buffer, unknown?]> = [
    ['e2e-ec', ec, (i) => craft(ec.privateKey, { subject: encodeName(i.subject.commonName), attributes: withSans(i) })],
    ['e2e-rsa', rsa, (i) => craft(rsa.privateKey, { subject: encodeName(i.subject.commonName), attributes: withSans(i) }), [{ keyType: 'rsa', keySize: 2048 }]],
    ['e2e-compressed', ec384, (i) => craft(ec384.privateKey, { subject: encodeName(i.subject.commonName), spki: compressedSpki(ec384.publicKey, 'secp384r1'), attributes: withSans(i) }), [{ keyType: 'ec', keySize: 384 }]],
    ['e2e-rsa-nonull', rsa, (i) => craft(rsa.privateKey, { subject: encodeName(i.subject.commonName), spki: noNullSpki(rsa.publicKey), attributes: withSans(i) }), [{ keyType: 'rsa', keySize: 2048 }]],
    ['e2e-printable-cn', ec, (i) => craft(ec.privateKey, { subject: cn(der.printableString(i.subject.commonName)), attributes: withSans(i) })],
  ];
  for (const [id, pair, make, pref] of cases) {
    const { dev, requestId, instruction } = await onboardWith(t, stack, id, (i) => pem(make(i)), pref);
    const cert = await answerOrError<CertMessage>(dev, 'cert', requestId);
    const x = new X509Certificate(cert.certificate);
    assert.ok(spkiDerOf(x.raw).equals(spkiOf(pair.publicKey)), `${id}: the canonical key`);
    assert.ok(subjectDerOf(x.raw).equals(encodeName(instruction.subject.commonName)), `${id}: CN as UTF8String, built`);
    assert.ok(x.checkPrivateKey(pair.privateKey), id);
    strictVerify(w, cert);
    if (pair === rsa) {
      w.write('cert.pem', cert.certificate);
      assert.match(w.openssl(['x509', '-in', 'cert.pem', '-noout', '-ext', 'keyUsage']), /critical\n\s+Digital Signature\n/, `${id}: RSA device keyUsage`);
    }
  }
});

test('gateway enrollment and Sub-CA: canonical key and built subject; a BMPString CN is policy_violation, a bad UTF-8 CN bad_csr', async (t) => {
  const stack = await startStack(t);
  const enrollment = stack.authority.enrollment;
  const gw = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const [alg, bits] = der.children(der.parseDer(spkiOf(gw.publicKey)));
  const compressed = der.seq(alg.raw, der.bitString(ECDH.convertKey(der.decodeBitString(bits), 'prime256v1', undefined, undefined, 'compressed') as Buffer));

  const bmp = await enrollment.createToken('gw-two');
  await assert.rejects(enrollment.enroll(bmp, pem(craft(gw.privateKey, { subject: cn(der.tlv(0x1e, Buffer.from('gw-two', 'utf16le').swap16())) }))), (err: unknown) => err instanceof LeafgateError && err.code === 'policy_violation');
  await assert.rejects(enrollment.enroll(bmp, pem(craft(gw.privateKey, { subject: cn(der.tlv(der.TAG.UTF8_STRING, Buffer.from('c0', 'hex'))) }))), (err: unknown) => err instanceof LeafgateError && err.code === 'bad_csr');
  const e3 = generateKeyPairSync('rsa', { modulusLength: 2048, publicExponent: 3 });
  await assert.rejects(enrollment.enroll(bmp, pem(craft(e3.privateKey, { subject: encodeName('gw-two') }))), (err: unknown) => err instanceof LeafgateError && err.code === 'policy_violation' && /exponent/.test(err.message));
  // the refusals did not burn the token; a PrintableString CN with a compressed key is issued canonically
  const issued = await enrollment.enroll(bmp, pem(craft(gw.privateKey, { subject: cn(der.printableString('gw-two')), spki: compressed })));
  const cert = new X509Certificate(issued.certificate);
  assert.ok(spkiDerOf(cert.raw).equals(spkiOf(gw.publicKey)));
  assert.ok(subjectDerOf(cert.raw).equals(encodeName('gw-two')));

  const sub = generateKeyPairSync('ec', { namedCurve: 'P-384' });
  const [salg, sbits] = der.children(der.parseDer(spkiOf(sub.publicKey)));
  const subCompressed = der.seq(salg.raw, der.bitString(ECDH.convertKey(der.decodeBitString(sbits), 'secp384r1', undefined, undefined, 'compressed') as Buffer));
  const subCa = await enrollment.signSubCa('gw-two', pem(craft(sub.privateKey, { subject: cn(der.ia5String('gw-two Edge CA')), spki: subCompressed })));
  const subCert = new X509Certificate(subCa.certificate);
  assert.ok(spkiDerOf(subCert.raw).equals(spkiOf(sub.publicKey)));
  assert.ok(subjectDerOf(subCert.raw).equals(encodeName('gw-two Edge CA')));
});

test('signature AlgorithmIdentifier of an RSA request: NULL or absent parameters, nothing else; an empty GeneralNames is bad_csr', async () => {
  const info = der.seq(der.integer(0), encodeName('dev-1'), spkiOf(RSA2048.publicKey), der.contextTag(0, Buffer.alloc(0)));
  const sig = der.bitString(sign('sha256', info, RSA2048.privateKey));
  await accepted(der.seq(info, der.seq(der.oid(OID.sha256WithRSAEncryption)), sig), RSA_INSTRUCTION);
  await refusedWith(der.seq(info, der.seq(der.oid(OID.sha256WithRSAEncryption), der.integer(0)), sig), 'bad_csr', /RSA signature algorithm parameters must be NULL/, RSA_INSTRUCTION);
  await refusedWith(craft(P256.privateKey, { attributes: [extReq(ext(OID.subjectAltName, der.seq()))] }), 'bad_csr', /GeneralNames: empty SEQUENCE/);
});
