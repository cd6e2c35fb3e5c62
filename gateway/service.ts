/**
 * Starts a gateway: identity from enrollment, the broker with the plugin chain, the
 * onboarding relay, the CRL cache with its push channel, and the ops HTTP endpoint.
 * The plugin order is the order of checks:
 *   authentication -> authorization -> payload-limit -> rate-limit -> outbox
 */
import { X509Certificate } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import pino, { type Logger } from 'pino';
import { downTopic, pkix, refusalKindFor, type DownKind } from '../protocol/index.ts';
import { startBroker, type RunningBroker } from '../broker/index.ts';
import { AuthorityClient, AuthorityEventStream, OnboardingRelay, Outbox, OutboxWorker, RenewalTracker, RevocationCache, GatewayIdentity, AuthorityGate, edgeCaFiles, completeIdentitySwap, identityFiles, writeExternalDeviceChain, type DueRenewal } from '../cloud-bridge/index.ts';
import { RefusalSampler, SessionRegistry, type DeviceSession, authenticationPlugin, authorizationPlugin, composePlugins, parsedTopicOf, payloadLimitPlugin, rateLimitPlugin, type LimiterFactory } from '../plugins/index.ts';
import type { GatewayConfig } from './config.ts';
import { startOpsServer, type Readiness } from './http.ts';
import { GatewayMetrics } from './metrics.ts';
import { edgeModuleWanted, startEdgeModule, type RunningEdgeModule } from './edge-module.ts';
import { GatewayCluster, type SharedCrlName } from './cluster.ts';
import type { Client } from 'aedes';
import type { OutboxStore } from '../cloud-bridge/outbox.ts';

export interface RunningGateway {
  gatewayId: string;
  port: number;
  /** Port of /metrics, /healthz, /readyz. */
  httpPort: number;
  broker: RunningBroker;
  sessions: SessionRegistry;
  metrics: GatewayMetrics;
  revocations: RevocationCache;
  /** The external device CA's revoked certificates (EST): the authority's external-devices list. */
  externalRevocations: RevocationCache;
  outbox: OutboxStore;
  /** The Redis cluster link, when `redis` is configured. */
  cluster?: GatewayCluster;
  renewals: RenewalTracker;
  gate: AuthorityGate;
  /** PEM of the root that devices must trust to verify the gateway. */
  rootPem: string;
  readiness(): Readiness;
  identity: GatewayIdentity;
  /** The IoT Edge module link, when running as a module. */
  module?: RunningEdgeModule;
  close(): Promise<void>;
}

export function isEnrolled(dataDir: string): boolean {
  const f = identityFiles(dataDir);
  return [f.key, f.cert, f.root, f.deviceCa, f.meta].every((p) => existsSync(p));
}

/** A gateway that cannot start: the message names the cause, one line. */
export class GatewayStartError extends Error {
  override readonly name = 'GatewayStartError';
}

type Close = () => Promise<void> | void;

/** What a start made so far, closed in reverse order (also when a later step fails). */
class Started {
  private readonly closes: Array<{ name: string; close: Close }> = [];
  constructor(private readonly log: Logger) {}
  add(name: string, close: Close): void {
    this.closes.push({ name, close });
  }
  async close(): Promise<void> {
    for (const { name, close } of this.closes.splice(0).reverse()) {
      try {
        await close();
      } catch (err) {
        this.log.warn({ err: (err as Error).message, part: name }, 'closing a gateway part failed');
      }
    }
  }
}

/** The enrollment's files, read once. */
interface IdentityFiles {
  meta: { gatewayId: string; authorityUrl: string };
  files: ReturnType<typeof identityFiles>;
  key: string;
  cert: string;
  rootPem: string;
  deviceCaPem: string;
  deviceCa: X509Certificate;
  infraCaPem: string;
  /**
   * The external CA that signs device certificates (EST), issuing CA first, root last, when the
   * authority uses one (`deviceIssuer`): its certificates are device identities like the device
   * CA's. Updated when the authority announces another one (refreshDeviceIssuers).
   */
  externalDeviceChainPem: string[];
  externalDeviceCa: X509Certificate | undefined;
}

/** The CAs a device client certificate may chain to on the broker's listener. */
function deviceClientCas(id: IdentityFiles): string[] {
  return [id.deviceCaPem, id.rootPem, ...id.externalDeviceChainPem];
}

