/**
 * The gateway's embedded broker: aedes 1.x behind a TLS server. Devices may connect with
 * or without a client certificate (bootstrap sessions have none), so TLS requests one but
 * does not reject; the authentication plugin decides at CONNECT.
 */
import { Aedes, type AedesOptions, type Client } from 'aedes';
import { constants } from 'node:crypto';
import { once } from 'node:events';
import tls from 'node:tls';
import type { Logger } from 'pino';
import { answerRepeatedFilters, installPacketGate, prepareRepeatedFilters, protocolViolation, type PacketGate } from './packet-gate.ts';

export { assertPacketGateFits, protocolViolation, type GatePacket, type PacketGate } from './packet-gate.ts';

export interface BrokerTls {
  key: string;
  /** Server certificate followed by its chain. */
  cert: string;
  /** Anchors for client certificates (device CA + root). */
  ca: string[];
}

export interface BrokerOptions {
  host?: string;
  port: number;
  tls: BrokerTls;
  hooks: Partial<AedesOptions>;
  logger: Logger;
  /** Hard cap on one MQTT packet; a bigger one closes the connection before it is buffered. */
  maxPacketBytes?: number;
  /** A client that has not finished the TLS handshake by then is cut. */
  handshakeTimeoutMs?: number;
  /** Time between TCP accept and CONNECT. */
  connectTimeoutMs?: number;
  maxConnections?: number;
  /** listen(2) backlog. */
  backlog?: number;
  /** Raw TCP admission, before any TLS work (e.g. per-address rate limit). */
  acceptConnection?: (remoteAddress: string) => boolean | Promise<boolean>;
  /**
   * Per-packet budgets (every packet type but PUBLISH, whose budget is a publish hook):
   * false drops the packet before aedes handles it. Runs after the conformance checks.
   */
  packetBudget?: PacketGate;
  /** aedes: packets queued per client before its CONNECT is processed. */
  queueLimit?: number;
  /** aedes: inbound QoS 2 messages awaiting PUBREL per client. */
  maxInflightInbound?: number;
  /** A gateway cluster: shared persistence and message bus (Redis), and this node's id. */
  cluster?: { persistence: unknown; mq: unknown; id: string };
  /**
   * TLS session tickets (resumption). Off by default: issuing them grows every connection's
   * outgoing TLS buffer by 16 kB for its whole life (the tickets carry the client
   * certificate), and the device SDK never resumes.
   */
  sessionTickets?: boolean;
}

export interface RunningBroker {
  aedes: Aedes;
  server: tls.Server;
  port: number;
  /** Replaces certificate/key/CA for new handshakes; live connections stay up. */
  setTls(t: BrokerTls): void;
  close(): Promise<void>;
}

/** Modern suites only (TLS 1.3 suites are always on in Node); forward secrecy, AEAD. */
export const TLS_CIPHERS = [
  'ECDHE-ECDSA-AES128-GCM-SHA256',
  'ECDHE-RSA-AES128-GCM-SHA256',
  'ECDHE-ECDSA-AES256-GCM-SHA384',
  'ECDHE-RSA-AES256-GCM-SHA384',
  'ECDHE-ECDSA-CHACHA20-POLY1305',
  'ECDHE-RSA-CHACHA20-POLY1305',
].join(':');

function secureContextOptions(t: BrokerTls, sessionTickets: boolean): tls.SecureContextOptions {
  return {
    key: t.key, cert: t.cert, ca: t.ca, minVersion: 'TLSv1.2', ciphers: TLS_CIPHERS, honorCipherOrder: true,
    // Without tickets a TLS 1.3 client gets stateful tickets that name no stored session
    // (node keeps no server session cache): a reconnect is a full handshake, as it is today.
    ...(sessionTickets ? {} : { secureOptions: constants.SSL_OP_NO_TICKET }),
  };
}

