/**
 * HTTPS client to the authority with mutual TLS (the gateway certificate) and keep-alive.
 * Answers with an error body become LeafgateErrors with the authority's code; a transport
 * failure becomes `authority_unavailable` with a retry hint.
 */
import type { ClientRequest } from 'node:http';
import https from 'node:https';
import { X509Certificate } from 'node:crypto';
import { GATEWAY_AUTHORITY_TIMEOUT_MS, LeafgateError, authorityIdentityCheck, isErrorCode } from '../protocol/index.ts';

export interface AuthorityClientOptions {
  baseUrl: string;
  /** Trust anchor: the authority's root (pinned at enrollment). */
  ca: string;
  /**
   * The infrastructure CA pinned at enrollment: the server must hold a certificate it issued
   * that carries the authority's mark (protocol/trust.ts), not merely one under the root.
   */
  authorityIssuer?: string;
  /** Client identity; absent only for enrollment. */
  key?: string;
  cert?: string;
  /** Default GATEWAY_AUTHORITY_TIMEOUT_MS (protocol): the authority answers within less. */
  timeoutMs?: number;
  /** False only to fetch the CA bundle before enrollment, whose answer is then pinned. */
  verifyServer?: boolean;
  /** Cap on an answer body. */
  maxResponseBytes?: number;
}

export const AUTHORITY_RETRY_MS = 5_000;

export class AuthorityClient {
  /** Local clock minus the authority's (from the Date header of its last answer), ms. */
  clockSkewMs: number | undefined;
  private agent: https.Agent;
  private readonly agentOptions: https.AgentOptions;
  private readonly base: URL;
  private readonly timeoutMs: number;
  private readonly maxResponseBytes: number;

  constructor(opts: AuthorityClientOptions) {
    this.base = new URL(opts.baseUrl);
    this.agentOptions = { keepAlive: true, noDelay: true, maxSockets: 64, ca: opts.ca, key: opts.key, cert: opts.cert, minVersion: 'TLSv1.2', rejectUnauthorized: opts.verifyServer !== false };
    if (opts.authorityIssuer && opts.verifyServer !== false) this.agentOptions.checkServerIdentity = authorityIdentityCheck(new X509Certificate(opts.authorityIssuer).fingerprint256);
    this.agent = new https.Agent(this.agentOptions);
    this.timeoutMs = opts.timeoutMs ?? GATEWAY_AUTHORITY_TIMEOUT_MS;
    this.maxResponseBytes = opts.maxResponseBytes ?? 1024 * 1024;
  }

  get<T>(path: string): Promise<T> {
    return this.request<T>('GET', path);
  }

  post<T>(path: string, body: unknown): Promise<T> {
    return this.request<T>('POST', path, body);
  }

  private request<T>(method: string, path: string, body?: unknown, raw = false): Promise<T> {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    return new Promise<T>((resolve, reject) => {
      const req = https.request(
        new URL(path, this.base),
        {
          method,
          agent: this.agent,
          timeout: this.timeoutMs,
          headers: payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {},
        },
        (res) => {
          this.noteDate(res.headers.date);
          const chunks: Buffer[] = [];
          let size = 0;
          res.on('data', (c: Buffer) => {
            size += c.length;
            if (size > this.maxResponseBytes) {
              req.destroy(new Error('authority answer too large'));
              return;
            }
            chunks.push(c);
          });
          res.on('error', (err) => reject(unavailable(err)));
          res.on('end', () => {
            const status0 = res.statusCode ?? 500;
            if (raw && status0 >= 200 && status0 < 300) return resolve(Buffer.concat(chunks) as T);
            let parsed: unknown;
            try {
              parsed = JSON.parse(Buffer.concat(chunks).toString('utf8'));
            } catch {
              return reject(new LeafgateError('authority_unavailable', `authority answered ${res.statusCode} without JSON`, { retryAfterMs: AUTHORITY_RETRY_MS }));
            }
            const status = res.statusCode ?? 500;
            if (status >= 200 && status < 300) return resolve(parsed as T);
            const b = parsed as { code?: unknown; message?: unknown; retryAfterMs?: unknown };
            const code = isErrorCode(b.code) ? b.code : status >= 500 ? 'authority_unavailable' : 'internal';
            reject(new LeafgateError(code, typeof b.message === 'string' ? b.message : undefined, typeof b.retryAfterMs === 'number' ? { retryAfterMs: b.retryAfterMs } : {}));
          });
        },
      );
      req.on('timeout', () => req.destroy(new Error('authority request timed out')));
      req.on('error', (err) => reject(unavailable(err)));
      req.end(payload);
    });
  }

  private noteDate(date: string | undefined): void {
    const t = date ? Date.parse(date) : NaN;
    // The header has 1 s resolution: differences under a second are noise.
    if (!Number.isNaN(t)) this.clockSkewMs = Math.abs(Date.now() - t) < 1000 ? 0 : Date.now() - t;
  }

  /** Uses a new client certificate from now on; requests in flight finish on the old one. */
  setIdentity(key: string, cert: string): void {
    const old = this.agent;
    this.agent = new https.Agent({ ...this.agentOptions, key, cert });
    // Idle sockets go now; busy ones (e.g. the event stream) close when their request ends.
    setImmediate(() => old.destroy());
  }

  /** GET returning raw bytes (e.g. a DER CRL). */
  getBuffer(path: string): Promise<Buffer> {
    return this.request<Buffer>('GET', path, undefined, true);
  }

  /**
   * Opens a server-sent-events stream (text/event-stream): `onEvent` per event, `onClose`
   * once when it ends for any reason. Returns the request so the caller can abort it.
   */
  stream(path: string, handlers: { onOpen(): void; onEvent(event: string, data: unknown): void; onClose(err?: Error): void }): ClientRequest {
    let closed = false;
    const close = (err?: Error) => {
      if (closed) return;
      closed = true;
      handlers.onClose(err);
    };
    const req = https.request(new URL(path, this.base), { method: 'GET', agent: this.agent, headers: { accept: 'text/event-stream' } }, (res) => {
      if (res.statusCode !== 200) {
        res.resume();
        return close(new Error(`event stream answered ${res.statusCode}`));
      }
      handlers.onOpen();
      res.setEncoding('utf8');
      let buffer = '';
      res.on('data', (chunk: string) => {
        buffer += chunk;
        if (buffer.length > 1024 * 1024) return req.destroy(new Error('event too large'));
        let i: number;
        while ((i = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, i);
          buffer = buffer.slice(i + 2);
          let event = 'message';
          let data = '';
          for (const line of block.split('\n')) {
            if (line.startsWith('event: ')) event = line.slice(7);
            else if (line.startsWith('data: ')) data += line.slice(6);
          }
          if (!data) continue; // a keep-alive comment
          try {
            handlers.onEvent(event, JSON.parse(data));
          } catch {
            // a malformed event is skipped; the periodic refresh covers what it announced
          }
        }
      });
      res.on('end', () => close());
      res.on('error', (err) => close(err));
    });
    req.on('error', (err) => close(err));
    req.on('close', () => close());
    req.end();
    return req;
  }

  close(): void {
    this.agent.destroy();
  }
}

function unavailable(err: Error): LeafgateError {
  return new LeafgateError('authority_unavailable', `authority unreachable: ${err.message}`, { retryAfterMs: AUTHORITY_RETRY_MS, cause: err });
}
