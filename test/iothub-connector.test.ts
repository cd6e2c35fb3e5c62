/**
 * The IoT Hub registry connector with the REAL azure-iothub Registry against the local
 * wire-level stand-in: child devices with thumbprints and the edge scope, thumbprint
 * rollover on renewal, disable on revocation, delete on decommission, 429 back-off.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import https from 'node:https';
import { X509Certificate } from 'node:crypto';
import type { AuthorityConfigInput } from '../authority/config.ts';
import { parseRetryAfter, thumbprint } from '../authority/registry/index.ts';
import type { DeviceIdentity } from '../device/index.ts';
import { IotHubStandin } from './support/iothub-standin.ts';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { startStack, type Stack } from './support/stack.ts';
import { until, within } from './support/wait.ts';



const EDGE = { deviceId: 'gw-test', capabilities: { iotEdge: true }, authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: 'A'.repeat(64), secondaryThumbprint: 'A'.repeat(64) } } };

async function hubStack(t: Parameters<typeof startStack>[0], policy = {}, iotHub: Partial<NonNullable<AuthorityConfigInput['iotHub']>> = {}, authority: AuthorityConfigInput = {}) {
  const hub = await IotHubStandin.start();
  t!.after(() => hub.close());
  const edge = hub.addDevice(EDGE);
  const stack = await startStack(t, {
    policy,
    authority: { ...authority, iotHub: { connectionString: hub.connectionString('registryReadWrite'), localEndpoint: hub.registryEndpoint, ...iotHub } },
  });
  return { hub, stack, edgeScope: edge.deviceScope as string };
}

/** Every write the hub received for one device: single PUTs and its entries of bulk POSTs. */
const hubWrites = (hub: IotHubStandin, id: string) =>
  hub.requests.flatMap((r) =>
    r.method === 'PUT' && r.path === `/devices/${id}` ? [r.body as any]
      : r.method === 'POST' && r.path === '/devices' && Array.isArray(r.body) ? (r.body as any[]).filter((d) => d.id === id) : []);

