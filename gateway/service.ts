/**
 * Starts a gateway: identity from enrollment, the broker with the plugin chain, the
 * onboarding relay, the CRL cache with its push channel, and the ops HTTP endpoint.
 * The plugin order is the order of checks:
 *   authentication -> authorization -> payload-limit -> rate-limit -> outbox
 */
import { X509Certificate } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import pino, { type Logger } from 'pino';
import { downTopic, LeafgateError, refusalKindFor, type DownKind } from '../protocol/index.ts';
import { startBroker, type RunningBroker } from '../broker/index.ts';
import { AuthorityClient, AuthorityEventStream, OnboardingRelay, Outbox, OutboxWorker, RenewalTracker, RevocationCache, GatewayIdentity, AuthorityGate, edgeCaFiles, completeIdentitySwap, identityFiles, type DueRenewal } from '../cloud-bridge/index.ts';
import { SessionRegistry, authenticationPlugin, authorizationPlugin, composePlugins, parsedTopicOf, payloadLimitPlugin, rateLimitPlugin, type LimiterFactory } from '../plugins/index.ts';
import type { GatewayConfig } from './config.ts';
import { startOpsServer, type Readiness } from './http.ts';
import { GatewayMetrics } from './metrics.ts';
import { edgeModuleWanted, startEdgeModule, type RunningEdgeModule } from './edge-module.ts';
import { GatewayCluster } from './cluster.ts';
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

