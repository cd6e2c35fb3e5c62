/**
 * Device onboarding at the authority: register -> challenge, auth -> instruction,
 * csr -> certificate (the classic flow), or in two exchanges (the compact flow):
 * register{compact} -> challenge + instruction, enroll (challenge answer and CSR under one
 * signature) -> certificate. Each operation is a short list of named steps; every refusal is
 * audited with its code; every answer is stored under (device, requestId) so a repeated
 * request gets the same answer and never a second certificate.
 */
import { X509Certificate, createHash, randomBytes, verify } from 'node:crypto';
import { hostname } from 'node:os';
import {
  LeafgateError,
  challengeSigningInput,
  enrollSigningInput,
  pkix,
  renewalSigningInput,
  toLeafgateError,
  type AuthMessage,
  type CertMessage,
  type ChallengeMessage,
  type CsrMessage,
  type EnrollMessage,
  type InstructionMessage,
  type OfferMessage,
  type OfferedInstruction,
  type RegisterMessage,
  type RenewalCsrMessage,
} from '../protocol/index.ts';
import { AUTH_METHOD_HANDLERS, type MethodContext } from './auth-methods/index.ts';
import { BACKDATE_MS, type CaConnector } from './ca/index.ts';
import type { AuthorityConfig } from './config.ts';
import { buildInstruction, checkCsrAgainstInstruction, chooseKey, type DevicePolicy } from './policy/index.ts';
import type { AuthorityStore, CertificateRow, ChallengeRow, DevicePatch, DeviceRow, RequestRow } from './store/index.ts';
import { renewalKey } from './renewal.ts';

function spkiDerOfPem(pem: string): Buffer {
  return pkix.spkiDerOf(pkix.fromPem(pem, 'CERTIFICATE'));
}

export interface OnboardingDeps {
  store: AuthorityStore;
  ca: CaConnector;
  config: Pick<AuthorityConfig, 'policies' | 'defaultGroup' | 'challengeTtlSeconds' | 'csrDeadlineSeconds'>;
  /** Outcome of every request (metrics). */
  onOutcome?(action: string, outcome: string, who: { gatewayId: string; deviceId: string; requestId: string }): void;
  /** Injected so expiry is tested without sleeping. */
  now?: () => number;
  /**
   * A certificate the external CA signed that no answer will carry (`discarded`): leafgate
   * knows it, so it is revoked (reason superseded) and the gateways refuse it. Errors are the
   * caller's to log; the audit line stays either way.
   */
  onDiscarded?(row: CertificateRow, why: string): Promise<void>;
}

type Kind = RequestRow['kind'];
/** The requests that may forward a CSR to an external CA. */
const EXTERNAL_KINDS: ReadonlySet<Kind> = new Set(['csr', 'enroll', 'renew']);

export function bodyHash(body: unknown): string {
  return createHash('sha256').update(JSON.stringify(body)).digest('hex');
}

export class DeviceOnboarding {
  private readonly store: AuthorityStore;
  private readonly ca: CaConnector;
  private readonly config: OnboardingDeps['config'];
  private readonly now: () => number;
  private readonly onOutcome?: OnboardingDeps['onOutcome'];
  private readonly onDiscarded?: OnboardingDeps['onDiscarded'];
  /** Serializes requests per device in this process; the store's keys guard across processes. */
  private readonly locks = new Map<string, Promise<unknown>>();
  /** This node's name on its external-CA claims (several authority nodes share one database). */
  readonly node = `${hostname().slice(0, 64)}/${process.pid}/${randomBytes(6).toString('hex')}`;
  /** Errors whose audit line was written with a stored answer (see storeRefusal). */
  private readonly audited = new WeakSet<object>();

  constructor(deps: OnboardingDeps) {
    this.store = deps.store;
    this.ca = deps.ca;
    this.config = deps.config;
    this.now = deps.now ?? Date.now;
    this.onOutcome = deps.onOutcome;
    this.onDiscarded = deps.onDiscarded;
  }

  register(gatewayId: string, deviceId: string, msg: RegisterMessage): Promise<ChallengeMessage> {
    return this.run('register', gatewayId, deviceId, msg.requestId, () => this.doRegister(gatewayId, deviceId, msg));
  }

  auth(gatewayId: string, deviceId: string, msg: AuthMessage): Promise<InstructionMessage> {
    return this.run('auth', gatewayId, deviceId, msg.requestId, () => this.doAuth(gatewayId, deviceId, msg));
  }

  csr(gatewayId: string, deviceId: string, msg: CsrMessage): Promise<CertMessage> {
    return this.run('csr', gatewayId, deviceId, msg.requestId, () => this.doCsr(gatewayId, deviceId, msg));
  }

