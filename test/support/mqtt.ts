/**
 * Raw mqtt.js clients for refusal tests: they speak the wire contract by hand (no SDK
 * inbox), record every message they receive, and let a test wait for the next message of
 * a kind with a bounded timeout. Clients are ended in t.after.
 */
import { generateKeyPairSync, sign, type KeyObject } from 'node:crypto';
import tls from 'node:tls';
import type { TestContext } from 'node:test';
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import {
  challengeSigningInput,
  pkix,
  downFilter,
  parseTopic,
  upTopic,
  type ChallengeMessage,
  type DownKind,
  type ErrorBody,
  type ErrorCode,
  type InstructionMessage,
  type UpKind,
} from '../../protocol/index.ts';
import { deriveDdkgKeyPair, type DeviceCredential } from '../../device/index.ts';
import type { Stack } from './stack.ts';
import { DEFAULT_WAIT_MS, within } from './wait.ts';

export interface DownMessage {
  topic: string;
  /** The down/ kind, or '' for a topic outside our tree. */
  kind: string;
  payload: Buffer;
  /** Parsed JSON, or undefined when the payload is not JSON. */
  body: any;
}

interface Waiter {
  match(m: DownMessage): boolean;
  resolve(m: DownMessage): void;
}

/** Options every raw client uses: TLS to the gateway, MQTT 3.1.1, no reconnect. */
export function baseOptions(stack: Stack, clientId: string, extra: Partial<IClientOptions> = {}): IClientOptions {
  return { clientId, ca: stack.rootPem, rejectUnauthorized: true, protocolVersion: 4, reconnectPeriod: 0, clean: true, connectTimeout: DEFAULT_WAIT_MS, ...extra };
}

/**
 * Connects and resolves with the client, or rejects with the CONNACK error (mqtt.js
 * `ErrorWithReasonCode`, whose `code` is the CONNACK return code) or a close error.
 */
export async function connect(stack: Stack, clientId: string, extra: Partial<IClientOptions> = {}): Promise<MqttClient> {
  // allowRetries=false: a socket closed without CONNACK rejects instead of hanging.
  return within(mqtt.connectAsync(stack.brokerUrl, baseOptions(stack, clientId, extra), false), DEFAULT_WAIT_MS + 1_000, `CONNACK for ${clientId.slice(0, 40)}`);
}

/** Connects expecting a refusal; returns the CONNACK return code mqtt.js reports. */
export async function connackRefusal(stack: Stack, clientId: string, extra: Partial<IClientOptions> = {}): Promise<number> {
  let client: MqttClient | undefined;
  try {
    client = await connect(stack, clientId, extra);
  } catch (err) {
    const e = err as Error & { code?: unknown };
    if (typeof e.code !== 'number') throw new Error(`expected a CONNACK refusal, got: ${e.message}`, { cause: err });
    return e.code;
  }
  await client.endAsync(true);
  throw new Error(`connection of ${clientId.slice(0, 40)} was accepted`);
}

/** A connected client that records everything it receives. */
export class RawDevice {
  readonly messages: DownMessage[] = [];
  /** Resolves when the connection closes (for whatever reason). */
  readonly closed: Promise<void>;
  isClosed = false;
  private readonly consumed = new Set<DownMessage>();
  private waiters: Waiter[] = [];

  constructor(readonly client: MqttClient, readonly deviceId: string) {
    client.on('message', (topic, payload) => {
      let body: unknown;
      try {
        body = JSON.parse(payload.toString('utf8'));
      } catch {
        body = undefined;
      }
      const t = parseTopic(topic);
      const m: DownMessage = { topic, kind: t?.direction === 'down' ? t.kind : '', payload, body };
      this.messages.push(m);
      const w = this.waiters.find((x) => x.match(m));
      if (w) {
        this.waiters = this.waiters.filter((x) => x !== w);
        this.consumed.add(m);
        w.resolve(m);
      }
    });
    this.closed = new Promise((resolve) =>
      client.once('close', () => {
        this.isClosed = true;
        resolve();
      }),
    );
  }

  /**
   * The next not yet consumed message of one of `kinds` (optionally for `requestId`),
   * already received or still to come, within `timeoutMs`.
   */
  async nextMessage(kinds: readonly DownKind[], opts: { requestId?: string; timeoutMs?: number } = {}): Promise<DownMessage> {
    const match = (m: DownMessage) => (kinds as readonly string[]).includes(m.kind) && (opts.requestId === undefined || m.body?.requestId === opts.requestId);
    const have = this.messages.find((m) => !this.consumed.has(m) && match(m));
    if (have) {
      this.consumed.add(have);
      return have;
    }
    let waiter: Waiter | undefined;
    const p = new Promise<DownMessage>((resolve) => {
      waiter = { match, resolve };
      this.waiters.push(waiter);
    });
    try {
      return await within(p, opts.timeoutMs ?? DEFAULT_WAIT_MS, `down/${kinds.join('|')}${opts.requestId ? ` for ${opts.requestId}` : ''} on ${this.deviceId}`);
    } finally {
      this.waiters = this.waiters.filter((x) => x !== waiter);
    }
  }

