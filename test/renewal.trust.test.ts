/**
 * Renewal trust (issue 14): a gateway renews only the devices enrolled through it, and only
 * with the device's own proof -- a signature by the CURRENT certificate's key over the new
 * CSR, the requestId and a recent time. Two real enrolled gateways, raw HTTPS over each
 * gateway's own mTLS identity, a real authority; renewal events reach only the device's
 * gateway.
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import https from 'node:https';
import { test } from 'node:test';
import { LeafgateError, pkix, validateCsr, validateRenewalCsr } from '../protocol/index.ts';
import { LeafDevice, renewalProof, type DeviceIdentity } from '../device/index.ts';
import type { DevicePolicy } from '../authority/index.ts';
import { authorityRequest, gatewayIdentity, type ClientIdentity } from './support/http.ts';
import { startStack, type Stack } from './support/stack.ts';
import { until } from './support/wait.ts';

const GW_B = 'gw-b';

/** A well-formed renewal CSR (fresh P-256 key, CN = device id) for a device onboarded with the default policy. */
function freshCsr(deviceId: string): { csr: string; key: KeyObject } {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  return { csr: pkix.buildCsr({ commonName: deviceId, privateKey, publicKey }), key: privateKey };
}

function renewBody(id: DeviceIdentity, requestId: string, csr: string, proof?: { proof: string; signedAt: string }): Record<string, unknown> {
  return { deviceId: id.deviceId, requestId, csr, currentSerial: id.serial, ...proof };
}

async function renew(stack: Stack, identity: ClientIdentity, body: Record<string, unknown>) {
  return authorityRequest(stack, '/v1/devices/renew', { body, identity });
}

/** The device's certificates by serial -> status: nothing issued means exactly the one it had. */
async function certs(stack: Stack, deviceId: string): Promise<Record<string, string>> {
  return Object.fromEntries((await stack.authority.store.listCertificates({ subjectId: deviceId })).map((c) => [c.serial, c.status]));
}

async function refusals(stack: Stack, deviceId: string, code: string) {
  return (await stack.authority.store.listAudit({ deviceId })).filter((a) => a.action === 'renew' && a.outcome === 'refused' && a.code === code);
}

function deviceOn(stack: Stack, brokerPort: number, id: string): LeafDevice {
  return new LeafDevice({ deviceId: id, brokerUrl: `mqtts://127.0.0.1:${brokerPort}`, ca: stack.rootPem, credential: stack.credential(id, 'pki-signature'), timeoutMs: 10_000 });
}

test('another gateway cannot renew a device enrolled through gateway A, even with its serial, a good CSR and a valid proof', async (t) => {
  const stack = await startStack(t);
  await stack.addGateway(GW_B);
  const first = await stack.device('trust-a1', 'pki-signature').onboard();
  const { csr } = freshCsr('trust-a1');
  // Everything right -- except the gateway asking.
  const body = renewBody(first, 'steal-1', csr, renewalProof('trust-a1', 'steal-1', csr, first.privateKey));

  const stolen = await renew(stack, gatewayIdentity(stack, GW_B), body);
  assert.deepEqual([stolen.status, stolen.body.code], [404, 'unknown_device'], stolen.text);
  assert.deepEqual(await certs(stack, 'trust-a1'), { [first.serial]: 'active' }, 'nothing issued');
  const [audited] = await refusals(stack, 'trust-a1', 'unknown_device');
  assert.equal(audited?.gatewayId, GW_B, 'the refusal is audited with the asking gateway');
  assert.equal(audited?.detail?.enrolledThrough, stack.gatewayId);

  // A serial that is not this device's gets the same answer from B: no oracle on serials.
  const guessed = await renew(stack, gatewayIdentity(stack, GW_B), { ...body, requestId: 'steal-2', currentSerial: 'ABCDEF01' });
  assert.deepEqual([guessed.status, guessed.body.code], [404, 'unknown_device']);

  // Positive control: the very same request through the device's own gateway is answered.
  const own = await renew(stack, gatewayIdentity(stack), body);
  assert.equal(own.status, 200, own.text);
  assert.deepEqual(await certs(stack, 'trust-a1'), { [first.serial]: 'superseded', [own.body.serial]: 'active' });
});

