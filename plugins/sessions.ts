/**
 * What the gateway knows about each connected client: the device it is, how it proved it,
 * and how far onboarding has come. Attached per aedes Client; dropped with it.
 */
import type { Client } from 'aedes';

export interface DeviceSession {
  deviceId: string;
  /** bootstrap: no operational cert yet; operational: mTLS with a device-CA certificate. */
  kind: 'bootstrap' | 'operational';
  /** Upper-case hex serial of the operational certificate. */
  certSerial?: string;
  certFingerprint?: string;
  connectedAt: number;
  /** Challenges the authority issued to this connection; an answer to any other is refused. */
  challengeIds: Set<string>;
  /** True once the authority accepted a challenge answer on this connection. */
  authenticated: boolean;
  /** When this connection first sent register (for the onboarding latency metric). */
  onboardingStartedAt?: number;
  remoteAddress: string;
}

export class SessionRegistry {
  private readonly byClient = new WeakMap<Client, DeviceSession>();
  private readonly live = new Map<string, { client: Client; session: DeviceSession }>();
  /**
   * Every hook of one publish asks for the same client in turn: the last answer is kept
   * at hand so that only the first pays the WeakMap lookup (it keeps one client reachable).
   */
  private lastClient: Client | undefined;
  private lastSession: DeviceSession | undefined;

  attach(client: Client, session: DeviceSession): void {
    this.bind(client, session);
    this.live.set(session.deviceId, { client, session });
  }

  /** Known for this connection, but not (yet) the holder of its id. */
  bind(client: Client, session: DeviceSession): void {
    this.byClient.set(client, session);
    if (client === this.lastClient) this.lastSession = session;
  }

  /** The connection was accepted: it now holds its id. */
  claim(client: Client): void {
    const session = this.byClient.get(client);
    if (session) this.live.set(session.deviceId, { client, session });
  }

  get(client: Client): DeviceSession | undefined {
    if (client === this.lastClient) return this.lastSession;
    const session = this.byClient.get(client);
    // Only a known client is kept: a miss must not pin an unknown object.
    if (session !== undefined) {
      this.lastClient = client;
      this.lastSession = session;
    }
    return session;
  }

  /** The connected client currently holding `deviceId`, if any. */
  holder(deviceId: string): { client: Client; session: DeviceSession } | undefined {
    return this.live.get(deviceId);
  }

  detach(client: Client): void {
    const s = this.byClient.get(client);
    if (s && this.live.get(s.deviceId)?.client === client) this.live.delete(s.deviceId);
  }

  /** Every live session (for revocation sweeps). */
  *entries(): IterableIterator<{ client: Client; session: DeviceSession }> {
    yield* this.live.values();
  }

  count(kind?: DeviceSession['kind']): number {
    if (!kind) return this.live.size;
    let n = 0;
    for (const { session } of this.live.values()) if (session.kind === kind) n++;
    return n;
  }
}
