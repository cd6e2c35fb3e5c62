/**
 * The built-in private CA: a root and three issuing CAs made on first start in the data
 * directory (or by `leafgate authority init`). The root signs only those intermediates and
 * may be kept offline: without root.key.pem the authority runs on the intermediates alone.
 * The device CA signs only leaf-device certificates, so the gateway broker can tell a device
 * from any other holder of a certificate by its issuer; the infrastructure CA signs gateway
 * identities and the authority's TLS certificate; the edge issuer signs only gateway Sub-CAs
 * (IoT Edge CAs), each name-constrained to its gateway's names, so that nothing under a
 * Sub-CA can pass as a gateway, the authority or a device (docs/security.md). Private keys are encrypted PKCS#8 (PBES2,
 * RFC 8018) with scrypt (RFC 7914, N=2^14 r=8 p=1) and AES-256-CBC: memory-hard, so a stolen
 * key file resists offline guessing; OpenSSL reads it (`openssl pkey -in root.key.pem`).
 */
import { createCipheriv, createHash, createPrivateKey, randomBytes, scryptSync, generateKeyPairSync, X509Certificate, type KeyObject } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { LeafgateError, pkix } from '../../protocol/index.ts';
import type { CaKey } from './ca-key.ts';
import { FileCaKey } from './file-ca-key.ts';
const { CertificateTemplate, encodeCertificate, encodeCertificateAsync, keyIdentifier, newSerial, subjectDerOf } = pkix;
type CertificateProfile = pkix.CertificateProfile;

/** The CAs of the hierarchy, by the name of their files, rows and CRLs. */
export type CaName = 'root' | 'device-ca' | 'infra-ca' | 'edge-issuer';
/** Who signs a certificate: an issuing CA by its role, or the root (intermediates only). */
export type IssuerRole = 'device' | 'infra' | 'edge' | 'root';
export const ISSUER_CA: Readonly<Record<IssuerRole, CaName>> = { device: 'device-ca', infra: 'infra-ca', edge: 'edge-issuer', root: 'root' };
export const CA_NAMES: readonly CaName[] = ['root', 'device-ca', 'infra-ca', 'edge-issuer'];

export interface IssuingCa {
  name: CaName;
  certificate: X509Certificate;
  pem: string;
  subjectDer: Buffer;
  keyId: Buffer;
  /** Where the key is and how it signs (file, PKCS#11 token, Key Vault). */
  key: CaKey;
  /** The private key itself when it is held in this process (file keys): the issuance fast path. Null in an HSM. */
  privateKey: KeyObject | null;
  /** certificate.validTo as a Date, read once. */
  notAfter: Date;
  /** Upper-case hex, as in the certificates table. */
  serial: string;
}

/** The root: its key is null while it is kept offline. */
export type RootCa = Omit<IssuingCa, 'key'> & { key: CaKey | null };

/** The intermediates the root signs: name, common name suffix and profile. */
const INTERMEDIATES: ReadonlyArray<{ name: Exclude<CaName, 'root'>; cn: string; profile: pkix.CertificateProfile }> = [
  { name: 'device-ca', cn: 'Device CA', profile: { kind: 'intermediate', pathLen: 0, eku: ['clientAuth'] } },
  { name: 'infra-ca', cn: 'Infrastructure CA', profile: { kind: 'intermediate', pathLen: 0, eku: ['serverAuth', 'clientAuth'] } },
  // pathLen 1: it signs gateway Sub-CAs (pathLen 0), which sign edgeHub and workload certificates.
  { name: 'edge-issuer', cn: 'Edge CA Issuer', profile: { kind: 'intermediate', pathLen: 1, eku: ['serverAuth', 'clientAuth'] } },
];

export interface IssueRequest {
  subjectDer: Buffer;
  spkiDer: Buffer;
  profile: CertificateProfile;
  sans?: { dns?: string[]; uri?: string[]; ip?: string[] };
  notBefore: Date;
  notAfter: Date;
  /**
   * The device's own PKCS#10 request (DER), after leafgate's policy checked it: a connector
   * that forwards the request to another CA (EST) sends this, whose self-signature is the
   * device's proof of possession of its key. The built-in CA signs from the fields above.
   */
  csrDer?: Buffer;
  /** A renewal of a certificate the device holds (EST simplereenroll), not a first issuance. */
  renewal?: boolean;
}

