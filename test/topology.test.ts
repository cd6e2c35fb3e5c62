/**
 * The docker-compose topology (issue #6) as real OS processes on this machine, started
 * through the CLI as an operator would (bench/proc-stack.ts): two authority nodes on one
 * real PostgreSQL database (a private schema), two gateways on one real Redis (a private key
 * prefix), gateway 1 enrolled against authority 1 and gateway 2 against authority 2, and a
 * round-robin TCP load balancer in front of both gateways (test/support/tcp-proxy.ts).
 *
 * Devices onboard through the load balancer with the SDK and reconnect with mutual TLS;
 * one certificate row each; both gateways served; a gateway killed with SIGKILL is skipped
 * by the balancer and certified devices keep connecting; a device revoked through
 * authority 2's admin API (the CLI) is cut off and refused (CONNACK 5) on the surviving
 * gateway 1, which hears of it from authority 1 (PostgreSQL NOTIFY between the nodes).
 *
 * Needs PostgreSQL (LEAFGATE_TEST_DATABASE_URL) and Redis (LEAFGATE_TEST_REDIS_URL), like
 * the other cluster tests. Everything is removed at the end, also on failure: processes
 * (gateways, then authorities), the temp directory, the Redis keys, the schema.
 */
import assert from 'node:assert/strict';
import { randomBytes, X509Certificate } from 'node:crypto';
import { once } from 'node:events';
import { test } from 'node:test';
import type { MqttClient } from 'mqtt';
import { LeafDevice, type DeviceCredential, type OnboardResult } from '../device/index.ts';
import { pkix } from '../protocol/index.ts';
import { runCleanups, runNode } from '../bench/common.ts';
import { startProcStack } from '../bench/proc-stack.ts';
import { pgSchema } from './support/pg.ts';
import { closeQuietly, closed, metricValue, operationalOptions, tryConnect } from './support/plugins-helpers.ts';
import { startTcpBalancer } from './support/tcp-proxy.ts';
import { within } from './support/wait.ts';
import { TEST_REDIS_URL as REDIS_URL, deleteRedisKeys } from './support/redis.ts';

const DEVICES = 10;


