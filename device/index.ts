/** Leaf device SDK: imports only protocol/. */
export { LeafDevice, renewalProof, MemoryStateStore, FileStateStore, type DeviceStateStore, type DeviceOptions, type DeviceCredential, type DeviceIdentity, type OnboardResult } from './client.ts';
export { deriveDdkgKeyPair, ddkgInputKeyMaterial } from './ddkg.ts';
export { generateKeyForInstruction } from './keys.ts';
export { ManufacturerCa } from './factory.ts';
