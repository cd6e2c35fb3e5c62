/**
 * The local IoT Hub stand-in (test/support/iothub-standin) proven against the REAL Azure SDK
 * clients: azure-iothub's Registry and service Client over HTTPS, azure-iot-device's
 * ModuleClient and Client over azure-iot-device-mqtt. Real sockets on ports chosen by the OS,
 * TLS with a CA made for the test; no SDK object is mocked.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import https from 'node:https';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import azureIotHub from 'azure-iothub';
import azureIotDevice from 'azure-iot-device';
import azureIotDeviceMqtt from 'azure-iot-device-mqtt';
import azureIotCommon from 'azure-iot-common';
import {
  IotHubStandin,
  attachLocalEndpoint,
  certThumbprints,
  issueClientCert,
  localRegistry,
  localServiceClient,
  x509AuthenticationProvider,
  type DeviceRecord,
  type RecordedRequest,
} from './support/iothub-standin.ts';
import { within } from './support/wait.ts';

const { Registry, SharedAccessSignature } = azureIotHub;
const { ModuleClient, Client: DeviceClient, Message } = azureIotDevice;
const { Mqtt } = azureIotDeviceMqtt;
const { NoRetry } = azureIotCommon;

type ModuleClientT = InstanceType<typeof ModuleClient>;
type DeviceClientT = InstanceType<typeof DeviceClient>;

/** What azure-iot-http-base attaches to the errors it translates (RestApiClient.translateError). */
interface SdkHttpError extends Error {
  response?: { statusCode?: number; headers: Record<string, string | string[] | undefined> };
  responseBody?: string;
}

const API_VERSION = '2021-04-12';

/**
 * azure-iothub 1.16 types its answers as `Device`, which declares neither `deviceScope`,
 * `parentScopes` nor `authentication.type`; read them as the JSON the hub sent.
 */
async function device(p: Promise<{ responseBody: unknown }>): Promise<DeviceRecord> {
  return (await p).responseBody as DeviceRecord;
}

/** One stand-in per test, closed after the SDK clients the test registered (LIFO). */
async function hubFor(t: TestContext): Promise<{ hub: IotHubStandin; defer: (fn: () => unknown) => void }> {
  const hub = await IotHubStandin.start();
  const cleanups: Array<() => unknown> = [() => hub.close()];
  t.after(async () => {
    for (const fn of cleanups.reverse()) await fn();
  });
  return { hub, defer: (fn) => cleanups.push(fn) };
}

async function sdkError(p: Promise<unknown>): Promise<SdkHttpError> {
  try {
    await p;
  } catch (err) {
    return err as SdkHttpError;
  }
  assert.fail('expected the SDK call to fail');
}

function lastRequest(hub: IotHubStandin, method: string, path: string): RecordedRequest {
  const r = hub.requests.filter((x) => x.method === method && x.path === path).at(-1);
  assert.ok(r, `no ${method} ${path} recorded`);
  return r;
}

/** A raw HTTPS call to the stand-in with a token made by the SDK's own signer. */
function rawRequest(hub: IotHubStandin, method: string, path: string, headers: Record<string, string>, body?: unknown): Promise<{ status: number; body: any }> {
  const policy = hub.policies.get('iothubowner')!;
  const token = SharedAccessSignature.create(hub.hostName, policy.name, policy.primaryKey, Math.ceil(Date.now() / 1000) + 600).toString();
  const text = body === undefined ? '' : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = https.request(
      {
        host: '127.0.0.1',
        port: hub.httpsPort,
        servername: hub.hostName,
        ca: hub.ca,
        method,
        path: `${path}?api-version=${API_VERSION}`,
        headers: { Host: hub.hostName, Authorization: token, 'Content-Type': 'application/json; charset=utf-8', 'Content-Length': String(Buffer.byteLength(text)), ...headers },
        agent: false,
      },
      (res) => {
        let data = '';
        res.on('data', (c) => (data += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: data ? JSON.parse(data) : undefined }));
      },
    );
    req.on('error', reject);
    req.end(text);
  });
}

