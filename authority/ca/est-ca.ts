/**
 * An external (enterprise) CA over EST (RFC 7030), leafgate acting as its registration
 * authority: device certificates are signed there, everything else (gateway identities, the
 * authority's TLS certificate, gateway Sub-CAs) stays on leafgate's own CA (`local`).
 *
 * For a device certificate, after leafgate's policy checked the device's CSR, the CSR itself
 * (the device's bytes: its self-signature is the device's proof of possession) is posted to
 *
 *   {url}/.well-known/est[/{label}]/simpleenroll     first issuance   (RFC 7030 4.2.1)
 *   {url}/.well-known/est[/{label}]/simplereenroll   renewal          (RFC 7030 4.2.2)
 *
 * as `application/pkcs10`, base64 (RFC 7030 4.2.1; RFC 8951 3: the body is base64 whatever
 * Content-Transfer-Encoding says), over TLS verified against `serverCaFile`, authenticated by
 * a TLS client certificate and/or HTTP Basic (RFC 7030 3.2.3; the password comes from a file
 * or the environment, never the configuration, the command line or a log line). The answer
 * (RFC 7030 4.2.3) is handled as a short list of named steps:
 *
 *   200 application/pkcs7-mime certs-only, base64 -> decode -> the certificate for the CSR's
 *       key -> issued by the configured issuing CA, chaining to the configured root ->
 *       an end-entity certificate for client authentication -> the subject and SANs leafgate's
 *       policy allowed -> a sane validity. Any step failing: `ca_refused`, nothing stored.
 *   202 + Retry-After (manual approval pending)  -> `authority_unavailable` with retryAfterMs:
 *       the gateway keeps the request queued and sends it again (RFC 7030 4.2.3: the client
 *       repeats the same request).
 *   4xx (but 401, 408, 429) and 500/501 with a text -> `ca_refused` (final).
 *   401, 408, 429, 502-504, no connection, a timeout -> `authority_unavailable` (queued, retried).
 *
 * Bounds per node: at most `maxConcurrent` calls in flight, each bounded as a whole by
 * `timeoutMs`, and a circuit breaker (`failureThreshold` consecutive failures: fail fast for
 * `retryAfterSeconds`, then one probe). The per-requestId claim that keeps two requests of one
 * requestId from both reaching the CA is taken by the caller (authority/onboarding.ts), which
 * also answers the gateway within `answerWithinMs` (`timing`).
 *
 * EST has no idempotency key: when the CA issued but its answer was lost (a reset or timeout
 * after the request was sent), the retry gets a second certificate for the same key. leafgate
 * stores and delivers only the one whose answer arrived; the error of the lost attempt says
 * `sent: true` in the audit log so the operator can find and revoke the orphan at the CA
 * (README "External CA over EST").
 */
import { X509Certificate, createPublicKey } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { Agent, request } from 'node:https';
import type { Logger } from 'pino';
import { LeafgateError, pkix } from '../../protocol/index.ts';
import { CLOCK_SKEW_TOLERANCE_MS, EXTERNAL_CA, fingerprint, type CaBundle, type CaConnector, type ExternalCaTiming, type IssueRequest, type IssuedCertificate, type IssuerRole } from './local-ca.ts';

export interface EstCaConfig {
  type: 'est';
  /** The EST server: https://host[:port] (the well-known path is appended). */
  url: string;
  /** The CA label (RFC 7030 3.2.2): `/.well-known/est/{label}/...`. */
  label?: string;
  /** PEM trust anchor(s) of the EST server's TLS certificate. */
  serverCaFile: string;
  /** PEM: the issuing CA that signs device certificates first, then up to its root. */
  caChainFile: string;
  clientCertFile?: string;
  clientKeyFile?: string;
  username?: string;
  passwordFile?: string;
  /** Environment variable holding the Basic password (default LEAFGATE_EST_PASSWORD when username is set and no passwordFile). */
  passwordEnv?: string;
  /** Longest one EST call may take, connection to last byte of the answer. */
  timeoutMs: number;
  /** retryAfterMs answered while the EST server cannot be reached; also how long the circuit breaker stays open. */
  retryAfterSeconds: number;
  /**
   * Longest the authority keeps a gateway's request waiting for the external CA: then it answers
   * `authority_unavailable` with retryAfterMs while the call goes on and its certificate is
   * stored for the retry. Below the gateway's request timeout (GATEWAY_AUTHORITY_TIMEOUT_MS).
   */
  answerWithinMs?: number;
  /** EST calls in flight at once from this node; one more is answered authority_unavailable. */
  maxConcurrent?: number;
  /** Consecutive connection failures / 502-504 answers that open the circuit breaker. */
  failureThreshold?: number;
}

