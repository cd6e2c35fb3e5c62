/**
 * issuance: certificates per second through the authority's real CSR step, one process.
 *
 * DeviceOnboarding.csr() with a real SqliteStore and LocalCa in a temp dir: idempotency
 * lookup, live auth session, device status, CSR parse + self-signature verify, policy check
 * against the instruction, active-cert count, build + sign + encode the certificate, and
 * the issuance commit (request answer, certificate row, session consumed, audit row) in one
 * SQLite transaction (group-committed with the others in flight when --concurrency > 1).
 * Register/auth are bypassed by seeding the device row and an auth session whose
 * instruction matches the CSR, so the timed path is the CSR step alone.
 * CSRs are built before the clock starts (key generation is the device's cost).
 *
 * Requests are driven `--concurrency` at a time, as an authority serving many gateways sees
 * them: the CSR self-signature check and the certificate signature run on the libuv
 * threadpool (crypto.verify / crypto.sign with a callback), so while one request waits for
 * its signature this thread parses, encodes and stores others. `main_thread_us` says how much
 * of a certificate stays on this thread (what bounds the rate once the other cores are free).
 *
 * Then the same steps are replayed by hand with performance.now() around each piece, one
 * request at a time, to show where a certificate's time goes, next to the raw node:crypto
 * sign/verify rates.
 */
import { createPublicKey, generateKeyPair, randomBytes, sign, verify, X509Certificate, type KeyObject } from 'node:crypto';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { Session } from 'node:inspector/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import { DEFAULT_POLICY, DeviceOnboarding, LocalCa, SqliteStore, openCa } from '../authority/index.ts';
import { resolveCaKeys } from '../authority/config.ts';
import type { SqliteDriver } from '../authority/store/index.ts';
import { BACKDATE_MS } from '../authority/ca/index.ts';
import { bodyHash } from '../authority/onboarding.ts';
import { buildInstruction, checkCsrAgainstInstruction, mergePolicy } from '../authority/policy/index.ts';
import { pkix, type CsrMessage, type InstructionMessage, type KeySpec } from '../protocol/index.ts';
import { CpuMeter, log, pool, removeDirLater, selfCpuMs, targetFields, waitForQuiet } from './common.ts';
import { Worker } from 'node:worker_threads';
import { summarizeProfile } from './profile-summary.ts';
import { defineBench } from './types.ts';

const generate = promisify(generateKeyPair);
const GATEWAY_ID = 'gw-bench';
const PASSPHRASE = 'bench-passphrase-0123456789';

interface Prepared {
  deviceId: string;
  msg: CsrMessage;
}

const KEY_SPECS: Record<string, KeySpec> = { 'ec-256': { keyType: 'ec', keySize: 256 }, 'rsa-2048': { keyType: 'rsa', keySize: 2048 } };

async function keyPool(spec: KeySpec, n: number): Promise<Array<{ privateKey: KeyObject; publicKey: KeyObject }>> {
  // Distinct keys per device are not needed by the authority (it does not check key reuse
  // at first issuance), and RSA key generation would dominate the setup: a small pool.
  return Promise.all(Array.from({ length: n }, () => (spec.keyType === 'ec' ? generate('ec', { namedCurve: 'P-256' }) : generate('rsa', { modulusLength: spec.keySize }))));
}

