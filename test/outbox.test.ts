/**
 * The durable outbox: a CSR accepted while the authority is away is queued, the device is
 * told `pending`, and it gets exactly one certificate when the authority is back -- on the
 * same connection, on a later one, or after the gateway process was killed.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { generateKeyPairSync } from 'node:crypto';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { pkix, type CertMessage, type InstructionMessage } from '../protocol/index.ts';
import { authenticate, bootstrap, csrFor, rid, type RawDevice } from './support/mqtt.ts';
import { startStack, type Stack } from './support/stack.ts';
import { until as waitUntil } from './support/wait.ts';

async function authenticated(t: Parameters<typeof bootstrap>[0], stack: Stack, id: string): Promise<{ dev: RawDevice; csr: string }> {
  const dev = await bootstrap(t, stack, id);
  const instruction = await authenticate(dev, stack.credential(id, 'pki-signature'));
  return { dev, csr: csrFor(instruction) };
}

test('a CSR sent while the authority is down is queued (pending) and completed once it returns', async (t) => {
  const stack = await startStack(t);
  const { dev, csr } = await authenticated(t, stack, 'queued-1');
  await stack.stopAuthority();

  const requestId = rid('csr');
  await dev.send('csr', { requestId, csr });
  const pending = await dev.next('pending', { requestId });
  assert.ok(pending.retryAfterMs > 0, 'pending carries retryAfterMs');
  assert.equal((await stack.gateway.outbox.pendingCount()), 1);

  await stack.startAuthorityAgain();
  const cert = await dev.next<CertMessage>('cert', { requestId, timeoutMs: 20_000 });
  assert.equal((await stack.gateway.outbox.pendingCount()), 0);
  const rows = await stack.authority.store.listCertificates({ subjectId: 'queued-1' });
  assert.deepEqual(rows.map((r) => r.serial), [cert.serial]);

  // Asking again with the same requestId returns the same certificate, not a second one.
  await dev.send('csr', { requestId, csr });
  const again = await dev.next<CertMessage>('cert', { requestId });
  assert.equal(again.serial, cert.serial);
  assert.equal((await stack.authority.store.listCertificates({ subjectId: 'queued-1' })).length, 1);
});

test('a device that disconnected while its CSR was queued gets the certificate once it has authenticated again', async (t) => {
  const stack = await startStack(t);
  const { dev, csr } = await authenticated(t, stack, 'queued-2');
  await stack.stopAuthority();
  const requestId = rid('csr');
  await dev.send('csr', { requestId, csr });
  await dev.next('pending', { requestId });
  await dev.end();

  await stack.startAuthorityAgain();
  // Wait until the outbox has the answer, then come back.
  await waitUntil(async () => (await stack.gateway.outbox.pendingCount()) === 0, 60_000, 'the outbox to hold the answer');
  const back = await bootstrap(t, stack, 'queued-2');
  // A bare claim of the id gets no stored answer; the device proves itself first.
  await authenticate(back, stack.credential('queued-2', 'pki-signature'));
  const cert = await back.next<CertMessage>('cert', { requestId });
  assert.equal((await stack.authority.store.listCertificates({ subjectId: 'queued-2' }))[0].serial, cert.serial);
});

test('queued requests drain in arrival order when the authority returns', async (t) => {
  const stack = await startStack(t, { gateway: { authorityConcurrency: 1 } });
  const devices = [];
  for (const id of ['order-a', 'order-b', 'order-c', 'order-d']) devices.push({ id, ...(await authenticated(t, stack, id)) });
  await stack.stopAuthority();
  for (const d of devices) {
    const requestId = rid('csr');
    await d.dev.send('csr', { requestId, csr: d.csr });
    await d.dev.next('pending', { requestId });
  }
  await stack.startAuthorityAgain();
  for (const d of devices) await d.dev.next('cert', { timeoutMs: 20_000 });
  const issued = (await stack.authority.store.listAudit({ limit: 100 })).filter((a) => a.action === 'issue').reverse();
  assert.deepEqual(issued.map((a) => a.deviceId), ['order-a', 'order-b', 'order-c', 'order-d']);
});

test('devices with certificates keep connecting and publishing while the authority is down', async (t) => {
  const stack = await startStack(t);
  const device = stack.device('offline-ok', 'pki-signature');
  const identity = await device.onboard();
  await stack.stopAuthority();
  const client = await device.connectOperational(identity);
  await device.publishTelemetry(client, { ok: true });
  await client.endAsync();
  const ready = await fetch(`http://127.0.0.1:${stack.gateway.httpPort}/readyz`);
  assert.equal(ready.status, 200, 'ready on the cached CRL while the authority is away');
  assert.equal((await ready.json()).checks.authorityLink, false);
});

/**
 * The gateway as its own process, so it can be killed with SIGKILL; started as production
 * starts it, through bin/leafgate-gateway (which execs node: the pid is the gateway's).
 */
