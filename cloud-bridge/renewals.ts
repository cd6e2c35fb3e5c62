/**
 * Renewals announced by the authority, kept on the gateway so that a device is asked when
 * it is (or comes back) online: a connected device whose certificate is due gets an
 * instruction with `renewal: true` on its mTLS session, at most once per connection.
 */
import type { Client } from 'aedes';
import type { InstructionMessage } from '../protocol/index.ts';

export interface DueRenewal {
  deviceId: string;
  serial: string;
  renewAfter: string;
  notAfter: string;
  instruction: Omit<InstructionMessage, 'requestId' | 'csrDeadline'>;
}

export class RenewalTracker {
  /** serial -> due renewal */
  private readonly due = new Map<string, DueRenewal>();
  private readonly asked = new WeakMap<Client, Set<string>>();

  /** Replaces what is known for these devices (the authority sends whole lists). */
  update(list: DueRenewal[]): void {
    for (const d of list) if (typeof d?.serial === 'string' && typeof d.deviceId === 'string') this.due.set(d.serial, d);
  }

  get(serial: string): DueRenewal | undefined {
    return this.due.get(serial);
  }

  /** Forget a serial once its replacement was delivered. */
  done(serial: string): void {
    this.due.delete(serial);
  }

  get size(): number {
    return this.due.size;
  }

  /** Due, and overdue = less than a tenth of the lifetime left (renewals that keep failing). */
  counts(now = Date.now()): { due: number; overdue: number } {
    let overdue = 0;
    for (const d of this.due.values()) {
      const end = new Date(d.notAfter).getTime();
      const start = new Date(d.renewAfter).getTime();
      if (end - now < (end - start) / 10) overdue++;
    }
    return { due: this.due.size, overdue };
  }

  /** The instruction to send to `client` (holding `serial`), or null if not due or already asked. */
  instructionFor(client: Client, serial: string, csrDeadlineMs: number, allowedSkewMs = 0): InstructionMessage | null {
    const d = this.due.get(serial);
    // The device proved the certificate valid by connecting; a gateway clock a little ahead
    // (within the allowed skew) must not skip its renewal.
    if (!d || new Date(d.notAfter).getTime() + allowedSkewMs <= Date.now()) return null;
    const asked = this.asked.get(client) ?? new Set<string>();
    if (asked.has(serial)) return null;
    asked.add(serial);
    this.asked.set(client, asked);
    return { ...d.instruction, requestId: `renew-${serial}`, csrDeadline: new Date(Date.now() + csrDeadlineMs).toISOString(), renewal: true, replaces: serial };
  }
}
