/** Prometheus metrics of one gateway (its own registry: no global state between instances). */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

export class GatewayMetrics {
  readonly registry = new Registry();
  readonly connections: Gauge<'kind'>;
  readonly onboardingSteps: Counter<'step' | 'outcome'>;
  readonly onboardings: Counter<'outcome'>;
  readonly refused: Counter<'reason'>;
  readonly rateLimited: Counter<'limit'>;
  readonly onboardingSeconds: Histogram;
  readonly crlNumber: Gauge;
  readonly crlNextUpdate: Gauge;
  readonly certExpiry: Gauge<'certificate'>;
  readonly authorityLink: Gauge;
  readonly revokedSessionsClosed: Counter;
  readonly crlStale: Gauge;
  readonly externalCrlStale: Gauge;
  readonly externalCrlNumber: Gauge;
  readonly clusterLink: Gauge;
  readonly clockSkewSeconds: Gauge;
  readonly renewals: Counter<'outcome'>;
  readonly renewalsDue: Gauge<'state'>;
  readonly authorityInFlight: Gauge;
  readonly authorityQueued: Gauge;
  readonly outboxQueued: Gauge;
  readonly outboxOldestAge: Gauge;
  readonly outboxWritable: Gauge;

  constructor(collect: {
    connections(kind: 'bootstrap' | 'operational'): number;
    renewals(): { due: number; overdue: number };
    gate(): { active: number; queued: number };
    /** The durable outbox's backlog (requests waiting for the authority). */
    outbox?(): Promise<{ count: number; oldestCreatedAt: number | null; writable: boolean }>;
    /** Local clock minus the authority's, from its last answer (undefined: no answer yet). */
    clockSkewMs?(): number | undefined;
  }) {
    const registers = [this.registry];
    this.connections = new Gauge({
      name: 'leafgate_gateway_connections', help: 'Connected MQTT clients by kind', labelNames: ['kind'], registers,
      collect() {
        this.set({ kind: 'bootstrap' }, collect.connections('bootstrap'));
        this.set({ kind: 'operational' }, collect.connections('operational'));
      },
    });
    this.onboardingSteps = new Counter({ name: 'leafgate_gateway_onboarding_steps_total', help: 'Onboarding messages relayed, by step and outcome (ok or error code)', labelNames: ['step', 'outcome'], registers });
    this.onboardings = new Counter({ name: 'leafgate_gateway_onboardings_total', help: 'Onboardings finished, by outcome (issued or error code of the CSR step)', labelNames: ['outcome'], registers });
    this.refused = new Counter({ name: 'leafgate_gateway_refused_total', help: 'Refused connects, publishes and subscriptions, by reason', labelNames: ['reason'], registers });
    this.rateLimited = new Counter({ name: 'leafgate_gateway_rate_limited_total', help: 'Rate-limited events, by limit', labelNames: ['limit'], registers });
    this.onboardingSeconds = new Histogram({
      name: 'leafgate_gateway_onboarding_duration_seconds', help: 'From register to certificate delivered, per device', registers,
      buckets: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    });
    this.crlNumber = new Gauge({ name: 'leafgate_gateway_crl_number', help: 'Number of the CRL in force', registers });
    this.crlNextUpdate = new Gauge({ name: 'leafgate_gateway_crl_next_update_timestamp_seconds', help: 'nextUpdate of the CRL in force (unix time, seconds)', registers });
    this.certExpiry = new Gauge({
      name: 'leafgate_gateway_certificate_expiry_timestamp_seconds', help: 'notAfter (unix time, seconds) of the gateway certificate (gateway), its IoT Edge CA (edge_ca) and the device CA it trusts (device_ca)',
      labelNames: ['certificate'], registers,
    });
    this.authorityLink = new Gauge({ name: 'leafgate_gateway_authority_link_up', help: '1 while the event stream to the authority is open', registers });
    this.revokedSessionsClosed = new Counter({ name: 'leafgate_gateway_revoked_sessions_closed_total', help: 'Live sessions closed because their certificate was revoked', registers });
    this.clusterLink = new Gauge({ name: 'leafgate_gateway_cluster_link', help: '1 while the Redis cluster link is up (only on a gateway cluster)', registers });
    this.crlStale = new Gauge({ name: 'leafgate_gateway_crl_stale', help: '1 while the CRL in force is past its nextUpdate', registers });
    // The external device CA's revocations (EST, authority/revocation.ts): a list of their own.
    this.externalCrlStale = new Gauge({ name: 'leafgate_gateway_external_crl_stale', help: '1 while the external-devices revocation list in force (EST) is past its nextUpdate', registers });
    this.externalCrlNumber = new Gauge({ name: 'leafgate_gateway_external_crl_number', help: 'Number of the external-devices revocation list in force (EST)', registers });
    this.clockSkewSeconds = new Gauge({
      name: 'leafgate_gateway_clock_skew_seconds', help: 'Local clock minus the authority clock (from the Date header of its last answer)', registers,
      collect() {
        const skew = collect.clockSkewMs?.();
        if (skew !== undefined) this.set(skew / 1000);
      },
    });
    this.renewals = new Counter({ name: 'leafgate_gateway_renewals_total', help: 'Device renewals by outcome (asked, renewed, failed)', labelNames: ['outcome'], registers });
    this.renewalsDue = new Gauge({
      name: 'leafgate_gateway_renewals_due', help: 'Certificates announced as due (due) and those with less than a tenth of their life left (overdue)', labelNames: ['state'], registers,
      collect() {
        const s = collect.renewals();
        this.set({ state: 'due' }, s.due);
        this.set({ state: 'overdue' }, s.overdue);
      },
    });
    this.authorityInFlight = new Gauge({ name: 'leafgate_gateway_authority_inflight', help: 'Requests in flight to the authority', registers, collect() { this.set(collect.gate().active); } });
    this.authorityQueued = new Gauge({ name: 'leafgate_gateway_authority_queued', help: 'Requests waiting for an authority slot', registers, collect() { this.set(collect.gate().queued); } });
    // One read of the store per scrape, shared by the three outbox gauges.
    let outboxRead: Promise<{ count: number; oldestCreatedAt: number | null; writable: boolean } | null> | undefined;
    const readOutbox = () => {
      outboxRead ??= (collect.outbox?.() ?? Promise.resolve(null)).catch(() => null).finally(() => setImmediate(() => (outboxRead = undefined)));
      return outboxRead;
    };
    this.outboxQueued = new Gauge({
      name: 'leafgate_gateway_outbox_queued', help: 'CSRs stored in the durable outbox and not yet answered by the authority', registers,
      async collect() {
        const o = await readOutbox();
        if (o) this.set(o.count);
      },
    });
    this.outboxOldestAge = new Gauge({
      name: 'leafgate_gateway_outbox_oldest_age_seconds', help: 'Age of the oldest CSR waiting in the outbox (0 when none)', registers,
      async collect() {
        const o = await readOutbox();
        if (o) this.set(o.oldestCreatedAt === null ? 0 : Math.max(0, (Date.now() - o.oldestCreatedAt) / 1000));
      },
    });
    this.outboxWritable = new Gauge({
      name: 'leafgate_gateway_outbox_writable', help: '1 while the outbox can store new CSRs (0: disk full, read-only or failing; devices get gateway_unavailable)', registers,
      async collect() {
        const o = await readOutbox();
        this.set(o?.writable ? 1 : 0);
      },
    });
    // Standard names (process_cpu_seconds_total, nodejs_*): what stock dashboards query.
    collectDefaultMetrics({ register: this.registry });
  }
}
