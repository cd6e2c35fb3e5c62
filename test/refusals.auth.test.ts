/**
 * Authentication refusals: replayed or misplaced challenge answers, ddkg enrollment gates
 * and re-derivation with other hardware, and pki-signature birth certificates and keys.
 * Each is refused with its stable code, audited, and nothing is issued.
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { test } from 'node:test';
import { LeafDevice, ManufacturerCa, type DeviceCredential } from '../device/index.ts';
import type { InstructionMessage } from '../protocol/index.ts';
import { authorityRequest, gatewayIdentity } from './support/http.ts';
import { answerOrError, authMessage, bootstrap, register, rid } from './support/mqtt.ts';
import { assertNothingIssued, assertRefusalAudited } from './support/refusals.ts';
import { startStack, type Stack } from './support/stack.ts';

const pkiCredential = (stack: Stack, id: string) => stack.credential(id, 'pki-signature') as Extract<DeviceCredential, { method: 'pki-signature' }>;

/** A device with an explicit credential, through the SDK (bounded by its own timeout). */
const sdkDevice = (stack: Stack, id: string, credential: DeviceCredential, group?: string, flow?: 'compact' | 'classic') =>
  new LeafDevice({ deviceId: id, brokerUrl: stack.brokerUrl, ca: stack.rootPem, credential, timeoutMs: 5_000, ...(group ? { group } : {}), ...(flow ? { flow } : {}) });
/** The SDK's flows; the step that checks the proof: auth (classic) or enroll (compact). */
const FLOWS = [['compact', 'enroll'], ['classic', 'auth']] as const;

// ---- replay ----------------------------------------------------------------------------

test('the same auth message sent twice on one connection: the second is refused as replayed', async (t) => {
  const stack = await startStack(t);
  const id = 'auth-twice';
  const cred = pkiCredential(stack, id);
  const dev = await bootstrap(t, stack, id);
  const challenge = await register(dev, cred);
  const auth = authMessage(id, cred, challenge);
  await dev.send('auth', auth);
  await answerOrError<InstructionMessage>(dev, 'instruction', auth.requestId as string);

  await dev.send('auth', auth);
  await dev.expectError('replayed', auth.requestId as string);
  await assertRefusalAudited(stack, id, 'replayed', { action: 'auth' });
  assert.equal((await stack.authority.store.listAudit({ deviceId: id })).filter((a) => a.action === 'auth' && a.outcome === 'ok').length, 1);
});

test('a wrong answer burns the challenge: the right answer afterwards is replayed', async (t) => {
  const stack = await startStack(t);
  const id = 'auth-burn';
  const cred = pkiCredential(stack, id);
  const dev = await bootstrap(t, stack, id);
  const challenge = await register(dev, cred);

  const wrong = authMessage(id, cred, challenge, { signWith: generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey });
  await dev.send('auth', wrong);
  await dev.expectError('auth_failed', wrong.requestId as string);

  const right = authMessage(id, cred, challenge);
  await dev.send('auth', right);
  await dev.expectError('replayed', right.requestId as string);
  await assertRefusalAudited(stack, id, 'auth_failed', { requestId: wrong.requestId as string, action: 'auth' });
  await assertRefusalAudited(stack, id, 'replayed', { requestId: right.requestId as string, action: 'auth' });

  // Not authenticated: a CSR is refused, and nothing was issued.
  await dev.send('csr', { requestId: rid('csr'), csr: '-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n' });
  await dev.expectError('not_authenticated');
  await assertNothingIssued(stack, id);
});

test('a captured auth answer sent on another connection is refused with challenge_expired', async (t) => {
  const stack = await startStack(t);
  const id = 'auth-stolen';
  const cred = pkiCredential(stack, id);
  const victim = await bootstrap(t, stack, id);
  const challenge = await register(victim, cred);
  const captured = authMessage(id, cred, challenge);
  await victim.end();

  // Same device id, new connection: the challenge was not issued to it.
  const thief = await bootstrap(t, stack, id);
  await thief.send('auth', captured);
  const e = await thief.expectError('challenge_expired', captured.requestId as string);
  assert.match(e.message, /connection/);
  // The gateway refused it without asking the authority: the challenge is still unused there.
  const row = await stack.authority.store.getChallenge(challenge.challengeId);
  assert.equal(row?.usedAt, null);
  assert.equal((await stack.authority.store.listAudit({ deviceId: id })).filter((a) => a.action === 'auth').length, 0);
  await assertNothingIssued(stack, id);
  assert.equal((await stack.authority.store.getDevice(id))?.status, 'registered');
});

