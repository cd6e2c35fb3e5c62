/**
 * The publish path of the composed plugin chain: synchronous while every hook answers
 * synchronously (aedes gets its answer before authorizePublish returns), asynchronous from
 * the first hook that returns a promise on; the same verdicts either way (order, first
 * refusal wins, refusal -> dropped + reported, other errors -> disconnect, the client
 * re-checked after every await). Then the per-connection publish budget, the per-client
 * topic memo, and the same through the real gateway: a publish refused on the synchronous
 * path still reaches the device as down/error with its code and counts in the metrics.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { Client, PublishPacket } from 'aedes';
import pino from 'pino';
import { downFilter, downTopic, upTopic } from '../protocol/index.ts';
import {
  DEFAULT_RATE_LIMITS,
  DROPPED_TOPIC,
  PublishRefusal,
  SessionRegistry,
  TokenBucket,
  authorizationPlugin,
  composePlugins,
  parsedTopicOf,
  rateLimitPlugin,
  type BrokerPlugin,
  type DeviceSession,
} from '../plugins/index.ts';
import { runClock } from '../plugins/connection-limits.ts';
import { startStack } from './support/stack.ts';
import { Inbox, closeQuietly, connectOk, metricValue, metricsText, onboardDevice, operationalOptions, subscribeGranted, until } from './support/plugins-helpers.ts';

const logger = pino({ level: 'silent' });

function fakeClient(id = 'dev-1'): Client & { closed: boolean } {
  return { id, closed: false, conn: {} } as unknown as Client & { closed: boolean };
}

function packet(topic: string, payload = '{}'): PublishPacket {
  return { cmd: 'publish', topic, payload: Buffer.from(payload), qos: 1, retain: true, dup: false, messageId: 1 } as PublishPacket;
}

function session(deviceId: string, kind: DeviceSession['kind'] = 'operational'): DeviceSession {
  return { deviceId, kind, connectedAt: 0, challengeIds: new Set(), authenticated: false, remoteAddress: '127.0.0.1' };
}

/** Composes `plugins` and records what the chain reported. */
function chain(plugins: BrokerPlugin[]) {
  const refused: PublishRefusal[] = [];
  const hooks = composePlugins(plugins, { logger, onPublishRefused: (_c, _p, r) => refused.push(r), onPublished: () => undefined });
  /** Calls authorizePublish; `sync` tells whether aedes got its answer before the call returned. */
  const authorize = (client: Client, p: PublishPacket) => {
    let answered = false;
    let sync = false;
    const answer = new Promise<Error | null | undefined>((resolve) => {
      hooks.authorizePublish(client, p, (err) => {
        answered = true;
        resolve(err);
      });
    });
    sync = answered;
    return { sync, answer };
  };
  return { hooks, refused, authorize };
}

const hook = (name: string, fn: BrokerPlugin['authorizePublish']): BrokerPlugin => ({ name, authorizePublish: fn });

test('all hooks synchronous: aedes is answered before authorizePublish returns, hooks in list order', async () => {
  const calls: string[] = [];
  const { authorize } = chain(['a', 'b', 'c'].map((n) => hook(n, () => void calls.push(n))));
  const { sync, answer } = authorize(fakeClient(), packet('lg/v1/dev-1/up/telemetry/x'));
  assert.equal(sync, true);
  assert.equal(await answer, null);
  assert.deepEqual(calls, ['a', 'b', 'c']);
});

test('synchronous refusal: first refusal wins, later hooks do not run, the message is dropped and reported', async () => {
  const calls: string[] = [];
  const { authorize, refused } = chain([
    hook('a', () => void calls.push('a')),
    hook('b', () => {
      calls.push('b');
      throw new PublishRefusal('forbidden', 'not yours');
    }),
    hook('c', () => void calls.push('c')),
  ]);
  const p = packet('lg/v1/dev-2/up/telemetry/x');
  const { sync, answer } = authorize(fakeClient(), p);
  assert.equal(sync, true);
  assert.equal(await answer, null, 'acknowledged, not a disconnect');
  assert.deepEqual(calls, ['a', 'b']);
  assert.deepEqual(refused.map((r) => r.code), ['forbidden']);
  assert.equal(p.topic, DROPPED_TOPIC);
  assert.equal(p.retain, false);
});