/**
 * The issuer recorded for a certificate that an external CA signed (EST, authority/ca/est-ca.ts):
 * leafgate holds no key of that CA, so its own device CA lists those certificates, once
 * revoked, in its CRL as indirect entries (RFC 5280 5.3.3; authority/revocation.ts).
 */
export const EXTERNAL_CA = 'external-ca' as const;
/** Who signed a certificate on record: a CA of the built-in hierarchy, or the external CA. */
export type IssuerName = CaName | typeof EXTERNAL_CA;

export interface IssuedCertificate {
  /** The CA that signed it (its CRL lists it once revoked). */
  issuer: IssuerName;
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

/** The public certificates of the hierarchy, as gateways pin them. */
export interface CaBundle {
  root: string;
  deviceCa: string;
  infraCa: string;
  edgeIssuer: string;
  /**
   * The external CA that signs device certificates (EST), issuing CA first, its root last:
   * gateways accept device client certificates from it as from the device CA. Absent when
   * leafgate's own device CA signs them.
   */
  externalDeviceChain?: string[];
}

/** CA connector contract: what every CA backend (built-in, HSM, external) provides. */
/** How requests to an external CA are coordinated (per-request claim, answer deadline). */
export interface ExternalCaTiming {
  /** Lifetime of a per-request claim: the EST call's bound plus a margin. */
  claimTtlMs: number;
  /** The authority answers within this (authority_unavailable with retryAfterMs if the CA has not). */
  answerWithinMs: number;
  /** retryAfterMs of a request that finds its requestId claimed (being asked) or still pending. */
  busyRetryAfterMs: number;
}

export interface CaConnector {
  readonly name: string;
  /**
   * True when a certificate, once asked for, exists outside leafgate and cannot be thrown away
   * (an external CA over EST): checks that the built-in CA runs after signing, inside the
   * issuance commit (the active-certificate cap), then also run before asking.
   */
  readonly external?: boolean;
  /** With `external`: the per-request claim's lifetime, the answer deadline, the busy retry hint. */
  readonly timing?: ExternalCaTiming;
  /**
   * Signs a certificate without blocking the caller's thread on the signature: file keys on
   * the worker pool, an HSM or a remote key through its CaKey. Asynchronous only.
   */
  issue(issuer: IssuerRole, req: IssueRequest): Promise<IssuedCertificate>;
  /** Trust bundle, root last. */
  bundle(): CaBundle;
  /** Releases the keys' sessions (HSM) or connections; called once when the authority closes. */
  close(): Promise<void>;
}

const MIN_PASSPHRASE = 12;
/**
 * The clock skew the system tolerates between its parts (gateway `maxClockSkewMs`, renewal
 * `clockSkewSeconds`): 5 minutes.
 */
export const CLOCK_SKEW_TOLERANCE_MS = 5 * 60 * 1000;
/**
 * RFC 5280 4.1.2.5: notBefore is backdated so that clocks slower than the authority's accept
 * a new certificate at once. It must exceed the tolerated skew: backdated by exactly the
 * tolerance, a gateway whose clock is at the edge of it (still "in sync") would refuse every
 * new device certificate as not yet valid. Tolerance + 5 min margin = 10 minutes.
 */
export const BACKDATE_MS = CLOCK_SKEW_TOLERANCE_MS + 5 * 60 * 1000;

export class LocalCa implements CaConnector {
  readonly name = 'local';
  readonly root: RootCa;
  readonly deviceCa: IssuingCa;
  readonly infraCa: IssuingCa;
  readonly edgeIssuer: IssuingCa;
  /** Base of the CRL distribution points written into issued certificates (no trailing slash). */
  private crlBase: string | undefined;

  private constructor(root: RootCa, deviceCa: IssuingCa, infraCa: IssuingCa, edgeIssuer: IssuingCa, crlBaseUrl?: string) {
    this.root = root;
    this.deviceCa = deviceCa;
    this.infraCa = infraCa;
    this.edgeIssuer = edgeIssuer;
    this.crlBase = crlBaseUrl?.replace(/\/+$/, '');
  }

