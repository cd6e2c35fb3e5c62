/**
 * The onboarding relay. Register and auth are interactive: validated, checked against the
 * connection's state, forwarded to the authority over mTLS, answered on `down/`. CSRs are
 * durable: accepted into the outbox before the broker acknowledges them (this class is
 * also a broker plugin for that step), then sent by the outbox worker, so an accepted CSR
 * survives a gateway crash and an authority outage. Every failure becomes `down/error`
 * with a stable code.
 */
import type { Logger } from 'pino';
import {
  LeafgateError,
  parseJsonObject,
  requestIdOf,
  toLeafgateError,
  validateAuth,
  validateCsr,
  validateEnroll,
  validateRegister,
  validateRenewalCsr,
  COMPACT_ANSWER_KINDS,
  type CertMessage,
  type ChallengeMessage,
  type DownKind,
  type OfferMessage,
  type InstructionMessage,
} from '../protocol/index.ts';
import { PublishRefusal, parsedTopicOf, type BrokerPlugin, type DeviceSession, type SessionRegistry } from '../plugins/index.ts';
import type { AuthorityClient } from './authority-client.ts';
import type { AuthorityGate } from './authority-gate.ts';
import type { OutboxStore } from './outbox.ts';
import type { OutboxWorker } from './outbox-worker.ts';

export interface RelayOptions {
  authority: AuthorityClient;
  /** Bounds requests in flight to the authority (shared with the outbox worker). */
  gate: AuthorityGate;
  sessions: SessionRegistry;
  outbox: OutboxStore;
  worker: OutboxWorker;
  publish(deviceId: string, kind: DownKind, body: unknown): void;
  logger: Logger;
  /** Outcome hook for metrics. */
  onOutcome?(event: { deviceId: string; step: string; ok: boolean; code?: string; ms: number }): void;
}

/** An operational session, or a bootstrap one that authenticated on its connection. */
export function mayReceiveStored(session: DeviceSession): boolean {
  return session.kind === 'operational' || session.authenticated;
}

/** Cap on challenges remembered per connection: a device re-registering in a loop cannot grow it. */
const MAX_CHALLENGES_PER_SESSION = 8;
/**
 * CSRs an authenticated connection sent that could not be stored, remembered (in memory)
 * so that the identical request re-sent on a later connection is taken: at most this many,
 * for at most the authority's default CSR deadline.
 */
const MAX_UNSTORED = 10_000;
const UNSTORED_TTL_MS = 10 * 60_000;

export class OnboardingRelay {
  /** Group asked for devices that name none (module twin `policyGroup`). */
  defaultGroup: string | undefined;

  /**
   * `${deviceId}\n${requestId}` -> the exact CSR an authenticated connection sent when the
   * outbox could not store it (gateway_unavailable). The device is told to re-send the same
   * message later, and by then its connection may have dropped: a new connection has no
   * authentication of its own, but the identical request (same requestId, byte-identical
   * CSR, which only the device and this gateway have seen) was already authorised. Only that
   * re-send is accepted; any other CSR on an unauthenticated connection is not. Lost on a
   * gateway restart: the device then authenticates again and re-sends the same request.
   */
  private readonly unstored = new Map<string, { csr: string; at: number }>();

  constructor(private readonly opts: RelayOptions) {}

  private rememberUnstored(key: string, csr: string): void {
    this.unstored.delete(key);
    if (this.unstored.size >= MAX_UNSTORED) this.unstored.delete(this.unstored.keys().next().value!);
    this.unstored.set(key, { csr, at: Date.now() });
  }

  /** True when this exact request came from an authenticated connection and was not stored. */
  private wasAuthorised(key: string, csr: string): boolean {
    const u = this.unstored.get(key);
    if (!u) return false;
    if (Date.now() - u.at > UNSTORED_TTL_MS) {
      this.unstored.delete(key);
      return false;
    }
    return u.csr === csr;
  }

  /**
   * The broker-plugin face: runs last in the chain, before PUBACK. A CSR is validated and
   * written to the outbox here; a repeat of a stored requestId gets its stored answer.
   */
  plugin(): BrokerPlugin {
    return {
      name: 'outbox',
      authorizePublish: (client, packet) => {
        if (parsedTopicOf(client, packet.topic)?.kind !== 'csr') return;
        return this.acceptCsr(client, packet);
      },
    };
  }