test('a synchronous error other than a refusal is handed to aedes (disconnect)', async () => {
  const boom = new Error('boom');
  const { authorize, refused } = chain([hook('a', () => {
    throw boom;
  })]);
  const { sync, answer } = authorize(fakeClient(), packet('lg/v1/dev-1/up/telemetry/x'));
  assert.equal(sync, true);
  assert.equal(await answer, boom);
  assert.equal(refused.length, 0);
});

test('a hook that returns a promise: the chain goes on after it, in order, and answers once', async () => {
  const calls: string[] = [];
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  const { authorize } = chain([
    hook('sync-1', () => void calls.push('sync-1')),
    hook('async', async () => {
      calls.push('async:start');
      await gate;
      calls.push('async:end');
    }),
    hook('sync-2', () => void calls.push('sync-2')),
  ]);
  let answers = 0;
  const { sync, answer } = authorize(fakeClient(), packet('lg/v1/dev-1/up/csr'));
  void answer.then(() => answers++);
  assert.equal(sync, false, 'not answered while a hook is pending');
  assert.deepEqual(calls, ['sync-1', 'async:start']);
  release();
  assert.equal(await answer, null);
  assert.deepEqual(calls, ['sync-1', 'async:start', 'async:end', 'sync-2']);
  await new Promise((r) => setImmediate(r));
  assert.equal(answers, 1);
});

test('a refusal from a promise (rejected, or thrown by a later synchronous hook) is dropped and reported like a synchronous one', async () => {
  for (const where of ['async', 'after'] as const) {
    const { authorize, refused } = chain([
      hook('async', async () => {
        if (where === 'async') throw new PublishRefusal('rate_limited', 'slow down', 1234);
      }),
      hook('after', () => {
        if (where === 'after') throw new PublishRefusal('payload_too_large', 'too big');
      }),
    ]);
    const p = packet('lg/v1/dev-1/up/register');
    const { sync, answer } = authorize(fakeClient(), p);
    assert.equal(sync, false);
    assert.equal(await answer, null, where);
    assert.equal(refused.length, 1, where);
    assert.equal(refused[0].code, where === 'async' ? 'rate_limited' : 'payload_too_large');
    if (where === 'async') assert.equal(refused[0].retryAfterMs, 1234);
    assert.equal(p.topic, DROPPED_TOPIC);
  }
});

test('a client that closes while a hook is pending is not checked further; a will (client already closing) is', async () => {
  const calls: string[] = [];
  const plugins = [hook('async', () => Promise.resolve()), hook('after', () => void calls.push('after'))];
  const { authorize } = chain(plugins);

  const client = fakeClient();
  const { answer } = authorize(client, packet('lg/v1/dev-1/up/csr'));
  client.closed = true;
  const err = await answer;
  assert.match(String(err?.message), /closed during check/);
  assert.deepEqual(calls, []);

  // aedes authorizes a will from client.close(): closed from the start, the chain runs through.
  const { answer: will } = authorize(client, packet('lg/v1/dev-1/up/telemetry/will'));
  assert.equal(await will, null);
  assert.deepEqual(calls, ['after']);
});

test('TokenBucket: bursts up to points, refills continuously, says how long to wait', () => {
  const b = new TokenBucket({ points: 5, durationSeconds: 10 }, 0);
  for (let i = 0; i < 5; i++) assert.equal(b.take(0), 0, `take ${i + 1}`);
  assert.equal(b.take(0), 2000, 'one token every 2 s');
  assert.equal(b.take(500), 1500);
  assert.equal(b.take(2000), 0, 'refilled');
  assert.equal(b.take(2000), 2000);
  // A long idle time refills to the burst size, never beyond.
  for (let i = 0; i < 5; i++) assert.equal(b.take(1_000_000), 0);
  assert.ok(b.take(1_000_000) > 0);
  // A clock that goes back never refills.
  assert.ok(b.take(0) > 0);
});

