/**
 * A CA key held in Azure Key Vault, used through the official @azure/keyvault-keys and
 * @azure/identity clients. The private key never leaves the vault: the TBS bytes are hashed
 * here and only the digest goes to Key Vault's Sign operation
 * (POST {vault}/keys/{name}/{version}/sign, body { alg, value: base64url digest }, answer
 * { kid, value: base64url signature } -- learn.microsoft.com/rest/api/keyvault/keys/sign/sign).
 * For EC keys Key Vault answers the JWS form, raw r||s (RFC 7518 3.4); X.509 carries a DER
 * ECDSA-Sig-Value (RFC 3279 2.2.3), so the signature is re-encoded here.
 *
 * Pacing. Key Vault throttles per vault and region, weighted by key type: "all other
 * transactions" (GET, sign, verify...) per 10 s are 2,000 for HSM EC and RSA-2048 keys, 4,000
 * for software ones, 500/1,000 for RSA-3072 and 250/500 for RSA-4096; CREATE is 10 (HSM) or 20
 * per 10 s (learn.microsoft.com/azure/key-vault/general/service-limits). Key Vault has no
 * batch sign, so this connector paces itself: at most `pace.requests` sign calls start per
 * `pace.windowMs` (default 1,000 per 10 s: half the HSM budget, since other clients of the
 * vault share it) with at most `maxInFlight` at once; callers beyond wait in a FIFO queue.
 * A throttled call (429) pauses the whole queue until its Retry-After (a throttle is per
 * vault, so every pending call would meet it) and the call goes back to the head of the
 * queue; requests answered 429 do not count towards the limit
 * (learn.microsoft.com/azure/key-vault/general/overview-throttling), so the retry costs
 * nothing. For signing the SDK's own retry policy is turned off (`retryOptions.maxRetries: 0`;
 * reading the key at start-up keeps it, 3 retries honouring Retry-After): its
 * throttling strategy would sleep for any Retry-After inside the call, with no bound, while
 * holding a caller -- here a wait longer than `maxWaitMs` fails at once instead, as a
 * LeafgateError `authority_unavailable` with `retryAfterMs`, which reaches the device as its
 * retry hint. Transient failures (5xx, network) are retried with a short back-off within the
 * same budget.
 */
