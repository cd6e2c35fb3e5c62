/** Key descriptions and the signature algorithm identifiers that go with them. */
import type { KeyObject } from 'node:crypto';
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
