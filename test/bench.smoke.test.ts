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

/** A ratio line of issue 20: present once, finite, with its target, direction and a boolean verdict. */
function checkRatio(lines: Line[], metric: string, target: number, op: '>=' | '<=', ctx: Record<string, unknown> = {}): Line {
  const hits = lines.filter((l) => l.metric === metric && Object.entries(ctx).every(([k, v]) => l[k] === v));
  assert.equal(hits.length, 1, `${metric} ${JSON.stringify(ctx)}: one line, got ${hits.length}`);
  const l = hits[0];
  assert.ok(Number.isFinite(l.value), JSON.stringify(l));
  assert.equal(l.target, target);
  assert.equal(l.target_op, op);
  assert.equal(typeof l.met, 'boolean');
  return l;
}

test('bench issuance at a tiny size prints certs/s, raw sign and their ratio for both key types', { timeout: 720_000 }, async () => {
  const r = await runBench(['issuance', '--seconds', '0.3', '--breakdown', '20'], 600_000);
  assert.equal(r.code, 0, r.stderr);
  check(r.lines, 'issuance', [
    ['raw_sign_per_s', { key: 'ec-256' }], ['certs_per_s', { key: 'ec-256' }], ['certs_per_s', { key: 'rsa-2048' }],
    ['ratio_to_raw_sign', { key: 'ec-256' }], ['main_thread_us', { key: 'ec-256' }], ['machine_probe_sign_per_s'],
    ['raw_sign_threads_per_s', { key: 'ec-256' }],
  ]);
  // The raw-sign floor on as many threads as the issuance pool signs on.
  const threads = r.lines.find((l) => l.metric === 'raw_sign_threads_per_s')!;
  assert.ok(Number.isInteger(threads.threads) && (threads.threads as number) >= 1);
  const ratio = checkRatio(r.lines, 'ratio_to_raw_sign', 0.1, '>=', { key: 'ec-256' });
  assert.equal(ratio.sign_threads, threads.threads);
});

test('bench onboarding at a tiny size: three processes, every device onboarded, per-process CPU and RSS', { timeout: 720_000 }, async () => {
  // --rate auto: the closed-loop run, then an open loop at 80% of its rate (two seconds of arrivals).
  const r = await runBench(['onboarding', '--devices', '20', '--warmup', '5', '--concurrency', '5', '--tls-floor', '10', '--rate', 'auto', '--open-seconds', '2'], 600_000);
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
  assert.equal(rate.mode, 'closed-loop');
  // Issue 20's ratio to the TLS floor of the same run, with its target.
  checkRatio(r.lines, 'server_cpu_to_tls_floor', 2.5, '<=');
  // The open loop: its own lines, and the p99 at 80% of the closed-loop rate with its target.
  const open = r.lines.filter((l) => l.mode === 'open-loop');
  for (const m of ['devices_per_s', 'latency_p50_ms', 'latency_p99_ms', 'open_loop_start_lag_max_ms']) assert.ok(open.some((l) => l.metric === m), `open loop: no ${m}`);
  const p99 = checkRatio(r.lines, 'p99_at_80pct_ms', 1000, '<=');
  assert.ok((p99.offered_rate as number) > 0 && (p99.max_rate as number) > (p99.offered_rate as number), JSON.stringify(p99));
  assert.equal((p99.ok as number) + (p99.failed as number), open.find((l) => l.metric === 'devices_per_s')!.ok as number + (open.find((l) => l.metric === 'devices_per_s')!.failed as number));
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
  if (mosquitto) wanted.push(['msgs_per_s', { target: 'mosquitto', qos: 1 }], ['ratio_vs_mosquitto', { broker: 'gateway', qos: 1 }]);
  check(r.lines, 'broker', wanted);
  checkRatio(r.lines, 'plugin_overhead_pct', 10, '<=', { qos: 1 });
  if (mosquitto) checkRatio(r.lines, 'ratio_vs_mosquitto', 1.0, '>=', { broker: 'gateway', qos: 1 });
});

test('bench connections at a tiny size: every connection held, connect rate and RSS per connection', { timeout: 720_000 }, async () => {
  const r = await runBench(['connections', '--connections', '60', '--warmup', '10', '--hold', '0.5', '--steps', '', '--workers', '1', '--concurrency', '10'], 600_000);
  assert.equal(r.code, 0, r.stderr);
  check(r.lines, 'connections', [['connect_per_s'], ['rss_kb_per_connection'], ['connections_held']]);
  // The gateway, then the bare node TLS floor under it, each with every connection held.
  const held = r.lines.filter((l) => l.metric === 'connections_held');
  assert.deepEqual(held.map((l) => [l.target, l.value]), [['gateway', 60], ['node-tls', 60]]);
  assert.deepEqual(r.lines.filter((l) => l.metric === 'rss_kb_per_connection').map((l) => l.target), ['gateway', 'node-tls']);
  // Issue 20: the gateway over the node-tls floor of the same run, with its target.
  const ratio = r.lines.find((l) => l.metric === 'rss_to_node_tls')!;
  assert.ok(ratio, 'no rss_to_node_tls line');
  assert.equal(ratio.target, 1.15);
  assert.equal(ratio.target_op, '<=');
  assert.equal(typeof ratio.met, 'boolean');
  assert.ok(typeof ratio.gateway_kb_per_connection === 'number' && typeof ratio.node_tls_kb_per_connection === 'number');
});
