/**
 * The issuance hot path's signature work on worker threads: ECDSA self-signature checks of
 * CSRs, and the issuing CA's signatures.
 *
 * Verify: the EC key import is the most expensive step left on the event loop: node has no
 * asynchronous key import, and WebCrypto's 'raw' import (the cheapest route, see keys.ts)
 * costs ~50 us of main-thread time per CSR, a quarter of it. Here the import and the verify
 * both run on a worker thread; the event loop only posts four small buffers (curve, point,
 * signed bytes, signature) and reads back a verdict. The semantics are those of
 * importSpkiFast + crypto.verify: the same WebCrypto import (refuses points off the curve)
 * and the same verify.
 *
 * Sign: crypto.sign with a callback costs the event loop a libuv threadpool job per
 * signature (a job object, a queue hand-off, a wake-up and a completion callback); here the
 * signatures of one event-loop turn go to a worker in one message. The signing key is sent
 * to each worker once (as PKCS#8 bytes) and then named by a number.
 *
 * Jobs are batched per event-loop turn, one message per worker. The pool starts on first use
 * and its workers are unref'd (a timer holds the process only while jobs are in flight), so it never keeps an idle process alive.
 * LEAFGATE_VERIFY_WORKERS sets its size (0 turns it off: callers then work on the event loop
 * and the threadpool as before); the default is one worker per core beyond the first, at
 * least 2 and at most 4.
 */
