/**
 * The gateway's own identity: its certificate is renewed and swapped into the running TLS
 * server without dropping a device; its IoT Edge CA (Sub-CA) is issued with pathLen 0 under
 * the root and issues server certificates locally that openssl verifies to the root.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import tls from 'node:tls';
import { edgeCaFiles, issueServerCertificate } from '../cloud-bridge/index.ts';
import { startStack } from './support/stack.ts';
import { within } from './support/wait.ts';

function servedCertificate(port: number, ca: string): Promise<X509Certificate> {
  return new Promise((resolve, reject) => {
    const s = tls.connect({ host: '127.0.0.1', port, ca, servername: 'localhost' }, () => {
      const c = s.getPeerX509Certificate();
      s.destroy();
      c ? resolve(c) : reject(new Error('no certificate'));
    });
    s.on('error', reject);
  });
}

test('rotating the gateway certificate keeps 100 connected devices and serves the new one to new handshakes', async (t) => {
  const stack = await startStack(t, { gateway: { rateLimits: { connectionsPerAddress: { points: 10_000, durationSeconds: 10 } } } });
  const device = stack.device('rot-0', 'pki-signature');
  const identity = await device.onboard();
  // 100 live connections: one operational device and 99 bootstrap sessions.
  const clients = [await device.connectOperational(identity)];
  for (let i = 1; i < 100; i++) clients.push(await stack.device(`rot-${i}`, 'pki-signature').connectBootstrap().then((b) => b.client));
  let disconnects = 0;
  for (const c of clients) c.on('close', () => disconnects++);
  t.after(() => Promise.all(clients.map((c) => c.endAsync(true))));

  const before = await servedCertificate(stack.gateway.port, stack.rootPem);
  await stack.gateway.identity.renewCertificate();
  const after = await servedCertificate(stack.gateway.port, stack.rootPem);
  assert.notEqual(after.serialNumber, before.serialNumber, 'new handshakes get the new certificate');
  assert.equal(after.subject, before.subject);
  // Every client still works after the swap.
  await Promise.all(clients.map((c) => c.publishAsync(`lg/v1/${(c.options.clientId as string)}/up/telemetry/ping`, '{}', { qos: 1 }).catch(() => undefined)));
  assert.equal(disconnects, 0, 'no device was disconnected');
  assert.equal(stack.gateway.sessions.count(), 100);
  // The authority link uses the new certificate too.
  const again = await stack.device('rot-after', 'pki-signature').onboard();
  assert.ok(again.serial);
  const gw = await stack.authority.store.getGateway(stack.gatewayId);
  assert.equal(gw?.certSerial, after.serialNumber.toUpperCase());
});

test('the edge CA is a pathLen-0, name-constrained Sub-CA under the edge issuer in the IoT Edge layout and issues server certificates locally', async (t) => {
  const stack = await startStack(t);
  await stack.gateway.identity.renewEdgeCa();
  const edge = edgeCaFiles(join(stack.dir, 'gateway'));
  const ca = new X509Certificate(readFileSync(edge.cert, 'utf8'));
  assert.equal(ca.ca, true);
  assert.equal(ca.subject, `CN=${stack.gatewayId} Edge CA`);
  assert.equal(statSync(edge.key).mode & 0o777, 0o600);
  const text = execFileSync('openssl', ['x509', '-in', edge.cert, '-noout', '-text'], { encoding: 'utf8' });
  assert.match(text, /CA:TRUE, pathlen:0/);
  assert.match(text, /Certificate Sign/);
  assert.match(text, /Issuer: CN = leafgate Edge CA Issuer/);
  // exactly the gateway's names (and edgehub, the default extra subtree); every other name excluded
  assert.match(text, /X509v3 Name Constraints: critical\n\s+Permitted:\n\s+DNS:localhost\n\s+DNS:edgehub\n\s+IP:127\.0\.0\.1\/255\.255\.255\.255\n\s+Excluded:\n\s+IP:0:0:0:0:0:0:0:0\/0:0:0:0:0:0:0:0/);
  assert.match(text, /X509v3 Extended Key Usage: \n\s+TLS Web Server Authentication, TLS Web Client Authentication/);
  execFileSync('openssl', ['verify', '-x509_strict', '-CAfile', edge.trustBundle, '-untrusted', edge.fullChain, edge.cert]);
  assert.match(readFileSync(edge.configSnippet, 'utf8'), /\[edge_ca\]\ncert = "file:\/\/.*edge-ca-full-chain\.cert\.pem"\npk = "file:\/\/.*edge-ca\.key\.pem"/);
  const rows = await stack.authority.store.listCertificates({ subjectId: stack.gatewayId, kind: 'subca' });
  assert.equal(rows.length, 1);

  const out = join(stack.dir, 'server-certs');
  const res = issueServerCertificate(join(stack.dir, 'gateway'), { name: 'edgehub', dns: ['edgehub', 'localhost'], ip: [], days: 30, outDir: out });
  const verify = execFileSync('openssl', ['verify', '-x509_strict', '-purpose', 'sslserver', '-CAfile', edge.trustBundle, '-untrusted', edge.fullChain, res.cert], { encoding: 'utf8' });
  assert.match(verify, /OK/);
  const server = new X509Certificate(readFileSync(res.cert, 'utf8'));
  assert.equal(server.checkIssued(ca), true);
  assert.match(server.subjectAltName ?? '', /DNS:edgehub, DNS:localhost/);
  // A TLS server with the issued chain is accepted by a client that trusts only the root.
  const srv = tls.createServer({ key: readFileSync(res.key), cert: readFileSync(res.chain) }, (s) => s.end());
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  t.after(() => new Promise<void>((r) => srv.close(() => r())));
  const port = (srv.address() as { port: number }).port;
  const peer = await within(new Promise<X509Certificate>((resolve, reject) => {
    const s = tls.connect({ host: '127.0.0.1', port, servername: 'edgehub', ca: readFileSync(edge.trustBundle) }, () => {
      resolve(s.getPeerX509Certificate()!);
      s.destroy();
    });
    s.on('error', reject);
  }), 5000, 'TLS handshake with edgehub');
  assert.equal(peer.subject, 'CN=edgehub');
});

test('a Sub-CA CSR with the wrong subject is refused and audited', async (t) => {
  const stack = await startStack(t);
  const { generateKeyPairSync } = await import('node:crypto');
  const { pkix } = await import('../protocol/index.ts');
  const pair = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const csr = pkix.buildCsr({ commonName: 'someone-else Edge CA', ...pair });
  await assert.rejects(stack.authority.enrollment.signSubCa(stack.gatewayId, csr), { code: 'policy_violation' });
  const audit = await stack.authority.store.listAudit({ limit: 10 });
  assert.ok(audit.some((a) => a.action === 'subca-gateway' && a.outcome === 'refused'));
});
