/**
 * PKCS#10 certification requests (RFC 2986): built by devices, parsed and verified by the
 * authority. Verification uses node:crypto on the exact DER of CertificationRequestInfo.
 */
import { sign, verify, type KeyObject } from 'node:crypto';
import { isIPv4, isIPv6 } from 'node:net';
import * as der from './der.ts';
import { readExtensions } from './extensions.ts';
import { OID, SIGNATURE_ALGORITHMS } from './oids.ts';
import { fromPem, toPem } from './pem.ts';
import { canonicalKey, importSpki, importSpkiFast, signatureAlgorithmFor, spkiDerOfKey, type CanonicalKey, type KeyDescription } from './keys.ts';
import { ecVerifyPool, type EcVerdict, type EcVerifyJob } from './verify-pool.ts';

export interface SubjectAltNames {
  dns: string[];
  uri: string[];
  ip: string[];
  email: string[];
}

export interface CsrBuildOptions {
  commonName: string;
  sans?: { dns?: string[]; uri?: string[]; ip?: string[] };
  privateKey: KeyObject;
  publicKey: KeyObject;
}

const CN_OID_DER = der.oid(OID.commonName);

/** A Name of one RDN holding the CN as a UTF8String: the only subject leafgate issues. */
export function encodeName(commonName: string): Buffer {
  return der.seq(der.tlv(der.TAG.SET, der.seq(CN_OID_DER, der.utf8String(commonName))));
}

export function encodeSan(sans: { dns?: string[]; uri?: string[]; ip?: string[] }): Buffer {
  const names: Buffer[] = [];
  for (const d of sans.dns ?? []) names.push(der.tlv(0x82, Buffer.from(d, 'ascii'))); // dNSName [2]
  for (const u of sans.uri ?? []) names.push(der.tlv(0x86, Buffer.from(u, 'ascii'))); // uniformResourceIdentifier [6]
  for (const ip of sans.ip ?? []) names.push(der.tlv(0x87, ipBytes(ip))); // iPAddress [7]
  return der.seq(...names);
}

/** An IPv4 or IPv6 address in text as its 4 or 16 octets. */
export function ipBytes(ip: string): Buffer {
  if (isIPv4(ip)) return Buffer.from(ip.split('.').map(Number));
  if (!isIPv6(ip) || ip.includes('%')) throw new der.DerError(`bad IP address ${ip}`);
  // An embedded dotted IPv4 tail (::ffff:192.0.2.1) becomes its two 16-bit groups.
  const v4 = /^(.*:)(\d+\.\d+\.\d+\.\d+)$/.exec(ip);
  if (v4) {
    const b = v4[2].split('.').map(Number);
    ip = `${v4[1]}${((b[0] << 8) | b[1]).toString(16)}:${((b[2] << 8) | b[3]).toString(16)}`;
  }
  const [head, tail = ''] = ip.split('::');
  const h = head ? head.split(':') : [];
  const t = ip.includes('::') ? (tail ? tail.split(':') : []) : [];
  const groups = [...h, ...Array(8 - h.length - t.length).fill('0'), ...t];
  const out = Buffer.from(groups.map((g) => g.padStart(4, '0')).join(''), 'hex');
  if (out.length !== 16) throw new der.DerError(`bad IP address ${ip}`);
  return out;
}

function ipText(b: Buffer): string {
  if (b.length !== 4 && b.length !== 16) throw new der.DerError('iPAddress SAN must be 4 or 16 octets');
  if (b.length === 4) return [...b].join('.');
  const groups: string[] = [];
  for (let i = 0; i < b.length; i += 2) groups.push(b.readUInt16BE(i).toString(16));
  return groups.join(':');
}

