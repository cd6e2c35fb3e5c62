/**
 * The device CA with its key in Key Vault (or anywhere a CaKey lives): its certificate is made
 * by the root (a local key, which may be brought online for this one job) for the CaKey's
 * public key, and device certificates are signed through CaKey.sign, asynchronously. The
 * TBSCertificate is the same pre-encoded template LocalCa uses (pkix CertificateTemplate:
 * encodeTbs, then assemble with the signature), so a certificate from here is byte for byte
 * what the file-key device CA would write, but for the key that signs it.
 *
 * Until LocalCa signs through CaKey for all its CAs, this is the seam: `createKeyVaultDeviceCa`
 * makes (or `openCaKeyIssuer` reloads) the device CA, and `CaKeyIssuer.issue` is what
 * LocalCa.issueAsync('device', ...) calls for it.
 */
import { X509Certificate } from 'node:crypto';
import { LeafgateError, pkix } from '../../protocol/index.ts';
import type { CaKey } from './ca-key.ts';
import { BACKDATE_MS, fingerprint, type CaName, type IssueRequest, type IssuedCertificate, type RootCa } from './local-ca.ts';

/** The device CA's own profile, as LocalCa makes it: pathLen 0, clientAuth only. */
export const DEVICE_CA_PROFILE: pkix.CertificateProfile = { kind: 'intermediate', pathLen: 0, eku: ['clientAuth'] };

/** An issuing CA whose key is a CaKey: the fields of LocalCa's IssuingCa, with `caKey` for `privateKey`. */
export interface CaKeyIssuingCa {
  name: CaName;
  certificate: X509Certificate;
  pem: string;
  subjectDer: Buffer;
  keyId: Buffer;
  notAfter: Date;
  serial: string;
  caKey: CaKey;
}

const spki = (ca: { publicKey: import('node:crypto').KeyObject }) => ca.publicKey.export({ type: 'spki', format: 'der' });

/**
 * A new device CA certificate for `caKey`, signed by the root (whose key must be online).
 * Write its PEM to `device-ca.crt.pem` (there is no key file: the key stays in the vault).
 */
export function createKeyVaultDeviceCa(opts: {
  root: RootCa;
  caKey: CaKey;
  organization?: string;
  now?: Date;
  years?: number;
  /** The root's CRL distribution point (LocalCa.crlUrl('root')). */
  crlUrl?: string;
}): CaKeyIssuingCa {
  const { root, caKey } = opts;
  if (!root.privateKey) {
    throw new LeafgateError('internal', 'the device CA for the Key Vault key must be signed by the root: run this where root.key.pem is');
  }
  const now = opts.now ?? new Date();
  const notAfter = new Date(now);
  notAfter.setUTCFullYear(notAfter.getUTCFullYear() + (opts.years ?? 10));
  const spkiDer = spki(caKey);
  const der = pkix.encodeCertificate({
    serial: pkix.newSerial(),
    subjectDer: pkix.encodeName(`${opts.organization ?? 'leafgate'} Device CA`),
    spkiDer,
    notBefore: new Date(now.getTime() - BACKDATE_MS),
    notAfter: notAfter > root.notAfter ? root.notAfter : notAfter,
    profile: DEVICE_CA_PROFILE,
    issuer: { subjectDer: root.subjectDer, keyId: root.keyId, privateKey: root.privateKey, crlUrl: opts.crlUrl },
  });
  return openCaKeyIssuer('device-ca', pkix.toPem(der, 'CERTIFICATE'), caKey, root);
}

/**
 * An issuing CA from its certificate and its CaKey: checks that the certificate is for that
 * key (a rotated Key Vault key version would otherwise sign certificates nothing verifies)
 * and that the root issued it.
 */
export function openCaKeyIssuer(name: CaName, pem: string, caKey: CaKey, root: RootCa): CaKeyIssuingCa {
  let certificate: X509Certificate;
  try {
    certificate = new X509Certificate(pem);
  } catch (err) {
    throw new LeafgateError('internal', `the ${name} certificate cannot be read`, { cause: err });
  }
  if (!spki(certificate).equals(spki(caKey))) {
    throw new LeafgateError('internal', `the ${name} certificate is not for ${caKey.description}: make a new ${name} certificate for this key (or pin the key version)`);
  }
  if (!(certificate.checkIssued(root.certificate) && certificate.verify(root.certificate.publicKey))) {
    throw new LeafgateError('internal', `the ${name} certificate is not issued by the current root`);
  }
  return {
    name, certificate, pem, caKey,
    subjectDer: pkix.subjectDerOf(certificate.raw),
    keyId: pkix.keyIdentifier(spki(certificate)),
    notAfter: new Date(certificate.validTo),
    serial: certificate.serialNumber.toUpperCase(),
  };
}

/**
 * Issues under a CaKey-held CA: LocalCa's rules for the device CA (leaf certificates only,
 * never past the CA's notAfter, a fresh 16-octet serial), the TBS from the template, the
 * signature from the CaKey. A signing failure comes back as the CaKey raised it (Key Vault:
 * `authority_unavailable` with `retryAfterMs`).
 */
export class CaKeyIssuer {
  private readonly templates = new Map<string, pkix.CertificateTemplate>();

  constructor(
    readonly ca: CaKeyIssuingCa,
    private readonly rootPem: string,
    private readonly crlUrl?: string,
  ) {}

  async issue(req: IssueRequest): Promise<IssuedCertificate> {
    if (req.profile.kind !== 'device') throw new LeafgateError('internal', 'the device CA signs device certificates only');
    const notAfter = req.notAfter > this.ca.notAfter ? this.ca.notAfter : req.notAfter;
    const fields: pkix.TemplateFields = { serial: pkix.newSerial(), subjectDer: req.subjectDer, spkiDer: req.spkiDer, notBefore: req.notBefore, notAfter, sans: req.sans };
    const template = this.template(req.profile);
    const tbs = template.encodeTbs(fields);
    const der = template.assemble(tbs, await this.ca.caKey.sign(template.hash, tbs));
    return {
      issuer: this.ca.name,
      pem: pkix.toPem(der, 'CERTIFICATE'),
      der,
      serial: fields.serial.toString('hex').toUpperCase(),
      fingerprint256: fingerprint(der),
      notBefore: new Date(Math.floor(req.notBefore.getTime() / 1000) * 1000),
      notAfter: new Date(Math.floor(notAfter.getTime() / 1000) * 1000),
      chain: [this.ca.pem, this.rootPem],
    };
  }

  private template(profile: pkix.CertificateProfile): pkix.CertificateTemplate {
    const key = JSON.stringify(profile);
    let t = this.templates.get(key);
    if (!t) {
      // The template takes a KeyObject to choose the signature AlgorithmIdentifier and hash
      // (ecdsa-with-SHA256 for P-256, -SHA384 for P-384, sha256WithRSAEncryption): the public
      // key answers that as the private one would. Only encodeTbs and assemble are used here,
      // never encode(), so the template never signs with it.
      t = new pkix.CertificateTemplate(profile, { subjectDer: this.ca.subjectDer, keyId: this.ca.keyId, privateKey: this.ca.caKey.publicKey, crlUrl: this.crlUrl });
      this.templates.set(key, t);
    }
    return t;
  }
}
