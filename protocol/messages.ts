/**
 * Message schemas of the wire contract, with validators. Every message is JSON (UTF-8);
 * certificates and CSRs are PEM strings. A validator either returns the typed message or
 * throws a LeafgateError (`malformed_json` / `bad_request`), so every entry point -- the
 * gateway's topic handler and the authority's HTTP routes -- refuses bad input the same way.
 */
import { createHash } from 'node:crypto';
import { LeafgateError } from './errors.ts';
import { isValidDeviceId } from './topics.ts';

export const AUTH_METHODS = ['pki-signature', 'ddkg'] as const;
export type AuthMethod = (typeof AUTH_METHODS)[number];

export type KeyType = 'ec' | 'rsa';
export interface KeySpec {
  keyType: KeyType;
  /** Curve size for EC (256 = P-256, 384 = P-384), modulus bits for RSA. */
  keySize: number;
}

/** Size caps, applied before any parsing beyond JSON. */
export const LIMITS = {
  /** Bytes of one onboarding message (register/auth/csr) on the wire. */
  onboardingPayloadBytes: 16 * 1024,
  /** Bytes of one telemetry message. */
  telemetryPayloadBytes: 64 * 1024,
  pemChars: 12 * 1024,
  requestIdChars: 64,
  signatureChars: 2048,
  enrollmentCodeChars: 128,
  groupChars: 64,
} as const;

/**
 * How long a gateway waits for the authority's answer to one request before it gives up and
 * retries it from its durable queue (cloud-bridge/authority-client.ts). The authority answers
 * within less (an external CA's slow answer: `authority_unavailable` with retryAfterMs, see
 * deviceIssuer.answerWithinMs), so that a retry never races a request still being answered.
 */
export const GATEWAY_AUTHORITY_TIMEOUT_MS = 15_000;

const REQUEST_ID_PATTERN = /^[A-Za-z0-9._:-]{1,64}$/;
const GROUP_PATTERN = /^[A-Za-z0-9._-]{1,64}$/;
const BASE64_PATTERN = /^[A-Za-z0-9+/]+={0,2}$/;
/** ISO 8601 UTC with optional milliseconds, as Date.prototype.toISOString writes it. */
const ISO_UTC_PATTERN = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,3})?Z$/;

/** Device -> gateway: start onboarding. */
export interface RegisterMessage {
  requestId: string;
  method: AuthMethod;
  /** Device group whose policy applies; the authority's default group when absent. */
  group?: string;
  /** pki-signature: the birth certificate (PEM) from the manufacturer CA. */
  birthCert?: string;
  /** ddkg: one-time enrollment code for the first enrollment, when the policy asks for one. */
  enrollmentCode?: string;
  /** Key types the device can generate, most preferred first. */
  keyPreference?: KeySpec[];
  /**
   * Gateway -> authority only: the device started the compact flow (`up/begin`); the
   * challenge then carries the instruction and is answered by `enroll`, not `auth`.
   */
  compact?: true;
}

/** Gateway -> device: prove possession. */
export interface ChallengeMessage {
  requestId: string;
  challengeId: string;
  /** base64, 32 random bytes. */
  nonce: string;
  expiresAt: string;
  method: AuthMethod;
  /** ddkg: base64 authority salt for HKDF (RFC 5869); stable per device. */
  salt?: string;
}

/** What the compact flow's offer tells the device to request (the instruction without its per-request fields). */
export type OfferedInstruction = Pick<InstructionMessage, 'subject' | 'keyType' | 'keySize' | 'sans' | 'validityDays'>;

/**
 * Gateway -> device on `down/offer`, the answer to `up/begin` (compact flow): the challenge
 * and, in the same message, the certificate to request. Answered by `enroll` before `expiresAt`.
 */
export interface OfferMessage extends ChallengeMessage {
  instruction: OfferedInstruction;
}

/**
 * Device -> gateway on `up/enroll` (compact flow): the answer to an offer's challenge and the
 * CSR under ONE signature by the device's authentication key (birth-certificate key or ddkg
 * key) over `enrollSigningInput(...)`. Needs no prior auth and no particular connection:
 * the signature binds the CSR to the challenge. Answered by `cert`-shaped `down/enrolled`.
 */
export interface EnrollMessage {
  requestId: string;
  challengeId: string;
  /** PEM PKCS#10 request made as the offer's instruction says. */
  csr: string;
  /** base64: ECDSA (DER) or RSASSA-PKCS1-v1_5, SHA-256, over enrollSigningInput. */
  signature: string;
  /** ddkg: the re-derived public key (SPKI PEM); required at first enrollment. */
  publicKey?: string;
}