  /** Validates a CSR publish and stores it in the outbox; a refusal is thrown as PublishRefusal. */
  private async acceptCsr(client: import('aedes').Client, packet: { payload: Buffer | string }): Promise<void> {
    const session = this.opts.sessions.get(client);
    if (!session) return;
    const payload = Buffer.isBuffer(packet.payload) ? packet.payload : Buffer.from(packet.payload);
    let requestId: string | undefined;
    let authorised: { key: string; csr: string } | undefined;
    try {
      const obj = parseJsonObject(payload);
      requestId = requestIdOf(obj);
      const renewal = session.kind === 'operational';
      // A renewal may carry the device's proof (proof + signedAt): validated here, stored
      // and forwarded as the device sent it; only the authority can check it.
      const msg = renewal ? validateRenewalCsr(obj) : validateCsr(obj);
      const key = `${session.deviceId}\n${msg.requestId}`;
      if (!renewal && (session.authenticated || this.wasAuthorised(key, msg.csr))) authorised = { key, csr: msg.csr };
      const existing = await this.opts.outbox.get(session.deviceId, msg.requestId);
      if (existing) {
        // A re-query (e.g. after a reconnect): same body -> the stored answer, or `pending`.
        if (existing.body.csr !== msg.csr) throw new LeafgateError('request_conflict', `requestId ${msg.requestId} was already used for another CSR`);
        setImmediate(() => void this.opts.worker.deliverFresh(session.deviceId, msg.requestId));
        return;
      }
      if (!renewal && !authorised) throw new LeafgateError('not_authenticated', 'authenticate (register + auth) before sending a CSR');
      const body: Record<string, unknown> = { ...msg, deviceId: session.deviceId };
      if (renewal) body.currentSerial = session.certSerial;
      await this.opts.outbox.accept(session.deviceId, msg.requestId, renewal ? 'renew' : 'csr', body, Date.now());
      if (authorised) this.unstored.delete(key);
      this.opts.worker.kick();
    } catch (err) {
      const e = toLeafgateError(err);
      if (e.code === 'internal' || e.code === 'gateway_unavailable') this.opts.logger.error({ err: e.message, code: e.code, deviceId: session.deviceId }, 'CSR could not be queued');
      // Not stored: the same request may come back on another connection (see `unstored`).
      if (authorised && e.code === 'gateway_unavailable') this.rememberUnstored(authorised.key, authorised.csr);
      this.opts.onOutcome?.({ deviceId: session.deviceId, step: 'csr', ok: false, code: e.code, ms: 0 });
      throw new PublishRefusal(e.code, e.message, e.retryAfterMs, requestId);
    }
  }

  /**
   * Answers not yet known to have arrived, sent when the device subscribes, and to a
   * bootstrap session once it has authenticated. A device that connects with a certificate
   * has everything up to it; it still gets a renewal answer if it is using the very
   * certificate that renewal replaces.
   *
   * Only to a session that proved it is the device: an operational one (its certificate),
   * or a bootstrap one that answered the authority's challenge on this connection. A bare
   * bootstrap claim of the id gets nothing: anyone can claim an offline device's id.
   */
  async deliverStored(session: DeviceSession): Promise<void> {
    if (!mayReceiveStored(session)) return;
    try {
      for (const entry of await this.opts.outbox.undelivered(session.deviceId)) {
        const stillOnOld = entry.kind === 'renew' && entry.body.currentSerial === session.certSerial;
        if (session.kind === 'operational' && entry.state === 'done' && !stillOnOld) await this.opts.worker.markDelivered(entry);
        else await this.opts.worker.deliver(entry);
      }
    } catch (err) {
      // The store is down: the answers stay undelivered and go out on the next subscribe.
      this.opts.logger.warn({ err: (err as Error).message, deviceId: session.deviceId }, 'stored answers could not be read');
    }
  }

