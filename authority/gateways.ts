/**
 * Gateway enrollment: an operator creates a one-time token for a gateway id; the gateway
 * presents it once with a CSR and receives its certificate (clientAuth + serverAuth: it
 * authenticates to the authority and serves TLS to devices). Only the token's SHA-256 is
 * stored, so a copy of the database does not hold usable tokens.
 */
import { createHash, randomBytes } from 'node:crypto';
import { isIPv4, isIPv6 } from 'node:net';
import { LeafgateError, isValidDeviceId, pkix } from '../protocol/index.ts';
import { BACKDATE_MS, type CaConnector } from './ca/index.ts';
import type { AuthorityStore } from './store/index.ts';

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

export class GatewayEnrollment {
  constructor(
    private readonly deps: { store: AuthorityStore; ca: CaConnector; certDays: number; now?: () => number },
  ) {}

  private now(): number {
    return this.deps.now?.() ?? Date.now();
  }

  /** Returns the token to hand to the gateway's operator; valid once, for `ttlSeconds`. */
  async createToken(gatewayId: string, ttlSeconds = 24 * 3600): Promise<string> {
    if (!isValidDeviceId(gatewayId)) throw new LeafgateError('invalid_device_id', 'gateway id is not allowed');
    const token = randomBytes(24).toString('base64url');
    await this.deps.store.createEnrollmentToken(hashToken(token), gatewayId, this.now() + ttlSeconds * 1000);
    return token;
  }

  async enroll(token: string, csrPem: string): Promise<GatewayEnrollmentResult> {
    const now = this.now();
    let csr: pkix.ParsedCsr;
    try {
      csr = pkix.parseCsr(csrPem);
    } catch (err) {
      await this.deps.store.appendAudit({ at: now, action: 'enroll-gateway', outcome: 'refused', code: 'bad_csr', detail: { message: (err as Error).message } });
      throw new LeafgateError('bad_csr', (err as Error).message);
    }
    const refuse = async (code: 'policy_violation' | 'invalid_token', message: string, gatewayId?: string) => {
      await this.deps.store.appendAudit({ at: now, action: 'enroll-gateway', outcome: 'refused', code, gatewayId: gatewayId ?? null, detail: { message } });
      return new LeafgateError(code, message);
    };
    const k = csr.key;
    if (!((k.keyType === 'ec' && (k.keySize === 256 || k.keySize === 384)) || (k.keyType === 'rsa' && k.keySize >= 2048 && k.keySize <= 4096))) {
      throw await refuse('policy_violation', `gateway key ${pkix.keySpecLabel(k)} is not allowed`);
    }
    const sanCount = csr.sans.dns.length + csr.sans.ip.length;
    if (sanCount > MAX_SANS || csr.sans.uri.length || csr.sans.email.length) throw await refuse('policy_violation', 'gateway SANs: at most 16 DNS names and IP addresses');
    if (!csr.sans.dns.every((d) => DNS_NAME.test(d)) || !csr.sans.ip.every((ip) => isIPv4(ip) || isIPv6(ip))) throw await refuse('policy_violation', 'gateway SAN is malformed');

    // The token is consumed only once the CSR is known good, so a typo does not burn it.
    const gatewayId = await this.deps.store.consumeEnrollmentToken(hashToken(token), now);
    if (!gatewayId) throw await refuse('invalid_token', 'enrollment token is unknown, used or expired');
    if (csr.subject.length !== 1 || csr.commonName !== gatewayId) throw await refuse('policy_violation', `CSR subject must be CN=${gatewayId}`, gatewayId);

    const issued = this.deps.ca.issue('infra', {
      subjectDer: csr.subjectDer,
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
      { at: now, action: 'enroll-gateway', outcome: 'ok', gatewayId, serial: issued.serial },
    );
    return { gatewayId, certificate: issued.pem, chain: issued.chain, bundle: this.deps.ca.bundle(), notAfter: issued.notAfter.toISOString() };
  }
}
