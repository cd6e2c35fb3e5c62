/** PEM armor (RFC 7468): strict enough to refuse junk, lenient about line length. */
import { DerError } from './der.ts';

export function toPem(der: Buffer, label: string): string {
  const b64 = der.toString('base64');
  let body = '';
  for (let i = 0; i < b64.length; i += 64) body += b64.slice(i, i + 64) + '\n';
  return `-----BEGIN ${label}-----\n${body}-----END ${label}-----\n`;
}

/** Decodes the first PEM block with `label`; throws DerError when absent or not base64. */
export function fromPem(pem: string, label: string): Buffer {
  const begin = `-----BEGIN ${label}-----`;
  const end = `-----END ${label}-----`;
  const i = pem.indexOf(begin);
  const j = pem.indexOf(end, i + begin.length);
  if (i < 0 || j < 0) throw new DerError(`no PEM ${label} block`);
  const body = pem.slice(i + begin.length, j).replace(/[\r\n\t ]/g, '');
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(body) || body.length === 0) throw new DerError('PEM body is not base64');
  return Buffer.from(body, 'base64');
}

/** Every block with `label`, in order (e.g. a certificate chain file). */
export function allPem(pem: string, label: string): Buffer[] {
  const out: Buffer[] = [];
  const re = new RegExp(`-----BEGIN ${label}-----([\\s\\S]*?)-----END ${label}-----`, 'g');
  for (const m of pem.matchAll(re)) out.push(fromPem(m[0], label));
  return out;
}
