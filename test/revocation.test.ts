/**
 * Revocation at the broker: a revoked certificate's live session is told and closed within
 * a second, its reconnect is refused, the gateway's cached CRL and the authority's published
 * CRL both list it (checked with openssl), and a gateway restarted while the authority is
 * down still refuses it from the CRL cached on disk. The gateway's CRL cache takes only a
 * CRL the device CA signed (a forged one served by the authority is refused) and never goes
 * back to an older CRL or another CRL of the same number.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { downFilter, pkix, upTopic } from '../protocol/index.ts';
import { resolveGatewayConfig, startGateway, type RunningGateway } from '../gateway/index.ts';
import { Revocation } from '../authority/index.ts';
import { AuthorityEvents } from '../authority/events.ts';
import { logger, startStack, type Stack } from './support/stack.ts';
import { Inbox, closeQuietly, closed, connectOk, httpGet, metricValue, metricsText, onboardDevice, operationalOptions, opsUrl, subscribeGranted, tryConnect, until } from './support/plugins-helpers.ts';

const OPENSSL = '/usr/bin/openssl';

/** Serial as openssl prints it: upper-case hex, no leading zeros. */
const opensslSerial = (serial: string) => serial.replace(/:/g, '').toUpperCase().replace(/^0+(?=.)/, '');

function crlText(args: string[]): string {
  return execFileSync(OPENSSL, ['crl', ...args, '-noout', '-text'], { encoding: 'utf8' });
}

const listsSerial = (text: string, serial: string) =>
  text
    .split('\n')
    .map((l) => /Serial Number:\s*([0-9A-Fa-f]+)/.exec(l)?.[1]?.toUpperCase().replace(/^0+(?=.)/, ''))
    .includes(opensslSerial(serial));

async function authorityCrlPem(stack: Stack): Promise<{ pem: string; number: bigint }> {
  const r = await httpGet(`${stack.authority.url}/v1/crl.pem`, stack.rootPem);
  assert.equal(r.status, 200);
  return { pem: r.body, number: BigInt(String(r.headers['x-crl-number'])) };
}

test('revoking a certificate cuts its live session within 1 s, refuses its reconnect, and both CRLs list it', async (t) => {
  const stack = await startStack(t);
  const id = 'pki-revoked';
  const identity = await onboardDevice(stack, id);
  const client = await connectOk(stack, operationalOptions(identity));
  t.after(() => closeQuietly(client));
  const inbox = new Inbox(client);
  assert.deepEqual(await subscribeGranted(client, downFilter(id)), [1]);
  await until(() => stack.gateway.readiness().checks.authorityLink === true, 20_000, 'the authority event stream');
  const before = await authorityCrlPem(stack);
  const gatewayBefore = stack.gateway.revocations.crlNumber;

  const started = performance.now();
  const gone = closed(client, 20_000);
  const revoked = await stack.authority.revocation.revokeSerial(identity.serial, 'keyCompromise', 'test');
  await gone;
  const elapsed = performance.now() - started;
  t.diagnostic(`session closed ${Math.round(elapsed)} ms after revokeSerial`);

  const notice = inbox.messages.find((m) => m.kind === 'revoked');
  assert.ok(notice, `down/revoked was delivered before the close (got ${inbox.messages.map((m) => m.kind).join(',') || 'nothing'})`);
  assert.equal(notice.topic, `lg/v1/${id}/down/revoked`);
  assert.equal(String(notice.body.serial).toUpperCase(), identity.serial.toUpperCase());

  // Reconnect with the revoked certificate: not authorized.
  assert.equal((await tryConnect(stack, operationalOptions(identity))).code, 5);
  await until(() => stack.gateway.sessions.holder(id) === undefined, 20_000, 'the session to be released');

  // The gateway's CRL cache (DER) lists the serial.
  const crlFile = join(stack.dir, 'gateway', 'device-ca.crl');
  assert.ok(existsSync(crlFile), crlFile);
  assert.ok(listsSerial(crlText(['-inform', 'DER', '-in', crlFile]), identity.serial), 'gateway CRL file lists the serial');

  // The authority's published CRL: PEM that openssl verifies against the device CA, listing the serial.
  const after = await authorityCrlPem(stack);
  assert.match(after.pem, /^-----BEGIN X509 CRL-----\n/);
  const pemFile = join(stack.dir, 'crl.pem');
  writeFileSync(pemFile, after.pem);
  const verify = spawnSync(OPENSSL, ['crl', '-in', pemFile, '-CAfile', join(stack.dir, 'gateway', 'device-ca.pem'), '-noout'], { encoding: 'utf8' });
  assert.equal(verify.status, 0, verify.stderr);
  assert.match(verify.stderr + verify.stdout, /verify OK/);
  assert.ok(listsSerial(crlText(['-in', pemFile]), identity.serial), 'published CRL lists the serial');

  // The CRL number went up, at the authority and at the gateway.
  assert.ok(after.number > before.number, `CRL number ${before.number} -> ${after.number}`);
  assert.equal(after.number.toString(), revoked.crlNumber);
  assert.ok(gatewayBefore !== undefined && stack.gateway.revocations.crlNumber! > gatewayBefore, 'gateway CRL number increased');
  const metrics = await metricsText(stack.gateway.httpPort);
  assert.equal(metricValue(metrics, 'leafgate_gateway_revoked_sessions_closed_total'), 1);
  assert.equal(metricValue(metrics, 'leafgate_gateway_crl_number'), Number(after.number));
});

