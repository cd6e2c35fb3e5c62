/**
 * External CA over EST (authority/ca/est-ca.ts), end to end: a real authority and gateway, an
 * mqtt.js device, and an enterprise CA that is not leafgate's code (test/support/est-server.ts:
 * openssl signs, openssl crl2pkcs7 answers). Device certificates come from that CA through
 * simpleenroll / simplereenroll; leafgate checks each answer before storing it, serves the
 * external chain to gateways and devices, and enforces revocation of those certificates at the
 * broker (the authority's external-devices list: an indirect CRL signed by the device CA key,
 * beside the device CA's own CRL, which stays direct).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { X509Certificate, createPublicKey } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request as httpsRequest } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import test, { type TestContext } from 'node:test';
import { pkix, upTopic, type CertMessage, type InstructionMessage } from '../protocol/index.ts';
import { generateKeyForInstruction } from '../device/index.ts';
import { resolveAuthorityConfig, startAuthority, type AuthorityConfigInput } from '../authority/index.ts';
import { TestEstServer, type EstServerOptions } from './support/est-server.ts';
import { logger, startStack, type Stack } from './support/stack.ts';
import { resolveGatewayConfig, startGateway, type RunningGateway } from '../gateway/index.ts';
import { BootstrapSession, Inbox, closeQuietly, closed, connectOk, httpGet, metricValue, metricsText, onboardDevice, operationalOptions, opsUrl, subscribeGranted, tryConnect, until } from './support/plugins-helpers.ts';

/** Sized for a machine 4x slower than a developer's. */
const MS = 40_000;

async function estServer(t: TestContext, opts: EstServerOptions = {}): Promise<TestEstServer> {
  const est = await TestEstServer.start(opts);
  t.after(() => est.close());
  return est;
}

/** deviceIssuer for `est`, with a client certificate (default) or Basic. */
function issuerConfig(est: TestEstServer, auth: 'cert' | 'basic' = 'cert', extra: Record<string, unknown> = {}): AuthorityConfigInput['deviceIssuer'] {
  return {
    type: 'est', url: est.url, serverCaFile: est.serverCaFile, caChainFile: est.chainFile,
    ...(auth === 'cert' ? { clientCertFile: est.clientCertFile, clientKeyFile: est.clientKeyFile } : { username: est.username, passwordFile: est.passwordFile }),
    timeoutMs: 20_000, retryAfterSeconds: 1, ...extra,
  } as AuthorityConfigInput['deviceIssuer'];
}

async function estStack(t: TestContext, est: TestEstServer, auth: 'cert' | 'basic' = 'cert', extra: Record<string, unknown> = {}): Promise<Stack> {
  return startStack(t, { authority: { deviceIssuer: issuerConfig(est, auth, extra) } });
}

/** openssl verify of a PEM certificate against the EST server's chain (independent of leafgate). */
function opensslVerify(t: TestContext, est: TestEstServer, certPem: string): { ok: boolean; out: string } {
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-est-verify-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const chain = pkix.parseCertificates(est.chainPem);
  writeFileSync(join(dir, 'root.pem'), chain.at(-1)!.toString());
  writeFileSync(join(dir, 'issuing.pem'), chain[0].toString());
  writeFileSync(join(dir, 'leaf.pem'), certPem);
  const r = spawnSync('openssl', ['verify', '-x509_strict', '-purpose', 'sslclient', '-CAfile', 'root.pem', '-untrusted', 'issuing.pem', 'leaf.pem'], { cwd: dir, encoding: 'utf8' });
  return { ok: r.status === 0, out: r.stdout + r.stderr };
}

