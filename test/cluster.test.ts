/**
 * Two authority nodes on one PostgreSQL database (a real server, one random schema per
 * test), each a real in-process authority with its own HTTPS port, as behind a TCP load
 * balancer: they share one CA; serials never repeat; a requestId repeated or raced on the
 * other node yields the one certificate; a revocation on one node is in the other's CRL and
 * reaches the gateways whose event stream is on the other; a database outage is a clear
 * error (start-up message, 503 with a body, a log line), never a crash.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { sign, X509Certificate } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { test, type TestContext } from 'node:test';
import pino from 'pino';
import { resolveAuthorityConfig, startAuthority, type AuthorityConfigInput, type RunningAuthority } from '../authority/index.ts';
import { challengeSigningInput, downFilter } from '../protocol/index.ts';
import { authorityRequest, gatewayIdentity, type HttpAnswer } from './support/http.ts';
import { pgSchema } from './support/pg.ts';
import { Inbox, closeQuietly, closed, connectOk, httpGet, onboardDevice, operationalOptions, subscribeGranted } from './support/plugins-helpers.ts';
import { csrFor, ecKey } from './support/refusals.ts';
import { logger, startStack, type Stack } from './support/stack.ts';
import { until } from './support/wait.ts';

const PASSPHRASE = 'test-passphrase-0123456789';
const ADMIN = 'cluster-admin-token-0123456789';

/** Node A with a gateway enrolled on it (the test stack), plus node B on the same database. */
async function cluster(t: TestContext, url: string): Promise<{ stack: Stack; a: RunningAuthority; b: RunningAuthority; onB: Stack }> {
  const stack = await startStack(null, { authority: { database: url, adminToken: ADMIN } });
  let b: RunningAuthority;
  try {
    b = await startNode(stack, url);
  } catch (err) {
    await stack.close();
    throw err;
  }
  t.after(async () => {
    await b.close();
    await stack.close();
  });
  // The same gateway, talking to node B: what a load balancer in front of both would do.
  return { stack, a: stack.authority, b, onB: { ...stack, authority: b } };
}

function nodeConfig(stack: Pick<Stack, 'manufacturer'>, url: string, extra: AuthorityConfigInput = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-node-'));
  const config = resolveAuthorityConfig({
    dataDir: dir, caPassphrase: PASSPHRASE, listen: { host: '127.0.0.1', port: 0 }, database: url, adminToken: ADMIN,
    policies: { default: { pkiSignature: { manufacturerCAs: [stack.manufacturer.pem], deviceIdFrom: 'CN' }, ddkg: { enrollment: 'allow-list', allowList: ['ddkg-*'] } } },
    ...extra,
  }, {});
  return { config, dir };
}

async function startNode(stack: Pick<Stack, 'manufacturer'>, url: string, opts: { logger?: pino.Logger } = {}): Promise<RunningAuthority> {
  const { config, dir } = nodeConfig(stack, url);
  const node = await startAuthority(config, { logger: opts.logger ?? logger });
  const close = node.close.bind(node);
  node.close = async () => {
    await close();
    rmSync(dir, { recursive: true, force: true });
  };
  return node;
}

function ok(res: HttpAnswer, what: string): any {
  assert.equal(res.status, 200, `${what}: ${res.status} ${res.text}`);
  return res.body;
}

/** register on `r`, auth on `a`, then the CSR body to send (on whichever node). */
async function authenticate(stack: Stack, r: Stack, a: Stack, deviceId: string): Promise<{ requestId: string; csr: string }> {
  const identity = gatewayIdentity(stack);
  const { birthCert, factoryKey } = stack.manufacturer.issueBirthCertificate(deviceId);
  const challenge = ok(await authorityRequest(r, '/v1/devices/register', { body: { deviceId, requestId: `reg-${deviceId}`, method: 'pki-signature', birthCert }, identity }), 'register');
  const signature = sign('sha256', challengeSigningInput(deviceId, challenge.challengeId, challenge.nonce), factoryKey).toString('base64');
  const instruction = ok(await authorityRequest(a, '/v1/devices/auth', { body: { deviceId, requestId: `auth-${deviceId}`, challengeId: challenge.challengeId, signature }, identity }), 'auth');
  return { requestId: `csr-${deviceId}`, csr: csrFor(instruction, ecKey('prime256v1')) };
}

const csrRequest = (node: Stack, stack: Stack, deviceId: string, body: { requestId: string; csr: string }) =>
  authorityRequest(node, '/v1/devices/csr', { body: { deviceId, ...body }, identity: gatewayIdentity(stack) });

