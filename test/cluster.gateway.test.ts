/**
 * A gateway cluster: two gateway processes' worth of components (brokers, plugin chains,
 * outboxes, CRL caches) sharing one real Redis. Every test uses its own key prefix, so it
 * never sees another test's state; the restart test runs its own redis-server.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { Redis } from 'ioredis';
import type { CertMessage } from '../protocol/index.ts';
import { RedisOutbox } from '../cloud-bridge/outbox-redis.ts';
import { authenticate, bootstrap, connackRefusal, csrFor, register, registerMessage, rid } from './support/mqtt.ts';
import { Inbox, closeQuietly, closed, connectOk, onboardDevice, operationalOptions, subscribeGranted, tryConnect, until } from './support/plugins-helpers.ts';
import { startStack, type Stack } from './support/stack.ts';
import { resolveGatewayConfig } from '../gateway/index.ts';
import { startTcpProxy } from './support/tcp-proxy.ts';
import { TestEstServer } from './support/est-server.ts';
import { TEST_REDIS_URL as REDIS_URL, deleteRedisKeys } from './support/redis.ts';
import { downFilter } from '../protocol/index.ts';

const prefix = () => `lgtest:${randomBytes(6).toString('hex')}:`;
const uid = (base: string) => `${base}-${randomBytes(3).toString('hex')}`;

/** Deletes a test's keys at the end, so the shared Redis does not fill up. */
function cleanUp(t: TestContext, keyPrefix: string, url = REDIS_URL): void {
  t.after(() => deleteRedisKeys(keyPrefix, url));
}

/** A stack whose gateway A and a second gateway B share one Redis prefix. */
async function cluster(t: TestContext, extra: Parameters<typeof startStack>[1] = {}, b: { authorityUrl?: string } = {}, url = REDIS_URL) {
  const keyPrefix = prefix();
  cleanUp(t, keyPrefix, url);
  const redis = { url, keyPrefix };
  const stack = await startStack(t, { ...extra, gateway: { ...extra.gateway, redis } });
  const gwB = await stack.addGateway(uid('gw-b'), { ...extra.gateway, redis }, b);
  const onB = { ...stack, brokerUrl: `mqtts://127.0.0.1:${gwB.port}` } as Stack;
  return { stack, gwB, onB, keyPrefix };
}

test('a device that sent its CSR through gateway A and reconnects to gateway B gets its certificate there', async (t) => {
  const { stack, gwB, onB } = await cluster(t);
  assert.ok(stack.gateway.cluster && gwB.cluster, 'both gateways run in cluster mode');
  const id = uid('hop');
  const dev = await bootstrap(t, stack, id);
  const instruction = await authenticate(dev, stack.credential(id, 'pki-signature'));
  // The authority is away, so the CSR stays queued in the shared outbox.
  await stack.stopAuthority();
  const requestId = rid('csr');
  const csr = csrFor(instruction);
  await dev.send('csr', { requestId, csr });
  await dev.next('pending', { requestId });
  assert.equal((await gwB.outbox.get(id, requestId))?.state, 'queued', 'gateway B sees the request accepted by A');
  await dev.end();

  // The authority back: the queued CSR is answered from the shared outbox (under the
  // authentication made on A: a new one before that would supersede it).
  await stack.startAuthorityAgain();
  await until(async () => (await gwB.outbox.get(id, requestId))?.state === 'done', 60_000, 'the queued CSR answered');
  // Back on B (a different process in production). Stored answers go only to a session that
  // proved it is the device: after authenticating there, the certificate follows.
  const back = await bootstrap(t, onB, id);
  await authenticate(back, stack.credential(id, 'pki-signature'));
  const cert = await back.next<CertMessage>('cert', { requestId, timeoutMs: 20_000 });
  const rows = await stack.authority.store.listCertificates({ subjectId: id });
  assert.deepEqual(rows.map((r) => r.serial), [cert.serial], 'exactly one certificate');

  // Asking B again with the same requestId returns the same certificate.
  await back.send('csr', { requestId, csr });
  const again = await back.next<CertMessage>('cert', { requestId });
  assert.equal(again.serial, cert.serial);
  assert.equal((await stack.authority.store.listCertificates({ subjectId: id })).length, 1);
  const audits = (await stack.authority.store.listAudit({ deviceId: id })).filter((a) => a.action === 'issue' && a.outcome === 'ok');
  assert.equal(audits.length, 1, 'one issue audit row');
});

