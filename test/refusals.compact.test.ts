/**
 * The compact onboarding (begin -> offer, enroll -> enrolled) refuses what it must: a CSR
 * that the signature does not cover (what a relaying gateway could substitute), a stranger
 * claiming the id, a spent or expired challenge, a classic challenge; its refusals arrive on
 * the answer topic; and `allowClassicFlow: false` refuses the classic CSR. Real stack, real
 * MQTT clients; the authority's clock is moved, never waited for.
 */
import assert from 'node:assert/strict';
import { X509Certificate, sign, type KeyObject } from 'node:crypto';
import { test, type TestContext } from 'node:test';
import { enrollSigningInput, pkix, type CertMessage, type ErrorBody, type OfferMessage } from '../protocol/index.ts';
import { LeafDevice, MemoryStateStore, type DeviceCredential } from '../device/index.ts';
import { authenticate, bootstrap, registerMessage, rid, type RawDevice } from './support/mqtt.ts';
import { assertNothingIssued, assertRefusalAudited, csrFor, ecKey } from './support/refusals.ts';
import { startStack, type Stack } from './support/stack.ts';


let skewMs = 0;
let shared: Promise<Stack> | undefined;
/** One stack for the file (closed after the last test), its authority clock movable. */
function stackFor(): Promise<Stack> {
  shared ??= startStack(null, { authorityNow: () => Date.now() + skewMs });
  return shared;
}
test.after(async () => (await shared)?.close());

async function begin(dev: RawDevice, cred: DeviceCredential): Promise<OfferMessage> {
  const msg = registerMessage(cred, { requestId: rid('begin') });
  await dev.send('begin', msg);
  const offer = await dev.next<OfferMessage & Partial<ErrorBody>>('offer', { requestId: msg.requestId as string });
  assert.equal(offer.code, undefined, `begin refused: ${JSON.stringify(offer)}`);
  return offer;
}

/** An enroll for `offer`: a CSR for `csrKey`, signed (over the challenge and `signedCsr`) by `authKey`. */
function enrollMessage(deviceId: string, offer: OfferMessage, authKey: KeyObject, opts: { csr: string; signedCsr?: string }): Record<string, unknown> {
  const der = pkix.fromPem(opts.signedCsr ?? opts.csr, 'CERTIFICATE REQUEST');
  return {
    requestId: rid('enroll'), challengeId: offer.challengeId, csr: opts.csr,
    signature: sign('sha256', enrollSigningInput(deviceId, offer.challengeId, offer.nonce, der), authKey).toString('base64'),
  };
}

async function enroll(dev: RawDevice, msg: Record<string, unknown>): Promise<CertMessage & Partial<ErrorBody>> {
  await dev.send('enroll', msg);
  return dev.next('enrolled', { requestId: msg.requestId as string });
}

const factoryKeyOf = (cred: DeviceCredential) => (cred as { factoryKey: KeyObject }).factoryKey;

test('the signature covers the CSR: a substituted CSR is refused (auth_failed) and the challenge still serves the device', async (t: TestContext) => {
  const stack = await stackFor();
  const id = 'cmp-subst';
  const cred = stack.credential(id, 'pki-signature');
  const dev = await bootstrap(t, stack, id);
  const offer = await begin(dev, cred);
  const deviceKey = ecKey('prime256v1');
  const genuine = csrFor(offer.instruction as never, deviceKey);
  // What a relaying gateway could try: the device's signature, its own CSR (a key it holds).
  const swapped = enrollMessage(id, offer, factoryKeyOf(cred), { csr: csrFor(offer.instruction as never, ecKey('prime256v1')), signedCsr: genuine });
  const refused = await enroll(dev, swapped);
  assert.equal(refused.code, 'auth_failed');
  assert.equal(refused.requestId, swapped.requestId);
  await assertNothingIssued(stack, id);
  await assertRefusalAudited(stack, id, 'auth_failed', { action: 'enroll', requestId: swapped.requestId as string });

  // A signature that did not verify spent nothing: the genuine answer, on a NEW connection, gets the certificate.
  await dev.end();
  const again = await bootstrap(t, stack, id);
  const cert = await enroll(again, enrollMessage(id, offer, factoryKeyOf(cred), { csr: genuine }));
  assert.equal(cert.code, undefined, JSON.stringify(cert));
  assert.ok(new X509Certificate(cert.certificate).publicKey.equals(deviceKey.publicKey));
});

