/** Tiny helpers shared by the subcommands: argument parsing with --help, and fatal errors. */
import { readFileSync } from 'node:fs';
import { parseArgs, type ParseArgsConfig } from 'node:util';

export type Options = NonNullable<ParseArgsConfig['options']>;

export class UsageError extends Error {}

/**
 * Parses argv; `--help` prints the help of the subcommand named (`gateway subca --help`),
 * from `commands`, else `usage`.
 */
export function parse<O extends Options>(argv: string[], options: O, usage: string, commands: Record<string, string> = {}): { values: Record<string, any>; positionals: string[] } | null {
  const all = { ...options, help: { type: 'boolean', short: 'h' } } as Options;
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: all, allowPositionals: true, strict: true });
  } catch (err) {
    throw new UsageError(`${(err as Error).message}\n\n${usage}`);
  }
  if (parsed.values.help) {
    const sub = parsed.positionals[0];
    process.stdout.write((sub && commands[sub] ? commands[sub] : usage).trimEnd() + '\n');
    return null;
  }
  return parsed as { values: Record<string, any>; positionals: string[] };
}

export function intOption(v: unknown, name: string, min = 0, max = Number.MAX_SAFE_INTEGER): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min || n > max) throw new UsageError(`--${name} must be an integer in ${min}..${max}`);
  return n;
}

/** A file named by an option, or one line naming the option and the reason. */
export function readOptionFile(path: string, option: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (err) {
    throw new UsageError(`--${option} ${path}: cannot read it (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
  }
}

/** An http(s) URL given as an option, or one line saying what is expected. */
export function urlOption(v: string, option: string): string {
  let u: URL;
  try {
    u = new URL(v);
  } catch {
    throw new UsageError(`--${option} ${JSON.stringify(v)}: expected an https:// URL, e.g. https://authority.example:8443`);
  }
  if (u.protocol !== 'https:' && u.protocol !== 'http:') throw new UsageError(`--${option} ${JSON.stringify(v)}: expected an https:// URL, e.g. https://authority.example:8443`);
  return v;
}

/** How long a SIGTERM/SIGINT drain may take before the process exits anyway (exit code 1). */
export const DRAIN_TIMEOUT_MS = Number(process.env.LEAFGATE_DRAIN_TIMEOUT_MS ?? 20_000);

/** Waits for SIGINT/SIGTERM, then runs `close` once, bounded by DRAIN_TIMEOUT_MS. */
export function serveUntilSignal(close: () => Promise<void>): Promise<void> {
  return new Promise((resolve) => {
    let closing = false;
    const stop = () => {
      if (closing) return;
      closing = true;
      setTimeout(() => {
        process.stderr.write(`error: did not finish closing within ${DRAIN_TIMEOUT_MS} ms after the signal; exiting\n`);
        process.exit(1);
      }, DRAIN_TIMEOUT_MS).unref();
      close().catch((err) => {
        process.stderr.write(`error: closing failed: ${(err as Error).message}\n`);
        process.exitCode = 1;
      }).finally(resolve);
    };
    // on, not once: a second signal during the drain must not kill the process mid-close (the drain is bounded by DRAIN_TIMEOUT_MS).
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
}
