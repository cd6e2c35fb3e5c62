/**
 * HTTPS client to the authority with mutual TLS (the gateway certificate) and keep-alive.
 * Answers with an error body become LeafgateErrors with the authority's code; a transport
 * failure becomes `authority_unavailable` with a retry hint.
 */
import https from 'node:https';
import { LeafgateError, isErrorCode } from '../protocol/index.ts';

export interface AuthorityClientOptions {
  baseUrl: string;
  /** Trust anchor: the authority's root (pinned at enrollment). */
  ca: string;
  /** Client identity; absent only for enrollment. */
  key?: string;
  cert?: string;
  timeoutMs?: number;
  /** False only to fetch the CA bundle before enrollment, whose answer is then pinned. */
  verifyServer?: boolean;
  /** Cap on an answer body. */
  maxResponseBytes?: number;
}

export const AUTHORITY_RETRY_MS = 5_000;

export class AuthorityClient {
  private readonly agent: https.Agent;
  private readonly base: URL;
  private readonly timeoutMs: number;
  private readonly maxResponseBytes: number;

  constructor(opts: AuthorityClientOptions) {
    this.base = new URL(opts.baseUrl);
    this.agent = new https.Agent({ keepAlive: true, noDelay: true, maxSockets: 64, ca: opts.ca, key: opts.key, cert: opts.cert, minVersion: 'TLSv1.2', rejectUnauthorized: opts.verifyServer !== false });
    this.timeoutMs = opts.timeoutMs ?? 15_000;
    this.maxResponseBytes = opts.maxResponseBytes ?? 1024 * 1024;
  }

  get<T>(path: string): Promise<T> {
    return this.request<T>('GET', path);
  }

  post<T>(path: string, body: unknown): Promise<T> {
    return this.request<T>('POST', path, body);
  }

  private request<T>(method: string, path: string, body?: unknown): Promise<T> {
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

  close(): void {
    this.agent.destroy();
  }
}

function unavailable(err: Error): LeafgateError {
  return new LeafgateError('authority_unavailable', `authority unreachable: ${err.message}`, { retryAfterMs: AUTHORITY_RETRY_MS, cause: err });
}