/** Builds a PEM CSR with CN and optional SANs, signed with SHA-256. */
export function buildCsr(opts: CsrBuildOptions): string {
  const spki = spkiDerOfKey(opts.publicKey);
  const attrs: Buffer[] = [];
  const sans = opts.sans ?? {};
  if ((sans.dns?.length ?? 0) + (sans.uri?.length ?? 0) + (sans.ip?.length ?? 0) > 0) {
    const ext = der.seq(der.oid(OID.subjectAltName), der.octetString(encodeSan(sans)));
    attrs.push(der.seq(der.oid(OID.extensionRequest), der.setOf(der.seq(ext))));
  }
  const info = der.seq(der.integer(0), encodeName(opts.commonName), spki, der.contextTag(0, Buffer.concat(attrs)));
  const { algorithm, hash } = signatureAlgorithmFor(opts.privateKey);
  const signature = sign(hash, info, opts.privateKey);
  return toPem(der.seq(info, algorithm, der.bitString(signature)), 'CERTIFICATE REQUEST');
}

/**
 * String types a CSR subject may use (docs/protocol.md, CSR rules): UTF8String,
 * PrintableString (its character set), IA5String (7-bit). BMPString, TeletexString and
 * UniversalString are well-formed but refused (NotAcceptedError). The issued subject is built
 * from the checked value (encodeName: CN as UTF8String), never copied from the request.
 */
export const CSR_SUBJECT_STRING_TAGS: ReadonlySet<number> = new Set([der.TAG.UTF8_STRING, der.TAG.PRINTABLE_STRING, der.TAG.IA5_STRING]);

export interface ParsedCsr {
  /** DER of the whole request. */
  der: Buffer;
  /** Subject attributes in order, as [OID, value], each value's encoding checked. */
  subject: Array<[string, string]>;
  commonName: string | undefined;
  /**
   * The checked subject re-encoded, never the request's bytes: one attribute per RDN in
   * order, every value a UTF8String. For the one-CN subjects leafgate signs this is
   * encodeName(commonName); issuers still build the subject from the value their policy
   * checked (the instruction's CN), not from this.
   */
  subjectDer: Buffer;
  /**
   * Canonical DER of the SubjectPublicKeyInfo (keys.ts canonicalKey: named curve and
   * uncompressed point, rsaEncryption with NULL): what a certificate carries, which is not
   * always the bytes of the request.
   */
  spkiDer: Buffer;
  publicKey: KeyObject;
  key: KeyDescription;
  signatureAlgorithm: string;
  sans: SubjectAltNames;
  /** OIDs of every extension requested, with its critical flag. */
  requestedExtensions: Array<{ oid: string; critical: boolean }>;
}

/** Parses and verifies a PEM CSR. Throws DerError for anything malformed or unverifiable. */
export function parseCsr(pem: string): ParsedCsr {
  const raw = fromPem(pem, 'CERTIFICATE REQUEST');
  return parseCsrDer(raw);
}

/**
 * parseCsr for the issuance hot path: the same checks and result, but the key is imported by
 * the cheapest route and the self-signature is verified on the libuv threadpool
 * (crypto.verify with a callback), so concurrent requests keep the other cores busy while
 * this thread parses and encodes.
 */
export async function parseCsrAsync(pem: string): Promise<ParsedCsr> {
  return parseCsrDerAsync(fromPem(pem, 'CERTIFICATE REQUEST'));
}

export function parseCsrDer(raw: Buffer): ParsedCsr {
  const env = readEnvelope(raw);
  const { publicKey, key } = importSpki(env.spki.spkiDer, env.spki);
  const alg = checkAlgorithm(env, key);
  let ok = false;
  try {
    ok = verify(alg.hash, env.infoNode.raw, publicKey, alg.signature);
  } catch {
    ok = false;
  }
  if (!ok) throw new der.DerError('CSR signature does not verify');
  return finish(env, publicKey, key, alg.oid);
}