test('runClock: one reading per synchronous run (the publishes of one socket read), a fresh one after it', async () => {
  const first = runClock();
  const spin = performance.now() + 2;
  while (performance.now() < spin);
  assert.equal(runClock(), first, 'same run, same reading');
  await Promise.resolve();
  await new Promise((r) => setTimeout(r, 2));
  assert.ok(runClock() > first, 'a later run reads the clock again');
});

test('publish budget: synchronous, per connection; a refusal is rate_limited with retryAfterMs and counted; ignoring it disconnects', () => {
  const sessions = new SessionRegistry();
  const limited: string[] = [];
  const limits = rateLimitPlugin({
    sessions,
    limits: { ...DEFAULT_RATE_LIMITS, publishesPerClient: { points: 3, durationSeconds: 60 }, abuseDisconnectAfter: 2 },
    observer: { limited: (l) => limited.push(l) },
  });
  const a = fakeClient('dev-a');
  const b = fakeClient('dev-b');
  sessions.attach(a, session('dev-a'));
  sessions.attach(b, session('dev-b'));
  const p = packet('lg/v1/dev-a/up/telemetry/x');
  const budget = limits.publishBudget.authorizePublish!;
  for (let i = 0; i < 3; i++) assert.equal(budget(a, p), undefined, 'allowed, and no promise');
  const refusal = (() => {
    try {
      budget(a, p);
    } catch (err) {
      return err;
    }
    return undefined;
  })();
  assert.ok(refusal instanceof PublishRefusal, 'refused synchronously');
  assert.equal(refusal.code, 'rate_limited');
  assert.ok(refusal.retryAfterMs! > 0 && refusal.retryAfterMs! <= 20_000, `retryAfterMs ${refusal.retryAfterMs}`);
  assert.throws(() => budget(a, p), PublishRefusal, 'strike 2');
  assert.throws(() => budget(a, p), (err: Error) => !(err instanceof PublishRefusal) && /ignored 3 times/.test(err.message), 'past abuseDisconnectAfter: not a refusal, a disconnect');
  assert.deepEqual(limited, ['publishesPerClient', 'publishesPerClient', 'publishesPerClient']);
  assert.equal(budget(b, packet('lg/v1/dev-b/up/telemetry/x')), undefined, 'another connection has its own budget');

  // New limits restart every connection's budget.
  limits.reconfigure({ publishesPerClient: { points: 1, durationSeconds: 60 } });
  assert.equal(budget(a, p), undefined, 'a full budget again');
  const pb = packet('lg/v1/dev-b/up/telemetry/x');
  assert.equal(budget(b, pb), undefined);
  assert.throws(() => budget(b, pb), PublishRefusal, 'the new size applies');
});

test('rate-limit hook: synchronous for telemetry, a promise only for the onboarding kinds', async () => {
  const sessions = new SessionRegistry();
  const limits = rateLimitPlugin({ sessions, limits: { ...DEFAULT_RATE_LIMITS, onboardingsPerDevice: { points: 1, durationSeconds: 3600 } } });
  const c = fakeClient('dev-r');
  sessions.attach(c, session('dev-r', 'bootstrap'));
  assert.equal(limits.authorizePublish!(c, packet('lg/v1/dev-r/up/telemetry/x')), undefined);
  const first = limits.authorizePublish!(c, packet('lg/v1/dev-r/up/register'));
  assert.ok(first instanceof Promise);
  await first;
  await assert.rejects(limits.authorizePublish!(c, packet('lg/v1/dev-r/up/register')) as Promise<void>, (err: PublishRefusal) => err.code === 'rate_limited');
  assert.equal(limits.activeOnboardings(), 1);
});

