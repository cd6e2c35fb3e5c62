/**
 * Revocation: marks certificates revoked, reissues the device CA's CRL (numbered, signed,
 * DER and PEM) and tells connected gateways through the event stream, so the broker can
 * close the device's live session. The CRL is also reissued on a schedule well before its
 * nextUpdate, so gateways never hold a stale one while the authority is up. With several
 * nodes on one database, the node that revokes tells the others (authority/cluster.ts); they
 * reload the stored CRL and push it to their own gateways.
 */
import { LeafgateError, pkix } from '../protocol/index.ts';
import type { LocalCa } from './ca/index.ts';
import type { AuthorityStore } from './store/index.ts';
import type { AuthorityEvents } from './events.ts';
import type { ClusterBus } from './cluster.ts';
import type { Logger } from 'pino';
import type { CrlRow } from './store/index.ts';

function snapshot(row: CrlRow): CrlSnapshot {
  return { der: row.der, pem: pkix.crlToPem(row.der), crlNumber: row.crlNumber, thisUpdate: new Date(row.thisUpdate), nextUpdate: new Date(row.nextUpdate) };
}

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
    private readonly deps: {
      store: AuthorityStore;
      ca: LocalCa;
      events: AuthorityEvents;
      crlValidityHours: number;
      now?: () => number;
      onRevoked?: (reason: string) => void;
      /** Other authority nodes on the same database (PostgreSQL); LocalBus when alone. */
      bus?: ClusterBus;
      logger?: Logger;
      /** How often the stored CRL is re-read (another node may have reissued it). */
      refreshMs?: number;
    },
  ) {}

  private now(): number {
    return this.deps.now?.() ?? Date.now();
  }

  private validityMs(): number {
    return this.deps.crlValidityHours * 3600_000;
  }

  /** Reissued at half its validity, but not more often than once a minute. */
  private dueForReissue(crl: CrlSnapshot): boolean {
    return this.now() >= crl.thisUpdate.getTime() + Math.max(60_000, this.validityMs() / 2);
  }

  /** Loads the stored CRL (or issues the first), then keeps it current: timer, and the other nodes' signals. */
  async start(): Promise<void> {
    const row = await this.deps.store.getCrl('device-ca');
    if (row && row.der.length && row.nextUpdate - this.now() > this.validityMs() / 2) this.current = snapshot(row);
    else await this.reissue();
    // A revocation on another node: load its CRL and tell this node's gateways.
    this.deps.bus?.onMessage((msg) => {
      if (msg.type === 'crl') void this.refresh(msg.revoked).catch((err: Error) => this.deps.logger?.warn({ err: err.message }, 'CRL refresh after a cluster signal failed'));
    });
    this.deps.bus?.onResync(() => void this.refresh().catch(() => undefined));
    this.timer = setInterval(() => void this.tick().catch((err: Error) => this.deps.logger?.warn({ err: err.message }, 'CRL refresh failed')), this.deps.refreshMs ?? 30_000);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  crl(): CrlSnapshot {
    if (!this.current) throw new LeafgateError('internal', 'revocation not started');
    return this.current;
  }

  /**
   * Re-reads the stored CRL; if another node stored a newer one, serves it and tells this
   * node's gateways. Returns whether it changed.
   */
  async refresh(revoked: string[] = []): Promise<boolean> {
    const row = await this.deps.store.getCrl('device-ca');
    if (!row || !row.der.length || (this.current && row.crlNumber <= this.current.crlNumber)) return false;
    this.current = snapshot(row);
    this.deps.events.emit('crl', { crlNumber: row.crlNumber.toString(), revoked });
    return true;
  }

  /** Periodic: catch up with the store, and reissue when due -- one node at a time. */
  private async tick(): Promise<void> {
    await this.refresh();
    if (!this.current || !this.dueForReissue(this.current)) return;
    await this.deps.store.exclusive('crl-reissue', async () => {
      // Another node may have reissued while this one waited for the lock.
      await this.refresh();
      if (this.dueForReissue(this.current!)) await this.reissue();
    });
  }

  /**
   * Signs and stores CRL number stored+1 listing every revoked device certificate. The store
   * keeps only a higher number; when another node stored one first, this one signs again on
   * top of it (its list is read after this node's revocation was committed, so the CRL that
   * ends up served holds it) instead of serving a CRL that might miss it.
   */
  async reissue(newlyRevoked: string[] = []): Promise<CrlSnapshot> {
    const ca = this.deps.ca.deviceCa;
    for (let attempt = 0; attempt < 5; attempt++) {
      const prev = await this.deps.store.getCrl('device-ca');
      const revoked = await this.deps.store.listRevoked(['device']);
      const now = this.now();
      const crlNumber = (prev?.crlNumber ?? 0n) + 1n;
      const thisUpdate = new Date(now);
      const nextUpdate = new Date(now + this.validityMs());
      const der = pkix.encodeCrl({
        issuerDer: ca.subjectDer, issuerKeyId: ca.keyId, issuerKey: ca.privateKey, crlNumber, thisUpdate, nextUpdate,
        entries: revoked.map((c) => ({ serial: c.serial, revokedAt: new Date(c.revokedAt ?? now), reason: c.revocationReason ?? 0 })),
      });
      if (await this.deps.store.saveCrl({ issuer: 'device-ca', crlNumber, thisUpdate: now, nextUpdate: nextUpdate.getTime(), der })) {
        this.current = { der, pem: pkix.crlToPem(der), crlNumber, thisUpdate, nextUpdate };
        this.deps.events.emit('crl', { crlNumber: crlNumber.toString(), revoked: newlyRevoked });
        await this.deps.bus?.publish({ type: 'crl', crlNumber: crlNumber.toString(), revoked: newlyRevoked });
        return this.current;
      }
      // A scheduled reissue that lost: the newer CRL is as good as this one would have been.
      if (!newlyRevoked.length) break;
    }
    // Another node issued a newer one meanwhile: serve that.
    const row = (await this.deps.store.getCrl('device-ca'))!;
    if (!this.current || row.crlNumber > this.current.crlNumber) this.current = snapshot(row);
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