export async function parseCsrDerAsync(raw: Buffer): Promise<ParsedCsr> {
  const env = readEnvelope(raw);
  const pool = env.spki.route === 'ec' ? ecVerifyPool() : null;
  if (pool && env.spki.route === 'ec') {
    // `point` is the uncompressed point (a compressed one was decompressed by canonicalKey).
    // Import and verify on a worker thread (verify-pool.ts); the KeyObject is made only if
    // a caller asks for it. Own-size copies: a view would clone its whole backing buffer.
    const { crv, point, key } = env.spki;
    const alg = checkAlgorithm(env, key);
    const job = { crv, point: new Uint8Array(point), hash: alg.hash, data: new Uint8Array(env.infoNode.raw), signature: new Uint8Array(alg.signature) } as unknown as EcVerifyJob;
    let verdict: EcVerdict;
    try {
      verdict = await pool.verify(job);
    } catch {
      // A worker lost (it should not happen): the event loop checks it instead.
      verdict = await verifyHere(env, alg);
    }
    if (verdict === 'bad-key') throw new der.DerError('subject public key cannot be read');
    if (verdict !== 'verified') throw new der.DerError('CSR signature does not verify');
    const spki = env.spki;
    return finish(env, () => importSpki(spki.spkiDer, spki).publicKey, key, alg.oid);
  }
  const { publicKey, key } = await importSpkiFast(env.spki.spkiDer, env.spki);
  const alg = checkAlgorithm(env, key);
  const ok = await new Promise<boolean>((resolve) => {
    try {
      verify(alg.hash, env.infoNode.raw, publicKey, alg.signature, (err, result) => resolve(!err && result));
    } catch {
      resolve(false);
    }
  });
  if (!ok) throw new der.DerError('CSR signature does not verify');
  return finish(env, publicKey, key, alg.oid);
}

async function verifyHere(env: Envelope, alg: { hash: string; signature: Buffer }): Promise<EcVerdict> {
  let publicKey: KeyObject;
  try {
    publicKey = (await importSpkiFast(env.spki.spkiDer, env.spki)).publicKey;
  } catch {
    return 'bad-key';
  }
  return new Promise<EcVerdict>((resolve) => {
    try {
      verify(alg.hash, env.infoNode.raw, publicKey, alg.signature, (err, result) => resolve(!err && result ? 'verified' : 'bad-signature'));
    } catch {
      resolve('bad-signature');
    }
  });
}

/** The outer structure, the subject and our own reading of the key: everything before the key import. */
interface Envelope {
  raw: Buffer;
  infoNode: der.DerNode;
  algNode: der.DerNode;
  sigNode: der.DerNode;
  subjectNode: der.DerNode;
  spkiNode: der.DerNode;
  attrsNode: der.DerNode;
  subject: Array<[string, string]>;
  spki: CanonicalKey;
}

function readEnvelope(raw: Buffer): Envelope {
  const outer = der.expectTag(der.parseDer(raw), der.TAG.SEQUENCE, 'CertificationRequest');
  // Every element of the request is DER, also in the parts read no further (attributes that
  // are not used, values that are ignored), and nothing nests deeper than MAX_DEPTH.
  der.checkDerTree(outer);
  const [infoNode, algNode, sigNode, ...extra] = der.children(outer);
  if (extra.length) throw new der.DerError('unexpected fields after signature');
  der.expectTag(infoNode, der.TAG.SEQUENCE, 'CertificationRequestInfo');
  const [versionNode, subjectNode, spkiNode, attrsNode, ...extraInfo] = der.children(infoNode);
  if (extraInfo.length) throw new der.DerError('unexpected fields in CertificationRequestInfo');
  if (der.decodeInteger(versionNode) !== 0n) throw new der.DerError('CSR version must be 0 (v1)');
  der.expectTag(subjectNode, der.TAG.SEQUENCE, 'subject');
  der.expectTag(spkiNode, der.TAG.SEQUENCE, 'subjectPKInfo');
  der.expectTag(attrsNode, 0xa0, 'attributes');
  const subject = decodeName(subjectNode, CSR_SUBJECT_STRING_TAGS);
  return { raw, infoNode, algNode, sigNode, subjectNode, spkiNode, attrsNode, subject, spki: canonicalKey(spkiNode) };
}

