/**
 * Shared pieces of the benchmarks: the JSON-lines output, option parsing, percentiles,
 * /proc sampling (CPU and memory of other processes), child processes that are always
 * cleaned up, and free ports on loopback.
 */
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { generateKeyPairSync, sign } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { cpus } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO_ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
export const BENCH_DIR = join(REPO_ROOT, 'bench');

// ---------------------------------------------------------------- output

export type Json = string | number | boolean | null | Json[] | { [k: string]: Json };

/** Context fields printed on every line. */
export function baseContext(): Record<string, Json> {
  return { node: process.version, cpus: cpus().length };
}

export interface Emitter {
  /** One JSON line on stdout: {"bench","metric","value","unit", ...context, ...extra}. */
  (metric: string, value: number, unit: string, extra?: Record<string, Json>): void;
}

export function emitter(bench: string, context: Record<string, Json>): Emitter {
  return (metric, value, unit, extra = {}) => {
    const v = Number.isFinite(value) ? round(value) : null;
    process.stdout.write(JSON.stringify({ bench, metric, value: v, unit, ...extra, ...context }) + '\n');
  };
}

/** Three significant decimals for small numbers, integers for big ones. */
export function round(v: number): number {
  if (Math.abs(v) >= 1000) return Math.round(v);
  if (Math.abs(v) >= 1) return Math.round(v * 100) / 100;
  return Math.round(v * 10000) / 10000;
}

/** Progress and diagnostics go to stderr so stdout stays pure JSON lines. */
export function log(...parts: unknown[]): void {
  process.stderr.write(`[bench] ${parts.map((p) => (typeof p === 'string' ? p : JSON.stringify(p))).join(' ')}\n`);
}

// ---------------------------------------------------------------- options

export type OptionSpec = { default: number | string | boolean; help: string };
export type OptionSpecs = Record<string, OptionSpec>;
export type Options<S extends OptionSpecs> = { [K in keyof S]: S[K]['default'] extends number ? number : S[K]['default'] extends boolean ? boolean : string };

/** `--name value`, `--name=value`, `--flag`; unknown names are ignored when `lenient`. */
export function parseOptions<S extends OptionSpecs>(specs: S, argv: string[], lenient = false): Options<S> {
  const out: Record<string, unknown> = {};
  for (const [k, s] of Object.entries(specs)) out[k] = s.default;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) continue;
    let [name, value] = a.slice(2).split(/=(.*)/s, 2) as [string, string | undefined];
    const spec = specs[name];
    if (!spec) {
      if (lenient) continue;
      throw new Error(`unknown option --${name} (known: ${Object.keys(specs).map((k) => `--${k}`).join(', ')})`);
    }
    if (typeof spec.default === 'boolean') {
      out[name] = value === undefined ? true : value !== 'false' && value !== '0';
      continue;
    }
    if (value === undefined) value = argv[++i];
    if (value === undefined) throw new Error(`--${name} needs a value`);
    if (typeof spec.default === 'number') {
      const n = Number(value);
      if (!Number.isFinite(n)) throw new Error(`--${name} must be a number`);
      out[name] = n;
    } else out[name] = value;
  }
  return out as Options<S>;
}

// ---------------------------------------------------------------- statistics

/** Nearest-rank percentile of an unsorted sample (sorted copy). */
export function percentile(values: ArrayLike<number>, p: number): number {
  if (values.length === 0) return NaN;
  const sorted = Float64Array.from(values as ArrayLike<number>).sort();
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank];
}

export function percentiles(values: ArrayLike<number>, ps: number[]): number[] {
  if (values.length === 0) return ps.map(() => NaN);
  const sorted = Float64Array.from(values as ArrayLike<number>).sort();
  return ps.map((p) => sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))]);
}

/** Monotonic milliseconds, comparable across processes of this machine (CLOCK_MONOTONIC). */
export function monoMs(): number {
  return Number(process.hrtime.bigint()) / 1e6;
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

// ---------------------------------------------------------------- /proc sampling

let clkTck = 100;
try {
  // sysconf(_SC_CLK_TCK) is 100 on every Linux this runs on; keep it overridable.
  clkTck = Number(process.env.BENCH_CLK_TCK ?? 100);
} catch {
  /* default */
}

/** utime + stime of a process in ms (threads included), from /proc/<pid>/stat. */
export function procCpuMs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // fields[0] is field 3 (state); utime is field 14, stime field 15.
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / clkTck;
}

