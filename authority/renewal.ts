/**
 * Renewal: finds device certificates whose window has opened (policy renewAfterFraction of
 * the lifetime, computed from the certificate's own dates) and announces them to gateways.
 * Gateways keep the list, so a device that was offline through its window is asked to
 * renew when it comes back, as long as its certificate is still valid.
 */
import { X509Certificate } from 'node:crypto';
import { pkix, type KeySpec } from '../protocol/index.ts';
import type { AuthorityConfig } from './config.ts';
import type { AuthorityEvents, RenewalDue } from './events.ts';
import { buildInstruction, chooseKey, type DevicePolicy } from './policy/index.ts';
import type { AuthorityStore, CertificateRow } from './store/index.ts';
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

  /** Every certificate currently due, across groups. */
  async due(limit = 10_000): Promise<RenewalDue[]> {
    const now = this.now();
    const out: RenewalDue[] = [];
    for (const [group, policy] of Object.entries(this.deps.config.policies)) {
      const rows = await this.deps.store.listDueForRenewal(group, policy.renewAfterFraction, now, limit - out.length);
      for (const c of rows) out.push(this.describe(group, policy, c));
      if (out.length >= limit) break;
    }
    return out;
  }

  private describe(group: string, policy: DevicePolicy, c: CertificateRow): RenewalDue {
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

  /** Pushes the due list to every connected gateway. */
  async announce(): Promise<number> {
    const devices = await this.due();
    if (devices.length) this.deps.events.emit('renewal-due', { devices });
    return devices.length;
  }
}
