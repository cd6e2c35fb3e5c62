/**
 * The dashboard on its own HTTPS port (`dashboard.listen`): the same routes as under the API's
 * listener, with the authority's TLS certificate, but without asking browsers for a client
 * certificate (the API's listener must, for gateways' mTLS).
 */
import Fastify, { LogController, type FastifyPluginAsync } from 'fastify';
import type { Logger } from 'pino';
import { dashboardPlugin, type DashboardDeps } from './routes.ts';

export async function startDashboardServer(deps: DashboardDeps, opts: { tls: { key: string; cert: string }; listen: { host: string; port: number }; logger: Logger }) {
  const app = Fastify({
    loggerInstance: opts.logger,
    logController: new LogController({ disableRequestLogging: true }),
    https: { key: opts.tls.key, cert: opts.tls.cert, minVersion: 'TLSv1.2' },
    requestTimeout: 30_000,
    connectionTimeout: 30_000,
  });
  app.get('/', async (_req, reply) => reply.redirect('/dashboard', 303));
  await app.register(dashboardPlugin(deps) as unknown as FastifyPluginAsync, { prefix: '/dashboard' });
  await app.listen({ host: opts.listen.host, port: opts.listen.port });
  const address = app.server.address();
  const port = typeof address === 'object' && address ? address.port : opts.listen.port;
  return { app, port };
}
