/**
 * The Key Vault CA key with the REAL @azure/keyvault-keys (KeyClient, CryptographyClient) and
 * @azure/identity (ClientSecretCredential) clients against a wire-level stand-in of Key Vault's
 * keys API and the Entra token endpoint (test/support/keyvault-standin.ts): challenge-based
 * authentication, api-version, key_ops, throttling with Retry-After.
 */
import assert from 'node:assert/strict';
import { createPublicKey, randomUUID, verify } from 'node:crypto';
import https from 'node:https';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { format } from 'node:util';
import { test } from 'node:test';
import { AzureLogger, setLogLevel } from '@azure/logger';
import type { TokenCredential } from '@azure/identity';
import { CryptographyClient, KeyClient } from '@azure/keyvault-keys';
import pino from 'pino';
import { KeyVaultCaKey, keyVaultCredential, ecdsaRawToDer, openKeyVaultCaKey, resolveKeyVaultStoreConfig, type KeyVaultCaKeyOptions } from '../authority/ca/keyvault-key.ts';
import { LeafgateError } from '../protocol/index.ts';
import { KeyVaultStandin } from './support/keyvault-standin.ts';
import { until, within } from './support/wait.ts';

// Everything the SDKs log goes through here (and into the captured lines of the secret test).
const azureLines: string[] = [];
setLogLevel('verbose');
AzureLogger.log = (...args: unknown[]) => azureLines.push(format(...args));

async function standin(t: { after(fn: () => unknown): void }, opts?: Parameters<typeof KeyVaultStandin.start>[0]) {
  const kv = await KeyVaultStandin.start(opts);
  t.after(() => kv.close());
  return kv;
}