async function spawnGateway(dataDir: string): Promise<{ child: ChildProcess; port: number }> {
  const child = spawn(fileURLToPath(new URL('../bin/leafgate-gateway', import.meta.url)), ['start', '--data-dir', dataDir, '--host', '127.0.0.1', '--port', '0'], {
    env: { ...process.env, LEAFGATE_GATEWAY_HTTP_PORT: '0', LEAFGATE_LOG_LEVEL: 'warn' },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let out = '';
  child.stdout!.setEncoding('utf8');
  const port = await new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`gateway did not start: ${out}`)), 20_000);
    child.stdout!.on('data', (c: string) => {
      out += c;
      const m = /on port (\d+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(Number(m[1]));
      }
    });
    child.once('exit', (code) => reject(new Error(`gateway exited with ${code}: ${out}`)));
  });
  return { child, port };
}

test('SIGKILL of the gateway between accepting a CSR and delivering it: after restart the device gets exactly one certificate', async (t) => {
  const stack = await startStack(t);
  // Hand the enrolled identity to a gateway process of its own.
  await stack.gateway.close();
  const gatewayDir = join(stack.dir, 'gateway');
  let proc = await spawnGateway(gatewayDir);
  t.after(() => proc.child.kill('SIGKILL'));
  const local = { ...stack, brokerUrl: `mqtts://127.0.0.1:${proc.port}` } as Stack;
  const { dev, csr } = await authenticated(t, local, 'killed-1');

  await stack.stopAuthority();
  const requestId = rid('csr');
  await dev.send('csr', { requestId, csr });
  await dev.next('pending', { requestId });
  // PUBACK came back, so the CSR is on disk: kill without any chance to flush or close.
  proc.child.kill('SIGKILL');
  await once(proc.child, 'exit');
  await dev.closed;

  await stack.startAuthorityAgain();
  proc = await spawnGateway(gatewayDir);
  const back = await bootstrap(t, { ...stack, brokerUrl: `mqtts://127.0.0.1:${proc.port}` } as Stack, 'killed-1');
  // Re-ask with the same requestId (also covered: delivery on subscribe once it completes).
  await back.send('csr', { requestId, csr });
  const cert = await back.next<CertMessage>('cert', { requestId, timeoutMs: 20_000 });
  const rows = await stack.authority.store.listCertificates({ subjectId: 'killed-1' });
  assert.deepEqual(rows.map((r) => r.serial), [cert.serial], 'exactly one certificate was issued');
  const issues = (await stack.authority.store.listAudit({ deviceId: 'killed-1' })).filter((a) => a.action === 'issue');
  assert.equal(issues.length, 1);
});

test('a device that drops right after sending its CSR gets the certificate when it comes back', async (t) => {
  const stack = await startStack(t);
  const { dev, csr } = await authenticated(t, stack, 'dropped-1');
  const requestId = rid('csr');
  await dev.send('csr', { requestId, csr });
  await dev.end();
  await waitUntil(async () => (await stack.gateway.outbox.pendingCount()) === 0, 60_000, 'the outbox to hold the answer');
  const back = await bootstrap(t, stack, 'dropped-1');
  await authenticate(back, stack.credential('dropped-1', 'pki-signature'));
  const cert = await back.next<CertMessage>('cert', { requestId });
  assert.equal((await stack.authority.store.listCertificates({ subjectId: 'dropped-1' }))[0].serial, cert.serial);
});
