/**
 * Gateway enrollment, step-ca style: fetch the authority's CA bundle without trust, accept
 * it only if the root's SHA-256 fingerprint equals the one the operator was given, then
 * send the one-time token with a CSR over TLS verified against that root. The gateway key
 * is generated here and never leaves the gateway.
 */
import { X509Certificate, generateKeyPairSync } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { join } from 'node:path';
import { LeafgateError, pkix } from '../protocol/index.ts';
import { AuthorityClient } from './authority-client.ts';

export interface EnrollOptions {
  authorityUrl: string;
  token: string;
  /** Root fingerprint, as printed by the authority (colon-separated hex, case-insensitive). */
  rootFingerprint: string;
  gatewayId: string;
  dataDir: string;
  /** Names devices use to reach the gateway broker (SANs of its TLS certificate). */
  hostnames: string[];
}

export interface GatewayIdentityFiles {
  key: string;
  cert: string;
  root: string;
  deviceCa: string;
  infraCa: string;
  /** The external CA that signs device certificates (EST), issuing CA first; absent when the authority's device CA does. */
  externalDeviceChain: string;
  meta: string;
}

export function identityFiles(dataDir: string): GatewayIdentityFiles {
  return {
    key: join(dataDir, 'gateway.key.pem'),
    cert: join(dataDir, 'gateway.crt.pem'),
    root: join(dataDir, 'root-ca.pem'),
    deviceCa: join(dataDir, 'device-ca.pem'),
    infraCa: join(dataDir, 'infra-ca.pem'),
    externalDeviceChain: join(dataDir, 'external-device-chain.pem'),
    meta: join(dataDir, 'gateway.json'),
  };
}

const normalize = (fp: string) => fp.replace(/:/g, '').toUpperCase();

export async function enrollGateway(opts: EnrollOptions): Promise<{ certificate: string; notAfter: string }> {
  // The only unverified request: its answer is checked against the pinned fingerprint.
  const insecure = new AuthorityClient({ baseUrl: opts.authorityUrl, ca: '', verifyServer: false });
  let bundle: { root: string; deviceCa: string; infraCa: string };
  try {
    bundle = await insecure.get('/v1/ca');
  } finally {
    insecure.close();
  }
  const root = new X509Certificate(bundle.root);
  if (normalize(root.fingerprint256) !== normalize(opts.rootFingerprint)) {
    throw new LeafgateError('unknown_gateway', `authority root fingerprint ${root.fingerprint256} does not match the pinned ${opts.rootFingerprint}`);
  }
  // The rest of the bundle came over the same unverified connection: each CA must be the root's.
  for (const [name, pem] of [['device CA', bundle.deviceCa], ['infrastructure CA', bundle.infraCa]] as const) {
    const ca = typeof pem === 'string' ? new X509Certificate(pem) : null;
    if (!ca || !ca.ca || !ca.checkIssued(root) || !ca.verify(root.publicKey)) throw new LeafgateError('unknown_gateway', `the authority's ${name} is not issued by the pinned root`);
  }
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const csr = pkix.buildCsr({
    commonName: opts.gatewayId,
    sans: { dns: opts.hostnames.filter((h) => !isIP(h)), ip: opts.hostnames.filter((h) => isIP(h)) },
    privateKey,
    publicKey,
  });
  const client = new AuthorityClient({ baseUrl: opts.authorityUrl, ca: bundle.root, authorityIssuer: bundle.infraCa });
  let res: { certificate: string; chain: string[]; bundle: typeof bundle & { externalDeviceChain?: string[] }; notAfter: string };
  try {
    res = await client.post('/v1/gateways/enroll', { token: opts.token, csr });
  } finally {
    client.close();
  }
  const files = identityFiles(opts.dataDir);
  mkdirSync(opts.dataDir, { recursive: true, mode: 0o700 });
  writeFileSync(files.key, privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, { mode: 0o600 });
  // Leaf + issuing CA: what a TLS server must present so that devices can build the path.
  writeFileSync(files.cert, res.certificate + res.chain[0]);
  writeFileSync(files.root, bundle.root);
  writeFileSync(files.deviceCa, bundle.deviceCa);
  writeFileSync(files.infraCa, bundle.infraCa);
  // From the enrollment answer, which came over TLS verified against the pinned root (the
  // unverified /v1/ca answer is not trusted for it: nothing there can be checked against the pin).
  writeExternalDeviceChain(files, res.bundle?.externalDeviceChain);
  writeFileSync(files.meta, JSON.stringify({ gatewayId: opts.gatewayId, authorityUrl: opts.authorityUrl, enrolledAt: new Date().toISOString(), notAfter: res.notAfter }, null, 2));
  return { certificate: res.certificate, notAfter: res.notAfter };
}

/**
 * Keeps `external-device-chain.pem` equal to the authority's external device CA chain (EST):
 * written when there is one, removed when there is none. Returns whether the file changed.
 * Each PEM must parse as a CA certificate, or nothing is written.
 */
export function writeExternalDeviceChain(files: Pick<GatewayIdentityFiles, 'externalDeviceChain'>, chain: unknown): boolean {
  const pems = Array.isArray(chain) ? chain : [];
  const text = pems.length ? pems.map((p) => {
    const c = typeof p === 'string' ? new X509Certificate(p) : null;
    if (!c?.ca) throw new LeafgateError('internal', 'the authority\'s external device CA chain holds a certificate that is not a CA');
    return c.toString();
  }).join('') : '';
  const before = existsSync(files.externalDeviceChain) ? readFileSync(files.externalDeviceChain, 'utf8') : '';
  if (before === text) return false;
  if (text) {
    writeFileSync(`${files.externalDeviceChain}.tmp`, text);
    renameSync(`${files.externalDeviceChain}.tmp`, files.externalDeviceChain);
  } else rmSync(files.externalDeviceChain, { force: true });
  return true;
}
