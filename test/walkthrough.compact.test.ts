/**
 * docs/protocol.md §6.6, run as it is written: the compact onboarding with the stock
 * `mosquitto_rr` (one call per exchange, so two connections), `openssl` and `jq`, against a
 * test stack, then the mutual-TLS reconnect with `mosquitto_pub`. The block is read from the
 * document, so the document cannot drift from what works.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { X509Certificate, createPublicKey } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { startStack } from './support/stack.ts';

const MARKER = '<!-- walkthrough:compact';

/** The first ```bash block after the marker in docs/protocol.md. */
function walkthroughBlock(): string {
  const doc = readFileSync(new URL('../docs/protocol.md', import.meta.url), 'utf8');
  const at = doc.indexOf(MARKER);
  assert.ok(at >= 0, 'docs/protocol.md has the compact walk-through marker');
  const open = doc.indexOf('```bash\n', at);
  const close = doc.indexOf('\n```', open + 8);
  assert.ok(open > at && close > open);
  return doc.slice(open + 8, close + 1);
}

function run(script: string, env: Record<string, string>): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn('bash', ['-e', '-o', 'pipefail', '-c', script], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (err += d));
    p.on('error', reject);
    p.on('close', (code) => resolve({ code, out, err }));
  });
}

test('docs/protocol.md §6.6: onboarding with two mosquitto_rr calls and openssl, then mTLS with mosquitto_pub', async (t) => {
  const stack = await startStack(t);
  const work = mkdtempSync(join(tmpdir(), 'leafgate-rr-'));
  t.after(() => rmSync(work, { recursive: true, force: true }));
  const dev = 'demo-device-1';
  const birth = stack.manufacturer.issueBirthCertificate(dev);
  writeFileSync(join(work, 'root-ca.pem'), stack.rootPem);
  writeFileSync(join(work, 'birth-cert.pem'), birth.birthCert);
  writeFileSync(join(work, 'factory-key.pem'), birth.factoryKey.export({ type: 'pkcs8', format: 'pem' }) as string, { mode: 0o600 });

  const r = await run(walkthroughBlock(), { WORK: work, PORT: String(stack.gateway.port), DEV: dev });
  assert.equal(r.code, 0, `walk-through failed:\n${r.out}\n${r.err}`);
  const lines = r.out.trim().split('\n');
  assert.deepEqual(lines.slice(0, 2), ['ec 256 CN=demo-device-1 dns=[] uri=[]', 'device-cert.pem: OK']);
  // The re-sent enroll got the same certificate, not a second one.
  assert.match(lines[2], /^[0-9A-F]+$/);
  assert.equal(lines[3], lines[2]);
  assert.equal(lines.at(-1), 'telemetry sent');

  // One certificate, for the key the shell made, issued by the compact flow in two exchanges.
  const certs = await stack.authority.store.listCertificates({ subjectId: dev });
  assert.deepEqual(certs.map((c) => c.serial), [lines[2]]);
  const issued = new X509Certificate(readFileSync(join(work, 'device-cert.pem')));
  assert.equal(issued.serialNumber.toUpperCase(), lines[2]);
  assert.ok(issued.publicKey.equals(createPublicKey(readFileSync(join(work, 'device-key.pem')))));
  const audit = (await stack.authority.store.listAudit({ deviceId: dev })).reverse();
  assert.deepEqual(audit.map((a) => `${a.action}:${a.outcome}`), ['register:ok', 'issue:ok']);
  assert.equal(audit[1].detail?.flow, 'compact');
  if (process.env.LEAFGATE_SHOW_WALKTHROUGH) console.log(r.out);
});
