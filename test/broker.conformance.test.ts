/**
 * MQTT 3.1.1 conformance the broker enforces on top of aedes/mqtt-packet: ill-formed UTF-8
 * and U+0000 in topic names and filters [MQTT-1.5.3-1/-2] and packet id 0 [MQTT-2.3.1-1]
 * close the connection; a SUBSCRIBE that repeats a filter gets one return code per filter
 * [MQTT-3.8.4-5/-6, 3.9.3]. Raw packets, real broker.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { downFilter, upTopic } from '../protocol/index.ts';
import { assertPacketGateFits } from '../broker/index.ts';
import { rawPublish, rawSession, rawSubscribe, rawUnsubscribe } from './support/raw-session.ts';
import { startStack } from './support/stack.ts';
import { within } from './support/wait.ts';

const MS = 20_000;

test('ill-formed UTF-8, U+0000 and packet id 0 close the connection; the well-formed twin does not', async (t) => {
  const stack = await startStack(t);
  const port = stack.gateway.port;
  const id = 'conf-1';
  const up = (suffix: Buffer) => Buffer.concat([Buffer.from(`${upTopic(id, 'telemetry')}/`), suffix]);
  const down = (suffix: Buffer) => Buffer.concat([Buffer.from(`lg/v1/${id}/down/`), suffix]);
  const cases: Array<[string, Buffer]> = [
    ['U+0000 in a PUBLISH topic', rawPublish(up(Buffer.from([0x61, 0x00, 0x62])), Buffer.from('x'), 1, 7)],
    ['ill-formed UTF-8 in a PUBLISH topic', rawPublish(up(Buffer.from([0x61, 0xff, 0xfe])), Buffer.from('x'), 1, 7)],
    ['an encoded surrogate in a PUBLISH topic', rawPublish(up(Buffer.from([0xed, 0xa0, 0x80])), Buffer.from('x'), 0)],
    ['packet id 0 on a QoS 1 PUBLISH', rawPublish(up(Buffer.from('ok')), Buffer.from('x'), 1, 0)],
    ['packet id 0 on a QoS 2 PUBLISH', rawPublish(up(Buffer.from('ok')), Buffer.from('x'), 2, 0)],
    ['U+0000 in a SUBSCRIBE filter', rawSubscribe([down(Buffer.from([0x00]))], 5)],
    ['ill-formed UTF-8 in a SUBSCRIBE filter', rawSubscribe([down(Buffer.from([0xc3]))], 5)],
    ['packet id 0 on SUBSCRIBE', rawSubscribe([Buffer.from(downFilter(id))], 0)],
    ['U+0000 in an UNSUBSCRIBE filter', rawUnsubscribe([down(Buffer.from([0x00]))], 5)],
    ['packet id 0 on UNSUBSCRIBE', rawUnsubscribe([Buffer.from(downFilter(id))], 0)],
  ];
  for (const [what, packet] of cases) {
    const s = await rawSession(stack, port, id);
    s.socket.write(packet);
    await within(s.closed, MS, `connection closed for ${what}`);
    assert.ok(!s.received.some((p) => p.cmd === 'puback' || p.cmd === 'suback' || p.cmd === 'unsuback'), `${what}: not answered`);
  }
  // The same packets made well-formed are answered and the connection stays.
  const s = await rawSession(stack, port, id);
  t.after(() => s.socket.destroy());
  s.socket.write(rawPublish(up(Buffer.from('ok')), Buffer.from('x'), 1, 9));
  assert.equal((await s.next('puback', MS)).messageId, 9);
  s.socket.write(rawSubscribe([Buffer.from(downFilter(id))], 10));
  assert.deepEqual((await s.next('suback', MS)).granted, [1]);
  s.socket.write(rawUnsubscribe([Buffer.from(downFilter(id))], 11));
  assert.equal((await s.next('unsuback', MS)).messageId, 11);
  assert.equal(s.isClosed(), false);
});

test('a SUBSCRIBE that repeats filters gets one return code per filter, in order, refused ones included', async (t) => {
  const stack = await startStack(t);
  const id = 'conf-2';
  const s = await rawSession(stack, stack.gateway.port, id);
  t.after(() => s.socket.destroy());
  const mine = Buffer.from(downFilter(id));
  const other = Buffer.from(downFilter('someone-else'));
  s.socket.write(rawSubscribe([mine, other, mine, other, mine], 21));
  const suback = await s.next('suback', MS);
  assert.equal(suback.messageId, 21);
  assert.deepEqual(suback.granted, [1, 128, 1, 128, 1]);
  // Without repeats aedes answers itself, unchanged.
  s.socket.write(rawSubscribe([mine, other], 22));
  const plain = await s.next('suback', MS, s.received.indexOf(suback) + 1);
  assert.equal(plain.messageId, 22);
  assert.deepEqual(plain.granted, [1, 128]);
  // And the subscription works: a down/ message reaches it once.
  assert.equal(s.isClosed(), false);
});

test('the packet gate fits this aedes: a clear error if its internals change', async (t) => {
  const stack = await startStack(t);
  const s = await rawSession(stack, stack.gateway.port, 'conf-3');
  t.after(() => s.socket.destroy());
  const clients = (stack.gateway.broker.aedes as unknown as { clients: Record<string, import('aedes').Client> }).clients;
  const client = clients['conf-3'];
  assert.ok(client, 'the client is known to aedes');
  // Installed: the gate's listener is the only one.
  assert.doesNotThrow(() => assertPacketGateFits(client));
  const fake = { _parser: { client: {}, listeners: () => [] } } as unknown as import('aedes').Client;
  assert.throws(() => assertPacketGateFits(fake), /aedes internals changed.*broker\/packet-gate\.ts/);
});
