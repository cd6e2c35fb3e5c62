/**
 * ddkg key derivation (the device side). The key pair is a pure function of the device's
 * hardware attributes, its id and the authority's salt, so nothing secret is stored:
 *
 *   ikm  = UTF-8 of the attributes sorted by name, each line "name=value\n"
 *   okm  = HKDF-SHA256(ikm, salt, info = "leafgate-ddkg-v1\n" + deviceId, L = 48)   (RFC 5869)
 *   d    = (OS2IP(okm) mod (n - 1)) + 1                                            (FIPS 186-4 B.4.1)
 *
 * with n the order of P-256. 48 bytes (64 bits more than n) make the modulo bias negligible.
 */
import { createECDH, createPrivateKey, createPublicKey, hkdfSync, type KeyObject } from 'node:crypto';

const P256_ORDER = 0xffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551n;

export function ddkgInputKeyMaterial(attributes: Record<string, string>): Buffer {
  const names = Object.keys(attributes).sort();
  if (!names.length) throw new Error('ddkg needs at least one hardware attribute');
  return Buffer.from(names.map((n) => `${n}=${attributes[n]}\n`).join(''), 'utf8');
}

export function deriveDdkgKeyPair(attributes: Record<string, string>, saltB64: string, deviceId: string): { privateKey: KeyObject; publicKey: KeyObject } {
  const okm = Buffer.from(hkdfSync('sha256', ddkgInputKeyMaterial(attributes), Buffer.from(saltB64, 'base64'), Buffer.from(`leafgate-ddkg-v1\n${deviceId}`, 'utf8'), 48));
  const d = (BigInt('0x' + okm.toString('hex')) % (P256_ORDER - 1n)) + 1n;
  const dBytes = Buffer.from(d.toString(16).padStart(64, '0'), 'hex');
  const ecdh = createECDH('prime256v1');
  ecdh.setPrivateKey(dBytes);
  const point = ecdh.getPublicKey(); // 0x04 || X || Y
  const b64u = (b: Buffer) => b.toString('base64url');
  const jwk = { kty: 'EC', crv: 'P-256', d: b64u(dBytes), x: b64u(point.subarray(1, 33)), y: b64u(point.subarray(33, 65)) };
  const privateKey = createPrivateKey({ key: jwk, format: 'jwk' });
  return { privateKey, publicKey: createPublicKey(privateKey) };
}
