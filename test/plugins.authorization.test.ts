/**
 * Authorization plugin (the topic ACL): the pure rules on their own, then through the real
 * gateway -- SUBACK 0x80 without losing the connection, wills, refused publishes, no retained
 * onboarding messages, and no delivery of another device's down/ traffic.
 */
import assert from 'node:assert/strict';
import type { Readable } from 'node:stream';
import { test } from 'node:test';
import type { AedesPublishPacket, PublishPacket } from 'aedes';
import { downFilter, downTopic, upTopic } from '../protocol/index.ts';
import { authorizationPlugin, publishDenial, subscriptionAllowed, type DeviceSession } from '../plugins/index.ts';
import { startStack, type Stack } from './support/stack.ts';
import {
  BootstrapSession,
  Inbox,
  closeQuietly,
  connectOk,
  onboardDevice,
  operationalOptions,
  subscribeGranted,
  tryConnect,
  until,
  within,
} from './support/plugins-helpers.ts';

const session = (deviceId: string, kind: DeviceSession['kind']): DeviceSession => ({ deviceId, kind, connectedAt: 0, challengeIds: new Set(), authenticated: false, remoteAddress: '127.0.0.1' });

test('publishDenial: a device publishes only to its own up/ topics of its session kind', () => {
  const boot = session('dev-1', 'bootstrap');
  const op = session('dev-1', 'operational');
  for (const kind of ['register', 'auth', 'csr', 'begin', 'enroll'] as const) assert.equal(publishDenial(boot, upTopic('dev-1', kind)), null, `bootstrap ${kind}`);
  assert.equal(publishDenial(op, upTopic('dev-1', 'csr')), null, 'operational csr (renewal)');
  assert.equal(publishDenial(op, upTopic('dev-1', 'telemetry', 'a', 'b')), null, 'operational telemetry');
  const denied: Array<[DeviceSession, string]> = [
    [boot, upTopic('dev-1', 'telemetry', 'x')], // bootstrap may not send telemetry
    [op, upTopic('dev-1', 'register')], // operational sessions do not re-register
    [op, upTopic('dev-1', 'auth')],
    [op, upTopic('dev-1', 'begin')], // the compact flow is a bootstrap flow too
    [op, upTopic('dev-1', 'enroll')],
    [boot, upTopic('dev-2', 'enroll')],
    [boot, downTopic('dev-1', 'enrolled')], // spoofing the compact flow's answers
    [boot, 'lg/v1/dev-1/up/enroll/extra'],
    [boot, upTopic('dev-2', 'register')], // another device
    [op, upTopic('dev-2', 'telemetry', 'x')],
    [op, downTopic('dev-1', 'cert')], // spoofing the gateway's answers
    [op, 'lg/v1/dev-1/up/telemetry/1/2/3/4/5/6/7/8/9'], // deeper than 8 levels under telemetry
    [boot, 'lg/v1/dev-1/up/register/extra'],
    [op, 'lg/v1/dev-1/up/unknown'],
    [op, '$SYS/broker/uptime'],
    [op, 'other/topic'],
    [op, 'lg/v1/dev$1/up/telemetry/x'],
  ];
  for (const [s, topic] of denied) assert.equal(typeof publishDenial(s, topic), 'string', `${s.kind} ${topic}`);
});

test('subscriptionAllowed: only the own down/ tree or one known kind under it', () => {
  const s = session('dev-1', 'operational');
  for (const f of ['lg/v1/dev-1/down/#', 'lg/v1/dev-1/down/+', 'lg/v1/dev-1/down/cert', 'lg/v1/dev-1/down/revoked', 'lg/v1/dev-1/down/offer', 'lg/v1/dev-1/down/enrolled']) assert.equal(subscriptionAllowed(s, f), true, f);
  for (const f of ['#', '+/#', '$SYS/#', 'lg/v1/+/down/#', 'lg/v1/#', 'lg/v1/dev-2/down/#', 'lg/v1/dev-1/up/#', 'lg/v1/dev-1/#', 'lg/v1/dev-1/down/unknown', 'lg/v1/dev-1/down/+/x', 'lg/v1/dev-1/down/cert/#', 'lg/v1/dev-10/down/#', 'lg/v1/dev-2/down/enrolled', 'lg/v1/dev-1/down/offer/#']) {
    assert.equal(subscriptionAllowed(s, f), false, f);
  }
});

async function retainedTopics(stack: Stack): Promise<string[]> {
  const persistence = (stack.gateway.broker.aedes as unknown as { persistence: { createRetainedStream(pattern: string): Readable } }).persistence;
  const topics: string[] = [];
  for await (const p of persistence.createRetainedStream('#')) topics.push((p as PublishPacket).topic);
  return topics;
}

