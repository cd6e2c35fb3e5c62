/**
 * onboarding: N devices onboarding end to end over loopback with real TLS, through a
 * gateway and an authority in separate processes (started with the CLI), devices simulated
 * with the LeafDevice SDK in this process or in forked simulator workers.
 *
 * Reports devices/s, latency percentiles (start of onboarding to the mTLS CONNACK of the
 * reconnect), and per process (authority, gateway, simulator) CPU ms per device, CPU
 * utilization during the run (100% = one core busy) and peak RSS.
 *
 * `--gateways N` (N > 1) runs N gateway processes on one Redis (a random key prefix, its
 * keys deleted afterwards), every one enrolled with the one authority, and spreads the
 * devices over them round-robin by device (a device onboards and reconnects on the same one).
 */
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { Redis } from 'ioredis';
import type { KeySpec } from '../protocol/index.ts';
import { CpuMeter, log, monoMs, onCleanup, type Json, percentiles, procStatusKb, spawnNode, targetFields, waitForQuiet, type SpawnedNode } from './common.ts';
import { mergeResults, prepareSimulation, useShortPeerCertificates, type SimConfig, type SimCredential, type SimResult } from './onboarding-sim.ts';
import { BENCH_PASSPHRASE, startProcStack, type ProcStack } from './proc-stack.ts';
import { measureTlsFloor } from './tls-floor.ts';
import { defineBench } from './types.ts';

const KEYS: Record<string, KeySpec> = { 'ec-256': { keyType: 'ec', keySize: 256 }, 'rsa-2048': { keyType: 'rsa', keySize: 2048 } };

function credentials(stack: ProcStack, prefix: string, n: number, method: string): Array<{ id: string; credential: SimCredential }> {
  return Array.from({ length: n }, (_, i) => {
    const id = `bench-${prefix}-${i}`;
    const m = method === 'mixed' ? (i % 2 === 0 ? 'pki-signature' : 'ddkg') : method;
    if (m === 'ddkg') return { id, credential: { method: 'ddkg' as const, attributes: { cpu: `cpu-${id}`, mac: '02:00:00:00:00:01', board: 'bench' } } };
    const birth = stack.manufacturer.issueBirthCertificate(id);
    return { id, credential: { method: 'pki-signature' as const, birthCert: birth.birthCert, factoryKeyPem: birth.factoryKey.export({ type: 'pkcs8', format: 'pem' }) as string } };
  });
}

/** The Redis of the gateway cluster: answers, and the pid of its server when it runs on this machine. */
async function redisServer(url: string): Promise<{ pid: number | undefined }> {
  const r = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1, connectTimeout: 3000, retryStrategy: () => null });
  r.on('error', () => undefined);
  try {
    await r.connect();
    const pid = Number(/^process_id:(\d+)/m.exec(await r.info('server'))?.[1]);
    // Same machine and pid namespace: its CPU is ours to count (else it would look foreign).
    const local = pid > 0 && existsSync(`/proc/${pid}/stat`) && /redis/.test(readFileSync(`/proc/${pid}/cmdline`, 'utf8'));
    return { pid: local ? pid : undefined };
  } catch (err) {
    throw new Error(`the gateway cluster needs a Redis at ${url} (BENCH_REDIS_URL): ${(err as Error).message}`);
  } finally {
    r.disconnect();
  }
}

/** Deletes every key under `prefix` (the run's own). */
async function deleteRedisKeys(url: string, prefix: string): Promise<void> {
  const r = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1, connectTimeout: 3000, retryStrategy: () => null });
  r.on('error', () => undefined);
  try {
    await r.connect();
    let cursor = '0';
    let n = 0;
    do {
      const [next, keys] = await r.scan(cursor, 'MATCH', `${prefix}*`, 'COUNT', 1000);
      cursor = next;
      if (keys.length) n += await r.del(...keys);
    } while (cursor !== '0');
    log(`deleted ${n} Redis keys ${prefix}*`);
  } finally {
    r.disconnect();
  }
}

/** What one measured run leaves for the ratios: per onboarded device, CPU ms. */
interface RunSummary {
  r: SimResult;
  devicesPerS: number;
  /** Authority + gateway(s). */
  serverCpuMs: number;
  authorityMs: number;
  gatewayMs: number;
  /** Every process counted (simulator and Redis too). */
  totalCpuMs: number;
}

