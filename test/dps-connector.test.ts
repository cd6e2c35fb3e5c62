/**
 * The DPS connector with the REAL azure-iot-provisioning-service client against a local
 * stand-in of the DPS service REST surface (SAS checked on every call).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import https from 'node:https';
import { resolveAuthorityConfig } from '../authority/config.ts';
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

test('DPS writes carry the enrollment ETag: a 412 (changed meanwhile) is answered by reading again', async (t) => {
  const dps = await DpsStandin.start();
  t.after(() => dps.close());
  const stack = await startStack(t, { authority: { dps: { connectionString: dps.connectionString(), mode: 'individual', localEndpoint: dps.endpoint } } });
  const id = await stack.device('dps-etag', 'pki-signature').onboard();
  await until(() => dps.enrollments.get('dps-etag'), 20_000, 'the enrollment');
  // Someone changes the record between leafgate's read and write: 412, read again, write again.
  dps.staleNextWrite.add('dps-etag');
  await stack.authority.revocation.revokeSerial(id.serial, 'keyCompromise', 'test');
  await until(() => dps.enrollments.get('dps-etag')?.provisioningStatus === 'disabled', 20_000, 'disabled despite the 412');
  const puts = dps.requests.filter((r) => r.method === 'PUT' && r.path === '/enrollments/dps-etag');
  assert.deepEqual(puts.map((r) => r.status), [200, 412, 200]);
  assert.equal((await stack.authority.store.listSyncFailed({ target: 'dps' })).length, 0);
});

test('group mode after a restart: the existing group is read and rewritten with its ETag (DPS refuses it otherwise)', async (t) => {
  const dps = await DpsStandin.start();
  t.after(() => dps.close());
  const stack = await startStack(t, { authority: { dps: { connectionString: dps.connectionString(), mode: 'group', localEndpoint: dps.endpoint } } });
  await until(() => dps.groups.get('leafgate-device-ca'), 20_000, 'the enrollment group');
  // An operator disabled the group in the portal: leafgate's next start puts it back as configured.
  dps.groups.set('leafgate-device-ca', { ...dps.groups.get('leafgate-device-ca'), provisioningStatus: 'disabled', etag: 'operator-etag' });
  await stack.stopAuthority();
  await stack.startAuthorityAgain();
  await until(() => dps.groups.get('leafgate-device-ca')?.provisioningStatus === 'enabled', 20_000, 'the group rewritten');
  assert.ok(!dps.requests.some((r) => r.path === '/enrollmentGroups/leafgate-device-ca' && (r.status === 409 || r.status === 412)));
});

test('the DPS stand-in answers as DPS: 409 for a write over an existing enrollment without If-Match, 400 for an unknown api-version', async (t) => {
  const dps = await DpsStandin.start();
  t.after(() => dps.close());
  dps.enrollments.set('x', { registrationId: 'x', etag: 'e1' });
  const { createDpsClient } = await import('../authority/registry/index.ts');
  const client = createDpsClient(dps.connectionString(), dps.endpoint);
  await assert.rejects(client.createOrUpdateIndividualEnrollment({ registrationId: 'x', attestation: { type: 'x509' } }), (e: any) => (e.response?.statusCode ?? e.statusCode) === 409);
  await assert.rejects(client.createOrUpdateIndividualEnrollment({ registrationId: 'x', etag: 'stale', attestation: { type: 'x509' } }), (e: any) => (e.response?.statusCode ?? e.statusCode) === 412);
  const status = await new Promise<number>((resolve, reject) => {
    https.get({ host: dps.endpoint.host, port: dps.endpoint.port, ca: dps.ca, servername: dps.hostName, path: '/enrollments/x?api-version=2017-01-01', headers: { host: dps.hostName } }, (res) => {
      res.resume();
      resolve(res.statusCode!);
    }).on('error', reject);
  });
  assert.equal(status, 400);
});

test('Azure config is validated with the key named', () => {
  const base = { dataDir: '/tmp/x' };
  assert.throws(() => resolveAuthorityConfig({ ...base, iotHub: { connectionString: 'HostName=h', authentication: 'x509' as never } }, {}), /iotHub\.authentication: must be one of "selfSigned", "certificateAuthority" \(got "x509"\)/);
  assert.throws(() => resolveAuthorityConfig({ ...base, dps: { connectionString: 'HostName=d', mode: 'groups' as never } }, {}), /dps\.mode/);
  assert.throws(() => resolveAuthorityConfig({ ...base, iotHub: { connectionString: 'HostName=h', registryOperationsPerMinute: 0 } }, {}), /iotHub\.registryOperationsPerMinute/);
  assert.throws(() => resolveAuthorityConfig({ ...base, iotHub: { connectionString: 'HostName=h', units: 1.5 } }, {}), /iotHub\.units/);
  assert.throws(() => resolveAuthorityConfig({ ...base, iotHub: { connectionString: 'HostName=h', tier: 'S9' as never } }, {}), /iotHub\.tier/);
  assert.throws(() => resolveAuthorityConfig({ ...base, iotHub: { connectionString: 'HostName=h', sync: { maxAttempts: -1 } } }, {}), /iotHub\.sync\.maxAttempts/);
  assert.throws(() => resolveAuthorityConfig({ ...base, iotHub: { connectionString: 'HostName=h', authentification: 'selfSigned' } as never }, {}), /iotHub\.authentification: unknown key \(did you mean authentication\?\)/);
  const ok = resolveAuthorityConfig({ ...base, iotHub: { connectionString: 'HostName=h', units: 2 }, dps: { connectionString: 'HostName=d' } }, {});
  assert.equal(ok.iotHub!.registryOperationsPerMinute, 200, 'S1: 100/min/unit');
  assert.equal(resolveAuthorityConfig({ ...base, iotHub: { connectionString: 'HostName=h', tier: 'S3' } }, {}).iotHub!.registryOperationsPerMinute, 5000);
  assert.equal(ok.dps!.operationsPerMinute, 1000);
  assert.equal(ok.iotHub!.sync.maxAttempts, 10);
});
