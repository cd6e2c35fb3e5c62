/**
 * The gateway as an IoT Edge module: the real azure-iot-device ModuleClient against the
 * local hub stand-in's MQTT surface -- desired properties configure it, reported properties
 * show its status, direct methods operate it, leaf telemetry goes out as module output.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { IotHubStandin } from './support/iothub-standin.ts';
import { startStack } from './support/stack.ts';
import { until } from './support/wait.ts';


test('twin, direct methods and telemetry relay of the gateway module', async (t) => {
  const hub = await IotHubStandin.start();
  t.after(() => hub.close());
  hub.addDevice({ deviceId: 'gw-test', capabilities: { iotEdge: true } });
  hub.addModule('gw-test', 'leafgate');
  hub.patchDesired('gw-test', 'leafgate', { relayTelemetry: true, policyGroup: 'coded' });
  const stack = await startStack(t, {
    gateway: { module: { connectionString: hub.moduleConnectionString('gw-test', 'leafgate'), ca: hub.ca, reportIntervalMs: 100 } },
  });
  assert.ok(stack.gateway.module, 'module link is up');
  await until(() => stack.gateway.module!.settings.relayTelemetry, 20_000, 'desired properties applied');

  // policyGroup from the twin: a ddkg device without a group is judged by group "coded" (one-time code).
  await assert.rejects(stack.device('ddkg-mod-1', 'ddkg').onboard(), { code: 'enrollment_required' });

  const device = stack.device('mod-1', 'pki-signature');
  const id = await device.onboard();
  await until(() => (hub.twin('gw-test', 'leafgate').reported as any)?.connections, 20_000, 'reported status');
  const reported = hub.twin('gw-test', 'leafgate').reported as any;
  assert.equal(reported.gatewayId, 'gw-test');
  assert.equal(reported.settings.relayTelemetry, true);
  assert.ok(reported.gatewayCertNotAfter);

  const client = await device.connectOperational(id);
  t.after(() => client.endAsync(true));
  await device.publishTelemetry(client, { t: 21.5 }, 'env');
  const out = await hub.waitForTelemetry((m) => m.outputName === 'telemetry');
  assert.deepEqual(out.properties, { leafDeviceId: 'mod-1', subtopic: 'env' });
  // Labelled so that IoT Hub can route on the body: $.ct / $.ce in the topic's property bag.
  assert.equal(out.systemProperties['$.ct'], 'application/json');
  assert.equal(out.systemProperties['$.ce'], 'utf-8');
  assert.deepEqual(JSON.parse(out.body.toString('utf8')), { t: 21.5 });
  // lg/v1 telemetry may be any bytes: what is not UTF-8 JSON is not labelled as such.
  await client.publishAsync('lg/v1/mod-1/up/telemetry/raw', Buffer.from([0xff, 0x00, 0x7b]), { qos: 1 });
  const raw = await hub.waitForTelemetry((m) => m.outputName === 'telemetry' && m.properties.subtopic === 'raw', 20_000);
  assert.equal(raw.systemProperties['$.ct'], undefined);
  assert.equal(raw.systemProperties['$.ce'], undefined);
  assert.deepEqual([...raw.body], [0xff, 0x00, 0x7b]);

  const status = await hub.invokeMethod('gw-test', 'leafgate', 'status', null);
  assert.equal(status.status, 200);
  assert.equal((status.payload as any).connections.operational, 1);

  const closed = new Promise<void>((r) => client.once('close', () => r()));
  const revoke = await hub.invokeMethod('gw-test', 'leafgate', 'revokeDevice', { deviceId: 'mod-1', reason: 'keyCompromise' });
  assert.equal(revoke.status, 200);
  assert.equal((revoke.payload as any).revoked[0].serial, id.serial);
  await closed;
  assert.equal((await hub.invokeMethod('gw-test', 'leafgate', 'revokeDevice', { deviceId: 'someone-else' })).status, 500);

  const before = (await stack.authority.store.listCertificates({ subjectId: 'gw-test', kind: 'gateway' })).length;
  hub.patchDesired('gw-test', 'leafgate', { rateLimits: { publishesPerClient: { points: 7, durationSeconds: 2 }, bogus: 1 } });
  await until(() => (hub.twin('gw-test', 'leafgate').reported as any)?.rateLimits?.publishesPerClient?.points === 7, 20_000, 'rate limits applied from the twin');

  const renew = await hub.invokeMethod('gw-test', 'leafgate', 'renewNow', {});
  assert.equal(renew.status, 200);
  assert.equal((await stack.authority.store.listCertificates({ subjectId: 'gw-test', kind: 'gateway' })).length, before + 1);
});