async function openModule(hub: IotHubStandin, defer: (fn: () => unknown) => void, deviceId: string, moduleId: string): Promise<ModuleClientT> {
  const client = ModuleClient.fromConnectionString(hub.moduleConnectionString(deviceId, moduleId), Mqtt);
  client.setRetryPolicy(new NoRetry());
  await client.setOptions({ ca: hub.ca });
  await within(client.open(), 20_000, 'ModuleClient.open');
  defer(() => client.close());
  return client;
}

test('the real Registry creates an edge device and an X.509 child with its scopes; the stand-in received exactly that PUT', async (t) => {
  const { hub } = await hubFor(t);
  const registry = localRegistry(hub);

  const edge = await device(registry.create({ deviceId: 'edge-1', capabilities: { iotEdge: true } }));
  assert.match(edge.deviceScope!, /^ms-azure-iot-edge:\/\/edge-1-\d+$/);
  assert.equal(edge.deviceScope, `ms-azure-iot-edge://edge-1-${edge.generationId}`);

  // The edge device's scope, read back the way a connector does (GET /devices/{id}).
  const scope = (await device(registry.get('edge-1'))).deviceScope!;
  assert.equal(scope, edge.deviceScope);

  const leaf = certThumbprints(issueClientCert('leaf-1').cert).sha256;
  const body = {
    deviceId: 'leaf-1',
    status: 'enabled',
    authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: leaf, secondaryThumbprint: leaf } },
    deviceScope: scope,
    parentScopes: [scope],
  };
  const created = await registry.create(body);
  assert.equal(created.httpResponse.statusCode, 200);

  const put = lastRequest(hub, 'PUT', '/devices/leaf-1');
  assert.deepEqual(put.body, body, 'the SDK sent the device JSON unchanged');
  assert.deepEqual(put.query, { 'api-version': API_VERSION });
  assert.equal(put.headers['if-match'], undefined, 'Registry.create sends no If-Match');
  assert.equal(put.headers['content-type'], 'application/json; charset=utf-8');
  assert.match(String(put.headers.authorization), new RegExp(`^SharedAccessSignature sr=${hub.hostName.replace(/\./g, '\\.')}&sig=[^&]+&skn=iothubowner&se=\\d+$`));
  assert.equal(put.headers.host, hub.hostName, 'Host header keeps the hub name');
  assert.equal(put.status, 200);

  const stored = hub.devices.get('leaf-1')!;
  assert.equal(stored.authentication.type, 'selfSigned');
  assert.deepEqual(stored.authentication.x509Thumbprint, { primaryThumbprint: leaf, secondaryThumbprint: leaf });
  assert.deepEqual(stored.authentication.symmetricKey, { primaryKey: null, secondaryKey: null });
  assert.equal(stored.deviceScope, scope);
  assert.deepEqual(stored.parentScopes, [scope]);
  assert.deepEqual(stored.capabilities, { iotEdge: false });
  assert.equal(created.responseBody.etag, stored.etag);
  assert.equal(created.responseBody.generationId, stored.generationId);

  // Creating it again: 409, as Registry.create sends no If-Match.
  const dup = await sdkError(registry.create(body));
  assert.equal(dup.name, 'DeviceAlreadyExistsError');
  assert.equal(dup.response?.statusCode, 409);

  // A scope that belongs to no edge device is refused.
  const bad = await sdkError(registry.create({ ...body, deviceId: 'leaf-2', deviceScope: 'ms-azure-iot-edge://ghost-1', parentScopes: ['ms-azure-iot-edge://ghost-1'] }));
  assert.equal(bad.name, 'ArgumentError');
  assert.equal(bad.response?.statusCode, 400);
  assert.equal(hub.devices.has('leaf-2'), false);
});

