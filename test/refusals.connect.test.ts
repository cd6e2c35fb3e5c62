/**
 * CONNECT refusals at the gateway broker (MQTT 3.1.1 CONNACK return codes, 3.2.2.3):
 * 2 identifier rejected, 4 bad user name or password, 5 not authorized. mqtt.js rejects
 * connectAsync with an `ErrorWithReasonCode` whose `code` is the return code.
 */
import assert from 'node:assert/strict';
import { X509Certificate, generateKeyPairSync, type KeyObject } from 'node:crypto';
import tls from 'node:tls';
import { test } from 'node:test';
import { pkix, upTopic } from '../protocol/index.ts';
import { bootstrap, connackRefusal, connect, connectPacket, rawConnack } from './support/mqtt.ts';
import { gatewayIdentity } from './support/http.ts';
import { startStack } from './support/stack.ts';
import { DEFAULT_WAIT_MS, within } from './support/wait.ts';
import type { Stack } from './support/stack.ts';

test('client ids that are not valid device ids are refused with CONNACK 2', async (t) => {
  const stack = await startStack(t);
  const ids: Array<[string, string]> = [
    ['slash', 'dev/1'],
    ['plus', 'dev+1'],
    ['hash', 'dev#1'],
    ['wildcard only', '#'],
    ['empty', ''],
    ['10 kB', 'a'.repeat(10_000)],
    ['129 chars', 'a'.repeat(129)],
    ['leading dash', '-dev'],
    ['dollar', '$SYS'],
    ['space', 'dev 1'],
    ['NUL', 'dev\u00001'],
  ];
  for (const [what, id] of ids) {
    assert.equal(await connackRefusal(stack, id), 2, what);
  }
  // [MQTT-3.1.3-8]: an empty client id with cleanSession=0 is 0x02 too (aedes would invent an id).
  // mqtt.js will not send that CONNECT ("Missing clientId for unclean clients"): send it by hand.
  assert.equal(await rawConnack(stack, connectPacket('', { clean: false })), 2, 'empty, persistent session');
  assert.equal(await rawConnack(stack, connectPacket('', { clean: true })), 2, 'empty, clean session');
  assert.equal(stack.gateway.sessions.count(), 0);
  // Control for the raw path: a valid id gets 0 (connection accepted).
  assert.equal(await rawConnack(stack, connectPacket('dev-raw')), 0);
  // The longest valid id is accepted (positive control for the length bound).
  const ok = await connect(stack, 'a'.repeat(128));
  await ok.endAsync();
});

test('a username or password in CONNECT is refused with CONNACK 4', async (t) => {
  const stack = await startStack(t);
  assert.equal(await connackRefusal(stack, 'dev-up', { username: 'dev-up', password: 'secret' }), 4);
  assert.equal(await connackRefusal(stack, 'dev-up', { username: 'dev-up' }), 4);
  assert.equal(stack.gateway.sessions.holder('dev-up'), undefined);
});

test('a client certificate that is not from the device CA is refused with CONNACK 5', async (t) => {
  const stack = await startStack(t);
  const id = 'dev-birth';
  const cred = stack.credential(id, 'pki-signature');
  assert.equal(cred.method, 'pki-signature');
  if (cred.method !== 'pki-signature') return;
  // The birth certificate is a manufacturer credential, never an operational identity.
  const code = await connackRefusal(stack, id, { key: cred.factoryKey.export({ type: 'pkcs8', format: 'pem' }) as string, cert: cred.birthCert });
  assert.equal(code, 5);
  assert.equal(stack.gateway.sessions.holder(id), undefined);

  // The gateway's own certificate chains to the root but is not a device certificate.
  assert.equal(await connackRefusal(stack, stack.gatewayId, gatewayIdentity(stack)), 5);
});

test('a device certificate whose CN differs from the client id is refused with CONNACK 2', async (t) => {
  const stack = await startStack(t);
  const device = stack.device('dev-cn', 'pki-signature');
  const identity = await device.onboard();
  const tls = { key: identity.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, cert: identity.certificate + identity.chain[0] };

  assert.equal(await connackRefusal(stack, 'dev-other', tls), 2);
  assert.equal(stack.gateway.sessions.holder('dev-other'), undefined);
  // Positive control: the same certificate with its own id connects as an operational session.
  const client = await connect(stack, 'dev-cn', tls);
  t.after(() => client.endAsync(true));
  assert.equal(stack.gateway.sessions.holder('dev-cn')?.session.kind, 'operational');
});

