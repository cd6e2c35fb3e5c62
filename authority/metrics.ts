/** Prometheus metrics of one authority (own registry), served at GET /metrics. */
import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';

export class AuthorityMetrics {
  readonly registry = new Registry();
  readonly requests: Counter<'action' | 'outcome'>;
  readonly renewals: Counter<'outcome'>;
  readonly revocations: Counter<'reason'>;
  readonly renewalsDue: Gauge<'state'>;
  readonly crlNumber: Gauge;
  readonly syncPending: Gauge<'target'>;
  readonly syncFailed: Gauge<'target'>;
  readonly syncLastSuccess: Gauge<'target'>;
  readonly syncThrottled: Counter<'target'>;
  readonly caExpiry: Gauge<'ca'>;

  constructor(collect: {
    renewals(): Promise<{ due: number; overdue: number }>;
    crlNumber(): number;
    /** Cloud registry sync per configured target (hub, dps): unsynced rows and the last success (ms). */
    sync?(): Promise<Array<{ target: string; pending: number; failed: number; lastSuccessAt: number | null }>>;
    caExpiry?(): Array<{ ca: string; notAfter: Date }>;
  }) {
    const registers = [this.registry];
    this.requests = new Counter({ name: 'leafgate_authority_requests_total', help: 'Device requests by action (register, auth, csr, renew) and outcome (ok or error code)', labelNames: ['action', 'outcome'], registers });
    this.renewals = new Counter({ name: 'leafgate_authority_renewals_total', help: 'Renewals by outcome (renewed, failed)', labelNames: ['outcome'], registers });
    this.revocations = new Counter({ name: 'leafgate_authority_revocations_total', help: 'Certificates revoked, by reason', labelNames: ['reason'], registers });
    this.renewalsDue = new Gauge({
      name: 'leafgate_authority_renewals_due', help: 'Device certificates in their renewal window (due) and with less than a tenth of their life left (overdue)', labelNames: ['state'], registers,
      async collect() {
        const c = await collect.renewals();
        this.set({ state: 'due' }, c.due);
        this.set({ state: 'overdue' }, c.overdue);
      },
    });
    this.crlNumber = new Gauge({ name: 'leafgate_authority_crl_number', help: 'Number of the current device CRL', registers, collect() { this.set(collect.crlNumber()); } });
    // One collect for the three sync gauges (one query per target), run by the first of them.
    let syncRead: Promise<Array<{ target: string; pending: number; failed: number; lastSuccessAt: number | null }>> | null = null;
    const syncRows = () => (syncRead ??= (collect.sync?.() ?? Promise.resolve([])).finally(() => setImmediate(() => (syncRead = null))));
    this.syncPending = new Gauge({
      name: 'leafgate_authority_registry_sync_pending', help: 'Device certificates not yet synced to a cloud registry (target: hub, dps), including those backing off', labelNames: ['target'], registers,
      async collect() {
        for (const r of await syncRows()) this.set({ target: r.target }, r.pending);
      },
    });
    this.syncFailed = new Gauge({
      name: 'leafgate_authority_registry_sync_failed', help: 'Device certificates parked after too many failed sync attempts (leafgate authority devices --status sync-failed)', labelNames: ['target'], registers,
      async collect() {
        for (const r of await syncRows()) this.set({ target: r.target }, r.failed);
      },
    });
    this.syncLastSuccess = new Gauge({
      name: 'leafgate_authority_registry_sync_last_success_timestamp_seconds', help: 'Unix time of the last device synced to a cloud registry by this node', labelNames: ['target'], registers,
      async collect() {
        for (const r of await syncRows()) if (r.lastSuccessAt !== null) this.set({ target: r.target }, r.lastSuccessAt / 1000);
      },
    });
    this.syncThrottled = new Counter({ name: 'leafgate_authority_registry_throttled_total', help: 'Responses 429 (throttled) from a cloud registry', labelNames: ['target'], registers });
    this.caExpiry = new Gauge({
      name: 'leafgate_authority_ca_expiry_timestamp_seconds', help: 'notAfter (unix time, seconds) of each CA certificate (root, device-ca, infra-ca, edge-issuer)', labelNames: ['ca'], registers,
      collect() {
        for (const { ca, notAfter } of collect.caExpiry?.() ?? []) this.set({ ca }, notAfter.getTime() / 1000);
      },
    });
    // Standard names (process_cpu_seconds_total, nodejs_*): what stock dashboards query.
    collectDefaultMetrics({ register: this.registry });
  }
}
