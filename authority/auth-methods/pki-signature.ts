/**
 * pki-signature: the device holds a factory key and a birth certificate issued by a
 * manufacturer CA that the group's policy trusts. Register checks the birth certificate's
 * chain and that it names this device; auth checks the challenge signature with its key.
 */
import { X509Certificate, type KeyObject } from 'node:crypto';
import { LeafgateError, pkix } from '../../protocol/index.ts';
import type { AuthMethodHandler } from './types.ts';

/** Parsed manufacturer CAs per policy list (the list is frozen config; parsing is not free). */
const anchorCache = new WeakMap<string[], X509Certificate[]>();
function manufacturerAnchors(pems: string[]): X509Certificate[] {
  let anchors = anchorCache.get(pems);
  if (!anchors) {
    anchors = pems.flatMap((pem) => pkix.parseCertificates(pem));
    anchorCache.set(pems, anchors);
  }
  return anchors;
}

export const pkiSignature: AuthMethodHandler = {
  name: 'pki-signature',

  async begin(ctx, msg) {
    let birth: X509Certificate;
    try {
      birth = new X509Certificate(pkix.fromPem(msg.birthCert ?? '', 'CERTIFICATE'));
    } catch {
      throw new LeafgateError('bad_certificate', 'birthCert cannot be parsed');
    }
    const anchors = manufacturerAnchors(ctx.policy.pkiSignature.manufacturerCAs);
    if (!anchors.length) throw new LeafgateError('policy_violation', `group ${ctx.group} trusts no manufacturer CA`);
    const check = pkix.verifyChain(birth, [], anchors, new Date(ctx.now));
    if (!check.ok) throw new LeafgateError('auth_failed', `birth certificate rejected: ${check.reason}`);
    const wanted = ctx.policy.pkiSignature.deviceIdFrom === 'CN' ? pkix.OID.commonName : pkix.OID.serialNumber;
    const names = pkix.certificateSubject(birth.raw).filter(([oid]) => oid === wanted).map(([, v]) => v);
    if (names.length !== 1 || names[0] !== ctx.deviceId) {
      throw new LeafgateError('auth_failed', `birth certificate does not name device ${ctx.deviceId}`);
    }
    return {
      // The key and fingerprint ride along so that auth need not decode the certificate
      // again (an X.509 decode is ~0.15 ms of OpenSSL 3.0; the key import alone is a third).
      context: { birthCert: birth.toString(), birthSpki: pkix.spkiDerOf(birth.raw).toString('base64'), birthFingerprint: birth.fingerprint256 },
      deviceFields: { birthCertFingerprint: birth.fingerprint256 },
    };
  },

  async resolveKey(ctx, challenge) {
    const pem = challenge.context.birthCert;
    if (typeof pem !== 'string') throw new LeafgateError('internal', 'challenge lost its birth certificate');
    const { birthSpki, birthFingerprint } = challenge.context;
    let key: KeyObject;
    let fingerprint: string;
    if (typeof birthSpki === 'string' && typeof birthFingerprint === 'string') {
      key = pkix.importSpki(Buffer.from(birthSpki, 'base64')).publicKey;
      fingerprint = birthFingerprint;
    } else {
      // A challenge stored before the key rode along.
      const birth = new X509Certificate(pem);
      key = birth.publicKey;
      fingerprint = birth.fingerprint256;
    }
    return { key, onVerified: { devicePatch: { status: 'enrolled', birthCertFingerprint: fingerprint, gatewayId: ctx.gatewayId } } };
  },
};