  /** The body of the next message of `kind` (see nextMessage). */
  async next<T = any>(kind: DownKind, opts: { requestId?: string; timeoutMs?: number } = {}): Promise<T> {
    return (await this.nextMessage([kind], opts)).body as T;
  }

  /** The next down/error; asserts nothing, returns the body. */
  nextError(opts: { requestId?: string; timeoutMs?: number } = {}): Promise<ErrorBody> {
    return this.next<ErrorBody>('error', opts);
  }

  /** Waits for the next down/error and checks its code (and requestId when given). */
  async expectError(code: ErrorCode, requestId?: string): Promise<ErrorBody> {
    const e = await this.nextError();
    if (e.code !== code) throw new Error(`expected down/error ${code}${requestId ? ` for ${requestId}` : ''}, got ${JSON.stringify(e)}`);
    if (requestId !== undefined && e.requestId !== requestId) throw new Error(`expected down/error for ${requestId}, got ${JSON.stringify(e)}`);
    return e;
  }

  /** Publishes (QoS 1) to this device's up/{kind}; objects are JSON-encoded. */
  send(kind: UpKind, body: unknown): Promise<unknown> {
    return this.publishTo(upTopic(this.deviceId, kind), body);
  }

  publishTo(topic: string, body: unknown): Promise<unknown> {
    const payload = typeof body === 'string' || Buffer.isBuffer(body) ? body : JSON.stringify(body);
    return within(this.client.publishAsync(topic, payload, { qos: 1 }), DEFAULT_WAIT_MS, `PUBACK on ${topic.slice(0, 80)}`);
  }

  async end(): Promise<void> {
    if (this.isClosed) return;
    await this.client.endAsync(true).catch(() => undefined);
  }
}

/**
 * A bootstrap (no client certificate) connection for `deviceId`, subscribed to its own
 * down/# unless `subscribe` is false. Ended in t.after.
 */
export async function bootstrap(t: TestContext, stack: Stack, deviceId: string, opts: { subscribe?: boolean; mqtt?: Partial<IClientOptions> } = {}): Promise<RawDevice> {
  const client = await connect(stack, deviceId, opts.mqtt);
  const device = new RawDevice(client, deviceId);
  t.after(() => device.end());
  if (opts.subscribe !== false) {
    const granted = await client.subscribeAsync(downFilter(deviceId), { qos: 1 });
    if (granted[0]?.qos !== 1) throw new Error(`subscription to own down/# was not granted: ${JSON.stringify(granted)}`);
  }
  return device;
}

let seq = 0;
/** A fresh, valid requestId. */
export const rid = (prefix = 'r'): string => `${prefix}-${process.pid}-${++seq}-${Date.now().toString(36)}`;

/** The register message for a credential (birthCert or enrollmentCode as the method needs). */
export function registerMessage(cred: DeviceCredential, extra: Record<string, unknown> = {}): Record<string, unknown> {
  const msg: Record<string, unknown> = { requestId: rid('reg'), method: cred.method, ...extra };
  if (cred.method === 'pki-signature') msg.birthCert = cred.birthCert;
  if (cred.method === 'ddkg' && cred.enrollmentCode) msg.enrollmentCode = cred.enrollmentCode;
  return msg;
}

/** The signed auth answer to `challenge` for `cred` (ddkg re-derives its key from the salt). */
export function authMessage(deviceId: string, cred: DeviceCredential, challenge: ChallengeMessage, opts: { signWith?: KeyObject } = {}): Record<string, unknown> {
  const msg: Record<string, unknown> = { requestId: rid('auth'), challengeId: challenge.challengeId };
  let key: KeyObject;
  if (cred.method === 'pki-signature') key = cred.factoryKey;
  else {
    const pair = deriveDdkgKeyPair(cred.attributes, challenge.salt!, deviceId);
    key = pair.privateKey;
    msg.publicKey = pair.publicKey.export({ type: 'spki', format: 'pem' });
  }
  msg.signature = sign('sha256', challengeSigningInput(deviceId, challenge.challengeId, challenge.nonce), opts.signWith ?? key).toString('base64');
  return msg;
}

