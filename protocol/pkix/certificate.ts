/**
 * X.509 v3 certificate encoder (RFC 5280 4.1). The TBSCertificate is assembled from DER
 * pieces -- issuer Name and subject key copied verbatim, extensions per profile -- and signed
 * with node:crypto. This is the issuance hot path: no ASN.1 object model, no copies beyond
 * one Buffer.concat per level.
 */
import { createHash, randomFillSync, sign, type KeyObject } from 'node:crypto';
import * as der from './der.ts';
import { OID } from './oids.ts';
import { encodeSan, ipBytes } from './csr.ts';
import { signatureAlgorithmFor } from './keys.ts';
import { ecVerifyPool } from './verify-pool.ts';

export type CertificateProfile =
  | { kind: 'root' }
  | {
      kind: 'intermediate';
      pathLen: number;
      /**
       * Name constraints (RFC 5280 4.2.1.10): exactly these DNS names (and their subdomains)
       * and IP addresses are permitted; every DNS name and every IPv4/IPv6 address of a family
       * with no permitted entry is excluded, so a constrained CA names nothing else.
       */
      nameConstraints?: { dns: string[]; ip: string[] };
      /** extKeyUsage of the CA itself: verifiers (OpenSSL, Go) apply it to everything below. */
      eku?: Array<'serverAuth' | 'clientAuth'>;
    }
  | { kind: 'device'; keyType: 'ec' | 'rsa' }
  | { kind: 'gateway'; keyType: 'ec' | 'rsa' }
  | { kind: 'server'; keyType: 'ec' | 'rsa' };

export interface CertificateInput {
  serial: Buffer;
  subjectDer: Buffer;
  spkiDer: Buffer;
  notBefore: Date;
  notAfter: Date;
  profile: CertificateProfile;
  sans?: { dns?: string[]; uri?: string[]; ip?: string[] };
  issuer: CertificateIssuer;
}

/**
 * A signer whose private key is not in this process (an HSM, a remote key service): the
 * shape of authority/ca's CaKey. `sign` answers the signature as X.509 carries it (a DER
 * ECDSA-Sig-Value for EC, PKCS#1 v1.5 for RSA) over `data` hashed with `hash`.
 */
export interface AsyncSigner {
  readonly publicKey: KeyObject;
  sign(hash: string, data: Buffer): Promise<Buffer>;
}

/**
 * The issuer of a certificate: its name and key id, and either its private KeyObject (the
 * fast path: signed here or on the worker pool) or an asynchronous signer.
 */
export type CertificateIssuer = { subjectDer: Buffer; keyId: Buffer; crlUrl?: string } & (
  | { privateKey: KeyObject; signer?: undefined }
  | { privateKey?: undefined; signer: AsyncSigner }
);

// Serial randomness is drawn from the CSPRNG 4 KiB at a time (one RAND_bytes call per 256
// serials instead of one each), as node does for randomUUID.
const SERIAL_POOL = Buffer.alloc(4096);
let serialPoolOffset = SERIAL_POOL.length;

/** 16 random octets with the top bit clear: positive, unpredictable, within RFC 5280's 20. */
export function newSerial(): Buffer {
  if (serialPoolOffset + 16 > SERIAL_POOL.length) {
    randomFillSync(SERIAL_POOL);
    serialPoolOffset = 0;
  }
  const b = Buffer.from(SERIAL_POOL.subarray(serialPoolOffset, serialPoolOffset + 16));
  SERIAL_POOL.fill(0, serialPoolOffset, serialPoolOffset + 16); // a serial's bytes are never handed out twice
  serialPoolOffset += 16;
  b[0] &= 0x7f;
  if (b[0] === 0) b[0] = 0x01; // keep 16 significant octets so the hex form has a fixed width
  return b;
}

