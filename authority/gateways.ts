/**
 * Gateway enrollment: an operator creates a one-time token for a gateway id; the gateway
 * presents it once with a CSR and receives its certificate from the infrastructure CA
 * (clientAuth + serverAuth: it authenticates to the authority and serves TLS to devices).
 * Only the token's SHA-256 is stored, so a copy of the database does not hold usable tokens.
 * A gateway's names are its own: a CSR naming the authority or another gateway is refused
 * (loopback names excepted: they denote whichever machine the client runs on), and its
 * Sub-CA is name-constrained to exactly those names.
 */
import { createHash } from 'node:crypto';
import { isIPv4, isIPv6 } from 'node:net';
import { LeafgateError, isValidDeviceId, pkix } from '../protocol/index.ts';
import { X509Certificate } from 'node:crypto';
import { BACKDATE_MS, type CaBundle, type CaConnector } from './ca/index.ts';
import type { AuthorityStore } from './store/index.ts';
import { newSecret } from './secret.ts';

export interface GatewayEnrollmentResult {
  gatewayId: string;
  certificate: string;
  chain: string[];
  /** Trust bundle for the gateway: root, device CA (for device client certs), infra CA (the authority's issuer), edge issuer. */
  bundle: CaBundle;
  notAfter: string;
}

const hashToken = (token: string) => createHash('sha256').update(`leafgate-gateway-token\n${token}`).digest('hex');
const MAX_SANS = 16;
const DNS_NAME = /^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;

export interface SubCaPolicy {
  validityDays: number;
  /**
   * More dNSName subtrees a Sub-CA may name besides its gateway's own names (RFC 5280
   * 4.2.1.10); `{gatewayId}` is replaced. Every other DNS name and IP address is excluded.
   */
  permittedDns: string[];
}

/** Loopback names: every machine has them, so no gateway owns them (and none is refused for them). */
export function isLoopbackName(name: string): boolean {
  const n = name.toLowerCase().replace(/\.$/, '');
  if (n === 'localhost' || n.endsWith('.localhost')) return true;
  if (isIPv4(n)) return n.startsWith('127.');
  return isIPv6(n) && /^(0{0,4}:){0,7}:?0{0,3}1$|^::1$/.test(n);
}

/** DNS names and IP addresses of a certificate, from node's subjectAltName text. */
function namesOf(pem: string): { dns: string[]; ip: string[] } {
  const out = { dns: [] as string[], ip: [] as string[] };
  const text = new X509Certificate(pem).subjectAltName ?? '';
  for (const part of text.split(', ')) {
    if (part.startsWith('DNS:')) out.dns.push(part.slice(4));
    else if (part.startsWith('IP Address:')) out.ip.push(part.slice(11));
  }
  return out;
}

export class GatewayEnrollment {
  constructor(
    private readonly deps: {
      store: AuthorityStore;
      ca: CaConnector;
      certDays: number;
      subCa: SubCaPolicy;
      /** The authority's own TLS names: no gateway may be certified for them. */
      authorityNames?: string[];
      now?: () => number;
    },
  ) {}

  private now(): number {
    return this.deps.now?.() ?? Date.now();
  }

  /** Returns the token to hand to the gateway's operator; valid once, for `ttlSeconds`. */
  async createToken(gatewayId: string, ttlSeconds = 24 * 3600): Promise<string> {
    if (!isValidDeviceId(gatewayId)) throw new LeafgateError('invalid_device_id', 'gateway id is not allowed');
    const token = newSecret(24);
    await this.deps.store.createEnrollmentToken(hashToken(token), gatewayId, this.now() + ttlSeconds * 1000);
    return token;
  }

