/**
 * Authentication: who is this client? A trusted certificate from the device CA makes it
 * that certificate's device (client id must equal the CN); no certificate makes it a
 * bootstrap session for the id it claims, limited to onboarding topics and to a time limit.
 * Username/password are refused: they are not a credential in leafgate.
 */
import type { Client } from 'aedes';
import type { TLSSocket } from 'node:tls';
import { X509Certificate } from 'node:crypto';
import type { Logger } from 'pino';
import { isValidDeviceId } from '../protocol/index.ts';
import type { SessionRegistry } from './sessions.ts';
import { ConnectRefusal, type BrokerPlugin } from './types.ts';

export interface AuthenticationOptions {
  sessions: SessionRegistry;
  /** The device CA: only certificates it issued are device identities. */
  deviceCa: () => X509Certificate;
  /**
   * The external CA that signs device certificates when the authority uses one (EST): its
   * certificates are device identities too. The authority keeps that CA to device
   * certificates (docs/security.md, "External CA over EST").
   */
  externalDeviceCa?: () => X509Certificate | undefined;
  /** A bootstrap session is closed when onboarding has not finished in this time. */
  bootstrapTimeoutMs: number;
  /** Serial (upper-case hex) -> revoked? Filled from the authority's CRL. */
  isRevoked?: (serial: string) => boolean;
  /**
   * False when certificate logins must be refused (stale CRL under the `refuse` policy);
   * `external`: the certificate is the external device CA's (its revocation list must be usable too).
   */
  revocationUsable?: (external: boolean) => boolean;
  /** Keepalive must be 1..this many seconds: 0 (off) would keep dead sessions forever. */
  keepaliveMaxSeconds?: number;
  /**
   * A gateway cluster: how the id is held on another gateway, if it is. The rules that hold
   * on one gateway (a bootstrap claim never takes over a certified device, another
   * certificate never takes over an id) then hold across the site.
   */
  remoteHolder?: (deviceId: string) => Promise<{ kind: 'bootstrap' | 'operational'; certFingerprint?: string } | undefined>;
  logger: Logger;
}

/** A distinguished name as node's plain certificate objects give it, comparable as a string. */
const nameKey = (name: unknown): string => JSON.stringify(name ?? null);

