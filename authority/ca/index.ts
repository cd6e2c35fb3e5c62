export { LocalCa, fingerprint, BACKDATE_MS, CLOCK_SKEW_TOLERANCE_MS, EXTERNAL_CA, type IssuerName, ISSUER_CA, CA_NAMES, type CaName, type IssuerRole, type RootCa, type CaBundle, type CaMaterialStore, type CaConnector, type ExternalCaTiming, type IssuedCertificate, type IssueRequest, type IssuingCa } from './local-ca.ts';
export { type CaKey, type CaKeyStoreKind } from './ca-key.ts';
export { FileCaKey } from './file-ca-key.ts';
export { Pkcs11CaKey, Pkcs11Token, openPkcs11CaKeys, readPin, DEFAULT_KEY_LABELS, DEFAULT_PIN_ENV, type Pkcs11KeysConfig, type TokenKey } from './pkcs11-ca-key.ts';
export { openCa, type CaOpenConfig, type OpenedCa } from './open-ca.ts';
export { EstCa, EST_DEFAULTS, CLAIM_MARGIN_MS, readEstPassword, type EstCaConfig } from './est-ca.ts';