  /**
   * Loads the CA from `dir`, creating what is missing on first start. A root whose key is
   * not in `dir` is offline: the intermediates must then exist already (made by `authority
   * init` where the root key is), since only the root can sign them.
   */
  static open(dir: string, passphrase: string, opts: { organization?: string; now?: Date; crlBaseUrl?: string } = {}): LocalCa {
    checkPassphrase(passphrase);
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const now = opts.now ?? new Date();
    const org = opts.organization ?? 'leafgate';
    const rootCert = join(dir, 'root.crt.pem');
    const rootKey = join(dir, 'root.key.pem');
    let root: RootCa;
    if (existsSync(rootCert) && !existsSync(rootKey)) root = rootFromPem(readFileSync(rootCert, 'utf8'), null, passphrase, rootCert);
    else root = loadOrCreate(dir, 'root', passphrase, null, `${org} Root CA`, { kind: 'root' }, now, 20, undefined);
    const rootUrl = crlUrlOf(opts.crlBaseUrl, 'root');
    const [deviceCa, infraCa, edgeIssuer] = INTERMEDIATES.map((i) => loadOrCreate(dir, i.name, passphrase, root, `${org} ${i.cn}`, i.profile, now, 10, rootUrl));
    return new LocalCa(root, deviceCa, infraCa, edgeIssuer, opts.crlBaseUrl);
  }

  /**
   * The CA of a cluster, kept in the shared database so that every authority node signs with
   * the same root and issuing CAs. On first start the node offers a set -- the CA files of
   * `adoptDir` if it holds a complete one (a single node moving to PostgreSQL keeps its CA),
   * else a new set -- with insert-if-absent; a node that loses the race loads the winner's.
   * Keys are stored encrypted exactly as in the files, so every node needs the same passphrase.
   * A root row with an empty key is a root kept offline.
   *
   * `deviceKey`: the device CA's key lives elsewhere (Key Vault): its row holds the certificate
   * for that key and an empty key, a new set gets a device CA certificate signed for it, and
   * the CA files adopted are those the same key store left (LocalCa.openWithKeys's layout).
   * Every node must then be given the same key; a device CA row with a key (a file-key
   * cluster) is refused, and so is an empty one without `deviceKey`.
   */
  static async openShared(
    store: CaMaterialStore,
    passphrase: string,
    opts: { organization?: string; now?: Date; adoptDir?: string; crlBaseUrl?: string; deviceKey?: CaKey } = {},
  ): Promise<{ ca: LocalCa; created: boolean; adopted: boolean }> {
    checkPassphrase(passphrase);
    const org = opts.organization ?? 'leafgate';
    const now = opts.now ?? new Date();
    const deviceKey = opts.deviceKey;
    let rows = await store.getCaMaterial();
    let created = false;
    let adopted = false;
    if (rows.length === 0) {
      let files: CaFileSet | null = null;
      if (opts.adoptDir && deviceKey) {
        // A complete set of this key store's files (made by init) is checked as a start would, then offered.
        files = readCaFiles(opts.adoptDir, ['device-ca']);
        if (files) {
          const file = (name: CaName) => openFileCaKey(opts.adoptDir!, name, passphrase);
          await LocalCa.openWithKeys(opts.adoptDir, { root: file('root'), 'device-ca': deviceKey, 'infra-ca': file('infra-ca')!, 'edge-issuer': file('edge-issuer')! }, { organization: org, now, crlBaseUrl: opts.crlBaseUrl });
        }
      } else if (opts.adoptDir) {
        // Opened (and completed) first: a set this passphrase cannot open must not become the cluster's.
        LocalCa.open(opts.adoptDir, passphrase, { organization: org, now, crlBaseUrl: opts.crlBaseUrl });
        files = readCaFiles(opts.adoptDir);
      }
      const offer = files ?? (await generateSet(passphrase, org, now, opts.crlBaseUrl, deviceKey));
      created = await store.insertCaMaterialIfAbsent(offer.map((r) => ({ ...r, createdAt: now.getTime() })));
      adopted = created && files !== null;
      rows = await store.getCaMaterial();
    }
    let by = new Map(rows.map((r) => [r.name, r]));
    const where = (name: string) => `the ${name} CA stored in the database`;
    const row = (name: CaName) => {
      const r = by.get(name);
      if (!r) throw new LeafgateError('internal', `the database holds an incomplete CA (no ${name}): restore the ca_material table from a backup`);
      return r;
    };
    const root = rootFromPem(row('root').certPem, row('root').keyPem || null, passphrase, where('root'));
    // A cluster made before the edge issuer existed gets it now (the root key must be online).
    const missing = INTERMEDIATES.filter((i) => !by.has(i.name));
    if (missing.some((i) => i.name === 'device-ca')) throw new LeafgateError('internal', 'the database holds an incomplete CA (no device-ca): restore the ca_material table from a backup');
    if (missing.length) {
      const made = missing.map((i) => createCa(i.name, root, `${org} ${i.cn}`, i.profile, now, 10, crlUrlOf(opts.crlBaseUrl, 'root')));
      await store.insertCaMaterialIfAbsent(made.map((c) => ({ name: c.name, certPem: c.pem, keyPem: encryptPkcs8Scrypt(c.privateKey!, passphrase), createdAt: now.getTime() })));
      by = new Map((await store.getCaMaterial()).map((r) => [r.name, r]));
    }
    const [deviceCa, infraCa, edgeIssuer] = INTERMEDIATES.map((i) => {
      const r = row(i.name);
      if (i.name !== 'device-ca' || (!deviceKey && r.keyPem)) return fromPem(i.name, r.certPem, r.keyPem, passphrase, root, where(i.name));
      // An empty key: the device CA's key is elsewhere, and must be the one this node was given.
      if (!deviceKey) throw new LeafgateError('internal', `${where('device-ca')} has its key outside the database (Key Vault): configure the same caKeys (store "keyvault") on this node`);
      if (r.keyPem) throw new LeafgateError('internal', `${where('device-ca')} has its key in the database (file keys): this cluster cannot move its device CA key to ${deviceKey.description} yet; use caKeys.store "file" on this node`);
      const certificate = parseCert(r.certPem, where('device-ca'));
      if (!sameKey(certificate.publicKey, deviceKey.publicKey)) {
        throw new LeafgateError('internal', `the device-ca key (${deviceKey.description}) does not match ${where('device-ca')}: configure the key (and key version) the cluster's device CA was made for`);
      }
      checkIssuedBy(certificate, root, where('device-ca'));
      return { ...describe('device-ca', certificate, r.certPem), key: deviceKey, privateKey: null };
    });
    return { ca: new LocalCa(root, deviceCa, infraCa, edgeIssuer, opts.crlBaseUrl), created, adopted };
  }