/** Device -> gateway: the signed challenge. */
export interface AuthMessage {
  requestId: string;
  challengeId: string;
  /** base64 signature over `challengeSigningInput(...)`: ECDSA (DER) or RSASSA-PKCS1-v1_5, SHA-256. */
  signature: string;
  /** ddkg: the re-derived public key (SPKI PEM); required at first enrollment. */
  publicKey?: string;
}

/** Gateway -> device: what certificate to request. */
export interface InstructionMessage {
  requestId: string;
  subject: { commonName: string };
  keyType: KeyType;
  keySize: number;
  sans: { dns: string[]; uri: string[] };
  validityDays: number;
  /** The CSR must arrive before this time, or the device authenticates again. */
  csrDeadline: string;
  /** Set when the gateway asks a connected device to renew: answer with a CSR over the mTLS session. */
  renewal?: boolean;
  /** Serial of the certificate a renewal replaces. */
  replaces?: string;
}

/** Device -> gateway: the PKCS#10 request (RFC 2986). */
export interface CsrMessage {
  requestId: string;
  csr: string;
}

/**
 * Device -> gateway over its mTLS session: a renewal CSR, with the device's proof that it
 * holds the key of the certificate being replaced. `proof` and `signedAt` come together.
 */
export interface RenewalCsrMessage extends CsrMessage {
  /** base64 signature over `renewalSigningInput(...)` by the CURRENT certificate's private key: ECDSA (DER) or RSASSA-PKCS1-v1_5, SHA-256. */
  proof?: string;
  /** When the device signed (ISO 8601 UTC, e.g. 2025-01-31T12:00:00.000Z); the authority accepts a window around its clock. */
  signedAt?: string;
}

/** Gateway -> device: the issued certificate. */
export interface CertMessage {
  requestId: string;
  certificate: string;
  /** Issuing CA first, then up to the root. */
  chain: string[];
  serial: string;
  notBefore: string;
  notAfter: string;
}

/** Gateway -> device: the request is queued; the answer follows on its topic. */
export interface PendingMessage {
  requestId: string;
  retryAfterMs: number;
}

/** Gateway -> authority bodies: the device message plus the device id the gateway vouches for. */
export type DeviceScoped<T> = T & { deviceId: string };

/** Bytes every auth method signs: binds the answer to device, challenge and nonce. */
export function challengeSigningInput(deviceId: string, challengeId: string, nonce: string): Buffer {
  return Buffer.from(`leafgate-auth-v1\n${deviceId}\n${challengeId}\n${nonce}`, 'utf8');
}

/**
 * Bytes a device signs to renew: binds the proof to the device, the request, the exact new
 * CSR (sha256 of its DER, base64url without padding) and the signing time, so that it can
 * be replayed neither for another CSR, another request nor later.
 */
export function renewalSigningInput(deviceId: string, requestId: string, csrDer: Uint8Array, signedAt: string): Buffer {
  return Buffer.from(`leafgate-renew-v1\n${deviceId}\n${requestId}\n${csrHashOf(csrDer)}\n${signedAt}`, 'utf8');
}

/** base64url (no padding) of the SHA-256 of a CSR's DER, as the signing inputs carry it. */
export function csrHashOf(csrDer: Uint8Array): string {
  return createHash('sha256').update(csrDer).digest('base64url');
}

/**
 * Bytes a device signs in the compact flow (`enroll`): the challenge (device, challenge id,
 * nonce text) AND the exact CSR (sha256 of its DER, base64url without padding), so that
 * nobody who relays the answer -- the gateway included -- can attach another CSR to it.
 * Domain-separated from the auth and renewal inputs by its first line.
 */
export function enrollSigningInput(deviceId: string, challengeId: string, nonce: string, csrDer: Uint8Array): Buffer {
  return Buffer.from(`leafgate-enroll-v1\n${deviceId}\n${challengeId}\n${nonce}\n${csrHashOf(csrDer)}`, 'utf8');
}

// ---- validation ------------------------------------------------------------------------

type Obj = Record<string, unknown>;

function bad(message: string): never {
  throw new LeafgateError('bad_request', message);
}

/** Parses a JSON payload that must be an object; size is checked by the caller's cap. */
export function parseJsonObject(payload: Buffer | string): Obj {
  let value: unknown;
  try {
    value = JSON.parse(typeof payload === 'string' ? payload : payload.toString('utf8'));
  } catch {
    throw new LeafgateError('malformed_json');
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) throw new LeafgateError('malformed_json');
  return value as Obj;
}

