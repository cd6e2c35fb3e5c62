/** Gateway <-> authority: mTLS client, enrollment, the onboarding relay. */
export { AuthorityClient, AUTHORITY_RETRY_MS, type AuthorityClientOptions } from './authority-client.ts';
export { enrollGateway, identityFiles, type EnrollOptions, type GatewayIdentityFiles } from './enroll.ts';
export { OnboardingRelay, type RelayOptions } from './relay.ts';
export { RevocationCache, type RevocationCacheOptions } from './revocation-cache.ts';
export { AuthorityEventStream } from './event-stream.ts';
