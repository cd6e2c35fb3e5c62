/**
 * Renewal: the authority announces certificates whose window opened; the gateway asks the
 * connected device, which makes a NEW key pair and sends a CSR over its mTLS session; the
 * old certificate is superseded. A device offline through its window is asked when it
 * returns.
 */
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { test } from 'node:test';
import mqtt from 'mqtt';
import { downFilter, pkix, upTopic } from '../protocol/index.ts';
import { MemoryStateStore, renewalProof, type DeviceIdentity } from '../device/index.ts';
import { startStack } from './support/stack.ts';
import { until as waitUntil, within } from './support/wait.ts';

// Lifetime 1 day, window opens after 0.1% of it (about 90 s, already past thanks to the
// 5-minute backdating of notBefore): every fresh certificate is due at once.
const DUE_NOW = { renewAfterFraction: 0.001, validityDays: 1 };

test('a connected device is asked to renew, rotates its key, and the old certificate is superseded', async (t) => {
  const stack = await startStack(t, { policy: DUE_NOW });
  const device = stack.device('renew-1', 'pki-signature');
  const first = await device.onboard();
  const client = await device.connectOperational(first);
  t.after(() => client.endAsync(true));
  const renewed = new Promise<DeviceIdentity>((resolve, reject) => void device.enableRenewal(client, resolve, reject));
  await within(new Promise((r) => setImmediate(r)), 20_000, 'tick');
  assert.equal(await stack.authority.renewals.announce(), 1);
  const next = await within(renewed, 10_000, 'renewal');

  assert.notEqual(next.serial, first.serial);
  const oldKey = new X509Certificate(first.certificate).publicKey.export({ type: 'spki', format: 'der' });
  const newKey = new X509Certificate(next.certificate).publicKey.export({ type: 'spki', format: 'der' });
  assert.ok(!oldKey.equals(newKey), 'renewal uses a new key pair');
  const rows = await stack.authority.store.listCertificates({ subjectId: 'renew-1' });
  assert.deepEqual(Object.fromEntries(rows.map((r) => [r.serial, r.status])), { [first.serial]: 'superseded', [next.serial]: 'active' });
  const audit = await stack.authority.store.listAudit({ deviceId: 'renew-1' });
  // The SDK signed the renewal with its current key, and the authority checked it.
  assert.ok(audit.some((a) => a.action === 'renew' && a.outcome === 'ok' && a.serial === next.serial && a.detail?.proof === 'verified'));

  // Break before make: the gateway refuses a second certificate for an id that is connected.
  await client.endAsync();
  const again = await device.connectOperational(next);
  assert.equal(stack.gateway.sessions.holder('renew-1')?.session.certSerial, next.serial);
  await again.endAsync();
});

test('a device offline through its renewal window is renewed when it comes back', async (t) => {
  const stack = await startStack(t, { policy: DUE_NOW });
  const device = stack.device('ddkg-renew-2', 'ddkg');
  const first = await device.onboard();
  // Announced while the device is away: the gateway keeps the due list.
  await stack.authority.renewals.announce();
  await waitUntil(() => stack.gateway.renewals.get(first.serial), 30_000, 'the gateway to hold the due renewal');

  const client = await device.connectOperational(first);
  t.after(() => client.endAsync(true));
  const next = await within(new Promise<DeviceIdentity>((resolve, reject) => void device.enableRenewal(client, resolve, reject)), 10_000, 'renewal on return');
  assert.notEqual(next.serial, first.serial);
  assert.equal(stack.gateway.renewals.get(first.serial), undefined, 'done renewals are forgotten');
});

test('a renewal CSR with the same key is refused (policy_violation), nothing issued', async (t) => {
  const stack = await startStack(t);
  const device = stack.device('renew-3', 'pki-signature', { keyPreference: [{ keyType: 'ec', keySize: 256 }] });
  const first = await device.onboard();
  const client = await mqtt.connectAsync(stack.brokerUrl, {
    clientId: 'renew-3', ca: stack.rootPem, key: first.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, cert: first.certificate + first.chain[0],
    protocolVersion: 4, reconnectPeriod: 0,
  });
  t.after(() => client.endAsync(true));
  await client.subscribeAsync(downFilter('renew-3'), { qos: 1 });
  const errors: any[] = [];
  const gotError = new Promise<void>((resolve) => client.on('message', (topic, payload) => {
    if (topic.endsWith('/down/error')) {
      errors.push(JSON.parse(payload.toString()));
      resolve();
    }
  }));
  const publicKey = new X509Certificate(first.certificate).publicKey;
  const csr = pkix.buildCsr({ commonName: 'renew-3', privateKey: first.privateKey, publicKey });
  // With a valid proof (by the current key): the key reuse alone is what is refused.
  await client.publishAsync(upTopic('renew-3', 'csr'), JSON.stringify({ requestId: 'same-key-1', csr, ...renewalProof('renew-3', 'same-key-1', csr, first.privateKey) }), { qos: 1 });
  await within(gotError, 20_000, 'down/error');
  assert.equal(errors[0].code, 'policy_violation');
  assert.equal(errors[0].requestId, 'same-key-1');
  const rows = await stack.authority.store.listCertificates({ subjectId: 'renew-3' });
  assert.deepEqual(rows.map((r) => r.status), ['active']);
});

