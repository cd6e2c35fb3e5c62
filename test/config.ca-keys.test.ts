/** `caKeys` configuration: defaults and every refusal of resolveCaKeys. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { resolveCaKeys } from '../authority/config.ts';

const base = { store: 'pkcs11' as const, module: '/usr/lib/softhsm/libsofthsm2.so', tokenLabel: 'ca' };

test('caKeys defaults: file; pkcs11 gets the default labels, ec-256 and a worker count', () => {
  assert.deepEqual(resolveCaKeys(undefined), { store: 'file' });
  const k = resolveCaKeys({ ...base, keyLabels: { root: 'my-root' } });
  assert.equal(k.store, 'pkcs11');
  if (k.store !== 'pkcs11') return;
  assert.deepEqual(k.keyLabels, { root: 'my-root', 'device-ca': 'leafgate-device-ca', 'infra-ca': 'leafgate-infra-ca', 'edge-issuer': 'leafgate-edge-issuer' });
  assert.equal(k.keyType, 'ec-256');
  assert.ok(Number.isInteger(k.workers) && k.workers >= 1);
});

test('caKeys refusals name the field', () => {
  const refused = (input: Record<string, unknown>, message: RegExp) => assert.throws(() => resolveCaKeys(input), (err: Error) => (assert.match(err.message, message), true));
  refused({ store: 'hsm' }, /store must be "file", "pkcs11" or "keyvault"/);
  refused({ ...base, pin: '1234' }, /a PIN is never written in the configuration/);
  refused({ ...base, module: '' }, /module must be a non-empty string/);
  refused({ ...base, tokenLabel: undefined }, /tokenLabel must be a non-empty string/);
  refused({ ...base, pinFile: 7 }, /pinFile must be a non-empty string/);
  refused({ ...base, pinEnv: '' }, /pinEnv must be a non-empty string/);
  refused({ ...base, keyLabels: { 'device-ca': '' } }, /keyLabels\.device-ca must be a non-empty string/);
  refused({ ...base, keyLabels: { 'device-ca': 'same', 'infra-ca': 'same' } }, /keyLabels must differ/);
  refused({ ...base, keyType: 'ec-521' }, /keyType must be ec-256, ec-384 or rsa-3072/);
  refused({ ...base, workers: 0 }, /workers must be an integer from 1 to 16/);
});

test('caKeys.store pkcs11 with a shared PostgreSQL database is refused at start, before the token is opened', async () => {
  const { openCa } = await import('../authority/ca/index.ts');
  const shared = { getCaMaterial: async () => [], insertCaMaterialIfAbsent: async () => false };
  const config = { dataDir: '/nonexistent', caPassphrase: 'x'.repeat(12), organization: 'o', caKeys: resolveCaKeys({ ...base, module: '/nonexistent/module.so' }) };
  await assert.rejects(openCa(config, { shared }), /caKeys\.store "pkcs11" keeps the CA certificates in the data directory: it is not available with a shared PostgreSQL database yet/);
});