test('revoking one certificate leaves the other sessions alone', async (t) => {
  const stack = await startStack(t);
  const bad = await onboardDevice(stack, 'pki-bad');
  const good = await onboardDevice(stack, 'pki-good');
  const badClient = await connectOk(stack, operationalOptions(bad));
  const goodClient = await connectOk(stack, operationalOptions(good));
  t.after(() => closeQuietly(badClient, goodClient));
  await until(() => stack.gateway.readiness().checks.authorityLink === true, 20_000, 'the authority event stream');
  const gone = closed(badClient, 20_000);
  await stack.authority.revocation.revokeSerial(bad.serial, 'superseded', 'test');
  await gone;
  assert.equal(goodClient.connected, true);
  await goodClient.publishAsync(upTopic('pki-good', 'telemetry', 'state'), '{}', { qos: 1 });
  assert.equal(stack.gateway.sessions.holder('pki-good')?.session.kind, 'operational');
});

test('a revoked device cannot keep its live session by having a second CONNECT refused', {
}, async (t) => {
  const stack = await startStack(t);
  const id = 'pki-evader';
  const identity = await onboardDevice(stack, id);
  const client = await connectOk(stack, operationalOptions(identity));
  t.after(() => closeQuietly(client));
  await until(() => stack.gateway.readiness().checks.authorityLink === true, 20_000, 'the authority event stream');
  const badWill = { topic: upTopic('dev-victim', 'telemetry', 'x'), payload: Buffer.from('x'), qos: 0 as const, retain: false };
  assert.equal((await tryConnect(stack, { ...operationalOptions(identity), will: badWill })).code, 5);
  assert.equal(client.connected, true);

  const started = performance.now();
  const gone = closed(client, 20_000);
  await stack.authority.revocation.revokeSerial(identity.serial, 'keyCompromise', 'test');
  await gone;
  t.diagnostic(`session closed ${Math.round(performance.now() - started)} ms after revokeSerial`);
});

