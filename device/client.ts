/**
 * Leaf device SDK on mqtt.js: runs the whole onboarding flow of docs/protocol.md --
 * bootstrap connection, register, challenge signature, key generation, CSR, certificate --
 * then reconnects with mutual TLS. By default the compact flow (begin -> offer, enroll ->
 * enrolled: two exchanges, the challenge answer and the CSR under one signature); the
 * classic flow (register, auth, csr) with `flow: 'classic'`. Imports only protocol/, so a device vendor can read it
 * as the reference implementation of the wire contract.
 */
import { createPrivateKey, createPublicKey, randomBytes, sign, type KeyObject } from 'node:crypto';
import { closeSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createSecureContext, type SecureContext } from 'node:tls';
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import {
  LeafgateError,
  challengeSigningInput,
  downFilter,
  enrollSigningInput,
  isErrorCode,
  parseTopic,
  pkix,
  renewalSigningInput,
  upTopic,
  type CertMessage,
  type ChallengeMessage,
  type EnrollMessage,
  type ErrorBody,
  type InstructionMessage,
  type KeySpec,
  type OfferMessage,
  type RenewalCsrMessage,
} from '../protocol/index.ts';
import { deriveDdkgKeyPair } from './ddkg.ts';
import { generateKeyForInstruction } from './keys.ts';

export type DeviceCredential =
  | { method: 'pki-signature'; birthCert: string; factoryKey: KeyObject }
  | { method: 'ddkg'; attributes: Record<string, string>; enrollmentCode?: string };

export interface DeviceOptions {
  deviceId: string;
  /** mqtts://host:port of the gateway. */
  brokerUrl: string;
  /** Trust anchor(s) for the gateway's TLS certificate (the authority root). */
  ca: string;
  credential: DeviceCredential;
  group?: string;
  keyPreference?: KeySpec[];
  timeoutMs?: number;
  /** When set, key.pem, cert.pem and chain.pem are written here (key 0600). */
  storeDir?: string;
  /** Retries of the whole flow after rate_limited / authority_unavailable / gateway_unavailable / a lost connection (default 5). */
  retries?: number;
  /**
   * Where the request in progress is kept (requestId, CSR, its private key) until its
   * certificate is stored, so that a retry -- also by another process after a restart --
   * re-sends the same request instead of asking for a second certificate. Default: a file
   * `onboarding.json` (0600) in `storeDir` when set, else memory (this object's life).
   */
  state?: DeviceStateStore;
  /**
   * `compact` (default): two exchanges, begin -> offer (challenge + instruction) and enroll
   * (challenge answer + CSR under one signature) -> certificate. `classic`: register, auth,
   * csr, for gateways and authorities that predate the compact flow.
   */
  flow?: 'compact' | 'classic';
}

/** Persistence of the SDK's onboarding state: small JSON strings by key. */
export interface DeviceStateStore {
  get(key: string): string | undefined | Promise<string | undefined>;
  /** Must be durable when it resolves (the request is sent right after). */
  set(key: string, value: string): void | Promise<void>;
  delete(key: string): void | Promise<void>;
}

export class MemoryStateStore implements DeviceStateStore {
  private readonly m = new Map<string, string>();
  get(key: string) {
    return this.m.get(key);
  }
  set(key: string, value: string) {
    this.m.set(key, value);
  }
  delete(key: string) {
    this.m.delete(key);
  }
}