test('onboarding through an external CA over EST (client certificate): simpleenroll, openssl verifies the certificate against the external chain, the device connects with it and publishes', { timeout: 120_000 }, async (t) => {
  const est = await estServer(t, { auth: 'cert' });
  const stack = await estStack(t, est, 'cert');
  const identity = await onboardDevice(stack, 'est-dev-1');

  // One simpleenroll, authenticated by leafgate's client certificate.
  const calls = est.enrollments();
  assert.equal(calls.length, 1);
  assert.equal(calls[0].operation, 'simpleenroll');
  assert.equal(calls[0].auth.cert, true);
  // The certificate is the external CA's, for the device's key, with the external chain.
  const cert = new X509Certificate(identity.certificate);
  assert.equal(cert.serialNumber.toUpperCase(), est.issued[0]);
  assert.ok(cert.publicKey.equals(createPublicKey(identity.privateKey)));
  const chain = pkix.parseCertificates(est.chainPem).map((c) => c.toString());
  assert.deepEqual(identity.chain, chain);
  const v = opensslVerify(t, est, identity.certificate);
  assert.ok(v.ok, v.out);
  // On record with its issuer, and audited.
  const row = await stack.authority.store.getCertificate(identity.serial);
  assert.equal(row?.issuer, 'external-ca');
  assert.equal(row?.kind, 'device');
  const audit = await stack.authority.store.listAudit({ deviceId: 'est-dev-1', limit: 50 });
  assert.ok(audit.some((a) => a.action === 'issue' && a.outcome === 'ok' && a.serial === identity.serial));
  // The gateway learnt the external chain at enrollment and accepts the certificate on its mTLS listener.
  const client = await connectOk(stack, operationalOptions(identity));
  t.after(() => closeQuietly(client));
  await client.publishAsync(upTopic('est-dev-1', 'telemetry', 'temp'), '{"c":21}', { qos: 1 });
  // Gateway infrastructure stays on leafgate's own CA.
  const gw = await stack.authority.store.listCertificates({ subjectId: stack.gatewayId, kind: 'gateway' });
  assert.equal(gw[0]?.issuer, 'infra-ca');
});

/** A bootstrap session that authenticated and holds a fresh key and CSR for its instruction. */
async function readyToSend(stack: Stack, deviceId: string) {
  const s = await BootstrapSession.open(stack, deviceId);
  const instruction = await s.authenticate();
  assert.equal(instruction.kind, 'instruction', JSON.stringify(instruction.body));
  const ins = instruction.body as unknown as InstructionMessage;
  const pair = await generateKeyForInstruction(ins);
  const csr = pkix.buildCsr({ commonName: ins.subject.commonName, sans: ins.sans, privateKey: pair.privateKey, publicKey: pair.publicKey });
  return { s, csr, privateKey: pair.privateKey };
}

async function deviceCerts(stack: Stack, deviceId: string) {
  return stack.authority.store.listCertificates({ subjectId: deviceId, kind: 'device' });
}

test('EST server unreachable: the CSR waits in the gateway\'s durable queue (device gets pending), and completes with exactly one certificate when the server is back on the same port', { timeout: 180_000 }, async (t) => {
  const est = await estServer(t);
  const stack = await estStack(t, est);
  const { s, csr, privateKey } = await readyToSend(stack, 'est-outage-1');
  t.after(() => s.close());
  await est.stop();
  const requestId = 'outage-csr-1';
  const mark = s.inbox.messages.length;
  const answer = s.inbox.answer(requestId, mark, MS * 3);
  await s.client.publishAsync(upTopic('est-outage-1', 'csr'), JSON.stringify({ requestId, csr }), { qos: 1 });
  const pending = await s.inbox.wait((m) => m.kind === 'pending' && m.body.requestId === requestId, MS, 'pending');
  assert.ok(Number(pending.body.retryAfterMs) >= 1000);
  // While it is down, the authority refused nothing final and stored nothing.
  assert.equal((await deviceCerts(stack, 'est-outage-1')).length, 0);
  await est.restart();
  const cert = await answer;
  assert.equal(cert.kind, 'cert', JSON.stringify(cert.body));
  const body = cert.body as unknown as CertMessage;
  assert.ok(new X509Certificate(body.certificate).publicKey.equals(createPublicKey(privateKey)));
  // Exactly one certificate: one at the CA, one on record, the one delivered.
  assert.equal(est.issued.length, 1);
  assert.deepEqual((await deviceCerts(stack, 'est-outage-1')).map((c) => c.serial), [est.issued[0]]);
  assert.equal(body.serial, est.issued[0]);
  // The same request again: the stored answer, no second call to the CA.
  const calls = est.enrollments().length;
  const again = await s.request('csr', { requestId, csr }, MS);
  assert.equal((again.body as unknown as CertMessage).serial, body.serial);
  assert.equal(est.enrollments().length, calls);
});

