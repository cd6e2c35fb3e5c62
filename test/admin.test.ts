/**
 * The operator's surface: the admin API with its own bearer credential, and the
 * `leafgate authority devices|certs|revoke|policies|audit` commands on top of it.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import https from 'node:https';
import { join } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { startStack, type Stack } from './support/stack.ts';

const run = promisify(execFile);

function admin(stack: Stack, method: string, path: string, body?: unknown, token?: string): Promise<{ status: number; body: any }> {
  const tok = token ?? readFileSync(join(stack.dir, 'authority', 'admin-token'), 'utf8').trim();
  const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
  return new Promise((resolve, reject) => {
    const req = https.request(new URL(path, stack.authority.url), {
      method, agent: false, ca: stack.rootPem,
      headers: { authorization: `Bearer ${tok}`, ...(payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {}) },
    }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode!, body: JSON.parse(Buffer.concat(chunks).toString() || 'null') }));
    });
    req.on('error', reject);
    req.end(payload);
  });
}

function cli(stack: Stack, ...args: string[]) {
  return run(process.execPath, ['--import', 'tsx', 'bin/leafgate.ts', 'authority', ...args, '--data-dir', join(stack.dir, 'authority'), '--authority', stack.authority.url], { env: { ...process.env, LEAFGATE_LOG_LEVEL: 'silent' } });
}

test('the admin API refuses a missing or wrong token', async (t) => {
  const stack = await startStack(t);
  assert.equal((await admin(stack, 'GET', '/admin/v1/devices', undefined, 'wrong')).status, 401);
  const none = await new Promise<number>((resolve, reject) => {
    https.get(new URL('/admin/v1/devices', stack.authority.url), { ca: stack.rootPem, agent: false }, (res) => {
      res.resume();
      resolve(res.statusCode!);
    }).on('error', reject);
  });
  assert.equal(none, 401);
});

test('revoke by serial with a reason code: CRL lists it with the reason, the device is cut off, audit records it', async (t) => {
  const stack = await startStack(t);
  const device = stack.device('adm-1', 'pki-signature');
  const id = await device.onboard();
  const client = await device.connectOperational(id);
  const closed = new Promise<void>((r) => client.once('close', () => r()));
  const res = await admin(stack, 'POST', '/admin/v1/revoke', { serial: id.serial, reason: 'keyCompromise' });
  assert.equal(res.status, 200);
  assert.equal(res.body[0].serial, id.serial);
  await closed;
  const crl = stack.authority.revocation.crl();
  const { pkix } = await import('../protocol/index.ts');
  const parsed = pkix.parseCrl(crl.der, stack.authority.ca.deviceCa.certificate.publicKey);
  assert.equal(parsed.revoked.get(id.serial)?.reason, 1);
  const audit = await admin(stack, 'GET', '/admin/v1/audit?device=adm-1');
  assert.ok(audit.body.some((a: any) => a.action === 'revoke' && a.detail.reason === 'keyCompromise' && a.detail.actor === 'admin'));
  // openssl agrees: with the CRL, the leaf no longer verifies.
  const { mkdtempSync, writeFileSync, rmSync } = await import('node:fs');
  const { tmpdir } = await import('node:os');
  const dir = mkdtempSync(join(tmpdir(), 'lg-crl-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  writeFileSync(join(dir, 'leaf.pem'), id.certificate);
  writeFileSync(join(dir, 'device-ca.pem'), id.chain[0]);
  writeFileSync(join(dir, 'root.pem'), stack.rootPem);
  writeFileSync(join(dir, 'crl.pem'), crl.pem);
  const verify = (extra: string[]) => run('openssl', ['verify', ...extra, '-CAfile', join(dir, 'root.pem'), '-untrusted', join(dir, 'device-ca.pem'), join(dir, 'leaf.pem')]);
  await verify([]);
  await assert.rejects(verify(['-crl_check', '-CRLfile', join(dir, 'crl.pem')]), /certificate revoked/);
  // Unknown reason and unknown serial are 4xx with a body.
  assert.equal((await admin(stack, 'POST', '/admin/v1/revoke', { serial: id.serial, reason: 'because' })).body.code, 'bad_request');
  assert.equal((await admin(stack, 'POST', '/admin/v1/revoke', { serial: 'ABCDEF' })).status, 404);
  // --certificate is for the external issuing CA (deviceIssuer): without one, a clear 400.
  const byPem = await admin(stack, 'POST', '/admin/v1/revoke', { certificate: id.certificate, reason: 'keyCompromise' });
  assert.equal(byPem.status, 400);
  assert.match(byPem.body.message, /no external device CA is configured/);
});

test('decommission revokes every active certificate and disables the device; it cannot onboard again', async (t) => {
  const stack = await startStack(t);
  await stack.device('ddkg-adm-2', 'ddkg').onboard();
  const res = await admin(stack, 'POST', '/admin/v1/revoke', { device: 'ddkg-adm-2', reason: 'cessationOfOperation', decommission: true });
  assert.equal(res.status, 200);
  assert.equal(res.body.length, 1);
  const devices = await admin(stack, 'GET', '/admin/v1/devices?status=disabled');
  assert.deepEqual(devices.body.map((d: any) => d.id), ['ddkg-adm-2']);
  await assert.rejects(stack.device('ddkg-adm-2', 'ddkg').onboard(), { code: 'device_disabled' });
});

test('CLI: certs --expiring, devices, policies and audit as tables and JSON; revoke', async (t) => {
  const stack = await startStack(t, { policy: { validityDays: 5 } });
  const id = await stack.device('cli-1', 'pki-signature').onboard();
  const table = (await cli(stack, 'certs', '--expiring', '7d')).stdout;
  assert.match(table, /^serial\s+subject\s+kind\s+status/m);
  assert.match(table, new RegExp(`${id.serial}\\s+cli-1\\s+device\\s+active`));
  assert.equal(JSON.parse((await cli(stack, 'certs', '--expiring', '1d', '--json')).stdout).length, 0, 'nothing ends within a day');
  assert.equal(JSON.parse((await cli(stack, 'devices', '--json')).stdout)[0].id, 'cli-1');
  assert.match((await cli(stack, 'policies')).stdout, /^default\s+pki-signature,ddkg/m);
  assert.match((await cli(stack, 'revoke', '--serial', id.serial, '--reason', 'superseded')).stdout, new RegExp(id.serial));
  const audit = JSON.parse((await cli(stack, 'audit', '--device', 'cli-1', '--json')).stdout);
  assert.deepEqual(audit.map((a: any) => a.action).reverse(), ['register', 'issue', 'revoke'], 'the compact flow (the SDK default): register, then one enroll that authenticates and issues');
  await assert.rejects(cli(stack, 'revoke'), /--serial HEX, --device ID, --gateway ID or --certificate FILE/);
});

test('the authority exposes Prometheus metrics: requests by outcome, renewals due, revocations by reason', async (t) => {
  const stack = await startStack(t, { policy: { renewAfterFraction: 0.001, validityDays: 1 } });
  const id = await stack.device('met-1', 'pki-signature').onboard();
  await stack.authority.revocation.revokeSerial(id.serial, 'keyCompromise', 'test');
  await stack.device('met-2', 'pki-signature').onboard();
  const text = await new Promise<string>((resolve, reject) => {
    https.get(new URL('/metrics', stack.authority.url), { ca: stack.rootPem, agent: false }, (res) => {
      let body = '';
      res.on('data', (c) => (body += c));
      res.on('end', () => resolve(body));
    }).on('error', reject);
  });
  assert.match(text, /leafgate_authority_requests_total\{action="enroll",outcome="ok"\} 2/);
  assert.match(text, /leafgate_authority_revocations_total\{reason="keyCompromise"\} 1/);
  assert.match(text, /leafgate_authority_renewals_due\{state="due"\} 1/);
  assert.match(text, /leafgate_authority_crl_number 2/);
  for (const ca of ['root', 'device-ca', 'infra-ca', 'edge-issuer']) {
    const m = new RegExp(`^leafgate_authority_ca_expiry_timestamp_seconds\\{ca="${ca}"\\} (\\d+)`, 'm').exec(text);
    assert.ok(m && Number(m[1]) > Date.now() / 1000, `expiry of ${ca}`);
  }
  assert.match(text, /^process_cpu_user_seconds_total /m, 'standard process metric names');
});
