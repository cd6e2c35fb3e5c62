/**
 * Starts an authority: CA, store, TLS identity, HTTPS API. The TLS key of the API is made
 * fresh at every start and never written to disk; gateways trust the root, not this key.
 */
import { generateKeyPairSync, X509Certificate } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { isIP } from 'node:net';
import pino, { type Logger } from 'pino';
import { AUTHORITY_URI, pkix } from '../protocol/index.ts';
import { buildAuthorityApi } from './api/server.ts';
import { BACKDATE_MS, CA_NAMES, EstCa, openCa, type CaConnector, type LocalCa } from './ca/index.ts';
import type { AuthorityConfig } from './config.ts';
import { GatewayEnrollment } from './gateways.ts';
import { hashEnrollmentCode } from './auth-methods/index.ts';
import { DeviceOnboarding } from './onboarding.ts';
import { Revocation } from './revocation.ts';
import { RenewalScheduler } from './renewal.ts';
import { AuthorityEvents } from './events.ts';
import { AuthorityMetrics } from './metrics.ts';
import { DpsConnector, IotHubConnector, Pacer, createDpsClient, createHubRegistry } from './registry/index.ts';
import { PostgresDriver, isPostgresUrl, openStore, redactUrl, type AuthorityStore, type SqlStore } from './store/index.ts';
import { LocalBus, PgBus, type ClusterBus } from './cluster.ts';
import { LeafgateError } from '../protocol/index.ts';
import { hashAdminToken } from './api/admin.ts';
import { newSecret } from './secret.ts';
import { DashboardQueries } from './store/dashboard.ts';
import type { DashboardDeps } from './dashboard/routes.ts';
import { startDashboardServer } from './dashboard/server.ts';

/**
 * The admin credential: LEAFGATE_ADMIN_TOKEN, else a token made on first start in
 * `<dataDir>/admin-token` (mode 0600), which the CLI on the same host reads.
 */
export function loadAdminToken(config: Pick<AuthorityConfig, 'dataDir' | 'adminToken'>): string {
  if (config.adminToken) return config.adminToken;
  const file = join(config.dataDir, 'admin-token');
  if (existsSync(file)) return readFileSync(file, 'utf8').trim();
  const token = newSecret(24);
  writeFileSync(file, token + '\n', { mode: 0o600 });
  return token;
}

export interface RunningAuthority {
  url: string;
  port: number;
  ca: LocalCa;
  store: AuthorityStore;
  /** Signals between authority nodes sharing a PostgreSQL database (a no-op bus on SQLite). */
  bus: ClusterBus;
  onboarding: DeviceOnboarding;
  enrollment: GatewayEnrollment;
  revocation: Revocation;
  renewals: RenewalScheduler;
  /** The IoT Hub connector when configured. */
  hub?: IotHubConnector;
  dps?: DpsConnector;
  /** What signs device certificates: `ca`, or the external CA over EST (deviceIssuer). */
  deviceIssuer: CaConnector;
  /** SHA-256 fingerprint of the root, for gateways to pin at enrollment. */
  rootFingerprint: string;
  /** The operator dashboard's URL (https://.../dashboard) when it is enabled. */
  dashboardUrl?: string;
  /** One-time ddkg enrollment code bound to a device. */
  createEnrollmentCode(deviceId: string, group?: string, ttlSeconds?: number): Promise<string>;
  close(): Promise<void>;
}