test('a revocation that reaches gateway A cuts the device off on gateway B, whose authority link is down', async (t) => {
  // B reaches the authority only through a proxy the test cuts.
  const keyPrefix = prefix();
  cleanUp(t, keyPrefix);
  const redis = { url: REDIS_URL, keyPrefix };
  const stack = await startStack(t, { gateway: { redis } });
  const authorityUrl = new URL(stack.authority.url);
  const proxy = await startTcpProxy({ host: '127.0.0.1', port: Number(authorityUrl.port) });
  t.after(() => proxy.close());
  const gwB = await stack.addGateway(uid('gw-b'), { redis }, { authorityUrl: `https://127.0.0.1:${proxy.port}` });
  const onB = { ...stack, brokerUrl: `mqtts://127.0.0.1:${gwB.port}` } as Stack;

  const id = uid('pki-cut');
  const identity = await onboardDevice(onB, id);
  const client = await connectOk(onB, operationalOptions(identity));
  t.after(() => closeQuietly(client));
  const inbox = new Inbox(client);
  assert.deepEqual(await subscribeGranted(client, downFilter(id)), [1]);
  await until(() => stack.gateway.readiness().checks.authorityLink === true, 20_000, 'gateway A event stream');

  proxy.cut();
  await until(() => gwB.readiness().checks.authorityLink === false, 20_000, 'gateway B to lose its authority link');
  const gone = closed(client, 20_000);
  const revoked = await stack.authority.revocation.revokeSerial(identity.serial, 'keyCompromise', 'test');
  await gone;
  assert.ok(inbox.messages.some((m) => m.kind === 'revoked'), 'down/revoked reached the device before the close');
  assert.equal(gwB.revocations.crlNumber?.toString(), revoked.crlNumber, 'B holds the CRL that A received');
  assert.equal((await tryConnect(onB, operationalOptions(identity))).code, 5, 'B refuses the revoked certificate');
});

test('EST: a revocation of an externally issued certificate that reaches gateway A (external-devices list) cuts the device off on gateway B, whose authority link is down', { timeout: 180_000 }, async (t) => {
  const est = await TestEstServer.start();
  t.after(() => est.close());
  const keyPrefix = prefix();
  cleanUp(t, keyPrefix);
  const redis = { url: REDIS_URL, keyPrefix };
  const stack = await startStack(t, {
    gateway: { redis },
    authority: { deviceIssuer: { type: 'est', url: est.url, serverCaFile: est.serverCaFile, caChainFile: est.chainFile, clientCertFile: est.clientCertFile, clientKeyFile: est.clientKeyFile, timeoutMs: 20_000, retryAfterSeconds: 1 } },
  });
  const authorityUrl = new URL(stack.authority.url);
  const proxy = await startTcpProxy({ host: '127.0.0.1', port: Number(authorityUrl.port) });
  t.after(() => proxy.close());
  const gwB = await stack.addGateway(uid('gw-b'), { redis }, { authorityUrl: `https://127.0.0.1:${proxy.port}` });
  const onB = { ...stack, brokerUrl: `mqtts://127.0.0.1:${gwB.port}` } as Stack;

  const id = uid('est-cut');
  const identity = await onboardDevice(onB, id);
  const client = await connectOk(onB, operationalOptions(identity));
  t.after(() => closeQuietly(client));
  const inbox = new Inbox(client);
  assert.deepEqual(await subscribeGranted(client, downFilter(id)), [1]);
  await until(() => stack.gateway.readiness().checks.authorityLink === true, 40_000, 'gateway A event stream');

  proxy.cut();
  await until(() => gwB.readiness().checks.authorityLink === false, 40_000, 'gateway B to lose its authority link');
  const gone = closed(client, 40_000);
  const revoked = await stack.authority.revocation.revokeSerial(identity.serial, 'keyCompromise', 'test');
  await gone;
  assert.ok(inbox.messages.some((m) => m.kind === 'revoked'), 'down/revoked reached the device before the close');
  assert.equal(gwB.externalRevocations.crlNumber?.toString(), revoked.crlNumber, 'B holds the external list that A received (through Redis)');
  assert.equal((await tryConnect(onB, operationalOptions(identity), 40_000)).code, 5, 'B refuses the revoked certificate');
});