/** The service principal's credential, its secret from a file, as the authority builds it. */
function credential(kv: KeyVaultStandin, secret = kv.clientSecret): TokenCredential {
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-kv-'));
  const file = join(dir, 'client-secret');
  writeFileSync(file, `${secret}\n`, { mode: 0o600 });
  try {
    return keyVaultCredential({ kind: 'clientSecret', tenantId: kv.tenantId, clientId: kv.clientId, clientSecretFile: file, authorityHost: kv.authorityHost }, { tlsOptions: { ca: kv.ca } });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function options(kv: KeyVaultStandin, extra: Partial<KeyVaultCaKeyOptions> = {}): KeyVaultCaKeyOptions {
  return {
    vaultUrl: kv.vaultUrl,
    keyName: 'device-ca',
    create: { kty: 'EC-HSM', curve: 'P-256' },
    credential: credential(kv),
    // The stand-in listens on 127.0.0.1, not under *.vault.azure.net: the SDK's check that the
    // challenge's resource matches the vault's domain is for real vaults (see keyvault-key.ts).
    clientOptions: { tlsOptions: { ca: kv.ca }, disableChallengeResourceVerification: true },
    ...extra,
  };
}

const tbs = (n = 0) => Buffer.from(`tbs certificate ${n}`);

test('open: challenge-based authentication, a token from the token endpoint, the key created with key_ops [sign]; sign answers DER ECDSA that verifies', async (t) => {
  const kv = await standin(t);
  const key = await KeyVaultCaKey.open(options(kv));
  t.after(() => key.close());
  // The first request went out without a token and got Key Vault's challenge.
  assert.equal(kv.requests[0].bearer, false);
  assert.equal(kv.requests[0].status, 401);
  assert.ok(kv.tokensIssued >= 1);
  const stored = kv.keys.get('device-ca')!;
  assert.equal(stored.length, 1);
  assert.deepEqual(stored[0].keyOps, ['sign']);
  assert.equal(stored[0].kty, 'EC-HSM');
  assert.equal(key.keyType, 'ec');
  assert.equal(key.description, `keyvault:${kv.vaultUrl}/keys/device-ca/${stored[0].version}`);
  assert.ok(key.publicKey.export({ type: 'spki', format: 'der' }).equals(createPublicKey(stored[0].privateKey).export({ type: 'spki', format: 'der' })));

  const sig = await key.sign('sha256', tbs());
  assert.equal(sig[0], 0x30, 'DER SEQUENCE');
  assert.ok(verify('sha256', tbs(), key.publicKey, sig));
  assert.equal(kv.signs, 1);
  // Past the challenge every request carried the token: get (404), create, sign. The
  // CryptographyClient has its own pipeline, so it meets the challenge once too; the token
  // comes from the credential's cache.
  assert.deepEqual(kv.requests.map((r) => `${r.bearer ? 'bearer ' : ''}${r.method} ${r.path.replace(/[0-9a-f]{32}/, 'V')} ${r.status}`), [
    'GET /keys/device-ca/ 401',
    'bearer GET /keys/device-ca/ 404',
    'bearer POST /keys/device-ca/create 200',
    'POST /keys/device-ca/V/sign 401',
    'bearer POST /keys/device-ca/V/sign 200',
  ]);
  assert.equal(kv.tokensIssued, 1);

  // A second open gets the same key (no second version) and signs with it.
  const again = await KeyVaultCaKey.open(options(kv));
  t.after(() => again.close());
  assert.equal(again.keyId, key.keyId);
  assert.equal(kv.keys.get('device-ca')!.length, 1);
});

test('P-384 signs ES384 (sha384), RSA signs RS256; a hash the key cannot use is refused before any call', async (t) => {
  const kv = await standin(t);
  const p384 = await KeyVaultCaKey.open(options(kv, { keyName: 'p384', create: { kty: 'EC', curve: 'P-384' } }));
  const rsa = await KeyVaultCaKey.open(options(kv, { keyName: 'rsa', create: { kty: 'RSA-HSM', size: 2048 } }));
  t.after(() => Promise.all([p384.close(), rsa.close()]));
  assert.ok(verify('sha384', tbs(1), p384.publicKey, await p384.sign('sha384', tbs(1))));
  assert.ok(verify('sha256', tbs(2), rsa.publicKey, await rsa.sign('sha256', tbs(2))));
  const signs = kv.signs;
  await assert.rejects(p384.sign('sha256', tbs()), (e: LeafgateError) => e.code === 'internal' && /sha384 only/.test(e.message));
  assert.equal(kv.signs, signs);
});

test('r||s to DER: leading zero octets dropped, a 0x00 added before a high bit', () => {
  const r = Buffer.alloc(32, 0);
  r[31] = 0x01;
  const s = Buffer.alloc(32, 0xff);
  const der = ecdsaRawToDer(Buffer.concat([r, s]));
  assert.equal(der.toString('hex'), '3026' + '020101' + '022100' + 'ff'.repeat(32));
});

test('the stand-in checks the bearer token: a token the token endpoint did not issue gets 401, a wrong client secret gets no token', async (t) => {
  const kv = await standin(t);
  const forged: TokenCredential = { getToken: async () => ({ token: 'not-a-token-from-entra', expiresOnTimestamp: Date.now() + 3600_000 }) };
  await assert.rejects(KeyVaultCaKey.open(options(kv, { credential: forged })), (e: LeafgateError) => e.code === 'internal' && /401/.test(e.message));
  assert.ok(kv.requests.some((r) => r.bearer && r.status === 401));
  assert.equal(kv.keys.size, 0);

  const wrong = 'a-wrong-client-secret-value-123';
  await assert.rejects(KeyVaultCaKey.open(options(kv, { credential: credential(kv, wrong) })));
  assert.ok(kv.tokensRefused >= 1);
  assert.equal(kv.keys.size, 0);
});

test('the stand-in refuses an unknown api-version with 400 BadParameter, as Key Vault does', async (t) => {
  const kv = await standin(t);
  const err = await KeyVaultCaKey.open(options(kv, { clientOptions: { tlsOptions: { ca: kv.ca }, disableChallengeResourceVerification: true, serviceVersion: '1999-01-01' as '7.6' } })).then(
    () => assert.fail('opened'),
    (e: LeafgateError) => e,
  );
  assert.match(err.message, /400/);
  assert.match(err.message, /The specified version \(1999-01-01\) is not recognized/);
  assert.ok(kv.requests.some((r) => r.apiVersion === '1999-01-01' && r.status === 400));
});

test('key_ops: a key that does not allow sign is refused at open; one whose sign is taken away later gets 403 KeyOperationForbidden from Key Vault', async (t) => {
  const kv = await standin(t);
  kv.addKey('verify-only', 'EC-HSM', { crv: 'P-256', keyOps: ['verify'] });
  await assert.rejects(KeyVaultCaKey.open(options(kv, { keyName: 'verify-only', create: undefined })), (e: LeafgateError) => e.code === 'internal' && /does not allow the sign operation/.test(e.message));

  // `az keyvault key set-attributes --ops verify` while the authority runs: the SDK still
  // believes the key signs, so the request reaches the vault, which refuses it.
  const key = await KeyVaultCaKey.open(options(kv));
  t.after(() => key.close());
  await key.sign('sha256', tbs());
  kv.keys.get('device-ca')![0].keyOps = ['verify'];
  const err = await key.sign('sha256', tbs(1)).then(() => assert.fail('signed'), (e: LeafgateError) => e);
  assert.equal(err.code, 'authority_unavailable');
  assert.match(err.message, /403/);
  const cause = err.cause as { statusCode?: number; code?: string; message: string };
  assert.equal(cause.statusCode, 403);
  assert.equal(cause.code, 'Forbidden');
  assert.match(cause.message, /Operation sign is not permitted on this key/);
  assert.equal(kv.signs, 1);
});

test('start-up rides out a throttled vault: the key is read with the SDK retry policy, which waits for Retry-After', async (t) => {
  const kv = await standin(t);
  kv.failNext(1, 429, { 'retry-after': '1' });
  const key = await KeyVaultCaKey.open(options(kv));
  t.after(() => key.close());
  assert.equal(kv.throttled, 1);
  assert.equal(kv.earlyRetries, 0);
  assert.ok(kv.keys.has('device-ca'));
});

test('a key that does not exist is not created without `create`', async (t) => {
  const kv = await standin(t);
  await assert.rejects(KeyVaultCaKey.open(options(kv, { keyName: 'absent', create: undefined })), (e: LeafgateError) => /404/.test(e.message) && /KeyNotFound/.test(e.message));
  assert.equal(kv.keys.size, 0);
});

test('pacing: signatures start no faster than the configured pace, so a vault limit above it never answers 429', async (t) => {
  const kv = await standin(t);
  const key = await KeyVaultCaKey.open(options(kv, { pace: { requests: 2, windowMs: 1000 } }));
  t.after(() => key.close());
  // The vault allows twice the pace (the margin absorbs network jitter on a loaded machine).
  kv.setRate({ requests: 4, windowMs: 1000 });
  const sigs = await Promise.all(Array.from({ length: 7 }, (_, i) => key.sign('sha256', tbs(i))));
  assert.equal(sigs.length, 7);
  assert.equal(kv.signs, 7);
  assert.equal(kv.throttled, 0);
});

test('429 with Retry-After: the queue pauses until then and the call is retried; no request comes early', async (t) => {
  const kv = await standin(t);
  // One call at a time, so that every request after a 429 was sent knowing of it.
  const key = await KeyVaultCaKey.open(options(kv, { pace: { requests: 100, windowMs: 1000 }, maxInFlight: 1, maxWaitMs: 20_000 }));
  t.after(() => key.close());
  kv.setRate({ requests: 2, windowMs: 1000 });
  const sigs = await Promise.all(Array.from({ length: 5 }, (_, i) => key.sign('sha256', tbs(i))));
  sigs.forEach((s, i) => assert.ok(verify('sha256', tbs(i), key.publicKey, s)));
  assert.ok(kv.throttled >= 1, 'the vault throttled');
  assert.equal(kv.earlyRetries, 0, 'every retry waited for Retry-After');
  assert.equal(kv.signs, 5);
});

test('a throttle longer than the wait budget fails at once as authority_unavailable with retryAfterMs; so does a call queued behind it', async (t) => {
  const kv = await standin(t);
  const key = await KeyVaultCaKey.open(options(kv, { maxWaitMs: 2000 }));
  t.after(() => key.close());
  kv.failNext(1, 429, { 'retry-after': '30' });
  const err = await key.sign('sha256', tbs()).then(() => assert.fail('signed'), (e: LeafgateError) => e);
  assert.ok(err instanceof LeafgateError);
  assert.equal(err.code, 'authority_unavailable');
  assert.equal(err.retryAfterMs, 30_000);
  const next = await key.sign('sha256', tbs(1)).then(() => assert.fail('signed'), (e: LeafgateError) => e);
  assert.equal(next.code, 'authority_unavailable');
  assert.ok(next.retryAfterMs! > 20_000);
  assert.equal(kv.signs, 0);
});

test('a vault that cannot be reached: authority_unavailable with retryAfterMs', async (t) => {
  const kv = await standin(t);
  const key = await KeyVaultCaKey.open(options(kv, { maxWaitMs: 1500 }));
  t.after(() => key.close());
  kv.failNext(10, 503);
  const err = await key.sign('sha256', tbs()).then(() => assert.fail('signed'), (e: LeafgateError) => e);
  assert.equal(err.code, 'authority_unavailable');
  assert.ok(err.retryAfterMs! > 0);
});

test('a signature that does not verify with the CA key is never handed out', async (t) => {
  const kv = await standin(t);
  const key = await KeyVaultCaKey.open(options(kv));
  t.after(() => key.close());
  kv.corruptNextSignatures(1);
  await assert.rejects(key.sign('sha256', tbs()), (e: LeafgateError) => e.code === 'authority_unavailable' && /does not verify/.test(e.message));
});

test('the client secret is read from a file and appears in no log line, no error message, no SDK log', async (t) => {
  const kv = await standin(t);
  const lines: string[] = [];
  const logger = pino({ level: 'trace' }, { write: (s: string) => void lines.push(s) });
  azureLines.length = 0;
  const key = await KeyVaultCaKey.open(options(kv, { logger }));
  t.after(() => key.close());
  await key.sign('sha256', tbs());
  kv.failNext(1, 429, { 'retry-after': '60' });
  const errors: string[] = [];
  await key.sign('sha256', tbs()).catch((e: Error) => errors.push(format(e)));
  const wrong = 'Wr0ng-secret-that-must-not-leak-' + kv.clientSecret.slice(-6);
  await KeyVaultCaKey.open(options(kv, { logger, credential: credential(kv, wrong) })).catch((e: Error) => errors.push(format(e)));
  assert.ok(lines.length > 0 && azureLines.length > 0 && errors.length === 2, 'something was logged');
  for (const text of [...lines, ...azureLines, ...errors]) {
    assert.ok(!text.includes(kv.clientSecret), `the secret leaked: ${text.slice(0, 200)}`);
    assert.ok(!text.includes(wrong), `the wrong secret leaked: ${text.slice(0, 200)}`);
  }
});

test('the stand-in checks the token audience and expiry: a token for another resource, or one past its lifetime, gets 401', async (t) => {
  const kv = await standin(t);
  const real = credential(kv);
  // A credential that asks Entra for another resource than the vault's challenge names.
  const management: TokenCredential = { getToken: () => real.getToken('https://management.azure.com/.default') };
  await assert.rejects(KeyVaultCaKey.open(options(kv, { credential: management })), (e: LeafgateError) => /401/.test(e.message) && /audience/i.test(e.message));
  assert.equal(kv.keys.size, 0);

  // A credential that keeps handing out the token it got first, whatever Entra says about it.
  let first: Awaited<ReturnType<TokenCredential['getToken']>> = null;
  const sticky: TokenCredential = { getToken: async (scopes, o) => (first ??= await real.getToken(scopes, o)) };
  const key = await KeyVaultCaKey.open(options(kv, { credential: sticky }));
  t.after(() => key.close());
  await key.sign('sha256', tbs());
  kv.expireTokens();
  const err = await key.sign('sha256', tbs(1)).then(() => assert.fail('signed'), (e: LeafgateError) => e);
  assert.equal(err.code, 'authority_unavailable');
  assert.match(err.message, /401/);
  assert.equal(kv.signs, 1);
});

test('the stand-in refuses what Key Vault refuses: an algorithm that does not suit the key, a digest of the wrong length', async (t) => {
  const kv = await standin(t);
  const clientOptions = { tlsOptions: { ca: kv.ca }, disableChallengeResourceVerification: true, retryOptions: { maxRetries: 0 } };
  const cred = credential(kv);
  const key = await new KeyClient(kv.vaultUrl, cred, clientOptions).createEcKey('p256', { curve: 'P-256', keyOps: ['sign'] });
  const crypto = new CryptographyClient(key, cred, clientOptions);
  const status = (e: { statusCode?: number; code?: string }) => e.statusCode === 400 && e.code === 'BadParameter';
  await assert.rejects(crypto.sign('ES384', Buffer.alloc(48, 1)), status);
  await assert.rejects(crypto.sign('RS256', Buffer.alloc(32, 1)), status);
  await assert.rejects(crypto.sign('ES256', Buffer.alloc(20, 1)), status);
  assert.equal(kv.signs, 0);
  const ok = await crypto.sign('ES256', Buffer.alloc(32, 1));
  assert.equal(ok.result.length, 64);
});

test('the token endpoint refuses an unknown tenant, client id or grant', async (t) => {
  const kv = await standin(t);
  const post = (path: string, form: Record<string, string>) =>
    new Promise<number>((resolve, reject) => {
      const req = https.request(`${kv.authorityHost}${path}`, { method: 'POST', ca: kv.ca, headers: { 'content-type': 'application/x-www-form-urlencoded' } }, (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode!));
      });
      req.on('error', reject);
      req.end(new URLSearchParams(form).toString());
    });
  const good = { grant_type: 'client_credentials', client_id: kv.clientId, client_secret: kv.clientSecret, scope: 'https://vault.azure.net/.default' };
  assert.equal(await post(`/${kv.tenantId}/oauth2/v2.0/token`, good), 200);
  assert.equal(await post(`/${randomUUID()}/oauth2/v2.0/token`, good), 400);
  assert.equal(await post(`/${kv.tenantId}/oauth2/v2.0/token`, { ...good, client_id: randomUUID() }), 401);
  assert.equal(await post(`/${kv.tenantId}/oauth2/v2.0/token`, { ...good, grant_type: 'password' }), 401);
  assert.equal(kv.tokensIssued, 1);
});

