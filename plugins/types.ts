/**
 * The broker plugin contract. Hooks return promises (or plain values); `compose.ts` adapts
 * them to aedes' callbacks in one place, because async functions handed to aedes as
 * callback hooks turn thrown errors into unhandled rejections (moscajs/aedes#379, #483).
 */
import type { Client, ConnectPacket, PublishPacket, Subscription } from 'aedes';
import type { ErrorCode } from '../protocol/index.ts';

/** Refuses a CONNECT with an MQTT 3.1.1 CONNACK return code (3.2.2.3). */
export class ConnectRefusal extends Error {
  readonly returnCode: 2 | 3 | 4 | 5;
  constructor(returnCode: 2 | 3 | 4 | 5, reason: string) {
    super(reason);
    this.name = 'ConnectRefusal';
    this.returnCode = returnCode;
  }
}

/**
 * Refuses one PUBLISH without closing the connection: the broker acknowledges it and drops
 * it (MQTT-3.3.5-2 allows a positive ack), and the device gets `down/error` with the code.
 * Throwing anything else from authorizePublish closes the connection.
 */
export class PublishRefusal extends Error {
  readonly code: ErrorCode;
  readonly retryAfterMs?: number;
  readonly requestId?: string;
  constructor(code: ErrorCode, reason: string, retryAfterMs?: number, requestId?: string) {
    super(reason);
    this.name = 'PublishRefusal';
    this.code = code;
    if (retryAfterMs !== undefined) this.retryAfterMs = retryAfterMs;
    if (requestId !== undefined) this.requestId = requestId;
  }
}

export interface ConnectInfo {
  /** The client id exactly as sent (aedes invents one for an empty id). */
  clientId: string;
  username?: string;
  password?: Buffer;
  will?: ConnectPacket['will'];
  keepalive: number;
}

export interface BrokerPlugin {
  readonly name: string;
  /** Throw ConnectRefusal to answer CONNACK with its code. */
  authenticate?(client: Client, info: ConnectInfo): void | Promise<void>;
  /** Throw PublishRefusal to drop the message and tell the device; throw anything else to disconnect. */
  authorizePublish?(client: Client, packet: PublishPacket): void | Promise<void>;
  /** Return false to answer SUBACK 0x80 for this subscription. */
  authorizeSubscribe?(client: Client, sub: Subscription): boolean | Promise<boolean>;
  /** Synchronous in aedes: return false to not deliver `packet` to `client`. */
  authorizeForward?(client: Client, packet: PublishPacket): boolean;
  /** Every authenticate hook passed: the connection is accepted. */
  onConnected?(client: Client): void;
  onDisconnect?(client: Client): void;
  close?(): void | Promise<void>;
}
