/**
 * A deliberately small MQTT 3.1.1 client for load generation: raw tls.connect, CONNECT and
 * SUBSCRIBE built by mqtt-packet, PUBLISH built from a per-topic template (packet id and an
 * 8-byte timestamp patched in), and a parser that only understands what a load client
 * receives (CONNACK, SUBACK, PUBACK, PUBLISH, PINGRESP). It keeps the client side cheap so
 * that a benchmark measures the broker, not mqtt.js.
 */
import { connect as netConnect } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions, type TLSSocket } from 'node:tls';
import mqttPacket from 'mqtt-packet';

export interface RawConnectOptions {
  host: string;
  port: number;
  clientId: string;
  key?: string | Buffer;
  cert?: string | Buffer;
  /** Trust anchors for the server; without them the server certificate is not checked (load client). */
  ca?: string;
  keepalive?: number;
  clean?: boolean;
  maxVersion?: 'TLSv1.2' | 'TLSv1.3';
  minVersion?: 'TLSv1.2' | 'TLSv1.3';
  localAddress?: string;
  secureContext?: ConnectionOptions['secureContext'];
  timeoutMs?: number;
}

const CMD = { CONNACK: 2, PUBLISH: 3, PUBACK: 4, SUBACK: 9, PINGRESP: 13 } as const;

export class RawMqtt {
  readonly socket: TLSSocket;
  /** PUBACK for our QoS 1 publish. */
  onPuback: (id: number) => void = () => undefined;
  /** Incoming PUBLISH (a subscriber); QoS 1 is acknowledged before this runs. */
  onPublish: (topic: string, payload: Buffer, qos: number) => void = () => undefined;
  private pending: Buffer | null = null;
  private connackWaiter?: (rc: number) => void;
  private subackWaiter?: (codes: number[]) => void;
  /** Number of PUBACKs seen in the current data chunk (for batch refills). */
  acksInChunk = 0;
  onChunkDone: (acks: number) => void = () => undefined;

  private constructor(socket: TLSSocket) {
    this.socket = socket;
    // Paused mode: every TLS record a read brought in is taken in one go, not one 'data'
    // event per record (a broker writing each PUBACK on its own sends one record each).
    socket.on('readable', () => {
      let chunk: Buffer | null;
      while ((chunk = socket.read() as Buffer | null) !== null) this.onData(chunk);
    });
  }

