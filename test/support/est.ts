/**
 * A small EST (RFC 7030) client for tests: base64 DER PKCS#10 in, base64 PKCS#7 certs-only
 * out, decoded by `openssl pkcs7 -print_certs` (an independent reader of our encoder), and
 * `sh` for the curl/openssl pipelines a real EST user types. Everything async: the authority
 * under test runs in this process.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { authorityRequest, type ClientIdentity, type HttpAnswer } from './http.ts';
import type { Stack } from './stack.ts';

const run = promisify(execFile);

export interface EstAnswer extends HttpAnswer {
  /** The certificates of a 200 PKCS#7 answer, PEM, in order; [] otherwise. */
  certs: string[];
}

/** `openssl pkcs7 -print_certs` of a base64 certs-only body, as a list of PEM certificates. */
export async function certsOfPkcs7(base64Body: string, cwd: string): Promise<string[]> {
  const child = execFile('openssl', ['pkcs7', '-inform', 'DER', '-print_certs'], { cwd, encoding: 'utf8' });
  child.stdin!.end(Buffer.from(base64Body.replace(/\s+/g, ''), 'base64'));
  const out = await new Promise<string>((resolve, reject) => {
    let s = '';
    child.stdout!.on('data', (c) => (s += c));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(s) : reject(new Error(`openssl pkcs7 exited ${code}`))));
  });
  return [...out.matchAll(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----\n?/g)].map((m) => m[0]);
}

export async function est(
  stack: Stack,
  path: string,
  opts: { csrDer?: Buffer; body?: string; identity?: ClientIdentity; basic?: [string, string]; method?: string; dir: string },
): Promise<EstAnswer> {
  const headers: Record<string, string> = {};
  if (opts.basic) headers.authorization = `Basic ${Buffer.from(`${opts.basic[0]}:${opts.basic[1]}`).toString('base64')}`;
  const body = opts.body ?? opts.csrDer?.toString('base64').replace(/(.{64})/g, '$1\n');
  const res = await authorityRequest(stack, `/.well-known/est/${path}`, { method: opts.method, body, contentType: 'application/pkcs10', identity: opts.identity, headers });
  const certs = res.status === 200 && String(res.headers['content-type']).startsWith('application/pkcs7-mime') ? await certsOfPkcs7(res.text, opts.dir) : [];
  return { ...res, certs };
}

/** Runs a shell pipeline (curl, openssl, base64) in `cwd`; answers stdout, stderr and exit code. */
export async function sh(script: string, cwd: string): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await run('sh', ['-c', script], { cwd, encoding: 'utf8' });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === 'number' ? e.code : -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}
