/**
 * Certificate revocation lists (RFC 5280 section 5): v2 CRLs with cRLNumber and
 * authorityKeyIdentifier, entries with a reasonCode. Encoded by the authority, parsed and
 * signature-checked by gateways (node:crypto has no CRL API).
 */
import { sign, verify, type KeyObject } from 'node:crypto';
import * as der from './der.ts';
import { readExtensions } from './extensions.ts';
import { OID, SIGNATURE_ALGORITHMS } from './oids.ts';
import { signatureAlgorithmFor } from './keys.ts';
import type { AsyncSigner } from './certificate.ts';
import { fromPem, toPem } from './pem.ts';

/** RFC 5280 5.3.1 CRLReason. */
export const REVOCATION_REASONS = {
  unspecified: 0,
  keyCompromise: 1,
  cACompromise: 2,
  affiliationChanged: 3,
  superseded: 4,
  cessationOfOperation: 5,
  certificateHold: 6,
  privilegeWithdrawn: 9,
} as const;
export type RevocationReason = keyof typeof REVOCATION_REASONS;

export interface CrlEntry {
  /** Upper-case hex serial. */
  serial: string;
  revokedAt: Date;
  reason: number;
  /**
   * The certificate's issuer (DER Name) when it is not the CRL's issuer: an entry of an
   * indirect CRL (RFC 5280 5.3.3, certificateIssuer). leafgate's device CA lists in its CRL the
   * revoked certificates of an external device CA (EST), which leafgate cannot sign a CRL for.
   */
  certificateIssuerDer?: Buffer;
}

export interface CrlInput {
  issuerDer: Buffer;
  issuerKeyId: Buffer;
  /** The issuer's private KeyObject, or (encodeCrlAsync) a signer whose key lives elsewhere: an HSM. */
  issuerKey: KeyObject | AsyncSigner;
  crlNumber: bigint;
  thisUpdate: Date;
  nextUpdate: Date;
  entries: CrlEntry[];
  /**
   * Marks the CRL indirect (issuingDistributionPoint indirectCRL) even when no entry names
   * another issuer: leafgate's list of external-CA revocations is indirect while empty too, so
   * that no relying party ever mistakes it for a (direct) CRL of the device CA.
   */
  indirect?: boolean;
}

const ext = (oid: string, value: Buffer) => der.seq(der.oid(oid), der.octetString(value));
const criticalExt = (oid: string, value: Buffer) => der.seq(der.oid(oid), der.bool(true), der.octetString(value));

const isKeyObject = (k: KeyObject | AsyncSigner): k is KeyObject => typeof (k as AsyncSigner).sign !== 'function';

/** Signs on this thread with the issuer's KeyObject. */
export function encodeCrl(input: CrlInput): Buffer {
  const key = input.issuerKey;
  if (!isKeyObject(key)) throw new Error('encodeCrl signs with a KeyObject: use encodeCrlAsync with a signer');
  const { algorithm, hash, tbs } = crlTbs(input, key);
  return der.seq(tbs, algorithm, der.bitString(sign(hash, tbs, key)));
}

/** The same CRL, signed by a KeyObject or through an asynchronous signer (an HSM, a remote key). */
export async function encodeCrlAsync(input: CrlInput): Promise<Buffer> {
  const key = input.issuerKey;
  if (isKeyObject(key)) return encodeCrl(input);
  const { algorithm, hash, tbs } = crlTbs(input, key.publicKey);
  return der.seq(tbs, algorithm, der.bitString(await key.sign(hash, tbs)));
}

function crlTbs(input: CrlInput, key: KeyObject): { algorithm: Buffer; hash: string; tbs: Buffer } {
  const { algorithm, hash } = signatureAlgorithmFor(key);
  const fields: Buffer[] = [der.integer(1), algorithm, input.issuerDer, der.time(input.thisUpdate), der.time(input.nextUpdate)];
  // RFC 5280 5.3.3: a certificateIssuer applies to its entry and every later one, so the
  // CRL issuer's own entries come first and each other issuer's entry names its issuer.
  const entries = [...input.entries.filter((e) => !e.certificateIssuerDer), ...input.entries.filter((e) => e.certificateIssuerDer)];
  const indirect = input.indirect === true || entries.some((e) => e.certificateIssuerDer);
  if (entries.length) {
    fields.push(der.seq(...entries.map((e) => {
      const parts = [der.integer(Buffer.from(e.serial.length % 2 ? '0' + e.serial : e.serial, 'hex')), der.time(e.revokedAt)];
      const exts: Buffer[] = [];
      // reasonCode is omitted for unspecified (RFC 5280 5.3.1 SHOULD).
      if (e.reason !== 0) exts.push(ext(OID.cRLReason, der.enumerated(e.reason)));
      // certificateIssuer ::= GeneralNames, directoryName [4]; the extension MUST be critical (5.3.3).
      if (e.certificateIssuerDer) exts.push(criticalExt(OID.certificateIssuer, der.seq(der.contextTag(4, e.certificateIssuerDer))));
      if (exts.length) parts.push(der.seq(...exts));
      return der.seq(...parts);
    })));
  }
  fields.push(der.contextTag(0, der.seq(
    ext(OID.authorityKeyIdentifier, der.seq(der.tlv(0x80, input.issuerKeyId))),
    ext(OID.cRLNumber, der.integer(input.crlNumber)),
    // issuingDistributionPoint { indirectCRL [4] TRUE }, critical (RFC 5280 5.2.5).
    ...(indirect ? [criticalExt(OID.issuingDistributionPoint, der.seq(der.tlv(0x84, Buffer.from([0xff]))))] : []),
  )));
  return { algorithm, hash, tbs: der.seq(...fields) };
}

