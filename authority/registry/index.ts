/** External registries the authority mirrors devices into (IoT Hub, DPS). */
export { IotHubConnector, thumbprint, type HubRegistry, type HubDevice, type BulkResult, type IotHubConnectorOptions } from './iothub.ts';
export { createHubRegistry, type LocalHubEndpoint } from './iothub-adapter.ts';
export { DpsConnector, createDpsClient, type DpsClient, type DpsConnectorOptions } from './dps.ts';
export { RegistrySync, parseRetryAfter, isTargetWide, type RegistrySyncOptions } from './sync.ts';
export { Pacer, type PacerOptions } from './pacer.ts';