test('a bootstrap connection cannot take over the id of a device connected with its certificate', async (t) => {
  const stack = await startStack(t);
  const id = 'dev-held';
  const device = stack.device(id, 'pki-signature');
  const identity = await device.onboard();
  const operational = await device.connectOperational(identity);
  t.after(() => operational.endAsync(true));
  let closed = false;
  operational.on('close', () => (closed = true));
  const holder = stack.gateway.sessions.holder(id);
  assert.equal(holder?.session.kind, 'operational');

  assert.equal(await connackRefusal(stack, id), 2);
  // Nor with a persistent session.
  assert.equal(await connackRefusal(stack, id, { clean: false }), 2);

  // The operational session is untouched: same client, still open, still publishing.
  assert.equal(stack.gateway.sessions.holder(id)?.client, holder?.client);
  assert.equal(closed, false);
  await within(device.publishTelemetry(operational, { still: 'here' }), 20_000, 'PUBACK of the operational session');
  assert.equal(closed, false);
  assert.equal(operational.connected, true);
});

test('a bootstrap connection for an id that is only held by another bootstrap session is accepted (takeover)', async (t) => {
  const stack = await startStack(t);
  const first = await bootstrap(t, stack, 'dev-boot');
  const second = await bootstrap(t, stack, 'dev-boot');
  // aedes closes the older connection with the same client id.
  await within(first.closed, 20_000, 'the older connection to be closed');
  assert.equal(second.isClosed, false);
  assert.equal(stack.gateway.sessions.holder('dev-boot')?.client.id, 'dev-boot');
  await second.send('register', '{');
  await second.expectError('malformed_json');
});

// ---- a certificate in the device CA's name that the device CA did not sign -----------------

const pem = (der: Buffer) => pkix.toPem(der, 'CERTIFICATE');
const keyPem = (k: KeyObject) => k.export({ type: 'pkcs8', format: 'pem' }) as string;

/** An MQTT 3.1.1 PUBLISH, QoS 1, packet id 1. */
function publishPacket(topic: string, payload: string): Buffer {
  const t = Buffer.from(topic, 'utf8');
  const body = Buffer.concat([Buffer.from([t.length >> 8, t.length & 0xff]), t, Buffer.from([0x00, 0x01]), Buffer.from(payload, 'utf8')]);
  if (body.length > 127) throw new Error('packet too long for this helper');
  return Buffer.concat([Buffer.from([0x32, body.length]), body]);
}

/**
 * Over raw TLS with `identity`: CONNECT and a QoS 1 PUBLISH sent at once (a client that does
 * not wait for CONNACK). Returns the CONNACK return code (null when none came) and whether a
 * PUBACK came, once the broker closed the connection (or, for an accepted one, acknowledged).
 */
function connectAndPublish(stack: Stack, identity: { key: string; cert: string }, clientId: string, ms = 4 * DEFAULT_WAIT_MS): Promise<{ connack: number | null; puback: boolean; tlsError?: string }> {
  const url = new URL(stack.brokerUrl);
  const p = new Promise<{ connack: number | null; puback: boolean; tlsError?: string }>((resolve) => {
    let got = Buffer.alloc(0);
    let tlsError: string | undefined;
    const socket = tls.connect({ host: url.hostname, port: Number(url.port), ca: stack.rootPem, servername: 'localhost', ...identity }, () => {
      socket.write(Buffer.concat([connectPacket(clientId), publishPacket(upTopic(clientId, 'telemetry', 'state'), '{"forged":true}')]));
    });
    const result = () => {
      // Walk the packets (all short here: one-byte remaining length).
      let connack: number | null = null;
      let puback = false;
      for (let i = 0; i + 1 < got.length; i += 2 + got[i + 1]) {
        if (got[i] === 0x20 && i + 3 < got.length) connack = got[i + 3];
        if (got[i] === 0x40) puback = true;
      }
      return { connack, puback, tlsError };
    };
    socket.on('data', (d: Buffer) => {
      got = Buffer.concat([got, d]);
      // The genuine identity: CONNACK 0 then PUBACK; nothing more to wait for.
      if (result().puback) socket.end();
    });
    socket.on('error', (err) => (tlsError = err.message));
    socket.on('close', () => resolve(result()));
  });
  return within(p, ms, `CONNECT+PUBLISH of ${clientId}`);
}

