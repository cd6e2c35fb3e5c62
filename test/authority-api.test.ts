/**
 * The authority's HTTPS API, called directly: /v1/devices routes need the mTLS client
 * certificate of an enrolled gateway (401 client_cert_required without one, 403
 * unknown_gateway for any other certificate), bodies are size-capped and parsed with our
 * codes, unknown routes are 404 not_found, and a wrong enrollment token is refused and audited.
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { test } from 'node:test';
import { pkix } from '../protocol/index.ts';
import { authorityRequest, gatewayIdentity, type ClientIdentity } from './support/http.ts';
import { startStack, type Stack } from './support/stack.ts';

/** A valid register body for a fresh pki-signature device. */
function registerBody(stack: Stack, deviceId: string): Record<string, unknown> {
  const cred = stack.credential(deviceId, 'pki-signature');
  return { deviceId, requestId: `reg-${deviceId}`, method: 'pki-signature', birthCert: cred.method === 'pki-signature' ? cred.birthCert : '' };
}

async function assertNoDevice(stack: Stack, deviceId: string): Promise<void> {
  assert.equal(await stack.authority.store.getDevice(deviceId), null);
  assert.deepEqual(await stack.authority.store.listAudit({ deviceId }), []);
}

test('POST /v1/devices/register is refused without the certificate of an enrolled gateway', async (t) => {
  const stack = await startStack(t);

  // No client certificate.
  const none = await authorityRequest(stack, '/v1/devices/register', { body: registerBody(stack, 'api-none') });
  assert.equal(none.status, 401);
  assert.equal(none.body.code, 'client_cert_required');
  await assertNoDevice(stack, 'api-none');

  // A device certificate: chains to the root (through the device CA), but is no gateway.
  const onboarded = await stack.device('api-dev', 'pki-signature').onboard();
  const deviceIdentity: ClientIdentity = { key: onboarded.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, cert: onboarded.certificate + onboarded.chain.join('') };
  const asDevice = await authorityRequest(stack, '/v1/devices/register', { body: registerBody(stack, 'api-asdev'), identity: deviceIdentity });
  assert.equal(asDevice.status, 403);
  assert.equal(asDevice.body.code, 'unknown_gateway');
  await assertNoDevice(stack, 'api-asdev');

  // The gateway certificate of another authority, with the same gateway id (CN=gw-test).
  const other = await startStack(t);
  assert.equal(other.gatewayId, stack.gatewayId);
  const foreign = await authorityRequest(stack, '/v1/devices/register', { body: registerBody(stack, 'api-foreign'), identity: gatewayIdentity(other) });
  assert.equal(foreign.status, 403);
  assert.equal(foreign.body.code, 'unknown_gateway');
  await assertNoDevice(stack, 'api-foreign');

  // Every gateway route refuses it alike.
  for (const path of ['/v1/devices/auth', '/v1/devices/csr', '/v1/events']) {
    const res = await authorityRequest(stack, path, { method: path === '/v1/events' ? 'GET' : 'POST', body: path === '/v1/events' ? undefined : {}, identity: gatewayIdentity(other) });
    assert.deepEqual([res.status, res.body?.code], [403, 'unknown_gateway'], path);
  }

  // Positive control: the enrolled gateway's own certificate gets a challenge.
  const ok = await authorityRequest(stack, '/v1/devices/register', { body: registerBody(stack, 'api-ok'), identity: gatewayIdentity(stack) });
  assert.equal(ok.status, 200, ok.text);
  assert.equal(ok.body.requestId, 'reg-api-ok');
  assert.equal(typeof ok.body.challengeId, 'string');
  assert.equal((await stack.authority.store.getDevice('api-ok'))?.gatewayId, stack.gatewayId);
});