/** RFC 5280 4.2.1.2 method (1): SHA-1 of the subjectPublicKey BIT STRING value. */
export function keyIdentifier(spkiDer: Buffer): Buffer {
  const spki = der.expectTag(der.parseDer(spkiDer), der.TAG.SEQUENCE, 'SubjectPublicKeyInfo');
  // SEQUENCE { AlgorithmIdentifier, BIT STRING }: skip the first element, read the second
  const { next } = der.readElement(spki.value, 0);
  const { node: keyBits, next: end } = der.readElement(spki.value, next);
  if (end !== spki.value.length) throw new der.DerError('unexpected fields in SubjectPublicKeyInfo');
  return createHash('sha1').update(der.decodeBitString(keyBits)).digest();
}

function extension(oid: string, critical: boolean, value: Buffer): Buffer {
  return critical ? der.seq(der.oid(oid), der.bool(true), der.octetString(value)) : der.seq(der.oid(oid), der.octetString(value));
}

/** keyUsage BIT STRING (RFC 5280 4.2.1.3), DER: trailing zero bits are dropped. */
function keyUsage(bits: number[]): Buffer {
  let value = 0;
  for (const b of bits) value |= 0x8000 >> b;
  let bytes = Buffer.from([value >> 8, value & 0xff]);
  if (bytes[1] === 0) bytes = bytes.subarray(0, 1);
  const last = bytes[bytes.length - 1];
  let unused = 0;
  while (unused < 7 && !(last & (1 << unused))) unused++;
  return der.bitString(bytes, unused);
}

const KU = { digitalSignature: 0, keyEncipherment: 2, keyCertSign: 5, cRLSign: 6 };

/**
 * NameConstraints with permitted DNS names and IP addresses (host masks), and everything
 * else of those two kinds excluded: an empty dNSName excludes every DNS name (RFC 5280
 * 4.2.1.10 matching by suffix: every name ends in the empty one), 0.0.0.0/0 and ::/0 every
 * address of a family that has no permitted entry.
 */
function nameConstraints(nc: { dns: string[]; ip: string[] }): Buffer {
  const subtree = (name: Buffer) => der.seq(name);
  const dns = (d: string) => der.tlv(0x82, Buffer.from(d, 'ascii'));
  const ip = (addr: Buffer, mask: Buffer) => der.tlv(0x87, Buffer.concat([addr, mask]));
  const permitted: Buffer[] = [];
  const excluded: Buffer[] = [];
  for (const d of nc.dns) permitted.push(subtree(dns(d)));
  let v4 = false;
  let v6 = false;
  for (const a of nc.ip) {
    const bytes = ipBytes(a);
    if (bytes.length === 4) v4 = true;
    else v6 = true;
    permitted.push(subtree(ip(bytes, Buffer.alloc(bytes.length, 0xff))));
  }
  if (!nc.dns.length) excluded.push(subtree(dns('')));
  if (!v4) excluded.push(subtree(ip(Buffer.alloc(4), Buffer.alloc(4))));
  if (!v6) excluded.push(subtree(ip(Buffer.alloc(16), Buffer.alloc(16))));
  const parts: Buffer[] = [];
  if (permitted.length) parts.push(der.contextTag(0, Buffer.concat(permitted)));
  if (excluded.length) parts.push(der.contextTag(1, Buffer.concat(excluded)));
  return der.seq(...parts);
}

/** CRLDistributionPoints with one fullName URI (RFC 5280 4.2.1.13). */
function crlDistributionPoint(url: string): Buffer {
  return extension(OID.cRLDistributionPoints, false, der.seq(der.seq(der.contextTag(0, der.contextTag(0, der.tlv(0x86, Buffer.from(url, 'ascii')))))));
}

