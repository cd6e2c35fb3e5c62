/**
 * CONNECT refusals at the gateway broker (MQTT 3.1.1 CONNACK return codes, 3.2.2.3):
 * 2 identifier rejected, 4 bad user name or password, 5 not authorized. mqtt.js rejects
 * connectAsync with an `ErrorWithReasonCode` whose `code` is the return code.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { bootstrap, connackRefusal, connect, connectPacket, rawConnack } from './support/mqtt.ts';
import { gatewayIdentity } from './support/http.ts';
import { startStack } from './support/stack.ts';
import { within } from './support/wait.ts';

test('client ids that are not valid device ids are refused with CONNACK 2', async (t) => {
  const stack = await startStack(t);
  const ids: Array<[string, string]> = [
    ['slash', 'dev/1'],
    ['plus', 'dev+1'],
    ['hash', 'dev#1'],
    ['wildcard only', '#'],
    ['empty', ''],
    ['10 kB', 'a'.repeat(10_000)],
    ['129 chars', 'a'.repeat(129)],
    ['leading dash', '-dev'],
    ['dollar', '$SYS'],
    ['space', 'dev 1'],
    ['NUL', 'dev\u00001'],
  ];
  for (const [what, id] of ids) {
    assert.equal(await connackRefusal(stack, id), 2, what);
  }
  // [MQTT-3.1.3-8]: an empty client id with cleanSession=0 is 0x02 too (aedes would invent an id).
  // mqtt.js will not send that CONNECT ("Missing clientId for unclean clients"): send it by hand.
  assert.equal(await rawConnack(stack, connectPacket('', { clean: false })), 2, 'empty, persistent session');
  assert.equal(await rawConnack(stack, connectPacket('', { clean: true })), 2, 'empty, clean session');
  assert.equal(stack.gateway.sessions.count(), 0);
  // Control for the raw path: a valid id gets 0 (connection accepted).
  assert.equal(await rawConnack(stack, connectPacket('dev-raw')), 0);
  // The longest valid id is accepted (positive control for the length bound).
  const ok = await connect(stack, 'a'.repeat(128));
  await ok.endAsync();
});

test('a username or password in CONNECT is refused with CONNACK 4', async (t) => {
  const stack = await startStack(t);
  assert.equal(await connackRefusal(stack, 'dev-up', { username: 'dev-up', password: 'secret' }), 4);
  assert.equal(await connackRefusal(stack, 'dev-up', { username: 'dev-up' }), 4);
  assert.equal(stack.gateway.sessions.holder('dev-up'), undefined);
});

test('a client certificate that is not from the device CA is refused with CONNACK 5', async (t) => {
  const stack = await startStack(t);
  const id = 'dev-birth';
  const cred = stack.credential(id, 'pki-signature');
  assert.equal(cred.method, 'pki-signature');
  if (cred.method !== 'pki-signature') return;
  // The birth certificate is a manufacturer credential, never an operational identity.
  const code = await connackRefusal(stack, id, { key: cred.factoryKey.export({ type: 'pkcs8', format: 'pem' }) as string, cert: cred.birthCert });
  assert.equal(code, 5);
  assert.equal(stack.gateway.sessions.holder(id), undefined);

  // The gateway's own certificate chains to the root but is not a device certificate.
  assert.equal(await connackRefusal(stack, stack.gatewayId, gatewayIdentity(stack)), 5);
});

test('a device certificate whose CN differs from the client id is refused with CONNACK 2', async (t) => {
  const stack = await startStack(t);
  const device = stack.device('dev-cn', 'pki-signature');
  const identity = await device.onboard();
  const tls = { key: identity.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, cert: identity.certificate + identity.chain[0] };

  assert.equal(await connackRefusal(stack, 'dev-other', tls), 2);
  assert.equal(stack.gateway.sessions.holder('dev-other'), undefined);
  // Positive control: the same certificate with its own id connects as an operational session.
  const client = await connect(stack, 'dev-cn', tls);
  t.after(() => client.endAsync(true));
  assert.equal(stack.gateway.sessions.holder('dev-cn')?.session.kind, 'operational');
});

test('a bootstrap connection cannot take over the id of a device connected with its certificate', async (t) => {
  const stack = await startStack(t);
  const id = 'dev-held';
  const device = stack.device(id, 'pki-signature');
  const identity = await device.onboard();
  const operational = await device.connectOperational(identity);
  t.after(() => operational.endAsync(true));
  let closed = false;
  operational.on('close', () => (closed = true));
  const holder = stack.gateway.sessions.holder(id);
  assert.equal(holder?.session.kind, 'operational');

  assert.equal(await connackRefusal(stack, id), 2);
  // Nor with a persistent session.
  assert.equal(await connackRefusal(stack, id, { clean: false }), 2);

  // The operational session is untouched: same client, still open, still publishing.
  assert.equal(stack.gateway.sessions.holder(id)?.client, holder?.client);
  assert.equal(closed, false);
  await within(device.publishTelemetry(operational, { still: 'here' }), 5_000, 'PUBACK of the operational session');
  assert.equal(closed, false);
  assert.equal(operational.connected, true);
});

test('a bootstrap connection for an id that is only held by another bootstrap session is accepted (takeover)', async (t) => {
  const stack = await startStack(t);
  const first = await bootstrap(t, stack, 'dev-boot');
  const second = await bootstrap(t, stack, 'dev-boot');
  // aedes closes the older connection with the same client id.
  await within(first.closed, 5_000, 'the older connection to be closed');
  assert.equal(second.isClosed, false);
  assert.equal(stack.gateway.sessions.holder('dev-boot')?.client.id, 'dev-boot');
  await second.send('register', '{');
  await second.expectError('malformed_json');
});