export const EST_DEFAULTS = { timeoutMs: 30_000, retryAfterSeconds: 30, answerWithinMs: 10_000, maxConcurrent: 8, failureThreshold: 5 } as const;
/** How long a per-request claim outlives the EST call it guards (the commit after it; a slow clock). */
export const CLAIM_MARGIN_MS = 30_000;

export const DEFAULT_EST_PASSWORD_ENV = 'LEAFGATE_EST_PASSWORD';
/** An answer larger than this is not an enrollment answer. */
const MAX_ANSWER_BYTES = 256 * 1024;
/** Attributes an enterprise template may add next to the CN (O, OU, C, L, ST, DC); anything else is refused. */
const TOLERATED_SUBJECT_ATTRIBUTES = new Set(['2.5.4.10', '2.5.4.11', '2.5.4.6', '2.5.4.7', '2.5.4.8', '0.9.2342.19200300.100.1.25']);
/** How much longer than the policy's validity the CA's template may make a certificate. */
const VALIDITY_TOLERANCE_MS = 86_400_000;
/**
 * Extended key usages a device certificate may carry: client authentication (what it is for)
 * and server authentication (a template may add it; the names are still the policy's). Anything
 * else is a power over the enterprise's other relying parties: OCSPSigning makes the device a
 * delegated OCSP responder of the issuing CA (RFC 6960 4.2.2.2), codeSigning, timeStamping,
 * anyExtendedKeyUsage, ... are as far from a device's use.
 */
const DEVICE_EKUS: ReadonlySet<string> = new Set([pkix.OID.clientAuth, pkix.OID.serverAuth]);
/** keyUsage bits (RFC 5280 4.2.1.3) an end entity never has: keyCertSign (5), cRLSign (6). */
const ISSUER_KEY_USAGES = [{ bit: 5, name: 'keyCertSign' }, { bit: 6, name: 'cRLSign' }];

/** The keyUsage bits set in a KeyUsage BIT STRING (the extnValue's DER). */
function keyUsageBits(value: Buffer): Set<number> {
  const bits = pkix.der.decodeBitString(pkix.der.parseDer(value), false);
  const set = new Set<number>();
  for (let i = 0; i < bits.length * 8; i++) if (bits[i >> 3] & (0x80 >> (i & 7))) set.add(i);
  return set;
}

/** ExtKeyUsageSyntax ::= SEQUENCE OF KeyPurposeId (the extnValue's DER). */
function ekuOids(value: Buffer): string[] {
  return pkix.der.children(pkix.der.expectTag(pkix.der.parseDer(value), pkix.der.TAG.SEQUENCE, 'ExtKeyUsageSyntax')).map((n) => pkix.der.decodeOid(n));
}

/** What keyUsage / extendedKeyUsage ask for beyond a device certificate's purposes (empty: nothing). */
function purposeProblems(exts: Array<{ oid: string; value: Buffer }>): string[] {
  const problems: string[] = [];
  for (const e of exts) {
    if (e.oid === pkix.OID.extKeyUsage) {
      const ekus = ekuOids(e.value);
      const extra = ekus.filter((o) => !DEVICE_EKUS.has(o));
      if (extra.length) problems.push(`extended key usage ${extra.join(', ')} (a device certificate is for clientAuth, serverAuth only)`);
      // A certificate the gateways could not use would be refused after the CA made it.
      else if (!ekus.includes(pkix.OID.clientAuth)) problems.push('an extended key usage without clientAuth');
    }
    if (e.oid === pkix.OID.keyUsage) {
      const bits = keyUsageBits(e.value);
      const issuer = ISSUER_KEY_USAGES.filter((u) => bits.has(u.bit)).map((u) => u.name);
      if (issuer.length) problems.push(`key usage ${issuer.join(', ')} (a device is not an issuer)`);
    }
  }
  return problems;
}

/** The extensions of a certificate (its TBS [3]), values as DER. */
function certificateExtensions(certDer: Buffer): Array<{ oid: string; value: Buffer }> {
  const [tbs] = pkix.der.children(pkix.der.parseDer(certDer));
  const holder = pkix.der.children(tbs).find((n) => n.tag === 0xa3);
  if (!holder) return [];
  return pkix.readExtensions(pkix.der.children(holder)[0]).map((e) => ({ oid: e.oid, value: e.value.value }));
}

/**
 * The extensions a PKCS#10 CSR requests (its extensionRequest attribute), values as DER, and
 * the types of its other attributes.
 */