test('EST 202 + Retry-After (manual approval): the device gets pending with the CA\'s delay, then its certificate once the CA approves; an answer lost after the CA signed yields one delivered certificate and an audit line for the orphan', { timeout: 180_000 }, async (t) => {
  const est = await estServer(t);
  const stack = await estStack(t, est);
  const { s, csr } = await readyToSend(stack, 'est-approval-1');
  t.after(() => s.close());
  est.mode = { kind: 'pending', retryAfterSeconds: 2 };
  const requestId = 'approval-csr-1';
  const answer = s.inbox.answer(requestId, s.inbox.messages.length, MS * 3);
  await s.client.publishAsync(upTopic('est-approval-1', 'csr'), JSON.stringify({ requestId, csr }), { qos: 1 });
  const pending = await s.inbox.wait((m) => m.kind === 'pending' && m.body.requestId === requestId, MS, 'pending');
  assert.ok(Number(pending.body.retryAfterMs) >= 2000, `the CA's Retry-After reaches the device (${pending.body.retryAfterMs})`);
  await until(() => est.enrollments().some((r) => r.status === 202), MS, 'the CA to hold the request');
  const audit = await stack.authority.store.listAudit({ deviceId: 'est-approval-1', limit: 50 });
  assert.ok(audit.some((a) => a.code === 'authority_unavailable' && a.detail?.est === 'pending'));
  // Approved: the same request, sent again from the queue, is signed.
  est.mode = { kind: 'issue' };
  const cert = await answer;
  assert.equal(cert.kind, 'cert', JSON.stringify(cert.body));
  assert.equal(est.issued.length, 1);

  // Lost answer: the CA signs, the connection drops before the answer. The retry gets a second
  // certificate at the CA; leafgate stores and delivers only the one whose answer arrived.
  const second = await readyToSend(stack, 'est-lost-1');
  t.after(() => second.s.close());
  est.dropNextAnswer = true;
  const lostId = 'lost-csr-1';
  const lostAnswer = second.s.inbox.answer(lostId, second.s.inbox.messages.length, MS * 3);
  await second.s.client.publishAsync(upTopic('est-lost-1', 'csr'), JSON.stringify({ requestId: lostId, csr: second.csr }), { qos: 1 });
  const got = await lostAnswer;
  assert.equal(got.kind, 'cert', JSON.stringify(got.body));
  const orphan = est.issued[1];
  const kept = est.issued[2];
  assert.equal(est.issued.length, 3);
  assert.equal((got.body as unknown as CertMessage).serial, kept);
  assert.deepEqual((await deviceCerts(stack, 'est-lost-1')).map((c) => c.serial), [kept]);
  const lostAudit = await stack.authority.store.listAudit({ deviceId: 'est-lost-1', limit: 50 });
  assert.ok(lostAudit.some((a) => a.requestId === lostId && a.detail?.est === 'answer_lost' && a.detail?.sent === true), 'the lost answer is on record for the operator');
  assert.notEqual(orphan, kept);
});

