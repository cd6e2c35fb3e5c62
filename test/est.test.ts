/**
 * EST (RFC 7030) at the authority, driven as IoT Edge's aziot-certd would: curl and openssl
 * on the command line, and the small client in test/support/est.ts. Every certificate is
 * checked with `openssl verify -x509_strict` (here, and again by the stack when it closes).
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync, X509Certificate } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import test from 'node:test';
import { pkix } from '../protocol/index.ts';
import { est, sh } from './support/est.ts';
import { gatewayIdentity, type ClientIdentity } from './support/http.ts';
import { startStack, type Stack } from './support/stack.ts';

const tmp = (t: { after(fn: () => void): void }) => {
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-est-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
};

/** A fresh P-256 key and a DER CSR from node (the EST client's own key: it never leaves it). */
function csr(commonName: string, sans: { dns?: string[]; ip?: string[] } = {}) {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const pem = pkix.buildCsr({ commonName, sans, privateKey, publicKey });
  return { der: pkix.fromPem(pem, 'CERTIFICATE REQUEST'), key: privateKey.export({ type: 'pkcs8', format: 'pem' }) as string };
}

async function refusalAudited(stack: Stack, action: string, code: string) {
  const rows = await stack.authority.store.listAudit({ limit: 1000 });
  assert.ok(rows.some((r) => r.action === action && r.outcome === 'refused' && r.code === code), `an audit row ${action}/${code}; have ${rows.filter((r) => r.outcome === 'refused').map((r) => `${r.action}/${r.code}`).join(', ')}`);
}

async function verifyStrict(dir: string, stack: Stack, leafPem: string, issuer: 'infraCa' | 'edgeIssuer') {
  const b = stack.authority.ca.bundle();
  writeFileSync(join(dir, 'v-root.pem'), b.root);
  writeFileSync(join(dir, 'v-int.pem'), b[issuer]);
  writeFileSync(join(dir, 'v-leaf.pem'), leafPem);
  const r = await sh('openssl verify -x509_strict -CAfile v-root.pem -untrusted v-int.pem v-leaf.pem', dir);
  assert.equal(r.code, 0, r.stdout + r.stderr);
}

