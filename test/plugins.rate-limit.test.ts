/**
 * Rate-limit plugin: the admission check on its own, then each limit through the real
 * gateway with small budgets -- connection attempts per source address (checked on the raw
 * TCP connection), publishes per client with the abuse cut-off, onboardings per device and
 * address, concurrent onboardings and CSRs per device (none spent by an unproven claim).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { generateKeyPairSync } from 'node:crypto';
import tls from 'node:tls';
import { pkix, upTopic } from '../protocol/index.ts';
import { DEFAULT_RATE_LIMITS, SessionRegistry, rateLimitPlugin } from '../plugins/index.ts';
import { startStack } from './support/stack.ts';
import { BootstrapSession, closeQuietly, closed, connectOk, fromAddress, metricValue, metricsText, operationalOptions, tryConnect, until, within } from './support/plugins-helpers.ts';

test('acceptConnection: a budget per source address, refusals reported to the observer', async () => {
  const limited: string[] = [];
  const plugin = rateLimitPlugin({
    sessions: new SessionRegistry(),
    limits: { ...DEFAULT_RATE_LIMITS, connectionsPerAddress: { points: 3, durationSeconds: 60 } },
    observer: { limited: (l) => limited.push(l) },
  });
  const verdicts = [];
  for (let i = 0; i < 5; i++) verdicts.push(await plugin.acceptConnection('192.0.2.1'));
  assert.deepEqual(verdicts, [true, true, true, false, false]);
  assert.equal(await plugin.acceptConnection('192.0.2.2'), true, 'another address has its own budget');
  assert.deepEqual(limited, ['connectionsPerAddress', 'connectionsPerAddress']);
  assert.equal(plugin.activeOnboardings(), 0);
});

/** One TLS connection attempt; true when the handshake completed (then it is closed). */
function tlsAttempt(port: number, ca: string): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = tls.connect({ host: '127.0.0.1', port, ca, servername: 'localhost' });
    socket.once('secureConnect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
    socket.once('close', () => resolve(false));
  });
}

test('1,000 connection attempts from one address are limited; other addresses are still served', async (t) => {
  const stack = await startStack(t, { gateway: { rateLimits: { connectionsPerAddress: { points: 50, durationSeconds: 60 } } } });
  const total = 1000;
  const concurrency = 100;
  let next = 0;
  let admitted = 0;
  const worker = async () => {
    while (next < total) {
      next++;
      if (await tlsAttempt(stack.gateway.port, stack.rootPem)) admitted++;
    }
  };
  await within(Promise.all(Array.from({ length: concurrency }, worker)), 15_000, '1,000 attempts');
  const refused = total - admitted;
  assert.ok(refused >= 900, `${refused} of ${total} refused`);
  assert.ok(admitted <= 50, `${admitted} admitted, budget 50`);

  // The address stays limited for MQTT clients too...
  assert.equal((await tryConnect(stack, { clientId: 'dev-flood' })).code, -1, 'cut before CONNACK');
  // ...while a device from another source address onboards and reconnects with mTLS.
  const fromElsewhere = fromAddress('127.0.0.2');
  const session = await BootstrapSession.open(stack, 'pki-elsewhere', fromElsewhere);
  t.after(() => session.close());
  assert.equal(stack.gateway.sessions.holder('pki-elsewhere')?.session.remoteAddress, '127.0.0.2');
  const identity = await session.onboard();
  await session.close();
  const op = await connectOk(stack, { ...operationalOptions(identity), ...fromElsewhere });
  t.after(() => closeQuietly(op));
  await op.publishAsync(upTopic('pki-elsewhere', 'telemetry', 'state'), '{}', { qos: 1 });

  const metrics = await metricsText(stack.gateway.httpPort);
  const counted = metricValue(metrics, 'leafgate_gateway_rate_limited_total', { limit: 'connectionsPerAddress' }) ?? 0;
  assert.ok(counted >= 900, `rate_limited_total{connectionsPerAddress} = ${counted}`);
});

