/**
 * The attacker holds one enrolled gateway identity (key, certificate, its own Sub-CA) and
 * tries to reach past it through the real APIs and real TLS: pose as another gateway at the
 * authority, pose as the authority to a gateway, pose as another gateway's TLS server to a
 * device, name someone else in its CSRs, and keep using an identity that was renewed or
 * revoked. Every attempt must fail; docs/security.md points here. (Renewing another
 * gateway's device is test/renewal.trust.test.ts.)
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync, X509Certificate, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type { RequestListener } from 'node:http';
import https from 'node:https';
import { join } from 'node:path';
import tls from 'node:tls';
import { test } from 'node:test';
import { AuthorityClient, enrollGateway, identityFiles } from '../cloud-bridge/index.ts';
import { AUTHORITY_URI, pkix } from '../protocol/index.ts';
import { authorityRequest, gatewayIdentity, type ClientIdentity } from './support/http.ts';
import { startStack, type Stack } from './support/stack.ts';
import { within } from './support/wait.ts';
import { workdir } from './support/openssl.ts';

const DAY = 86_400_000;

/** Enrolls a gateway identity (no gateway process) with the given names; returns its files' contents. */
async function enrollIdentity(stack: Stack, gatewayId: string, hostnames: string[]): Promise<ClientIdentity & { dir: string; infraCa: string }> {
  const dir = join(stack.dir, `identity-${gatewayId}`);
  const token = await stack.authority.enrollment.createToken(gatewayId);
  await enrollGateway({ authorityUrl: stack.authority.url, token, rootFingerprint: stack.authority.rootFingerprint, gatewayId, dataDir: dir, hostnames });
  const f = identityFiles(dir);
  return { dir, key: readFileSync(f.key, 'utf8'), cert: readFileSync(f.cert, 'utf8'), infraCa: readFileSync(f.infraCa, 'utf8') };
}

/** The attacker's own Sub-CA, obtained legitimately through its mTLS identity. */
async function subCaOf(stack: Stack, gatewayId: string, identity: ClientIdentity): Promise<{ key: KeyObject; cert: X509Certificate; chain: string }> {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const csr = pkix.buildCsr({ commonName: `${gatewayId} Edge CA`, privateKey, publicKey });
  const res = await authorityRequest(stack, '/v1/gateways/subca', { body: { csr }, identity });
  assert.equal(res.status, 200, res.text);
  return { key: privateKey, cert: new X509Certificate(res.body.certificate), chain: res.body.certificate + res.body.chain.join('') };
}

/** A certificate the attacker makes with its Sub-CA: whatever subject, serial and names it likes. */
function forge(subCa: { key: KeyObject; cert: X509Certificate }, o: { cn: string; serialHex?: string; dns?: string[]; ip?: string[]; uri?: string[]; kind: 'gateway' | 'server' }): { key: string; cert: string } {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const now = Date.now();
  const der = pkix.encodeCertificate({
    serial: o.serialHex ? Buffer.from(o.serialHex, 'hex') : pkix.newSerial(),
    subjectDer: pkix.encodeName(o.cn),
    spkiDer: publicKey.export({ type: 'spki', format: 'der' }),
    notBefore: new Date(now - 60_000),
    notAfter: new Date(now + DAY),
    profile: { kind: o.kind, keyType: 'ec' },
    sans: { dns: o.dns, ip: o.ip, uri: o.uri },
    issuer: { subjectDer: pkix.subjectDerOf(subCa.cert.raw), keyId: pkix.keyIdentifier(subCa.cert.publicKey.export({ type: 'spki', format: 'der' })), privateKey: subCa.key },
  });
  return { key: privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, cert: pkix.toPem(der, 'CERTIFICATE') };
}

/** A TLS server the test runs with a given chain; resolves its port. */
async function tlsServer(t: { after(fn: () => unknown): void }, key: string, cert: string, onRequest?: RequestListener): Promise<number> {
  const server = onRequest ? https.createServer({ key, cert }, onRequest) : tls.createServer({ key, cert }, (s) => s.end());
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  t.after(() => new Promise<void>((r) => server.close(() => r())));
  return (server.address() as { port: number }).port;
}

/** Connects as a device would (trusting the root, checking the host name); resolves the outcome. */
function deviceConnect(port: number, servername: string, root: string): Promise<{ ok: boolean; error?: string }> {
  return within(new Promise((resolve) => {
    const s = tls.connect({ host: '127.0.0.1', port, servername, ca: root }, () => {
      resolve({ ok: true });
      s.destroy();
    });
    s.on('error', (err) => resolve({ ok: false, error: err.message }));
  }), 10_000, 'TLS handshake');
}