test('an onboarded device becomes an X.509 child of its edge device in IoT Hub', async (t) => {
  const { hub, stack, edgeScope } = await hubStack(t);
  const id = await stack.device('hub-1', 'pki-signature').onboard();
  const dev = await until(() => hub.devices.get('hub-1'), 20_000, 'the hub device');
  // Created through the bulk endpoint (Registry.addDevices), import mode create.
  assert.deepEqual(hubWrites(hub, 'hub-1')[0], {
    id: 'hub-1', importMode: 'create', status: 'enabled',
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
  const writes = hubWrites(hub, 'hub-2');
  const thumbs = writes.map((w) => w.authentication.x509Thumbprint);
  assert.deepEqual(thumbs.slice(-2), [{ primaryThumbprint: oldT, secondaryThumbprint: newT }, { primaryThumbprint: newT, secondaryThumbprint: oldT }]);
  // Conditional on the etag read, never If-Match: * (Registry.update): import mode UpdateIfMatchETag with an eTag.
  for (const w of writes.slice(-2)) assert.ok(w.importMode === 'UpdateIfMatchETag' && typeof w.eTag === 'string' && w.eTag.length > 0, JSON.stringify(w));
  assert.ok(!hub.requests.some((r) => r.path === '/devices/hub-2' && r.method === 'PUT' && r.headers['if-match'] === '"*"'), 'no blind If-Match: * write');

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

test('one poisoned device (400 for ever) does not hold back a healthy one; it backs off alone and ends parked as sync-failed', async (t) => {
  const { hub, stack } = await hubStack(t, {}, { sync: { maxAttempts: 3, retryBaseMs: 200, retryMaxMs: 1000 } });
  hub.refuseDevice('poison-1', 'ErrorCode:ArgumentInvalid;device poison-1 is refused by the test');
  await stack.device('poison-1', 'pki-signature').onboard();
  await until(async () => (await stack.authority.store.listAudit({ deviceId: 'poison-1' })).some((a) => a.outcome === 'error'), 20_000, 'a failed attempt for the poisoned device');
  // The poisoned row is older and still pending: the healthy device must reach the hub anyway.
  await stack.device('healthy-1', 'pki-signature').onboard();
  await until(() => hub.devices.get('healthy-1'), 20_000, 'the healthy device in the hub');
  const failed = await until(async () => {
    const f = await stack.authority.store.listSyncFailed({ target: 'hub' });
    return f.length ? f : null;
  }, 30_000, 'the poisoned device parked');
  assert.deepEqual(failed.map((f) => [f.deviceId, f.attempts]), [['poison-1', 3]]);
  assert.match(failed[0].error ?? '', /refused by the test/);
  assert.equal(hub.devices.has('poison-1'), false);
  // Parked rows are left alone: no more calls for it, and it is visible to operators.
  const calls = hub.requests.length;
  await stack.authority.hub!.sync();
  assert.equal(hub.requests.filter((r) => JSON.stringify(r.body ?? '').includes('poison-1')).length, hub.requests.slice(0, calls).filter((r) => JSON.stringify(r.body ?? '').includes('poison-1')).length);
  const listed = JSON.parse(await authorityGet(stack, '/admin/v1/devices?status=sync-failed', true));
  assert.deepEqual(listed.map((d: any) => [d.id, d.target, d.attempts]), [['poison-1', 'hub', 3]]);
  const text = await authorityGet(stack, '/metrics');
  assert.match(text, /leafgate_authority_registry_sync_failed\{target="hub"\} 1/);
  assert.match(text, /leafgate_authority_registry_sync_pending\{target="hub"\} 0/);
  assert.match(text, /leafgate_authority_registry_sync_last_success_timestamp_seconds\{target="hub"\} \d/);
});

test('revocations are synced before older pending creates', async (t) => {
  const { hub, stack } = await hubStack(t);
  const id = await stack.device('rev-1', 'pki-signature').onboard();
  await until(() => hub.devices.get('rev-1'), 20_000, 'the hub device');
  stack.authority.hub!.stop();
  // A queue of older pending rows, then a revocation: the revocation is listed first.
  const store = stack.authority.store;
  const cert = (await store.getCertificate(id.serial))!;
  await seedDevices(store, cert.pem, 'older', 5, cert.createdAt - 10_000);
  await stack.authority.revocation.revokeSerial(id.serial, 'keyCompromise', 'test');
  const pending = await store.listHubPending(3, 'hub', Date.now());
  assert.equal(pending[0].serial, id.serial);
  assert.equal(pending[0].status, 'revoked');
});

test('a device an operator disabled in the hub stays disabled at renewal; one leafgate disabled is enabled again', async (t) => {
  const { hub, stack } = await hubStack(t, { renewAfterFraction: 0.001, validityDays: 1 });
  const device = stack.device('op-1', 'pki-signature');
  const first = await device.onboard();
  await until(() => hub.devices.get('op-1'), 20_000, 'the hub device');
  // The operator disables it in the portal.
  const cur = hub.devices.get('op-1')!;
  hub.putDevice('op-1', { ...cur, status: 'disabled' }, '*');
  const client = await device.connectOperational(first);
  t.after(() => client.endAsync(true));
  const renewed = new Promise<DeviceIdentity>((resolve, reject) => void device.enableRenewal(client, resolve, reject));
  await stack.authority.renewals.announce();
  const next = await within(renewed, 20_000, 'renewal');
  await until(() => (hub.devices.get('op-1') as any)?.authentication?.x509Thumbprint?.primaryThumbprint === thumbprint(next.certificate), 20_000, 'the rollover');
  assert.equal(hub.devices.get('op-1')!.status, 'disabled', 'the operator\'s disable is kept');
  assert.equal((await stack.authority.store.getDevice('op-1'))!.hubState, 'present');
});

test('the edge device re-created (new scope): the next child create re-reads the scope instead of failing until a restart', async (t) => {
  const { hub, stack, edgeScope } = await hubStack(t);
  await stack.device('scope-1', 'pki-signature').onboard();
  await until(() => hub.devices.get('scope-1'), 20_000, 'the first child');
  hub.deleteDevice('scope-1', '*');
  hub.deleteDevice('gw-test', '*');
  const edge = hub.addDevice(EDGE);
  assert.notEqual(edge.deviceScope, edgeScope);
  await stack.device('scope-2', 'pki-signature').onboard();
  const child = await until(() => hub.devices.get('scope-2'), 20_000, 'the second child');
  assert.equal(child.deviceScope, edge.deviceScope);
  assert.deepEqual(child.parentScopes, [edge.deviceScope]);
  assert.ok(hub.requests.some((r) => r.status === 400), 'the stale scope was refused once');
  assert.equal((await stack.authority.store.listSyncFailed({})).length, 0);
});

test('Retry-After: delay-seconds and HTTP-date are both read', () => {
  const now = Date.parse('2024-05-01T10:00:00Z');
  assert.equal(parseRetryAfter('7', now), 7000);
  assert.equal(parseRetryAfter('Wed, 01 May 2024 10:00:30 GMT', now), 30_000);
  assert.equal(parseRetryAfter('Wed, 01 May 2024 09:00:00 GMT', now), 0);
  assert.equal(parseRetryAfter(undefined, now), undefined);
  assert.equal(parseRetryAfter('soon', now), undefined);
});

test('a 429 with an HTTP-date Retry-After pauses the hub sync until that date', async (t) => {
  const { hub, stack } = await hubStack(t);
  const until2 = new Date(Math.ceil((Date.now() + 3000) / 1000) * 1000);
  hub.failNext(1, 429, { 'retry-after': until2.toUTCString() }, (r) => r.method === 'GET' && r.path === '/devices/gw-test');
  await stack.device('date-1', 'pki-signature').onboard();
  await until(() => hub.devices.get('date-1'), 20_000, 'the hub device after the pause');
  const throttledAt = hub.requests.findIndex((r) => r.status === 429);
  assert.ok(throttledAt >= 0);
  const next = hub.requests[throttledAt + 1];
  // A lower bound only (never an upper one): nothing was sent before the date the hub gave.
  assert.ok(next.at >= until2.getTime() - 5, `next call at ${new Date(next.at).toISOString()}, Retry-After ${until2.toISOString()}`);
  assert.match(await authorityGet(stack, '/metrics'), /leafgate_authority_registry_throttled_total\{target="hub"\} 1/);
});

test('a surge of 2,000 new devices drains under the quota the hub enforces: bulk calls of 100, no 429', async (t) => {
  // A test quota (240/min, the hub allows a burst of 3) so that it runs in seconds; the same
  // code paces S1 at 100/min/unit.
  // No fsync per commit: 2,000 rows are written several times each; durability is not under test here.
  const { hub, stack } = await hubStack(t, {}, { registryOperationsPerMinute: 240 }, { databaseFsync: false });
  const seed = await stack.device('surge-0', 'pki-signature').onboard();
  await until(() => hub.devices.get('surge-0'), 20_000, 'the first device');
  hub.setRateLimit({ perMinute: 240, burst: 3 });
  const before = hub.requests.length;
  const cert = (await stack.authority.store.getCertificate(seed.serial))!;
  // Seeded while the sync loop is stopped, so that the surge arrives at once.
  stack.authority.hub!.stop();
  await seedDevices(stack.authority.store, cert.pem, 'surge', 2000, Date.now());
  stack.authority.hub!.start();
  await until(() => [...hub.devices.keys()].filter((k) => k.startsWith('surge-')).length === 2001 || null, 60_000, '2,000 devices in the hub');
  const calls = hub.requests.slice(before);
  assert.equal(calls.filter((r) => r.status === 429).length, 0, 'no call beyond the quota');
  const bulk = calls.filter((r) => r.method === 'POST' && r.path === '/devices');
  assert.equal(bulk.length, 20, 'bulk creates of 100');
  assert.ok(bulk.every((r) => (r.body as unknown[]).length === 100));
  assert.equal(calls.filter((r) => r.method === 'PUT').length, 0, 'no single creates');
  assert.ok(calls.length <= 25, `${calls.length} calls for 2,000 devices`);
  await until(async () => (await stack.authority.store.countSync('hub')).pending === 0 || null, 30_000, 'all marked synced');
});

test('the stand-in refuses the pacing it is given (the surge test is not vacuous): 429 with Retry-After beyond the rate', async (t) => {
  const hub = await IotHubStandin.start();
  t.after(() => hub.close());
  hub.setRateLimit({ perMinute: 60, burst: 2 });
  const statuses = [];
  for (let i = 0; i < 4; i++) statuses.push(await rawGet(hub, '/devices?api-version=2021-04-12'));
  // No credentials: the first two get as far as the SAS check (401), the rest are throttled first.
  assert.deepEqual(statuses.map((s) => s.status), [401, 401, 429, 429]);
  assert.match(String(statuses[2].headers['retry-after']), /^\d+$/);
  hub.setRateLimit(null);
  assert.equal((await rawGet(hub, '/devices?api-version=2020-01-01')).status, 400, 'unknown api-version refused');
});

async function seedDevices(store: any, pem: string, prefix: string, n: number, createdAt: number): Promise<void> {
  const x = new X509Certificate(pem);
  const rows = [];
  const inserts = [];
  for (let i = 1; i <= n; i++) {
    const id = `${prefix}-${i}`;
    // Concurrent: the SQLite store group-commits them.
    inserts.push(store.insertDevice({ id, groupName: 'default', method: 'pki-signature', status: 'enrolled', gatewayId: 'gw-test', ddkgSalt: null, ddkgPublicKey: null, birthCertFingerprint: null, createdAt, updatedAt: createdAt }));
    rows.push({ serial: `${prefix.toUpperCase().replace(/[^A-F]/g, 'A')}${String(i).padStart(8, '0')}`, subjectId: id, kind: 'device', fingerprint: `${x.fingerprint256}-${prefix}-${i}`, notBefore: createdAt, notAfter: createdAt + 86_400_000, status: 'active', requestId: null, pem, revokedAt: null, revocationReason: null, createdAt });
  }
  await Promise.all(inserts);
  await store.ensureCertificates(rows);
}

/** GET on the authority's HTTPS API (the admin token for /admin); the body as text. */
function authorityGet(stack: Stack, path: string, asAdmin = false): Promise<string> {
  const token = asAdmin ? readFileSync(join(stack.dir, 'authority', 'admin-token'), 'utf8').trim() : '';
  return new Promise((resolve, reject) => {
    https.get(new URL(path, stack.authority.url), { ca: stack.rootPem, agent: false, headers: asAdmin ? { authorization: `Bearer ${token}` } : {} }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => (res.statusCode === 200 ? resolve(Buffer.concat(chunks).toString()) : reject(new Error(`${path}: ${res.statusCode} ${Buffer.concat(chunks)}`))));
    }).on('error', reject);
  });
}

function rawGet(hub: IotHubStandin, path: string): Promise<{ status: number; headers: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const req = https.request({ host: hub.registryEndpoint.host, port: hub.registryEndpoint.port, ca: hub.ca, servername: hub.hostName, path, method: 'GET', headers: { host: hub.hostName } }, (res) => {
      res.resume();
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers }));
    });
    req.on('error', reject);
    req.end();
  });
}