test('two nodes on one database: one shared CA, distinct serials across nodes, a requestId repeated or raced on both yields one certificate', { timeout: 120_000 }, async (t) => {
  const { url, schema, admin } = await pgSchema(t);
  const { stack, a, b, onB } = await cluster(t, url);

  // One CA for both, stored once (insert-if-absent); both serve the same chain.
  assert.equal(a.rootFingerprint, b.rootFingerprint);
  assert.equal(a.ca.deviceCa.pem, b.ca.deviceCa.pem);
  assert.equal(a.ca.infraCa.pem, b.ca.infraCa.pem);
  assert.equal((await admin.query(`SELECT count(*)::int AS n FROM "${schema}".ca_material`)).rows[0].n, 3);
  const deviceCa = new X509Certificate(a.ca.deviceCa.pem);

  // Many issuances, each flow spread over both nodes (register, auth and CSR on different ones).
  const n = 30;
  const serials: string[] = [];
  let next = 0;
  const worker = async () => {
    while (next < n) {
      const i = next++;
      const id = `pki-many-${i}`;
      const [r, au, c] = i % 2 ? [stack, onB, stack] : [onB, stack, onB];
      const body = await authenticate(stack, r, au, id);
      const cert = ok(await csrRequest(c, stack, id, body), 'csr');
      assert.ok(new X509Certificate(cert.certificate).verify(deviceCa.publicKey), 'signed by the shared device CA');
      serials.push(cert.serial);
    }
  };
  await Promise.all(Array.from({ length: 6 }, worker));
  assert.equal(serials.length, n);
  assert.equal(new Set(serials).size, n, 'no serial twice');
  const stored = await b.store.listCertificates({ kind: 'device', limit: 1000 });
  assert.deepEqual(stored.map((c) => c.serial).sort(), [...serials].sort());

  // A requestId answered by A, repeated to B (a gateway retrying through the balancer): A's certificate.
  const rep = await authenticate(stack, stack, stack, 'pki-repeat');
  const first = ok(await csrRequest(stack, stack, 'pki-repeat', rep), 'csr on A');
  const again = ok(await csrRequest(onB, stack, 'pki-repeat', rep), 'csr repeated on B');
  assert.deepEqual(again, first);
  assert.equal((await a.store.listCertificates({ subjectId: 'pki-repeat' })).length, 1);

  // The same CSR request sent to both nodes at once: both answer with the one certificate,
  // and exactly one certificate row and one issue audit row exist.
  for (let i = 0; i < 4; i++) {
    const id = `pki-race-${i}`;
    const body = await authenticate(stack, stack, onB, id);
    const [ra, rb] = await Promise.all([csrRequest(stack, stack, id, body), csrRequest(onB, stack, id, body)]);
    assert.deepEqual(ok(ra, 'race on A'), ok(rb, 'race on B'));
    assert.equal((await a.store.listCertificates({ subjectId: id })).length, 1, `${id}: one certificate`);
    const issues = (await b.store.listAudit({ deviceId: id })).filter((r) => r.action === 'issue');
    assert.equal(issues.length, 1, `${id}: one issue audit row`);
    assert.equal(issues[0].serial, ra.body.serial);
  }
});

test('a revocation on node B is in node A\'s CRL and reaches the gateway whose event stream is on A', { timeout: 60_000 }, async (t) => {
  const { url } = await pgSchema(t);
  const { stack, a, b, onB } = await cluster(t, url);
  const id = 'pki-cluster-revoked';
  const identity = await onboardDevice(stack, id);
  const client = await connectOk(stack, operationalOptions(identity));
  t.after(() => closeQuietly(client));
  const inbox = new Inbox(client);
  assert.deepEqual(await subscribeGranted(client, downFilter(id)), [1]);
  await until(() => stack.gateway.readiness().checks.authorityLink === true, 5000, 'the gateway event stream on A');
  const before = a.revocation.crl().crlNumber;

  // Revoked through B's admin API: B's gateways are none; the gateway is connected to A.
  const gone = closed(client, 10_000);
  const res = await authorityRequest(onB, '/admin/v1/revoke', { body: { serial: identity.serial, reason: 'keyCompromise' }, headers: { authorization: `Bearer ${ADMIN}` } });
  assert.equal(res.status, 200, res.text);
  const crlNumber = BigInt(res.body[0].crlNumber);
  assert.ok(crlNumber > before);

  // A learned it (NOTIFY, then the CRL re-read from the store) and pushed it to its gateway,
  // which fetched A's CRL, told the device and closed its session.
  await gone;
  assert.ok(inbox.messages.some((m) => m.kind === 'revoked'), 'down/revoked delivered');
  assert.equal(a.revocation.crl().crlNumber, crlNumber);
  const crl = await httpGet(`${a.url}/v1/crl.pem`, stack.rootPem);
  assert.equal(crl.status, 200);
  assert.equal(String(crl.headers['x-crl-number']), crlNumber.toString());
  assert.equal(stack.gateway.revocations.crlNumber, crlNumber);
  assert.equal(stack.gateway.revocations.isRevoked(identity.serial), true);
  assert.equal(b.revocation.crl().crlNumber, crlNumber);
});
