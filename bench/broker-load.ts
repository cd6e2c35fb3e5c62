/**
 * Load process of the broker benchmark (forked, IPC-driven): P publishers with mutual TLS,
 * and optionally one subscriber, against one broker at a time. Phases:
 *   throughput qos0: publish as fast as the socket takes it, then a QoS 1 barrier per client
 *                    (aedes and mosquitto handle a client's packets in order, so its PUBACK
 *                    means every earlier QoS 0 message was processed).
 *   throughput qos1: a window of W unacknowledged messages per client, refilled on PUBACK.
 *   latency:         a fixed total rate; publish->PUBACK (QoS 1) and, with a subscriber here,
 *                    publish->delivery. Timestamps are CLOCK_MONOTONIC, valid across processes.
 */
import { monoMs } from './common.ts';
import { PublishTemplate, RawMqtt } from './mqtt-raw.ts';

export interface Identity {
  id: string;
  key: string;
  cert: string;
}

export type LoadCommand =
  | { cmd: 'connect'; host: string; port: number; maxVersion: 'TLSv1.2' | 'TLSv1.3'; pubs: Identity[]; payloadBytes: number }
  | { cmd: 'subscribe'; host: string; port: number; maxVersion: 'TLSv1.2' | 'TLSv1.3'; sub: Identity & { filter: string; qos: 0 | 1 } }
  | { cmd: 'throughput'; qos: 0 | 1; seconds: number; warmupMs: number; window: number }
  | { cmd: 'latency'; qos: 0 | 1; rate: number; seconds: number; warmupMs: number }
  | { cmd: 'disconnect' }
  | { cmd: 'exit' };

export interface LoadResult {
  /** Messages counted in the measured window (acknowledged for QoS 1, sent for QoS 0). */
  messages: number;
  windowMs: number;
  /** publish -> PUBACK, ms (QoS 1). */
  ackLatency: Float64Array;
  /** publish -> delivery at the subscriber of this process, ms. */
  deliveryLatency: Float64Array;
  /** Monotonic ns at which the measured window began (for subscribers elsewhere). */
  windowStartNs: bigint;
  windowEndNs: bigint;
  errors: number;
  /** QoS 1 throughput: messages per client write (refills coalesced per loop turn). */
  msgsPerWrite?: number;
  /** QoS 1 throughput: PUBACKs per socket read. */
  acksPerRead?: number;
}

const MAX_SAMPLES = 2_000_000;

class Samples {
  private a = new Float64Array(1 << 16);
  n = 0;
  push(v: number): void {
    if (this.n >= MAX_SAMPLES) return;
    if (this.n === this.a.length) {
      const b = new Float64Array(this.a.length * 2);
      b.set(this.a);
      this.a = b;
    }
    this.a[this.n++] = v;
  }
  done(): Float64Array {
    return this.a.slice(0, this.n);
  }
}

interface Pub {
  client: RawMqtt;
  t0: PublishTemplate;
  t1: PublishTemplate;
  nextId: number;
  sentAt: Float64Array;
  /** QoS 1 messages acknowledged but not yet replaced (see Refill). */
  owed: number;
}

/**
 * Refills QoS 1 windows once per event-loop turn instead of once per socket read. A broker
 * that writes every PUBACK on its own (Mosquitto: one TLS record each) would otherwise cost
 * the client one TLS write -- encryption and a syscall -- per message, and the client, not
 * the broker, would be measured. The window stays the bound on messages in flight; a
 * replacement leaves at most one loop turn (microseconds) after its PUBACK arrived.
 */
class Refill {
  private readonly dirty: Pub[] = [];
  private scheduled = false;
  running = true;
  writes = 0;
  messages = 0;

  owe(p: Pub, acks: number): void {
    if (!this.running) return;
    if (p.owed === 0) this.dirty.push(p);
    p.owed += acks;
    if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(this.flush);
    }
  }

  private readonly flush = (): void => {
    this.scheduled = false;
    for (const p of this.dirty) {
      if (this.running) {
        send(p, 1, p.owed);
        this.writes++;
        this.messages += p.owed;
      }
      p.owed = 0;
    }
    this.dirty.length = 0;
  };
}

