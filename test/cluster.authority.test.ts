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
import { listMigrations } from '../authority/store/index.ts';
import { ManufacturerCa } from '../device/index.ts';
import { resolveAuthorityConfig, startAuthority, type AuthorityConfigInput, type DevicePolicy, type RunningAuthority } from '../authority/index.ts';
import { challengeSigningInput, downFilter } from '../protocol/index.ts';
import { authorityRequest, gatewayIdentity, rawHttps, type HttpAnswer } from './support/http.ts';
import { pgSchema } from './support/pg.ts';
import { Inbox, closeQuietly, closed, connectOk, httpGet, onboardDevice, operationalOptions, subscribeGranted } from './support/plugins-helpers.ts';
import { csrFor, ecKey } from './support/refusals.ts';
import { logger, startStack, type Stack } from './support/stack.ts';
import { until } from './support/wait.ts';

const PASSPHRASE = 'test-passphrase-0123456789';
const ADMIN = 'cluster-admin-token-0123456789';

/** Node A with a gateway enrolled on it (the test stack), plus node B on the same database. */
async function cluster(t: TestContext, url: string, policy: Partial<DevicePolicy> = {}): Promise<{ stack: Stack; a: RunningAuthority; b: RunningAuthority; onB: Stack }> {
  const stack = await startStack(null, { authority: { database: url, adminToken: ADMIN }, policy });
  let b: RunningAuthority;
  try {
    b = await startNode(stack, url, { policy });
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

function nodeConfig(stack: Pick<Stack, 'manufacturer'>, url: string, policy: Partial<DevicePolicy> = {}, extra: AuthorityConfigInput = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-node-'));
  const config = resolveAuthorityConfig({
    dataDir: dir, caPassphrase: PASSPHRASE, listen: { host: '127.0.0.1', port: 0 }, database: url, adminToken: ADMIN,
    policies: { default: { ...policy, pkiSignature: { manufacturerCAs: [stack.manufacturer.pem], deviceIdFrom: 'CN' }, ddkg: { enrollment: 'allow-list', allowList: ['ddkg-*'] } } },
    ...extra,
  }, {});
  return { config, dir };
}

async function startNode(stack: Pick<Stack, 'manufacturer'>, url: string, opts: { logger?: pino.Logger; policy?: Partial<DevicePolicy> } = {}): Promise<RunningAuthority> {
  const { config, dir } = nodeConfig(stack, url, opts.policy);
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

test('two nodes starting at once on an empty database: migrated once, one CA (the loser of the insert race loads the winner\'s)', { timeout: 240_000 }, async (t) => {
  const { url, schema, admin } = await pgSchema(t);
  const manufacturer = ManufacturerCa.create();
  const nodes = await Promise.all([startNode({ manufacturer }, url), startNode({ manufacturer }, url), startNode({ manufacturer }, url)]);
  t.after(async () => {
    for (const n of nodes) await n.close();
  });
  assert.equal(new Set(nodes.map((n) => n.rootFingerprint)).size, 1);
  assert.equal(new Set(nodes.map((n) => n.ca.deviceCa.pem)).size, 1);
  const rows = (await admin.query(`SELECT name, key_pem FROM "${schema}".ca_material ORDER BY name`)).rows;
  assert.deepEqual(rows.map((r) => r.name), ['device-ca', 'edge-issuer', 'infra-ca', 'root']);
  for (const r of rows) assert.match(r.key_pem, /^-----BEGIN ENCRYPTED PRIVATE KEY-----\n/, 'keys are stored encrypted');
  const versions = (await admin.query(`SELECT version FROM "${schema}".schema_migrations ORDER BY version`)).rows.map((r) => r.version);
  assert.deepEqual(versions, listMigrations().map((m) => m.version));
  // Every node's CRL is the one stored CRL line (numbers only go up).
  const crl = (await admin.query(`SELECT crl_number FROM "${schema}".crls WHERE issuer = 'device-ca'`)).rows[0];
  assert.ok(nodes.every((n) => n.revocation.crl().crlNumber <= BigInt(crl.crl_number)));

  // A node with another passphrase cannot use the cluster's CA: a clear refusal at start.
  const { config, dir } = nodeConfig({ manufacturer }, url, {}, { caPassphrase: 'another-passphrase-0123' });
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  await assert.rejects(startAuthority(config, { logger }), /cannot decrypt the root CA stored in the database: wrong CA passphrase\?/);
});

test('two nodes on one database: one shared CA, distinct serials across nodes, a requestId repeated or raced on both yields one certificate', { timeout: 300_000 }, async (t) => {
  const { url, schema, admin } = await pgSchema(t);
  const { stack, a, b, onB } = await cluster(t, url);

  // One CA for both, stored once (insert-if-absent); both serve the same chain.
  assert.equal(a.rootFingerprint, b.rootFingerprint);
  assert.equal(a.ca.deviceCa.pem, b.ca.deviceCa.pem);
  assert.equal(a.ca.infraCa.pem, b.ca.infraCa.pem);
  assert.equal((await admin.query(`SELECT count(*)::int AS n FROM "${schema}".ca_material`)).rows[0].n, 4);
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

test('a revocation on node B is in node A\'s CRL and reaches the gateway whose event stream is on A', { timeout: 240_000 }, async (t) => {
  const { url } = await pgSchema(t);
  const { stack, a, b, onB } = await cluster(t, url);
  const id = 'pki-cluster-revoked';
  const identity = await onboardDevice(stack, id);
  const client = await connectOk(stack, operationalOptions(identity));
  t.after(() => closeQuietly(client));
  const inbox = new Inbox(client);
  assert.deepEqual(await subscribeGranted(client, downFilter(id)), [1]);
  await until(() => stack.gateway.readiness().checks.authorityLink === true, 20_000, 'the gateway event stream on A');
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

test('the renewal scan runs once per period for the cluster; its announcement reaches the gateway on the other node', { timeout: 240_000 }, async (t) => {
  const { url } = await pgSchema(t);
  // Due at once (see test/renewal.test.ts).
  const { stack, a, b } = await cluster(t, url, { renewAfterFraction: 0.001, validityDays: 1 });
  await until(() => stack.gateway.readiness().checks.authorityLink === true, 20_000, 'the gateway event stream on A');
  const device = stack.device('pki-cluster-renew', 'pki-signature');
  const first = await device.onboard();
  assert.equal(stack.gateway.renewals.get(first.serial), undefined, 'not announced yet');

  // B's timer fires first: B claims this period, announces to its own gateways (none) and
  // signals A, which announces to the gateway connected to it.
  assert.equal(await b.renewals.scan(), 1);
  await until(() => stack.gateway.renewals.get(first.serial), 20_000, 'the due renewal at the gateway on A');
  // A's timer in the same period: already claimed, nothing announced twice.
  assert.equal(await a.renewals.scan(), null);
  assert.equal(await b.renewals.scan(), null);
});

/** A TCP proxy in front of PostgreSQL that the test can cut and restore: an outage for one authority only. */
async function pgProxy(target: URL): Promise<{ port: number; down(): Promise<void>; up(): Promise<void>; close(): Promise<void> }> {
  const sockets = new Set<net.Socket>();
  let server: net.Server | null = null;
  let port = 0;
  const up = () =>
    new Promise<void>((resolve, reject) => {
      const s = net.createServer((c) => {
        const pgSocket = net.connect(Number(target.port || 5432), target.hostname);
        sockets.add(c);
        sockets.add(pgSocket);
        const kill = () => {
          c.destroy();
          pgSocket.destroy();
          sockets.delete(c);
          sockets.delete(pgSocket);
        };
        for (const x of [c, pgSocket]) x.on('error', kill).on('close', kill);
        c.pipe(pgSocket).pipe(c);
      });
      s.once('error', reject);
      s.listen(port, '127.0.0.1', () => {
        port = (s.address() as net.AddressInfo).port;
        server = s;
        resolve();
      });
    });
  const down = () =>
    new Promise<void>((resolve) => {
      for (const s of sockets) s.destroy();
      sockets.clear();
      if (!server) return resolve();
      server.close(() => resolve());
      server = null;
    });
  await up();
  return { get port() { return port; }, down, up, close: down };
}

/** A pino logger whose JSON lines the test can read. */
function capturedLogger(): { logger: pino.Logger; lines: Array<Record<string, any>> } {
  const lines: Array<Record<string, any>> = [];
  const sink = new Writable({
    write(chunk, _enc, cb) {
      for (const l of String(chunk).split('\n')) if (l.trim()) lines.push(JSON.parse(l));
      cb();
    },
  });
  return { logger: pino({ level: 'info' }, sink), lines };
}

test('PostgreSQL unreachable: start-up fails with a clear message; a running node answers 503 with a body, logs it, and recovers', { timeout: 240_000 }, async (t) => {
  // Start-up, through the CLI: a closed port. Closed a moment ago: on a busy machine another
  // process may take it and drop the connection instead of refusing it -- unavailable all the same.
  const closedPort = await new Promise<number>((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(p));
    });
  });
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-node-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const cli = spawnSync(process.execPath, ['--import', 'tsx', 'bin/leafgate.ts', 'authority', 'start', '--data-dir', dir, '--port', '0', '--database', `postgres://leafgate:pg-secret@127.0.0.1:${closedPort}/leafgate`], {
    encoding: 'utf8', env: { ...process.env, LEAFGATE_CA_PASSPHRASE: PASSPHRASE, LEAFGATE_LOG_LEVEL: 'info' }, timeout: 60_000,
  });
  assert.equal(cli.status, 1, cli.stderr);
  assert.match(cli.stderr, new RegExp(`^error \\[authority_unavailable\\]: cannot open the authority database: database unavailable \\(postgres://leafgate@127\\.0\\.0\\.1:${closedPort}/leafgate\\): .*(ECONNREFUSED|ECONNRESET|Connection terminated)`, 'm'));
  assert.doesNotMatch(cli.stderr + cli.stdout, /pg-secret/);
  const logLine = cli.stdout.split('\n').filter(Boolean).map((l) => JSON.parse(l)).find((l) => l.msg === 'cannot open the authority database');
  assert.ok(logLine, cli.stdout);
  assert.equal(logLine.level, 50);

  // A running node whose database goes away.
  const { url } = await pgSchema(t);
  const target = new URL(url);
  const proxy = await pgProxy(target);
  const viaProxy = new URL(url);
  viaProxy.host = `127.0.0.1:${proxy.port}`;
  const { logger: log, lines } = capturedLogger();
  const node = await startNode({ manufacturer: ManufacturerCa.create() }, viaProxy.toString(), { logger: log });
  t.after(async () => {
    await node.close();
    await proxy.close();
  });
  const api = { authority: node, rootPem: node.ca.root.pem } as unknown as Stack;
  const auth = { authorization: `Bearer ${ADMIN}` };
  assert.equal((await authorityRequest(api, '/admin/v1/devices', { headers: auth })).status, 200);
  assert.equal((await authorityRequest(api, '/readyz')).status, 200);

  await proxy.down();
  const failed = await authorityRequest(api, '/admin/v1/devices', { headers: auth });
  assert.equal(failed.status, 503, failed.text);
  assert.equal(failed.body.code, 'authority_unavailable');
  assert.match(failed.body.message, /^database unavailable \(postgres:\/\/postgres@127\.0\.0\.1:\d+\/test\?schema=lgtest_[0-9a-f]+\)/);
  assert.equal(typeof failed.body.retryAfterMs, 'number');
  assert.equal(failed.headers['retry-after'], '5');
  const enroll = await authorityRequest(api, '/v1/gateways/enroll', { body: { token: 'some-token-0123456789', csr: 'x' } });
  // Even a refusal needs the database (it is audited): 503 too, never a 500.
  assert.deepEqual([enroll.status, enroll.body.code], [503, 'authority_unavailable']);
  assert.equal((await authorityRequest(api, '/readyz')).status, 503);
  // What needs no database still works: the CRL is served from memory.
  assert.equal((await authorityRequest(api, '/v1/crl')).status, 200);
  await until(() => lines.some((l) => l.level >= 50 && /database unavailable/.test(l.msg)), 20_000, 'an error log line about the database');
  await until(() => lines.some((l) => l.msg === 'cluster event connection lost; reconnecting'), 5000, 'the event connection loss to be logged');

  await proxy.up();
  await until(async () => (await authorityRequest(api, '/admin/v1/devices', { headers: auth })).status === 200, 10_000, 'the API to answer again');
  await until(() => lines.some((l) => l.msg === 'cluster event connection restored'), 20_000, 'the event connection to come back');
  assert.equal((await authorityRequest(api, '/readyz')).status, 200);
});

/** One HTTPS request to a node's dashboard, trusting the authority's root. */
const dashboardRequest = (stack: Stack, url: string, opts: { method?: string; headers?: Record<string, string>; body?: string } = {}) => rawHttps(url, { ...opts, ca: stack.rootPem });

test('dashboard: a session opened on node A works on node B, and a logout on B ends it on A', async (t) => {
  const { url } = await pgSchema(t);
  const { stack, a, b } = await cluster(t, url);
  const form = (o: Record<string, string>) => new URLSearchParams(o).toString();
  const post = (node: RunningAuthority, path: string, body: string, cookie?: string) => dashboardRequest(stack, `${node.url}/dashboard${path}`, {
    method: 'POST', body, headers: { origin: new URL(node.url).origin, 'content-type': 'application/x-www-form-urlencoded', ...(cookie ? { cookie } : {}) },
  });
  const login = await post(a, '/login', form({ token: ADMIN }));
  assert.equal(login.status, 303);
  assert.equal(login.headers.location, '/dashboard');
  const cookie = String(login.headers['set-cookie']).split(';')[0];
  assert.match(cookie, /^__Host-leafgate_dashboard=.{40,}/);

  const onB = await dashboardRequest(stack, `${b.url}/dashboard`, { headers: { cookie } });
  assert.equal(onB.status, 200, 'node B knows the session node A opened');
  assert.match(onB.text, /dashboard:admin/);
  const csrf = /name="csrf" value="([^"]+)"/.exec(onB.text)![1];
  // An action on node B with the session of node A is accepted (CSRF token included).
  assert.equal((await post(b, '/actions/enrollment-token', form({ csrf, gateway: 'gw-dash', ttlHours: '1' }), cookie)).status, 200);

  assert.equal((await post(b, '/logout', form({ csrf }), cookie)).status, 303);
  const afterLogout = await dashboardRequest(stack, `${a.url}/dashboard`, { headers: { cookie } });
  assert.equal(afterLogout.status, 303, 'logged out on both nodes');
  assert.equal(afterLogout.headers.location, '/dashboard/login');
});
