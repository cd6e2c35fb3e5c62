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

/**
 * The certificates of a certs-only SignedData (an EST server's answer, RFC 7030 4.2.3), in
 * the order the server wrote them. DER only (what `openssl crl2pkcs7` and the EST servers
 * we know write); an indefinite-length BER encoding is refused, as is a SignedData that
 * carries content or signers (then it is not a Simple PKI Response). The certificates are
 * returned as DER to be parsed by the caller (X509Certificate): nothing here trusts them.
 */
export function decodeCertsOnly(input: Buffer): Buffer[] {
  const top = der.children(der.expectTag(der.parseDer(input), der.TAG.SEQUENCE, 'ContentInfo'));
  if (top.length !== 2 || der.decodeOid(top[0]) !== OID_SIGNED_DATA) throw new der.DerError('ContentInfo is not id-signedData');
  const wrapped = der.children(der.expectTag(top[1], 0xa0, 'ContentInfo content'));
  if (wrapped.length !== 1) throw new der.DerError('ContentInfo content must hold one SignedData');
  const fields = der.children(der.expectTag(wrapped[0], der.TAG.SEQUENCE, 'SignedData'));
  let i = 0;
  der.expectTag(fields[i++], der.TAG.INTEGER, 'SignedData version');
  der.expectTag(fields[i++], der.TAG.SET, 'digestAlgorithms');
  const encap = der.children(der.expectTag(fields[i++], der.TAG.SEQUENCE, 'encapContentInfo'));
  if (encap.length !== 1 || der.decodeOid(encap[0]) !== OID_DATA) throw new der.DerError('certs-only: encapContentInfo must be id-data without content');
  const certs: Buffer[] = [];
  if (fields[i]?.tag === 0xa0) certs.push(...der.children(fields[i++]).map((c) => der.expectTag(c, der.TAG.SEQUENCE, 'Certificate').raw));
  if (fields[i]?.tag === 0xa1) i++; // crls [1]: not used by EST enrollment answers, ignored
  const signers = der.expectTag(fields[i++], der.TAG.SET, 'signerInfos');
  if (signers.value.length !== 0) throw new der.DerError('certs-only: signerInfos must be empty');
  if (i !== fields.length) throw new der.DerError('SignedData has trailing fields');
  if (!certs.length) throw new der.DerError('certs-only: no certificate');
  return certs;
}