test('get and update carry etags; a stale etag gets 412 (devices over raw HTTPS, modules and twins through the SDK)', async (t) => {
  const { hub } = await hubFor(t);
  const registry = localRegistry(hub);
  await registry.create({ deviceId: 'dev-1' });
  const before = await device(registry.get('dev-1'));
  assert.ok(before.etag);
  assert.equal(before.authentication.type, 'sas');
  assert.ok(before.authentication.symmetricKey.primaryKey, 'the hub generated SAS keys');

  const updated = await device(registry.update({ ...before, status: 'disabled' }));
  assert.equal(updated.status, 'disabled');
  assert.notEqual(updated.etag, before.etag);
  assert.equal(updated.authentication.symmetricKey.primaryKey, before.authentication.symmetricKey.primaryKey, 'keys kept');
  const put = lastRequest(hub, 'PUT', '/devices/dev-1');
  // Registry.update never sends the device's etag: it always forces the write.
  assert.equal(put.headers['if-match'], '"*"');

  // A conditional write with a stale etag (what IoT Hub does with If-Match) ...
  const stale = await rawRequest(hub, 'PUT', '/devices/dev-1', { 'If-Match': `"${before.etag}"` }, { ...updated, status: 'enabled' });
  assert.equal(stale.status, 412);
  assert.match(stale.body.Message, /^ErrorCode:PreconditionFailed;/);
  assert.equal(hub.devices.get('dev-1')!.status, 'disabled');
  // ... and with the current one.
  const fresh = await rawRequest(hub, 'PUT', '/devices/dev-1', { 'If-Match': `"${updated.etag}"` }, { ...updated, status: 'enabled' });
  assert.equal(fresh.status, 200);
  assert.equal(fresh.body.status, 'enabled');

  // Modules: Registry.updateModule(module, false) sends the module's etag.
  await registry.addModule({ deviceId: 'dev-1', moduleId: 'm1' });
  const mod = (await registry.getModule('dev-1', 'm1')).responseBody;
  await registry.updateModule({ ...mod, managedBy: 'leafgate' }, false);
  const modErr = await sdkError(registry.updateModule({ ...mod, managedBy: 'someone-else' }, false));
  assert.equal(modErr.name, 'InvalidEtagError');
  assert.equal(modErr.response?.statusCode, 412);
  assert.equal(lastRequest(hub, 'PUT', '/devices/dev-1/modules/m1').headers['if-match'], `"${mod.etag}"`);
  assert.equal(hub.modules.get('dev-1/m1')!.managedBy, 'leafgate');
  const modDup = await sdkError(registry.addModule({ deviceId: 'dev-1', moduleId: 'm1' }));
  assert.equal(modDup.response?.statusCode, 409);

  // Twins: updateTwin(id, patch, etag).
  const twin = (await registry.getTwin('dev-1')).responseBody;
  await registry.updateTwin('dev-1', { tags: { site: 'a' } }, twin.etag);
  const twinErr = await sdkError(registry.updateTwin('dev-1', { tags: { site: 'b' } }, twin.etag));
  assert.equal(twinErr.response?.statusCode, 412);
  assert.deepEqual(hub.twin('dev-1').tags, { site: 'a' });
});

test('a missing device answers 404 DeviceNotFound in IoT Hub\'s body; delete honours If-Match', async (t) => {
  const { hub } = await hubFor(t);
  const registry = localRegistry(hub);

  const missing = await sdkError(registry.get('nobody'));
  assert.equal(missing.name, 'DeviceNotFoundError');
  assert.equal(missing.response?.statusCode, 404);
  assert.equal(missing.response?.headers['iothub-errorcode'], 'DeviceNotFound');
  const body = JSON.parse(missing.responseBody!);
  assert.match(body.Message, /^ErrorCode:DeviceNotFound;Device nobody not registered$/);
  assert.match(body.ExceptionMessage, /^Tracking ID:/);
  assert.equal(body.errorCode, 404001);

  const updMissing = await sdkError(registry.update({ deviceId: 'nobody', status: 'disabled' }));
  assert.equal(updMissing.response?.statusCode, 404);
  assert.equal(hub.devices.has('nobody'), false);

  await registry.create({ deviceId: 'gone-1' });
  hub.addModule('gone-1', 'm');
  const del = await registry.delete('gone-1');
  assert.equal(del.httpResponse.statusCode, 204);
  assert.equal(lastRequest(hub, 'DELETE', '/devices/gone-1').headers['if-match'], '"*"');
  assert.equal(hub.devices.has('gone-1'), false);
  assert.equal(hub.modules.has('gone-1/m'), false, 'its modules went with it');
  assert.equal((await sdkError(registry.get('gone-1'))).response?.statusCode, 404);
  const delMissing = await sdkError(registry.delete('gone-1'));
  assert.equal(delMissing.name, 'DeviceNotFoundError');

  // Delete with an etag: stale -> 412, current -> 204.
  const d = (await registry.create({ deviceId: 'etag-del' })).responseBody;
  await registry.update({ ...d, status: 'disabled' });
  assert.equal((await rawRequest(hub, 'DELETE', '/devices/etag-del', { 'If-Match': `"${d.etag}"` })).status, 412);
  assert.equal((await rawRequest(hub, 'DELETE', '/devices/etag-del', { 'If-Match': `"${hub.devices.get('etag-del')!.etag}"` })).status, 204);
});

