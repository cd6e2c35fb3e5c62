/**
 * The stand-in's MQTT device/module surface: aedes 1.x behind a TLS server, speaking what
 * azure-iot-device-mqtt speaks to IoT Hub (MQTT 3.1.1):
 *
 *   CONNECT    client id `{deviceId}` or `{deviceId}/{moduleId}`,
 *              user name `{hostName}/{clientId}/?api-version={v}&DeviceClientType={ua}`,
 *              password = SAS token (sr = `{hostName}/devices/{id}[/modules/{mid}]`), or none
 *              and a TLS client certificate: selfSigned = SHA-1/SHA-256 thumbprint matches the
 *              primary or secondary one; certificateAuthority = a path through the sent chain
 *              to a verified CA (root or intermediate) and CN = device id. Either way the
 *              identity must exist and be enabled, and the certificate be within its validity.
 *   SUBSCRIBE  `$iothub/twin/res/#`, `$iothub/twin/PATCH/properties/desired/#`,
 *              `$iothub/methods/POST/#`, `devices/{d}/messages/devicebound/#` (devices),
 *              `devices/{d}/modules/{m}/inputs/#` (modules); anything else gets SUBACK 0x80
 *   PUBLISH    `$iothub/twin/GET/?$rid={rid}`                      -> `$iothub/twin/res/200/?$rid={rid}` + twin
 *              `$iothub/twin/PATCH/properties/reported/?$rid={rid}` -> `$iothub/twin/res/204/?$rid={rid}&$version={n}`
 *              `$iothub/methods/res/{status}/?$rid={rid}`           answers an invokeMethod
 *              `devices/{d}[/modules/{m}]/messages/events/{props}` telemetry / output events
 *              anything else closes the connection, as IoT Hub does.
 *
 * `$iothub/...` topics are per connection on IoT Hub, so the hub's answers are written to the
 * one client (aedes `client.publish`), never routed through the broker's subscriptions.
 */
import { Aedes, type Client } from 'aedes';
import { EventEmitter, once } from 'node:events';
import { X509Certificate } from 'node:crypto';
import tls from 'node:tls';
import { HubError, type JsonObject } from './model.ts';
import { parseSas, signatureMatches } from './sas.ts';
import type { InvokeOptions, IotHubStandin, MethodResult, MqttConnectRecord, TelemetryMessage } from './standin.ts';

export interface MqttSurface {
  port: number;
  refreshTls(): void;
  disconnectDevice(deviceId: string, reason: string): void;
  disconnectIdentity(deviceId: string, moduleId: string | undefined, reason: string): void;
  pushDesired(deviceId: string, moduleId: string | undefined, body: JsonObject): void;
  invokeMethod(deviceId: string, moduleId: string | undefined, methodName: string, payload: unknown, opts: InvokeOptions): Promise<MethodResult>;
  waitSubscribed(deviceId: string, moduleId: string | undefined, filter: string, timeoutMs: number): Promise<void>;
  isConnected(deviceId: string, moduleId: string | undefined): boolean;
  close(): Promise<void>;
}

interface Identity {
  deviceId: string;
  moduleId?: string;
  key: string;
}

interface PendingMethod {
  key: string;
  resolve: (r: MethodResult) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

const TWIN_RES = '$iothub/twin/res/#';
const DESIRED = '$iothub/twin/PATCH/properties/desired/#';
const METHODS = '$iothub/methods/POST/#';

function identityKey(deviceId: string, moduleId?: string): string {
  return moduleId ? `${deviceId}/${moduleId}` : deviceId;
}

/** aedes keeps a client's granted subscriptions (also restored ones of a persistent session) in `client.subscriptions`. */
function isSubscribed(client: Client, filter: string): boolean {
  const subs = (client as unknown as { subscriptions?: Record<string, unknown> }).subscriptions;
  return !!subs && Object.prototype.hasOwnProperty.call(subs, filter);
}

function parseQuery(q: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const part of q.split('&')) {
    if (!part) continue;
    const eq = part.indexOf('=');
    const k = eq < 0 ? part : part.slice(0, eq);
    const v = eq < 0 ? '' : part.slice(eq + 1);
    try {
      out[decodeURIComponent(k)] = decodeURIComponent(v);
    } catch {
      out[k] = v;
    }
  }
  return out;
}

function normalizeThumbprint(t: string | null | undefined): string {
  return (t ?? '').replace(/:/g, '').toUpperCase();
}

