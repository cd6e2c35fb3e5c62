/**
 * Topic ACL and payload refusals at the gateway broker: a device reaches nothing but its
 * own topics, malformed or oversized payloads are answered on down/error without closing
 * the connection, and only a packet over the hard cap closes it.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { PublishPacket } from 'aedes';
import { downTopic, upTopic } from '../protocol/index.ts';
import { bootstrap, registerMessage, rid, subscribeCodes, type RawDevice } from './support/mqtt.ts';
import { startStack, type Stack } from './support/stack.ts';
import { within } from './support/wait.ts';

/** Every packet the broker routes under `filter`, seen from inside the broker (no ACL applies). */
async function brokerSpy(t: { after(fn: () => unknown): void }, stack: Stack, filter: string): Promise<PublishPacket[]> {
  const seen: PublishPacket[] = [];
  const aedes = stack.gateway.broker.aedes;
  const deliver = (packet: PublishPacket, cb: () => void) => {
    seen.push(packet);
    cb();
  };
  await new Promise<void>((resolve) => aedes.subscribe(filter, deliver, resolve));
  t.after(() => new Promise<void>((resolve) => aedes.unsubscribe(filter, deliver, resolve)));
  return seen;
}

/**
 * A round trip on the device's own topics (malformed JSON -> malformed_json). Everything the
 * broker did for earlier publishes of this connection is done once the answer arrives.
 */
async function barrier(dev: RawDevice): Promise<void> {
  await dev.send('register', '{barrier');
  await dev.expectError('malformed_json');
}

test('a device cannot publish to another device\'s topics: forbidden, nothing routed, no device created', async (t) => {
  const stack = await startStack(t);
  const a = await bootstrap(t, stack, 'dev-a');
  const b = await bootstrap(t, stack, 'dev-b');
  const spy = await brokerSpy(t, stack, 'lg/v1/dev-b/#');
  const credB = stack.credential('dev-b', 'pki-signature');

  const attempts: Array<[string, unknown]> = [
    [upTopic('dev-b', 'register'), registerMessage(credB)],
    [upTopic('dev-b', 'auth'), { requestId: rid(), challengeId: 'abc', signature: 'AAAA' }],
    [upTopic('dev-b', 'csr'), { requestId: rid(), csr: '-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n' }],
    [upTopic('dev-b', 'telemetry', 'state'), { temperature: 99 }],
    // Injecting answers into B's down/ tree.
    [downTopic('dev-b', 'cert'), { requestId: 'x', certificate: 'forged' }],
    [downTopic('dev-b', 'error'), { code: 'revoked', message: 'forged' }],
    // Not our tree at all, and the broker's own.
    ['lg/v1/dev-b', { x: 1 }],
    ['$SYS/broker/clients', { x: 1 }],
  ];
  for (const [topic, body] of attempts) {
    // The broker acknowledges (MQTT-3.3.5-2) and drops; A learns why on its own down/error.
    await a.publishTo(topic, body);
    const e = await a.expectError('forbidden');
    assert.equal(typeof e.message, 'string');
  }
  await barrier(a);
  await barrier(b);

  assert.deepEqual(spy.map((p) => p.topic), ['lg/v1/dev-b/up/register', 'lg/v1/dev-b/down/error'], 'only B\'s own barrier was routed under lg/v1/dev-b/');
  assert.deepEqual(b.messages.map((m) => [m.topic, m.body?.code]), [['lg/v1/dev-b/down/error', 'malformed_json']]);
  assert.ok(a.messages.every((m) => m.topic.startsWith('lg/v1/dev-a/down/')), 'A received only its own down/ messages');
  assert.equal(await stack.authority.store.getDevice('dev-b'), null);
  assert.deepEqual(await stack.authority.store.listAudit({ deviceId: 'dev-b' }), []);
  assert.equal(a.isClosed, false);
});