test('subscriptions outside the own down/ tree get SUBACK 0x80 and the connection stays open', async (t) => {
  const stack = await startStack(t);
  const other = 'dev-victim';
  const refused = ['#', '+/#', '$SYS/#', 'lg/v1/+/down/#', downFilter(other), `lg/v1/${other}/down/cert`, 'lg/v1/dev-sub/up/#', 'lg/v1/dev-sub/#'];

  const boot = await connectOk(stack, { clientId: 'dev-sub' });
  t.after(() => closeQuietly(boot));
  for (const filter of refused) assert.deepEqual(await subscribeGranted(boot, filter), [128], `bootstrap ${filter}`);
  assert.equal(boot.connected, true, 'SUBACK 0x80 does not drop the connection');
  assert.deepEqual(await subscribeGranted(boot, downFilter('dev-sub')), [1], 'own down/# is granted');
  assert.deepEqual(await subscribeGranted(boot, 'lg/v1/dev-sub/down/cert', 0), [0], 'own down/cert is granted');

  const identity = await onboardDevice(stack, 'pki-sub');
  const op = await connectOk(stack, operationalOptions(identity));
  t.after(() => closeQuietly(op));
  for (const filter of refused.map((f) => f.replace('dev-sub', 'pki-sub'))) assert.deepEqual(await subscribeGranted(op, filter), [128], `operational ${filter}`);
  assert.deepEqual(await subscribeGranted(op, downFilter('pki-sub')), [1]);
  // Still served after all those refusals.
  await op.publishAsync(upTopic('pki-sub', 'telemetry', 'state'), '{}', { qos: 1 });
  assert.equal(op.connected, true);
});

test('wills: another device\'s topic and any bootstrap will are refused with CONNACK 5; an operational will on its own telemetry is accepted', async (t) => {
  const stack = await startStack(t);
  const will = (topic: string) => ({ topic, payload: Buffer.from('{"gone":true}'), qos: 1 as const, retain: false });

  assert.equal((await tryConnect(stack, { clientId: 'dev-w1', will: will(upTopic('dev-victim', 'telemetry', 'x')) })).code, 5, 'bootstrap, other device');
  assert.equal((await tryConnect(stack, { clientId: 'dev-w1', will: will(upTopic('dev-w1', 'telemetry', 'x')) })).code, 5, 'bootstrap, own telemetry');
  assert.equal((await tryConnect(stack, { clientId: 'dev-w1', will: will(upTopic('dev-w1', 'register')) })).code, 5, 'bootstrap, own register');

  const identity = await onboardDevice(stack, 'pki-will');
  const opts = operationalOptions(identity);
  for (const topic of [upTopic('dev-victim', 'telemetry', 'x'), downTopic('dev-victim', 'cert'), downTopic('pki-will', 'cert'), upTopic('pki-will', 'csr'), 'status/pki-will']) {
    assert.equal((await tryConnect(stack, { ...opts, will: will(topic) })).code, 5, `operational will on ${topic}`);
  }

  // Accepted at CONNECT.
  const client = await connectOk(stack, { ...opts, will: will(upTopic('pki-will', 'telemetry', 'x')) });
  t.after(() => closeQuietly(client));
  assert.equal(stack.gateway.sessions.holder('pki-will')?.session.kind, 'operational');
});

test('an accepted will is published when the operational device drops without DISCONNECT', {
}, async (t) => {
  const stack = await startStack(t);
  const identity = await onboardDevice(stack, 'pki-will');
  const topic = upTopic('pki-will', 'telemetry', 'x');
  const client = await connectOk(stack, { ...operationalOptions(identity), will: { topic, payload: Buffer.from('{"gone":true}'), qos: 1, retain: false } });
  t.after(() => closeQuietly(client));
  const published = new Promise<AedesPublishPacket>((resolve) => {
    const onPublish = (packet: AedesPublishPacket) => {
      if (packet.topic !== topic) return;
      stack.gateway.broker.aedes.off('publish', onPublish);
      resolve(packet);
    };
    stack.gateway.broker.aedes.on('publish', onPublish);
  });
  client.stream.destroy();
  const packet = await within(published, 20_000, 'the will');
  assert.equal(packet.payload.toString(), '{"gone":true}');
});

test('refused publishes are answered with down/error forbidden, dropped, and the connection stays', async (t) => {
  const stack = await startStack(t);
  const boot = await BootstrapSession.open(stack, 'dev-pub');
  t.after(() => boot.close());
  const cases = [upTopic('dev-pub', 'telemetry', 'x'), upTopic('dev-victim', 'register'), downTopic('dev-pub', 'cert'), downTopic('dev-victim', 'cert')];
  for (const topic of cases) {
    const mark = boot.inbox.messages.length;
    const error = boot.inbox.wait((m) => boot.inbox.messages.indexOf(m) >= mark && m.kind === 'error', 3000, `error for ${topic}`);
    await boot.client.publishAsync(topic, JSON.stringify({ requestId: 'spoof', certificate: 'x' }), { qos: 1 });
    assert.equal((await error).body.code, 'forbidden', topic);
  }
  // A message spoofed onto its own down/cert would have been delivered before the PUBACK: none was.
  assert.deepEqual(boot.inbox.messages.filter((m) => m.kind !== 'error'), []);
  assert.equal(boot.client.connected, true);
  // The session still onboards normally afterwards.
  const identity = await boot.onboard();
  assert.equal(identity.deviceId, 'dev-pub');
});