test('a client certificate with the device CA\'s name and key id but another signer is refused at CONNECT: no session, no publish', async (t) => {
  const stack = await startStack(t);
  const id = 'dev-forged';
  // A genuine device certificate (positive control, and the device CA certificate to reuse).
  const genuine = await stack.device('dev-genuine', 'pki-signature').onboard();
  const deviceCaPem = genuine.chain[0];
  const ca = stack.authority.ca.deviceCa;

  // The forger: a fresh key pair for the device, and a fresh "CA" key that signs in the device CA's name.
  const device = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const forgerKey = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey;
  const now = Date.now();
  const forgedLeaf = pem(pkix.encodeCertificate({
    serial: pkix.newSerial(), subjectDer: pkix.encodeName(id), spkiDer: device.publicKey.export({ type: 'spki', format: 'der' }),
    notBefore: new Date(now - 3600_000), notAfter: new Date(now + 86_400_000), profile: { kind: 'device', keyType: 'ec' },
    issuer: { subjectDer: ca.subjectDer, keyId: ca.keyId, privateKey: forgerKey },
  }));
  // It names the device CA exactly as the genuine certificate does.
  const forged = new X509Certificate(forgedLeaf);
  const real = new X509Certificate(genuine.certificate);
  assert.equal(forged.issuer, real.issuer, 'same issuer name');
  assert.equal(forged.subject.replace(id, 'dev-genuine'), real.subject, 'same subject form');
  assert.equal(forged.checkIssued(new X509Certificate(deviceCaPem)), true, 'openssl sees the device CA as its issuer (name and key id)');
  assert.equal(forged.verify(ca.certificate.publicKey), false, 'but the device CA did not sign it');

  // A forged "device CA" too: the device CA's subject, under the root's name, signed by the forger.
  const root = new X509Certificate(stack.rootPem);
  const rootSpki = root.publicKey.export({ type: 'spki', format: 'der' });
  const forgedCa = pem(pkix.encodeCertificate({
    serial: pkix.newSerial(), subjectDer: ca.subjectDer, spkiDer: generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ type: 'spki', format: 'der' }),
    notBefore: new Date(now - 3600_000), notAfter: new Date(now + 86_400_000), profile: { kind: 'intermediate', pathLen: 0 },
    issuer: { subjectDer: pkix.subjectDerOf(root.raw), keyId: pkix.keyIdentifier(rootSpki), privateKey: forgerKey },
  }));

  // A self-signed "device CA" of the same name, and a leaf it validly signed (its own key id):
  // OpenSSL finds no signature error here (so node's TLS leaves the connection up), only an
  // untrusted chain -- the broker's own check of the verification result must refuse it.
  const shadow = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const shadowSpki = shadow.publicKey.export({ type: 'spki', format: 'der' });
  const shadowIssuer = { subjectDer: ca.subjectDer, keyId: pkix.keyIdentifier(shadowSpki), privateKey: shadow.privateKey };
  const shadowCa = pem(pkix.encodeCertificate({
    serial: pkix.newSerial(), subjectDer: ca.subjectDer, spkiDer: shadowSpki, notBefore: new Date(now - 3600_000), notAfter: new Date(now + 86_400_000), profile: { kind: 'root' }, issuer: shadowIssuer,
  }));
  const shadowLeaf = pem(pkix.encodeCertificate({
    serial: pkix.newSerial(), subjectDer: pkix.encodeName(id), spkiDer: device.publicKey.export({ type: 'spki', format: 'der' }),
    notBefore: new Date(now - 3600_000), notAfter: new Date(now + 86_400_000), profile: { kind: 'device', keyType: 'ec' }, issuer: shadowIssuer,
  }));
  assert.equal(new X509Certificate(shadowLeaf).issuer, real.issuer, 'the shadow leaf names the device CA as its issuer');

  const attempts: Array<[string, { key: string; cert: string }]> = [
    ['a leaf of a self-signed CA with the device CA\'s name', { key: keyPem(device.privateKey), cert: shadowLeaf + shadowCa }],
    ['the forged leaf alone', { key: keyPem(device.privateKey), cert: forgedLeaf }],
    ['the forged leaf with the genuine device CA', { key: keyPem(device.privateKey), cert: forgedLeaf + deviceCaPem }],
    ['the forged leaf with a forged device CA', { key: keyPem(device.privateKey), cert: forgedLeaf + forgedCa }],
  ];
  for (const [what, identity] of attempts) {
    // mqtt.js: CONNACK 5 (or the TLS handshake refused, which mqtt.js reports without a number).
    let code: number | string;
    try {
      code = await connackRefusal(stack, id, identity);
    } catch (err) {
      assert.doesNotMatch((err as Error).message, /was accepted/, what);
      code = 'tls';
    }
    assert.ok(code === 5 || code === 'tls', `${what}: refused with ${code}`);
    assert.equal(stack.gateway.sessions.holder(id), undefined, `${what}: no session`);
    // A client that does not wait for CONNACK: its PUBLISH is never acknowledged (aedes may
    // close such a connection before it writes the CONNACK 5).
    const raw = await connectAndPublish(stack, identity, id);
    assert.ok(raw.connack === 5 || raw.connack === null, `${what}: ${JSON.stringify(raw)}`);
    assert.equal(raw.puback, false, `${what}: the PUBLISH was not acknowledged`);
    assert.equal(stack.gateway.sessions.holder(id), undefined, `${what}: still no session`);
  }

  // Positive control: the genuine certificate, the same raw exchange, gets CONNACK 0 and PUBACK.
  const ok = await connectAndPublish(stack, { key: keyPem(genuine.privateKey), cert: genuine.certificate + deviceCaPem }, 'dev-genuine');
  assert.deepEqual({ connack: ok.connack, puback: ok.puback }, { connack: 0, puback: true });
});
