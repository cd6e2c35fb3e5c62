/**
 * CSR refusals, end to end over the real broker and authority: every bad CSR is refused
 * on down/error with its stable code, audited, and nothing is issued. A refused CSR does
 * not burn the authentication, so each test ends with a positive control where it helps.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { X509Certificate } from 'node:crypto';
import { pkix, type CertMessage } from '../protocol/index.ts';
import { generateKeyForInstruction } from '../device/index.ts';
import { answerOrError, authenticate, bootstrap, register, rid } from './support/mqtt.ts';
import { assertNothingIssued, assertRefusalAudited, csrFor, ecKey, rsaKey } from './support/refusals.ts';
import { startStack } from './support/stack.ts';

/** Flips the last byte of the DER, which is inside the signature BIT STRING (its last element). */
function corruptSignature(csrPem: string): string {
  const der = Buffer.from(pkix.fromPem(csrPem, 'CERTIFICATE REQUEST'));
  const [, , sigNode] = pkix.der.children(pkix.der.parseDer(der));
  assert.equal(sigNode.tag, pkix.der.TAG.BIT_STRING);
  // The signature BIT STRING ends where the request ends.
  assert.equal(sigNode.raw.byteOffset + sigNode.raw.length - der.byteOffset, der.length);
  der[der.length - 1] ^= 0x01;
  // Still well-formed DER: only the signature value changed.
  assert.equal(pkix.der.children(pkix.der.parseDer(der)).length, 3);
  return pkix.toPem(der, 'CERTIFICATE REQUEST');
}

test('a CSR whose signature does not verify is refused with bad_csr, a garbage PEM body too', async (t) => {
  const stack = await startStack(t);
  const id = 'csr-badsig';
  const cred = stack.credential(id, 'pki-signature');
  const dev = await bootstrap(t, stack, id);
  const instruction = await authenticate(dev, cred);
  const pair = await generateKeyForInstruction(instruction);
  const good = csrFor(instruction, pair);

  const flipped = rid('csr');
  await dev.send('csr', { requestId: flipped, csr: corruptSignature(good) });
  const e1 = await dev.expectError('bad_csr', flipped);
  assert.match(e1.message, /signature/);
  await assertRefusalAudited(stack, id, 'bad_csr', { requestId: flipped, action: 'csr' });

  // The armor is there, so the gateway's validator lets it through; the authority's PEM
  // decoder refuses the body: bad_csr, not bad_request.
  const garbage = rid('csr');
  await dev.send('csr', { requestId: garbage, csr: '-----BEGIN CERTIFICATE REQUEST-----\n%%% not base64 %%%\n-----END CERTIFICATE REQUEST-----\n' });
  await dev.expectError('bad_csr', garbage);
  await assertRefusalAudited(stack, id, 'bad_csr', { requestId: garbage });

  // Valid base64 that is not DER.
  const junkDer = rid('csr');
  await dev.send('csr', { requestId: junkDer, csr: pkix.toPem(Buffer.from('this is not a certification request'), 'CERTIFICATE REQUEST') });
  await dev.expectError('bad_csr', junkDer);

  // No PEM armor at all: the gateway's schema validator refuses it before anything is queued.
  // (The requestId of gateway-side refusals is checked in its own test below.)
  await dev.send('csr', { requestId: rid('csr'), csr: 'MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA' });
  await dev.expectError('bad_request');

  await assertNothingIssued(stack, id);

  // Positive control: the authentication survived the refusals; the good CSR is signed.
  const ok = rid('csr');
  await dev.send('csr', { requestId: ok, csr: good });
  const cert = await answerOrError<CertMessage>(dev, 'cert', ok);
  assert.ok(new X509Certificate(cert.certificate).checkPrivateKey(pair.privateKey));
  assert.equal((await stack.authority.store.listCertificates({ subjectId: id })).length, 1);
});