function onlyKeys(o: Obj, allowed: readonly string[]): void {
  for (const k of Object.keys(o)) if (!allowed.includes(k)) bad(`unknown field ${JSON.stringify(k.slice(0, 40))}`);
}

function str(o: Obj, key: string, max: number, pattern?: RegExp): string {
  const v = o[key];
  if (typeof v !== 'string' || v.length === 0) bad(`${key} must be a non-empty string`);
  if (v.length > max) bad(`${key} exceeds ${max} characters`);
  if (pattern && !pattern.test(v)) bad(`${key} has invalid characters`);
  return v;
}

function optStr(o: Obj, key: string, max: number, pattern?: RegExp): string | undefined {
  return o[key] === undefined ? undefined : str(o, key, max, pattern);
}

function pem(o: Obj, key: string, label: string): string {
  const v = str(o, key, LIMITS.pemChars);
  if (!v.includes(`-----BEGIN ${label}-----`)) bad(`${key} must be a PEM ${label}`);
  return v;
}

export function requestIdOf(o: Obj): string | undefined {
  const v = o.requestId;
  return typeof v === 'string' && REQUEST_ID_PATTERN.test(v) ? v : undefined;
}

const REQUEST_ID_KEY = Buffer.from('"requestId"', 'latin1');
/** Octets read at each end of a payload that is too large to parse. */
export const REQUEST_ID_SCAN_BYTES = 512;

const isJsonSpace = (b: number) => b === 0x20 || b === 0x09 || b === 0x0a || b === 0x0d;
const isRequestIdByte = (b: number) =>
  (b >= 0x41 && b <= 0x5a) || (b >= 0x61 && b <= 0x7a) || (b >= 0x30 && b <= 0x39) || b === 0x2e || b === 0x5f || b === 0x3a || b === 0x2d;

/** `"requestId": "<valid id>"` as a member of the object at `at` in `win`, or undefined. */
function requestIdAt(win: Buffer, at: number): string | undefined {
  let i = at - 1;
  while (i >= 0 && isJsonSpace(win[i])) i--;
  if (i < 0 || (win[i] !== 0x7b && win[i] !== 0x2c)) return undefined; // a member starts after { or ,
  i = at + REQUEST_ID_KEY.length;
  while (i < win.length && isJsonSpace(win[i])) i++;
  if (win[i++] !== 0x3a) return undefined; // :
  while (i < win.length && isJsonSpace(win[i])) i++;
  if (win[i++] !== 0x22) return undefined; // opening quote
  const start = i;
  while (i < win.length && i - start <= LIMITS.requestIdChars && isRequestIdByte(win[i])) i++;
  if (win[i] !== 0x22 || i === start || i - start > LIMITS.requestIdChars) return undefined;
  return win.toString('latin1', start, i);
}

/**
 * The requestId of a payload too large to parse (a refusal still names the request it
 * answers): a bounded scan of the first and last REQUEST_ID_SCAN_BYTES octets for a
 * `"requestId": "..."` member whose value is a valid requestId (the REQUEST_ID_PATTERN set, no
 * escapes). Anything else -- an escaped or overlong value, a key elsewhere -- gives undefined.
 */
export function requestIdOfRaw(payload: Buffer | string): string | undefined {
  const buf = typeof payload === 'string' ? Buffer.from(payload.length > 2 * REQUEST_ID_SCAN_BYTES ? payload.slice(0, REQUEST_ID_SCAN_BYTES) + payload.slice(-REQUEST_ID_SCAN_BYTES) : payload, 'utf8') : payload;
  const windows = buf.length <= 2 * REQUEST_ID_SCAN_BYTES ? [buf] : [buf.subarray(0, REQUEST_ID_SCAN_BYTES), buf.subarray(buf.length - REQUEST_ID_SCAN_BYTES)];
  for (const win of windows) {
    for (let at = win.indexOf(REQUEST_ID_KEY); at !== -1; at = win.indexOf(REQUEST_ID_KEY, at + 1)) {
      const id = requestIdAt(win, at);
      if (id !== undefined) return id;
    }
  }
  return undefined;
}

export function isKeySpec(v: unknown): v is KeySpec {
  if (v === null || typeof v !== 'object') return false;
  const k = v as Obj;
  return (k.keyType === 'ec' || k.keyType === 'rsa') && Number.isInteger(k.keySize) && Object.keys(k).length === 2;
}