test('curl + openssl as the EST client: device identity by Basic token, Edge CA and re-enrollment by the current certificate; spent token, superseded certificate refused', async (t) => {
  const stack = await startStack(t);
  const dir = tmp(t);
  const port = new URL(stack.authority.url).port;
  const base = `https://127.0.0.1:${port}/.well-known/est`;
  writeFileSync(join(dir, 'root.pem'), stack.rootPem);
  const token = await stack.authority.enrollment.createToken('gw-edge');
  writeFileSync(join(dir, 'token'), token);

  // The device identity: a key and CSR made by openssl, sent base64 with the token as Basic credentials.
  let r = await sh(
    'openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout id.key -subj /CN=gw-edge -addext subjectAltName=DNS:gw-edge.local -outform DER | base64 > id.b64' +
      ` && curl -sS --cacert root.pem -u "gw-edge:$(cat token)" -H 'Content-Type: application/pkcs10' --data-binary @id.b64 -D id.headers -o id.p7 -w '%{http_code}' ${base}/identity/simpleenroll`,
    dir,
  );
  assert.equal(r.stdout, '200', r.stderr);
  const headers = readFileSync(join(dir, 'id.headers'), 'utf8').toLowerCase();
  assert.match(headers, /content-type: application\/pkcs7-mime; smime-type=certs-only/);
  assert.match(headers, /content-transfer-encoding: base64/);
  r = await sh('base64 -d id.p7 | openssl pkcs7 -inform DER -print_certs -out id.pem && openssl x509 -in id.pem -noout -subject -ext subjectAltName,extendedKeyUsage', dir);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /subject=CN = gw-edge/);
  assert.match(r.stdout, /DNS:gw-edge\.local/);
  assert.match(r.stdout, /TLS Web Client Authentication/);
  const identityPem = readFileSync(join(dir, 'id.pem'), 'utf8');
  assert.equal(new X509Certificate(identityPem).fingerprint256, (await stack.authority.store.getGateway('gw-edge'))?.certFingerprint, 'the EST identity is the gateway\'s current certificate');

  // cacerts (no authentication): the infrastructure CA and the root; the identity verifies strictly against them.
  r = await sh(`curl -sS --cacert root.pem ${base}/identity/cacerts | base64 -d | openssl pkcs7 -inform DER -print_certs -out id-ca.pem && openssl verify -x509_strict -CAfile root.pem -untrusted id-ca.pem id.pem`, dir);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /id\.pem: OK/);
  await verifyStrict(dir, stack, identityPem, 'infraCa');

  // The same token again (a new CSR): spent, 403, audited.
  r = await sh(
    'openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout again.key -subj /CN=gw-edge -outform DER | base64 > again.b64' +
      ` && curl -sS --cacert root.pem -u "gw-edge:$(cat token)" -H 'Content-Type: application/pkcs10' --data-binary @again.b64 -o /dev/null -w '%{http_code}' ${base}/identity/simpleenroll`,
    dir,
  );
  assert.equal(r.stdout, '403');
  await refusalAudited(stack, 'enroll-gateway', 'invalid_token');

  // Basic travels only inside TLS: the listener speaks no plain HTTP at all.
  r = await sh(`curl -sS -u "gw-edge:$(cat token)" -H 'Content-Type: application/pkcs10' --data-binary @again.b64 -o /dev/null -w '%{http_code}' http://127.0.0.1:${port}/.well-known/est/identity/simpleenroll`, dir);
  assert.notEqual(r.stdout, '200');
  assert.notEqual(r.stdout, '403');

  // The Edge CA, authenticated by the identity just issued (TLS client certificate), as aziot-edged asks for it.
  r = await sh(
    `openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -subj '/CN=gw-edge Edge CA' -addext basicConstraints=critical,CA:TRUE -outform DER | base64 > ca.b64` +
      ` && curl -sS --cacert root.pem --cert id.pem --key id.key -H 'Content-Type: application/pkcs10' --data-binary @ca.b64 -o ca.p7 -w '%{http_code}' ${base}/edge-ca/simpleenroll`,
    dir,
  );
  assert.equal(r.stdout, '200', r.stderr);
  r = await sh(
    `base64 -d ca.p7 | openssl pkcs7 -inform DER -print_certs -out edge-ca.pem && curl -sS --cacert root.pem ${base}/edge-ca/cacerts | base64 -d | openssl pkcs7 -inform DER -print_certs -out edge-chain.pem` +
      ' && openssl verify -x509_strict -CAfile root.pem -untrusted edge-chain.pem edge-ca.pem && openssl x509 -in edge-ca.pem -noout -subject -ext basicConstraints,nameConstraints,extendedKeyUsage',
    dir,
  );
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /edge-ca\.pem: OK/);
  assert.match(r.stdout, /subject=CN = gw-edge Edge CA/);
  assert.match(r.stdout, /CA:TRUE, pathlen:0/);
  assert.match(r.stdout, /X509v3 Name Constraints: critical\s+Permitted:\s+DNS:gw-edge\.local/);
  assert.match(r.stdout, /Excluded:/);
  assert.match(r.stdout, /TLS Web Server Authentication, TLS Web Client Authentication/);
  await verifyStrict(dir, stack, readFileSync(join(dir, 'edge-ca.pem'), 'utf8'), 'edgeIssuer');

  // simplereenroll with the current certificate: a new identity, same subject and SANs.
  r = await sh(
    'openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout id2.key -subj /CN=gw-edge -addext subjectAltName=DNS:gw-edge.local -outform DER | base64 > id2.b64' +
      ` && curl -sS --cacert root.pem --cert id.pem --key id.key -H 'Content-Type: application/pkcs10' --data-binary @id2.b64 -o id2.p7 -w '%{http_code}' ${base}/identity/simplereenroll` +
      ' && base64 -d id2.p7 | openssl pkcs7 -inform DER -print_certs -out id2.pem',
    dir,
  );
  assert.equal(r.stdout, '200', r.stderr);
  await verifyStrict(dir, stack, readFileSync(join(dir, 'id2.pem'), 'utf8'), 'infraCa');
  assert.equal((await stack.authority.store.getCertificate(new X509Certificate(identityPem).serialNumber))?.status, 'superseded');

  // The superseded identity is refused, on both profiles.
  for (const path of ['edge-ca/simpleenroll', 'identity/simplereenroll']) {
    r = await sh(`curl -sS --cacert root.pem --cert id.pem --key id.key -H 'Content-Type: application/pkcs10' --data-binary @ca.b64 -o /dev/null -w '%{http_code}' ${base}/${path}`, dir);
    assert.equal(r.stdout, '403', path);
  }
  await refusalAudited(stack, 'est-simpleenroll', 'unknown_gateway');
  await refusalAudited(stack, 'est-simplereenroll', 'unknown_gateway');
});