  /**
   * The compact flow (up/begin, up/enroll): each answered on its one down kind, refusals
   * included (COMPACT_ANSWER_KINDS), so a client waiting on one response topic sees either.
   * Nothing here is bound to the connection: the enroll's signature covers the challenge and
   * the CSR, which the authority checks together, so the second exchange may come on a new
   * connection (one `mosquitto_rr` per exchange). Not durable at the gateway: an enroll the
   * authority did not answer is refused (authority_unavailable, with retryAfterMs) and the
   * device re-sends the identical message, which the authority answers idempotently.
   */
  private async handleCompact(session: DeviceSession, kind: 'begin' | 'enroll', payload: Buffer): Promise<void> {
    const started = performance.now();
    const deviceId = session.deviceId;
    const answerKind = COMPACT_ANSWER_KINDS[kind];
    let requestId: string | undefined;
    try {
      const obj = parseJsonObject(payload);
      requestId = requestIdOf(obj);
      if (kind === 'begin') {
        const msg = validateRegister(obj);
        if (msg.group === undefined && this.defaultGroup) msg.group = this.defaultGroup;
        session.onboardingStartedAt ??= Date.now();
        const offer = await this.opts.gate.run(
          () => this.opts.authority.post<OfferMessage>('/v1/devices/register', { ...msg, compact: true, deviceId }),
          (retryAfterMs) => this.opts.publish(deviceId, 'pending', { requestId: msg.requestId, retryAfterMs }),
        );
        this.opts.publish(deviceId, answerKind, offer);
      } else {
        const msg = validateEnroll(obj);
        const cert = await this.opts.gate.run(
          () => this.opts.authority.post<CertMessage>('/v1/devices/enroll', { ...msg, deviceId }),
          (retryAfterMs) => this.opts.publish(deviceId, 'pending', { requestId: msg.requestId, retryAfterMs }),
        );
        this.opts.publish(deviceId, answerKind, cert);
      }
      this.opts.onOutcome?.({ deviceId, step: kind, ok: true, ms: performance.now() - started });
    } catch (err) {
      const e = toLeafgateError(err);
      if (e.code === 'internal') this.opts.logger.error({ err, deviceId, requestId, step: kind }, 'onboarding step failed');
      else this.opts.logger.info({ deviceId, requestId, step: kind, code: e.code }, e.message);
      this.opts.publish(deviceId, answerKind, e.toBody(requestId));
      this.opts.onOutcome?.({ deviceId, step: kind, ok: false, code: e.code, ms: performance.now() - started });
    }
  }

  /** Handles one accepted publish on up/register, up/auth, up/begin or up/enroll. Never throws. */
  async handle(session: DeviceSession, kind: 'register' | 'auth' | 'begin' | 'enroll', payload: Buffer): Promise<void> {
    if (kind === 'begin' || kind === 'enroll') return this.handleCompact(session, kind, payload);
    const started = performance.now();
    const deviceId = session.deviceId;
    let requestId: string | undefined;
    try {
      const obj = parseJsonObject(payload);
      requestId = requestIdOf(obj);
      if (kind === 'register') {
        const msg = validateRegister(obj);
        if (msg.group === undefined && this.defaultGroup) msg.group = this.defaultGroup;
        session.onboardingStartedAt ??= Date.now();
        const challenge = await this.opts.gate.run(
          () => this.opts.authority.post<ChallengeMessage>('/v1/devices/register', { ...msg, deviceId }),
          (retryAfterMs) => this.opts.publish(deviceId, 'pending', { requestId: msg.requestId, retryAfterMs }),
        );
        if (session.challengeIds.size >= MAX_CHALLENGES_PER_SESSION) session.challengeIds.delete(session.challengeIds.values().next().value!);
        session.challengeIds.add(challenge.challengeId);
        this.opts.publish(deviceId, 'challenge', challenge);
      } else {
        const msg = validateAuth(obj);
        // A challenge answered here must have been issued to this very connection.
        if (!session.challengeIds.has(msg.challengeId)) throw new LeafgateError('challenge_expired', 'challenge was not issued on this connection');
        const instruction = await this.opts.gate.run(
          () => this.opts.authority.post<InstructionMessage>('/v1/devices/auth', { ...msg, deviceId }),
          (retryAfterMs) => this.opts.publish(deviceId, 'pending', { requestId: msg.requestId, retryAfterMs }),
        );
        // The id stays known: a repeat of this answer reaches the authority, which says `replayed`.
        const first = !session.authenticated;
        session.authenticated = true;
        this.opts.publish(deviceId, 'instruction', instruction);
        // Now proven: what was stored for the device (e.g. a certificate it missed) goes out.
        if (first) void this.deliverStored(session);
      }
      this.opts.onOutcome?.({ deviceId, step: kind, ok: true, ms: performance.now() - started });
    } catch (err) {
      const e = toLeafgateError(err);
      if (e.code === 'internal') this.opts.logger.error({ err, deviceId, requestId, step: kind }, 'onboarding step failed');
      else this.opts.logger.info({ deviceId, requestId, step: kind, code: e.code }, e.message);
      this.opts.publish(deviceId, 'error', e.toBody(requestId));
      this.opts.onOutcome?.({ deviceId, step: kind, ok: false, code: e.code, ms: performance.now() - started });
    }
  }
}