  /** Parses and checks a gateway CSR (key strength, SANs); every refusal is audited under `action`. */
  private async checkCsr(action: string, csrPem: string, gatewayId: string | null, now: number): Promise<pkix.ParsedCsr> {
    const refuse = async (code: 'bad_csr' | 'policy_violation', message: string) => {
      await this.deps.store.appendAudit({ at: now, action, outcome: 'refused', code, gatewayId, detail: { message } });
      return new LeafgateError(code, message);
    };
    let csr: pkix.ParsedCsr;
    try {
      csr = pkix.parseCsr(csrPem);
    } catch (err) {
      // Malformed: bad_csr. Well-formed but never signed (explicit curve, BMPString subject, ...): policy_violation.
      throw await refuse(err instanceof pkix.NotAcceptedError ? 'policy_violation' : 'bad_csr', (err as Error).message);
    }
    const k = csr.key;
    if (!((k.keyType === 'ec' && (k.keySize === 256 || k.keySize === 384)) || (k.keyType === 'rsa' && k.keySize >= 2048 && k.keySize <= 4096))) {
      throw await refuse('policy_violation', `gateway key ${pkix.keySpecLabel(k)} is not allowed`);
    }
    if (k.keyType === 'rsa' && k.publicExponent !== 65537) throw await refuse('policy_violation', 'gateway RSA public exponent must be 65537');
    const sanCount = csr.sans.dns.length + csr.sans.ip.length;
    if (sanCount > MAX_SANS || csr.sans.uri.length || csr.sans.email.length) throw await refuse('policy_violation', 'gateway SANs: at most 16 DNS names and IP addresses');
    if (!csr.sans.dns.every((d) => DNS_NAME.test(d)) || !csr.sans.ip.every((ip) => isIPv4(ip) || isIPv6(ip))) throw await refuse('policy_violation', 'gateway SAN is malformed');
    return csr;
  }

  private async refuse(action: string, code: 'policy_violation' | 'invalid_token', message: string, gatewayId: string | null, now: number): Promise<LeafgateError> {
    await this.deps.store.appendAudit({ at: now, action, outcome: 'refused', code, gatewayId, detail: { message } });
    return new LeafgateError(code, message);
  }

  /**
   * The names a gateway CSR asks for must be its own: never one of the authority's, never one
   * another gateway's current certificate carries. Loopback names are shared by every machine.
   */
  private async checkNames(action: string, gatewayId: string, csr: pkix.ParsedCsr, now: number): Promise<void> {
    const wanted = [...csr.sans.dns, ...csr.sans.ip].filter((n) => !isLoopbackName(n)).map((n) => n.toLowerCase());
    if (!wanted.length) return;
    const authority = new Set((this.deps.authorityNames ?? []).map((n) => n.toLowerCase()));
    const clash = wanted.find((n) => authority.has(n));
    if (clash) throw await this.refuse(action, 'policy_violation', `${clash} is a name of the authority`, gatewayId, now);
    for (const other of await this.deps.store.listCertificates({ kind: 'gateway', status: 'active', limit: 1_000_000 })) {
      if (other.subjectId === gatewayId || other.notAfter <= now) continue;
      const names = namesOf(other.pem);
      const taken = wanted.find((n) => names.dns.some((d) => d.toLowerCase() === n) || names.ip.includes(n));
      if (taken) throw await this.refuse(action, 'policy_violation', `${taken} belongs to gateway ${other.subjectId}`, gatewayId, now);
    }
  }

  async enroll(token: string, csrPem: string): Promise<GatewayEnrollmentResult> {
    const now = this.now();
    const csr = await this.checkCsr('enroll-gateway', csrPem, null, now);
    // The token is spent only once the CSR is known good (subject and names included), so a
    // typo does not burn it.
    const tokenHash = hashToken(token);
    const holder = await this.deps.store.peekEnrollmentToken(tokenHash, now);
    if (!holder) throw await this.refuse('enroll-gateway', 'invalid_token', 'enrollment token is unknown, used or expired', null, now);
    if (csr.subject.length !== 1 || csr.commonName !== holder) throw await this.refuse('enroll-gateway', 'policy_violation', `CSR subject must be CN=${holder}`, holder, now);
    await this.checkNames('enroll-gateway', holder, csr, now);
    const gatewayId = await this.deps.store.consumeEnrollmentToken(tokenHash, now);
    if (gatewayId !== holder) throw await this.refuse('enroll-gateway', 'invalid_token', 'enrollment token is unknown, used or expired', null, now);
    return this.issueGatewayCert(gatewayId, csr, 'enroll-gateway', now);
  }

  /** A new certificate for a gateway that authenticated with its current one (mTLS). */
  async renew(gatewayId: string, csrPem: string): Promise<GatewayEnrollmentResult> {
    const now = this.now();
    const csr = await this.checkCsr('renew-gateway', csrPem, gatewayId, now);
    if (csr.subject.length !== 1 || csr.commonName !== gatewayId) throw await this.refuse('renew-gateway', 'policy_violation', `CSR subject must be CN=${gatewayId}`, gatewayId, now);
    await this.checkNames('renew-gateway', gatewayId, csr, now);
    return this.issueGatewayCert(gatewayId, csr, 'renew-gateway', now);
  }

