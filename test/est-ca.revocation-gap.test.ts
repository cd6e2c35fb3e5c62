/**
 * Review findings about revoking certificates of the external issuing CA (EST), both fixed.
 *
 * 1. A certificate of the external issuing CA that leafgate did not deliver -- issued at the CA
 * outside leafgate, or an orphan of leafgate's own requests (`answer_lost`, `discarded`, a
 * `ca_refused` answer) -- connects to every gateway as the device its CN names (documented).
 * `authority revoke --serial` answers not_found for it (leafgate has no row); the fix is
 * `authority revoke --certificate FILE` / POST /admin/v1/revoke {certificate}: checked to be
 * signed by the configured issuing CA, recorded as a revoked row (issuer external-ca, kind
 * device, subject its CN), listed in the external-devices list, refused and cut by the gateways.
 *
 * 2. The device CA's CRL stays a direct CRL: the external CA's revocations are a list of their
 * own (authority/revocation.ts), so OpenSSL without extended CRL support keeps verifying
 * leafgate's own device certificates.
 */
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import test from 'node:test';
import { promisify } from 'node:util';
import { X509Certificate, generateKeyPairSync, sign } from 'node:crypto';
import { challengeSigningInput, pkix } from '../protocol/index.ts';
import { authorityRequest, gatewayIdentity, rawHttps } from './support/http.ts';
import { csrFor, ecKey } from './support/refusals.ts';
import { TestEstServer } from './support/est-server.ts';
import { Inbox, closeQuietly, closed, connectOk, onboardDevice, subscribeGranted, tryConnect, until } from './support/plugins-helpers.ts';
import { startStack, type Stack } from './support/stack.ts';

/** Sized for a machine 4x slower than a developer's. */
const MS = 40_000;
const run = promisify(execFile);

async function admin(stack: Stack, body: unknown): Promise<{ status: number; body: any }> {
  const tok = readFileSync(join(stack.dir, 'authority', 'admin-token'), 'utf8').trim();
  const r = await rawHttps(new URL('/admin/v1/revoke', stack.authority.url).href, {
    method: 'POST', ca: stack.rootPem, headers: { authorization: `Bearer ${tok}`, 'content-type': 'application/json' }, body: JSON.stringify(body),
  });
  return { status: r.status, body: JSON.parse(r.text || 'null') };
}

