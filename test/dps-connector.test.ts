/**
 * The DPS connector with the REAL azure-iot-provisioning-service client against a local
 * stand-in of the DPS service REST surface (SAS checked on every call).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { DpsStandin } from './support/dps-standin.ts';
import { startStack } from './support/stack.ts';
import { until } from './support/wait.ts';


test('individual mode: an X.509 enrollment per device; revocation disables it; decommission deletes it; 429 is retried', async (t) => {
  const dps = await DpsStandin.start();
  t.after(() => dps.close());
  dps.failNext(2, 429, { 'retry-after': '1' });
  const stack = await startStack(t, { authority: { dps: { connectionString: dps.connectionString(), mode: 'individual', localEndpoint: dps.endpoint } } });
  const id = await stack.device('dps-1', 'pki-signature').onboard();
  const e = await until(() => dps.enrollments.get('dps-1'), 10_000, 'the enrollment');
  assert.equal(e.attestation.type, 'x509');
  assert.equal(e.attestation.x509.clientCertificates.primary.certificate, id.certificate);
  assert.equal(e.provisioningStatus, 'enabled');
  assert.ok(dps.requests.some((r) => r.status === 429));

  await stack.authority.revocation.revokeSerial(id.serial, 'keyCompromise', 'test');
  await until(() => dps.enrollments.get('dps-1')?.provisioningStatus === 'disabled', 20_000, 'disabled enrollment');
  await stack.authority.store.updateDevice('dps-1', { status: 'disabled' }, Date.now());
  await until(() => !dps.enrollments.has('dps-1'), 20_000, 'deleted enrollment');
  // The audit row follows the answer: wait for the last one rather than race it.
  const actions = await until(async () => {
    const a = (await stack.authority.store.listAudit({ limit: 200 })).map((r) => `${r.action}:${r.outcome}`);
    return a.includes('dps-delete:ok') && a;
  }, 30_000, 'the dps-delete audit row');
  for (const a of ['dps-enroll:ok', 'dps-disable:ok', 'dps-delete:ok']) assert.ok(actions.includes(a), a);
});

test('group mode: one enrollment group on the device CA', async (t) => {
  const dps = await DpsStandin.start();
  t.after(() => dps.close());
  const stack = await startStack(t, { authority: { dps: { connectionString: dps.connectionString(), mode: 'group', localEndpoint: dps.endpoint } } });
  const g = await until(() => dps.groups.get('leafgate-device-ca'), 20_000, 'the enrollment group');
  assert.equal(g.attestation.x509.signingCertificates.primary.certificate, stack.authority.ca.deviceCa.pem);
  await stack.device('dps-2', 'pki-signature').onboard();
  assert.equal(dps.enrollments.size, 0);
});

test('a wrong DPS key is refused (401) and audited, nothing marked as synced', async (t) => {
  const dps = await DpsStandin.start();
  t.after(() => dps.close());
  const wrong = dps.connectionString().replace(/SharedAccessKey=[^;]+/, `SharedAccessKey=${Buffer.alloc(32, 7).toString('base64')}`);
  const stack = await startStack(t, { authority: { dps: { connectionString: wrong, mode: 'individual', localEndpoint: dps.endpoint } } });
  await stack.device('dps-3', 'pki-signature').onboard();
  await until(() => dps.requests.some((r) => r.status === 401), 20_000, 'a refused call');
  assert.equal(dps.enrollments.size, 0);
  assert.equal((await stack.authority.store.listHubPending(10, 'dps')).length, 1);
});
