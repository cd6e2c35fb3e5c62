/**
 * Benchmark dispatcher: `npm run bench` runs every benchmark (each in its own process, one
 * after the other), `npm run bench -- issuance` runs one, `npm run bench -- onboarding
 * --devices 500 --concurrency 50` passes sizes. Output: one JSON object per line on stdout;
 * progress on stderr. Each benchmark is bounded by --max-seconds.
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { baseContext, emitter, log, parseOptions, REPO_ROOT, runCleanups, signProbe, type Json, type Options, type OptionSpecs } from './common.ts';
import type { Bench } from './types.ts';
import { issuanceBench } from './issuance.ts';
import { onboardingBench } from './onboarding.ts';
import { brokerBench } from './broker.ts';
import { connectionsBench } from './connections.ts';
import { dashboardBench } from './dashboard.ts';

const BENCHES: Bench<any>[] = [issuanceBench, onboardingBench, brokerBench, connectionsBench, dashboardBench];

const COMMON: OptionSpecs = {
  'max-seconds': { default: 300, help: 'hard bound on one benchmark; it is stopped (exit 3) past it' },
  keep: { default: false, help: 'keep temp directories (data dirs, configs) for inspection' },
  'no-quiet-wait': { default: false, help: 'do not wait for a quiet machine before measured windows (smoke runs: the figures are then not comparable)' },
  help: { default: false, help: 'this text' },
};

function usage(): string {
  const lines = ['Usage: npm run bench [-- <name> [--option value ...]]', '', 'Benchmarks (all by default):'];
  for (const b of BENCHES) {
    lines.push(`  ${b.name.padEnd(12)} ${b.description}`);
    for (const [k, s] of Object.entries(b.options as OptionSpecs)) lines.push(`      --${k.padEnd(18)} ${s.help} (default ${JSON.stringify(s.default)})`);
  }
  lines.push('', 'Common options:');
  for (const [k, s] of Object.entries(COMMON)) lines.push(`      --${k.padEnd(18)} ${s.help} (default ${JSON.stringify(s.default)})`);
  lines.push('', 'Output: one JSON object per line: {"bench","metric","value","unit", ...context}.');
  return lines.join('\n') + '\n';
}

async function runOne(bench: Bench<any>, argv: string[]): Promise<number> {
  const common = parseOptions(COMMON, argv, true) as Options<typeof COMMON>;
  // Under `npm run bench` (all), an option meant for another benchmark is not an error here.
  const opts = parseOptions({ ...(bench.options as OptionSpecs), ...COMMON }, argv, process.env.BENCH_ALL === '1') as Record<string, unknown>;
  const sizes: Record<string, Json> = {};
  for (const k of Object.keys(bench.options)) sizes[k] = opts[k] as Json;
  const emit = emitter(bench.name, { ...sizes, ...baseContext() });
  if (common['no-quiet-wait']) process.env.BENCH_NO_QUIET_WAIT = '1';
  const maxMs = Number(common['max-seconds']) * 1000;
  let timedOut = false;
  const watchdog = setTimeout(() => {
    timedOut = true;
    log(`${bench.name}: over --max-seconds ${common['max-seconds']}; stopping`);
    void runCleanups().finally(() => process.exit(3));
  }, maxMs);
  watchdog.unref();
  const started = performance.now();
  const probeNote = 'ECDSA P-256 signs/s on one thread: how fast this machine was (a busy VM host slows everything alike)';
  try {
    emit('machine_probe_sign_per_s', signProbe(), 'signs/s', { when: 'before', note: probeNote });
    await bench.run(opts as Parameters<typeof bench.run>[0], emit);
    emit('machine_probe_sign_per_s', signProbe(), 'signs/s', { when: 'after', note: probeNote });
    emit('bench_seconds', (performance.now() - started) / 1000, 's');
    return 0;
  } catch (err) {
    if (timedOut) return 3;
    log(`${bench.name} failed:`, (err as Error)?.stack ?? String(err));
    return 1;
  } finally {
    clearTimeout(watchdog);
    await runCleanups();
  }
}

/** All benchmarks, each in a fresh process so that one's heap, JIT and sockets never skew the next. */
async function runEachInChild(benches: Bench<any>[], argv: string[]): Promise<number> {
  let worst = 0;
  for (const b of benches) {
    log(`=== ${b.name}`);
    const code = await new Promise<number>((resolve) => {
      const child = spawn(process.execPath, ['--import', 'tsx', fileURLToPath(import.meta.url), b.name, ...argv], { cwd: REPO_ROOT, stdio: 'inherit', env: { ...process.env, BENCH_ALL: '1' } });
      const forward = (sig: NodeJS.Signals) => child.kill(sig);
      process.once('SIGINT', forward);
      process.once('SIGTERM', forward);
      child.on('exit', (c, s) => {
        process.off('SIGINT', forward);
        process.off('SIGTERM', forward);
        resolve(c ?? (s ? 128 : 1));
      });
    });
    if (code !== 0) log(`${b.name} exited with ${code}`);
    worst = Math.max(worst, code);
  }
  return worst;
}

async function main(argv: string[]): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    process.stdout.write(usage());
    return 0;
  }
  // Names first, then options: `bench -- onboarding broker --seconds 3`.
  let first = argv.findIndex((a) => a.startsWith('-'));
  if (first < 0) first = argv.length;
  const names = argv.slice(0, first);
  const flags = argv.slice(first);
  if (names.length === 0) return runEachInChild(BENCHES, flags);
  const chosen: Bench<any>[] = [];
  for (const name of names) {
    const bench = BENCHES.find((b) => b.name === name);
    if (!bench) {
      process.stderr.write(`unknown benchmark ${name}\n\n${usage()}`);
      return 2;
    }
    chosen.push(bench);
  }
  return chosen.length === 1 ? runOne(chosen[0], flags) : runEachInChild(chosen, flags);
}

for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.once(sig, () => {
    void runCleanups().finally(() => process.exit(130));
  });
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
    // Benchmarks leave no handles on purpose, but a stray keep-alive socket must not hang `npm run bench`.
    setTimeout(() => process.exit(code), 2000).unref();
  },
  (err) => {
    log((err as Error)?.stack ?? String(err));
    process.exitCode = 1;
  },
);