/** register -> challenge on `dev`; throws with the error body when the gateway answers down/error. */
export async function register(dev: RawDevice, cred: DeviceCredential, extra: Record<string, unknown> = {}): Promise<ChallengeMessage> {
  const msg = registerMessage(cred, extra);
  await dev.send('register', msg);
  return answerOrError<ChallengeMessage>(dev, 'challenge', msg.requestId as string);
}

/** register + auth by hand: returns the instruction (the connection is then authenticated). */
export async function authenticate(dev: RawDevice, cred: DeviceCredential, extra: Record<string, unknown> = {}): Promise<InstructionMessage> {
  const challenge = await register(dev, cred, extra);
  const auth = authMessage(dev.deviceId, cred, challenge);
  await dev.send('auth', auth);
  return answerOrError<InstructionMessage>(dev, 'instruction', auth.requestId as string);
}

/** The answer of `kind` for `requestId`, or a thrown error carrying the down/error body. */
export async function answerOrError<T>(dev: RawDevice, kind: DownKind, requestId: string): Promise<T> {
  const m = await dev.nextMessage([kind, 'error'], { requestId });
  if (m.kind === 'error') throw Object.assign(new Error(`${kind} refused: ${m.body.code} ${m.body.message}`), { body: m.body as ErrorBody, code: m.body.code as string });
  return m.body as T;
}

/**
 * SUBACK return codes for `filters` (one SUBSCRIBE packet), in order. mqtt.js 5 rejects
 * subscribeAsync when any code is a failure (0x80) with an `ErrorWithSubackPacket`
 * (`code` 128, `packet.granted` the raw codes); both outcomes become the list of codes.
 */
export async function subscribeCodes(client: MqttClient, filters: string[], qos: 0 | 1 | 2 = 1): Promise<number[]> {
  try {
    const granted = await within(client.subscribeAsync(Object.fromEntries(filters.map((f) => [f, { qos }]))), DEFAULT_WAIT_MS, `SUBACK for ${filters.join(', ')}`);
    return granted.map((g) => g.qos);
  } catch (err) {
    const codes = (err as { packet?: { granted?: unknown } }).packet?.granted;
    if (Array.isArray(codes)) return codes.map((c) => (typeof c === 'number' ? c : (c as { qos: number }).qos));
    throw err;
  }
}

/**
 * An MQTT 3.1.1 CONNECT built by hand, for what mqtt.js refuses to send (e.g. an empty
 * client id with cleanSession=0). Flags: 0x02 is cleanSession.
 */
export function connectPacket(clientId: string, opts: { clean?: boolean; keepalive?: number } = {}): Buffer {
  const str = (s: string) => {
    const b = Buffer.from(s, 'utf8');
    const len = Buffer.alloc(2);
    len.writeUInt16BE(b.length);
    return Buffer.concat([len, b]);
  };
  const keepalive = Buffer.alloc(2);
  keepalive.writeUInt16BE(opts.keepalive ?? 60);
  const body = Buffer.concat([str('MQTT'), Buffer.from([4, opts.clean === false ? 0x00 : 0x02]), keepalive, str(clientId)]);
  const length: number[] = [];
  let n = body.length;
  do {
    let byte = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) byte |= 0x80;
    length.push(byte);
  } while (n > 0);
  return Buffer.concat([Buffer.from([0x10, ...length]), body]);
}

/** Sends raw bytes over TLS to the broker; resolves with the CONNACK return code, or null if closed without one. */
export function rawConnack(stack: Stack, packet: Buffer): Promise<number | null> {
  const url = new URL(stack.brokerUrl);
  const p = new Promise<number | null>((resolve, reject) => {
    const socket = tls.connect({ host: url.hostname, port: Number(url.port), ca: stack.rootPem }, () => socket.write(packet));
    let got = Buffer.alloc(0);
    socket.on('data', (d: Buffer) => {
      got = Buffer.concat([got, d]);
      if (got.length >= 4) {
        socket.destroy();
        if (got[0] !== 0x20 || got[1] !== 0x02) reject(new Error(`not a CONNACK: ${got.subarray(0, 4).toString('hex')}`));
        else resolve(got[3]);
      }
    });
    socket.on('error', reject);
    socket.on('close', () => resolve(null));
  });
  return within(p, DEFAULT_WAIT_MS, 'a raw CONNACK');
}

/** A CSR that answers an instruction (a fresh key of the asked type and size). */
export function csrFor(instruction: InstructionMessage): string {
  const pair = instruction.keyType === 'rsa' ? generateKeyPairSync('rsa', { modulusLength: instruction.keySize }) : generateKeyPairSync('ec', { namedCurve: `P-${instruction.keySize}` });
  return pkix.buildCsr({ commonName: instruction.subject.commonName, sans: instruction.sans, ...pair });
}