export async function startGateway(config: Readonly<GatewayConfig>, opts: { logger?: Logger; limiters?: LimiterFactory } = {}): Promise<RunningGateway> {
  const logger = opts.logger ?? pino({ name: 'gateway', level: process.env.LEAFGATE_LOG_LEVEL ?? 'info' });
  if (!isEnrolled(config.dataDir)) throw new LeafgateError('internal', `gateway in ${config.dataDir} is not enrolled: run \`leafgate gateway enroll\` first`);
  completeIdentitySwap(config.dataDir);
  const files = identityFiles(config.dataDir);
  const meta = JSON.parse(readFileSync(files.meta, 'utf8')) as { gatewayId: string; authorityUrl: string };
  const key = readFileSync(files.key, 'utf8');
  const cert = readFileSync(files.cert, 'utf8');
  const rootPem = readFileSync(files.root, 'utf8');
  const deviceCaPem = readFileSync(files.deviceCa, 'utf8');
  const deviceCa = new X509Certificate(deviceCaPem);
  const log = logger.child({ gatewayId: meta.gatewayId });

  const authority = new AuthorityClient({ baseUrl: meta.authorityUrl, ca: rootPem, authorityIssuer: readFileSync(files.infraCa, 'utf8'), key, cert });
  const sessions = new SessionRegistry();
  // Late-bound: the metrics collect from parts created below.
  const parts: { renewals?: RenewalTracker; gate?: AuthorityGate; outbox?: OutboxStore } = {};
  const metrics = new GatewayMetrics({
    connections: (kind) => sessions.count(kind),
    renewals: () => parts.renewals?.counts() ?? { due: 0, overdue: 0 },
    gate: () => ({ active: parts.gate?.active ?? 0, queued: parts.gate?.queued ?? 0 }),
    outbox: async () => {
      const o = parts.outbox!;
      const b = o.backlog ? await o.backlog() : { count: await o.pendingCount(), oldestCreatedAt: null };
      return { ...b, writable: o.writable?.() ?? true };
    },
    clockSkewMs: () => authority.clockSkewMs,
  });
  let broker: RunningBroker | undefined;
  let module: RunningEdgeModule | undefined;

  const publish = (deviceId: string, kind: DownKind, body: unknown) => {
    broker?.aedes.publish({ cmd: 'publish', topic: downTopic(deviceId, kind), payload: Buffer.from(JSON.stringify(body)), qos: 1, retain: false, dup: false }, (err) => {
      if (err) log.error({ err, deviceId, kind }, 'publish to device failed');
    });
  };
  // A cluster keeps its outbox, limits, broker sessions and CRL hand-over in Redis.
  const cluster = config.redis ? new GatewayCluster(config.redis, meta.gatewayId, log.child({ component: 'cluster' })) : undefined;
  if (cluster) {
    try {
      await cluster.ready();
    } catch (err) {
      await cluster.close();
      throw new LeafgateError('internal', `gateway cluster: ${(err as Error).message}`);
    }
  }
  const outbox: OutboxStore = cluster ? cluster.outbox : new Outbox(join(config.dataDir, 'outbox.db'));
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
      if (entry.kind === 'renew') {
        metrics.renewals.inc({ outcome: ok ? 'renewed' : 'failed' });
        if (ok && typeof entry.body.currentSerial === 'string') renewals.done(entry.body.currentSerial);
        if (!ok) log.warn({ deviceId: entry.deviceId, requestId: entry.requestId, code }, 'device renewal failed');
      }
      const started = sessions.holder(entry.deviceId)?.session.onboardingStartedAt;
      if (ok && started !== undefined) metrics.onboardingSeconds.observe((Date.now() - started) / 1000);
    },
  });
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
    },
  });
  const askToRenew = (client: import('aedes').Client, session: import('../plugins/index.ts').DeviceSession) => {
    if (session.kind !== 'operational' || !session.certSerial) return;
    const instruction = renewals.instructionFor(client, session.certSerial, config.renewalCsrDeadlineMs, config.maxClockSkewMs);
    if (instruction) {
      log.info({ deviceId: session.deviceId, serial: session.certSerial }, 'asking device to renew');
      metrics.renewals.inc({ outcome: 'asked' });
      publish(session.deviceId, 'instruction', instruction);
    }
  };

  // Revocation: cached CRL (survives restarts), refreshed on schedule and on push.
  const revocations = new RevocationCache({ authority, deviceCa, file: join(config.dataDir, 'device-ca.crl'), refreshMs: config.crlRefreshMs, logger: log });
  const updateCrlMetrics = () => {
    const stale = revocations.isStale();
    metrics.crlStale.set(stale ? 1 : 0);
    if (stale && revocations.warm) log.warn({ nextUpdate: revocations.nextUpdate?.toISOString(), policy: config.staleCrlPolicy }, 'CRL is past its nextUpdate: the authority has not been reachable');
    if (revocations.crlNumber !== undefined) metrics.crlNumber.set(Number(revocations.crlNumber));
    if (revocations.nextUpdate) metrics.crlNextUpdate.set(revocations.nextUpdate.getTime() / 1000);
  };
  updateCrlMetrics();
  revocations.on('updated', ({ crlNumber, newlyRevoked }) => {
    updateCrlMetrics();
    if (cluster && revocations.der) void cluster.shareCrl(crlNumber, revocations.der);
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
  });
  const events = new AuthorityEventStream({ authority, logger: log });
  events.on('event', (name, data) => {
    if (name === 'crl' || name === 'hello') void revocations.refresh();
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
  const adoptSharedCrl = async (announced?: bigint) => {
    if (!cluster || (announced !== undefined && revocations.crlNumber !== undefined && announced <= revocations.crlNumber)) return;
    const der = await cluster.sharedCrl();
    if (der) revocations.applyDer(der, 'cluster');
  };
  if (cluster) {
    await adoptSharedCrl();
    cluster.on('crl', (n) => void adoptSharedCrl(n));
    cluster.on('link', (up) => {
      metrics.clusterLink.set(up ? 1 : 0);
      if (up) {
        void adoptSharedCrl();
        worker.kick();
      }
    });
    metrics.clusterLink.set(cluster.connected ? 1 : 0);
  }

  const limits = rateLimitPlugin({ sessions, limits: config.rateLimits, factory: opts.limiters ?? cluster?.limiters, observer: { limited: (limit) => metrics.rateLimited.inc({ limit }) } });
  const hooks = composePlugins(
    [
      authenticationPlugin({
        sessions, deviceCa: () => deviceCa, bootstrapTimeoutMs: config.bootstrapTimeoutMs, keepaliveMaxSeconds: config.keepaliveMaxSeconds,
        isRevoked: (serial) => revocations.isRevoked(serial), logger: log,
        remoteHolder: cluster ? (deviceId) => cluster.remoteHolder(deviceId) : undefined,
        revocationUsable: () => config.staleCrlPolicy === 'keep' || !revocations.isStale(),
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
        const session = sessions.get(client);
        metrics.refused.inc({ reason: refusal.code });
        log.info({ deviceId: session?.deviceId, topic: packet.topic.slice(0, 200), code: refusal.code }, refusal.message);
        if (session) {
          // A refused up/begin or up/enroll is answered on its response topic (the compact
          // flow waits on one topic); everything else on down/error.
          publish(session.deviceId, refusalKindFor(parsedTopicOf(client, packet.topic)?.kind), {
            code: refusal.code, message: refusal.message,
            ...(refusal.requestId !== undefined ? { requestId: refusal.requestId } : {}),
            ...(refusal.retryAfterMs !== undefined ? { retryAfterMs: refusal.retryAfterMs } : {}),
          });
        }
      },
      onPublished(client, packet) {
        const session = sessions.get(client);
        const t = parsedTopicOf(client, packet.topic);
        if (!session || !t || t.direction !== 'up') return;
        if (t.kind === 'telemetry') module?.relayTelemetry(session.deviceId, t.rest.join('/'), Buffer.isBuffer(packet.payload) ? packet.payload : Buffer.from(packet.payload));
        if (t.kind === 'register' || t.kind === 'auth' || t.kind === 'begin' || t.kind === 'enroll') {
          void relay.handle(session, t.kind, Buffer.isBuffer(packet.payload) ? packet.payload : Buffer.from(packet.payload));
        }
      },
    },
  );

  broker = await startBroker({
    host: config.listen.host,
    port: config.listen.port,
    tls: { key, cert, ca: [deviceCaPem, rootPem] },
    hooks,
    logger: log,
    maxPacketBytes: config.maxPacketBytes,
    handshakeTimeoutMs: config.handshakeTimeoutMs,
    connectTimeoutMs: config.connectTimeoutMs,
    sessionTickets: config.tlsSessionTickets,
    maxConnections: config.maxConnections,
    acceptConnection: (address) => limits.acceptConnection(address),
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
  // A device (re)subscribing to its answers gets what was stored for it, and a renewal
  // request if its certificate is due.
  broker.aedes.on('subscribe', (_subs, client) => {
    const session = client ? sessions.get(client) : undefined;
    if (!session) return;
    void relay.deliverStored(session);
    askToRenew(client, session);
  });
  const identity = new GatewayIdentity({
    dataDir: config.dataDir, gatewayId: meta.gatewayId, authority, logger: log, renewAfterFraction: config.certRenewAfterFraction, edgeCa: config.edgeCa,
    checkMs: config.identityCheckMs,
    onRotated(newKey, newCert) {
      // New handshakes use the new certificate; live device sessions are not touched.
      broker!.setTls({ key: newKey, cert: newCert, ca: [deviceCaPem, rootPem] });
      authority.setIdentity(newKey, newCert);
    },
  });
  // Time-based alarms: a CRL going stale while nothing arrives, a clock that drifted.
  const watch = setInterval(() => {
    updateCrlMetrics();
    const skew = authority.clockSkewMs;
    if (skew === undefined) return;
    if (Math.abs(skew) > config.maxClockSkewMs) {
      log.error({ skewSeconds: Math.round(skew / 1000), allowedSeconds: config.maxClockSkewMs / 1000 }, 'gateway clock differs from the authority: certificate validity and renewal windows are judged wrongly; fix NTP');
    }
  }, Math.min(config.crlRefreshMs, 60_000));
  watch.unref();
  revocations.start();
  events.start();
  worker.start();
  identity.start();

  const running = broker;
  const readiness = (): Readiness => {
    const skew = authority.clockSkewMs;
    const checks = {
      brokerListening: running.server.listening, authorityLink: events.connected, crlCached: revocations.warm, crlFresh: !revocations.isStale(),
      clockInSync: skew === undefined || Math.abs(skew) <= config.maxClockSkewMs,
      outboxWritable: outbox.writable?.() ?? true,
    };
    // A stale CRL makes the gateway unready only when the policy refuses logins because of it.
    const crlOk = checks.crlCached && (config.staleCrlPolicy === 'keep' || checks.crlFresh);
    // A clock out of tolerance (learnt from every authority answer) misjudges certificate
    // validity; an outbox that cannot store refuses every CSR: either makes it unready at once.
    return { ready: checks.brokerListening && (checks.authorityLink || crlOk) && checks.clockInSync && checks.outboxWritable, checks };
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
      gatewayId: meta.gatewayId,
      connections: { bootstrap: sessions.count('bootstrap'), operational: sessions.count('operational') },
      pendingQueue: refreshPending(),
      gatewayCertNotAfter: certOf(files.cert),
      edgeCaNotAfter: certOf(edgeCaFiles(config.dataDir).cert),
      authorityLink: events.connected,
      crlNumber: revocations.crlNumber?.toString() ?? null,
      crlStale: revocations.isStale(),
      renewals: renewals.counts(),
      rateLimits: limits.limits,
    };
  };
  if (edgeModuleWanted(process.env, config.module?.connectionString)) {
    try {
      module = await startEdgeModule({
        logger: log.child({ component: 'edge-module' }),
        connectionString: config.module?.connectionString,
        ca: config.module?.ca,
        reportIntervalMs: config.module?.reportIntervalMs,
        hooks: {
          status: moduleStatus,
          async renewNow() {
            await identity.renewCertificate();
            if (config.edgeCa) await identity.renewEdgeCa();
            return moduleStatus();
          },
          revokeDevice: (deviceId, reason) => authority.post('/v1/gateways/revoke-device', { deviceId, reason }),
          apply(settings) {
            relay.defaultGroup = settings.policyGroup;
            if (settings.rateLimits) limits.reconfigure(settings.rateLimits);
          },
        },
      });
    } catch (err) {
      // The broker keeps serving devices without the module link; the module status says why.
      log.error({ err: (err as Error).message }, 'IoT Edge module client did not start');
    }
  }
  let ops: Awaited<ReturnType<typeof startOpsServer>>;
  try {
    ops = await startOpsServer({ host: config.http.host, port: config.http.port, metrics, readiness, logger: log });
  } catch (err) {
    events.stop();
    revocations.stop();
    worker.stop();
    await running.close();
    authority.close();
    await outbox.close();
    await cluster?.close();
    throw err;
  }
  log.info({ port: running.port, httpPort: ops.port, authority: meta.authorityUrl }, 'gateway listening');

  let closed = false;
  return {
    gatewayId: meta.gatewayId,
    port: running.port,
    httpPort: ops.port,
    broker: running,
    sessions,
    metrics,
    revocations,
    outbox,
    cluster,
    renewals,
    gate,
    rootPem,
    readiness,
    identity,
    module,
    async close() {
      if (closed) return;
      closed = true;
      clearInterval(watch);
      await module?.close().catch(() => undefined);
      events.stop();
      revocations.stop();
      worker.stop();
      identity.stop();
      await ops.app.close();
      await cluster?.releaseBroker();
      await running.close();
      authority.close();
      await outbox.close();
      await cluster?.close();
    },
  };
}