test('limits are shared: onboarding attempts of one device count on every gateway', async (t) => {
  const { stack, onB } = await cluster(t, { gateway: { rateLimits: { onboardingsPerDevice: { points: 3, durationSeconds: 3600 } } } });
  const id = uid('pki-budget');
  const cred = stack.credential(id, 'pki-signature');
  const onA = await bootstrap(t, stack, id);
  await register(onA, cred);
  await register(onA, cred);
  await onA.end();
  const b = await bootstrap(t, onB, id);
  await register(b, cred);
  const requestId = rid('reg');
  await b.send('register', registerMessage(cred, { requestId }));
  const refusal = await b.next('error');
  assert.equal(refusal.code, 'rate_limited', 'the fourth attempt, on the other gateway, is over the shared budget');
  assert.ok(Number(refusal.retryAfterMs) > 0);
});

test('a bootstrap claim on gateway B of an id held by a certified device on gateway A is refused; a dead gateway holds nothing', async (t) => {
  const { stack, onB, keyPrefix } = await cluster(t);
  const id = uid('pki-held');
  const identity = await onboardDevice(stack, id);
  const client = await connectOk(stack, operationalOptions(identity));
  t.after(() => closeQuietly(client));
  await until(async () => (await stack.gateway.cluster!.remoteHolder(id)) === undefined && (await gwPresence(keyPrefix, id)) !== null, 20_000, 'presence of the device');
  assert.equal(await connackRefusal(onB, id), 2, 'bootstrap with the id of a certified device on another gateway');
  assert.ok(client.connected, 'the certified session on A is untouched');

  // A gateway that crashed leaves its presence entry behind, but no heartbeat.
  const ghost = uid('ghost');
  const r = new Redis(REDIS_URL);
  t.after(() => r.disconnect());
  await r.hset(`${keyPrefix}presence`, ghost, 'dead-node|operational|AA:BB');
  const dev = await bootstrap(t, onB, ghost);
  assert.ok(dev, 'a bootstrap session is allowed: the holder is not alive');
});

async function gwPresence(keyPrefix: string, id: string): Promise<string | null> {
  const r = new Redis(REDIS_URL);
  try {
    return await r.hget(`${keyPrefix}presence`, id);
  } finally {
    r.disconnect();
  }
}

