/**
 * Builds azure-iothub's Registry from a connection string. For a hub that is not
 * `<name>.azure-devices.net:443` (the local stand-in used by tests)
 * the SDK offers no port: HostName takes none. Its REST client does accept an HTTP agent
 * (private `_restApiClient.setOptions({ http: { agent } })`), so an agent whose sockets go
 * to the local endpoint is the one hook, kept here alone. TLS is still verified, against
 * the given CA and the hub's host name.
 */
import https from 'node:https';
import tls from 'node:tls';
import azureIotHub from 'azure-iothub';
import type { HubRegistry } from './iothub.ts';

const { Registry } = azureIotHub;

export interface LocalHubEndpoint {
  host: string;
  port: number;
  ca: string;
}

export function createHubRegistry(connectionString: string, local?: LocalHubEndpoint): HubRegistry {
  const registry = Registry.fromConnectionString(connectionString);
  if (local) {
    const agent = new https.Agent({ keepAlive: true, ca: local.ca });
    (agent as unknown as { createConnection: (o: tls.ConnectionOptions) => tls.TLSSocket }).createConnection = (options) =>
      tls.connect({ ...options, host: local.host, port: local.port, ca: local.ca, servername: options.servername ?? (options.host as string | undefined) });
    (registry as unknown as { _restApiClient: { setOptions(o: unknown): void } })._restApiClient.setOptions({ http: { agent } });
  }
  return registry as unknown as HubRegistry;
}