/** A field of /proc/<pid>/status in kB (VmRSS, VmHWM, ...). */
export function procStatusKb(pid: number, field: 'VmRSS' | 'VmHWM' | 'VmSize' | 'RssAnon'): number {
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) : NaN;
}

/** CPU of this process in ms (user + system). */
export function selfCpuMs(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
}

/**
 * A speed probe of this machine right now: ECDSA P-256 signatures per second on one thread
 * over `ms`. On a VM the same work can take 1.5x longer when the host is busy, which
 * /proc/stat inside the VM does not show; benchmarks print this before and after so runs can
 * be compared.
 */
export function signProbe(ms = 300): number {
  const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const data = Buffer.alloc(300, 7);
  for (let i = 0; i < 100; i++) sign('sha256', data, privateKey);
  let n = 0;
  const t0 = performance.now();
  while (performance.now() - t0 < ms) {
    for (let i = 0; i < 20; i++) sign('sha256', data, privateKey);
    n += 20;
  }
  return (n * 1000) / (performance.now() - t0);
}

/** The hard RLIMIT_NOFILE of this process (what a child can raise its soft limit to). */
export function hardNofile(): number {
  const m = /^Max open files\s+\S+\s+(\S+)/m.exec(readFileSync('/proc/self/limits', 'utf8'));
  return !m || m[1] === 'unlimited' ? Infinity : Number(m[1]);
}

/** Busy CPU ms of the whole machine (all cores), from /proc/stat: user+nice+system+irq+softirq+steal. */
export function machineBusyMs(): number {
  const f = readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
  const [user, nice, system, , , irq, softirq, steal] = f;
  return ((user + nice + system + irq + softirq + steal) * 1000) / clkTck;
}

/**
 * Waits (up to `maxMs`) until the machine is quiet: less than `thresholdPct` of one core busy
 * over a 500 ms sample. Called between phases, when the benchmark's own processes idle, so
 * what it sees is other people's work (a test suite of another session on a shared machine).
 */
export async function waitForQuiet(maxMs = 30_000, thresholdPct = 30): Promise<{ waitedMs: number; busyPct: number }> {
  // Smoke runs (`--no-quiet-wait`, or BENCH_NO_QUIET_WAIT=1) check the output's shape only:
  // inside a test suite the machine is never quiet, and waiting would only make them slow.
  if (process.env.BENCH_NO_QUIET_WAIT === '1') return { waitedMs: 0, busyPct: NaN };
  const t0 = monoMs();
  let busyPct = 0;
  for (;;) {
    const b0 = machineBusyMs();
    const s0 = monoMs();
    await sleep(500);
    busyPct = ((machineBusyMs() - b0) / (monoMs() - s0)) * 100;
    const waited = monoMs() - t0;
    if (busyPct < thresholdPct || waited >= maxMs) {
      if (waited > 1000) log(`waited ${(waited / 1000).toFixed(1)} s for a quiet machine (now ${busyPct.toFixed(0)}% of a core busy)`);
      return { waitedMs: waited, busyPct };
    }
  }
}

/**
 * CPU meter over a set of processes ('self' is this process). `foreignMs` is what the rest
 * of the machine used meanwhile: other sessions' tests, services. A benchmark that shares
 * the machine measures less than the machine can do; the output says how much was shared.
 */
export class CpuMeter {
  private start = new Map<string, number>();
  private t0 = 0;
  private machine0 = 0;
  constructor(private readonly procs: Record<string, number | 'self'>) {}
  private read(p: number | 'self'): number {
    return p === 'self' ? selfCpuMs() : procCpuMs(p);
  }
  begin(): void {
    this.t0 = monoMs();
    this.machine0 = machineBusyMs();
    for (const [name, p] of Object.entries(this.procs)) this.start.set(name, this.read(p));
  }
  /** CPU ms used by each process since begin(), and the wall ms. */
  end(): { wallMs: number; cpuMs: Record<string, number>; foreignMs: number; foreignPct: number } {
    const cpuMs: Record<string, number> = {};
    for (const [name, p] of Object.entries(this.procs)) cpuMs[name] = this.read(p) - (this.start.get(name) ?? 0);
    const wallMs = monoMs() - this.t0;
    const ours = Object.values(cpuMs).reduce((a, b) => a + b, 0);
    const foreignMs = Math.max(0, machineBusyMs() - this.machine0 - ours);
    return { wallMs, cpuMs, foreignMs, foreignPct: (foreignMs / wallMs) * 100 };
  }
}

