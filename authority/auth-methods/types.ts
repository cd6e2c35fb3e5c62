import type { KeyObject } from 'node:crypto';
import type { AuthMessage, AuthMethod, RegisterMessage } from '../../protocol/index.ts';
import type { DevicePolicy } from '../policy/index.ts';
import type { AuthorityStore, ChallengeRow, DevicePatch, DeviceRow } from '../store/index.ts';

export interface MethodContext {
  store: AuthorityStore;
  policy: DevicePolicy;
  deviceId: string;
  group: string;
  gatewayId: string;
  /** Null on the device's first registration. */
  device: DeviceRow | null;
  now: number;
}

export interface RegisterResult {
  /** Remembered with the challenge and handed back to `resolveKey`. */
  context: Record<string, unknown>;
  /** Sent to the device with the challenge (ddkg). */
  salt?: string;
  /** Fields of a device row created by this registration. */
  deviceFields: Partial<DeviceRow>;
}

export interface ResolvedKey {
  key: KeyObject;
  /**
   * What a verified signature writes, in the transaction that also opens the auth session:
   * the device's enrollment fields, and the one-time enrollment code it burns (only a
   * verified signature burns it, so a wrong key cannot waste it).
   */
  onVerified: { devicePatch: DevicePatch; consumeCode?: { codeHash: string } };
}

/** One way of proving identity (cf. step-ca provisioners): checked at register, then at auth. */
export interface AuthMethodHandler {
  readonly name: AuthMethod;
  begin(ctx: MethodContext, msg: RegisterMessage): Promise<RegisterResult>;
  resolveKey(ctx: MethodContext, challenge: ChallengeRow, msg: AuthMessage): Promise<ResolvedKey>;
}
