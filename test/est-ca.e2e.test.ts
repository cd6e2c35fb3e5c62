/**
 * External CA over EST (authority/ca/est-ca.ts), end to end: a real authority and gateway, an
 * mqtt.js device, and an enterprise CA that is not leafgate's code (test/support/est-server.ts:
 * openssl signs, openssl crl2pkcs7 answers). Device certificates come from that CA through
 * simpleenroll / simplereenroll; leafgate checks each answer before storing it, serves the
 * external chain to gateways and devices, and enforces revocation of those certificates at the
 * broker (indirect entries of the device CA's CRL).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { X509Certificate, createPublicKey, sign } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import test, { type TestContext } from 'node:test';
import { pkix, renewalSigningInput, upTopic, type CertMessage, type InstructionMessage } from '../protocol/index.ts';
import { generateKeyForInstruction } from '../device/index.ts';
import type { AuthorityConfigInput } from '../authority/index.ts';
import { TestEstServer, type EstServerOptions } from './support/est-server.ts';
import { startStack, type Stack } from './support/stack.ts';
import { BootstrapSession, Inbox, closeQuietly, closed, connectOk, onboardDevice, operationalOptions, subscribeGranted, tryConnect, until, type Identity } from './support/plugins-helpers.ts';

/** Sized for a machine 4x slower than a developer's. */
const MS = 40_000;

async function estServer(t: TestContext, opts: EstServerOptions = {}): Promise<TestEstServer> {
  const est = await TestEstServer.start(opts);
  t.after(() => est.close());
  return est;
}

/** deviceIssuer for `est`, with a client certificate (default) or Basic. */
function issuerConfig(est: TestEstServer, auth: 'cert' | 'basic' = 'cert', extra: Record<string, unknown> = {}): AuthorityConfigInput['deviceIssuer'] {
  return {
    type: 'est', url: est.url, serverCaFile: est.serverCaFile, caChainFile: est.chainFile,
    ...(auth === 'cert' ? { clientCertFile: est.clientCertFile, clientKeyFile: est.clientKeyFile } : { username: est.username, passwordFile: est.passwordFile }),
    timeoutMs: 20_000, retryAfterSeconds: 1, ...extra,
  } as AuthorityConfigInput['deviceIssuer'];
}

async function estStack(t: TestContext, est: TestEstServer, auth: 'cert' | 'basic' = 'cert', extra: Record<string, unknown> = {}): Promise<Stack> {
  return startStack(t, { authority: { deviceIssuer: issuerConfig(est, auth, extra) } });
}

/** openssl verify of a PEM certificate against the EST server's chain (independent of leafgate). */
function opensslVerify(t: TestContext, est: TestEstServer, certPem: string): { ok: boolean; out: string } {
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-est-verify-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const chain = pkix.parseCertificates(est.chainPem);
  writeFileSync(join(dir, 'root.pem'), chain.at(-1)!.toString());
  writeFileSync(join(dir, 'issuing.pem'), chain[0].toString());
  writeFileSync(join(dir, 'leaf.pem'), certPem);
  const r = spawnSync('openssl', ['verify', '-x509_strict', '-purpose', 'sslclient', '-CAfile', 'root.pem', '-untrusted', 'issuing.pem', 'leaf.pem'], { cwd: dir, encoding: 'utf8' });
  return { ok: r.status === 0, out: r.stdout + r.stderr };
}

test('onboarding through an external CA over EST (client certificate): simpleenroll, openssl verifies the certificate against the external chain, the device connects with it and publishes', { timeout: 120_000 }, async (t) => {
  const est = await estServer(t, { auth: 'cert' });
  const stack = await estStack(t, est, 'cert');
  const identity = await onboardDevice(stack, 'est-dev-1');

  // One simpleenroll, authenticated by leafgate's client certificate.
  const calls = est.enrollments();
  assert.equal(calls.length, 1);
  assert.equal(calls[0].operation, 'simpleenroll');
  assert.equal(calls[0].auth.cert, true);
  // The certificate is the external CA's, for the device's key, with the external chain.
  const cert = new X509Certificate(identity.certificate);
  assert.equal(cert.serialNumber.toUpperCase(), est.issued[0]);
  assert.ok(cert.publicKey.equals(createPublicKey(identity.privateKey)));
  const chain = pkix.parseCertificates(est.chainPem).map((c) => c.toString());
  assert.deepEqual(identity.chain, chain);
  const v = opensslVerify(t, est, identity.certificate);
  assert.ok(v.ok, v.out);
  // On record with its issuer, and audited.
  const row = await stack.authority.store.getCertificate(identity.serial);
  assert.equal(row?.issuer, 'external-ca');
  assert.equal(row?.kind, 'device');
  const audit = await stack.authority.store.listAudit({ deviceId: 'est-dev-1', limit: 50 });
  assert.ok(audit.some((a) => a.action === 'issue' && a.outcome === 'ok' && a.serial === identity.serial));
  // The gateway learnt the external chain at enrollment and accepts the certificate on its mTLS listener.
  const client = await connectOk(stack, operationalOptions(identity));
  t.after(() => closeQuietly(client));
  await client.publishAsync(upTopic('est-dev-1', 'telemetry', 'temp'), '{"c":21}', { qos: 1 });
  // Gateway infrastructure stays on leafgate's own CA.
  const gw = await stack.authority.store.listCertificates({ subjectId: stack.gatewayId, kind: 'gateway' });
  assert.equal(gw[0]?.issuer, 'infra-ca');
});
