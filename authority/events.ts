/** Events the authority pushes to gateways over GET /v1/events (server-sent events). */
import { EventEmitter } from 'node:events';
import type { InstructionMessage } from '../protocol/index.ts';

export interface RenewalDue {
  deviceId: string;
  /** Serial of the certificate to replace. */
  serial: string;
  /** When the window opened and when the certificate ends (ISO). */
  renewAfter: string;
  notAfter: string;
  instruction: Omit<InstructionMessage, 'requestId' | 'csrDeadline'>;
}

export interface AuthorityEventMap {
  crl: [{ crlNumber: string; revoked: string[]; list?: 'external-devices'; listNumber?: string }];
  /**
   * Addressed to one gateway: the devices enrolled through it (a gateway acts only for its
   * own devices; the stream of every other gateway drops the event). On the wire the event
   * is `{devices}`.
   */
  'renewal-due': [{ gatewayId: string; devices: RenewalDue[] }];
  /** A gateway identity (certificate or Sub-CA) was revoked: its open event streams end. */
  'gateway-revoked': [{ gatewayId: string; serial: string }];
}

export class AuthorityEvents extends EventEmitter<AuthorityEventMap> {
  constructor() {
    super();
    // One listener per connected gateway stream.
    this.setMaxListeners(0);
  }
}
