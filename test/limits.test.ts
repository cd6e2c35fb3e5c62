/**
 * Connection limits of the broker: TLS handshake timeout, CONNECT timeout, TLS 1.2 floor,
 * the hard MQTT packet cap (closes the connection) next to the polite payload caps
 * (down/error payload_too_large, connection kept).
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { test } from 'node:test';
import tls from 'node:tls';
import { downFilter, upTopic } from '../protocol/index.ts';
import { startStack } from './support/stack.ts';
import { BootstrapSession, closeQuietly, closed, connectOk, connectPacket, nextEvent, onboardDevice, operationalOptions, rawTls, subscribeGranted, Inbox, within } from './support/plugins-helpers.ts';

test('a client that opens TCP and never sends a ClientHello is closed after handshakeTimeoutMs', async (t) => {
  const stack = await startStack(t, { gateway: { handshakeTimeoutMs: 300 } });
  const socket = net.connect({ host: '127.0.0.1', port: stack.gateway.port });
  t.after(() => socket.destroy());
  socket.on('error', () => undefined);
  await nextEvent(socket, 'connect', 20_000);
  const started = Date.now();
  await nextEvent(socket, 'close', 20_000);
  const elapsed = Date.now() - started;
  assert.ok(elapsed >= 200, `closed after ${elapsed} ms: by the timeout, not on accept`);
});

test('a client that completes TLS but never sends CONNECT is closed after connectTimeoutMs', async (t) => {
  const stack = await startStack(t, { gateway: { connectTimeoutMs: 300 } });
  const socket = await rawTls(stack, stack.gateway.port);
  t.after(() => socket.destroy());
  socket.on('error', () => undefined);
  const started = Date.now();
  await nextEvent(socket, 'close', 20_000);
  const elapsed = Date.now() - started;
  assert.ok(elapsed >= 200, `closed after ${elapsed} ms: by the timeout, not on handshake`);
});

test('TLS 1.1 and below are refused at the handshake; TLS 1.2 and 1.3 are accepted', async (t) => {
  const stack = await startStack(t);
  for (const version of ['TLSv1', 'TLSv1.1'] as const) {
    // SECLEVEL=0 lets this client offer the old protocol at all, so the refusal is the gateway's.
    const socket = tls.connect({ host: '127.0.0.1', port: stack.gateway.port, ca: stack.rootPem, servername: 'localhost', minVersion: version, maxVersion: version, ciphers: 'DEFAULT@SECLEVEL=0' });
    t.after(() => socket.destroy());
    const outcome = await within(
      new Promise<string>((resolve) => {
        socket.once('secureConnect', () => resolve(`connected with ${socket.getProtocol()}`));
        socket.once('error', (err: Error & { code?: string }) => resolve(err.code ?? err.message));
      }),
      3000,
      `${version} handshake`,
    );
    assert.equal(outcome, 'ERR_SSL_TLSV1_ALERT_PROTOCOL_VERSION', version);
  }
  for (const version of ['TLSv1.2', 'TLSv1.3'] as const) {
    const socket = await rawTls(stack, stack.gateway.port, { minVersion: version, maxVersion: version });
    assert.equal(socket.getProtocol(), version);
    socket.destroy();
  }
});

test('a publish over maxPacketBytes closes the connection; one over the payload cap is refused politely', async (t) => {
  const stack = await startStack(t, { gateway: { maxPacketBytes: 96 * 1024, telemetryPayloadBytes: 32 * 1024 } });
  const identity = await onboardDevice(stack, 'pki-big');
  const client = await connectOk(stack, operationalOptions(identity));
  t.after(() => closeQuietly(client));
  const inbox = new Inbox(client);
  assert.deepEqual(await subscribeGranted(client, downFilter('pki-big')), [1]);
  const topic = upTopic('pki-big', 'telemetry', 'blob');

  // Over the telemetry cap, under the packet cap: acknowledged, dropped, told why, still connected.
  const error = inbox.wait((m) => m.kind === 'error', 3000, 'payload_too_large');
  await client.publishAsync(topic, Buffer.alloc(40 * 1024, 0x61), { qos: 1 });
  assert.equal((await error).body.code, 'payload_too_large');
  assert.equal(client.connected, true);
  await client.publishAsync(topic, Buffer.alloc(1024, 0x61), { qos: 1 });

  // Over the packet cap: the connection is cut.
  const gone = closed(client, 20_000);
  client.publish(topic, Buffer.alloc(128 * 1024, 0x61), { qos: 1 });
  await gone;
});

test('a packet that declares a length over maxPacketBytes is cut before its body arrives', async (t) => {
  const stack = await startStack(t);
  const socket = await rawTls(stack, stack.gateway.port);
  t.after(() => socket.destroy());
  socket.on('error', () => undefined);
  const connack = nextEvent<[Buffer]>(socket, 'data', 3000);
  socket.write(connectPacket({ clientId: 'dev-liar', clean: true }));
  assert.deepEqual([...(await connack)[0]], [0x20, 0x02, 0x00, 0x00]);
  // PUBLISH QoS 0 announcing 10 MiB, then nothing: without the cap the broker would wait for it.
  const varint: number[] = [];
  for (let n = 10 * 1024 * 1024; ; ) {
    const b = n % 128;
    n = Math.floor(n / 128);
    varint.push(n > 0 ? b | 0x80 : b);
    if (n === 0) break;
  }
  const gone = nextEvent(socket, 'close', 20_000);
  socket.write(Buffer.from([0x30, ...varint]));
  await gone;
});

test('a bootstrap onboarding message over the onboarding cap is refused with payload_too_large', async (t) => {
  const stack = await startStack(t, { gateway: { onboardingPayloadBytes: 4 * 1024 } });
  const session = await BootstrapSession.open(stack, 'dev-fat');
  t.after(() => session.close());
  const answer = await session.request('register', { method: 'pki-signature', birthCert: 'x'.repeat(5000) });
  assert.equal(answer.kind, 'error');
  assert.equal(answer.body.code, 'payload_too_large');
  assert.equal(session.client.connected, true);
});

test('TLS session tickets are off unless tlsSessionTickets is set: a reconnect with the last session is resumed only then', async (t) => {
  for (const tickets of [false, true]) {
    const stack = await startStack(t, { gateway: tickets ? { tlsSessionTickets: true } : {} });
    for (const version of ['TLSv1.2', 'TLSv1.3'] as const) {
      const first = await rawTls(stack, stack.gateway.port, { minVersion: version, maxVersion: version });
      first.on('error', () => undefined);
      first.write(connectPacket({ clientId: `dev-tickets-${version.slice(-3)}`, clean: true }));
      // The CONNACK comes after every ticket the server sends (TLS 1.3 sends them right after
      // the handshake; TLS 1.2 inside it), so the session is final by then.
      await nextEvent(first, 'data', 20_000);
      const session = first.getSession();
      first.destroy();
      const second = await rawTls(stack, stack.gateway.port, { minVersion: version, maxVersion: version, ...(session ? { session } : {}) });
      assert.equal(second.isSessionReused(), tickets, `${version} with tlsSessionTickets ${tickets}`);
      second.destroy();
    }
  }
});
