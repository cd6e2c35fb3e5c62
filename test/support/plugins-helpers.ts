/**
 * Helpers for the gateway plugin-layer tests: real mqtt.js clients and raw TLS sockets
 * against a test stack, waits bounded by timeouts (never fixed sleeps), a hand-driven
 * onboarding (so a test can stop between steps or pick socket options such as
 * `localAddress`), and readers for the gateway's ops endpoint.
 */
import { randomBytes, sign, type KeyObject } from 'node:crypto';
import type { EventEmitter } from 'node:events';
import https from 'node:https';
import tls from 'node:tls';
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import { challengeSigningInput, downFilter, parseTopic, pkix, upTopic, type CertMessage, type ChallengeMessage, type InstructionMessage, type UpKind } from '../../protocol/index.ts';
import { generateKeyForInstruction } from '../../device/index.ts';
import type { Stack } from './stack.ts';

/** Rejects when `p` has not settled within `ms`. */
export function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

/**
 * Resolves on the next `event` of `emitter`, bounded by `ms`. Unlike events.once, an
 * 'error' on the way (e.g. ECONNRESET before 'close') does not reject it.
 */
export function nextEvent<T extends unknown[] = unknown[]>(emitter: EventEmitter, event: string, ms: number): Promise<T> {
  let listener: (...args: unknown[]) => void = () => undefined;
  const p = new Promise<T>((resolve) => {
    listener = (...args: unknown[]) => resolve(args as T);
    emitter.once(event, listener);
  });
  return within(p, ms, `'${event}'`).finally(() => emitter.removeListener(event, listener));
}

