/**
 * Review of the EST connector (authority/ca/est-ca.ts): what a device certificate from the
 * external CA may be used for. leafgate forwards the device's CSR unchanged, and its policy
 * tolerates requested keyUsage / extendedKeyUsage extensions ("the issued profile decides their
 * values anyway" -- true of leafgate's own CA, not of an enterprise CA that copies requested
 * extensions). So the answer must be checked for purposes a device certificate never has:
 *
 * - an EKU beyond client (and server) authentication: OCSPSigning on a certificate of the
 *   issuing CA makes the device a delegated OCSP responder of that CA (RFC 6960 4.2.2.2): it
 *   could answer "good" for any certificate the CA revoked, to every relying party of the
 *   enterprise; codeSigning, anyExtendedKeyUsage and the like are as far from a device's use;
 * - keyUsage keyCertSign / cRLSign (a device is no issuer).
 *
 * And a CSR that asks for such purposes is refused before it reaches the external CA, so that
 * no such certificate is made there at all (and a device cannot make leafgate forward CSRs
 * whose answers it will refuse, over and over: a refused answer does not spend the device's
 * authentication).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import test, { type TestContext } from 'node:test';
import { LeafgateError, pkix } from '../protocol/index.ts';
import { EstCa, type CaBundle, type CaConnector, type EstCaConfig, type IssueRequest } from '../authority/ca/index.ts';
import { checkCsrAgainstInstruction } from '../authority/policy/index.ts';
import { TestEstServer, estIssueRequest, refusal } from './support/est-server.ts';

const DAY = 86_400_000;

function fakeLocal(): CaConnector {
  return {
    name: 'local',
    async issue() {
      throw new LeafgateError('internal', 'local CA reached');
    },
    bundle: (): CaBundle => ({ root: 'R', deviceCa: 'D', infraCa: 'I', edgeIssuer: 'E' }),
    async close() {},
  };
}

async function setup(t: TestContext): Promise<{ est: TestEstServer; ca: EstCa }> {
  const est = await TestEstServer.start({ auth: 'cert' });
  t.after(() => est.close());
  const config: EstCaConfig = { type: 'est', url: est.url, serverCaFile: est.serverCaFile, caChainFile: est.chainFile, clientCertFile: est.clientCertFile, clientKeyFile: est.clientKeyFile, timeoutMs: 20_000, retryAfterSeconds: 3 };
  const ca = new EstCa(config, fakeLocal());
  t.after(() => ca.close());
  return { est, ca };
}

/** A device CSR made by openssl (as a device vendor would), with the extensions given to -addext. */
function csrWith(t: TestContext, cn: string, addext: string[]): pkix.ParsedCsr {
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-est-csr-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  execFileSync('/usr/bin/openssl', ['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', join(dir, 'k.pem'), '-subj', `/CN=${cn}`, ...addext.flatMap((e) => ['-addext', e]), '-out', join(dir, 'csr.pem')], { stdio: 'pipe' });
  return pkix.parseCsr(readFileSync(join(dir, 'csr.pem'), 'utf8'));
}

const requestFor = (csr: pkix.ParsedCsr, cn: string): IssueRequest => estIssueRequest(csr, cn, 30);

const instruction = (cn: string) => ({ requestId: 'r1', subject: { commonName: cn }, keyType: 'ec' as const, keySize: 256, sans: { dns: [], uri: [] }, validityDays: 30, csrDeadline: new Date().toISOString() });