function readExternalChain(file: string): string[] {
  if (!existsSync(file)) return [];
  return pkix.parseCertificates(readFileSync(file, 'utf8')).map((c) => c.toString());
}

function readIdentity(config: Readonly<GatewayConfig>): IdentityFiles {
  if (!isEnrolled(config.dataDir)) throw new GatewayStartError(`gateway in ${config.dataDir} is not enrolled: run \`leafgate gateway enroll\` first`);
  completeIdentitySwap(config.dataDir);
  const files = identityFiles(config.dataDir);
  try {
    const meta = JSON.parse(readFileSync(files.meta, 'utf8')) as IdentityFiles['meta'];
    const deviceCaPem = readFileSync(files.deviceCa, 'utf8');
    const externalDeviceChainPem = readExternalChain(files.externalDeviceChain);
    return {
      meta, files, deviceCaPem, deviceCa: new X509Certificate(deviceCaPem),
      externalDeviceChainPem, externalDeviceCa: externalDeviceChainPem.length ? new X509Certificate(externalDeviceChainPem[0]) : undefined,
      key: readFileSync(files.key, 'utf8'), cert: readFileSync(files.cert, 'utf8'), rootPem: readFileSync(files.root, 'utf8'), infraCaPem: readFileSync(files.infraCa, 'utf8'),
    };
  } catch (err) {
    throw new GatewayStartError(`gateway identity in ${config.dataDir} is unreadable (${(err as Error).message}): enroll again`);
  }
}

/** Fails fast, before the broker exists, when the port is taken (the common operator error). */
async function portAvailable(what: string, host: string, port: number): Promise<void> {
  if (port === 0) return;
  await new Promise<void>((resolve, reject) => {
    const probe = createServer();
    probe.once('error', (err: NodeJS.ErrnoException) => {
      reject(new GatewayStartError(err.code === 'EADDRINUSE' ? `${what} port ${host}:${port} is in use by another program (EADDRINUSE): stop it or choose another port` : `${what} cannot listen on ${host}:${port}: ${err.code ?? err.message}`));
    });
    probe.listen({ host, port, exclusive: true }, () => probe.close(() => resolve()));
  });
}

interface Shared {
  config: Readonly<GatewayConfig>;
  id: IdentityFiles;
  log: Logger;
  sessions: SessionRegistry;
  metrics: GatewayMetrics;
  publish: (deviceId: string, kind: DownKind, body: unknown) => void;
}

/** Parts the metrics read, bound once the builders made them. */
interface LateParts {
  renewals?: RenewalTracker;
  gate?: AuthorityGate;
  outbox?: OutboxStore;
  authority?: AuthorityClient;
}