test('offline: a gateway restarted while the authority is down still refuses the revoked device from its cached CRL', async (t) => {
  // This test stops and restarts parts of the stack itself, so it closes them itself.
  const stack = await startStack(null);
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

  const bad = await onboardDevice(stack, 'pki-bad');
  const good = await onboardDevice(stack, 'pki-good');
  await until(() => stack.gateway.readiness().checks.authorityLink === true, 20_000, 'the authority event stream');
  const { crlNumber } = await stack.authority.revocation.revokeSerial(bad.serial, 'keyCompromise', 'test');
  await until(() => stack.gateway.revocations.crlNumber?.toString() === crlNumber, 20_000, 'the gateway to fetch the new CRL');

  await stack.authority.close();
  authorityUp = false;
  await stack.gateway.close();
  gatewayUp = false;

  restarted = await startGateway(
    resolveGatewayConfig({ dataDir: join(stack.dir, 'gateway'), listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 } }, {}),
    { logger },
  );
  const url = `mqtts://127.0.0.1:${restarted.port}`;
  assert.equal(restarted.revocations.crlNumber?.toString(), crlNumber, 'CRL loaded from disk');

  assert.equal((await tryConnect(stack, operationalOptions(bad), 5000, url)).code, 5, 'revoked device refused');
  const goodClient = await connectOk(stack, operationalOptions(good), url);
  clients.push(goodClient);
  await goodClient.publishAsync(upTopic('pki-good', 'telemetry', 'state'), '{}', { qos: 1 });

  // Ready: the broker listens and a CRL is cached, although the authority link is down.
  const ready = await httpGet(opsUrl(restarted.httpPort, '/readyz'));
  assert.equal(ready.status, 200, ready.body);
  const body = JSON.parse(ready.body) as { status: string; checks: Record<string, boolean> };
  assert.equal(body.status, 'ready');
  assert.equal(body.checks.crlCached, true);
  assert.equal(body.checks.authorityLink, false);
  assert.equal(body.checks.brokerListening, true);
});

/** A CRL in the device CA's name (issuer name and authorityKeyIdentifier), signed by `key`. */
function crlSignedBy(stack: Stack, key: KeyObject, crlNumber: bigint, serials: string[] = []): Buffer {
  const ca = stack.authority.ca.deviceCa;
  const now = Date.now();
  return pkix.encodeCrl({
    issuerDer: ca.subjectDer, issuerKeyId: ca.keyId, issuerKey: key, crlNumber, thisUpdate: new Date(now), nextUpdate: new Date(now + 3600_000),
    entries: serials.map((serial) => ({ serial, revokedAt: new Date(now), reason: 1 })),
  });
}

/** A revoked device whose revocation the gateway holds: its identity, the CRL number, the CRL file. */
async function revokedAtGateway(stack: Stack, id: string) {
  const identity = await onboardDevice(stack, id);
  await until(() => stack.gateway.readiness().checks.authorityLink === true, 20_000, 'the authority event stream');
  const { crlNumber } = await stack.authority.revocation.revokeSerial(identity.serial, 'keyCompromise', 'test');
  await until(() => stack.gateway.revocations.crlNumber?.toString() === crlNumber, 20_000, 'the gateway to fetch the new CRL');
  assert.equal(stack.gateway.revocations.isRevoked(identity.serial.toUpperCase()), true);
  const file = join(stack.dir, 'gateway', 'device-ca.crl');
  return { identity, crlNumber: BigInt(crlNumber), file, fileBytes: readFileSync(file) };
}