/** CPU ms (user + system) of this process's main thread alone: /proc/self/task/<pid>/stat. */
function mainThreadCpuMs(): number {
  const stat = readFileSync(`/proc/self/task/${process.pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) * 10; // clock ticks of 10 ms
}

/** Operations per second of `fn` over about `ms` milliseconds. */
function rate(fn: () => void, ms: number): number {
  for (let i = 0; i < 200; i++) fn(); // warm-up
  let n = 0;
  const t0 = performance.now();
  let t = t0;
  while (t - t0 < ms) {
    for (let i = 0; i < 50; i++) fn();
    n += 50;
    t = performance.now();
  }
  return (n * 1000) / (t - t0);
}

export const issuanceBench = defineBench({
  name: 'issuance',
  description: 'certs/s through the authority CSR step (parse+verify, policy, sign, encode, SQLite, audit), EC P-256 and RSA-2048',
  options: {
    seconds: { default: 5, help: 'timed issuance per key type' },
    keys: { default: 'ec-256,rsa-2048', help: 'CSR key types, comma-separated (ec-256, rsa-2048)' },
    concurrency: { default: 64, help: 'CSR requests in flight at once in the timed loop (1 = one after the other)' },
    'no-fsync': { default: false, help: 'the store acknowledges commits without waiting for the WAL fsync (databaseFsync: false), for comparison' },
    breakdown: { default: 2000, help: 'certificates issued step by step for the time breakdown' },
    'ca-keys': { default: 'file', help: 'where the CA keys are: file (KeyObject, worker pool) or pkcs11 (a SoftHSM2 token made in the temp dir, signing on the PKCS#11 worker sessions)' },
    'cpu-prof': { default: '', help: 'after the timed loops, profile a separate ~2 s pass of EC P-256 issuance into this .cpuprofile file and print its top functions' },
  },
  async run(opts, emit) {
    const dir = mkdtempSync(join(tmpdir(), 'leafgate-bench-issuance-'));
    removeDirLater(dir, opts.keep);
    const ca = await openBenchCa(dir, opts['ca-keys']);
    log(`issuance: CA keys ${JSON.stringify(ca.describeKeys())}`);
    const store = new SqliteStore(join(dir, 'authority.db'), { fsync: !opts['no-fsync'] });
    const policy = mergePolicy(DEFAULT_POLICY, {});
    const config = { policies: { default: policy }, defaultGroup: 'default', challengeTtlSeconds: 120, csrDeadlineSeconds: 600 };
    const onboarding = new DeviceOnboarding({ store, ca, config });
    let seq = 0;

    /** Devices with a live auth session and a CSR that matches its instruction. */
    const prepare = async (label: string, spec: KeySpec, keys: Array<{ privateKey: KeyObject; publicKey: KeyObject }>, n: number): Promise<Array<Prepared & { instruction: InstructionMessage; sessionId: string }>> => {
      const now = Date.now();
      const out: Array<Prepared & { instruction: InstructionMessage; sessionId: string }> = [];
      for (let i = 0; i < n; i++) {
        const deviceId = `bench-${label}-${++seq}`;
        const instruction = buildInstruction(policy, { requestId: randomBytes(9).toString('base64url'), deviceId, group: 'default', key: spec, csrDeadline: new Date(now + 600_000) });
        await store.insertDevice({
          id: deviceId, groupName: 'default', method: 'ddkg', status: 'enrolled', gatewayId: GATEWAY_ID, ddkgSalt: null, ddkgPublicKey: null, birthCertFingerprint: null, createdAt: now, updatedAt: now,
        });
        const sessionId = randomBytes(16).toString('base64url');
        await store.insertAuthSession({ id: sessionId, deviceId, gatewayId: GATEWAY_ID, instruction: instruction as unknown as Record<string, unknown>, expiresAt: now + 600_000, usedAt: null });
        const pair = keys[i % keys.length];
        const csr = pkix.buildCsr({ commonName: instruction.subject.commonName, sans: instruction.sans, privateKey: pair.privateKey, publicKey: pair.publicKey });
        out.push({ deviceId, msg: { requestId: randomBytes(12).toString('base64url'), csr }, instruction, sessionId });
      }
      return out;
    };

    const caKey = ca.deviceCa.privateKey;
    const message = randomBytes(300);
    const rawSignCa = caKey
      ? rate(() => sign('sha256', message, caKey), 1000)
      : await asyncRate(() => ca.deviceCa.key.sign('sha256', message), opts.concurrency, 2000);
    emit('raw_sign_per_s', rawSignCa, 'signs/s', {
      key: 'ec-256', signer: 'device-ca', ca_keys: opts['ca-keys'],
      note: caKey ? 'node:crypto sign of 300 bytes with the device CA key, which signs every device certificate' : `CaKey.sign of 300 bytes through the token (${opts.concurrency} in flight on the PKCS#11 worker sessions), which signs every device certificate`,
    });

    // The floor the ratio is taken against: raw signatures with the device CA key on as many
    // threads as the issuance path signs on (the worker pool's size; without the pool, the
    // libuv threadpool's), all at once. On a machine with fewer cores than that the threads
    // share the cores, as the issuance path's do. A busy host's share moves from second to
    // second, so it is measured right before and right after each timed loop, and the ratio
    // is taken against their mean.
    const pool0 = pkix.ecVerifyPool();
    const signThreads = caKey ? (pool0 ? pool0.size : Number(process.env.UV_THREADPOOL_SIZE ?? 4)) : 0;
    const signFloor = async (): Promise<number> => (caKey ? rawSignOnThreads(caKey, signThreads, 1000) : rawSignCa);

    for (const label of opts.keys.split(',').map((s) => s.trim()).filter(Boolean)) {
      const spec = KEY_SPECS[label];
      if (!spec) throw new Error(`unknown key type ${label}`);
      log(`issuance ${label}: generating keys`);
      const keys = await keyPool(spec, spec.keyType === 'ec' ? 64 : 16);
      const rawSignOwn = rate(() => sign('sha256', message, keys[0].privateKey), 1000);
      const sig = sign('sha256', message, keys[0].privateKey);
      const rawVerify = rate(() => verify('sha256', message, keys[0].publicKey, sig), 1000);
      emit('raw_verify_per_s', rawVerify, 'verifies/s', { key: label, note: 'node:crypto verify of 300 bytes: the CSR self-signature check' });
      if (spec.keyType !== 'ec') emit('raw_sign_per_s', rawSignOwn, 'signs/s', { key: label, signer: 'device key', note: 'context only: certificates are signed by the EC P-256 device CA whatever the CSR key' });

      // Warm-up: JIT, SQLite page cache, statement caches.
      await pool(await prepare(label, spec, keys, 400), opts.concurrency, async (p) => void (await onboarding.csr(GATEWAY_ID, p.deviceId, p.msg)));

      // Timed: batches of prepared devices until `seconds` of issuing time have been spent.
      await waitForQuiet(30_000);
      const floorBefore = await signFloor();
      const meter = new CpuMeter({ bench: 'self' });
      const commits0 = { ...(store.db as SqliteDriver).stats };
      meter.begin();
      let issued = 0;
      let timedMs = 0;
      let mainCpuMs = 0;
      let allCpuMs = 0;
      let batch = 500;
      let sample: string | undefined;
      while (timedMs < opts.seconds * 1000) {
        const prepared = await prepare(label, spec, keys, batch);
        const main0 = mainThreadCpuMs();
        const all0 = selfCpuMs();
        const t0 = performance.now();
        await pool(prepared, opts.concurrency, async (p) => {
          const cert = await onboarding.csr(GATEWAY_ID, p.deviceId, p.msg);
          sample ??= cert.certificate;
        });
        timedMs += performance.now() - t0;
        mainCpuMs += mainThreadCpuMs() - main0;
        allCpuMs += selfCpuMs() - all0;
        issued += prepared.length;
        // Next batch: about one second of work, so preparing (untimed) stays proportionate.
        batch = Math.max(200, Math.min(20_000, Math.round((issued / timedMs) * 1000)));
      }

      const { foreignPct } = meter.end();
      const floorAfter = await signFloor();
      const rawSignThreads = (floorBefore + floorAfter) / 2;
      if (caKey) {
        emit('raw_sign_threads_per_s', rawSignThreads, 'signs/s', {
          key: 'ec-256', signer: 'device-ca', for_csr_key: label, threads: signThreads, before: Math.round(floorBefore), after: Math.round(floorAfter), one_thread_per_s: Math.round(rawSignCa),
          note: `node:crypto sign of 300 bytes with the device CA key on ${signThreads} worker threads at once (the size of the pool the issuance path signs on), ~1 s right before and right after the timed loop, mean: the floor of ratio_to_raw_sign`,
        });
      }
      const commits = (store.db as SqliteDriver).stats;
      const batches = commits.batches - commits0.batches;
      if (batches > 0) emit('tx_per_commit', (commits.transactions - commits0.transactions) / batches, 'transactions/commit', { key: label, note: 'SQLite group commit: store transactions sharing one COMMIT in the timed loop' });

      // Profile: a separate pass of about two seconds, so the sampler never skews the rate above.
      if (opts['cpu-prof'] && spec.keyType === 'ec') {
        const prepared = await prepare(label, spec, keys, Math.round((issued / timedMs) * 2000));
        const session = new Session();
        session.connect();
        await session.post('Profiler.enable');
        await session.post('Profiler.setSamplingInterval', { interval: 200 });
        await session.post('Profiler.start');
        await pool(prepared, opts.concurrency, async (p) => void (await onboarding.csr(GATEWAY_ID, p.deviceId, p.msg)));
        const { profile } = await session.post('Profiler.stop');
        session.disconnect();
        writeFileSync(opts['cpu-prof'], JSON.stringify(profile));
        log(`CPU profile of ${prepared.length} EC P-256 issuances written to ${opts['cpu-prof']}`);
        for (const line of summarizeProfile(opts['cpu-prof'], 25)) log(line);
      }
      // The output is a real certificate chaining to the device CA.
      if (!sample || !new X509Certificate(sample).verify(ca.deviceCa.certificate.publicKey)) throw new Error('issued certificate does not verify against the device CA');

      const certsPerS = (issued * 1000) / timedMs;
      const threadpool = Number(process.env.UV_THREADPOOL_SIZE ?? 4);
      emit('certs_per_s', certsPerS, 'certs/s', { key: label, ca_keys: opts['ca-keys'], certs: issued, note: `${opts.concurrency} requests in flight; CSR verify on the worker pool, certificate sign ${caKey ? `on the worker pool (threadpool: ${threadpool} threads)` : 'through the PKCS#11 token on its worker sessions'}` });
      const ratio = certsPerS / rawSignThreads;
      emit('ratio_to_raw_sign', ratio, 'ratio', {
        key: label, ...targetFields(ratio, 0.1, '>='), certs_per_s: Math.round(certsPerS), raw_sign_per_s: Math.round(rawSignThreads), sign_threads: signThreads,
        ratio_to_one_thread: Math.round((certsPerS / rawSignCa) * 10000) / 10000,
        note: caKey
          ? `certs_per_s / raw device-CA signs/s on ${signThreads} threads at once (the issuance pool's size), measured around the timed loop; ratio_to_one_thread: against one thread`
          : 'certs_per_s / the token\'s own signs/s through CaKey.sign, same in-flight count',
      });
      emit('cert_us', (timedMs * 1000) / issued, 'us/cert', { key: label, note: 'wall time per certificate in the timed loop (1e6 / certs_per_s)' });
      emit('main_thread_us', (mainCpuMs * 1000) / issued, 'us/cert', { key: label, note: 'CPU of the main (event-loop) thread per certificate in the timed loop: parse, encode, SQLite, JS; 1e6 / this bounds certs_per_s when other cores are free' });
      emit('other_threads_us', ((allCpuMs - mainCpuMs) * 1000) / issued, 'us/cert', { key: label, note: 'CPU of every other thread per certificate: threadpool signatures and verifies, V8 GC and compiler helpers' });
      emit('foreign_cpu_pct', foreignPct, '%', { key: label, note: 'CPU used by other processes meanwhile (100 = one core); the threadpool makes this benchmark use both cores, so anything above ~10 lowers certs_per_s' });

      // Breakdown: the steps of DeviceOnboarding.doCsr replayed with a clock around each.
      const n = Math.max(1, opts.breakdown);
      const prepared = await prepare(label, spec, keys, n);
      const acc = { hash_us: 0, store_reads_us: 0, parse_verify_us: 0, policy_us: 0, encode_sign_us: 0, store_us: 0 };
      // Inside parse_verify_us (timed apart, not added to the sum): importing the CSR's public key.
      let importUs = 0;
      let genericImportUs = 0;
      for (const p of prepared) {
        let t = performance.now();
        const lap = (k: keyof typeof acc) => {
          const now = performance.now();
          acc[k] += (now - t) * 1000;
          t = now;
        };
        const hash = bodyHash(p.msg);
        lap('hash_us');
        const now = Date.now();
        await store.getRequest(p.deviceId, p.msg.requestId);
        const session = await store.getLiveAuthSession(p.deviceId, now);
        await store.getDevice(p.deviceId);
        await store.countActiveCertificates(p.deviceId, now);
        lap('store_reads_us');
        const csr = await pkix.parseCsrAsync(p.msg.csr);
        lap('parse_verify_us');
        let ti = performance.now();
        await pkix.importSpkiFast(csr.spkiDer);
        importUs += (performance.now() - ti) * 1000;
        ti = performance.now();
        pkix.keyDescription(createPublicKey({ key: csr.spkiDer, format: 'der', type: 'spki' }));
        genericImportUs += (performance.now() - ti) * 1000;
        t = performance.now();
        const instruction = session!.instruction as unknown as InstructionMessage;
        checkCsrAgainstInstruction(csr, instruction, DEFAULT_POLICY);
        lap('policy_us');
        const issuedCert = await ca.issue('device', {
          subjectDer: pkix.encodeName(instruction.subject.commonName), spkiDer: csr.spkiDer, profile: { kind: 'device', keyType: csr.key.keyType }, sans: { dns: csr.sans.dns, uri: csr.sans.uri },
          notBefore: new Date(now - BACKDATE_MS), notAfter: new Date(now + p.instruction.validityDays * 86_400_000),
        });
        lap('encode_sign_us');
        const answer = { requestId: p.msg.requestId, certificate: issuedCert.pem, chain: issuedCert.chain, serial: issuedCert.serial, notBefore: issuedCert.notBefore.toISOString(), notAfter: issuedCert.notAfter.toISOString() };
        await store.recordIssuance({
          request: { deviceId: p.deviceId, requestId: p.msg.requestId, kind: 'csr', bodyHash: hash, response: answer, createdAt: now },
          certificate: {
            serial: issuedCert.serial, subjectId: p.deviceId, kind: 'device', fingerprint: issuedCert.fingerprint256, notBefore: issuedCert.notBefore.getTime(), notAfter: issuedCert.notAfter.getTime(),
            status: 'active', requestId: p.msg.requestId, pem: issuedCert.pem, revokedAt: null, revocationReason: null, createdAt: now,
          },
          authSessionId: session!.id,
          audit: { at: now, action: 'issue', outcome: 'ok', deviceId: p.deviceId, gatewayId: GATEWAY_ID, requestId: p.msg.requestId, serial: issuedCert.serial, detail: { key: pkix.keySpecLabel(csr.key), notAfter: answer.notAfter } },
        });
        lap('store_us');
      }
      let sum = 0;
      for (const [k, v] of Object.entries(acc)) {
        sum += v / n;
        emit(k, v / n, 'us/cert', { key: label, certs: n });
      }
      emit('spki_import_us', importUs / n, 'us', { key: label, note: 'part of parse_verify_us: our SPKI read + key import (RSA: JWK n,e; EC: WebCrypto raw point), as parseCsrAsync does' });
      emit('spki_import_generic_us', genericImportUs / n, 'us', { key: label, note: 'for comparison, not on the path: createPublicKey(SPKI DER) + asymmetricKeyDetails (OpenSSL 3 decoder), what parseCsr did before' });
      emit('raw_sign_us', 1e6 / rawSignCa, 'us', { key: label, note: 'part of encode_sign_us: one device-CA signature' });
      emit('raw_verify_us', 1e6 / rawVerify, 'us', { key: label, note: 'part of parse_verify_us: one CSR signature verify' });
      emit('steps_sum_us', sum, 'us/cert', { key: label, note: 'sum of the steps above, one request at a time (so parse_verify_us and encode_sign_us include the threadpool round trip, which concurrency hides); with concurrency 1, cert_us is this plus promise hops, the per-device lock and building the answer' });
    }

    // The issuance commit alone (store.recordIssuance with a real-sized answer and certificate),
    // one at a time and 64 in flight: what the SQLite group commit changes, without the
    // signing and parsing around it (which dominate, and drown it in noise on a shared machine).
    const sample = await store.listCertificates({ kind: 'device', limit: 1 });
    const pem = sample[0]?.pem ?? '';
    for (const inFlight of [1, 64]) {
      const n = 5000;
      const ready = await prepare('commit', KEY_SPECS['ec-256'], await keyPool(KEY_SPECS['ec-256'], 1), n);
      const now = Date.now();
      let next = 0;
      const t0 = performance.now();
      await Promise.all(Array.from({ length: inFlight }, async () => {
        while (next < ready.length) {
          const p = ready[next++];
          const serial = randomBytes(16).toString('hex').toUpperCase();
          await store.recordIssuance({
            request: { deviceId: p.deviceId, requestId: p.msg.requestId, kind: 'csr', bodyHash: 'h', response: { requestId: p.msg.requestId, certificate: pem, chain: [ca.deviceCa.pem, ca.root.pem], serial }, createdAt: now },
            certificate: { serial, subjectId: p.deviceId, kind: 'device', fingerprint: serial, notBefore: now, notAfter: now + 86_400_000, status: 'active', requestId: p.msg.requestId, pem, revokedAt: null, revocationReason: null, createdAt: now },
            authSessionId: p.sessionId,
            audit: { at: now, action: 'issue', outcome: 'ok', deviceId: p.deviceId, gatewayId: GATEWAY_ID, requestId: p.msg.requestId, serial, detail: { key: 'ec-256' } },
          });
        }
      }));
      emit('commit_us', ((performance.now() - t0) * 1000) / n, 'us/issuance', { in_flight: inFlight, note: 'store.recordIssuance alone (answer, certificate row, session consumed, audit row); in flight > 1 shares COMMITs' });
    }
    await store.close();
    await ca.close();
  },
});

