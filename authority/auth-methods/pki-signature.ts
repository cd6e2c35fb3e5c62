/**
 * pki-signature: the device holds a factory key and a birth certificate issued by a
 * manufacturer CA that the group's policy trusts. Register checks the birth certificate's
 * chain and that it names this device; auth checks the challenge signature with its key.
 */
import { X509Certificate, createPublicKey } from 'node:crypto';
import { LeafgateError, pkix } from '../../protocol/index.ts';
import type { AuthMethodHandler } from './types.ts';

export const pkiSignature: AuthMethodHandler = {
  name: 'pki-signature',

  async begin(ctx, msg) {
    let birth: X509Certificate;
    try {
      birth = new X509Certificate(pkix.fromPem(msg.birthCert ?? '', 'CERTIFICATE'));
    } catch {
      throw new LeafgateError('bad_certificate', 'birthCert cannot be parsed');
    }
    const anchors = ctx.policy.pkiSignature.manufacturerCAs.flatMap((pem) => pkix.parseCertificates(pem));
    if (!anchors.length) throw new LeafgateError('policy_violation', `group ${ctx.group} trusts no manufacturer CA`);
    const check = pkix.verifyChain(birth, [], anchors, new Date(ctx.now));
    if (!check.ok) throw new LeafgateError('auth_failed', `birth certificate rejected: ${check.reason}`);
    const wanted = ctx.policy.pkiSignature.deviceIdFrom === 'CN' ? pkix.OID.commonName : pkix.OID.serialNumber;
    const names = pkix.certificateSubject(birth.raw).filter(([oid]) => oid === wanted).map(([, v]) => v);
    if (names.length !== 1 || names[0] !== ctx.deviceId) {
      throw new LeafgateError('auth_failed', `birth certificate does not name device ${ctx.deviceId}`);
    }
    return {
      context: { birthCert: birth.toString() },
      deviceFields: { birthCertFingerprint: birth.fingerprint256 },
    };
  },

  async resolveKey(ctx, challenge) {
    const pem = challenge.context.birthCert;
    if (typeof pem !== 'string') throw new LeafgateError('internal', 'challenge lost its birth certificate');
    const key = createPublicKey(new X509Certificate(pem).publicKey.export({ type: 'spki', format: 'pem' }));
    const fingerprint = new X509Certificate(pem).fingerprint256;
    return {
      key,
      onVerified: async () => {
        await ctx.store.updateDevice(ctx.deviceId, { status: 'enrolled', birthCertFingerprint: fingerprint, gatewayId: ctx.gatewayId }, ctx.now);
      },
    };
  },
};