export function authenticationPlugin(opts: AuthenticationOptions): BrokerPlugin {
  const timers = new WeakMap<Client, NodeJS.Timeout>();
  // The device CA's subject in the same form as a peer certificate's issuer (recomputed
  // only when deviceCa() hands out another certificate).
  let caName: { ca: X509Certificate; key: string } | undefined;
  const deviceCaName = (): string => {
    const ca = opts.deviceCa();
    if (caName?.ca !== ca) caName = { ca, key: nameKey(ca.toLegacyObject().subject) };
    return caName.key;
  };
  let externalName: { ca: X509Certificate | undefined; key: string | undefined } = { ca: undefined, key: undefined };
  const externalCaName = (): string | undefined => {
    const ca = opts.externalDeviceCa?.();
    if (externalName.ca !== ca) externalName = { ca, key: ca ? nameKey(ca.toLegacyObject().subject) : undefined };
    return externalName.key;
  };
  return {
    name: 'authentication',

    authenticate(client, info) {
      // [MQTT-3.1.3-8]: an empty client id is refused with 0x02 whatever cleanSession says.
      if (info.clientId.length === 0) throw new ConnectRefusal(2, 'empty client id');
      if (!isValidDeviceId(info.clientId)) throw new ConnectRefusal(2, 'client id is not a valid device id');
      if (info.username !== undefined || info.password !== undefined) throw new ConnectRefusal(4, 'username/password are not accepted; use a client certificate or bootstrap');
      // MQTT 3.1.1 has no return code for a bad keepalive; 5 (not authorized) is the least misleading.
      const maxKeepalive = opts.keepaliveMaxSeconds ?? 1200;
      if (info.keepalive < 1 || info.keepalive > maxKeepalive) throw new ConnectRefusal(5, `keepalive must be 1..${maxKeepalive} seconds`);
      const deviceId = info.clientId;
      const conn = client.conn as unknown as TLSSocket;
      // The plain view of the peer certificate: getPeerX509Certificate() would copy and
      // re-parse the certificate and the chain the device sent (~0.2 ms per connect, an
      // eighth of the whole handshake); this reads the certificate OpenSSL already verified.
      const peer = typeof conn.getPeerCertificate === 'function' ? conn.getPeerCertificate() : undefined;
      const holder = opts.sessions.holder(deviceId);
      const base = { deviceId, connectedAt: Date.now(), challengeIds: new Set<string>(), authenticated: false, remoteAddress: conn.remoteAddress ?? '' };

      if (peer?.raw) {
        if (!conn.authorized) throw new ConnectRefusal(5, `client certificate not trusted: ${conn.authorizationError}`);
        // OpenSSL verified the signatures up to an anchor of the broker (device CA or root). An
        // issuer name equal to the device CA's subject then means the device CA signed it:
        // another CA of that name would have to be certified by the root itself.
        // The same holds for the external device CA (EST): its subject among the broker's anchors.
        const issuerKey = nameKey(peer.issuer);
        const external = externalCaName();
        if (issuerKey !== deviceCaName() && issuerKey !== external) throw new ConnectRefusal(5, 'client certificate is not from the device CA');
        // With two hierarchies among the anchors, a name is not enough: the enterprise root could
        // certify a CA named like leafgate's device CA (or the reverse). The certificate must
        // verify with the key of the CA its issuer names.
        if (external !== undefined) {
          const signer = issuerKey === external ? opts.externalDeviceCa!()! : opts.deviceCa();
          if (!new X509Certificate(peer.raw).verify(signer.publicKey)) throw new ConnectRefusal(5, 'client certificate is not signed by the device CA it names');
        }
        if (peer.subject?.CN !== deviceId) throw new ConnectRefusal(2, 'client id must equal the certificate CN');
        const serial = peer.serialNumber.toUpperCase();
        if (opts.isRevoked?.(serial)) throw new ConnectRefusal(5, 'certificate is revoked');
        // 3 = server unavailable: the gateway cannot currently vouch for revocation status.
        if (opts.revocationUsable && !opts.revocationUsable(external !== undefined && issuerKey === external)) throw new ConnectRefusal(3, 'revocation list is stale and the policy is refuse');
        if (holder?.session.kind === 'operational' && holder.session.certFingerprint !== peer.fingerprint256) {
          throw new ConnectRefusal(2, 'client id is held by another certificate');
        }
        const bindOperational = () => opts.sessions.bind(client, { ...base, kind: 'operational', certSerial: serial, certFingerprint: peer.fingerprint256 });
        if (holder || !opts.remoteHolder) return bindOperational();
        return opts.remoteHolder(deviceId).then((remote) => {
          if (remote?.kind === 'operational' && remote.certFingerprint !== peer.fingerprint256) throw new ConnectRefusal(2, 'client id is held by another certificate on another gateway');
          bindOperational();
        });
      }

      // A bootstrap claim must never take over a device that is connected with its certificate.
      if (holder?.session.kind === 'operational') throw new ConnectRefusal(2, 'client id is held by a certified device');
      // Nor one that proved it is the device (answered the authority's challenge on its
      // connection): a bare claim is less than that proof. A session that has not proven
      // anything yet may be taken over -- it may be the device itself coming back.
      if (holder?.session.authenticated) throw new ConnectRefusal(2, 'client id is held by a session that has authenticated');
      if (holder || !opts.remoteHolder) return opts.sessions.bind(client, { ...base, kind: 'bootstrap' });
      return opts.remoteHolder(deviceId).then((remote) => {
        if (remote?.kind === 'operational') throw new ConnectRefusal(2, 'client id is held by a certified device on another gateway');
        opts.sessions.bind(client, { ...base, kind: 'bootstrap' });
      });
    },

    onConnected(client) {
      opts.sessions.claim(client);
      const session = opts.sessions.get(client);
      if (session?.kind !== 'bootstrap') return;
      const deviceId = session.deviceId;
      const timer = setTimeout(() => {
        opts.logger.info({ deviceId }, 'bootstrap session timed out');
        client.close();
      }, opts.bootstrapTimeoutMs);
      timer.unref();
      timers.set(client, timer);
    },

    onDisconnect(client) {
      const t = timers.get(client);
      if (t) clearTimeout(t);
      opts.sessions.detach(client);
    },
  };
}