/**
 * IoT Hub's certificateAuthority check: a path from the client certificate, through the
 * certificates the client sent along, to one of the hub's verified CAs. A verified CA may be
 * a root or an intermediate (IoT Hub accepts either), so the path ends at the first verified
 * CA that issued the current certificate: OpenSSL's own verification (`socket.authorized`)
 * would need a self-signed anchor, which Node 20 cannot relax (no partial-chain option).
 * Every certificate on the path must be within its validity period, and every issuer a CA.
 * Returns why there is no such path, or undefined when there is one.
 */
function verifiedCaPathError(socket: tls.TLSSocket, trustedPems: readonly string[], now: number): string | undefined {
  const valid = (c: X509Certificate) => Date.parse(c.validFrom) <= now && now <= Date.parse(c.validTo);
  const issued = (child: X509Certificate, issuer: X509Certificate) => issuer.ca && valid(issuer) && child.checkIssued(issuer) && child.verify(issuer.publicKey);
  const trusted = trustedPems.map((pem) => new X509Certificate(pem));
  if (!trusted.length) return 'the hub has no verified CA';
  // The certificates the client sent, leaf first (getPeerCertificate(true) links them by issuerCertificate).
  const sent: X509Certificate[] = [];
  const seen = new Set<string>();
  for (let c: tls.DetailedPeerCertificate | undefined = socket.getPeerCertificate(true) as tls.DetailedPeerCertificate; c?.raw && !seen.has(c.fingerprint256); c = c.issuerCertificate) {
    seen.add(c.fingerprint256);
    sent.push(new X509Certificate(c.raw));
  }
  let current = sent[0];
  if (!current) return 'no client certificate';
  for (let depth = 0; depth < 8; depth++) {
    if (trusted.some((ca) => issued(current, ca))) return undefined;
    const next = sent.find((c) => c !== current && issued(current, c));
    if (!next) return `no verified CA issued ${current.subject.replace(/\n/g, ', ')}`;
    current = next;
  }
  return 'chain too long';
}