test('nothing a device publishes is retained: neither up/register nor telemetry (the broker\'s own retained messages are)', async (t) => {
  const stack = await startStack(t);
  const boot = await BootstrapSession.open(stack, 'pki-ret');
  t.after(() => boot.close());
  const cred = stack.credential('pki-ret', 'pki-signature');
  assert.equal(cred.method, 'pki-signature');
  const mark = boot.inbox.messages.length;
  const challenge = boot.inbox.wait((m) => boot.inbox.messages.indexOf(m) >= mark && m.kind === 'challenge', 5000, 'challenge');
  await boot.client.publishAsync(upTopic('pki-ret', 'register'), JSON.stringify({ requestId: 'ret-1', method: 'pki-signature', birthCert: cred.method === 'pki-signature' ? cred.birthCert : '' }), { qos: 1, retain: true });
  await challenge; // the request itself was served
  assert.deepEqual(await retainedTopics(stack), [], 'nothing retained from a bootstrap session');

  const identity = await boot.onboard();
  const op = await connectOk(stack, operationalOptions(identity));
  t.after(() => closeQuietly(op));
  await op.publishAsync(upTopic('pki-ret', 'csr'), '{}', { qos: 1, retain: true });
  await op.publishAsync(upTopic('pki-ret', 'telemetry', 'state'), '{"t":1}', { qos: 1, retain: true });
  assert.deepEqual(await retainedTopics(stack), [], 'nothing retained from an operational session either');

  // Positive control: the persistence does keep a retained message (one the broker publishes itself).
  await new Promise<void>((resolve, reject) => stack.gateway.broker.aedes.publish({ cmd: 'publish', topic: 'lg/v1/pki-ret/down/control', payload: Buffer.from('x'), qos: 0, retain: true, dup: false }, (err) => (err ? reject(err) : resolve())));
  assert.deepEqual(await retainedTopics(stack), ['lg/v1/pki-ret/down/control']);
});

test('down/ traffic of one device never reaches another (ACL and authorizeForward)', async (t) => {
  const stack = await startStack(t);
  const a = await connectOk(stack, { clientId: 'dev-a' });
  const b = await connectOk(stack, { clientId: 'dev-b' });
  t.after(() => closeQuietly(a, b));
  const inboxA = new Inbox(a);
  const inboxB = new Inbox(b);
  assert.deepEqual(await subscribeGranted(a, downFilter('dev-a')), [1]);
  assert.deepEqual(await subscribeGranted(a, downFilter('dev-b')), [128], 'A cannot subscribe to B');
  assert.deepEqual(await subscribeGranted(b, downFilter('dev-b')), [1]);

  // The gateway answers B, then A. A's own message is the barrier: B's would have come first.
  const aedes = stack.gateway.broker.aedes;
  const publish = (topic: string, body: unknown) =>
    new Promise<void>((resolve, reject) => aedes.publish({ cmd: 'publish', topic, payload: Buffer.from(JSON.stringify(body)), qos: 1, retain: false, dup: false }, (err) => (err ? reject(err) : resolve())));
  await publish(downTopic('dev-b', 'cert'), { requestId: 'for-b' });
  await publish(downTopic('dev-a', 'error'), { requestId: 'for-a' });
  await inboxB.wait((m) => m.body.requestId === 'for-b', 3000, 'B\'s message');
  await inboxA.wait((m) => m.body.requestId === 'for-a', 3000, 'A\'s message');
  assert.deepEqual(inboxA.messages.map((m) => m.topic), [downTopic('dev-a', 'error')]);

  // Defence in depth, on the broker's real client objects: even a subscription that slipped
  // through would not forward B's down/ traffic (or anyone's up/ traffic) to A.
  const acl = authorizationPlugin({ sessions: stack.gateway.sessions });
  const clientA = stack.gateway.sessions.holder('dev-a')!.client;
  const packet = (topic: string) => ({ cmd: 'publish', topic, payload: Buffer.from('{}'), qos: 1, retain: false, dup: false, messageId: 1 }) as PublishPacket;
  assert.equal(acl.authorizeForward!(clientA, packet(downTopic('dev-b', 'cert'))), false);
  assert.equal(acl.authorizeForward!(clientA, packet(upTopic('dev-a', 'telemetry', 'x'))), false);
  assert.equal(acl.authorizeForward!(clientA, packet('$SYS/x/y/z/w')), false);
  assert.equal(acl.authorizeForward!(clientA, packet(downTopic('dev-a', 'cert'))), true);
  await until(() => a.connected && b.connected, 20_000, 'both still connected');
});