test('the device\'s own gateway needs the device\'s proof: missing, wrong key, another CSR, another request, too old -- all refused', async (t) => {
  let offsetMs = 0;
  const stack = await startStack(t, { authorityNow: () => Date.now() + offsetMs });
  const first = await stack.device('trust-p1', 'pki-signature').onboard();
  const gw = gatewayIdentity(stack);
  const { csr } = freshCsr('trust-p1');
  const refuse = async (what: string, body: Record<string, unknown>, reason: string) => {
    const res = await renew(stack, gw, body);
    assert.deepEqual([res.status, res.body?.code], [401, 'auth_failed'], `${what}: ${res.text}`);
    const audited = (await refusals(stack, 'trust-p1', 'auth_failed')).find((a) => a.requestId === body.requestId);
    assert.equal(audited?.detail?.proof, reason, `${what} is audited`);
    assert.deepEqual(await certs(stack, 'trust-p1'), { [first.serial]: 'active' }, `${what}: nothing issued`);
  };

  // The gateway alone (a gateway taken over): no proof.
  await refuse('no proof', renewBody(first, 'p-none', csr), 'missing');
  // Signed by a key that is not the current certificate's (e.g. the gateway's own, or the new one).
  const other = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey;
  await refuse('wrong key', renewBody(first, 'p-wrong', csr, renewalProof('trust-p1', 'p-wrong', csr, other)), 'bad_signature');
  // A proof captured for one CSR, replayed with another (the gateway's own key in the CSR).
  const captured = renewalProof('trust-p1', 'p-replay', csr, first.privateKey);
  const { csr: attackerCsr } = freshCsr('trust-p1');
  await refuse('proof for another CSR', renewBody(first, 'p-replay', attackerCsr, captured), 'bad_signature');
  // The same proof under another requestId.
  await refuse('proof for another request', renewBody(first, 'p-replay-2', csr, captured), 'bad_signature');
  // A proof for another device id (signed by this device's key, but naming another).
  await refuse('proof for another device', renewBody(first, 'p-dev', csr, renewalProof('trust-p2', 'p-dev', csr, first.privateKey)), 'bad_signature');
  // Valid, but older than the window (10 min + 5 min skew by default): the authority's clock moved 20 min on.
  const old = renewalProof('trust-p1', 'p-old', csr, first.privateKey);
  offsetMs = 20 * 60_000;
  await refuse('too old', renewBody(first, 'p-old', csr, old), 'stale');
  // ... and as far in the future.
  offsetMs = -20 * 60_000;
  await refuse('from the future', renewBody(first, 'p-future', csr, renewalProof('trust-p1', 'p-future', csr, first.privateKey)), 'stale');
  offsetMs = 0;

  // The same proof, fresh, for its own CSR and request: renewed, audited as verified.
  const ok = await renew(stack, gw, renewBody(first, 'p-replay', csr, captured));
  assert.equal(ok.status, 200, ok.text);
  const audit = await stack.authority.store.listAudit({ deviceId: 'trust-p1' });
  assert.equal(audit.find((a) => a.action === 'renew' && a.outcome === 'ok')?.detail?.proof, 'verified');
  // Repeated: the stored answer, never a second certificate.
  const again = await renew(stack, gw, renewBody(first, 'p-replay', csr, captured));
  assert.equal(again.body.serial, ok.body.serial);
  assert.deepEqual(await certs(stack, 'trust-p1'), { [first.serial]: 'superseded', [ok.body.serial]: 'active' });
});