export async function startMqttSurface(standin: IotHubStandin): Promise<MqttSurface> {
  const identities = new WeakMap<Client, Identity>();
  const current = new Map<string, Client>();
  const pending = new Map<string, PendingMethod>();
  const changes = new EventEmitter();
  changes.setMaxListeners(0);
  let ridCounter = 0;

  const send = (client: Client, topic: string, payload: string | Buffer) =>
    client.publish({ cmd: 'publish', topic, payload: typeof payload === 'string' ? Buffer.from(payload) : payload, qos: 0, retain: false, dup: false }, () => {});

  function authenticate(client: Client, username: string | undefined, password: Buffer | undefined, done: (err: (Error & { returnCode: number }) | null, ok: boolean | null) => void): void {
    const clientId = client.id;
    const rec: MqttConnectRecord = { clientId, username: username ?? '', auth: password?.length ? 'sas' : 'x509', accepted: false, returnCode: 0, at: Date.now() };
    standin.connections.push(rec);
    const refuse = (code: 2 | 4 | 5, reason: string) => {
      rec.returnCode = code;
      rec.reason = reason;
      standin.emit('connect', rec);
      done(Object.assign(new Error(reason), { returnCode: code }), false);
    };

    const idParts = clientId.split('/');
    if (idParts.length > 2 || !idParts[0] || idParts[1] === '') return refuse(2, 'client id must be {deviceId} or {deviceId}/{moduleId}');
    const [deviceId, moduleId] = idParts;
    rec.deviceId = deviceId;
    if (moduleId) rec.moduleId = moduleId;

    // User name: {hostName}/{clientId}/?api-version=...; the host part is case-insensitive, ids are not.
    const host = standin.hostName;
    const user = username ?? '';
    const afterHost = user.slice(host.length);
    if (user.slice(0, host.length).toLowerCase() !== host.toLowerCase() || !afterHost.startsWith(`/${clientId}/`)) {
      return refuse(4, `user name must be ${host}/${clientId}/?api-version=...`);
    }
    const rest = afterHost.slice(clientId.length + 2);
    const query = rest.startsWith('?') ? parseQuery(rest.slice(1)) : {};
    if (!query['api-version']) return refuse(4, 'user name carries no api-version');
    rec.apiVersion = query['api-version'];

    const device = standin.devices.get(deviceId);
    if (!device) return refuse(5, `device ${deviceId} is not registered`);
    if (device.status !== 'enabled') return refuse(5, `device ${deviceId} is disabled`);
    const mod = moduleId ? standin.modules.get(`${deviceId}/${moduleId}`) : undefined;
    if (moduleId && !mod) return refuse(5, `module ${moduleId} on ${deviceId} is not registered`);
    const auth = (mod ?? device).authentication;

    if (password?.length) {
      const sas = parseSas(password.toString('utf8'));
      if (!sas) return refuse(4, 'password is not a SharedAccessSignature');
      const path = `/devices/${deviceId}${moduleId ? `/modules/${moduleId}` : ''}`;
      if (sas.resource.slice(0, host.length).toLowerCase() !== host.toLowerCase() || sas.resource.slice(host.length) !== path) {
        return refuse(5, `token audience ${sas.resource} is not ${host}${path}`);
      }
      if (sas.se <= Math.floor(Date.now() / 1000)) return refuse(5, 'token expired');
      let keys: Array<string | null>;
      if (sas.skn) {
        const policy = standin.policies.get(sas.skn);
        if (!policy || !policy.rights.has('DeviceConnect')) return refuse(5, `policy ${sas.skn} does not grant DeviceConnect`);
        keys = [policy.primaryKey, policy.secondaryKey];
      } else {
        if (auth.type !== 'sas') return refuse(5, `identity uses ${auth.type} authentication, not SAS`);
        keys = [auth.symmetricKey.primaryKey, auth.symmetricKey.secondaryKey];
      }
      if (!signatureMatches(sas, keys)) return refuse(5, 'token signature does not match');
    } else {
      const socket = client.conn as tls.TLSSocket;
      const peer = typeof socket.getPeerX509Certificate === 'function' ? socket.getPeerX509Certificate() : undefined;
      if (!peer) {
        rec.auth = 'none';
        return refuse(5, 'neither a SAS token nor a client certificate');
      }
      const now = Date.now();
      if (Date.parse(peer.validFrom) > now || Date.parse(peer.validTo) < now) return refuse(5, 'client certificate is not within its validity period');
      if (auth.type === 'selfSigned') {
        const given = [normalizeThumbprint(peer.fingerprint), normalizeThumbprint(peer.fingerprint256)];
        const known = [auth.x509Thumbprint.primaryThumbprint, auth.x509Thumbprint.secondaryThumbprint].map(normalizeThumbprint).filter(Boolean);
        if (!known.some((k) => given.includes(k))) return refuse(5, 'client certificate thumbprint matches neither registered thumbprint');
      } else if (auth.type === 'certificateAuthority') {
        const chainError = verifiedCaPathError(socket, standin.trustedCas, now);
        if (chainError) return refuse(5, `client certificate does not chain to a verified CA (${chainError})`);
        const cn = /(?:^|\n)CN=([^\n]*)/.exec(peer.subject)?.[1];
        if (cn !== deviceId && cn !== clientId) return refuse(5, `client certificate CN ${cn} is not ${deviceId}`);
      } else {
        return refuse(5, `identity uses ${auth.type} authentication, not X.509`);
      }
    }

    rec.accepted = true;
    identities.set(client, { deviceId, moduleId, key: identityKey(deviceId, moduleId) });
    standin.emit('connect', rec);
    done(null, true);
  }

  function twinRequest(client: Client, id: Identity, topic: string, payload: Buffer): void {
    const m = /^\$iothub\/twin\/(GET|PATCH)(\/[^?]*)\?(.*)$/.exec(topic);
    const rid = m ? parseQuery(m[3]).$rid : undefined;
    if (!m || !rid) throw new Error(`malformed twin topic ${topic}`);
    const respond = (status: number, body: unknown, version?: number) => {
      // IoT Hub answers only on a subscribed response topic.
      if (!isSubscribed(client, TWIN_RES)) return;
      const t = `$iothub/twin/res/${status}/?$rid=${rid}${version !== undefined ? `&$version=${version}` : ''}`;
      setImmediate(() => send(client, t, body === undefined ? '' : JSON.stringify(body)));
    };
    try {
      if (m[1] === 'GET' && m[2] === '/') {
        const t = standin.twin(id.deviceId, id.moduleId);
        respond(200, { desired: t.desired, reported: t.reported });
      } else if (m[1] === 'PATCH' && m[2] === '/properties/reported/') {
        let patch: unknown;
        try {
          patch = JSON.parse(payload.toString('utf8'));
        } catch {
          throw new HubError('ArgumentInvalid', 'reported properties patch is not JSON');
        }
        const version = standin.patchReported(id.deviceId, id.moduleId, patch);
        respond(204, undefined, version);
      } else {
        throw new HubError('ArgumentInvalid', `unsupported twin operation ${m[1]} ${m[2]}`);
      }
    } catch (err) {
      const e = err instanceof HubError ? err : new HubError('ServerError', (err as Error).message);
      respond(e.status, e.mqttBody());
    }
  }

  function methodResponse(id: Identity, topic: string, payload: Buffer): void {
    const m = /^\$iothub\/methods\/res\/(\d{3})\/\?(.*)$/.exec(topic);
    const rid = m ? parseQuery(m[2]).$rid : undefined;
    if (!m || !rid) throw new Error(`malformed method response topic ${topic}`);
    const p = pending.get(rid);
    if (!p || p.key !== id.key) return; // late or foreign answer: IoT Hub drops it
    pending.delete(rid);
    clearTimeout(p.timer);
    const text = payload.toString('utf8');
    let body: unknown = null;
    if (text.length) {
      try {
        body = JSON.parse(text);
      } catch {
        p.reject(new HubError('ArgumentInvalid', 'the device answered a payload that is not JSON'));
        return;
      }
    }
    p.resolve({ status: Number(m[1]), payload: body });
  }

  function telemetry(id: Identity, packet: { topic: string; payload: Buffer | string; qos: number }): boolean {
    const m = /^devices\/([^/]+)\/(?:modules\/([^/]+)\/)?messages\/events(?:\/(.*))?$/.exec(packet.topic);
    if (!m || m[1] !== id.deviceId || (m[2] ?? undefined) !== id.moduleId) return false;
    const bag = parseQuery((m[3] ?? '').replace(/\/$/, ''));
    const properties: Record<string, string> = {};
    const systemProperties: Record<string, string> = {};
    for (const [k, v] of Object.entries(bag)) (k.startsWith('$.') ? systemProperties : properties)[k] = v;
    const msg: TelemetryMessage = {
      deviceId: id.deviceId,
      ...(id.moduleId ? { moduleId: id.moduleId } : {}),
      topic: packet.topic,
      ...(systemProperties['$.on'] ? { outputName: systemProperties['$.on'] } : {}),
      properties,
      systemProperties,
      body: Buffer.from(packet.payload),
      qos: packet.qos,
      at: Date.now(),
    };
    standin.telemetry.push(msg);
    standin.markConnection(id.deviceId, id.moduleId, 'Connected');
    standin.emit('telemetry', msg);
    return true;
  }

  const aedes = await Aedes.createBroker({
    connectTimeout: 10_000,
    authenticate,
    authorizeSubscribe(client, sub, done) {
      const id = identities.get(client);
      if (!id) return done(null, null);
      const own = id.moduleId ? `devices/${id.deviceId}/modules/${id.moduleId}/inputs/#` : `devices/${id.deviceId}/messages/devicebound/#`;
      done(null, [TWIN_RES, DESIRED, METHODS, own].includes(sub.topic) ? sub : null);
    },
    authorizePublish(client, packet, done) {
      if (!client) return done(null); // the broker's own $SYS messages
      const id = identities.get(client);
      if (!id) return done(new Error('not authenticated'));
      try {
        if (packet.topic.startsWith('$iothub/twin/')) twinRequest(client, id, packet.topic, Buffer.from(packet.payload));
        else if (packet.topic.startsWith('$iothub/methods/res/')) methodResponse(id, packet.topic, Buffer.from(packet.payload));
        else if (!telemetry(id, packet)) return done(new Error(`topic ${packet.topic} is not allowed for ${id.key}`));
      } catch (err) {
        return done(err as Error);
      }
      done(null);
    },
  });

  // 'client' (registered, before CONNACK is written) pairs with 'clientDisconnect'; a client that
  // takes over an id has already caused the previous one's 'clientDisconnect'.
  aedes.on('client', (client) => {
    const id = identities.get(client);
    if (!id) return;
    current.set(id.key, client);
    standin.markConnection(id.deviceId, id.moduleId, 'Connected');
    changes.emit('change');
  });
  // Subscriptions restored from a persistent session (the SDK connects with clean=false) emit no 'subscribe'.
  aedes.on('clientReady', () => changes.emit('change'));
  aedes.on('clientDisconnect', (client) => {
    const id = identities.get(client);
    if (!id || current.get(id.key) !== client) return;
    current.delete(id.key);
    standin.markConnection(id.deviceId, id.moduleId, 'Disconnected');
    standin.emit('disconnect', { deviceId: id.deviceId, moduleId: id.moduleId });
    changes.emit('change');
  });
  aedes.on('subscribe', () => changes.emit('change'));
  aedes.on('unsubscribe', () => changes.emit('change'));

  const secureContext = (): tls.SecureContextOptions => ({
    key: standin.serverTls.key,
    cert: standin.serverTls.cert,
    // The verified CAs, named in the CertificateRequest. The chain itself is checked in
    // `authenticate` (verifiedCaPathError: a verified intermediate ends the path, as on IoT
    // Hub); selfSigned devices are matched by thumbprint whatever the chain says.
    ca: [...standin.trustedCas],
    minVersion: 'TLSv1.2',
  });
  const server = tls.createServer({ ...secureContext(), requestCert: true, rejectUnauthorized: false, handshakeTimeout: 10_000 });
  server.on('secureConnection', (socket) => {
    socket.setNoDelay(true);
    aedes.handle(socket);
  });
  server.on('tlsClientError', (_err, socket) => socket.destroy());
  server.listen(0, standin.listenHost);
  await once(server, 'listening');
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : 0;

  function waitUntil<T>(check: () => T | undefined, timeoutMs: number, what: string): Promise<T> {
    const now = check();
    if (now !== undefined) return Promise.resolve(now);
    return new Promise<T>((resolve, reject) => {
      const onChange = () => {
        const v = check();
        if (v === undefined) return;
        clearTimeout(timer);
        changes.off('change', onChange);
        resolve(v);
      };
      const timer = setTimeout(() => {
        changes.off('change', onChange);
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
      }, timeoutMs);
      changes.on('change', onChange);
    });
  }

  const subscribedClient = (key: string, filter: string): Client | undefined => {
    const c = current.get(key);
    return c && !c.closed && isSubscribed(c, filter) ? c : undefined;
  };

  return {
    port,
    refreshTls() {
      server.setSecureContext(secureContext());
    },
    disconnectDevice(deviceId, reason) {
      for (const [key, client] of current) {
        if (key === deviceId || key.startsWith(`${deviceId}/`)) {
          standin.emit('kick', { clientId: client.id, reason });
          client.close();
        }
      }
    },
    disconnectIdentity(deviceId, moduleId, reason) {
      const client = current.get(identityKey(deviceId, moduleId));
      if (client) {
        standin.emit('kick', { clientId: client.id, reason });
        client.close();
      }
    },
    pushDesired(deviceId, moduleId, body) {
      const client = subscribedClient(identityKey(deviceId, moduleId), DESIRED);
      if (client) send(client, `$iothub/twin/PATCH/properties/desired/?$version=${String(body.$version)}`, JSON.stringify(body));
    },
    async invokeMethod(deviceId, moduleId, methodName, payload, opts) {
      const key = identityKey(deviceId, moduleId);
      let client = subscribedClient(key, METHODS);
      if (!client && (opts.connectTimeoutMs ?? 0) > 0) {
        client = await waitUntil(() => subscribedClient(key, METHODS), opts.connectTimeoutMs!, `${key} to subscribe to methods`).catch(() => undefined);
      }
      if (!client) throw new HubError('DeviceNotOnline', `Timed out waiting for device ${key} to connect and subscribe to direct methods`);
      const rid = (++ridCounter).toString(16);
      const responseTimeoutMs = opts.responseTimeoutMs ?? 30_000;
      const target = client;
      return new Promise<MethodResult>((resolve, reject) => {
        const timer = setTimeout(() => {
          pending.delete(rid);
          reject(new HubError('GatewayTimeout', `Timed out waiting for the response from device ${key} to ${methodName}`));
        }, responseTimeoutMs);
        pending.set(rid, { key, resolve, reject, timer });
        send(target, `$iothub/methods/POST/${methodName}/?$rid=${rid}`, JSON.stringify(payload ?? null));
      });
    },
    async waitSubscribed(deviceId, moduleId, filter, timeoutMs) {
      const key = identityKey(deviceId, moduleId);
      await waitUntil(() => subscribedClient(key, filter), timeoutMs, `${key} to subscribe to ${filter}`);
    },
    isConnected(deviceId, moduleId) {
      const c = current.get(identityKey(deviceId, moduleId));
      return !!c && !c.closed;
    },
    async close() {
      for (const p of pending.values()) {
        clearTimeout(p.timer);
        p.reject(new Error('IoT Hub stand-in closed'));
      }
      pending.clear();
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      await new Promise<void>((resolve) => aedes.close(() => resolve()));
      await (aedes as unknown as { persistence?: { destroy?: () => Promise<void> } }).persistence?.destroy?.();
      await closed;
    },
  };
}
