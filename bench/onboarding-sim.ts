/**
 * The device side of the onboarding benchmark: LeafDevice SDK instances (mqtt.js over TLS)
 * run the whole flow -- bootstrap connect, register, challenge signature, instruction, key
 * generation, CSR, certificate -- then reconnect with mutual TLS and wait for CONNACK.
 * Runs in the bench process or in forked simulator workers (same code, IPC messages).
 */
import { createPrivateKey } from 'node:crypto';
import tls from 'node:tls';
import { LeafDevice, type DeviceCredential } from '../device/index.ts';
import type { KeySpec } from '../protocol/index.ts';
import { monoMs } from './common.ts';

export type SimCredential =
  | { method: 'pki-signature'; birthCert: string; factoryKeyPem: string }
  | { method: 'ddkg'; attributes: Record<string, string> };

export interface SimConfig {
  brokerUrl: string;
  ca: string;
  /** `brokerUrl` per device overrides the default (several gateways: devices spread over them). */
  devices: Array<{ id: string; credential: SimCredential; brokerUrl?: string }>;
  concurrency: number;
  keyPreference?: KeySpec[];
  /** The SDK's onboarding flow (its default, compact, when absent). */
  flow?: 'compact' | 'classic';
  timeoutMs: number;
  /** No device starts after this monotonic ms (the run is bounded in time). */
  stopLaunchingAt: number;
  /** Node's detailed peer certificate after each handshake (see useShortPeerCertificates). */
  fullPeerChain?: boolean;
  /**
   * Open loop: devices arrive at this rate (devices/s, this simulator's share), each started
   * at its arrival time whatever the others are doing; `concurrency` is then ignored.
   */
  rate?: number;
  /** Arrival spacing in open loop: exponential gaps (a Poisson process) or even. */
  arrival?: 'poisson' | 'even';
  /** Seed of the Poisson gaps (each simulator its own, so that workers do not arrive in step). */
  seed?: number;
}

export interface SimResult {
  ok: number;
  failed: number;
  notStarted: number;
  errors: Record<string, number>;
  /** Per successful device, ms: start of onboard() to the mTLS CONNACK (open loop: from its scheduled arrival). */
  latencies: number[];
  /** Open loop: most devices in flight at once, and the largest delay of a start behind its arrival time (ms). */
  maxInFlight?: number;
  maxStartLagMs?: number;
  phases: { auth: number[]; keygen: number[]; issue: number[]; mtls: number[] };
  firstStart: number;
  lastEnd: number;
}

/**
 * The simulator's one departure from stock node: a TLS client's peer certificate is read in
 * its short form (the leaf alone) even when asked for the detailed one.
 *
 * After every client handshake node calls `getPeerCertificate(true)` to give
 * `checkServerIdentity` the server's certificate, and the detailed form copies and re-decodes
 * every certificate of the chain and converts each, up to the root, to a JS object: ~0.4 ms
 * per handshake with node 20's OpenSSL 3.0 on the 2-core machine (0.84 ms measured under a
 * busy host, against 0.11 ms for the short form), two handshakes per device. The host-name
 * check reads only the leaf's subject and subjectaltname, which the short form has; the
 * chain itself is verified by OpenSSL before that (rejectUnauthorized) and is untouched. A
 * device's TLS stack (mbedTLS, OpenSSL in C) never builds such objects, so this is cost of
 * simulating devices on node, not of the protocol. `--sim-peer-chain` turns it off.
 */
export function useShortPeerCertificates(on: boolean): void {
  const proto = tls.TLSSocket.prototype as tls.TLSSocket & { [kOriginal]?: tls.TLSSocket['getPeerCertificate'] };
  if (on && !proto[kOriginal]) {
    const original = proto.getPeerCertificate;
    proto[kOriginal] = original;
    proto.getPeerCertificate = function (this: tls.TLSSocket) {
      return original.call(this, false);
    } as tls.TLSSocket['getPeerCertificate'];
  } else if (!on && proto[kOriginal]) {
    proto.getPeerCertificate = proto[kOriginal]!;
    delete proto[kOriginal];
  }
}
const kOriginal = Symbol('leafgate.bench.getPeerCertificate');