  /** Opens TLS, sends CONNECT, resolves after CONNACK 0. */
  static connect(opts: RawConnectOptions): Promise<RawMqtt> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`connect ${opts.clientId}: timeout`));
      }, opts.timeoutMs ?? 30_000);
      // The TCP socket first, so a source address can be chosen (many connections from 127.0.0.x).
      const tcp = netConnect({ host: opts.host, port: opts.port, ...(opts.localAddress ? { localAddress: opts.localAddress } : {}) });
      const socket = tlsConnect({
        socket: tcp,
        ...(opts.secureContext ? { secureContext: opts.secureContext } : { key: opts.key, cert: opts.cert }),
        ...(opts.ca ? { ca: opts.ca, servername: 'localhost', rejectUnauthorized: true } : { rejectUnauthorized: false }),
        maxVersion: opts.maxVersion,
        minVersion: opts.minVersion ?? 'TLSv1.2',
      });
      tcp.once('error', (err) => socket.destroy(err));
      const client = new RawMqtt(socket);
      const fail = (err: Error) => {
        clearTimeout(timer);
        socket.destroy();
        reject(err);
      };
      socket.once('error', fail);
      socket.once('close', () => fail(new Error(`connect ${opts.clientId}: closed before CONNACK`)));
      socket.once('secureConnect', () => {
        socket.setNoDelay(true);
        socket.write(mqttPacket.generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId: opts.clientId, clean: opts.clean ?? true, keepalive: opts.keepalive ?? 60 }));
      });
      client.connackWaiter = (rc) => {
        clearTimeout(timer);
        socket.removeAllListeners('close');
        socket.removeListener('error', fail);
        socket.on('error', () => undefined);
        if (rc === 0) resolve(client);
        else fail(new Error(`connect ${opts.clientId}: CONNACK ${rc}`));
      };
    });
  }

  subscribe(filter: string, qos: 0 | 1): Promise<number[]> {
    return new Promise((resolve) => {
      this.subackWaiter = resolve;
      this.socket.write(mqttPacket.generate({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: filter, qos }] }));
    });
  }

  end(): Promise<void> {
    return new Promise((resolve) => {
      if (this.socket.destroyed) return resolve();
      this.socket.once('close', () => resolve());
      this.socket.end(mqttPacket.generate({ cmd: 'disconnect' }));
      setTimeout(() => this.socket.destroy(), 2000).unref();
    });
  }

  private onData(chunk: Buffer): void {
    let buf = this.pending ? Buffer.concat([this.pending, chunk]) : chunk;
    this.pending = null;
    let off = 0;
    this.acksInChunk = 0;
    while (off + 2 <= buf.length) {
      const first = buf[off];
      // Remaining length: 1-4 bytes, 7 bits each.
      let len = 0;
      let mul = 1;
      let i = off + 1;
      let complete = false;
      for (; i < buf.length && i < off + 5; i++) {
        len += (buf[i] & 0x7f) * mul;
        mul *= 128;
        if ((buf[i] & 0x80) === 0) {
          complete = true;
          i++;
          break;
        }
      }
      if (!complete || i + len > buf.length) break;
      this.handle(first >> 4, first & 0x0f, buf, i, len);
      off = i + len;
    }
    if (off < buf.length) this.pending = Buffer.from(buf.subarray(off));
    if (this.acksInChunk) this.onChunkDone(this.acksInChunk);
  }

  private handle(type: number, flags: number, buf: Buffer, at: number, len: number): void {
    switch (type) {
      case CMD.PUBACK:
        this.acksInChunk++;
        this.onPuback(buf.readUInt16BE(at));
        break;
      case CMD.PUBLISH: {
        const qos = (flags >> 1) & 3;
        const tlen = buf.readUInt16BE(at);
        const topic = buf.toString('latin1', at + 2, at + 2 + tlen);
        let p = at + 2 + tlen;
        if (qos > 0) {
          const id = buf.readUInt16BE(p);
          p += 2;
          this.socket.write(Buffer.from([0x40, 0x02, id >> 8, id & 0xff]));
        }
        this.onPublish(topic, buf.subarray(p, at + len), qos);
        break;
      }
      case CMD.CONNACK:
        this.connackWaiter?.(buf[at + 1]);
        this.connackWaiter = undefined;
        break;
      case CMD.SUBACK: {
        const codes = [...buf.subarray(at + 2, at + len)];
        this.subackWaiter?.(codes);
        this.subackWaiter = undefined;
        break;
      }
      default:
        break;
    }
  }
}

/**
 * PUBLISH packets for one topic and payload size, built by copying a template. The payload
 * starts with the send time (CLOCK_MONOTONIC ns, u64 BE) so any process on this machine can
 * compute the delivery latency.
 */
export class PublishTemplate {
  private readonly template: Buffer;
  private readonly idOffset: number;
  readonly payloadOffset: number;
  readonly size: number;

  constructor(topic: string, payloadBytes: number, readonly qos: 0 | 1) {
    const t = Buffer.from(topic, 'utf8');
    const remaining = 2 + t.length + (qos ? 2 : 0) + payloadBytes;
    const lenBytes: number[] = [];
    let x = remaining;
    do {
      let b = x % 128;
      x = Math.floor(x / 128);
      if (x > 0) b |= 0x80;
      lenBytes.push(b);
    } while (x > 0);
    this.size = 1 + lenBytes.length + remaining;
    this.template = Buffer.alloc(this.size, 0x61); // 'a' filler
    let o = 0;
    this.template[o++] = 0x30 | (qos << 1);
    for (const b of lenBytes) this.template[o++] = b;
    this.template.writeUInt16BE(t.length, o);
    o += 2;
    t.copy(this.template, o);
    o += t.length;
    this.idOffset = o;
    if (qos) o += 2;
    this.payloadOffset = o;
  }

  /** Writes `count` packets into one buffer; ids from `firstId` (1..65535, wrapping). */
  batch(count: number, firstId: number, nowNs: bigint): Buffer {
    const out = Buffer.allocUnsafe(this.size * count);
    for (let i = 0; i < count; i++) {
      const o = i * this.size;
      this.template.copy(out, o);
      if (this.qos) out.writeUInt16BE(((firstId + i - 1) % 65535) + 1, o + this.idOffset);
      out.writeBigUInt64BE(nowNs, o + this.payloadOffset);
    }
    return out;
  }
}