test('a CRL with a bad signature served by the authority is refused by the gateway cache; the revoked device stays refused', async (t) => {
  const stack = await startStack(t);
  const { identity, crlNumber, file, fileBytes } = await revokedAtGateway(stack, 'pki-crl-forged');
  const ca = stack.authority.ca.deviceCa;
  // What an attacker would serve: a higher number, and the revoked serial gone.
  const genuineNext = crlSignedBy(stack, ca.privateKey!, crlNumber + 2n);
  const flipped = Buffer.from(genuineNext);
  flipped[flipped.length - 1] ^= 0x01; // still well-formed DER
  const forgeries: Array<[string, bigint, Buffer]> = [
    ['signed by another key with the device CA\'s name and key id', crlNumber + 1n, crlSignedBy(stack, generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey, crlNumber + 1n)],
    ['signature bytes altered', crlNumber + 2n, flipped],
  ];
  for (const [what, number, der] of forgeries) {
    // The authority serves it as its current CRL (a tampered store, or a man in the middle).
    const now = Date.now();
    assert.equal(await stack.authority.store.saveCrl({ issuer: 'device-ca', crlNumber: number, thisUpdate: now, nextUpdate: now + 3600_000, der }), true, what);
    assert.equal(await stack.authority.revocation.refresh(), true, `${what}: the authority serves it`);
    const served = await httpGet(`${stack.authority.url}/v1/crl.pem`, stack.rootPem);
    assert.equal(served.headers['x-crl-number'], number.toString(), `${what}: served`);

    // The gateway fetches it from the authority and refuses it.
    assert.equal(await stack.gateway.revocations.refresh(), false, `${what}: refresh refused it`);
    assert.equal(stack.gateway.revocations.crlNumber, crlNumber, `${what}: the gateway keeps its CRL`);
    assert.equal(stack.gateway.revocations.isRevoked(identity.serial.toUpperCase()), true, `${what}: the serial stays revoked`);
    assert.deepEqual(readFileSync(file), fileBytes, `${what}: the CRL on disk is untouched`);
    assert.equal((await tryConnect(stack, operationalOptions(identity), 20_000)).code, 5, `${what}: the revoked device is still refused`);
  }
});

test('an older CRL, or another CRL with the same number, never replaces the newer one in the gateway cache', async (t) => {
  const stack = await startStack(t);
  const id = 'pki-crl-rollback';
  const older = stack.authority.revocation.crl(); // before the revocation: does not list the device
  const { identity, crlNumber, file, fileBytes } = await revokedAtGateway(stack, id);
  assert.ok(older.crlNumber < crlNumber);
  const ca = stack.authority.ca.deviceCa;
  const candidates: Array<[string, Buffer]> = [
    ['the authority\'s previous CRL', older.der],
    ['a freshly signed CRL with a lower number', crlSignedBy(stack, ca.privateKey!, crlNumber - 1n)],
    ['a freshly signed CRL with the same number', crlSignedBy(stack, ca.privateKey!, crlNumber)],
  ];
  const updates: bigint[] = [];
  stack.gateway.revocations.on('updated', (u) => updates.push(u.crlNumber));
  for (const [what, der] of candidates) {
    // Each is genuine (the device CA signed it): only its number stands in the way.
    assert.equal(pkix.parseCrl(der, ca.certificate.publicKey).revoked.has(identity.serial.toUpperCase()), false, what);
    stack.gateway.revocations.applyDer(der, 'test');
    assert.equal(stack.gateway.revocations.crlNumber, crlNumber, `${what}: the number stays`);
    assert.equal(stack.gateway.revocations.isRevoked(identity.serial.toUpperCase()), true, `${what}: the serial stays revoked`);
    assert.deepEqual(stack.gateway.revocations.der, fileBytes, `${what}: the CRL held is the newer one`);
    assert.deepEqual(readFileSync(file), fileBytes, `${what}: the CRL on disk is the newer one`);
    assert.equal((await tryConnect(stack, operationalOptions(identity), 20_000)).code, 5, `${what}: the revoked device is still refused`);
  }
  assert.deepEqual(updates, []);
  // Positive control: a higher number does replace it.
  stack.gateway.revocations.applyDer(crlSignedBy(stack, ca.privateKey!, crlNumber + 1n, [identity.serial]), 'test');
  assert.equal(stack.gateway.revocations.crlNumber, crlNumber + 1n);
});

