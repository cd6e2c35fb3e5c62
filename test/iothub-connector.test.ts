/**
 * The IoT Hub registry connector with the REAL azure-iothub Registry against the local
 * wire-level stand-in: child devices with thumbprints and the edge scope, thumbprint
 * rollover on renewal, disable on revocation, delete on decommission, 429 back-off.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { thumbprint } from '../authority/registry/index.ts';
import type { DeviceIdentity } from '../device/index.ts';
import { IotHubStandin } from './support/iothub-standin.ts';
import { startStack } from './support/stack.ts';
import { until, within } from './support/wait.ts';



async function hubStack(t: Parameters<typeof startStack>[0], policy = {}) {
  const hub = await IotHubStandin.start();
  t!.after(() => hub.close());
  const edge = hub.addDevice({ deviceId: 'gw-test', capabilities: { iotEdge: true }, authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: 'A'.repeat(64), secondaryThumbprint: 'A'.repeat(64) } } });
  const stack = await startStack(t, {
    policy,
    authority: { iotHub: { connectionString: hub.connectionString('registryReadWrite'), localEndpoint: hub.registryEndpoint } },
  });
  return { hub, stack, edgeScope: edge.deviceScope as string };
}

const hubPuts = (hub: IotHubStandin, id: string) => hub.requests.filter((r) => r.method === 'PUT' && r.path === `/devices/${id}`);

test('an onboarded device becomes an X.509 child of its edge device in IoT Hub', async (t) => {
  const { hub, stack, edgeScope } = await hubStack(t);
  const id = await stack.device('hub-1', 'pki-signature').onboard();
  const dev = await until(() => hub.devices.get('hub-1'), 20_000, 'the hub device');
  const put = hubPuts(hub, 'hub-1')[0];
  assert.deepEqual(put.body, {
    deviceId: 'hub-1', status: 'enabled',
    authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: thumbprint(id.certificate), secondaryThumbprint: thumbprint(id.certificate) } },
    deviceScope: edgeScope, parentScopes: [edgeScope],
  });
  assert.equal((dev as any).status, 'enabled');
  // The audit row follows the hub's answer: wait for it rather than race it.
  await until(async () => (await stack.authority.store.listAudit({ deviceId: 'hub-1' })).some((a) => a.action === 'iothub-create' && a.outcome === 'ok'), 30_000, 'the create call audited');
});

test('renewal rolls the thumbprints (secondary first, then primary); revocation disables; decommission deletes', async (t) => {
  const { hub, stack } = await hubStack(t, { renewAfterFraction: 0.001, validityDays: 1 });
  const device = stack.device('hub-2', 'pki-signature');
  const first = await device.onboard();
  await until(() => hub.devices.get('hub-2'), 20_000, 'the hub device');
  const client = await device.connectOperational(first);
  t.after(() => client.endAsync(true));
  const renewed = new Promise<DeviceIdentity>((resolve, reject) => void device.enableRenewal(client, resolve, reject));
  await stack.authority.renewals.announce();
  const next = await within(renewed, 10_000, 'renewal');
  const [oldT, newT] = [thumbprint(first.certificate), thumbprint(next.certificate)];
  await until(() => (hub.devices.get('hub-2') as any)?.authentication?.x509Thumbprint?.primaryThumbprint === newT, 20_000, 'the rollover');
  const thumbs = hubPuts(hub, 'hub-2').map((r) => (r.body as any).authentication.x509Thumbprint);
  assert.deepEqual(thumbs.slice(-2), [{ primaryThumbprint: oldT, secondaryThumbprint: newT }, { primaryThumbprint: newT, secondaryThumbprint: oldT }]);

  await client.endAsync();
  await stack.authority.revocation.revokeSerial(next.serial, 'keyCompromise', 'test');
  await until(() => (hub.devices.get('hub-2') as any)?.status === 'disabled', 20_000, 'disabled in the hub');

  await stack.authority.store.updateDevice('hub-2', { status: 'disabled' }, Date.now());
  await until(() => !hub.devices.has('hub-2'), 20_000, 'deleted from the hub');
  await until(async () => (await stack.authority.store.listAudit({ deviceId: 'hub-2' })).some((a) => a.action === 'iothub-delete'), 30_000, 'the delete audited');
  const actions = (await stack.authority.store.listAudit({ deviceId: 'hub-2' })).map((a) => a.action);
  for (const a of ['iothub-create', 'iothub-update', 'iothub-disable', 'iothub-delete']) assert.ok(actions.includes(a), a);
});

test('a throttled hub (429 + Retry-After) is retried later and nothing is lost', async (t) => {
  const { hub, stack } = await hubStack(t);
  hub.failNext(3, 429, { 'retry-after': '1' });
  await stack.device('hub-3', 'pki-signature').onboard();
  await until(() => hub.devices.get('hub-3'), 10_000, 'the hub device after throttling');
  assert.ok(hub.requests.filter((r) => r.status === 429).length >= 1);
  // Audit rows follow the hub's answers: wait for them rather than race them.
  await until(async () => (await stack.authority.store.listAudit({ limit: 100 })).some((a) => a.action === 'iothub-create' && a.outcome === 'ok' && a.deviceId === 'hub-3'), 20_000, 'the audited create');
  const audit = await stack.authority.store.listAudit({ limit: 100 });
  assert.ok(audit.some((a) => a.action.startsWith('iothub-') && a.outcome === 'error' && (a.detail as any)?.status === 429), 'the throttled call is audited');
});

test('a hub that is down: the certificate is issued, the registry write waits (also across an authority restart) and completes later', async (t) => {
  const { hub, stack } = await hubStack(t);
  hub.failNext(Infinity, 503);
  const id = await stack.device('hub-4', 'pki-signature').onboard();
  assert.ok(id.serial, 'issuance does not wait for the hub');
  await until(() => hub.requests.some((r) => r.status === 503), 20_000, 'a failed hub call');
  assert.equal((await stack.authority.store.listHubPending(10)).length, 1);
  await stack.stopAuthority();
  await stack.startAuthorityAgain();
  hub.clearFaults();
  await until(() => hub.devices.get('hub-4'), 15_000, 'the hub device after the outage');
  await until(async () => (await stack.authority.store.listHubPending(10)).length === 0, 30_000, 'the write marked done');
  assert.equal((await stack.authority.store.listHubPending(10)).length, 0, 'the write is marked done');
});