/** Cloud bridge: authority client, cluster link, outbox, relay, CRL cache, event stream. */
async function buildBridge(s: Shared, parts: LateParts) {
  const { config, id, log, sessions, metrics, publish } = s;
  const started = new Started(log);
  try {
    const authority = new AuthorityClient({ baseUrl: id.meta.authorityUrl, ca: id.rootPem, authorityIssuer: id.infraCaPem, key: id.key, cert: id.cert });
    started.add('authority client', () => authority.close());
    parts.authority = authority;
    // A cluster keeps its outbox, limits, broker sessions and CRL hand-over in Redis.
    const cluster = config.redis ? new GatewayCluster(config.redis, id.meta.gatewayId, log.child({ component: 'cluster' })) : undefined;
    if (cluster) {
      started.add('cluster', () => cluster.close());
      try {
        await cluster.ready();
      } catch (err) {
        throw new GatewayStartError(`gateway cluster: Redis did not answer: ${(err as Error).message}`);
      }
    }
    const outbox: OutboxStore = cluster ? cluster.outbox : new Outbox(join(config.dataDir, 'outbox.db'));
    started.add('outbox', () => outbox.close());
    parts.outbox = outbox;
    const gate = new AuthorityGate({ concurrency: config.authorityConcurrency, maxQueue: config.authorityQueueMax, pendingAfterMs: config.pendingAfterMs });
    parts.gate = gate;
    const renewals = new RenewalTracker();
    parts.renewals = renewals;
    const worker = new OutboxWorker({
      outbox,
      authority,
      gate,
      publish,
      isConnected: (deviceId) => sessions.holder(deviceId) !== undefined || (cluster ? cluster.isPresent(deviceId) : false),
      logger: log,
      concurrency: config.authorityConcurrency,
      onAnswer({ entry, ok, code }) {
        metrics.onboardingSteps.inc({ step: entry.kind, outcome: ok ? 'ok' : code ?? 'error' });
        metrics.onboardings.inc({ outcome: ok ? (entry.kind === 'renew' ? 'renewed' : 'issued') : code ?? 'error' });
        // Each onboarding outcome is worth a line to an operator; scrapes and probes are not.
        if (ok) log.info({ deviceId: entry.deviceId, requestId: entry.requestId, kind: entry.kind }, entry.kind === 'renew' ? 'device certificate renewed' : 'device certificate issued');
        else if (entry.kind !== 'renew') log.info({ deviceId: entry.deviceId, requestId: entry.requestId, code }, 'device onboarding refused');
        if (entry.kind === 'renew') {
          metrics.renewals.inc({ outcome: ok ? 'renewed' : 'failed' });
          if (ok && typeof entry.body.currentSerial === 'string') renewals.done(entry.body.currentSerial);
          if (!ok) log.warn({ deviceId: entry.deviceId, requestId: entry.requestId, code }, 'device renewal failed');
        }
        const startedAt = sessions.holder(entry.deviceId)?.session.onboardingStartedAt;
        if (ok && startedAt !== undefined) metrics.onboardingSeconds.observe((Date.now() - startedAt) / 1000);
      },
    });
    started.add('outbox worker', () => worker.stop());
    const relay = new OnboardingRelay({
      authority,
      gate,
      sessions,
      outbox,
      worker,
      publish,
      logger: log,
      onOutcome(e) {
        metrics.onboardingSteps.inc({ step: e.step, outcome: e.ok ? 'ok' : e.code ?? 'error' });
        // A compact enroll is answered here, not through the outbox: it is the onboarding's outcome.
        if (e.step === 'enroll') {
          metrics.onboardings.inc({ outcome: e.ok ? 'issued' : e.code ?? 'error' });
          const started = sessions.holder(e.deviceId)?.session.onboardingStartedAt;
          if (e.ok && started !== undefined) metrics.onboardingSeconds.observe((Date.now() - started) / 1000);
        }
      },
    });
    const askToRenew = (client: Client, session: DeviceSession) => {
      if (session.kind !== 'operational' || !session.certSerial) return;
      const instruction = renewals.instructionFor(client, session.certSerial, config.renewalCsrDeadlineMs, config.maxClockSkewMs);
      if (instruction) {
        log.info({ deviceId: session.deviceId, serial: session.certSerial }, 'asking device to renew');
        metrics.renewals.inc({ outcome: 'asked' });
        publish(session.deviceId, 'instruction', instruction);
      }
    };

    // Revocation: cached CRL (survives restarts), refreshed on schedule and on push.
    const revocations = new RevocationCache({ authority, deviceCa: id.deviceCa, file: join(config.dataDir, 'device-ca.crl'), refreshMs: config.crlRefreshMs, logger: log });
    started.add('revocation cache', () => revocations.stop());
    // The external device CA's revoked certificates (EST): a list of their own, beside the device
    // CA's CRL (which stays direct for standard relying parties), with the same cache, push,
    // cluster sharing and on-disk copy; consulted at CONNECT and for live-session cuts.
    const externalRevocations = new RevocationCache({
      authority, deviceCa: id.deviceCa, file: join(config.dataDir, 'external-devices.crl'), refreshMs: config.crlRefreshMs, logger: log,
      path: '/v1/crl/external-devices.crl', indirect: true, label: 'external-devices',
    });
    started.add('external revocation cache', () => externalRevocations.stop());
    const updateCrlMetrics = () => {
      const stale = revocations.isStale();
      metrics.crlStale.set(stale ? 1 : 0);
      if (stale && revocations.warm) log.warn({ nextUpdate: revocations.nextUpdate?.toISOString(), policy: config.staleCrlPolicy }, 'CRL is past its nextUpdate: the authority has not been reachable');
      if (revocations.crlNumber !== undefined) metrics.crlNumber.set(Number(revocations.crlNumber));
      if (revocations.nextUpdate) metrics.crlNextUpdate.set(revocations.nextUpdate.getTime() / 1000);
      const externalStale = externalRevocations.isStale();
      metrics.externalCrlStale.set(externalStale ? 1 : 0);
      if (externalRevocations.crlNumber !== undefined) metrics.externalCrlNumber.set(Number(externalRevocations.crlNumber));
      if (externalRevocations.warm && externalStale) log.warn({ nextUpdate: externalRevocations.nextUpdate?.toISOString(), policy: config.staleCrlPolicy }, 'the external-devices revocation list is past its nextUpdate: the authority has not been reachable');
    };
    updateCrlMetrics();
    const cutRevoked = (newlyRevoked: string[]) => {
      if (!newlyRevoked.length) return;
      const hit = new Set(newlyRevoked);
      for (const { client, session } of sessions.entries()) {
        if (session.kind !== 'operational' || !session.certSerial || !hit.has(session.certSerial)) continue;
        log.info({ deviceId: session.deviceId, serial: session.certSerial }, 'closing session of a revoked certificate');
        metrics.revokedSessionsClosed.inc();
        publish(session.deviceId, 'revoked', { serial: session.certSerial });
        // A revoked identity leaves no will behind; the notice goes out first, the close follows.
        (client as unknown as { will: unknown }).will = null;
        setImmediate(() => client.close());
      }
    };
    revocations.on('updated', ({ crlNumber, newlyRevoked }) => {
      updateCrlMetrics();
      if (cluster && revocations.der) void cluster.shareCrl(crlNumber, revocations.der);
      cutRevoked(newlyRevoked);
    });
    externalRevocations.on('updated', ({ crlNumber, newlyRevoked }) => {
      updateCrlMetrics();
      if (cluster && externalRevocations.der) void cluster.shareCrl(crlNumber, externalRevocations.der, 'external-devices');
      cutRevoked(newlyRevoked);
    });
    const events = new AuthorityEventStream({ authority, logger: log });
    started.add('authority event stream', () => events.stop());
    events.on('event', (name, data) => {
      if (name === 'crl' || name === 'hello') {
        void revocations.refresh();
        void externalRevocations.refresh();
      }
      if (name === 'renewal-due') {
        renewals.update((data as { devices?: DueRenewal[] }).devices ?? []);
        for (const { client, session } of sessions.entries()) askToRenew(client, session);
      }
    });
    events.on('link', (up) => {
      if (up) worker.retryAllNow();
    });
    events.on('link', (up) => metrics.authorityLink.set(up ? 1 : 0));

    // A CRL another gateway of the cluster got first (its own signature check decides).
    const adoptSharedCrl = async (announced?: bigint, list: SharedCrlName = 'device-ca') => {
      const cache = list === 'device-ca' ? revocations : externalRevocations;
      if (!cluster || (announced !== undefined && cache.crlNumber !== undefined && announced <= cache.crlNumber)) return;
      const der = await cluster.sharedCrl(list);
      if (der) cache.applyDer(der, 'cluster');
    };
    if (cluster) {
      await adoptSharedCrl();
      await adoptSharedCrl(undefined, 'external-devices');
      cluster.on('crl', (n, list) => void adoptSharedCrl(n, list));
      cluster.on('link', (up) => {
        metrics.clusterLink.set(up ? 1 : 0);
        if (up) {
          void adoptSharedCrl();
          void adoptSharedCrl(undefined, 'external-devices');
          worker.kick();
        }
      });
      metrics.clusterLink.set(cluster.connected ? 1 : 0);
    }
    const start = () => {
      revocations.start();
      externalRevocations.start();
      events.start();
      worker.start();
    };
    /** Stops the background loops (before the broker closes); close() frees the rest. */
    const stop = () => {
      events.stop();
      revocations.stop();
      externalRevocations.stop();
      worker.stop();
    };
    return { authority, cluster, outbox, gate, renewals, worker, relay, revocations, externalRevocations, events, askToRenew, updateCrlMetrics, start, stop, close: () => started.close() };
  } catch (err) {
    await started.close();
    throw err;
  }
}