test('a CSR with a CN other than the instruction\'s is refused with policy_violation', async (t) => {
  const stack = await startStack(t);
  const id = 'csr-cn';
  const dev = await bootstrap(t, stack, id);
  const instruction = await authenticate(dev, stack.credential(id, 'pki-signature'));
  assert.equal(instruction.subject.commonName, id);
  const pair = await generateKeyForInstruction(instruction);

  for (const cn of ['csr-other', 'gw-test', `${id} `]) {
    const r = rid('csr');
    await dev.send('csr', { requestId: r, csr: csrFor(instruction, pair, cn) });
    const e = await dev.expectError('policy_violation', r);
    assert.match(e.message, /CN/);
    await assertRefusalAudited(stack, id, 'policy_violation', { requestId: r, action: 'csr' });
  }
  await assertNothingIssued(stack, id);
  assert.deepEqual(await stack.authority.store.listCertificates({ subjectId: 'csr-other' }), []);
  assert.deepEqual((await stack.authority.store.listCertificates({ subjectId: 'gw-test' })).map((r) => r.kind), ['gateway']);
});

test('weak keys (RSA-1024, EC P-192) are refused with policy_violation; a weak keyPreference is ignored', async (t) => {
  const stack = await startStack(t);
  const id = 'csr-weak';
  const dev = await bootstrap(t, stack, id);
  const instruction = await authenticate(dev, stack.credential(id, 'pki-signature'), { keyPreference: [{ keyType: 'rsa', keySize: 1024 }] });
  // rsa-1024 is not in the policy: the instruction falls back to the policy default.
  assert.equal(instruction.keyType, 'ec');
  assert.equal(instruction.keySize, 256);

  const weak = [
    { label: 'RSA-1024', pair: rsaKey(1024) },
    { label: 'EC P-192', pair: ecKey('prime192v1') },
  ];
  for (const { label, pair } of weak) {
    const csr = csrFor(instruction, pair);
    // RSA-1024 is read and refused by policy; P-192 is refused by the parser already (NotAcceptedError): both policy_violation
    if (label === 'RSA-1024') assert.equal(pkix.keySpecLabel(pkix.parseCsr(csr).key), label);
    else assert.throws(() => pkix.parseCsr(csr), pkix.NotAcceptedError);
    const r = rid('csr');
    await dev.send('csr', { requestId: r, csr });
    const e = await dev.expectError('policy_violation', r);
    assert.match(e.message, new RegExp(label));
    await assertRefusalAudited(stack, id, 'policy_violation', { requestId: r });
  }
  await assertNothingIssued(stack, id);
});

test('a preference list skips keys the policy does not allow and takes the first allowed one', async (t) => {
  const stack = await startStack(t);
  const id = 'csr-pref';
  const dev = await bootstrap(t, stack, id);
  const instruction = await authenticate(dev, stack.credential(id, 'pki-signature'), {
    keyPreference: [{ keyType: 'rsa', keySize: 1024 }, { keyType: 'ec', keySize: 192 }, { keyType: 'ec', keySize: 384 }],
  });
  assert.deepEqual({ keyType: instruction.keyType, keySize: instruction.keySize }, { keyType: 'ec', keySize: 384 });
  // A P-256 key, allowed by the policy in general, is still refused: the CSR must match the instruction.
  const r = rid('csr');
  await dev.send('csr', { requestId: r, csr: csrFor(instruction, ecKey('prime256v1')) });
  await dev.expectError('policy_violation', r);
  await assertNothingIssued(stack, id);
});

test('a CSR before authentication is refused with not_authenticated', async (t) => {
  const stack = await startStack(t);
  const id = 'csr-early';
  const cred = stack.credential(id, 'pki-signature');
  const dev = await bootstrap(t, stack, id);
  const csr = pkix.buildCsr({ commonName: id, ...ecKey('prime256v1') });

  // Right after connecting.
  await dev.send('csr', { requestId: rid('csr'), csr });
  await dev.expectError('not_authenticated');

  // After register, before the challenge is answered.
  await register(dev, cred);
  await dev.send('csr', { requestId: rid('csr'), csr });
  await dev.expectError('not_authenticated');

  await assertNothingIssued(stack, id);
  assert.equal((await stack.authority.store.getDevice(id))?.status, 'registered');
});

