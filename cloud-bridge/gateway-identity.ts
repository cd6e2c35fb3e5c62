/**
 * The gateway's own identity over time: its TLS/mTLS certificate is renewed before expiry
 * (new key each time, CSR over the current mTLS session) and swapped into the running
 * broker and authority client; optionally an intermediate CA for Azure IoT Edge (`[edge_ca]`)
 * whose key is generated here and never leaves the gateway, renewed the same way, and used
 * to issue server certificates locally (edgeHub).
 */
import { X509Certificate, createPrivateKey, generateKeyPairSync } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { LeafgateError, pkix } from '../protocol/index.ts';
import type { AuthorityClient } from './authority-client.ts';
import { identityFiles } from './enroll.ts';

/** Writes a file so that readers see the old or the new content, never a torn one. */
function writeAtomic(path: string, data: string, mode = 0o644): void {
  writeFileSync(`${path}.tmp`, data, { mode });
  renameSync(`${path}.tmp`, path);
}

export interface EdgeCaFiles {
  dir: string;
  key: string;
  cert: string;
  fullChain: string;
  trustBundle: string;
  configSnippet: string;
}

export function edgeCaFiles(dataDir: string): EdgeCaFiles {
  const dir = join(dataDir, 'edge-ca');
  return {
    dir,
    key: join(dir, 'edge-ca.key.pem'),
    cert: join(dir, 'edge-ca.cert.pem'),
    fullChain: join(dir, 'edge-ca-full-chain.cert.pem'),
    trustBundle: join(dir, 'trust-bundle.pem'),
    configSnippet: join(dir, 'config.toml.snippet'),
  };
}

/** True once `fraction` of the certificate's own lifetime has passed (or it is missing). */
export function isDue(certPem: string | null, fraction: number, now = Date.now()): boolean {
  if (!certPem) return true;
  const c = new X509Certificate(certPem);
  const from = new Date(c.validFrom).getTime();
  const to = new Date(c.validTo).getTime();
  return now >= from + (to - from) * fraction;
}

function sansOf(cert: X509Certificate): { dns: string[]; ip: string[] } {
  const out = { dns: [] as string[], ip: [] as string[] };
  for (const part of (cert.subjectAltName ?? '').split(', ')) {
    if (part.startsWith('DNS:')) out.dns.push(part.slice(4));
    else if (part.startsWith('IP Address:')) out.ip.push(part.slice(11));
  }
  return out;
}

export interface GatewayIdentityOptions {
  dataDir: string;
  gatewayId: string;
  authority: AuthorityClient;
  logger: Logger;
  renewAfterFraction: number;
  /** Keep an IoT Edge CA (Sub-CA) on this gateway. */
  edgeCa: boolean;
  checkMs: number;
  /** Called with the new key and certificate chain after a renewal. */
  onRotated(key: string, cert: string): void;
}

export class GatewayIdentity {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | null = null;

  constructor(private readonly opts: GatewayIdentityOptions) {}