/** The extensions that depend only on the profile and the issuer: those before SKI, and AKI (and CDP) after it. */
function constantExtensions(profile: CertificateProfile, issuerKeyId: Buffer, crlUrl?: string): { before: Buffer[]; aki: Buffer } {
  const ext: Buffer[] = [];
  switch (profile.kind) {
    case 'root':
      ext.push(extension(OID.basicConstraints, true, der.seq(der.bool(true))));
      ext.push(extension(OID.keyUsage, true, keyUsage([KU.digitalSignature, KU.keyCertSign, KU.cRLSign])));
      break;
    case 'intermediate': {
      ext.push(extension(OID.basicConstraints, true, der.seq(der.bool(true), der.integer(profile.pathLen))));
      ext.push(extension(OID.keyUsage, true, keyUsage([KU.digitalSignature, KU.keyCertSign, KU.cRLSign])));
      if (profile.nameConstraints) ext.push(extension(OID.nameConstraints, true, nameConstraints(profile.nameConstraints)));
      if (profile.eku?.length) ext.push(extension(OID.extKeyUsage, false, der.seq(...profile.eku.map((u) => der.oid(OID[u])))));
      break;
    }
    default: {
      ext.push(extension(OID.basicConstraints, true, der.seq()));
      // RFC 5280 4.2.1.12: keyUsage consistent with the extended key usage. clientAuth
      // (devices) signs only: digitalSignature. serverAuth (servers, gateways) with an RSA key
      // may also do key transport in TLS 1.2 RSA suites: keyEncipherment. EC keys only sign.
      const usage = profile.keyType === 'rsa' && profile.kind !== 'device' ? [KU.digitalSignature, KU.keyEncipherment] : [KU.digitalSignature];
      ext.push(extension(OID.keyUsage, true, keyUsage(usage)));
      const eku = profile.kind === 'device' ? [OID.clientAuth] : profile.kind === 'server' ? [OID.serverAuth] : [OID.clientAuth, OID.serverAuth];
      ext.push(extension(OID.extKeyUsage, false, der.seq(...eku.map((o) => der.oid(o)))));
    }
  }
  // A self-signed root carries no AKI (RFC 5280 4.2.1.1 MAY), as openssl 3.0 does with an explicit extensions section.
  let aki = profile.kind === 'root' ? EMPTY : extension(OID.authorityKeyIdentifier, false, der.seq(der.tlv(0x80, issuerKeyId)));
  // Where a verifier finds the issuer's CRL; constant per issuer, so it rides with the AKI.
  if (crlUrl && profile.kind !== 'root') aki = Buffer.concat([aki, crlDistributionPoint(crlUrl)]);
  return { before: ext, aki };
}

function profileExtensions(input: CertificateInput): Buffer[] {
  const { before, aki } = constantExtensions(input.profile, input.issuer.keyId, input.issuer.crlUrl);
  const ext = [...before, extension(OID.subjectKeyIdentifier, false, der.octetString(keyIdentifier(input.spkiDer)))];
  if (aki.length) ext.push(aki);
  if (hasSans(input.sans)) ext.push(extension(OID.subjectAltName, false, encodeSan(input.sans!)));
  return ext;
}

/** The algorithm identifier and hash of an issuer's signatures, from its private key or its signer's public key. */
function issuerAlgorithm(issuer: { privateKey?: KeyObject; signer?: AsyncSigner }): { algorithm: Buffer; hash: string } {
  return signatureAlgorithmFor(issuer.privateKey ?? issuer.signer!.publicKey);
}

function certificateTbs(input: CertificateInput, algorithm: Buffer): Buffer {
  return der.seq(
    der.contextTag(0, der.integer(2)), // version v3
    der.integer(input.serial),
    algorithm,
    input.issuer.subjectDer,
    der.seq(der.time(input.notBefore), der.time(input.notAfter)),
    input.subjectDer,
    input.spkiDer,
    der.contextTag(3, der.seq(...profileExtensions(input))),
  );
}

/** Encodes and signs a certificate on this thread (the issuer's KeyObject); returns its DER. */
export function encodeCertificate(input: CertificateInput): Buffer {
  if (!input.issuer.privateKey) throw new Error('encodeCertificate signs with a KeyObject: use encodeCertificateAsync with a signer');
  const { algorithm, hash } = issuerAlgorithm(input.issuer);
  const tbs = certificateTbs(input, algorithm);
  const signature = sign(hash, tbs, input.issuer.privateKey);
  return der.seq(tbs, algorithm, der.bitString(signature));
}

/** The same certificate, signed by the issuer's KeyObject or through its asynchronous signer (an HSM). */
export async function encodeCertificateAsync(input: CertificateInput): Promise<Buffer> {
  if (input.issuer.privateKey) return encodeCertificate(input);
  const { algorithm, hash } = issuerAlgorithm(input.issuer);
  const tbs = certificateTbs(input, algorithm);
  const signature = await input.issuer.signer.sign(hash, tbs);
  return der.seq(tbs, algorithm, der.bitString(signature));
}

