import { randomBytes } from 'node:crypto';

/**
 * A random secret handed to an operator or a device (enrollment token, one-time code, admin
 * token): base64url, never starting with '-', so that `--token VALUE` is never read as an
 * option by a command-line parser (node's parseArgs refuses such a value; 1 in 64 did).
 */
export function newSecret(bytes: number): string {
  for (;;) {
    const s = randomBytes(bytes).toString('base64url');
    if (s[0] !== '-') return s;
  }
}