  start(): void {
    void this.check();
    this.timer = setInterval(() => void this.check(), this.opts.checkMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  /** Renews what is due; failures are logged and retried at the next check. */
  check(): Promise<void> {
    this.running ??= (async () => {
      try {
        const files = identityFiles(this.opts.dataDir);
        if (isDue(readFileSync(files.cert, 'utf8'), this.opts.renewAfterFraction)) await this.renewCertificate();
        if (this.opts.edgeCa) {
          const edge = edgeCaFiles(this.opts.dataDir);
          if (isDue(existsSync(edge.cert) ? readFileSync(edge.cert, 'utf8') : null, this.opts.renewAfterFraction)) await this.renewEdgeCa();
        }
      } catch (err) {
        this.opts.logger.warn({ err: (err as Error).message }, 'gateway identity renewal failed; will retry');
      }
    })().finally(() => {
      this.running = null;
    });
    return this.running;
  }

  /** New key, same names, signed over the current mTLS session; files swapped atomically. */
  async renewCertificate(): Promise<void> {
    const files = identityFiles(this.opts.dataDir);
    const current = new X509Certificate(readFileSync(files.cert, 'utf8'));
    const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const csr = pkix.buildCsr({ commonName: this.opts.gatewayId, sans: sansOf(current), privateKey, publicKey });
    const res = await this.opts.authority.post<{ certificate: string; chain: string[]; notAfter: string }>('/v1/gateways/renew', { csr });
    const key = privateKey.export({ type: 'pkcs8', format: 'pem' }) as string;
    const chain = res.certificate + res.chain[0];
    // Both staged, then key, then cert: a crash between the renames leaves the new key with
    // the old cert and the new cert staged, which completeIdentitySwap() finishes at start.
    writeAtomic(`${files.key}.next`, key, 0o600);
    writeAtomic(`${files.cert}.next`, chain);
    renameSync(`${files.key}.next`, files.key);
    renameSync(`${files.cert}.next`, files.cert);
    this.opts.logger.info({ notAfter: res.notAfter, serial: new X509Certificate(res.certificate).serialNumber }, 'gateway certificate renewed');
    this.opts.onRotated(key, chain);
  }

  /** Generates the edge CA key here, has the authority sign it, writes the IoT Edge layout. */
  async renewEdgeCa(): Promise<void> {
    const edge = edgeCaFiles(this.opts.dataDir);
    mkdirSync(edge.dir, { recursive: true, mode: 0o700 });
    const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const csr = pkix.buildCsr({ commonName: `${this.opts.gatewayId} Edge CA`, privateKey, publicKey });
    const res = await this.opts.authority.post<{ certificate: string; chain: string[]; notAfter: string }>('/v1/gateways/subca', { csr });
    const root = res.chain[res.chain.length - 1];
    writeAtomic(edge.key, privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, 0o600);
    writeAtomic(edge.cert, res.certificate);
    writeAtomic(edge.fullChain, res.certificate + res.chain.join(''));
    writeAtomic(edge.trustBundle, root);
    writeAtomic(edge.configSnippet, edgeConfigSnippet(edge));
    this.opts.logger.info({ notAfter: res.notAfter }, 'edge CA (Sub-CA) issued');
  }
}

/** Finishes a certificate swap that a crash interrupted (see renewCertificate). */
export function completeIdentitySwap(dataDir: string): void {
  const files = identityFiles(dataDir);
  if (!existsSync(`${files.cert}.next`)) return;
  const key = createPrivateKey(readFileSync(existsSync(`${files.key}.next`) ? `${files.key}.next` : files.key, 'utf8'));
  const staged = new X509Certificate(readFileSync(`${files.cert}.next`, 'utf8'));
  if (staged.checkPrivateKey(key)) {
    if (existsSync(`${files.key}.next`)) renameSync(`${files.key}.next`, files.key);
    renameSync(`${files.cert}.next`, files.cert);
  }
}

/** The lines of IoT Edge's /etc/aziot/config.toml that point at these files. */
export function edgeConfigSnippet(edge: EdgeCaFiles): string {
  return [
    '# Azure IoT Edge 1.4+ /etc/aziot/config.toml -- then run: sudo iotedge config apply',
    `trust_bundle_cert = "file://${edge.trustBundle}"`,
    '',
    '[edge_ca]',
    `cert = "file://${edge.fullChain}"`,
    `pk = "file://${edge.key}"`,
    '',
  ].join('\n');
}

export interface ServerCertOptions {
  name: string;
  dns: string[];
  ip: string[];
  days: number;
  outDir: string;
}

/**
 * Issues a TLS server certificate (e.g. for edgeHub) with the local edge CA: no round trip
 * to the authority, chains to the authority's root through the Sub-CA.
 */
export function issueServerCertificate(dataDir: string, opts: ServerCertOptions): { key: string; cert: string; chain: string; serial: string; notAfter: string } {
  const edge = edgeCaFiles(dataDir);
  if (!existsSync(edge.key) || !existsSync(edge.cert)) throw new LeafgateError('not_found', 'no edge CA on this gateway: start it with edgeCa enabled (or run `leafgate gateway subca`) first');
  const caCert = new X509Certificate(readFileSync(edge.cert, 'utf8'));
  const caKey = createPrivateKey(readFileSync(edge.key, 'utf8'));
  const now = Date.now();
  const notAfter = Math.min(now + opts.days * 86_400_000, new Date(caCert.validTo).getTime());
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const serial = pkix.newSerial();
  const der = pkix.encodeCertificate({
    serial,
    subjectDer: pkix.encodeName(opts.name),
    spkiDer: publicKey.export({ type: 'spki', format: 'der' }),
    notBefore: new Date(now - 5 * 60_000),
    notAfter: new Date(notAfter),
    profile: { kind: 'server', keyType: 'ec' },
    sans: { dns: opts.dns.length ? opts.dns : [opts.name], ip: opts.ip },
    issuer: { subjectDer: pkix.subjectDerOf(caCert.raw), keyId: pkix.keyIdentifier(caCert.publicKey.export({ type: 'spki', format: 'der' })), privateKey: caKey },
  });
  const certPem = pkix.toPem(der, 'CERTIFICATE');
  mkdirSync(opts.outDir, { recursive: true, mode: 0o700 });
  const files = { key: join(opts.outDir, `${opts.name}.key.pem`), cert: join(opts.outDir, `${opts.name}.cert.pem`), chain: join(opts.outDir, `${opts.name}.full-chain.cert.pem`) };
  writeAtomic(files.key, privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, 0o600);
  writeAtomic(files.cert, certPem);
  writeAtomic(files.chain, certPem + readFileSync(edge.fullChain, 'utf8'));
  return { ...files, serial: serial.toString('hex').toUpperCase(), notAfter: new Date(notAfter).toISOString() };
}