test('every request needs a valid, unexpired SAS of a policy with the right: 401 otherwise', async (t) => {
  const { hub } = await hubFor(t);
  const good = localRegistry(hub);
  await good.create({ deviceId: 'dev-1' });

  // Wrong key.
  const wrongKey = Registry.fromConnectionString(hub.connectionString().replace(/SharedAccessKey=[^;]+/, `SharedAccessKey=${Buffer.alloc(32, 7).toString('base64')}`));
  attachLocalEndpoint(wrongKey, hub.registryEndpoint);
  const e1 = await sdkError(wrongKey.get('dev-1'));
  assert.equal(e1.name, 'UnauthorizedError');
  assert.equal(e1.response?.statusCode, 401);
  assert.match(JSON.parse(e1.responseBody!).Message, /^ErrorCode:IotHubUnauthorizedAccess;Unauthorized: signature does not match$/);

  // Expired token (Registry.fromSharedAccessSignature uses the token as it is).
  const owner = hub.policies.get('iothubowner')!;
  const expired = SharedAccessSignature.create(hub.hostName, owner.name, owner.primaryKey, Math.floor(Date.now() / 1000) - 60).toString();
  const old = Registry.fromSharedAccessSignature(expired);
  attachLocalEndpoint(old, hub.registryEndpoint);
  const e2 = await sdkError(old.get('dev-1'));
  assert.equal(e2.response?.statusCode, 401);
  assert.match(e2.message, /expired/);

  // A read-only policy may read but not write.
  const reader = localRegistry(hub, 'registryRead');
  assert.equal((await reader.get('dev-1')).responseBody.deviceId, 'dev-1');
  const e3 = await sdkError(reader.create({ deviceId: 'dev-2' }));
  assert.equal(e3.response?.statusCode, 401);
  assert.match(e3.message, /lacks RegistryWrite/);
  assert.equal(hub.devices.has('dev-2'), false);

  const refused = hub.requests.filter((r) => r.status === 401);
  assert.equal(refused.length, 3, 'refused requests are recorded too');
});

test('failNext injects 429 with Retry-After and 503; the SDK surfaces the status and headers', async (t) => {
  const { hub } = await hubFor(t);
  const registry = localRegistry(hub);

  hub.failNext(1, 429, { 'Retry-After': '2' });
  const throttled = await sdkError(registry.create({ deviceId: 'dev-1' }));
  assert.equal(throttled.name, 'ThrottlingError');
  assert.equal(throttled.response?.statusCode, 429);
  assert.equal(throttled.response?.headers['retry-after'], '2');
  assert.match(JSON.parse(throttled.responseBody!).Message, /^ErrorCode:ThrottlingException;/);
  assert.equal(hub.devices.has('dev-1'), false, 'nothing written on a throttled request');
  assert.equal(lastRequest(hub, 'PUT', '/devices/dev-1').status, 429);

  // The fault was used up: the retry goes through.
  await registry.create({ deviceId: 'dev-1' });
  assert.equal(hub.devices.has('dev-1'), true);

  // A hub that is down until told otherwise; a matcher limits faults to some requests.
  hub.failNext(Infinity, 503, {}, (r) => r.method === 'GET');
  for (let i = 0; i < 3; i++) {
    const down = await sdkError(registry.get('dev-1'));
    assert.equal(down.name, 'ServiceUnavailableError');
    assert.equal(down.response?.statusCode, 503);
  }
  await registry.delete('dev-1');
  hub.clearFaults();
  assert.equal((await sdkError(registry.get('dev-1'))).response?.statusCode, 404);
});