type Bridge = Awaited<ReturnType<typeof buildBridge>>;

/** The MQTT broker with the plugin chain, listening. */
async function buildBroker(s: Shared, bridge: Bridge, opts: { limiters?: LimiterFactory }, module: () => RunningEdgeModule | undefined) {
  const { config, id, log, sessions, metrics, publish } = s;
  const { cluster, relay, revocations, externalRevocations } = bridge;
  // Refusals are logged sampled and answered on down/error at a bounded rate, per connection:
  // a flood of refused packets must not become a flood of log lines and answers.
  const refusals = new RefusalSampler();
  const reportRefusal = (client: import('aedes').Client, code: import('../protocol/index.ts').ErrorCode, message: string, extra: { topic?: string; requestId?: string; retryAfterMs?: number; answerOn?: DownKind }) => {
    const session = sessions.get(client);
    const v = refusals.note(client);
    if (v.log) log.info({ deviceId: session?.deviceId, ...(extra.topic !== undefined ? { topic: extra.topic.slice(0, 200) } : {}), code, ...(v.suppressed ? { suppressed: v.suppressed } : {}) }, message);
    if (session && v.answer) {
      publish(session.deviceId, extra.answerOn ?? 'error', {
        code, message,
        ...(extra.requestId !== undefined ? { requestId: extra.requestId } : {}),
        ...(extra.retryAfterMs !== undefined ? { retryAfterMs: extra.retryAfterMs } : {}),
      });
    }
  };
  const limits = rateLimitPlugin({
    sessions, limits: config.rateLimits, factory: opts.limiters ?? cluster?.limiters, observer: { limited: (limit) => metrics.rateLimited.inc({ limit }) },
    onPacketLimited(client, limit, retryAfterMs) {
      metrics.refused.inc({ reason: 'rate_limited' });
      reportRefusal(client, 'rate_limited', `rate limit ${limit} reached; packet dropped`, { retryAfterMs });
    },
    onAbuse(client, limit, strikes) {
      log.info({ deviceId: sessions.get(client)?.deviceId, remote: (client.conn as { remoteAddress?: string } | undefined)?.remoteAddress, limit, strikes }, 'client ignored its rate limits; disconnected');
    },
  });
  const hooks = composePlugins(
    [
      authenticationPlugin({
        sessions, deviceCa: () => id.deviceCa, externalDeviceCa: () => id.externalDeviceCa, bootstrapTimeoutMs: config.bootstrapTimeoutMs, keepaliveMaxSeconds: config.keepaliveMaxSeconds,
        // A serial in either list is refused (a collision across issuers can only refuse too much).
        isRevoked: (serial) => revocations.isRevoked(serial) || externalRevocations.isRevoked(serial), logger: log,
        remoteHolder: cluster ? (deviceId) => cluster.remoteHolder(deviceId) : undefined,
        // A certificate of the external CA also needs the external list current under `refuse`.
        revocationUsable: (external) => config.staleCrlPolicy === 'keep' || (!revocations.isStale() && (!external || !externalRevocations.isStale())),
      }),
      limits.publishBudget,
      authorizationPlugin({ sessions }),
      payloadLimitPlugin({ onboardingBytes: config.onboardingPayloadBytes, telemetryBytes: config.telemetryPayloadBytes }),
      limits,
      relay.plugin(),
    ],
    {
      logger: log,
      observer: {
        connectRefused: (code) => metrics.refused.inc({ reason: `connack_${code}` }),
        subscribeRefused: () => metrics.refused.inc({ reason: 'subscribe' }),
      },
      onPublishRefused(client, packet, refusal) {
        metrics.refused.inc({ reason: refusal.code });
        // A refused up/begin or up/enroll is answered on its response topic (the compact flow
        // waits on one topic); everything else on down/error.
        reportRefusal(client, refusal.code, refusal.message, { topic: packet.topic, requestId: refusal.requestId, retryAfterMs: refusal.retryAfterMs, answerOn: refusalKindFor(parsedTopicOf(client, packet.topic)?.kind) });
      },
      onPublished(client, packet) {
        const session = sessions.get(client);
        const t = parsedTopicOf(client, packet.topic);
        if (!session || !t || t.direction !== 'up') return;
        if (t.kind === 'telemetry') module()?.relayTelemetry(session.deviceId, t.rest.join('/'), Buffer.isBuffer(packet.payload) ? packet.payload : Buffer.from(packet.payload));
        if (t.kind === 'register' || t.kind === 'auth' || t.kind === 'begin' || t.kind === 'enroll') {
          void relay.handle(session, t.kind, Buffer.isBuffer(packet.payload) ? packet.payload : Buffer.from(packet.payload));
        }
      },
    },
  );

  // aedes starts timers when created: a port already taken is found before that.
  await portAvailable('MQTT', config.listen.host, config.listen.port);
  const broker = await startBroker({
    host: config.listen.host,
    port: config.listen.port,
    tls: { key: id.key, cert: id.cert, ca: deviceClientCas(id) },
    hooks,
    logger: log,
    maxPacketBytes: config.maxPacketBytes,
    handshakeTimeoutMs: config.handshakeTimeoutMs,
    connectTimeoutMs: config.connectTimeoutMs,
    sessionTickets: config.tlsSessionTickets,
    maxConnections: config.maxConnections,
    acceptConnection: (address) => limits.acceptConnection(address),
    packetBudget: (client, packet) => limits.packetBudget(client, packet),
    cluster: cluster?.brokerOptions(),
  });
  if (cluster) {
    const c = cluster;
    broker.aedes.on('client', (client) => {
      const session = sessions.get(client);
      if (session) c.present(client.id, session.kind, session.certFingerprint);
    });
    broker.aedes.on('clientDisconnect', (client) => c.absent(client.id));
  }
  // A device subscribing to its answers gets what was stored for it (if it proved it is the
  // device: see relay.deliverStored), and a renewal request if its certificate is due. Once
  // per connection: a SUBSCRIBE costs an outbox read, and a client repeating it must not
  // repeat that work.
  const subscribedOnce = new WeakSet<import('aedes').Client>();
  broker.aedes.on('subscribe', (_subs, client) => {
    const session = client ? sessions.get(client) : undefined;
    if (!session || subscribedOnce.has(client)) return;
    subscribedOnce.add(client);
    void relay.deliverStored(session);
    bridge.askToRenew(client, session);
  });
  return {
    broker,
    limits,
    async close() {
      await cluster?.releaseBroker();
      await broker.close();
    },
  };
}