test('a client certificate forged with a gateway Sub-CA (victim CN and serial) is refused by the authority, and nothing is recorded under the victim', async (t) => {
  const stack = await startStack(t);
  const rogue = await enrollIdentity(stack, 'gw-rogue', ['localhost']);
  const subCa = await subCaOf(stack, 'gw-rogue', rogue);
  const victim = await stack.authority.store.getGateway(stack.gatewayId);
  const forged = forge(subCa, { cn: stack.gatewayId, serialHex: victim!.certSerial!, dns: ['localhost'], kind: 'gateway' });
  const identity = { key: forged.key, cert: forged.cert + subCa.chain };
  const before = (await stack.authority.store.listAudit({ limit: 10_000 })).length;
  for (const path of ['/v1/devices/register', '/v1/gateways/renew', '/v1/gateways/subca']) {
    const res = await authorityRequest(stack, path, { body: { deviceId: 'dev-x', requestId: 'r1', method: 'pki-signature', csr: 'x' }, identity });
    assert.equal(res.status, 403, `${path}: ${res.text}`);
    assert.equal(res.body.code, 'unknown_gateway');
  }
  // The event stream (renewal-due, CRL pushes) is refused too.
  const events = await authorityRequest(stack, '/v1/events', { method: 'GET', identity });
  assert.equal(events.status, 403);
  const audit = await stack.authority.store.listAudit({ limit: 10_000 });
  assert.equal(audit.length, before, 'no request ran under the victim gateway');
  // The genuine certificate still works.
  const ok = await authorityRequest(stack, '/v1/devices/register', { body: { deviceId: 'dev-ok', requestId: 'r1', method: 'pki-signature' }, identity: gatewayIdentity(stack) });
  assert.notEqual(ok.status, 403, ok.text);
});

test('a Sub-CA cannot name anything outside its gateway: a device refuses a server certificate for another gateway name made with it', async (t) => {
  const stack = await startStack(t);
  await enrollIdentity(stack, 'gw-victim', ['victim.example', '192.0.2.10']);
  const rogue = await enrollIdentity(stack, 'gw-rogue', ['rogue.example', '192.0.2.20']);
  const subCa = await subCaOf(stack, 'gw-rogue', rogue);
  // Inside its own names the Sub-CA works (what IoT Edge needs)...
  const own = forge(subCa, { cn: 'edgehub', dns: ['rogue.example'], kind: 'server' });
  const ownPort = await tlsServer(t, own.key, own.cert + subCa.chain);
  assert.deepEqual(await deviceConnect(ownPort, 'rogue.example', stack.rootPem), { ok: true });
  // ...outside them every verifier refuses it: a DNS name, an IP address, the authority's name.
  for (const sans of [{ dns: ['victim.example'] }, { ip: ['192.0.2.10'] }, { dns: ['authority.example'] }]) {
    const fake = forge(subCa, { cn: 'edgehub', ...sans, kind: 'server' });
    const port = await tlsServer(t, fake.key, fake.cert + subCa.chain);
    const name = sans.dns?.[0] ?? sans.ip![0];
    const r = await deviceConnect(port, name, stack.rootPem);
    assert.equal(r.ok, false, `${JSON.stringify(sans)} accepted`);
    assert.match(r.error!, /subtree violation|excluded|not permitted|name constraint/i);
  }
  // The rogue gateway's own certificate (infrastructure CA) does not pass for the victim's name either.
  const port = await tlsServer(t, rogue.key, rogue.cert);
  const r = await deviceConnect(port, 'victim.example', stack.rootPem);
  assert.equal(r.ok, false);
  assert.match(r.error!, /altnames|does not match|Hostname/i);
});

test('a gateway accepts the authority only by its own identity: neither a gateway certificate nor a Sub-CA one marked as the authority passes', async (t) => {
  const stack = await startStack(t);
  const rogue = await enrollIdentity(stack, 'gw-rogue', ['localhost', '127.0.0.1']);
  const subCa = await subCaOf(stack, 'gw-rogue', rogue);
  const victim = identityFiles(join(stack.dir, 'gateway'));
  const clientFor = (port: number) => new AuthorityClient({
    baseUrl: `https://127.0.0.1:${port}`, ca: readFileSync(victim.root, 'utf8'), authorityIssuer: readFileSync(victim.infraCa, 'utf8'),
    key: readFileSync(victim.key, 'utf8'), cert: readFileSync(victim.cert, 'utf8'), timeoutMs: 10_000,
  });
  const answer: RequestListener = (_req, res) => res.writeHead(200, { 'content-type': 'application/json' }).end('{"root":"fake"}');
  const attempts: Array<[string, { key: string; cert: string }]> = [
    // the rogue gateway's own certificate: infrastructure CA, serverAuth, 127.0.0.1 -- but no authority mark
    ['gateway certificate', { key: rogue.key, cert: rogue.cert }],
    // a Sub-CA certificate with the authority's mark and name: right URI, wrong issuer
    ['Sub-CA certificate with the mark', (() => {
      const f = forge(subCa, { cn: 'leafgate authority', ip: ['127.0.0.1'], uri: [AUTHORITY_URI], kind: 'server' });
      return { key: f.key, cert: f.cert + subCa.chain };
    })()],
  ];
  for (const [label, id] of attempts) {
    const port = await tlsServer(t, id.key, id.cert, answer);
    const client = clientFor(port);
    t.after(() => client.close());
    await assert.rejects(client.get('/v1/ca'), (err: Error) => /not the authority/.test(err.message), label);
  }
  // The genuine authority passes the same check.
  const real = clientFor(stack.authority.port);
  t.after(() => real.close());
  const bundle = await real.get<{ root: string }>('/v1/ca');
  assert.equal(bundle.root, stack.rootPem);
});

