/**
 * Seeded mutation fuzzing of the CSR parser that the issuance hot path uses (parseCsrDerAsync:
 * our own SubjectPublicKeyInfo reading, cheap key import, verify on the threadpool) and of the
 * synchronous parseCsrDer, against `openssl req -verify -inform DER`.
 *
 * Mutating a signed request almost always just breaks its signature, on both sides, which
 * says nothing about the parser. So most cases here mutate CertificationRequestInfo and then
 * sign the mutated bytes again with the request's own key: OpenSSL's verdict then depends on
 * whether it can parse the structure and read the key, which is what is compared. Mutations:
 * bit flips (half of them inside the SPKI), truncation, and length-octet changes of every
 * element header (+-1, non-minimal long forms, indefinite, past the end). A second set
 * changes the length octets of the unsigned envelope without re-signing.
 *
 * Where the verdicts differ, ours must be the refusal: we never accept what openssl refuses.
 * Both parsers must agree with each other, and every refusal is a DerError.
 */
import assert from 'node:assert/strict';
import { createPrivateKey, createPublicKey, ECDH, generateKeyPairSync, sign, type KeyObject } from 'node:crypto';
import { test } from 'node:test';
import * as der from '../protocol/pkix/der.ts';
import { DerError } from '../protocol/pkix/der.ts';
import { buildCsr, parseCsrDer, parseCsrDerAsync, type ParsedCsr } from '../protocol/pkix/csr.ts';
import { readSpki } from '../protocol/pkix/keys.ts';
import { OID, SIGNATURE_ALGORITHMS } from '../protocol/pkix/oids.ts';
import { fromPem } from '../protocol/pkix/pem.ts';
import { prng, workdir, type Workdir } from './support/openssl.ts';

interface Base {
  name: string;
  csr: Buffer;
  privateKey: KeyObject;
}

function opensslAccepts(w: Workdir, csr: Buffer): boolean {
  w.write('fuzz.der', csr);
  const r = w.tryOpenssl(['req', '-inform', 'DER', '-in', 'fuzz.der', '-verify', '-noout']);
  // openssl 3.0 exits 0 on "self-signature verify failure": the stderr line decides
  return r.status === 0 && /verify OK/.test(r.stderr);
}

type Verdict = { accepted: true; parsed: ParsedCsr } | { accepted: false; error: unknown };

async function verdicts(csr: Buffer): Promise<{ sync: Verdict; async: Verdict }> {
  let sync: Verdict;
  try {
    sync = { accepted: true, parsed: parseCsrDer(csr) };
  } catch (error) {
    sync = { accepted: false, error };
  }
  let async: Verdict;
  try {
    async = { accepted: true, parsed: await parseCsrDerAsync(csr) };
  } catch (error) {
    async = { accepted: false, error };
  }
  return { sync, async };
}

/** What a caller reads from a parsed request (the KeyObject compared by its SPKI export). */
const summary = (p: ParsedCsr) => ({
  subject: p.subject, key: p.key, sans: p.sans, requestedExtensions: p.requestedExtensions, signatureAlgorithm: p.signatureAlgorithm,
  spki: p.spkiDer.toString('hex'), imported: p.publicKey.export({ type: 'spki', format: 'der' }).toString('hex'),
});

/** Every element header in `buf` (recursing into constructed elements and into BIT/OCTET STRINGs holding DER). */
function headers(buf: Buffer, base = 0, out: Array<{ at: number; lenAt: number; lenOctets: number; len: number }> = []): typeof out {
  for (let off = 0; off < buf.length; ) {
    const { node, next } = der.readElement(buf, off);
    const lenOctets = node.raw.length - node.value.length - 1;
    out.push({ at: base + off, lenAt: base + off + 1, lenOctets, len: node.value.length });
    const contentAt = base + off + 1 + lenOctets;
    if (node.constructed) headers(node.value, contentAt, out);
    else if (node.tag === der.TAG.BIT_STRING || node.tag === der.TAG.OCTET_STRING) {
      const skip = node.tag === der.TAG.BIT_STRING ? 1 : 0;
      try {
        const inner = node.value.subarray(skip);
        der.parseDer(inner);
        headers(inner, contentAt + skip, out);
      } catch {
        /* not DER inside */
      }
    }
    off = next;
  }
  return out;
}

