/**
 * IoT Edge transparent gateway, the seed flow with the real SDKs: a leaf device onboards
 * through the real leafgate gateway (LeafDevice SDK, `lg/v1`), the authority registers it in
 * IoT Hub as a child of the gateway's edge device, and the device then connects to the hub
 * stand-in (playing IoT Hub / edgeHub) with the REAL azure-iot-device `Client` over
 * azure-iot-device-mqtt, authenticated by the certificate leafgate issued, and sends telemetry.
 * After `leafgate authority revoke --device`, once the hub connector has disabled the
 * device, a new connect with the same credentials is refused.
 *
 * Both IoT Hub X.509 modes: selfSigned (thumbprint) and certificateAuthority (leafgate's
 * device CA registered as a verified CA in the stand-in; device id = CN).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { promisify } from 'node:util';
import azureIotCommon from 'azure-iot-common';
import azureIotDevice from 'azure-iot-device';
import azureIotDeviceMqtt from 'azure-iot-device-mqtt';
import { thumbprint } from '../authority/registry/index.ts';
import type { DeviceIdentity } from '../device/index.ts';
import { IotHubStandin, createTestCa, issueClientCert, x509AuthenticationProvider } from './support/iothub-standin.ts';
import { startStack, type Stack } from './support/stack.ts';
import { until, within } from './support/wait.ts';

const { Client: DeviceClient, Message } = azureIotDevice;
const { Mqtt } = azureIotDeviceMqtt;
const { NoRetry } = azureIotCommon;
type DeviceClientT = InstanceType<typeof DeviceClient>;

const run = promisify(execFile);

type Mode = 'selfSigned' | 'certificateAuthority';

async function transparentStack(t: TestContext, authentication: Mode) {
  const hub = await IotHubStandin.start();
  t.after(() => hub.close());
  const edge = hub.addDevice({ deviceId: 'gw-test', capabilities: { iotEdge: true }, authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: 'A'.repeat(64), secondaryThumbprint: 'A'.repeat(64) } } });
  const stack = await startStack(t, {
    authority: { iotHub: { connectionString: hub.connectionString('registryReadWrite'), localEndpoint: hub.registryEndpoint, authentication } },
  });
  // certificateAuthority: what `az iot hub certificate create --path device-ca.crt.pem --verified true` does.
  // Only the device CA (an intermediate), as docs/azure.md says: IoT Hub accepts a chain ending at a verified intermediate.
  if (authentication === 'certificateAuthority') hub.trustCa(stack.authority.ca.deviceCa.pem);
  return { hub, stack, edgeScope: edge.deviceScope as string };
}

/** What a leaf device holds after onboarding, as the files `LeafDevice.save` writes: key.pem, cert.pem, chain.pem. */
function x509Of(id: DeviceIdentity): { cert: string; key: string } {
  // The chain up to (not including) the root: the hub verifies the path to the CA it trusts.
  return { cert: id.certificate + id.chain.slice(0, -1).join(''), key: id.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string };
}

/** The real azure-iot-device Client over MQTT with the device's X.509 credentials (see docs/azure.md, "Leaf devices on edgeHub"). */
async function openHubClient(t: TestContext, hub: IotHubStandin, deviceId: string, x509: { cert: string; key: string }): Promise<DeviceClientT> {
  const client = DeviceClient.fromAuthenticationProvider(x509AuthenticationProvider(hub, { deviceId }, x509), Mqtt);
  client.setRetryPolicy(new NoRetry());
  await client.setOptions({ ca: hub.ca });
  t.after(() => client.close());
  await within(client.open(), 20_000, `${deviceId} opens its IoT Hub connection`);
  return client;
}

function cliRevoke(stack: Stack, deviceId: string) {
  return run(process.execPath, ['--import', 'tsx', 'bin/leafgate.ts', 'authority', 'revoke', '--device', deviceId, '--reason', 'keyCompromise', '--data-dir', join(stack.dir, 'authority'), '--authority', stack.authority.url], { env: { ...process.env, LEAFGATE_LOG_LEVEL: 'silent' } });
}

const lastConnect = (hub: IotHubStandin, deviceId: string) => hub.connections.filter((c) => c.deviceId === deviceId).at(-1)!;