test('open refuses a key it cannot sign certificates with: disabled, P-521, RSA-1024; a pinned version that does not exist is not created', async (t) => {
  const kv = await standin(t);
  kv.addKey('disabled', 'EC-HSM', { crv: 'P-256', keyOps: ['sign'] }).enabled = false;
  kv.addKey('p521', 'EC-HSM', { crv: 'P-521', keyOps: ['sign'] });
  kv.addKey('rsa1024', 'RSA', { size: 1024, keyOps: ['sign'] });
  await assert.rejects(KeyVaultCaKey.open(options(kv, { keyName: 'disabled' })), /is disabled/);
  await assert.rejects(KeyVaultCaKey.open(options(kv, { keyName: 'p521' })), /P-521 is not supported/);
  await assert.rejects(KeyVaultCaKey.open(options(kv, { keyName: 'rsa1024' })), /RSA-1024 is not supported/);
  await assert.rejects(KeyVaultCaKey.open(options(kv, { keyName: 'pinned', keyVersion: '0'.repeat(32) })), /404/);
  assert.equal(kv.keys.has('pinned'), false);
  const rsa = await KeyVaultCaKey.open(options(kv, { keyName: 'rsa', create: { kty: 'RSA', size: 3072 } }));
  t.after(() => rsa.close());
  await assert.rejects(rsa.sign('sha1', tbs()), /sha256, sha384 or sha512/);
});

