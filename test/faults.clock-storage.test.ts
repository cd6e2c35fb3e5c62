/**
 * Clock and storage faults at the gateway: certificates backdated past the tolerated skew,
 * /readyz turning 503 at once on a clock out of tolerance and on an outbox that cannot
 * store (a full tmpfs), devices told `gateway_unavailable` with a retry hint and completing
 * the same request afterwards, and the outbox backlog as metrics.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import Database from 'better-sqlite3';
import { closeSync, cpSync, mkdtempSync, openSync, readdirSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { LeafgateError } from '../protocol/index.ts';
import { LeafDevice, MemoryStateStore } from '../device/index.ts';
import { resolveGatewayConfig, startGateway, type RunningGateway } from '../gateway/index.ts';
import { logger, startStack } from './support/stack.ts';
import { until } from './support/wait.ts';

const WAIT = 60_000;

function countRows(dir: string, sql: string): number {
  const db = new Database(join(dir, 'authority', 'authority.db'), { readonly: true, fileMustExist: true });
  try {
    return (db.prepare(sql).get() as { n: number }).n;
  } finally {
    db.close();
  }
}

async function readyz(httpPort: number): Promise<{ status: number; body: { checks: Record<string, boolean> } }> {
  const res = await fetch(`http://127.0.0.1:${httpPort}/readyz`);
  return { status: res.status, body: await res.json() };
}

async function metric(httpPort: number, name: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${httpPort}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  return line ? Number(line.split(' ')[1]) : NaN;
}

test('device certificates are backdated by more than the gateway tolerates as clock skew', async (t) => {
  const stack = await startStack(t);
  const before = Date.now();
  const id = await stack.device('skew-dev-1', 'pki-signature').onboard();
  const notBefore = Date.parse(new X509Certificate(id.certificate).validFrom);
  const tolerated = resolveGatewayConfig({ dataDir: stack.dir }, {}).maxClockSkewMs;
  // A gateway clock slow by the whole tolerance still sees the new certificate as valid.
  assert.ok(notBefore < before - tolerated, `notBefore ${new Date(notBefore).toISOString()} must precede issuance by more than ${tolerated} ms`);
});

test('a gateway clock out of tolerance makes /readyz 503 at the next authority answer', async (t) => {
  const stack = await startStack(t);
  const port = stack.gateway.httpPort;
  await until(async () => (await readyz(port)).status === 200, WAIT, 'gateway ready');
  const realNow = Date.now;
  // The gateway's clock runs 6 minutes slow (tolerance 5); the authority's Date header is
  // written by node's HTTP server from its own (unpatched) clock.
  Date.now = () => realNow() - 6 * 60_000;
  try {
    await stack.gateway.revocations.refresh();
    const r = await readyz(port);
    assert.equal(r.status, 503);
    assert.equal(r.body.checks.clockInSync, false);
    assert.ok((await metric(port, 'leafgate_gateway_clock_skew_seconds')) <= -300);
  } finally {
    Date.now = realNow;
  }
  await stack.gateway.revocations.refresh();
  assert.equal((await readyz(port)).status, 200);
});

test('outbox backlog and the age of its oldest entry are metrics', async (t) => {
  const stack = await startStack(t);
  const port = stack.gateway.httpPort;
  assert.equal(await metric(port, 'leafgate_gateway_outbox_queued'), 0);
  await stack.stopAuthority();
  const created = Date.now() - 30_000;
  await stack.gateway.outbox.accept('backlog-dev', 'r-1', 'csr', { requestId: 'r-1', csr: 'x', deviceId: 'backlog-dev' }, created);
  await stack.gateway.outbox.accept('backlog-dev', 'r-2', 'csr', { requestId: 'r-2', csr: 'y', deviceId: 'backlog-dev' }, Date.now());
  assert.equal(await metric(port, 'leafgate_gateway_outbox_queued'), 2);
  assert.ok((await metric(port, 'leafgate_gateway_outbox_oldest_age_seconds')) >= 30);
});

function canMountTmpfs(dir: string): boolean {
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', dir], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

test('a full disk under the outbox: gateway_unavailable with retryAfterMs, /readyz 503, then the same request completes', async (t) => {
  const stack = await startStack(t);
  const mnt = mkdtempSync(join(tmpdir(), 'leafgate-tmpfs-'));
  if (!canMountTmpfs(mnt)) {
    rmSync(mnt, { recursive: true, force: true });
    t.skip('mount -t tmpfs is not permitted here');
    return;
  }
  let gw: RunningGateway | undefined;
  t.after(async () => {
    await gw?.close();
    execFileSync('umount', [mnt], { stdio: 'ignore' });
    rmSync(mnt, { recursive: true, force: true });
  });
  // The enrolled gateway's identity on a 4 MiB tmpfs; its outbox is created there.
  const src = join(stack.dir, 'gateway');
  await stack.gateway.close();
  for (const f of readdirSync(src)) if (!f.startsWith('outbox.db')) cpSync(join(src, f), join(mnt, f), { recursive: true });
  gw = await startGateway(resolveGatewayConfig({ dataDir: mnt, listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 } }, {}), { logger });
  await until(async () => (await readyz(gw.httpPort)).status === 200, WAIT, 'gateway on tmpfs ready');

  // Fill the file system.
  const filler = join(mnt, 'filler');
  const fd = openSync(filler, 'w');
  const chunk = Buffer.alloc(64 * 1024, 1);
  try {
    for (;;) writeSync(fd, chunk);
  } catch (err) {
    assert.equal((err as NodeJS.ErrnoException).code, 'ENOSPC');
  } finally {
    closeSync(fd);
  }
  const full = await readyz(gw.httpPort);
  assert.equal(full.status, 503);
  assert.equal(full.body.checks.outboxWritable, false);
  assert.equal(await metric(gw.httpPort, 'leafgate_gateway_outbox_writable'), 0);

  const state = new MemoryStateStore();
  const device = new LeafDevice({
    deviceId: 'disk-dev-1', brokerUrl: `mqtts://127.0.0.1:${gw.port}`, ca: gw.rootPem, credential: stack.credential('disk-dev-1', 'pki-signature'),
    // The classic flow: its CSR goes through the gateway's durable outbox, which is what a
    // full disk refuses (the compact flow's enroll goes to the authority without it).
    timeoutMs: 20_000, retries: 0, state, flow: 'classic',
  });
  await assert.rejects(device.onboard(), (err: unknown) => {
    assert.ok(err instanceof LeafgateError);
    assert.equal(err.code, 'gateway_unavailable');
    assert.ok((err.retryAfterMs ?? 0) > 0, 'a retry hint');
    return true;
  });
  assert.ok(state.get('onboarding'), 'the SDK keeps the refused request to re-send it');

  rmSync(filler);
  await until(async () => (await readyz(gw.httpPort)).status === 200, WAIT, 'gateway ready again once space is free');
  // The same request, re-sent on a new connection, is taken without a new authentication.
  const id = await device.onboard();
  assert.equal(state.get('onboarding'), undefined);
  const sessions = countRows(stack.dir, "SELECT COUNT(*) AS n FROM auth_sessions WHERE device_id = 'disk-dev-1'");
  assert.equal(sessions, 1, 'one authentication: the re-send needed none');
  assert.equal(countRows(stack.dir, "SELECT COUNT(*) AS n FROM certificates WHERE subject_id = 'disk-dev-1'"), 1);
  assert.ok(id.serial);
});
