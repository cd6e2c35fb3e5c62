/**
 * Revocation: marks certificates revoked, reissues the device CA's CRL (numbered, signed,
 * DER and PEM) and tells connected gateways through the event stream, so the broker can
 * close the device's live session. The CRL is also reissued on a schedule well before its
 * nextUpdate, so gateways never hold a stale one while the authority is up.
 */
import { LeafgateError, pkix } from '../protocol/index.ts';
import type { LocalCa } from './ca/index.ts';
import type { AuthorityStore } from './store/index.ts';
import type { AuthorityEvents } from './events.ts';

export interface CrlSnapshot {
  der: Buffer;
  pem: string;
  crlNumber: bigint;
  thisUpdate: Date;
  nextUpdate: Date;
}

export class Revocation {
  private current: CrlSnapshot | null = null;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly deps: { store: AuthorityStore; ca: LocalCa; events: AuthorityEvents; crlValidityHours: number; now?: () => number; onRevoked?: (reason: string) => void },
  ) {}

  private now(): number {
    return this.deps.now?.() ?? Date.now();
  }

  /** Loads the stored CRL (or issues the first) and schedules reissue at half its validity. */
  async start(): Promise<void> {
    const row = await this.deps.store.getCrl('device-ca');
    if (row && row.nextUpdate - this.now() > (this.deps.crlValidityHours * 3600_000) / 2) {
      this.current = { der: row.der, pem: pkix.crlToPem(row.der), crlNumber: row.crlNumber, thisUpdate: new Date(row.thisUpdate), nextUpdate: new Date(row.nextUpdate) };
    } else await this.reissue();
    const every = Math.max(60_000, (this.deps.crlValidityHours * 3600_000) / 2);
    this.timer = setInterval(() => void this.reissue().catch(() => undefined), every);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  crl(): CrlSnapshot {
    if (!this.current) throw new LeafgateError('internal', 'revocation not started');
    return this.current;
  }

  async reissue(newlyRevoked: string[] = []): Promise<CrlSnapshot> {
    const ca = this.deps.ca.deviceCa;
    const prev = await this.deps.store.getCrl('device-ca');
    const revoked = await this.deps.store.listRevoked(['device']);
    const now = this.now();
    const crlNumber = (prev?.crlNumber ?? 0n) + 1n;
    const thisUpdate = new Date(now);
    const nextUpdate = new Date(now + this.deps.crlValidityHours * 3600_000);
    const der = pkix.encodeCrl({
      issuerDer: ca.subjectDer, issuerKeyId: ca.keyId, issuerKey: ca.privateKey, crlNumber, thisUpdate, nextUpdate,
      entries: revoked.map((c) => ({ serial: c.serial, revokedAt: new Date(c.revokedAt ?? now), reason: c.revocationReason ?? 0 })),
    });
    if (!(await this.deps.store.saveCrl({ issuer: 'device-ca', crlNumber, thisUpdate: now, nextUpdate: nextUpdate.getTime(), der }))) {
      // Another node issued a newer one meanwhile: serve that.
      const row = (await this.deps.store.getCrl('device-ca'))!;
      this.current = { der: row.der, pem: pkix.crlToPem(row.der), crlNumber: row.crlNumber, thisUpdate: new Date(row.thisUpdate), nextUpdate: new Date(row.nextUpdate) };
    } else this.current = { der, pem: pkix.crlToPem(der), crlNumber, thisUpdate, nextUpdate };
    this.deps.events.emit('crl', { crlNumber: this.current.crlNumber.toString(), revoked: newlyRevoked });
    return this.current;
  }

  /** Revokes one certificate by serial; the CRL is reissued and pushed before this returns. */
  async revokeSerial(serial: string, reason: pkix.RevocationReason, actor: string): Promise<{ serial: string; subjectId: string; crlNumber: string }> {
    const code = pkix.REVOCATION_REASONS[reason];
    if (code === undefined) throw new LeafgateError('bad_request', `unknown revocation reason ${reason}`);
    const normalized = serial.replace(/:/g, '').toUpperCase();
    const now = this.now();
    const existing = await this.deps.store.getCertificate(normalized);
    if (!existing) throw new LeafgateError('not_found', `no certificate with serial ${normalized}`);
    const row = await this.deps.store.revokeCertificate(normalized, code, now, {
      at: now, action: 'revoke', outcome: 'ok', serial: normalized, deviceId: existing.kind === 'device' ? existing.subjectId : null,
      gatewayId: existing.kind === 'gateway' ? existing.subjectId : null, detail: { reason, actor },
    });
    if (!row) {
      // Revoking twice is not an error: the answer is the same.
      if (existing.status === 'revoked') return { serial: normalized, subjectId: existing.subjectId, crlNumber: this.crl().crlNumber.toString() };
      throw new LeafgateError('bad_request', `certificate ${normalized} is ${existing.status}`);
    }
    this.deps.onRevoked?.(reason);
    const crl = await this.reissue([normalized]);
    return { serial: normalized, subjectId: row.subjectId, crlNumber: crl.crlNumber.toString() };
  }
}