test('EST refusals reach the device as ca_refused with its requestId, and bad answers (garbage, another key, a CA outside the chain) store nothing', { timeout: 180_000 }, async (t) => {
  const est = await estServer(t);
  const stack = await estStack(t, est, 'basic');
  const modes: Array<{ mode: import('./support/est-server.ts').EstMode; message: RegExp }> = [
    { mode: { kind: 'refuse', status: 403, text: 'subject not allowed by template' }, message: /HTTP 403: subject not allowed by template/ },
    { mode: { kind: 'garbage' }, message: /not base64/ },
    { mode: { kind: 'other-key' }, message: /for the key of the device's CSR/ },
    { mode: { kind: 'rogue-ca' }, message: /not issued by the configured issuing CA/ },
  ];
  for (const [i, { mode, message }] of modes.entries()) {
    const id = `est-refused-${i}`;
    const { s, csr } = await readyToSend(stack, id);
    try {
      est.mode = mode;
      const a = await s.request('csr', { requestId: `refused-${i}`, csr }, MS);
      assert.equal(a.kind, 'error', JSON.stringify(a.body));
      assert.equal(a.body.code, 'ca_refused');
      assert.equal(a.body.requestId, `refused-${i}`);
      assert.match(String(a.body.message), message);
      assert.equal((await deviceCerts(stack, id)).length, 0, 'nothing stored');
      const audit = await stack.authority.store.listAudit({ deviceId: id, limit: 50 });
      assert.ok(audit.some((r) => r.outcome === 'refused' && r.code === 'ca_refused'));
    } finally {
      await s.close();
    }
  }
  assert.ok(est.enrollments().every((r) => r.auth.basic === est.username && !r.auth.cert), 'HTTP Basic only');
});

test('revocation of an externally issued certificate: the live session is closed, a reconnect is refused, the external-devices list (not the device CA\'s CRL) lists it with its issuer, and the operator is told to revoke it at the external CA', { timeout: 180_000 }, async (t) => {
  const est = await estServer(t);
  const stack = await estStack(t, est);
  const identity = await onboardDevice(stack, 'est-revoked-1');
  const client = await connectOk(stack, operationalOptions(identity));
  t.after(() => closeQuietly(client));
  const inbox = new Inbox(client);
  await subscribeGranted(client, 'lg/v1/est-revoked-1/down/#');
  const gone = closed(client, MS);
  const answer = await stack.authority.revocation.revokeSerial(identity.serial, 'keyCompromise', 'test');
  assert.equal(answer.issuer, 'external-ca');
  assert.equal(answer.externalCa?.revokedThere, false);
  assert.match(answer.externalCa?.action ?? '', /EST has no revocation call[\s\S]*Revoke it at that CA too/);
  assert.match(answer.externalCa?.issuer ?? '', /Enterprise Device Issuing CA/);
  await gone;
  assert.ok(inbox.messages.some((m) => m.kind === 'revoked'), 'down/revoked before the close');
  const again = await tryConnect(stack, operationalOptions(identity));
  assert.equal(again.code, 5);
  // The list the gateway enforces for the external CA: external-devices, signed by the device CA
  // key, indirect, with an entry naming the external CA; the device CA's CRL stays direct and
  // does not list it.
  const caKey = stack.authority.ca.deviceCa.certificate.publicKey;
  const list = pkix.parseCrl(stack.authority.revocation.crl('external-devices').der, caKey);
  assert.equal(list.indirect, true);
  assert.equal(answer.crlNumber, list.crlNumber.toString(), 'the answer names the list that carries it');
  const entry = list.revoked.get(identity.serial);
  assert.ok(entry?.certificateIssuerDer?.equals(pkix.subjectDerOf(pkix.parseCertificates(est.chainPem)[0].raw)));
  const deviceCrl = pkix.parseCrl(stack.authority.revocation.crl('device-ca').der, caKey);
  assert.equal(deviceCrl.indirect, false);
  assert.equal(deviceCrl.revoked.has(identity.serial), false);
  // Served at its own URL, readable by openssl (an indirect CRL signed by the device CA).
  const served = await httpsGetBuffer(stack.authority.url, '/v1/crl/external-devices.crl', stack.rootPem);
  assert.ok(served.equals(stack.authority.revocation.crl('external-devices').der));
  const text = spawnSync('openssl', ['crl', '-inform', 'DER', '-noout', '-text'], { input: served, encoding: 'utf8' }).stdout;
  assert.match(text, /Indirect CRL/);
  assert.match(text, new RegExp(identity.serial));
  // The gateway holds it in its external list (the device CA's CRL cache does not).
  assert.equal(stack.gateway.externalRevocations.isRevoked(identity.serial), true);
  assert.equal(stack.gateway.revocations.isRevoked(identity.serial), false);
  // Another device of the same CA is not affected.
  const other = await onboardDevice(stack, 'est-revoked-2');
  const ok = await connectOk(stack, operationalOptions(other));
  await closeQuietly(ok);
});

test('renewal of an externally issued certificate goes to simplereenroll (device SDK, proof by the current key), the old one is superseded', { timeout: 180_000 }, async (t) => {
  const est = await estServer(t, { days: 1 });
  // openssl does not backdate notBefore as leafgate's CA does: with 1e-6 of a day the window opens ~0.1 s after issuance.
  const stack = await startStack(t, { authority: { deviceIssuer: issuerConfig(est) }, policy: { renewAfterFraction: 1e-6, validityDays: 1 } });
  const device = stack.device('est-renew-1', 'pki-signature');
  const first = await device.onboard();
  const client = await device.connectOperational(first);
  t.after(() => client.endAsync(true));
  const renewed = new Promise<import('../device/index.ts').DeviceIdentity>((resolve, reject) => void device.enableRenewal(client, resolve, reject));
  await until(async () => (await stack.authority.renewals.announce()) > 0, MS, 'the renewal to be due');
  const next = await renewed;
  assert.notEqual(next.serial, first.serial);
  assert.deepEqual(est.enrollments().map((r) => r.operation), ['simpleenroll', 'simplereenroll']);
  assert.equal(next.serial, est.issued[1]);
  const rows = await stack.authority.store.listCertificates({ subjectId: 'est-renew-1' });
  assert.deepEqual(Object.fromEntries(rows.map((r) => [r.serial, `${r.status}/${r.issuer}`])), { [first.serial]: 'superseded/external-ca', [next.serial]: 'active/external-ca' });
  await client.endAsync();
  const again = await device.connectOperational(next);
  await again.endAsync();
});

test('a gateway enrolled before the authority used an external CA learns its chain when its event stream reconnects, and accepts its devices; the admin API\'s revoke answer tells the operator about the external CA', { timeout: 180_000 }, async (t) => {
  const est = await estServer(t);
  const stack = await startStack(t);
  // The gateway enrolled with leafgate's own device CA only.
  const before = await onboardDevice(stack, 'local-dev-1');
  assert.equal((await stack.authority.store.getCertificate(before.serial))?.issuer, 'device-ca');
  // The operator turns deviceIssuer on: the authority restarts on the same data and port.
  const port = Number(new URL(stack.authority.url).port);
  await stack.stopAuthority();
  const authority = await startAuthority(resolveAuthorityConfig({
    dataDir: join(stack.dir, 'authority'), caPassphrase: 'test-passphrase-0123456789', listen: { host: '127.0.0.1', port },
    deviceIssuer: issuerConfig(est),
    policies: { default: { pkiSignature: { manufacturerCAs: [stack.manufacturer.pem], deviceIdFrom: 'CN' } } },
  }, {}), { logger });
  t.after(() => authority.close());
  stack.authority = authority;
  await until(() => {
    try {
      return pkix.parseCertificates(readFileSync(join(stack.dir, 'gateway', 'external-device-chain.pem'), 'utf8')).length === 2;
    } catch {
      return false;
    }
  }, MS, 'the gateway to store the external chain');
  const identity = await onboardDevice(stack, 'est-late-1');
  assert.equal((await authority.store.getCertificate(identity.serial))?.issuer, 'external-ca');
  // The chain file is written before the listener's TLS context is replaced: wait for the connect.
  let accepted: import('mqtt').MqttClient | undefined;
  await until(async () => {
    const r = await tryConnect(stack, operationalOptions(identity));
    accepted = r.client;
    return r.code === 0;
  }, MS, 'the listener to accept the external CA\'s device');
  await closeQuietly(accepted);
  // Devices of leafgate's own CA keep working.
  await closeQuietly(await connectOk(stack, operationalOptions(before)));
  // The admin API's answer carries what the operator must do at the external CA.
  const token = readFileSync(join(stack.dir, 'authority', 'admin-token'), 'utf8').trim();
  const res = await fetchJson(authority.url, '/admin/v1/revoke', token, stack.rootPem, { serial: identity.serial, reason: 'keyCompromise' });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.equal(res.body[0].issuer, 'external-ca');
  assert.match(res.body[0].externalCa.action, /EST has no revocation call/);
  assert.equal((await tryConnect(stack, operationalOptions(identity))).code, 5);
  // A local one revoked the same way has no such field.
  const local = await fetchJson(authority.url, '/admin/v1/revoke', token, stack.rootPem, { serial: before.serial, reason: 'superseded' });
  assert.equal(local.body[0].externalCa, undefined);
});

function fetchJson(base: string, path: string, token: string, ca: string, body: unknown): Promise<{ status: number; body: any }> {
  const payload = Buffer.from(JSON.stringify(body));
  return new Promise((resolve, reject) => {
    const req = httpsRequest(new URL(path, base), {
      method: 'POST', agent: false, ca,
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json', 'content-length': payload.length },
    }, (res: import('node:http').IncomingMessage) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode!, body: JSON.parse(Buffer.concat(chunks).toString() || 'null') }));
    });
    req.on('error', reject);
    req.end(payload);
  });
}