/** Polls `cond` (a state, not a time) until it holds; fails after `ms`. */
export async function until(cond: () => boolean | Promise<boolean>, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await cond()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

export interface Identity {
  deviceId: string;
  privateKey: KeyObject;
  certificate: string;
  chain: string[];
  serial: string;
}

export function operationalOptions(identity: Identity): IClientOptions {
  return {
    clientId: identity.deviceId,
    key: identity.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string,
    cert: identity.certificate + identity.chain[0],
  };
}

/** Socket option mqtt.js passes through to tls.connect (its types do not list it). */
export function fromAddress(localAddress: string): IClientOptions {
  return { localAddress } as Record<string, unknown> as IClientOptions;
}

export type ConnectOutcome = { code: 0; client: MqttClient } | { code: number; client?: undefined };

/**
 * Opens an mqtt.js connection and reports the CONNACK: code 0 with the client, the refusal
 * code, or -1 when the socket closed without any CONNACK. Never reconnects.
 */
export function tryConnect(stack: Pick<Stack, 'brokerUrl' | 'rootPem'>, opts: IClientOptions, ms = 5000, url = stack.brokerUrl): Promise<ConnectOutcome> {
  const client = mqtt.connect(url, {
    ca: stack.rootPem,
    rejectUnauthorized: true,
    protocolVersion: 4,
    clean: true,
    reconnectPeriod: 0,
    connectTimeout: ms,
    ...opts,
  });
  const outcome = new Promise<ConnectOutcome>((resolve) => {
    client.once('connect', () => resolve({ code: 0, client }));
    client.on('error', (err: Error & { code?: unknown }) => {
      client.end(true);
      resolve({ code: typeof err.code === 'number' ? err.code : -1 });
    });
    client.once('close', () => resolve({ code: -1 }));
  });
  return within(outcome, ms + 1000, 'CONNACK').catch((err) => {
    client.end(true);
    throw err;
  });
}

/** Connects and fails the test unless CONNACK is 0. */
export async function connectOk(stack: Pick<Stack, 'brokerUrl' | 'rootPem'>, opts: IClientOptions, url?: string): Promise<MqttClient> {
  const r = await tryConnect(stack, opts, 5000, url);
  if (!r.client) throw new Error(`CONNACK ${r.code} for ${String(opts.clientId)}`);
  return r.client;
}

/** Ends a client (if any) without waiting for anything from the broker. */
export async function closeQuietly(...clients: Array<MqttClient | undefined>): Promise<void> {
  await Promise.all(clients.map((c) => (c ? c.endAsync(true).catch(() => undefined) : undefined)));
}

/** SUBSCRIBE one filter and return the SUBACK return codes (128 = refused). */
export function subscribeGranted(client: MqttClient, filter: string, qos: 0 | 1 = 1, ms = 5000): Promise<number[]> {
  const p = new Promise<number[]>((resolve, reject) => {
    client.subscribe(filter, { qos }, (err, _subs, packet) => {
      const granted = (packet as { granted?: number[] } | undefined)?.granted;
      if (granted) resolve(granted);
      else reject(err ?? new Error('SUBACK without granted list'));
    });
  });
  return within(p, ms, `SUBACK for ${filter}`);
}

export interface DownMessage {
  topic: string;
  kind: string;
  deviceId: string;
  body: Record<string, unknown>;
}

/**
 * Collects every down/ message a client receives, and lets a test wait for one that
 * matches. Attach before the messages can arrive.
 */
export class Inbox {
  readonly messages: DownMessage[] = [];
  private waiters: Array<{ match: (m: DownMessage) => boolean; resolve: (m: DownMessage) => void }> = [];

  constructor(client: MqttClient) {
    client.on('message', (topic, payload) => {
      const t = parseTopic(topic);
      let body: Record<string, unknown> = {};
      try {
        body = JSON.parse(payload.toString('utf8'));
      } catch {
        body = { raw: payload.toString('utf8') };
      }
      const m: DownMessage = { topic, kind: t?.kind ?? '', deviceId: t?.deviceId ?? '', body };
      this.messages.push(m);
      const w = this.waiters.find((x) => x.match(m));
      if (w) {
        this.waiters = this.waiters.filter((x) => x !== w);
        w.resolve(m);
      }
    });
  }

  /** The first message (already received or future) that matches. */
  wait(match: (m: DownMessage) => boolean, ms = 5000, what = 'a down/ message'): Promise<DownMessage> {
    const seen = this.messages.find(match);
    if (seen) return Promise.resolve(seen);
    return within(new Promise<DownMessage>((resolve) => this.waiters.push({ match, resolve })), ms, what);
  }

  /**
   * The final answer to a request: a message carrying its requestId (an interim `pending`
   * is skipped), or a refusal (down/error without one).
   */
  answer(requestId: string, after: number, ms = 5000): Promise<DownMessage> {
    return this.wait(
      (m) => this.messages.indexOf(m) >= after && ((m.body.requestId === requestId && m.kind !== 'pending') || (m.kind === 'error' && m.body.requestId === undefined)),
      ms,
      `answer to ${requestId}`,
    );
  }
}

export const requestId = () => randomBytes(9).toString('base64url');

/**
 * A bootstrap (certificate-less) session driven step by step, the way a device vendor
 * would with any MQTT client: register, auth, csr, each answered on down/.
 */
export class BootstrapSession {
  private constructor(
    readonly deviceId: string,
    readonly client: MqttClient,
    readonly inbox: Inbox,
    private readonly stack: Stack,
  ) {}

  static async open(stack: Stack, deviceId: string, extra: IClientOptions = {}): Promise<BootstrapSession> {
    const client = await connectOk(stack, { clientId: deviceId, ...extra });
    const inbox = new Inbox(client);
    const granted = await subscribeGranted(client, downFilter(deviceId));
    if (granted[0] !== 1) throw new Error(`down/# refused for ${deviceId}: ${granted}`);
    return new BootstrapSession(deviceId, client, inbox, stack);
  }

  /** Publishes `body` (QoS 1, acknowledged) to up/kind and waits for its answer. */
  async request(kind: UpKind, body: Record<string, unknown>, ms = 5000): Promise<DownMessage> {
    const id = typeof body.requestId === 'string' ? body.requestId : requestId();
    const mark = this.inbox.messages.length;
    const answer = this.inbox.answer(id, mark, ms);
    await this.client.publishAsync(upTopic(this.deviceId, kind), JSON.stringify({ ...body, requestId: id }), { qos: 1 });
    return answer;
  }

  /** Sends register with a fresh birth certificate; returns the answer (challenge or error). */
  register(): Promise<DownMessage> {
    const cred = this.stack.credential(this.deviceId, 'pki-signature');
    if (cred.method !== 'pki-signature') throw new Error('unreachable');
    return this.request('register', { method: 'pki-signature', birthCert: cred.birthCert });
  }

  /** register + auth with a fresh birth certificate; returns the instruction message. */
  async authenticate(): Promise<DownMessage> {
    const cred = this.stack.credential(this.deviceId, 'pki-signature');
    if (cred.method !== 'pki-signature') throw new Error('unreachable');
    const challenge = await this.request('register', { method: 'pki-signature', birthCert: cred.birthCert });
    if (challenge.kind !== 'challenge') throw new Error(`register answered ${challenge.kind}: ${JSON.stringify(challenge.body)}`);
    const c = challenge.body as unknown as ChallengeMessage;
    const signature = sign('sha256', challengeSigningInput(this.deviceId, c.challengeId, c.nonce), cred.factoryKey).toString('base64');
    return this.request('auth', { challengeId: c.challengeId, signature });
  }

  /** Builds a key and CSR for `instruction` and sends it; returns the answer and the key. */
  async csr(instruction: DownMessage): Promise<{ answer: DownMessage; privateKey: KeyObject }> {
    if (instruction.kind !== 'instruction') throw new Error(`auth answered ${instruction.kind}: ${JSON.stringify(instruction.body)}`);
    const ins = instruction.body as unknown as InstructionMessage;
    const pair = await generateKeyForInstruction(ins);
    const csr = pkix.buildCsr({ commonName: ins.subject.commonName, sans: ins.sans, privateKey: pair.privateKey, publicKey: pair.publicKey });
    return { answer: await this.request('csr', { csr }), privateKey: pair.privateKey };
  }

  /** The whole flow on this connection; returns the new operational identity. */
  async onboard(): Promise<Identity> {
    const { answer, privateKey } = await this.csr(await this.authenticate());
    if (answer.kind !== 'cert') throw new Error(`csr answered ${answer.kind}: ${JSON.stringify(answer.body)}`);
    const cert = answer.body as unknown as CertMessage;
    return { deviceId: this.deviceId, privateKey, certificate: cert.certificate, chain: cert.chain, serial: cert.serial };
  }

  close(): Promise<void> {
    return closeQuietly(this.client);
  }
}

/** Onboards `deviceId` on its own bootstrap connection, closed afterwards. */
export async function onboardDevice(stack: Stack, deviceId: string, extra: IClientOptions = {}): Promise<Identity> {
  const s = await BootstrapSession.open(stack, deviceId, extra);
  try {
    return await s.onboard();
  } finally {
    await s.close();
  }
}

/** Resolves when the mqtt.js client's connection is gone (close event), bounded by `ms`. */
export function closed(client: MqttClient, ms: number): Promise<void> {
  if (client.disconnected || (!client.connected && !client.reconnecting && client.stream?.destroyed)) return Promise.resolve();
  return nextEvent(client as unknown as EventEmitter, 'close', ms).then(() => undefined);
}

/** Raw TLS connection to the broker (no MQTT client), resolved once the handshake is done. */
export function rawTls(stack: Pick<Stack, 'rootPem'>, port: number, extra: tls.ConnectionOptions = {}, ms = 5000): Promise<tls.TLSSocket> {
  const socket = tls.connect({ host: '127.0.0.1', port, ca: stack.rootPem, servername: 'localhost', ...extra });
  return within(
    new Promise<tls.TLSSocket>((resolve, reject) => {
      socket.once('secureConnect', () => resolve(socket));
      socket.once('error', reject);
      socket.once('close', () => reject(new Error('closed before the TLS handshake completed')));
    }),
    ms,
    'TLS handshake',
  ).catch((err) => {
    socket.destroy();
    throw err;
  });
}

/**
 * A hand-made MQTT 3.1.1 CONNECT (mqtt.js refuses to send an empty client id with
 * cleanSession=0, which is exactly what a test of [MQTT-3.1.3-8] needs).
 */
export function connectPacket(opts: { clientId: string; clean: boolean; keepalive?: number }): Buffer {
  const id = Buffer.from(opts.clientId, 'utf8');
  const variable = Buffer.from([0x00, 0x04, 0x4d, 0x51, 0x54, 0x54, 0x04, opts.clean ? 0x02 : 0x00, 0, 0]);
  variable.writeUInt16BE(opts.keepalive ?? 60, 8);
  const payload = Buffer.concat([Buffer.from([id.length >> 8, id.length & 0xff]), id]);
  const remaining = variable.length + payload.length;
  if (remaining > 127) throw new Error('client id too long for this helper');
  return Buffer.concat([Buffer.from([0x10, remaining]), variable, payload]);
}

/** Sends a raw CONNECT over TLS and returns the CONNACK return code (or -1 on close). */
export async function rawConnack(stack: Pick<Stack, 'rootPem'>, port: number, packet: Buffer, ms = 5000): Promise<number> {
  const socket = await rawTls(stack, port);
  try {
    const code = new Promise<number>((resolve) => {
      let buf = Buffer.alloc(0);
      socket.on('data', (d: Buffer) => {
        buf = Buffer.concat([buf, d]);
        if (buf.length >= 4 && buf[0] === 0x20 && buf[1] === 0x02) resolve(buf[3]);
      });
      socket.once('close', () => resolve(-1));
    });
    socket.write(packet);
    return await within(code, ms, 'CONNACK');
  } finally {
    socket.destroy();
  }
}

export interface HttpAnswer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

/** GET over http(s); `ca` for https. */
export function httpGet(url: string, ca?: string, ms = 5000): Promise<HttpAnswer> {
  if (url.startsWith('http:')) {
    return within(
      fetch(url).then(async (r) => ({ status: r.status, headers: Object.fromEntries(r.headers), body: await r.text() })),
      ms,
      `GET ${url}`,
    );
  }
  return within(
    new Promise<HttpAnswer>((resolve, reject) => {
      const req = https.get(url, { ca }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }));
        res.on('error', reject);
      });
      req.on('error', reject);
    }),
    ms,
    `GET ${url}`,
  );
}

export const opsUrl = (httpPort: number, path: string) => `http://127.0.0.1:${httpPort}${path}`;

export async function metricsText(httpPort: number): Promise<string> {
  const r = await httpGet(opsUrl(httpPort, '/metrics'));
  if (r.status !== 200) throw new Error(`/metrics answered ${r.status}`);
  return r.body;
}

/** Value of one sample in Prometheus text format; undefined when absent. */
export function metricValue(text: string, name: string, labels: Record<string, string> = {}): number | undefined {
  const want = Object.entries(labels);
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const have = new Map<string, string>();
    for (const l of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) have.set(l[1], l[2]);
    if (want.every(([k, v]) => have.get(k) === v) && have.size === want.length) return Number(m[3]);
  }
  return undefined;
}
