/**
 * A raw MQTT 3.1.1 session over TLS for abuse and conformance tests: hand-made packets go
 * out as they are (packet id 0, ill-formed UTF-8, floods), and every packet the broker
 * sends back is parsed with mqtt-packet.
 */
import type tls from 'node:tls';
import mqttPacket from 'mqtt-packet';
import type { Stack } from './stack.ts';
import { connectPacket, rawTls } from './plugins-helpers.ts';
import { within } from './wait.ts';

export interface RawSession {
  socket: tls.TLSSocket;
  received: Array<Record<string, unknown> & { cmd: string }>;
  closed: Promise<void>;
  isClosed(): boolean;
  /** The next received packet of `cmd` (from `from` on), within `ms`. */
  next(cmd: string, ms?: number, from?: number): Promise<Record<string, unknown> & { cmd: string }>;
}

/** Opens TLS (optionally with a client certificate), sends CONNECT, waits for CONNACK 0. */
export async function rawSession(stack: Pick<Stack, 'rootPem'>, port: number, clientId: string, tlsExtra: tls.ConnectionOptions = {}, ms = 10_000): Promise<RawSession> {
  const socket = await rawTls(stack, port, tlsExtra, ms);
  const received: RawSession['received'] = [];
  const parser = mqttPacket.parser({ protocolVersion: 4 });
  let wake = () => {};
  parser.on('packet', (p) => {
    received.push(p as unknown as RawSession['received'][number]);
    wake();
  });
  socket.on('data', (d) => parser.parse(d));
  socket.on('error', () => undefined);
  let isClosed = false;
  const closed = new Promise<void>((resolve) => socket.once('close', () => {
    isClosed = true;
    wake();
    resolve();
  }));
  const next: RawSession['next'] = (cmd, wait = 10_000, from = 0) =>
    within(
      new Promise((resolve, reject) => {
        const check = () => {
          const p = received.slice(from).find((x) => x.cmd === cmd);
          if (p) return resolve(p);
          if (isClosed) return reject(new Error(`connection closed before ${cmd}`));
          wake = check;
        };
        check();
      }),
      wait,
      `${cmd} from the broker`,
    );
  socket.write(connectPacket({ clientId, clean: true, keepalive: 60 }));
  const connack = await next('connack', ms);
  if (connack.returnCode !== 0) throw new Error(`CONNACK ${String(connack.returnCode)} for ${clientId}`);
  return { socket, received, closed, isClosed: () => isClosed, next };
}

/** An MQTT string: 2-byte length + the bytes as given (ill-formed UTF-8 allowed). */
export function mqttString(bytes: Buffer): Buffer {
  return Buffer.concat([Buffer.from([bytes.length >> 8, bytes.length & 0xff]), bytes]);
}

/** Fixed header + body (remaining length as a variable byte integer). */
export function rawPacket(firstByte: number, body: Buffer): Buffer {
  const len: number[] = [];
  let n = body.length;
  do {
    let b = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) b |= 0x80;
    len.push(b);
  } while (n > 0);
  return Buffer.concat([Buffer.from([firstByte, ...len]), body]);
}

const id16 = (id: number) => Buffer.from([id >> 8, id & 0xff]);

/** PUBLISH with a raw topic; QoS > 0 carries `messageId`. */
export function rawPublish(topic: Buffer, payload: Buffer, qos: 0 | 1 | 2, messageId = 1, retain = false): Buffer {
  return rawPacket(0x30 | (qos << 1) | (retain ? 1 : 0), Buffer.concat([mqttString(topic), qos > 0 ? id16(messageId) : Buffer.alloc(0), payload]));
}

/** SUBSCRIBE with raw filters, each asking `qos`. */
export function rawSubscribe(filters: Buffer[], messageId: number, qos = 1): Buffer {
  return rawPacket(0x82, Buffer.concat([id16(messageId), ...filters.map((f) => Buffer.concat([mqttString(f), Buffer.from([qos])]))]));
}

export function rawUnsubscribe(filters: Buffer[], messageId: number): Buffer {
  return rawPacket(0xa2, Buffer.concat([id16(messageId), ...filters.map(mqttString)]));
}

export const PINGREQ = Buffer.from([0xc0, 0x00]);
export const rawPuback = (id: number) => rawPacket(0x40, id16(id));
export const rawPubrec = (id: number) => rawPacket(0x50, id16(id));
export const rawPubrel = (id: number) => rawPacket(0x62, id16(id));
export const rawPubcomp = (id: number) => rawPacket(0x70, id16(id));