test('EST answer: a certificate the CA signed with purposes a device never has is refused (EKU OCSPSigning / codeSigning / anyExtendedKeyUsage next to clientAuth; keyUsage keyCertSign / cRLSign)', { timeout: 90_000 }, async (t) => {
  const { est, ca } = await setup(t);
  const base = 'basicConstraints=critical,CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n';
  const cases = [
    { what: 'EKU clientAuth + OCSPSigning', ext: `${base}keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth,OCSPSigning\n`, why: /extended key usage/ },
    { what: 'EKU clientAuth + codeSigning', ext: `${base}keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth,codeSigning\n`, why: /extended key usage/ },
    { what: 'EKU clientAuth + anyExtendedKeyUsage', ext: `${base}keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth,anyExtendedKeyUsage\n`, why: /extended key usage/ },
    { what: 'keyUsage keyCertSign, cRLSign on an end entity', ext: `${base}keyUsage=critical,digitalSignature,keyCertSign,cRLSign\nextendedKeyUsage=clientAuth\n`, why: /key usage/ },
  ];
  for (const c of cases) {
    est.mode = { kind: 'extensions', ext: c.ext };
    const cn = 'est-purpose-1';
    const before = est.issued.length;
    const e = await refusal(ca.issue('device', requestFor(csrWith(t, cn, []), cn)));
    assert.equal(est.issued.length, before + 1, `${c.what}: the CA really signed it`);
    assert.equal(e.code, 'ca_refused', `${c.what}: ${e.message}`);
    assert.match(e.message, c.why, c.what);
  }
  // The template's usual device profile still passes, and clientAuth + serverAuth too.
  est.mode = { kind: 'extensions', ext: `${base}keyUsage=critical,digitalSignature,keyAgreement\nextendedKeyUsage=clientAuth,serverAuth\n` };
  await ca.issue('device', requestFor(csrWith(t, 'est-purpose-2', []), 'est-purpose-2'));
  est.mode = { kind: 'issue' };
  await ca.issue('device', requestFor(csrWith(t, 'est-purpose-3', []), 'est-purpose-3'));
});

test('EST: a CSR that requests OCSPSigning (or keyCertSign) passes leafgate\'s policy, so it is refused before it is forwarded: no certificate made at the external CA', { timeout: 90_000 }, async (t) => {
  const { est, ca } = await setup(t);
  // An enterprise template that copies the requested purposes (openssl -copy_extensions copy, no EKU of its own).
  est.mode = { kind: 'extensions', ext: 'basicConstraints=critical,CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n' };
  for (const addext of [['extendedKeyUsage=clientAuth,OCSPSigning'], ['keyUsage=critical,digitalSignature,keyCertSign,cRLSign'], ['extendedKeyUsage=serverAuth']]) {
    const cn = 'est-csr-purpose';
    const csr = csrWith(t, cn, addext);
    // leafgate's policy tolerates requested keyUsage / extendedKeyUsage (its own CA ignores them).
    checkCsrAgainstInstruction(csr, instruction(cn), { rsaPublicExponents: [65537] });
    const e = await refusal(ca.issue('device', requestFor(csr, cn)));
    assert.equal(e.code, 'policy_violation', `${addext}: ${e.code} ${e.message}`);
    assert.equal(est.enrollments().length, 0, `${addext}: nothing forwarded to the external CA`);
  }
  // A CSR asking for what a device certificate is (digitalSignature, clientAuth) is forwarded as before.
  const ok = csrWith(t, 'est-csr-ok', ['keyUsage=critical,digitalSignature', 'extendedKeyUsage=clientAuth']);
  const issued = await ca.issue('device', requestFor(ok, 'est-csr-ok'));
  assert.equal(issued.serial, est.issued.at(-1));
});

test('EST answer: a certificate with a negative serial is refused; stored, its revocation would be encoded as serial 0 in the device CA\'s CRL and never reach a gateway', { timeout: 90_000 }, async (t) => {
  const { est, ca } = await setup(t);
  // What leafgate's CRL would have carried for it (authority/revocation.ts -> pkix.encodeCrl).
  const { generateKeyPairSync } = await import('node:crypto');
  const k = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const now = new Date();
  const crl = pkix.parseCrl(pkix.encodeCrl({
    issuerDer: pkix.encodeName('crl issuer'), issuerKeyId: Buffer.alloc(20, 1), issuerKey: k.privateKey, crlNumber: 1n, thisUpdate: now, nextUpdate: new Date(now.getTime() + DAY),
    entries: [{ serial: '-1234', revokedAt: now, reason: 1, certificateIssuerDer: pkix.encodeName('Enterprise Device Issuing CA') }],
  }), k.publicKey);
  assert.equal(crl.revoked.has('-1234'), false, 'the gateway lookup of the certificate\'s serial misses');
  assert.deepEqual([...crl.revoked.keys()], ['00']);

  est.mode = { kind: 'serial', serial: '-0x1234' };
  const e = await refusal(ca.issue('device', requestFor(csrWith(t, 'est-serial-1', []), 'est-serial-1')));
  assert.equal(est.issued.at(-1), '-1234', 'the CA really signed it');
  assert.equal(e.code, 'ca_refused', e.message);
  assert.match(e.message, /serial number -1234 is not a positive integer/);
  // A positive serial with the high bit set (DER adds a 00 octet) is fine.
  est.mode = { kind: 'serial', serial: '0x80112233' };
  const issued = await ca.issue('device', requestFor(csrWith(t, 'est-serial-2', []), 'est-serial-2'));
  assert.equal(issued.serial, '80112233');
});