interface Worker {
  proc: SpawnedNode;
  prepare(cfg: SimConfig): Promise<void>;
  run(stopLaunchingAt: number, startAt?: number): Promise<SimResult>;
}

async function startWorker(i: number): Promise<Worker> {
  const proc = spawnNode('bench/onboarding-sim.ts', [], { name: `simulator-${i}`, ipc: true, env: { BENCH_ONBOARDING_WORKER: '1' } });
  await new Promise<void>((resolve, reject) => {
    proc.child.once('message', () => resolve());
    proc.child.once('exit', (c) => reject(new Error(`simulator worker exited (${c}): ${proc.stderrTail()}`)));
  });
  const call = <T>(msg: object, ok: string, pick: (m: { result?: SimResult }) => T) => new Promise<T>((resolve, reject) => {
    proc.child.once('message', (m: { cmd: string; result?: SimResult; message?: string }) => (m.cmd === ok ? resolve(pick(m)) : reject(new Error(m.message))));
    proc.child.send(msg);
  });
  return {
    proc,
    prepare: (cfg) => call({ cmd: 'prepare', cfg }, 'prepared', () => undefined),
    run: (stopLaunchingAt, startAt) => call({ cmd: 'run', stopLaunchingAt, startAt }, 'result', (m) => m.result!),
  };
}

