/**
 * The offline root through the CLI, with file keys: `authority init --offline-root DIR`
 * signs a root CRL and moves the root key out of the data directory; `authority root-crl
 * --root-key FILE` signs the next root CRL with it (checked by openssl against the root);
 * without the key, or with another key, nothing is signed; and the authority starts and
 * issues with its root offline.
 */
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { openStore } from '../authority/store/index.ts';
import { LocalCa } from '../authority/index.ts';

const PASSPHRASE = 'test-passphrase-0123456789';

function cli(args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, ['--import', 'tsx', 'bin/leafgate.ts', 'authority', ...args], {
      encoding: 'utf8', env: { ...process.env, LEAFGATE_LOG_LEVEL: 'silent', LEAFGATE_CA_PASSPHRASE: PASSPHRASE }, timeout: 120_000,
    }, (err, stdout, stderr) => resolve({ status: err ? (typeof err.code === 'number' ? err.code : null) : 0, stdout, stderr }));
  });
}

/** The root CRL stored in the data directory's database: number, and openssl's verdict on its signature. */
async function rootCrl(data: string, dir: string): Promise<{ number: bigint; verified: boolean }> {
  const store = await openStore(join(data, 'authority.db'));
  try {
    const row = await store.getCrl('root');
    assert.ok(row, 'a root CRL is stored');
    const file = join(dir, 'root.crl');
    writeFileSync(file, row.der);
    const r = spawnSync('openssl', ['crl', '-inform', 'DER', '-in', file, '-CAfile', join(data, 'ca', 'root.crt.pem'), '-noout'], { encoding: 'utf8' });
    return { number: row.crlNumber, verified: r.status === 0 && /verify OK/.test(r.stderr + r.stdout) };
  } finally {
    await store.close();
  }
}

test('authority init --offline-root, then root-crl --root-key: the root CRL is signed offline and verifies; no key, another key: nothing signed', { timeout: 300_000 }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-offline-root-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const data = join(dir, 'data');
  const out = join(dir, 'usb');

  const init = await cli(['init', '--data-dir', data, '--offline-root', out, '--crl-days', '30']);
  assert.equal(init.status, 0, init.stderr);
  assert.match(init.stdout, /root key moved to .*root\.key\.pem/);
  assert.equal(existsSync(join(data, 'ca', 'root.key.pem')), false, 'the root key left the data directory');
  assert.ok(existsSync(join(out, 'root.key.pem')));
  const first = await rootCrl(data, dir);
  assert.equal(first.verified, true, 'openssl verifies the root CRL with the root certificate');

  const missing = await cli(['root-crl', '--data-dir', data]);
  assert.notEqual(missing.status, 0);
  assert.match(missing.stderr, /--root-key/);
  assert.equal((await rootCrl(data, dir)).number, first.number, 'nothing signed without the key');

  // Another CA's root key (same passphrase): refused, nothing signed.
  const other = join(dir, 'other');
  LocalCa.open(other, PASSPHRASE);
  const wrong = await cli(['root-crl', '--data-dir', data, '--root-key', join(other, 'root.key.pem')]);
  assert.notEqual(wrong.status, 0);
  assert.equal((await rootCrl(data, dir)).number, first.number, 'nothing signed with another key');

  const next = await cli(['root-crl', '--data-dir', data, '--root-key', join(out, 'root.key.pem'), '--crl-days', '30']);
  assert.equal(next.status, 0, next.stderr);
  assert.match(next.stdout, /root CRL #\d+ signed/);
  const second = await rootCrl(data, dir);
  assert.equal(second.number, first.number + 1n);
  assert.equal(second.verified, true);
  assert.equal(existsSync(join(data, 'ca', 'root.key.pem')), false, 'root-crl does not bring the key back');

  // The data directory still opens with the root offline: the intermediates sign, the root cannot.
  const ca = LocalCa.open(join(data, 'ca'), PASSPHRASE);
  assert.equal(ca.root.key, null);
  assert.ok(ca.deviceCa.key);
  assert.equal(readFileSync(join(data, 'ca', 'root.crt.pem'), 'utf8'), ca.root.pem);
});
