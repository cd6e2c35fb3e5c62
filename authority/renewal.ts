/**
 * Renewal: finds device certificates whose window has opened (policy renewAfterFraction of
 * the lifetime, computed from the certificate's own dates) and announces each one to the
 * gateway its device is enrolled through, and to no other (device ids and serials are not
 * everyone's business: DESIGN.md, a gateway acts only for its own devices).
 * Gateways keep the list, so a device that was offline through its window is asked to
 * renew when it comes back, as long as its certificate is still valid.
 */
import { X509Certificate } from 'node:crypto';
import { pkix, type KeySpec } from '../protocol/index.ts';
import type { AuthorityConfig } from './config.ts';
import type { AuthorityEvents, RenewalDue } from './events.ts';
import { buildInstruction, chooseKey, type DevicePolicy } from './policy/index.ts';
import type { AuthorityStore, DueCertificateRow } from './store/index.ts';
import type { ClusterBus } from './cluster.ts';
import type { Logger } from 'pino';

/** The key of the renewed certificate: the current kind if policy still allows it. */
export function renewalKey(policy: DevicePolicy, certPem: string): KeySpec {
  const d = pkix.keyDescription(new X509Certificate(certPem).publicKey);
  return chooseKey(policy, [{ keyType: d.keyType, keySize: d.keySize }]);
}

export class RenewalScheduler {
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly deps: {
      store: AuthorityStore;
      events: AuthorityEvents;
      config: Pick<AuthorityConfig, 'policies' | 'renewalScanSeconds'>;
      now?: () => number;
      /** Other authority nodes on the same database; LocalBus when alone. */
      bus?: ClusterBus;
      logger?: Logger;
    },
  ) {}

  private now(): number {
    return this.deps.now?.() ?? Date.now();
  }

  start(): void {
    // Another node's scan: announce to the gateways connected here (their streams are here).
    this.deps.bus?.onMessage((msg) => {
      if (msg.type === 'renewal-scan') void this.announce().catch((err: Error) => this.deps.logger?.warn({ err: err.message }, 'renewal announcement failed'));
    });
    this.timer = setInterval(() => void this.scan().catch((err: Error) => this.deps.logger?.warn({ err: err.message }, 'renewal scan failed')), this.deps.config.renewalScanSeconds * 1000);
    this.timer.unref();
  }

  /**
   * The periodic scan, once per period for the whole cluster: the node that claims the period
   * announces to its gateways and signals the others to announce to theirs. (Every node's
   * timer fires; the claim in the store lets one of them through.)
   */
  async scan(): Promise<number | null> {
    const every = this.deps.config.renewalScanSeconds * 1000;
    if (!(await this.deps.store.claimJob('renewal-scan', this.now(), every * 0.9))) return null;
    const n = await this.announce();
    await this.deps.bus?.publish({ type: 'renewal-scan' });
    return n;
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  /**
   * Every certificate currently due, across groups, with the gateway of its device; with
   * `gatewayId`, only the devices enrolled through that gateway.
   */
  async due(limit = 10_000, gatewayId?: string): Promise<Array<RenewalDue & { gatewayId: string | null }>> {
    const now = this.now();
    const out: Array<RenewalDue & { gatewayId: string | null }> = [];
    for (const [group, policy] of Object.entries(this.deps.config.policies)) {
      const rows = await this.deps.store.listDueForRenewal(group, policy.renewAfterFraction, now, limit - out.length, gatewayId);
      for (const c of rows) out.push({ ...this.describe(group, policy, c), gatewayId: c.gatewayId });
      if (out.length >= limit) break;
    }
    return out;
  }

  /** The due list of one gateway, as it goes on the wire. */
  async dueFor(gatewayId: string, limit = 10_000): Promise<RenewalDue[]> {
    return (await this.due(limit, gatewayId)).map(({ gatewayId: _g, ...d }) => d);
  }

  private describe(group: string, policy: DevicePolicy, c: DueCertificateRow): RenewalDue {
    const { requestId: _r, csrDeadline: _d, ...instruction } = buildInstruction(policy, {
      requestId: 'renewal', deviceId: c.subjectId, group, key: renewalKey(policy, c.pem), csrDeadline: new Date(this.now()),
    });
    return {
      deviceId: c.subjectId,
      serial: c.serial,
      renewAfter: new Date(c.notBefore + (c.notAfter - c.notBefore) * policy.renewAfterFraction).toISOString(),
      notAfter: new Date(c.notAfter).toISOString(),
      instruction,
    };
  }

  /** Due now, and overdue = less than a tenth of the lifetime left. */
  async counts(): Promise<{ due: number; overdue: number }> {
    const now = this.now();
    const due = await this.due();
    const overdue = due.filter((d) => {
      const end = new Date(d.notAfter).getTime();
      return end - now < (end - new Date(d.renewAfter).getTime()) / 10;
    }).length;
    return { due: due.length, overdue };
  }

  /** Pushes to each connected gateway the due list of its own devices (one event per gateway). */
  async announce(): Promise<number> {
    const all = await this.due();
    const byGateway = new Map<string, RenewalDue[]>();
    for (const { gatewayId, ...d } of all) {
      // A device row without a gateway has no gateway to act for it.
      if (gatewayId === null) continue;
      const list = byGateway.get(gatewayId) ?? [];
      list.push(d);
      byGateway.set(gatewayId, list);
    }
    for (const [gatewayId, devices] of byGateway) this.deps.events.emit('renewal-due', { gatewayId, devices });
    return all.length;
  }
}