test('with renewal.requireDeviceProof off, a renewal without proof is accepted from the device\'s own gateway only, and audited as such', async (t) => {
  const stack = await startStack(t, { policy: { renewal: { requireDeviceProof: false } as DevicePolicy['renewal'] } });
  await stack.addGateway(GW_B);
  const first = await stack.device('trust-l1', 'pki-signature').onboard();
  const { csr } = freshCsr('trust-l1');

  const fromB = await renew(stack, gatewayIdentity(stack, GW_B), renewBody(first, 'l-1', csr));
  assert.deepEqual([fromB.status, fromB.body.code], [404, 'unknown_device']);
  // A proof that is present is still checked.
  const other = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey;
  const bad = await renew(stack, gatewayIdentity(stack), renewBody(first, 'l-2', csr, renewalProof('trust-l1', 'l-2', csr, other)));
  assert.deepEqual([bad.status, bad.body.code], [401, 'auth_failed']);
  assert.deepEqual(await certs(stack, 'trust-l1'), { [first.serial]: 'active' });

  const legacy = await renew(stack, gatewayIdentity(stack), renewBody(first, 'l-1', csr));
  assert.equal(legacy.status, 200, legacy.text);
  const row = (await stack.authority.store.listAudit({ deviceId: 'trust-l1' })).find((a) => a.action === 'renew' && a.outcome === 'ok');
  assert.equal(row?.detail?.proof, 'absent');
  assert.equal(row?.gatewayId, stack.gatewayId);
});

/** Reads /v1/events as a gateway: every event, in order. */
function eventStream(stack: Stack, identity: ClientIdentity): { events: Array<{ event: string; data: any }>; close(): void } {
  const events: Array<{ event: string; data: any }> = [];
  const req = https.request(new URL('/v1/events', stack.authority.url), { agent: false, ca: stack.rootPem, key: identity.key, cert: identity.cert }, (res) => {
    let buf = '';
    res.setEncoding('utf8');
    res.on('data', (chunk: string) => {
      buf += chunk;
      for (let i = buf.indexOf('\n\n'); i >= 0; i = buf.indexOf('\n\n')) {
        const block = buf.slice(0, i);
        buf = buf.slice(i + 2);
        const event = /^event: (.*)$/m.exec(block)?.[1];
        const data = /^data: (.*)$/m.exec(block)?.[1];
        if (event && data) events.push({ event, data: JSON.parse(data) });
      }
    });
  });
  req.on('error', () => undefined);
  req.end();
  return { events, close: () => req.destroy() };
}

const dueSerials = (events: Array<{ event: string; data: any }>) => events.filter((e) => e.event === 'renewal-due').flatMap((e) => (e.data.devices as Array<{ serial: string }>).map((d) => d.serial));

test('renewal-due events (on connect and announced) reach only the gateway the device is enrolled through', async (t) => {
  const stack = await startStack(t, { policy: { renewAfterFraction: 0.001, validityDays: 1 } });
  const gwB = await stack.addGateway(GW_B);
  const onA = await stack.device('trust-e-a', 'pki-signature').onboard();
  const onB = await deviceOn(stack, gwB.port, 'trust-e-b').onboard();

  const a = eventStream(stack, gatewayIdentity(stack));
  const b = eventStream(stack, gatewayIdentity(stack, GW_B));
  t.after(() => (a.close(), b.close()));
  // On connect: each gateway's own due list.
  await until(() => dueSerials(a.events).includes(onA.serial) && dueSerials(b.events).includes(onB.serial), 20_000, 'due lists on connect');
  // Announced twice: once B holds its own device from the second announcement, everything of
  // the first one has been written to its stream (one stream, in order).
  assert.equal(await stack.authority.renewals.announce(), 2);
  assert.equal(await stack.authority.renewals.announce(), 2);
  await until(() => dueSerials(a.events).filter((s) => s === onA.serial).length >= 3 && dueSerials(b.events).filter((s) => s === onB.serial).length >= 3, 20_000, 'announcements');
  assert.ok(!dueSerials(b.events).includes(onA.serial), 'B never hears of A\'s device');
  assert.ok(!dueSerials(a.events).includes(onB.serial), 'A never hears of B\'s device');
  assert.ok(!JSON.stringify(b.events).includes('trust-e-a'), 'not even its id');

  // The real gateways: A keeps A's device due, B only its own.
  await until(() => stack.gateway.renewals.get(onA.serial) && gwB.renewals.get(onB.serial), 20_000, 'gateway trackers');
  assert.equal(gwB.renewals.get(onA.serial), undefined);
  assert.equal(stack.gateway.renewals.get(onB.serial), undefined);
});