  /**
   * A CA whose keys live outside this process (a PKCS#11 token, a key vault): the keys come
   * as CaKeys, the certificates are the files `<dir>/<name>.crt.pem` (public; no key file is
   * ever written). With `create`, a missing certificate is made through the keys -- the root
   * self-signs through its key, the root's key signs the intermediates -- which is what
   * `leafgate authority init` does; at start the certificates must exist. A root without a
   * key (null) is kept offline. Every key must match its certificate and every intermediate
   * chain to the root, or the authority refuses to start.
   */
  static async openWithKeys(
    dir: string,
    keys: { root: CaKey | null } & Record<Exclude<CaName, 'root'>, CaKey>,
    opts: { organization?: string; now?: Date; crlBaseUrl?: string; create?: boolean } = {},
  ): Promise<LocalCa> {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const now = opts.now ?? new Date();
    const org = opts.organization ?? 'leafgate';
    const load = async (name: CaName, key: CaKey | null, issuer: RootCa | null, cn: string, profile: CertificateProfile, years: number, crlUrl: string | undefined) => {
      const certPath = join(dir, `${name}.crt.pem`);
      if (existsSync(certPath)) {
        const pem = readFileSync(certPath, 'utf8');
        const certificate = parseCert(pem, certPath);
        if (key && !sameKey(certificate.publicKey, key.publicKey)) {
          throw new LeafgateError('internal', `the ${name} key (${key.description}) does not match ${certPath}: configure the key (and key version) that certificate was made for, or move ${certPath} away and run \`leafgate authority init\` to sign a new ${name} certificate for this key`);
        }
        checkIssuedBy(certificate, issuer, certPath);
        // A key held in this process keeps the issuance fast path (its KeyObject); any other signs through its CaKey.
        return { ...describe(name, certificate, pem), key, privateKey: key instanceof FileCaKey ? key.keyObject : null };
      }
      if (!opts.create) throw new LeafgateError('internal', `${certPath} is missing: run \`leafgate authority init\` with the same key store first`);
      if (!key) throw new LeafgateError('internal', `the ${name} certificate is missing and its key is offline`);
      const ca = await createCaWithKey(name, key, issuer, cn, profile, now, years, crlUrl);
      writeFileSync(certPath, ca.pem);
      return key instanceof FileCaKey ? { ...ca, privateKey: key.keyObject } : ca;
    };
    const root = (await load('root', keys.root, null, `${org} Root CA`, { kind: 'root' }, 20, undefined)) as RootCa;
    const rootUrl = crlUrlOf(opts.crlBaseUrl, 'root');
    const made: IssuingCa[] = [];
    for (const i of INTERMEDIATES) made.push((await load(i.name, keys[i.name], root, `${org} ${i.cn}`, i.profile, 10, rootUrl)) as IssuingCa);
    const [deviceCa, infraCa, edgeIssuer] = made;
    return new LocalCa(root, deviceCa, infraCa, edgeIssuer, opts.crlBaseUrl);
  }

