/**
 * The built-in private CA: a root and two issuing CAs made on first start in the data
 * directory. The device CA signs only leaf-device certificates, so the gateway broker can
 * tell a device from any other holder of a certificate by its issuer; the infrastructure CA
 * signs gateway and authority TLS certificates. Private keys are encrypted PKCS#8 (PBES2,
 * RFC 8018) with scrypt (RFC 7914, N=2^14 r=8 p=1) and AES-256-CBC: memory-hard, so a stolen
 * key file resists offline guessing; OpenSSL reads it (`openssl pkey -in root.key.pem`).
 */
import { createCipheriv, createHash, createPrivateKey, randomBytes, scryptSync, generateKeyPairSync, X509Certificate, type KeyObject } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { LeafgateError, pkix } from '../../protocol/index.ts';
const { CertificateTemplate, encodeCertificate, keyIdentifier, newSerial, subjectDerOf } = pkix;
type CertificateProfile = pkix.CertificateProfile;

export interface IssuingCa {
  name: 'root' | 'device-ca' | 'infra-ca';
  certificate: X509Certificate;
  pem: string;
  subjectDer: Buffer;
  keyId: Buffer;
  privateKey: KeyObject;
  /** certificate.validTo as a Date, read once. */
  notAfter: Date;
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
  /**
   * The same certificate without blocking the caller's thread on the signature: the
   * issuance hot path uses this one (a remote or HSM connector is asynchronous anyway).
   */
  issueAsync(issuer: 'device' | 'infra' | 'root', req: IssueRequest): Promise<IssuedCertificate>;
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
    checkPassphrase(passphrase);
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const now = opts.now ?? new Date();
    const org = opts.organization ?? 'leafgate';
    const root = loadOrCreate(dir, 'root', passphrase, () => null, `${org} Root CA`, now, 20);
    const deviceCa = loadOrCreate(dir, 'device-ca', passphrase, () => root, `${org} Device CA`, now, 10);
    const infraCa = loadOrCreate(dir, 'infra-ca', passphrase, () => root, `${org} Infrastructure CA`, now, 10);
    return new LocalCa(root, deviceCa, infraCa);
  }

  /**
   * The CA of a cluster, kept in the shared database so that every authority node signs with
   * the same root and issuing CAs. On first start the node offers a set -- the CA files of
   * `adoptDir` if it holds a complete one (a single node moving to PostgreSQL keeps its CA),
   * else a new set -- with insert-if-absent; a node that loses the race loads the winner's.
   * Keys are stored encrypted exactly as in the files, so every node needs the same passphrase.
   */
  static async openShared(
    store: CaMaterialStore,
    passphrase: string,
    opts: { organization?: string; now?: Date; adoptDir?: string } = {},
  ): Promise<{ ca: LocalCa; created: boolean; adopted: boolean }> {
    checkPassphrase(passphrase);
    let rows = await store.getCaMaterial();
    let created = false;
    let adopted = false;
    if (rows.length === 0) {
      const files = opts.adoptDir ? readCaFiles(opts.adoptDir) : null;
      if (files) {
        // Checked before it is offered: a set this passphrase cannot open must not become the cluster's.
        const root = fromPem('root', files[0].certPem, files[0].keyPem, passphrase, null, join(opts.adoptDir!, 'root.key.pem'));
        for (const f of files.slice(1)) fromPem(f.name, f.certPem, f.keyPem, passphrase, root, join(opts.adoptDir!, `${f.name}.key.pem`));
      }
      const offer = files ?? generateSet(passphrase, opts.organization ?? 'leafgate', opts.now ?? new Date());
      const now = (opts.now ?? new Date()).getTime();
      created = await store.insertCaMaterialIfAbsent(offer.map((r) => ({ ...r, createdAt: now })));
      adopted = created && files !== null;
      rows = await store.getCaMaterial();
    }
    const by = new Map(rows.map((r) => [r.name, r]));
    const row = (name: IssuingCa['name']) => {
      const r = by.get(name);
      if (!r) throw new LeafgateError('internal', `the database holds an incomplete CA (no ${name}): restore the ca_material table from a backup`);
      return r;
    };
    const where = (name: string) => `the ${name} CA stored in the database`;
    const root = fromPem('root', row('root').certPem, row('root').keyPem, passphrase, null, where('root'));
    const deviceCa = fromPem('device-ca', row('device-ca').certPem, row('device-ca').keyPem, passphrase, root, where('device'));
    const infraCa = fromPem('infra-ca', row('infra-ca').certPem, row('infra-ca').keyPem, passphrase, root, where('infrastructure'));
    return { ca: new LocalCa(root, deviceCa, infraCa), created, adopted };
  }

  issue(issuer: 'device' | 'infra' | 'root', req: IssueRequest): IssuedCertificate {
    const { template, fields, ca } = this.prepare(issuer, req);
    return this.result(issuer, ca, fields, template.encode(fields), req.notBefore);
  }

  async issueAsync(issuer: 'device' | 'infra' | 'root', req: IssueRequest): Promise<IssuedCertificate> {
    const { template, fields, ca } = this.prepare(issuer, req);
    return this.result(issuer, ca, fields, await template.encodeAsync(fields), req.notBefore);
  }

  private prepare(issuer: 'device' | 'infra' | 'root', req: IssueRequest): { template: pkix.CertificateTemplate; fields: pkix.TemplateFields; ca: IssuingCa } {
    // The root signs only gateway Sub-CAs (pathLen 0 below it); everything else comes from an issuing CA.
    const ca = issuer === 'device' ? this.deviceCa : issuer === 'infra' ? this.infraCa : this.root;
    // A certificate never outlives its issuer (RFC 5280 6.1.3 would reject the tail anyway).
    const notAfter = req.notAfter > ca.notAfter ? ca.notAfter : req.notAfter;
    const fields = { serial: newSerial(), subjectDer: req.subjectDer, spkiDer: req.spkiDer, notBefore: req.notBefore, notAfter, sans: req.sans };
    return { template: this.template(ca, req.profile), fields, ca };
  }

  /** One pre-encoded TBSCertificate template per issuing CA and profile, made on first use. */
  private readonly templates = new Map<string, pkix.CertificateTemplate>();

  private template(ca: IssuingCa, profile: CertificateProfile): pkix.CertificateTemplate {
    const key = profile.kind === 'root' || profile.kind === 'intermediate' ? `${ca.name} ${JSON.stringify(profile)}` : `${ca.name} ${profile.kind} ${profile.keyType}`;
    let t = this.templates.get(key);
    if (!t) {
      t = new CertificateTemplate(profile, { subjectDer: ca.subjectDer, keyId: ca.keyId, privateKey: ca.privateKey });
      this.templates.set(key, t);
    }
    return t;
  }

  private result(issuer: 'device' | 'infra' | 'root', ca: IssuingCa, fields: pkix.TemplateFields, certDer: Buffer, notBefore: Date): IssuedCertificate {
    return {
      pem: pkix.toPem(certDer, 'CERTIFICATE'),
      der: certDer,
      serial: fields.serial.toString('hex').toUpperCase(),
      fingerprint256: fingerprint(certDer),
      notBefore: truncateToSeconds(notBefore),
      notAfter: truncateToSeconds(fields.notAfter),
      chain: issuer === 'root' ? [this.root.pem] : [ca.pem, this.root.pem],
    };
  }

  bundle(): { root: string; deviceCa: string; infraCa: string } {
    return { root: this.root.pem, deviceCa: this.deviceCa.pem, infraCa: this.infraCa.pem };
  }
}

