/**
 * Fault injection: the gateway process is killed (SIGKILL) in the middle of 200 onboardings
 * done with the device SDK, and started again on the same port and data directory. Every
 * device must finish (none stuck), and the authority's store must hold exactly one
 * certificate per device: the SDK resumes its request (same requestId, CSR and key) instead
 * of starting a second one.
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import Database from 'better-sqlite3';
import { LeafDevice, type OnboardResult } from '../device/index.ts';
import { spawnNode, stopChild, pool, type SpawnedNode } from '../bench/common.ts';
import { startProcStack } from '../bench/proc-stack.ts';

const DEVICES = 200;
const CONCURRENCY = 16;
/** The gateway is killed once this many devices are done (the rest are in every step). */
const KILL_AFTER = 60;

test('SIGKILL of the gateway during 200 SDK onboardings: all finish, exactly one certificate each', { timeout: 400_000 }, async (t) => {
  const stack = await startProcStack({ keep: false, startGateway: false, tmpPrefix: 'leafgate-crash-' });
  t.after(() => stack.close());
  const gw = stack.gateway;
  const config = JSON.parse(readFileSync(gw.configFile, 'utf8'));
  // Every device connects from 127.0.0.1, several times around the crash: the per-address
  // connection budget is not what is tested here.
  config.listen = { host: '127.0.0.1', port: 0 };
  config.http = { host: '127.0.0.1', port: 0 };
  config.rateLimits = { connectionsPerAddress: { points: 100_000, durationSeconds: 10 } };
  writeFileSync(gw.configFile, JSON.stringify(config));

  const start = () => spawnNode('bin/leafgate.ts', ['gateway', 'start', '--config', gw.configFile], { env: stack.env, name: 'gateway' });
  let proc: SpawnedNode = start();
  t.after(() => stopChild(proc.child));
  const port = Number((await proc.waitFor(/serving MQTT over TLS on port (\d+)/, 120_000))[1]);
  // The restart binds the same port (SO_REUSEADDR is node's default for listen).
  config.listen.port = port;
  writeFileSync(gw.configFile, JSON.stringify(config));

  let done = 0;
  let killed: Promise<void> | undefined;
  const killAndRestart = async () => {
    const exited = new Promise((r) => proc.child.once('exit', r));
    proc.child.kill('SIGKILL');
    await exited;
    for (let attempt = 1; ; attempt++) {
      proc = start();
      try {
        await proc.waitFor(/serving MQTT over TLS on port (\d+)/, 120_000);
        return;
      } catch (err) {
        if (attempt >= 5 || !/EADDRINUSE/.test(String((err as Error).message) + proc.stderrTail())) throw err;
        await new Promise((r) => setTimeout(r, 200 * attempt));
      }
    }
  };

  const results = new Map<string, OnboardResult>();
  const failures: string[] = [];
  const ids = Array.from({ length: DEVICES }, (_, i) => `crash-dev-${i}`);
  await pool(ids, CONCURRENCY, async (id) => {
    const device = new LeafDevice({
      deviceId: id, brokerUrl: `mqtts://127.0.0.1:${port}`, ca: stack.rootPem,
      credential: { method: 'pki-signature', ...stack.manufacturer.issueBirthCertificate(id) },
      timeoutMs: 30_000, retries: 10,
    });
    try {
      results.set(id, await device.onboard());
    } catch (err) {
      failures.push(`${id}: ${(err as Error).message}`);
    }
    if (++done === KILL_AFTER) killed = killAndRestart();
  });
  await killed;

  assert.deepEqual(failures, []);
  assert.equal(results.size, DEVICES);
  const db = new Database(join(stack.authority.dataDir, 'authority.db'), { readonly: true, fileMustExist: true });
  try {
    const rows = db.prepare("SELECT subject_id AS id, COUNT(*) AS n, MIN(serial) AS serial FROM certificates WHERE kind = 'device' GROUP BY subject_id").all() as Array<{ id: string; n: number; serial: string }>;
    assert.equal(rows.length, DEVICES);
    const twice = rows.filter((r) => r.n !== 1).map((r) => `${r.id}: ${r.n}`);
    assert.deepEqual(twice, [], 'devices with more than one certificate');
    for (const r of rows) assert.equal(results.get(r.id)?.serial.toUpperCase(), r.serial.toUpperCase(), `${r.id} holds the certificate the authority issued`);
  } finally {
    db.close();
  }
});
