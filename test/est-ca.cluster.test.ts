/**
 * Review of the EST connector with two authority nodes on one PostgreSQL database: a requestId
 * raced on both nodes (a gateway whose request timed out -- its client gives up after 15 s,
 * the EST call may take 30 s -- retries through the load balancer on the other node). Both
 * nodes pass the stored-answer check and forward the CSR: the external CA signs twice. One
 * answer is committed; the other certificate exists at the CA, for the device's key, and
 * must at least be traceable (audited with its serial) so the operator can revoke it there,
 * as the "answer lost" case is.
 */
import assert from 'node:assert/strict';
import { sign } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { resolveAuthorityConfig, startAuthority, type AuthorityConfigInput } from '../authority/index.ts';
import { challengeSigningInput, pkix } from '../protocol/index.ts';
import { TestEstServer } from './support/est-server.ts';
import { authorityRequest, gatewayIdentity } from './support/http.ts';
import { pgSchema } from './support/pg.ts';
import { csrFor, ecKey } from './support/refusals.ts';
import { logger, startStack } from './support/stack.ts';

test('two authority nodes, one requestId raced on both with an external CA: every certificate the CA signed is either the stored answer or audited with its serial', { timeout: 240_000 }, async (t) => {
  const { url } = await pgSchema(t);
  const est = await TestEstServer.start();
  t.after(() => est.close());
  const deviceIssuer = {
    type: 'est', url: est.url, serverCaFile: est.serverCaFile, caChainFile: est.chainFile, clientCertFile: est.clientCertFile, clientKeyFile: est.clientKeyFile, timeoutMs: 60_000, retryAfterSeconds: 1,
  } as AuthorityConfigInput['deviceIssuer'];
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
  const ok = (res: { status: number; text: string; body: any }, what: string) => {
    assert.equal(res.status, 200, `${what}: ${res.status} ${res.text}`);
    return res.body;
  };
  const deviceId = 'est-race-1';
  const { birthCert, factoryKey } = stack.manufacturer.issueBirthCertificate(deviceId);
  const challenge = ok(await authorityRequest(stack, '/v1/devices/register', { body: { deviceId, requestId: 'reg-1', method: 'pki-signature', birthCert }, identity }), 'register');
  const signature = sign('sha256', challengeSigningInput(deviceId, challenge.challengeId, challenge.nonce), factoryKey).toString('base64');
  const instruction = ok(await authorityRequest(stack, '/v1/devices/auth', { body: { deviceId, requestId: 'auth-1', challengeId: challenge.challengeId, signature }, identity }), 'auth');
  const body = { deviceId, requestId: 'csr-1', csr: csrFor(instruction, ecKey('prime256v1')) };

  // The CA answers once both nodes have asked (bounded by holdMaxMs): the race, made certain.
  est.holdAnswersUntil = 2;
  const [ra, rb] = await Promise.all([
    authorityRequest(stack, '/v1/devices/csr', { body, identity }),
    authorityRequest(onB, '/v1/devices/csr', { body, identity }),
  ]);
  const answer = ok(ra, 'csr on A');
  assert.deepEqual(ok(rb, 'csr on B'), answer, 'one answer for one requestId');
  assert.equal(est.issued.length, 2, 'both nodes forwarded the CSR: the CA signed twice');
  // Every certificate the CA made is on record: the answer, or an audit line naming its serial.
  const audit = await stack.authority.store.listAudit({ deviceId, limit: 100 });
  for (const serial of est.issued) {
    const stored = await stack.authority.store.getCertificate(serial);
    const audited = audit.some((a) => a.serial === serial || (a.detail as Record<string, unknown> | null)?.externalSerial === serial);
    assert.ok(stored || audited, `the CA's certificate ${serial} is neither stored nor audited: an orphan nobody can find to revoke`);
  }
  const orphan = audit.find((a) => (a.detail as Record<string, unknown> | null)?.est === 'discarded');
  assert.ok(orphan, 'the discarded certificate is audited');
  const orphanSerial = (orphan.detail as Record<string, unknown>).externalSerial as string;
  assert.notEqual(orphanSerial, answer.serial);
  // leafgate knows the discarded certificate: it is revoked at once (superseded) and in the
  // external-devices list the gateways enforce; the answer delivered stays active.
  assert.equal((await stack.authority.store.getCertificate(orphanSerial))?.status, 'revoked');
  assert.equal((await stack.authority.store.getCertificate(answer.serial))?.status, 'active');
  const stored = await stack.authority.store.getCrl('external-devices');
  const list = pkix.parseCrl(stored!.der, stack.authority.ca.deviceCa.certificate.publicKey);
  assert.equal(list.revoked.get(orphanSerial)?.reason, pkix.REVOCATION_REASONS.superseded);
  assert.equal(list.revoked.has(answer.serial), false);
});