test('a device onboarded again through another gateway moves to it at issuance (audited); only the new gateway renews it then', async (t) => {
  const stack = await startStack(t);
  const gwB = await stack.addGateway(GW_B);
  const first = await stack.device('trust-m1', 'pki-signature').onboard();
  assert.equal((await stack.authority.store.getDevice('trust-m1'))?.gatewayId, stack.gatewayId);

  const second = await deviceOn(stack, gwB.port, 'trust-m1').onboard();
  assert.equal((await stack.authority.store.getDevice('trust-m1'))?.gatewayId, GW_B);
  const issue = (await stack.authority.store.listAudit({ deviceId: 'trust-m1' })).find((a) => a.action === 'issue' && a.serial === second.serial);
  assert.equal(issue?.gatewayId, GW_B);
  assert.equal(issue?.detail?.movedFromGateway, stack.gatewayId, 'the move is recorded');

  // A no longer acts for the device, with either certificate.
  for (const id of [first, second]) {
    const { csr } = freshCsr('trust-m1');
    const res = await renew(stack, gatewayIdentity(stack), renewBody(id, `m-a-${id.serial}`, csr, renewalProof('trust-m1', `m-a-${id.serial}`, csr, id.privateKey)));
    assert.deepEqual([res.status, res.body.code], [404, 'unknown_device']);
  }
  const { csr } = freshCsr('trust-m1');
  const res = await renew(stack, gatewayIdentity(stack, GW_B), renewBody(second, 'm-b', csr, renewalProof('trust-m1', 'm-b', csr, second.privateKey)));
  assert.equal(res.status, 200, res.text);
});

test('the proof fields are validated (types, sizes, both or neither) and only renewal CSRs may carry them', () => {
  const base = { requestId: 'r-1', csr: '-----BEGIN CERTIFICATE REQUEST-----\nAA==\n-----END CERTIFICATE REQUEST-----\n' };
  const proof = { proof: Buffer.alloc(72, 1).toString('base64'), signedAt: '2025-01-31T12:00:00.000Z' };
  assert.deepEqual(validateRenewalCsr({ ...base }), base, 'without proof (legacy)');
  assert.deepEqual(validateRenewalCsr({ ...base, ...proof, deviceId: 'd' }), { ...base, ...proof });
  assert.deepEqual(validateRenewalCsr({ ...base, ...proof, signedAt: '2025-01-31T12:00:00Z' }).signedAt, '2025-01-31T12:00:00Z');
  const bad = (o: Record<string, unknown>, what: string) =>
    assert.throws(() => validateRenewalCsr(o), (e: unknown) => e instanceof LeafgateError && e.code === 'bad_request', what);
  bad({ ...base, proof: proof.proof }, 'proof without signedAt');
  bad({ ...base, signedAt: proof.signedAt }, 'signedAt without proof');
  bad({ ...base, ...proof, proof: 'A'.repeat(2052) }, 'proof over 2048 characters');
  bad({ ...base, ...proof, proof: 'not base64!' }, 'proof not base64');
  bad({ ...base, ...proof, proof: 42 }, 'proof not a string');
  bad({ ...base, ...proof, signedAt: 1738324800000 }, 'signedAt not a string');
  bad({ ...base, ...proof, signedAt: '2025-01-31 12:00:00' }, 'signedAt not ISO UTC');
  bad({ ...base, ...proof, signedAt: '2025-01-31T12:00:00.000+01:00' }, 'signedAt with an offset');
  bad({ ...base, ...proof, signedAt: '2025-13-45T12:00:00Z' }, 'signedAt not a date');
  bad({ ...base, ...proof, extra: 1 }, 'unknown field');
  // A first issuance (bootstrap connection) carries no proof.
  assert.throws(() => validateCsr({ ...base, ...proof }), (e: unknown) => e instanceof LeafgateError && e.code === 'bad_request');
});