test('two outboxes on one Redis: a queued request is claimed by one gateway at a time, and purge drops only old answers', async (t) => {
  const keyPrefix = prefix();
  cleanUp(t, keyPrefix);
  const r = new Redis(REDIS_URL);
  t.after(() => r.disconnect());
  // Two nodes with one gateway identity (the same owner), and another gateway.
  const a = new RedisOutbox(r, keyPrefix, 'gw-1');
  const b = new RedisOutbox(r, keyPrefix, 'gw-1');
  const other = new RedisOutbox(r, keyPrefix, 'gw-2');
  const body = { csr: 'x', requestId: 'q1' };
  const first = await a.accept('dev-1', 'q1', 'csr', body, 1000);
  assert.equal(first.isNew, true);
  const repeat = await b.accept('dev-1', 'q1', 'csr', body, 1001);
  assert.equal(repeat.isNew, false);
  assert.equal(repeat.entry.seq, first.entry.seq);
  await assert.rejects(b.accept('dev-1', 'q1', 'csr', { csr: 'y', requestId: 'q1' }, 1002), { code: 'request_conflict' });

  assert.deepEqual(await other.due(2000, 10, 60_000), [], 'only the accepting gateway sends it');
  assert.equal((await other.get('dev-1', 'q1'))?.state, 'queued', 'but every gateway reads it');
  const claimedByA = await a.due(2000, 10, 60_000);
  assert.deepEqual(claimedByA.map((e) => e.requestId), ['q1']);
  assert.deepEqual(await b.due(2000, 10, 60_000), [], 'leased to A');
  assert.deepEqual((await b.due(70_000, 10, 60_000)).map((e) => e.requestId), ['q1'], 'due again once the lease ran out (A died)');

  assert.equal(await b.finish(first.entry.seq, 'done', { serial: 'AA' }, 3000), true);
  assert.equal(await a.finish(first.entry.seq, 'done', { serial: 'BB' }, 3001), false, 'an answer is final once');
  assert.equal(await a.pendingCount(), 0);
  assert.deepEqual((await a.undelivered('dev-1')).map((e) => e.response), [{ serial: 'AA' }]);
  await a.markDelivered(first.entry.seq, 3002);
  assert.deepEqual(await a.undelivered('dev-1'), []);

  assert.deepEqual(await a.backlog(), { count: 0, oldestCreatedAt: null }, 'nothing queued: no age');
  await a.accept('dev-2', 'q2', 'csr', { csr: 'z' }, 4000);
  await a.accept('dev-3', 'q3', 'csr', { csr: 'w' }, 4500);
  await a.reschedule((await a.get('dev-2', 'q2'))!.seq, 9000);
  assert.deepEqual(await a.backlog(), { count: 2, oldestCreatedAt: 4000 }, 'the oldest by creation, not by next attempt');
  assert.deepEqual(await other.backlog(), { count: 0, oldestCreatedAt: null }, 'per gateway');
  await a.finish((await a.get('dev-2', 'q2'))!.seq, 'done', { serial: 'CC' }, 5000);
  assert.deepEqual(await a.backlog(), { count: 1, oldestCreatedAt: 4500 });
  assert.equal(await a.purge(3500), 1);
  assert.equal(await a.get('dev-1', 'q1'), null);
  assert.equal((await a.get('dev-3', 'q3'))?.state, 'queued', 'queued work is never purged');
  assert.equal((await a.get('dev-2', 'q2'))?.state, 'done', 'an answer newer than the cut stays');
});

/**
 * A private redis-server on a unix socket in a fresh directory: no TCP port is chosen and
 * then bound (another process could take it in between), and a restart comes back on the
 * very same address. The gateways reach it as redis://localhost/?path=<socket> (ioredis
 * takes options from the query).
 */
function privateRedisSocket(t: TestContext): { socket: string; url: string } {
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-redis-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const socket = join(dir, 'redis.sock');
  return { socket, url: `redis://localhost/?path=${encodeURIComponent(socket)}` };
}