/**
 * Raw ECDSA signatures per second with `key` on `threads` worker threads signing at once for
 * about `ms` (plain JavaScript workers, the key sent once as PKCS#8 DER): each thread counts
 * its own signatures over its own window after a common start, and the rates add up.
 */
async function rawSignOnThreads(key: KeyObject, threads: number, ms: number): Promise<number> {
  const pkcs8 = key.export({ type: 'pkcs8', format: 'der' });
  const code = `
    const { parentPort, workerData } = require('node:worker_threads');
    const { createPrivateKey, sign } = require('node:crypto');
    const key = createPrivateKey({ key: Buffer.from(workerData.pkcs8), format: 'der', type: 'pkcs8' });
    const data = Buffer.alloc(300, 7);
    for (let i = 0; i < 200; i++) sign('sha256', data, key);
    parentPort.once('message', () => {
      let n = 0;
      const t0 = performance.now();
      let t = t0;
      while (t - t0 < workerData.ms) {
        for (let i = 0; i < 20; i++) sign('sha256', data, key);
        n += 20;
        t = performance.now();
      }
      parentPort.postMessage((n * 1000) / (t - t0));
    });
    parentPort.postMessage('ready');
  `;
  const workers = Array.from({ length: Math.max(1, threads) }, () => new Worker(code, { eval: true, workerData: { pkcs8: new Uint8Array(pkcs8), ms } }));
  try {
    const first = (w: Worker) => new Promise<unknown>((resolve, reject) => {
      w.once('message', resolve);
      w.once('error', reject);
    });
    await Promise.all(workers.map(first));
    const rates = workers.map(first);
    for (const w of workers) w.postMessage('go');
    return (await Promise.all(rates)).reduce<number>((a, r) => a + Number(r), 0);
  } finally {
    await Promise.all(workers.map((w) => w.terminate()));
  }
}