/** One file per key in a directory (mode 0600), written to a temp file, fsynced and renamed. */
export class FileStateStore implements DeviceStateStore {
  constructor(private readonly dir: string) {}
  private file(key: string) {
    if (!/^[a-z0-9-]+$/.test(key)) throw new Error(`bad state key ${key}`);
    return join(this.dir, `${key}.json`);
  }
  get(key: string) {
    try {
      return readFileSync(this.file(key), 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
  }
  set(key: string, value: string) {
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    const f = this.file(key);
    const tmp = `${f}.tmp`;
    const fd = openSync(tmp, 'w', 0o600);
    try {
      writeFileSync(fd, value);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, f);
    const d = openSync(this.dir, 'r');
    try {
      fsyncSync(d);
    } catch {
      // a file system without directory fsync
    } finally {
      closeSync(d);
    }
  }
  delete(key: string) {
    rmSync(this.file(key), { force: true });
  }
}

/** The first-issuance request in progress, as kept in the state store. */
interface PendingCsr {
  requestId: string;
  csr: string;
  /** PKCS#8 PEM of the key the CSR was made with. */
  key: string;
  keyType: KeySpec['keyType'];
  keySize: number;
  /** True once the requestId was replaced after a stored not_authenticated answer. */
  reissued?: boolean;
  /** Compact flow: the request is an `enroll`, re-sent byte for byte with these fields. */
  flow?: 'compact';
  challengeId?: string;
  signature?: string;
  publicKey?: string;
}

const PENDING_KEY = 'onboarding';

/**
 * The renewal in progress, kept before its CSR is sent: a renewal whose answer was lost (the
 * gateway or this process died in between) is re-sent as it was -- same requestId, CSR, proof
 * and key -- and gets the one certificate made for it. A fresh key and requestId instead would
 * leave the first certificate issued for a key nobody holds, and the device on its old
 * certificate, no longer asked to renew, until that one expires.
 */
interface PendingRenewal {
  /** Serial of the certificate being replaced: the stored request is only for that identity. */
  replaces: string;
  requestId: string;
  csr: string;
  proof?: string;
  signedAt?: string;
  /** PKCS#8 PEM of the new key. */
  key: string;
  keyType: KeySpec['keyType'];
  keySize: number;
}

const RENEWAL_KEY = 'renewal';

/**
 * Races a promise against the connection closing (or going offline) and a timer, so that no
 * wait on mqtt.js outlives the connection: mqtt.js does not settle a QoS 1 publish whose
 * PUBACK never comes when the gateway dies first.
 */
function bounded<T>(client: MqttClient, p: Promise<T>, ms: number, what: string): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    let done = false;
    const finish = (f: () => void) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      client.off('close', onClose);
      client.off('offline', onClose);
      f();
    };
    const onClose = () => finish(() => reject(new LeafgateError('gateway_unavailable', `connection to the gateway closed during ${what}`)));
    const timer = setTimeout(() => finish(() => reject(new LeafgateError('gateway_unavailable', `no ${what} within ${ms} ms`))), ms);
    client.on('close', onClose);
    client.on('offline', onClose);
    if (!client.connected) onClose();
    p.then((v) => finish(() => resolve(v)), (e) => finish(() => reject(e)));
  });
}

export interface DeviceIdentity {
  deviceId: string;
  privateKey: KeyObject;
  certificate: string;
  chain: string[];
  serial: string;
  notAfter: string;
  key: KeySpec;
}

export interface OnboardResult extends DeviceIdentity {
  ms: { total: number; auth: number; keygen: number; issue: number };
}

/** Waits for the next down/ message of a kind, or a down/error for the request. */
class Inbox {
  private waiters: Array<{ kinds: string[]; requestId: string; resolve: (v: any) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }> = [];

  constructor(client: MqttClient) {
    client.on('message', (topic, payload) => this.dispatch(topic, payload));
    client.on('close', () => this.failAll(new LeafgateError('gateway_unavailable', 'connection to the gateway closed')));
  }

  wait<T>(kinds: string[], requestId: string, timeoutMs: number): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const w = { kinds, requestId, resolve, reject, timer: undefined as unknown as NodeJS.Timeout };
      this.waiters.push(w);
      this.extend(w, timeoutMs);
    });
  }

  private extend(w: Inbox['waiters'][number], ms: number): void {
    clearTimeout(w.timer);
    w.timer = setTimeout(() => {
      this.waiters = this.waiters.filter((x) => x !== w);
      w.reject(new LeafgateError('authority_unavailable', `no answer to ${w.requestId} within ${ms} ms`));
    }, ms);
  }

  private dispatch(topic: string, payload: Buffer): void {
    const t = parseTopic(topic);
    if (!t || t.direction !== 'down') return;
    let body: Record<string, unknown>;
    try {
      body = JSON.parse(payload.toString('utf8'));
    } catch {
      return;
    }
    // The compact flow's answer kinds carry refusals too: an error body there has a `code`.
    const isError = t.kind === 'error' || ((t.kind === 'offer' || t.kind === 'enrolled') && typeof body.code === 'string');
    // Errors without a requestId (e.g. a refused publish) concern whatever is in flight
    // (on a compact answer kind: what waits on that kind).
    const w = this.waiters.find((x) =>
      isError
        ? (t.kind === 'error' || x.kinds.includes(t.kind)) && (body.requestId === undefined || x.requestId === body.requestId)
        : x.kinds.includes(t.kind) && x.requestId === body.requestId,
    );
    if (t.kind === 'pending') {
      // The gateway queued the request (authority unreachable): keep waiting, longer.
      const p = this.waiters.find((x) => x.requestId === body.requestId);
      if (p) this.extend(p, Math.max(Number(body.retryAfterMs) || 0, 1000) * 4);
      return;
    }
    if (!w) return;
    this.waiters = this.waiters.filter((x) => x !== w);
    clearTimeout(w.timer);
    if (isError) {
      const e = body as unknown as ErrorBody;
      w.reject(new LeafgateError(isErrorCode(e.code) ? e.code : 'internal', String(e.message ?? e.code), e.retryAfterMs !== undefined ? { retryAfterMs: e.retryAfterMs } : {}));
    } else w.resolve(body);
  }

  private failAll(err: Error): void {
    for (const w of this.waiters) {
      clearTimeout(w.timer);
      w.reject(err);
    }
    this.waiters = [];
  }
}

