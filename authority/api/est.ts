/**
 * EST (RFC 7030) for IoT Edge's aziot-certd and any standard EST client, under
 * `/.well-known/est` on the authority's HTTPS listener (there is no plaintext listener, so
 * HTTP Basic only ever travels inside TLS: RFC 7030 3.2.3).
 *
 * Two profiles, each a path label (RFC 7030 3.2.2: `/.well-known/est/<label>/<operation>`);
 * no label means `identity` (the server MUST serve requests without the label segment):
 *
 * - `identity`: the IoT Edge device identity = the gateway's own certificate, from the
 *   infrastructure CA, through GatewayEnrollment.enroll (Basic: gateway id + one-time
 *   enrollment token) or GatewayEnrollment.renew (TLS client certificate). Same checks as
 *   gateway enrollment: CN = gateway id, key, SANs, no name of the authority or of another
 *   gateway. A CSR asking for a CA (basicConstraints cA TRUE) is refused.
 * - `edge-identity`: the IoT Edge device identity (what aziot-edged presents to IoT Hub) as a
 *   certificate of its own: clientAuth, from the infrastructure CA, CN = the edge device id,
 *   no SANs, through GatewayEnrollment.issueEdgeIdentity; authenticated by the gateway's
 *   current certificate only, and it never supersedes that certificate -- so aziot-certd,
 *   which authenticates every request (renewals included) with one configured client
 *   certificate, can keep using the gateway's own (docs/azure.md).
 * - `edge-ca`: the IoT Edge CA = the gateway's Sub-CA, from the edge issuer, through
 *   GatewayEnrollment.signSubCa: CN "<gatewayId> Edge CA", no SANs, pathLen 0, name
 *   constraints from the gateway's current certificate, EKU serverAuth + clientAuth.
 *
 * Authentication: a TLS client certificate that is exactly the gateway's current certificate
 * (the check of requireGateway in server.ts), or HTTP Basic with the gateway's one-time
 * enrollment token (username = gateway id), spent only when the CSR passes. simplereenroll
 * takes only the current certificate, and (RFC 7030 4.2.2) a CSR with the subject and SANs of
 * that certificate. cacerts and csrattrs need no authentication (RFC 7030 4.1.1, 4.5.1).
 *
 * Refusals (RFC 7030 4.2.3: "a suitable 4xx or 5xx"), text/plain bodies, each audited:
 * 401 + `WWW-Authenticate: Basic` when simpleenroll carries no credentials; 400 a malformed
 * request or CSR; 403 a policy refusal (wrong CN, a CA request on `identity`, SANs on
 * `edge-ca`, ...), a client certificate that is not the gateway's current one (revoked,
 * superseded, unknown), and a secret that is unknown, spent or expired -- 403 rather than 401
 * because presenting the same credentials again can never succeed (only hashes are stored,
 * so unknown and spent cannot be told apart); 404 an unknown label or operation.
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { X509Certificate } from 'node:crypto';
import type { TLSSocket } from 'node:tls';
import { LeafgateError, isValidDeviceId, pkix, toLeafgateError, type ErrorCode } from '../../protocol/index.ts';
import type { CaConnector } from '../ca/index.ts';
import type { GatewayEnrollment } from '../gateways.ts';
import type { AuthorityStore } from '../store/index.ts';

export interface EstDeps {
  enrollment: GatewayEnrollment;
  ca: CaConnector;
  store: AuthorityStore;
  /** The IoT Hub device id of a gateway's edge device (the `edge-identity` CN); the gateway id by default. */
  edgeDeviceId?: (gatewayId: string) => string;
}

export const EST_PROFILES = ['identity', 'edge-ca', 'edge-identity'] as const;
export type EstProfile = (typeof EST_PROFILES)[number];
const OPERATIONS = new Set(['cacerts', 'simpleenroll', 'simplereenroll', 'csrattrs']);
const MAX_CSR_BASE64 = 16 * 1024;

const PKCS7 = 'application/pkcs7-mime; smime-type=certs-only';
const OID_SECP256R1 = '1.2.840.10045.3.1.7';

/** An EST refusal: the HTTP status and the audit code. */
class EstRefusal extends Error {
  constructor(
    readonly status: number,
    readonly code: ErrorCode,
    message: string,
    readonly gatewayId: string | null = null,
  ) {
    super(message);
  }
}

