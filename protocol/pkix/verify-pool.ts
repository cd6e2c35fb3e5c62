/**
 * ECDSA self-signature checks of CSRs on worker threads.
 *
 * On the issuance hot path the EC key import is the most expensive step left on the event
 * loop: node has no asynchronous key import, and WebCrypto's 'raw' import (the cheapest
 * route, see keys.ts) costs ~50 us of main-thread time per CSR, a quarter of it. Here the
 * import and the verify both run on a worker thread; the event loop only posts the four
 * small buffers (curve, point, signed bytes, signature) and reads back a boolean, batched
 * per event-loop turn. The semantics are those of importSpkiFast + crypto.verify: the same
 * WebCrypto import (refuses points off the curve) and the same verify.
 *
 * The pool starts on first use and its workers are unref'd, so it never keeps a process
 * alive. LEAFGATE_VERIFY_WORKERS sets its size (0 turns it off: callers then verify on the
 * event loop as before); the default is one worker per core beyond the first, at most 4.
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';

export interface EcVerifyJob {
  crv: 'P-256' | 'P-384' | 'P-521';
  /** Uncompressed point (04 || X || Y). */
  point: Buffer;
  hash: string;
  data: Buffer;
  signature: Buffer;
}

// Plain JavaScript, evaluated in the worker: no loader (tsx) is needed there.
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { verify, webcrypto, KeyObject } = require('node:crypto');
// 1: verified, 0: the signature does not verify, 2: the key cannot be imported.
async function check(job) {
  let key;
  try {
    key = KeyObject.from(await webcrypto.subtle.importKey('raw', job.point, { name: 'ECDSA', namedCurve: job.crv }, true, ['verify']));
  } catch {
    return 2;
  }
  try {
    return verify(job.hash, job.data, key, job.signature) ? 1 : 0;
  } catch {
    return 0;
  }
}
parentPort.on('message', async (batch) => {
  const results = await Promise.all(batch.jobs.map(check));
  parentPort.postMessage({ id: batch.id, results });
});
`;

/** What a worker found: the signature verifies, it does not, or the key is unreadable. */
export type EcVerdict = 'verified' | 'bad-signature' | 'bad-key';
const VERDICTS: EcVerdict[] = ['bad-signature', 'verified', 'bad-key'];

interface Pending {
  resolve: (v: EcVerdict) => void;
  reject: (err: Error) => void;
}

class VerifyWorker {
  readonly worker: Worker;
  /** Batches in flight: id -> the callbacks of its jobs, in order. */
  readonly inFlight = new Map<number, Pending[]>();
  jobs = 0;

  constructor(onExit: (w: VerifyWorker, err: Error) => void) {
    this.worker = new Worker(WORKER_SOURCE, { eval: true });
    this.worker.unref();
    this.worker.on('message', (m: { id: number; results: number[] }) => {
      const waiting = this.inFlight.get(m.id);
      if (!waiting) return;
      this.inFlight.delete(m.id);
      this.jobs -= waiting.length;
      waiting.forEach((p, i) => p.resolve(VERDICTS[m.results[i]] ?? 'bad-signature'));
      if (this.inFlight.size === 0) this.worker.unref();
    });
    const fail = (err: Error) => onExit(this, err);
    this.worker.on('error', fail);
    this.worker.on('exit', (code) => fail(new Error(`verify worker exited with code ${code}`)));
  }
}

export class EcVerifyPool {
  private workers: VerifyWorker[] = [];
  private queue: Array<{ job: EcVerifyJob; pending: Pending }> = [];
  private scheduled = false;
  private nextId = 1;
  private closed = false;

  constructor(readonly size: number) {}

  verify(job: EcVerifyJob): Promise<EcVerdict> {
    if (this.closed) return Promise.reject(new Error('verify pool is closed'));
    return new Promise<EcVerdict>((resolve, reject) => {
      this.queue.push({ job, pending: { resolve, reject } });
      if (!this.scheduled) {
        this.scheduled = true;
        // The CSRs that arrive in one event-loop turn go to the workers as one message each.
        setImmediate(() => this.flush());
      }
    });
  }

  private flush(): void {
    this.scheduled = false;
    const queue = this.queue;
    this.queue = [];
    if (!queue.length) return;
    while (this.workers.length < this.size) this.workers.push(new VerifyWorker((w, err) => this.lost(w, err)));
    // Split over the workers, the least loaded first.
    const workers = [...this.workers].sort((a, b) => a.jobs - b.jobs);
    const per = Math.ceil(queue.length / workers.length);
    for (let i = 0; i < workers.length && i * per < queue.length; i++) {
      const part = queue.slice(i * per, (i + 1) * per);
      const w = workers[i];
      const id = this.nextId++;
      w.inFlight.set(id, part.map((q) => q.pending));
      w.jobs += part.length;
      w.worker.ref();
      w.worker.postMessage({ id, jobs: part.map((q) => q.job) });
    }
  }

  /** A worker that died fails what it held; the next flush starts a new one. */
  private lost(w: VerifyWorker, err: Error): void {
    const i = this.workers.indexOf(w);
    if (i < 0) return;
    this.workers.splice(i, 1);
    for (const waiting of w.inFlight.values()) for (const p of waiting) p.reject(err);
    w.inFlight.clear();
  }

  async close(): Promise<void> {
    this.closed = true;
    const workers = this.workers;
    this.workers = [];
    await Promise.all(workers.map((w) => w.worker.terminate()));
  }
}

let shared: EcVerifyPool | null | undefined;

/** The process-wide pool, or null when LEAFGATE_VERIFY_WORKERS=0. */
export function ecVerifyPool(): EcVerifyPool | null {
  if (shared === undefined) {
    const env = process.env.LEAFGATE_VERIFY_WORKERS;
    const n = env !== undefined && env !== '' ? Number(env) : Math.min(4, Math.max(1, availableParallelism() - 1));
    shared = Number.isInteger(n) && n > 0 ? new EcVerifyPool(Math.min(n, 16)) : null;
  }
  return shared;
}