import type { KeyObject } from 'node:crypto';
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
const { createPrivateKey, sign, verify, webcrypto, KeyObject } = require('node:crypto');
const keys = new Map();
// Verify: 1 verified, 0 the signature does not verify, 2 the key cannot be imported.
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
// Sign: the signature, or an error message.
function signJob(job) {
  try {
    const key = keys.get(job.keyId);
    if (!key) return 'unknown signing key';
    return sign(job.hash, job.data, key);
  } catch (err) {
    return String(err && err.message || err);
  }
}
parentPort.on('message', async (batch) => {
  for (const k of batch.keys || []) keys.set(k.id, createPrivateKey({ key: Buffer.from(k.pkcs8), format: 'der', type: 'pkcs8' }));
  const results = await Promise.all(batch.jobs.map((j) => (j.op === 'sign' ? signJob(j) : check(j))));
  parentPort.postMessage({ id: batch.id, results });
});
`;

/** What a worker found: the signature verifies, it does not, or the key is unreadable. */
export type EcVerdict = 'verified' | 'bad-signature' | 'bad-key';
const VERDICTS: EcVerdict[] = ['bad-signature', 'verified', 'bad-key'];

interface Pending {
  /** Called with what the worker returned for the job (a verdict number, or a signature / an error message). */
  settle: (result: unknown) => void;
  reject: (err: Error) => void;
}

type Job = ({ op: 'verify' } & EcVerifyJob) | { op: 'sign'; keyId: number; hash: string; data: Uint8Array };

class VerifyWorker {
  readonly worker: Worker;
  /** Batches in flight: id -> the callbacks of its jobs, in order. */
  readonly inFlight = new Map<number, Pending[]>();
  /** Signing keys this worker holds. */
  readonly keys = new Set<number>();
  jobs = 0;

  constructor(onExit: (w: VerifyWorker, err: Error) => void, onSettled: () => void) {
    // execArgv []: the worker is plain JavaScript on node:crypto; inheriting the parent's
    // `--import tsx` would register a module loader in every worker, which under node 20 can
    // stall a worker's start for good (seen once under CI load: a test awaiting a verdict forever).
    this.worker = new Worker(WORKER_SOURCE, { eval: true, execArgv: [] });
    this.worker.on('message', (m: { id: number; results: unknown[] }) => {
      const waiting = this.inFlight.get(m.id);
      if (!waiting) return;
      this.inFlight.delete(m.id);
      this.jobs -= waiting.length;
      waiting.forEach((p, i) => p.settle(m.results[i]));
      onSettled();
    });
    const fail = (err: Error) => onExit(this, err);
    this.worker.on('error', fail);
    this.worker.on('exit', (code) => fail(new Error(`verify worker exited with code ${code}`)));
    // After the listeners: node refs a worker's port when its first 'message' listener comes.
    this.worker.unref();
  }
}

export class EcVerifyPool {
  private workers: VerifyWorker[] = [];
  private queue: Array<{ job: Job; pending: Pending }> = [];
  private readonly keyIds = new WeakMap<KeyObject, number>();
  private readonly keysById = new Map<number, Uint8Array>();
  private nextKeyId = 1;
  private scheduled = false;
  private nextId = 1;
  private closed = false;

  constructor(readonly size: number) {}

  verify(job: EcVerifyJob): Promise<EcVerdict> {
    return new Promise<EcVerdict>((resolve, reject) => {
      this.enqueue({ op: 'verify', ...job }, { settle: (r) => resolve(VERDICTS[r as number] ?? 'bad-signature'), reject });
    });
  }

  /** crypto.sign(hash, data, key) on a worker: the same signature bytes, off the event loop. */
  sign(hash: string, data: Uint8Array, key: KeyObject): Promise<Buffer> {
    let keyId = this.keyIds.get(key);
    if (keyId === undefined) {
      // The worker gets the key as PKCS#8 bytes and imports it once.
      let pkcs8: Uint8Array;
      try {
        if (key.type !== 'private') throw new Error(`a ${key.type} key cannot sign`);
        pkcs8 = new Uint8Array(key.export({ type: 'pkcs8', format: 'der' }));
      } catch (err) {
        return Promise.reject(new Error(`signing failed: ${(err as Error).message}`));
      }
      keyId = this.nextKeyId++;
      this.keyIds.set(key, keyId);
      this.keysById.set(keyId, pkcs8);
    }
    const id = keyId;
    // An own-size copy: a view (e.g. a slice of node's buffer pool) would clone its whole backing store.
    const bytes = data.byteOffset === 0 && data.byteLength === data.buffer.byteLength ? data : new Uint8Array(data);
    return new Promise<Buffer>((resolve, reject) => {
      this.enqueue({ op: 'sign', keyId: id, hash, data: bytes }, {
        settle: (r) => (r instanceof Uint8Array ? resolve(Buffer.from(r.buffer, r.byteOffset, r.byteLength)) : reject(new Error(`signing failed: ${String(r)}`))),
        reject,
      });
    });
  }

  private enqueue(job: Job, pending: Pending): void {
    if (this.closed) {
      pending.reject(new Error('verify pool is closed'));
      return;
    }
    this.queue.push({ job, pending });
    this.busy();
    if (!this.scheduled) {
      this.scheduled = true;
      // The jobs of one event-loop turn go to the workers as one message each.
      setImmediate(() => this.flush());
    }
  }

  private flush(): void {
    this.scheduled = false;
    const queue = this.queue;
    this.queue = [];
    if (!queue.length) return;
    while (this.workers.length < this.size) this.workers.push(new VerifyWorker((w, err) => this.lost(w, err), () => this.settled()));
    // Split over the workers, the least loaded first.
    const workers = [...this.workers].sort((a, b) => a.jobs - b.jobs);
    const per = Math.ceil(queue.length / workers.length);
    for (let i = 0; i < workers.length && i * per < queue.length; i++) {
      const part = queue.slice(i * per, (i + 1) * per);
      const w = workers[i];
      const id = this.nextId++;
      w.inFlight.set(id, part.map((q) => q.pending));
      w.jobs += part.length;
      // Signing keys this worker has not seen yet travel with the batch.
      // As PKCS#8 bytes, imported once by the worker.
      const keys: Array<{ id: number; pkcs8: Uint8Array }> = [];
      for (const q of part) {
        if (q.job.op === 'sign' && !w.keys.has(q.job.keyId)) {
          w.keys.add(q.job.keyId);
          keys.push({ id: q.job.keyId, pkcs8: this.keysById.get(q.job.keyId)! });
        }
      }
      try {
        w.worker.postMessage({ id, jobs: part.map((q) => q.job), keys });
      } catch (err) {
        // Nothing must be left waiting (and holding the process) on a message never sent.
        w.inFlight.delete(id);
        w.jobs -= part.length;
        for (const k of keys) w.keys.delete(k.id);
        for (const q of part) q.pending.reject(err as Error);
        this.settled();
      }
    }
  }

  /** A worker that died fails what it held; the next flush starts a new one. */
  private lost(w: VerifyWorker, err: Error): void {
    const i = this.workers.indexOf(w);
    if (i < 0) return;
    this.workers.splice(i, 1);
    for (const waiting of w.inFlight.values()) for (const p of waiting) p.reject(err);
    w.inFlight.clear();
    this.settled();
  }

  /**
   * The workers stay unref'd; while jobs are in flight a timer keeps the process alive, so a
   * caller awaiting one never sees the process exit under it. (Ref'ing the workers per batch
   * left one ref'd now and then: a worker's message port can be ref'd again from inside node.)
   */
  private keepAlive: NodeJS.Timeout | undefined;

  private busy(): void {
    this.keepAlive ??= setInterval(() => undefined, 1 << 30);
  }

  private settled(): void {
    if (this.keepAlive && this.queue.length === 0 && this.workers.every((w) => w.inFlight.size === 0)) {
      clearInterval(this.keepAlive);
      this.keepAlive = undefined;
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.keepAlive) clearInterval(this.keepAlive);
    this.keepAlive = undefined;
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
    // At least two: one worker holding every verify and signature serializes them (measured
    // on 2 cores: 1 worker ~1,900 certs/s, 2 workers ~2,200-2,800 under the same busy host).
    const n = env !== undefined && env !== '' ? Number(env) : Math.min(4, Math.max(2, availableParallelism() - 1));
    shared = Number.isInteger(n) && n > 0 ? new EcVerifyPool(Math.min(n, 16)) : null;
  }
  return shared;
}
