/**
 * The EST connector (authority/ca/est-ca.ts) against an enterprise CA that is not leafgate's
 * code (test/support/est-server.ts: openssl signs and answers). Every check of an answer has a
 * case here that the CA really signed and leafgate refuses; every HTTP outcome maps to a stable
 * code; secrets stay out of logs; a misconfiguration stops the start.
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import test, { type TestContext } from 'node:test';
import pino from 'pino';
import { LeafgateError, pkix } from '../protocol/index.ts';
import { EstCa, type CaBundle, type CaConnector, type EstCaConfig, type IssueRequest } from '../authority/ca/index.ts';
import { resolveAuthorityConfig } from '../authority/index.ts';
import { TestEstServer, estIssueRequest, refusal, type EstMode, type EstServerOptions } from './support/est-server.ts';

const DAY = 86_400_000;

/** Stands in for leafgate's own CA: everything but device certificates goes there. */
function fakeLocal(): CaConnector & { calls: string[] } {
  const calls: string[] = [];
  return {
    name: 'local', calls,
    async issue(issuer) {
      calls.push(issuer);
      throw new LeafgateError('internal', 'local CA reached');
    },
    bundle: (): CaBundle => ({ root: 'R', deviceCa: 'D', infraCa: 'I', edgeIssuer: 'E' }),
    async close() {},
  };
}

async function server(t: TestContext, opts: EstServerOptions = {}): Promise<TestEstServer> {
  const est = await TestEstServer.start(opts);
  t.after(() => est.close());
  return est;
}

function config(est: TestEstServer, extra: Partial<EstCaConfig> = {}): EstCaConfig {
  return { type: 'est', url: est.url, serverCaFile: est.serverCaFile, caChainFile: est.chainFile, clientCertFile: est.clientCertFile, clientKeyFile: est.clientKeyFile, timeoutMs: 20_000, retryAfterSeconds: 3, ...extra };
}

function connector(t: TestContext, est: TestEstServer, extra: Partial<EstCaConfig> = {}, opts: ConstructorParameters<typeof EstCa>[2] = {}): EstCa {
  const ca = new EstCa(config(est, extra), fakeLocal(), opts);
  t.after(() => ca.close());
  return ca;
}

/** A device CSR as leafgate's policy checked it, and the issue request built from it. */
function request(cn = 'est-unit-1', sans: { dns?: string[] } = {}, validityDays = 365): IssueRequest {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const csr = pkix.parseCsr(pkix.buildCsr({ commonName: cn, sans, privateKey, publicKey }));
  return estIssueRequest(csr, cn, validityDays);
}

test('EST connector: simpleenroll with a client certificate; the certificate is for the CSR\'s key, with the external chain; renewal goes to simplereenroll; other issuers stay on the local CA', { timeout: 60_000 }, async (t) => {
  const est = await server(t, { auth: 'cert' });
  const ca = connector(t, est);
  const req = request('est-unit-1', { dns: ['est-unit-1.local'] });
  const issued = await ca.issue('device', req);
  assert.equal(issued.issuer, 'external-ca');
  assert.equal(issued.serial, est.issued[0]);
  assert.deepEqual(issued.chain, pkix.parseCertificates(est.chainPem).map((c) => c.toString()));
  assert.equal(est.requests[0].path, '/.well-known/est/simpleenroll');
  assert.equal(est.requests[0].auth.cert, true);
  const renewed = await ca.issue('device', { ...request('est-unit-1'), renewal: true });
  assert.notEqual(renewed.serial, issued.serial);
  assert.equal(est.requests[1].path, '/.well-known/est/simplereenroll');
  assert.deepEqual(ca.bundle().externalDeviceChain, issued.chain);
  // A CSR is what goes to the CA: none, no call.
  const { csrDer: _c, ...bare } = request();
  assert.equal((await refusal(ca.issue('device', bare))).code, 'internal');
  assert.equal(est.requests.length, 2);
  // Gateway and infrastructure certificates are never sent to the external CA.
  await refusal(ca.issue('infra', request()));
  assert.equal(est.requests.length, 2);
});