/** SHA-256 of the DER, colon-separated upper-case hex: the form X509Certificate.fingerprint256 prints. */
export function fingerprint(certDer: Buffer): string {
  const hex = createHash('sha256').update(certDer).digest('hex').toUpperCase();
  let out = hex.slice(0, 2);
  for (let i = 2; i < hex.length; i += 2) out += ':' + hex.slice(i, i + 2);
  return out;
}

function truncateToSeconds(d: Date): Date {
  return new Date(Math.floor(d.getTime() / 1000) * 1000);
}

function checkPassphrase(passphrase: string): void {
  if (typeof passphrase !== 'string' || passphrase.length < MIN_PASSPHRASE) {
    throw new LeafgateError('internal', `CA passphrase must have at least ${MIN_PASSPHRASE} characters (LEAFGATE_CA_PASSPHRASE)`);
  }
}

/** Where a cluster keeps its CA: the store's ca_material table (see authority/store). */
export interface CaMaterialStore {
  getCaMaterial(): Promise<Array<{ name: IssuingCa['name']; certPem: string; keyPem: string }>>;
  insertCaMaterialIfAbsent(rows: Array<{ name: IssuingCa['name']; certPem: string; keyPem: string; createdAt: number }>): Promise<boolean>;
}

type CaFileSet = Array<{ name: IssuingCa['name']; certPem: string; keyPem: string }>;
const CA_NAMES: IssuingCa['name'][] = ['root', 'device-ca', 'infra-ca'];

/** The PEM files of a complete file CA in `dir`, as they are (keys stay encrypted); null if incomplete. */
function readCaFiles(dir: string): CaFileSet | null {
  const paths = CA_NAMES.map((name) => ({ name, cert: join(dir, `${name}.crt.pem`), key: join(dir, `${name}.key.pem`) }));
  if (!paths.every((p) => existsSync(p.cert) && existsSync(p.key))) return null;
  return paths.map((p) => ({ name: p.name, certPem: readFileSync(p.cert, 'utf8'), keyPem: readFileSync(p.key, 'utf8') }));
}

/** A new root and two issuing CAs, in memory, keys encrypted as the files would hold them. */
function generateSet(passphrase: string, org: string, now: Date): CaFileSet {
  const root = createCa('root', () => null, `${org} Root CA`, now, 20);
  const deviceCa = createCa('device-ca', () => root.ca, `${org} Device CA`, now, 10);
  const infraCa = createCa('infra-ca', () => root.ca, `${org} Infrastructure CA`, now, 10);
  return [root, deviceCa, infraCa].map((c) => ({ name: c.ca.name, certPem: c.ca.pem, keyPem: encryptPkcs8Scrypt(c.ca.privateKey, passphrase) }));
}

