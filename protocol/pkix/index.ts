export * as der from './der.ts';
export { OID, SIGNATURE_ALGORITHMS } from './oids.ts';
export { toPem, fromPem, allPem } from './pem.ts';
export { NotAcceptedError } from './der.ts';
export { CSR_SUBJECT_STRING_TAGS, buildCsr, parseCsr, parseCsrDer, parseCsrAsync, parseCsrDerAsync, encodeName, decodeName, certificateSubject, encodeSan, type ParsedCsr, type SubjectAltNames, type CsrBuildOptions } from './csr.ts';
export { canonicalKey, keyDescription, signatureAlgorithmFor, keySpecLabel, readSpki, importSpki, importSpkiFast, spkiDerOfKey, type CanonicalKey, type KeyDescription, type SpkiKey } from './keys.ts';
export { verifyChain, parseCertificates, type ChainCheck } from './chain.ts';
export { encodeCertificate, keyIdentifier, newSerial, subjectDerOf, spkiDerOf, CertificateTemplate, type CertificateProfile, type CertificateInput, type TemplateFields } from './certificate.ts';
export { encodeCrl, parseCrl, crlToPem, REVOCATION_REASONS, type RevocationReason, type CrlEntry, type ParsedCrl } from './crl.ts';
