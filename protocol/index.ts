/** The wire contract shared by devices, the gateway and the authority. Imports nothing of ours. */
export * from './errors.ts';
export * from './topics.ts';
export * from './messages.ts';
export * as pkix from './pkix/index.ts';
export { DerError } from './pkix/der.ts';
export { AUTHORITY_URI, authorityIdentityCheck } from './trust.ts';