/** One CA from its certificate and encrypted key; checks the key matches and the chain to `issuer`. */
function fromPem(name: IssuingCa['name'], pem: string, keyPem: string, passphrase: string, issuer: IssuingCa | null, where: string, certWhere = where): IssuingCa {
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey({ key: keyPem, format: 'pem', passphrase });
  } catch (err) {
    throw new LeafgateError('internal', `cannot decrypt ${where}: wrong CA passphrase?`, { cause: err });
  }
  let certificate: X509Certificate;
  try {
    certificate = new X509Certificate(pem);
  } catch (err) {
    throw new LeafgateError('internal', `${certWhere} is not a certificate`, { cause: err });
  }
  if (!certificate.checkPrivateKey(privateKey)) throw new LeafgateError('internal', `${where} does not match ${certWhere}`);
  // An issuing CA that does not chain to the current root (e.g. the root was regenerated)
  // would make every issued chain invalid without a word: refuse to start instead.
  if (issuer && !(certificate.checkIssued(issuer.certificate) && certificate.verify(issuer.certificate.publicKey))) {
    throw new LeafgateError('internal', `${certWhere} is not issued by the current root: restore the root or remove the issuing CAs`);
  }
  return {
    name, certificate, pem, subjectDer: subjectDerOf(certificate.raw), keyId: keyIdentifier(certificate.publicKey.export({ type: 'spki', format: 'der' })), privateKey,
    notAfter: new Date(certificate.validTo),
  };
}

function createCa(name: IssuingCa['name'], parent: () => IssuingCa | null, commonName: string, now: Date, years: number): { ca: IssuingCa } {
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
    notAfter: issuer ? minDate(notAfter, issuer.notAfter) : notAfter,
    profile: issuer ? { kind: 'intermediate', pathLen: 0 } : { kind: 'root' },
    issuer: issuer ? { subjectDer: issuer.subjectDer, keyId: issuer.keyId, privateKey: issuer.privateKey } : { subjectDer, keyId, privateKey },
  });
  const pem = pkix.toPem(der, 'CERTIFICATE');
  const certificate = new X509Certificate(der);
  return { ca: { name, certificate, pem, subjectDer, keyId, privateKey, notAfter: new Date(certificate.validTo) } };
}

function loadOrCreate(dir: string, name: IssuingCa['name'], passphrase: string, parent: () => IssuingCa | null, commonName: string, now: Date, years: number): IssuingCa {
  const certPath = join(dir, `${name}.crt.pem`);
  const keyPath = join(dir, `${name}.key.pem`);
  if (existsSync(certPath) && existsSync(keyPath)) {
    return fromPem(name, readFileSync(certPath, 'utf8'), readFileSync(keyPath, 'utf8'), passphrase, parent(), keyPath, certPath);
  }
  const { ca } = createCa(name, parent, commonName, now, years);
  // Key first: a crash between the two writes leaves a key without a cert, which the next
  // start overwrites, never a cert whose key is lost.
  writeFileSync(keyPath, encryptPkcs8Scrypt(ca.privateKey, passphrase), { mode: 0o600 });
  chmodSync(keyPath, 0o600); // the mode above applies only when the file is created
  writeFileSync(certPath, ca.pem);
  return ca;
}

// N=2^14 is what `openssl pkcs8 -scrypt` uses, and within OpenSSL's 32 MiB decryption limit.
const SCRYPT = { N: 1 << 14, r: 8, p: 1 };

/**
 * EncryptedPrivateKeyInfo with PBES2 { scrypt, aes-256-cbc } (RFC 8018 A.4, RFC 7914 7):
 * node's KeyObject.export only offers PBKDF2 with 2,048 iterations.
 */
export function encryptPkcs8Scrypt(key: KeyObject, passphrase: string): string {
  const { der } = pkix;
  const salt = randomBytes(16);
  const iv = randomBytes(16);
  const derived = scryptSync(passphrase, salt, 32, { ...SCRYPT, maxmem: 128 * SCRYPT.N * SCRYPT.r * 2 });
  const cipher = createCipheriv('aes-256-cbc', derived, iv);
  const encrypted = Buffer.concat([cipher.update(key.export({ type: 'pkcs8', format: 'der' })), cipher.final()]);
  const algorithm = der.seq(
    der.oid('1.2.840.113549.1.5.13'), // id-PBES2
    der.seq(
      der.seq(der.oid('1.3.6.1.4.1.11591.4.11'), der.seq(der.octetString(salt), der.integer(SCRYPT.N), der.integer(SCRYPT.r), der.integer(SCRYPT.p), der.integer(32))), // id-scrypt
      der.seq(der.oid('2.16.840.1.101.3.4.1.42'), der.octetString(iv)), // aes256-CBC
    ),
  );
  return pkix.toPem(der.seq(algorithm, der.octetString(encrypted)), 'ENCRYPTED PRIVATE KEY');
}

function minDate(a: Date, b: Date): Date {
  return a < b ? a : b;
}