test('publishesPerClient: the 6th publish gets rate_limited with retryAfterMs; ignoring it past abuseDisconnectAfter closes the connection', async (t) => {
  const stack = await startStack(t, { gateway: { rateLimits: { publishesPerClient: { points: 5, durationSeconds: 60 }, abuseDisconnectAfter: 3 } } });
  const session = await BootstrapSession.open(stack, 'dev-chatty');
  t.after(() => session.close());
  // Five well-formed requests are relayed (and answered: no such challenge on this connection).
  for (let i = 1; i <= 5; i++) {
    const answer = await session.request('auth', { requestId: `req-${i}`, challengeId: `ch-${i}`, signature: 'AAAA' });
    assert.equal(answer.kind, 'error');
    assert.equal(answer.body.requestId, `req-${i}`, `publish ${i} reached the relay`);
    assert.equal(answer.body.code, 'challenge_expired');
  }
  // The 6th, 7th and 8th are refused politely, acknowledged, and not relayed.
  for (let i = 6; i <= 8; i++) {
    const answer = await session.request('auth', { requestId: `req-${i}`, challengeId: `ch-${i}`, signature: 'AAAA' });
    assert.equal(answer.kind, 'error');
    assert.equal(answer.body.code, 'rate_limited', `publish ${i}`);
    assert.equal(typeof answer.body.retryAfterMs, 'number');
    assert.ok((answer.body.retryAfterMs as number) > 0, `retryAfterMs ${answer.body.retryAfterMs}`);
    assert.ok((answer.body.retryAfterMs as number) <= 60_000);
  }
  assert.equal(session.client.connected, true, 'still connected within abuseDisconnectAfter');
  // The 9th (4th strike, over abuseDisconnectAfter = 3) costs the connection.
  const gone = closed(session.client, 20_000);
  session.client.publish(upTopic('dev-chatty', 'auth'), JSON.stringify({ requestId: 'req-9', challengeId: 'ch-9', signature: 'AAAA' }), { qos: 1 });
  await gone;
  const metrics = await metricsText(stack.gateway.httpPort);
  assert.equal(metricValue(metrics, 'leafgate_gateway_rate_limited_total', { limit: 'publishesPerClient' }), 4);
  assert.equal(session.inbox.messages.filter((m) => /^req-[6-9]$/.test(String(m.body.requestId))).length, 0, 'refused publishes were not relayed');
});

test('onboardingsPerDevice: the third register of a device from one address is rate_limited, on any connection from there', async (t) => {
  const stack = await startStack(t, { gateway: { rateLimits: { onboardingsPerDevice: { points: 2, durationSeconds: 3600 } } } });
  const first = await BootstrapSession.open(stack, 'pki-again');
  t.after(() => first.close());
  assert.equal((await first.register()).kind, 'challenge');
  assert.equal((await first.register()).kind, 'challenge');
  const third = await first.register();
  assert.equal(third.kind, 'error');
  assert.equal(third.body.code, 'rate_limited');
  assert.ok((third.body.retryAfterMs as number) > 0 && (third.body.retryAfterMs as number) <= 3600_000, `retryAfterMs ${third.body.retryAfterMs}`);
  await first.close();
  await until(() => stack.gateway.sessions.holder('pki-again') === undefined, 20_000, 'the first session to end');

  // The budget belongs to the device, not the connection.
  const second = await BootstrapSession.open(stack, 'pki-again');
  t.after(() => second.close());
  assert.equal((await second.register()).body.code, 'rate_limited');
  // Another device is not affected.
  const other = await BootstrapSession.open(stack, 'pki-fresh');
  t.after(() => other.close());
  assert.equal((await other.register()).kind, 'challenge');
  await second.close();
  await until(() => stack.gateway.sessions.holder('pki-again') === undefined, 20_000, 'the second session to end');

  // A bootstrap connection only claims its id: attempts from 127.0.0.1 (a hostile client,
  // say) did not spend the budget of the device that connects from elsewhere, which onboards.
  const real = await BootstrapSession.open(stack, 'pki-again', fromAddress('127.0.0.2'));
  t.after(() => real.close());
  await real.onboard();
  const metrics = await metricsText(stack.gateway.httpPort);
  assert.equal(metricValue(metrics, 'leafgate_gateway_rate_limited_total', { limit: 'onboardingsPerDevice' }), 2);
});

