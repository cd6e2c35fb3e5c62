/**
 * IoT Hub shared access signatures, as the hub checks them:
 *
 *   SharedAccessSignature sr={url-encoded resource}&sig={url-encoded base64 HMAC}&se={expiry s}[&skn={policy}]
 *   sig = base64(HMAC-SHA256(base64-decoded key, `${sr as sent, url-encoded}\n${se}`))
 *
 * azure-iothub signs the raw host name (which url-encodes to itself); azure-iot-device signs
 * the url-encoded `{host}/devices/{id}[/modules/{mid}]`. Both forms verify here.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';

export interface ParsedSas {
  /** `sr` exactly as it appears in the token (url-encoded). */
  srRaw: string;
  /** `sr` url-decoded. */
  resource: string;
  sig: string;
  se: number;
  skn?: string;
}

/** The MDN "strict" encodeURIComponent the Azure SDKs use. */
export function encodeUriComponentStrict(s: string): string {
  return encodeURIComponent(s).replace(/[!'()*]/g, (c) => '%' + c.charCodeAt(0).toString(16));
}

export function parseSas(token: string | undefined): ParsedSas | null {
  if (!token) return null;
  const m = /^SharedAccessSignature\s+(.+)$/.exec(token.trim());
  if (!m) return null;
  const fields = new Map<string, string>();
  for (const part of m[1].split('&')) {
    const eq = part.indexOf('=');
    if (eq <= 0) return null;
    fields.set(part.slice(0, eq), part.slice(eq + 1));
  }
  const srRaw = fields.get('sr');
  const sig = fields.get('sig');
  const se = Number(fields.get('se'));
  if (!srRaw || !sig || !Number.isInteger(se)) return null;
  try {
    const skn = fields.get('skn');
    return { srRaw, resource: decodeURIComponent(srRaw), sig: decodeURIComponent(sig), se, ...(skn ? { skn: decodeURIComponent(skn) } : {}) };
  } catch {
    return null;
  }
}

function hmac(keyBase64: string, data: string): Buffer {
  return createHmac('sha256', Buffer.from(keyBase64, 'base64')).update(data).digest();
}

/** True when `sas.sig` is a valid signature by one of `keys` (base64). Expiry is checked separately. */
export function signatureMatches(sas: ParsedSas, keys: Array<string | null | undefined>): boolean {
  let given: Buffer;
  try {
    given = Buffer.from(sas.sig, 'base64');
  } catch {
    return false;
  }
  const signedForms = [...new Set([sas.srRaw, encodeUriComponentStrict(sas.resource)])];
  for (const key of keys) {
    if (!key) continue;
    for (const sr of signedForms) {
      const expected = hmac(key, `${sr}\n${sas.se}`);
      if (expected.length === given.length && timingSafeEqual(expected, given)) return true;
    }
  }
  return false;
}

/** Builds a token the way the SDKs do (for tests: e.g. an expired one). */
export function signSas(resource: string, keyBase64: string, expirySeconds: number, keyName?: string): string {
  const sr = encodeUriComponentStrict(resource);
  const sig = encodeUriComponentStrict(hmac(keyBase64, `${sr}\n${expirySeconds}`).toString('base64'));
  return `SharedAccessSignature sr=${sr}&sig=${sig}&se=${expirySeconds}${keyName ? `&skn=${encodeUriComponentStrict(keyName)}` : ''}`;
}