test('a client claiming the id without the key gets nothing and cannot make the device fail', async (t: TestContext) => {
  const stack = await stackFor();
  const id = 'cmp-stranger';
  const cred = stack.credential(id, 'pki-signature');
  const dev = await bootstrap(t, stack, id);
  const offer = await begin(dev, cred);
  const deviceKey = ecKey('prime256v1');
  const genuine = enrollMessage(id, offer, factoryKeyOf(cred), { csr: csrFor(offer.instruction as never, deviceKey) });
  await dev.end();

  // The stranger holds the id meanwhile (the birth certificate is public: it can begin too),
  // knows the device's challenge id, and answers it -- and its own offer -- with its own key.
  const stranger = await bootstrap(t, stack, id);
  const strangerKey = ecKey('prime256v1');
  const own = await begin(stranger, cred);
  for (const o of [offer, own]) {
    const r = await enroll(stranger, enrollMessage(id, o, strangerKey.privateKey, { csr: csrFor(o.instruction as never, strangerKey) }));
    assert.equal(r.code, 'auth_failed');
  }
  await assertNothingIssued(stack, id);
  await stranger.end();

  const back = await bootstrap(t, stack, id);
  const cert = await enroll(back, genuine);
  assert.equal(cert.code, undefined, JSON.stringify(cert));
  assert.ok(new X509Certificate(cert.certificate).publicKey.equals(deviceKey.publicKey));
  assert.equal((await stack.authority.store.listCertificates({ subjectId: id })).length, 1);
});

test('enroll is single use and idempotent by requestId: the same message gets the same certificate, another gets replayed', async (t: TestContext) => {
  const stack = await stackFor();
  const id = 'cmp-once';
  const cred = stack.credential(id, 'pki-signature');
  const dev = await bootstrap(t, stack, id);
  const offer = await begin(dev, cred);
  const msg = enrollMessage(id, offer, factoryKeyOf(cred), { csr: csrFor(offer.instruction as never, ecKey('prime256v1')) });
  const first = await enroll(dev, msg);
  assert.equal(first.code, undefined, JSON.stringify(first));
  // The identical message (a lost answer), on another connection and after the challenge expired.
  await dev.end();
  skewMs = 10 * 60_000;
  t.after(() => (skewMs = 0));
  const again = await bootstrap(t, stack, id);
  const repeat = await enroll(again, msg);
  assert.equal(repeat.serial, first.serial);
  skewMs = 0;
  // Same requestId, another body: a conflict; a new request on the spent challenge: replayed.
  const conflict = await enroll(again, { ...enrollMessage(id, offer, factoryKeyOf(cred), { csr: csrFor(offer.instruction as never, ecKey('prime256v1')) }), requestId: msg.requestId });
  assert.equal(conflict.code, 'request_conflict');
  const replay = await enroll(again, enrollMessage(id, offer, factoryKeyOf(cred), { csr: csrFor(offer.instruction as never, ecKey('prime256v1')) }));
  assert.equal(replay.code, 'replayed');
  assert.equal((await stack.authority.store.listCertificates({ subjectId: id })).length, 1);
});

test('an expired challenge, a classic challenge and a CSR off the instruction are refused; a verified answer is spent even then', async (t: TestContext) => {
  const stack = await stackFor();
  const id = 'cmp-refused';
  const cred = stack.credential(id, 'pki-signature');
  const dev = await bootstrap(t, stack, id);

  const offer = await begin(dev, cred);
  skewMs = 121_000;
  t.after(() => (skewMs = 0));
  const late = await enroll(dev, enrollMessage(id, offer, factoryKeyOf(cred), { csr: csrFor(offer.instruction as never, ecKey('prime256v1')) }));
  assert.equal(late.code, 'challenge_expired');
  skewMs = 0;

  // A classic challenge (register) is answered by auth, never by enroll.
  const reg = registerMessage(cred);
  await dev.send('register', reg);
  const classic = await dev.next<OfferMessage>('challenge', { requestId: reg.requestId as string });
  assert.equal((classic as Partial<OfferMessage>).instruction, undefined);
  const wrongFlow = await enroll(dev, enrollMessage(id, { ...classic, instruction: offer.instruction }, factoryKeyOf(cred), { csr: csrFor(offer.instruction as never, ecKey('prime256v1')) }));
  assert.equal(wrongFlow.code, 'challenge_expired');
  assert.match(String(wrongFlow.message), /classic/);

  // The wrong key type for the instruction (EC P-384 where P-256 is asked): policy_violation,
  // and the challenge is spent: the corrected CSR needs a new begin.
  const offer2 = await begin(dev, cred);
  const bad = await enroll(dev, enrollMessage(id, offer2, factoryKeyOf(cred), { csr: csrFor(offer2.instruction as never, ecKey('secp384r1')) }));
  assert.equal(bad.code, 'policy_violation');
  const retry = await enroll(dev, enrollMessage(id, offer2, factoryKeyOf(cred), { csr: csrFor(offer2.instruction as never, ecKey('prime256v1')) }));
  assert.equal(retry.code, 'replayed');
  await assertNothingIssued(stack, id);
});

test('refusals of begin and enroll arrive on their answer topic (down/offer, down/enrolled), the gateway\'s own included', async (t: TestContext) => {
  const stack = await stackFor();
  const id = 'cmp-topics';
  const dev = await bootstrap(t, stack, id);
  await dev.send('begin', 'not json');
  assert.equal((await dev.next<ErrorBody>('offer')).code, 'malformed_json');
  await dev.send('enroll', { requestId: 'e1', challengeId: 'x' });
  const schema = await dev.next<ErrorBody>('enrolled');
  assert.equal(schema.code, 'bad_request');
  assert.equal(schema.requestId, 'e1');
  // Refused by the gateway's payload cap, before the relay: still on down/enrolled.
  await dev.send('enroll', { requestId: 'e2', pad: 'x'.repeat(17 * 1024) });
  const big = await dev.next<ErrorBody>('enrolled');
  assert.equal(big.code, 'payload_too_large');
  assert.equal(big.requestId, 'e2');
  assert.equal(dev.messages.filter((m) => m.kind === 'error').length, 0);
});