/** signatureAlgorithm against the key, and the signature octets. */
function checkAlgorithm(env: Envelope, key: KeyDescription): { oid: string; hash: string; signature: Buffer } {
  const [algOid, algParams, ...algExtra] = der.children(der.expectTag(env.algNode, der.TAG.SEQUENCE, 'signatureAlgorithm'));
  if (algExtra.length) throw new der.DerError('unexpected fields in signatureAlgorithm');
  const oid = der.decodeOid(algOid);
  const alg = SIGNATURE_ALGORITHMS[oid];
  if (!alg) throw new der.DerError(`signature algorithm ${oid} is not accepted`);
  if (alg.keyType !== key.keyType) throw new der.DerError('signature algorithm does not match the key type');
  if (alg.keyType === 'ec' && algParams) throw new der.DerError('ECDSA algorithm identifier must have no parameters');
  // RFC 4055 5: NULL, and readers accept it absent.
  if (alg.keyType === 'rsa' && algParams && algParams.tag !== der.TAG.NULL) throw new der.DerError('RSA signature algorithm parameters must be NULL');
  return { oid, hash: alg.hash, signature: der.decodeBitString(env.sigNode) };
}

/** After the self-signature verified: requested extensions and SANs. */
function finish(env: Envelope, publicKey: KeyObject | (() => KeyObject), key: KeyDescription, signatureAlgorithm: string): ParsedCsr {
  const sans: SubjectAltNames = { dns: [], uri: [], ip: [], email: [] };
  const requestedExtensions: Array<{ oid: string; critical: boolean }> = [];
  let extensionRequests = 0;
  for (const attr of der.children(env.attrsNode)) {
    // Attribute ::= SEQUENCE { type OID, values SET SIZE(1..MAX) } (RFC 2986 4.1), nothing after
    const [typeNode, valuesNode, ...attrExtra] = der.children(der.expectTag(attr, der.TAG.SEQUENCE, 'Attribute'));
    const type = der.decodeOid(der.expectTag(typeNode, der.TAG.OID, 'attribute type'));
    der.expectTag(valuesNode, der.TAG.SET, 'attribute values');
    if (attrExtra.length) throw new der.DerError('unexpected fields in Attribute');
    const values = der.children(valuesNode);
    if (values.length === 0) throw new der.DerError('attribute values: empty SET');
    if (type !== OID.extensionRequest) continue; // e.g. challengePassword: not used, not trusted
    // PKCS#9 (RFC 2985 5.4.2): extensionRequest is single-valued.
    if (++extensionRequests > 1 || values.length !== 1) throw new der.DerError('extensionRequest must appear once, with one value');
    for (const { oid: extOid, critical, value: valueNode } of readExtensions(values[0], 'is requested twice')) {
      // extnValue holds the DER of one value (RFC 5280 4.1): checked whole, also when it is not read.
      const value = der.parseDer(valueNode.value, valueNode.depth + 1);
      der.checkDerTree(value);
      requestedExtensions.push({ oid: extOid, critical });
      if (extOid === OID.subjectAltName) readSan(value, sans);
    }
  }

  const parsed = {
    der: env.raw,
    subject: env.subject,
    commonName: env.subject.find(([o]) => o === OID.commonName)?.[1],
    subjectDer:
      env.subject.length === 1 && env.subject[0][0] === OID.commonName
        ? encodeName(env.subject[0][1])
        : der.seq(...env.subject.map(([o, v]) => der.setOf(der.seq(der.oid(o), der.utf8String(v))))),
    spkiDer: env.spki.spkiDer,
    publicKey: undefined as unknown as KeyObject,
    key,
    signatureAlgorithm,
    sans,
    requestedExtensions,
  };
  if (typeof publicKey !== 'function') parsed.publicKey = publicKey;
  else {
    // Imported on first read (the issuance path never reads it).
    let cached: KeyObject | undefined;
    Object.defineProperty(parsed, 'publicKey', { enumerable: true, get: () => (cached ??= publicKey()) });
  }
  return parsed;
}

