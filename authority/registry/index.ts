/** External registries the authority mirrors devices into (IoT Hub now; DPS next). */
export { IotHubConnector, thumbprint, type HubRegistry, type HubDevice, type IotHubConnectorOptions } from './iothub.ts';
export { createHubRegistry, type LocalHubEndpoint } from './iothub-adapter.ts';
export { DpsConnector, createDpsClient, type DpsClient, type DpsConnectorOptions } from './dps.ts';
export { RegistrySync, type RegistrySyncOptions } from './sync.ts';
