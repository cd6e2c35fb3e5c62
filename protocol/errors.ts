/**
 * The one catalogue of coded errors. Every failure that crosses a boundary (MQTT down/error,
 * HTTP response body, audit row) carries one of these codes; the HTTP status lives here too
 * so that the authority and the gateway map errors the same way.
 */
export const ERROR_CATALOGUE = {
  malformed_json: { status: 400, text: 'payload is not a JSON object' },
  bad_request: { status: 400, text: 'message does not match the schema' },
  invalid_device_id: { status: 400, text: 'device id is not allowed' },
  payload_too_large: { status: 413, text: 'payload exceeds the size cap' },
  bad_csr: { status: 400, text: 'CSR cannot be parsed or its signature does not verify' },
  bad_certificate: { status: 400, text: 'certificate cannot be parsed' },
  policy_violation: { status: 403, text: 'request is refused by policy' },
  not_authenticated: { status: 401, text: 'authenticate first' },
  auth_failed: { status: 401, text: 'authentication failed' },
  replayed: { status: 409, text: 'challenge answer was already used' },
  challenge_expired: { status: 401, text: 'challenge expired or unknown' },
  enrollment_required: { status: 403, text: 'device is not enrolled and no enrollment grant matched' },
  request_conflict: { status: 409, text: 'requestId was already used for a different request' },
  forbidden: { status: 403, text: 'not allowed on this topic' },
  unknown_gateway: { status: 403, text: 'client certificate does not belong to an enrolled gateway' },
  client_cert_required: { status: 401, text: 'a client certificate is required' },
  invalid_token: { status: 401, text: 'enrollment token is unknown, used or expired' },
  unknown_device: { status: 404, text: 'device is not known' },
  device_disabled: { status: 403, text: 'device is revoked or disabled' },
  revoked: { status: 403, text: 'certificate is revoked' },
  ca_refused: { status: 502, text: 'the external CA refused the request, or answered with a certificate leafgate refuses' },
  rate_limited: { status: 429, text: 'too many requests' },
  authority_unavailable: { status: 503, text: 'authority cannot be reached' },
  gateway_unavailable: { status: 503, text: 'gateway storage is unavailable; retry later' },
  not_found: { status: 404, text: 'no such resource' },
  internal: { status: 500, text: 'internal error' },
} as const satisfies Record<string, { status: number; text: string }>;

export type ErrorCode = keyof typeof ERROR_CATALOGUE;

export function isErrorCode(value: unknown): value is ErrorCode {
  return typeof value === 'string' && Object.prototype.hasOwnProperty.call(ERROR_CATALOGUE, value);
}

/** An error as a value: code, human text, optional retry hint. Never a bare `new Error(msg)`. */
export class LeafgateError extends Error {
  readonly code: ErrorCode;
  readonly retryAfterMs?: number;
  readonly detail?: Record<string, unknown>;

  constructor(code: ErrorCode, message?: string, opts: { retryAfterMs?: number; detail?: Record<string, unknown>; cause?: unknown } = {}) {
    super(message ?? ERROR_CATALOGUE[code].text, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'LeafgateError';
    this.code = code;
    if (opts.retryAfterMs !== undefined) this.retryAfterMs = opts.retryAfterMs;
    if (opts.detail !== undefined) this.detail = opts.detail;
  }

  get status(): number {
    return ERROR_CATALOGUE[this.code].status;
  }

  toBody(requestId?: string): ErrorBody {
    const body: ErrorBody = { code: this.code, message: this.message };
    if (requestId !== undefined) body.requestId = requestId;
    if (this.retryAfterMs !== undefined) body.retryAfterMs = this.retryAfterMs;
    return body;
  }
}

/** The JSON body of an error, on `down/error` and in HTTP 4xx/5xx responses alike. */
export interface ErrorBody {
  code: ErrorCode;
  message: string;
  requestId?: string;
  retryAfterMs?: number;
}

/** Converts anything thrown into a LeafgateError; unknown failures become `internal`. */
export function toLeafgateError(err: unknown): LeafgateError {
  if (err instanceof LeafgateError) return err;
  return new LeafgateError('internal', undefined, { cause: err });
}