test('at most maxInFlight sign calls reach the vault at once; a transient 503 is retried; a closed key signs nothing', async (t) => {
  const kv = await standin(t);
  const key = await KeyVaultCaKey.open(options(kv, { maxInFlight: 2 }));
  await key.sign('sha256', tbs()); // the CryptographyClient has met its challenge
  kv.holdSigns();
  const pending = Array.from({ length: 6 }, (_, i) => key.sign('sha256', tbs(i)));
  await until(() => kv.parked === 2, 20_000, 'two parked signs');
  // One more round trip to the vault: anything the key had sent is there by now.
  await new KeyClient(kv.vaultUrl, credential(kv), { tlsOptions: { ca: kv.ca }, disableChallengeResourceVerification: true }).getKey('device-ca');
  assert.equal(kv.parked, 2);
  kv.release();
  assert.equal((await Promise.all(pending)).length, 6);

  kv.failNext(2, 503);
  assert.ok(verify('sha256', tbs(9), key.publicKey, await key.sign('sha256', tbs(9))));
  assert.ok(kv.requests.filter((r) => r.status === 503).length === 2);

  // A call waiting out its back-off when the key is closed ends too.
  kv.failNext(1, 503);
  const backingOff = key.sign('sha256', tbs(10));
  await until(() => kv.requests.filter((r) => r.status === 503).length === 3, 20_000, 'the third 503');
  await key.close();
  const closedErr = await within(backingOff.then(() => null, (e: LeafgateError) => e), 20_000, 'the backing-off call to end');
  assert.equal(closedErr?.code, 'authority_unavailable');
  await assert.rejects(key.sign('sha256', tbs()), (e: LeafgateError) => e.code === 'authority_unavailable');
});