type Caller = { gatewayId: string; via: 'certificate' } | { gatewayId: string; via: 'basic'; token: string };

/** Status of a coded error on the EST surface (the JSON API's catalogue differs on two). */
function estStatus(e: LeafgateError): number {
  // A secret the authority refuses will never pass again: forbidden, not "try other credentials".
  if (e.code === 'invalid_token') return 403;
  return e.status;
}

/** basicConstraints cA TRUE among the CSR's requested extensions (a CA request). */
function requestsCa(csrDer: Buffer): boolean {
  const [info] = pkix.der.children(pkix.der.parseDer(csrDer));
  const attrs = pkix.der.children(info).find((n) => n.tag === 0xa0);
  for (const attr of attrs ? pkix.der.children(attrs) : []) {
    const [type, values] = pkix.der.children(attr);
    if (pkix.der.decodeOid(type) !== pkix.OID.extensionRequest) continue;
    for (const ext of pkix.der.children(pkix.der.children(values)[0])) {
      const parts = pkix.der.children(ext);
      if (pkix.der.decodeOid(parts[0]) !== pkix.OID.basicConstraints) continue;
      const bc = pkix.der.children(pkix.der.parseDer(parts[parts.length - 1].value));
      return bc[0]?.tag === pkix.der.TAG.BOOLEAN && pkix.der.decodeBoolean(bc[0]);
    }
  }
  return false;
}

/** The DNS names and IP addresses of a certificate, sorted, for an equality check. */
function sanKey(x: { dns: string[]; ip: string[] }): string {
  return JSON.stringify([[...x.dns].map((d) => d.toLowerCase()).sort(), [...x.ip].sort()]);
}

