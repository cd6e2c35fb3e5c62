/**
 * A local stand-in for Azure Key Vault's keys API and the Microsoft Entra token endpoint the
 * REAL @azure/keyvault-keys and @azure/identity clients talk to, over HTTPS on 127.0.0.1.
 *
 * What it checks, as Key Vault does (sources in the comments by each check):
 *   - the bearer token: a request without one gets the challenge of Key Vault's
 *     challenge-based authentication (401 + `WWW-Authenticate: Bearer authorization="{authority}/{tenant}",
 *     resource="https://vault.azure.net"`); a token the token endpoint did not issue for the
 *     https://vault.azure.net audience, or one that expired, gets 401 too (a missing or refused
 *     token is answered 401 with WWW-Authenticate: learn.microsoft.com/azure/key-vault/general/
 *     authentication-requests-and-responses and .../rest-error-codes: expired, wrong resource);
 *   - the api-version query value: unknown versions get 400 BadParameter "The specified
 *     version (X) is not recognized" (the text Key Vault answers, quoted in
 *     Azure/azure-sdk-for-python#28595 and Azure/azure-sdk-for-net#14789);
 *   - the key operations: a sign on a key whose key_ops lack `sign` gets 403 Forbidden with
 *     innererror KeyOperationForbidden (the body quoted in the Key Vault TROUBLESHOOTING.md of
 *     the Azure SDK for .NET); the algorithm must suit the key (ES256 "for SHA-256 digests and
 *     keys created with curve P-256", ES384 on P-384, RS* on RSA:
 *     learn.microsoft.com/azure/key-vault/keys/about-keys-details) and the digest must have the
 *     algorithm's hash length (400 BadParameter);
 *   - the rate: beyond `rate.requests` key transactions per `rate.windowMs` the answer is 429
 *     with `Retry-After` (seconds), and, as Key Vault documents, a request answered 429 does
 *     not count towards the limit (learn.microsoft.com/azure/key-vault/general/overview-throttling).
 * The token endpoint serves the OpenID configuration MSAL reads and the client-credentials
 * grant (client id + client secret), nothing else.
 */
import { constants, createECDH, createHash, generateKeyPairSync, privateEncrypt, randomBytes, randomUUID, timingSafeEqual, type KeyObject } from 'node:crypto';
import { once } from 'node:events';
import https from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { createTestCa, issueServerCert } from './iothub-standin/pki.ts';

/**
 * api-version values of Key Vault's keys API (the REST reference lists 7.0 to 7.6 and
 * 2025-07-01, which @azure/keyvault-keys 4.10 sends: its LATEST_API_VERSION).
 */
export const KNOWN_API_VERSIONS = ['7.0', '7.1', '7.2', '7.3', '7.4', '7.5', '7.6', '2025-07-01'];
const LATEST_API_VERSION = '2025-07-01';

export interface StandinKey {
  name: string;
  version: string;
  kty: 'EC' | 'EC-HSM' | 'RSA' | 'RSA-HSM';
  crv?: 'P-256' | 'P-384' | 'P-521';
  keyOps: string[];
  enabled: boolean;
  privateKey: KeyObject;
  publicJwk: Record<string, string>;
  created: number;
}

export interface KeyVaultRequest {
  method: string;
  path: string;
  apiVersion: string | null;
  status: number;
  /** Whether the request carried a bearer token (valid or not). */
  bearer: boolean;
  at: number;
}

export interface KeyVaultStandinOptions {
  /** Key transactions allowed per window; beyond: 429 with Retry-After. Default: unlimited. */
  rate?: { requests: number; windowMs: number };
  /** Lifetime of the access tokens the token endpoint issues. */
  tokenLifetimeSeconds?: number;
}

