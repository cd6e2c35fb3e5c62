/**
 * The built-in private CA: a root and two issuing CAs made on first start in the data
 * directory. The device CA signs only leaf-device certificates, so the gateway broker can
 * tell a device from any other holder of a certificate by its issuer; the infrastructure CA
 * signs gateway and authority TLS certificates. Private keys are PKCS#8 encrypted with
 * AES-256-CBC under a passphrase (scrypt-derived by OpenSSL's PBES2) and never written plain.
 */
import { createHash, createPrivateKey, generateKeyPairSync, X509Certificate, type KeyObject } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { LeafgateError, pkix } from '../../protocol/index.ts';
const { encodeCertificate, keyIdentifier, newSerial, subjectDerOf } = pkix;
type CertificateProfile = pkix.CertificateProfile;

export interface IssuingCa {
  name: 'root' | 'device-ca' | 'infra-ca';
  certificate: X509Certificate;
  pem: string;
  subjectDer: Buffer;
  keyId: Buffer;
  privateKey: KeyObject;
}

export interface IssueRequest {
  subjectDer: Buffer;
  spkiDer: Buffer;
  profile: CertificateProfile;
  sans?: { dns?: string[]; uri?: string[]; ip?: string[] };
  notBefore: Date;
  notAfter: Date;
}

export interface IssuedCertificate {
  pem: string;
  der: Buffer;
  /** Upper-case hex, as OpenSSL prints it. */
  serial: string;
  fingerprint256: string;
  notBefore: Date;
  notAfter: Date;
  /** Issuing CA then root, PEM. */
  chain: string[];
}

/** CA connector contract: what every CA backend (built-in, HSM, external) provides. */
export interface CaConnector {
  readonly name: string;
  issue(issuer: 'device' | 'infra' | 'root', req: IssueRequest): IssuedCertificate;
  /** Trust bundle, root last. */
  bundle(): { root: string; deviceCa: string; infraCa: string };
}

const MIN_PASSPHRASE = 12;
/** RFC 5280 4.1.2.5: notBefore is backdated a little so slightly slow device clocks accept new certs. */
export const BACKDATE_MS = 5 * 60 * 1000;

export class LocalCa implements CaConnector {
  readonly name = 'local';
  readonly root: IssuingCa;
  readonly deviceCa: IssuingCa;
  readonly infraCa: IssuingCa;

  private constructor(root: IssuingCa, deviceCa: IssuingCa, infraCa: IssuingCa) {
    this.root = root;
    this.deviceCa = deviceCa;
    this.infraCa = infraCa;
  }

  /** Loads the CA from `dir`, creating root and issuing CAs on first start. */
  static open(dir: string, passphrase: string, opts: { organization?: string; now?: Date } = {}): LocalCa {
    if (typeof passphrase !== 'string' || passphrase.length < MIN_PASSPHRASE) {
      throw new LeafgateError('internal', `CA passphrase must have at least ${MIN_PASSPHRASE} characters (LEAFGATE_CA_PASSPHRASE)`);
    }
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const now = opts.now ?? new Date();
    const org = opts.organization ?? 'leafgate';
    const root = loadOrCreate(dir, 'root', passphrase, () => null, `${org} Root CA`, now, 20);
    const deviceCa = loadOrCreate(dir, 'device-ca', passphrase, () => root, `${org} Device CA`, now, 10);
    const infraCa = loadOrCreate(dir, 'infra-ca', passphrase, () => root, `${org} Infrastructure CA`, now, 10);
    return new LocalCa(root, deviceCa, infraCa);
  }