test('the device CA\'s CRL and the external-devices list (both signed by the device CA key) cannot be passed off as each other in the gateway caches', async (t) => {
  const stack = await startStack(t);
  const { identity, crlNumber, file, fileBytes } = await revokedAtGateway(stack, 'pki-crl-kind');
  const ca = stack.authority.ca.deviceCa;
  const external = stack.gateway.externalRevocations;
  await until(() => external.warm, 20_000, 'the gateway to fetch the external-devices list');
  // The authority's list is indirect (also while empty) and its CRL direct.
  assert.equal(pkix.parseCrl(stack.authority.revocation.crl('external-devices').der, ca.certificate.publicKey).indirect, true);
  assert.equal(pkix.parseCrl(stack.authority.revocation.crl('device-ca').der, ca.certificate.publicKey).indirect, false);
  const listNumber = external.crlNumber!;
  const now = Date.now();
  const indirect = (n: bigint) => pkix.encodeCrl({ issuerDer: ca.subjectDer, issuerKeyId: ca.keyId, issuerKey: ca.privateKey!, crlNumber: n, thisUpdate: new Date(now), nextUpdate: new Date(now + 3600_000), entries: [], indirect: true });
  // An indirect CRL with a higher number (e.g. the external list taken from Redis) as the device CA's CRL: refused.
  const refusedBefore = stack.gateway.revocations.refusedCount;
  assert.equal(stack.gateway.revocations.applyDer(indirect(crlNumber + 100n), 'test'), false);
  assert.equal(stack.gateway.revocations.refusedCount, refusedBefore + 1);
  assert.equal(stack.gateway.revocations.crlNumber, crlNumber);
  assert.equal(stack.gateway.revocations.isRevoked(identity.serial.toUpperCase()), true);
  assert.deepEqual(readFileSync(file), fileBytes);
  assert.equal((await tryConnect(stack, operationalOptions(identity), 20_000)).code, 5);
  // The device CA's (direct) CRL with a higher number as the external list: refused.
  assert.equal(external.applyDer(crlSignedBy(stack, ca.privateKey!, listNumber + 100n), 'test'), false);
  assert.equal(external.crlNumber, listNumber);
  // Positive control: an indirect one with a higher number is the external list's next.
  assert.equal(external.applyDer(indirect(listNumber + 1n), 'test'), true);
  assert.equal(external.crlNumber, listNumber + 1n);
  assert.ok(existsSync(join(stack.dir, 'gateway', 'external-devices.crl')));
});

test('a device CA CRL stored indirect by an earlier version (external entries in it) is signed again, direct, when revocation starts', async (t) => {
  const stack = await startStack(t);
  const ca = stack.authority.ca.deviceCa;
  const stored = stack.authority.revocation.crl('device-ca');
  const now = Date.now();
  // What an earlier version stored: the device CA's CRL with an external-issuer entry, fresh.
  const legacy = pkix.encodeCrl({
    issuerDer: ca.subjectDer, issuerKeyId: ca.keyId, issuerKey: ca.privateKey!, crlNumber: stored.crlNumber + 1n, thisUpdate: new Date(now), nextUpdate: new Date(now + 24 * 3600_000),
    entries: [{ serial: 'EE01', revokedAt: new Date(now), reason: 1, certificateIssuerDer: pkix.encodeName('Enterprise Issuing CA') }],
  });
  assert.equal(await stack.authority.store.saveCrl({ issuer: 'device-ca', crlNumber: stored.crlNumber + 1n, thisUpdate: now, nextUpdate: now + 24 * 3600_000, der: legacy }), true);
  const revocation = new Revocation({ store: stack.authority.store, ca: stack.authority.ca, events: new AuthorityEvents(), crlValidityHours: 24 });
  await revocation.start();
  t.after(() => revocation.stop());
  const crl = revocation.crl('device-ca');
  assert.equal(crl.crlNumber, stored.crlNumber + 2n, 'signed again on top of it');
  const parsed = pkix.parseCrl(crl.der, ca.certificate.publicKey);
  assert.equal(parsed.indirect, false);
  assert.equal(parsed.revoked.has('EE01'), false);
  assert.equal(revocation.crl('external-devices').crlNumber > 0n, true);
});