/** A state store that reports what the SDK keeps, so a test can "crash" the device right after. */
class WatchedState extends MemoryStateStore {
  readonly kept: string[] = [];
  onSet?: (key: string) => void;
  override set(key: string, value: string) {
    super.set(key, value);
    this.kept.push(key);
    this.onSet?.(key);
  }
}

test('a renewal answered while the device was down is picked up on its return: same request, one new certificate', async (t) => {
  const stack = await startStack(t, { policy: DUE_NOW });
  const state = new WatchedState();
  const device = stack.device('renew-resume-1', 'pki-signature', { state });
  const first = await device.onboard();
  await stack.authority.renewals.announce();
  await waitUntil(() => stack.gateway.renewals.get(first.serial), 30_000, 'the gateway to hold the due renewal');
  // The authority goes away: the renewal CSR waits in the gateway's outbox.
  await stack.stopAuthority();
  const client = await device.connectOperational(first);
  const failed = new Promise<Error>((resolve) => void device.enableRenewal(client, () => resolve(new Error('renewed on the first connection')), resolve));
  await waitUntil(async () => (await stack.gateway.outbox.pendingCount()) === 1, 30_000, 'the renewal CSR to be queued at the gateway');
  assert.ok(state.get('renewal'), 'the request is kept before it is sent');
  // The device dies before any answer.
  client.end(true);
  assert.notEqual((await within(failed, 30_000, 'the first attempt to fail')).message, 'renewed on the first connection');
  await stack.startAuthorityAgain();
  await waitUntil(async () => (await stack.gateway.outbox.pendingCount()) === 0, 60_000, 'the queued renewal to be answered');

  await waitUntil(() => !stack.gateway.sessions.holder('renew-resume-1'), 30_000, 'the gateway to see the connection gone');
  // "Restarted": a new SDK object on the same state, connecting with the old certificate.
  const again = stack.device('renew-resume-1', 'pki-signature', { state });
  const client2 = await again.connectOperational(first);
  t.after(() => client2.endAsync(true));
  const next = await within(new Promise<DeviceIdentity>((resolve, reject) => void again.enableRenewal(client2, resolve, reject)), 30_000, 'the resumed renewal');
  const rows = await stack.authority.store.listCertificates({ subjectId: 'renew-resume-1' });
  assert.deepEqual(Object.fromEntries(rows.map((r) => [r.serial, r.status])), { [first.serial]: 'superseded', [next.serial]: 'active' }, 'exactly one new certificate, the one made for the kept request');
  assert.equal(state.get('renewal'), undefined, 'the kept request is gone once its certificate is stored');
});

test('a renewal whose CSR never left is re-sent as it was on the next connection; a stale record for another certificate is dropped', async (t) => {
  const stack = await startStack(t, { policy: DUE_NOW });
  const state = new WatchedState();
  const device = stack.device('renew-resume-2', 'pki-signature', { state });
  const first = await device.onboard();
  const client = await device.connectOperational(first);
  // Crash right after the request is kept: the CSR is never published.
  state.onSet = (key) => {
    if (key === 'renewal') client.end(true);
  };
  const failed = new Promise<Error>((resolve) => void device.enableRenewal(client, () => resolve(new Error('renewed')), resolve));
  await stack.authority.renewals.announce();
  assert.notEqual((await within(failed, 30_000, 'the first attempt to fail')).message, 'renewed');
  state.onSet = undefined;
  await waitUntil(() => !stack.gateway.sessions.holder('renew-resume-2'), 30_000, 'the gateway to see the connection gone');
  const kept = JSON.parse(state.get('renewal')!) as { requestId: string; replaces: string };
  assert.equal(kept.replaces, first.serial);
  assert.equal((await stack.authority.store.listCertificates({ subjectId: 'renew-resume-2' })).length, 1, 'nothing issued yet');

  const client2 = await device.connectOperational(first);
  t.after(() => client2.endAsync(true));
  const next = await within(new Promise<DeviceIdentity>((resolve, reject) => void device.enableRenewal(client2, resolve, reject)), 30_000, 'the resumed renewal');
  const audit = await stack.authority.store.listAudit({ deviceId: 'renew-resume-2' });
  assert.ok(audit.some((a) => a.action === 'renew' && a.outcome === 'ok' && a.requestId === kept.requestId && a.serial === next.serial), 'issued for the kept requestId');
  assert.equal((await stack.authority.store.listCertificates({ subjectId: 'renew-resume-2', status: 'active' })).length, 1);

  // A record for a certificate that is no longer in use is never sent.
  state.set('renewal', JSON.stringify({ ...kept, replaces: 'DEADBEEF' }));
  await client2.endAsync();
  await waitUntil(() => !stack.gateway.sessions.holder('renew-resume-2'), 30_000, 'the gateway to see the connection gone');
  const client3 = await device.connectOperational(next);
  t.after(() => client3.endAsync(true));
  await device.enableRenewal(client3, () => assert.fail('nothing to renew'), () => undefined);
  assert.equal(state.get('renewal'), undefined);
});
