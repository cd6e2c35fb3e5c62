/** The trust authority: CA, registry, auth methods, policy, API. Never imports gateway code. */
export { startAuthority, loadAdminToken, type RunningAuthority } from './service.ts';
export { resolveAuthorityConfig, loadAuthorityConfigFile, AUTHORITY_CONFIG_SCHEMA, type AuthorityConfig, type AuthorityConfigInput } from './config.ts';
export { DEFAULT_POLICY, type DevicePolicy } from './policy/index.ts';
export { LocalCa, openCa, Pkcs11Token, openPkcs11CaKeys, type CaConnector, type CaKey } from './ca/index.ts';
export { SqlStore, SqliteStore, openStore, isPostgresUrl, type AuthorityStore } from './store/index.ts';
export { LocalBus, PgBus, type ClusterBus, type ClusterMessage } from './cluster.ts';
export { DeviceOnboarding } from './onboarding.ts';
export { GatewayEnrollment } from './gateways.ts';
export { Revocation, EXTERNAL_LIST, CRL_NAMES, type CrlName, type CrlSnapshot } from './revocation.ts';
export { RenewalScheduler } from './renewal.ts';
export { AuthorityEvents, type RenewalDue } from './events.ts';
