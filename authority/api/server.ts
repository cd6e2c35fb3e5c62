/**
 * The authority's HTTPS API (fastify). Gateways authenticate with mutual TLS: TLS checks
 * the chain, then every /v1/devices route checks that the peer certificate is the current
 * certificate of an active gateway. Enrollment and the CA bundle need no client cert.
 */
import Fastify, { LogController, type FastifyReply, type FastifyRequest } from 'fastify';
import type { TLSSocket } from 'node:tls';
import type { Logger } from 'pino';
import { LeafgateError, pkix, deviceIdOf, parseJsonObject, toLeafgateError, validateAuth, validateCsr, validateEnroll, validateRegister, validateRenewalCsr, type ErrorCode } from '../../protocol/index.ts';
import type { CaConnector } from '../ca/index.ts';
import type { GatewayEnrollment } from '../gateways.ts';
import type { DeviceOnboarding } from '../onboarding.ts';
import { CRL_NAMES, type CrlName, type Revocation } from '../revocation.ts';
import type { AuthorityEvents } from '../events.ts';
import type { RenewalScheduler } from '../renewal.ts';
import type { DevicePolicy } from '../policy/index.ts';
import { registerAdminRoutes } from './admin.ts';
import { estRoutes } from './est.ts';
import type { AuthorityMetrics } from '../metrics.ts';
import type { AuthorityStore } from '../store/index.ts';
import { dashboardPlugin, type DashboardDeps } from '../dashboard/routes.ts';

export interface ApiDeps {
  onboarding: DeviceOnboarding;
  enrollment: GatewayEnrollment;
  revocation: Revocation;
  events: AuthorityEvents;
  renewals: RenewalScheduler;
  policies: Record<string, DevicePolicy>;
  adminTokenHash: Buffer;
  metrics: AuthorityMetrics;
  /** Seconds between keep-alive comments on the event stream. */
  eventHeartbeatMs?: number;
  ca: CaConnector;
  store: AuthorityStore;
  logger: Logger;
  tls: { key: string; cert: string; ca: string[] };
  bodyLimitBytes: number;
  /** The IoT Hub device id of a gateway's edge device (EST edge-identity CN). */
  edgeDeviceId?: (gatewayId: string) => string;
  /** The operator dashboard under /dashboard on this listener (authority/dashboard/); absent: not served here. */
  dashboard?: DashboardDeps;
}

declare module 'fastify' {
  interface FastifyRequest {
    gatewayId?: string;
  }
}

const FASTIFY_CODES: Record<string, ErrorCode> = {
  FST_ERR_CTP_BODY_TOO_LARGE: 'payload_too_large',
  FST_ERR_CTP_INVALID_JSON_BODY: 'malformed_json',
  FST_ERR_CTP_EMPTY_JSON_BODY: 'malformed_json',
  FST_ERR_CTP_INVALID_MEDIA_TYPE: 'bad_request',
  FST_ERR_VALIDATION: 'bad_request',
};

const objectBody = { body: { type: 'object' } } as const;

