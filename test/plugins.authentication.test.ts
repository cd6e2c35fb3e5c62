/**
 * Authentication plugin, through the real gateway: who a client is at CONNECT (mTLS identity,
 * bootstrap session, refusals with the MQTT 3.1.1 CONNACK codes) and the bootstrap time limit.
 */
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { test } from 'node:test';
import { upTopic } from '../protocol/index.ts';
import { startStack } from './support/stack.ts';
import { BootstrapSession, closeQuietly, closed, connectOk, connectPacket, onboardDevice, operationalOptions, rawConnack, tryConnect, until } from './support/plugins-helpers.ts';

test('an empty client id is refused with CONNACK 2 whatever cleanSession says [MQTT-3.1.3-8]', async (t) => {
  const stack = await startStack(t);
  // aedes alone would invent an id for these; the gateway must answer 0x02 itself.
  assert.equal(await rawConnack(stack, stack.gateway.port, connectPacket({ clientId: '', clean: true })), 2, 'cleanSession=1');
  assert.equal(await rawConnack(stack, stack.gateway.port, connectPacket({ clientId: '', clean: false })), 2, 'cleanSession=0');
  const viaMqttJs = await tryConnect(stack, { clientId: '', clean: true });
  assert.equal(viaMqttJs.code, 2);
  // An id that is not a valid device id (MQTT specials, `$`) is refused the same way.
  for (const clientId of ['a/b', 'dev+1', 'dev#', '$SYS', 'x'.repeat(129)]) {
    assert.equal((await tryConnect(stack, { clientId })).code, 2, clientId);
  }
  assert.equal(stack.gateway.sessions.count(), 0, 'no session is left behind by a refusal');
});

test('username/password are refused with CONNACK 4', async (t) => {
  const stack = await startStack(t);
  assert.equal((await tryConnect(stack, { clientId: 'dev-userpass', username: 'admin', password: 'secret' })).code, 4);
  assert.equal((await tryConnect(stack, { clientId: 'dev-useronly', username: 'admin' })).code, 4);
  assert.equal(stack.gateway.sessions.holder('dev-userpass'), undefined);
});

test('keepalive 0 and keepalive above keepaliveMaxSeconds are refused with CONNACK 5', async (t) => {
  const stack = await startStack(t, { gateway: { keepaliveMaxSeconds: 60 } });
  assert.equal((await tryConnect(stack, { clientId: 'dev-ka0', keepalive: 0 })).code, 5, 'keepalive 0');
  assert.equal((await tryConnect(stack, { clientId: 'dev-ka61', keepalive: 61 })).code, 5, 'keepalive 61 > 60');
  const ok = await connectOk(stack, { clientId: 'dev-ka60', keepalive: 60 });
  t.after(() => closeQuietly(ok));
  assert.equal(stack.gateway.sessions.holder('dev-ka60')?.session.kind, 'bootstrap');
});

test('a client id held by another certificate is refused with CONNACK 2 and the holder stays connected', async (t) => {
  const stack = await startStack(t);
  const id = 'pki-twice';
  // maxActiveCerts is 2: onboarding the same device twice yields two certificates for one id.
  const first = await onboardDevice(stack, id);
  const second = await onboardDevice(stack, id);
  assert.notEqual(first.serial, second.serial);

  const holder = await connectOk(stack, operationalOptions(first));
  t.after(() => closeQuietly(holder));
  const holderFingerprint = new X509Certificate(first.certificate).fingerprint256;
  assert.equal(stack.gateway.sessions.holder(id)?.session.certFingerprint, holderFingerprint);

  assert.equal((await tryConnect(stack, operationalOptions(second))).code, 2, 'second certificate for a held id');
  // A certificate-less claim on the id is refused too: bootstrap never takes over a certified device.
  assert.equal((await tryConnect(stack, { clientId: id })).code, 2, 'bootstrap claim on a held id');

  // The holder was not disturbed: still connected, still the session of the id, publishes acknowledged.
  assert.equal(holder.connected, true);
  assert.equal(stack.gateway.sessions.holder(id)?.session.certFingerprint, holderFingerprint);
  await holder.publishAsync(upTopic(id, 'telemetry', 'state'), '{"ok":true}', { qos: 1 });

  // Once the holder leaves, the id is free for the other certificate.
  await holder.endAsync();
  await until(() => stack.gateway.sessions.holder(id) === undefined, 20_000, 'the holder to be released');
  const next = await connectOk(stack, operationalOptions(second));
  t.after(() => closeQuietly(next));
  assert.equal(stack.gateway.sessions.holder(id)?.session.certSerial, second.serial.toUpperCase());
});