test('EST connector: HTTP Basic with a CA label; the password comes from a file or the environment and never reaches a log line', { timeout: 60_000 }, async (t) => {
  const est = await server(t, { auth: 'basic', label: 'devices' });
  const lines: string[] = [];
  const logger = pino({ level: 'trace' }, new Writable({ write(chunk, _e, cb) { lines.push(String(chunk)); cb(); } }));
  const password = readFileSync(est.passwordFile, 'utf8').trim();
  const ca = connector(t, est, { clientCertFile: undefined, clientKeyFile: undefined, username: est.username, passwordFile: est.passwordFile, label: 'devices' }, { logger });
  await ca.issue('device', request());
  assert.equal(est.requests[0].path, '/.well-known/est/devices/simpleenroll');
  assert.equal(est.requests[0].auth.basic, est.username);
  assert.equal(est.requests[0].auth.cert, false);
  // From the environment, under its own name.
  const fromEnv = connector(t, est, { clientCertFile: undefined, clientKeyFile: undefined, username: est.username, passwordEnv: 'MY_EST_PW', label: 'devices' }, { logger, env: { MY_EST_PW: password } });
  await fromEnv.issue('device', request());
  // A wrong password: the CA's 401 is leafgate's configuration problem, so the request waits (retried), with an error line.
  const wrong = connector(t, est, { clientCertFile: undefined, clientKeyFile: undefined, username: est.username, passwordEnv: 'MY_EST_PW', label: 'devices' }, { logger, env: { MY_EST_PW: 'not-the-password' } });
  const e = await refusal(wrong.issue('device', request()));
  assert.equal(e.code, 'authority_unavailable');
  assert.equal(e.detail?.est, 'credentials');
  assert.ok(lines.some((l) => /refused leafgate's credentials/.test(l)));
  assert.ok(lines.length > 0);
  for (const l of lines) assert.ok(!l.includes(password) && !l.includes(Buffer.from(`${est.username}:${password}`).toString('base64')), 'no log line carries the password');
  assert.match(ca.describe(), /HTTP Basic/);
  assert.ok(!ca.describe().includes(password));
  // Username without any password source: the start stops.
  assert.throws(() => new EstCa(config(est, { clientCertFile: undefined, clientKeyFile: undefined, username: 'x' }), fakeLocal(), { env: {} }), /LEAFGATE_EST_PASSWORD/);
});

test('EST connector: a client certificate the EST server does not trust, or a server leafgate does not trust, leaves the request waiting (authority_unavailable), never a certificate', { timeout: 60_000 }, async (t) => {
  const est = await server(t, { auth: 'cert' });
  const stranger = connector(t, est, { clientCertFile: est.strangerCertFile, clientKeyFile: est.strangerKeyFile });
  const e1 = await refusal(stranger.issue('device', request()));
  assert.equal(e1.code, 'authority_unavailable');
  assert.equal(e1.detail?.est, 'credentials');
  // The server's TLS certificate checked against serverCaFile: here the enterprise chain, which did not sign it.
  const distrust = connector(t, est, { serverCaFile: est.chainFile });
  const e2 = await refusal(distrust.issue('device', request()));
  assert.equal(e2.code, 'authority_unavailable');
  assert.equal(e2.detail?.sent, false);
  assert.equal(est.issued.length, 0);
});

test('EST connector: refusals and outages map to stable codes (4xx/500 ca_refused with the CA\'s text; 202 and 503 wait with Retry-After; unreachable; answer lost after sending)', { timeout: 60_000 }, async (t) => {
  const est = await server(t);
  const ca = connector(t, est);
  const cases: Array<{ mode: EstMode; code: string; est: string; retryAfterMs?: number; message?: RegExp }> = [
    { mode: { kind: 'refuse', status: 400, text: 'CSR attributes are incomplete' }, code: 'ca_refused', est: 'refused', message: /HTTP 400: CSR attributes are incomplete/ },
    { mode: { kind: 'refuse', status: 403, text: 'template denies this subject' }, code: 'ca_refused', est: 'refused', message: /403: template denies/ },
    { mode: { kind: 'refuse', status: 500, text: 'CA database error' }, code: 'ca_refused', est: 'refused' },
    { mode: { kind: 'pending', retryAfterSeconds: 7 }, code: 'authority_unavailable', est: 'pending', retryAfterMs: 7000, message: /manual approval/ },
    { mode: { kind: 'refuse', status: 503, text: 'maintenance' }, code: 'authority_unavailable', est: 'unavailable', retryAfterMs: 3000 },
  ];
  for (const c of cases) {
    est.mode = c.mode;
    const e = await refusal(ca.issue('device', request()));
    assert.equal(e.code, c.code, JSON.stringify(c.mode));
    assert.equal(e.detail?.est, c.est, JSON.stringify(c.mode));
    if (c.retryAfterMs !== undefined) assert.equal(e.retryAfterMs, c.retryAfterMs, JSON.stringify(c.mode));
    if (c.message) assert.match(e.message, c.message);
  }
  assert.equal(est.issued.length, 0);
  est.mode = { kind: 'issue' };
  // The CA signs, the answer never arrives: the request may have been issued (sent: true).
  est.dropNextAnswer = true;
  const lost = await refusal(ca.issue('device', request()));
  assert.equal(lost.code, 'authority_unavailable');
  assert.deepEqual({ est: lost.detail?.est, sent: lost.detail?.sent }, { est: 'answer_lost', sent: true });
  assert.equal(est.issued.length, 1);
  // Unreachable: nothing was sent.
  await est.stop();
  const down = await refusal(ca.issue('device', request()));
  assert.equal(down.code, 'authority_unavailable');
  assert.deepEqual({ est: down.detail?.est, sent: down.detail?.sent }, { est: 'unreachable', sent: false });
  assert.equal(down.retryAfterMs, 3000);
  await est.restart();
  await ca.issue('device', request());
});

test('EST connector: every check of the answer refuses a certificate the CA really signed (ca_refused), naming what failed', { timeout: 120_000 }, async (t) => {
  const est = await server(t, { days: 30 });
  const ca = connector(t, est);
  const clientExt = 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n';
  const cases: Array<{ what: string; mode: EstMode; why: RegExp; issues: boolean }> = [
    { what: 'garbage base64', mode: { kind: 'garbage' }, why: /not base64/, issues: false },
    { what: 'another content type', mode: { kind: 'raw', status: 200, contentType: 'text/plain', body: 'MIIB' }, why: /is not application\/pkcs7-mime/, issues: false },
    { what: 'base64 that is not PKCS#7', mode: { kind: 'raw', status: 200, contentType: 'application/pkcs7-mime; smime-type=certs-only', body: Buffer.from('hello world!').toString('base64') }, why: /not a certs-only PKCS#7/, issues: false },
    { what: 'a certificate for another key', mode: { kind: 'other-key' }, why: /for the key of the device's CSR/, issues: true },
    { what: 'a CA of the same name outside the configured chain', mode: { kind: 'rogue-ca' }, why: /not issued by the configured issuing CA/, issues: true },
    { what: 'another CN', mode: { kind: 'subject', subject: '/CN=someone-else' }, why: /subject CN \["someone-else"\]/, issues: true },
    { what: 'a subject attribute the policy does not allow', mode: { kind: 'subject', subject: '/CN=est-unit-1/emailAddress=x@example.com' }, why: /attributes leafgate's policy does not allow \(1\.2\.840\.113549\.1\.9\.1\)/, issues: true },
    { what: 'a CA certificate for the device\'s key', mode: { kind: 'extensions', ext: 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,digitalSignature\nextendedKeyUsage=clientAuth\n' }, why: /for the key of the device's CSR/, issues: true },
    { what: 'a server-only certificate', mode: { kind: 'extensions', ext: clientExt + 'extendedKeyUsage=serverAuth\n' }, why: /does not allow clientAuth/, issues: true },
    { what: 'a SAN nobody asked for', mode: { kind: 'extensions', ext: clientExt + 'extendedKeyUsage=clientAuth\nsubjectAltName=DNS:est-unit-1.local,DNS:evil.example\n' }, why: /names leafgate did not ask for \(DNS:evil\.example\)/, issues: true },
  ];
  for (const c of cases) {
    est.mode = c.mode;
    const before = est.issued.length;
    const e = await refusal(ca.issue('device', request('est-unit-1', { dns: ['est-unit-1.local'] })));
    assert.equal(e.code, 'ca_refused', c.what);
    assert.match(e.message, c.why, c.what);
    assert.equal(est.issued.length - before, c.issues ? 1 : 0, `${c.what}: the CA ${c.issues ? 'signed' : 'did not sign'}`);
  }
  // Organisational attributes an enterprise template adds are tolerated; the SANs asked for are fine.
  est.mode = { kind: 'subject', subject: '/O=Enterprise/OU=IoT/CN=est-unit-1' };
  await ca.issue('device', request('est-unit-1', { dns: ['est-unit-1.local'] }));
  est.mode = { kind: 'issue' };
  // Validity: longer than the policy's lifetime.
  est.days = 30;
  const long = await refusal(ca.issue('device', request('est-unit-1', {}, 7)));
  assert.match(long.message, /longer than the policy's/);
  // Validity judged on leafgate's clock (injected): not yet valid, expired, and a configured chain that lapsed.
  const at = (offsetMs: number) => connector(t, est, {}, { now: () => Date.now() + offsetMs });
  assert.match((await refusal(at(-DAY).issue('device', request()))).message, /is not valid before/);
  assert.match((await refusal(at(40 * DAY).issue('device', request('est-unit-1', {}, 3650)))).message, /expired at/);
  assert.match((await refusal(at(3100 * DAY).issue('device', request('est-unit-1', {}, 3650)))).message, /configured chain's .*Enterprise Device Issuing CA is not valid now/);
});

test('EST connector: a chain file in the wrong order, an end-entity in it, or a missing file stops the start; the config refuses a password, a lone client key and no credentials', async (t) => {
  const est = await server(t);
  const [issuing, root] = pkix.parseCertificates(est.chainPem);
  const reversed = join(est.dir, 'reversed.pem');
  writeFileSync(reversed, root.toString() + issuing.toString());
  assert.throws(() => new EstCa(config(est, { caChainFile: reversed }), fakeLocal()), /list the issuing CA first and the root last/);
  assert.throws(() => new EstCa(config(est, { caChainFile: est.clientCertFile }), fakeLocal()), /is not a CA certificate/);
  assert.throws(() => new EstCa(config(est, { caChainFile: join(est.dir, 'nope.pem') }), fakeLocal()), /caChainFile .* cannot be read: ENOENT/);
  const base = { dataDir: join(est.dir, 'a'), caPassphrase: 'test-passphrase-0123456789' };
  const di = { type: 'est' as const, url: est.url, serverCaFile: est.serverCaFile, caChainFile: est.chainFile };
  assert.throws(() => resolveAuthorityConfig({ ...base, deviceIssuer: { ...di, username: 'u', password: 'secret' } as never }, {}), /password/);
  assert.throws(() => resolveAuthorityConfig({ ...base, deviceIssuer: { ...di, clientKeyFile: est.clientKeyFile } }, {}), /clientCertFile and clientKeyFile go together/);
  assert.throws(() => resolveAuthorityConfig({ ...base, deviceIssuer: di }, {}), /needs a TLS client certificate/);
  assert.throws(() => resolveAuthorityConfig({ ...base, deviceIssuer: { ...di, url: 'http://ca.example', username: 'u' } }, {}), /url/);
  const hub = 'HostName=h.example;SharedAccessKeyName=iothubowner;SharedAccessKey=a2V5';
  assert.throws(() => resolveAuthorityConfig({ ...base, deviceIssuer: { ...di, username: 'u', passwordFile: est.passwordFile }, dps: { connectionString: hub, mode: 'group' } }, {}), /dps\.mode.*individual/);
  const ok = resolveAuthorityConfig({ ...base, deviceIssuer: { ...di, username: 'u', passwordFile: est.passwordFile } }, {});
  assert.deepEqual({ timeoutMs: ok.deviceIssuer?.timeoutMs, retryAfterSeconds: ok.deviceIssuer?.retryAfterSeconds }, { timeoutMs: 30_000, retryAfterSeconds: 30 });
});

test('EST connector: at start the configured chain is compared with the server\'s /cacerts (RFC 7030 4.1): match, mismatch (an error line), unreachable (a warning)', { timeout: 60_000 }, async (t) => {
  const est = await server(t);
  const lines: string[] = [];
  const logger = pino({ level: 'info' }, new Writable({ write(chunk, _e, cb) { lines.push(String(chunk)); cb(); } }));
  assert.equal(await connector(t, est, {}, { logger }).checkCaCerts(), 'match');
  assert.equal(est.requests.at(-1)?.path, '/.well-known/est/cacerts');
  const other = join(est.dir, 'other-chain.pem');
  writeFileSync(other, readFileSync(join(est.dir, 'rogue.pem'), 'utf8') + readFileSync(join(est.dir, 'rogue-root.pem'), 'utf8'));
  assert.equal(await connector(t, est, { caChainFile: other }, { logger }).checkCaCerts(), 'mismatch');
  assert.ok(lines.some((l) => /do not include the issuing CA/.test(l)));
  await est.stop();
  assert.equal(await connector(t, est, {}, { logger }).checkCaCerts(), 'unreachable');
});

test('EST connector: a failure while checking an answer is ca_refused, never internal (the gateway retries internal, and every retry would be another certificate at the CA)', { timeout: 60_000 }, async (t) => {
  const est = await server(t);
  const ca = connector(t, est);
  // The CSR goes out (the CA signs it); the key leafgate compares with cannot be read.
  const e = await refusal(ca.issue('device', { ...request(), spkiDer: Buffer.from('not a key') }));
  assert.equal(e.code, 'ca_refused');
  assert.match(e.message, /could not be checked/);
  assert.equal(est.issued.length, 1);
});

test('EST connector: at most deviceIssuer.maxConcurrent calls in flight per node; one more is answered authority_unavailable with retryAfterMs without reaching the CA', { timeout: 120_000 }, async (t) => {
  const est = await server(t);
  est.holdMaxMs = 120_000;
  const ca = connector(t, est, { maxConcurrent: 2, retryAfterSeconds: 3, answerWithinMs: 2000 });
  est.holdAnswersUntil = 99;
  const held = [ca.issue('device', request('est-cap-1')), ca.issue('device', request('est-cap-2'))];
  await est.waitForIssued(2);
  assert.equal(ca.state().inFlight, 2);
  const busy = await refusal(ca.issue('device', request('est-cap-3')));
  assert.equal(busy.code, 'authority_unavailable');
  assert.deepEqual({ est: busy.detail?.est, sent: busy.detail?.sent }, { est: 'busy', sent: false });
  assert.equal(busy.retryAfterMs, 2000, 'the busy hint: retryAfterSeconds, at most answerWithinMs');
  assert.equal(est.enrollments().length, 2, 'the third never reached the CA');
  est.releaseHeld();
  await Promise.all(held);
  assert.equal(ca.state().inFlight, 0);
  await ca.issue('device', request('est-cap-4'));
  assert.equal(est.enrollments().length, 3);
});

test('EST connector: circuit breaker: after failureThreshold consecutive failures (no connection, 503) requests fail fast for retryAfterSeconds without reaching the CA, then one probe goes out; its success closes the breaker, its failure opens it again', { timeout: 120_000 }, async (t) => {
  const est = await server(t);
  let offset = 0;
  const ca = connector(t, est, { failureThreshold: 2, retryAfterSeconds: 5 }, { now: () => Date.now() + offset });
  // A refusal is an answer: the CA is there, nothing counts.
  est.mode = { kind: 'refuse', status: 400, text: 'no' };
  for (let i = 0; i < 3; i++) assert.equal((await refusal(ca.issue('device', request()))).code, 'ca_refused');
  assert.equal(ca.state().failures, 0);
  est.mode = { kind: 'issue' };
  await est.stop();
  for (let i = 0; i < 2; i++) assert.equal((await refusal(ca.issue('device', request()))).detail?.est, 'unreachable');
  assert.equal(ca.state().open, true);
  await est.restart();
  const before = est.requests.length;
  const fast = await refusal(ca.issue('device', request()));
  assert.equal(fast.code, 'authority_unavailable');
  assert.deepEqual({ est: fast.detail?.est, sent: fast.detail?.sent }, { est: 'circuit_open', sent: false });
  assert.ok(fast.retryAfterMs! > 0 && fast.retryAfterMs! <= 5000, `retryAfterMs ${fast.retryAfterMs}`);
  assert.equal(est.requests.length, before, 'the open breaker sends nothing');
  // retryAfterSeconds later: one probe; a request meanwhile still fails fast.
  offset += 5000;
  const probe = ca.issue('device', request('est-probe'));
  const during = await refusal(ca.issue('device', request()));
  assert.equal(during.detail?.est, 'circuit_open');
  await probe;
  assert.equal(ca.state().open, false);
  assert.equal(est.requests.length, before + 1, 'exactly the probe reached the CA');
  await ca.issue('device', request());
  // 503s count too; a failed probe opens the breaker again for retryAfterSeconds.
  est.mode = { kind: 'refuse', status: 503, text: 'maintenance' };
  for (let i = 0; i < 2; i++) assert.equal((await refusal(ca.issue('device', request()))).detail?.est, 'unavailable');
  assert.equal((await refusal(ca.issue('device', request()))).detail?.est, 'circuit_open');
  offset += 5000;
  assert.equal((await refusal(ca.issue('device', request()))).detail?.est, 'unavailable', 'the probe got a 503');
  const reopened = await refusal(ca.issue('device', request()));
  assert.equal(reopened.detail?.est, 'circuit_open');
  assert.ok(reopened.retryAfterMs! > 4000, `open again for retryAfterSeconds: ${reopened.retryAfterMs}`);
  est.mode = { kind: 'issue' };
  offset += 5000;
  await ca.issue('device', request());
  assert.equal(ca.state().failures, 0);
});