function lengthOctets(len: number): Buffer {
  if (len < 0x80) return Buffer.from([len]);
  const bytes: number[] = [];
  for (let n = len; n > 0; n = Math.floor(n / 256)) bytes.unshift(n & 0xff);
  return Buffer.from([0x80 | bytes.length, ...bytes]);
}

/** Replaces the length octets of the header at `h` with `replacement`. */
const spliceLength = (buf: Buffer, h: { lenAt: number; lenOctets: number }, replacement: Buffer) =>
  Buffer.concat([buf.subarray(0, h.lenAt), replacement, buf.subarray(h.lenAt + h.lenOctets)]);

type Pick = (n: number) => number;

/** A changed length for one header: off by one, non-minimal, indefinite, huge, zero. */
function mutateLength(buf: Buffer, pick: Pick): { m: Buffer; what: string } {
  const all = headers(buf);
  const h = all[pick(all.length)];
  const choices: Array<[string, Buffer]> = [
    ['+1', lengthOctets(h.len + 1)],
    ['-1', lengthOctets(Math.max(0, h.len - 1))],
    ['+0x80', lengthOctets(h.len + 0x80)],
    ['zero', Buffer.from([0])],
    ['indefinite', Buffer.from([0x80])],
    ['non-minimal 0x81', h.len < 0x100 ? Buffer.from([0x81, h.len]) : Buffer.from([0x83, 0, h.len >> 8, h.len & 0xff])],
    ['non-minimal 0x82 00', Buffer.from([0x82, (h.len >> 8) & 0xff, h.len & 0xff])],
    ['5 length octets', Buffer.from([0x85, 0, 0, 0, (h.len >> 8) & 0xff, h.len & 0xff])],
    ['0xff', Buffer.from([0xff])],
    ['random octet', Buffer.from([pick(256)])],
  ];
  const [what, replacement] = choices[pick(choices.length)];
  return { m: spliceLength(buf, h, replacement), what: `length ${what} of the header at ${h.at} (was ${h.len})` };
}

/** CertificationRequest around `info` (raw bytes, not necessarily DER), signed again with the base key. */
function resign(base: Base, info: Buffer): Buffer {
  const [, alg] = der.children(der.parseDer(base.csr));
  const hash = SIGNATURE_ALGORITHMS[der.decodeOid(der.children(alg)[0])].hash;
  const signature = sign(hash, info, base.privateKey);
  return der.tlv(der.TAG.SEQUENCE, Buffer.concat([info, alg.raw, der.bitString(signature)]));
}

function bases(w: Workdir): Base[] {
  const out: Base[] = [];
  const sans = { dns: ['dev-1.devices.example'], uri: ['urn:leafgate:device:dev-1'], ip: ['10.0.0.1'] };
  for (const [name, pair] of [
    ['leafgate EC P-256 with SANs', generateKeyPairSync('ec', { namedCurve: 'P-256' })],
    ['leafgate EC P-521 with SANs', generateKeyPairSync('ec', { namedCurve: 'P-521' })],
  ] as const) {
    out.push({ name, csr: fromPem(buildCsr({ commonName: 'dev-1', sans, ...pair }), 'CERTIFICATE REQUEST'), privateKey: pair.privateKey });
  }
  // openssl-made: RSA-2048 with a challengePassword and SANs, EC P-384
  for (const [name, pair] of [
    ['openssl RSA-2048 with challengePassword and SANs', generateKeyPairSync('rsa', { modulusLength: 2048 })],
    ['openssl EC P-384', generateKeyPairSync('ec', { namedCurve: 'P-384' })],
  ] as const) {
    const file = name.includes('RSA') ? 'rsa' : 'p384';
    w.write(`${file}.key`, pair.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string);
    const cnf = ['[req]', 'prompt = no', 'distinguished_name = dn', 'attributes = attrs', '[dn]', 'CN = dev-1', 'O = Acme', '[attrs]', 'challengePassword = not-a-secret-1234'];
    w.write(`${file}.cnf`, cnf.join('\n') + '\n');
    w.openssl(['req', '-new', '-config', `${file}.cnf`, '-key', `${file}.key`, '-addext', 'subjectAltName=DNS:a.example,IP:10.0.0.1', '-outform', 'DER', '-out', `${file}.der`]);
    out.push({ name, csr: w.read(`${file}.der`), privateKey: pair.privateKey });
  }
  return out;
}