/**
 * Onboarding is a chain of small request/answer packets; Nagle's algorithm with delayed
 * ACKs would add about 40 ms to each (measured: 270 ms -> 25 ms per onboarding).
 */
const noDelay = (client: MqttClient) => (client.stream as { setNoDelay?: (v: boolean) => void } | undefined)?.setNoDelay?.(true);

const newRequestId = () => randomBytes(12).toString('base64url');

/** Codes after which the request in progress is kept and re-sent as it is. */
const RESUMABLE = new Set(['gateway_unavailable', 'authority_unavailable', 'rate_limited', 'internal', 'unknown_gateway', 'client_cert_required']);

/**
 * TLS contexts are built once and reused. Node's OpenSSL 3.0 takes ~0.3 ms to decode one
 * PEM certificate or key, and a context per connection decodes the trust anchor (bootstrap)
 * or the anchor, the key and the certificate (mTLS) again each time: that was a third of a
 * device's CPU per onboarding. Bootstrap contexts are keyed by the anchor text (a handful per
 * process); an operational context lives as long as its identity object.
 */
const bootstrapContexts = new Map<string, SecureContext>();
function bootstrapContext(ca: string): SecureContext {
  let ctx = bootstrapContexts.get(ca);
  if (!ctx) {
    if (bootstrapContexts.size >= 16) bootstrapContexts.clear();
    ctx = createSecureContext({ ca });
    bootstrapContexts.set(ca, ctx);
  }
  return ctx;
}
const operationalContexts = new WeakMap<DeviceIdentity, { ca: string; ctx: SecureContext }>();

/**
 * The private key as PEM for a TLS context: SEC1 for EC and PKCS#1 for RSA, whose export is
 * a direct encoding (~15 us), where PKCS#8 goes through OpenSSL 3's encoder (~100 us).
 */
function tlsKeyPem(key: KeyObject): string {
  if (key.asymmetricKeyType === 'ec') return key.export({ type: 'sec1', format: 'pem' }) as string;
  if (key.asymmetricKeyType === 'rsa') return key.export({ type: 'pkcs1', format: 'pem' }) as string;
  return key.export({ type: 'pkcs8', format: 'pem' }) as string;
}

/** SubjectPublicKeyInfo DER of a PEM certificate, or undefined when it cannot be read. */
function certificateSpki(pem: string): Buffer | undefined {
  try {
    return pkix.spkiDerOf(pkix.fromPem(pem, 'CERTIFICATE'));
  } catch {
    return undefined;
  }
}

/** The identity each operational connection was made with: its key signs renewal proofs. */
const sessionIdentities = new WeakMap<MqttClient, DeviceIdentity>();

/**
 * The renewal proof: the current private key signs (SHA-256; ECDSA DER or RSASSA-PKCS1-v1_5)
 * the device id, the requestId, the new CSR's DER hash and the time, so that the gateway
 * cannot renew the device without it and nobody can replay it for another CSR or later.
 */
export function renewalProof(deviceId: string, requestId: string, csrPem: string, currentKey: KeyObject, at = new Date()): { proof: string; signedAt: string } {
  const signedAt = at.toISOString();
  const input = renewalSigningInput(deviceId, requestId, pkix.fromPem(csrPem, 'CERTIFICATE REQUEST'), signedAt);
  return { proof: sign('sha256', input, currentKey).toString('base64'), signedAt };
}

export class LeafDevice {
  readonly deviceId: string;
  private readonly opts: DeviceOptions;

  constructor(opts: DeviceOptions) {
    this.opts = opts;
    this.deviceId = opts.deviceId;
    this.state = opts.state ?? (opts.storeDir ? new FileStateStore(opts.storeDir) : new MemoryStateStore());
  }

  private readonly state: DeviceStateStore;

  private get timeoutMs(): number {
    return this.opts.timeoutMs ?? 30_000;
  }

  /** Opens a bootstrap (no client certificate) connection subscribed to the device's down/ topics. */
  async connectBootstrap(): Promise<{ client: MqttClient; inbox: Inbox }> {
    const client = await this.connect();
    try {
      const inbox = new Inbox(client);
      await bounded(client, client.subscribeAsync(downFilter(this.deviceId), { qos: 1 }), this.timeoutMs, 'SUBACK');
      return { client, inbox };
    } catch (err) {
      client.end(true);
      throw err;
    }
  }