export class KeyVaultStandin {
  readonly tenantId = randomUUID();
  readonly clientId = randomUUID();
  /** The service principal's client secret: what a test must never find in the logs. */
  readonly clientSecret = `kv-standin-secret-${randomBytes(18).toString('base64url')}`;
  readonly keys = new Map<string, StandinKey[]>();
  readonly requests: KeyVaultRequest[] = [];
  /** Client-credential grants answered with a token, and refused. */
  tokensIssued = 0;
  tokensRefused = 0;
  /** Requests answered 429. */
  throttled = 0;
  /** Requests that came before the Retry-After of the last 429 had passed: a client that does not honour it. */
  earlyRetries = 0;
  /** Sign operations done. */
  signs = 0;
  private readonly tokens = new Map<string, { audience: string; expiresAt: number }>();
  private readonly window: number[] = [];
  private retryNotBefore = 0;
  private corrupt = 0;
  private holding = false;
  private readonly held: Array<() => void> = [];
  private faults: Array<{ status: number; headers: Record<string, string> }> = [];
  private constructor(
    readonly ca: string,
    private readonly server: https.Server,
    readonly port: number,
    private readonly opts: KeyVaultStandinOptions,
  ) {}

  static async start(opts: KeyVaultStandinOptions = {}): Promise<KeyVaultStandin> {
    const ca = createTestCa('keyvault-standin test root');
    const serverCert = issueServerCert(ca, ['localhost']);
    let self: KeyVaultStandin | undefined;
    const server = https.createServer({ key: serverCert.key, cert: serverCert.cert }, (req, res) => self!.handle(req, res));
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    self = new KeyVaultStandin(ca.cert, server, (server.address() as { port: number }).port, opts);
    return self;
  }

  /** The vault's URL, as `https://{vault}.vault.azure.net` would be. */
  get vaultUrl(): string {
    return `https://127.0.0.1:${this.port}`;
  }

  /** The Entra authority host (the credential's `authorityHost`). */
  get authorityHost(): string {
    return `https://localhost:${this.port}`;
  }

  /** Sets the rate limit (key transactions per window) from now on. */
  setRate(rate: KeyVaultStandinOptions['rate']): void {
    this.opts.rate = rate;
    this.window.length = 0;
  }

  /** The next `n` key requests (past authentication) get `status` with `headers`. */
  failNext(n: number, status: number, headers: Record<string, string> = {}): void {
    for (let i = 0; i < n; i++) this.faults.push({ status, headers });
  }

  /** The next `n` signatures come back damaged (one bit flipped), as a faulty path would deliver them. */
  corruptNextSignatures(n: number): void {
    this.corrupt += n;
  }

  /** Every token issued so far expires now (a client that keeps using one gets 401). */
  expireTokens(): void {
    for (const t of this.tokens.values()) t.expiresAt = 0;
  }

  /** Sign requests are parked (not answered) until `release()`; `parked` counts them. */
  holdSigns(): void {
    this.holding = true;
  }

  release(): void {
    this.holding = false;
    for (const go of this.held.splice(0)) go();
  }

  get parked(): number {
    return this.held.length;
  }

  /** A key made out of band (portal, az CLI), e.g. one whose key_ops lack `sign`. */
  addKey(name: string, kty: StandinKey['kty'], opts: { crv?: StandinKey['crv']; size?: number; keyOps: string[] }): StandinKey {
    const key = makeKey(name, kty, opts.crv, opts.size, opts.keyOps);
    this.keys.set(name, [...(this.keys.get(name) ?? []), key]);
    return key;
  }