/** PEM with the `X509 CRL` armor that openssl reads. */
export const crlToPem = (crlDer: Buffer) => toPem(crlDer, 'X509 CRL');

export interface ParsedCrl {
  der: Buffer;
  issuerDer: Buffer;
  crlNumber: bigint;
  thisUpdate: Date;
  nextUpdate: Date | undefined;
  /**
   * serial (upper-case hex) -> entry, whatever the entry's issuer (an indirect CRL's entries
   * carry certificateIssuerDer): a reader that looks a serial up refuses on a match across
   * issuers, so that a collision of serials can only refuse too much, never too little.
   */
  revoked: Map<string, CrlEntry>;
  /**
   * issuingDistributionPoint says indirectCRL: leafgate's list of the external device CA's
   * revocations. A device CA CRL is direct; the gateways keep the two apart by this flag, so
   * that one can never be passed off as the other (both are signed by the device CA key).
   */
  indirect: boolean;
}

/** Parses a DER or PEM CRL and verifies its signature with `issuerPublicKey`; throws DerError otherwise. */
export function parseCrl(input: Buffer | string, issuerPublicKey: KeyObject): ParsedCrl {
  const raw = typeof input === 'string' ? fromPem(input, 'X509 CRL') : input;
  const [tbs, alg, sig] = der.children(der.expectTag(der.parseDer(raw), der.TAG.SEQUENCE, 'CertificateList'));
  der.expectTag(tbs, der.TAG.SEQUENCE, 'TBSCertList');
  const algOid = der.decodeOid(der.children(der.expectTag(alg, der.TAG.SEQUENCE, 'signatureAlgorithm'))[0]);
  const a = SIGNATURE_ALGORITHMS[algOid];
  if (!a) throw new der.DerError(`CRL signature algorithm ${algOid} not accepted`);
  let ok = false;
  try {
    ok = verify(a.hash, tbs.raw, issuerPublicKey, der.decodeBitString(sig));
  } catch {
    ok = false;
  }
  if (!ok) throw new der.DerError('CRL signature does not verify');

  const f = der.children(tbs);
  let i = 0;
  if (f[i]?.tag === der.TAG.INTEGER) i++; // version v2
  i++; // signature algorithm (inner)
  const issuerDer = der.expectTag(f[i++], der.TAG.SEQUENCE, 'issuer').raw;
  const thisUpdate = der.decodeTime(f[i++]);
  let nextUpdate: Date | undefined;
  if (f[i] && (f[i].tag === der.TAG.UTC_TIME || f[i].tag === der.TAG.GENERALIZED_TIME)) nextUpdate = der.decodeTime(f[i++]);
  const revoked = new Map<string, CrlEntry>();
  if (f[i]?.tag === der.TAG.SEQUENCE) {
    // RFC 5280 5.3.3: an entry's issuer is the last certificateIssuer seen, else the CRL's.
    let certificateIssuerDer: Buffer | undefined;
    for (const entry of der.children(f[i++])) {
      const [serialNode, dateNode, extsNode] = der.children(entry);
      const serial = der.expectTag(serialNode, der.TAG.INTEGER, 'serial').value.toString('hex').replace(/^(00)+(?=.)/, '').toUpperCase();
      let reason = 0;
      if (extsNode) {
        for (const e of extensionsOf(extsNode)) {
          if (e.oid === OID.cRLReason) reason = der.parseDer(e.value, e.depth).value[0] ?? 0;
          if (e.oid === OID.certificateIssuer) {
            const names = der.children(der.expectTag(der.parseDer(e.value, e.depth), der.TAG.SEQUENCE, 'certificateIssuer'));
            const dir = names.find((n) => n.tag === 0xa4);
            if (!dir) throw new der.DerError('certificateIssuer names no directoryName');
            certificateIssuerDer = der.expectTag(der.children(dir)[0], der.TAG.SEQUENCE, 'certificateIssuer Name').raw;
          }
        }
      }
      const e: CrlEntry = { serial, revokedAt: der.decodeTime(dateNode), reason };
      if (certificateIssuerDer && !certificateIssuerDer.equals(issuerDer)) e.certificateIssuerDer = certificateIssuerDer;
      // An earlier entry of the same serial (another issuer) stays: both refuse that serial.
      if (!revoked.has(serial)) revoked.set(serial, e);
    }
  }
  let crlNumber = 0n;
  let indirect = false;
  if (f[i]?.tag === 0xa0) {
    for (const e of extensionsOf(der.children(f[i])[0])) {
      if (e.oid === OID.cRLNumber) crlNumber = der.decodeInteger(der.parseDer(e.value, e.depth));
      // IssuingDistributionPoint ::= SEQUENCE { ..., indirectCRL [4] BOOLEAN DEFAULT FALSE, ... }
      if (e.oid === OID.issuingDistributionPoint) {
        const idp = der.expectTag(der.parseDer(e.value, e.depth), der.TAG.SEQUENCE, 'issuingDistributionPoint');
        indirect = der.children(idp).some((n) => n.tag === 0x84 && n.value.length === 1 && n.value[0] !== 0);
      }
    }
  }
  return { der: raw, issuerDer, crlNumber, thisUpdate, nextUpdate, revoked, indirect };
}

/**
 * Extensions ::= SEQUENCE OF Extension, read strictly: critical a DER BOOLEAN (TRUE only,
 * the DEFAULT FALSE is never encoded), each extension once (RFC 5280 4.2, 5.2, 5.3).
 */
function extensionsOf(node: der.DerNode | undefined): Array<{ oid: string; critical: boolean; value: Buffer; depth: number }> {
  return readExtensions(node).map((e) => ({ oid: e.oid, critical: e.critical, value: e.value.value, depth: e.value.depth + 1 }));
}