async function startRedis(socket: string): Promise<ChildProcess> {
  const proc = spawn('redis-server', ['--port', '0', '--unixsocket', socket, '--unixsocketperm', '700', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
  const probe = new Redis({ path: socket, retryStrategy: () => 50 });
  probe.on('error', () => undefined);
  await until(async () => (await probe.ping().catch(() => '')) === 'PONG', 20_000, `redis-server on ${socket}`);
  probe.disconnect();
  return proc;
}

async function stopRedis(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null) return;
  proc.kill('SIGKILL');
  await once(proc, 'exit');
}

test('Redis restarted in the middle of onboarding: a CSR is refused with gateway_unavailable, then completes once, and certified devices reconnect', async (t) => {
  const { socket, url } = privateRedisSocket(t);
  let redisProc = await startRedis(socket);
  t.after(() => stopRedis(redisProc));
  const { stack, gwB, onB } = await cluster(t, {}, {}, url);
  const certified = await onboardDevice(onB, uid('pki-steady'));
  const id = uid('pki-mid');
  const dev = await bootstrap(t, stack, id);
  const instruction = await authenticate(dev, stack.credential(id, 'pki-signature'));

  await stopRedis(redisProc);
  await until(() => stack.gateway.cluster!.connected === false, 10_000, 'gateway A to see Redis down');
  const requestId = rid('csr');
  const csr = csrFor(instruction);
  await dev.send('csr', { requestId, csr });
  const refusal = await dev.next('error', { requestId });
  assert.equal(refusal.code, 'gateway_unavailable');
  assert.ok(Number(refusal.retryAfterMs) > 0, 'the refusal says when to retry');

  redisProc = await startRedis(socket);
  await until(() => stack.gateway.cluster!.connected && gwB.cluster!.connected, 15_000, 'both gateways to reconnect to Redis');
  await dev.send('csr', { requestId, csr });
  const cert = await dev.next<CertMessage>('cert', { requestId, timeoutMs: 20_000 });
  assert.deepEqual((await stack.authority.store.listCertificates({ subjectId: id })).map((r) => r.serial), [cert.serial]);

  // A device with a certificate connects again after the outage, on either gateway.
  for (const target of [stack, onB]) {
    const c = await connectOk(target, operationalOptions(certified));
    await closeQuietly(c);
  }
});

test('a gateway configured for a Redis that is not there fails to start with a clear message', async (t) => {
  // A socket path nothing listens on: no port that something else might take meanwhile.
  const { url } = privateRedisSocket(t);
  const stack = await startStack(t);
  await assert.rejects(
    stack.addGateway(uid('gw-nored'), { redis: { url, keyPrefix: prefix(), startTimeoutMs: 1500 } }),
    (err: Error) => /Redis at redis:\/\/localhost\/\?path=\S+ did not answer within 1500 ms/.test(err.message),
  );
});

test('a CRL planted in Redis that the device CA did not sign is refused; garbage announcements are ignored', async (t) => {
  const { stack, gwB, keyPrefix } = await cluster(t);
  const id = uid('pki-kept');
  const identity = await onboardDevice(stack, id);
  const client = await connectOk(stack, operationalOptions(identity));
  t.after(() => closeQuietly(client));
  const before = stack.gateway.revocations.crlNumber;
  const r = new Redis(REDIS_URL);
  t.after(() => r.disconnect());
  // A hostile writer on Redis: bytes that are no CRL, then an announcement far ahead, then junk.
  const refusedA = stack.gateway.revocations.refusedCount;
  const refusedB = gwB.revocations.refusedCount;
  await r.hset(`${keyPrefix}crl`, 'number', '999999', 'der', Buffer.from('30820100deadbeef', 'hex'));
  // Junk first: each gateway handles its announcements in order, so once the planted CRL
  // has been refused (below) the junk before it was handled too.
  await r.publish(`${keyPrefix}crl`, 'not-a-number');
  await r.publish(`${keyPrefix}crl`, '999999');
  await until(() => stack.gateway.revocations.refusedCount > refusedA && gwB.revocations.refusedCount > refusedB, 20_000, 'both gateways refusing the planted CRL');
  assert.equal(stack.gateway.revocations.crlNumber, before, 'gateway A keeps its verified CRL');
  assert.equal(gwB.revocations.crlNumber, before, 'gateway B too');
  assert.ok(client.connected, 'the certified session is untouched');
  assert.equal((await tryConnect(stack, operationalOptions(identity))).code, 0, 'and its certificate still logs in');
});

test('gateway config: a Redis URL of another scheme or a hostile key prefix is refused at start', () => {
  assert.throws(() => resolveGatewayConfig({ redis: { url: 'ftp://127.0.0.1:6379' } }, {}), /redis\.url \(env LEAFGATE_REDIS_URL\): must be a redis:\/\/ or rediss:\/\/ URL/);
  assert.throws(() => resolveGatewayConfig({ redis: { url: 'not a url' } }, {}), /redis\.url .*must be a redis:\/\/ or rediss:\/\/ URL/);
  assert.throws(() => resolveGatewayConfig({ redis: { url: REDIS_URL, keyPrefix: 'a b*' } }, {}), /redis\.keyPrefix .*must be 1-64 characters/);
  assert.throws(() => resolveGatewayConfig({ redis: { url: REDIS_URL, keyPrefix: 'x'.repeat(65) } }, {}), /redis\.keyPrefix .*must be 1-64 characters/);
  assert.deepEqual(resolveGatewayConfig({}, { LEAFGATE_REDIS_URL: REDIS_URL }).redis, { url: REDIS_URL, keyPrefix: 'leafgate:', startTimeoutMs: 10_000 });
  assert.equal(resolveGatewayConfig({}, {}).redis, undefined, 'embedded by default');
});
