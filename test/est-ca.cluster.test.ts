/**
 * One requestId, one CSR at the external CA (EST has no idempotency key). A gateway whose
 * request to the authority timed out retries the same requestId, possibly through the load
 * balancer on another authority node, while the first request may still be with the CA. Before
 * a CSR is forwarded the authority takes a claim on (device, requestId) in the store; whoever
 * finds it live -- another node, or another request on the same node -- answers
 * `authority_unavailable` with retryAfterMs at once, and the retry gets the stored answer.
 *
 * - two nodes on one PostgreSQL database, the requestId raced on both: one CSR reaches the CA;
 * - one node on SQLite, the requestId repeated while the first is with the CA: the repeat is
 *   answered at once (not queued behind it), one CSR; a crashed node's claim holds the request
 *   until it expires, then the request goes on;
 * - the answer deadline (deviceIssuer.answerWithinMs, below the gateway's request timeout): a CA
 *   that has not answered yet makes the authority answer authority_unavailable in time, and the
 *   certificate that comes later is kept for the requestId.
 */
import assert from 'node:assert/strict';
import { sign } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { resolveAuthorityConfig, startAuthority, type AuthorityConfigInput } from '../authority/index.ts';
import type { SqlStore } from '../authority/store/index.ts';
import { GATEWAY_AUTHORITY_TIMEOUT_MS, challengeSigningInput } from '../protocol/index.ts';
import { TestEstServer } from './support/est-server.ts';
import { authorityRequest, gatewayIdentity, type HttpAnswer } from './support/http.ts';
import { pgSchema } from './support/pg.ts';
import { csrFor, ecKey } from './support/refusals.ts';
import { logger, startStack, type Stack } from './support/stack.ts';

type Answer = HttpAnswer & { body: any };

function estIssuer(est: TestEstServer, extra: Record<string, unknown> = {}): AuthorityConfigInput['deviceIssuer'] {
  return {
    type: 'est', url: est.url, serverCaFile: est.serverCaFile, caChainFile: est.chainFile, clientCertFile: est.clientCertFile, clientKeyFile: est.clientKeyFile, timeoutMs: 60_000, retryAfterSeconds: 1, ...extra,
  } as AuthorityConfigInput['deviceIssuer'];
}

async function startEst(t: TestContext): Promise<TestEstServer> {
  const est = await TestEstServer.start();
  // Held answers wait for the test, never for a timer (bounded for a stuck test only).
  est.holdMaxMs = 120_000;
  t.after(() => est.close());
  return est;
}

const ok = (res: Answer, what: string) => {
  assert.equal(res.status, 200, `${what}: ${res.status} ${res.text}`);
  return res.body;
};

/** Registers and authenticates `deviceId` (classic flow); the csr body for requestId `csr-1`. */
async function authenticated(stack: Stack, deviceId: string): Promise<{ deviceId: string; requestId: string; csr: string }> {
  const identity = gatewayIdentity(stack);
  const { birthCert, factoryKey } = stack.manufacturer.issueBirthCertificate(deviceId);
  const challenge = ok(await authorityRequest(stack, '/v1/devices/register', { body: { deviceId, requestId: 'reg-1', method: 'pki-signature', birthCert }, identity }), 'register');
  const signature = sign('sha256', challengeSigningInput(deviceId, challenge.challengeId, challenge.nonce), factoryKey).toString('base64');
  const instruction = ok(await authorityRequest(stack, '/v1/devices/auth', { body: { deviceId, requestId: 'auth-1', challengeId: challenge.challengeId, signature }, identity }), 'auth');
  return { deviceId, requestId: 'csr-1', csr: csrFor(instruction, ecKey('prime256v1')) };
}

function assertClaimed(res: Answer, what: string): void {
  assert.equal(res.status, 503, `${what}: ${res.status} ${res.text}`);
  assert.equal(res.body.code, 'authority_unavailable', what);
  assert.match(res.body.message, /is with the external CA already/, `${what}: answered because of the claim, not after waiting`);
  assert.equal(typeof res.body.retryAfterMs, 'number', what);
  assert.ok(res.body.retryAfterMs >= 1000, what);
}