/**
 * Name (RFC 5280 4.1.2.4) as [OID, value] pairs in order. With `stringTags`, a value of any
 * other string type is refused with NotAcceptedError.
 */
export function decodeName(nameNode: der.DerNode, stringTags?: ReadonlySet<number>): Array<[string, string]> {
  der.expectTag(nameNode, der.TAG.SEQUENCE, 'Name');
  const out: Array<[string, string]> = [];
  for (const rdn of der.children(nameNode)) {
    der.expectTag(rdn, der.TAG.SET, 'RelativeDistinguishedName');
    const atvs = der.children(rdn);
    if (atvs.length === 0) throw new der.DerError('RelativeDistinguishedName: empty SET');
    for (const atv of atvs) {
      const [type, value, ...extra] = der.children(der.expectTag(atv, der.TAG.SEQUENCE, 'AttributeTypeAndValue'));
      if (!value) throw new der.DerError('attribute value missing');
      if (extra.length) throw new der.DerError('unexpected fields in AttributeTypeAndValue');
      const oid = der.decodeOid(der.expectTag(type, der.TAG.OID, 'attribute type'));
      const text = der.decodeString(value);
      if (stringTags && !stringTags.has(value.tag)) throw new der.NotAcceptedError(`subject attribute ${oid}: string type 0x${value.tag.toString(16)} is not accepted (UTF8String, PrintableString, IA5String)`);
      out.push([oid, text]);
    }
  }
  return out;
}

/** Subject of a DER certificate as [OID, value] pairs (not the display string, which can be spoofed). */
export function certificateSubject(certDer: Buffer): Array<[string, string]> {
  const [tbs] = der.children(der.parseDer(certDer));
  const fields = der.children(tbs);
  const offset = fields[0].tag === 0xa0 ? 1 : 0;
  return decodeName(fields[offset + 4]);
}

/**
 * GeneralNames of a requested subjectAltName. IA5String forms (rfc822Name, dNSName, URI) must
 * be 7-bit; a name requested twice (DNS names compared case-insensitively, IP addresses by
 * their octets) is refused with NotAcceptedError rather than silently de-duplicated.
 */
function readSan(value: der.DerNode, into: SubjectAltNames): void {
  const seen = new Set<string>();
  const once = (kind: string, v: string) => {
    const k = `${kind}:${v}`;
    if (seen.has(k)) throw new der.NotAcceptedError(`SAN ${kind} ${v.slice(0, 64)} is requested twice`);
    seen.add(k);
  };
  const names = der.children(der.expectTag(value, der.TAG.SEQUENCE, 'GeneralNames'));
  if (names.length === 0) throw new der.DerError('GeneralNames: empty SEQUENCE');
  for (const gn of names) {
    switch (gn.tag) {
      case 0x82: {
        der.checkIa5(gn.value);
        const d = gn.value.toString('latin1');
        once('DNS', d.toLowerCase());
        into.dns.push(d);
        break;
      }
      case 0x86: {
        der.checkIa5(gn.value);
        const u = gn.value.toString('latin1');
        once('URI', u);
        into.uri.push(u);
        break;
      }
      case 0x81: {
        der.checkIa5(gn.value);
        const e = gn.value.toString('latin1');
        once('email', e);
        into.email.push(e);
        break;
      }
      case 0x87: {
        const ip = ipText(gn.value);
        once('IP', ip);
        into.ip.push(ip);
        break;
      }
      default:
        // otherName, directoryName, ...: recorded as an unsupported SAN so the policy refuses it
        into.uri.push(`unsupported:[${gn.tag & 0x1f}]`);
    }
  }
}