test('csrsPerDevice: CSRs of a bootstrap connection that has not authenticated are refused without spending the device\'s budget', async (t) => {
  const stack = await startStack(t, { gateway: { rateLimits: { csrsPerDevice: { points: 1, durationSeconds: 86_400 } } } });
  // Someone claims the id and publishes CSRs without a challenge answer.
  const hostile = await BootstrapSession.open(stack, 'pki-victim');
  t.after(() => hostile.close());
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const csr = pkix.buildCsr({ commonName: 'pki-victim', privateKey, publicKey });
  for (let i = 0; i < 3; i++) {
    const answer = await hostile.request('csr', { csr });
    assert.equal(answer.kind, 'error');
    assert.equal(answer.body.code, 'not_authenticated', `attempt ${i + 1}: ${JSON.stringify(answer.body)}`);
  }
  await hostile.close();
  await until(() => stack.gateway.sessions.holder('pki-victim') === undefined, 20_000, 'the hostile session to end');

  // The device itself, on the same address even, still has its one CSR of the day.
  const real = await BootstrapSession.open(stack, 'pki-victim');
  t.after(() => real.close());
  await real.onboard();
  assert.equal((await stack.authority.store.listCertificates({ subjectId: 'pki-victim' })).length, 1);
  const metrics = await metricsText(stack.gateway.httpPort);
  assert.equal(metricValue(metrics, 'leafgate_gateway_rate_limited_total', { limit: 'csrsPerDevice' }) ?? 0, 0);
});

test('concurrentOnboardings: a second device registering while the first is connected is rate_limited until the first leaves', async (t) => {
  const stack = await startStack(t, { gateway: { rateLimits: { concurrentOnboardings: 1 } } });
  const a = await BootstrapSession.open(stack, 'pki-first');
  const b = await BootstrapSession.open(stack, 'pki-second');
  t.after(() => Promise.all([a.close(), b.close()]));
  assert.equal((await a.register()).kind, 'challenge');
  const refused = await b.register();
  assert.equal(refused.kind, 'error');
  assert.equal(refused.body.code, 'rate_limited');
  assert.ok((refused.body.retryAfterMs as number) > 0, `retryAfterMs ${refused.body.retryAfterMs}`);
  // The first device may go on with its own onboarding meanwhile.
  assert.equal((await a.register()).kind, 'challenge');

  await a.close();
  await until(() => stack.gateway.sessions.holder('pki-first') === undefined, 20_000, 'the first session to end');
  const identity = await b.onboard();
  assert.equal(identity.deviceId, 'pki-second');
});

test('csrsPerDevice: a CSR over the budget is rate_limited even after a successful authentication', async (t) => {
  const stack = await startStack(t, { gateway: { rateLimits: { csrsPerDevice: { points: 1, durationSeconds: 86_400 } } } });
  const first = await BootstrapSession.open(stack, 'pki-csr');
  t.after(() => first.close());
  await first.onboard();
  await first.close();
  await until(() => stack.gateway.sessions.holder('pki-csr') === undefined, 20_000, 'the first session to end');

  const second = await BootstrapSession.open(stack, 'pki-csr');
  t.after(() => second.close());
  const instruction = await second.authenticate();
  assert.equal(instruction.kind, 'instruction', 'register and auth are not CSRs');
  const { answer } = await second.csr(instruction);
  assert.equal(answer.kind, 'error');
  assert.equal(answer.body.code, 'rate_limited');
  assert.ok((answer.body.retryAfterMs as number) > 0 && (answer.body.retryAfterMs as number) <= 86_400_000, `retryAfterMs ${answer.body.retryAfterMs}`);
  // Only one certificate was issued.
  assert.equal((await stack.authority.store.listCertificates({ subjectId: 'pki-csr' })).length, 1);
  const metrics = await metricsText(stack.gateway.httpPort);
  assert.equal(metricValue(metrics, 'leafgate_gateway_rate_limited_total', { limit: 'csrsPerDevice' }), 1);
});

test('publishes refused by the ACL count against publishesPerClient, and ignoring the limit closes the connection', {
}, async (t) => {
  const stack = await startStack(t, { gateway: { rateLimits: { publishesPerClient: { points: 5, durationSeconds: 60 }, abuseDisconnectAfter: 3 } } });
  const session = await BootstrapSession.open(stack, 'dev-flood');
  t.after(() => session.close());
  const codes: string[] = [];
  const gone = closed(session.client, 10_000);
  let isClosed = false;
  void gone.then(() => (isClosed = true), () => undefined);
  for (let i = 0; i < 20 && !isClosed; i++) {
    const mark = session.inbox.messages.length;
    const error = session.inbox.wait((m) => session.inbox.messages.indexOf(m) >= mark && m.kind === 'error', 3000, `answer to publish ${i + 1}`);
    session.client.publish(upTopic('dev-victim', 'register'), '{}', { qos: 1 });
    const answer = await Promise.race([error, gone.then(() => null)]);
    if (answer) codes.push(String(answer.body.code));
  }
  assert.ok(codes.includes('rate_limited'), `answers: ${codes.join(',')}`);
  await gone;
});