/**
 * The broker listener's TLS settings. One listener serves both phases: bootstrap clients
 * send no certificate, operational ones do; the certificate is requested but judged by the
 * authentication plugin (chain, CN, revocation), not by OpenSSL's accept/reject, so that a
 * refused device gets an MQTT answer it can log instead of a bare handshake alert.
 * Exported for the benchmarks' bare node TLS reference, which must match it exactly.
 */
export function brokerTlsServerOptions(t: BrokerTls, o: { sessionTickets?: boolean; handshakeTimeoutMs?: number } = {}): tls.TlsOptions {
  return {
    ...secureContextOptions(t, o.sessionTickets ?? false),
    requestCert: true,
    rejectUnauthorized: false,
    handshakeTimeout: o.handshakeTimeoutMs ?? 10_000,
  };
}

const kMaxPacket = Symbol('leafgate.maxPacketBytes');
const kCapped = Symbol('leafgate.packetCap');

interface PacketParser {
  _parseLength(): boolean;
  packet: { length: number };
  _list?: { length: number; constructor: { BufferList?: new () => unknown } };
  emit(e: string, err: Error): boolean;
  [kMaxPacket]?: number;
}

/**
 * mqtt-packet's parser, fitted once per connection through private fields -- kept here
 * alone:
 * - it buffers a whole packet before aedes sees it, and has no size limit: its length step
 *   is wrapped (once, on the prototype; the cap is a field of each parser) so an oversized
 *   declared length fails the parse, and the connection, before the body is read;
 * - its buffer is a `bl` BufferListStream, a full Duplex stream (~0.7 kB of stream state)
 *   of which it uses only the list methods: a plain BufferList from the same module does.
 */
function fitParser(client: Client, max: number): void {
  const parser = (client as unknown as { _parser?: PacketParser })._parser;
  if (!parser || typeof parser._parseLength !== 'function') return;
  const proto = Object.getPrototypeOf(parser) as PacketParser & { [kCapped]?: true };
  if (!Object.hasOwn(proto, kCapped)) {
    const original = proto._parseLength;
    proto._parseLength = function (this: PacketParser) {
      const done = original.call(this);
      const cap = this[kMaxPacket];
      if (done && cap !== undefined && this.packet.length > cap) {
        this.emit('error', new Error(`packet of ${this.packet.length} bytes exceeds ${cap}`));
        return false;
      }
      return done;
    };
    proto[kCapped] = true;
  }
  parser[kMaxPacket] = max;
  const List = parser._list?.constructor.BufferList;
  if (parser._list && parser._list.length === 0 && typeof List === 'function') parser._list = new List() as PacketParser['_list'];
}