for (const mode of ['selfSigned', 'certificateAuthority'] as const) {
  test(`transparent gateway (${mode}): onboard through leafgate, connect to the hub as a child with the issued certificate, send telemetry; refused once revoked`, async (t) => {
    const { hub, stack, edgeScope } = await transparentStack(t, mode);
    const deviceId = `leaf-${mode === 'selfSigned' ? 'ss' : 'ca'}`;

    // 1. Onboarding through leafgate's broker (lg/v1), the real gateway and the LeafDevice SDK.
    const id = await stack.device(deviceId, 'pki-signature').onboard();

    // 2. The authority made it a child of the gateway's edge device, in the configured mode.
    const registered = await until(() => hub.devices.get(deviceId), 20_000, 'the child device in the hub');
    assert.equal(registered.deviceScope, edgeScope);
    assert.deepEqual(registered.parentScopes, [edgeScope]);
    assert.equal(registered.status, 'enabled');
    assert.equal(registered.authentication.type, mode);
    if (mode === 'selfSigned') assert.equal(registered.authentication.x509Thumbprint.primaryThumbprint, thumbprint(id.certificate));

    // 3. The real azure-iot-device Client, X.509 with leafgate's certificate, sends telemetry.
    const client = await openHubClient(t, hub, deviceId, x509Of(id));
    assert.deepEqual({ auth: lastConnect(hub, deviceId).auth, accepted: lastConnect(hub, deviceId).accepted }, { auth: 'x509', accepted: true });
    const msg = new Message(JSON.stringify({ temperature: 21.5 }));
    msg.contentType = 'application/json';
    msg.contentEncoding = 'utf-8';
    await client.sendEvent(msg);
    const got = await hub.waitForTelemetry((m) => m.deviceId === deviceId, 20_000);
    assert.equal(got.moduleId, undefined, 'device telemetry, not a module output');
    assert.deepEqual(JSON.parse(got.body.toString('utf8')), { temperature: 21.5 });
    assert.equal(got.systemProperties['$.ct'], 'application/json');
    assert.equal(got.systemProperties['$.ce'], 'utf-8');
    await client.close();

    // 4. Revoked by the operator: the connector disables the child; the next connect is refused.
    const out = await cliRevoke(stack, deviceId);
    assert.match(out.stdout, new RegExp(id.serial));
    await until(() => hub.devices.get(deviceId)?.status === 'disabled', 30_000, 'the child disabled in the hub');
    await assert.rejects(openHubClient(t, hub, deviceId, x509Of(id)));
    assert.deepEqual(
      { accepted: lastConnect(hub, deviceId).accepted, returnCode: lastConnect(hub, deviceId).returnCode, reason: lastConnect(hub, deviceId).reason },
      { accepted: false, returnCode: 5, reason: `device ${deviceId} is disabled` },
    );
  });
}

test('the hub authenticates X.509 children as IoT Hub does: thumbprint (selfSigned); chain to a verified CA and CN = device id (certificateAuthority)', async (t) => {
  const { hub, stack } = await transparentStack(t, 'certificateAuthority');
  const a = await stack.device('leaf-a', 'pki-signature').onboard();
  const b = await stack.device('leaf-b', 'pki-signature').onboard();
  await until(() => hub.devices.get('leaf-a') && hub.devices.get('leaf-b'), 20_000, 'both children in the hub');

  // A certificate with the right CN from a CA the hub never verified.
  const foreign = issueClientCert('leaf-a', createTestCa('rogue CA'));
  await assert.rejects(openHubClient(t, hub, 'leaf-a', foreign));
  assert.match(lastConnect(hub, 'leaf-a').reason ?? '', /^client certificate does not chain to a verified CA/);

  // leafgate's valid certificate of another device: chains, but its CN is not this device id.
  await assert.rejects(openHubClient(t, hub, 'leaf-a', x509Of(b)));
  assert.equal(lastConnect(hub, 'leaf-a').reason, 'client certificate CN leaf-b is not leaf-a');

  // Its own certificate with the chain: accepted.
  const ok = await openHubClient(t, hub, 'leaf-a', x509Of(a));
  assert.equal(lastConnect(hub, 'leaf-a').accepted, true);
  await ok.close();

  // selfSigned: the thumbprint decides, whoever issued the certificate.
  const cur = hub.devices.get('leaf-a')!;
  hub.addDevice({ deviceId: 'leaf-ss', status: 'enabled', authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: thumbprint(b.certificate), secondaryThumbprint: thumbprint(b.certificate) } }, deviceScope: cur.deviceScope, parentScopes: cur.parentScopes });
  await assert.rejects(openHubClient(t, hub, 'leaf-ss', x509Of(a)));
  assert.equal(lastConnect(hub, 'leaf-ss').reason, 'client certificate thumbprint matches neither registered thumbprint');
  const ss = await openHubClient(t, hub, 'leaf-ss', x509Of(b));
  assert.equal(lastConnect(hub, 'leaf-ss').accepted, true);
  await ss.close();
});
