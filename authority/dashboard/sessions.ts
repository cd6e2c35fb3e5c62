/**
 * Server-side dashboard sessions: the cookie holds only a random 256-bit id; the operator,
 * the CSRF token and the expiry live here, in the authority's memory (a restart logs every
 * operator out; each authority node of a cluster has its own sessions, so a load balancer
 * in front of the dashboard must keep an operator on one node).
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';

export interface Session {
  id: string;
  operator: string;
  /** How the operator logged in: the admin token, or the trusted proxy header. */
  via: 'token' | 'header';
  /** Synchronizer token: every POST must carry it. */
  csrf: string;
  createdAt: number;
  lastUsedAt: number;
}

export const SESSION_COOKIE = 'leafgate_dashboard';

export class SessionStore {
  private readonly sessions = new Map<string, Session>();

  constructor(private readonly opts: { sessionMs: number; idleMs: number; now: () => number; max?: number }) {}

  create(operator: string, via: Session['via']): Session {
    this.sweep();
    const max = this.opts.max ?? 10_000;
    // Bounded: the oldest sessions go first (Map keeps insertion order).
    while (this.sessions.size >= max) this.sessions.delete(this.sessions.keys().next().value!);
    const now = this.opts.now();
    const s: Session = { id: randomBytes(32).toString('base64url'), operator, via, csrf: randomBytes(32).toString('base64url'), createdAt: now, lastUsedAt: now };
    this.sessions.set(key(s.id), s);
    return s;
  }

  /** The live session of a cookie value, its idle clock restarted; null when unknown or expired. */
  get(id: string | undefined): Session | null {
    if (!id || id.length > 100) return null;
    const k = key(id);
    const s = this.sessions.get(k);
    if (!s) return null;
    const now = this.opts.now();
    if (now - s.createdAt > this.opts.sessionMs || now - s.lastUsedAt > this.opts.idleMs) {
      this.sessions.delete(k);
      return null;
    }
    s.lastUsedAt = now;
    return s;
  }

  destroy(id: string): void {
    this.sessions.delete(key(id));
  }

  get maxAgeSeconds(): number {
    return Math.floor(this.opts.sessionMs / 1000);
  }

  private sweep(): void {
    const now = this.opts.now();
    for (const [k, s] of this.sessions) if (now - s.createdAt > this.opts.sessionMs || now - s.lastUsedAt > this.opts.idleMs) this.sessions.delete(k);
  }
}

/** Sessions are keyed by a hash of the id, so a lookup's timing says nothing about the id. */
const key = (id: string) => createHash('sha256').update(id).digest('base64url');

/** Constant-time comparison of two secrets of any length (hashed first). */
export function sameSecret(a: string, b: string): boolean {
  return timingSafeEqual(createHash('sha256').update(a).digest(), createHash('sha256').update(b).digest());
}

export function parseCookies(header: string | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const part of (header ?? '').split(';')) {
    const i = part.indexOf('=');
    if (i < 1) continue;
    const k = part.slice(0, i).trim();
    if (!(k in out)) out[k] = part.slice(i + 1).trim();
  }
  return out;
}
