/** Key descriptions, public-key import, and the signature algorithm identifiers that go with them. */
import { createPublicKey, ECDH, KeyObject, webcrypto } from 'node:crypto';
import * as der from './der.ts';
import { OID } from './oids.ts';

export interface KeyDescription {
  keyType: 'ec' | 'rsa';
  /** Curve bits for EC (256, 384, 521; 192 for P-192), modulus bits for RSA. */
  keySize: number;
  /** OpenSSL curve name for EC keys (prime256v1, secp384r1, ...). */
  curve?: string;
  /** RSA public exponent; Infinity when it does not fit in 48 bits (no policy allows that). */
  publicExponent?: number;
}

const CURVE_BITS: Record<string, number> = { prime192v1: 192, secp224r1: 224, prime256v1: 256, secp384r1: 384, secp521r1: 521 };

/** Describes a public or private key; throws for key types leafgate does not handle. */
export function keyDescription(key: KeyObject): KeyDescription {
  const d = key.asymmetricKeyDetails ?? {};
  if (key.asymmetricKeyType === 'ec') {
    const curve = d.namedCurve ?? 'unknown';
    return { keyType: 'ec', keySize: CURVE_BITS[curve] ?? 0, curve };
  }
  if (key.asymmetricKeyType === 'rsa') {
    const e = d.publicExponent;
    return { keyType: 'rsa', keySize: d.modulusLength ?? 0, ...(e !== undefined ? { publicExponent: e <= 0xffffffffffffn ? Number(e) : Infinity } : {}) };
  }
  throw new der.DerError(`key type ${key.asymmetricKeyType} is not supported`);
}

// ---- SubjectPublicKeyInfo: our own strict reading, canonical re-encoding, import ---------
//
// The authority signs a key only in its canonical form (RFC 5480, RFC 3279/8017):
//   - EC: id-ecPublicKey with a named curve OID, the point uncompressed (04 || X || Y).
//     Explicit or implicit curve parameters and curves other than P-256/384/521 are not
//     accepted (NotAcceptedError -> policy_violation); a compressed point (02/03 || X) is
//     decompressed (ECDH.convertKey, which refuses an x with no point on the curve); hybrid
//     forms and wrong lengths are malformed. The canonical SPKI is a constant prefix per
//     curve and the point: nothing else is allocated for it.
//   - RSA: rsaEncryption with NULL parameters (absent parameters are read and re-encoded with
//     NULL), RSAPublicKey { n, e } with positive minimal INTEGERs, n odd, e odd, 3 <= e < n.
//     Which sizes and exponents are signed is the policy's decision (KeyDescription carries both).
//   - anything else: NotAcceptedError.
//
// `createPublicKey({ format: 'der', type: 'spki' })` goes through OpenSSL 3's decoder
// framework, which sets up a decoder chain per call: about 90 us, more than the ECDSA verify
// it is for. So the bare key material is imported instead:
//   - RSA: a JWK {n, e} (RSA_set0_key, about 2 us);
//   - EC P-256/384/521, uncompressed point: WebCrypto 'raw' import (EC_POINT_oct2point, which
//     refuses points off the curve, plus EVP_PKEY_public_check_quick). These curves have
//     cofactor 1, so an on-curve point other than infinity is a complete public-key
//     validation; the JWK route would add an n*Q scalar multiplication that proves nothing more.

interface FastCurve {
  curve: string;
  bits: number;
  crv: 'P-256' | 'P-384' | 'P-521';
  /** Octets per coordinate. */
  size: number;
  /** The canonical SPKI up to the point: SEQ { SEQ { ecPublicKey, curve }, BIT STRING { 00 ... */
  prefix: Buffer;
}

const curve = (oidText: string, name: string, bits: number, crv: FastCurve['crv'], size: number): FastCurve => {
  const full = der.seq(der.seq(der.oid(OID.ecPublicKey), der.oid(oidText)), der.bitString(Buffer.alloc(1 + 2 * size)));
  return { curve: name, bits, crv, size, prefix: full.subarray(0, full.length - (1 + 2 * size)) };
};