let pubs: Pub[] = [];
let sub: RawMqtt | undefined;
let errors = 0;
const nowNs = () => process.hrtime.bigint();

function send(p: Pub, qos: 0 | 1, count: number): boolean {
  const t = qos ? p.t1 : p.t0;
  const now = nowNs();
  const buf = t.batch(count, p.nextId, now);
  if (qos) {
    const ms = Number(now) / 1e6;
    for (let i = 0; i < count; i++) p.sentAt[((p.nextId + i - 1) % 65535) + 1] = ms;
    p.nextId = ((p.nextId + count - 1) % 65535) + 1;
  }
  return p.client.socket.write(buf);
}

/** One QoS 1 message per client; resolves when every one of their PUBACKs is in. */
function barrier(): Promise<void> {
  return Promise.all(pubs.map((p) => new Promise<void>((resolve) => {
    const id = p.nextId;
    p.client.onChunkDone = () => undefined;
    p.client.onPuback = (acked) => {
      if (acked === id) resolve();
    };
    send(p, 1, 1);
  }))).then(() => undefined);
}

async function throughput(qos: 0 | 1, seconds: number, warmupMs: number, window: number): Promise<LoadResult> {
  const ack = new Samples();
  let counting = false;
  let running = true;
  let messages = 0;
  if (qos === 1) {
    const refill = new Refill();
    let reads = 0;
    let acked = 0;
    for (const p of pubs) {
      p.owed = 0;
      p.client.onPuback = (id) => {
        if (counting) {
          messages++;
          ack.push(monoMs() - p.sentAt[id]);
        }
      };
      p.client.onChunkDone = (acks) => {
        reads++;
        acked += acks;
        refill.owe(p, acks);
      };
      send(p, 1, window);
    }
    await new Promise((r) => setTimeout(r, warmupMs));
    counting = true;
    const startNs = nowNs();
    const t0 = monoMs();
    await new Promise((r) => setTimeout(r, seconds * 1000));
    counting = false;
    const windowMs = monoMs() - t0;
    const endNs = nowNs();
    running = false;
    refill.running = false;
    // Let the in-flight window drain before the next phase.
    await new Promise((r) => setTimeout(r, 300));
    await barrier();
    return {
      messages, windowMs, ackLatency: ack.done(), deliveryLatency: new Float64Array(0), windowStartNs: startNs, windowEndNs: endNs, errors,
      msgsPerWrite: refill.messages / Math.max(1, refill.writes), acksPerRead: acked / Math.max(1, reads),
    };
  }
  // QoS 0: pump while the socket takes it; warm-up, barrier, measured window, barrier.
  const BATCH = 64;
  let sent = 0;
  const pumps = pubs.map((p) => {
    const pump = () => {
      while (running) {
        sent += BATCH;
        if (!send(p, 0, BATCH)) {
          p.client.socket.once('drain', pump);
          return;
        }
        // Yield now and then so every client (and IPC) gets a turn.
        if (sent % (BATCH * 16) === 0) {
          setImmediate(pump);
          return;
        }
      }
    };
    return pump;
  });
  pumps.forEach((p) => p());
  await new Promise((r) => setTimeout(r, warmupMs));
  running = false;
  await barrier();
  running = true;
  sent = 0;
  const startNs = nowNs();
  const t0 = monoMs();
  pumps.forEach((p) => p());
  await new Promise((r) => setTimeout(r, seconds * 1000));
  running = false;
  const messagesSent = sent;
  await barrier();
  const windowMs = monoMs() - t0;
  return { messages: messagesSent, windowMs, ackLatency: new Float64Array(0), deliveryLatency: new Float64Array(0), windowStartNs: startNs, windowEndNs: nowNs(), errors };
}