test('EST config: a user or password in the URL (https://user:password@host) is refused by the configuration and by the connector: node would send it as Basic and every EST log line prints the URL', { timeout: 60_000 }, async (t) => {
  const est = await TestEstServer.start({ auth: 'basic' });
  t.after(() => est.close());
  const { resolveAuthorityConfig } = await import('../authority/index.ts');
  const password = readFileSync(est.passwordFile, 'utf8').trim();
  const withUserinfo = est.url.replace('https://', `https://${est.username}:${password}@`);
  const di = { type: 'est' as const, url: withUserinfo, serverCaFile: est.serverCaFile, caChainFile: est.chainFile, clientCertFile: est.clientCertFile, clientKeyFile: est.clientKeyFile };
  const base = { dataDir: join(est.dir, 'a'), caPassphrase: 'test-passphrase-0123456789' };
  assert.throws(() => resolveAuthorityConfig({ ...base, deviceIssuer: di }, {}), (err: Error) => /url/.test(err.message) && !err.message.includes(password));
  assert.throws(() => new EstCa({ ...di, timeoutMs: 20_000, retryAfterSeconds: 3 }, fakeLocal()), (err: Error) => /must not carry a user or password/.test(err.message) && !err.message.includes(password));
  // The same URL without the userinfo is accepted.
  resolveAuthorityConfig({ ...base, deviceIssuer: { ...di, url: est.url } }, {});
});

test('EST: CSR attributes other than extensionRequest (challengePassword; at ADCS the enrollment name-value pairs, "SAN:upn=..." with EDITF_ATTRIBUTESUBJECTALTNAME2) would reach the external CA unchanged: refused before forwarding', { timeout: 90_000 }, async (t) => {
  const { est, ca } = await setup(t);
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-est-attr-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const cn = 'est-attr-1';
  const { writeFileSync } = await import('node:fs');
  writeFileSync(join(dir, 'req.cnf'), `[req]\ndistinguished_name=dn\nattributes=attrs\nprompt=no\n[dn]\nCN=${cn}\n[attrs]\nchallengePassword=enrollment-otp-of-another-profile\n`);
  execFileSync('/usr/bin/openssl', ['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', join(dir, 'k.pem'), '-config', join(dir, 'req.cnf'), '-out', join(dir, 'csr.pem')], { stdio: 'pipe' });
  const csr = pkix.parseCsr(readFileSync(join(dir, 'csr.pem'), 'utf8'));
  // leafgate's policy ignores such attributes (its own CA never reads them).
  checkCsrAgainstInstruction(csr, instruction(cn), { rsaPublicExponents: [65537] });
  const e = await refusal(ca.issue('device', requestFor(csr, cn)));
  assert.equal(e.code, 'policy_violation', `${e.code} ${e.message}`);
  assert.match(e.message, /1\.2\.840\.113549\.1\.9\.7/);
  assert.equal(est.enrollments().length, 0, 'nothing forwarded to the external CA');
});

test('EST config: an empty passwordFile (a secret not mounted yet) stops the start instead of sending an empty Basic password', { timeout: 60_000 }, async (t) => {
  const est = await TestEstServer.start({ auth: 'basic' });
  t.after(() => est.close());
  const { writeFileSync } = await import('node:fs');
  const empty = join(est.dir, 'empty-password');
  writeFileSync(empty, '\n');
  assert.throws(() => new EstCa({ type: 'est', url: est.url, serverCaFile: est.serverCaFile, caChainFile: est.chainFile, username: est.username, passwordFile: empty, timeoutMs: 20_000, retryAfterSeconds: 3 }, fakeLocal()), /passwordFile .* is empty/);
});
