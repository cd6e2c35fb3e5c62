/**
 * Server-side dashboard sessions: the cookie holds only a random 256-bit id; the operator,
 * the CSRF token and the expiry live in the authority's store (table dashboard_sessions,
 * keyed by the id's SHA-256), so every node of a cluster knows a session -- no sticky load
 * balancing -- and a restart logs nobody out.
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import type { AuthorityStore } from '../store/index.ts';

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

/** The idle clock is written at most this often per session (a page view is a read, mostly). */
const TOUCH_EVERY_MS = 30_000;

type SessionBackend = Pick<AuthorityStore, 'insertDashboardSession' | 'getDashboardSession' | 'touchDashboardSession' | 'deleteDashboardSession' | 'purgeDashboardSessions'>;

export class SessionStore {
  constructor(private readonly store: SessionBackend, private readonly opts: { sessionMs: number; idleMs: number; now: () => number; max?: number }) {}

  async create(operator: string, via: Session['via']): Promise<Session> {
    const now = this.opts.now();
    await this.store.purgeDashboardSessions(now - this.opts.sessionMs, now - this.opts.idleMs);
    const s: Session = { id: randomBytes(32).toString('base64url'), operator, via, csrf: randomBytes(32).toString('base64url'), createdAt: now, lastUsedAt: now };
    // Bounded: the oldest sessions go first.
    await this.store.insertDashboardSession({ idHash: key(s.id), operator, via, csrf: s.csrf, createdAt: now, lastUsedAt: now }, this.opts.max ?? 10_000);
    return s;
  }

  /** The live session of a cookie value, its idle clock restarted; null when unknown or expired. */
  async get(id: string | undefined): Promise<Session | null> {
    if (!id || id.length > 100) return null;
    const k = key(id);
    const r = await this.store.getDashboardSession(k);
    if (!r) return null;
    const now = this.opts.now();
    if (now - r.createdAt > this.opts.sessionMs || now - r.lastUsedAt > this.opts.idleMs) {
      await this.store.deleteDashboardSession(k);
      return null;
    }
    if (now - r.lastUsedAt >= TOUCH_EVERY_MS) await this.store.touchDashboardSession(k, now);
    return { id, operator: r.operator, via: r.via, csrf: r.csrf, createdAt: r.createdAt, lastUsedAt: now };
  }

  async destroy(id: string): Promise<void> {
    await this.store.deleteDashboardSession(key(id));
  }

  get maxAgeSeconds(): number {
    return Math.floor(this.opts.sessionMs / 1000);
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
