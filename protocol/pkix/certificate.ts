/**
 * X.509 v3 certificate encoder (RFC 5280 4.1). The TBSCertificate is assembled from DER
 * pieces -- issuer Name and subject key copied verbatim, extensions per profile -- and signed
 * with node:crypto. This is the issuance hot path: no ASN.1 object model, no copies beyond
 * one Buffer.concat per level.
 */
import { createHash, randomBytes, sign, type KeyObject } from 'node:crypto';
import * as der from './der.ts';
import { OID } from './oids.ts';
import { encodeSan } from './csr.ts';
import { signatureAlgorithmFor } from './keys.ts';



export type CertificateProfile =
  | { kind: 'root' }
  | { kind: 'intermediate'; pathLen: number; permittedDns?: string[] }
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
  issuer: { subjectDer: Buffer; keyId: Buffer; privateKey: KeyObject };
}

/** 16 random octets with the top bit clear: positive, unpredictable, within RFC 5280's 20. */
export function newSerial(): Buffer {
  const b = randomBytes(16);
  b[0] &= 0x7f;
  if (b[0] === 0) b[0] = 0x01; // keep 16 significant octets so the hex form has a fixed width
  return b;
}

/** RFC 5280 4.2.1.2 method (1): SHA-1 of the subjectPublicKey BIT STRING value. */
export function keyIdentifier(spkiDer: Buffer): Buffer {
  const [, keyBits] = der.children(der.parseDer(spkiDer));
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

function profileExtensions(input: CertificateInput): Buffer[] {
  const { profile } = input;
  const ext: Buffer[] = [];
  const ski = keyIdentifier(input.spkiDer);
  switch (profile.kind) {
    case 'root':
      ext.push(extension(OID.basicConstraints, true, der.seq(der.bool(true))));
      ext.push(extension(OID.keyUsage, true, keyUsage([KU.digitalSignature, KU.keyCertSign, KU.cRLSign])));
      break;
    case 'intermediate': {
      ext.push(extension(OID.basicConstraints, true, der.seq(der.bool(true), der.integer(profile.pathLen))));
      ext.push(extension(OID.keyUsage, true, keyUsage([KU.digitalSignature, KU.keyCertSign, KU.cRLSign])));
      if (profile.permittedDns?.length) {
        // NameConstraints ::= SEQ { permittedSubtrees [0] GeneralSubtrees } (RFC 5280 4.2.1.10)
        const subtrees = profile.permittedDns.map((d) => der.seq(der.tlv(0x82, Buffer.from(d, 'ascii'))));
        ext.push(extension(OID.nameConstraints, true, der.seq(der.contextTag(0, Buffer.concat(subtrees)))));
      }
      break;
    }
    default: {
      ext.push(extension(OID.basicConstraints, true, der.seq()));
      // RSA keys may also do key transport in TLS 1.2 RSA suites; EC keys only sign.
      const usage = profile.keyType === 'rsa' ? [KU.digitalSignature, KU.keyEncipherment] : [KU.digitalSignature];
      ext.push(extension(OID.keyUsage, true, keyUsage(usage)));
      const eku = profile.kind === 'device' ? [OID.clientAuth] : profile.kind === 'server' ? [OID.serverAuth] : [OID.clientAuth, OID.serverAuth];
      ext.push(extension(OID.extKeyUsage, false, der.seq(...eku.map((o) => der.oid(o)))));
    }
  }
  ext.push(extension(OID.subjectKeyIdentifier, false, der.octetString(ski)));
  if (profile.kind !== 'root') ext.push(extension(OID.authorityKeyIdentifier, false, der.seq(der.tlv(0x80, input.issuer.keyId))));
  const sans = input.sans;
  if (sans && (sans.dns?.length || sans.uri?.length || sans.ip?.length)) ext.push(extension(OID.subjectAltName, false, encodeSan(sans)));
  return ext;
}

/** Encodes and signs a certificate; returns its DER. */
export function encodeCertificate(input: CertificateInput): Buffer {
  const { algorithm, hash } = signatureAlgorithmFor(input.issuer.privateKey);
  const tbs = der.seq(
    der.contextTag(0, der.integer(2)), // version v3
    der.integer(input.serial),
    algorithm,
    input.issuer.subjectDer,
    der.seq(der.time(input.notBefore), der.time(input.notAfter)),
    input.subjectDer,
    input.spkiDer,
    der.contextTag(3, der.seq(...profileExtensions(input))),
  );
  const signature = sign(hash, tbs, input.issuer.privateKey);
  return der.seq(tbs, algorithm, der.bitString(signature));
}

/** Subject Name DER of a certificate (its 6th TBS field), to use as the issuer of the next. */
export function subjectDerOf(certDer: Buffer): Buffer {
  const [tbs] = der.children(der.parseDer(certDer));
  const fields = der.children(tbs);
  const offset = fields[0].tag === 0xa0 ? 1 : 0;
  return fields[offset + 4].raw;
}

/** SubjectPublicKeyInfo DER of a certificate. */
export function spkiDerOf(certDer: Buffer): Buffer {
  const [tbs] = der.children(der.parseDer(certDer));
  const fields = der.children(tbs);
  const offset = fields[0].tag === 0xa0 ? 1 : 0;
  return fields[offset + 5].raw;
}
