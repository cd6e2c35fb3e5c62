/**
 * Smoke test of the benchmarks: each one runs through `bench/run.ts`, as `npm run bench`
 * does, at a tiny size, and must print well-formed JSON lines with the metrics issue 7 asks
 * for. Nothing here looks at how fast anything was (benchmarks are not tests); a benchmark
 * that no longer starts, crashes, or stops printing a metric fails. The bounds are sized for a
 * loaded machine: a smoke run never waits for a quiet one, and on a busy 2-core VM a tiny
 * issuance run took 150 s.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('..', import.meta.url));

interface Line {
  bench: string;
  metric: string;
  value: number;
  unit: string;
  [k: string]: unknown;
}

function runBench(args: string[], timeoutMs: number): Promise<{ code: number | null; lines: Line[]; stderr: string }> {
  return new Promise((resolve, reject) => {
    // --no-quiet-wait: a smoke run never waits for a quiet machine (under `npm test` it never is).
    const child = spawn(process.execPath, ['--import', 'tsx', 'bench/run.ts', ...args, '--no-quiet-wait', '--max-seconds', String(Math.round(timeoutMs / 1000))], {
      cwd: ROOT,
      env: { ...process.env, BENCH_VERBOSE: '', BENCH_NO_QUIET_WAIT: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs + 30_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      const lines: Line[] = [];
      for (const raw of out.split('\n').filter(Boolean)) {
        // stdout carries JSON lines and nothing else.
        lines.push(JSON.parse(raw) as Line);
      }
      resolve({ code, lines, stderr: err.slice(-2000) });
    });
  });
}

/** Every line well formed, and each named metric (with its context) present with a finite value. */
function check(lines: Line[], bench: string, wanted: Array<[string, Record<string, unknown>?]>): void {
  for (const l of lines) {
    assert.equal(l.bench, bench);
    assert.equal(typeof l.metric, 'string');
    assert.equal(typeof l.unit, 'string', `${l.metric} has a unit`);
    assert.ok(typeof l.value === 'number' && Number.isFinite(l.value), `${l.metric} has a finite value: ${JSON.stringify(l)}`);
    assert.equal(l.node, process.version);
  }
  for (const [metric, ctx = {}] of wanted) {
    const hit = lines.find((l) => l.metric === metric && Object.entries(ctx).every(([k, v]) => l[k] === v));
    assert.ok(hit, `${bench}: no ${metric} ${JSON.stringify(ctx)} among ${lines.map((l) => l.metric).join(', ')}`);
  }
}

test('bench issuance at a tiny size prints certs/s, raw sign and their ratio for both key types', { timeout: 720_000 }, async () => {
  const r = await runBench(['issuance', '--seconds', '0.3', '--breakdown', '20'], 600_000);
  assert.equal(r.code, 0, r.stderr);
  check(r.lines, 'issuance', [
    ['raw_sign_per_s', { key: 'ec-256' }], ['certs_per_s', { key: 'ec-256' }], ['certs_per_s', { key: 'rsa-2048' }],
    ['ratio_to_raw_sign', { key: 'ec-256' }], ['main_thread_us', { key: 'ec-256' }], ['machine_probe_sign_per_s'],
  ]);
});

test('bench onboarding at a tiny size: three processes, every device onboarded, per-process CPU and RSS', { timeout: 720_000 }, async () => {
  const r = await runBench(['onboarding', '--devices', '20', '--warmup', '5', '--concurrency', '5', '--tls-floor', '10'], 600_000);
  assert.equal(r.code, 0, r.stderr);
  check(r.lines, 'onboarding', [
    ['devices_per_s'], ['latency_p50_ms'], ['latency_p99_ms'],
    ['cpu_ms_per_device', { process: 'authority' }], ['cpu_ms_per_device', { process: 'gateway' }], ['cpu_ms_per_device', { process: 'simulator' }],
    ['rss_mb_peak', { process: 'authority' }], ['rss_mb_peak', { process: 'gateway' }], ['rss_mb_peak', { process: 'simulator' }],
    ['tls_floor_cpu_ms_per_device', { failed: 0 }], ['tls_floor_share_pct'], ['tls_floor_share_of_budget_pct'],
  ]);
  const rate = r.lines.find((l) => l.metric === 'devices_per_s')!;
  assert.equal(rate.ok, 20);
  assert.equal(rate.failed, 0);
});

test('bench broker at a tiny size: gateway and bare aedes (and Mosquitto where installed), QoS 0 and 1', { timeout: 720_000 }, async () => {
  const mosquitto = ['/usr/sbin/mosquitto', '/usr/bin/mosquitto', '/usr/local/sbin/mosquitto'].some((p) => existsSync(p));
  const targets = mosquitto ? 'gateway,aedes,mosquitto' : 'gateway,aedes';
  const r = await runBench(['broker', '--seconds', '0.5', '--latency-seconds', '0.5', '--latency-rate', '500', '--rounds', '1', '--publishers', '2', '--targets', targets], 600_000);
  assert.equal(r.code, 0, r.stderr);
  const wanted: Array<[string, Record<string, unknown>?]> = [
    ['msgs_per_s', { target: 'gateway', qos: 0 }], ['msgs_per_s', { target: 'gateway', qos: 1 }],
    ['msgs_per_s', { target: 'aedes', qos: 1 }], ['plugin_overhead_pct', { qos: 1 }], ['latency_p99_ms', { target: 'gateway', qos: 1 }],
  ];
  if (mosquitto) wanted.push(['msgs_per_s', { target: 'mosquitto', qos: 1 }], ['ratio_vs_mosquitto', { target: 'gateway', qos: 1 }]);
  check(r.lines, 'broker', wanted);
});

test('bench connections at a tiny size: every connection held, connect rate and RSS per connection', { timeout: 720_000 }, async () => {
  const r = await runBench(['connections', '--connections', '60', '--warmup', '10', '--hold', '0.5', '--steps', '', '--workers', '1', '--concurrency', '10'], 600_000);
  assert.equal(r.code, 0, r.stderr);
  check(r.lines, 'connections', [['connect_per_s'], ['rss_kb_per_connection'], ['connections_held']]);
  // The gateway, then the bare node TLS floor under it, each with every connection held.
  const held = r.lines.filter((l) => l.metric === 'connections_held');
  assert.deepEqual(held.map((l) => [l.target, l.value]), [['gateway', 60], ['node-tls', 60]]);
  assert.deepEqual(r.lines.filter((l) => l.metric === 'rss_kb_per_connection').map((l) => l.target), ['gateway', 'node-tls']);
});
