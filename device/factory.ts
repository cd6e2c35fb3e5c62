/**
 * A simulated manufacturer: its CA and the birth certificates it burns into devices at
 * the factory (the pki-signature credential). Used by the demo, the tests and the bench;
 * a real vendor has its own factory PKI and configures its CA at the authority.
 */
import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { pkix } from '../protocol/index.ts';

export class ManufacturerCa {
  readonly pem: string;
  private readonly subjectDer: Buffer;
  private readonly keyId: Buffer;
  private readonly privateKey: KeyObject;

  private constructor(pem: string, subjectDer: Buffer, keyId: Buffer, privateKey: KeyObject) {
    this.pem = pem;
    this.subjectDer = subjectDer;
    this.keyId = keyId;
    this.privateKey = privateKey;
  }

  static create(name = 'Example Manufacturer CA', now = new Date()): ManufacturerCa {
    const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const spkiDer = publicKey.export({ type: 'spki', format: 'der' });
    const subjectDer = pkix.encodeName(name);
    const keyId = pkix.keyIdentifier(spkiDer);
    const der = pkix.encodeCertificate({
      serial: pkix.newSerial(), subjectDer, spkiDer, notBefore: new Date(now.getTime() - 3600_000), notAfter: new Date(now.getTime() + 20 * 365 * 86_400_000),
      profile: { kind: 'root' }, issuer: { subjectDer, keyId, privateKey },
    });
    return new ManufacturerCa(pkix.toPem(der, 'CERTIFICATE'), subjectDer, keyId, privateKey);
  }

  /** A birth certificate naming `deviceId` in its CN, with a fresh factory key. */
  issueBirthCertificate(deviceId: string, opts: { notBefore?: Date; notAfter?: Date; keyType?: 'ec' | 'rsa' } = {}): { birthCert: string; factoryKey: KeyObject } {
    const pair = opts.keyType === 'rsa' ? generateKeyPairSync('rsa', { modulusLength: 2048 }) : generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const now = Date.now();
    const der = pkix.encodeCertificate({
      serial: pkix.newSerial(),
      subjectDer: pkix.encodeName(deviceId),
      spkiDer: pair.publicKey.export({ type: 'spki', format: 'der' }),
      notBefore: opts.notBefore ?? new Date(now - 3600_000),
      notAfter: opts.notAfter ?? new Date(now + 15 * 365 * 86_400_000),
      profile: { kind: 'device', keyType: opts.keyType ?? 'ec' },
      issuer: { subjectDer: this.subjectDer, keyId: this.keyId, privateKey: this.privateKey },
    });
    return { birthCert: pkix.toPem(der, 'CERTIFICATE'), factoryKey: pair.privateKey };
  }
}