function csrAttributes(csrDer: Buffer): { extensions: Array<{ oid: string; value: Buffer }>; others: string[] } {
  const [info] = pkix.der.children(pkix.der.parseDer(csrDer));
  const attrs = pkix.der.children(info).find((n) => n.tag === 0xa0);
  const extensions: Array<{ oid: string; value: Buffer }> = [];
  const others: string[] = [];
  for (const attr of attrs ? pkix.der.children(attrs) : []) {
    const [type, values] = pkix.der.children(attr);
    const oid = pkix.der.decodeOid(type);
    if (oid !== pkix.OID.extensionRequest) {
      others.push(oid);
      continue;
    }
    for (const v of pkix.der.children(values)) extensions.push(...pkix.readExtensions(v).map((e) => ({ oid: e.oid, value: e.value.value })));
  }
  return { extensions, others };
}

/** The Basic password: the file's first line, or the environment variable. Never the configuration. */
export function readEstPassword(config: Pick<EstCaConfig, 'username' | 'passwordFile' | 'passwordEnv'>, env: NodeJS.ProcessEnv = process.env): string | undefined {
  if (config.username === undefined) return undefined;
  if (config.passwordFile) {
    let first: string;
    try {
      first = readFileSync(config.passwordFile, 'utf8').split(/\r?\n/)[0];
    } catch (err) {
      throw new LeafgateError('internal', `deviceIssuer.passwordFile ${config.passwordFile} cannot be read: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
    // An empty file (a secret not mounted yet) would be sent as an empty Basic password.
    if (!first) throw new LeafgateError('internal', `deviceIssuer.passwordFile ${config.passwordFile} is empty: its first line is the password`);
    return first;
  }
  const name = config.passwordEnv ?? DEFAULT_EST_PASSWORD_ENV;
  const v = env[name];
  if (!v) throw new LeafgateError('internal', `deviceIssuer.username is set but no password: set ${name} or deviceIssuer.passwordFile`);
  return v;
}

function readPemFile(path: string, what: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (err) {
    throw new LeafgateError('internal', `deviceIssuer.${what} ${path} cannot be read: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

/** A raw EST answer. */
interface EstAnswer {
  status: number;
  contentType: string;
  retryAfter: string | undefined;
  body: Buffer;
}

/** Why a call did not get an answer, and whether the request had been sent in full. */
class EstTransportError extends Error {
  constructor(message: string, readonly sent: boolean, readonly tls: boolean) {
    super(message);
  }
}

export class EstCa implements CaConnector {
  readonly name = 'est';
  readonly external = true;
  /** The configured chain, issuing CA first. */
  readonly chain: X509Certificate[];
  readonly chainPem: string[];
  private readonly agent: Agent;
  private readonly authorization: string | undefined;
  private readonly base: string;
  readonly timing: ExternalCaTiming;
  /** EST enrollment calls in flight from this node. */
  private inFlight = 0;
  /** Consecutive failures (no connection, no answer, 502-504); at failureThreshold the breaker is open. */
  private failures = 0;
  private openUntil = 0;
  /** A probe is out while the breaker is half open (one call, the others fail fast). */
  private probing = false;

  /**
   * `local` signs everything but device certificates and provides the trust bundle.
   * Reads the files and the password now, so a misconfiguration stops the start.
   */
  constructor(
    private readonly config: EstCaConfig,
    private readonly local: CaConnector,
    private readonly opts: { env?: NodeJS.ProcessEnv; logger?: Logger; now?: () => number } = {},
  ) {
    // Credentials in the URL would be sent as Basic by node and printed in every log line (`url`).
    if (/^[a-z]+:\/\/[^/?#]*@/i.test(config.url)) throw new LeafgateError('internal', 'deviceIssuer.url must not carry a user or password: use username with passwordFile or passwordEnv');
    const chainText = readPemFile(config.caChainFile, 'caChainFile');
    this.chain = pkix.parseCertificates(chainText);
    if (!this.chain.length) throw new LeafgateError('internal', `deviceIssuer.caChainFile ${config.caChainFile} holds no certificate`);
    this.checkConfiguredChain();
    this.chainPem = this.chain.map((c) => c.toString());
    const serverCa = readPemFile(config.serverCaFile, 'serverCaFile');
    if ((config.clientCertFile === undefined) !== (config.clientKeyFile === undefined)) throw new LeafgateError('internal', 'deviceIssuer.clientCertFile and clientKeyFile go together');
    const password = readEstPassword(config, opts.env);
    if (config.username === undefined && config.clientCertFile === undefined) throw new LeafgateError('internal', 'deviceIssuer needs a client certificate (clientCertFile, clientKeyFile) or HTTP Basic (username + passwordFile or passwordEnv)');
    this.authorization = password !== undefined ? `Basic ${Buffer.from(`${config.username}:${password}`, 'utf8').toString('base64')}` : undefined;
    // One TLS connection per request: a connection the EST server closed meanwhile never turns a request into an "answer lost".
    this.agent = new Agent({
      keepAlive: false, ca: serverCa, minVersion: 'TLSv1.2',
      ...(config.clientCertFile ? { cert: readPemFile(config.clientCertFile, 'clientCertFile'), key: readPemFile(config.clientKeyFile!, 'clientKeyFile') } : {}),
    });
    this.base = `${config.url.replace(/\/+$/, '')}/.well-known/est${config.label ? `/${config.label}` : ''}`;
    const answerWithinMs = config.answerWithinMs ?? EST_DEFAULTS.answerWithinMs;
    this.timing = { claimTtlMs: config.timeoutMs + CLAIM_MARGIN_MS, answerWithinMs, busyRetryAfterMs: Math.max(1000, Math.min(config.retryAfterSeconds * 1000, answerWithinMs)) };
  }

  /** For metrics and tests: calls in flight, and whether the breaker is open. */
  state(): { inFlight: number; failures: number; open: boolean } {
    return { inFlight: this.inFlight, failures: this.failures, open: this.failures >= this.threshold() };
  }

  private threshold(): number {
    return this.config.failureThreshold ?? EST_DEFAULTS.failureThreshold;
  }

  private now(): number {
    return this.opts.now?.() ?? Date.now();
  }

  /** The configured chain must be a chain: each certificate a CA issued by the next, the last self-signed. */
  private checkConfiguredChain(): void {
    const where = `deviceIssuer.caChainFile ${this.config.caChainFile}`;
    this.chain.forEach((c, i) => {
      if (!c.ca) throw new LeafgateError('internal', `${where}: ${c.subject.replace(/\n/g, ', ')} is not a CA certificate`);
      const parent = this.chain[i + 1] ?? c;
      if (!(c.checkIssued(parent) && c.verify(parent.publicKey))) {
        throw new LeafgateError('internal', `${where}: ${c.subject.replace(/\n/g, ', ')} is not issued by ${i + 1 < this.chain.length ? 'the next certificate' : 'itself (the last one must be the root)'}: list the issuing CA first and the root last`);
      }
    });
  }

  /** Where EST calls go, for logs and `--help` (no secret). */
  describe(): string {
    return `${this.base} (${[this.config.clientCertFile ? 'client certificate' : '', this.authorization ? 'HTTP Basic' : ''].filter(Boolean).join(' + ')})`;
  }

  bundle(): CaBundle {
    return { ...this.local.bundle(), externalDeviceChain: this.chainPem };
  }

  async close(): Promise<void> {
    this.agent.destroy();
  }

  async issue(issuer: IssuerRole, req: IssueRequest): Promise<IssuedCertificate> {
    if (issuer !== 'device') return this.local.issue(issuer, req);
    if (!req.csrDer) throw new LeafgateError('internal', 'the EST connector forwards the device\'s CSR, and none was given');
    const operation = req.renewal ? 'simplereenroll' : 'simpleenroll';
    // The CSR goes to the CA unchanged, and a CA template may copy what it requests: leafgate's
    // policy tolerates requested keyUsage / extendedKeyUsage (its own CA decides their values),
    // so here a request for purposes a device never has is refused before anything is made.
    // Other attributes (challengePassword, ADCS enrollment name-value pairs such as
    // "SAN:upn=..." or "CertificateTemplate:...") are ignored by leafgate's policy but would
    // be read by the external CA: a CSR carrying any is not forwarded.
    let attributes: ReturnType<typeof csrAttributes>;
    let problems: string[];
    try {
      attributes = csrAttributes(req.csrDer);
      problems = purposeProblems(attributes.extensions);
    } catch (err) {
      throw new LeafgateError('bad_csr', `the CSR's attributes cannot be read: ${(err as Error).message}`);
    }
    if (attributes.others.length) problems.push(`attributes other than extensionRequest (${attributes.others.slice(0, 5).join(', ')}), which the external CA would read`);
    if (problems.length) throw new LeafgateError('policy_violation', `the CSR requests ${problems.join('; ')}`, { detail: { est: 'not_forwarded' } });
    const answer = await this.guarded(operation, req.csrDer);
    const certs = this.interpret(operation, answer);
    try {
      return this.checkIssued(certs, req);
    } catch (err) {
      if (err instanceof LeafgateError) throw err;
      // Never `internal` here: the gateway retries that, and every retry would be another certificate at the CA.
      this.opts.logger?.error({ url: this.base, err: (err as Error).message }, 'certificate from the external CA could not be checked: refused; revoke it at the external CA');
      throw new LeafgateError('ca_refused', `the external CA's certificate could not be checked: ${(err as Error).message}`, { detail: { est: 'certificate_refused' } });
    }
  }

  /**
   * RFC 7030 4.1: the CA certificates the EST server distributes, compared with caChainFile.
   * Called once at start, without holding it up: a server that is down is only logged, a
   * server whose CA set lacks the configured issuing CA is an error line (every certificate it
   * signs would then be refused).
   */
  async checkCaCerts(): Promise<'match' | 'mismatch' | 'unreachable'> {
    let answer: EstAnswer;
    try {
      answer = await this.send('GET', 'cacerts');
    } catch (err) {
      this.opts.logger?.warn({ url: this.base, err: (err as Error).message }, 'EST /cacerts cannot be read at start: the configured chain is not compared with the server\'s');
      return 'unreachable';
    }
    let served: X509Certificate[] = [];
    try {
      if (answer.status !== 200) throw new Error(`HTTP ${answer.status}`);
      served = pkix.decodeCertsOnly(Buffer.from(answer.body.toString('ascii').replace(/\s+/g, ''), 'base64')).map((d) => new X509Certificate(d));
    } catch (err) {
      this.opts.logger?.warn({ url: this.base, err: (err as Error).message }, 'EST /cacerts answer is not usable: the configured chain is not compared with the server\'s');
      return 'unreachable';
    }
    if (served.some((c) => c.raw.equals(this.chain[0].raw))) return 'match';
    this.opts.logger?.error({ url: this.base, configured: this.chain[0].subject.replace(/\n/g, ', '), served: served.map((c) => c.subject.replace(/\n/g, ', ')) }, 'the EST server\'s CA certificates (/cacerts) do not include the issuing CA of deviceIssuer.caChainFile: its certificates will be refused');
    return 'mismatch';
  }

  /**
   * One enrollment call under this node's bounds: at most maxConcurrent in flight (one more is
   * answered authority_unavailable, not queued: the gateway's queue holds it), and a circuit
   * breaker: after failureThreshold consecutive failures (no connection, no answer, 502/503/504)
   * calls fail fast for retryAfterSeconds, then one probe goes out; its success closes the
   * breaker, its failure opens it again. Any other HTTP answer shows the CA is there.
   */
  private async guarded(operation: string, csrDer: Buffer): Promise<EstAnswer> {
    const now = this.now();
    const retryAfterMs = this.config.retryAfterSeconds * 1000;
    let probe = false;
    if (this.failures >= this.threshold()) {
      if (now < this.openUntil || this.probing) {
        throw new LeafgateError('authority_unavailable', `the external CA (EST) failed ${this.failures} times in a row: not asked again before ${new Date(Math.max(this.openUntil, now + 1000)).toISOString()}`, {
          retryAfterMs: Math.max(1000, this.openUntil - now), detail: { est: 'circuit_open', operation, sent: false, failures: this.failures },
        });
      }
      probe = true;
    }
    const max = this.config.maxConcurrent ?? EST_DEFAULTS.maxConcurrent;
    if (this.inFlight >= max) {
      this.opts.logger?.warn({ url: this.base, operation, inFlight: this.inFlight, maxConcurrent: max }, 'EST calls at deviceIssuer.maxConcurrent: the request waits in the gateway\'s queue');
      throw new LeafgateError('authority_unavailable', `the external CA (EST) has ${this.inFlight} requests of this node in flight (deviceIssuer.maxConcurrent)`, {
        retryAfterMs: this.timing.busyRetryAfterMs, detail: { est: 'busy', operation, sent: false, inFlight: this.inFlight },
      });
    }
    if (probe) this.probing = true;
    this.inFlight++;
    try {
      const answer = await this.post(operation, csrDer);
      if (answer.status >= 502 && answer.status <= 504) this.failed();
      else this.succeeded();
      return answer;
    } catch (err) {
      if (err instanceof LeafgateError && err.code === 'authority_unavailable') this.failed();
      throw err;
    } finally {
      this.inFlight--;
      if (probe) this.probing = false;
    }
  }

  private failed(): void {
    this.failures++;
    if (this.failures < this.threshold()) return;
    this.openUntil = this.now() + this.config.retryAfterSeconds * 1000;
    this.opts.logger?.warn({ url: this.base, failures: this.failures, retryAfterSeconds: this.config.retryAfterSeconds }, 'EST circuit breaker open: device requests are answered authority_unavailable without asking the external CA until one probe succeeds');
  }

  private succeeded(): void {
    if (this.failures >= this.threshold()) this.opts.logger?.info({ url: this.base }, 'EST circuit breaker closed: the external CA answers again');
    this.failures = 0;
  }

  private post(operation: string, csrDer: Buffer): Promise<EstAnswer> {
    return this.send('POST', operation, csrDer).catch((err: unknown) => {
      if (!(err instanceof EstTransportError)) throw err;
      const retryAfterMs = this.config.retryAfterSeconds * 1000;
      // Sent in full and no answer: the CA may have issued a certificate leafgate never got.
      const detail = { est: err.sent ? 'answer_lost' : 'unreachable', operation, sent: err.sent };
      if (err.tls) this.opts.logger?.error({ url: this.base, err: err.message }, 'the EST server\'s TLS certificate is not trusted (deviceIssuer.serverCaFile), or it refused leafgate\'s client certificate: device requests wait until this is fixed');
      else if (err.sent) this.opts.logger?.warn({ url: this.base, operation, err: err.message }, 'EST request sent but no answer arrived: the external CA may have issued a certificate that leafgate never received (it retries; revoke any orphan at the CA)');
      else this.opts.logger?.warn({ url: this.base, operation, err: err.message }, 'EST server unreachable: device requests stay queued');
      throw new LeafgateError('authority_unavailable', `the external CA (EST) cannot be reached: ${err.message}`, { retryAfterMs, detail, cause: err });
    });
  }

  /** One EST call: POST base64 PKCS#10, or GET; resolves with whatever HTTP answer arrives, rejects with EstTransportError. */
  private send(method: 'GET' | 'POST', operation: string, csrDer?: Buffer): Promise<EstAnswer> {
    const body = csrDer ? Buffer.from(csrDer.toString('base64').replace(/(.{64})/g, '$1\r\n'), 'ascii') : Buffer.alloc(0);
    const url = new URL(`${this.base}/${operation}`);
    return new Promise<EstAnswer>((resolve, reject) => {
      let sent = false;
      // `timeout` below is the socket's idle time; this bounds the whole call (a server that
      // answers one byte at a time), so the claim's lifetime and the gateway's wait hold.
      const deadline = setTimeout(() => req.destroy(new Error(`no complete answer within ${this.config.timeoutMs} ms`)), this.config.timeoutMs);
      deadline.unref?.();
      const settle = <A extends unknown[]>(f: (...a: A) => void) => (...a: A) => {
        clearTimeout(deadline);
        f(...a);
      };
      resolve = settle(resolve);
      reject = settle(reject);
      const req = request(url, {
        method, agent: this.agent, timeout: this.config.timeoutMs,
        headers: {
          ...(method === 'POST' ? { 'content-type': 'application/pkcs10', 'content-transfer-encoding': 'base64', 'content-length': String(body.length) } : {}),
          accept: 'application/pkcs7-mime',
          ...(this.authorization ? { authorization: this.authorization } : {}),
        },
      }, (res) => {
        const chunks: Buffer[] = [];
        let size = 0;
        res.on('data', (c: Buffer) => {
          size += c.length;
          if (size > MAX_ANSWER_BYTES) {
            res.destroy();
            reject(new EstTransportError(`answer larger than ${MAX_ANSWER_BYTES} bytes`, true, false));
          } else chunks.push(c);
        });
        res.on('error', (err) => reject(new EstTransportError(err.message, true, false)));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, contentType: String(res.headers['content-type'] ?? ''), retryAfter: res.headers['retry-after'], body: Buffer.concat(chunks) }));
      });
      req.on('finish', () => {
        sent = true;
      });
      req.on('timeout', () => req.destroy(new Error(`no answer within ${this.config.timeoutMs} ms`)));
      req.on('error', (err: NodeJS.ErrnoException) => {
        const tls = /CERT|SSL|TLS|ALTNAME|SELF_SIGNED|UNABLE_TO/i.test(`${err.code ?? ''} ${err.message}`);
        reject(new EstTransportError(`${err.code ? `${err.code}: ` : ''}${err.message}`, sent, tls));
      });
      req.end(method === 'POST' ? body : undefined);
    });
  }

  /** RFC 7030 4.2.3: what the status says, then the certs-only body. */
  private interpret(operation: string, a: EstAnswer): Buffer[] {
    const text = a.body.toString('utf8').replace(/[^\x20-\x7e]+/g, ' ').trim().slice(0, 300);
    const retryMs = (fallbackSeconds: number) => retryAfterMs(a.retryAfter, this.now()) ?? fallbackSeconds * 1000;
    if (a.status === 202) {
      this.opts.logger?.info({ url: this.base, operation, retryAfter: a.retryAfter }, 'EST request pending manual approval at the external CA');
      throw new LeafgateError('authority_unavailable', 'the external CA holds the request for manual approval', { retryAfterMs: retryMs(this.config.retryAfterSeconds), detail: { est: 'pending', operation, status: 202 } });
    }
    if (a.status === 401 || a.status === 407) {
      this.opts.logger?.error({ url: this.base, operation, status: a.status }, 'the EST server refused leafgate\'s credentials (deviceIssuer client certificate or Basic password): device requests wait until this is fixed');
      throw new LeafgateError('authority_unavailable', `the external CA refused leafgate's credentials (HTTP ${a.status})`, { retryAfterMs: this.config.retryAfterSeconds * 1000, detail: { est: 'credentials', operation, status: a.status } });
    }
    if (a.status === 408 || a.status === 429 || (a.status >= 502 && a.status <= 504)) {
      this.opts.logger?.warn({ url: this.base, operation, status: a.status }, 'EST server busy or unavailable: device requests stay queued');
      throw new LeafgateError('authority_unavailable', `the external CA is unavailable (HTTP ${a.status})`, { retryAfterMs: retryMs(this.config.retryAfterSeconds), detail: { est: 'unavailable', operation, status: a.status } });
    }
    if (a.status !== 200) {
      this.opts.logger?.warn({ url: this.base, operation, status: a.status, text }, 'the external CA refused a device request');
      throw new LeafgateError('ca_refused', `the external CA refused the request (HTTP ${a.status}${text ? `: ${text}` : ''})`, { detail: { est: 'refused', operation, status: a.status, text } });
    }
    const bad = (why: string): never => {
      this.opts.logger?.error({ url: this.base, operation, why }, 'the external CA answered something that is not a certificate: revoke at the CA whatever it may have issued for this request');
      throw new LeafgateError('ca_refused', `the external CA's answer is not usable: ${why}`, { detail: { est: 'bad_answer', operation, why } });
    };
    if (!/^application\/pkcs7-mime\b/i.test(a.contentType)) bad(`Content-Type ${a.contentType.slice(0, 80) || '(none)'} is not application/pkcs7-mime`);
    const b64 = a.body.toString('ascii').replace(/\s+/g, '');
    if (!b64 || !/^[A-Za-z0-9+/]+={0,2}$/.test(b64) || b64.length % 4 !== 0) bad('the body is not base64');
    try {
      return pkix.decodeCertsOnly(Buffer.from(b64, 'base64'));
    } catch (err) {
      return bad(`not a certs-only PKCS#7: ${(err as Error).message}`);
    }
  }

  /**
   * The checks of a returned certificate, in order; each refusal is `ca_refused` and names
   * what failed. The certificate exists at the CA all the same: the operator must revoke it
   * there (the log line says so).
   */
  private checkIssued(certs: Buffer[], req: IssueRequest): IssuedCertificate {
    const refuse = (why: string, serial?: string): never => {
      this.opts.logger?.error({ url: this.base, why, serial }, 'certificate from the external CA refused: nothing stored or delivered; revoke it at the external CA');
      throw new LeafgateError('ca_refused', `the external CA's certificate is refused: ${why}`, { detail: { est: 'certificate_refused', why, ...(serial ? { externalSerial: serial } : {}) } });
    };
    const parsed: X509Certificate[] = [];
    for (const d of certs) {
      try {
        parsed.push(new X509Certificate(d));
      } catch {
        refuse('a certificate in the answer cannot be parsed');
      }
    }
    // The answer may carry the chain too; the device's certificate is the one for its key.
    const wanted = createPublicKey({ key: req.spkiDer, format: 'der', type: 'spki' });
    const leaf = parsed.find((c) => !c.ca && c.publicKey.equals(wanted));
    if (!leaf) return refuse('no certificate in the answer is for the key of the device\'s CSR', parsed[0]?.serialNumber.toUpperCase());
    const serial = leaf.serialNumber.toUpperCase();
    // RFC 5280 4.1.2.2: a positive integer. leafgate's CRL and the gateways' lookups key on the
    // upper-case hex of a positive serial: a negative one ("-1234" as node prints it) would be
    // encoded as serial 0 in the device CA's CRL, and its revocation would never reach a gateway.
    if (!/^[0-9A-F]+$/.test(serial) || /^0+$/.test(serial)) refuse(`its serial number ${serial.slice(0, 48)} is not a positive integer (RFC 5280 4.1.2.2)`, serial);
    const issuing = this.chain[0];
    // Chain: issued by the configured issuing CA (name and signature; the configured chain up to
    // its root was checked at start, its validity now is checked with the certificate's below).
    if (!(leaf.checkIssued(issuing) && leaf.verify(issuing.publicKey))) refuse(`not issued by the configured issuing CA ${issuing.subject.replace(/\n/g, ', ')}`, serial);
    const now = new Date(this.now());
    // An end-entity certificate the device can use as a TLS client (RFC 5280 4.2.1.9, 4.2.1.12).
    const eku = leaf.keyUsage;
    if (eku && eku.length && !eku.includes(pkix.OID.clientAuth)) refuse('its extended key usage does not allow clientAuth', serial);
    // And nothing a device certificate must not be: another purpose, an issuer's key usage.
    let problems: string[];
    try {
      problems = purposeProblems(certificateExtensions(leaf.raw));
    } catch (err) {
      return refuse(`its key usage extensions cannot be read: ${(err as Error).message}`, serial);
    }
    if (problems.length) refuse(`it carries ${problems.join('; ')}`, serial);
    // Subject: exactly the CN leafgate's policy built; an enterprise template may add organisational attributes, nothing else.
    const expectedCn = pkix.decodeName(pkix.der.parseDer(req.subjectDer)).find(([oid]) => oid === pkix.OID.commonName)?.[1];
    let subject: Array<[string, string]>;
    try {
      subject = pkix.certificateSubject(leaf.raw);
    } catch (err) {
      return refuse(`its subject cannot be read: ${(err as Error).message}`, serial);
    }
    const cns = subject.filter(([oid]) => oid === pkix.OID.commonName).map(([, v]) => v);
    if (cns.length !== 1 || cns[0] !== expectedCn) refuse(`its subject CN ${JSON.stringify(cns)} is not ${JSON.stringify(expectedCn)}`, serial);
    const extra = subject.filter(([oid]) => oid !== pkix.OID.commonName && !TOLERATED_SUBJECT_ATTRIBUTES.has(oid));
    if (extra.length) refuse(`its subject carries attributes leafgate's policy does not allow (${extra.map(([oid]) => oid).join(', ')})`, serial);
    // SANs: only names the policy allowed in the CSR.
    const sans = parseSubjectAltName(leaf.subjectAltName);
    if (!sans) return refuse(`its subjectAltName cannot be read: ${leaf.subjectAltName}`, serial);
    const allowed = new Set([...(req.sans?.dns ?? []).map((v) => `DNS:${v}`), ...(req.sans?.uri ?? []).map((v) => `URI:${v}`), ...(req.sans?.ip ?? []).map((v) => `IP Address:${v}`)]);
    const extraSans = sans.filter((s) => !allowed.has(s));
    if (extraSans.length) refuse(`its subjectAltName has names leafgate did not ask for (${extraSans.slice(0, 5).join(', ')})`, serial);
    // Validity: already valid (within the tolerated skew), not expired, not longer than the policy's lifetime.
    const notBefore = new Date(leaf.validFrom);
    const notAfter = new Date(leaf.validTo);
    if (notBefore.getTime() > now.getTime() + CLOCK_SKEW_TOLERANCE_MS) refuse(`it is not valid before ${notBefore.toISOString()}`, serial);
    const lapsed = this.chain.find((c) => now.getTime() + CLOCK_SKEW_TOLERANCE_MS < new Date(c.validFrom).getTime() || now > new Date(c.validTo));
    if (lapsed) refuse(`the configured chain's ${lapsed.subject.replace(/\n/g, ', ')} is not valid now (${lapsed.validFrom} .. ${lapsed.validTo})`, serial);
    if (notAfter.getTime() <= now.getTime()) refuse(`it expired at ${notAfter.toISOString()}`, serial);
    if (notAfter.getTime() > req.notAfter.getTime() + VALIDITY_TOLERANCE_MS) refuse(`it is valid until ${notAfter.toISOString()}, longer than the policy's ${req.notAfter.toISOString()}`, serial);
    const der = leaf.raw;
    return {
      issuer: EXTERNAL_CA, der, pem: pkix.toPem(der, 'CERTIFICATE'), serial, fingerprint256: fingerprint(der),
      notBefore, notAfter, chain: this.chainPem,
    };
  }
}

/**
 * X509Certificate.subjectAltName ("DNS:a, IP Address:1.2.3.4, URI:...", a value with a comma
 * or quote JSON-quoted) as `TYPE:value` strings; null when it holds something else.
 */
function parseSubjectAltName(text: string | undefined): string[] | null {
  if (!text) return [];
  const out: string[] = [];
  const re = /(DNS|URI|IP Address|email|othername|DirName|Registered ID):("(?:[^"\\]|\\.)*"|[^,]*)(?:, |$)/gy;
  let m: RegExpExecArray | null;
  let at = 0;
  while (at < text.length && (m = re.exec(text))) {
    let value = m[2];
    if (value.startsWith('"')) {
      try {
        value = JSON.parse(value) as string;
      } catch {
        return null;
      }
    }
    out.push(`${m[1]}:${value}`);
    at = re.lastIndex;
  }
  return at === text.length ? out : null;
}

/** Retry-After (RFC 9110 10.2.3): seconds or an HTTP date; bounded to 1 s .. 24 h. */
function retryAfterMs(value: string | undefined, now: number): number | undefined {
  if (!value) return undefined;
  const ms = /^\d+$/.test(value.trim()) ? Number(value.trim()) * 1000 : Date.parse(value) - now;
  if (!Number.isFinite(ms)) return undefined;
  return Math.min(86_400_000, Math.max(1000, ms));
}