test('keyVaultCredential: the service principal needs tenant, client id and a secret from a file or AZURE_CLIENT_SECRET; errors name the file, never its content', () => {
  const env = {};
  assert.throws(() => keyVaultCredential({ kind: 'clientSecret', clientId: 'c', clientSecretFile: '/nonexistent' }, { env }), /tenantId and clientId/);
  assert.throws(() => keyVaultCredential({ kind: 'clientSecret', tenantId: 't', clientId: 'c' }, { env }), /no client secret/);
  assert.throws(() => keyVaultCredential({ kind: 'clientSecret', tenantId: 't', clientId: 'c', clientSecretFile: '/nonexistent/secret' }, { env }), /cannot read the Key Vault client secret file \/nonexistent\/secret: ENOENT/);
  assert.ok(keyVaultCredential({ kind: 'clientSecret' }, { env: { AZURE_TENANT_ID: 't', AZURE_CLIENT_ID: 'c', AZURE_CLIENT_SECRET: 's' } }));
  assert.ok(keyVaultCredential({ kind: 'managedIdentity' }, { env }));
});

test('a call that Key Vault never answers ends with the wait budget, and so does the one queued behind it', async (t) => {
  const kv = await standin(t);
  const key = await KeyVaultCaKey.open(options(kv, { maxInFlight: 1, maxWaitMs: 1500 }));
  t.after(() => key.close());
  await key.sign('sha256', tbs());
  kv.holdSigns();
  t.after(() => kv.release());
  const outcomes = await within(Promise.allSettled([key.sign('sha256', tbs(1)), key.sign('sha256', tbs(2))]), 20_000, 'both calls to end');
  for (const o of outcomes) {
    assert.equal(o.status, 'rejected');
    assert.equal((o as PromiseRejectedResult).reason.code, 'authority_unavailable');
    assert.ok((o as PromiseRejectedResult).reason.retryAfterMs > 0);
  }
  assert.equal(kv.parked, 1);
});

