/**
 * A minimal enterprise CA behind EST (RFC 7030), for the EST connector's tests: node https on
 * port 0, and the `openssl` CLI for everything a CA does. It shares no code with leafgate's
 * issuing path: its CA hierarchy (root + issuing CA) is made by `openssl req`/`openssl x509`
 * in a temp directory, a device certificate is `openssl x509 -req -copy_extensions copy`
 * under the issuing CA, and an answer is `openssl crl2pkcs7 -nocrl -certfile` in base64.
 *
 *   POST /.well-known/est[/label]/simpleenroll | simplereenroll   (application/pkcs10, base64)
 *     200 application/pkcs7-mime; smime-type=certs-only, base64 (RFC 7030 4.2.3)
 *   GET  /.well-known/est[/label]/cacerts                          (RFC 7030 4.1.3)
 *
 * The client must authenticate as the server is told: a TLS client certificate from the
 * server's TLS CA, HTTP Basic, either or both. A test can make it refuse, answer 202 with
 * Retry-After (manual approval pending), answer garbage, sign another key's CSR or sign with a
 * CA outside the configured chain, and stop and start it on the same port.
 */
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { randomBytes } from 'node:crypto';
import assert from 'node:assert/strict';
import { LeafgateError, pkix } from '../../protocol/index.ts';
import type { IssueRequest } from '../../authority/ca/index.ts';

const run = promisify(execFile);
const OPENSSL = '/usr/bin/openssl';

export type EstAuth = 'cert' | 'basic' | 'either' | 'both';

/** What the next enrollments get. `issue` is the normal behaviour. */
export type EstMode =
  | { kind: 'issue' }
  | { kind: 'refuse'; status: number; text: string }
  | { kind: 'pending'; retryAfterSeconds: number }
  | { kind: 'garbage' }
  /** Answers exactly this (a 200 with another content type, base64 that is not PKCS#7, ...). */
  | { kind: 'raw'; status: number; contentType: string; body: string }
  /** Signs with these extensions (an openssl extfile) instead of the device profile. */
  | { kind: 'extensions'; ext: string }
  /** Signs a CSR of a key the server makes itself: a certificate for another key. */
  | { kind: 'other-key' }
  /** Signs with a CA of the same name that is not in the chain leafgate was given. */
  | { kind: 'rogue-ca' }
  /** Signs with this subject instead of the CSR's. */
  | { kind: 'subject'; subject: string }
  /** Signs with this serial number (openssl -set_serial: decimal, 0x hex, or negative). */
  | { kind: 'serial'; serial: string };

export interface EstRequestLog {
  path: string;
  operation: string;
  auth: { cert: boolean; basic: string | null };
  status: number;
  /** Serial of the certificate answered, if one was. */
  serial?: string;
}

export interface EstServerOptions {
  auth?: EstAuth;
  username?: string;
  password?: string;
  /** Lifetime of the device certificates it signs (days). */
  days?: number;
  /** Label the server serves (`/.well-known/est/<label>/...`); none: the bare path. */
  label?: string;
}

async function openssl(cwd: string, args: string[]): Promise<string> {
  try {
    return (await run(OPENSSL, args, { cwd, encoding: 'utf8' })).stdout;
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`openssl ${args.join(' ')}: ${e.stderr || e.message}`);
  }
}

const EC = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];

/** A CA certificate signed by `parent` (or self-signed) with openssl. */
async function makeCa(dir: string, name: string, subject: string, parent?: string, pathlen = 0): Promise<void> {
  writeFileSync(join(dir, `${name}.ext`), `basicConstraints=critical,CA:TRUE${parent ? `,pathlen:${pathlen}` : ''}\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\nsubjectKeyIdentifier=hash\n${parent ? 'authorityKeyIdentifier=keyid\n' : ''}`);
  if (!parent) {
    await openssl(dir, ['req', '-x509', ...EC, '-keyout', `${name}.key`, '-subj', subject, '-days', '3650', '-out', `${name}.pem`, '-extensions', 'v3', '-config', await minimalConfig(dir, name)]);
    return;
  }
  await openssl(dir, ['req', '-new', ...EC, '-keyout', `${name}.key`, '-subj', subject, '-out', `${name}.csr`]);
  await openssl(dir, ['x509', '-req', '-in', `${name}.csr`, '-CA', `${parent}.pem`, '-CAkey', `${parent}.key`, '-days', '3000', '-extfile', `${name}.ext`, '-out', `${name}.pem`]);
}