test('allowClassicFlow: false refuses the classic CSR with policy_violation; the compact flow still onboards', async (t: TestContext) => {
  const stack = await startStack(t, { policy: { allowClassicFlow: false } });
  const id = 'cmp-policy';
  const cred = stack.credential(id, 'pki-signature');
  const dev = await bootstrap(t, stack, id);
  const instruction = await authenticate(dev, cred);
  const csr = { requestId: rid('csr'), csr: csrFor(instruction, ecKey('prime256v1')) };
  await dev.send('csr', csr);
  const e = await dev.nextError({ requestId: csr.requestId });
  assert.equal(e.code, 'policy_violation');
  assert.match(e.message, /compact/);
  await assertNothingIssued(stack, id);
  // The authenticated bootstrap session holds the id (a new claim cannot displace it): leave first.
  await dev.end();

  const result = await stack.device(id, 'pki-signature', { credential: cred }).onboard();
  assert.equal((await stack.authority.store.listCertificates({ subjectId: id })).map((c) => c.serial).join(), result.serial);
});

test('begin and enroll spend the onboarding budget of the id at that address; the refusal comes on the answer topic', async (t: TestContext) => {
  const stack = await startStack(t, { gateway: { rateLimits: { onboardingsPerDevice: { points: 2, durationSeconds: 3600 } } } });
  const id = 'cmp-budget';
  const cred = stack.credential(id, 'pki-signature');
  const dev = await bootstrap(t, stack, id);
  const offer = await begin(dev, cred);
  const refused = await enroll(dev, enrollMessage(id, offer, ecKey('prime256v1').privateKey, { csr: csrFor(offer.instruction as never, ecKey('prime256v1')) }));
  assert.equal(refused.code, 'auth_failed');
  await dev.send('begin', registerMessage(cred, { requestId: rid('begin') }));
  const limited = await dev.next<ErrorBody>('offer');
  assert.equal(limited.code, 'rate_limited');
  assert.ok((limited.retryAfterMs ?? 0) > 0);
});

test('SDK resume: a stored enroll is re-sent as it is and gets the same certificate; one whose challenge was spent starts a fresh begin', async (t: TestContext) => {
  const stack = await stackFor();
  for (const spent of [false, true]) {
    const id = spent ? 'cmp-sdk-spent' : 'cmp-sdk-resend';
    const cred = stack.credential(id, 'pki-signature');
    const dev = await bootstrap(t, stack, id);
    const offer = await begin(dev, cred);
    const key = ecKey('prime256v1');
    const msg = enrollMessage(id, offer, factoryKeyOf(cred), { csr: csrFor(offer.instruction as never, key) });
    let serial: string | undefined;
    if (spent) {
      // A verified answer with a wrong CSR spends the challenge, and no certificate exists.
      const r = await enroll(dev, enrollMessage(id, offer, factoryKeyOf(cred), { csr: csrFor(offer.instruction as never, ecKey('secp384r1')) }));
      assert.equal(r.code, 'policy_violation');
    } else {
      serial = (await enroll(dev, msg)).serial; // issued; the device "lost" the answer
      assert.ok(serial);
    }
    await dev.end();
    // What the SDK had stored before sending (a crash, a drop): the request and its key.
    const state = new MemoryStateStore();
    state.set('onboarding', JSON.stringify({
      flow: 'compact', requestId: msg.requestId, csr: msg.csr, key: key.privateKey.export({ type: 'pkcs8', format: 'pem' }), keyType: 'ec', keySize: 256, challengeId: msg.challengeId, signature: msg.signature,
    }));
    const result = await new LeafDevice({ deviceId: id, brokerUrl: stack.brokerUrl, ca: stack.rootPem, credential: cred, timeoutMs: 10_000, state }).onboard();
    assert.equal(state.get('onboarding'), undefined);
    const certs = await stack.authority.store.listCertificates({ subjectId: id });
    assert.deepEqual(certs.map((c) => c.serial), [result.serial]);
    if (!spent) {
      assert.equal(result.serial, serial);
      assert.ok(new X509Certificate(result.certificate).publicKey.equals(key.publicKey));
    } else {
      assert.equal(new X509Certificate(result.certificate).publicKey.equals(key.publicKey), false, 'a fresh begin makes a fresh key');
      const audit = (await stack.authority.store.listAudit({ deviceId: id })).reverse().map((a) => `${a.action}:${a.code ?? a.outcome}`);
      assert.deepEqual(audit, ['register:ok', 'enroll:policy_violation', 'enroll:replayed', 'register:ok', 'issue:ok']);
    }
  }
});
