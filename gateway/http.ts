/** The gateway's operations endpoint: /metrics (Prometheus), /healthz (alive), /readyz. */
import Fastify, { LogController } from 'fastify';
import type { Logger } from 'pino';
import type { GatewayMetrics } from './metrics.ts';

export interface Readiness {
  ready: boolean;
  checks: Record<string, boolean>;
}

export async function startOpsServer(opts: { host: string; port: number; metrics: GatewayMetrics; readiness: () => Readiness; logger: Logger }) {
  // Scrapes and probes every few seconds are not an operator's reading: no per-request lines.
  const app = Fastify({ loggerInstance: opts.logger.child({ component: 'ops-http' }), logController: new LogController({ disableRequestLogging: true }) });
  app.get('/healthz', async () => ({ status: 'ok' }));
  app.get('/readyz', async (_req, reply) => {
    const r = opts.readiness();
    return reply.status(r.ready ? 200 : 503).send({ status: r.ready ? 'ready' : 'not_ready', checks: r.checks });
  });
  app.get('/metrics', async (_req, reply) => {
    void reply.header('content-type', opts.metrics.registry.contentType);
    return opts.metrics.registry.metrics();
  });
  await app.listen({ host: opts.host, port: opts.port });
  const address = app.server.address();
  return { app, port: typeof address === 'object' && address ? address.port : opts.port };
}