test('with two hierarchies among the broker\'s anchors a name is not enough: a CA of the enterprise root named like leafgate\'s device CA cannot mint a device identity (CONNACK 5)', { timeout: 120_000 }, async (t) => {
  const est = await estServer(t);
  const stack = await estStack(t, est);
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-est-imposter-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const openssl = (args: string[]) => {
    const r = spawnSync('openssl', args, { cwd: dir, encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`openssl ${args.join(' ')}: ${r.stderr}`);
  };
  const deviceCaSubject = '/' + stack.authority.ca.deviceCa.certificate.subject.split('\n').join('/');
  writeFileSync(join(dir, 'ca.ext'), 'basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n');
  writeFileSync(join(dir, 'leaf.ext'), 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n');
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  // The enterprise root (an anchor of the broker) certifies a CA bearing leafgate's device CA name.
  openssl(['req', '-new', ...ec, '-keyout', 'fake.key', '-subj', deviceCaSubject, '-out', 'fake.csr']);
  openssl(['x509', '-req', '-in', 'fake.csr', '-CA', join(est.dir, 'root.pem'), '-CAkey', join(est.dir, 'root.key'), '-days', '30', '-extfile', 'ca.ext', '-out', 'fake.pem']);
  openssl(['req', '-new', ...ec, '-keyout', 'leaf.key', '-subj', '/CN=est-imposter-1', '-out', 'leaf.csr']);
  openssl(['x509', '-req', '-in', 'leaf.csr', '-CA', 'fake.pem', '-CAkey', 'fake.key', '-days', '30', '-extfile', 'leaf.ext', '-out', 'leaf.pem']);
  const r = await tryConnect(stack, { clientId: 'est-imposter-1', key: readFileSync(join(dir, 'leaf.key'), 'utf8'), cert: readFileSync(join(dir, 'leaf.pem'), 'utf8') + readFileSync(join(dir, 'fake.pem'), 'utf8') });
  await closeQuietly(r.client);
  // OpenSSL accepted the chain (a CONNACK came back): the refusal is the broker's signature check.
  assert.equal(r.code, 5);
});

test('the active-certificate cap is checked before the CSR goes to the external CA: a refused request leaves no certificate at the CA', { timeout: 120_000 }, async (t) => {
  const est = await estServer(t);
  const stack = await startStack(t, { authority: { deviceIssuer: issuerConfig(est) }, policy: { maxActiveCerts: 1 } });
  await onboardDevice(stack, 'est-cap-1');
  assert.equal(est.issued.length, 1);
  const { s, csr } = await readyToSend(stack, 'est-cap-1');
  t.after(() => s.close());
  const a = await s.request('csr', { requestId: 'cap-2', csr }, MS);
  assert.equal(a.kind, 'error', JSON.stringify(a.body));
  assert.equal(a.body.code, 'policy_violation');
  assert.match(String(a.body.message), /already holds 1 active certificates/);
  assert.equal(est.issued.length, 1, 'the external CA was not asked');
  assert.equal(est.enrollments().length, 1);
});

/** GET over HTTPS (the authority's CRL URLs need no client certificate). */
function httpsGetBuffer(base: string, path: string, ca: string): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const req = httpsRequest(new URL(path, base), { ca, method: 'GET' }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => (res.statusCode === 200 ? resolve(Buffer.concat(chunks)) : reject(new Error(`GET ${path}: ${res.statusCode}`))));
    });
    req.on('error', reject);
    req.end();
  });
}

