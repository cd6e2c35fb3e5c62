/**
 * Test-only PKI for the IoT Hub stand-in: a throw-away root CA, a server certificate for the
 * hub's host name (and 127.0.0.1 / localhost), and client certificates for X.509 devices.
 * Everything is made in memory with protocol/pkix and node:crypto (EC P-256).
 */
import { createHash, generateKeyPairSync, X509Certificate, type KeyObject } from 'node:crypto';
import { pkix } from '../../../protocol/index.ts';

export interface TestCa {
  /** Root certificate PEM: the trust anchor to give the SDKs (`ca`). */
  cert: string;
  key: KeyObject;
  subjectDer: Buffer;
  keyId: Buffer;
}

export interface KeyAndCert {
  /** PKCS#8 PEM. */
  key: string;
  /** Certificate PEM (leaf only). */
  cert: string;
}

const HOUR = 3600_000;

function ecPair(): { privateKey: KeyObject; spki: Buffer; pkcs8: string } {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  return {
    privateKey,
    spki: publicKey.export({ type: 'spki', format: 'der' }),
    pkcs8: privateKey.export({ type: 'pkcs8', format: 'pem' }) as string,
  };
}

export function createTestCa(commonName = 'iothub-standin test root'): TestCa {
  const pair = ecPair();
  const subjectDer = pkix.encodeName(commonName);
  const keyId = pkix.keyIdentifier(pair.spki);
  const der = pkix.encodeCertificate({
    serial: pkix.newSerial(),
    subjectDer,
    spkiDer: pair.spki,
    notBefore: new Date(Date.now() - HOUR),
    notAfter: new Date(Date.now() + 24 * HOUR),
    profile: { kind: 'root' },
    issuer: { subjectDer, keyId, privateKey: pair.privateKey },
  });
  return { cert: pkix.toPem(der, 'CERTIFICATE'), key: pair.privateKey, subjectDer, keyId };
}

/** Server certificate for the hub: DNS SANs for the host names, IP SANs for 127.0.0.1 / ::1. */
export function issueServerCert(ca: TestCa, dnsNames: string[]): KeyAndCert {
  const pair = ecPair();
  const der = pkix.encodeCertificate({
    serial: pkix.newSerial(),
    subjectDer: pkix.encodeName(dnsNames[0] ?? 'localhost'),
    spkiDer: pair.spki,
    notBefore: new Date(Date.now() - HOUR),
    notAfter: new Date(Date.now() + 24 * HOUR),
    profile: { kind: 'server', keyType: 'ec' },
    sans: { dns: [...new Set([...dnsNames, 'localhost'])], ip: ['127.0.0.1', '::1'] },
    issuer: { subjectDer: ca.subjectDer, keyId: ca.keyId, privateKey: ca.key },
  });
  return { key: pair.pkcs8, cert: pkix.toPem(der, 'CERTIFICATE') };
}

/** A TLS client certificate with CN = `commonName`, signed by `ca` or self-signed when `ca` is omitted. */
export function issueClientCert(commonName: string, ca?: TestCa): KeyAndCert {
  const pair = ecPair();
  const subjectDer = pkix.encodeName(commonName);
  const issuer = ca
    ? { subjectDer: ca.subjectDer, keyId: ca.keyId, privateKey: ca.key }
    : { subjectDer, keyId: pkix.keyIdentifier(pair.spki), privateKey: pair.privateKey };
  const der = pkix.encodeCertificate({
    serial: pkix.newSerial(),
    subjectDer,
    spkiDer: pair.spki,
    notBefore: new Date(Date.now() - HOUR),
    notAfter: new Date(Date.now() + 24 * HOUR),
    profile: { kind: 'device', keyType: 'ec' },
    issuer,
  });
  return { key: pair.pkcs8, cert: pkix.toPem(der, 'CERTIFICATE') };
}

/** IoT Hub thumbprints of a certificate: SHA-1 (40 hex) and SHA-256 (64 hex), upper case. */
export function certThumbprints(pem: string): { sha1: string; sha256: string } {
  const raw = new X509Certificate(pem).raw;
  return {
    sha1: createHash('sha1').update(raw).digest('hex').toUpperCase(),
    sha256: createHash('sha256').update(raw).digest('hex').toUpperCase(),
  };
}