export async function startAuthority(config: Readonly<AuthorityConfig>, opts: { logger?: Logger; now?: () => number; crlRefreshMs?: number } = {}): Promise<RunningAuthority> {
  const logger = opts.logger ?? pino({ name: 'authority', level: process.env.LEAFGATE_LOG_LEVEL ?? 'info' });
  mkdirSync(config.dataDir, { recursive: true, mode: 0o700 });
  const database = isPostgresUrl(config.database) ? redactUrl(config.database) : config.database;
  let store: SqlStore;
  try {
    store = await openStore(config.database, { sqliteFsync: config.databaseFsync, onError: (err) => logger.warn({ database, err: err.message }, 'database connection error') });
  } catch (err) {
    logger.error({ database, err: (err as Error).message }, 'cannot open the authority database');
    throw err;
  }
  let bus: ClusterBus = new LocalBus();
  let ca: LocalCa | undefined;
  try {
    if (store.db instanceof PostgresDriver) {
      // Several nodes on one database share one CA, kept in the database (keys encrypted).
      const shared = await openCa(config, { shared: store, adoptDir: true, logger: logger.child({ component: 'ca' }) });
      ca = shared.ca;
      if (shared.created) logger.info({ adopted: shared.adopted }, shared.adopted ? 'CA files of the data directory stored in the database for the cluster' : 'new CA created in the database');
      bus = await PgBus.start(store.db, logger.child({ component: 'cluster' }));
    } else {
      ca = (await openCa(config, { logger: logger.child({ component: 'ca' }) })).ca;
    }
    // Where each CA key is (file, pkcs11:<token>/<label>): never a secret.
    logger.info({ caKeys: config.caKeys.store, keys: ca.describeKeys() }, 'CA keys opened');
    // The intermediates are certificates the root issued: on record, so they can be revoked (root CRL).
    await store.ensureCertificates(ca.intermediates().map((c) => ({
      serial: c.serial, subjectId: c.name, kind: 'ca' as const, issuer: 'root' as const, fingerprint: c.certificate.fingerprint256, notBefore: new Date(c.certificate.validFrom).getTime(),
      notAfter: c.notAfter.getTime(), status: 'active' as const, requestId: null, pem: c.pem, revokedAt: null, revocationReason: null, createdAt: Date.now(),
    })));
    const legacy = (await store.listCertificates({ kind: 'subca', status: 'active', limit: 1_000_000 })).filter((c) => c.issuer === 'root' && c.notAfter > Date.now());
    if (legacy.length) {
      logger.warn({ count: legacy.length, gateways: [...new Set(legacy.map((c) => c.subjectId))].slice(0, 20) }, 'gateway Sub-CAs signed directly by the root (before the edge issuer) are still valid and carry no full name constraints: renew them (gateway subca) and revoke the old ones; `leafgate authority migrate` lists them');
    }
  } catch (err) {
    await ca?.close();
    await bus.close();
    await store.close();
    if (err instanceof LeafgateError && err.code === 'authority_unavailable') logger.error({ database, err: err.message }, 'cannot open the authority database');
    else logger.error({ caKeys: config.caKeys.store, err: (err as Error).message }, 'cannot open the CA');
    throw err;
  }
  const caOpened: LocalCa = ca;
  // What was started so far, stopped in reverse if a later step fails (e.g. the port is taken).
  const started: Array<() => unknown> = [() => caOpened.close(), () => store.close(), () => bus.close()];
  try {
    // Device certificates from an external CA over EST when configured; the rest stays on ours.
    let issuing: CaConnector = ca;
    if (config.deviceIssuer) {
      try {
        const est = new EstCa(config.deviceIssuer, ca, { logger: logger.child({ component: 'est-ca' }), now: opts.now });
        started.push(() => est.close());
        issuing = est;
        if (config.iotHub?.authentication === 'certificateAuthority') logger.warn('iotHub.authentication is certificateAuthority: the hub must trust the external CA that signs the devices (upload and verify it in IoT Hub), not leafgate\'s device CA');
        // Compared once with the server's /cacerts, without holding up the start.
        void est.checkCaCerts().catch(() => undefined);
        logger.info({ deviceIssuer: est.describe(), issuingCa: est.chain[0].subject.replace(/\n/g, ', ') }, 'device certificates are signed by the external CA over EST');
      } catch (err) {
        logger.error({ err: (err as Error).message }, 'cannot set up the external device CA (deviceIssuer)');
        throw err;
      }
    }
    // Late-bound: the metrics read parts made below.
    const parts: { renewals?: RenewalScheduler; revocation?: Revocation; hub?: IotHubConnector; dps?: DpsConnector } = {};
    const metrics = new AuthorityMetrics({
      renewals: () => parts.renewals?.counts() ?? Promise.resolve({ due: 0, overdue: 0 }),
      crlNumber: () => Number(parts.revocation?.crl().crlNumber ?? 0),
      sync: async () => {
        const out = [];
        for (const [target, c] of [['hub', parts.hub], ['dps', parts.dps]] as const) if (c) out.push({ target, ...(await store.countSync(target)), lastSuccessAt: c.lastSuccessAt });
        return out;
      },
      caExpiry: () => CA_NAMES.map((name) => ({ ca: name, notAfter: ca.get(name).notAfter })),
    });
    const onboarding = new DeviceOnboarding({
      store, ca: issuing, config, now: opts.now,
      // An EST certificate no answer carries (discarded) is revoked at once: the gateways refuse
      // it (external-devices list). Not possible for an answer lost on the way: no serial is known.
      async onDiscarded(row, why) {
        const r = parts.revocation;
        if (!r) return;
        try {
          await r.recordExternalRevoked({ der: pkix.fromPem(row.pem, 'CERTIFICATE'), serial: row.serial, subjectId: row.subjectId, notBefore: row.notBefore, notAfter: row.notAfter }, 'superseded', 'est-discarded', { discardedBecause: why });
        } catch (err) {
          logger.warn({ serial: row.serial, deviceId: row.subjectId, err: (err as Error).message }, 'a discarded certificate of the external CA could not be revoked in leafgate: revoke it with `leafgate authority revoke --certificate`');
        }
      },
      onOutcome(action, outcome, who) {
        metrics.requests.inc({ action, outcome });
        // Each onboarding outcome (a certificate issued or renewed, or refused) is an operator's line.
        if (action === 'csr' || action === 'renew') logger.info({ ...who, action, outcome }, outcome === 'ok' ? (action === 'renew' ? 'device certificate renewed' : 'device certificate issued') : 'device certificate refused');
        if (action === 'renew') metrics.renewals.inc({ outcome: outcome === 'ok' ? 'renewed' : 'failed' });
      },
    });
    const enrollment = new GatewayEnrollment({ store, ca: issuing, certDays: config.gatewayCertDays, subCa: config.gatewaySubCa, authorityNames: config.hostnames, now: opts.now });
    const events = new AuthorityEvents();
    const revocation = new Revocation({
      store, ca, events, crlValidityHours: config.crlValidityHours, now: opts.now, bus, logger: logger.child({ component: 'revocation' }), refreshMs: opts.crlRefreshMs,
      onRevoked: (reason) => metrics.revocations.inc({ reason }),
      externalIssuerPem: () => issuing.bundle().externalDeviceChain?.[0],
    });
    await revocation.start();
    started.push(() => revocation.stop());
    parts.revocation = revocation;
    const renewals = new RenewalScheduler({ store, events, config, now: opts.now, bus, logger: logger.child({ component: 'renewal' }) });
    parts.renewals = renewals;
    const hub = config.iotHub
      ? new IotHubConnector({
          registry: createHubRegistry(config.iotHub.connectionString, config.iotHub.localEndpoint),
          store,
          logger: logger.child({ component: 'iothub' }),
          authentication: () => config.iotHub!.authentication,
          edgeDeviceId: (gatewayId) => config.iotHub!.edgeDeviceId.replaceAll('{gatewayId}', gatewayId),
          now: opts.now,
          // Real time, not opts.now: the quota is counted by the hub on its own clock.
          pacer: new Pacer({ perMinute: config.iotHub.registryOperationsPerMinute }),
          ...config.iotHub.sync,
          onThrottled: () => metrics.syncThrottled.inc({ target: 'hub' }),
        })
      : undefined;
    const dps = config.dps
      ? new DpsConnector({
          client: createDpsClient(config.dps.connectionString, config.dps.localEndpoint), store, logger: logger.child({ component: 'dps' }),
          mode: config.dps.mode, deviceCaPem: ca.deviceCa.pem, iotHubHostName: config.dps.iotHubHostName, now: opts.now,
          pacer: new Pacer({ perMinute: config.dps.operationsPerMinute }),
          ...config.dps.sync,
          onThrottled: () => metrics.syncThrottled.inc({ target: 'dps' }),
        })
      : undefined;
    parts.hub = hub;
    parts.dps = dps;
    renewals.start();
    hub?.start();
    dps?.start();
    started.push(() => renewals.stop(), () => hub?.stop(), () => dps?.stop());

    const tlsKey = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const now = Date.now();
    const tlsCert = await ca.issue('infra', {
      subjectDer: pkix.encodeName(`${config.organization} authority`),
      spkiDer: tlsKey.publicKey.export({ type: 'spki', format: 'der' }),
      profile: { kind: 'server', keyType: 'ec' },
      // The URI is the authority's mark: gateway CSRs may not carry URIs, so no gateway
      // certificate has it, and gateways accept the authority only with it (AUTHORITY_URI).
      sans: { dns: config.hostnames.filter((h) => !isIP(h)), ip: config.hostnames.filter((h) => isIP(h)), uri: [AUTHORITY_URI] },
      notBefore: new Date(now - BACKDATE_MS),
      notAfter: new Date(now + 30 * 86_400_000),
    });
    const bundle = ca.bundle();
    const adminToken = loadAdminToken(config);
    const createEnrollmentCode = async (deviceId: string, group = config.defaultGroup, ttlSeconds = 7 * 86_400) => {
      const code = newSecret(12);
      await store.createEnrollmentCode(hashEnrollmentCode(code), deviceId, group, Date.now() + ttlSeconds * 1000);
      return code;
    };
    const tls = { key: tlsKey.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, cert: tlsCert.pem + bundle.infraCa, ca: [bundle.infraCa, bundle.root] };
    const dashboard: DashboardDeps | undefined = config.dashboard.enabled
      ? {
          store, queries: new DashboardQueries(store.db), revocation, enrollment, createEnrollmentCode, adminTokenHash: hashAdminToken(adminToken),
          config: config.dashboard, groups: Object.keys(config.policies), now: opts.now,
        }
      : undefined;
    const app = await buildAuthorityApi({
      onboarding,
      enrollment,
      revocation,
      events,
      renewals,
      ca: issuing,
      store,
      logger,
      policies: config.policies,
      metrics,
      adminTokenHash: hashAdminToken(adminToken),
      tls,
      bodyLimitBytes: config.bodyLimitBytes,
      edgeDeviceId: (gatewayId) => (config.iotHub?.edgeDeviceId ?? '{gatewayId}').replaceAll('{gatewayId}', gatewayId),
      // On the API's listener unless it has its own port.
      dashboard: dashboard && !config.dashboard.listen ? dashboard : undefined,
    });
    // Small JSON request/answer pairs: Nagle + delayed ACK would add ~40 ms to each.
    app.server.on('secureConnection', (socket: import('node:tls').TLSSocket) => socket.setNoDelay(true));
    started.push(() => app.close());
    await app.listen({ host: config.listen.host, port: config.listen.port });
    const address = app.server.address();
    const port = typeof address === 'object' && address ? address.port : config.listen.port;
    const host = config.listen.host === '0.0.0.0' || config.listen.host === '::' ? 'localhost' : config.listen.host;
    const url = `https://${isIP(host) === 6 ? `[${host}]` : host}:${port}`;
    if (!config.crlBaseUrl) {
      const name = config.hostnames[0] ?? host;
      ca.setCrlBaseUrl(`https://${isIP(name) === 6 ? `[${name}]` : name}:${port}`);
    }
    let dashboardUrl: string | undefined;
    let ownDashboard: Awaited<ReturnType<typeof startDashboardServer>> | undefined;
    if (dashboard && config.dashboard.listen) {
      const own = (ownDashboard = await startDashboardServer(dashboard, { tls, listen: config.dashboard.listen, logger: logger.child({ component: 'dashboard' }) }));
      started.push(() => own.app.close());
      const dh = config.dashboard.listen.host === '0.0.0.0' || config.dashboard.listen.host === '::' ? 'localhost' : config.dashboard.listen.host;
      dashboardUrl = `https://${isIP(dh) === 6 ? `[${dh}]` : dh}:${own.port}/dashboard`;
    } else if (dashboard) dashboardUrl = `${url}/dashboard`;
    logger.info({ url, root: ca.root.certificate.fingerprint256, dashboard: dashboardUrl }, 'authority listening');

    return {
      url,
      port,
      ca,
      store,
      bus,
      onboarding,
      enrollment,
      revocation,
      renewals,
      hub,
      dps,
      deviceIssuer: issuing,
      rootFingerprint: new X509Certificate(bundle.root).fingerprint256,
      dashboardUrl,
      createEnrollmentCode,
      async close() {
        revocation.stop();
        renewals.stop();
        hub?.stop();
        dps?.stop();
        await bus.close();
        await ownDashboard?.app.close();
        await app.close();
        if (issuing !== caOpened) await issuing.close();
        await store.close();
        await caOpened.close();
      },
    };
  } catch (err) {
    for (const stop of started.reverse()) await Promise.resolve(stop()).catch(() => undefined);
    throw err;
  }
}
