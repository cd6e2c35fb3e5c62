export { LocalCa, fingerprint, BACKDATE_MS, type CaMaterialStore, type CaConnector, type IssuedCertificate, type IssueRequest, type IssuingCa } from './local-ca.ts';
