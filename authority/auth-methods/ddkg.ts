/**
 * ddkg (device-derived key generation): the device stores no key; it re-derives an EC P-256
 * key pair from its hardware attributes with HKDF (RFC 5869) over an authority-issued salt.
 * The first enrollment of its public key is gated by the group's policy (allow-list,
 * one-time code, or auto-approve); after that, every auth is a challenge signature with the
 * enrolled key, so a second party that claims the same id cannot take it over.
 */
import { createHash, createPublicKey, randomBytes, type KeyObject } from 'node:crypto';
import { LeafgateError, pkix } from '../../protocol/index.ts';
import { matchesPattern } from '../policy/index.ts';
import type { AuthMethodHandler } from './types.ts';

export const DDKG_SALT_BYTES = 32;

export function hashEnrollmentCode(code: string): string {
  return createHash('sha256').update(`leafgate-enrollment-code\n${code}`).digest('hex');
}

function spkiOf(key: KeyObject): Buffer {
  return key.export({ type: 'spki', format: 'der' });
}

export const ddkg: AuthMethodHandler = {
  name: 'ddkg',

  async begin(ctx, msg) {
    // A first enrollment that the group's gate refuses anyway is refused here, before a
    // device row exists: register must not let anyone create rows for arbitrary ids. (Auth
    // checks again: the policy may change in between.)
    if (!ctx.device?.ddkgPublicKey) {
      const gate = ctx.policy.ddkg.enrollment;
      if (gate === 'allow-list' && !ctx.policy.ddkg.allowList.some((p) => matchesPattern(ctx.deviceId, p))) {
        throw new LeafgateError('enrollment_required', `device ${ctx.deviceId} is not on the ddkg allow-list of group ${ctx.group}`);
      }
      if (gate === 'one-time-code' && msg.enrollmentCode === undefined) throw new LeafgateError('enrollment_required', 'an enrollmentCode is required');
    }
    const salt = ctx.device?.ddkgSalt ?? randomBytes(DDKG_SALT_BYTES).toString('base64');
    const context: Record<string, unknown> = {};
    if (msg.enrollmentCode !== undefined) context.enrollmentCodeHash = hashEnrollmentCode(msg.enrollmentCode);
    return { context, salt, deviceFields: { ddkgSalt: salt } };
  },

  async resolveKey(ctx, challenge, msg) {
    let offered: KeyObject | undefined;
    if (msg.publicKey !== undefined) {
      try {
        offered = createPublicKey({ key: msg.publicKey, format: 'pem' });
      } catch {
        throw new LeafgateError('bad_request', 'publicKey cannot be parsed');
      }
      const desc = pkix.keyDescription(offered);
      if (desc.keyType !== 'ec' || desc.keySize !== 256) throw new LeafgateError('policy_violation', 'ddkg keys are EC P-256');
    }
    const enrolled = ctx.device?.ddkgPublicKey;
    if (enrolled) {
      const key = createPublicKey(enrolled);
      if (offered && !spkiOf(offered).equals(spkiOf(key))) throw new LeafgateError('auth_failed', 'public key differs from the enrolled ddkg key');
      return { key, onVerified: { devicePatch: { gatewayId: ctx.gatewayId } } };
    }
    if (!offered) throw new LeafgateError('bad_request', 'publicKey is required for the first ddkg enrollment');
    const gate = ctx.policy.ddkg.enrollment;
    const codeHash = challenge.context.enrollmentCodeHash;
    if (gate === 'allow-list' && !ctx.policy.ddkg.allowList.some((p) => matchesPattern(ctx.deviceId, p))) {
      throw new LeafgateError('enrollment_required', `device ${ctx.deviceId} is not on the ddkg allow-list of group ${ctx.group}`);
    }
    if (gate === 'one-time-code' && typeof codeHash !== 'string') throw new LeafgateError('enrollment_required', 'an enrollmentCode is required');
    const key = offered;
    return {
      key,
      onVerified: {
        devicePatch: { status: 'enrolled', ddkgPublicKey: key.export({ type: 'spki', format: 'pem' }) as string, gatewayId: ctx.gatewayId },
        ...(gate === 'one-time-code' ? { consumeCode: { codeHash: codeHash as string } } : {}),
      },
    };
  },
};