test('EST refusals: no credentials 401, unknown label 404, malformed 400, CA through identity, identity through edge-ca, wrong CN, revoked certificate 403; csrattrs; the default label', async (t) => {
  const stack = await startStack(t);
  const dir = tmp(t);
  const gw: ClientIdentity = gatewayIdentity(stack);
  const id = stack.gatewayId;

  // No credentials: 401 with a Basic challenge (RFC 7030 3.2.3), audited.
  let r = await est(stack, 'identity/simpleenroll', { csrDer: csr(id).der, dir });
  assert.equal(r.status, 401);
  assert.match(String(r.headers['www-authenticate']), /^Basic realm=/);
  await refusalAudited(stack, 'est-simpleenroll', 'not_authenticated');

  // Unknown label and unknown operation: 404, audited.
  r = await est(stack, 'nosuch/simpleenroll', { csrDer: csr(id).der, identity: gw, dir });
  assert.equal(r.status, 404);
  r = await est(stack, 'identity/fullcmc', { csrDer: csr(id).der, identity: gw, dir });
  assert.equal(r.status, 404);
  await refusalAudited(stack, 'est-route', 'not_found');

  // Not base64; base64 of something that is no CSR: 400.
  r = await est(stack, 'edge-ca/simpleenroll', { body: 'this is * not base64', identity: gw, dir });
  assert.equal(r.status, 400);
  await refusalAudited(stack, 'est-simpleenroll', 'bad_csr');
  r = await est(stack, 'edge-ca/simpleenroll', { body: Buffer.from('0123456789').toString('base64'), identity: gw, dir });
  assert.equal(r.status, 400);
  await refusalAudited(stack, 'subca-gateway', 'bad_csr');

  // A CA request through the identity profile: 403, audited, nothing issued.
  writeFileSync(join(dir, 'cn'), id);
  const sh1 = await sh(`openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout x.key -subj "/CN=$(cat cn)" -addext basicConstraints=critical,CA:TRUE -outform DER -out x.der`, dir);
  assert.equal(sh1.code, 0, sh1.stderr);
  const before = (await stack.authority.store.listCertificates({ limit: 1000 })).length;
  r = await est(stack, 'identity/simpleenroll', { csrDer: readFileSync(join(dir, 'x.der')), identity: gw, dir });
  assert.equal(r.status, 403);
  await refusalAudited(stack, 'est-simpleenroll', 'policy_violation');
  // An identity request (the gateway's CN, a SAN) through the Edge CA profile: 403.
  r = await est(stack, 'edge-ca/simpleenroll', { csrDer: csr(id, { dns: ['localhost'] }).der, identity: gw, dir });
  assert.equal(r.status, 403);
  r = await est(stack, 'edge-ca/simpleenroll', { csrDer: csr(`${id} Edge CA`, { dns: ['localhost'] }).der, identity: gw, dir });
  assert.equal(r.status, 403);
  await refusalAudited(stack, 'subca-gateway', 'policy_violation');
  // simplereenroll of the identity with other SANs than the current certificate's (RFC 7030 4.2.2): 403.
  r = await est(stack, 'identity/simplereenroll', { csrDer: csr(id, { dns: ['localhost'] }).der, identity: gw, dir });
  assert.equal(r.status, 403);
  // simplereenroll takes no Basic credentials, only the current certificate.
  const token = await stack.authority.enrollment.createToken('gw-basic');
  r = await est(stack, 'identity/simplereenroll', { csrDer: csr('gw-basic').der, basic: ['gw-basic', token], dir });
  assert.equal(r.status, 403);
  await refusalAudited(stack, 'est-simplereenroll', 'client_cert_required');
  assert.equal((await stack.authority.store.listCertificates({ limit: 1000 })).length, before, 'no refusal issued anything');

  // Basic with a username that is not the token's gateway (the CSR names the token's): 403, and the token is not spent.
  r = await est(stack, 'identity/simpleenroll', { csrDer: csr('gw-basic').der, basic: ['gw-other', token], dir });
  assert.equal(r.status, 403);
  assert.equal(await stack.authority.store.getGateway('gw-other'), null);
  // ... nor by an Edge CA request the gateway cannot have (no current certificate yet).
  r = await est(stack, 'edge-ca/simpleenroll', { csrDer: csr('gw-basic Edge CA').der, basic: ['gw-basic', token], dir });
  assert.equal(r.status, 403);
  // The default label (no path segment) is the identity profile.
  const first = csr('gw-basic', { dns: ['gw-basic.local'] });
  r = await est(stack, 'simpleenroll', { csrDer: first.der, basic: ['gw-basic', token], dir });
  assert.equal(r.status, 200, r.text);
  assert.equal(r.certs.length, 1);
  assert.equal(new X509Certificate(r.certs[0]).subject, 'CN=gw-basic');
  await verifyStrict(dir, stack, r.certs[0], 'infraCa');
  const basicGw: ClientIdentity = { key: first.key, cert: r.certs[0] };

  // An Edge CA by Basic credentials: the token is the gateway's and spent on success only.
  const token2 = await stack.authority.enrollment.createToken('gw-basic');
  r = await est(stack, 'edge-ca/simpleenroll', { csrDer: csr('gw-basic Edge CA').der, basic: ['gw-other', token2], dir });
  assert.equal(r.status, 403, 'another gateway\'s name with this token');
  r = await est(stack, 'edge-ca/simpleenroll', { csrDer: csr('gw-basic Edge CA').der, basic: ['gw-basic', token2], dir });
  assert.equal(r.status, 200, r.text);
  await verifyStrict(dir, stack, r.certs[0], 'edgeIssuer');
  r = await est(stack, 'edge-ca/simpleenroll', { csrDer: csr('gw-basic Edge CA').der, basic: ['gw-basic', token2], dir });
  assert.equal(r.status, 403, 'spent');
  await refusalAudited(stack, 'subca-gateway', 'invalid_token');

  // A revoked client certificate: 403, audited.
  await stack.authority.revocation.revokeSerial(new X509Certificate(basicGw.cert).serialNumber, 'keyCompromise', 'test');
  r = await est(stack, 'edge-ca/simpleenroll', { csrDer: csr('gw-basic Edge CA').der, identity: basicGw, dir });
  assert.equal(r.status, 403);
  const rows = await stack.authority.store.listAudit({ limit: 1000 });
  assert.ok(rows.some((row) => row.action === 'est-simpleenroll' && row.code === 'unknown_gateway' && /revoked/.test(String(row.detail?.message))), 'the audit row says revoked');

  // csrattrs: a P-256 key with ECDSA SHA-256, no authentication needed.
  r = await est(stack, 'edge-ca/csrattrs', { dir });
  assert.equal(r.status, 200);
  assert.equal(r.headers['content-type'], 'application/csrattrs');
  writeFileSync(join(dir, 'attrs.der'), Buffer.from(r.text, 'base64'));
  const parsed = await sh('openssl asn1parse -inform DER -in attrs.der', dir);
  assert.match(parsed.stdout, /ecdsa-with-SHA256/);
  assert.match(parsed.stdout, /id-ecPublicKey/);
  assert.match(parsed.stdout, /prime256v1/);

  // The running gateway's own identity works on both profiles (its current certificate).
  r = await est(stack, 'edge-ca/simpleenroll', { csrDer: csr(`${id} Edge CA`).der, identity: gw, dir });
  assert.equal(r.status, 200, r.text);
  await verifyStrict(dir, stack, r.certs[0], 'edgeIssuer');
});