// ---- templates: the issuance hot path --------------------------------------------------------

/** What varies from one certificate to the next under one issuer and profile. */
export interface TemplateFields {
  serial: Buffer;
  subjectDer: Buffer;
  spkiDer: Buffer;
  notBefore: Date;
  notAfter: Date;
  sans?: { dns?: string[]; uri?: string[]; ip?: string[] };
}

/**
 * One issuer and one profile with everything constant pre-encoded once: version, signature
 * AlgorithmIdentifier, issuer Name, the profile's extensions, the authorityKeyIdentifier.
 * Per certificate only serial, validity, subject, SPKI, subjectKeyIdentifier and SAN are
 * written, into one buffer. The output is byte for byte what encodeCertificate produces for
 * the same input (test/pkix.template.test.ts holds the two side by side).
 */
export class CertificateTemplate {
  readonly hash: string;
  /** The fast path: a KeyObject signed with here or on the worker pool. */
  private readonly privateKey: KeyObject | undefined;
  /** Otherwise: a key held elsewhere (an HSM), signing asynchronously. */
  private readonly signer: AsyncSigner | undefined;
  private readonly head: Buffer; // [0] version, then the serial follows
  private readonly algorithm: Buffer;
  private readonly issuerDer: Buffer;
  private readonly fixedExtensions: Buffer; // the profile's extensions before SKI
  private readonly akiExtension: Buffer; // after SKI; empty for a self-signed root

  constructor(profile: CertificateProfile, issuer: CertificateIssuer) {
    const { algorithm, hash } = issuerAlgorithm(issuer);
    this.hash = hash;
    this.privateKey = issuer.privateKey;
    this.signer = issuer.privateKey ? undefined : issuer.signer;
    this.algorithm = algorithm;
    this.head = der.contextTag(0, der.integer(2));
    this.issuerDer = Buffer.from(issuer.subjectDer);
    const exts = constantExtensions(profile, issuer.keyId, issuer.crlUrl);
    this.fixedExtensions = Buffer.concat(exts.before);
    this.akiExtension = exts.aki;
  }

  /** DER of the TBSCertificate. */
  encodeTbs(f: TemplateFields): Buffer {
    const serial = der.integer(f.serial);
    const validity = der.seq(der.time(f.notBefore), der.time(f.notAfter));
    const ski = SKI_PREFIX.length + 20;
    const san = hasSans(f.sans) ? extension(OID.subjectAltName, false, encodeSan(f.sans!)) : EMPTY;
    const extsLen = this.fixedExtensions.length + ski + this.akiExtension.length + san.length;
    const extsSeqLen = headerLength(extsLen) + extsLen;
    const extsWrapLen = headerLength(extsSeqLen) + extsSeqLen;
    const bodyLen =
      this.head.length + serial.length + this.algorithm.length + this.issuerDer.length + validity.length + f.subjectDer.length + f.spkiDer.length + extsWrapLen;
    const out = Buffer.allocUnsafe(headerLength(bodyLen) + bodyLen);
    let o = writeHeader(out, 0, der.TAG.SEQUENCE, bodyLen);
    o += this.head.copy(out, o);
    o += serial.copy(out, o);
    o += this.algorithm.copy(out, o);
    o += this.issuerDer.copy(out, o);
    o += validity.copy(out, o);
    o += f.subjectDer.copy(out, o);
    o += f.spkiDer.copy(out, o);
    o = writeHeader(out, o, 0xa3, extsSeqLen);
    o = writeHeader(out, o, der.TAG.SEQUENCE, extsLen);
    o += this.fixedExtensions.copy(out, o);
    o += SKI_PREFIX.copy(out, o);
    o += keyIdentifier(f.spkiDer).copy(out, o);
    o += this.akiExtension.copy(out, o);
    o += san.copy(out, o);
    if (o !== out.length) throw new Error(`certificate template wrote ${o} of ${out.length} octets`);
    return out;
  }

