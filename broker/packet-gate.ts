/**
 * Every packet a client sends, before aedes handles it -- the one adapter on aedes 1.x
 * internals for that (aedes has no public per-packet hook: `preConnect` sees only CONNECT,
 * the authorize hooks only PUBLISH and SUBSCRIBE filters).
 *
 * aedes' Client makes an mqtt-packet parser (`client._parser`) and listens to its `packet`
 * event with one private function (`enqueue`), which hands the packet to aedes' `handle`.
 * That listener is replaced here by one that asks the gate first and calls the original
 * only for an admitted packet: a dropped packet never reaches aedes (no answer, no work, no
 * keepalive refresh). `assertPacketGateFits` checks the internals at broker start and
 * fails with a clear message if an aedes upgrade changed them (test/broker.conformance).
 *
 * Conformance fixes that need the same place:
 * - MQTT 3.1.1 violations that aedes and mqtt-packet let through (see `protocolViolation`)
 *   close the connection, as [MQTT-1.5.3-1/-2] and [MQTT-2.3.1-1] require;
 * - aedes de-duplicates the filters of a SUBSCRIBE and answers one SUBACK code per distinct
 *   filter, where [MQTT-3.8.4-5/-6] require one per filter sent: such a SUBSCRIBE is handed
 *   to aedes de-duplicated and without a packet id (aedes then writes no SUBACK), and the
 *   SUBACK is written here from aedes' own `subscribe` event, one code per filter sent.
 */
import type { Aedes, Client } from 'aedes';
import mqttPacket from 'mqtt-packet';

/** What the gate sees of a packet (mqtt-packet's parsed object). */
export interface GatePacket {
  cmd: string;
  messageId?: number;
  qos?: number;
  topic?: string;
  subscriptions?: Array<{ topic: string; qos: number }>;
  unsubscriptions?: string[];
}

/** True: hand the packet to aedes. False: drop it (the gate may have closed the client). */
export type PacketGate = (client: Client, packet: GatePacket) => boolean;

interface ParserLike {
  listeners(event: 'packet'): Array<(this: ParserLike, packet: GatePacket) => void>;
  removeListener(event: 'packet', fn: (...args: never[]) => void): void;
  on(event: 'packet', fn: (this: ParserLike, packet: GatePacket) => void): void;
  client?: unknown;
}

const parserOf = (client: Client): ParserLike | undefined => (client as unknown as { _parser?: ParserLike })._parser;

/**
 * Throws with a clear message when aedes' Client no longer has the parser and the single
 * `packet` listener this adapter replaces (an aedes upgrade): the budgets and conformance
 * checks would otherwise silently not run.
 */
export function assertPacketGateFits(client: Client): void {
  const parser = parserOf(client);
  const n = parser && typeof parser.listeners === 'function' ? parser.listeners('packet').length : -1;
  if (!parser || n !== 1 || parser.client !== client) {
    throw new Error(`aedes internals changed: expected client._parser with one 'packet' listener (found ${n < 0 ? 'no parser' : `${n} listeners`}); broker/packet-gate.ts must be adapted to this aedes version`);
  }
}

/** Installs the gate on one connection (right after aedes.handle). */
export function installPacketGate(client: Client, gate: PacketGate): void {
  assertPacketGateFits(client);
  const parser = parserOf(client)!;
  const enqueue = parser.listeners('packet')[0];
  parser.removeListener('packet', enqueue);
  parser.on('packet', function gated(this: ParserLike, packet: GatePacket) {
    if (gate(client, packet)) enqueue.call(this, packet);
  });
}

/** U+0000, and U+FFFD: mqtt-packet decodes ill-formed UTF-8 (and encoded surrogates) to U+FFFD. */
const BAD_CHAR = /[\u0000\uFFFD]/;