test('a certificate of the external issuing CA that leafgate did not issue can be revoked (revoke --certificate) so that gateways refuse it and cut its session; other certificates are refused with a clear 400', { timeout: 180_000 }, async (t) => {
  const est = await TestEstServer.start();
  t.after(() => est.close());
  const stack = await startStack(t, {
    authority: {
      deviceIssuer: { type: 'est', url: est.url, serverCaFile: est.serverCaFile, caChainFile: est.chainFile, clientCertFile: est.clientCertFile, clientKeyFile: est.clientKeyFile, timeoutMs: 20_000, retryAfterSeconds: 1 },
    },
  });
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-est-outside-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const openssl = (args: string[]) => {
    const r = spawnSync('openssl', args, { cwd: dir, encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`openssl ${args.join(' ')}: ${r.stderr}`);
    return r.stdout;
  };
  // The enterprise CA signs a device certificate outside leafgate (another RA, a template that
  // is not leafgate's only, or an orphan): CN = a device id, clientAuth.
  writeFileSync(join(dir, 'leaf.ext'), 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n');
  openssl(['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'leaf.key', '-subj', '/CN=est-outside-1', '-out', 'leaf.csr']);
  openssl(['x509', '-req', '-in', 'leaf.csr', '-CA', join(est.dir, 'issuing.pem'), '-CAkey', join(est.dir, 'issuing.key'), '-days', '30', '-extfile', 'leaf.ext', '-out', 'leaf.pem']);
  const serial = openssl(['x509', '-in', 'leaf.pem', '-noout', '-serial']).replace(/^serial=/, '').trim().toUpperCase();
  const leafPem = readFileSync(join(dir, 'leaf.pem'), 'utf8');
  const opts = { clientId: 'est-outside-1', key: readFileSync(join(dir, 'leaf.key'), 'utf8'), cert: leafPem + readFileSync(join(est.dir, 'issuing.pem'), 'utf8') };
  const first = await tryConnect(stack, opts);
  await closeQuietly(first.client);
  assert.equal(first.code, 0, 'accepted as the device its CN names (documented)');
  // By serial: leafgate has no row for it.
  await assert.rejects(stack.authority.revocation.revokeSerial(serial, 'keyCompromise', 'test'), /no certificate with serial/);

  // Certificates that are not the external issuing CA's are refused, nothing recorded.
  // A CA of its own (same CN as the issuing CA), a leafgate device CA certificate, the issuing CA itself, garbage.
  openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'rogue.key', '-subj', `/CN=${new X509Certificate(readFileSync(join(est.dir, 'issuing.pem'))).subject.split('\n').find((l) => l.startsWith('CN='))!.slice(3)}`, '-days', '30', '-out', 'rogue.pem']);
  openssl(['x509', '-req', '-in', 'leaf.csr', '-CA', 'rogue.pem', '-CAkey', 'rogue.key', '-days', '30', '-extfile', 'leaf.ext', '-out', 'rogue-leaf.pem']);
  const own = await onboardDevice(stack, 'est-outside-2');
  const { publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const now = Date.now();
  const leafgateOwn = await stack.authority.ca.issue('device', {
    subjectDer: pkix.encodeName('own-ca-dev-2'), spkiDer: pkix.spkiDerOfKey(publicKey), profile: { kind: 'device', keyType: 'ec' },
    notBefore: new Date(now - 60_000), notAfter: new Date(now + 30 * 86_400_000),
  });
  for (const [what, pem, pattern] of [
    ['signed by another CA of the issuing CA\'s name', readFileSync(join(dir, 'rogue-leaf.pem'), 'utf8'), /not signed by the configured external issuing CA/],
    ['a certificate of leafgate\'s device CA', leafgateOwn.pem, /not signed by the configured external issuing CA/],
    ['the issuing CA itself', readFileSync(join(est.dir, 'issuing.pem'), 'utf8'), /not signed by the configured external issuing CA|CA certificate/],
    ['not a certificate', 'hello', /exactly one certificate|not a readable PEM/],
  ] as const) {
    const res = await admin(stack, { certificate: pem, reason: 'keyCompromise' });
    assert.equal(res.status, 400, `${what}: ${JSON.stringify(res.body)}`);
    assert.equal(res.body.code, 'bad_request', what);
    assert.match(res.body.message, pattern, what);
  }
  assert.equal(await stack.authority.store.getCertificate(leafgateOwn.serial), null, 'nothing recorded for a refused one');

  // The certificate leafgate did not issue: connected, then revoked with the CLI.
  const client = await connectOk(stack, opts);
  t.after(() => closeQuietly(client));
  const inbox = new Inbox(client);
  await subscribeGranted(client, 'lg/v1/est-outside-1/down/#');
  const gone = closed(client, MS);
  const out = await run(process.execPath, ['--import', 'tsx', 'bin/leafgate.ts', 'authority', 'revoke', '--certificate', join(dir, 'leaf.pem'), '--reason', 'keyCompromise', '--json', '--data-dir', join(stack.dir, 'authority'), '--authority', stack.authority.url], { env: { ...process.env, LEAFGATE_LOG_LEVEL: 'silent' } });
  const [answer] = JSON.parse(out.stdout) as Array<Record<string, any>>;
  assert.equal(answer.serial, serial);
  assert.equal(answer.issuer, 'external-ca');
  assert.equal(answer.subjectId, 'est-outside-1');
  assert.equal(answer.externalCa?.revokedThere, false);
  assert.match(out.stderr, /Revoke it at that CA too/);
  await gone;
  assert.ok(inbox.messages.some((m) => m.kind === 'revoked'), 'down/revoked before the close');
  const again = await tryConnect(stack, opts, MS);
  await closeQuietly(again.client);
  assert.equal(again.code, 5, 'refused once revoked');
  // On record: revoked, external CA, device, its CN; in the external-devices list.
  const row = await stack.authority.store.getCertificate(serial);
  assert.equal(row?.status, 'revoked');
  assert.equal(row?.issuer, 'external-ca');
  assert.equal(row?.kind, 'device');
  assert.equal(row?.subjectId, 'est-outside-1');
  assert.equal(row?.revocationReason, 1);
  const list = pkix.parseCrl(stack.authority.revocation.crl('external-devices').der, stack.authority.ca.deviceCa.certificate.publicKey);
  assert.equal(list.revoked.get(serial)?.reason, 1);
  const audit = await stack.authority.store.listAudit({ deviceId: 'est-outside-1', limit: 10 });
  assert.ok(audit.some((a) => a.action === 'revoke' && a.serial === serial && a.detail?.notOnRecord === true && a.detail?.actor === 'admin'));
  // Revoking it again is the same answer, not an error; a certificate on record goes the --serial way.
  assert.equal((await admin(stack, { certificate: leafPem, reason: 'keyCompromise' })).status, 200);
  const ownAnswer = await admin(stack, { certificate: own.certificate, reason: 'superseded' });
  assert.equal(ownAnswer.status, 200, JSON.stringify(ownAnswer.body));
  assert.equal(ownAnswer.body[0].subjectId, 'est-outside-2');
  assert.equal((await stack.authority.store.getCertificate(own.serial))?.status, 'revoked');
});

/**
 * Review finding (fixed): an external revocation used to turn the device CA's CRL into an
 * indirect CRL, which OpenSSL without extended CRL support (`openssl verify -crl_check`
 * without -extended_crl; nginx ssl_crl, mosquitto crlfile, ...) ignores: "unable to get
 * certificate CRL" for every leafgate device certificate. The device CA's CRL now stays direct
 * and the external revocations go in their own list.
 */
test('a revoked external certificate does not make openssl -crl_check_all fail for the device CA\'s own certificates', { timeout: 120_000 }, async (t) => {
  const est = await TestEstServer.start();
  t.after(() => est.close());
  const stack = await startStack(t, {
    authority: {
      deviceIssuer: { type: 'est', url: est.url, serverCaFile: est.serverCaFile, caChainFile: est.chainFile, clientCertFile: est.clientCertFile, clientKeyFile: est.clientKeyFile, timeoutMs: 20_000, retryAfterSeconds: 1 },
    },
  });
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-est-crl-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  // A device certificate of leafgate's own device CA (issued before deviceIssuer was set).
  const { publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const now = Date.now();
  const own = await stack.authority.ca.issue('device', {
    subjectDer: pkix.encodeName('own-ca-dev-1'), spkiDer: pkix.spkiDerOfKey(publicKey), profile: { kind: 'device', keyType: 'ec' },
    notBefore: new Date(now - 60_000), notAfter: new Date(now + 30 * 86_400_000),
  });
  const bundle = stack.authority.ca.bundle();
  writeFileSync(join(dir, 'root.pem'), bundle.root);
  writeFileSync(join(dir, 'device-ca.pem'), bundle.deviceCa);
  writeFileSync(join(dir, 'leaf.pem'), own.pem);
  const verify = () => {
    writeFileSync(join(dir, 'crls.pem'), stack.authority.revocation.crl('device-ca').pem + stack.authority.revocation.crl('root').pem);
    return spawnSync('openssl', ['verify', '-x509_strict', '-crl_check_all', '-purpose', 'sslclient', '-CAfile', 'root.pem', '-untrusted', 'device-ca.pem', '-CRLfile', 'crls.pem', 'leaf.pem'], { cwd: dir, encoding: 'utf8' });
  };
  const before = verify();
  assert.equal(before.status, 0, before.stdout + before.stderr);
  // An externally issued device certificate is revoked.
  const external = await onboardDevice(stack, 'est-crl-1');
  await stack.authority.revocation.revokeSerial(external.serial, 'keyCompromise', 'test');
  const after = verify();
  assert.equal(after.status, 0, `leafgate's own device certificate no longer verifies with the device CA's CRL: ${after.stdout}${after.stderr}`);
});

test('a certificate the external CA signed and leafgate discarded (its commit failed) is revoked at once (superseded): in the external-devices list; the certificate delivered on the retry stays valid', { timeout: 180_000 }, async (t) => {
  const est = await TestEstServer.start();
  t.after(() => est.close());
  const stack = await startStack(t, {
    authority: {
      deviceIssuer: { type: 'est', url: est.url, serverCaFile: est.serverCaFile, caChainFile: est.chainFile, clientCertFile: est.clientCertFile, clientKeyFile: est.clientKeyFile, timeoutMs: 20_000, retryAfterSeconds: 1 },
    },
  });
  const identity = gatewayIdentity(stack);
  const deviceId = 'est-discard-1';
  const { birthCert, factoryKey } = stack.manufacturer.issueBirthCertificate(deviceId);
  const challenge = (await authorityRequest(stack, '/v1/devices/register', { body: { deviceId, requestId: 'reg-1', method: 'pki-signature', birthCert }, identity })).body;
  const signature = sign('sha256', challengeSigningInput(deviceId, challenge.challengeId, challenge.nonce), factoryKey).toString('base64');
  const instruction = (await authorityRequest(stack, '/v1/devices/auth', { body: { deviceId, requestId: 'auth-1', challengeId: challenge.challengeId, signature }, identity })).body;
  const body = { deviceId, requestId: 'csr-1', csr: csrFor(instruction, ecKey('prime256v1')) };
  // The issuance commit fails once after the CA signed (a database error): that certificate
  // exists at the CA and no answer carries it.
  const store = stack.authority.store;
  const recordIssuance = store.recordIssuance.bind(store);
  let failures = 0;
  store.recordIssuance = async () => {
    failures++;
    throw new Error('disk I/O error');
  };
  const failed = await authorityRequest(stack, '/v1/devices/csr', { body, identity });
  assert.notEqual(failed.status, 200, failed.text);
  assert.equal(failures, 1);
  store.recordIssuance = recordIssuance;
  assert.equal(est.issued.length, 1, 'the CA signed');
  const orphanSerial = est.issued[0];
  // The retry gets a certificate (another one).
  const answer = (await authorityRequest(stack, '/v1/devices/csr', { body, identity })).body;
  assert.equal(est.issued.length, 2);
  assert.notEqual(answer.serial, orphanSerial);
  const audit = await store.listAudit({ deviceId, limit: 100 });
  assert.ok(audit.some((a) => (a.detail as Record<string, unknown> | null)?.est === 'discarded' && (a.detail as Record<string, unknown>).externalSerial === orphanSerial), 'audited as discarded');
  // Revoked in leafgate (superseded), listed for the gateways; the delivered one is untouched.
  const row = await store.getCertificate(orphanSerial);
  assert.equal(row?.status, 'revoked');
  assert.equal(row?.issuer, 'external-ca');
  assert.equal(row?.kind, 'device');
  assert.equal(row?.subjectId, deviceId);
  assert.equal(row?.revocationReason, pkix.REVOCATION_REASONS.superseded);
  assert.ok(audit.some((a) => a.action === 'revoke' && a.serial === orphanSerial && a.detail?.actor === 'est-discarded'));
  const list = pkix.parseCrl(stack.authority.revocation.crl('external-devices').der, stack.authority.ca.deviceCa.certificate.publicKey);
  assert.equal(list.revoked.get(orphanSerial)?.reason, pkix.REVOCATION_REASONS.superseded);
  assert.equal(list.revoked.has(answer.serial), false);
  assert.equal((await store.getCertificate(answer.serial))?.status, 'active');
  await until(() => stack.gateway.externalRevocations.isRevoked(orphanSerial), MS, 'the gateway to hold the orphan\'s revocation');
});