// ---------------------------------------------------------------- cleanup and children

const cleanups: Array<() => void | Promise<void>> = [];

export function onCleanup(fn: () => void | Promise<void>): void {
  cleanups.push(fn);
}

export async function runCleanups(): Promise<void> {
  while (cleanups.length) {
    const fn = cleanups.pop()!;
    try {
      await fn();
    } catch (err) {
      log('cleanup failed:', (err as Error).message);
    }
  }
}

export function removeDirLater(dir: string, keep: boolean): void {
  onCleanup(() => {
    if (keep) log(`kept ${dir}`);
    else rmSync(dir, { recursive: true, force: true });
  });
}

/** Ends a child we started: SIGTERM, then SIGKILL after `graceMs`. By its own pid only. */
export async function stopChild(child: ChildProcess, graceMs = 5000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await exited;
  clearTimeout(timer);
}

// Children still running when this process exits (a test that timed out, an uncaught error,
// process.exit past the watchdog) are killed with it rather than left behind. SIGKILL of this
// process cannot be caught; everything else reaches 'exit'.
const liveChildren = new Set<ChildProcess>();
let exitHookInstalled = false;
function trackChild(child: ChildProcess): void {
  liveChildren.add(child);
  child.once('exit', () => liveChildren.delete(child));
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.once('exit', () => {
    for (const c of liveChildren) {
      try {
        c.kill('SIGKILL');
      } catch {
        /* already gone */
      }
    }
  });
}

export interface SpawnedNode {
  child: ChildProcess;
  pid: number;
  /** Resolves with the first stdout line that matches. */
  waitFor(re: RegExp, timeoutMs?: number): Promise<RegExpMatchArray>;
  stderrTail(): string;
  stop(): Promise<void>;
}

/**
 * Spawns `node --import tsx <script> ...args` in the repo root. With `nofile`, runs it under
 * `bash -c 'ulimit -n N && exec node ...'` so the node process (same pid) gets the limit,
 * capped at the hard limit (raising that needs privileges a container may not have).
 */
export function spawnNode(script: string, args: string[], opts: { env?: NodeJS.ProcessEnv; nofile?: number; name: string; ipc?: boolean; nodeArgs?: string[]; launcher?: boolean }): SpawnedNode {
  const nodeArgv = [...(opts.nodeArgs ?? []), '--import', 'tsx', script, ...args];
  const stdio: SpawnOptions['stdio'] = opts.ipc ? ['ignore', 'pipe', 'pipe', 'ipc'] : ['ignore', 'pipe', 'pipe'];
  const env: NodeJS.ProcessEnv = { ...process.env, ...opts.env };
  // 'advanced' IPC (structured clone) keeps typed arrays and Infinity intact.
  const base: SpawnOptions = { cwd: REPO_ROOT, env, stdio, serialization: 'advanced' };
  let child: ChildProcess;
  if (opts.launcher) {
    // `script` is an executable that starts node itself (bin/leafgate-gateway): node flags
    // travel in LEAFGATE_NODE_FLAGS (NODE_OPTIONS refuses --cpu-prof), the file-descriptor
    // limit is the launcher's business.
    if (opts.nodeArgs?.length) env.LEAFGATE_NODE_FLAGS = [env.LEAFGATE_NODE_FLAGS, ...opts.nodeArgs].filter(Boolean).join(' ');
    child = spawn(join(REPO_ROOT, script), args, base);
  } else {
    child = opts.nofile
      ? spawn('bash', ['-c', `n=${Math.floor(opts.nofile)}; h=$(ulimit -Hn); if [ "$h" != unlimited ] && [ "$h" -lt "$n" ]; then n=$h; fi; ulimit -n "$n" && exec "$0" "$@"`, process.execPath, ...nodeArgv], base)
      : spawn(process.execPath, nodeArgv, base);
  }
  trackChild(child);
  const lines: string[] = [];
  const waiters: Array<{ re: RegExp; resolve: (m: RegExpMatchArray) => void }> = [];
  let stderr = '';
  let buf = '';
  let stopping = false;
  child.stdout!.setEncoding('utf8');
  child.stdout!.on('data', (chunk: string) => {
    buf += chunk;
    let i: number;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      lines.push(line);
      for (const w of [...waiters]) {
        const m = w.re.exec(line);
        if (m) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve(m);
        }
      }
    }
  });
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (chunk: string) => {
    stderr = (stderr + chunk).slice(-8192);
    if (process.env.BENCH_VERBOSE) process.stderr.write(`[${opts.name}] ${chunk}`);
  });
  child.on('exit', (code, signal) => {
    if (code && !stopping) process.stderr.write(`[bench] ${opts.name} (pid ${child.pid}) exited with ${code}${signal ? ` (${signal})` : ''}\n${stderr.slice(-2000)}\n`);
  });
  const spawned: SpawnedNode = {
    child,
    pid: child.pid!,
    waitFor(re, timeoutMs = 60_000) {
      for (const l of lines) {
        const m = re.exec(l);
        if (m) return Promise.resolve(m);
      }
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`${opts.name}: no output matching ${re} within ${timeoutMs} ms\n${stderr}`)), timeoutMs);
        const onExit = (code: number | null) => {
          clearTimeout(timer);
          reject(new Error(`${opts.name} exited (${code}) before printing ${re}\n${stderr}`));
        };
        child.once('exit', onExit);
        waiters.push({
          re,
          resolve: (m) => {
            clearTimeout(timer);
            child.off('exit', onExit);
            resolve(m);
          },
        });
      });
    },
    stderrTail: () => stderr,
    stop: () => {
      stopping = true;
      return stopChild(child);
    },
  };
  onCleanup(() => spawned.stop());
  return spawned;
}