test('docker-compose topology as processes: 2 authorities on PostgreSQL, 2 gateways on Redis, a TCP load balancer', { timeout: 300_000 }, async (t) => {
  // After-hooks run in the order they are added: clients and balancer, then the processes
  // (gateways first) and the temp dir, then the Redis keys, then the schema (pgSchema's own).
  const closers: Array<() => Promise<unknown>> = [];
  t.after(async () => {
    for (const c of closers.reverse()) await c().catch(() => undefined);
    await runCleanups();
  });
  const run = randomBytes(4).toString('hex');
  const keyPrefix = `lgtest:topo:${run}:`;
  t.after(() => deleteRedisKeys(keyPrefix));
  const { url: database, schema, admin: sql } = await pgSchema(t, 'lgtopo');
  const table = (name: string) => `"${schema}".${name}`;

  const stack = await startProcStack({
    keep: false,
    tmpPrefix: 'leafgate-topology-',
    authorities: 2,
    database,
    adminToken: `topology-admin-${randomBytes(16).toString('hex')}`,
    gateways: 2,
    gatewayIds: [`gw-1-${run}`, `gw-2-${run}`],
    redis: { url: REDIS_URL, keyPrefix },
    policy: { ddkg: { enrollment: 'allow-list', allowList: ['topo-*'] } },
  });
  const [a1, a2] = stack.authorities;
  const [g1, g2] = stack.gateways;
  assert.notEqual(a1.url, a2.url, 'two authority nodes, each on its own port');
  assert.equal(g1.authorityUrl, a1.url, 'gateway 1 enrolled against authority 1');
  assert.equal(g2.authorityUrl, a2.url, 'gateway 2 enrolled against authority 2');
  const { rows: enrolled } = await sql.query(`SELECT subject_id FROM ${table('certificates')} WHERE kind = 'gateway' ORDER BY subject_id`);
  assert.deepEqual(enrolled.map((r) => r.subject_id), [g1.id, g2.id], 'both gateway certificates are in the one database');

  const lb = await startTcpBalancer(stack.gateways.map((g) => ({ host: '127.0.0.1', port: g.port })));
  closers.push(() => lb.close());
  const viaLb = { brokerUrl: `mqtts://127.0.0.1:${lb.port}`, rootPem: stack.rootPem };

  // ---------------------------------------------------------------- onboarding through the LB
  const ids = Array.from({ length: DEVICES }, (_, i) => `topo-${run}-${i}`);
  const credential = (id: string, i: number): DeviceCredential =>
    i % 2 === 0
      ? { method: 'pki-signature', ...stack.manufacturer.issueBirthCertificate(id) }
      : { method: 'ddkg', attributes: { cpu: `cpu-${id}`, mac: '02:00:00:00:00:01', board: 'topology' } };
  const devices = ids.map((id, i) => new LeafDevice({ deviceId: id, brokerUrl: viaLb.brokerUrl, ca: stack.rootPem, credential: credential(id, i), timeoutMs: 60_000 }));
  // All at once: the bootstrap connections arrive together and alternate between the gateways.
  const identities: OnboardResult[] = await within(Promise.all(devices.map((d) => d.onboard())), 30_000, 'onboarding through the load balancer');
  const anchors = pkix.parseCertificates(stack.rootPem);
  for (const [i, identity] of identities.entries()) {
    const cert = new X509Certificate(identity.certificate);
    assert.match(cert.subject, new RegExp(`CN=${ids[i]}`));
    const chain = pkix.verifyChain(cert, pkix.parseCertificates(identity.chain.join('')), anchors);
    assert.equal(chain.ok, true, `${ids[i]}: ${chain.reason}`);
  }
  // The mTLS reconnect, through the balancer again; the sessions stay open for the metrics.
  let clients: MqttClient[] = await Promise.all(devices.map((d, i) => d.connectOperational(identities[i])));
  closers.push(() => closeQuietly(...clients));

  const { rows: certRows } = await sql.query(
    `SELECT subject_id, count(*)::int AS n, min(serial) AS serial, min(status) AS status FROM ${table('certificates')} WHERE kind = 'device' GROUP BY subject_id`,
  );
  const bySubject = new Map(certRows.map((r) => [r.subject_id as string, r]));
  assert.deepEqual([...bySubject.keys()].sort(), [...ids].sort(), 'a certificate row for every device and nothing else');
  for (const [i, id] of ids.entries()) {
    const row = bySubject.get(id)!;
    assert.equal(row.n, 1, `${id}: exactly one certificate`);
    assert.equal(row.status, 'active');
    assert.equal(String(row.serial).toUpperCase(), identities[i].serial.toUpperCase(), `${id}: the row is the certificate the device holds`);
  }
  // Gateway 1 forwards to authority 1, gateway 2 to authority 2: both nodes issued.
  const { rows: issuedBy } = await sql.query(`SELECT gateway_id, count(*)::int AS n FROM ${table('audit_log')} WHERE action = 'issue' AND outcome = 'ok' GROUP BY gateway_id ORDER BY gateway_id`);
  assert.deepEqual(issuedBy.map((r) => r.gateway_id), [g1.id, g2.id], 'issuances came through both gateways (and so both authority nodes)');

  const served = await Promise.all(stack.gateways.map(async (g) => {
    const text = await g.metrics();
    return {
      // The SDK onboards with the compact flow (begin + enroll) by default.
      registers: (metricValue(text, 'leafgate_gateway_onboarding_steps_total', { step: 'register', outcome: 'ok' }) ?? 0) + (metricValue(text, 'leafgate_gateway_onboarding_steps_total', { step: 'begin', outcome: 'ok' }) ?? 0),
      issued: metricValue(text, 'leafgate_gateway_onboardings_total', { outcome: 'issued' }) ?? 0,
      operational: metricValue(text, 'leafgate_gateway_connections', { kind: 'operational' }) ?? 0,
      clusterLink: metricValue(text, 'leafgate_gateway_cluster_link'),
    };
  }));
  t.diagnostic(`per gateway: ${JSON.stringify(served)}; balancer: ${JSON.stringify(lb.served)}`);
  for (const [i, s] of served.entries()) {
    assert.ok(s.registers > 0, `gateway ${i + 1} served bootstrap connections (/metrics register steps)`);
    assert.equal(s.clusterLink, 1, `gateway ${i + 1} is linked to Redis`);
  }
  assert.equal(served.reduce((a, s) => a + s.registers, 0), DEVICES, 'one register per device over both gateways');
  assert.equal(served.reduce((a, s) => a + s.issued, 0), DEVICES, 'one issuance per device over both gateways');
  assert.equal(served.reduce((a, s) => a + s.operational, 0), DEVICES, 'every device is connected with its certificate');
  assert.ok(lb.served.every((n) => n > 0), 'the balancer used both backends');
  assert.equal(lb.failovers, 0);

  // ---------------------------------------------------------------- one gateway dies
  const g2Gone = once(g2.child, 'exit');
  g2.child.kill('SIGKILL');
  await within(g2Gone, 20_000, 'gateway 2 to exit');
  // Its devices lost their sessions; every device reconnects through the balancer.
  await closeQuietly(...clients);
  const servedBefore = lb.served[0];
  const again = await Promise.all(identities.map((identity) => tryConnect(viaLb, operationalOptions(identity), 10_000)));
  clients = again.flatMap((r) => (r.client ? [r.client] : []));
  assert.deepEqual(again.map((r) => r.code), ids.map(() => 0), 'every certified device connects (CONNACK 0) with gateway 2 dead');
  assert.equal(lb.served[0] - servedBefore, DEVICES, 'all of them on gateway 1');
  assert.ok(lb.failovers > 0, 'the balancer tried the dead gateway and moved on');
  const g1Text = await g1.metrics();
  assert.equal(metricValue(g1Text, 'leafgate_gateway_connections', { kind: 'operational' }), DEVICES, 'gateway 1 holds every device');

  // ---------------------------------------------------------------- revocation on the other node
  const victim = 1; // a ddkg device
  const victimClient = clients[victim];
  const cutOff = closed(victimClient, 20_000);
  const out = await runNode('bin/leafgate.ts', ['authority', 'revoke', '--device', ids[victim], '--reason', 'keyCompromise', '--authority', a2.url, '--config', a2.configFile, '--json'], { env: stack.env, name: 'authority revoke' });
  const revoked = JSON.parse(out) as Array<{ serial: string; crlNumber: string }>;
  assert.equal(revoked.length, 1);
  assert.equal(revoked[0].serial.toUpperCase(), identities[victim].serial.toUpperCase());
  // Authority 2 revoked it; gateway 1 (linked to authority 1) closes the live session.
  await cutOff;
  const refused = await tryConnect(viaLb, operationalOptions(identities[victim]), 10_000);
  assert.equal(refused.code, 5, 'the revoked device is refused (CONNACK 5 not authorized) on gateway 1');
  const g1After = await g1.metrics();
  assert.ok((metricValue(g1After, 'leafgate_gateway_crl_number') ?? 0) >= Number(revoked[0].crlNumber), 'gateway 1 holds the CRL authority 2 published');
  const { rows: [victimRow] } = await sql.query(`SELECT status FROM ${table('certificates')} WHERE serial = $1`, [revoked[0].serial]);
  assert.equal(victimRow.status, 'revoked');
  // Another device is unaffected.
  const other = await tryConnect(viaLb, operationalOptions(identities[0]), 10_000);
  assert.equal(other.code, 0);
  clients.push(other.client!);
});
