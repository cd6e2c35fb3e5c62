/** Gateway <-> authority: mTLS client, enrollment, the onboarding relay, outbox, CRL cache, events. */
export { AuthorityClient, AUTHORITY_RETRY_MS, type AuthorityClientOptions } from './authority-client.ts';
export { enrollGateway, identityFiles, writeExternalDeviceChain, type EnrollOptions, type GatewayIdentityFiles } from './enroll.ts';
export { OnboardingRelay, type RelayOptions } from './relay.ts';
export { Outbox, type OutboxEntry, type OutboxKind, type OutboxState } from './outbox.ts';
export { OutboxWorker, type OutboxWorkerOptions } from './outbox-worker.ts';
export { RenewalTracker, type DueRenewal } from './renewals.ts';
export { RevocationCache, type RevocationCacheOptions } from './revocation-cache.ts';
export { AuthorityEventStream } from './event-stream.ts';
export { GatewayIdentity, completeIdentitySwap, edgeCaFiles, edgeConfigSnippet, issueServerCertificate, isDue, type EdgeCaFiles, type ServerCertOptions } from './gateway-identity.ts';
export { AuthorityGate } from './authority-gate.ts';
