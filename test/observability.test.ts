/**
 * The gateway's ops endpoint: /healthz, /readyz with its checks, and the Prometheus metrics
 * the plugin layer feeds (connections by kind, onboardings, refusals by reason, durations).
 */
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { Writable } from 'node:stream';
import pino from 'pino';
import { join } from 'node:path';
import { test } from 'node:test';
import { upTopic } from '../protocol/index.ts';
import { resolveGatewayConfig, startGateway, type RunningGateway } from '../gateway/index.ts';
import { logger, startStack } from './support/stack.ts';
import {
  BootstrapSession,
  closeQuietly,
  connectOk,
  httpGet,
  metricValue,
  metricsText,
  onboardDevice,
  operationalOptions,
  opsUrl,
  subscribeGranted,
  tryConnect,
  until,
} from './support/plugins-helpers.ts';

test('/healthz answers 200 and /readyz 200 with its checks', async (t) => {
  const stack = await startStack(t);
  const health = await httpGet(opsUrl(stack.gateway.httpPort, '/healthz'));
  assert.equal(health.status, 200);
  assert.deepEqual(JSON.parse(health.body), { status: 'ok' });

  await until(() => stack.gateway.readiness().checks.authorityLink === true, 20_000, 'the authority event stream');
  const ready = await httpGet(opsUrl(stack.gateway.httpPort, '/readyz'));
  assert.equal(ready.status, 200);
  assert.deepEqual(JSON.parse(ready.body), { status: 'ready', checks: { brokerListening: true, authorityLink: true, crlCached: true, crlFresh: true, clockInSync: true, outboxWritable: true } });
});

test('/readyz answers 503 when the authority is unreachable and no CRL is cached', async (t) => {
  const stack = await startStack(null);
  let restarted: RunningGateway | undefined;
  t.after(async () => {
    await restarted?.close();
    rmSync(stack.dir, { recursive: true, force: true });
  });
  await stack.gateway.close();
  await stack.authority.close();
  rmSync(join(stack.dir, 'gateway', 'device-ca.crl'), { force: true });
  const lines: string[] = [];
  const captured = pino({ level: 'info' }, new Writable({ write(chunk, _enc, done) { lines.push(...String(chunk).split('\n').filter(Boolean)); done(); } }));
  restarted = await startGateway(resolveGatewayConfig({ dataDir: join(stack.dir, 'gateway'), listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 } }, {}), { logger: captured });
  const before = lines.length;
  for (const path of ['/metrics', '/healthz', '/readyz']) await httpGet(opsUrl(restarted.httpPort, path));
  assert.deepEqual(lines.slice(before).filter((l) => /"url":"\/(metrics|healthz|readyz)"|incoming request|request completed/.test(l)), [], 'scrapes and probes log nothing');
  const ready = await httpGet(opsUrl(restarted.httpPort, '/readyz'));
  assert.equal(ready.status, 503);
  assert.deepEqual(JSON.parse(ready.body), { status: 'not_ready', checks: { brokerListening: true, authorityLink: false, crlCached: false, crlFresh: false, clockInSync: true, outboxWritable: true } });
  assert.equal((await httpGet(opsUrl(restarted.httpPort, '/healthz'))).status, 200, 'alive all the same');
});

test('/metrics: connections by kind, onboardings, refusals by reason, onboarding durations', async (t) => {
  const stack = await startStack(t);
  const port = stack.gateway.httpPort;
  const response = await httpGet(opsUrl(port, '/metrics'));
  assert.equal(response.status, 200);
  assert.match(String(response.headers['content-type']), /^text\/plain/);
  assert.equal(metricValue(response.body, 'leafgate_gateway_connections', { kind: 'operational' }), 0);
  assert.equal(metricValue(response.body, 'leafgate_gateway_onboarding_duration_seconds_count'), 0);

  // One onboarding, then the device connected with mTLS.
  const identity = await onboardDevice(stack, 'pki-seen');
  await until(() => stack.gateway.sessions.holder('pki-seen') === undefined, 20_000, 'the bootstrap session to end');
  const client = await connectOk(stack, operationalOptions(identity));
  t.after(() => closeQuietly(client));
  // A bootstrap session alongside it.
  const boot = await BootstrapSession.open(stack, 'dev-waiting');
  t.after(() => boot.close());

  // Refusals of each kind.
  assert.equal((await tryConnect(stack, { clientId: 'dev-pw', username: 'u', password: 'p' })).code, 4);
  assert.equal((await tryConnect(stack, { clientId: 'bad/id' })).code, 2);
  assert.equal((await tryConnect(stack, { clientId: 'dev-ka', keepalive: 0 })).code, 5);
  assert.deepEqual(await subscribeGranted(client, '#'), [128]);
  const forbidden = boot.inbox.wait((m) => m.kind === 'error', 3000, 'forbidden');
  await boot.client.publishAsync(upTopic('dev-waiting', 'telemetry', 'x'), '{}', { qos: 1 });
  assert.equal((await forbidden).body.code, 'forbidden');

  const text = await metricsText(port);
  assert.equal(metricValue(text, 'leafgate_gateway_connections', { kind: 'operational' }), 1);
  assert.equal(metricValue(text, 'leafgate_gateway_connections', { kind: 'bootstrap' }), 1);
  assert.equal(metricValue(text, 'leafgate_gateway_onboardings_total', { outcome: 'issued' }), 1);
  assert.equal(metricValue(text, 'leafgate_gateway_onboarding_duration_seconds_count'), 1);
  assert.ok((metricValue(text, 'leafgate_gateway_onboarding_duration_seconds_sum') ?? 0) > 0);
  for (const step of ['register', 'auth', 'csr']) assert.equal(metricValue(text, 'leafgate_gateway_onboarding_steps_total', { step, outcome: 'ok' }), 1, step);
  for (const reason of ['connack_2', 'connack_4', 'connack_5', 'subscribe', 'forbidden']) {
    assert.equal(metricValue(text, 'leafgate_gateway_refused_total', { reason }), 1, `refused_total{reason="${reason}"}`);
  }
  assert.equal(metricValue(text, 'leafgate_gateway_authority_link_up'), stack.gateway.readiness().checks.authorityLink ? 1 : 0);
  assert.ok((metricValue(text, 'leafgate_gateway_crl_number') ?? 0) >= 1);
  assert.ok((metricValue(text, 'leafgate_gateway_crl_next_update_timestamp_seconds') ?? 0) > Date.now() / 1000);
  // Expiry of the gateway certificate and of the device CA it trusts (unix seconds, in the future).
  for (const certificate of ['gateway', 'device_ca']) {
    assert.ok((metricValue(text, 'leafgate_gateway_certificate_expiry_timestamp_seconds', { certificate }) ?? 0) > Date.now() / 1000, certificate);
  }
  // Default process metrics under their standard names (stock dashboards), no prefix.
  assert.match(text, /^process_cpu_user_seconds_total /m);
  assert.match(text, /^nodejs_heap_size_used_bytes /m);
  assert.doesNotMatch(text, /^leafgate_gateway_process_/m);

  // The gauge follows the connections.
  await client.endAsync();
  await until(() => stack.gateway.sessions.holder('pki-seen') === undefined, 20_000, 'the operational session to end');
  assert.equal(metricValue(await metricsText(port), 'leafgate_gateway_connections', { kind: 'operational' }), 0);
});