  /** The same CA with the root key brought online for one job (an offline root's CRL, say). */
  withRootKey(keyPem: string, passphrase: string): LocalCa {
    const root = rootFromPem(this.root.pem, keyPem, passphrase, 'the root key given');
    return new LocalCa(root, this.deviceCa, this.infraCa, this.edgeIssuer, this.crlBase);
  }

  /** The CA of a name. */
  get(name: CaName): RootCa | IssuingCa {
    return name === 'root' ? this.root : name === 'device-ca' ? this.deviceCa : name === 'infra-ca' ? this.infraCa : this.edgeIssuer;
  }

  /** The intermediates, with the root's view of them (the root CRL lists the revoked ones). */
  intermediates(): IssuingCa[] {
    return [this.deviceCa, this.infraCa, this.edgeIssuer];
  }

  /** Where the CRL of `name` is published, if a base URL is known. */
  crlUrl(name: CaName): string | undefined {
    return crlUrlOf(this.crlBase, name);
  }

  /** Sets the CRL base once the listener's address is known (port 0); later issuance carries it. */
  setCrlBaseUrl(url: string): void {
    this.crlBase = url.replace(/\/+$/, '');
    this.templates.clear();
  }

  async issue(issuer: IssuerRole, req: IssueRequest): Promise<IssuedCertificate> {
    const { template, fields, ca } = this.prepare(issuer, req);
    return this.result(ca, fields, await template.encodeAsync(fields), req.notBefore);
  }

  /** Where each key lives, for the start-up log and `--help` (never a secret). */
  describeKeys(): Record<CaName, string> {
    return Object.fromEntries(CA_NAMES.map((n) => [n, this.get(n).key?.description ?? 'offline'])) as Record<CaName, string>;
  }

  async close(): Promise<void> {
    const keys = new Set(CA_NAMES.map((n) => this.get(n).key).filter((k): k is CaKey => !!k));
    await Promise.all([...keys].map((k) => k.close?.()));
  }

  private prepare(issuer: IssuerRole, req: IssueRequest): { template: pkix.CertificateTemplate; fields: pkix.TemplateFields; ca: IssuingCa } {
    const ca = this.get(ISSUER_CA[issuer]);
    // The root signs intermediates only, and only while its key is online.
    if (issuer === 'root' && req.profile.kind !== 'intermediate') throw new LeafgateError('internal', 'the root signs intermediates only');
    if (!ca.key) throw new LeafgateError('internal', 'the root key is offline: run this where root.key.pem is');
    if (issuer === 'edge' && req.profile.kind !== 'intermediate') throw new LeafgateError('internal', 'the edge issuer signs gateway Sub-CAs only');
    // A certificate never outlives its issuer (RFC 5280 6.1.3 would reject the tail anyway).
    const notAfter = req.notAfter > ca.notAfter ? ca.notAfter : req.notAfter;
    const fields = { serial: newSerial(), subjectDer: req.subjectDer, spkiDer: req.spkiDer, notBefore: req.notBefore, notAfter, sans: req.sans };
    return { template: this.template(ca as IssuingCa, req.profile), fields, ca: ca as IssuingCa };
  }

  /** One pre-encoded TBSCertificate template per issuing CA and profile, made on first use. */
  private readonly templates = new Map<string, pkix.CertificateTemplate>();