  /** A QoS 1 publish that ends: PUBACK, or an error when the connection drops or the time is up. */
  private publish(client: MqttClient, topic: string, body: string): Promise<unknown> {
    return bounded(client, client.publishAsync(topic, body, { qos: 1 }), this.timeoutMs, 'PUBACK');
  }

  /** The request in progress (a previous attempt's, possibly another process's), if any. */
  private async loadPending(): Promise<PendingCsr | undefined> {
    const raw = await this.state.get(PENDING_KEY);
    if (!raw) return undefined;
    try {
      const p = JSON.parse(raw) as PendingCsr;
      if (typeof p.requestId === 'string' && typeof p.csr === 'string' && typeof p.key === 'string' && (p.flow !== 'compact' || (typeof p.challengeId === 'string' && typeof p.signature === 'string'))) return p;
    } catch {
      // unreadable: start afresh
    }
    await this.state.delete(PENDING_KEY);
    return undefined;
  }

  /** The renewal in progress for the certificate `serial`, if any; one for another certificate is dropped. */
  private async loadRenewal(serial: string): Promise<PendingRenewal | undefined> {
    const raw = await this.state.get(RENEWAL_KEY);
    if (!raw) return undefined;
    try {
      const p = JSON.parse(raw) as PendingRenewal;
      if (p.replaces === serial && typeof p.requestId === 'string' && typeof p.csr === 'string' && typeof p.key === 'string') return p;
    } catch {
      // unreadable: start afresh
    }
    await this.state.delete(RENEWAL_KEY);
    return undefined;
  }

