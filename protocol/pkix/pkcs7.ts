/**
 * A degenerate CMS SignedData, "certs-only" (RFC 5652 5.1, RFC 5272 4.1 Simple PKI Response):
 * no content, no signers, only certificates. EST (RFC 7030 4.1.3, 4.2.3) answers cacerts,
 * simpleenroll and simplereenroll with it.
 *
 *   ContentInfo ::= SEQUENCE { contentType id-signedData, content [0] EXPLICIT SignedData }
 *   SignedData  ::= SEQUENCE { version 1, digestAlgorithms SET {}, encapContentInfo
 *                              SEQUENCE { id-data }, certificates [0] IMPLICIT SET OF
 *                              Certificate, signerInfos SET {} }
 *
 * The certificates keep the caller's order (issued certificate or issuing CA first, root
 * last) rather than DER's sorted SET OF: SignedData is BER (RFC 5652 2: only signed
 * attributes must be DER), and EST clients such as aziot-certd concatenate the
 * certificates in the order given to build a chain file.
 */
import * as der from './der.ts';
import { allPem } from './pem.ts';

export const OID_SIGNED_DATA = '1.2.840.113549.1.7.2';
export const OID_DATA = '1.2.840.113549.1.7.1';

/** DER of the certs-only SignedData; `certs` are PEM (one or more blocks each) or DER buffers. */
export function encodeCertsOnly(certs: Array<string | Buffer>): Buffer {
  const ders = certs.flatMap((c) => (Buffer.isBuffer(c) ? [c] : allPem(c, 'CERTIFICATE')));
  if (!ders.length) throw new der.DerError('certs-only: no certificate');
  for (const d of ders) der.expectTag(der.parseDer(d), der.TAG.SEQUENCE, 'Certificate');
  const emptySet = der.tlv(der.TAG.SET, Buffer.alloc(0));
  const signedData = der.seq(
    der.integer(1),
    emptySet, // digestAlgorithms
    der.seq(der.oid(OID_DATA)), // encapContentInfo, no eContent
    der.contextTag(0, Buffer.concat(ders)), // certificates [0] IMPLICIT
    emptySet, // signerInfos
  );
  return der.seq(der.oid(OID_SIGNED_DATA), der.contextTag(0, signedData));
}

/** Base64 of `encodeCertsOnly`, in lines of 64 characters (RFC 7030 4.1.3: base64 body). */
export function certsOnlyBase64(certs: Array<string | Buffer>): string {
  return encodeCertsOnly(certs).toString('base64').replace(/(.{64})/g, '$1\n').replace(/\n?$/, '\n');
}