  /**
   * The IoT Edge device identity of a gateway (what aziot-edged presents to IoT Hub): a
   * clientAuth-only certificate from the infrastructure CA, CN = the gateway's edge device id
   * in IoT Hub, no SANs. It is a certificate of its own (kind `edge-identity`): issuing one
   * supersedes only the previous edge identity, never the gateway's leafgate certificate,
   * which stays the credential the gateway (and aziot-certd's EST requests) authenticate with.
   */
  async issueEdgeIdentity(gatewayId: string, edgeDeviceId: string, csrPem: string): Promise<{ certificate: string; chain: string[]; notAfter: string }> {
    const now = this.now();
    const action = 'edge-identity';
    const csr = await this.checkCsr(action, csrPem, gatewayId, now);
    if (csr.subject.length !== 1 || csr.commonName !== edgeDeviceId) throw await this.refuse(action, 'policy_violation', `the IoT Edge device identity CSR subject must be CN=${edgeDeviceId}`, gatewayId, now);
    if (csr.sans.dns.length || csr.sans.ip.length) throw await this.refuse(action, 'policy_violation', 'the IoT Edge device identity carries no SANs', gatewayId, now);
    const issued = await this.deps.ca.issue('infra', {
      subjectDer: pkix.encodeName(edgeDeviceId),
      spkiDer: csr.spkiDer,
      profile: { kind: 'device', keyType: csr.key.keyType },
      notBefore: new Date(now - BACKDATE_MS),
      notAfter: new Date(now + this.deps.certDays * 86_400_000),
    });
    await this.deps.store.recordGatewayEnrollment(
      gatewayId,
      {
        serial: issued.serial, subjectId: gatewayId, kind: 'edge-identity', issuer: issued.issuer, fingerprint: issued.fingerprint256, notBefore: issued.notBefore.getTime(),
        notAfter: issued.notAfter.getTime(), status: 'active', requestId: null, pem: issued.pem, revokedAt: null, revocationReason: null, createdAt: now,
      },
      { at: now, action, outcome: 'ok', gatewayId, serial: issued.serial, detail: { edgeDeviceId } },
      { updateGatewayCert: false },
    );
    return { certificate: issued.pem, chain: issued.chain, notAfter: issued.notAfter.toISOString() };
  }

  /**
   * Signs the gateway's intermediate CA (its key never leaves the gateway) under the edge
   * issuer, never the root: CA:TRUE pathLen 0, keyCertSign, extKeyUsage serverAuth +
   * clientAuth, and name constraints that permit exactly the gateway's names (those of its
   * current certificate, plus the configured extra subtrees) and exclude every other DNS
   * name and IP address. IoT Edge uses it as its edge CA to sign edgeHub and workload
   * certificates locally; nothing it signs passes as a gateway, the authority or a device.
   */
  async signSubCa(gatewayId: string, csrPem: string): Promise<{ certificate: string; chain: string[]; notAfter: string }> {
    const now = this.now();
    const checked = await this.checkSubCa(gatewayId, csrPem, now);
    return this.issueSubCa(gatewayId, checked, now);
  }

  /**
   * signSubCa for a gateway that authenticates with its one-time enrollment token instead of
   * its certificate (EST with HTTP Basic): the token must be the gateway's, and it is spent
   * only once the CSR passed every check, as in `enroll`.
   */
  async signSubCaWithToken(gatewayId: string, token: string, csrPem: string): Promise<{ certificate: string; chain: string[]; notAfter: string }> {
    const now = this.now();
    const checked = await this.checkSubCa(gatewayId, csrPem, now);
    const tokenHash = hashToken(token);
    if ((await this.deps.store.peekEnrollmentToken(tokenHash, now)) !== gatewayId || (await this.deps.store.consumeEnrollmentToken(tokenHash, now)) !== gatewayId) {
      throw await this.refuse('subca-gateway', 'invalid_token', 'enrollment token is unknown, used, expired or not this gateway\'s', gatewayId, now);
    }
    return this.issueSubCa(gatewayId, checked, now);
  }