/** Runs a node CLI to completion; resolves with its stdout. */
export async function runNode(script: string, args: string[], opts: { env?: NodeJS.ProcessEnv; name: string }): Promise<string> {
  const p = spawnNode(script, args, opts);
  let out = '';
  p.child.stdout!.on('data', (c: string) => (out += c));
  const code = await new Promise<number | null>((r) => p.child.once('exit', (c) => r(c)));
  if (code !== 0) throw new Error(`${opts.name} failed (${code}): ${p.stderrTail()}`);
  return out;
}

/** The kernel's ephemeral port range (outgoing connections take their local ports from it). */
function ephemeralRange(): [number, number] {
  try {
    const [lo, hi] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);
    if (lo > 0 && hi >= lo) return [lo, hi];
  } catch {
    /* not Linux */
  }
  return [32768, 60999];
}

function canListen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once('error', () => resolve(false));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
  });
}

/**
 * A free port on 127.0.0.1 for programs that cannot take port 0 (Mosquitto, the gateway's
 * /metrics). Chosen below the ephemeral range: a port from port 0 could be taken as the
 * local port of some outgoing connection before the program binds it.
 */
export async function freePort(): Promise<number> {
  const [lo] = ephemeralRange();
  const min = 20_000;
  const max = Math.max(min + 1000, lo - 1);
  for (let i = 0; i < 50; i++) {
    const port = min + Math.floor(Math.random() * (max - min));
    if (port === 1883 || port === 5432 || port === 6379 || port === 8883 || port === 8443) continue;
    if (await canListen(port)) return port;
  }
  throw new Error('no free port found');
}

/** Runs `fn` for items with at most `concurrency` at once. */
export async function pool<T>(items: T[], concurrency: number, fn: (item: T, index: number) => Promise<void>): Promise<void> {
  let next = 0;
  const workers = Array.from({ length: Math.min(concurrency, items.length) }, async () => {
    while (next < items.length) {
      const i = next++;
      await fn(items[i], i);
    }
  });
  await Promise.all(workers);
}

// ---------------------------------------------------------------- targets

/**
 * The fields a ratio metric carries beside its value: the target it is held to (issue 20),
 * which way, and whether this run met it, so that a reader sees at once what passes.
 */
export function targetFields(value: number, target: number, op: '>=' | '<='): { target: number; target_op: string; met: boolean } {
  const met = Number.isFinite(value) && (op === '>=' ? value >= target : value <= target);
  return { target, target_op: op, met };
}
