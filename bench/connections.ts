/**
 * connections: K idle mutual-TLS MQTT connections to one gateway process. Reports the
 * connect rate (TLS handshake with client certificate + CONNECT/CONNACK, from the first
 * attempt to the last CONNACK) and the gateway's memory per connection (RSS delta / K,
 * with the V8 heap and external memory from its /metrics to tell where it sits).
 *
 * Certificates come straight from the authority's LocalCa (same data dir), not through
 * onboarding: the gateway checks only that a certificate chains to the device CA, that the
 * CN is the client id and that the serial is not revoked. Clients are raw TLS + a minimal
 * CONNECT (bench/connections-worker.ts) in worker processes with a raised fd limit, spread
 * over several 127.0.0.x source addresses when one would run out of ephemeral ports.
 */
import { CpuMeter, hardNofile, log, monoMs, waitForQuiet, percentiles, procStatusKb, sleep, spawnNode, targetFields, type SpawnedNode } from './common.ts';
import type { ConnCommand, ConnectResult } from './connections-worker.ts';
import { BENCH_PASSPHRASE, metricValue, startProcStack } from './proc-stack.ts';
import { startMosquitto } from './reference-brokers.ts';
import { defineBench } from './types.ts';
import { formatDelta, heapCensus, heapDelta } from './heap-summary.ts';
import { mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { join, resolve } from 'node:path';

interface ConnWorker {
  proc: SpawnedNode;
  call<T>(cmd: ConnCommand): Promise<T>;
}

async function startWorker(i: number, nofile: number, profDir: string): Promise<ConnWorker> {
  // No fixed file name: with tsx the module-loader thread writes a profile too and would
  // overwrite the main thread's (tid 0 in the default name CPU.<date>.<time>.<pid>.<tid>.<n>).
  const nodeArgs = profDir ? ['--cpu-prof', '--cpu-prof-dir', join(profDir, `client-${i}`)] : undefined;
  const proc = spawnNode('bench/connections-worker.ts', [], { name: `conn-worker-${i}`, ipc: true, nofile, nodeArgs, env: { BENCH_CONN_WORKER: '1' } });
  const replies: Array<(m: { ok: boolean; result?: unknown; message?: string }) => void> = [];
  proc.child.on('message', (m: { ok: boolean; result?: unknown; message?: string }) => replies.shift()?.(m));
  const call = <T>(cmd: ConnCommand | null): Promise<T> => new Promise((resolve, reject) => {
    replies.push((m) => (m.ok ? resolve(m.result as T) : reject(new Error(m.message))));
    if (cmd) proc.child.send(cmd);
  });
  await call(null);
  return { proc, call };
}

interface ServerMemory {
  rssKb: number;
  heapUsedKb: number;
  heapTotalKb: number;
  externalKb: number;
  /** V8 young generation (committed): grows under load, a fixed cost, not a per-connection one. */
  newSpaceKb: number;
  operational: number;
}

async function gatewayMemory(stack: { gateway: { pid: number }; gatewayMetrics(): Promise<string> }): Promise<ServerMemory> {
  const text = await stack.gatewayMetrics();
  return {
    rssKb: procStatusKb(stack.gateway.pid, 'VmRSS'),
    heapUsedKb: metricValue(text, 'nodejs_heap_size_used_bytes') / 1024,
    heapTotalKb: metricValue(text, 'nodejs_heap_size_total_bytes') / 1024,
    externalKb: metricValue(text, 'nodejs_external_memory_bytes') / 1024,
    newSpaceKb: metricValue(text, 'nodejs_heap_space_size_total_bytes', 'space="new"') / 1024,
    operational: metricValue(text, 'leafgate_gateway_connections', 'kind="operational"'),
  };
}

/**
 * Which allocator a process runs on (jemalloc preloaded or glibc), the library's path (to
 * give a reference process the same) and its open-files limit.
 */
function processFacts(pid: number): { allocator: string; allocatorLib?: string; nofile: number } {
  const lib = /\s(\/\S*libjemalloc[^\s]*)$/m.exec(readFileSync(`/proc/${pid}/maps`, 'utf8'))?.[1];
  const limit = /^Max open files\s+(\S+)/m.exec(readFileSync(`/proc/${pid}/limits`, 'utf8'))?.[1];
  return { allocator: lib ? 'jemalloc' : 'glibc', ...(lib ? { allocatorLib: lib } : {}), nofile: limit === 'unlimited' || !limit ? Infinity : Number(limit) };
}

/** The JS heap / native split of an RSS delta, per connection, as context fields. */
function split(m: ServerMemory, base: ServerMemory, n: number): Record<string, number> {
  if (!Number.isFinite(m.heapUsedKb)) return {};
  const per = (a: number, b: number) => Math.round(((a - b) / Math.max(1, n)) * 100) / 100;
  const young = Number.isFinite(m.newSpaceKb - base.newSpaceKb) ? m.newSpaceKb - base.newSpaceKb : 0;
  // heap_total_kb + native_kb = the per-connection RSS figure (young-generation growth left out).
  return {
    heap_used_kb: per(m.heapUsedKb, base.heapUsedKb),
    heap_total_kb: per(m.heapTotalKb - young, base.heapTotalKb),
    native_kb: per(m.rssKb - m.heapTotalKb, base.rssKb - base.heapTotalKb),
    external_kb: per(m.externalKb, base.externalKb),
    new_space_mb_before: Math.round(base.newSpaceKb / 102.4) / 10,
    new_space_mb: Math.round(m.newSpaceKb / 102.4) / 10,
  };
}

/**
 * Asks the gateway (started with --heapsnapshot-signal=SIGUSR2) for a heap snapshot and
 * returns its path once written: the snapshot blocks the gateway's event loop, so its
 * /metrics answering again means the file is complete.
 */
async function heapSnapshot(stack: { gateway: { pid: number }; gatewayMetrics(): Promise<string> }, dir: string): Promise<string> {
  mkdirSync(dir, { recursive: true });
  const known = new Set(readdirSync(dir));
  process.kill(stack.gateway.pid, 'SIGUSR2');
  for (let i = 0; i < 600; i++) {
    await sleep(500);
    const fresh = readdirSync(dir).filter((f) => f.endsWith('.heapsnapshot') && !known.has(f));
    if (fresh.length) {
      await stack.gatewayMetrics();
      return join(dir, fresh[0]);
    }
  }
  throw new Error('the gateway wrote no heap snapshot within 300 s');
}

export const connectionsBench = defineBench({
  name: 'connections',
  description: 'K idle mutual-TLS connections to one gateway process: connect/s and RSS per connection',
  options: {
    connections: { default: 10_000, help: 'idle mTLS connections to hold' },
    workers: { default: 2, help: 'client processes' },
    concurrency: { default: 100, help: 'connection attempts in flight per client process' },
    hold: { default: 5, help: 'seconds to hold the connections idle before measuring memory' },
    'source-addrs': { default: 0, help: 'source addresses 127.0.0.1..N (0: one per 25,000 connections)' },
    tls: { default: '1.3', help: 'TLS version the clients use: 1.2 or 1.3 (the gateway allows both)' },
    warmup: { default: 300, help: 'connections opened and closed first (JIT, allocator), not counted' },
    'gateway-prof': { default: '', help: 'directory: run the gateway with --cpu-prof (in DIR/gateway/ when it exits; the main thread\'s file has thread id 0: CPU.<date>.<time>.<pid>.0.<n>.cpuprofile)' },
    targets: { default: 'gateway,node-tls', help: 'servers to measure, one after the other, comma-separated: gateway, aedes (bare aedes, same TLS listener, own process), mosquitto (same certificates) or node-tls (node\'s tls.Server with the broker\'s exact options and nothing else: the floor under the gateway)' },
    'gateway-env': { default: '', help: 'extra environment of the gateway process, KEY=VALUE,... (e.g. MALLOC_ARENA_MAX=2, to try allocator settings)' },
    'client-chain': { default: false, help: 'clients present the device CA along with their certificate (the protocol asks for the certificate alone; a chain costs the gateway ~6 kB per connection)' },
    'connect-seconds': { default: 150, help: 'no connection attempt starts after this many seconds of connecting (the run reports what it got)' },
    steps: { default: '1000,5000', help: 'comma-separated connection counts below --connections at which memory is also measured (empty: only at the end)' },
    'clients-prof': { default: '', help: 'directory: run the client processes with --cpu-prof (in DIR/client-N/; the main thread\'s file has thread id 0: CPU.<date>.<time>.<pid>.0.<n>.cpuprofile)' },
    'heap-snapshot': { default: '', help: 'directory: gateway heap snapshots before and after (--heapsnapshot-signal), and the per-connection JS heap growth by constructor' },
  },
  async run(opts, emit) {
    const K = opts.connections;
    const W = Math.max(1, opts.workers);
    const addrs = Array.from({ length: opts['source-addrs'] || Math.max(1, Math.ceil(K / 25_000)) }, (_, i) => `127.0.0.${i + 1}`);
    const maxVersion = opts.tls === '1.2' ? 'TLSv1.2' : 'TLSv1.3';
    const nofile = Math.max(65_536, K + 4096);
    if (K + 512 > hardNofile()) log(`warning: ${K} connections need more file descriptors than the hard limit ${hardNofile()} allows one gateway process (ulimit -Hn); expect failures past it`);
    const stack = await startProcStack({
      keep: opts.keep,
      gatewayNodeArgs: [
        ...(opts['gateway-prof'] ? ['--cpu-prof', '--cpu-prof-dir', join(resolve(opts['gateway-prof']), 'gateway')] : []),
        ...(opts['heap-snapshot'] ? ['--heapsnapshot-signal=SIGUSR2', '--diagnostic-dir', resolve(opts['heap-snapshot'])] : []),
      ],
      gatewayEnv: Object.fromEntries(String(opts['gateway-env']).split(',').filter(Boolean).map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)])),
      gateway: {
        maxConnections: K + opts.warmup + 1000,
        rateLimits: { connectionsPerAddress: { points: (K + opts.warmup) * 2 + 1000, durationSeconds: 60 } },
      },
    });
    const targets = String(opts.targets).split(',').map((t) => t.trim()).filter(Boolean);
    for (const t of targets) if (!['gateway', 'aedes', 'mosquitto', 'node-tls'].includes(t)) throw new Error('--targets must list gateway, aedes, mosquitto or node-tls');
    const gatewayFacts = processFacts(stack.gateway.pid);
    log(`gateway pid ${stack.gateway.pid}: allocator ${gatewayFacts.allocator}, open files limit ${gatewayFacts.nofile}`);
    if (targets.includes('gateway') && gatewayFacts.nofile < K + 256) log(`warning: the gateway may open only ${gatewayFacts.nofile} files; ${K} connections need more (raise the hard limit: ulimit -Hn)`);

    /** The server under test: the gateway, or a reference server on the gateway's TLS material. */
    const startTarget = async (target: string): Promise<{ port: number; pid: number; memory(): Promise<ServerMemory>; stop(): Promise<void> }> => {
      const rssOnly = (pid: number) => async (): Promise<ServerMemory> => ({ rssKb: procStatusKb(pid, 'VmRSS'), heapUsedKb: NaN, heapTotalKb: NaN, externalKb: NaN, newSpaceKb: NaN, operational: NaN });
      if (target === 'aedes' || target === 'node-tls') {
        // Launched like the gateway (jemalloc preloaded when installed), so that the
        // allocator is not the difference being measured.
        const ref = spawnNode('bench/reference-brokers.ts', [stack.gateway.dataDir, target], { name: target, nofile, env: gatewayFacts.allocatorLib ? { LD_PRELOAD: gatewayFacts.allocatorLib } : {} });
        const port = Number((await ref.waitFor(/on port (\d+)/))[1]);
        // Its V8 heap too (SIGUSR2 -> a `memory <n>` line), so that the young generation's
        // growth is left out of its figure as it is of the gateway's.
        let asked = 0;
        const memory = async (): Promise<ServerMemory> => {
          const n = ++asked;
          process.kill(ref.pid, 'SIGUSR2');
          const v8 = JSON.parse((await ref.waitFor(new RegExp(`^memory ${n} (.*)$`), 30_000))[1]) as Omit<ServerMemory, 'rssKb' | 'operational'>;
          return { rssKb: procStatusKb(ref.pid, 'VmRSS'), ...v8, operational: NaN };
        };
        return { port, pid: ref.pid, memory, stop: () => ref.stop() };
      }
      if (target === 'mosquitto') {
        const m = await startMosquitto({ dir: stack.dir, gatewayDir: stack.gateway.dataDir, caPems: [stack.deviceCaPem, stack.rootPem], tls: opts.tls === '1.2' ? '1.2' : '1.3', nofile });
        log(`mosquitto ${m.version} on port ${m.port}`);
        return { port: m.port, pid: m.pid, memory: rssOnly(m.pid), stop: async () => { process.kill(m.pid, 'SIGTERM'); } };
      }
      return { port: stack.gateway.port, pid: stack.gateway.pid, memory: () => gatewayMemory(stack), stop: async () => {} };
    };

    log(`starting ${W} client processes; issuing ${K + opts.warmup} device certificates`);
    const workers = await Promise.all(Array.from({ length: W }, (_, i) => startWorker(i, Math.ceil(K / W) + 4096, opts['clients-prof'] ? resolve(opts['clients-prof']) : '')));
    const ids = Array.from({ length: K }, (_, i) => `bench-conn-${i}`);
    const warmIds = Array.from({ length: opts.warmup }, (_, i) => `bench-warm-${i}`);
    await Promise.all(workers.map((w, wi) => w.call({
      cmd: 'prepare', caDir: stack.caDir, passphrase: BENCH_PASSPHRASE, chain: opts['client-chain'],
      ids: [...ids.filter((_, i) => i % W === wi), ...(wi === 0 ? warmIds : [])],
    })));

    /** Per target: kB per held connection (young-generation growth left out), and the marginal figure. */
    const perConnection: Record<string, { kb: number; marginalKb?: number; held: number }> = {};
    for (const target of targets) {
      log(`=== target ${target}`);
      const server = await startTarget(target);
      const port = server.port;
      const facts = target === 'gateway' ? gatewayFacts : processFacts(server.pid);
      if (warmIds.length) {
        log(`warm-up: ${warmIds.length} connections`);
        const r = await workers[0].call<ConnectResult>({ cmd: 'connect', host: '127.0.0.1', port, sourceAddrs: addrs, concurrency: opts.concurrency, maxVersion, ids: warmIds, deadline: monoMs() + 60_000 });
        if (r.failed) log('warm-up failures:', r.errors);
        await workers[0].call({ cmd: 'close' });
        await sleep(3000);
      }
      await waitForQuiet(60_000);
      const snapshots = opts['heap-snapshot'] && target === 'gateway' ? resolve(opts['heap-snapshot']) : '';
      const snapBefore = snapshots ? await heapSnapshot(stack, snapshots) : '';
      const before = await server.memory();

      // Connections open in steps (--steps), with the memory measured after each; the connect
      // rate counts only the time spent connecting.
      const steps = [...new Set([...String(opts.steps).split(',').map(Number).filter((n) => n > 0 && n < K), K])].sort((a, b) => a - b);
      log(`opening ${K} connections in steps ${steps.join(', ')} (${W} processes x ${opts.concurrency} in flight, sources ${addrs.join(',')}, ${maxVersion})`);
      const procs: Record<string, number> = { server: server.pid };
      workers.forEach((w, i) => (procs[`client-${i}`] = w.proc.pid));
      const ctx = { target, tls_protocol: maxVersion, source_addrs: addrs.length, ...(facts.allocator ? { allocator: facts.allocator } : {}) };
      const cpuMs: Record<string, number> = {};
      let wallMs = 0;
      let foreignMs = 0;
      let span = 0;
      let ok = 0;
      let failed = 0;
      const errors: Record<string, number> = {};
      const lat: number[] = [];
      let opened = 0;
      let skipped = 0;
      let lastStep: { n: number; m: ServerMemory } | undefined;
      const deadline = monoMs() + opts['connect-seconds'] * 1000;
      for (const step of steps) {
        const slice = ids.slice(opened, step);
        opened = step;
        const meter = new CpuMeter(procs);
        meter.begin();
        const results = await Promise.all(workers.map((w, wi) => w.call<ConnectResult>({
          cmd: 'connect', host: '127.0.0.1', port, sourceAddrs: addrs, concurrency: opts.concurrency, maxVersion, ids: slice.filter((_, i) => i % W === wi), deadline,
        })));
        const cpu = meter.end();
        for (const [k, v] of Object.entries(cpu.cpuMs)) cpuMs[k] = (cpuMs[k] ?? 0) + v;
        wallMs += cpu.wallMs;
        foreignMs += cpu.foreignMs;
        const started = results.filter((r) => r.ok + r.failed > 0);
        if (started.length) span += Math.max(...started.map((r) => r.lastEnd)) - Math.min(...started.map((r) => r.firstStart));
        for (const r of results) {
          skipped += r.skipped;
          ok += r.ok;
          failed += r.failed;
          for (const [k, v] of Object.entries(r.errors)) errors[k] = (errors[k] ?? 0) + v;
          for (const l of r.latencies) lat.push(l);
        }
        if (skipped) {
          log(`--connect-seconds ${opts['connect-seconds']} passed: ${skipped} connections not attempted`);
          break;
        }
        if (step < K) {
          await sleep(1000);
          const m = await server.memory();
          const young = Number.isFinite(m.newSpaceKb - before.newSpaceKb) ? m.newSpaceKb - before.newSpaceKb : 0;
          emit('rss_kb_per_connection_at', (m.rssKb - young - before.rssKb) / Math.max(1, ok), 'kB', { ...ctx, at: ok, ...split(m, before, ok), rss_raw_kb_per_connection: Math.round(((m.rssKb - before.rssKb) / Math.max(1, ok)) * 100) / 100 });
          lastStep = { n: ok, m };
        }
      }
      const [p50, p99] = percentiles(lat, [50, 99]);
      const clientCpu = Object.entries(cpuMs).filter(([k]) => k.startsWith('client')).reduce((a, [, v]) => a + v, 0);
      const util = { server: (cpuMs.server / wallMs) * 100, clients: (clientCpu / wallMs) * 100, foreign: (foreignMs / wallMs) * 100 };
      // What held the rate: the server's one core, the client processes, or the machine's cores
      // shared by all (on 2 cores the clients' handshakes compete with the server's).
      const limitedBy = util.server >= 90 ? 'server' : util.server + util.clients + util.foreign >= cpus().length * 100 * 0.9 ? 'machine' : util.clients >= W * 90 ? 'clients' : 'latency';
      emit('connect_per_s', (ok * 1000) / span, 'connections/s', {
        ...ctx, ok, failed, ...(skipped ? { not_attempted: skipped } : {}), wall_s: span / 1000, limited_by: limitedBy,
        // The rate this server would reach on a core of its own: its CPU per connect, inverted.
        server_core_bound_per_s: Math.round(1000 / (cpuMs.server / Math.max(1, ok))),
      });
      if (failed) emit('connections_failed', failed, 'connections', { ...ctx, errors });
      emit('connect_p50_ms', p50, 'ms', ctx);
      emit('connect_p99_ms', p99, 'ms', ctx);
      emit('server_cpu_ms_per_connect', cpuMs.server / Math.max(1, ok), 'ms', { ...ctx, note: 'TLS handshake with client certificate + CONNECT handling' });
      emit('server_cpu_util_pct', util.server, '%', { ...ctx, note: '100 = one core' });
      emit('clients_cpu_util_pct', util.clients, '%', { ...ctx, processes: W, client_cpu_ms_per_connect: clientCpu / Math.max(1, ok) });
      emit('foreign_cpu_pct', util.foreign, '%', { ...ctx, note: 'CPU of processes outside this benchmark meanwhile' });

      log(`holding ${ok} connections idle for ${opts.hold} s`);
      await sleep(opts.hold * 1000);
      const after = await server.memory();
      const snapAfter = snapshots ? await heapSnapshot(stack, snapshots) : '';
      const dropped = (await Promise.all(workers.map((w) => w.call<{ closed: number; dropped: number }>({ cmd: 'close' })))).reduce((a, r) => a + r.dropped, 0);
      const held = ok - dropped;
      emit('connections_held', held, 'connections', { ...ctx, ...(Number.isFinite(after.operational) ? { gateway_sees: after.operational } : {}), dropped });
      const per = (a: number, b: number) => (a - b) / Math.max(1, held);
      // V8's young generation grows with the allocation rate (1 to 32 MB), not with the number
      // of connections: in some runs the warm-up already grew it, in others the connect burst
      // does (3 kB per connection at 10,000). Its growth is left out of the per-connection
      // figure and shown beside it (rss_raw_kb_per_connection).
      const young = Number.isFinite(after.newSpaceKb) && Number.isFinite(before.newSpaceKb) ? after.newSpaceKb - before.newSpaceKb : 0;
      // The slope from the last step to the end does not depend on memory the warm-up freed
      // and the first connections reused (an allocator that keeps freed pages shows less at
      // small counts): the marginal cost of one more connection.
      const marginal: Record<string, number> = lastStep && held > lastStep.n
        ? { marginal_kb_per_connection: Math.round((((after.rssKb - (after.newSpaceKb || 0)) - (lastStep.m.rssKb - (lastStep.m.newSpaceKb || 0))) / (held - lastStep.n)) * 100) / 100, marginal_from: lastStep.n }
        : {};
      perConnection[target] = { kb: per(after.rssKb - young, before.rssKb), marginalKb: marginal.marginal_kb_per_connection, held };
      emit('rss_kb_per_connection', per(after.rssKb - young, before.rssKb), 'kB', {
        ...ctx, ...split(after, before, held), ...marginal, rss_raw_kb_per_connection: Math.round(per(after.rssKb, before.rssKb) * 100) / 100,
        rss_mb_before: before.rssKb / 1024, rss_mb_after: after.rssKb / 1024,
      });
      if (target === 'gateway') emit('heap_kb_per_connection', per(after.heapUsedKb, before.heapUsedKb), 'kB', { ...ctx, note: 'V8 heap used (JS objects: aedes client, parser, session, socket wrappers)' });
      if (target === 'gateway') emit('external_kb_per_connection', per(after.externalKb, before.externalKb), 'kB', { ...ctx, note: 'V8 external memory (Buffers)' });
      if (target === 'gateway') emit('native_kb_per_connection', per(after.rssKb - after.heapTotalKb, before.rssKb - before.heapTotalKb), 'kB', { ...ctx, note: 'RSS outside the V8 heap: OpenSSL SSL objects and buffers, libuv, malloc' });
      if (target === 'gateway') emit('heap_total_kb_per_connection', per(after.heapTotalKb - young, before.heapTotalKb), 'kB', { ...ctx, note: 'V8 heap committed, young-generation growth left out' });
      emit('server_rss_mb_peak', procStatusKb(server.pid, 'VmHWM') / 1024, 'MB', ctx);
      if (snapBefore && snapAfter) {
        log(`heap snapshots: ${snapBefore} ${snapAfter}`);
        const rows = heapDelta(heapCensus(snapBefore), heapCensus(snapAfter));
        for (const l of formatDelta(rows, Math.max(1, held), 25)) log(l);
        for (const r of rows.slice(0, 15)) emit('heap_bytes_per_connection', r.bytes / Math.max(1, held), 'B', { ...ctx, kind: r.key, count_per_connection: r.count / Math.max(1, held) });
      }

      await server.stop();
    }

    // Issue 20: the gateway against node's bare TLS server with the same options, same run,
    // same clients, same allocator: what leafgate adds per idle mutual-TLS connection.
    const gw = perConnection.gateway;
    const floor = perConnection['node-tls'];
    if (gw && floor) {
      const ratio = gw.kb / floor.kb;
      // At a few connections memory freed meanwhile (GC, the allocator) can outweigh them: a
      // figure <= 0 measures nothing, and such a ratio never counts as met.
      const meaningful = gw.kb > 0 && floor.kb > 0;
      emit('rss_to_node_tls', ratio, 'ratio', {
        ...targetFields(ratio, 1.15, '<='), value_precise: Math.round(ratio * 10000) / 10000, ...(meaningful ? {} : { met: false, invalid: 'a per-connection figure is <= 0 (too few connections to measure)' }), gateway_kb_per_connection: Math.round(gw.kb * 100) / 100, node_tls_kb_per_connection: Math.round(floor.kb * 100) / 100,
        ...(gw.marginalKb !== undefined && floor.marginalKb !== undefined ? { marginal_ratio: Math.round((gw.marginalKb / floor.marginalKb) * 1000) / 1000 } : {}),
        held: gw.held, tls_protocol: maxVersion, note: 'gateway rss_kb_per_connection / node-tls rss_kb_per_connection, measured one after the other in this run',
      });
    }

    await Promise.all(workers.map((w) => new Promise<void>((r) => {
      w.proc.child.once('exit', () => r());
      w.proc.child.send({ cmd: 'exit' });
    })));
    await stack.close();
  },
});