test('two authority nodes, one requestId raced on both with an external CA: exactly one CSR reaches the CA; the other node answers authority_unavailable with retryAfterMs, and the retry there gets the one certificate', { timeout: 240_000 }, async (t) => {
  const { url } = await pgSchema(t);
  const est = await startEst(t);
  const deviceIssuer = estIssuer(est, { answerWithinMs: 14_000 });
  const stack = await startStack(null, { authority: { database: url, deviceIssuer } });
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-node-'));
  let b;
  try {
    b = await startAuthority(resolveAuthorityConfig({
      dataDir: dir, caPassphrase: 'test-passphrase-0123456789', listen: { host: '127.0.0.1', port: 0 }, database: url, deviceIssuer,
      policies: { default: { pkiSignature: { manufacturerCAs: [stack.manufacturer.pem], deviceIdFrom: 'CN' } } },
    }, {}), { logger });
  } catch (err) {
    await stack.close();
    throw err;
  }
  t.after(async () => {
    await b.close();
    await stack.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const onB = { ...stack, authority: b };
  const identity = gatewayIdentity(stack);
  const body = await authenticated(stack, 'est-race-1');

  // The CA holds its answer until the test releases it: the first CSR is certainly still
  // there when the other node gets the same requestId.
  est.holdAnswersUntil = 99;
  const onA = authorityRequest(stack, '/v1/devices/csr', { body, identity }).then((r) => ({ node: 'A' as const, r: r as Answer }));
  const onBp = authorityRequest(onB, '/v1/devices/csr', { body, identity }).then((r) => ({ node: 'B' as const, r: r as Answer }));
  await est.waitForIssued(1);
  const first = await Promise.race([onA, onBp]);
  assertClaimed(first.r, `the node without the claim (${first.node})`);
  assert.equal(est.enrollments().length, 1, 'one CSR at the CA');
  est.releaseHeld();
  const holder = await (first.node === 'A' ? onBp : onA);
  const answer = ok(holder.r, `csr on the claiming node (${holder.node})`);
  // The gateway retries on the node that said "later": the stored answer, nothing sent.
  const retry = ok(await authorityRequest(first.node === 'A' ? stack : onB, '/v1/devices/csr', { body, identity }) as Answer, 'the retry');
  assert.deepEqual(retry, answer, 'one answer for one requestId');
  assert.equal(est.enrollments().length, 1, 'the CA got exactly one CSR for the requestId');
  assert.deepEqual(est.issued, [answer.serial], 'and signed exactly the one certificate that was delivered');
  assert.equal(await stack.authority.store.getExternalClaim(body.deviceId, body.requestId), null, 'the claim is released once the answer is committed');
  const audit = await stack.authority.store.listAudit({ deviceId: body.deviceId, limit: 100 });
  assert.ok(!audit.some((a) => (a.detail as Record<string, unknown> | null)?.est === 'discarded'), 'no certificate discarded: none was made twice');
  assert.ok(audit.some((a) => a.code === 'authority_unavailable' && (a.detail as Record<string, unknown> | null)?.est === 'claimed'), 'the claimed answer is audited');
});

test('one node (SQLite): a repeat of a requestId whose CSR is with the external CA is answered authority_unavailable at once and sends nothing; a crashed node\'s claim holds the request until it expires', { timeout: 240_000 }, async (t) => {
  const est = await startEst(t);
  const stack = await startStack(t, { authority: { deviceIssuer: estIssuer(est, { answerWithinMs: 14_000 }) } });
  const identity = gatewayIdentity(stack);
  const body = await authenticated(stack, 'est-race-2');
  est.holdAnswersUntil = 99;
  const first = authorityRequest(stack, '/v1/devices/csr', { body, identity }) as Promise<Answer>;
  await est.waitForIssued(1);
  const started = Date.now();
  const repeats = await Promise.all([1, 2].map(() => authorityRequest(stack, '/v1/devices/csr', { body, identity }) as Promise<Answer>));
  for (const r of repeats) assertClaimed(r, 'a repeat on the same node');
  // Not queued behind the first (which the CA holds): answered well before the gateway gives up.
  assert.ok(Date.now() - started < GATEWAY_AUTHORITY_TIMEOUT_MS, `repeats answered after ${Date.now() - started} ms`);
  assert.equal(est.enrollments().length, 1);
  est.releaseHeld();
  const answer = ok(await first, 'the first');
  assert.deepEqual(ok(await authorityRequest(stack, '/v1/devices/csr', { body, identity }) as Answer, 'the retry'), answer);
  assert.equal(est.enrollments().length, 1, 'one CSR for the requestId');

  // A node that crashed while its CSR was with the CA leaves its claim: the request waits
  // (authority_unavailable) until the claim expires, then goes on; it is never stuck for good.
  const other = await authenticated(stack, 'est-race-3');
  const store = stack.authority.store;
  assert.equal(await store.claimExternalRequest({ deviceId: other.deviceId, requestId: other.requestId, node: 'crashed-node', claimedAt: Date.now(), expiresAt: Date.now() + 3_600_000 }), true);
  const held = await authorityRequest(stack, '/v1/devices/csr', { body: other, identity }) as Answer;
  assertClaimed(held, 'a request claimed by a crashed node');
  assert.match(held.body.message, /crashed-node/);
  assert.equal(est.enrollments().length, 1, 'nothing sent while the claim lives');
  await (store as SqlStore).db.run('UPDATE external_claims SET expires_at = ? WHERE device_id = ? AND request_id = ?', [Date.now() - 1, other.deviceId, other.requestId]);
  ok(await authorityRequest(stack, '/v1/devices/csr', { body: other, identity }) as Answer, 'once the crashed node\'s claim expired');
  assert.equal(est.enrollments().length, 2);
  assert.equal(await store.getExternalClaim(other.deviceId, other.requestId), null);
});

test('answer deadline: the external CA has not answered within deviceIssuer.answerWithinMs, so the authority answers authority_unavailable with retryAfterMs before the gateway gives up; the certificate that arrives later is the retry\'s answer, one CSR in all', { timeout: 240_000 }, async (t) => {
  const est = await startEst(t);
  const answerWithinMs = 2000;
  const stack = await startStack(t, { authority: { deviceIssuer: estIssuer(est, { answerWithinMs }) } });
  const identity = gatewayIdentity(stack);
  const body = await authenticated(stack, 'est-slow-1');
  est.holdAnswersUntil = 99;
  const started = Date.now();
  const late = await authorityRequest(stack, '/v1/devices/csr', { body, identity }) as Answer;
  const took = Date.now() - started;
  assert.equal(late.status, 503, late.text);
  assert.equal(late.body.code, 'authority_unavailable');
  assert.match(late.body.message, /has not answered within 2000 ms/);
  assert.equal(late.body.retryAfterMs, 1000);
  assert.ok(took >= answerWithinMs && took < GATEWAY_AUTHORITY_TIMEOUT_MS, `answered after ${took} ms`);
  assert.equal(est.enrollments().length, 1);
  // The call goes on (its claim too): a retry now is told to wait, nothing is sent again.
  assertClaimed(await authorityRequest(stack, '/v1/devices/csr', { body, identity }) as Answer, 'a retry while the CA still holds it');
  est.releaseHeld();
  // The gateway retries after retryAfterMs until the answer is there; here: once it is stored.
  const store = stack.authority.store;
  const until = Date.now() + 60_000;
  while (!(await store.getRequest(body.deviceId, body.requestId)) && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
  const answer = ok(await authorityRequest(stack, '/v1/devices/csr', { body, identity }) as Answer, 'the retry');
  assert.equal(answer.serial, est.issued[0]);
  assert.equal(est.enrollments().length, 1, 'one CSR in all');
  assert.equal(await store.getExternalClaim(body.deviceId, body.requestId), null);
});

test('a ca_refused answer is stored for its requestId: the repeat gets the same refusal and the CSR does not go to the CA again; a new requestId is a new request', { timeout: 240_000 }, async (t) => {
  const est = await startEst(t);
  const stack = await startStack(t, { authority: { deviceIssuer: estIssuer(est) } });
  const identity = gatewayIdentity(stack);
  const body = await authenticated(stack, 'est-refused-1');
  est.mode = { kind: 'refuse', status: 403, text: 'template denies this subject' };
  const first = await authorityRequest(stack, '/v1/devices/csr', { body, identity }) as Answer;
  assert.equal(first.body.code, 'ca_refused', first.text);
  assert.match(first.body.message, /HTTP 403: template denies this subject/);
  est.mode = { kind: 'issue' };
  for (let i = 0; i < 2; i++) {
    const again = await authorityRequest(stack, '/v1/devices/csr', { body, identity }) as Answer;
    assert.equal(again.status, first.status);
    assert.deepEqual({ code: again.body.code, message: again.body.message }, { code: first.body.code, message: first.body.message });
  }
  assert.equal(est.enrollments().length, 1, 'the refused CSR went to the CA once');
  const audit = await stack.authority.store.listAudit({ deviceId: body.deviceId, limit: 50 });
  const refusals = audit.filter((a) => a.code === 'ca_refused');
  assert.equal(refusals.filter((a) => (a.detail as Record<string, unknown>).answerStored === true).length, 1, 'one audit line with the stored answer');
  assert.equal(refusals.filter((a) => (a.detail as Record<string, unknown>).storedAnswer === true).length, 2, 'each repeat audited as answered from the store');
  assert.equal(await stack.authority.store.getExternalClaim(body.deviceId, body.requestId), null);
  // Another requestId is another request: asked again (the CA signs now).
  const issued = ok(await authorityRequest(stack, '/v1/devices/csr', { body: { ...body, requestId: 'csr-2' }, identity }) as Answer, 'a new requestId');
  assert.equal(issued.serial, est.issued[0]);
  assert.equal(est.enrollments().length, 2);
});