/**
 * The reason a packet violates MQTT 3.1.1 in a way aedes and mqtt-packet do not catch, or
 * null. Checked: packet id 0 [MQTT-2.3.1-1]; U+0000 [MQTT-1.5.3-2] and ill-formed UTF-8
 * [MQTT-1.5.3-1] in topic names and filters. mqtt-packet turns ill-formed bytes into
 * U+FFFD before anyone sees them, so a U+FFFD in a topic is refused as ill-formed: no
 * leafgate topic needs that character (a documented policy, docs/protocol.md).
 */
export function protocolViolation(packet: GatePacket): string | null {
  switch (packet.cmd) {
    case 'publish':
      if ((packet.qos ?? 0) > 0 && packet.messageId === 0) return 'packet id 0 on a QoS>0 PUBLISH [MQTT-2.3.1-1]';
      if (packet.topic !== undefined && BAD_CHAR.test(packet.topic)) return 'ill-formed UTF-8 or U+0000 in a topic name [MQTT-1.5.3-1/-2]';
      return null;
    case 'subscribe':
      if (packet.messageId === 0) return 'packet id 0 on SUBSCRIBE [MQTT-2.3.1-1]';
      for (const s of packet.subscriptions ?? []) if (BAD_CHAR.test(s.topic)) return 'ill-formed UTF-8 or U+0000 in a topic filter [MQTT-1.5.3-1/-2]';
      return null;
    case 'unsubscribe':
      if (packet.messageId === 0) return 'packet id 0 on UNSUBSCRIBE [MQTT-2.3.1-1]';
      for (const t of packet.unsubscriptions ?? []) if (BAD_CHAR.test(t)) return 'ill-formed UTF-8 or U+0000 in a topic filter [MQTT-1.5.3-1/-2]';
      return null;
    default:
      return null;
  }
}

/** What a de-duplicated SUBSCRIBE must answer: its packet id and the filters as sent. */
interface PendingSuback {
  messageId: number;
  sent: Array<{ topic: string; qos: number }>;
}
const kSuback = Symbol('leafgate.suback');
type Marked = { [kSuback]?: PendingSuback };

/**
 * A SUBSCRIBE that repeats a filter: handed to aedes with each filter once (the last
 * occurrence, as aedes would keep) and no packet id, so that aedes writes no SUBACK; the
 * SUBACK with one code per filter sent is written by `answerRepeatedFilters`.
 */
export function prepareRepeatedFilters(packet: GatePacket): void {
  const subs = packet.subscriptions;
  if (!subs || subs.length < 2 || packet.messageId === undefined) return;
  const last = new Map<string, { topic: string; qos: number }>();
  for (const s of subs) last.set(s.topic, s);
  if (last.size === subs.length) return;
  const pending: PendingSuback = { messageId: packet.messageId, sent: subs.map((s) => ({ topic: s.topic, qos: s.qos })) };
  const kept = [...last.values()];
  for (const s of kept) (s as Marked)[kSuback] = pending;
  packet.subscriptions = kept;
  packet.messageId = undefined;
}

/** Listens to aedes' `subscribe` event and writes the SUBACKs of de-duplicated SUBSCRIBEs. */
export function answerRepeatedFilters(aedes: Aedes): void {
  aedes.on('subscribe', (subs, client) => {
    const pending = (subs[0] as Marked | undefined)?.[kSuback];
    if (!pending || !client) return;
    // aedes has set each kept filter's qos to the code it granted (128 = refused).
    const granted = new Map<string, number>();
    for (const s of subs) granted.set(s.topic, s.qos);
    const codes = pending.sent.map((s) => {
      // As if each filter came in its own SUBSCRIBE: refused ones 128, others their own QoS.
      const g = granted.get(s.topic) ?? 128;
      return g === 128 ? 128 : s.qos;
    });
    if (!client.conn.destroyed) mqttPacket.writeToStream({ cmd: 'suback', messageId: pending.messageId, granted: codes }, client.conn);
  });
}