test('IoT Edge as aziot-certd runs it: device identity (edge-identity) and Edge CA issued and renewed, every request authenticated by the gateway\'s own certificate, which stays current', async (t) => {
  const stack = await startStack(t);
  const dir = tmp(t);
  const gw = gatewayIdentity(stack);
  const before = (await stack.authority.store.getGateway(stack.gatewayId))!.certFingerprint;
  const identities: string[] = [];
  // aziot-certd: simpleenroll for the first issuance and for every renewal, same credential.
  for (let round = 0; round < 2; round++) {
    const id = await est(stack, 'edge-identity/simpleenroll', { csrDer: csr(stack.gatewayId).der, identity: gw, dir });
    assert.equal(id.status, 200, id.text);
    const cert = new X509Certificate(id.certs[0]);
    assert.equal(cert.subject, `CN=${stack.gatewayId}`);
    assert.equal(cert.subjectAltName, undefined, 'no SANs');
    await verifyStrict(dir, stack, id.certs[0], 'infraCa');
    identities.push(cert.serialNumber.toUpperCase());
    const ca = await est(stack, 'edge-ca/simpleenroll', { csrDer: csr(`${stack.gatewayId} Edge CA`).der, identity: gw, dir });
    assert.equal(ca.status, 200, ca.text);
  }
  // The gateway's own certificate is untouched: it is still the credential that works.
  assert.equal((await stack.authority.store.getGateway(stack.gatewayId))!.certFingerprint, before);
  // Only the newest device identity is current; the previous one is superseded, not revoked.
  assert.equal((await stack.authority.store.getCertificate(identities[0]))?.status, 'superseded');
  assert.equal((await stack.authority.store.getCertificate(identities[1]))?.status, 'active');
  // clientAuth only: an IoT Hub client identity, never a TLS server.
  writeFileSync(join(dir, 'cur.pem'), (await stack.authority.store.getCertificate(identities[1]))!.pem);
  const text = (await sh('openssl x509 -in cur.pem -noout -ext extendedKeyUsage,keyUsage', dir)).stdout;
  assert.match(text, /TLS Web Client Authentication/);
  assert.doesNotMatch(text, /Server Authentication/);

  // Refusals: another CN, SANs, a one-time secret instead of the certificate, no credential.
  for (const [what, opts, status] of [
    ['another CN', { csrDer: csr('gw-other').der, identity: gw }, 403],
    ['SANs', { csrDer: csr(stack.gatewayId, { dns: ['localhost'] }).der, identity: gw }, 403],
    ['Basic', { csrDer: csr(stack.gatewayId).der, basic: [stack.gatewayId, 'whatever'] as [string, string] }, 403],
    ['nothing', { csrDer: csr(stack.gatewayId).der }, 401],
  ] as const) {
    const r = await est(stack, 'edge-identity/simpleenroll', { ...opts, dir });
    assert.equal(r.status, status, `${what}: ${r.text}`);
  }
  // Revoking the gateway revokes its device identity too.
  const adminToken = readFileSync(join(stack.dir, 'authority', 'admin-token'), 'utf8').trim();
  const { authorityRequest } = await import('./support/http.ts');
  const res = await authorityRequest(stack, '/admin/v1/revoke', { body: { gateway: stack.gatewayId }, headers: { authorization: `Bearer ${adminToken}` } });
  assert.equal(res.status, 200, res.text);
  assert.equal((await stack.authority.store.getCertificate(identities[1]))?.status, 'revoked');
});
