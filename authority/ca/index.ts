export { LocalCa, fingerprint, BACKDATE_MS, type CaConnector, type IssuedCertificate, type IssueRequest, type IssuingCa } from './local-ca.ts';