/** `openssl req -x509` reads its extensions from a config section. */
async function minimalConfig(dir: string, name: string): Promise<string> {
  const file = `${name}.cnf`;
  writeFileSync(join(dir, file), `[req]\ndistinguished_name=dn\n[dn]\n[v3]\n${readFileSync(join(dir, `${name}.ext`), 'utf8')}`);
  return file;
}

/** A TLS leaf (server or client) under `ca`. */
async function makeLeaf(dir: string, name: string, subject: string, ca: string, ext: string): Promise<void> {
  writeFileSync(join(dir, `${name}.ext`), ext);
  await openssl(dir, ['req', '-new', ...EC, '-keyout', `${name}.key`, '-subj', subject, '-out', `${name}.csr`]);
  await openssl(dir, ['x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}.pem`, '-CAkey', `${ca}.key`, '-days', '30', '-extfile', `${name}.ext`, '-out', `${name}.pem`]);
}

export class TestEstServer {
  readonly dir: string;
  /** The enterprise issuing CA then its root (PEM): what leafgate is configured with (caChainFile). */
  readonly chainFile: string;
  /** The EST server's TLS trust anchor (serverCaFile). */
  readonly serverCaFile: string;
  /** A client certificate and key for leafgate (the RA), issued by the server's TLS CA. */
  readonly clientCertFile: string;
  readonly clientKeyFile: string;
  /** A client certificate from another CA: refused. */
  readonly strangerCertFile: string;
  readonly strangerKeyFile: string;
  readonly username: string;
  /** Written to a file for leafgate's passwordFile. */
  readonly passwordFile: string;
  readonly requests: EstRequestLog[] = [];
  /** Serial (upper-case hex) of every certificate the CA signed, in order (including ones whose answer never arrived). */
  readonly issued: string[] = [];
  mode: EstMode = { kind: 'issue' };
  /**
   * When true, the next enrollment is signed and then the connection is destroyed before the
   * answer: "the CA issued, the answer was lost".
   */
  dropNextAnswer = false;
  /**
   * When set, a signed enrollment is answered only once this many certificates have been
   * signed, releaseHeld() is called, or after `holdMaxMs`: makes two requests overlap at the
   * CA, as a race would, or keeps one waiting.
   */
  holdAnswersUntil: number | undefined;
  holdMaxMs = 15_000;
  private readonly signedWaiters: Array<() => void> = [];
  /** Answers held by holdAnswersUntil go out now; later ones are not held. */
  releaseHeld(): void {
    this.holdAnswersUntil = undefined;
    for (const w of this.signedWaiters.splice(0)) w();
  }

  /** Resolves once `n` certificates have been signed (bounded by `withinMs`). */
  async waitForIssued(n: number, withinMs = 60_000): Promise<void> {
    const deadline = Date.now() + withinMs;
    while (this.issued.length < n) {
      if (Date.now() >= deadline) throw new Error(`the test EST server signed ${this.issued.length} certificates, not ${n}, within ${withinMs} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.max(1, deadline - Date.now()));
        this.signedWaiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  /** Lifetime of the certificates it signs from now on (days). */
  days: number;
  private server: Server;
  private readonly sockets = new Set<Socket>();
  private port = 0;
  private readonly password: string;

  private constructor(dir: string, private readonly opts: Required<Omit<EstServerOptions, 'label'>> & { label?: string }) {
    this.dir = dir;
    this.chainFile = join(dir, 'chain.pem');
    this.serverCaFile = join(dir, 'tls-ca.pem');
    this.clientCertFile = join(dir, 'ra.pem');
    this.clientKeyFile = join(dir, 'ra.key');
    this.strangerCertFile = join(dir, 'stranger.pem');
    this.strangerKeyFile = join(dir, 'stranger.key');
    this.username = opts.username;
    this.password = opts.password;
    this.days = opts.days;
    this.passwordFile = join(dir, 'est-password');
    writeFileSync(this.passwordFile, opts.password + '\n', { mode: 0o600 });
    this.server = this.makeServer();
  }

  /** Makes the PKI with openssl and listens on 127.0.0.1, port 0. */
  static async start(opts: EstServerOptions = {}): Promise<TestEstServer> {
    const dir = mkdtempSync(join(tmpdir(), 'leafgate-est-ca-'));
    try {
      await makeCa(dir, 'root', '/O=Enterprise/CN=Enterprise Root CA', undefined);
      await makeCa(dir, 'issuing', '/O=Enterprise/CN=Enterprise Device Issuing CA', 'root');
      // Same name, other key, own root: what "not chaining to the configured chain" looks like.
      await makeCa(dir, 'rogue-root', '/O=Enterprise/CN=Enterprise Root CA', undefined);
      await makeCa(dir, 'rogue', '/O=Enterprise/CN=Enterprise Device Issuing CA', 'rogue-root');
      await makeCa(dir, 'tls-ca', '/CN=EST TLS CA', undefined);
      await makeCa(dir, 'other-tls-ca', '/CN=Other TLS CA', undefined);
      await makeLeaf(dir, 'server', '/CN=localhost', 'tls-ca', 'basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n');
      await makeLeaf(dir, 'ra', '/CN=leafgate-ra', 'tls-ca', 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n');
      await makeLeaf(dir, 'stranger', '/CN=leafgate-ra', 'other-tls-ca', 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n');
      writeFileSync(join(dir, 'device.ext'), 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n');
      writeFileSync(join(dir, 'chain.pem'), readFileSync(join(dir, 'issuing.pem'), 'utf8') + readFileSync(join(dir, 'root.pem'), 'utf8'));
      const s = new TestEstServer(dir, { auth: opts.auth ?? 'either', username: opts.username ?? 'leafgate', password: opts.password ?? randomBytes(12).toString('base64url'), days: opts.days ?? 30, label: opts.label });
      await s.listen();
      return s;
    } catch (err) {
      rmSync(dir, { recursive: true, force: true });
      throw err;
    }
  }

  get url(): string {
    return `https://127.0.0.1:${this.port}`;
  }

  /** PEM of the enterprise issuing CA and root. */
  get chainPem(): string {
    return readFileSync(this.chainFile, 'utf8');
  }

  private makeServer(): Server {
    const server = createServer({
      key: readFileSync(join(this.dir, 'server.key')), cert: readFileSync(join(this.dir, 'server.pem')),
      ca: readFileSync(join(this.dir, 'tls-ca.pem')), requestCert: true, rejectUnauthorized: false,
    }, (req, res) => void this.handle(req, res).catch((err: Error) => {
      if (!res.headersSent) res.writeHead(500, { 'content-type': 'text/plain' });
      res.end(`test EST server failed: ${err.message}`);
    }));
    server.on('connection', (s: Socket) => {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
    });
    server.on('tlsClientError', () => undefined);
    return server;
  }

  private listen(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen({ host: '127.0.0.1', port: this.port }, () => {
        this.server.off('error', reject);
        this.port = (this.server.address() as { port: number }).port;
        resolve();
      });
    });
  }

  /** Closes the listener and every open connection (the port is free until start()). */
  async stop(): Promise<void> {
    if (!this.server.listening) return;
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const s of this.sockets) s.destroy();
    await closed;
  }

  /** Listens again on the port the first listen got. */
  async restart(): Promise<void> {
    this.server = this.makeServer();
    await this.listen();
  }

  async close(): Promise<void> {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** Requests that reached an enrollment operation. */
  enrollments(operation?: 'simpleenroll' | 'simplereenroll'): EstRequestLog[] {
    return this.requests.filter((r) => (operation ? r.operation === operation : r.operation !== 'cacerts'));
  }

  private authOf(req: IncomingMessage): EstRequestLog['auth'] {
    const sock = req.socket as TLSSocket;
    const cert = sock.authorized === true && !!sock.getPeerCertificate()?.raw;
    const header = req.headers.authorization ?? '';
    let basic: string | null = null;
    if (header.startsWith('Basic ')) {
      const [user, ...rest] = Buffer.from(header.slice(6), 'base64').toString('utf8').split(':');
      if (user === this.username && rest.join(':') === this.password) basic = user;
    }
    return { cert, basic };
  }

  private authorized(a: EstRequestLog['auth']): boolean {
    switch (this.opts.auth) {
      case 'cert': return a.cert;
      case 'basic': return a.basic !== null;
      case 'both': return a.cert && a.basic !== null;
      default: return a.cert || a.basic !== null;
    }
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const base = `/.well-known/est${this.opts.label ? `/${this.opts.label}` : ''}/`;
    const url = req.url ?? '';
    const operation = url.startsWith(base) ? url.slice(base.length) : '';
    const log: EstRequestLog = { path: url, operation, auth: this.authOf(req), status: 0 };
    this.requests.push(log);
    const body = await new Promise<Buffer>((resolve, reject) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => resolve(Buffer.concat(chunks)));
      req.on('error', reject);
    });
    const text = (status: number, message: string, headers: Record<string, string> = {}) => {
      log.status = status;
      res.writeHead(status, { 'content-type': 'text/plain; charset=utf-8', ...headers });
      res.end(message);
    };
    if (operation === 'cacerts' && req.method === 'GET') return this.certsOnly(res, log, [join(this.dir, 'issuing.pem'), join(this.dir, 'root.pem')]);
    if (operation !== 'simpleenroll' && operation !== 'simplereenroll') return text(404, 'no such EST operation');
    if (req.method !== 'POST') return text(405, 'POST only');
    // RFC 7030 3.2.3: 401 with a WWW-Authenticate challenge when HTTP authentication is wanted.
    if (!this.authorized(log.auth)) return text(401, 'authentication required', { 'www-authenticate': 'Basic realm="est"' });
    if (!/^application\/pkcs10\b/i.test(req.headers['content-type'] ?? '')) return text(415, 'Content-Type must be application/pkcs10');
    const mode = this.mode;
    if (mode.kind === 'refuse') return text(mode.status, mode.text);
    if (mode.kind === 'pending') return text(202, 'request is pending manual approval', { 'retry-after': String(mode.retryAfterSeconds) });
    if (mode.kind === 'raw') {
      log.status = mode.status;
      res.writeHead(mode.status, { 'content-type': mode.contentType });
      res.end(mode.body);
      return;
    }
    if (mode.kind === 'garbage') {
      log.status = 200;
      res.writeHead(200, { 'content-type': 'application/pkcs7-mime; smime-type=certs-only', 'content-transfer-encoding': 'base64' });
      res.end('this is !!! not base64 PKCS#7\n');
      return;
    }
    const work = mkdtempSync(join(this.dir, 'req-'));
    try {
      const csrDer = Buffer.from(body.toString('ascii').replace(/\s+/g, ''), 'base64');
      writeFileSync(join(work, 'csr.der'), csrDer);
      // Any CSR must be well formed and self-signed, also when the test swaps it below.
      await openssl(work, ['req', '-inform', 'DER', '-in', 'csr.der', '-verify', '-noout']).catch(() => {
        throw Object.assign(new Error('bad CSR'), { status: 400 });
      });
      let csrFile = 'csr.der';
      if (mode.kind === 'other-key') {
        const subject = (await openssl(work, ['req', '-inform', 'DER', '-in', 'csr.der', '-noout', '-subject', '-nameopt', 'compat'])).replace(/^subject=/, '').trim();
        await openssl(work, ['req', '-new', ...EC, '-keyout', 'other.key', '-subj', subject, '-outform', 'DER', '-out', 'other.der']);
        csrFile = 'other.der';
      }
      const ca = mode.kind === 'rogue-ca' ? 'rogue' : 'issuing';
      let ext = join(this.dir, 'device.ext');
      if (mode.kind === 'extensions') {
        ext = join(work, 'custom.ext');
        writeFileSync(ext, mode.ext);
      }
      const args = ['x509', '-req', '-inform', 'DER', '-in', csrFile, '-CA', join(this.dir, `${ca}.pem`), '-CAkey', join(this.dir, `${ca}.key`), '-days', String(this.days),
        '-copy_extensions', 'copy', '-extfile', ext, '-out', 'cert.pem'];
      if (mode.kind === 'subject') args.push('-subj', mode.subject);
      if (mode.kind === 'serial') args.push('-set_serial', mode.serial);
      await openssl(work, args);
      const serial = (await openssl(work, ['x509', '-in', 'cert.pem', '-noout', '-serial'])).replace(/^serial=/, '').trim().toUpperCase();
      this.issued.push(serial);
      log.serial = serial;
      for (const w of this.signedWaiters.splice(0)) w();
      if (this.holdAnswersUntil !== undefined) {
        const deadline = Date.now() + this.holdMaxMs;
        while (this.holdAnswersUntil !== undefined && this.issued.length < this.holdAnswersUntil && Date.now() < deadline) {
          await new Promise<void>((resolve) => {
            const timer = setTimeout(resolve, Math.max(1, deadline - Date.now()));
            this.signedWaiters.push(() => {
              clearTimeout(timer);
              resolve();
            });
          });
        }
      }
      if (this.dropNextAnswer) {
        this.dropNextAnswer = false;
        log.status = -1;
        req.socket.destroy();
        return;
      }
      await this.certsOnly(res, log, [join(work, 'cert.pem')]);
    } catch (err) {
      const status = (err as { status?: number }).status;
      if (status) return text(status, (err as Error).message);
      throw err;
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
  }

  /** RFC 7030 4.2.3: certs-only PKCS#7 by `openssl crl2pkcs7 -nocrl`, base64. */
  private async certsOnly(res: ServerResponse, log: EstRequestLog, files: string[]): Promise<void> {
    const pem = await openssl(this.dir, ['crl2pkcs7', '-nocrl', ...files.flatMap((f) => ['-certfile', f])]);
    const b64 = pem.replace(/-----(BEGIN|END) PKCS7-----/g, '').trim() + '\n';
    log.status = 200;
    res.writeHead(200, { 'content-type': 'application/pkcs7-mime; smime-type=certs-only', 'content-transfer-encoding': 'base64' });
    res.end(b64);
  }
}

/** The issue request the authority builds from a policy-checked device CSR: subject = the CN. */
export function estIssueRequest(csr: pkix.ParsedCsr, cn: string, validityDays: number): IssueRequest {
  const now = Date.now();
  return {
    subjectDer: pkix.encodeName(cn), spkiDer: csr.spkiDer, profile: { kind: 'device', keyType: 'ec' }, sans: { dns: csr.sans.dns, uri: csr.sans.uri },
    notBefore: new Date(now - 600_000), notAfter: new Date(now + validityDays * 86_400_000), csrDer: csr.der,
  };
}

/** The LeafgateError `p` rejects with; fails when it resolves or rejects with anything else. */
export async function refusal(p: Promise<unknown>): Promise<LeafgateError> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof LeafgateError, `a LeafgateError, got ${String(err)}`);
    return err;
  }
  assert.fail('expected a refusal');
}