test('fuzz: re-signed and length-mutated CSRs: never accepted when openssl refuses; sync and threadpool parsers agree', async (t) => {
  const started = Date.now();
  const w = workdir(t);
  const rand = prng(0x5ca1ab1e);
  const pick: Pick = (n) => Math.floor(rand() * n);
  const counts = { total: 0, bothAccept: 0, bothReject: 0, onlyOpensslAccepts: 0, ourFalseAccepts: 0, duplicates: 0 };
  const falseAccepts: string[] = [];
  const nonDerErrors: string[] = [];
  const disagreements: string[] = [];
  const onlyOpenssl = new Map<string, number>();

  for (const base of bases(w)) {
    const { sync: ok } = await verdicts(base.csr);
    assert.equal(ok.accepted, true, `${base.name} parses`);
    assert.equal(opensslAccepts(w, base.csr), true, `${base.name} verifies with openssl`);
    const outer = der.parseDer(base.csr);
    const [info] = der.children(outer);
    const infoFields = der.children(info);
    const infoAt = info.raw.byteOffset - base.csr.byteOffset;
    const spkiStart = infoFields[2].raw.byteOffset - info.raw.byteOffset;
    const spkiEnd = spkiStart + infoFields[2].raw.length;
    const seen = new Set<string>();
    for (let i = 0; i < 110; i++) {
      let m: Buffer;
      let what: string;
      const kind = i % 11;
      if (kind <= 3) {
        // bit flip in the re-signed info; half of them in the SubjectPublicKeyInfo
        const mi = Buffer.from(info.raw);
        const pos = kind <= 1 ? spkiStart + pick(spkiEnd - spkiStart) : pick(mi.length);
        const bit = pick(8);
        mi[pos] ^= 1 << bit;
        m = resign(base, mi);
        what = `re-signed, info bit ${bit} flipped at ${pos}${pos >= spkiStart && pos < spkiEnd ? ' (SPKI)' : ''}`;
      } else if (kind <= 7) {
        // length octets of an element inside the info, re-signed
        const r = mutateLength(info.raw, pick);
        m = resign(base, r.m);
        what = `re-signed, info ${r.what}`;
      } else if (kind === 8) {
        const cut = 1 + pick(info.raw.length - 1);
        m = resign(base, info.raw.subarray(0, cut));
        what = `re-signed, info truncated to ${cut}`;
      } else if (kind === 9) {
        // length octets anywhere in the request, not re-signed (the envelope is unsigned)
        const r = mutateLength(base.csr, pick);
        m = r.m;
        what = r.what;
      } else {
        const cut = pick(base.csr.length);
        m = base.csr.subarray(0, cut);
        what = `truncated to ${cut}`;
      }
      const key = m.toString('hex');
      if (seen.has(key) || m.equals(base.csr)) {
        counts.duplicates++;
        continue;
      }
      seen.add(key);
      counts.total++;
      const ours = await verdicts(m);
      const theirs = opensslAccepts(w, m);
      const label = `${base.name}: ${what}`;
      for (const v of [ours.sync, ours.async]) if (!v.accepted && !(v.error instanceof DerError)) nonDerErrors.push(`${label}: ${String(v.error)}`);
      if (ours.sync.accepted !== ours.async.accepted) {
        disagreements.push(`${label}: sync ${ours.sync.accepted ? 'accepts' : 'refuses'}, threadpool ${ours.async.accepted ? 'accepts' : 'refuses'}`);
      } else if (ours.sync.accepted && ours.async.accepted) {
        assert.deepEqual(summary(ours.async.parsed), summary(ours.sync.parsed), `${label}: both parsers read the same request`);
      } else if (!ours.sync.accepted && !ours.async.accepted && (ours.sync.error as Error).message !== (ours.async.error as Error).message) {
        disagreements.push(`${label}: different reasons: ${(ours.sync.error as Error).message} / ${(ours.async.error as Error).message}`);
      }
      const accepted = ours.sync.accepted || ours.async.accepted;
      if (accepted && theirs) counts.bothAccept++;
      else if (!accepted && !theirs) counts.bothReject++;
      else if (accepted) {
        counts.ourFalseAccepts++;
        falseAccepts.push(label);
      } else {
        counts.onlyOpensslAccepts++;
        const reason = (ours.sync.accepted ? ours.async : ours.sync) as { error: Error };
        onlyOpenssl.set(reason.error.message, (onlyOpenssl.get(reason.error.message) ?? 0) + 1);
      }
    }
  }
  t.diagnostic(`${JSON.stringify(counts)}, ${Date.now() - started} ms`);
  for (const [reason, n] of onlyOpenssl) t.diagnostic(`openssl accepts, we refuse (${n}x): ${reason}`);
  assert.ok(counts.total >= 400, `enough distinct mutations (${counts.total})`);
  assert.ok(counts.bothAccept > 0 && counts.bothReject > 0, 're-signing reaches the parser: some mutations stay acceptable to both');
  assert.deepEqual(nonDerErrors, [], 'every refusal is a DerError');
  assert.deepEqual(disagreements, [], 'the threadpool parser and the synchronous one give the same verdict');
  assert.deepEqual(falseAccepts, [], 'we accepted requests that openssl refuses');
});

