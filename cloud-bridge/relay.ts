/**
 * The onboarding relay: device messages on `up/register|auth|csr` are validated, checked
 * against the connection's state, forwarded to the authority over mTLS, and the answer is
 * published to the device's `down/` topic. Every failure becomes a `down/error` message
 * with a stable code; nothing is retried behind the device's back (the device owns the
 * requestId and may repeat it, which is idempotent at the authority).
 */
import type { Logger } from 'pino';
import {
  LeafgateError,
  parseJsonObject,
  requestIdOf,
  toLeafgateError,
  validateAuth,
  validateCsr,
  validateRegister,
  type CertMessage,
  type ChallengeMessage,
  type DownKind,
  type InstructionMessage,
} from '../protocol/index.ts';
import type { DeviceSession } from '../plugins/index.ts';
import type { AuthorityClient } from './authority-client.ts';

export interface RelayOptions {
  authority: AuthorityClient;
  publish(deviceId: string, kind: DownKind, body: unknown): void;
  logger: Logger;
  /** Outcome hook for metrics and the onboarding log. */
  onOutcome?(event: { deviceId: string; step: string; ok: boolean; code?: string; ms: number; onboardingMs?: number }): void;
}

/** Cap on challenges remembered per connection: a device re-registering in a loop cannot grow it. */
const MAX_CHALLENGES_PER_SESSION = 8;

export class OnboardingRelay {
  constructor(private readonly opts: RelayOptions) {}

  /** Handles one accepted publish on an onboarding topic. Never throws. */
  async handle(session: DeviceSession, kind: string, payload: Buffer): Promise<void> {
    const started = performance.now();
    const deviceId = session.deviceId;
    let requestId: string | undefined;
    let onboardingMs: number | undefined;
    try {
      const obj = parseJsonObject(payload);
      requestId = requestIdOf(obj);
      switch (kind) {
        case 'register': {
          const msg = validateRegister(obj);
          session.onboardingStartedAt ??= Date.now();
          const challenge = await this.opts.authority.post<ChallengeMessage>('/v1/devices/register', { ...msg, deviceId });
          if (session.challengeIds.size >= MAX_CHALLENGES_PER_SESSION) session.challengeIds.delete(session.challengeIds.values().next().value!);
          session.challengeIds.add(challenge.challengeId);
          this.opts.publish(deviceId, 'challenge', challenge);
          break;
        }
        case 'auth': {
          const msg = validateAuth(obj);
          // A challenge answered here must have been issued to this very connection.
          if (!session.challengeIds.has(msg.challengeId)) throw new LeafgateError('challenge_expired', 'challenge was not issued on this connection');
          const instruction = await this.opts.authority.post<InstructionMessage>('/v1/devices/auth', { ...msg, deviceId });
          session.challengeIds.delete(msg.challengeId);
          session.authenticated = true;
          this.opts.publish(deviceId, 'instruction', instruction);
          break;
        }
        case 'csr': {
          const msg = validateCsr(obj);
          if (!session.authenticated) throw new LeafgateError('not_authenticated', 'authenticate (register + auth) before sending a CSR');
          const cert = await this.opts.authority.post<CertMessage>('/v1/devices/csr', { ...msg, deviceId });
          this.opts.publish(deviceId, 'cert', cert);
          if (session.onboardingStartedAt !== undefined) onboardingMs = Date.now() - session.onboardingStartedAt;
          break;
        }
        default:
          throw new LeafgateError('forbidden', `up/${kind} is not an onboarding topic`);
      }
      this.opts.onOutcome?.({ deviceId, step: kind, ok: true, ms: performance.now() - started, onboardingMs });
    } catch (err) {
      const e = toLeafgateError(err);
      if (e.code === 'internal') this.opts.logger.error({ err, deviceId, requestId, step: kind }, 'onboarding step failed');
      else this.opts.logger.info({ deviceId, requestId, step: kind, code: e.code }, e.message);
      this.opts.publish(deviceId, 'error', e.toBody(requestId));
      this.opts.onOutcome?.({ deviceId, step: kind, ok: false, code: e.code, ms: performance.now() - started });
    }
  }
}