  /** Certificate DER from a TBS and its signature. */
  assemble(tbs: Buffer, signature: Buffer): Buffer {
    const bitsLen = signature.length + 1;
    const bodyLen = tbs.length + this.algorithm.length + headerLength(bitsLen) + bitsLen;
    const out = Buffer.allocUnsafe(headerLength(bodyLen) + bodyLen);
    let o = writeHeader(out, 0, der.TAG.SEQUENCE, bodyLen);
    o += tbs.copy(out, o);
    o += this.algorithm.copy(out, o);
    o = writeHeader(out, o, der.TAG.BIT_STRING, bitsLen);
    out[o++] = 0; // no unused bits
    o += signature.copy(out, o);
    return out;
  }

  /** Encodes and signs on this thread (KeyObject issuers only). */
  encode(f: TemplateFields): Buffer {
    if (!this.privateKey) throw new Error('this template signs through an asynchronous signer: use encodeAsync');
    const tbs = this.encodeTbs(f);
    return this.assemble(tbs, sign(this.hash, tbs, this.privateKey));
  }

  /**
   * Encodes here and signs off the event loop: a KeyObject on the worker pool (or the libuv
   * threadpool), an asynchronous signer (an HSM) through its own sign.
   */
  encodeAsync(f: TemplateFields): Promise<Buffer> {
    const tbs = this.encodeTbs(f);
    const key = this.privateKey;
    if (!key) return this.signer!.sign(this.hash, tbs).then((signature) => this.assemble(tbs, signature));
    // On the worker pool when there is one (batched per event-loop turn), else the threadpool.
    const pool = ecVerifyPool();
    if (pool) return pool.sign(this.hash, tbs, key).then((signature) => this.assemble(tbs, signature));
    return new Promise((resolve, reject) => {
      sign(this.hash, tbs, key, (err, signature) => (err ? reject(err) : resolve(this.assemble(tbs, signature))));
    });
  }
}

const EMPTY = Buffer.alloc(0);
/** subjectKeyIdentifier Extension up to its 20 key-id octets: SEQ { OID, OCTET STRING { OCTET STRING(20) } }. */
const SKI_PREFIX = (() => {
  const full = extension(OID.subjectKeyIdentifier, false, der.octetString(Buffer.alloc(20)));
  return full.subarray(0, full.length - 20);
})();

const hasSans = (sans: TemplateFields['sans']) => !!(sans && (sans.dns?.length || sans.uri?.length || sans.ip?.length));

function headerLength(len: number): number {
  return len < 0x80 ? 2 : len < 0x100 ? 3 : len < 0x10000 ? 4 : len < 0x1000000 ? 5 : 6;
}

function writeHeader(out: Buffer, o: number, tag: number, len: number): number {
  out[o++] = tag;
  if (len < 0x80) {
    out[o++] = len;
    return o;
  }
  const n = headerLength(len) - 2;
  out[o++] = 0x80 | n;
  for (let i = n - 1; i >= 0; i--) out[o++] = Math.floor(len / 2 ** (8 * i)) & 0xff;
  return o;
}

/** Subject Name DER of a certificate (its 6th TBS field), to use as the issuer of the next. */
export function subjectDerOf(certDer: Buffer): Buffer {
  const [tbs] = der.children(der.parseDer(certDer));
  const fields = der.children(tbs);
  const offset = fields[0].tag === 0xa0 ? 1 : 0;
  return fields[offset + 4].raw;
}

/** Issuer Name DER of a certificate (as its CRL names it). */
export function issuerDerOf(certDer: Buffer): Buffer {
  const [tbs] = der.children(der.parseDer(certDer));
  const fields = der.children(tbs);
  const offset = fields[0].tag === 0xa0 ? 1 : 0;
  return fields[offset + 2].raw;
}

/** SubjectPublicKeyInfo DER of a certificate. */
export function spkiDerOf(certDer: Buffer): Buffer {
  const [tbs] = der.children(der.parseDer(certDer));
  const fields = der.children(tbs);
  const offset = fields[0].tag === 0xa0 ? 1 : 0;
  return fields[offset + 5].raw;
}