const FAST_CURVES: Record<string, FastCurve> = {
  '1.2.840.10045.3.1.7': curve('1.2.840.10045.3.1.7', 'prime256v1', 256, 'P-256', 32),
  '1.3.132.0.34': curve('1.3.132.0.34', 'secp384r1', 384, 'P-384', 48),
  '1.3.132.0.35': curve('1.3.132.0.35', 'secp521r1', 521, 'P-521', 66),
};

/** Names for refusal messages of curves that are read but never signed. */
const OTHER_CURVES: Record<string, string> = { '1.2.840.10045.3.1.1': 'EC P-192', '1.3.132.0.33': 'EC P-224', '1.3.132.0.10': 'secp256k1' };

const NULL_DER = Buffer.from([der.TAG.NULL, 0]);

/** A key as the authority signs it: what it is, and its canonical SubjectPublicKeyInfo DER. */
export type CanonicalKey =
  | { route: 'ec'; key: KeyDescription; crv: FastCurve['crv']; point: Buffer; spkiDer: Buffer }
  | { route: 'rsa'; key: KeyDescription; n: Buffer; e: Buffer; spkiDer: Buffer };

/** What our own reading of a SubjectPublicKeyInfo found; `generic` is left to OpenSSL. */
export type SpkiKey = CanonicalKey | { route: 'generic' };

/** Content of a positive, minimally encoded INTEGER without its sign octet. */
function positiveInteger(node: der.DerNode | undefined, what: string): Buffer {
  const v = der.expectTag(node, der.TAG.INTEGER, what).value;
  if (v.length === 0) throw new der.DerError(`${what} is empty`);
  if (v.length > 1 && ((v[0] === 0x00 && !(v[1] & 0x80)) || (v[0] === 0xff && v[1] & 0x80))) throw new der.DerError('non-minimal INTEGER');
  if (v[0] & 0x80) throw new der.DerError(`${what} is negative`);
  if (v[0] === 0) {
    if (v.length === 1) throw new der.DerError(`${what} is zero`);
    return v.subarray(1);
  }
  return v;
}

const bitLength = (b: Buffer) => (b.length - 1) * 8 + (32 - Math.clz32(b[0]));

/**
 * Reads a SubjectPublicKeyInfo strictly and re-encodes it canonically (see above). Throws
 * DerError for a malformed key, NotAcceptedError for a well-formed one leafgate does not sign.
 * The point of an uncompressed EC key is checked against the curve where it is imported.
 */