test('offline: a gateway restarted while the authority is down still refuses the revoked EST device from its cached external-devices list', { timeout: 180_000 }, async (t) => {
  const est = await estServer(t);
  // This test stops and restarts parts of the stack itself, so it closes them itself.
  const stack = await startStack(null, { authority: { deviceIssuer: issuerConfig(est) } });
  let gatewayUp = true;
  let authorityUp = true;
  let restarted: RunningGateway | undefined;
  const clients: Array<Awaited<ReturnType<typeof connectOk>>> = [];
  t.after(async () => {
    await closeQuietly(...clients);
    await restarted?.close();
    if (gatewayUp) await stack.gateway.close();
    if (authorityUp) await stack.authority.close();
    rmSync(stack.dir, { recursive: true, force: true });
  });
  const bad = await onboardDevice(stack, 'est-offline-bad');
  const good = await onboardDevice(stack, 'est-offline-good');
  await until(() => stack.gateway.readiness().checks.authorityLink === true, MS, 'the authority event stream');
  const { crlNumber } = await stack.authority.revocation.revokeSerial(bad.serial, 'keyCompromise', 'test');
  await until(() => stack.gateway.externalRevocations.crlNumber?.toString() === crlNumber, MS, 'the gateway to fetch the new external list');

  await stack.authority.close();
  authorityUp = false;
  await stack.gateway.close();
  gatewayUp = false;
  restarted = await startGateway(
    resolveGatewayConfig({ dataDir: join(stack.dir, 'gateway'), listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 } }, {}),
    { logger },
  );
  const url = `mqtts://127.0.0.1:${restarted.port}`;
  assert.equal(restarted.externalRevocations.crlNumber?.toString(), crlNumber, 'external list loaded from disk');
  assert.equal((await tryConnect(stack, operationalOptions(bad), MS, url)).code, 5, 'revoked EST device refused');
  const goodClient = await connectOk(stack, operationalOptions(good), url);
  clients.push(goodClient);
  await goodClient.publishAsync(upTopic('est-offline-good', 'telemetry', 'state'), '{}', { qos: 1 });
});