  close(): Promise<void> {
    this.server.closeAllConnections();
    return new Promise((r) => this.server.close(() => r()));
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size <= 1 << 20) chunks.push(c);
    });
    req.on('end', () => {
      const url = new URL(req.url ?? '/', 'https://x');
      const text = Buffer.concat(chunks).toString('utf8');
      if (!url.pathname.startsWith('/keys/')) return this.handleLogin(req, res, url, text);
      this.handleVault(req, res, url, text);
    });
  }

  // ---- the token endpoint (Microsoft Entra ID, v2.0) -------------------------------------

  private handleLogin(req: IncomingMessage, res: ServerResponse, url: URL, text: string): void {
    const json = (status: number, body: unknown) => {
      res.writeHead(status, { 'content-type': 'application/json; charset=utf-8' });
      res.end(JSON.stringify(body));
    };
    const base = `${this.authorityHost}/${this.tenantId}`;
    const m = /^\/([^/]+)\/(v2\.0\/\.well-known\/openid-configuration|oauth2\/v2\.0\/token)$/.exec(url.pathname);
    if (!m || m[1] !== this.tenantId) return json(400, { error: 'invalid_tenant', error_description: `AADSTS90002: Tenant '${m?.[1] ?? ''}' not found.` });
    if (m[2].startsWith('v2.0') && req.method === 'GET') {
      return json(200, {
        token_endpoint: `${base}/oauth2/v2.0/token`,
        authorization_endpoint: `${base}/oauth2/v2.0/authorize`,
        device_authorization_endpoint: `${base}/oauth2/v2.0/devicecode`,
        end_session_endpoint: `${base}/oauth2/v2.0/logout`,
        jwks_uri: `${base}/discovery/v2.0/keys`,
        issuer: `${base}/v2.0`,
        token_endpoint_auth_methods_supported: ['client_secret_post', 'private_key_jwt', 'client_secret_basic'],
        response_types_supported: ['code', 'id_token', 'code id_token', 'id_token token'],
        scopes_supported: ['openid', 'profile', 'email', 'offline_access'],
        tenant_region_scope: null,
      });
    }
    if (req.method !== 'POST') return json(405, { error: 'invalid_request' });
    const form = new URLSearchParams(text);
    const secret = Buffer.from(form.get('client_secret') ?? '');
    const expected = Buffer.from(this.clientSecret);
    const secretOk = secret.length === expected.length && timingSafeEqual(secret, expected);
    if (form.get('grant_type') !== 'client_credentials' || form.get('client_id') !== this.clientId || !secretOk) {
      this.tokensRefused++;
      return json(401, {
        error: 'invalid_client',
        error_description: `AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '${this.clientId}'.`,
        error_codes: [7000215],
      });
    }
    const scope = form.get('scope') ?? '';
    const audience = scope.split(' ').find((s) => s.endsWith('/.default'))?.replace(/\/\.default$/, '') ?? '';
    const lifetime = this.opts.tokenLifetimeSeconds ?? 3600;
    const token = randomBytes(32).toString('base64url');
    this.tokens.set(token, { audience, expiresAt: Date.now() + lifetime * 1000 });
    this.tokensIssued++;
    json(200, { token_type: 'Bearer', expires_in: lifetime, ext_expires_in: lifetime, access_token: token });
  }

  // ---- the vault --------------------------------------------------------------------------

  private handleVault(req: IncomingMessage, res: ServerResponse, url: URL, text: string): void {
    const apiVersion = url.searchParams.get('api-version');
    const bearerMatch = /^Bearer (\S+)$/.exec(req.headers.authorization ?? '');
    const send = (status: number, body?: unknown, headers: Record<string, string> = {}) => {
      this.requests.push({ method: req.method!, path: url.pathname, apiVersion, status, bearer: !!bearerMatch, at: Date.now() });
      res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'x-ms-keyvault-service-version': '1.9.0.0', ...headers });
      res.end(body === undefined ? '' : JSON.stringify(body));
    };
    const error = (status: number, code: string, message: string, inner?: string, headers?: Record<string, string>) =>
      send(status, { error: { code, message, ...(inner ? { innererror: { code: inner } } : {}) } }, headers);

    // Challenge-based authentication: Key Vault answers an unauthenticated request with 401 and
    // the authority and resource to get a token for; the SDK's challenge policy then asks the
    // credential for https://vault.azure.net/.default with the tenant of `authorization`.
    const challenge = { 'www-authenticate': `Bearer authorization="${this.authorityHost}/${this.tenantId}", resource="https://vault.azure.net"` };
    if (!bearerMatch) return error(401, 'Unauthorized', 'AKV10000: Request is missing a Bearer or PoP token.', undefined, challenge);
    const token = this.tokens.get(bearerMatch[1]);
    if (!token || token.expiresAt <= Date.now()) return error(401, 'Unauthorized', 'AKV10032: Invalid issuer or the token has expired.', undefined, challenge);
    if (token.audience !== 'https://vault.azure.net') return error(401, 'Unauthorized', `AKV10022: Invalid audience. Expected https://vault.azure.net, found: ${token.audience}.`, undefined, challenge);

    if (!apiVersion || !KNOWN_API_VERSIONS.includes(apiVersion)) {
      return error(400, 'BadParameter', `The specified version (${apiVersion ?? ''}) is not recognized. Consider using the latest supported version (${LATEST_API_VERSION}).`);
    }

    const now = Date.now();
    if (now < this.retryNotBefore) this.earlyRetries++;
    const fault = this.faults.shift();
    if (fault) {
      if (fault.status === 429) {
        this.throttled++;
        const s = Number(fault.headers['retry-after'] ?? 0);
        this.retryNotBefore = Math.max(this.retryNotBefore, now + s * 1000);
      }
      return error(fault.status, fault.status === 429 ? 'Throttled' : 'ServiceUnavailable', 'injected fault', undefined, fault.headers);
    }
    const rate = this.opts.rate;
    if (rate) {
      while (this.window.length && this.window[0] <= now - rate.windowMs) this.window.shift();
      if (this.window.length >= rate.requests) {
        // Retry-After in whole seconds, rounded up: the oldest counted request leaves the window then.
        const waitMs = this.window[0] + rate.windowMs - now;
        const seconds = Math.max(1, Math.ceil(waitMs / 1000));
        this.throttled++;
        this.retryNotBefore = Math.max(this.retryNotBefore, now + seconds * 1000);
        return error(429, 'Throttled', 'Request was not processed because too many requests were received. Reason: VaultRequestTypeLimitReached', undefined, { 'retry-after': String(seconds) });
      }
      this.window.push(now); // 429s are not counted (overview-throttling)
    }

    let body: any = undefined;
    if (text) {
      try {
        body = JSON.parse(text);
      } catch {
        return error(400, 'BadParameter', 'The request body is not valid JSON.');
      }
    }
    const create = /^\/keys\/([A-Za-z0-9-]{1,127})\/create$/.exec(url.pathname);
    if (create && req.method === 'POST') return this.createKey(create[1], body, send, error);
    const sign = /^\/keys\/([A-Za-z0-9-]{1,127})\/([0-9a-f]{32})\/sign$/.exec(url.pathname);
    if (sign && req.method === 'POST') {
      if (this.holding) return void this.held.push(() => this.sign(sign[1], sign[2], body, send, error));
      return this.sign(sign[1], sign[2], body, send, error);
    }
    const get = /^\/keys\/([A-Za-z0-9-]{1,127})(?:\/([0-9a-f]{32})?)?\/?$/.exec(url.pathname);
    if (get && req.method === 'GET') {
      const key = this.find(get[1], get[2]);
      if (!key) return error(404, 'KeyNotFound', `A key with (name/id) ${get[1]}${get[2] ? `/${get[2]}` : ''} was not found in this key vault.`);
      return send(200, this.bundle(key));
    }
    error(405, 'BadParameter', `${req.method} ${url.pathname} is not served by this stand-in`);
  }

  private find(name: string, version?: string): StandinKey | undefined {
    const all = this.keys.get(name) ?? [];
    return version ? all.find((k) => k.version === version) : all[all.length - 1];
  }

  private kid(key: StandinKey): string {
    return `${this.vaultUrl}/keys/${key.name}/${key.version}`;
  }

  private bundle(key: StandinKey): unknown {
    const t = Math.floor(key.created / 1000);
    return {
      key: { kid: this.kid(key), kty: key.kty, key_ops: key.keyOps, ...key.publicJwk },
      attributes: { enabled: key.enabled, created: t, updated: t, recoveryLevel: 'Recoverable+Purgeable', recoverableDays: 90, exportable: false },
    };
  }

  private createKey(name: string, body: any, send: (s: number, b?: unknown) => void, error: (s: number, c: string, m: string) => void): void {
    const kty = body?.kty;
    if (!['EC', 'EC-HSM', 'RSA', 'RSA-HSM'].includes(kty)) return error(400, 'BadParameter', `Property kty has invalid value ${kty}`);
    const ec = kty.startsWith('EC');
    const crv = ec ? (body.crv ?? 'P-256') : undefined;
    if (ec && !['P-256', 'P-384', 'P-521'].includes(crv)) return error(400, 'BadParameter', `Property crv has invalid value ${crv}`);
    const size = ec ? undefined : (body.key_size ?? 2048);
    if (!ec && ![2048, 3072, 4096].includes(size)) return error(400, 'BadParameter', `Property key_size has invalid value ${size}`);
    const allowed = ['encrypt', 'decrypt', 'sign', 'verify', 'wrapKey', 'unwrapKey', 'import', 'export'];
    const ops: string[] = body.key_ops ?? (ec ? ['sign', 'verify'] : ['encrypt', 'decrypt', 'sign', 'verify', 'wrapKey', 'unwrapKey']);
    if (!Array.isArray(ops) || ops.some((o) => !allowed.includes(o))) return error(400, 'BadParameter', 'Property key_ops has an invalid value');
    const key = this.addKey(name, kty, { crv, size, keyOps: ops });
    send(200, this.bundle(key));
  }

  private sign(name: string, version: string, body: any, send: (s: number, b?: unknown) => void, error: (s: number, c: string, m: string, inner?: string) => void): void {
    const key = this.find(name, version);
    if (!key) return error(404, 'KeyNotFound', `A key with (name/id) ${name}/${version} was not found in this key vault.`);
    if (!key.keyOps.includes('sign')) return error(403, 'Forbidden', 'Operation sign is not permitted on this key.', 'KeyOperationForbidden');
    const alg = String(body?.alg ?? '');
    const hashLen: Record<string, number> = { ES256: 32, ES384: 48, ES512: 64, RS256: 32, RS384: 48, RS512: 64 };
    const curveOf: Record<string, string> = { ES256: 'P-256', ES384: 'P-384', ES512: 'P-521' };
    const ec = key.kty.startsWith('EC');
    if (!(alg in hashLen) || (ec ? curveOf[alg] !== key.crv : alg.startsWith('ES'))) return error(400, 'BadParameter', `Invalid algorithm ${alg} for key type ${key.kty}${key.crv ? ` ${key.crv}` : ''}.`);
    const digest = typeof body?.value === 'string' ? Buffer.from(body.value, 'base64url') : Buffer.alloc(0);
    if (digest.length !== hashLen[alg]) return error(400, 'BadParameter', `Invalid digest length ${digest.length} for algorithm ${alg}.`);
    let signature: Buffer;
    if (ec) {
      // Key Vault signs the digest as given and answers raw r||s (JWS form, RFC 7518 3.4).
      signature = signDigestEc(key.privateKey, key.crv!, digest);
    } else {
      signature = signDigestRsa(key.privateKey, `sha${alg.slice(2)}`, digest);
    }
    this.signs++;
    if (this.corrupt > 0) {
      this.corrupt--;
      signature[signature.length - 1] ^= 0x01;
    }
    send(200, { kid: this.kid(key), value: signature.toString('base64url') });
  }
}

