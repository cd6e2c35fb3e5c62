export { LocalCa, fingerprint, BACKDATE_MS, type CaConnector, type IssuedCertificate, type IssueRequest, type IssuingCa } from './local-ca.ts';
export { encodeCertificate, keyIdentifier, newSerial, subjectDerOf, spkiDerOf, type CertificateProfile, type CertificateInput } from './certificate.ts';
