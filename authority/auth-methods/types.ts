import type { KeyObject } from 'node:crypto';
import type { AuthMessage, AuthMethod, RegisterMessage } from '../../protocol/index.ts';
import type { DevicePolicy } from '../policy/index.ts';
import type { AuthorityStore, ChallengeRow, DeviceRow } from '../store/index.ts';

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
  /** Runs only after the signature verified: enrollment side effects. */
  onVerified(): Promise<void>;
}

/** One way of proving identity (cf. step-ca provisioners): checked at register, then at auth. */
export interface AuthMethodHandler {
  readonly name: AuthMethod;
  begin(ctx: MethodContext, msg: RegisterMessage): Promise<RegisterResult>;
  resolveKey(ctx: MethodContext, challenge: ChallengeRow, msg: AuthMessage): Promise<ResolvedKey>;
}