test('SubjectPublicKeyInfo variants: the fast import routes and the generic one never accept what openssl refuses', async (t) => {
  const w = workdir(t);
  const p256 = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const k1 = generateKeyPairSync('ec', { namedCurve: 'secp256k1' });
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const spkiOf = (k: KeyObject) => k.export({ type: 'spki', format: 'der' });
  const point = spkiOf(p256.publicKey).subarray(-65);
  const compressed = ECDH.convertKey(point, 'prime256v1', undefined, undefined, 'compressed') as Buffer;
  const hybrid = ECDH.convertKey(point, 'prime256v1', undefined, undefined, 'hybrid') as Buffer;
  const ecAlg = (...params: Buffer[]) => der.seq(der.oid(OID.ecPublicKey), ...params);
  const P256_OID = der.oid('1.2.840.10045.3.1.7');
  const ecSpki = (alg: Buffer, bits: Buffer, unused = 0) => der.seq(alg, der.bitString(bits, unused));
  const [rsaN, rsaE] = der.children(der.parseDer(der.decodeBitString(der.children(der.parseDer(spkiOf(rsa.publicKey)))[1])));
  const rsaSpki = (alg: Buffer, n: Buffer, e: Buffer = rsaE.raw) => der.seq(alg, der.bitString(der.seq(n, e)));
  const rsaAlg = der.seq(der.oid(OID.rsaEncryption), der.nullValue());
  w.openssl(['ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-param_enc', 'explicit', '-out', 'explicit.key']);
  const explicit = createPrivateKey(w.read('explicit.key'));

  const cases: Array<[string, Buffer, KeyObject]> = [
    ['EC P-256 as exported', spkiOf(p256.publicKey), p256.privateKey],
    ['EC P-256 compressed point', ecSpki(ecAlg(P256_OID), compressed), p256.privateKey],
    ['EC P-256 hybrid point', ecSpki(ecAlg(P256_OID), hybrid), p256.privateKey],
    ['EC P-256 with NULL curve parameters', ecSpki(ecAlg(der.nullValue()), point), p256.privateKey],
    ['EC P-256 without curve parameters', ecSpki(ecAlg(), point), p256.privateKey],
    ['EC P-256 with an extra AlgorithmIdentifier field', ecSpki(ecAlg(P256_OID, der.nullValue()), point), p256.privateKey],
    ['EC P-256 point under the P-384 OID', ecSpki(ecAlg(der.oid('1.3.132.0.34')), point), p256.privateKey],
    ['EC P-256 with 1 unused bit', ecSpki(ecAlg(P256_OID), point, 1), p256.privateKey],
    ['EC P-256 point with a trailing octet', ecSpki(ecAlg(P256_OID), Buffer.concat([point, Buffer.from([0])])), p256.privateKey],
    ['EC P-256 point without its 04 prefix', ecSpki(ecAlg(P256_OID), point.subarray(1)), p256.privateKey],
    ['EC secp256k1', spkiOf(k1.publicKey), k1.privateKey],
    ['EC P-256 explicit parameters (openssl -param_enc explicit)', spkiOf(createPublicKey(explicit)), explicit],
    ['RSA as exported', spkiOf(rsa.publicKey), rsa.privateKey],
    ['RSA without NULL parameters', rsaSpki(der.seq(der.oid(OID.rsaEncryption)), rsaN.raw), rsa.privateKey],
    ['RSA with a non-minimal modulus', rsaSpki(rsaAlg, der.tlv(der.TAG.INTEGER, Buffer.concat([Buffer.from([0]), rsaN.value]))), rsa.privateKey],
    ['RSA with a negative modulus', rsaSpki(rsaAlg, der.tlv(der.TAG.INTEGER, rsaN.value.subarray(1))), rsa.privateKey],
    ['RSA with a zero exponent', rsaSpki(rsaAlg, rsaN.raw, der.integer(0)), rsa.privateKey],
    ['RSA with an extra INTEGER', der.seq(rsaAlg, der.bitString(der.seq(rsaN.raw, rsaE.raw, der.integer(1)))), rsa.privateKey],
  ];
  const falseAccepts: string[] = [];
  for (const [name, spki, privateKey] of cases) {
    const info = der.seq(der.integer(0), der.seq(der.setOf(der.seq(der.oid(OID.commonName), der.utf8String('dev-1')))), spki, der.contextTag(0, Buffer.alloc(0)));
    const isEc = privateKey.asymmetricKeyType === 'ec';
    const alg = isEc ? der.seq(der.oid(OID.ecdsaWithSHA256)) : der.seq(der.oid(OID.sha256WithRSAEncryption), der.nullValue());
    const csr = der.seq(info, alg, der.bitString(sign('sha256', info, privateKey)));
    const ours = await verdicts(csr);
    const theirs = opensslAccepts(w, csr);
    const route = readSpki(spki).route;
    assert.equal(ours.sync.accepted, ours.async.accepted, `${name}: sync and threadpool agree`);
    if (ours.sync.accepted && ours.async.accepted) {
      assert.deepEqual(summary(ours.async.parsed), summary(ours.sync.parsed), name);
      // the imported key is the key OpenSSL's own SPKI decoder reads
      assert.ok(ours.sync.parsed.publicKey.equals(createPublicKey({ key: spki, format: 'der', type: 'spki' })), `${name}: same key as createPublicKey`);
    }
    const verdict = ours.sync.accepted ? (ours.sync.parsed.key.keySize ? `accepted as ${JSON.stringify(ours.sync.parsed.key)}` : 'accepted, size unknown (policy refuses)') : `refused: ${(ours.sync as { error: Error }).error.message}`;
    t.diagnostic(`${name}: route ${route}, openssl ${theirs ? 'accepts' : 'refuses'}, we ${verdict}`);
    if (ours.sync.accepted && !theirs) falseAccepts.push(name);
  }
  assert.equal(readSpki(spkiOf(p256.publicKey)).route, 'ec');
  assert.equal(readSpki(spkiOf(rsa.publicKey)).route, 'rsa');
  assert.deepEqual(falseAccepts, [], 'we accepted keys that openssl refuses');
});