test('a real ModuleClient over MQTT: twin GET, reported PATCH, desired push, direct method, output event', async (t) => {
  const { hub, defer } = await hubFor(t);
  hub.addDevice({ deviceId: 'edge-1', capabilities: { iotEdge: true } });
  hub.addModule('edge-1', 'leafgate');
  hub.patchDesired('edge-1', 'leafgate', { relay: false, limits: { perMinute: 10 } });

  const client = await openModule(hub, defer, 'edge-1', 'leafgate');
  const conn = hub.connections.at(-1)!;
  assert.equal(conn.accepted, true);
  assert.equal(conn.clientId, 'edge-1/leafgate');
  assert.equal(conn.auth, 'sas');
  assert.match(conn.username, new RegExp(`^${hub.hostName.replace(/\./g, '\\.')}/edge-1/leafgate/\\?api-version=${API_VERSION}&DeviceClientType=azure-iot-device%2F`));
  assert.equal(hub.modules.get('edge-1/leafgate')!.connectionState, 'Connected');

  // Twin GET.
  const twin = await client.getTwin();
  assert.equal(twin.properties.desired.$version, 2);
  assert.equal(twin.properties.desired.relay, false);
  assert.deepEqual(twin.properties.desired.limits, { perMinute: 10 });

  // Reported PATCH (204 + $version), merged with null-removal.
  const report = (patch: object) => new Promise<void>((resolve, reject) => twin.properties.reported.update(patch, (err?: Error) => (err ? reject(err) : resolve())));
  await report({ status: { onboarded: 3, pending: 1 }, linkState: 'up' });
  await report({ status: { pending: null }, certExpiry: '2030-01-01T00:00:00Z' });
  assert.deepEqual(hub.twin('edge-1', 'leafgate').reported, { status: { onboarded: 3 }, linkState: 'up', certExpiry: '2030-01-01T00:00:00Z', $version: 3 });

  // Desired patch pushed on $iothub/twin/PATCH/properties/desired/?$version=.
  const received = new Promise<Record<string, unknown>>((resolve) => {
    twin.on('properties.desired', (delta: Record<string, unknown>) => {
      if (delta.$version === 3) resolve(delta);
    });
  });
  await hub.waitSubscribed('edge-1', 'leafgate', '$iothub/twin/PATCH/properties/desired/#');
  assert.equal(hub.patchDesired('edge-1', 'leafgate', { relay: true, limits: { perMinute: null } }), 3);
  const delta = await within(received, 20_000, 'desired patch');
  assert.deepEqual(delta, { relay: true, limits: { perMinute: null }, $version: 3 });
  assert.equal(twin.properties.desired.relay, true);
  assert.deepEqual(twin.properties.desired.limits, {});

  // Direct method: request on $iothub/methods/POST/{name}/?$rid=, answer on $iothub/methods/res/{status}/?$rid=.
  client.onMethod('renewNow', (request, response) => {
    void response!.send(200, { accepted: true, echo: request!.payload });
  });
  const r = await hub.invokeMethod('edge-1', 'leafgate', 'renewNow', { deviceId: 'leaf-7' }, { connectTimeoutMs: 5000, responseTimeoutMs: 5000 });
  assert.deepEqual(r, { status: 200, payload: { accepted: true, echo: { deviceId: 'leaf-7' } } });
  client.onMethod('status', (_request, response) => {
    void response!.send(501, { error: 'not here' });
  });
  await hub.waitSubscribed('edge-1', 'leafgate', '$iothub/methods/POST/#');
  assert.deepEqual(await hub.invokeMethod('edge-1', 'leafgate', 'status', null), { status: 501, payload: { error: 'not here' } });
  // A method nobody answers times out as IoT Hub's 504.
  await assert.rejects(hub.invokeMethod('edge-1', 'leafgate', 'unknown', {}, { responseTimeoutMs: 200 }), (err: { status?: number; code?: string }) => err.status === 504 && err.code === 'GatewayTimeout');

  // Output event: devices/{d}/modules/{m}/messages/events/%24.on={output}&{props}/
  const msg = new Message(JSON.stringify({ leaf: 'leaf-7', t: 21.5 }));
  msg.properties.add('leafId', 'leaf-7');
  msg.contentType = 'application/json';
  msg.contentEncoding = 'utf-8';
  await client.sendOutputEvent('leafTelemetry', msg);
  const out = await hub.waitForTelemetry((m) => m.outputName === 'leafTelemetry');
  assert.equal(out.deviceId, 'edge-1');
  assert.equal(out.moduleId, 'leafgate');
  assert.equal(out.qos, 1);
  assert.deepEqual(out.properties, { leafId: 'leaf-7' });
  assert.equal(out.systemProperties['$.ct'], 'application/json');
  assert.equal(out.systemProperties['$.ce'], 'utf-8');
  assert.match(out.topic, /^devices\/edge-1\/modules\/leafgate\/messages\/events\/%24\.on=leafTelemetry&.*\/$/);
  assert.deepEqual(JSON.parse(out.body.toString()), { leaf: 'leaf-7', t: 21.5 });
});

