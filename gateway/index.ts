/** The gateway process: composes broker/, plugins/ and cloud-bridge/. Never imports authority/. */
export { startGateway, isEnrolled, type RunningGateway } from './service.ts';
export { resolveGatewayConfig, GATEWAY_CONFIG_SCHEMA, type GatewayConfig, type GatewayConfigInput } from './config.ts';
export { enrollGateway } from '../cloud-bridge/index.ts';