/** The gateway's own certificate and Edge CA renewal, and the clock/CRL watch. */
function buildIdentity(s: Shared, bridge: Bridge, broker: RunningBroker) {
  const { config, id, log, metrics } = s;
  const { authority } = bridge;
  const identity = new GatewayIdentity({
    dataDir: config.dataDir, gatewayId: id.meta.gatewayId, authority, logger: log, renewAfterFraction: config.certRenewAfterFraction, edgeCa: config.edgeCa,
    checkMs: config.identityCheckMs,
    onRotated(newKey, newCert) {
      // New handshakes use the new certificate; live device sessions are not touched.
      id.key = newKey;
      id.cert = newCert;
      broker.setTls({ key: newKey, cert: newCert, ca: deviceClientCas(id) });
      authority.setIdentity(newKey, newCert);
      updateExpiry();
    },
  });
  const notAfter = (path: string) => (existsSync(path) ? new Date(new X509Certificate(readFileSync(path, 'utf8')).validTo) : undefined);
  const updateExpiry = () => {
    try {
      const gw = notAfter(id.files.cert);
      if (gw) metrics.certExpiry.set({ certificate: 'gateway' }, gw.getTime() / 1000);
      const edge = notAfter(edgeCaFiles(config.dataDir).cert);
      if (edge) metrics.certExpiry.set({ certificate: 'edge_ca' }, edge.getTime() / 1000);
      metrics.certExpiry.set({ certificate: 'device_ca' }, new Date(id.deviceCa.validTo).getTime() / 1000);
    } catch (err) {
      log.warn({ err: (err as Error).message }, 'cannot read a certificate for its expiry metric');
    }
  };
  updateExpiry();
  // The external device CA (EST) the authority announces: device certificates from it are
  // accepted on the listener. Read at every (re)connection of the event stream, over the mTLS
  // link (the authority's identity verified), so that turning deviceIssuer on or off at the
  // authority reaches gateways enrolled before.
  const refreshDeviceIssuers = async () => {
    try {
      const bundle = await authority.get<{ externalDeviceChain?: string[] }>('/v1/ca');
      if (!writeExternalDeviceChain(id.files, bundle.externalDeviceChain)) return;
      id.externalDeviceChainPem = readExternalChain(id.files.externalDeviceChain);
      id.externalDeviceCa = id.externalDeviceChainPem.length ? new X509Certificate(id.externalDeviceChainPem[0]) : undefined;
      broker.setTls({ key: id.key, cert: id.cert, ca: deviceClientCas(id) });
      log.info({ externalDeviceCa: id.externalDeviceCa?.subject.replace(/\n/g, ', ') ?? null }, 'device certificate issuers updated from the authority');
    } catch (err) {
      log.warn({ err: (err as Error).message }, 'cannot read the authority\'s CA bundle; device certificate issuers unchanged');
    }
  };
  bridge.events.on('event', (name) => {
    if (name === 'hello') void refreshDeviceIssuers();
  });
  // Time-based alarms: a CRL going stale while nothing arrives, a clock that drifted.
  const watch = setInterval(() => {
    bridge.updateCrlMetrics();
    updateExpiry();
    const skew = authority.clockSkewMs;
    if (skew === undefined) return;
    if (Math.abs(skew) > config.maxClockSkewMs) {
      log.error({ skewSeconds: Math.round(skew / 1000), allowedSeconds: config.maxClockSkewMs / 1000 }, 'gateway clock differs from the authority: certificate validity and renewal windows are judged wrongly; fix NTP');
    }
  }, Math.min(config.crlRefreshMs, 60_000));
  watch.unref();
  identity.start();
  return {
    identity,
    close() {
      clearInterval(watch);
      identity.stop();
    },
  };
}