test('the service side over REST: Client.invokeDeviceMethod and a module twin desired patch reach the connected module', async (t) => {
  const { hub, defer } = await hubFor(t);
  hub.addDevice({ deviceId: 'edge-1', capabilities: { iotEdge: true } });
  hub.addModule('edge-1', 'leafgate');
  const client = await openModule(hub, defer, 'edge-1', 'leafgate');
  client.onMethod('status', (request, response) => {
    void response!.send(200, { up: true, asked: request!.payload });
  });
  const twin = await client.getTwin();
  const got = new Promise<unknown>((resolve) => twin.on('properties.desired.policyGroup', resolve));

  const service = localServiceClient(hub);
  await hub.waitSubscribed('edge-1', 'leafgate', '$iothub/methods/POST/#');
  const res = await service.invokeDeviceMethod('edge-1', 'leafgate', { methodName: 'status', payload: { verbose: true }, responseTimeoutInSeconds: 5, connectTimeoutInSeconds: 0 });
  assert.deepEqual(res.result, { status: 200, payload: { up: true, asked: { verbose: true } } });
  const post = lastRequest(hub, 'POST', '/twins/edge-1/modules/leafgate/methods');
  assert.equal((post.body as { methodName: string }).methodName, 'status');

  const offline = await sdkError(service.invokeDeviceMethod('edge-1', 'nobody-home', { methodName: 'status', payload: null }));
  assert.equal(offline.response?.statusCode, 404);

  const registry = localRegistry(hub);
  await hub.waitSubscribed('edge-1', 'leafgate', '$iothub/twin/PATCH/properties/desired/#');
  const mt = (await registry.getModuleTwin('edge-1', 'leafgate')).responseBody;
  await registry.updateModuleTwin('edge-1', 'leafgate', { properties: { desired: { policyGroup: 'factory-a' } } }, mt.etag);
  assert.equal(await within(got, 20_000, 'desired policyGroup'), 'factory-a');
});

