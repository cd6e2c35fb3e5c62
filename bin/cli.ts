/** Tiny helpers shared by the subcommands: argument parsing with --help, and fatal errors. */
import { parseArgs, type ParseArgsConfig } from 'node:util';

export type Options = NonNullable<ParseArgsConfig['options']>;

export class UsageError extends Error {}

export function parse<O extends Options>(argv: string[], options: O, usage: string): { values: Record<string, any>; positionals: string[] } | null {
  const all = { ...options, help: { type: 'boolean', short: 'h' } } as Options;
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: all, allowPositionals: true, strict: true });
  } catch (err) {
    throw new UsageError(`${(err as Error).message}\n\n${usage}`);
  }
  if (parsed.values.help) {
    process.stdout.write(usage.trimEnd() + '\n');
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

/** Waits for SIGINT/SIGTERM, then runs `close` once. */
export function serveUntilSignal(close: () => Promise<void>): Promise<void> {
  return new Promise((resolve) => {
    let closing = false;
    const stop = () => {
      if (closing) return;
      closing = true;
      close().finally(resolve);
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
}