test('a repeated requestId returns the same certificate; with another CSR it is request_conflict', async (t) => {
  const stack = await startStack(t);
  const id = 'csr-idem';
  const dev = await bootstrap(t, stack, id);
  const instruction = await authenticate(dev, stack.credential(id, 'pki-signature'));
  const pair = await generateKeyForInstruction(instruction);
  const msg = { requestId: rid('csr'), csr: csrFor(instruction, pair) };

  await dev.send('csr', msg);
  const first = await answerOrError<CertMessage>(dev, 'cert', msg.requestId);
  // The auth session is consumed by the first CSR; the repeat is answered from the store.
  await dev.send('csr', msg);
  const second = await answerOrError<CertMessage>(dev, 'cert', msg.requestId);
  assert.equal(second.serial, first.serial);
  assert.equal(second.certificate, first.certificate);
  const rows = await stack.authority.store.listCertificates({ subjectId: id });
  assert.deepEqual(rows.map((r) => r.serial), [first.serial]);

  // Same requestId, a different CSR (new key): a conflict, not a second certificate.
  const other = csrFor(instruction, await generateKeyForInstruction(instruction));
  await dev.send('csr', { requestId: msg.requestId, csr: other });
  await dev.expectError('request_conflict');
  assert.deepEqual((await stack.authority.store.listCertificates({ subjectId: id })).map((r) => r.serial), [first.serial]);
  assert.equal((await stack.authority.store.listAudit({ deviceId: id })).filter((a) => a.action === 'issue').length, 1);
});

test('CSR refusals made at the gateway carry the requestId on down/error', async (t) => {
  const stack = await startStack(t);
  const id = 'csr-rid';
  const dev = await bootstrap(t, stack, id);
  const csr = pkix.buildCsr({ commonName: id, ...ecKey('prime256v1') });

  const early = rid('csr');
  await dev.send('csr', { requestId: early, csr });
  await dev.expectError('not_authenticated', early);

  const instruction = await authenticate(dev, stack.credential(id, 'pki-signature'));
  const noArmor = rid('csr');
  await dev.send('csr', { requestId: noArmor, csr: 'MIIB' });
  await dev.expectError('bad_request', noArmor);

  const msg = { requestId: rid('csr'), csr: csrFor(instruction, await generateKeyForInstruction(instruction)) };
  await dev.send('csr', msg);
  await answerOrError<CertMessage>(dev, 'cert', msg.requestId);
  await dev.send('csr', { requestId: msg.requestId, csr });
  await dev.expectError('request_conflict', msg.requestId);
});

test('a CSR of a device that holds maxActiveCerts certificates is refused with policy_violation; nothing is stored for it', async (t) => {
  const stack = await startStack(t, { policy: { maxActiveCerts: 1 } });
  const id = 'csr-cap';
  const cred = stack.credential(id, 'pki-signature');
  const first = await bootstrap(t, stack, id);
  const instruction = await authenticate(first, cred);
  const ok = rid('csr');
  await first.send('csr', { requestId: ok, csr: csrFor(instruction, await generateKeyForInstruction(instruction)) });
  const issued = await answerOrError<CertMessage>(first, 'cert', ok);
  assert.ok(issued.serial);
  await first.end();

  // A second onboarding of the same device: authenticated, but one certificate is the cap.
  const second = await bootstrap(t, stack, id);
  const again = await authenticate(second, cred);
  const over = rid('csr');
  await second.send('csr', { requestId: over, csr: csrFor(again, await generateKeyForInstruction(again)) });
  const e = await second.expectError('policy_violation', over);
  assert.match(e.message, /1 active certificates \(max 1\)/);
  await assertRefusalAudited(stack, id, 'policy_violation', { requestId: over, action: 'csr' });
  assert.equal((await stack.authority.store.listCertificates({ subjectId: id })).length, 1, 'still one certificate');
  assert.equal(await stack.authority.store.getRequest(id, over), null, 'no stored answer for the refused request');
});