import { createHash, createPublicKey, verify as cryptoVerify, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { ClientSecretCredential, ManagedIdentityCredential, type TokenCredential } from '@azure/identity';
import { CryptographyClient, KeyClient, type KeyClientOptions, type KeyVaultKey, type SignatureAlgorithm } from '@azure/keyvault-keys';
import { LeafgateError, pkix } from '../../protocol/index.ts';
import { configError } from '../../config-schema/index.ts';
import type { CaKey } from './ca-key.ts';

/** The key to create when it does not exist yet (needs the Key Vault Crypto Officer role). */
export type KeyVaultKeySpec =
  | { kty: 'EC-HSM' | 'EC'; curve: 'P-256' | 'P-384' }
  | { kty: 'RSA-HSM' | 'RSA'; size: 2048 | 3072 | 4096 };

export interface KeyVaultCaKeyOptions {
  /** `https://{vault}.vault.azure.net` (or the private endpoint's name for it). */
  vaultUrl: string;
  keyName: string;
  /** A fixed key version; default: the current version when the authority starts (pinned from then on). */
  keyVersion?: string;
  /** Create the key, with key_ops [sign], when it does not exist; absent: it must exist. */
  create?: KeyVaultKeySpec;
  credential: TokenCredential;
  /** Sign calls started per window (default 1,000 per 10 s). */
  pace?: { requests: number; windowMs: number };
  /** Sign calls in flight at once (default 16). */
  maxInFlight?: number;
  /** Longest a signature may wait (queue, throttling, retries) before `authority_unavailable` (default 10 s). */
  maxWaitMs?: number;
  /**
   * Passed to the SDK clients: `tlsOptions` (a private CA in front of the vault, tests),
   * `disableChallengeResourceVerification` (only for a vault reached under a name that does
   * not end with the challenge's resource domain, e.g. a stand-in; see the SDK's
   * troubleshooting guide), `serviceVersion`.
   */
  clientOptions?: Pick<KeyClientOptions, 'tlsOptions' | 'disableChallengeResourceVerification' | 'serviceVersion'>;
  logger?: { info(obj: object, msg: string): void; warn(obj: object, msg: string): void };
}

const DEFAULT_PACE = { requests: 1000, windowMs: 10_000 };
const TRANSIENT_BACKOFF_MS = 250;

interface Job {
  alg: SignatureAlgorithm;
  hash: string;
  data: Buffer;
  digest: Buffer;
  deadline: number;
  attempts: number;
  resolve(signature: Buffer): void;
  reject(err: Error): void;
}

export class KeyVaultCaKey implements CaKey {
  readonly description: string;
  readonly keyType: 'ec' | 'rsa';
  /** The versioned key identifier every signature uses. */
  readonly keyId: string;
  /** P-256/P-384 for EC keys. */
  readonly curve?: 'P-256' | 'P-384';
  private readonly pace: { requests: number; windowMs: number };
  private readonly maxInFlight: number;
  private readonly maxWaitMs: number;
  private readonly queue: Job[] = [];
  private readonly started: number[] = [];
  private inFlight = 0;
  private pausedUntil = 0;
  private timer: NodeJS.Timeout | null = null;
  private closed = false;
  private readonly idle: Array<() => void> = [];

  private constructor(
    readonly publicKey: KeyObject,
    private readonly key: KeyVaultKey,
    private readonly crypto: CryptographyClient,
    private readonly opts: KeyVaultCaKeyOptions,
  ) {
    this.keyId = key.id!;
    this.description = `keyvault:${this.keyId}`;
    this.keyType = publicKey.asymmetricKeyType === 'ec' ? 'ec' : 'rsa';
    if (this.keyType === 'ec') this.curve = key.key!.crv as 'P-256' | 'P-384';
    this.pace = opts.pace ?? DEFAULT_PACE;
    this.maxInFlight = opts.maxInFlight ?? 16;
    this.maxWaitMs = opts.maxWaitMs ?? 10_000;
    if (!(this.pace.requests >= 1 && this.pace.windowMs >= 1 && this.maxInFlight >= 1 && this.maxWaitMs >= 0)) {
      throw new LeafgateError('internal', 'Key Vault pacing: pace.requests, pace.windowMs and maxInFlight must be positive');
    }
  }

  /**
   * Reads the key (Get Key: keys/get permission), creating it first when it does not exist
   * and `create` says how (Create Key: keys/create). The key must allow `sign`, be enabled, and
   * be EC P-256/P-384 or RSA 2048-4096. Failures here are configuration errors (`internal`):
   * the authority does not start on a key it cannot use.
   */
  static async open(opts: KeyVaultCaKeyOptions): Promise<KeyVaultCaKey> {
    // Start-up is not on anyone's request path: the key is read with the SDK's own retry
    // policy (3 retries, honouring Retry-After on 429); signing uses the paced queue below.
    const keys = new KeyClient(opts.vaultUrl, opts.credential, { ...opts.clientOptions });
    const where = `Key Vault key ${opts.keyName}${opts.keyVersion ? `/${opts.keyVersion}` : ''} in ${opts.vaultUrl}`;
    let key: KeyVaultKey;
    try {
      key = await keys.getKey(opts.keyName, opts.keyVersion ? { version: opts.keyVersion } : {});
    } catch (err) {
      if (statusOf(err) !== 404 || !opts.create || opts.keyVersion) throw openError(`cannot read ${where}`, err);
      try {
        key = await createKey(keys, opts.keyName, opts.create);
      } catch (e) {
        throw openError(`cannot create ${where}`, e);
      }
      opts.logger?.info({ key: key.id, kty: key.keyType }, 'CA key created in Key Vault (key_ops: sign)');
    }
    const jwk = key.key;
    if (!jwk || !key.id) throw new LeafgateError('internal', `${where}: Key Vault answered no key material`);
    if (key.properties.enabled === false) throw new LeafgateError('internal', `${where} is disabled`);
    if (!(key.keyOperations ?? []).includes('sign')) {
      throw new LeafgateError('internal', `${where} does not allow the sign operation (key_ops: ${(key.keyOperations ?? []).join(', ') || 'none'}): update it with \`az keyvault key set-attributes --ops sign\``);
    }
    const publicKey = publicKeyOf(key, where);
    const crypto = new CryptographyClient(key, opts.credential, sdkOptions(opts));
    opts.logger?.info({ key: key.id, kty: key.keyType }, 'CA key in Key Vault');
    return new KeyVaultCaKey(publicKey, key, crypto, opts);
  }

  sign(hash: string, data: Buffer): Promise<Buffer> {
    if (this.closed) return Promise.reject(new LeafgateError('authority_unavailable', 'the Key Vault CA key is closed', { retryAfterMs: 1000 }));
    let alg: SignatureAlgorithm;
    try {
      alg = this.algorithmFor(hash);
    } catch (err) {
      return Promise.reject(err);
    }
    const digest = createHash(hash).update(data).digest();
    return new Promise<Buffer>((resolve, reject) => {
      const now = Date.now();
      // A wait already known to exceed the budget fails now rather than at its deadline.
      const wait = this.expectedWaitMs(now, this.queue.length + 1);
      if (wait > this.maxWaitMs) {
        reject(new LeafgateError('authority_unavailable', 'the Key Vault signing queue is full', { retryAfterMs: Math.max(1000, Math.ceil(wait)) }));
        return;
      }
      this.queue.push({ alg, hash, data, digest, deadline: now + this.maxWaitMs, attempts: 0, resolve, reject });
      this.pump();
    });
  }

  /** Stops signing: queued calls fail (`authority_unavailable`), calls in flight are awaited. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    for (const job of this.queue.splice(0)) job.reject(new LeafgateError('authority_unavailable', 'the authority is closing', { retryAfterMs: 1000 }));
    if (this.inFlight > 0) await new Promise<void>((r) => this.idle.push(r));
  }

  /** The JWS algorithm for a hash on this key: Key Vault refuses ES256 on P-384 and the like. */
  private algorithmFor(hash: string): SignatureAlgorithm {
    const h = hash.toLowerCase().replace('-', '');
    if (this.keyType === 'ec') {
      const want = this.curve === 'P-384' ? 'sha384' : 'sha256';
      if (h !== want) throw new LeafgateError('internal', `an EC ${this.curve} key in Key Vault signs with ${want} only (asked: ${hash})`);
      return this.curve === 'P-384' ? 'ES384' : 'ES256';
    }
    const rs: Record<string, SignatureAlgorithm> = { sha256: 'RS256', sha384: 'RS384', sha512: 'RS512' };
    if (!rs[h]) throw new LeafgateError('internal', `an RSA key in Key Vault signs with sha256, sha384 or sha512 (asked: ${hash})`);
    return rs[h];
  }

  /** How long the n-th call from now would wait for its turn, from the pace alone (a lower bound). */
  private expectedWaitMs(now: number, n: number): number {
    const windows = Math.floor((this.started.filter((t) => t > now - this.pace.windowMs).length + n - 1) / this.pace.requests);
    return Math.max(0, this.pausedUntil - now) + windows * this.pace.windowMs;
  }

  private pump(): void {
    if (this.timer || this.closed) return;
    for (;;) {
      const now = Date.now();
      while (this.queue.length && this.queue[0].deadline < now) {
        const job = this.queue.shift()!;
        job.reject(new LeafgateError('authority_unavailable', 'Key Vault did not sign in time', { retryAfterMs: Math.max(1000, this.pausedUntil - now) }));
      }
      if (!this.queue.length || this.inFlight >= this.maxInFlight) return;
      if (now < this.pausedUntil) return this.wakeAt(this.pausedUntil);
      while (this.started.length && this.started[0] <= now - this.pace.windowMs) this.started.shift();
      if (this.started.length >= this.pace.requests) return this.wakeAt(this.started[0] + this.pace.windowMs);
      const job = this.queue.shift()!;
      this.started.push(now);
      this.inFlight++;
      void this.call(job).finally(() => {
        this.inFlight--;
        if (this.inFlight === 0) for (const r of this.idle.splice(0)) r();
        this.pump();
      });
    }
  }

  /** Runs the pump again at `t`, or sooner when the first queued call's deadline comes first. */
  private wakeAt(t: number): void {
    if (this.queue.length) t = Math.min(t, this.queue[0].deadline + 1);
    this.timer = setTimeout(() => {
      this.timer = null;
      this.pump();
    }, Math.max(1, t - Date.now()));
  }

  private async call(job: Job): Promise<void> {
    job.attempts++;
    let raw: Uint8Array;
    try {
      // A call that hangs (a black-holed connection) ends with the caller's budget.
      raw = (await this.crypto.sign(job.alg, job.digest, { abortSignal: AbortSignal.timeout(Math.max(1, job.deadline - Date.now())) })).result;
    } catch (err) {
      const status = statusOf(err);
      const now = Date.now();
      if (status === 429) {
        const retryAfterMs = retryAfterOf(err) ?? 1000;
        if (now + retryAfterMs > this.pausedUntil) {
          this.pausedUntil = now + retryAfterMs;
          this.opts.logger?.warn({ key: this.keyId, retryAfterMs }, 'Key Vault throttles signing (429): pausing');
        }
        if (this.pausedUntil <= job.deadline) this.queue.unshift(job);
        else job.reject(new LeafgateError('authority_unavailable', 'Key Vault throttles signing', { retryAfterMs, cause: err }));
        return;
      }
      const transient = status === undefined || status === 408 || status >= 500;
      const backoff = TRANSIENT_BACKOFF_MS * 2 ** (job.attempts - 1);
      if (transient && now + backoff <= job.deadline && !this.closed) {
        setTimeout(() => {
          if (this.closed) return job.reject(new LeafgateError('authority_unavailable', 'the authority is closing', { retryAfterMs: 1000 }));
          this.queue.unshift(job);
          this.pump();
        }, backoff);
        return;
      }
      this.opts.logger?.warn({ key: this.keyId, status, err: messageOf(err) }, 'Key Vault sign failed');
      job.reject(new LeafgateError('authority_unavailable', `Key Vault sign failed${status ? ` (${status})` : ''}`, { retryAfterMs: transient ? 5000 : 60_000, cause: err }));
      return;
    }
    try {
      job.resolve(this.x509Signature(job, Buffer.from(raw)));
    } catch (err) {
      job.reject(err as Error);
    }
  }

  /**
   * The signature as X.509 carries it, checked against the public key first: a signature made
   * by another key version, or damaged on the way, must never end up in a certificate.
   */
  private x509Signature(job: Job, raw: Buffer): Buffer {
    let signature: Buffer | null = raw;
    if (this.keyType === 'ec') {
      try {
        signature = ecdsaRawToDer(raw);
      } catch {
        signature = null;
      }
    }
    if (!signature || !cryptoVerify(job.hash, job.data, this.publicKey, signature)) {
      this.opts.logger?.warn({ key: this.keyId }, 'Key Vault answered a signature that does not verify with the CA public key');
      throw new LeafgateError('authority_unavailable', 'the signature from Key Vault does not verify with the CA key', { retryAfterMs: 60_000 });
    }
    return signature;
  }
}

/** JWS ECDSA (r || s, each the curve's size) to DER ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER } (RFC 3279 2.2.3). */
export function ecdsaRawToDer(raw: Buffer): Buffer {
  if (raw.length === 0 || raw.length % 2) throw new LeafgateError('internal', 'an ECDSA r||s signature has an even, non-zero length');
  const half = raw.length / 2;
  return pkix.der.seq(pkix.der.integer(raw.subarray(0, half)), pkix.der.integer(raw.subarray(half)));
}

// ---- credentials ------------------------------------------------------------------------------

/**
 * How the authority signs in to Microsoft Entra ID for Key Vault: a managed identity on
 * Azure (no secret at all), else a service principal whose client secret comes from a file
 * (`clientSecretFile`, e.g. a mounted Kubernetes/Docker secret) or the environment
 * (`AZURE_CLIENT_SECRET`) -- never from the command line or the configuration file, and never
 * logged.
 */
export type KeyVaultCredentialConfig =
  | { kind: 'managedIdentity'; clientId?: string }
  | { kind: 'clientSecret'; tenantId?: string; clientId?: string; clientSecretFile?: string; authorityHost?: string };

export function keyVaultCredential(
  cfg: KeyVaultCredentialConfig,
  opts: { env?: NodeJS.ProcessEnv; tlsOptions?: KeyClientOptions['tlsOptions'] } = {},
): TokenCredential {
  const env = opts.env ?? process.env;
  if (cfg.kind === 'managedIdentity') {
    const clientId = cfg.clientId ?? env.AZURE_CLIENT_ID;
    return clientId ? new ManagedIdentityCredential({ clientId }) : new ManagedIdentityCredential();
  }
  const tenantId = cfg.tenantId ?? env.AZURE_TENANT_ID;
  const clientId = cfg.clientId ?? env.AZURE_CLIENT_ID;
  if (!tenantId || !clientId) throw new LeafgateError('internal', 'Key Vault service principal: tenantId and clientId are required (or AZURE_TENANT_ID / AZURE_CLIENT_ID)');
  let secret: string | undefined;
  if (cfg.clientSecretFile) {
    try {
      secret = readFileSync(cfg.clientSecretFile, 'utf8').trim();
    } catch (err) {
      throw new LeafgateError('internal', `cannot read the Key Vault client secret file ${cfg.clientSecretFile}: ${(err as NodeJS.ErrnoException).code ?? 'error'}`);
    }
  } else secret = env.AZURE_CLIENT_SECRET;
  if (!secret) throw new LeafgateError('internal', 'Key Vault service principal: no client secret (set clientSecretFile or AZURE_CLIENT_SECRET)');
  const authorityHost = cfg.authorityHost ?? env.AZURE_AUTHORITY_HOST;
  return new ClientSecretCredential(tenantId, clientId, secret, {
    ...(authorityHost ? { authorityHost } : {}),
    ...(opts.tlsOptions ? { tlsOptions: opts.tlsOptions } : {}),
    // A private authority host (sovereign cloud, Azure Stack, a stand-in) is not in Entra's
    // public instance-discovery list.
    ...(authorityHost ? { disableInstanceDiscovery: true } : {}),
  });
}

// ---- helpers ----------------------------------------------------------------------------------

function sdkOptions(opts: KeyVaultCaKeyOptions): KeyClientOptions {
  return { ...opts.clientOptions, retryOptions: { maxRetries: 0 } };
}

async function createKey(keys: KeyClient, name: string, spec: KeyVaultKeySpec): Promise<KeyVaultKey> {
  const hsm = spec.kty.endsWith('-HSM');
  // key_ops: sign only -- the CA key can do nothing else, whatever a role would allow.
  if (spec.kty === 'EC' || spec.kty === 'EC-HSM') return keys.createEcKey(name, { curve: (spec as { curve: 'P-256' | 'P-384' }).curve, hsm, keyOps: ['sign'] });
  return keys.createRsaKey(name, { keySize: (spec as { size: number }).size, hsm, keyOps: ['sign'] });
}

function publicKeyOf(key: KeyVaultKey, where: string): KeyObject {
  const j = key.key!;
  const b64 = (v?: Uint8Array) => (v ? Buffer.from(v).toString('base64url') : '');
  let publicKey: KeyObject;
  if (j.kty === 'EC' || j.kty === 'EC-HSM') {
    if (j.crv !== 'P-256' && j.crv !== 'P-384') throw new LeafgateError('internal', `${where}: curve ${j.crv} is not supported (P-256 or P-384)`);
    publicKey = createPublicKey({ key: { kty: 'EC', crv: j.crv, x: b64(j.x), y: b64(j.y) }, format: 'jwk' });
  } else if (j.kty === 'RSA' || j.kty === 'RSA-HSM') {
    publicKey = createPublicKey({ key: { kty: 'RSA', n: b64(j.n), e: b64(j.e) }, format: 'jwk' });
    const bits = publicKey.asymmetricKeyDetails?.modulusLength ?? 0;
    if (bits < 2048 || bits > 4096) throw new LeafgateError('internal', `${where}: RSA-${bits} is not supported (2048 to 4096)`);
  } else {
    throw new LeafgateError('internal', `${where}: key type ${j.kty} cannot sign certificates (EC or RSA)`);
  }
  return publicKey;
}

function statusOf(err: unknown): number | undefined {
  const s = (err as { statusCode?: unknown })?.statusCode;
  return typeof s === 'number' ? s : undefined;
}

function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Retry-After (seconds or HTTP date), or Azure's retry-after-ms / x-ms-retry-after-ms, in ms. */
export function retryAfterOf(err: unknown): number | undefined {
  const headers = (err as { response?: { headers?: { get(name: string): string | undefined } } })?.response?.headers;
  if (!headers) return undefined;
  for (const name of ['retry-after-ms', 'x-ms-retry-after-ms']) {
    const v = Number(headers.get(name));
    if (headers.get(name) && Number.isFinite(v) && v >= 0) return v;
  }
  const ra = headers.get('retry-after');
  if (!ra) return undefined;
  if (/^\d+$/.test(ra.trim())) return Number(ra.trim()) * 1000;
  const at = Date.parse(ra);
  return Number.isFinite(at) ? Math.max(0, at - Date.now()) : undefined;
}

function openError(what: string, err: unknown): LeafgateError {
  const status = statusOf(err);
  const code = (err as { code?: unknown })?.code;
  const hint = status === 401 || status === 403 ? ' (check the identity and its role on the vault: Key Vault Crypto User to sign, Crypto Officer to create)' : '';
  return new LeafgateError('internal', `${what}: ${status ?? ''} ${typeof code === 'string' ? code : ''} ${messageOf(err)}${hint}`.replace(/\s+/g, ' ').trim(), { cause: err });
}

// ---- configuration ----------------------------------------------------------------------------

/** The key `authority init` creates when it is missing: EC P-256 (default), EC P-384 or RSA 3072, as for PKCS#11. */
export type KeyVaultKeyType = 'ec-256' | 'ec-384' | 'rsa-3072';
export const KEYVAULT_KEY_TYPES: readonly KeyVaultKeyType[] = ['ec-256', 'ec-384', 'rsa-3072'];

/**
 * `caKeys.keyvault` in the authority configuration (the CA key store `keyvault`): where the
 * device CA's key is, how to sign in, how fast to go. No secret is ever part of it: the client
 * secret is read from `credential.clientSecretFile` or AZURE_CLIENT_SECRET. The schema (with
 * its defaults and descriptions) is in authority/config.ts.
 */
export interface KeyVaultStoreConfig {
  vaultUrl: string;
  keyName: string;
  keyVersion?: string;
  /** What `authority init` creates when the key does not exist (default ec-256); start never creates. */
  keyType: KeyVaultKeyType;
  /** An HSM-protected key (EC-HSM / RSA-HSM, Premium vault; default) or a software one (Standard vault). */
  hsm: boolean;
  credential: KeyVaultCredentialConfig;
  /** Sign calls per 10 s (default 1,000); see the limits at the top of this file. */
  signsPer10s?: number;
  maxInFlight?: number;
  maxWaitMs?: number;
  /** PEM file of the CAs trusted for the vault and the token endpoint, instead of the system's. */
  tlsCaFile?: string;
  /** Skips the SDK's check that the challenge's resource matches the vault's domain (a vault under another name). */
  disableChallengeResourceVerification?: boolean;
}

export type KeyVaultStoreConfigInput = Partial<Omit<KeyVaultStoreConfig, 'credential'>> & { credential?: Partial<KeyVaultCredentialConfig> & { kind?: string; clientSecret?: unknown } };

const KV = 'caKeys.keyvault';
const bad = (key: string, why: string): never => configError('authority config', key, why);

/** Validates `caKeys.keyvault` and fills in its defaults, with LEAFGATE_KEYVAULT_URL / LEAFGATE_KEYVAULT_KEY as fallbacks. */
export function resolveKeyVaultStoreConfig(input: KeyVaultStoreConfigInput | undefined, env: NodeJS.ProcessEnv = process.env): KeyVaultStoreConfig {
  const vaultUrl = input?.vaultUrl ?? (env.LEAFGATE_KEYVAULT_URL || undefined);
  const keyName = input?.keyName ?? (env.LEAFGATE_KEYVAULT_KEY || undefined);
  if (!vaultUrl || !/^https:\/\/[^/\s]+\/?$/.test(vaultUrl)) bad(`${KV}.vaultUrl`, `must be https://{vault}.vault.azure.net (env LEAFGATE_KEYVAULT_URL)${vaultUrl ? ` (got ${JSON.stringify(vaultUrl)})` : ''}`);
  if (!keyName || !/^[A-Za-z0-9-]{1,127}$/.test(keyName)) bad(`${KV}.keyName`, 'must be 1-127 letters, digits and dashes (env LEAFGATE_KEYVAULT_KEY)');
  if (input?.keyVersion !== undefined && !/^[0-9a-f]{32}$/.test(input.keyVersion)) bad(`${KV}.keyVersion`, 'must be a key version: 32 hex digits');
  if (input?.credential && 'clientSecret' in input.credential) {
    bad(`${KV}.credential.clientSecret`, 'a client secret is never put in the configuration; use clientSecretFile or AZURE_CLIENT_SECRET');
  }
  // Default: a service principal when AZURE_CLIENT_SECRET is set, else the managed identity
  // (a user-assigned one by AZURE_CLIENT_ID).
  const credential = { ...(input?.credential ?? (env.AZURE_CLIENT_SECRET ? { kind: 'clientSecret' } : { kind: 'managedIdentity' })) } as KeyVaultCredentialConfig;
  if (credential.kind !== 'managedIdentity' && credential.kind !== 'clientSecret') bad(`${KV}.credential.kind`, 'must be managedIdentity or clientSecret');
  if (credential.kind === 'managedIdentity') {
    for (const k of ['tenantId', 'clientSecretFile', 'authorityHost']) if (k in credential) bad(`${KV}.credential.${k}`, 'is for kind clientSecret (a service principal), not managedIdentity');
  }
  const keyType = input?.keyType ?? 'ec-256';
  if (!KEYVAULT_KEY_TYPES.includes(keyType)) bad(`${KV}.keyType`, `must be ${KEYVAULT_KEY_TYPES.join(', ')}`);
  for (const [k, v] of Object.entries({ signsPer10s: input?.signsPer10s, maxInFlight: input?.maxInFlight, maxWaitMs: input?.maxWaitMs })) {
    if (v !== undefined && !(Number.isInteger(v) && v >= 1)) bad(`${KV}.${k}`, 'must be a positive integer');
  }
  return stripUndefined({
    vaultUrl: vaultUrl!.replace(/\/$/, ''), keyName: keyName!, keyVersion: input?.keyVersion, keyType, hsm: input?.hsm ?? true, credential,
    signsPer10s: input?.signsPer10s, maxInFlight: input?.maxInFlight, maxWaitMs: input?.maxWaitMs,
    tlsCaFile: input?.tlsCaFile, disableChallengeResourceVerification: input?.disableChallengeResourceVerification ?? false,
  });
}

/** The Key Vault key a key type and `hsm` stand for. */
export function keyVaultKeySpec(keyType: KeyVaultKeyType, hsm: boolean): KeyVaultKeySpec {
  if (keyType === 'rsa-3072') return { kty: hsm ? 'RSA-HSM' : 'RSA', size: 3072 };
  return { kty: hsm ? 'EC-HSM' : 'EC', curve: keyType === 'ec-384' ? 'P-384' : 'P-256' };
}

/**
 * The authority's way in: the CA key from `caKeys.keyvault` (resolved), its credential built
 * here. `create` (`authority init`): a missing key is created as `keyType`/`hsm` say; at start
 * it must exist.
 */
export function openKeyVaultCaKey(
  cfg: KeyVaultStoreConfig,
  opts: { create?: boolean; env?: NodeJS.ProcessEnv; logger?: KeyVaultCaKeyOptions['logger']; clientOptions?: KeyVaultCaKeyOptions['clientOptions'] } = {},
): Promise<KeyVaultCaKey> {
  let clientOptions = opts.clientOptions;
  if (!clientOptions && (cfg.tlsCaFile || cfg.disableChallengeResourceVerification)) {
    let ca: string | undefined;
    if (cfg.tlsCaFile) {
      try {
        ca = readFileSync(cfg.tlsCaFile, 'utf8');
      } catch (err) {
        throw new LeafgateError('internal', `cannot read ${KV}.tlsCaFile ${cfg.tlsCaFile}: ${(err as NodeJS.ErrnoException).code ?? 'error'}`);
      }
    }
    clientOptions = { ...(ca ? { tlsOptions: { ca } } : {}), ...(cfg.disableChallengeResourceVerification ? { disableChallengeResourceVerification: true } : {}) };
  }
  let credential: TokenCredential;
  try {
    credential = keyVaultCredential(cfg.credential, { env: opts.env, tlsOptions: clientOptions?.tlsOptions });
  } catch (err) {
    return Promise.reject(err);
  }
  return KeyVaultCaKey.open({
    vaultUrl: cfg.vaultUrl,
    keyName: cfg.keyName,
    keyVersion: cfg.keyVersion,
    create: opts.create ? keyVaultKeySpec(cfg.keyType, cfg.hsm) : undefined,
    credential,
    pace: cfg.signsPer10s ? { requests: cfg.signsPer10s, windowMs: 10_000 } : undefined,
    maxInFlight: cfg.maxInFlight,
    maxWaitMs: cfg.maxWaitMs,
    clientOptions,
    logger: opts.logger,
  });
}

function stripUndefined<T extends object>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T;
}