  issue(issuer: 'device' | 'infra' | 'root', req: IssueRequest): IssuedCertificate {
    // The root signs only gateway Sub-CAs (pathLen 0 below it); everything else comes from an issuing CA.
    const ca = issuer === 'device' ? this.deviceCa : issuer === 'infra' ? this.infraCa : this.root;
    // A certificate never outlives its issuer (RFC 5280 6.1.3 would reject the tail anyway).
    const caNotAfter = new Date(ca.certificate.validTo);
    const notAfter = req.notAfter > caNotAfter ? caNotAfter : req.notAfter;
    const serial = newSerial();
    const certDer = encodeCertificate({
      serial,
      subjectDer: req.subjectDer,
      spkiDer: req.spkiDer,
      notBefore: req.notBefore,
      notAfter,
      profile: req.profile,
      sans: req.sans,
      issuer: { subjectDer: ca.subjectDer, keyId: ca.keyId, privateKey: ca.privateKey },
    });
    return {
      pem: pkix.toPem(certDer, 'CERTIFICATE'),
      der: certDer,
      serial: serial.toString('hex').toUpperCase(),
      fingerprint256: fingerprint(certDer),
      notBefore: truncateToSeconds(req.notBefore),
      notAfter: truncateToSeconds(notAfter),
      chain: issuer === 'root' ? [this.root.pem] : [ca.pem, this.root.pem],
    };
  }

  bundle(): { root: string; deviceCa: string; infraCa: string } {
    return { root: this.root.pem, deviceCa: this.deviceCa.pem, infraCa: this.infraCa.pem };
  }
}

/** SHA-256 of the DER, colon-separated upper-case hex: the form X509Certificate.fingerprint256 prints. */
export function fingerprint(certDer: Buffer): string {
  return createHash('sha256').update(certDer).digest('hex').toUpperCase().replace(/(..)(?!$)/g, '$1:');
}

function truncateToSeconds(d: Date): Date {
  return new Date(Math.floor(d.getTime() / 1000) * 1000);
}

function loadOrCreate(dir: string, name: IssuingCa['name'], passphrase: string, parent: () => IssuingCa | null, commonName: string, now: Date, years: number): IssuingCa {
  const certPath = join(dir, `${name}.crt.pem`);
  const keyPath = join(dir, `${name}.key.pem`);
  if (existsSync(certPath) && existsSync(keyPath)) {
    const pem = readFileSync(certPath, 'utf8');
    let privateKey: KeyObject;
    try {
      privateKey = createPrivateKey({ key: readFileSync(keyPath, 'utf8'), format: 'pem', passphrase });
    } catch (err) {
      throw new LeafgateError('internal', `cannot decrypt ${keyPath}: wrong CA passphrase?`, { cause: err });
    }
    const certificate = new X509Certificate(pem);
    if (!certificate.checkPrivateKey(privateKey)) throw new LeafgateError('internal', `${keyPath} does not match ${certPath}`);
    return { name, certificate, pem, subjectDer: subjectDerOf(certificate.raw), keyId: keyIdentifier(certificate.publicKey.export({ type: 'spki', format: 'der' })), privateKey };
  }
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const spkiDer = publicKey.export({ type: 'spki', format: 'der' });
  const subjectDer = pkix.encodeName(commonName);
  const issuer = parent();
  const keyId = keyIdentifier(spkiDer);
  const notAfter = new Date(now);
  notAfter.setUTCFullYear(notAfter.getUTCFullYear() + years);
  const der = encodeCertificate({
    serial: newSerial(),
    subjectDer,
    spkiDer,
    notBefore: new Date(now.getTime() - BACKDATE_MS),
    notAfter: issuer ? minDate(notAfter, new Date(issuer.certificate.validTo)) : notAfter,
    profile: issuer ? { kind: 'intermediate', pathLen: 0 } : { kind: 'root' },
    issuer: issuer ? { subjectDer: issuer.subjectDer, keyId: issuer.keyId, privateKey: issuer.privateKey } : { subjectDer, keyId, privateKey },
  });
  const pem = pkix.toPem(der, 'CERTIFICATE');
  // Key first: a crash between the two writes leaves a key without a cert, which the next
  // start overwrites, never a cert whose key is lost.
  writeFileSync(keyPath, privateKey.export({ type: 'pkcs8', format: 'pem', cipher: 'aes-256-cbc', passphrase }) as string, { mode: 0o600 });
  writeFileSync(certPath, pem);
  return { name, certificate: new X509Certificate(der), pem, subjectDer, keyId, privateKey };
}

function minDate(a: Date, b: Date): Date {
  return a < b ? a : b;
}