export const onboardingBench = defineBench({
  name: 'onboarding',
  description: 'devices/s end to end (bootstrap, auth, keygen, CSR, signing, delivery, mTLS reconnect; --flow compact|classic), gateway and authority in separate processes',
  options: {
    devices: { default: 2000, help: 'devices to onboard in the measured run' },
    concurrency: { default: 100, help: 'devices onboarding at once (over all simulators)' },
    workers: { default: 0, help: 'simulator worker processes (0: simulate in the bench process)' },
    method: { default: 'pki-signature', help: 'pki-signature, ddkg or mixed' },
    flow: { default: 'compact', help: 'onboarding flow of the SDK: compact (begin, enroll: two exchanges) or classic (register, auth, csr)' },
    key: { default: 'ec-256', help: 'device key the instruction asks for: ec-256 or rsa-2048' },
    warmup: { default: 100, help: 'devices onboarded before the measured run (JIT, connection pools)' },
    'authority-concurrency': { default: 0, help: 'gateway authorityConcurrency (outbox requests in flight); 0 keeps the product default' },
    'run-seconds': { default: 150, help: 'no new device starts after this many seconds of the measured run' },
    'timeout-ms': { default: 60_000, help: 'per-device SDK timeout' },
    'gateway-prof': { default: '', help: 'directory: run gateway and authority with --cpu-prof (profiles written there at exit)' },
    gateways: { default: 1, help: 'gateway processes; more than one share a Redis (BENCH_REDIS_URL, default redis://127.0.0.1:6379) and devices are spread over them round-robin' },
    redis: { default: false, help: 'run the gateway(s) on Redis even with --gateways 1 (cluster mode: sessions, outbox, limits in Redis)' },
    'tls-floor': { default: 1000, help: 'after the run, devices for the TLS floor: the CPU of the two handshakes alone (bootstrap + mutual TLS) against node\'s bare TLS server, both ends (0: skip)' },
    rate: { default: '', help: 'open loop: devices arrive at this many per second for --open-seconds, each started on time whatever the others do, and the latency at that rate is reported; "auto": first the closed-loop run (its devices/s is the maximum), then open loop at --open-fraction of it (p99_at_80pct_ms); empty: closed loop only' },
    arrival: { default: 'poisson', help: 'open-loop arrivals: poisson (exponential gaps) or even' },
    'open-seconds': { default: 30, help: 'open loop: seconds of arrivals (devices = rate x seconds)' },
    'open-fraction': { default: 0.8, help: 'with --rate auto: the open-loop rate as a fraction of the closed-loop devices/s' },
    'sim-peer-chain': { default: false, help: 'simulated devices let node build the detailed peer certificate chain after each handshake (~0.4 ms each; off: the short form, which the host-name check reads)' },
  },
  async run(opts, emit) {
    const key = KEYS[opts.key];
    if (!key) throw new Error(`--key must be one of ${Object.keys(KEYS).join(', ')}`);
    if (!['pki-signature', 'ddkg', 'mixed'].includes(opts.method)) throw new Error('--method must be pki-signature, ddkg or mixed');
    if (opts.flow !== 'compact' && opts.flow !== 'classic') throw new Error('--flow must be compact or classic');
    const flow = opts.flow as 'compact' | 'classic';
    const rateOpt = String(opts.rate).trim();
    const autoRate = rateOpt === 'auto';
    const fixedRate = rateOpt && !autoRate ? Number(rateOpt) : 0;
    if (rateOpt && !autoRate && !(fixedRate > 0)) throw new Error('--rate must be a positive number of devices/s, "auto" or empty');
    if (opts.arrival !== 'poisson' && opts.arrival !== 'even') throw new Error('--arrival must be poisson or even');
    if (!(opts['open-fraction'] > 0)) throw new Error('--open-fraction must be positive');
    const total = opts.devices + opts.warmup;
    const nGateways = opts.gateways;
    if (!Number.isInteger(nGateways) || nGateways < 1) throw new Error('--gateways must be a positive integer');
    const profArgs = (name: string) => (opts['gateway-prof'] ? ['--cpu-prof', '--cpu-prof-dir', opts['gateway-prof'], '--cpu-prof-name', `${name}.cpuprofile`] : undefined);
    let redis: { url: string; keyPrefix: string } | undefined;
    let redisPid: number | undefined;
    if (nGateways > 1 || opts.redis) {
      const url = process.env.BENCH_REDIS_URL ?? 'redis://127.0.0.1:6379';
      redisPid = (await redisServer(url)).pid;
      redis = { url, keyPrefix: `lgbench:${randomBytes(6).toString('hex')}:` };
      // Registered before the processes start, so it runs after they are stopped.
      const r = redis;
      onCleanup(() => deleteRedisKeys(r.url, r.keyPrefix));
    }
    const stack = await startProcStack({
      keep: opts.keep,
      gateways: nGateways,
      redis,
      gateway: {
        // Every simulated device comes from 127.0.0.1, twice (bootstrap + mTLS).
        // (Open loop: how many devices arrive is known only once the closed-loop rate is: room for plenty.)
        rateLimits: rateOpt
          ? { connectionsPerAddress: { points: total * 4 + 1_000_000, durationSeconds: 60 }, concurrentOnboardings: total + 100_000 }
          : { connectionsPerAddress: { points: total * 4 + 1000, durationSeconds: 60 }, concurrentOnboardings: total + 1000 },
        ...(opts['authority-concurrency'] > 0 ? { authorityConcurrency: opts['authority-concurrency'] } : {}),
      },
      gatewayNodeArgs: (i) => profArgs(nGateways > 1 ? `gateway-${i + 1}` : 'gateway'),
      authorityNodeArgs: profArgs('authority'),
    });
    const brokerUrls = stack.gateways.map((g) => `mqtts://127.0.0.1:${g.port}`);
    const brokerUrl = brokerUrls[0];
    const keyPreference = [key];

    log(`preparing ${total} device credentials (${opts.method})`);
    // Round-robin over the gateways by device, across worker slices too: worker w gets devices
    // w, w+W, w+2W, ... and those alternate between the gateways.
    const spread = <T extends object>(list: T[]) => list.map((d, i) => (nGateways > 1 ? { ...d, brokerUrl: brokerUrls[Math.floor(i / Math.max(1, opts.workers)) % nGateways] } : d));
    const warm = spread(credentials(stack, 'warm', opts.warmup, opts.method));
    const devices = spread(credentials(stack, 'dev', opts.devices, opts.method));

    const workers: Worker[] = [];
    for (let i = 0; i < opts.workers; i++) workers.push(await startWorker(i));
    /** Prepares the devices (keys decoded, outside the measured window), then returns the run. */
    // `rate` (open loop): devices/s over all simulators, each worker taking its share with its own seed.
    const prepareSim = async (list: SimConfig['devices'], rate = 0): Promise<(stopLaunchingAt: number) => Promise<SimResult>> => {
      const base = { brokerUrl, ca: stack.rootPem, keyPreference, flow, timeoutMs: opts['timeout-ms'], stopLaunchingAt: Infinity, fullPeerChain: opts['sim-peer-chain'], arrival: opts.arrival as 'poisson' | 'even' };
      if (!workers.length) {
        const sim = prepareSimulation({ ...base, devices: list, concurrency: opts.concurrency, ...(rate ? { rate, seed: 1 } : {}) });
        return (stop) => sim.run(stop);
      }
      const slices = workers.map((_, w) => list.filter((__, i) => i % workers.length === w));
      const per = Math.max(1, Math.round(opts.concurrency / workers.length));
      await Promise.all(workers.map((w, i) => w.prepare({ ...base, devices: slices[i], concurrency: per, ...(rate ? { rate: rate / workers.length, seed: i + 1 } : {}) })));
      // Open loop: one start time for every worker (monotonic ms are shared by the processes).
      return async (stop) => {
        const startAt = monoMs() + 100;
        return mergeResults(await Promise.all(workers.map((w) => w.run(stop, rate ? startAt : undefined))));
      };
    };

    if (warm.length) {
      log(`warm-up: ${warm.length} devices`);
      const w = await (await prepareSim(warm))(Infinity);
      if (w.failed) log('warm-up failures:', w.errors);
    }

    const gatewayNames = stack.gateways.map((_, i) => (nGateways > 1 ? `gateway-${i + 1}` : 'gateway'));
    const procs: Record<string, number | 'self'> = { authority: stack.authority.pid, simulator: 'self' };
    stack.gateways.forEach((g, i) => (procs[gatewayNames[i]] = g.pid));
    if (redisPid) procs.redis = redisPid;
    workers.forEach((w, i) => (procs[`simulator-${i}`] = w.proc.pid));

    /**
     * One measured run (closed loop at --concurrency, or open loop at `rate`/s) and its lines;
     * returns its rate and the CPU per device of the authority and the gateway(s).
     */
    const measuredRun = async (list: SimConfig['devices'], rate: number, extra: Record<string, Json>): Promise<RunSummary> => {
      const meter = new CpuMeter(procs);
      const measured = await prepareSim(list, rate);
      await waitForQuiet(60_000);
      log(rate
        ? `open loop: ${list.length} devices arriving at ${rate.toFixed(1)}/s (${opts.arrival}), ${opts.workers || 'no'} simulator workers`
        : `measured run: ${list.length} devices, concurrency ${opts.concurrency}, ${opts.workers || 'no'} simulator workers, ${nGateways} gateway${nGateways > 1 ? 's' : ''}${redis ? ' on Redis' : ''}`);
      meter.begin();
      const t0 = monoMs();
      const r = await measured(t0 + (rate ? (opts['open-seconds'] + 10) : opts['run-seconds']) * 1000);
      const { wallMs, cpuMs, foreignPct } = meter.end();
      const spanMs = r.lastEnd - r.firstStart;

      // `gateways` (an option) is on every line already; say where the gateways keep their state.
      const ctx: Record<string, Json> = { method: opts.method, key: opts.key, flow, ...(redis ? { gateway_state: 'redis' } : {}), ...extra };
      const devicesPerS = (r.ok * 1000) / spanMs;
      emit('devices_per_s', devicesPerS, 'devices/s', { ...ctx, ok: r.ok, failed: r.failed, not_started: r.notStarted, wall_s: spanMs / 1000 });
      if (r.failed) emit('devices_failed', r.failed, 'devices', { ...ctx, errors: r.errors });
      const [p50, p90, p99, max] = percentiles(r.latencies, [50, 90, 99, 100]);
      emit('latency_p50_ms', p50, 'ms', ctx);
      emit('latency_p90_ms', p90, 'ms', ctx);
      emit('latency_p99_ms', p99, 'ms', ctx);
      emit('latency_max_ms', max, 'ms', ctx);
      if (rate) emit('open_loop_start_lag_max_ms', r.maxStartLagMs ?? 0, 'ms', { ...ctx, max_in_flight: r.maxInFlight ?? 0, note: 'largest delay of a device start behind its scheduled arrival (included in its latency); max_in_flight: most devices onboarding at once (summed over simulators)' });
      for (const [phase, values] of Object.entries(r.phases)) {
        const [a, b] = percentiles(values, [50, 99]);
        const what = (flow === 'compact'
          ? { auth: 'bootstrap connect + begin + offer (challenge and instruction)', keygen: 'device key generation', issue: 'CSR build + signature + enroll: authority verification and issuance + delivery', mtls: 'mTLS reconnect to CONNACK' }
          : { auth: 'bootstrap connect + register + challenge + auth + instruction', keygen: 'device key generation', issue: 'CSR build + gateway outbox + authority issuance + delivery', mtls: 'mTLS reconnect to CONNACK' })[phase];
        emit(`phase_${phase}_p50_ms`, a, 'ms', { ...ctx, phase: what ?? phase });
        emit(`phase_${phase}_p99_ms`, b, 'ms', { ...ctx, phase: what ?? phase });
      }

      // Simulator = this process plus its workers.
      const simCpu = Object.entries(cpuMs).filter(([k]) => k.startsWith('simulator')).reduce((a, [, v]) => a + v, 0);
      // With several gateways, `gateway` is their sum and each one has its own lines too.
      const perProcess: Record<string, { cpu: number; hwmKb: number; processes?: number }> = {
        authority: { cpu: cpuMs.authority, hwmKb: procStatusKb(stack.authority.pid, 'VmHWM') },
        gateway: {
          cpu: gatewayNames.reduce((a, n) => a + cpuMs[n], 0),
          hwmKb: stack.gateways.reduce((a, g) => a + procStatusKb(g.pid, 'VmHWM'), 0),
          ...(nGateways > 1 ? { processes: nGateways } : {}),
        },
        simulator: { cpu: simCpu, hwmKb: procStatusKb(process.pid, 'VmHWM') + workers.reduce((a, w) => a + procStatusKb(w.proc.pid, 'VmHWM'), 0) },
      };
      if (nGateways > 1) stack.gateways.forEach((g, i) => (perProcess[gatewayNames[i]] = { cpu: cpuMs[gatewayNames[i]], hwmKb: procStatusKb(g.pid, 'VmHWM') }));
      // Redis-server, when it runs here: shared with whatever else uses it meanwhile.
      if (redisPid) perProcess.redis = { cpu: cpuMs.redis, hwmKb: procStatusKb(redisPid, 'VmHWM') };
      for (const [name, p] of Object.entries(perProcess)) {
        const more: Record<string, Json> = p.processes ? { processes: p.processes } : {};
        emit('cpu_ms_per_device', p.cpu / Math.max(1, r.ok), 'ms', { ...ctx, process: name, ...more });
        emit('cpu_util_pct', (p.cpu / wallMs) * 100, '%', { ...ctx, process: name, ...more, note: '100 = one core busy for the whole run' });
        emit('rss_mb_peak', p.hwmKb / 1024, 'MB', { ...ctx, process: name, ...more, ...(name === 'simulator' && workers.length ? { processes: workers.length + 1 } : {}) });
      }
      const counted = ['authority', 'gateway', 'simulator', ...(redisPid ? ['redis'] : [])];
      const totalCpu = counted.reduce((a, n) => a + perProcess[n].cpu, 0);
      emit('bench_cpu_util_pct', (totalCpu / wallMs) * 100, '%', { ...ctx, note: `${counted.join(' + ')}; the machine has ${cpus().length * 100}%` });
      emit('foreign_cpu_pct', foreignPct, '%', { ...ctx, note: 'CPU used by processes outside this benchmark during the run (another session\'s tests, services): > 10 means the numbers are low' });
      const ok = Math.max(1, r.ok);
      return { r, devicesPerS, serverCpuMs: (perProcess.authority.cpu + perProcess.gateway.cpu) / ok, authorityMs: perProcess.authority.cpu / ok, gatewayMs: perProcess.gateway.cpu / ok, totalCpuMs: totalCpu / ok };
    };

    /** The open loop's devices: `rate` x --open-seconds, fresh credentials. */
    const openLoopDevices = (rate: number) => spread(credentials(stack, 'open', Math.max(1, Math.ceil(rate * opts['open-seconds'])), opts.method));
    const openCtx = (rate: number) => ({ mode: 'open-loop', offered_rate: Math.round(rate * 100) / 100, arrival: opts.arrival, open_seconds: opts['open-seconds'] });

    // The run the ratio to the TLS floor is taken from: closed loop, or the fixed-rate open loop.
    const mainRun = fixedRate
      ? await measuredRun(openLoopDevices(fixedRate), fixedRate, openCtx(fixedRate))
      : await measuredRun(devices, 0, rateOpt ? { mode: 'closed-loop', concurrency: opts.concurrency } : {});

    if (autoRate) {
      // The closed loop's devices/s at --concurrency is taken as the maximum rate; then
      // devices arrive at a fraction of it, open loop, and the tail latency is what counts.
      const maxRate = mainRun.devicesPerS;
      const rate = maxRate * opts['open-fraction'];
      const open = await measuredRun(openLoopDevices(rate), rate, { ...openCtx(rate), max_rate: Math.round(maxRate * 100) / 100, fraction: opts['open-fraction'] });
      const [p50, p99] = percentiles(open.r.latencies, [50, 99]);
      const pct = Math.round(opts['open-fraction'] * 100);
      const met = targetFields(p99, 1000, '<=');
      emit(`p99_at_${pct}pct_ms`, p99, 'ms', {
        ...met, met: met.met && open.r.failed === 0 && open.r.notStarted === 0,
        max_rate: Math.round(maxRate * 100) / 100, offered_rate: Math.round(rate * 100) / 100, arrival: opts.arrival, p50_ms: Math.round(p50), ok: open.r.ok, failed: open.r.failed, achieved_rate: Math.round(open.devicesPerS * 100) / 100,
        method: opts.method, key: opts.key, flow,
        note: `onboarding latency p99 (scheduled arrival to mTLS CONNACK) with devices arriving open loop at ${pct}% of the closed-loop devices/s (concurrency ${opts.concurrency}) of this run; met needs every device onboarded too`,
      });
    }

    for (const w of workers) w.proc.child.send({ cmd: 'exit' });

    if (opts['tls-floor'] > 0) {
      // Same process, same host state, right after the run: the handshakes alone.
      useShortPeerCertificates(!opts['sim-peer-chain']);
      log(`TLS floor: ${opts['tls-floor']} devices x 2 handshakes against bare node TLS`);
      await waitForQuiet(30_000);
      const f = await measureTlsFloor({ gatewayDir: stack.gateway.dataDir, caDir: stack.caDir, passphrase: BENCH_PASSPHRASE, anchors: stack.rootPem, devices: opts['tls-floor'], concurrency: opts.concurrency });
      const floor = f.clientMs + f.serverMs;
      const runPerDevice = mainRun.totalCpuMs;
      const ctx = { method: opts.method, key: opts.key, flow, ...(fixedRate ? { mode: 'open-loop' } : {}) };
      // Issue 7's onboarding target (300 devices/s with the simulator on this machine's cores)
      // leaves this much CPU per device for everything, handshakes included.
      const budget = (cpus().length * 1000) / 300;
      emit('tls_floor_cpu_ms_per_device', floor, 'ms', {
        ...ctx, client_ms: f.clientMs, server_ms: f.serverMs, failed: f.failed,
        note: 'two handshakes (bootstrap, mutual TLS) + one CONNECT/CONNACK each, node TLS alone, client and server CPU',
      });
      emit('tls_floor_share_pct', (floor / runPerDevice) * 100, '%', { ...ctx, run_cpu_ms_per_device: runPerDevice, note: 'TLS floor / CPU per device of the run (all processes)' });
      emit('tls_floor_share_of_budget_pct', (floor / budget) * 100, '%', { ...ctx, budget_ms_per_device: budget, target_devices_per_s: 300, cores: cpus().length, note: 'TLS floor / (cores x 1000 ms / 300 devices)' });
      // Issue 20: what the gateway and the authority spend per device, against what the server
      // side of the device's two handshakes costs alone (node's bare TLS server, same options).
      const ratio = mainRun.serverCpuMs / f.serverMs;
      emit('server_cpu_to_tls_floor', ratio, 'ratio', {
        ...ctx, ...targetFields(ratio, 2.5, '<='), server_cpu_ms_per_device: mainRun.serverCpuMs, authority_cpu_ms: mainRun.authorityMs, gateway_cpu_ms: mainRun.gatewayMs,
        floor_server_ms: f.serverMs, floor_devices: f.devices, floor_failed: f.failed,
        note: '(gateway + authority CPU per onboarded device) / (server-side CPU of the two TLS handshakes alone, node tls.Server with the broker options), same run',
      });
    } else {
      log('--tls-floor 0: no TLS floor, so no server_cpu_to_tls_floor line');
    }
    await stack.close();
  },
});