// The instance type varies with the https server and logger generics; callers only listen/close.
export async function buildAuthorityApi(deps: ApiDeps) {
  const app = Fastify({
    loggerInstance: deps.logger,
    // Per-request access lines would drown the audit-relevant ones; errors are logged below.
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: deps.bodyLimitBytes,
    https: {
      key: deps.tls.key,
      cert: deps.tls.cert,
      ca: deps.tls.ca,
      requestCert: true,
      // Enrollment must work before the gateway has a certificate; routes enforce mTLS.
      rejectUnauthorized: false,
      minVersion: 'TLSv1.2',
    },
    // Slowloris guard: a client that never finishes its request is cut.
    requestTimeout: 30_000,
    connectionTimeout: 30_000,
  });

  // JSON parsing with our error codes (malformed_json) rather than fastify's wording.
  app.addContentTypeParser('application/json', { parseAs: 'buffer' }, (_req, body, done) => {
    try {
      done(null, parseJsonObject(body as Buffer));
    } catch (err) {
      done(err as Error, undefined);
    }
  });

  app.setErrorHandler((err: Error & { code?: string; statusCode?: number }, req, reply) => {
    const e = err instanceof LeafgateError ? err : FASTIFY_CODES[err.code ?? ''] ? new LeafgateError(FASTIFY_CODES[err.code!], err.message) : toLeafgateError(err);
    if (e.code === 'internal') req.log.error({ err }, 'request failed');
    // The database is down: every request fails alike (503, retry-after); say so loudly.
    else if (e.code === 'authority_unavailable') req.log.error({ code: e.code, url: req.url.slice(0, 100) }, e.message);
    else req.log.info({ code: e.code, url: req.url, gatewayId: req.gatewayId }, e.message);
    if (e.retryAfterMs !== undefined) reply.header('retry-after', Math.ceil(e.retryAfterMs / 1000));
    void reply.status(e.status).send(e.toBody());
  });
  app.setNotFoundHandler((req, reply) => {
    void reply.status(404).send(new LeafgateError('not_found', `no route ${req.method} ${req.url.slice(0, 100)}`).toBody());
  });

  // The peer certificate of a keep-alive connection does not change: read it once per socket
  // (getPeerCertificate is costly), check the store on every request (cheap, catches
  // revocation and renewal at once).
  const peers = new WeakMap<TLSSocket, { cn: string; fingerprint: string } | null>();
  const requireGateway = async (req: FastifyRequest, _reply: FastifyReply) => {
    const socket = req.raw.socket as TLSSocket;
    let peerInfo = peers.get(socket);
    if (peerInfo === undefined) {
      const peer = socket.getPeerCertificate?.();
      peerInfo = peer && peer.raw ? { cn: typeof peer.subject?.CN === 'string' ? peer.subject.CN : '', fingerprint: peer.fingerprint256 } : null;
      peers.set(socket, peerInfo);
    }
    if (!peerInfo) throw new LeafgateError('client_cert_required');
    if (!socket.authorized) throw new LeafgateError('unknown_gateway', `client certificate not trusted: ${socket.authorizationError}`);
    const id = peerInfo.cn;
    const gw = id ? await deps.store.getGateway(id) : null;
    // Exactly the gateway's current certificate, by fingerprint: TLS proved the key, and the
    // fingerprint pins the very certificate the infrastructure CA issued to this gateway. A
    // certificate forged under another CA with this CN and serial, a superseded one (renewed)
    // and a revoked one all fail here.
    if (!gw || gw.status !== 'active' || !gw.certSerial || gw.certFingerprint !== peerInfo.fingerprint) throw new LeafgateError('unknown_gateway');
    const cert = await deps.store.getCertificate(gw.certSerial);
    if (!cert || cert.kind !== 'gateway' || cert.subjectId !== gw.id || cert.status !== 'active' || cert.notAfter <= Date.now() || cert.fingerprint !== peerInfo.fingerprint) {
      throw new LeafgateError('unknown_gateway');
    }
    req.gatewayId = gw.id;
  };

  app.get('/healthz', async () => ({ status: 'ok' }));
  // Ready = the database answers: a load balancer in front of several nodes drains one that lost it.
  app.get('/readyz', async () => {
    await deps.store.ping();
    return { status: 'ready' };
  });

  // Counts only, no identities: readable without credentials, like /healthz.
  app.get('/metrics', async (_req, reply) => {
    void reply.header('content-type', deps.metrics.registry.contentType);
    return deps.metrics.registry.metrics();
  });

  app.get('/v1/ca', async () => deps.ca.bundle());

  // CRLs are public (RFC 5280 5): no client certificate needed, like a CDP over HTTP. One per
  // CA (the distribution point in each certificate names its issuer's); /v1/crl is the device CA's.
  // /v1/crl/external-devices.crl is not a CA's CRL: the revoked certificates of the external
  // device CA (EST), signed by the device CA key, indirect; read by leafgate gateways.
  const sendCrl = (name: CrlName, pem: boolean, reply: FastifyReply) => {
    const crl = deps.revocation.crl(name);
    void reply.header('content-type', pem ? 'application/x-pem-file' : 'application/pkix-crl').header('x-crl-number', crl.crlNumber.toString());
    return pem ? crl.pem : crl.der;
  };
  app.get('/v1/crl', async (_req, reply) => sendCrl('device-ca', false, reply));
  app.get('/v1/crl.pem', async (_req, reply) => sendCrl('device-ca', true, reply));
  app.get('/v1/crl/:file', async (req, reply) => {
    const m = /^([a-z-]+)\.(crl|pem)$/.exec((req.params as { file: string }).file);
    if (!m || !(CRL_NAMES as readonly string[]).includes(m[1])) throw new LeafgateError('not_found', 'no such CRL');
    return sendCrl(m[1] as CrlName, m[2] === 'pem', reply);
  });

  // Server-sent events to gateways: pushes (CRL reissued, ...) over the mTLS connection.
  const streams = new Set<() => void>();
  app.addHook('preClose', async () => {
    for (const end of streams) end();
  });

  app.post('/v1/gateways/enroll', { schema: objectBody }, async (req) => {
    const body = req.body as Record<string, unknown>;
    if (typeof body.token !== 'string' || body.token.length > 256) throw new LeafgateError('bad_request', 'token is required');
    if (typeof body.csr !== 'string' || body.csr.length > 16 * 1024) throw new LeafgateError('bad_request', 'csr is required');
    return deps.enrollment.enroll(body.token, body.csr);
  });

  registerAdminRoutes(app as unknown as import('fastify').FastifyInstance, { store: deps.store, revocation: deps.revocation, policies: deps.policies, adminTokenHash: deps.adminTokenHash });
  // EST (RFC 7030) under /.well-known/est, in its own scope (content type, text/plain refusals): authority/api/est.ts.
  if (deps.dashboard) app.register(dashboardPlugin(deps.dashboard) as unknown as import('fastify').FastifyPluginAsync, { prefix: '/dashboard' });
  app.register(async (scoped) => estRoutes(scoped as unknown as import('fastify').FastifyInstance, { enrollment: deps.enrollment, ca: deps.ca, store: deps.store, edgeDeviceId: deps.edgeDeviceId }));

  app.register(async (scoped) => {
    // onRequest: before the body is read, so an unknown client cannot make us parse 64 KiB.
    scoped.addHook('onRequest', requireGateway);
    scoped.get('/v1/events', (req, reply) => {
      reply.hijack();
      const res = reply.raw;
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-store', connection: 'keep-alive' });
      const send = (event: string, data: unknown) => res.write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
      const onCrl = (e: { crlNumber: string; revoked: string[] }) => send('crl', e);
      // Renewal events are addressed: a gateway hears only of the devices enrolled through it.
      const onDue = (e: { gatewayId: string; devices: unknown[] }) => {
        if (e.gatewayId === req.gatewayId) send('renewal-due', { devices: e.devices });
      };
      deps.events.on('crl', onCrl);
      deps.events.on('renewal-due', onDue);
      send('hello', { gatewayId: req.gatewayId, crlNumber: deps.revocation.crl().crlNumber.toString() });
      // A gateway that (re)connects learns its whole due list at once.
      void deps.renewals.dueFor(req.gatewayId!).then((devices) => devices.length && send('renewal-due', { devices }), () => undefined);
      // A revoked gateway's stream ends at once on this node; on another node's revocation
      // (a cluster) at the next heartbeat, which re-checks the gateway's standing.
      const onGatewayRevoked = (e: { gatewayId: string }) => e.gatewayId === req.gatewayId && end();
      deps.events.on('gateway-revoked', onGatewayRevoked);
      const heartbeat = setInterval(() => {
        res.write(': keep-alive\n\n');
        void requireGateway(req, reply).catch(() => end());
      }, deps.eventHeartbeatMs ?? 15_000);
      const end = () => {
        clearInterval(heartbeat);
        deps.events.off('crl', onCrl);
        deps.events.off('renewal-due', onDue);
        deps.events.off('gateway-revoked', onGatewayRevoked);
        streams.delete(end);
        res.end();
      };
      streams.add(end);
      req.raw.on('close', end);
    });
    scoped.post('/v1/gateways/renew', { schema: objectBody }, async (req) => {
      const body = req.body as Record<string, unknown>;
      if (typeof body.csr !== 'string' || body.csr.length > 16 * 1024) throw new LeafgateError('bad_request', 'csr is required');
      return deps.enrollment.renew(req.gatewayId!, body.csr);
    });
    scoped.post('/v1/gateways/subca', { schema: objectBody }, async (req) => {
      const body = req.body as Record<string, unknown>;
      if (typeof body.csr !== 'string' || body.csr.length > 16 * 1024) throw new LeafgateError('bad_request', 'csr is required');
      return deps.enrollment.signSubCa(req.gatewayId!, body.csr);
    });
    // An edge operator (module direct method) revokes a device of its own gateway.
    scoped.post('/v1/gateways/revoke-device', { schema: objectBody }, async (req) => {
      const body = req.body as Record<string, unknown>;
      const deviceId = deviceIdOf(body);
      const reason = (body.reason ?? 'unspecified') as pkix.RevocationReason;
      if (typeof reason !== 'string' || !(reason in pkix.REVOCATION_REASONS)) throw new LeafgateError('bad_request', 'unknown revocation reason');
      const device = await deps.store.getDevice(deviceId);
      if (!device || device.gatewayId !== req.gatewayId) throw new LeafgateError('unknown_device', 'no such device behind this gateway');
      const out = [];
      for (const c of await deps.store.listCertificates({ subjectId: deviceId, status: 'active' })) out.push(await deps.revocation.revokeSerial(c.serial, reason, `gateway:${req.gatewayId}`));
      return { revoked: out };
    });
    scoped.post('/v1/devices/register', { schema: objectBody }, async (req) => {
      const body = req.body as Record<string, unknown>;
      // `compact: true` is the gateway's mark of a device's `up/begin` (the compact flow).
      return deps.onboarding.register(req.gatewayId!, deviceIdOf(body), validateRegister(body, { compactFlag: true }));
    });
    scoped.post('/v1/devices/auth', { schema: objectBody }, async (req) => {
      const body = req.body as Record<string, unknown>;
      return deps.onboarding.auth(req.gatewayId!, deviceIdOf(body), validateAuth(body));
    });
    scoped.post('/v1/devices/csr', { schema: objectBody }, async (req) => {
      const body = req.body as Record<string, unknown>;
      return deps.onboarding.csr(req.gatewayId!, deviceIdOf(body), validateCsr(body));
    });
    // The compact flow's second exchange: challenge answer + CSR under one signature.
    scoped.post('/v1/devices/enroll', { schema: objectBody }, async (req) => {
      const body = req.body as Record<string, unknown>;
      return deps.onboarding.enroll(req.gatewayId!, deviceIdOf(body), validateEnroll(body));
    });
    scoped.post('/v1/devices/renew', { schema: objectBody }, async (req) => {
      const body = req.body as Record<string, unknown>;
      const serial = body.currentSerial;
      if (typeof serial !== 'string' || !/^[0-9A-F]{2,40}$/.test(serial)) throw new LeafgateError('bad_request', 'currentSerial must be upper-case hex');
      const { currentSerial: _s, ...rest } = body;
      // proof + signedAt (the device's signature with its current key) pass as the device sent them.
      return deps.onboarding.renew(req.gatewayId!, deviceIdOf(body), { ...validateRenewalCsr(rest), currentSerial: serial });
    });
  });

  return app;
}