test('subscriptions outside the device\'s own down/ tree get SUBACK 0x80 and the connection stays open', async (t) => {
  const stack = await startStack(t);
  const a = await bootstrap(t, stack, 'dev-a', { subscribe: false });
  const b = await bootstrap(t, stack, 'dev-b');

  const refused = ['lg/v1/dev-b/down/#', 'lg/v1/dev-b/down/cert', 'lg/v1/+/down/#', 'lg/v1/#', '#', '+/+/+/+/+', '$SYS/#', 'lg/v1/dev-a/up/#', 'lg/v1/dev-a/#'];
  for (const filter of refused) {
    // mqtt.js rejects subscribeAsync on a 0x80 code; subscribeCodes reads the SUBACK either way.
    assert.deepEqual(await subscribeCodes(a.client, [filter]), [128], filter);
    assert.equal(a.isClosed, false);
  }
  // Several filters in one SUBSCRIBE: each gets its own verdict.
  assert.deepEqual(await subscribeCodes(a.client, ['lg/v1/dev-b/down/error', 'lg/v1/dev-a/down/#']), [128, 1]);

  // Still connected, and the granted subscription works.
  assert.equal(a.isClosed, false);
  await barrier(a);
  // B's traffic does not reach A through any of the refused filters.
  await barrier(b);
  await barrier(a);
  assert.ok(a.messages.every((m) => m.topic.startsWith('lg/v1/dev-a/down/')), JSON.stringify(a.messages.map((m) => m.topic)));
});

test('malformed JSON, a JSON array and unknown fields on up/register are refused and nothing is registered', async (t) => {
  const stack = await startStack(t);
  const id = 'dev-json';
  const dev = await bootstrap(t, stack, id);

  for (const payload of ['{"requestId": "r1", "method": "ddkg"', '[{"requestId":"r1","method":"ddkg"}]', '[]', 'null', '"register"', '42', '', Buffer.from([0xff, 0xfe, 0x7b, 0x7d])]) {
    await dev.send('register', payload);
    const e = await dev.expectError('malformed_json');
    assert.equal(e.requestId, undefined, `no requestId can be read from ${JSON.stringify(payload)}`);
  }

  const r = rid('reg');
  await dev.send('register', { requestId: r, method: 'ddkg', extra: true });
  const e = await dev.expectError('bad_request', r);
  assert.match(e.message, /unknown field "extra"/);
  // Schema errors of known fields are bad_request too.
  const r2 = rid('reg');
  await dev.send('register', { requestId: r2, method: 'password' });
  await dev.expectError('bad_request', r2);

  assert.equal(await stack.authority.store.getDevice(id), null);
  assert.deepEqual(await stack.authority.store.listAudit({ deviceId: id }), []);
  assert.equal(dev.isClosed, false);
});

test('a payload over the onboarding cap is refused politely; a packet over the hard cap closes the connection', async (t) => {
  const stack = await startStack(t, { gateway: { maxPacketBytes: 64 * 1024, onboardingPayloadBytes: 16 * 1024 } });
  const id = 'dev-big';
  const dev = await bootstrap(t, stack, id);

  // Exactly at the cap: accepted by the broker, then refused by the schema (not by size).
  const pad = (n: number) => JSON.stringify({ requestId: 'r-cap', method: 'ddkg', group: 'x'.repeat(n) });
  const atCap = pad(16 * 1024 - pad(0).length);
  assert.equal(Buffer.byteLength(atCap), 16 * 1024);
  await dev.send('register', atCap);
  await dev.expectError('bad_request', 'r-cap');

  const over = pad(16 * 1024 - pad(0).length + 1);
  await dev.send('register', over);
  const e = await dev.expectError('payload_too_large');
  assert.match(e.message, /16385 bytes exceeds 16384/);
  assert.equal(dev.isClosed, false);
  await barrier(dev);

  // Over the MQTT packet cap: the broker closes the connection without reading the body.
  dev.client.publishAsync(upTopic(id, 'register'), Buffer.alloc(64 * 1024 + 1, 0x20), { qos: 1 }).catch(() => undefined);
  await within(dev.closed, 20_000, 'the gateway to close the connection');
  assert.equal(stack.gateway.sessions.holder(id), undefined);
  assert.equal(await stack.authority.store.getDevice(id), null);
});