/** Signatures per second of an asynchronous signer with `inFlight` calls outstanding. */
async function asyncRate(fn: () => Promise<unknown>, inFlight: number, ms: number): Promise<number> {
  await Promise.all(Array.from({ length: inFlight }, () => fn())); // warm-up
  let n = 0;
  const t0 = performance.now();
  await Promise.all(Array.from({ length: inFlight }, async () => {
    while (performance.now() - t0 < ms) {
      await fn();
      n++;
    }
  }));
  return (n * 1000) / (performance.now() - t0);
}

/** The benchmark's CA: file keys, or the whole hierarchy in a SoftHSM2 token made in `dir`. */
async function openBenchCa(dir: string, store: string): Promise<LocalCa> {
  if (store === 'file') return LocalCa.open(join(dir, 'ca'), PASSPHRASE);
  if (store !== 'pkcs11') throw new Error(`--ca-keys is file or pkcs11, not ${store}`);
  const module = '/usr/lib/softhsm/libsofthsm2.so';
  if (!existsSync(module)) throw new Error(`--ca-keys pkcs11 needs SoftHSM2 (${module}): apt-get install softhsm2`);
  mkdirSync(join(dir, 'tokens'));
  writeFileSync(join(dir, 'softhsm2.conf'), `directories.tokendir = ${join(dir, 'tokens')}\nobjectstore.backend = file\nlog.level = ERROR\n`);
  process.env.SOFTHSM2_CONF = join(dir, 'softhsm2.conf');
  const pin = randomBytes(8).toString('hex');
  const r = spawnSync('softhsm2-util', ['--init-token', '--free', '--label', 'bench-ca', '--so-pin', randomBytes(8).toString('hex'), '--pin', pin], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`softhsm2-util --init-token: ${r.stderr}`);
  writeFileSync(join(dir, 'pin'), pin, { mode: 0o600 });
  const caKeys = resolveCaKeys({ store: 'pkcs11', module, tokenLabel: 'bench-ca', pinFile: join(dir, 'pin') });
  return (await openCa({ dataDir: dir, caPassphrase: '', organization: 'leafgate', caKeys }, { create: true })).ca;
}
