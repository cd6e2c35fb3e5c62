/** Object identifiers used by leafgate (RFC 5280, RFC 2986, RFC 5480, RFC 8017). */
export const OID = {
  commonName: '2.5.4.3',
  serialNumber: '2.5.4.5',
  countryName: '2.5.4.6',
  organizationName: '2.5.4.10',
  organizationalUnitName: '2.5.4.11',

  ecPublicKey: '1.2.840.10045.2.1',
  rsaEncryption: '1.2.840.113549.1.1.1',
  ecdsaWithSHA256: '1.2.840.10045.4.3.2',
  ecdsaWithSHA384: '1.2.840.10045.4.3.3',
  ecdsaWithSHA512: '1.2.840.10045.4.3.4',
  sha256WithRSAEncryption: '1.2.840.113549.1.1.11',
  sha384WithRSAEncryption: '1.2.840.113549.1.1.12',
  sha512WithRSAEncryption: '1.2.840.113549.1.1.13',

  extensionRequest: '1.2.840.113549.1.9.14',
  challengePassword: '1.2.840.113549.1.9.7',

  subjectKeyIdentifier: '2.5.29.14',
  keyUsage: '2.5.29.15',
  subjectAltName: '2.5.29.17',
  basicConstraints: '2.5.29.19',
  cRLNumber: '2.5.29.20',
  cRLReason: '2.5.29.21',
  issuingDistributionPoint: '2.5.29.28',
  certificateIssuer: '2.5.29.29',
  nameConstraints: '2.5.29.30',
  cRLDistributionPoints: '2.5.29.31',
  authorityKeyIdentifier: '2.5.29.35',
  extKeyUsage: '2.5.29.37',

  serverAuth: '1.3.6.1.5.5.7.3.1',
  clientAuth: '1.3.6.1.5.5.7.3.2',
} as const;

/** Signature algorithms we accept, with the digest node:crypto needs. SHA-1 and MD5 are refused. */
export const SIGNATURE_ALGORITHMS: Record<string, { hash: string; keyType: 'ec' | 'rsa' }> = {
  [OID.ecdsaWithSHA256]: { hash: 'sha256', keyType: 'ec' },
  [OID.ecdsaWithSHA384]: { hash: 'sha384', keyType: 'ec' },
  [OID.ecdsaWithSHA512]: { hash: 'sha512', keyType: 'ec' },
  [OID.sha256WithRSAEncryption]: { hash: 'sha256', keyType: 'rsa' },
  [OID.sha384WithRSAEncryption]: { hash: 'sha384', keyType: 'rsa' },
  [OID.sha512WithRSAEncryption]: { hash: 'sha512', keyType: 'rsa' },
};