test('topic memo and ACL verdict: re-parsed when the topic changes, re-judged when the session changes', () => {
  const sessions = new SessionRegistry();
  const acl = authorizationPlugin({ sessions }).authorizePublish!;
  const c = fakeClient('dev-m');
  sessions.bind(c, session('dev-m', 'operational'));
  const own = upTopic('dev-m', 'telemetry', 'a');
  assert.equal(acl(c, packet(own)), undefined);
  assert.equal(parsedTopicOf(c, own)?.kind, 'telemetry');
  // The same topic again (a different string object with the same text): still allowed.
  assert.equal(acl(c, packet(`${own}`.split('').join(''))), undefined);
  // Another topic on the same client: judged on its own.
  assert.throws(() => acl(c, packet(upTopic('dev-x', 'telemetry', 'a'))), (e: PublishRefusal) => e.code === 'forbidden');
  assert.throws(() => acl(c, packet(upTopic('dev-m', 'register'))), (e: PublishRefusal) => e.code === 'forbidden', 'operational sessions do not register');
  // Same topic, new session of another kind on this client object: the verdict is recomputed.
  const reg = packet(upTopic('dev-m', 'register'));
  sessions.bind(c, session('dev-m', 'bootstrap'));
  assert.equal(acl(c, reg), undefined);
  assert.equal(reg.retain, false, 'onboarding messages are never retained');
  assert.throws(() => acl(c, packet(own)), (e: PublishRefusal) => e.code === 'forbidden', 'bootstrap sessions send no telemetry');
});

test('through the gateway: telemetry over the publish budget is refused on the synchronous path with rate_limited on down/error, counted, and not routed', async (t) => {
  const stack = await startStack(t, { gateway: { rateLimits: { publishesPerClient: { points: 3, durationSeconds: 60 }, abuseDisconnectAfter: 10 } } });
  const identity = await onboardDevice(stack, 'pki-sync');
  const dev = await connectOk(stack, operationalOptions(identity));
  t.after(() => closeQuietly(dev));
  const inbox = new Inbox(dev);
  assert.deepEqual(await subscribeGranted(dev, downFilter('pki-sync')), [1]);
  const routed: string[] = [];
  const aedes = stack.gateway.broker.aedes;
  const spy = (p: PublishPacket, cb: () => void) => {
    routed.push(p.payload.toString());
    cb();
  };
  await new Promise<void>((r) => aedes.subscribe('lg/v1/pki-sync/up/#', spy, r));
  t.after(() => new Promise<void>((r) => aedes.unsubscribe('lg/v1/pki-sync/up/#', spy, r)));

  for (let i = 1; i <= 5; i++) await dev.publishAsync(upTopic('pki-sync', 'telemetry', 'state'), JSON.stringify({ i }), { qos: 1 });
  // QoS 0 as well: the same synchronous check, no acknowledgement to wait for.
  dev.publish(upTopic('pki-sync', 'telemetry', 'state'), JSON.stringify({ i: 6 }), { qos: 0 });
  const errors = () => inbox.messages.filter((m) => m.topic === downTopic('pki-sync', 'error'));
  await until(() => errors().length >= 3, 20_000, 'three rate_limited errors');
  assert.equal(errors().length, 3);
  for (const e of errors()) {
    assert.equal(e.body.code, 'rate_limited');
    assert.ok((e.body.retryAfterMs as number) > 0, `retryAfterMs ${e.body.retryAfterMs}`);
  }
  assert.deepEqual(routed, ['{"i":1}', '{"i":2}', '{"i":3}'], 'only the publishes within the budget were routed');
  assert.equal(dev.connected, true);
  const metrics = await metricsText(stack.gateway.httpPort);
  assert.equal(metricValue(metrics, 'leafgate_gateway_rate_limited_total', { limit: 'publishesPerClient' }), 3);
  assert.equal(metricValue(metrics, 'leafgate_gateway_refused_total', { reason: 'rate_limited' }), 3);
});
