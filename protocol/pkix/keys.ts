/** Key descriptions, public-key import, and the signature algorithm identifiers that go with them. */
import { createPublicKey, KeyObject, webcrypto } from 'node:crypto';
import * as der from './der.ts';
import { OID } from './oids.ts';

export interface KeyDescription {
  keyType: 'ec' | 'rsa';
  /** Curve bits for EC (256, 384, 521; 192 for P-192), modulus bits for RSA. */
  keySize: number;
  /** OpenSSL curve name for EC keys (prime256v1, secp384r1, ...). */
  curve?: string;
}

const CURVE_BITS: Record<string, number> = { prime192v1: 192, secp224r1: 224, prime256v1: 256, secp384r1: 384, secp521r1: 521 };

/** Describes a public or private key; throws for key types leafgate does not handle. */
export function keyDescription(key: KeyObject): KeyDescription {
  const d = key.asymmetricKeyDetails ?? {};
  if (key.asymmetricKeyType === 'ec') {
    const curve = d.namedCurve ?? 'unknown';
    return { keyType: 'ec', keySize: CURVE_BITS[curve] ?? 0, curve };
  }
  if (key.asymmetricKeyType === 'rsa') return { keyType: 'rsa', keySize: d.modulusLength ?? 0 };
  throw new der.DerError(`key type ${key.asymmetricKeyType} is not supported`);
}

// ---- SubjectPublicKeyInfo import ------------------------------------------------------------
//
// `createPublicKey({ format: 'der', type: 'spki' })` goes through OpenSSL 3's decoder
// framework, which sets up a decoder chain per call: about 90 us, more than the ECDSA verify
// it is for. For the keys devices actually send we read the SPKI ourselves and import the
// bare key material instead:
//   - RSA: a JWK {n, e} (RSA_set0_key, about 2 us);
//   - EC P-256/384/521, uncompressed point: WebCrypto 'raw' import (EC_POINT_oct2point, which
//     refuses points off the curve, plus EVP_PKEY_public_check_quick). These curves have
//     cofactor 1, so an on-curve point other than infinity is a complete public-key
//     validation; the JWK route would add an n*Q scalar multiplication that proves nothing more.
// Everything else (other curves, compressed points, explicit parameters, RSA without NULL
// parameters, Ed25519, ...) takes the generic OpenSSL route, as before.

interface FastCurve {
  curve: string;
  bits: number;
  crv: 'P-256' | 'P-384' | 'P-521';
  /** Octets per coordinate. */
  size: number;
}

const FAST_CURVES: Record<string, FastCurve> = {
  '1.2.840.10045.3.1.7': { curve: 'prime256v1', bits: 256, crv: 'P-256', size: 32 },
  '1.3.132.0.34': { curve: 'secp384r1', bits: 384, crv: 'P-384', size: 48 },
  '1.3.132.0.35': { curve: 'secp521r1', bits: 521, crv: 'P-521', size: 66 },
};

const NULL_DER = Buffer.from([der.TAG.NULL, 0]);

/** What our own reading of a SubjectPublicKeyInfo found. */
export type SpkiKey =
  | { route: 'ec'; key: KeyDescription; crv: FastCurve['crv']; point: Buffer }
  | { route: 'rsa'; key: KeyDescription; n: Buffer; e: Buffer }
  | { route: 'generic' };

/** Positive, minimally encoded INTEGER content without the sign octet; null when not. */
function positiveInteger(node: der.DerNode | undefined): Buffer | null {
  if (!node || node.tag !== der.TAG.INTEGER) return null;
  const v = node.value;
  if (v.length === 0 || v[0] & 0x80) return null; // empty or negative
  if (v[0] === 0) {
    if (v.length === 1 || !(v[1] & 0x80)) return null; // zero, or a non-minimal leading zero octet
    return v.subarray(1);
  }
  return v;
}

/**
 * Reads an SPKI DER for the fast import routes. Anything this reader does not fully
 * understand is `generic`; the caller then lets OpenSSL decide, so nothing is accepted here
 * that the generic route would refuse for a structural reason.
 */
export function readSpki(spkiDer: Buffer): SpkiKey {
  const generic = { route: 'generic' } as const;
  try {
    const spki = der.parseDer(spkiDer);
    if (spki.tag !== der.TAG.SEQUENCE) return generic;
    const parts = der.children(spki);
    if (parts.length !== 2 || parts[0].tag !== der.TAG.SEQUENCE || parts[1].tag !== der.TAG.BIT_STRING) return generic;
    const alg = der.children(parts[0]);
    if (alg.length !== 2 || alg[0].tag !== der.TAG.OID) return generic;
    const bits = parts[1].value;
    if (bits.length < 2 || bits[0] !== 0) return generic; // not octet-aligned
    const keyBits = bits.subarray(1);
    const algOid = der.decodeOid(alg[0]);
    if (algOid === OID.ecPublicKey) {
      if (alg[1].tag !== der.TAG.OID) return generic; // explicit or implicit curve parameters
      const c = FAST_CURVES[der.decodeOid(alg[1])];
      if (!c || keyBits.length !== 1 + 2 * c.size || keyBits[0] !== 0x04) return generic; // other curves, compressed or hybrid points
      return { route: 'ec', key: { keyType: 'ec', keySize: c.bits, curve: c.curve }, crv: c.crv, point: keyBits };
    }
    if (algOid === OID.rsaEncryption) {
      if (!alg[1].raw.equals(NULL_DER)) return generic;
      const rsaKey = der.parseDer(keyBits);
      if (rsaKey.tag !== der.TAG.SEQUENCE) return generic;
      const ints = der.children(rsaKey);
      if (ints.length !== 2) return generic;
      const n = positiveInteger(ints[0]);
      const e = positiveInteger(ints[1]);
      if (!n || !e) return generic;
      const keySize = (n.length - 1) * 8 + (32 - Math.clz32(n[0]));
      return { route: 'rsa', key: { keyType: 'rsa', keySize }, n, e };
    }
    return generic;
  } catch (err) {
    if (err instanceof der.DerError) return generic;
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