  private template(ca: IssuingCa, profile: CertificateProfile): pkix.CertificateTemplate {
    const key = profile.kind === 'root' || profile.kind === 'intermediate' ? `${ca.name} ${JSON.stringify(profile)}` : `${ca.name} ${profile.kind} ${profile.keyType}`;
    let t = this.templates.get(key);
    if (!t) {
      // A key in this process signs through its KeyObject (the fast path), any other through its CaKey.
      const signer = ca.privateKey ? { privateKey: ca.privateKey } : { signer: ca.key };
      t = new CertificateTemplate(profile, { subjectDer: ca.subjectDer, keyId: ca.keyId, crlUrl: this.crlUrl(ca.name), ...signer });
      // Sub-CA profiles differ per gateway: not worth keeping.
      if (profile.kind !== 'intermediate') this.templates.set(key, t);
    }
    return t;
  }

  private result(ca: IssuingCa, fields: pkix.TemplateFields, certDer: Buffer, notBefore: Date): IssuedCertificate {
    return {
      issuer: ca.name,
      pem: pkix.toPem(certDer, 'CERTIFICATE'),
      der: certDer,
      serial: fields.serial.toString('hex').toUpperCase(),
      fingerprint256: fingerprint(certDer),
      notBefore: truncateToSeconds(notBefore),
      notAfter: truncateToSeconds(fields.notAfter),
      chain: ca.name === 'root' ? [this.root.pem] : [ca.pem, this.root.pem],
    };
  }

  bundle(): CaBundle {
    return { root: this.root.pem, deviceCa: this.deviceCa.pem, infraCa: this.infraCa.pem, edgeIssuer: this.edgeIssuer.pem };
  }
}

const crlUrlOf = (base: string | undefined, name: CaName) => (base ? `${base.replace(/\/+$/, '')}/v1/crl/${name}.crl` : undefined);

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
  getCaMaterial(): Promise<Array<{ name: CaName; certPem: string; keyPem: string }>>;
  insertCaMaterialIfAbsent(rows: Array<{ name: CaName; certPem: string; keyPem: string; createdAt: number }>): Promise<boolean>;
}

type CaFileSet = Array<{ name: CaName; certPem: string; keyPem: string }>;

/**
 * The PEM files of a complete file CA in `dir`, as they are (keys stay encrypted; an offline
 * root's key is '', and so is the key of a CA in `keysElsewhere`); null if incomplete.
 */
function readCaFiles(dir: string, keysElsewhere: CaName[] = []): CaFileSet | null {
  const paths = CA_NAMES.map((name) => ({ name, cert: join(dir, `${name}.crt.pem`), key: join(dir, `${name}.key.pem`), elsewhere: keysElsewhere.includes(name) }));
  if (!paths.every((p) => existsSync(p.cert) && (p.name === 'root' || p.elsewhere || existsSync(p.key)))) return null;
  return paths.map((p) => ({ name: p.name, certPem: readFileSync(p.cert, 'utf8'), keyPem: !p.elsewhere && existsSync(p.key) ? readFileSync(p.key, 'utf8') : '' }));
}

/**
 * A new root and its intermediates, in memory, keys encrypted as the files would hold them;
 * with `deviceKey`, the device CA is made for that key (signed by the new root) and its row's key is ''.
 */
async function generateSet(passphrase: string, org: string, now: Date, crlBaseUrl?: string, deviceKey?: CaKey): Promise<CaFileSet> {
  const root = createCa('root', null, `${org} Root CA`, { kind: 'root' }, now, 20, undefined);
  const rootUrl = crlUrlOf(crlBaseUrl, 'root');
  const cas: IssuingCa[] = [root];
  for (const i of INTERMEDIATES) {
    cas.push(i.name === 'device-ca' && deviceKey ? await createCaWithKey(i.name, deviceKey, root, `${org} ${i.cn}`, i.profile, now, 10, rootUrl) : createCa(i.name, root, `${org} ${i.cn}`, i.profile, now, 10, rootUrl));
  }
  return cas.map((c) => ({ name: c.name, certPem: c.pem, keyPem: c.privateKey ? encryptPkcs8Scrypt(c.privateKey, passphrase) : '' }));
}