test('bodies are parsed and capped with our codes; unknown routes are 404 not_found', async (t) => {
  const stack = await startStack(t);
  const identity = gatewayIdentity(stack);

  const malformed = await authorityRequest(stack, '/v1/devices/register', { body: '{"deviceId": "api-x", ', identity });
  assert.deepEqual([malformed.status, malformed.body.code], [400, 'malformed_json']);
  const array = await authorityRequest(stack, '/v1/devices/register', { body: '[1, 2]', identity });
  assert.deepEqual([array.status, array.body.code], [400, 'malformed_json']);
  const unknownField = await authorityRequest(stack, '/v1/devices/register', { body: { ...registerBody(stack, 'api-x'), admin: true }, identity });
  assert.deepEqual([unknownField.status, unknownField.body.code], [400, 'bad_request']);
  const badId = await authorityRequest(stack, '/v1/devices/register', { body: { ...registerBody(stack, 'api-x'), deviceId: 'a/b' }, identity });
  assert.deepEqual([badId.status, badId.body.code], [400, 'invalid_device_id']);

  // Over the 64 KiB body limit.
  const big = JSON.stringify({ ...registerBody(stack, 'api-x'), pad: 'x'.repeat(64 * 1024) });
  const tooLarge = await authorityRequest(stack, '/v1/devices/register', { body: big, identity });
  assert.deepEqual([tooLarge.status, tooLarge.body.code], [413, 'payload_too_large']);
  await assertNoDevice(stack, 'api-x');

  for (const [method, path, id] of [['GET', '/v1/nope', undefined], ['POST', '/v1/devices/delete', identity], ['GET', '/v1/devices/register', identity], ['GET', '/../etc/passwd', undefined]] as const) {
    const res = await authorityRequest(stack, path, { method, identity: id, ...(method === 'POST' ? { body: {} } : {}) });
    assert.equal(res.status, 404, `${method} ${path}`);
    assert.equal(res.body.code, 'not_found', `${method} ${path}`);
  }
});

test('POST /v1/gateways/enroll with a wrong token is 401 invalid_token and audited', async (t) => {
  const stack = await startStack(t);
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const csr = pkix.buildCsr({ commonName: 'gw-rogue', privateKey, publicKey });

  const res = await authorityRequest(stack, '/v1/gateways/enroll', { body: { token: 'not-a-token-0123456789', csr } });
  assert.equal(res.status, 401);
  assert.equal(res.body.code, 'invalid_token');

  const audit = await stack.authority.store.listAudit({});
  const row = audit.find((a) => a.action === 'enroll-gateway' && a.outcome === 'refused');
  assert.ok(row, JSON.stringify(audit.map((a) => [a.action, a.outcome, a.code])));
  assert.equal(row.code, 'invalid_token');
  assert.equal(await stack.authority.store.getGateway('gw-rogue'), null);
  assert.deepEqual(await stack.authority.store.listCertificates({ subjectId: 'gw-rogue' }), []);

  // A token that was already used is no better than a made-up one.
  const token = await stack.authority.enrollment.createToken('gw-second');
  const csr2 = pkix.buildCsr({ commonName: 'gw-second', ...generateKeyPairSync('ec', { namedCurve: 'P-256' }) });
  const first = await authorityRequest(stack, '/v1/gateways/enroll', { body: { token, csr: csr2 } });
  assert.equal(first.status, 200, first.text);
  const again = await authorityRequest(stack, '/v1/gateways/enroll', { body: { token, csr: csr2 } });
  assert.deepEqual([again.status, again.body.code], [401, 'invalid_token']);
  assert.equal((await stack.authority.store.listCertificates({ subjectId: 'gw-second' })).length, 1);
});

test('an unauthenticated client is refused before its body is parsed', async (t) => {
  const stack = await startStack(t);
  const malformed = await authorityRequest(stack, '/v1/devices/register', { body: '{"deviceId": ' });
  assert.deepEqual([malformed.status, malformed.body.code], [401, 'client_cert_required']);
  const tooLarge = await authorityRequest(stack, '/v1/devices/register', { body: JSON.stringify({ pad: 'x'.repeat(64 * 1024) }) });
  assert.deepEqual([tooLarge.status, tooLarge.body.code], [401, 'client_cert_required']);
});
