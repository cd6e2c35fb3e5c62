/**
 * OpenSSL as an independent oracle for the pkix unit tests: every call runs /usr/bin/openssl
 * in a per-test mkdtemp directory that is removed in t.after.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const OPENSSL = '/usr/bin/openssl';

/** Anything with node:test's `after(fn)`: a TestContext. */
export interface HasAfter {
  after(fn: () => void | Promise<void>): void;
}

export interface OpensslResult {
  status: number;
  stdout: string;
  stderr: string;
}

export interface Workdir {
  dir: string;
  path(name: string): string;
  write(name: string, data: string | Buffer): string;
  read(name: string): Buffer;
  /** Runs openssl, returns stdout; throws (with stderr in the message) on a non-zero exit. */
  openssl(args: string[], input?: string | Buffer): string;
  /** Runs openssl and reports exit status and both streams, never throws for a non-zero exit. */
  tryOpenssl(args: string[]): OpensslResult;
}

export function workdir(t: HasAfter, prefix = 'leafgate-pkix-'): Workdir {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const path = (name: string) => join(dir, name);
  return {
    dir,
    path,
    write(name, data) {
      const p = path(name);
      writeFileSync(p, data);
      return p;
    },
    read: (name) => readFileSync(path(name)),
    openssl(args, input) {
      try {
        return execFileSync(OPENSSL, args, { cwd: dir, input, encoding: 'utf8', stdio: ['pipe', 'pipe', 'pipe'] });
      } catch (err) {
        const e = err as { status?: number; stderr?: string };
        throw new Error(`openssl ${args.join(' ')} exited ${e.status}: ${e.stderr ?? ''}`);
      }
    },
    tryOpenssl(args) {
      // spawnSync rather than execFileSync: a verdict needs stderr also when the exit code is 0
      // (`openssl req -verify` exits 0 even on "self-signature verify failure").
      const r = spawnSync(OPENSSL, args, { cwd: dir, encoding: 'utf8' });
      return { status: r.status ?? -1, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
    },
  };
}

/**
 * `openssl asn1parse` output reduced to its shape: one `depth cons|prim type` line per element,
 * offsets, header and content lengths and values removed.
 */
export function asn1Shape(asn1parseOutput: string): string[] {
  const out: string[] = [];
  for (const line of asn1parseOutput.split('\n')) {
    const m = line.match(/^\s*\d+:d=(\d+)\s+hl=\s*\d+\s+l=\s*\d+\s+(cons|prim):\s*([^:]+?)\s*(?::|$)/);
    if (m) out.push(`${m[1]} ${m[2]} ${m[3].trim()}`);
  }
  return out;
}

/** Small deterministic PRNG (mulberry32) for seeded fuzzing. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}