export async function estRoutes(app: FastifyInstance, deps: EstDeps): Promise<void> {
  const audit = (req: FastifyRequest, op: string, r: EstRefusal) =>
    deps.store.appendAudit({ at: Date.now(), action: `est-${op}`, outcome: 'refused', code: r.code, gatewayId: r.gatewayId, detail: { message: r.message, path: req.url.slice(0, 100) } });

  // RFC 7030 4.2.1: a base64 body (Content-Transfer-Encoding base64, RFC 8951 3.2 drops the header's role).
  app.addContentTypeParser('application/pkcs10', { parseAs: 'string', bodyLimit: MAX_CSR_BASE64 }, (_req, body, done) => done(null, body));

  app.setErrorHandler((err: Error & { code?: string; statusCode?: number }, req, reply) => {
    const status = err instanceof EstRefusal ? err.status : err instanceof LeafgateError ? estStatus(err) : err.statusCode && err.statusCode < 500 ? err.statusCode : toLeafgateError(err).status;
    if (status >= 500) req.log.error({ err }, 'EST request failed');
    else req.log.info({ status, url: req.url.slice(0, 100) }, err.message);
    if (err instanceof LeafgateError && err.retryAfterMs !== undefined) void reply.header('retry-after', Math.ceil(err.retryAfterMs / 1000));
    if (status === 401) void reply.header('www-authenticate', 'Basic realm="leafgate EST", charset="UTF-8"');
    void reply.status(status).type('text/plain; charset=utf-8').send(`${status >= 500 ? 'internal error' : err.message}\n`);
  });

  /** The label and operation of the path, or a 404 (audited). */
  const route = async (req: FastifyRequest): Promise<{ profile: EstProfile; op: string }> => {
    const p = req.params as { a: string; b?: string };
    const [label, op] = p.b === undefined ? ['identity', p.a] : [p.a, p.b];
    if (!OPERATIONS.has(op) || !(EST_PROFILES as readonly string[]).includes(label)) {
      const r = new EstRefusal(404, 'not_found', `no EST operation ${label}/${op}`.slice(0, 120));
      await audit(req, 'route', r);
      throw r;
    }
    return { profile: label as EstProfile, op };
  };

  /**
   * The caller: the gateway whose exact current certificate is the TLS client certificate
   * (as requireGateway in server.ts checks it), else HTTP Basic (gateway id, enrollment token).
   */
  const caller = async (req: FastifyRequest, op: string, allowBasic: boolean): Promise<Caller> => {
    const socket = req.raw.socket as TLSSocket;
    const peer = socket.getPeerCertificate?.();
    let refusal: EstRefusal | null = null;
    if (peer && peer.raw) {
      const cn = typeof peer.subject?.CN === 'string' ? peer.subject.CN : '';
      const gw = cn ? await deps.store.getGateway(cn) : null;
      const cert = gw?.certSerial ? await deps.store.getCertificate(gw.certSerial) : null;
      if (
        socket.authorized && gw && gw.status === 'active' && gw.certFingerprint === peer.fingerprint256 &&
        cert && cert.kind === 'gateway' && cert.subjectId === gw.id && cert.status === 'active' && cert.notAfter > Date.now() && cert.fingerprint === peer.fingerprint256
      ) {
        return { gatewayId: gw.id, via: 'certificate' };
      }
      // Say why in the audit log (revoked, superseded, unknown), never to the client.
      const presented = peer.serialNumber ? await deps.store.getCertificate(peer.serialNumber.toUpperCase()) : null;
      const why = !socket.authorized ? `not trusted: ${socket.authorizationError}` : presented && presented.fingerprint === peer.fingerprint256 ? `${presented.kind} certificate ${presented.serial} is ${presented.status === 'active' ? 'not the current one' : presented.status}` : 'unknown certificate';
      refusal = new EstRefusal(403, 'unknown_gateway', `client certificate is not the current certificate of an active gateway (${why})`, gw?.id ?? null);
    }
    const auth = req.headers.authorization;
    if (allowBasic && typeof auth === 'string' && /^basic /i.test(auth)) {
      const decoded = Buffer.from(auth.slice(6).trim(), 'base64').toString('utf8');
      const colon = decoded.indexOf(':');
      const user = colon > 0 ? decoded.slice(0, colon) : '';
      const token = colon > 0 ? decoded.slice(colon + 1) : '';
      if (!isValidDeviceId(user) || !token || token.length > 256) {
        const r = new EstRefusal(403, 'invalid_token', 'Basic credentials must be the gateway id and its enrollment token', null);
        await audit(req, op, r);
        throw r;
      }
      return { gatewayId: user, via: 'basic', token };
    }
    if (!refusal) {
      refusal = allowBasic
        ? new EstRefusal(401, 'not_authenticated', 'authenticate with the gateway\'s current certificate or with HTTP Basic (gateway id, enrollment token)')
        : new EstRefusal(403, 'client_cert_required', 'simplereenroll requires the gateway\'s current certificate as TLS client certificate');
    }
    await audit(req, op, refusal);
    throw refusal;
  };

  /** The request body: base64 DER PKCS#10, returned as PEM for the enrollment checks. */
  const csrOf = async (req: FastifyRequest, op: string, gatewayId: string): Promise<string> => {
    const b64 = typeof req.body === 'string' ? req.body.replace(/\s+/g, '') : '';
    if (!b64 || !/^[A-Za-z0-9+/]+={0,2}$/.test(b64) || b64.length % 4 === 1) {
      const r = new EstRefusal(400, 'bad_csr', 'the body must be a base64 DER PKCS#10 request (Content-Type application/pkcs10)', gatewayId);
      await audit(req, op, r);
      throw r;
    }
    return pkix.toPem(Buffer.from(b64, 'base64'), 'CERTIFICATE REQUEST');
  };

  const sendCerts = (reply: FastifyReply, certs: string[]) =>
    reply.status(200).header('content-type', PKCS7).header('content-transfer-encoding', 'base64').send(pkix.certsOnlyBase64(certs));

  const enroll = async (req: FastifyRequest, reply: FastifyReply) => {
    const { profile, op } = await route(req);
    if (op !== 'simpleenroll' && op !== 'simplereenroll') {
      const r = new EstRefusal(404, 'not_found', `${op} is not a POST operation`);
      await audit(req, 'route', r);
      throw r;
    }
    const who = await caller(req, op, op === 'simpleenroll');
    const csrPem = await csrOf(req, op, who.gatewayId);
    let parsed: pkix.ParsedCsr | null = null;
    try {
      parsed = pkix.parseCsr(csrPem);
    } catch {
      // The enrollment methods below parse again, refuse with the right code and audit it.
    }
    const refuse = async (message: string) => {
      const r = new EstRefusal(403, 'policy_violation', message, who.gatewayId);
      await audit(req, op, r);
      return r;
    };
    let certificate: string;
    if (profile === 'edge-identity') {
      if (who.via !== 'certificate') throw await refuse('the edge-identity profile takes the gateway\'s current certificate as credential, not a one-time secret');
      if (parsed && requestsCa(parsed.der)) throw await refuse('the edge-identity profile issues no CA: use the edge-ca label');
      certificate = (await deps.enrollment.issueEdgeIdentity(who.gatewayId, (deps.edgeDeviceId ?? ((g: string) => g))(who.gatewayId), csrPem)).certificate;
    } else if (profile === 'identity') {
      if (parsed && requestsCa(parsed.der)) throw await refuse('the identity profile issues no CA: use the edge-ca label');
      if (who.via === 'basic') {
        // The token's gateway is the CSR's CN (enroll checks it); the username must name it too,
        // checked before enroll so that a mismatch does not spend the token.
        if (parsed && parsed.commonName !== who.gatewayId) throw await refuse(`CSR subject must be CN=${who.gatewayId}`);
        certificate = (await deps.enrollment.enroll(who.token, csrPem)).certificate;
      } else {
        if (op === 'simplereenroll' && parsed) {
          // RFC 7030 4.2.2: the subject and subjectAltName are those of the certificate being renewed.
          const gw = await deps.store.getGateway(who.gatewayId);
          const current = gw?.certSerial ? await deps.store.getCertificate(gw.certSerial) : null;
          const names = current ? new X509Certificate(current.pem).subjectAltName ?? '' : '';
          const currentSans = { dns: [] as string[], ip: [] as string[] };
          for (const part of names.split(', ')) {
            if (part.startsWith('DNS:')) currentSans.dns.push(part.slice(4));
            else if (part.startsWith('IP Address:')) currentSans.ip.push(part.slice(11));
          }
          if (sanKey(parsed.sans) !== sanKey(currentSans)) throw await refuse('simplereenroll: the CSR must carry the SANs of the current certificate (RFC 7030 4.2.2)');
        }
        certificate = (await deps.enrollment.renew(who.gatewayId, csrPem)).certificate;
      }
    } else {
      certificate = who.via === 'basic'
        ? (await deps.enrollment.signSubCaWithToken(who.gatewayId, who.token, csrPem)).certificate
        : (await deps.enrollment.signSubCa(who.gatewayId, csrPem)).certificate;
    }
    // RFC 7030 4.2.3: only the issued certificate; the chain is cacerts.
    return sendCerts(reply, [certificate]);
  };

  const get = async (req: FastifyRequest, reply: FastifyReply) => {
    const { profile, op } = await route(req);
    if (op === 'cacerts') {
      const bundle = deps.ca.bundle();
      // The issuing CA of the label's certificates, then the root: with the issued certificate
      // in front, the chain aziot-certd writes (it appends cacerts to simpleenroll's answer).
      return sendCerts(reply, [profile === 'edge-ca' ? bundle.edgeIssuer : bundle.infraCa, bundle.root]);
    }
    if (op === 'csrattrs') {
      // RFC 7030 4.5.2 CsrAttrs: both profiles want a P-256 key signed with ECDSA SHA-256 (what
      // aziot-keyd makes by default); the subject rules cannot be said in CsrAttrs.
      const attrs = pkix.der.seq(
        pkix.der.oid(pkix.OID.ecdsaWithSHA256),
        pkix.der.seq(pkix.der.oid(pkix.OID.ecPublicKey), pkix.der.setOf(pkix.der.oid(OID_SECP256R1))),
      );
      return reply.status(200).header('content-type', 'application/csrattrs').header('content-transfer-encoding', 'base64').send(`${attrs.toString('base64')}\n`);
    }
    const r = new EstRefusal(404, 'not_found', `${op} is not a GET operation`);
    await audit(req, 'route', r);
    throw r;
  };

  for (const path of ['/.well-known/est/:a', '/.well-known/est/:a/:b']) {
    app.get(path, get);
    app.post(path, { bodyLimit: MAX_CSR_BASE64 }, enroll);
  }
}