test('the authority refuses a replayed auth body even from its gateway (409 replayed)', async (t) => {
  const stack = await startStack(t);
  const id = 'auth-direct';
  const cred = pkiCredential(stack, id);
  const dev = await bootstrap(t, stack, id);
  const challenge = await register(dev, cred);
  const auth = authMessage(id, cred, challenge);
  await dev.send('auth', auth);
  await answerOrError<InstructionMessage>(dev, 'instruction', auth.requestId as string);

  // What a compromised gateway (or a captured request) would send: the same body again.
  const res = await authorityRequest(stack, '/v1/devices/auth', { body: { ...auth, deviceId: id }, identity: gatewayIdentity(stack) });
  assert.equal(res.status, 409);
  assert.equal(res.body.code, 'replayed');
  await assertRefusalAudited(stack, id, 'replayed', { requestId: auth.requestId as string, action: 'auth' });
  // Another device id cannot use the challenge either.
  const other = await authorityRequest(stack, '/v1/devices/auth', { body: { ...auth, deviceId: 'auth-other' }, identity: gatewayIdentity(stack) });
  assert.equal(other.status, 401);
  assert.equal(other.body.code, 'challenge_expired');
});

// ---- ddkg ------------------------------------------------------------------------------

test('ddkg: a device id not on the allow-list is refused with enrollment_required at register, and leaves no device row', async (t) => {
  const stack = await startStack(t);
  const id = 'plain-1'; // the default group allows ddkg-* only
  await assert.rejects(stack.device(id, 'ddkg').onboard(), { code: 'enrollment_required' });
  await assertRefusalAudited(stack, id, 'enrollment_required', { action: 'register' });
  await assertNothingIssued(stack, id);
  assert.equal(await stack.authority.store.getDevice(id), null);
});

for (const [flow, step] of FLOWS) {
test(`ddkg one-time-code group: no code is refused, a code enrolls once and only its device (${flow} flow)`, async (t) => {
  const stack = await startStack(t);
  const attrs = (id: string) => ({ cpu: `cpu-${id}`, mac: '02:00:00:00:00:09', board: 'rev-c' });

  await assert.rejects(sdkDevice(stack, 'coded-1', { method: 'ddkg', attributes: attrs('coded-1') }, 'coded', flow).onboard(), { code: 'enrollment_required' });
  await assertRefusalAudited(stack, 'coded-1', 'enrollment_required', { action: 'register' });
  await assertNothingIssued(stack, 'coded-1');
  assert.equal(await stack.authority.store.getDevice('coded-1'), null);

  const code = await stack.authority.createEnrollmentCode('coded-1', 'coded');
  const enrolled = await sdkDevice(stack, 'coded-1', { method: 'ddkg', attributes: attrs('coded-1'), enrollmentCode: code }, 'coded', flow).onboard();
  assert.equal((await stack.authority.store.listCertificates({ subjectId: 'coded-1' })).map((r) => r.serial).join(), enrolled.serial);
  assert.equal((await stack.authority.store.getDevice('coded-1'))?.status, 'enrolled');

  // The same code for a second device: bound to coded-1 and already used.
  await assert.rejects(sdkDevice(stack, 'coded-2', { method: 'ddkg', attributes: attrs('coded-2'), enrollmentCode: code }, 'coded', flow).onboard(), { code: 'enrollment_required' });
  await assertRefusalAudited(stack, 'coded-2', 'enrollment_required', { action: step });
  await assertNothingIssued(stack, 'coded-2');
  assert.equal((await stack.authority.store.getDevice('coded-2'))?.ddkgPublicKey, null);
});}


test('ddkg: an unused code bound to another device does not enroll this one', async (t) => {
  const stack = await startStack(t);
  await stack.authority.createEnrollmentCode('coded-a', 'coded');
  const codeB = await stack.authority.createEnrollmentCode('coded-b', 'coded');
  await assert.rejects(sdkDevice(stack, 'coded-a', { method: 'ddkg', attributes: { cpu: 'a' }, enrollmentCode: codeB }, 'coded').onboard(), { code: 'enrollment_required' });
  await assertNothingIssued(stack, 'coded-a');
  // The code was not burnt by the failed attempt: its own device still enrolls with it.
  await sdkDevice(stack, 'coded-b', { method: 'ddkg', attributes: { cpu: 'b' }, enrollmentCode: codeB }, 'coded').onboard();
});

test('ddkg: an enrollment code is only good for the group it was created for', async (t) => {
  const stack = await startStack(t);
  const id = 'coded-elsewhere';
  // The operator approves the device for the default group (allow-list, which does not list it)...
  const code = await stack.authority.createEnrollmentCode(id, 'default');
  // ...and the device uses that code to enroll in the one-time-code group instead.
  await assert.rejects(sdkDevice(stack, id, { method: 'ddkg', attributes: { cpu: 'x' }, enrollmentCode: code }, 'coded').onboard(), { code: 'enrollment_required' });
  await assertNothingIssued(stack, id);
});

