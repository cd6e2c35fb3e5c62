/**
 * Local Azure IoT Hub stand-in for tests, and the adapters that point the REAL Azure SDK
 * clients at it.
 *
 *   const hub = await IotHubStandin.start();
 *   const registry = localRegistry(hub);                        // azure-iothub Registry
 *   const module = ModuleClient.fromConnectionString(hub.moduleConnectionString('edge-1', 'leafgate'), Mqtt);
 *   module.setOptions({ ca: hub.ca });                          // azure-iot-device-mqtt: public API only
 *
 * How each SDK reaches 127.0.0.1:
 *
 * - azure-iot-device-mqtt (SAS): `GatewayHostName=127.0.0.1:{port}` in the device/module
 *   connection string (its MQTT URI is `mqtts://{GatewayHostName || HostName}`) and
 *   `setOptions({ ca })`. No private hook. For IoT Edge-style start-up,
 *   `ModuleClient.fromEnvironment` reads `EdgeHubConnectionString` and
 *   `EdgeModuleCACertificateFile` and does the same.
 * - azure-iot-device-mqtt (X.509): the connection-string path drops GatewayHostName, so build an
 *   `X509AuthenticationProvider` with `gatewayHostName` (see `x509AuthenticationProvider`).
 * - azure-iothub (Registry, Client's REST calls): HostName takes no port and the SDK resolves it
 *   itself: `attachLocalEndpoint` below is the one private hook.
 */
import https from 'node:https';
import azureIotHub from 'azure-iothub';
import azureIotDevice from 'azure-iot-device';
import type { LocalHubEndpoint } from './standin.ts';
import { IotHubStandin } from './standin.ts';

export { IotHubStandin } from './standin.ts';
export type {
  StandinOptions,
  RecordedRequest,
  TelemetryMessage,
  MqttConnectRecord,
  ReportedPatchEvent,
  MethodResult,
  InvokeOptions,
  LocalHubEndpoint,
  Policy,
  Right,
  DeviceRecord,
  ModuleRecord,
} from './standin.ts';
export { HubError, HUB_ERRORS, type Json, type JsonObject } from './model.ts';
export { createTestCa, issueClientCert, certThumbprints, type TestCa, type KeyAndCert } from './pki.ts';
export { signSas, parseSas } from './sas.ts';

const { Registry, Client: ServiceClient } = azureIotHub;
const { X509AuthenticationProvider } = azureIotDevice;

type Registry = InstanceType<typeof Registry>;
type ServiceClient = InstanceType<typeof ServiceClient>;

/**
 * THE private hook (the only one): sends an azure-iothub object's REST calls to `endpoint`.
 *
 * Why: azure-iothub builds every request as `https.request({ host: config.host, path, ... })`
 * with `config.host` = the connection string's HostName; no port can be given, and the host
 * is resolved by DNS. But its HTTP layer (azure-iothub/dist/common-http/http.js) passes
 * `this._options.http.agent` to `https.request`, and Node's Agent merges its own constructor
 * options over each request's options when it opens a socket. So an `https.Agent` made with
 * `{ host: endpoint.host, port: endpoint.port, ca: endpoint.ca }` opens its sockets to the
 * local endpoint while the request keeps `Host: {HostName}` and TLS SNI / certificate
 * verification for HostName (the stand-in's certificate names it), and the SAS token is
 * unchanged.
 *
 * Private fields used: `_restApiClient` (the RestApiClient that Registry and Client create in
 * their constructors) and its `setOptions(options)`, which forwards to `_http.setOptions`
 * (replacing its options object: the constructors had set `{ http: { agent: new Agent({ keepAlive: true }) } }`).
 * Call it right after `Registry.fromConnectionString` / `Client.fromConnectionString`.
 * Returns the agent (call `agent.destroy()` to drop its keep-alive sockets).
 */
export function attachLocalEndpoint(sdkObject: Registry | ServiceClient, endpoint: LocalHubEndpoint): https.Agent {
  const rest = (sdkObject as unknown as { _restApiClient?: { setOptions?: (o: unknown) => void } })._restApiClient;
  if (!rest || typeof rest.setOptions !== 'function') {
    throw new Error('azure-iothub internals changed: no _restApiClient.setOptions to attach a local endpoint to');
  }
  const agent = new https.Agent({ keepAlive: true, host: endpoint.host, port: endpoint.port, ca: endpoint.ca });
  rest.setOptions({ http: { agent } });
  return agent;
}

/** A real azure-iothub Registry talking to the stand-in with the given shared access policy. */
export function localRegistry(standin: IotHubStandin, policyName = 'iothubowner'): Registry {
  const registry = Registry.fromConnectionString(standin.connectionString(policyName));
  attachLocalEndpoint(registry, standin.registryEndpoint);
  return registry;
}

/**
 * A real azure-iothub service Client for its REST operations (invokeDeviceMethod). Its AMQP
 * transport (cloud-to-device messages, feedback) is not served by the stand-in: never `open()` it.
 */
export function localServiceClient(standin: IotHubStandin, policyName = 'service'): ServiceClient {
  const client = ServiceClient.fromConnectionString(standin.connectionString(policyName));
  attachLocalEndpoint(client, standin.registryEndpoint);
  return client;
}

/**
 * azure-iot-device X.509 credentials that reach the stand-in's MQTT surface: the constructor
 * (unlike `fromX509Options` and x509 connection strings) keeps `gatewayHostName` and `moduleId`.
 * Use with `Client.fromAuthenticationProvider(p, Mqtt)` / `ModuleClient.fromAuthenticationProvider(p, Mqtt)`
 * and `setOptions({ ca: standin.ca })`.
 */
export function x509AuthenticationProvider(
  standin: IotHubStandin,
  identity: { deviceId: string; moduleId?: string },
  x509: { cert: string; key: string },
): InstanceType<typeof X509AuthenticationProvider> {
  return new X509AuthenticationProvider({
    host: standin.hostName,
    gatewayHostName: standin.mqttGatewayHostName,
    deviceId: identity.deviceId,
    ...(identity.moduleId ? { moduleId: identity.moduleId } : {}),
    x509,
  });
}