/** The IoT Edge module link, when running as a module; a failure is logged, not fatal. */
async function buildModule(s: Shared, bridge: Bridge, limits: Awaited<ReturnType<typeof buildBroker>>['limits'], identity: GatewayIdentity, status: () => unknown) {
  const { config, log } = s;
  if (!edgeModuleWanted(process.env, config.module?.connectionString)) return { module: undefined, close: () => undefined };
  try {
    const module = await startEdgeModule({
      logger: log.child({ component: 'edge-module' }),
      connectionString: config.module?.connectionString,
      ca: config.module?.ca,
      reportIntervalMs: config.module?.reportIntervalMs,
      hooks: {
        status: status as never,
        async renewNow() {
          await identity.renewCertificate();
          if (config.edgeCa) await identity.renewEdgeCa();
          return status() as never;
        },
        revokeDevice: (deviceId, reason) => bridge.authority.post('/v1/gateways/revoke-device', { deviceId, reason }),
        apply(settings) {
          bridge.relay.defaultGroup = settings.policyGroup;
          if (settings.rateLimits) limits.reconfigure(settings.rateLimits);
        },
      },
    });
    return { module, close: () => module.close().catch(() => undefined) };
  } catch (err) {
    // The broker keeps serving devices without the module link; the module status says why.
    log.error({ err: (err as Error).message }, 'IoT Edge module client did not start');
    return { module: undefined, close: () => undefined };
  }
}