/** `compactFlag`: the authority's route, where the gateway marks a compact (`begin`) register. */
export function validateRegister(o: Obj, opts: { compactFlag?: boolean } = {}): RegisterMessage {
  onlyKeys(o, opts.compactFlag ? ['requestId', 'method', 'group', 'birthCert', 'enrollmentCode', 'keyPreference', 'deviceId', 'compact'] : ['requestId', 'method', 'group', 'birthCert', 'enrollmentCode', 'keyPreference', 'deviceId']);
  const requestId = str(o, 'requestId', LIMITS.requestIdChars, REQUEST_ID_PATTERN);
  const method = o.method;
  if (!AUTH_METHODS.includes(method as AuthMethod)) bad(`method must be one of ${AUTH_METHODS.join(', ')}`);
  const msg: RegisterMessage = { requestId, method: method as AuthMethod };
  const group = optStr(o, 'group', LIMITS.groupChars, GROUP_PATTERN);
  if (group !== undefined) msg.group = group;
  if (method === 'pki-signature') msg.birthCert = pem(o, 'birthCert', 'CERTIFICATE');
  else if (o.birthCert !== undefined) bad('birthCert is only used with pki-signature');
  const code = optStr(o, 'enrollmentCode', LIMITS.enrollmentCodeChars);
  if (code !== undefined) msg.enrollmentCode = code;
  if (o.keyPreference !== undefined) {
    const kp = o.keyPreference;
    if (!Array.isArray(kp) || kp.length === 0 || kp.length > 8 || !kp.every(isKeySpec)) bad('keyPreference must be 1-8 {keyType, keySize} objects');
    msg.keyPreference = kp.map((k) => ({ keyType: k.keyType, keySize: k.keySize }));
  }
  if (o.compact !== undefined) {
    if (o.compact !== true) bad('compact must be true when present');
    msg.compact = true;
  }
  return msg;
}

export function validateEnroll(o: Obj): EnrollMessage {
  onlyKeys(o, ['requestId', 'challengeId', 'csr', 'signature', 'publicKey', 'deviceId']);
  const msg: EnrollMessage = {
    requestId: str(o, 'requestId', LIMITS.requestIdChars, REQUEST_ID_PATTERN),
    challengeId: str(o, 'challengeId', 64, REQUEST_ID_PATTERN),
    csr: pem(o, 'csr', 'CERTIFICATE REQUEST'),
    signature: str(o, 'signature', LIMITS.signatureChars, BASE64_PATTERN),
  };
  if (o.publicKey !== undefined) msg.publicKey = pem(o, 'publicKey', 'PUBLIC KEY');
  return msg;
}

export function validateAuth(o: Obj): AuthMessage {
  onlyKeys(o, ['requestId', 'challengeId', 'signature', 'publicKey', 'deviceId']);
  const msg: AuthMessage = {
    requestId: str(o, 'requestId', LIMITS.requestIdChars, REQUEST_ID_PATTERN),
    challengeId: str(o, 'challengeId', 64, REQUEST_ID_PATTERN),
    signature: str(o, 'signature', LIMITS.signatureChars, BASE64_PATTERN),
  };
  if (o.publicKey !== undefined) msg.publicKey = pem(o, 'publicKey', 'PUBLIC KEY');
  return msg;
}

export function validateCsr(o: Obj): CsrMessage {
  onlyKeys(o, ['requestId', 'csr', 'deviceId']);
  return {
    requestId: str(o, 'requestId', LIMITS.requestIdChars, REQUEST_ID_PATTERN),
    csr: pem(o, 'csr', 'CERTIFICATE REQUEST'),
  };
}

/** A renewal CSR (operational session): the CSR fields plus the optional proof pair. */
export function validateRenewalCsr(o: Obj): RenewalCsrMessage {
  onlyKeys(o, ['requestId', 'csr', 'proof', 'signedAt', 'deviceId']);
  const msg: RenewalCsrMessage = {
    requestId: str(o, 'requestId', LIMITS.requestIdChars, REQUEST_ID_PATTERN),
    csr: pem(o, 'csr', 'CERTIFICATE REQUEST'),
  };
  if (o.proof === undefined && o.signedAt === undefined) return msg;
  msg.proof = str(o, 'proof', LIMITS.signatureChars, BASE64_PATTERN);
  msg.signedAt = str(o, 'signedAt', 32, ISO_UTC_PATTERN);
  if (!Number.isFinite(Date.parse(msg.signedAt))) bad('signedAt is not a valid time');
  return msg;
}

/** Authority side: the device id the gateway vouches for, checked before anything else. */
export function deviceIdOf(o: Obj): string {
  if (!isValidDeviceId(o.deviceId)) throw new LeafgateError('invalid_device_id');
  return o.deviceId;
}