export async function startBroker(opts: BrokerOptions): Promise<RunningBroker> {
  const aedes = await Aedes.createBroker({
    ...opts.hooks,
    ...(opts.cluster ? { persistence: opts.cluster.persistence as AedesOptions['persistence'], mq: opts.cluster.mq as AedesOptions['mq'], id: opts.cluster.id } : { id: undefined }),
    connectTimeout: opts.connectTimeoutMs ?? 10_000,
    // Device ids are up to 128 characters; aedes applies this only to MQTT 3.1 clients.
    maxClientsIdLength: 128,
    queueLimit: opts.queueLimit ?? 42,
    maxInflightInbound: opts.maxInflightInbound ?? 16,
    // A subscriber that stops reading is dropped instead of stalling delivery to others.
    drainTimeout: 30_000,
  });
  const maxPacket = opts.maxPacketBytes ?? 256 * 1024;
  const sessionTickets = opts.sessionTickets ?? false;
  const server = tls.createServer(brokerTlsServerOptions(opts.tls, { sessionTickets, handshakeTimeoutMs: opts.handshakeTimeoutMs }));
  if (opts.maxConnections) server.maxConnections = opts.maxConnections;
  if (opts.acceptConnection) {
    const admit = opts.acceptConnection;
    server.on('connection', (socket: import('node:net').Socket) => {
      const verdict = admit(socket.remoteAddress ?? '');
      const apply = (ok: boolean) => {
        if (!ok) {
          opts.logger.info({ remote: socket.remoteAddress }, 'connection refused by admission limit');
          socket.destroy();
        }
      };
      if (typeof verdict === 'boolean') apply(verdict);
      else verdict.then(apply, (err) => {
        // Admission store unavailable: admit rather than lock the site out.
        opts.logger.warn({ err: (err as Error).message }, 'admission check failed; admitting');
      });
    });
  }
  const budget = opts.packetBudget;
  const gate: PacketGate = (client, packet) => {
    // A cut connection's parser still emits the rest of the chunk it was given: those
    // packets are dropped without a word (else one cut flooder writes thousands of log lines).
    if (client.conn.destroyed) return false;
    const violation = protocolViolation(packet);
    if (violation !== null) {
      // One line per connection at most: the connection ends here.
      opts.logger.info({ clientId: client.id, remote: (client.conn as { remoteAddress?: string } | undefined)?.remoteAddress, reason: violation }, 'protocol violation; connection closed');
      client.conn.destroy();
      return false;
    }
    if (budget !== undefined && !budget(client, packet)) return false;
    if (packet.cmd === 'subscribe') prepareRepeatedFilters(packet);
    return true;
  };
  answerRepeatedFilters(aedes);
  server.on('secureConnection', (socket) => {
    // MQTT is request/answer with small packets: Nagle + delayed ACK would add ~40 ms per hop.
    socket.setNoDelay(true);
    const client = aedes.handle(socket);
    fitParser(client, maxPacket);
    installPacketGate(client, gate);
  });
  server.on('tlsClientError', (err, socket) => {
    opts.logger.debug({ err: err.message, remote: socket.remoteAddress }, 'TLS handshake failed');
    socket.destroy();
  });
  aedes.on('clientError', (client, err) => {
    opts.logger.debug({ clientId: client.id, err: err.message }, 'client error');
  });
  aedes.on('connectionError', (client, err) => {
    opts.logger.debug({ clientId: client.id, err: err.message }, 'connection error');
  });
  // A site coming back from a power cut connects all at once: a deep accept backlog turns
  // that burst into a queue instead of resets (the kernel caps it at net.core.somaxconn).
  server.listen({ port: opts.port, host: opts.host ?? '0.0.0.0', backlog: opts.backlog ?? 4096 });
  await once(server, 'listening');
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : opts.port;
  return {
    aedes,
    server,
    port,
    setTls(t) {
      server.setSecureContext(secureContextOptions(t, sessionTickets));
    },
    async close() {
      // Stop accepting first, then end every client, then wait for the listener to drain.
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      // Bounded: with a shared persistence that went away (Redis down) aedes can wait on it
      // forever while closing clients; the sockets are then cut so the process can stop.
      const aedesClosed = new Promise<void>((resolve) => aedes.close(() => resolve()));
      const timedOut = await Promise.race([aedesClosed.then(() => false), new Promise<boolean>((resolve) => setTimeout(() => resolve(true), 5_000).unref())]);
      if (timedOut) {
        opts.logger.warn('broker did not close its clients within 5 s (persistence unavailable?); cutting their connections');
        for (const c of Object.values((aedes as unknown as { clients: Record<string, { conn?: { destroy?: () => void } }> }).clients)) c.conn?.destroy?.();
      }
      // A shared persistence whose store is gone (Redis down) has nothing left to flush, and
      // its destroy() waits on the bus: bounded, so a gateway can always be stopped.
      const destroyed = (aedes as unknown as { persistence?: { destroy?: () => Promise<void> } }).persistence?.destroy?.()?.catch(() => undefined);
      if (destroyed) await Promise.race([destroyed, new Promise((resolve) => setTimeout(resolve, 2_000).unref())]);
      await closed;
    },
  };
}
