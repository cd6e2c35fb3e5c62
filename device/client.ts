/**
 * Leaf device SDK on mqtt.js: runs the whole onboarding flow of docs/protocol.md --
 * bootstrap connection, register, challenge signature, key generation, CSR, certificate --
 * then reconnects with mutual TLS. Imports only protocol/, so a device vendor can read it
 * as the reference implementation of the wire contract.
 */
import { randomBytes, sign, type KeyObject } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createSecureContext, type SecureContext } from 'node:tls';
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import {
  LeafgateError,
  challengeSigningInput,
  downFilter,
  isErrorCode,
  parseTopic,
  pkix,
  renewalSigningInput,
  upTopic,
  type CertMessage,
  type ChallengeMessage,
  type ErrorBody,
  type InstructionMessage,
  type KeySpec,
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
  /** Retries of the whole flow after rate_limited / authority_unavailable / gateway_unavailable (default 5). */
  retries?: number;
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
    client.on('close', () => this.failAll(new LeafgateError('authority_unavailable', 'connection to the gateway closed')));
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
    // Errors without a requestId (e.g. a refused publish) concern whatever is in flight.
    const w = this.waiters.find((x) => (t.kind === 'error' ? body.requestId === undefined || x.requestId === body.requestId : x.kinds.includes(t.kind) && x.requestId === body.requestId));
    if (t.kind === 'pending') {
      // The gateway queued the request (authority unreachable): keep waiting, longer.
      const p = this.waiters.find((x) => x.requestId === body.requestId);
      if (p) this.extend(p, Math.max(Number(body.retryAfterMs) || 0, 1000) * 4);
      return;
    }
    if (!w) return;
    this.waiters = this.waiters.filter((x) => x !== w);
    clearTimeout(w.timer);
    if (t.kind === 'error') {
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
  }

  private get timeoutMs(): number {
    return this.opts.timeoutMs ?? 30_000;
  }

  /** Opens a bootstrap (no client certificate) connection subscribed to the device's down/ topics. */
  async connectBootstrap(): Promise<{ client: MqttClient; inbox: Inbox }> {
    const client = await this.connect();
    const inbox = new Inbox(client);
    await client.subscribeAsync(downFilter(this.deviceId), { qos: 1 });
    return { client, inbox };
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
        const transient = (e instanceof LeafgateError && (e.code === 'rate_limited' || e.code === 'authority_unavailable' || e.code === 'gateway_unavailable')) || ['ECONNRESET', 'ECONNREFUSED', 'ETIMEDOUT', 'EPIPE'].includes(String(e.code));
        if (!transient || attempt >= attempts) throw err;
        const base = e.retryAfterMs ?? 1000 * 2 ** attempt;
        await new Promise((r) => setTimeout(r, base + Math.random() * base * 0.5));
      }
    }
  }

  private async onboardOnce(): Promise<OnboardResult> {
    const t0 = performance.now();
    const { client, inbox } = await this.connectBootstrap();
    try {
      const cred = this.opts.credential;
      const regId = newRequestId();
      const register: Record<string, unknown> = { requestId: regId, method: cred.method };
      if (this.opts.group) register.group = this.opts.group;
      if (this.opts.keyPreference) register.keyPreference = this.opts.keyPreference;
      if (cred.method === 'pki-signature') register.birthCert = cred.birthCert;
      if (cred.method === 'ddkg' && cred.enrollmentCode) register.enrollmentCode = cred.enrollmentCode;
      const challengeP = inbox.wait<ChallengeMessage>(['challenge'], regId, this.timeoutMs);
      await client.publishAsync(upTopic(this.deviceId, 'register'), JSON.stringify(register), { qos: 1 });
      const challenge = await challengeP;

      let signingKey: KeyObject;
      const auth: Record<string, unknown> = { requestId: newRequestId(), challengeId: challenge.challengeId };
      if (cred.method === 'pki-signature') signingKey = cred.factoryKey;
      else {
        if (!challenge.salt) throw new LeafgateError('bad_request', 'ddkg challenge without salt');
        const pair = deriveDdkgKeyPair(cred.attributes, challenge.salt, this.deviceId);
        signingKey = pair.privateKey;
        auth.publicKey = pair.publicKey.export({ type: 'spki', format: 'pem' });
      }
      auth.signature = sign('sha256', challengeSigningInput(this.deviceId, challenge.challengeId, challenge.nonce), signingKey).toString('base64');
      const instructionP = inbox.wait<InstructionMessage>(['instruction'], auth.requestId as string, this.timeoutMs);
      await client.publishAsync(upTopic(this.deviceId, 'auth'), JSON.stringify(auth), { qos: 1 });
      const instruction = await instructionP;
      const tAuth = performance.now();

      const { identity, keyReadyAt } = await this.requestCertificate(client, inbox, instruction);
      const tIssue = performance.now();
      return { ...identity, ms: { total: tIssue - t0, auth: tAuth - t0, keygen: keyReadyAt - tAuth, issue: tIssue - keyReadyAt } };
    } finally {
      await client.endAsync().catch(() => undefined);
    }
  }

  /**
   * Makes the key pair the instruction asks for, sends the CSR, checks and stores the answer.
   * A renewal passes `current`, the identity being replaced: its key signs the renewal proof.
   */
  private async requestCertificate(client: MqttClient, inbox: Inbox, instruction: InstructionMessage, current?: DeviceIdentity): Promise<{ identity: DeviceIdentity; keyReadyAt: number }> {
    const pair = await generateKeyForInstruction(instruction);
    const keyReadyAt = performance.now();
    const csr = pkix.buildCsr({ commonName: instruction.subject.commonName, sans: instruction.sans, privateKey: pair.privateKey, publicKey: pair.publicKey });
    const requestId = newRequestId();
    const message: RenewalCsrMessage = { requestId, csr };
    if (current) Object.assign(message, renewalProof(this.deviceId, requestId, csr, current.privateKey));
    const certP = inbox.wait<CertMessage>(['cert'], requestId, this.timeoutMs);
    await client.publishAsync(upTopic(this.deviceId, 'csr'), JSON.stringify(message), { qos: 1 });
    const cert = await certP;
    // The certificate must carry the key made here: its SubjectPublicKeyInfo, byte for byte
    // the one the CSR sent (the authority copies it), read without a full X.509 decode.
    const spki = typeof cert.certificate === 'string' ? certificateSpki(cert.certificate) : undefined;
    if (!spki || !spki.equals(pkix.spkiDerOfKey(pair.publicKey))) throw new LeafgateError('bad_certificate', 'issued certificate does not match the generated key');
    const identity: DeviceIdentity = {
      deviceId: this.deviceId, privateKey: pair.privateKey, certificate: cert.certificate, chain: cert.chain, serial: cert.serial, notAfter: cert.notAfter,
      key: { keyType: instruction.keyType, keySize: instruction.keySize },
    };
    if (this.opts.storeDir) this.store(identity);
    return { identity, keyReadyAt };
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
    const client = await mqtt.connectAsync(this.opts.brokerUrl, options);
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
    await client.subscribeAsync(downFilter(this.deviceId), { qos: 1 });
  }

  async publishTelemetry(client: MqttClient, body: unknown, subtopic = 'state'): Promise<void> {
    await client.publishAsync(upTopic(this.deviceId, 'telemetry', subtopic), JSON.stringify(body), { qos: 1 });
  }
}