  /** The whole flow; resolves with the new identity, rejects with the gateway's error code. */
  /**
   * The whole flow, retried when the gateway says "later" (rate_limited, authority_unavailable)
   * after its retryAfterMs plus jitter, so a site-wide surge settles instead of failing.
   */
  async onboard(): Promise<OnboardResult> {
    const attempts = this.opts.retries ?? 5;
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.onboardOnce();
      } catch (err) {
        const e = err as LeafgateError & { code?: string };
        // Transport failures of the bootstrap connection (reset during a surge) are transient too.
        const transient = (e instanceof LeafgateError && (e.code === 'rate_limited' || e.code === 'authority_unavailable' || e.code === 'gateway_unavailable')) || ['ECONNRESET', 'ECONNREFUSED', 'ETIMEDOUT', 'EPIPE', 'ECONNABORTED', 'EHOSTUNREACH', 'ENETUNREACH'].includes(String(e.code));
        if (!transient || attempt >= attempts) throw err;
        const base = e.retryAfterMs ?? 1000 * 2 ** attempt;
        await new Promise((r) => setTimeout(r, base + Math.random() * base * 0.5));
      }
    }
  }

  /**
   * One attempt. A request left by an earlier attempt (a lost connection, a gateway crash, a
   * restart of this process) is resumed, never replaced: the same requestId, CSR and key are
   * re-sent, so the gateway and the authority return the one certificate made for it.
   */
  private async onboardOnce(): Promise<OnboardResult> {
    const t0 = performance.now();
    const { client, inbox } = await this.connectBootstrap();
    try {
      const pending = await this.loadPending();
      // A stored request is resumed in the flow it was made in.
      if (pending ? pending.flow === 'compact' : (this.opts.flow ?? 'compact') === 'compact') return await this.compactOnce(client, inbox, pending, t0);
      return await this.classicOnce(client, inbox, pending, t0);
    } finally {
      await bounded(client, client.endAsync(), this.timeoutMs, 'DISCONNECT').catch(() => client.end(true));
    }
  }

  /**
   * The compact flow on this connection: begin -> offer, then enroll -> certificate. The
   * enroll is kept before it is sent; after a drop it is re-sent byte for byte (the authority
   * answers a repeat with the same certificate). If its challenge was spent without an
   * answer or has expired (`replayed`, `challenge_expired`), it starts again with a fresh begin.
   */
  private async compactOnce(client: MqttClient, inbox: Inbox, stored: PendingCsr | undefined, t0: number): Promise<OnboardResult> {
    let pending = stored;
    let tAuth = t0;
    let keyReadyAt = t0;
    for (let fresh = false; ; ) {
      if (!pending) {
        const offer = await this.begin(client, inbox);
        fresh = true;
        tAuth = performance.now();
        const pair = await generateKeyForInstruction(offer.instruction);
        keyReadyAt = performance.now();
        const csr = pkix.buildCsr({ commonName: offer.instruction.subject.commonName, sans: offer.instruction.sans, privateKey: pair.privateKey, publicKey: pair.publicKey });
        const { key: authKey, publicKey } = this.authenticationKey(offer);
        const signature = sign('sha256', enrollSigningInput(this.deviceId, offer.challengeId, offer.nonce, pkix.fromPem(csr, 'CERTIFICATE REQUEST')), authKey).toString('base64');
        pending = {
          flow: 'compact', requestId: newRequestId(), csr, key: pair.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string,
          keyType: offer.instruction.keyType, keySize: offer.instruction.keySize, challengeId: offer.challengeId, signature, ...(publicKey ? { publicKey } : {}),
        };
        // Kept before it is sent: from now on every attempt re-sends this very message.
        await this.state.set(PENDING_KEY, JSON.stringify(pending));
      }
      try {
        const message: EnrollMessage = { requestId: pending.requestId, challengeId: pending.challengeId!, csr: pending.csr, signature: pending.signature!, ...(pending.publicKey ? { publicKey: pending.publicKey } : {}) };
        const privateKey = createPrivateKey(pending.key);
        const cert = await this.exchange(client, inbox, 'enroll', 'enrolled', message, createPublicKey(privateKey));
        const identity = this.keep(cert, privateKey, { keyType: pending.keyType, keySize: pending.keySize } as KeySpec);
        await this.state.delete(PENDING_KEY);
        const tIssue = performance.now();
        return { ...identity, ms: { total: tIssue - t0, auth: tAuth - t0, keygen: keyReadyAt - tAuth, issue: tIssue - keyReadyAt } };
      } catch (err) {
        const code = err instanceof LeafgateError ? err.code : undefined;
        if (!fresh && (code === 'replayed' || code === 'challenge_expired')) {
          // The stored request's challenge was spent without an answer kept for it (or ran
          // out): no certificate exists for it, so start again with a new begin.
          await this.state.delete(PENDING_KEY);
          pending = undefined;
          continue;
        }
        if (code !== undefined && !RESUMABLE.has(code)) await this.state.delete(PENDING_KEY);
        throw err;
      }
    }
  }

  /** begin -> offer (the challenge and the instruction together). */
  private async begin(client: MqttClient, inbox: Inbox): Promise<OfferMessage> {
    const register = this.registerBody();
    const offerP = inbox.wait<OfferMessage>(['offer'], register.requestId as string, this.timeoutMs);
    offerP.catch(() => undefined);
    await this.publish(client, upTopic(this.deviceId, 'begin'), JSON.stringify(register));
    const offer = await offerP;
    if (!offer.instruction) throw new LeafgateError('bad_request', 'offer without an instruction');
    return offer;
  }

  /** The register/begin body of this device. */
  private registerBody(): Record<string, unknown> {
    const cred = this.opts.credential;
    const register: Record<string, unknown> = { requestId: newRequestId(), method: cred.method };
    if (this.opts.group) register.group = this.opts.group;
    if (this.opts.keyPreference) register.keyPreference = this.opts.keyPreference;
    if (cred.method === 'pki-signature') register.birthCert = cred.birthCert;
    if (cred.method === 'ddkg' && cred.enrollmentCode) register.enrollmentCode = cred.enrollmentCode;
    return register;
  }

  /** The key that answers a challenge: the factory key, or the ddkg key (with its public half). */
  private authenticationKey(challenge: ChallengeMessage): { key: KeyObject; publicKey?: string } {
    const cred = this.opts.credential;
    if (cred.method === 'pki-signature') return { key: cred.factoryKey };
    if (!challenge.salt) throw new LeafgateError('bad_request', 'ddkg challenge without salt');
    const pair = deriveDdkgKeyPair(cred.attributes, challenge.salt, this.deviceId);
    return { key: pair.privateKey, publicKey: pair.publicKey.export({ type: 'spki', format: 'pem' }) as string };
  }

  /** The classic flow on this connection: register, auth, csr (resuming a stored csr). */
  private async classicOnce(client: MqttClient, inbox: Inbox, stored: PendingCsr | undefined, t0: number): Promise<OnboardResult> {
    {
      let pending = stored;
      let authenticatedHere = false;
      let tAuth = t0;
      let keyReadyAt = t0;
      if (!pending) {
        const instruction = await this.authenticate(client, inbox);
        authenticatedHere = true;
        tAuth = performance.now();
        const pair = await generateKeyForInstruction(instruction);
        keyReadyAt = performance.now();
        const csr = pkix.buildCsr({ commonName: instruction.subject.commonName, sans: instruction.sans, privateKey: pair.privateKey, publicKey: pair.publicKey });
        pending = { requestId: newRequestId(), csr, key: pair.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, keyType: instruction.keyType, keySize: instruction.keySize };
        // Kept before it is sent: from now on every attempt re-sends this very request.
        await this.state.set(PENDING_KEY, JSON.stringify(pending));
      }
      for (;;) {
        try {
          const identity = await this.sendCsr(client, inbox, pending);
          await this.state.delete(PENDING_KEY);
          const tIssue = performance.now();
          return { ...identity, ms: { total: tIssue - t0, auth: tAuth - t0, keygen: keyReadyAt - tAuth, issue: tIssue - keyReadyAt } };
        } catch (err) {
          const code = err instanceof LeafgateError ? err.code : undefined;
          if (code === 'not_authenticated' && !authenticatedHere) {
            // A new connection (or a restarted gateway) that does not know this request: prove
            // the identity again on this connection, then re-send the same request.
            await this.authenticate(client, inbox);
            authenticatedHere = true;
            tAuth = performance.now();
            continue;
          }
          if (code === 'not_authenticated' && !pending.reissued) {
            // Refused although authenticated here: the gateway holds a stored not_authenticated
            // answer for this requestId (it reached the authority after csrDeadline). No
            // certificate was made for it, so the same CSR goes again under a new requestId.
            pending = { ...pending, requestId: newRequestId(), reissued: true };
            await this.state.set(PENDING_KEY, JSON.stringify(pending));
            continue;
          }
          // A final refusal of this CSR (bad_csr, policy_violation, request_conflict, ...): the
          // next onboarding starts afresh. Transient ones keep it, to be re-sent.
          if (code !== undefined && !RESUMABLE.has(code)) await this.state.delete(PENDING_KEY);
          throw err;
        }
      }
    }
  }

  /** register -> challenge -> auth -> instruction on this connection. */
  private async authenticate(client: MqttClient, inbox: Inbox): Promise<InstructionMessage> {
    const register = this.registerBody();
    const regId = register.requestId as string;
    const challengeP = inbox.wait<ChallengeMessage>(['challenge'], regId, this.timeoutMs);
    challengeP.catch(() => undefined);
    await this.publish(client, upTopic(this.deviceId, 'register'), JSON.stringify(register));
    const challenge = await challengeP;

    const auth: Record<string, unknown> = { requestId: newRequestId(), challengeId: challenge.challengeId };
    const { key: signingKey, publicKey } = this.authenticationKey(challenge);
    if (publicKey) auth.publicKey = publicKey;
    auth.signature = sign('sha256', challengeSigningInput(this.deviceId, challenge.challengeId, challenge.nonce), signingKey).toString('base64');
    const instructionP = inbox.wait<InstructionMessage>(['instruction'], auth.requestId as string, this.timeoutMs);
    instructionP.catch(() => undefined);
    await this.publish(client, upTopic(this.deviceId, 'auth'), JSON.stringify(auth));
    return instructionP;
  }

  /** Sends a first-issuance CSR (or re-sends it), checks and stores the certificate. */
  private async sendCsr(client: MqttClient, inbox: Inbox, pending: PendingCsr): Promise<DeviceIdentity> {
    const privateKey = createPrivateKey(pending.key);
    const cert = await this.exchangeCsr(client, inbox, { requestId: pending.requestId, csr: pending.csr }, createPublicKey(privateKey));
    return this.keep(cert, privateKey, { keyType: pending.keyType, keySize: pending.keySize } as KeySpec);
  }

  /** Publishes a CSR message and waits for its certificate, which must carry `publicKey`. */
  private exchangeCsr(client: MqttClient, inbox: Inbox, message: RenewalCsrMessage, publicKey: KeyObject): Promise<CertMessage> {
    return this.exchange(client, inbox, 'csr', 'cert', message, publicKey);
  }

  /**
   * Publishes a certificate request (csr or enroll) and waits for the certificate, which must
   * carry `publicKey`. The answer is awaited from the start: `before` (a SUBSCRIBE) may bring
   * it already, when the gateway held it for this request.
   */
  private async exchange(client: MqttClient, inbox: Inbox, up: 'csr' | 'enroll', down: 'cert' | 'enrolled', message: RenewalCsrMessage | EnrollMessage, publicKey: KeyObject, before?: Promise<unknown>): Promise<CertMessage> {
    const certP = inbox.wait<CertMessage>([down], message.requestId, this.timeoutMs);
    certP.catch(() => undefined);
    if (before) await before;
    await this.publish(client, upTopic(this.deviceId, up), JSON.stringify(message));
    const cert = await certP;
    // The certificate must carry the key made here: its SubjectPublicKeyInfo, byte for byte
    // the one the CSR sent (the authority copies it), read without a full X.509 decode.
    const spki = typeof cert.certificate === 'string' ? certificateSpki(cert.certificate) : undefined;
    if (!spki || !spki.equals(pkix.spkiDerOfKey(publicKey))) throw new LeafgateError('bad_certificate', 'issued certificate does not match the generated key');
    return cert;
  }

  private keep(cert: CertMessage, privateKey: KeyObject, key: KeySpec): DeviceIdentity {
    const identity: DeviceIdentity = { deviceId: this.deviceId, privateKey, certificate: cert.certificate, chain: cert.chain, serial: cert.serial, notAfter: cert.notAfter, key };
    if (this.opts.storeDir) this.store(identity);
    return identity;
  }

  /**
   * Renewal: makes the key pair the instruction asks for, sends the CSR signed with the
   * current key's proof, checks and stores the answer.
   */
  private async requestCertificate(client: MqttClient, inbox: Inbox, instruction: InstructionMessage, current?: DeviceIdentity): Promise<{ identity: DeviceIdentity; keyReadyAt: number }> {
    // A renewal of this certificate already under way (an earlier attempt on a lost
    // connection) is resumed, not doubled.
    const stored = current ? await this.loadRenewal(current.serial) : undefined;
    if (stored) return { identity: await this.resumeRenewal(client, inbox, stored), keyReadyAt: performance.now() };
    const pair = await generateKeyForInstruction(instruction);
    const keyReadyAt = performance.now();
    const csr = pkix.buildCsr({ commonName: instruction.subject.commonName, sans: instruction.sans, privateKey: pair.privateKey, publicKey: pair.publicKey });
    const requestId = newRequestId();
    const message: RenewalCsrMessage = { requestId, csr };
    const key: KeySpec = { keyType: instruction.keyType, keySize: instruction.keySize } as KeySpec;
    if (!current) return { identity: this.keep(await this.exchangeCsr(client, inbox, message, pair.publicKey), pair.privateKey, key), keyReadyAt };
    Object.assign(message, renewalProof(this.deviceId, requestId, csr, current.privateKey));
    const pending: PendingRenewal = { replaces: current.serial, ...message, key: pair.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, keyType: key.keyType, keySize: key.keySize };
    // Kept (durably, with a file store) before the CSR leaves.
    await this.state.set(RENEWAL_KEY, JSON.stringify(pending));
    return { identity: await this.resumeRenewal(client, inbox, pending), keyReadyAt };
  }

  /**
   * Sends (or re-sends, byte for byte) a kept renewal and waits for its certificate; the
   * record goes once the certificate is stored, or when the answer says it can never
   * succeed (a stale proof, a revoked certificate...). `before`: see `exchange`.
   */
  private async resumeRenewal(client: MqttClient, inbox: Inbox, pending: PendingRenewal, before?: Promise<unknown>): Promise<DeviceIdentity> {
    const privateKey = createPrivateKey(pending.key);
    const message: RenewalCsrMessage = { requestId: pending.requestId, csr: pending.csr };
    if (pending.proof !== undefined && pending.signedAt !== undefined) Object.assign(message, { proof: pending.proof, signedAt: pending.signedAt });
    let cert: CertMessage;
    try {
      cert = await this.exchange(client, inbox, 'csr', 'cert', message, createPublicKey(privateKey), before);
    } catch (err) {
      const code = (err as { code?: string }).code;
      if (code !== undefined && !RESUMABLE.has(code)) await this.state.delete(RENEWAL_KEY);
      throw err;
    }
    const identity = this.keep(cert, privateKey, { keyType: pending.keyType, keySize: pending.keySize } as KeySpec);
    await this.state.delete(RENEWAL_KEY);
    return identity;
  }

  private store(id: DeviceIdentity): void {
    const dir = this.opts.storeDir!;
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    writeFileSync(join(dir, 'key.pem'), id.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, { mode: 0o600 });
    writeFileSync(join(dir, 'cert.pem'), id.certificate);
    writeFileSync(join(dir, 'chain.pem'), id.chain.join(''));
  }

  /** The operational connection: mutual TLS with the issued certificate. */
  async connectOperational(identity: DeviceIdentity): Promise<MqttClient> {
    let cached = operationalContexts.get(identity);
    if (!cached || cached.ca !== this.opts.ca) {
      cached = {
        ca: this.opts.ca,
        ctx: createSecureContext({
          ca: this.opts.ca,
          key: tlsKeyPem(identity.privateKey),
          // The certificate alone: the gateway holds the Device CA as a trust anchor, and a
          // chain sent along is parsed and kept for the life of the connection (~6 kB each).
          cert: identity.certificate,
        }),
      };
      operationalContexts.set(identity, cached);
    }
    const client = await this.connect(cached.ctx);
    sessionIdentities.set(client, identity);
    return client;
  }

  /** MQTT 3.1.1 over TLS to the gateway, clean session, no automatic reconnect. */
  private async connect(secureContext?: SecureContext): Promise<MqttClient> {
    // mqtt.js hands its options to tls.connect, which then builds no context of its own
    // (mqtt.js' types do not list secureContext).
    const options: IClientOptions & { secureContext: SecureContext } = {
      clientId: this.deviceId,
      secureContext: secureContext ?? bootstrapContext(this.opts.ca),
      rejectUnauthorized: true,
      protocolVersion: 4,
      clean: true,
      reconnectPeriod: 0,
      connectTimeout: this.timeoutMs,
    };
    // Not mqtt.connectAsync: without reconnects it never settles when the connection closes
    // before CONNACK without an error (e.g. the gateway dies during the handshake).
    const client = mqtt.connect(this.opts.brokerUrl, options);
    await new Promise<void>((resolve, reject) => {
      const fail = (err: Error) => {
        cleanup();
        client.end(true);
        reject(err);
      };
      const onConnect = () => {
        cleanup();
        resolve();
      };
      const onError = (err: Error) => fail(err);
      const onClose = () => fail(new LeafgateError('gateway_unavailable', 'connection to the gateway closed before CONNACK'));
      const timer = setTimeout(() => fail(new LeafgateError('gateway_unavailable', `no CONNACK within ${this.timeoutMs} ms`)), this.timeoutMs);
      const cleanup = () => {
        clearTimeout(timer);
        client.off('connect', onConnect);
        client.off('error', onError);
        client.off('close', onClose);
      };
      client.on('connect', onConnect);
      client.on('error', onError);
      client.on('close', onClose);
    });
    // Later transport errors surface as 'close' (and fail what waits); no unhandled 'error'.
    client.on('error', () => undefined);
    noDelay(client);
    return client;
  }

  /**
   * Serves renewal instructions on an operational connection: on `down/instruction` with
   * `renewal: true`, makes a NEW key pair, sends the CSR over this mTLS session, signed with
   * the CURRENT key (the renewal proof, docs/protocol.md), and hands the new identity to
   * `onRenewed` (the caller reconnects with it). Resolves when set up. `current` is the
   * identity the connection was made with (known by itself for connectOperational's
   * connections); without one the CSR goes without proof, which only a policy with
   * `renewal.requireDeviceProof: false` accepts.
   */
  async enableRenewal(client: MqttClient, onRenewed: (next: DeviceIdentity) => void, onError?: (err: Error) => void, current?: DeviceIdentity): Promise<void> {
    const identity = current ?? sessionIdentities.get(client);
    const inbox = new Inbox(client);
    let busy = false;
    // A renewal of this certificate left unanswered (a crash of the gateway or of this
    // process) is resumed at once: its answer may be held by the gateway, which delivers it
    // on the SUBSCRIBE below, so it is awaited before subscribing.
    const stored = identity ? await this.loadRenewal(identity.serial) : undefined;
    let subscribed!: (v: unknown) => void;
    const afterSubscribe = new Promise((resolve) => (subscribed = resolve));
    if (stored) {
      busy = true;
      void this.resumeRenewal(client, inbox, stored, afterSubscribe)
        .then(onRenewed, (err: Error) => onError?.(err))
        .finally(() => {
          busy = false;
        });
    }
    client.on('message', (topic, payload) => {
      const t = parseTopic(topic);
      if (t?.kind !== 'instruction' || busy) return;
      let instruction: InstructionMessage;
      try {
        instruction = JSON.parse(payload.toString('utf8'));
      } catch {
        return;
      }
      if (!instruction.renewal) return;
      busy = true;
      void (async () => {
        const { identity: next } = await this.requestCertificate(client, inbox, instruction, identity);
        onRenewed(next);
      })()
        .catch((err: Error) => onError?.(err))
        .finally(() => {
          busy = false;
        });
    });
    try {
      await bounded(client, client.subscribeAsync(downFilter(this.deviceId), { qos: 1 }), this.timeoutMs, 'SUBACK');
    } finally {
      // Also on failure: the resumed renewal then fails on its publish instead of waiting.
      subscribed(undefined);
    }
  }

  async publishTelemetry(client: MqttClient, body: unknown, subtopic = 'state'): Promise<void> {
    await this.publish(client, upTopic(this.deviceId, 'telemetry', subtopic), JSON.stringify(body));
  }
}