function parseCert(pem: string, where: string): X509Certificate {
  try {
    return new X509Certificate(pem);
  } catch (err) {
    throw new LeafgateError('internal', `${where} is not a certificate`, { cause: err });
  }
}

function decryptKey(keyPem: string, passphrase: string, where: string): KeyObject {
  try {
    return createPrivateKey({ key: keyPem, format: 'pem', passphrase });
  } catch (err) {
    throw new LeafgateError('internal', `cannot decrypt ${where}: wrong CA passphrase?`, { cause: err });
  }
}

function describe(name: CaName, certificate: X509Certificate, pem: string): Omit<IssuingCa, 'privateKey' | 'key'> {
  return {
    name, certificate, pem, subjectDer: subjectDerOf(certificate.raw), keyId: keyIdentifier(certificate.publicKey.export({ type: 'spki', format: 'der' })),
    notAfter: new Date(certificate.validTo), serial: certificate.serialNumber.toUpperCase(),
  };
}

/** The root from its certificate, with its key when online (null: kept offline). */
function rootFromPem(pem: string, keyPem: string | null, passphrase: string, where: string): RootCa {
  const certificate = parseCert(pem, where);
  if (!keyPem) return { ...describe('root', certificate, pem), privateKey: null, key: null };
  const privateKey = decryptKey(keyPem, passphrase, where);
  if (!certificate.checkPrivateKey(privateKey)) throw new LeafgateError('internal', `the root key does not match ${where}`);
  return { ...describe('root', certificate, pem), privateKey, key: new FileCaKey(privateKey) };
}

/** One CA from its certificate and encrypted key; checks the key matches and the chain to `issuer`. */
function fromPem(name: CaName, pem: string, keyPem: string, passphrase: string, issuer: RootCa | null, where: string, certWhere = where): IssuingCa {
  const privateKey = decryptKey(keyPem, passphrase, where);
  const certificate = parseCert(pem, certWhere);
  if (!certificate.checkPrivateKey(privateKey)) throw new LeafgateError('internal', `${where} does not match ${certWhere}`);
  checkIssuedBy(certificate, issuer, certWhere);
  return { ...describe(name, certificate, pem), privateKey, key: new FileCaKey(privateKey) };
}

// An issuing CA that does not chain to the current root (e.g. the root was regenerated)
// would make every issued chain invalid without a word: refuse to start instead.
function checkIssuedBy(certificate: X509Certificate, issuer: RootCa | null, where: string): void {
  if (issuer && !(certificate.checkIssued(issuer.certificate) && certificate.verify(issuer.certificate.publicKey))) {
    throw new LeafgateError('internal', `${where} is not issued by the current root: restore the root or remove the issuing CAs`);
  }
}

/** The fields of a new CA certificate but its issuer: fresh serial, validity within the issuer's. */
function caCertificateFields(spkiDer: Buffer, issuer: RootCa | null, commonName: string, profile: CertificateProfile, now: Date, years: number) {
  const notAfter = new Date(now);
  notAfter.setUTCFullYear(notAfter.getUTCFullYear() + years);
  return {
    serial: newSerial(),
    subjectDer: pkix.encodeName(commonName),
    spkiDer,
    notBefore: new Date(now.getTime() - BACKDATE_MS),
    notAfter: issuer ? minDate(notAfter, issuer.notAfter) : notAfter,
    profile,
    keyId: keyIdentifier(spkiDer),
  };
}

/** A new CA: self-signed root when `issuer` is null, else an intermediate the root signs. */
function createCa(name: CaName, issuer: RootCa | null, commonName: string, profile: CertificateProfile, now: Date, years: number, crlUrl: string | undefined): IssuingCa {
  if (issuer && !issuer.privateKey) {
    throw new LeafgateError('internal', `the ${name} CA is missing and the root key is offline: run \`leafgate authority init\` where root.key.pem is, then copy the new CA files here`);
  }
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const { keyId, ...fields } = caCertificateFields(publicKey.export({ type: 'spki', format: 'der' }), issuer, commonName, profile, now, years);
  const der = encodeCertificate({
    ...fields,
    issuer: issuer ? { subjectDer: issuer.subjectDer, keyId: issuer.keyId, privateKey: issuer.privateKey!, crlUrl } : { subjectDer: fields.subjectDer, keyId, privateKey },
  });
  const pem = pkix.toPem(der, 'CERTIFICATE');
  return { ...describe(name, new X509Certificate(der), pem), privateKey, key: new FileCaKey(privateKey) };
}