  /**
   * The compact flow's second exchange: the challenge answer and the CSR, verified together,
   * the challenge burnt and the certificate issued in one commit. No auth session, so no
   * particular gateway connection: the signature binds the CSR to the challenge.
   */
  enroll(gatewayId: string, deviceId: string, msg: EnrollMessage): Promise<CertMessage> {
    return this.run('enroll', gatewayId, deviceId, msg.requestId, () => this.doEnroll(gatewayId, deviceId, msg));
  }

  /** A CSR from a device connected with its certificate `currentSerial` (the gateway vouches for the session). */
  renew(gatewayId: string, deviceId: string, msg: RenewalCsrMessage & { currentSerial: string }): Promise<CertMessage> {
    return this.run('renew', gatewayId, deviceId, msg.requestId, () => this.doRenew(gatewayId, deviceId, msg));
  }

  /**
   * Per-device serialization plus the audit row for every refusal. With an external CA, a
   * request that may go there is answered within `answerWithinMs` whatever the CA does: if it
   * has not answered by then, `authority_unavailable` with retryAfterMs goes back to the gateway
   * (before its own request timeout, after which it would retry while this one still runs),
   * and the call goes on: its certificate is committed under the requestId and the retry gets
   * it. A repeat of a requestId whose CSR is with the external CA right now (its claim is live,
   * on this node or another) is answered so at once, without waiting behind it.
   */
  private async run<T>(action: Kind, gatewayId: string, deviceId: string, requestId: string, fn: () => Promise<T>): Promise<T> {
    const timing = this.ca.external && EXTERNAL_KINDS.has(action) ? this.ca.timing : undefined;
    // renew first checks which gateway asks: another gateway learns nothing of a live claim.
    const peek = timing && action !== 'renew' ? () => this.refuseIfClaimed(deviceId, requestId, timing) : undefined;
    // The peek comes before queueing behind the device's lock, which a claimed request here holds.
    const next = peek ? peek().then(() => this.serialized(deviceId, fn)) : this.serialized(deviceId, fn);
    const settled = next.then((answer) => {
      this.onOutcome?.(action, 'ok', { gatewayId, deviceId, requestId });
      return answer;
    }, (err: unknown) => this.refused(action, gatewayId, deviceId, requestId, err));
    if (!timing) return settled;
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new LeafgateError('authority_unavailable', `the external CA has not answered within ${timing.answerWithinMs} ms; the request goes on and its answer is kept for this requestId`, {
        retryAfterMs: timing.busyRetryAfterMs, detail: { est: 'answer_pending' },
      })), timing.answerWithinMs);
    });
    try {
      return await Promise.race([settled, late]);
    } catch (err) {
      // The answer deadline is audited and counted like any refusal; `settled` goes on alone.
      if (err instanceof LeafgateError && err.detail?.est === 'answer_pending') await this.refused(action, gatewayId, deviceId, requestId, err).catch(() => undefined);
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Runs `fn` after the device's earlier requests in this process. */
  private serialized<T>(deviceId: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(deviceId) ?? Promise.resolve();
    const next = prev.then(fn, fn);
    const tail = next.catch(() => undefined);
    this.locks.set(deviceId, tail);
    void tail.then(() => {
      if (this.locks.get(deviceId) === tail) this.locks.delete(deviceId);
    });
    return next;
  }

  /** Outcome, audit row, then the error as a LeafgateError. */
  private async refused(action: Kind, gatewayId: string, deviceId: string, requestId: string, err: unknown): Promise<never> {
    const e = toLeafgateError(err);
    this.onOutcome?.(action, e.code, { gatewayId, deviceId, requestId });
    if (this.audited.has(e)) throw e;
    await this.store.appendAudit({
      at: this.now(), action, outcome: e.code === 'internal' ? 'error' : 'refused', code: e.code, deviceId, gatewayId, requestId,
      detail: { message: e.message, ...(e.detail ?? {}) },
    });
    throw e;
  }

  private claimBusy(requestId: string, timing: NonNullable<CaConnector['timing']>, holder?: string): LeafgateError {
    return new LeafgateError('authority_unavailable', `requestId ${requestId} is with the external CA already${holder ? ` (authority node ${holder})` : ''}: its answer will be kept for this requestId`, {
      retryAfterMs: timing.busyRetryAfterMs, detail: { est: 'claimed', ...(holder ? { holder } : {}) },
    });
  }

  /** A live claim on the requestId (its CSR is with the external CA): authority_unavailable now. */
  private async refuseIfClaimed(deviceId: string, requestId: string, timing: NonNullable<CaConnector['timing']>): Promise<void> {
    const claim = await this.store.getExternalClaim(deviceId, requestId);
    if (claim && claim.expiresAt > this.now()) throw this.claimBusy(requestId, timing, claim.node);
  }

  /**
   * Before a CSR goes to an external CA (EST, which has no idempotency key): the claim on
   * (device, requestId) in the store, so that one request on one node asks the CA, never two.
   * Whoever finds it taken answers `authority_unavailable` with retryAfterMs; its retry finds
   * the stored answer. Taken, the stored answer is read again: a holder that committed and
   * released just before leaves its answer, not a free way to the CA. The claim lives the EST
   * call's bound plus a margin, so a crashed node's claim is taken over later. Built-in CA: nothing.
   */
  private async claimExternal(deviceId: string, requestId: string, kind: Kind, hash: string): Promise<{ stored: CertMessage } | { release(): Promise<void> }> {
    const timing = this.ca.timing;
    if (!this.ca.external || !timing) return { release: async () => undefined };
    const now = this.now();
    const taken = await this.store.claimExternalRequest({ deviceId, requestId, node: this.node, claimedAt: now, expiresAt: now + timing.claimTtlMs });
    if (!taken) throw this.claimBusy(requestId, timing);
    const release = () => this.store.releaseExternalRequest(deviceId, requestId, this.node).catch(() => undefined);
    try {
      const stored = await this.storedAnswer(deviceId, requestId, kind, hash);
      if (stored) {
        await release();
        return { stored: stored as unknown as CertMessage };
      }
    } catch (err) {
      await release();
      throw err;
    }
    return { release };
  }

  private policyFor(group: string): DevicePolicy {
    const p = this.config.policies[group];
    if (!p) throw new LeafgateError('policy_violation', `unknown device group ${group}`);
    return p;
  }

  /** Same requestId, same body: the stored answer. Same requestId, other body: a conflict. */
  private async storedAnswer(deviceId: string, requestId: string, kind: Kind, hash: string): Promise<Record<string, unknown> | null> {
    const r = await this.store.getRequest(deviceId, requestId);
    if (!r) return null;
    if (r.kind !== kind || r.bodyHash !== hash) throw new LeafgateError('request_conflict', `requestId ${requestId} was already used for another ${r.kind} request`);
    // A stored refusal (the external CA's ca_refused): the same refusal again, the CA not asked.
    const refused = r.response?.refused as { code?: string; message?: string; detail?: Record<string, unknown> } | undefined;
    if (refused && refused.code === 'ca_refused') throw new LeafgateError('ca_refused', refused.message, { detail: { ...(refused.detail ?? {}), storedAnswer: true } });
    return r.response;
  }

  /**
   * With an external CA, `ca_refused` is final for this requestId: it is stored as its answer
   * (with its audit line, one commit) so that a repeat gets the same refusal without the CSR
   * going to the CA again (where each repeat could be another refusal to look at, or another
   * certificate leafgate refuses). Anything else passes through.
   */
  private async storeRefusal<T>(who: { gatewayId: string; deviceId: string; requestId: string }, kind: Kind, hash: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      if (!(err instanceof LeafgateError) || err.code !== 'ca_refused' || !this.ca.external) throw err;
      const now = this.now();
      const detail = { message: err.message, ...(err.detail ?? {}) };
      const stored = await this.store.insertRequest(
        { deviceId: who.deviceId, requestId: who.requestId, kind, bodyHash: hash, response: { refused: { code: err.code, message: err.message, detail: err.detail ?? {} } }, createdAt: now },
        { at: now, action: kind, outcome: 'refused', code: err.code, deviceId: who.deviceId, gatewayId: who.gatewayId, requestId: who.requestId, detail: { ...detail, answerStored: true } },
      ).catch(() => false);
      // Audited with the stored answer: run() does not audit it again.
      if (stored) this.audited.add(err);
      throw err;
    }
  }

  private checkDeviceUsable(device: DeviceRow | null): void {
    if (device?.status === 'disabled') throw new LeafgateError('device_disabled');
  }

  private async doRegister(gatewayId: string, deviceId: string, msg: RegisterMessage): Promise<ChallengeMessage> {
    const hash = bodyHash(msg);
    const stored = await this.storedAnswer(deviceId, msg.requestId, 'register', hash);
    if (stored) return stored as unknown as ChallengeMessage;

    const now = this.now();
    const device = await this.store.getDevice(deviceId);
    this.checkDeviceUsable(device);
    const group = device?.groupName ?? msg.group ?? this.config.defaultGroup;
    if (device && msg.group !== undefined && msg.group !== device.groupName) throw new LeafgateError('policy_violation', `device belongs to group ${device.groupName}`);
    const policy = this.policyFor(group);
    if (!policy.methods.includes(msg.method)) throw new LeafgateError('policy_violation', `group ${group} does not allow ${msg.method}`);
    if (device && device.method !== msg.method) throw new LeafgateError('policy_violation', `device is enrolled with ${device.method}`);

    const ctx: MethodContext = { store: this.store, policy, deviceId, group, gatewayId, device, now };
    const begun = await AUTH_METHOD_HANDLERS[msg.method].begin(ctx, msg);
    const challenge: ChallengeMessage = {
      requestId: msg.requestId,
      challengeId: randomBytes(16).toString('base64url'),
      nonce: randomBytes(32).toString('base64'),
      expiresAt: new Date(now + this.config.challengeTtlSeconds * 1000).toISOString(),
      method: msg.method,
    };
    if (begun.salt) challenge.salt = begun.salt;
    // Compact flow: the instruction comes with the challenge and is kept with it; the enroll
    // that answers the challenge is checked against exactly this.
    let offered: OfferedInstruction | undefined;
    if (msg.compact) {
      const built = buildInstruction(policy, { requestId: msg.requestId, deviceId, group, key: chooseKey(policy, msg.keyPreference), csrDeadline: new Date(now) });
      offered = { subject: built.subject, keyType: built.keyType, keySize: built.keySize, sans: built.sans, validityDays: built.validityDays };
      (challenge as OfferMessage).instruction = offered;
    }
    // One commit: the answer, the device row of a first registration, the challenge, the audit line.
    const recorded = await this.store.recordRegistration({
      request: { deviceId, requestId: msg.requestId, kind: 'register', bodyHash: hash, response: challenge as unknown as Record<string, unknown>, createdAt: now },
      device: device ? null : {
        id: deviceId, groupName: group, method: msg.method, status: 'registered', gatewayId, ddkgSalt: null, ddkgPublicKey: null, birthCertFingerprint: null,
        createdAt: now, updatedAt: now, ...begun.deviceFields,
      },
      challenge: {
        id: challenge.challengeId, deviceId, gatewayId, method: msg.method, nonce: challenge.nonce,
        context: { ...begun.context, keyPreference: msg.keyPreference ?? null, group, ...(offered ? { compact: true, instruction: offered } : {}) }, expiresAt: now + this.config.challengeTtlSeconds * 1000, usedAt: null,
      },
      audit: { at: now, action: 'register', outcome: 'ok', deviceId, gatewayId, requestId: msg.requestId, detail: { method: msg.method, group, ...(msg.compact ? { flow: 'compact' } : {}) } },
    });
    // The same requestId answered meanwhile (a repeat racing this one): that answer is the only one.
    if (!recorded) return (await this.winnerOf(deviceId, msg.requestId, 'register', hash)) as unknown as ChallengeMessage;
    return challenge;
  }

  /**
   * Not replayable by design: the challenge is single-use, so a repeated answer -- from the
   * device or from someone who captured it -- gets `replayed`, and the device registers again.
   */
  private async doAuth(gatewayId: string, deviceId: string, msg: AuthMessage): Promise<InstructionMessage> {
    const now = this.now();
    const challenge = await this.store.getChallenge(msg.challengeId);
    if (!challenge || challenge.deviceId !== deviceId) throw new LeafgateError('challenge_expired', 'unknown challenge');
    if (challenge.usedAt !== null) throw new LeafgateError('replayed');
    if (challenge.expiresAt <= now) throw new LeafgateError('challenge_expired');
    // Burn the challenge before verifying, so a wrong answer cannot be retried against it.
    if (!(await this.store.useChallenge(challenge.id, now))) throw new LeafgateError('replayed');

    const device = await this.store.getDevice(deviceId);
    if (!device) throw new LeafgateError('not_authenticated', 'device is not registered');
    this.checkDeviceUsable(device);
    const group = device.groupName;
    const policy = this.policyFor(group);
    const ctx: MethodContext = { store: this.store, policy, deviceId, group, gatewayId, device, now };
    const resolved = await AUTH_METHOD_HANDLERS[challenge.method].resolveKey(ctx, challenge, msg);
    let ok = false;
    try {
      ok = verify('sha256', challengeSigningInput(deviceId, challenge.id, challenge.nonce), resolved.key, Buffer.from(msg.signature, 'base64'));
    } catch {
      ok = false;
    }
    if (!ok) throw new LeafgateError('auth_failed', 'challenge signature does not verify');

    const key = chooseKey(policy, (challenge.context.keyPreference as RegisterMessage['keyPreference']) ?? undefined);
    const csrDeadline = new Date(now + this.config.csrDeadlineSeconds * 1000);
    const instruction = buildInstruction(policy, { requestId: msg.requestId, deviceId, group, key, csrDeadline });
    // Enrollment (code burnt, key or birth certificate recorded), the auth session and the
    // audit line commit together: an enrollment never stands without its session, nor a
    // burnt code without its enrollment.
    // The device's gateway is not changed here but at issuance (doCsr): a device moves to
    // another gateway when it gets a certificate through it, not when it merely authenticates.
    const { devicePatch: { gatewayId: _moveAtIssuance, ...devicePatch }, consumeCode } = resolved.onVerified;
    const recorded = await this.store.recordAuthentication({
      deviceId, devicePatch, now,
      ...(consumeCode ? { consumeCode: { codeHash: consumeCode.codeHash, groupName: group } } : {}),
      session: { id: randomBytes(16).toString('base64url'), deviceId, gatewayId, instruction: instruction as unknown as Record<string, unknown>, expiresAt: csrDeadline.getTime(), usedAt: null },
      audit: { at: now, action: 'auth', outcome: 'ok', deviceId, gatewayId, requestId: msg.requestId, detail: { method: challenge.method, key: pkix.keySpecLabel(key) } },
    });
    if (!recorded) throw new LeafgateError('enrollment_required', 'enrollmentCode is unknown, used or expired');
    return instruction;
  }

  /**
   * Parse + self-signature check; the signature is verified on the threadpool. Malformed is
   * `bad_csr`; well-formed but never signed (pkix NotAcceptedError: explicit curve, other key
   * type, BMPString subject, duplicate SAN, ...) is `policy_violation`.
   */
  private async parseCsr(pem: string): Promise<pkix.ParsedCsr> {
    try {
      return await pkix.parseCsrAsync(pem);
    } catch (err) {
      throw new LeafgateError(err instanceof pkix.NotAcceptedError ? 'policy_violation' : 'bad_csr', (err as Error).message);
    }
  }

  /**
   * Signs a checked CSR as a device certificate (on the threadpool); returns the answer and the
   * row to store. What is signed is what was checked: the canonical key (csr.spkiDer, re-encoded
   * by the parser), a subject built from the instruction's CN, the SANs the instruction allowed.
   */
  private async sign(deviceId: string, requestId: string, csr: pkix.ParsedCsr, instruction: InstructionMessage, now: number, renewal = false): Promise<{ answer: CertMessage; row: CertificateRow }> {
    const issued = await this.ca.issue('device', {
      subjectDer: pkix.encodeName(instruction.subject.commonName), spkiDer: csr.spkiDer, profile: { kind: 'device', keyType: csr.key.keyType }, sans: { dns: csr.sans.dns, uri: csr.sans.uri },
      notBefore: new Date(now - BACKDATE_MS), notAfter: new Date(now + instruction.validityDays * 86_400_000),
      // For a connector that forwards the device's own request to another CA (EST).
      csrDer: csr.der, renewal,
    });
    return {
      answer: { requestId, certificate: issued.pem, chain: issued.chain, serial: issued.serial, notBefore: issued.notBefore.toISOString(), notAfter: issued.notAfter.toISOString() },
      row: {
        serial: issued.serial, subjectId: deviceId, kind: 'device', issuer: issued.issuer, fingerprint: issued.fingerprint256, notBefore: issued.notBefore.getTime(), notAfter: issued.notAfter.getTime(),
        status: 'active', requestId, pem: issued.pem, revokedAt: null, revocationReason: null, createdAt: now,
      },
    };
  }

  /**
   * The active-certificate cap, counted before asking a CA whose certificates cannot be thrown
   * away (EST): a refused commit would leave a real certificate at the external CA. The count
   * inside the issuance commit still decides between concurrent requests.
   */
  private async checkCapBeforeExternalIssuance(deviceId: string, policy: DevicePolicy, now: number): Promise<void> {
    if (!this.ca.external) return;
    const active = await this.store.countActiveCertificates(deviceId, now);
    if (active >= policy.maxActiveCerts) throw new LeafgateError('policy_violation', `device already holds ${active} active certificates (max ${policy.maxActiveCerts})`);
  }

  /**
   * Commits an issuance. With an external CA (EST) the certificate already exists there
   * whatever the commit says: when no answer will carry it (another node answered this
   * requestId first, the commit refused it, or failed), it is audited with its serial
   * (`detail.est = "discarded"`) so the operator can find it and revoke it at the CA, as an
   * answer lost on the way is. (Two requests with one requestId do not both ask the CA: the
   * claim taken before the call lets one through; see claimExternal.)
   */
  private async commitIssued(kind: Kind, who: { gatewayId: string; deviceId: string; requestId: string }, row: CertificateRow, commit: () => Promise<boolean>): Promise<boolean> {
    if (!this.ca.external) return commit();
    const discarded = (why: string) => this.store.appendAudit({
      at: this.now(), action: kind, outcome: 'error', code: null, deviceId: who.deviceId, gatewayId: who.gatewayId, requestId: who.requestId,
      detail: { est: 'discarded', externalSerial: row.serial, why, action: 'revoke it at the external CA' },
    }).catch(() => undefined);
    const revoke = (why: string) => this.onDiscarded?.(row, why).catch(() => undefined);
    let recorded: boolean;
    try {
      recorded = await commit();
    } catch (err) {
      await discarded(`not committed: ${(err as Error).message}`);
      await revoke(`not committed: ${(err as Error).message}`);
      throw err;
    }
    if (!recorded) {
      await discarded('another request with this requestId was answered first');
      await revoke('another request with this requestId was answered first');
    }
    return recorded;
  }

  /** After a lost insert race the stored answer is the only one that exists. */
  private async winnerOf(deviceId: string, requestId: string, kind: Kind, hash: string): Promise<CertMessage> {
    const winner = await this.storedAnswer(deviceId, requestId, kind, hash);
    if (winner) return winner as unknown as CertMessage;
    throw new LeafgateError('internal', `${kind} lost a race and found no stored answer`);
  }

  /**
   * A renewal is answered only to the gateway the device is enrolled through, and only with
   * the device's own proof: a signature by the key of the certificate being replaced over
   * the new CSR, the requestId and a recent time (docs/protocol.md). So a gateway cannot renew
   * another gateway's device, and a gateway taken over cannot renew any device without that
   * device's key; a captured proof fits neither another CSR, nor another request, nor later.
   */
  private async doRenew(gatewayId: string, deviceId: string, msg: RenewalCsrMessage & { currentSerial: string }): Promise<CertMessage> {
    // Before anything else, the stored answer included: another gateway learns nothing here,
    // not even whether the serial it holds is this device's.
    const device = await this.store.getDevice(deviceId);
    if (!device || device.gatewayId !== gatewayId) {
      throw new LeafgateError('unknown_device', 'no such device behind this gateway', { detail: { enrolledThrough: device?.gatewayId ?? null, currentSerial: msg.currentSerial } });
    }
    this.checkDeviceUsable(device);
    const hash = bodyHash(msg);
    const stored = await this.storedAnswer(deviceId, msg.requestId, 'renew', hash);
    if (stored) return stored as unknown as CertMessage;

    const now = this.now();
    const current = await this.store.getCertificate(msg.currentSerial);
    if (!current || current.kind !== 'device' || current.subjectId !== deviceId) throw new LeafgateError('not_authenticated', 'the session certificate is not this device\'s');
    if (current.status === 'revoked') throw new LeafgateError('revoked');
    if (current.status !== 'active') throw new LeafgateError('policy_violation', `certificate ${current.serial} was already ${current.status}`);
    if (current.notAfter <= now) throw new LeafgateError('not_authenticated', 'the session certificate has expired; onboard again');
    const policy = this.policyFor(device.groupName);

    const csr = await this.parseCsr(msg.csr);
    const proof = this.checkRenewalProof(deviceId, msg, csr, current, policy, now);
    const instruction = buildInstruction(policy, { requestId: msg.requestId, deviceId, group: device.groupName, key: renewalKey(policy, current.pem), csrDeadline: new Date(now) });
    checkCsrAgainstInstruction(csr, instruction, policy);
    // A renewal rotates the key: the same key again would extend a possibly leaked one. Both
    // sides are canonical, so the same key in another encoding (a compressed point) is caught.
    if (Buffer.from(csr.spkiDer).equals(spkiDerOfPem(current.pem))) throw new LeafgateError('policy_violation', 'renewal must use a new key pair');

    const claim = await this.claimExternal(deviceId, msg.requestId, 'renew', hash);
    if ('stored' in claim) return claim.stored;
    try {
      return await this.storeRefusal({ gatewayId, deviceId, requestId: msg.requestId }, 'renew', hash, () => this.issueRenewal(gatewayId, deviceId, msg, hash, csr, instruction, current, proof, now));
    } finally {
      await claim.release();
    }
  }

  private async issueRenewal(
    gatewayId: string, deviceId: string, msg: RenewalCsrMessage, hash: string, csr: pkix.ParsedCsr, instruction: InstructionMessage,
    current: CertificateRow, proof: 'verified' | 'absent', now: number,
  ): Promise<CertMessage> {
    const { answer, row } = await this.sign(deviceId, msg.requestId, csr, instruction, now, true);
    const recorded = await this.commitIssued('renew', { gatewayId, deviceId, requestId: msg.requestId }, row, () => this.store.recordRenewal({
      request: { deviceId, requestId: msg.requestId, kind: 'renew', bodyHash: hash, response: answer as unknown as Record<string, unknown>, createdAt: now },
      certificate: row,
      supersedes: current.serial,
      audit: { at: now, action: 'renew', outcome: 'ok', deviceId, gatewayId, requestId: msg.requestId, serial: row.serial, detail: { supersedes: current.serial, key: pkix.keySpecLabel(csr.key), notAfter: answer.notAfter, proof } },
    }));
    return recorded ? answer : await this.winnerOf(deviceId, msg.requestId, 'renew', hash);
  }

  /**
   * The device's proof of possession of its current key. Returns what the audit line says:
   * `verified`, or `absent` when the group's policy still accepts renewals without one
   * (devices in the field that cannot sign yet). A proof that is present is always checked.
   */
  private checkRenewalProof(deviceId: string, msg: RenewalCsrMessage, csr: pkix.ParsedCsr, current: CertificateRow, policy: DevicePolicy, now: number): 'verified' | 'absent' {
    if (msg.proof === undefined || msg.signedAt === undefined) {
      if (policy.renewal.requireDeviceProof) throw new LeafgateError('auth_failed', 'renewal requires a proof signed with the current certificate\'s key', { detail: { proof: 'missing' } });
      return 'absent';
    }
    const signedAt = Date.parse(msg.signedAt);
    const windowMs = (policy.renewal.proofWindowSeconds + policy.renewal.clockSkewSeconds) * 1000;
    if (!Number.isFinite(signedAt) || Math.abs(now - signedAt) > windowMs) {
      throw new LeafgateError('auth_failed', `renewal proof signedAt is outside +-${windowMs / 1000} s of the authority's clock`, { detail: { proof: 'stale', signedAt: msg.signedAt.slice(0, 32) } });
    }
    let ok = false;
    try {
      ok = verify('sha256', renewalSigningInput(deviceId, msg.requestId, csr.der, msg.signedAt), new X509Certificate(current.pem).publicKey, Buffer.from(msg.proof, 'base64'));
    } catch {
      ok = false;
    }
    if (!ok) throw new LeafgateError('auth_failed', 'renewal proof does not verify with the current certificate\'s key', { detail: { proof: 'bad_signature' } });
    return 'verified';
  }

  private async doCsr(gatewayId: string, deviceId: string, msg: CsrMessage): Promise<CertMessage> {
    const hash = bodyHash(msg);
    const stored = await this.storedAnswer(deviceId, msg.requestId, 'csr', hash);
    if (stored) return stored as unknown as CertMessage;

    const now = this.now();
    const session = await this.store.getLiveAuthSession(deviceId, now);
    if (!session || session.gatewayId !== gatewayId) throw new LeafgateError('not_authenticated', 'no live authentication for this device');
    const device = await this.store.getDevice(deviceId);
    this.checkDeviceUsable(device);
    const policy = this.policyFor(device!.groupName);
    // The classic flow's challenge signature does not cover the CSR (docs/security.md): a
    // group may require the compact flow, whose signature does.
    if (!policy.allowClassicFlow) throw new LeafgateError('policy_violation', `group ${device!.groupName} requires the compact onboarding (begin, enroll)`);

    const csr = await this.parseCsr(msg.csr);
    const instruction = session.instruction as unknown as InstructionMessage;
    checkCsrAgainstInstruction(csr, instruction, policy);
    await this.checkCapBeforeExternalIssuance(deviceId, policy, now);

    const claim = await this.claimExternal(deviceId, msg.requestId, 'csr', hash);
    if ('stored' in claim) return claim.stored;
    try {
      return await this.storeRefusal({ gatewayId, deviceId, requestId: msg.requestId }, 'csr', hash, () => this.issueCsr(gatewayId, deviceId, msg, hash, csr, instruction, session, device!, policy, now));
    } finally {
      await claim.release();
    }
  }

  private async issueCsr(
    gatewayId: string, deviceId: string, msg: CsrMessage, hash: string, csr: pkix.ParsedCsr, instruction: InstructionMessage,
    session: { id: string }, device: DeviceRow, policy: DevicePolicy, now: number,
  ): Promise<CertMessage> {
    const { answer, row } = await this.sign(deviceId, msg.requestId, csr, instruction, now);
    // A device onboarded again through another gateway moves to it with this certificate:
    // from then on that gateway, and no other, renews it and hears of its renewals.
    const movedFrom = device.gatewayId !== gatewayId ? device.gatewayId : undefined;
    const recorded = await this.commitIssued('csr', { gatewayId, deviceId, requestId: msg.requestId }, row, () => this.store.recordIssuance({
      request: { deviceId, requestId: msg.requestId, kind: 'csr', bodyHash: hash, response: answer as unknown as Record<string, unknown>, createdAt: now },
      certificate: row,
      authSessionId: session.id,
      // Counted inside the commit, where two nodes cannot both pass it (one query, not two:
      // a device over the cap costs a signature that is thrown away, the hot path none).
      maxActive: policy.maxActiveCerts,
      ...(movedFrom !== undefined ? { gatewayId } : {}),
      audit: {
        at: now, action: 'issue', outcome: 'ok', deviceId, gatewayId, requestId: msg.requestId, serial: row.serial,
        detail: { key: pkix.keySpecLabel(csr.key), notAfter: answer.notAfter, ...(movedFrom !== undefined ? { movedFromGateway: movedFrom } : {}) },
      },
    }));
    // Another node may have answered this requestId first: that answer is then the only one.
    return recorded ? answer : this.winnerOf(deviceId, msg.requestId, 'csr', hash);
  }

  /**
   * enroll: a repeat of the requestId gets its stored answer (also after the challenge was
   * used or has expired). Otherwise the challenge must be a live compact one of this device;
   * the signature must verify over the challenge AND the CSR's hash with the device's
   * authentication key. A signature that does not verify leaves the challenge as it was: a
   * stranger who learnt a challenge id cannot spoil the device's answer (and cannot forge
   * one). A verified answer burns the challenge, whatever becomes of its CSR: on success
   * inside the issuance commit, on a refused CSR right away.
   */
  private async doEnroll(gatewayId: string, deviceId: string, msg: EnrollMessage): Promise<CertMessage> {
    const hash = bodyHash(msg);
    const stored = await this.storedAnswer(deviceId, msg.requestId, 'enroll', hash);
    if (stored) return stored as unknown as CertMessage;

    const now = this.now();
    const challenge = await this.store.getChallenge(msg.challengeId);
    if (!challenge || challenge.deviceId !== deviceId) throw new LeafgateError('challenge_expired', 'unknown challenge');
    if (challenge.context.compact !== true) throw new LeafgateError('challenge_expired', 'challenge was issued for the classic flow (answer it with auth)');
    if (challenge.usedAt !== null) throw new LeafgateError('replayed');
    if (challenge.expiresAt <= now) throw new LeafgateError('challenge_expired');
    const device = await this.store.getDevice(deviceId);
    if (!device) throw new LeafgateError('not_authenticated', 'device is not registered');
    this.checkDeviceUsable(device);
    const group = device.groupName;
    const policy = this.policyFor(group);

    let csrDer: Buffer;
    try {
      csrDer = pkix.fromPem(msg.csr, 'CERTIFICATE REQUEST');
    } catch (err) {
      throw new LeafgateError('bad_csr', (err as Error).message);
    }
    const ctx: MethodContext = { store: this.store, policy, deviceId, group, gatewayId, device, now };
    const resolved = await AUTH_METHOD_HANDLERS[challenge.method].resolveKey(ctx, challenge, { requestId: msg.requestId, challengeId: msg.challengeId, signature: msg.signature, ...(msg.publicKey !== undefined ? { publicKey: msg.publicKey } : {}) });
    let ok = false;
    try {
      ok = verify('sha256', enrollSigningInput(deviceId, challenge.id, challenge.nonce, csrDer), resolved.key, Buffer.from(msg.signature, 'base64'));
    } catch {
      ok = false;
    }
    if (!ok) throw new LeafgateError('auth_failed', 'enroll signature does not verify over the challenge and this CSR');

    try {
      const csr = await this.parseCsr(msg.csr);
      const offered = challenge.context.instruction as OfferedInstruction;
      const instruction: InstructionMessage = { ...offered, requestId: msg.requestId, csrDeadline: new Date(challenge.expiresAt).toISOString() };
      checkCsrAgainstInstruction(csr, instruction, policy);
      await this.checkCapBeforeExternalIssuance(deviceId, policy, now);
      const claim = await this.claimExternal(deviceId, msg.requestId, 'enroll', hash);
      if ('stored' in claim) return claim.stored;
      try {
        return await this.storeRefusal({ gatewayId, deviceId, requestId: msg.requestId }, 'enroll', hash, () => this.issueEnroll(gatewayId, deviceId, msg, hash, csr, instruction, challenge, resolved.onVerified, device, group, policy, now));
      } finally {
        await claim.release();
      }
    } catch (err) {
      // A verified answer is spent even when its CSR is refused (one challenge, one try); a
      // failure of ours (CA, store) leaves it, so the identical message can be sent again.
      const e = toLeafgateError(err);
      if (e.code !== 'internal' && e.code !== 'authority_unavailable' && e.code !== 'replayed') await this.store.useChallenge(challenge.id, now);
      throw e;
    }
  }

  private async issueEnroll(
    gatewayId: string, deviceId: string, msg: EnrollMessage, hash: string, csr: pkix.ParsedCsr, instruction: InstructionMessage,
    challenge: { id: string; method: ChallengeRow['method'] }, onVerified: { devicePatch: DevicePatch; consumeCode?: { codeHash: string } },
    device: DeviceRow, group: string, policy: DevicePolicy, now: number,
  ): Promise<CertMessage> {
    const { answer, row } = await this.sign(deviceId, msg.requestId, csr, instruction, now);
    const movedFrom = device.gatewayId !== gatewayId ? device.gatewayId : undefined;
    const { devicePatch, consumeCode } = onVerified;
    const recorded = await this.commitIssued('enroll', { gatewayId, deviceId, requestId: msg.requestId }, row, () => this.store.recordCompactIssuance({
      request: { deviceId, requestId: msg.requestId, kind: 'enroll', bodyHash: hash, response: answer as unknown as Record<string, unknown>, createdAt: now },
      certificate: row,
      challengeId: challenge.id,
      ...(consumeCode ? { consumeCode: { codeHash: consumeCode.codeHash, groupName: group } } : {}),
      // The device belongs to the gateway through which it got this certificate.
      devicePatch: { ...devicePatch, gatewayId },
      maxActive: policy.maxActiveCerts,
      audit: {
        at: now, action: 'issue', outcome: 'ok', deviceId, gatewayId, requestId: msg.requestId, serial: row.serial,
        detail: { flow: 'compact', method: challenge.method, key: pkix.keySpecLabel(csr.key), notAfter: answer.notAfter, ...(movedFrom !== undefined ? { movedFromGateway: movedFrom } : {}) },
      },
    }));
    return recorded ? answer : this.winnerOf(deviceId, msg.requestId, 'enroll', hash);
  }
}