for (const [flow, step] of FLOWS) {
test(`ddkg: re-deriving with other hardware attributes after enrolling is auth_failed (${flow} flow)`, async (t) => {
  const stack = await startStack(t);
  const id = 'ddkg-moved';
  const first = await stack.device(id, 'ddkg').onboard();
  const enrolledKey = (await stack.authority.store.getDevice(id))?.ddkgPublicKey;
  assert.ok(enrolledKey);

  // Same id, other hardware (a clone, or a swapped board): another derived key.
  const clone = sdkDevice(stack, id, { method: 'ddkg', attributes: { cpu: `cpu-${id}`, mac: '02:00:00:00:00:01', board: 'rev-X' } }, undefined, flow);
  await assert.rejects(clone.onboard(), { code: 'auth_failed' });
  await assertRefusalAudited(stack, id, 'auth_failed', { action: step });
  assert.deepEqual((await stack.authority.store.listCertificates({ subjectId: id })).map((r) => r.serial), [first.serial]);
  assert.equal((await stack.authority.store.getDevice(id))?.ddkgPublicKey, enrolledKey);
});}


// ---- pki-signature -----------------------------------------------------------------------

test('pki-signature: a birth certificate from an untrusted manufacturer CA is auth_failed', async (t) => {
  const stack = await startStack(t);
  const id = 'pki-rogue';
  const rogue = ManufacturerCa.create('Example Manufacturer CA'); // same name, other key
  await assert.rejects(sdkDevice(stack, id, { method: 'pki-signature', ...rogue.issueBirthCertificate(id) }).onboard(), { code: 'auth_failed' });
  await assertRefusalAudited(stack, id, 'auth_failed', { action: 'register' });
  await assertNothingIssued(stack, id);
  assert.equal(await stack.authority.store.getDevice(id), null);
});

test('pki-signature: a birth certificate naming another device is auth_failed', async (t) => {
  const stack = await startStack(t);
  const id = 'pki-me';
  const borrowed = stack.manufacturer.issueBirthCertificate('pki-someone-else');
  await assert.rejects(sdkDevice(stack, id, { method: 'pki-signature', ...borrowed }).onboard(), { code: 'auth_failed' });
  const row = await assertRefusalAudited(stack, id, 'auth_failed', { action: 'register' });
  assert.match(String(row.detail?.message), /does not name device pki-me/);
  await assertNothingIssued(stack, id);
  assert.equal(await stack.authority.store.getDevice(id), null);
  assert.equal(await stack.authority.store.getDevice('pki-someone-else'), null);
});

for (const [flow, step] of FLOWS) {
test(`pki-signature: a challenge signed with another key than the birth certificate's is auth_failed (${flow} flow)`, async (t) => {
  const stack = await startStack(t);
  const id = 'pki-wrongkey';
  const { birthCert } = stack.manufacturer.issueBirthCertificate(id);
  const otherKey = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey;
  await assert.rejects(sdkDevice(stack, id, { method: 'pki-signature', birthCert, factoryKey: otherKey }, undefined, flow).onboard(), { code: 'auth_failed' });
  await assertRefusalAudited(stack, id, 'auth_failed', { action: step });
  await assertNothingIssued(stack, id);
  assert.equal((await stack.authority.store.getDevice(id))?.status, 'registered');
});}


test('a challenge expires by time: answered at its last millisecond it is accepted, a second later challenge_expired', async (t) => {
  // The authority's clock stands still unless the test moves it.
  let now = Date.now();
  const stack = await startStack(t, { authorityNow: () => now });
  for (const [label, offsetMs, expected] of [['just before expiry', -1, 'instruction'], ['just after expiry', 1000, 'challenge_expired']] as const) {
    const id = `dev-expiry-${offsetMs < 0 ? 'before' : 'after'}`;
    const cred = stack.credential(id, 'pki-signature');
    const dev = await bootstrap(t, stack, id);
    const challenge = await register(dev, cred);
    assert.equal(new Date(challenge.expiresAt).getTime(), now + 120_000, 'challengeTtlSeconds from the authority clock');
    now = new Date(challenge.expiresAt).getTime() + offsetMs;
    const auth = authMessage(id, cred, challenge);
    await dev.send('auth', auth);
    if (expected === 'instruction') {
      const instruction = await answerOrError<InstructionMessage>(dev, 'instruction', auth.requestId as string);
      assert.equal(instruction.requestId, auth.requestId, label);
    } else {
      await assert.rejects(answerOrError(dev, 'instruction', auth.requestId as string), (err: Error & { body?: { code: string; requestId?: string } }) => {
        assert.equal(err.body?.code, 'challenge_expired', label);
        assert.equal(err.body?.requestId, auth.requestId, 'the refusal names the request');
        return true;
      });
      await assertRefusalAudited(stack, id, 'challenge_expired', { action: 'auth', requestId: auth.requestId as string });
    }
    now = Date.now();
  }
});