test('gateway CSRs may not name the authority or another gateway; the refused enrollment keeps its token', async (t) => {
  const stack = await startStack(t, { authority: { hostnames: ['authority.example', '127.0.0.1', 'localhost'] } });
  await enrollIdentity(stack, 'gw-victim', ['victim.example']);
  for (const [name, hostnames, message] of [
    ['gw-1', ['authority.example'], /is a name of the authority/],
    ['gw-2', ['victim.example'], /belongs to gateway gw-victim/],
    ['gw-3', ['VICTIM.example'], /belongs to gateway gw-victim/],
  ] as const) {
    const token = await stack.authority.enrollment.createToken(name);
    const dir = join(stack.dir, `refused-${name}`);
    await assert.rejects(enrollGateway({ authorityUrl: stack.authority.url, token, rootFingerprint: stack.authority.rootFingerprint, gatewayId: name, dataDir: dir, hostnames: [...hostnames] }), message);
    // The token was not spent: the same token enrolls with the gateway's own name.
    await enrollGateway({ authorityUrl: stack.authority.url, token, rootFingerprint: stack.authority.rootFingerprint, gatewayId: name, dataDir: dir, hostnames: [`${name}.example`] });
  }
  // Loopback names belong to no one: every gateway may carry them.
  await enrollIdentity(stack, 'gw-4', ['localhost', '127.0.0.1']);
});

test('a renewed gateway certificate is superseded and refused; a revoked gateway is shut out at once and listed in the CRL', async (t) => {
  const stack = await startStack(t);
  const old = gatewayIdentity(stack);
  const oldSerial = new X509Certificate(old.cert).serialNumber.toUpperCase();
  await stack.gateway.identity.renewCertificate();
  assert.equal((await stack.authority.store.getCertificate(oldSerial))?.status, 'superseded');
  const superseded = await authorityRequest(stack, '/v1/devices/register', { body: { deviceId: 'dev-s', requestId: 'r1', method: 'pki-signature' }, identity: old });
  assert.equal(superseded.status, 403);
  assert.equal(superseded.body.code, 'unknown_gateway');
  // the gateway itself carries on with its new certificate
  const device = await stack.device('dev-after-renew', 'pki-signature').onboard();
  assert.ok(device.serial);

  // Revocation of the whole gateway: its certificate and Sub-CA, through the admin API.
  await stack.gateway.identity.renewEdgeCa();
  const current = gatewayIdentity(stack);
  const currentSerial = new X509Certificate(current.cert).serialNumber.toUpperCase();
  const adminToken = readFileSync(join(stack.dir, 'authority', 'admin-token'), 'utf8').trim();
  const res = await authorityRequest(stack, '/admin/v1/revoke', { body: { gateway: stack.gatewayId, reason: 'keyCompromise' }, headers: { authorization: `Bearer ${adminToken}` } });
  assert.equal(res.status, 200, res.text);
  assert.deepEqual(res.body.map((r: { kind: string }) => r.kind).sort(), ['gateway', 'subca']);
  const refused = await authorityRequest(stack, '/v1/devices/register', { body: { deviceId: 'dev-r', requestId: 'r1', method: 'pki-signature' }, identity: current });
  assert.equal(refused.status, 403);
  const infraCrl = pkix.parseCrl(await crlDer(stack, 'infra-ca'), stack.authority.ca.infraCa.certificate.publicKey);
  assert.ok(infraCrl.revoked.has(currentSerial), 'the gateway certificate is on the infrastructure CA CRL');
  const edgeCrl = pkix.parseCrl(await crlDer(stack, 'edge-issuer'), stack.authority.ca.edgeIssuer.certificate.publicKey);
  assert.equal(edgeCrl.revoked.size, 1, 'the Sub-CA is on the edge issuer CRL');
});

