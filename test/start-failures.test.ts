/**
 * A process that cannot start says why in one line, closes what it started and ends by
 * itself with the right exit code: the CLI is spawned for real, the faults are held by the
 * test (a port it listens on, an address that drops every connection), and each child is
 * only waited for, never killed, unless it overstays a generous bound (then the test fails).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';
import { startStack } from './support/stack.ts';

const BOUND_MS = 120_000;

/** Runs the CLI; resolves with its exit code and output once it ends by itself. */
function cli(args: string[], env: Record<string, string> = {}, onStdout?: (text: string, child: import('node:child_process').ChildProcess) => void): Promise<{ code: number | null; stderr: string; stdout: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', 'bin/leafgate.ts', ...args], { env: { ...process.env, LEAFGATE_LOG_LEVEL: 'silent', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => {
      stdout += d;
      onStdout?.(stdout, child);
    });
    child.stderr.on('data', (d) => (stderr += d));
    const guard = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`leafgate ${args.join(' ')} did not end by itself within ${BOUND_MS} ms; stderr: ${stderr}`));
    }, BOUND_MS);
    // 'close': the process exited and its output streams ended.
    child.on('close', (code) => {
      clearTimeout(guard);
      resolve({ code, stderr, stdout });
    });
  });
}

/** Exactly one line on stderr, and no sign that the process had to be forced to end. */
function oneLine(stderr: string, pattern: RegExp): void {
  const lines = stderr.trimEnd().split('\n');
  assert.equal(lines.length, 1, `one line on stderr, got:\n${stderr}`);
  assert.match(lines[0], pattern);
}

async function listen(server: Server): Promise<number> {
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return (server.address() as { port: number }).port;
}

/** An address that accepts TCP and drops it at once: a Redis or an authority that is not there. */
async function dropper(t: { after(fn: () => unknown): void }): Promise<number> {
  const server = createServer((socket) => socket.destroy());
  t.after(() => new Promise((resolve) => server.close(resolve)));
  return listen(server);
}

test('start failures: busy port, missing Redis, unreachable authority, wrong CA passphrase, bad config', async (t) => {
  const stack = await startStack(t);
  await stack.gateway.close();
  const gatewayDir = join(stack.dir, 'gateway');
  const common = ['--data-dir', gatewayDir, '--host', '127.0.0.1'];
  const env = { LEAFGATE_GATEWAY_HTTP_HOST: '127.0.0.1', LEAFGATE_GATEWAY_HTTP_PORT: '0' };

  await t.test('the MQTT port is held by another program', async () => {
    const holder = createServer();
    const port = await listen(holder);
    t.after(() => new Promise((resolve) => holder.close(resolve)));
    const r = await cli(['gateway', 'start', ...common, '--port', String(port)], env);
    assert.equal(r.code, 1);
    oneLine(r.stderr, new RegExp(`^error: MQTT port 127\\.0\\.0\\.1:${port} is in use by another program \\(EADDRINUSE\\)`));
  });

  await t.test('the ops HTTP port is held by another program (the broker already listened)', async () => {
    const holder = createServer();
    const port = await listen(holder);
    t.after(() => new Promise((resolve) => holder.close(resolve)));
    const r = await cli(['gateway', 'start', ...common, '--port', '0'], { ...env, LEAFGATE_GATEWAY_HTTP_PORT: String(port) });
    assert.equal(r.code, 1);
    oneLine(r.stderr, new RegExp(`^error: ops HTTP port 127\\.0\\.0\\.1:${port} is in use`));
  });

  await t.test('Redis does not answer', async () => {
    const port = await dropper(t);
    const config = join(stack.dir, 'gateway-redis.json');
    writeFileSync(config, JSON.stringify({ redis: { url: `redis://127.0.0.1:${port}`, startTimeoutMs: 1000 } }));
    const r = await cli(['gateway', 'start', ...common, '--port', '0', '--config', config], env);
    assert.equal(r.code, 1);
    oneLine(r.stderr, /^error: gateway cluster: Redis did not answer/);
  });

  await t.test('the authority is unreachable (enroll)', async () => {
    const port = await dropper(t);
    const r = await cli(['gateway', 'enroll', '--data-dir', join(stack.dir, 'gw-new'), '--authority', `https://127.0.0.1:${port}`, '--token', 'x', '--fingerprint', 'AA', '--id', 'gw-new']);
    assert.equal(r.code, 1);
    oneLine(r.stderr, /^error/);
  });

  await t.test('the CA passphrase is wrong', async () => {
    const r = await cli(['authority', 'start', '--data-dir', join(stack.dir, 'authority'), '--host', '127.0.0.1', '--port', '0'], { LEAFGATE_CA_PASSPHRASE: 'not-the-passphrase-at-all' });
    assert.equal(r.code, 1);
    oneLine(r.stderr, /^error.*passphrase/i);
  });

  await t.test('a config file with a typo and a wrong type: exit code 2, each key named', async () => {
    const config = join(stack.dir, 'gateway-bad.json');
    writeFileSync(config, JSON.stringify({ renewalCsrDeadlineMS: 1000, authorityQueueMax: -1 }));
    const r = await cli(['gateway', 'start', ...common, '--config', config], env);
    assert.equal(r.code, 2);
    oneLine(r.stderr, /^error: gateway config: renewalCsrDeadlineMS: unknown key \(did you mean renewalCsrDeadlineMs\?\); authorityQueueMax: must be >= 0 \(got -1\)$/);
  });

  await t.test('SIGTERM: a started gateway drains and exits 0 by itself', async () => {
    let signalled = false;
    const r = await cli(['gateway', 'start', ...common, '--port', '0'], env, (out, child) => {
      if (!signalled && /serving MQTT over TLS on port \d+/.test(out)) {
        signalled = true;
        child.kill('SIGTERM');
      }
    });
    assert.ok(signalled, `it started: ${r.stdout}${r.stderr}`);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stderr, '');
  });

  await t.test('a gateway that is not enrolled', async () => {
    const r = await cli(['gateway', 'start', '--data-dir', join(stack.dir, 'nowhere'), '--host', '127.0.0.1', '--port', '0'], env);
    assert.equal(r.code, 1);
    oneLine(r.stderr, /^error: gateway in .* is not enrolled: run `leafgate gateway enroll` first/);
  });
});