/** /metrics, /healthz, /readyz. */
async function buildOps(s: Shared, readiness: () => Readiness) {
  const { config, log, metrics } = s;
  await portAvailable('ops HTTP', config.http.host, config.http.port);
  const ops = await startOpsServer({ host: config.http.host, port: config.http.port, metrics, readiness, logger: log });
  return { port: ops.port, close: () => ops.app.close() };
}

/**
 * Starts the gateway from its builders (identity files, bridge, broker, identity renewal,
 * module, ops), each with its own close. Either everything starts, or what did is closed
 * in reverse order and the error (one line naming the cause) is thrown.
 */
export async function startGateway(config: Readonly<GatewayConfig>, opts: { logger?: Logger; limiters?: LimiterFactory } = {}): Promise<RunningGateway> {
  const logger = opts.logger ?? pino({ name: 'gateway', level: process.env.LEAFGATE_LOG_LEVEL ?? 'info' });
  const id = readIdentity(config);
  const log = logger.child({ gatewayId: id.meta.gatewayId });
  const started = new Started(log);
  const sessions = new SessionRegistry();
  // Late-bound: the metrics collect from parts created below.
  const parts: LateParts = {};
  const metrics = new GatewayMetrics({
    connections: (kind) => sessions.count(kind),
    renewals: () => parts.renewals?.counts() ?? { due: 0, overdue: 0 },
    gate: () => ({ active: parts.gate?.active ?? 0, queued: parts.gate?.queued ?? 0 }),
    outbox: async () => {
      const o = parts.outbox;
      if (!o) return { count: 0, oldestCreatedAt: null, writable: true };
      const b = o.backlog ? await o.backlog() : { count: await o.pendingCount(), oldestCreatedAt: null };
      return { ...b, writable: o.writable?.() ?? true };
    },
    clockSkewMs: () => parts.authority?.clockSkewMs,
  });
  let broker: RunningBroker | undefined;
  let module: RunningEdgeModule | undefined;
  const publish = (deviceId: string, kind: DownKind, body: unknown) => {
    broker?.aedes.publish({ cmd: 'publish', topic: downTopic(deviceId, kind), payload: Buffer.from(JSON.stringify(body)), qos: 1, retain: false, dup: false }, (err) => {
      if (err) log.error({ err, deviceId, kind }, 'publish to device failed');
    });
  };
  const shared: Shared = { config, id, log, sessions, metrics, publish };
  try {
    const bridge = await buildBridge(shared, parts);
    started.add('bridge', bridge.close);
    const { authority, cluster, outbox, gate, renewals, revocations, events, relay } = bridge;
    const brokerPart = await buildBroker(shared, bridge, opts, () => module);
    started.add('broker', brokerPart.close);
    broker = brokerPart.broker;
    const running = broker;
    const limits = brokerPart.limits;
    const identityPart = buildIdentity(shared, bridge, running);
    started.add('identity', identityPart.close);
    const identity = identityPart.identity;
    bridge.start();
    started.add('bridge loops', bridge.stop);

    const readiness = (): Readiness => {
      const skew = authority.clockSkewMs;
      const checks = {
        brokerListening: running.server.listening, authorityLink: events.connected, crlCached: revocations.warm, crlFresh: !revocations.isStale(),
        clockInSync: skew === undefined || Math.abs(skew) <= config.maxClockSkewMs,
        outboxWritable: outbox.writable?.() ?? true,
      };
      // A stale CRL makes the gateway unready only when the policy refuses logins because of it.
      let crlOk = checks.crlCached && (config.staleCrlPolicy === 'keep' || checks.crlFresh);
      // With an external device CA (EST) trusted, its revocation list counts the same way:
      // under "refuse" its devices are refused while it is stale (the check appears only then).
      const external: Record<string, boolean> = {};
      if (id.externalDeviceCa) {
        external.externalCrlFresh = !bridge.externalRevocations.isStale();
        crlOk &&= config.staleCrlPolicy === 'keep' || external.externalCrlFresh;
      }
      // A clock out of tolerance (learnt from every authority answer) misjudges certificate
      // validity; an outbox that cannot store refuses every CSR: either makes it unready at once.
      return { ready: checks.brokerListening && (checks.authorityLink || crlOk) && checks.clockInSync && checks.outboxWritable, checks: { ...checks, ...external } };
    };
    // The Redis outbox answers asynchronously: the status reports the last count read.
    let pendingQueue: number | null = 0;
    const refreshPending = () => {
      Promise.resolve(outbox.pendingCount()).then((n) => (pendingQueue = n), () => (pendingQueue = null));
      return pendingQueue;
    };
    const moduleStatus = () => {
      const certOf = (p: string) => (existsSync(p) ? new X509Certificate(readFileSync(p, 'utf8')).validTo : null);
      return {
        gatewayId: id.meta.gatewayId,
        connections: { bootstrap: sessions.count('bootstrap'), operational: sessions.count('operational') },
        pendingQueue: refreshPending(),
        gatewayCertNotAfter: certOf(id.files.cert),
        edgeCaNotAfter: certOf(edgeCaFiles(config.dataDir).cert),
        authorityLink: events.connected,
        crlNumber: revocations.crlNumber?.toString() ?? null,
        crlStale: revocations.isStale(),
        // The external device CA's revocations (EST): the authority's external-devices list.
        externalCrlNumber: bridge.externalRevocations.crlNumber?.toString() ?? null,
        externalCrlStale: bridge.externalRevocations.isStale(),
        renewals: renewals.counts(),
        rateLimits: limits.limits,
      };
    };
    const modulePart = await buildModule(shared, bridge, limits, identity, moduleStatus);
    started.add('module', modulePart.close);
    module = modulePart.module;
    const ops = await buildOps(shared, readiness);
    started.add('ops', ops.close);
    log.info({ port: running.port, httpPort: ops.port, authority: id.meta.authorityUrl }, 'gateway listening');

    let closed: Promise<void> | undefined;
    return {
      gatewayId: id.meta.gatewayId,
      port: running.port,
      httpPort: ops.port,
      broker: running,
      sessions,
      metrics,
      revocations,
      externalRevocations: bridge.externalRevocations,
      outbox,
      cluster,
      renewals,
      gate,
      rootPem: id.rootPem,
      readiness,
      identity,
      module,
      close() {
        closed ??= started.close();
        return closed;
      },
    };
  } catch (err) {
    await started.close();
    throw err;
  }
}