test('revoking a gateway ends its open event stream', async (t) => {
  const stack = await startStack(t);
  const identity = gatewayIdentity(stack);
  const ended = new Promise<number>((resolve, reject) => {
    const req = https.request(new URL('/v1/events', stack.authority.url), { agent: false, ca: stack.rootPem, key: identity.key, cert: identity.cert }, (res) => {
      res.on('data', () => undefined);
      res.on('end', () => resolve(res.statusCode ?? 0));
      res.on('error', reject);
      // revoke once the stream is open
      void stack.authority.revocation.revokeSerial(new X509Certificate(identity.cert).serialNumber, 'keyCompromise', 'test');
    });
    req.on('error', reject);
    req.end();
  });
  assert.equal(await within(ended, 20_000, 'event stream closed after the revocation'), 200);
});

async function crlDer(stack: Stack, name: string): Promise<Buffer> {
  const res = await new Promise<Buffer>((resolve, reject) => {
    https.get(new URL(`/v1/crl/${name}.crl`, stack.authority.url), { agent: false, ca: stack.rootPem }, (r) => {
      const chunks: Buffer[] = [];
      r.on('data', (c: Buffer) => chunks.push(c));
      r.on('end', () => (r.statusCode === 200 ? resolve(Buffer.concat(chunks)) : reject(new Error(`CRL ${name}: ${r.statusCode}`))));
    }).on('error', reject);
  });
  return res;
}

test('openssl verify -crl_check_all -x509_strict passes for every chain the authority issues and fails for each revoked one', async (t) => {
  const stack = await startStack(t);
  const w = workdir(t);
  const ca = stack.authority.ca;
  const device = await stack.device('dev-crl', 'pki-signature').onboard();
  await stack.gateway.identity.renewEdgeCa();
  const subCa = (await stack.authority.store.listCertificates({ subjectId: stack.gatewayId, kind: 'subca', status: 'active' }))[0];
  const gatewayCert = gatewayIdentity(stack).cert.split('-----END CERTIFICATE-----')[0] + '-----END CERTIFICATE-----\n';
  w.write('root.pem', ca.root.pem);
  w.write('intermediates.pem', ca.deviceCa.pem + ca.infraCa.pem + ca.edgeIssuer.pem);
  w.write('device.pem', device.certificate);
  w.write('gateway.pem', gatewayCert);
  w.write('subca.pem', subCa.pem);
  const crls = async () => {
    for (const name of ['root', 'device-ca', 'infra-ca', 'edge-issuer']) w.write(`${name}.crl`, await crlDer(stack, name));
    return ['root', 'device-ca', 'infra-ca', 'edge-issuer'].flatMap((n) => ['-CRLfile', `${n}.crl`]);
  };
  const verify = async (file: string, purpose: string) => w.tryOpenssl(['verify', '-x509_strict', '-crl_check_all', '-purpose', purpose, '-CAfile', 'root.pem', '-untrusted', 'intermediates.pem', ...(await crls()), file]);
  for (const [file, purpose] of [['device.pem', 'sslclient'], ['gateway.pem', 'sslserver'], ['gateway.pem', 'sslclient'], ['subca.pem', 'any']] as const) {
    const r = await verify(file, purpose);
    assert.equal(r.status, 0, `${file} ${purpose}: ${r.stdout}${r.stderr}`);
  }
  // Every issued certificate names where its CRL is, and the URL serves it.
  const text = w.openssl(['x509', '-in', 'device.pem', '-noout', '-ext', 'crlDistributionPoints']);
  assert.match(text, new RegExp(`URI:https://[^\\s]+:${stack.authority.port}/v1/crl/device-ca\\.crl`));

  await stack.authority.revocation.revokeSerial(device.serial, 'keyCompromise', 'test');
  await stack.authority.revocation.revokeSerial(subCa.serial, 'keyCompromise', 'test');
  await stack.authority.revocation.revokeSerial(new X509Certificate(gatewayCert).serialNumber, 'keyCompromise', 'test');
  for (const file of ['device.pem', 'gateway.pem', 'subca.pem']) {
    const r = await verify(file, 'any');
    assert.notEqual(r.status, 0, `${file} still verifies after its revocation`);
    assert.match(r.stdout + r.stderr, /certificate revoked/);
  }
  // An intermediate is revoked on the root's CRL (the root key is online in this data directory).
  const revoked = await stack.authority.revocation.revokeSerial(ca.deviceCa.serial, 'cACompromise', 'test');
  assert.equal(revoked.issuer, 'root');
  w.write('device2.pem', (await stack.authority.store.listCertificates({ kind: 'device', status: 'revoked' }))[0].pem);
  const r = await verify('device2.pem', 'any');
  assert.match(r.stdout + r.stderr, /certificate revoked/);
});
