/**
 * Revocation: marks certificates revoked, reissues the CRL of the CA that signed them (one
 * CRL per CA: root, device CA, infrastructure CA, edge issuer; numbered, signed, DER and PEM)
 * and tells connected gateways through the event stream, so the broker can close the
 * device's live session. The root's CRL is signed only while the root key is online; kept
 * offline, the root CRL that `leafgate authority init` (or `root-crl`) signed is served. The CRL is also reissued on a schedule well before its
 * nextUpdate, so gateways never hold a stale one while the authority is up. With several
 * nodes on one database, the node that revokes tells the others (authority/cluster.ts); they
 * reload the stored CRL and push it to their own gateways.
 */
import { LeafgateError, pkix } from '../protocol/index.ts';
import { CA_NAMES, EXTERNAL_CA, type CaName, type IssuerName, type LocalCa } from './ca/index.ts';
import type { AuthorityStore } from './store/index.ts';
import type { AuthorityEvents } from './events.ts';
import type { ClusterBus } from './cluster.ts';
import type { Logger } from 'pino';
import type { CertificateRow, CrlRow } from './store/index.ts';
import { X509Certificate } from 'node:crypto';

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
  private readonly current = new Map<CaName, CrlSnapshot>();
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

  /** The CAs whose CRL this node can sign now (the root only while its key is online). */
  private signable(name: CaName): boolean {
    return !!this.deps.ca.get(name).key;
  }

  /** Reissued at half its validity, but not more often than once a minute. */
  private dueForReissue(crl: CrlSnapshot): boolean {
    return this.now() >= crl.thisUpdate.getTime() + Math.max(60_000, this.validityMs() / 2);
  }

  /** Loads the stored CRLs (or issues the first ones), then keeps them current: timer, and the other nodes' signals. */
  async start(): Promise<void> {
    for (const name of CA_NAMES) {
      const row = await this.deps.store.getCrl(name);
      if (row && row.der.length && (!this.signable(name) || row.nextUpdate - this.now() > this.validityMs() / 2)) this.current.set(name, snapshot(row));
      else if (this.signable(name)) await this.reissue([], name);
      else this.deps.logger?.warn({ ca: name }, 'no CRL of the offline root is stored: sign one with `leafgate authority root-crl` where the root key is');
    }
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

  /** The current CRL of a CA (the device CA's by default: the one gateways enforce). */
  crl(name: CaName = 'device-ca'): CrlSnapshot {
    const c = this.current.get(name);
    if (!c) throw new LeafgateError(name === 'device-ca' ? 'internal' : 'not_found', name === 'device-ca' ? 'revocation not started' : `no CRL of ${name} is available`);
    return c;
  }

  /**
   * Re-reads the stored CRLs; where another node stored a newer one, serves it (and tells
   * this node's gateways when it is the device CA's). Returns whether the device CA's changed.
   */
  async refresh(revoked: string[] = []): Promise<boolean> {
    let deviceChanged = false;
    for (const name of CA_NAMES) {
      const row = await this.deps.store.getCrl(name);
      const mine = this.current.get(name);
      if (!row || !row.der.length || (mine && row.crlNumber <= mine.crlNumber)) continue;
      this.current.set(name, snapshot(row));
      if (name === 'device-ca') {
        deviceChanged = true;
        this.deps.events.emit('crl', { crlNumber: row.crlNumber.toString(), revoked });
      }
    }
    return deviceChanged;
  }

  /** Periodic: catch up with the store, and reissue what is due -- one node at a time. */
  private async tick(): Promise<void> {
    await this.refresh();
    const due = () => CA_NAMES.filter((n) => this.signable(n) && (!this.current.get(n) || this.dueForReissue(this.current.get(n)!)));
    if (!due().length) return;
    await this.deps.store.exclusive('crl-reissue', async () => {
      // Another node may have reissued while this one waited for the lock.
      await this.refresh();
      for (const name of due()) await this.reissue([], name);
    });
  }

  /**
   * Signs and stores CRL number stored+1 of one CA, listing every certificate it signed that
   * is revoked. The store keeps only a higher number; when another node stored one first,
   * this one signs again on top of it (its list is read after this node's revocation was
   * committed, so the CRL that ends up served holds it) instead of serving a CRL that might miss it.
   */
  async reissue(newlyRevoked: string[] = [], name: CaName = 'device-ca'): Promise<CrlSnapshot> {
    const ca = this.deps.ca.get(name);
    const key = ca.key;
    if (!key) throw new LeafgateError('bad_request', `the ${name} key is offline: its CRL is signed where the key is (leafgate authority root-crl)`);
    const announce = (crl: CrlSnapshot) => {
      if (name === 'device-ca') this.deps.events.emit('crl', { crlNumber: crl.crlNumber.toString(), revoked: newlyRevoked });
    };
    for (let attempt = 0; attempt < 5; attempt++) {
      const prev = await this.deps.store.getCrl(name);
      const revoked: Array<CertificateRow & { certificateIssuerDer?: Buffer }> = await this.deps.store.listRevoked(name);
      // The device CA's CRL also carries the revoked certificates of the external device CA
      // (EST), as indirect entries naming their issuer (RFC 5280 5.3.3): leafgate holds no key
      // of that CA, and its gateways read one CRL, signed by a key they already trust.
      if (name === 'device-ca') for (const c of await this.deps.store.listRevoked(EXTERNAL_CA)) revoked.push({ ...c, certificateIssuerDer: issuerDerOfPem(c.pem) });
      const now = this.now();
      const crlNumber = (prev?.crlNumber ?? 0n) + 1n;
      const thisUpdate = new Date(now);
      const nextUpdate = new Date(now + this.validityMs());
      // Signed through the CA's key wherever it lives (file, PKCS#11 token, Key Vault).
      const der = await pkix.encodeCrlAsync({
        issuerDer: ca.subjectDer, issuerKeyId: ca.keyId, issuerKey: key, crlNumber, thisUpdate, nextUpdate,
        entries: revoked.map((c) => ({ serial: c.serial, revokedAt: new Date(c.revokedAt ?? now), reason: c.revocationReason ?? 0, ...(c.certificateIssuerDer ? { certificateIssuerDer: c.certificateIssuerDer } : {}) })),
      });
      if (await this.deps.store.saveCrl({ issuer: name, crlNumber, thisUpdate: now, nextUpdate: nextUpdate.getTime(), der })) {
        const crl = { der, pem: pkix.crlToPem(der), crlNumber, thisUpdate, nextUpdate };
        this.current.set(name, crl);
        announce(crl);
        await this.deps.bus?.publish({ type: 'crl', crlNumber: crlNumber.toString(), revoked: newlyRevoked });
        return crl;
      }
      // A scheduled reissue that lost: the newer CRL is as good as this one would have been.
      if (!newlyRevoked.length) break;
    }
    // Another node issued a newer one meanwhile: serve that.
    const row = (await this.deps.store.getCrl(name))!;
    const mine = this.current.get(name);
    if (!mine || row.crlNumber > mine.crlNumber) this.current.set(name, snapshot(row));
    announce(this.current.get(name)!);
    return this.current.get(name)!;
  }

  /**
   * Revokes one certificate by serial; its CA's CRL is reissued (and pushed) before this returns.
   * A certificate of the external CA (EST) goes into the device CA's CRL, which the gateways
   * enforce; EST has no revocation call, so the answer (`externalCa`) and a log line tell the
   * operator to revoke it at the external CA too.
   */
  async revokeSerial(serial: string, reason: pkix.RevocationReason, actor: string): Promise<RevokedAnswer> {
    const code = pkix.REVOCATION_REASONS[reason];
    if (code === undefined) throw new LeafgateError('bad_request', `unknown revocation reason ${reason}`);
    const normalized = serial.replace(/:/g, '').toUpperCase();
    const now = this.now();
    const existing = await this.deps.store.getCertificate(normalized);
    if (!existing) throw new LeafgateError('not_found', `no certificate with serial ${normalized}`);
    const issuer = existing.issuer!;
    // The CRL that lists it: its CA's, or for the external CA's certificates the device CA's.
    const crlCa: CaName = issuer === EXTERNAL_CA ? 'device-ca' : issuer;
    // Refused before anything is marked: a revocation no CRL can carry would be a silent one.
    if (!this.signable(crlCa)) throw new LeafgateError('bad_request', `certificate ${normalized} was signed by the ${issuer}, whose key is offline: revoke it where the root key is`);
    const external = issuer === EXTERNAL_CA ? externalNotice(existing.pem) : undefined;
    const row = await this.deps.store.revokeCertificate(normalized, code, now, {
      at: now, action: 'revoke', outcome: 'ok', serial: normalized, deviceId: existing.kind === 'device' ? existing.subjectId : null,
      gatewayId: existing.kind === 'gateway' || existing.kind === 'subca' || existing.kind === 'edge-identity' ? existing.subjectId : null, detail: { reason, actor, kind: existing.kind, issuer },
    });
    if (!row) {
      // Revoking twice is not an error: the answer is the same.
      if (existing.status === 'revoked') return { serial: normalized, subjectId: existing.subjectId, kind: existing.kind, issuer, crlNumber: this.crl(crlCa).crlNumber.toString(), ...(external ? { externalCa: external } : {}) };
      throw new LeafgateError('bad_request', `certificate ${normalized} is ${existing.status}`);
    }
    this.deps.onRevoked?.(reason);
    this.deps.logger?.info({ serial: normalized, subjectId: row.subjectId, kind: row.kind, reason, actor }, 'certificate revoked');
    if (external) this.deps.logger?.warn({ serial: normalized, subjectId: row.subjectId, externalIssuer: external.issuer }, 'certificate of the external CA revoked in leafgate (its gateways refuse it): EST has no revocation call, revoke it at the external CA too');
    const crl = await this.reissue([normalized], crlCa);
    if (row.kind === 'gateway' || row.kind === 'subca') this.deps.events.emit('gateway-revoked', { gatewayId: row.subjectId, serial: normalized });
    return { serial: normalized, subjectId: row.subjectId, kind: row.kind, issuer, crlNumber: crl.crlNumber.toString(), ...(external ? { externalCa: external } : {}) };
  }
}

export interface RevokedAnswer {
  serial: string;
  subjectId: string;
  kind: string;
  crlNumber: string;
  issuer: IssuerName;
  /** Only for a certificate of the external CA (EST): what the operator must still do there. */
  externalCa?: { revokedThere: false; issuer: string; action: string };
}

/** The issuer Name (DER) of a certificate on record. */
function issuerDerOfPem(pem: string): Buffer {
  return pkix.issuerDerOf(pkix.fromPem(pem, 'CERTIFICATE'));
}

function externalNotice(pem: string): NonNullable<RevokedAnswer['externalCa']> {
  let issuer = 'the external CA';
  try {
    issuer = new X509Certificate(pem).issuer.replace(/\n/g, ', ');
  } catch {
    // the stored PEM is ours; the generic wording is enough if it cannot be read
  }
  return {
    revokedThere: false, issuer,
    action: `EST has no revocation call: leafgate's gateways now refuse this certificate, but it stays valid for anyone else who trusts ${issuer}. Revoke it at that CA too (by serial).`,
  };
}