export function canonicalKey(spki: der.DerNode): CanonicalKey {
  der.expectTag(spki, der.TAG.SEQUENCE, 'SubjectPublicKeyInfo');
  const parts = der.children(spki);
  if (parts.length !== 2) throw new der.DerError('SubjectPublicKeyInfo must have two fields');
  const alg = der.children(der.expectTag(parts[0], der.TAG.SEQUENCE, 'SubjectPublicKeyInfo algorithm'));
  const keyBits = der.decodeBitString(der.expectTag(parts[1], der.TAG.BIT_STRING, 'subjectPublicKey'));
  const algOid = der.decodeOid(der.expectTag(alg[0], der.TAG.OID, 'key algorithm'));
  if (algOid === OID.ecPublicKey) {
    if (alg.length !== 2) throw new der.DerError('id-ecPublicKey needs exactly one parameter (RFC 5480)');
    const params = alg[1];
    if (params.tag === der.TAG.SEQUENCE) throw new der.NotAcceptedError('explicit EC parameters are not accepted: use a named curve (RFC 5480)');
    if (params.tag === der.TAG.NULL) throw new der.NotAcceptedError('implicitly specified EC parameters are not accepted: use a named curve (RFC 5480)');
    const curveOid = der.decodeOid(der.expectTag(params, der.TAG.OID, 'namedCurve'));
    const c = FAST_CURVES[curveOid];
    if (!c) throw new der.NotAcceptedError(`EC curve ${curveOid}${OTHER_CURVES[curveOid] ? ` (${OTHER_CURVES[curveOid]})` : ''} is not accepted`);
    let point: Buffer;
    if (keyBits.length === 1 + 2 * c.size && keyBits[0] === 0x04) point = keyBits;
    else if (keyBits.length === 1 + c.size && (keyBits[0] === 0x02 || keyBits[0] === 0x03)) {
      try {
        point = ECDH.convertKey(keyBits, c.curve, undefined, undefined, 'uncompressed') as Buffer;
      } catch {
        throw new der.DerError('compressed EC point is not on the curve');
      }
    } else throw new der.DerError(`EC point is not an uncompressed or compressed ${c.crv} point`);
    const canonical = spki.raw.length === c.prefix.length + point.length && point === keyBits && spki.raw.subarray(0, c.prefix.length).equals(c.prefix);
    let spkiDer = spki.raw;
    if (!canonical) {
      spkiDer = Buffer.allocUnsafe(c.prefix.length + point.length);
      c.prefix.copy(spkiDer, 0);
      point.copy(spkiDer, c.prefix.length);
    }
    return { route: 'ec', key: { keyType: 'ec', keySize: c.bits, curve: c.curve }, crv: c.crv, point, spkiDer };
  }
  if (algOid === OID.rsaEncryption) {
    // RFC 3279 2.3.1: the parameters MUST be NULL; absent ones are read and re-encoded.
    if (alg.length > 2 || (alg.length === 2 && !alg[1].raw.equals(NULL_DER))) throw new der.DerError('rsaEncryption parameters must be NULL');
    const rsaKey = der.expectTag(der.parseDer(keyBits, spki.depth + 2), der.TAG.SEQUENCE, 'RSAPublicKey');
    const ints = der.children(rsaKey);
    if (ints.length !== 2) throw new der.DerError('RSAPublicKey must be two INTEGERs');
    const n = positiveInteger(ints[0], 'RSA modulus');
    const e = positiveInteger(ints[1], 'RSA public exponent');
    if (!(n[n.length - 1] & 1)) throw new der.DerError('RSA modulus is even');
    if (!(e[e.length - 1] & 1) || (e.length === 1 && e[0] < 3) || e.length > n.length || (e.length === n.length && e.compare(n) >= 0)) {
      throw new der.DerError('RSA public exponent is invalid');
    }
    const publicExponent = e.length <= 6 ? e.readUIntBE(0, e.length) : Infinity;
    const spkiDer = alg.length === 2 ? spki.raw : der.seq(der.seq(der.oid(OID.rsaEncryption), der.nullValue()), der.bitString(rsaKey.raw));
    return { route: 'rsa', key: { keyType: 'rsa', keySize: bitLength(n), publicExponent }, n, e, spkiDer };
  }
  throw new der.NotAcceptedError(`key algorithm ${algOid} is not accepted`);
}

/**
 * Reads an SPKI DER for the fast import routes: canonicalKey's reading, or `generic` for
 * anything it refuses, which the caller then leaves to OpenSSL.
 */
export function readSpki(spkiDer: Buffer): SpkiKey {
  try {
    return canonicalKey(der.parseDer(spkiDer));
  } catch (err) {
    if (err instanceof der.DerError) return { route: 'generic' };
    throw err;
  }
}

const unreadable = () => new der.DerError('subject public key cannot be read');

function importGeneric(spkiDer: Buffer): { publicKey: KeyObject; key: KeyDescription } {
  let publicKey: KeyObject;
  try {
    publicKey = createPublicKey({ key: spkiDer, format: 'der', type: 'spki' });
  } catch {
    throw unreadable();
  }
  return { publicKey, key: keyDescription(publicKey) };
}

const rsaJwk = (r: { n: Buffer; e: Buffer }) => ({ kty: 'RSA', n: r.n.toString('base64url'), e: r.e.toString('base64url') });

/**
 * Imports a SubjectPublicKeyInfo DER and describes the key. Throws DerError when OpenSSL
 * cannot read the key or its type is not one leafgate handles.
 */