/**
 * Builds the devices (factory keys decoded into KeyObjects: a device has its key at hand),
 * then returns the run itself, so that the caller starts its clock and CPU meter between.
 */
export function prepareSimulation(cfg: SimConfig): { run(stopLaunchingAt: number, startAt?: number): Promise<SimResult> } {
  useShortPeerCertificates(!cfg.fullPeerChain);
  const prepared = cfg.devices.map((d) => {
    const credential: DeviceCredential = d.credential.method === 'pki-signature'
      ? { method: 'pki-signature', birthCert: d.credential.birthCert, factoryKey: createPrivateKey(d.credential.factoryKeyPem) }
      : { method: 'ddkg', attributes: d.credential.attributes };
    return new LeafDevice({ deviceId: d.id, brokerUrl: d.brokerUrl ?? cfg.brokerUrl, ca: cfg.ca, credential, timeoutMs: cfg.timeoutMs, ...(cfg.keyPreference ? { keyPreference: cfg.keyPreference } : {}), ...(cfg.flow ? { flow: cfg.flow } : {}) });
  });
  if (cfg.rate && cfg.rate > 0) {
    const rate = cfg.rate;
    return { run: (stopLaunchingAt, startAt) => runOpenLoop(prepared, arrivals(prepared.length, rate, cfg.arrival ?? 'poisson', cfg.seed ?? 1), startAt ?? monoMs(), stopLaunchingAt) };
  }
  return { run: (stopLaunchingAt) => runDevices(prepared, cfg.concurrency, stopLaunchingAt) };
}

/** Arrival offsets (ms from the start) of `n` devices at `rate`/s: even, or exponential gaps (seeded). */
export function arrivals(n: number, rate: number, kind: 'poisson' | 'even', seed: number): number[] {
  const gap = 1000 / rate;
  if (kind === 'even') return Array.from({ length: n }, (_, i) => i * gap);
  // mulberry32: reproducible gaps for a given seed.
  let a = seed >>> 0;
  const random = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const out: number[] = [];
  let at = 0;
  for (let i = 0; i < n; i++) {
    out.push(at);
    at += -Math.log(1 - random()) * gap;
  }
  return out;
}

/** One device end to end; its latency counted from `t0` (closed loop: its start; open loop: its arrival). */
async function runOne(device: LeafDevice, t0: number, r: SimResult): Promise<void> {
  try {
    const identity = await device.onboard();
    const t1 = monoMs();
    const client = await device.connectOperational(identity);
    const t2 = monoMs();
    r.lastEnd = Math.max(r.lastEnd, t2);
    r.ok++;
    r.latencies.push(t2 - t0);
    r.phases.auth.push(identity.ms.auth);
    r.phases.keygen.push(identity.ms.keygen);
    r.phases.issue.push(identity.ms.issue);
    r.phases.mtls.push(t2 - t1);
    void client.endAsync().catch(() => undefined);
  } catch (err) {
    r.lastEnd = Math.max(r.lastEnd, monoMs());
    r.failed++;
    const code = (err as { code?: string }).code ?? (err as Error).message?.slice(0, 60) ?? 'error';
    r.errors[code] = (r.errors[code] ?? 0) + 1;
  }
}

/**
 * Open loop: device i starts at `startAt + offsets[i]` whether or not the earlier ones have
 * finished, so a slow system meets the same arrivals and queues them (no coordinated
 * omission: latency runs from the scheduled arrival, so a start this process delayed counts
 * against it too).
 */