async function latency(qos: 0 | 1, rate: number, seconds: number, warmupMs: number): Promise<LoadResult> {
  const ack = new Samples();
  const delivery = new Samples();
  let windowStart = Infinity;
  let windowEnd = Infinity;
  if (sub) {
    sub.onPublish = (_topic, payload) => {
      if (payload.length < 8) return;
      const sentNs = payload.readBigUInt64BE(0);
      const sentMs = Number(sentNs) / 1e6;
      if (sentMs >= windowStart && sentMs < windowEnd) delivery.push(monoMs() - sentMs);
    };
  }
  for (const p of pubs) {
    p.client.onChunkDone = () => undefined;
    p.client.onPuback = (id) => {
      const s = p.sentAt[id];
      if (s >= windowStart && s < windowEnd) ack.push(monoMs() - s);
    };
  }
  const perClient = rate / pubs.length;
  const t0 = monoMs();
  const sentBy = new Array(pubs.length).fill(0);
  let messages = 0;
  const total = warmupMs + seconds * 1000;
  windowStart = t0 + warmupMs;
  windowEnd = t0 + total;
  await new Promise<void>((resolve) => {
    const tick = setInterval(() => {
      const el = monoMs() - t0;
      if (el >= total) {
        clearInterval(tick);
        resolve();
        return;
      }
      pubs.forEach((p, i) => {
        const due = Math.floor((perClient * el) / 1000) - sentBy[i];
        if (due <= 0) return;
        sentBy[i] += due;
        if (el >= warmupMs) messages += due;
        send(p, qos, due);
      });
    }, 2);
  });
  // Late deliveries of the window still count: wait for them, then close the books.
  await new Promise((r) => setTimeout(r, 500));
  await barrier();
  if (sub) sub.onPublish = () => undefined;
  return {
    messages, windowMs: seconds * 1000, ackLatency: ack.done(), deliveryLatency: delivery.done(),
    windowStartNs: BigInt(Math.round(windowStart * 1e6)), windowEndNs: BigInt(Math.round(windowEnd * 1e6)), errors,
  };
}

async function handle(msg: LoadCommand): Promise<unknown> {
  switch (msg.cmd) {
    case 'connect': {
      errors = 0;
      const topicOf = (id: string) => `lg/v1/${id}/up/telemetry/bench`;
      pubs = await Promise.all(msg.pubs.map(async (p) => {
        const client = await RawMqtt.connect({ host: msg.host, port: msg.port, clientId: p.id, key: p.key, cert: p.cert, maxVersion: msg.maxVersion, keepalive: 600 });
        client.socket.on('error', () => errors++);
        client.socket.on('close', () => errors++);
        return { client, t0: new PublishTemplate(topicOf(p.id), msg.payloadBytes, 0), t1: new PublishTemplate(topicOf(p.id), msg.payloadBytes, 1), nextId: 1, sentAt: new Float64Array(65536), owed: 0 };
      }));
      const s = pubs[0].client.socket;
      return { protocol: s.getProtocol(), cipher: s.getCipher().name };
    }
    case 'subscribe': {
      sub = await RawMqtt.connect({ host: msg.host, port: msg.port, clientId: msg.sub.id, key: msg.sub.key, cert: msg.sub.cert, maxVersion: msg.maxVersion, keepalive: 600 });
      const granted = await sub.subscribe(msg.sub.filter, msg.sub.qos);
      if (granted[0] === 0x80) throw new Error(`subscription to ${msg.sub.filter} refused`);
      return {};
    }
    case 'throughput':
      return throughput(msg.qos, msg.seconds, msg.warmupMs, msg.window);
    case 'latency':
      return latency(msg.qos, msg.rate, msg.seconds, msg.warmupMs);
    case 'disconnect': {
      const all = [...pubs.map((p) => p.client), ...(sub ? [sub] : [])];
      for (const c of all) c.socket.removeAllListeners('close');
      await Promise.all(all.map((c) => c.end()));
      pubs = [];
      sub = undefined;
      return {};
    }
    case 'exit':
      process.exit(0);
  }
}

if (process.send && process.env.BENCH_BROKER_LOAD === '1') {
  process.on('message', (msg: LoadCommand) => {
    handle(msg).then(
      (result) => process.send!({ ok: true, result }),
      (err) => process.send!({ ok: false, message: (err as Error).stack ?? String(err) }),
    );
  });
  process.send({ ok: true, result: 'ready' });
}