function makeKey(name: string, kty: StandinKey['kty'], crv: StandinKey['crv'] | undefined, size: number | undefined, keyOps: string[]): StandinKey {
  const ec = kty.startsWith('EC');
  const { privateKey, publicKey } = ec
    ? generateKeyPairSync('ec', { namedCurve: crv ?? 'P-256' })
    : generateKeyPairSync('rsa', { modulusLength: size ?? 2048 });
  const jwk = publicKey.export({ format: 'jwk' }) as Record<string, string>;
  const publicJwk: Record<string, string> = ec ? { crv: jwk.crv, x: jwk.x, y: jwk.y } : { n: jwk.n, e: jwk.e };
  return { name, version: randomBytes(16).toString('hex'), kty, crv: ec ? (crv ?? 'P-256') : undefined, keyOps, enabled: true, privateKey, publicJwk, created: Date.now() };
}

/** Curve orders (SEC 2 / FIPS 186-4 D.1.2). */
const ORDER: Record<string, bigint> = {
  'P-256': 0xffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551n,
  'P-384': 0xffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973n,
  'P-521': 0x01fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffa51868783bf2f966b7fcc0148f709a5d03bb5c9b8899c47aebb6fb71e91386409n,
};
const NODE_CURVE: Record<string, string> = { 'P-256': 'prime256v1', 'P-384': 'secp384r1', 'P-521': 'secp521r1' };