/** A new CA whose key is a CaKey (an HSM): self-signed through it when `issuer` is null, else signed through the root's. */
async function createCaWithKey(name: CaName, key: CaKey, issuer: RootCa | null, commonName: string, profile: CertificateProfile, now: Date, years: number, crlUrl: string | undefined): Promise<IssuingCa> {
  if (issuer && !issuer.key) throw new LeafgateError('internal', `the ${name} CA is missing and the root key is offline`);
  const { keyId, ...fields } = caCertificateFields(key.publicKey.export({ type: 'spki', format: 'der' }), issuer, commonName, profile, now, years);
  const der = await encodeCertificateAsync({
    ...fields,
    issuer: issuer ? { subjectDer: issuer.subjectDer, keyId: issuer.keyId, signer: issuer.key!, crlUrl } : { subjectDer: fields.subjectDer, keyId, signer: key },
  });
  const pem = pkix.toPem(der, 'CERTIFICATE');
  const certificate = new X509Certificate(der);
  // What the token signed is checked once here: a signer that answers garbage never makes a CA.
  if (!certificate.verify(issuer ? issuer.certificate.publicKey : key.publicKey)) throw new LeafgateError('internal', `the ${name} certificate signed through ${(issuer?.key ?? key).description} does not verify`);
  return { ...describe(name, certificate, pem), privateKey: null, key };
}

/**
 * The encrypted file key of one CA, for LocalCa.openWithKeys when the other CAs' keys live
 * elsewhere (the device CA's in Key Vault): `<dir>/<name>.key.pem` decrypted as LocalCa.open
 * does. A root whose certificate is there without its key is kept offline (null). With
 * `create` (`authority init`), a key that is missing along with its certificate is generated
 * (EC P-256) and written encrypted, before openWithKeys writes the certificate -- the order
 * LocalCa.open keeps: a crash between the two leaves a key without a certificate, never the
 * reverse. Without `create` a missing key stops the start with what to do.
 */
export function openFileCaKey(dir: string, name: CaName, passphrase: string, opts: { create?: boolean } = {}): FileCaKey | null {
  checkPassphrase(passphrase);
  const keyPath = join(dir, `${name}.key.pem`);
  const certPath = join(dir, `${name}.crt.pem`);
  if (existsSync(keyPath)) return new FileCaKey(decryptKey(readFileSync(keyPath, 'utf8'), passphrase, keyPath));
  if (existsSync(certPath)) {
    if (name === 'root') return null;
    throw new LeafgateError('internal', `${keyPath} is missing (its certificate ${certPath} is there): restore the key file, or move the certificate away and run \`leafgate authority init\` to make a new ${name}`);
  }
  if (!opts.create) throw new LeafgateError('internal', `${certPath} is missing: run \`leafgate authority init\` with the same key store first`);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  writeFileSync(keyPath, encryptPkcs8Scrypt(privateKey, passphrase), { mode: 0o600 });
  chmodSync(keyPath, 0o600);
  return new FileCaKey(privateKey);
}

function sameKey(a: KeyObject, b: KeyObject): boolean {
  return a.export({ type: 'spki', format: 'der' }).equals(b.export({ type: 'spki', format: 'der' }));
}

function loadOrCreate(dir: string, name: CaName, passphrase: string, parent: RootCa | null, commonName: string, profile: CertificateProfile, now: Date, years: number, crlUrl: string | undefined): IssuingCa {
  const certPath = join(dir, `${name}.crt.pem`);
  const keyPath = join(dir, `${name}.key.pem`);
  if (existsSync(certPath) && existsSync(keyPath)) {
    return fromPem(name, readFileSync(certPath, 'utf8'), readFileSync(keyPath, 'utf8'), passphrase, parent, keyPath, certPath);
  }
  const ca = createCa(name, parent, commonName, profile, now, years, crlUrl);
  // Key first: a crash between the two writes leaves a key without a cert, which the next
  // start overwrites, never a cert whose key is lost.
  writeFileSync(keyPath, encryptPkcs8Scrypt(ca.privateKey!, passphrase), { mode: 0o600 });
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
