/**
 * HTTPS requests to the authority API, with or without a client certificate, answering
 * status, headers and parsed body. A fresh connection per request (no agent), so the
 * client certificate of one request never leaks into the next through keep-alive.
 */
import { readFileSync } from 'node:fs';
import https from 'node:https';
import type { IncomingHttpHeaders } from 'node:http';
import { join } from 'node:path';
import type { Stack } from './stack.ts';
import { DEFAULT_WAIT_MS, within } from './wait.ts';

export interface ClientIdentity {
  key: string;
  /** Leaf certificate, optionally followed by its chain. */
  cert: string;
}

export interface HttpAnswer {
  status: number;
  headers: IncomingHttpHeaders;
  text: string;
  /** Parsed JSON, or undefined when the body is not JSON. */
  body: any;
}

export interface RequestOptions {
  method?: string;
  /** Objects are JSON-encoded; strings and buffers are sent as they are. */
  body?: unknown;
  contentType?: string;
  identity?: ClientIdentity;
  /** Trust anchor for the server; the stack's root by default. */
  ca?: string;
  /** Extra request headers (e.g. the admin API's authorization). */
  headers?: Record<string, string>;
}

/** The enrolled gateway's key and certificate chain, as the gateway stores them; `gatewayId` for one added with stack.addGateway. */
export function gatewayIdentity(stack: Stack, gatewayId?: string): ClientIdentity {
  const dir = join(stack.dir, gatewayId === undefined ? 'gateway' : `gateway-${gatewayId}`);
  return { key: readFileSync(join(dir, 'gateway.key.pem'), 'utf8'), cert: readFileSync(join(dir, 'gateway.crt.pem'), 'utf8') };
}

export function authorityRequest(stack: Stack, path: string, opts: RequestOptions = {}): Promise<HttpAnswer> {
  const url = new URL(path, stack.authority.url);
  const payload = opts.body === undefined ? undefined : typeof opts.body === 'string' || Buffer.isBuffer(opts.body) ? Buffer.from(opts.body) : Buffer.from(JSON.stringify(opts.body));
  const headers: Record<string, string | number> = { ...opts.headers };
  if (payload) {
    headers['content-type'] = opts.contentType ?? 'application/json';
    headers['content-length'] = payload.length;
  }
  const p = new Promise<HttpAnswer>((resolve, reject) => {
    const req = https.request(
      url,
      {
        method: opts.method ?? (payload ? 'POST' : 'GET'),
        agent: false,
        ca: opts.ca ?? stack.rootPem,
        key: opts.identity?.key,
        cert: opts.identity?.cert,
        headers,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('error', reject);
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let body: unknown;
          try {
            body = JSON.parse(text);
          } catch {
            body = undefined;
          }
          resolve({ status: res.statusCode ?? 0, headers: res.headers, text, body });
        });
      },
    );
    req.on('error', reject);
    req.end(payload);
  });
  return within(p, DEFAULT_WAIT_MS, `${opts.method ?? 'request'} ${path}`);
}

/**
 * One plain HTTPS request (no client certificate), its body as text: for pages such as the
 * dashboard. `ca`: the anchor to trust (the authority's root); without it the server is not
 * checked (tests about what the server answers, not who it is).
 */
export function rawHttps(url: string, opts: { method?: string; headers?: Record<string, string>; body?: string; ca?: string } = {}): Promise<{ status: number; headers: Record<string, unknown>; text: string }> {
  return new Promise((resolve, reject) => {
    const tls = opts.ca ? { ca: opts.ca } : { rejectUnauthorized: false };
    const req = https.request(url, { method: opts.method ?? 'GET', headers: opts.headers, ...tls, agent: false }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d) => (text += d));
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, text }));
    });
    req.on('error', reject);
    req.end(opts.body);
  });
}
