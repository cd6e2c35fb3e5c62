/**
 * Gateway enrollment: an operator creates a one-time token for a gateway id; the gateway
 * presents it once with a CSR and receives its certificate (clientAuth + serverAuth: it
 * authenticates to the authority and serves TLS to devices). Only the token's SHA-256 is
 * stored, so a copy of the database does not hold usable tokens.
 */
import { createHash } from 'node:crypto';
import { isIPv4, isIPv6 } from 'node:net';
import { LeafgateError, isValidDeviceId, pkix } from '../protocol/index.ts';
import { BACKDATE_MS, type CaConnector } from './ca/index.ts';
import type { AuthorityStore } from './store/index.ts';
import { newSecret } from './secret.ts';

export interface GatewayEnrollmentResult {
  gatewayId: string;
  certificate: string;
  chain: string[];
  /** Trust bundle for the gateway: root, device CA (for device client certs), infra CA. */
  bundle: { root: string; deviceCa: string; infraCa: string };
  notAfter: string;
}

const hashToken = (token: string) => createHash('sha256').update(`leafgate-gateway-token\n${token}`).digest('hex');
const MAX_SANS = 16;
const DNS_NAME = /^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;

export interface SubCaPolicy {
  validityDays: number;
  /** dNSName permitted subtrees (RFC 5280 4.2.1.10); `{gatewayId}` is replaced. Empty: no constraint. */
  permittedDns: string[];
}

export class GatewayEnrollment {
  constructor(
    private readonly deps: { store: AuthorityStore; ca: CaConnector; certDays: number; subCa: SubCaPolicy; now?: () => number },
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

  async enroll(token: string, csrPem: string): Promise<GatewayEnrollmentResult> {
    const now = this.now();
    const csr = await this.checkCsr('enroll-gateway', csrPem, null, now);
    // The token is consumed only once the CSR is known good, so a typo does not burn it.
    const gatewayId = await this.deps.store.consumeEnrollmentToken(hashToken(token), now);
    if (!gatewayId) throw await this.refuse('enroll-gateway', 'invalid_token', 'enrollment token is unknown, used or expired', null, now);
    if (csr.subject.length !== 1 || csr.commonName !== gatewayId) throw await this.refuse('enroll-gateway', 'policy_violation', `CSR subject must be CN=${gatewayId}`, gatewayId, now);
    return this.issueGatewayCert(gatewayId, csr, 'enroll-gateway', now);
  }

  /** A new certificate for a gateway that authenticated with its current one (mTLS). */
  async renew(gatewayId: string, csrPem: string): Promise<GatewayEnrollmentResult> {
    const now = this.now();
    const csr = await this.checkCsr('renew-gateway', csrPem, gatewayId, now);
    if (csr.subject.length !== 1 || csr.commonName !== gatewayId) throw await this.refuse('renew-gateway', 'policy_violation', `CSR subject must be CN=${gatewayId}`, gatewayId, now);
    return this.issueGatewayCert(gatewayId, csr, 'renew-gateway', now);
  }

  /**
   * Signs the gateway's intermediate CA (its key never leaves the gateway): CA:TRUE with
   * pathLen 0 under the root, keyCertSign, name constraints from policy. IoT Edge uses it
   * as its edge CA to sign edgeHub and workload certificates locally.
   */
  async signSubCa(gatewayId: string, csrPem: string): Promise<{ certificate: string; chain: string[]; notAfter: string }> {
    const now = this.now();
    const csr = await this.checkCsr('subca-gateway', csrPem, gatewayId, now);
    const expectedCn = `${gatewayId} Edge CA`;
    if (csr.subject.length !== 1 || csr.commonName !== expectedCn) throw await this.refuse('subca-gateway', 'policy_violation', `Sub-CA CSR subject must be CN=${expectedCn}`, gatewayId, now);
    if (csr.sans.dns.length || csr.sans.ip.length) throw await this.refuse('subca-gateway', 'policy_violation', 'a Sub-CA CSR carries no SANs', gatewayId, now);
    const permittedDns = this.deps.subCa.permittedDns.map((d) => d.replaceAll('{gatewayId}', gatewayId));
    const issued = this.deps.ca.issue('root', {
      // Built from the checked CN and the parser's canonical key, never the request's bytes.
      subjectDer: pkix.encodeName(expectedCn),
      spkiDer: csr.spkiDer,
      profile: { kind: 'intermediate', pathLen: 0, permittedDns },
      notBefore: new Date(now - BACKDATE_MS),
      notAfter: new Date(now + this.deps.subCa.validityDays * 86_400_000),
    });
    await this.deps.store.recordGatewayEnrollment(
      gatewayId,
      {
        serial: issued.serial, subjectId: gatewayId, kind: 'subca', fingerprint: issued.fingerprint256, notBefore: issued.notBefore.getTime(), notAfter: issued.notAfter.getTime(),
        status: 'active', requestId: null, pem: issued.pem, revokedAt: null, revocationReason: null, createdAt: now,
      },
      { at: now, action: 'subca-gateway', outcome: 'ok', gatewayId, serial: issued.serial, detail: { permittedDns } },
      { updateGatewayCert: false },
    );
    return { certificate: issued.pem, chain: issued.chain, notAfter: issued.notAfter.toISOString() };
  }

  private async issueGatewayCert(gatewayId: string, csr: pkix.ParsedCsr, action: string, now: number): Promise<GatewayEnrollmentResult> {
    const k = csr.key;

    const issued = this.deps.ca.issue('infra', {
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
        serial: issued.serial, subjectId: gatewayId, kind: 'gateway', fingerprint: issued.fingerprint256, notBefore: issued.notBefore.getTime(), notAfter: issued.notAfter.getTime(),
        status: 'active', requestId: null, pem: issued.pem, revokedAt: null, revocationReason: null, createdAt: now,
      },
      { at: now, action, outcome: 'ok', gatewayId, serial: issued.serial },
    );
    return { gatewayId, certificate: issued.pem, chain: issued.chain, bundle: this.deps.ca.bundle(), notAfter: issued.notAfter.toISOString() };
  }
}
