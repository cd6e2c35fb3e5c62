/**
 * Operating a fleet without surprises: an onboarding surge is shaped by a bounded queue
 * toward the authority; a stale CRL follows the configured policy; a device whose
 * certificate expired while offline recovers on its own; a drifting clock is reported.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import https from 'node:https';
import { test } from 'node:test';
import { AuthorityClient } from '../cloud-bridge/index.ts';
import { pkix } from '../protocol/index.ts';
import { startStack } from './support/stack.ts';
import { until, within } from './support/wait.ts';


// The bounds are sized for a loaded 2-core CI machine (the surge takes ~1 min there when quiet).
test('2,000 devices registering at once all get certificates; requests to the authority stay within the bound', { timeout: 900_000 }, async (t) => {
  const concurrency = 8;
  const stack = await startStack(t, {
    gateway: {
      authorityConcurrency: concurrency,
      pendingAfterMs: 200,
      rateLimits: { connectionsPerAddress: { points: 100_000, durationSeconds: 60 }, concurrentOnboardings: 5000 },
    },
  });
  const n = 2000;
  const ec = [{ keyType: 'ec' as const, keySize: 256 }];
  const started = performance.now();
  let pendings = 0;
  const results = await Promise.allSettled(
    Array.from({ length: n }, (_, i) => {
      const d = stack.device(i % 2 ? `ddkg-surge-${i}` : `surge-${i}`, i % 2 ? 'ddkg' : 'pki-signature', { keyPreference: ec, timeoutMs: 600_000 });
      return d.onboard();
    }),
  );
  const seconds = (performance.now() - started) / 1000;
  const failed = results.filter((r) => r.status === 'rejected') as PromiseRejectedResult[];
  assert.equal(failed.length, 0, `failures: ${failed.slice(0, 3).map((f) => String(f.reason)).join('; ')}`);
  assert.ok(stack.gateway.gate.maxInFlight <= concurrency, `max in flight ${stack.gateway.gate.maxInFlight} > ${concurrency}`);
  assert.equal(stack.gateway.gate.queued, 0);
  const certs = await stack.authority.store.listCertificates({ kind: 'device', limit: 10_000 });
  assert.equal(certs.length, n, 'exactly one certificate per device');
  const metrics = await (await fetch(`http://127.0.0.1:${stack.gateway.httpPort}/metrics`)).text();
  pendings = Number(/leafgate_gateway_onboarding_steps_total\{step="csr",outcome="ok"\} (\d+)/.exec(metrics)?.[1] ?? 0);
  t.diagnostic(`surge of ${n}: drained in ${seconds.toFixed(1)} s (${(n / seconds).toFixed(0)} devices/s), max in flight ${stack.gateway.gate.maxInFlight}, csr ok ${pendings}`);
  assert.equal(stack.gateway.sessions.count('bootstrap'), 0, 'no session left behind');
});

for (const policy of ['keep', 'refuse'] as const) {
  test(`a CRL past its nextUpdate under policy "${policy}"`, async (t) => {
    // A one-second CRL: once the authority is gone it is stale almost at once.
    const stack = await startStack(t, { authority: { crlValidityHours: 1 / 3600 }, gateway: { staleCrlPolicy: policy, crlRefreshMs: 200 } });
    const device = stack.device('stale-1', 'pki-signature');
    const identity = await device.onboard();
    await stack.stopAuthority();
    await until(() => stack.gateway.revocations.isStale(), 20_000, 'the CRL to go stale');
    const ready = await fetch(`http://127.0.0.1:${stack.gateway.httpPort}/readyz`);
    const metrics = await (await fetch(`http://127.0.0.1:${stack.gateway.httpPort}/metrics`)).text();
    if (policy === 'keep') {
      const client = await device.connectOperational(identity);
      await client.endAsync();
      assert.equal(ready.status, 200, 'the site keeps working on the last CRL');
    } else {
      await assert.rejects(device.connectOperational(identity), (err: { code?: number }) => err.code === 3);
      assert.equal(ready.status, 503);
    }
    assert.match(metrics, /leafgate_gateway_crl_stale 1/);
  });
}

test('a device whose certificate expired while it was offline onboards again with its own method', async (t) => {
  let offset = -3 * 86_400_000; // the first certificate is issued "three days ago"
  const stack = await startStack(t, { policy: { validityDays: 1 }, authorityNow: () => Date.now() + offset });
  const device = stack.device('ddkg-expired', 'ddkg');
  const old = await device.onboard();
  assert.ok(new Date(old.notAfter).getTime() < Date.now(), 'the first certificate is expired');
  await assert.rejects(device.connectOperational(old), (err: { code?: number }) => err.code === 5);
  offset = 0;
  const fresh = await device.onboard();
  assert.ok(new Date(fresh.notAfter).getTime() > Date.now());
  const client = await device.connectOperational(fresh);
  await client.endAsync();
  const rows = await stack.authority.store.listCertificates({ subjectId: 'ddkg-expired' });
  assert.equal(rows.length, 2);
});

test('an authority clock ahead by less than the 5-minute backdating still yields certificates the gateway accepts', async (t) => {
  const stack = await startStack(t, { authorityNow: () => Date.now() + 4 * 60_000 });
  const device = stack.device('skew-1', 'pki-signature');
  const id = await device.onboard();
  const client = await device.connectOperational(id);
  await client.endAsync();
});

test('the gateway measures its clock against the authority and reports a drift', async (t) => {
  // A stand-in authority whose clock is ten minutes behind (its Date header says so).
  const { generateKeyPairSync } = await import('node:crypto');
  const pair = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const spki = pair.publicKey.export({ type: 'spki', format: 'der' });
  const name = pkix.encodeName('localhost');
  const der = pkix.encodeCertificate({
    serial: pkix.newSerial(), subjectDer: name, spkiDer: spki, notBefore: new Date(Date.now() - 3600_000), notAfter: new Date(Date.now() + 3600_000),
    profile: { kind: 'server', keyType: 'ec' }, sans: { ip: ['127.0.0.1'] }, issuer: { subjectDer: name, keyId: pkix.keyIdentifier(spki), privateKey: pair.privateKey },
  });
  const cert = pkix.toPem(der, 'CERTIFICATE');
  const server = https.createServer({ key: pair.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, cert }, (req, res) => {
    res.setHeader('date', new Date(Date.now() - 600_000).toUTCString());
    res.setHeader('content-type', 'application/json');
    res.end('{"status":"ok"}');
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(() => new Promise<void>((r) => server.close(() => r())));
  const client = new AuthorityClient({ baseUrl: `https://127.0.0.1:${(server.address() as { port: number }).port}`, ca: cert });
  t.after(() => client.close());
  await within(client.get('/healthz'), 20_000, 'healthz');
  assert.ok(client.clockSkewMs! > 590_000 && client.clockSkewMs! < 610_000, `skew ${client.clockSkewMs}`);
});