test('ModuleClient.fromEnvironment (IoT Edge variables) reaches the stand-in without any hook', async (t) => {
  const { hub, defer } = await hubFor(t);
  hub.addDevice({ deviceId: 'edge-1', capabilities: { iotEdge: true } });
  hub.addModule('edge-1', 'leafgate');
  const dir = mkdtempSync(join(tmpdir(), 'standin-env-'));
  defer(() => rmSync(dir, { recursive: true, force: true }));
  const caFile = join(dir, 'ca.pem');
  writeFileSync(caFile, hub.ca);
  const saved = { cs: process.env.EdgeHubConnectionString, ca: process.env.EdgeModuleCACertificateFile };
  process.env.EdgeHubConnectionString = hub.moduleConnectionString('edge-1', 'leafgate');
  process.env.EdgeModuleCACertificateFile = caFile;
  let client: ModuleClientT;
  try {
    client = await ModuleClient.fromEnvironment(Mqtt);
  } finally {
    for (const [k, v] of [['EdgeHubConnectionString', saved.cs], ['EdgeModuleCACertificateFile', saved.ca]] as const) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
  client.setRetryPolicy(new NoRetry());
  await within(client.open(), 20_000, 'open from environment');
  defer(() => client.close());
  const twin = await client.getTwin();
  assert.equal(twin.properties.desired.$version, 1);
  assert.equal(hub.isConnected('edge-1', 'leafgate'), true);
});

test('MQTT refuses a wrong key, and disabling a device over REST ends its live session and refuses it', async (t) => {
  const { hub, defer } = await hubFor(t);
  const registry = localRegistry(hub);
  await registry.create({ deviceId: 'edge-1', capabilities: { iotEdge: true } });
  hub.addModule('edge-1', 'leafgate');

  const wrong = ModuleClient.fromConnectionString(hub.moduleConnectionString('edge-1', 'leafgate').replace(/SharedAccessKey=[^;]+/, `SharedAccessKey=${Buffer.alloc(32, 1).toString('base64')}`), Mqtt);
  wrong.setRetryPolicy(new NoRetry());
  await wrong.setOptions({ ca: hub.ca });
  await assert.rejects(within(wrong.open(), 20_000, 'open with a wrong key'));
  assert.deepEqual(
    { accepted: hub.connections.at(-1)!.accepted, returnCode: hub.connections.at(-1)!.returnCode, reason: hub.connections.at(-1)!.reason },
    { accepted: false, returnCode: 5, reason: 'token signature does not match' },
  );

  await openModule(hub, defer, 'edge-1', 'leafgate');
  const dropped = new Promise<void>((resolve) => hub.once('disconnect', () => resolve()));
  const edge = (await registry.get('edge-1')).responseBody;
  await registry.update({ ...edge, status: 'disabled' });
  await within(dropped, 20_000, 'session end after disable');
  assert.equal(hub.isConnected('edge-1', 'leafgate'), false);

  const again = ModuleClient.fromConnectionString(hub.moduleConnectionString('edge-1', 'leafgate'), Mqtt);
  again.setRetryPolicy(new NoRetry());
  await again.setOptions({ ca: hub.ca });
  await assert.rejects(within(again.open(), 20_000, 'open while disabled'));
  assert.equal(hub.connections.at(-1)!.reason, 'device edge-1 is disabled');
});

test('an X.509 leaf registered through the Registry connects with its certificate; thumbprint rollover works; other certs are refused', async (t) => {
  const { hub, defer } = await hubFor(t);
  const registry = localRegistry(hub);
  await registry.create({ deviceId: 'edge-1', capabilities: { iotEdge: true } });
  const scope = (await device(registry.get('edge-1'))).deviceScope!;
  const oldCert = issueClientCert('leaf-1');
  const newCert = issueClientCert('leaf-1');
  const oldThumb = certThumbprints(oldCert.cert).sha256;
  const newThumb = certThumbprints(newCert.cert).sha256;
  await registry.create({ deviceId: 'leaf-1', authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: oldThumb, secondaryThumbprint: oldThumb } }, deviceScope: scope, parentScopes: [scope] });

  const connect = async (x509: { cert: string; key: string }): Promise<DeviceClientT> => {
    const c = DeviceClient.fromAuthenticationProvider(x509AuthenticationProvider(hub, { deviceId: 'leaf-1' }, x509), Mqtt);
    c.setRetryPolicy(new NoRetry());
    await c.setOptions({ ca: hub.ca });
    await within(c.open(), 20_000, 'x509 open');
    defer(() => c.close());
    return c;
  };

  const c1 = await connect(oldCert);
  assert.equal(hub.connections.at(-1)!.auth, 'x509');
  await c1.sendEvent(new Message('hello'));
  const m = await hub.waitForTelemetry((x) => x.deviceId === 'leaf-1');
  assert.equal(m.moduleId, undefined);
  assert.equal(m.body.toString(), 'hello');
  await c1.close();

  // Not yet registered: refused.
  await assert.rejects(connect(newCert));
  assert.equal(hub.connections.at(-1)!.reason, 'client certificate thumbprint matches neither registered thumbprint');

  // Rollover as the connector does it: secondary := new, then primary := new.
  const cur = (await registry.get('leaf-1')).responseBody;
  await registry.update({ ...cur, authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: oldThumb, secondaryThumbprint: newThumb } } });
  const c2 = await connect(newCert);
  await c2.close();
  const c3 = await connect(oldCert);
  await c3.close();
  assert.deepEqual(hub.devices.get('leaf-1')!.parentScopes, [scope], 'scopes survive the update');
});