test('a 429 whose pause outlasts the budget of a call already queued fails that call at its deadline, not at the end of the pause', async (t) => {
  const kv = await standin(t);
  const key = await KeyVaultCaKey.open(options(kv, { maxInFlight: 1, maxWaitMs: 2500 }));
  t.after(() => key.close());
  await key.sign('sha256', tbs());
  kv.failNext(1, 429, { 'retry-after': '60' });
  // A goes out and meets the 429; B waits behind it (one call at a time), queued before the pause.
  const a = key.sign('sha256', tbs(1)).catch((e: LeafgateError) => e);
  const b = key.sign('sha256', tbs(2)).catch((e: LeafgateError) => e);
  const [ea, eb] = (await within(Promise.all([a, b]), 20_000, 'both calls to end')) as LeafgateError[];
  assert.equal(ea.code, 'authority_unavailable');
  assert.equal(ea.retryAfterMs, 60_000);
  assert.equal(eb.code, 'authority_unavailable');
  assert.ok(eb.retryAfterMs! > 20_000, `retryAfterMs ${eb.retryAfterMs}: the rest of the pause`);
  assert.equal(kv.signs, 1);
});

test('caKeys.keyvault: validated, secrets never in it; openKeyVaultCaKey signs in with a service principal from the environment', async (t) => {
  const env = {};
  assert.throws(() => resolveKeyVaultStoreConfig({ vaultUrl: 'http://v.vault.azure.net', keyName: 'k' }, env), /vaultUrl/);
  assert.throws(() => resolveKeyVaultStoreConfig({ vaultUrl: 'https://v.vault.azure.net', keyName: 'a/b' }, env), /keyName/);
  assert.throws(() => resolveKeyVaultStoreConfig({ vaultUrl: 'https://v.vault.azure.net', keyName: 'k', credential: { kind: 'clientSecret', clientSecret: 'x' } as never }, env), /never put in the configuration/);
  assert.throws(() => resolveKeyVaultStoreConfig({ vaultUrl: 'https://v.vault.azure.net', keyName: 'k', credential: { kind: 'password' } as never }, env), /credential.kind/);
  assert.throws(() => resolveKeyVaultStoreConfig({ vaultUrl: 'https://v.vault.azure.net', keyName: 'k', signsPer10s: 0 }, env), /signsPer10s/);
  const d = resolveKeyVaultStoreConfig(undefined, { LEAFGATE_KEYVAULT_URL: 'https://v.vault.azure.net/', LEAFGATE_KEYVAULT_KEY: 'leafgate-device-ca' });
  assert.deepEqual([d.keyType, d.hsm], ['ec-256', true]);
  assert.deepEqual(d.credential, { kind: 'managedIdentity' });
  assert.equal(d.vaultUrl, 'https://v.vault.azure.net');

  const kv = await standin(t);
  const spEnv = { AZURE_TENANT_ID: kv.tenantId, AZURE_CLIENT_ID: kv.clientId, AZURE_CLIENT_SECRET: kv.clientSecret, AZURE_AUTHORITY_HOST: kv.authorityHost };
  const cfg = resolveKeyVaultStoreConfig({ vaultUrl: kv.vaultUrl, keyName: 'from-env', keyType: 'ec-384', hsm: false, signsPer10s: 50 }, spEnv);
  assert.deepEqual(cfg.credential, { kind: 'clientSecret' });
  // At start a missing key is not created: only init (create) makes it.
  await assert.rejects(openKeyVaultCaKey(cfg, { env: spEnv, clientOptions: { tlsOptions: { ca: kv.ca }, disableChallengeResourceVerification: true } }), /404/);
  assert.equal(kv.keys.has('from-env'), false);
  const key = await openKeyVaultCaKey(cfg, { create: true, env: spEnv, clientOptions: { tlsOptions: { ca: kv.ca }, disableChallengeResourceVerification: true } });
  t.after(() => key.close());
  assert.equal(key.curve, 'P-384');
  assert.ok(verify('sha384', tbs(), key.publicKey, await key.sign('sha384', tbs())));
  assert.equal(kv.keys.get('from-env')![0].kty, 'EC');
});