const big = (b: Buffer) => BigInt(`0x${b.toString('hex') || '0'}`);
const mod = (a: bigint, n: bigint) => ((a % n) + n) % n;
function modInverse(a: bigint, n: bigint): bigint {
  let [r0, r1, t0, t1] = [mod(a, n), n, 1n, 0n];
  while (r1 !== 0n) {
    const q = r0 / r1;
    [r0, r1] = [r1, r0 - q * r1];
    [t0, t1] = [t1, t0 - q * t1];
  }
  return mod(t0, n);
}

/**
 * ECDSA (FIPS 186-4 6.4) over a digest given as is, as Key Vault does: node:crypto only signs
 * messages it hashes itself. k*G comes from ECDH (its public key for private key k); the rest
 * is arithmetic mod the curve order. Answers raw r||s (JWS form, RFC 7518 3.4).
 */
function signDigestEc(privateKey: KeyObject, crv: string, digest: Buffer): Buffer {
  const n = ORDER[crv];
  const size = Math.ceil(n.toString(16).length / 2);
  const d = big(Buffer.from((privateKey.export({ format: 'jwk' }) as { d: string }).d, 'base64url'));
  const bits = n.toString(2).length;
  let z = big(digest);
  if (digest.length * 8 > bits) z >>= BigInt(digest.length * 8 - bits); // leftmost bits of the digest
  for (;;) {
    const k = mod(big(randomBytes(size + 8)), n - 1n) + 1n;
    const ecdh = createECDH(NODE_CURVE[crv]);
    ecdh.setPrivateKey(Buffer.from(k.toString(16).padStart(size * 2, '0'), 'hex'));
    const point = ecdh.getPublicKey(); // 04 || X || Y
    const r = mod(big(point.subarray(1, 1 + size)), n);
    const s = mod(modInverse(k, n) * (z + r * d), n);
    if (r === 0n || s === 0n) continue;
    const hex = (v: bigint) => Buffer.from(v.toString(16).padStart(size * 2, '0'), 'hex');
    return Buffer.concat([hex(r), hex(s)]);
  }
}

/** RSASSA-PKCS1-v1_5 (RFC 8017 8.2) over a digest: the DigestInfo is built here and RSA-signed raw. */
function signDigestRsa(privateKey: KeyObject, hash: string, digest: Buffer): Buffer {
  const prefixes: Record<string, string> = {
    sha256: '3031300d060960864801650304020105000420',
    sha384: '3041300d060960864801650304020205000430',
    sha512: '3051300d060960864801650304020305000440',
  };
  return privateEncrypt({ key: privateKey, padding: constants.RSA_PKCS1_PADDING }, Buffer.concat([Buffer.from(prefixes[hash], 'hex'), digest]));
}

/** SHA-256 digest, for tests that sign through the SDK directly. */
export const sha256 = (data: Buffer) => createHash('sha256').update(data).digest();