export function importSpki(spkiDer: Buffer, read: SpkiKey = readSpki(spkiDer)): { publicKey: KeyObject; key: KeyDescription } {
  try {
    if (read.route === 'rsa') return { publicKey: createPublicKey({ key: rsaJwk(read), format: 'jwk' }), key: read.key };
    if (read.route === 'ec') {
      const c = read.point.length >> 1;
      const jwk = { kty: 'EC', crv: read.crv, x: read.point.subarray(1, 1 + c).toString('base64url'), y: read.point.subarray(1 + c).toString('base64url') };
      return { publicKey: createPublicKey({ key: jwk, format: 'jwk' }), key: read.key };
    }
  } catch {
    throw unreadable();
  }
  return importGeneric(spkiDer);
}

/**
 * importSpki for the issuance hot path: EC keys through WebCrypto's 'raw' import, which is
 * the cheapest route to an OpenSSL key that node offers (no n*Q check, see above).
 */
export async function importSpkiFast(spkiDer: Buffer, read: SpkiKey = readSpki(spkiDer)): Promise<{ publicKey: KeyObject; key: KeyDescription }> {
  if (read.route !== 'ec') return importSpki(spkiDer, read);
  try {
    const cryptoKey = await webcrypto.subtle.importKey('raw', read.point, { name: 'ECDSA', namedCurve: read.crv }, true, ['verify']);
    return { publicKey: KeyObject.from(cryptoKey), key: read.key };
  } catch {
    throw unreadable();
  }
}

const CURVE_OIDS: Record<string, string> = { 'P-256': '1.2.840.10045.3.1.7', 'P-384': '1.3.132.0.34', 'P-521': '1.3.132.0.35' };

/**
 * SubjectPublicKeyInfo DER of a public (or private) key, byte-identical to
 * `key.export({type: 'spki', format: 'der'})`. That export runs OpenSSL 3's encoder
 * framework, ~100 us a call; a JWK export reads the numbers directly (~4 us), and the DER
 * around them is fixed: named curve and uncompressed point for EC, rsaEncryption with NULL
 * parameters for RSA. Other key types take the export.
 */
export function spkiDerOfKey(key: KeyObject): Buffer {
  const type = key.asymmetricKeyType;
  const curve = key.asymmetricKeyDetails?.namedCurve;
  // JWK names only P-256/384/521 (node throws for other curves).
  if ((type === 'ec' && (curve === 'prime256v1' || curve === 'secp384r1' || curve === 'secp521r1')) || type === 'rsa') {
    const jwk = key.export({ format: 'jwk' });
    if (type === 'ec' && jwk.crv && CURVE_OIDS[jwk.crv] && jwk.x && jwk.y) {
      const point = Buffer.concat([Buffer.from([4]), Buffer.from(jwk.x, 'base64url'), Buffer.from(jwk.y, 'base64url')]);
      return der.seq(der.seq(der.oid(OID.ecPublicKey), der.oid(CURVE_OIDS[jwk.crv])), der.bitString(point));
    }
    if (type === 'rsa' && jwk.n && jwk.e) {
      const rsaKey = der.seq(der.integer(Buffer.from(jwk.n, 'base64url')), der.integer(Buffer.from(jwk.e, 'base64url')));
      return der.seq(der.seq(der.oid(OID.rsaEncryption), der.nullValue()), der.bitString(rsaKey));
    }
  }
  const pub = key.type === 'private' ? createPublicKey(key) : key;
  return pub.export({ type: 'spki', format: 'der' });
}

/** AlgorithmIdentifier DER and digest for signing with `key` (SHA-384 for P-384, else SHA-256). */
export function signatureAlgorithmFor(key: KeyObject): { algorithm: Buffer; hash: string } {
  const desc = keyDescription(key);
  if (desc.keyType === 'ec') {
    if (desc.keySize >= 384) return { algorithm: der.seq(der.oid(OID.ecdsaWithSHA384)), hash: 'sha384' };
    return { algorithm: der.seq(der.oid(OID.ecdsaWithSHA256)), hash: 'sha256' };
  }
  return { algorithm: der.seq(der.oid(OID.sha256WithRSAEncryption), der.nullValue()), hash: 'sha256' };
}

export function keySpecLabel(k: { keyType: string; keySize: number }): string {
  return k.keyType === 'ec' ? `EC P-${k.keySize}` : `RSA-${k.keySize}`;
}