  private async checkSubCa(gatewayId: string, csrPem: string, now: number): Promise<{ csr: pkix.ParsedCsr; expectedCn: string; nameConstraints: { dns: string[]; ip: string[] } }> {
    const csr = await this.checkCsr('subca-gateway', csrPem, gatewayId, now);
    const expectedCn = `${gatewayId} Edge CA`;
    if (csr.subject.length !== 1 || csr.commonName !== expectedCn) throw await this.refuse('subca-gateway', 'policy_violation', `Sub-CA CSR subject must be CN=${expectedCn}`, gatewayId, now);
    if (csr.sans.dns.length || csr.sans.ip.length) throw await this.refuse('subca-gateway', 'policy_violation', 'a Sub-CA CSR carries no SANs', gatewayId, now);
    const gateway = await this.deps.store.getGateway(gatewayId);
    const current = gateway?.certSerial ? await this.deps.store.getCertificate(gateway.certSerial) : null;
    if (!current) throw await this.refuse('subca-gateway', 'policy_violation', 'the gateway has no current certificate', gatewayId, now);
    const own = namesOf(current.pem);
    const extra = this.deps.subCa.permittedDns.map((d) => d.replaceAll('{gatewayId}', gatewayId));
    return { csr, expectedCn, nameConstraints: { dns: [...new Set([...own.dns, ...extra])], ip: [...new Set(own.ip)] } };
  }

  private async issueSubCa(gatewayId: string, { csr, expectedCn, nameConstraints }: { csr: pkix.ParsedCsr; expectedCn: string; nameConstraints: { dns: string[]; ip: string[] } }, now: number): Promise<{ certificate: string; chain: string[]; notAfter: string }> {
    const issued = await this.deps.ca.issue('edge', {
      // Built from the checked CN and the parser's canonical key, never the request's bytes.
      subjectDer: pkix.encodeName(expectedCn),
      spkiDer: csr.spkiDer,
      profile: { kind: 'intermediate', pathLen: 0, nameConstraints, eku: ['serverAuth', 'clientAuth'] },
      notBefore: new Date(now - BACKDATE_MS),
      notAfter: new Date(now + this.deps.subCa.validityDays * 86_400_000),
    });
    await this.deps.store.recordGatewayEnrollment(
      gatewayId,
      {
        serial: issued.serial, subjectId: gatewayId, kind: 'subca', issuer: issued.issuer, fingerprint: issued.fingerprint256, notBefore: issued.notBefore.getTime(), notAfter: issued.notAfter.getTime(),
        status: 'active', requestId: null, pem: issued.pem, revokedAt: null, revocationReason: null, createdAt: now,
      },
      { at: now, action: 'subca-gateway', outcome: 'ok', gatewayId, serial: issued.serial, detail: { nameConstraints } },
      { updateGatewayCert: false },
    );
    return { certificate: issued.pem, chain: issued.chain, notAfter: issued.notAfter.toISOString() };
  }

  private async issueGatewayCert(gatewayId: string, csr: pkix.ParsedCsr, action: string, now: number): Promise<GatewayEnrollmentResult> {
    const k = csr.key;

    const issued = await this.deps.ca.issue('infra', {
      // Built from the checked CN (the gateway id) and the parser's canonical key, never the request's bytes.
      subjectDer: pkix.encodeName(gatewayId),
      spkiDer: csr.spkiDer,
      profile: { kind: 'gateway', keyType: k.keyType },
      sans: { dns: csr.sans.dns, ip: csr.sans.ip },
      notBefore: new Date(now - BACKDATE_MS),
      notAfter: new Date(now + this.deps.certDays * 86_400_000),
    });
    await this.deps.store.recordGatewayEnrollment(
      gatewayId,
      {
        serial: issued.serial, subjectId: gatewayId, kind: 'gateway', issuer: issued.issuer, fingerprint: issued.fingerprint256, notBefore: issued.notBefore.getTime(), notAfter: issued.notAfter.getTime(),
        status: 'active', requestId: null, pem: issued.pem, revokedAt: null, revocationReason: null, createdAt: now,
      },
      { at: now, action, outcome: 'ok', gatewayId, serial: issued.serial },
    );
    return { gatewayId, certificate: issued.pem, chain: issued.chain, bundle: this.deps.ca.bundle(), notAfter: issued.notAfter.toISOString() };
  }
}
