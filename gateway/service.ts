/**
 * Starts a gateway: identity from enrollment, the broker with the plugin chain, and the
 * onboarding relay to the authority. The plugin order is the order of checks:
 * authentication -> authorization -> payload-limit.
 */
import { X509Certificate } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import pino, { type Logger } from 'pino';
import { downTopic, parseTopic, LeafgateError, type DownKind } from '../protocol/index.ts';
import { startBroker, type RunningBroker } from '../broker/index.ts';
import { AuthorityClient, OnboardingRelay, identityFiles } from '../cloud-bridge/index.ts';
import { SessionRegistry, authenticationPlugin, authorizationPlugin, composePlugins, payloadLimitPlugin } from '../plugins/index.ts';
import type { GatewayConfig } from './config.ts';

export interface RunningGateway {
  gatewayId: string;
  port: number;
  broker: RunningBroker;
  sessions: SessionRegistry;
  /** PEM of the root that devices must trust to verify the gateway. */
  rootPem: string;
  close(): Promise<void>;
}

export function isEnrolled(dataDir: string): boolean {
  const f = identityFiles(dataDir);
  return [f.key, f.cert, f.root, f.deviceCa, f.meta].every((p) => existsSync(p));
}

export async function startGateway(config: Readonly<GatewayConfig>, opts: { logger?: Logger } = {}): Promise<RunningGateway> {
  const logger = opts.logger ?? pino({ name: 'gateway', level: process.env.LEAFGATE_LOG_LEVEL ?? 'info' });
  if (!isEnrolled(config.dataDir)) throw new LeafgateError('internal', `gateway in ${config.dataDir} is not enrolled: run \`leafgate gateway enroll\` first`);
  const files = identityFiles(config.dataDir);
  const meta = JSON.parse(readFileSync(files.meta, 'utf8')) as { gatewayId: string; authorityUrl: string };
  const key = readFileSync(files.key, 'utf8');
  const cert = readFileSync(files.cert, 'utf8');
  const rootPem = readFileSync(files.root, 'utf8');
  const deviceCaPem = readFileSync(files.deviceCa, 'utf8');
  const deviceCa = new X509Certificate(deviceCaPem);

  const authority = new AuthorityClient({ baseUrl: meta.authorityUrl, ca: rootPem, key, cert });
  const sessions = new SessionRegistry();
  let broker: RunningBroker | undefined;

  const publish = (deviceId: string, kind: DownKind, body: unknown) => {
    broker?.aedes.publish({ cmd: 'publish', topic: downTopic(deviceId, kind), payload: Buffer.from(JSON.stringify(body)), qos: 1, retain: false, dup: false }, (err) => {
      if (err) logger.error({ err, deviceId, kind }, 'publish to device failed');
    });
  };
  const relay = new OnboardingRelay({ authority, publish, logger });

  const hooks = composePlugins(
    [
      authenticationPlugin({ sessions, deviceCa: () => deviceCa, bootstrapTimeoutMs: config.bootstrapTimeoutMs, logger }),
      authorizationPlugin({ sessions }),
      payloadLimitPlugin({ onboardingBytes: config.onboardingPayloadBytes, telemetryBytes: config.telemetryPayloadBytes }),
    ],
    {
      logger,
      onPublishRefused(client, packet, refusal) {
        const session = sessions.get(client);
        logger.info({ deviceId: session?.deviceId, topic: packet.topic.slice(0, 200), code: refusal.code }, refusal.message);
        if (session) publish(session.deviceId, 'error', { code: refusal.code, message: refusal.message, ...(refusal.retryAfterMs !== undefined ? { retryAfterMs: refusal.retryAfterMs } : {}) });
      },
      onPublished(client, packet) {
        const session = sessions.get(client);
        const t = parseTopic(packet.topic);
        if (!session || !t || t.direction !== 'up') return;
        if (t.kind === 'register' || t.kind === 'auth' || t.kind === 'csr') {
          void relay.handle(session, t.kind, Buffer.isBuffer(packet.payload) ? packet.payload : Buffer.from(packet.payload));
        }
      },
    },
  );

  broker = await startBroker({
    host: config.listen.host,
    port: config.listen.port,
    tls: { key, cert, ca: [deviceCaPem, rootPem] },
    hooks,
    logger,
    maxPacketBytes: config.maxPacketBytes,
    handshakeTimeoutMs: config.handshakeTimeoutMs,
    connectTimeoutMs: config.connectTimeoutMs,
    maxConnections: config.maxConnections,
  });
  logger.info({ port: broker.port, gatewayId: meta.gatewayId, authority: meta.authorityUrl }, 'gateway broker listening');

  const running = broker;
  return {
    gatewayId: meta.gatewayId,
    port: running.port,
    broker: running,
    sessions,
    rootPem,
    async close() {
      await running.close();
      authority.close();
    },
  };
}