test('a certificate that does not name the client id, or is not from the device CA, is refused', async (t) => {
  const stack = await startStack(t);
  const identity = await onboardDevice(stack, 'pki-cn');
  // CN mismatch: identifier rejected.
  assert.equal((await tryConnect(stack, { ...operationalOptions(identity), clientId: 'pki-other' })).code, 2);
  // A birth certificate (manufacturer CA) is not an operational identity: not authorized.
  const birth = stack.manufacturer.issueBirthCertificate('pki-birth');
  const r = await tryConnect(stack, { clientId: 'pki-birth', key: birth.factoryKey.export({ type: 'pkcs8', format: 'pem' }) as string, cert: birth.birthCert });
  assert.equal(r.code, 5);
  assert.equal(stack.gateway.sessions.count(), 0);
});

test('a bootstrap session is closed after bootstrapTimeoutMs', async (t) => {
  const stack = await startStack(t, { gateway: { bootstrapTimeoutMs: 300 } });
  const started = Date.now();
  const client = await connectOk(stack, { clientId: 'dev-slow' });
  t.after(() => closeQuietly(client));
  assert.equal(stack.gateway.sessions.holder('dev-slow')?.session.kind, 'bootstrap');
  await closed(client, 20_000);
  const elapsed = Date.now() - started;
  // It is the time limit that closed it, not a refusal at CONNECT.
  assert.ok(elapsed >= 250, `closed after ${elapsed} ms`);
  // The server side sees its socket close a moment after the client does.
  await until(() => stack.gateway.sessions.holder('dev-slow') === undefined, 20_000, 'the session to be released');
});

test('the bootstrap time limit does not apply to operational sessions', async (t) => {
  const stack = await startStack(t, { gateway: { bootstrapTimeoutMs: 1000 } });
  const identity = await onboardDevice(stack, 'pki-long');
  const operational = await connectOk(stack, operationalOptions(identity));
  t.after(() => closeQuietly(operational));
  // A bootstrap session opened after the operational one is cut by its timer first...
  const bootstrap = await BootstrapSession.open(stack, 'dev-other');
  t.after(() => bootstrap.close());
  await closed(bootstrap.client, 20_000);
  // ...while the older operational session is still up and served.
  assert.equal(operational.connected, true);
  await operational.publishAsync(upTopic('pki-long', 'telemetry', 'state'), '{}', { qos: 1 });
  assert.equal(stack.gateway.sessions.holder('pki-long')?.session.kind, 'operational');
});

test('a refused second CONNECT with the same certificate leaves the live session registered', {
}, async (t) => {
  const stack = await startStack(t);
  const id = 'pki-dup';
  const identity = await onboardDevice(stack, id);
  const first = await connectOk(stack, operationalOptions(identity));
  t.after(() => closeQuietly(first));
  const badWill = { topic: upTopic('dev-victim', 'telemetry', 'x'), payload: Buffer.from('x'), qos: 0 as const, retain: false };
  assert.equal((await tryConnect(stack, { ...operationalOptions(identity), will: badWill })).code, 5);
  assert.equal(first.connected, true, 'the refused CONNECT did not take the first connection over');

  assert.equal(stack.gateway.sessions.holder(id)?.session.kind, 'operational', 'the live session is still the holder of the id');
  const claim = await tryConnect(stack, { clientId: id });
  t.after(() => closeQuietly(claim.client));
  assert.equal(claim.code, 2, 'a bootstrap claim must not take over a certified device');
  assert.equal(first.connected, true);
});