async function runOpenLoop(prepared: LeafDevice[], offsets: number[], startAt: number, stopLaunchingAt: number): Promise<SimResult> {
  const r: SimResult = { ok: 0, failed: 0, notStarted: 0, errors: {}, latencies: [], phases: { auth: [], keygen: [], issue: [], mtls: [] }, firstStart: Infinity, lastEnd: 0, maxInFlight: 0, maxStartLagMs: 0 };
  const running: Array<Promise<void>> = [];
  let inFlight = 0;
  for (let i = 0; i < prepared.length; i++) {
    const due = startAt + offsets[i];
    if (due > stopLaunchingAt) {
      r.notStarted += prepared.length - i;
      break;
    }
    const wait = due - monoMs();
    if (wait > 1) await new Promise((res) => setTimeout(res, wait));
    const now = monoMs();
    r.maxStartLagMs = Math.max(r.maxStartLagMs!, now - due);
    r.firstStart = Math.min(r.firstStart, due);
    inFlight++;
    r.maxInFlight = Math.max(r.maxInFlight!, inFlight);
    running.push(runOne(prepared[i], due, r).finally(() => inFlight--));
  }
  await Promise.all(running);
  return r;
}

export function simulate(cfg: SimConfig): Promise<SimResult> {
  return prepareSimulation(cfg).run(cfg.stopLaunchingAt);
}

async function runDevices(prepared: LeafDevice[], concurrency: number, stopLaunchingAt: number): Promise<SimResult> {
  const r: SimResult = { ok: 0, failed: 0, notStarted: 0, errors: {}, latencies: [], phases: { auth: [], keygen: [], issue: [], mtls: [] }, firstStart: Infinity, lastEnd: 0 };
  let next = 0;
  const lane = async () => {
    while (next < prepared.length) {
      const device = prepared[next++];
      const t0 = monoMs();
      if (t0 > stopLaunchingAt) {
        r.notStarted++;
        continue;
      }
      r.firstStart = Math.min(r.firstStart, t0);
      await runOne(device, t0, r);
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(concurrency, prepared.length)) }, lane));
  return r;
}

/** Merges the results of several simulators. */
export function mergeResults(results: SimResult[]): SimResult {
  const m: SimResult = { ok: 0, failed: 0, notStarted: 0, errors: {}, latencies: [], phases: { auth: [], keygen: [], issue: [], mtls: [] }, firstStart: Infinity, lastEnd: 0 };
  for (const r of results) {
    m.ok += r.ok;
    m.failed += r.failed;
    m.notStarted += r.notStarted;
    for (const [k, v] of Object.entries(r.errors)) m.errors[k] = (m.errors[k] ?? 0) + v;
    m.latencies.push(...r.latencies);
    for (const k of Object.keys(m.phases) as Array<keyof SimResult['phases']>) m.phases[k].push(...r.phases[k]);
    if (r.maxInFlight !== undefined) m.maxInFlight = (m.maxInFlight ?? 0) + r.maxInFlight;
    if (r.maxStartLagMs !== undefined) m.maxStartLagMs = Math.max(m.maxStartLagMs ?? 0, r.maxStartLagMs);
    m.firstStart = Math.min(m.firstStart, r.firstStart);
    m.lastEnd = Math.max(m.lastEnd, r.lastEnd);
  }
  return m;
}

// Worker mode: forked by bench/onboarding.ts with an IPC channel.
if (process.send && process.env.BENCH_ONBOARDING_WORKER === '1') {
  let pending: ReturnType<typeof prepareSimulation> | undefined;
  process.on('message', (msg: { cmd: 'prepare'; cfg: SimConfig } | { cmd: 'run'; stopLaunchingAt: number; startAt?: number } | { cmd: 'exit' }) => {
    if (msg.cmd === 'exit') process.exit(0);
    if (msg.cmd === 'prepare') {
      try {
        pending = prepareSimulation(msg.cfg);
        process.send!({ cmd: 'prepared' });
      } catch (err) {
        process.send!({ cmd: 'error', message: (err as Error).stack ?? String(err) });
      }
      return;
    }
    const sim = pending;
    pending = undefined;
    if (!sim) {
      process.send!({ cmd: 'error', message: 'run before prepare' });
      return;
    }
    void sim.run(msg.stopLaunchingAt, msg.startAt).then(
      (result) => process.send!({ cmd: 'result', result }),
      (err) => process.send!({ cmd: 'error', message: (err as Error).stack ?? String(err) }),
    );
  });
  process.send({ cmd: 'ready' });
}