test('staleCrlPolicy refuse: a certificate of the external CA also needs the external-devices list fresh (CONNACK 3 while it is past its nextUpdate)', { timeout: 180_000 }, async (t) => {
  const est = await estServer(t);
  const stack = await startStack(t, { authority: { deviceIssuer: issuerConfig(est) }, gateway: { staleCrlPolicy: 'refuse' } });
  const identity = await onboardDevice(stack, 'est-stale-1');
  const external = stack.gateway.externalRevocations;
  await until(() => external.warm, MS, 'the gateway to hold the external-devices list');
  const first = await tryConnect(stack, operationalOptions(identity), MS);
  await closeQuietly(first.client);
  assert.equal(first.code, 0);
  const ca = stack.authority.ca.deviceCa;
  const list = (n: bigint, nextUpdate: number) => pkix.encodeCrl({ issuerDer: ca.subjectDer, issuerKeyId: ca.keyId, issuerKey: ca.privateKey!, crlNumber: n, thisUpdate: new Date(nextUpdate - 3600_000), nextUpdate: new Date(nextUpdate), entries: [], indirect: true });
  // A genuine list that is past its nextUpdate (the authority unreachable for that long).
  const n = external.crlNumber! + 1000n;
  assert.equal(external.applyDer(list(n, Date.now() - 60_000), 'test'), true);
  assert.equal(external.isStale(), true);
  assert.equal(stack.gateway.revocations.isStale(), false, 'the device CA\'s CRL is fresh');
  const refused = await tryConnect(stack, operationalOptions(identity), MS);
  await closeQuietly(refused.client);
  assert.equal(refused.code, 3, 'the gateway cannot vouch for the external certificate');
  // The operator sees why: a metric and a readiness check of their own.
  const port = stack.gateway.httpPort;
  assert.equal(metricValue(await metricsText(port), 'leafgate_gateway_external_crl_stale'), 1);
  assert.equal(metricValue(await metricsText(port), 'leafgate_gateway_external_crl_number'), Number(n));
  assert.equal(JSON.parse((await httpGet(opsUrl(port, '/readyz'))).body).checks.externalCrlFresh, false);
  // A fresh one: accepted again.
  assert.equal(external.applyDer(list(n + 1n, Date.now() + 3600_000), 'test'), true);
  const again = await tryConnect(stack, operationalOptions(identity), MS);
  await closeQuietly(again.client);
  assert.equal(again.code, 0);
  assert.equal(metricValue(await metricsText(port), 'leafgate_gateway_external_crl_stale'), 0);
  assert.equal(JSON.parse((await httpGet(opsUrl(port, '/readyz'))).body).checks.externalCrlFresh, true);
});
