/**
 * Revocation: marks certificates revoked, reissues the CRL of the CA that signed them (one
 * CRL per CA: root, device CA, infrastructure CA, edge issuer; numbered, signed, DER and PEM)
 * and tells connected gateways through the event stream, so the broker can close the
 * device's live session. The root's CRL is signed only while the root key is online; kept
 * offline, the root CRL that `leafgate authority init` (or `root-crl`) signed is served. The CRL is also reissued on a schedule well before its
 * nextUpdate, so gateways never hold a stale one while the authority is up. With several
 * nodes on one database, the node that revokes tells the others (authority/cluster.ts); they
 * reload the stored CRL and push it to their own gateways.
 *
 * Certificates of the external device CA (EST) are not in the device CA's CRL: that CRL stays
 * a plain, direct CRL of the device CA (an indirect one is out of scope for every relying party
 * that runs OpenSSL without extended CRL support -- nginx ssl_crl, mosquitto crlfile, `openssl
 * verify -crl_check_all` -- which would then fail every certificate of the device CA). They are
 * listed in a second CRL, `external-devices`, signed by the device CA key and always marked
 * indirect (each entry names its issuer, RFC 5280 5.3.3): its own row in the crls table, its
 * own URL (/v1/crl/external-devices.crl), announced by the same `crl` event, and read by
 * leafgate gateways only (cloud-bridge/revocation-cache.ts) for certificates of the external CA.
 */
import { LeafgateError, pkix } from '../protocol/index.ts';
import { CA_NAMES, EXTERNAL_CA, fingerprint, type CaName, type IssuerName, type LocalCa } from './ca/index.ts';
import type { AuthorityStore } from './store/index.ts';
import type { AuthorityEvents } from './events.ts';
import type { ClusterBus } from './cluster.ts';
import type { Logger } from 'pino';
import type { CertificateRow, CrlRow } from './store/index.ts';
import { X509Certificate } from 'node:crypto';

/** The list of revoked certificates of the external device CA (EST), signed by the device CA key. */
export const EXTERNAL_LIST = 'external-devices' as const;
/** A CRL this authority serves: one per CA, and the external-CA list. */
export type CrlName = CaName | typeof EXTERNAL_LIST;
export const CRL_NAMES: readonly CrlName[] = [...CA_NAMES, EXTERNAL_LIST];
/** The CA whose key signs a CRL. */
const signerOf = (name: CrlName): CaName => (name === EXTERNAL_LIST ? 'device-ca' : name);

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
  private readonly current = new Map<CrlName, CrlSnapshot>();
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
      /** The external device CA's issuing certificate (PEM) when deviceIssuer is set (EST). */
      externalIssuerPem?: () => string | undefined;
    },
  ) {}

  private now(): number {
    return this.deps.now?.() ?? Date.now();
  }

  private validityMs(): number {
    return this.deps.crlValidityHours * 3600_000;
  }

  /** The CAs whose CRL this node can sign now (the root only while its key is online). */
  private signable(name: CrlName): boolean {
    return !!this.deps.ca.get(signerOf(name)).key;
  }

  /** Reissued at half its validity, but not more often than once a minute. */
  private dueForReissue(crl: CrlSnapshot): boolean {
    return this.now() >= crl.thisUpdate.getTime() + Math.max(60_000, this.validityMs() / 2);
  }

  /** Loads the stored CRLs (or issues the first ones), then keeps them current: timer, and the other nodes' signals. */
  async start(): Promise<void> {
    for (const name of CRL_NAMES) {
      const row = await this.deps.store.getCrl(name);
      // A device CA CRL stored by an earlier version may be indirect (it carried the external
      // CA's entries): signed again at once, direct, with the external list beside it.
      const legacy = name === 'device-ca' && !!row?.der.length && this.signable(name) && isIndirect(row.der, this.deps.ca.get('device-ca').certificate);
      if (row && row.der.length && !legacy && (!this.signable(name) || row.nextUpdate - this.now() > this.validityMs() / 2)) this.current.set(name, snapshot(row));
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
  crl(name: CrlName = 'device-ca'): CrlSnapshot {
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
    for (const name of CRL_NAMES) {
      const row = await this.deps.store.getCrl(name);
      const mine = this.current.get(name);
      if (!row || !row.der.length || (mine && row.crlNumber <= mine.crlNumber)) continue;
      this.current.set(name, snapshot(row));
      if (name === 'device-ca') {
        deviceChanged = true;
        this.deps.events.emit('crl', { crlNumber: row.crlNumber.toString(), revoked });
      }
      // Gateways fetch both lists on any `crl` event; `list` says which one changed.
      if (name === EXTERNAL_LIST) this.deps.events.emit('crl', { crlNumber: this.current.get('device-ca')?.crlNumber.toString() ?? '0', revoked, list: EXTERNAL_LIST, listNumber: row.crlNumber.toString() });
    }
    return deviceChanged;
  }

  /** Periodic: catch up with the store, and reissue what is due -- one node at a time. */
  private async tick(): Promise<void> {
    await this.refresh();
    const due = () => CRL_NAMES.filter((n) => this.signable(n) && (!this.current.get(n) || this.dueForReissue(this.current.get(n)!)));
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
  async reissue(newlyRevoked: string[] = [], name: CrlName = 'device-ca'): Promise<CrlSnapshot> {
    const ca = this.deps.ca.get(signerOf(name));
    const key = ca.key;
    if (!key) throw new LeafgateError('bad_request', `the ${name} key is offline: its CRL is signed where the key is (leafgate authority root-crl)`);
    const announce = (crl: CrlSnapshot) => {
      if (name === 'device-ca') this.deps.events.emit('crl', { crlNumber: crl.crlNumber.toString(), revoked: newlyRevoked });
      if (name === EXTERNAL_LIST) this.deps.events.emit('crl', { crlNumber: this.current.get('device-ca')?.crlNumber.toString() ?? '0', revoked: newlyRevoked, list: EXTERNAL_LIST, listNumber: crl.crlNumber.toString() });
    };
    for (let attempt = 0; attempt < 5; attempt++) {
      const prev = await this.deps.store.getCrl(name);
      // The external list holds only the revoked certificates of the external device CA (EST),
      // as indirect entries naming their issuer (RFC 5280 5.3.3): leafgate holds no key of that
      // CA. The CA CRLs hold only their own certificates: direct CRLs, in scope for any relying party.
      const revoked: Array<CertificateRow & { certificateIssuerDer?: Buffer }> = name === EXTERNAL_LIST
        ? (await this.deps.store.listRevoked(EXTERNAL_CA)).map((c) => ({ ...c, certificateIssuerDer: issuerDerOfPem(c.pem) }))
        : await this.deps.store.listRevoked(name);
      const now = this.now();
      const crlNumber = (prev?.crlNumber ?? 0n) + 1n;
      const thisUpdate = new Date(now);
      const nextUpdate = new Date(now + this.validityMs());
      // Signed through the CA's key wherever it lives (file, PKCS#11 token, Key Vault).
      const der = await pkix.encodeCrlAsync({
        issuerDer: ca.subjectDer, issuerKeyId: ca.keyId, issuerKey: key, crlNumber, thisUpdate, nextUpdate, indirect: name === EXTERNAL_LIST,
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
    // The CRL that lists it: its CA's, or for the external CA's certificates the external list.
    const crlCa: CrlName = issuer === EXTERNAL_CA ? EXTERNAL_LIST : issuer;
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

  /**
   * Revokes a certificate of the external issuing CA (EST) given as PEM, whether leafgate has a
   * row for it or not: one issued at that CA outside leafgate, or an orphan of leafgate's own
   * requests (an answer lost, discarded or refused after the CA signed). Such a certificate
   * connects to the gateways as the device its CN names; once recorded here (a revoked row,
   * issuer external-ca, kind device, subject its CN) it is in the external-devices list, the
   * gateways refuse it and close its live sessions. Anything not signed by the configured
   * issuing CA is refused (bad_request): the gateways do not accept it anyway.
   */
  async revokeCertificatePem(pem: string, reason: pkix.RevocationReason, actor: string, why?: Record<string, unknown>): Promise<RevokedAnswer> {
    const code = pkix.REVOCATION_REASONS[reason];
    if (code === undefined) throw new LeafgateError('bad_request', `unknown revocation reason ${reason}`);
    const { cert, serial } = checkExternalCertificate(pem, this.deps.externalIssuerPem?.());
    const existing = await this.deps.store.getCertificate(serial);
    if (existing) {
      if (existing.issuer !== EXTERNAL_CA || existing.fingerprint !== fingerprint(cert.raw)) throw new LeafgateError('bad_request', `serial ${serial} is on record for another certificate (${existing.issuer}): revoke that one by --serial`);
      return this.revokeSerial(serial, reason, actor);
    }
    const answer = await this.recordExternalRevoked({ der: cert.raw, serial, subjectId: commonName(cert), notBefore: new Date(cert.validFrom).getTime(), notAfter: new Date(cert.validTo).getTime() }, reason, actor, why);
    // Recorded by another request meanwhile: revoked the --serial way.
    return answer ?? this.revokeSerial(serial, reason, actor);
  }

  /**
   * Records a certificate of the external CA that has no row as revoked and reissues the
   * external-devices list (pushed to the gateways). Also used for an orphan leafgate learned
   * the serial of (onboarding, `discarded`). Answers as revokeSerial does; null (nothing done)
   * when the serial is on record: a discarded certificate whose commit did happen after all
   * (an error after the database committed) is the device's, never revoked here.
   */
  async recordExternalRevoked(c: { der: Buffer; serial: string; subjectId: string; notBefore: number; notAfter: number }, reason: pkix.RevocationReason, actor: string, why?: Record<string, unknown>): Promise<RevokedAnswer | null> {
    const code = pkix.REVOCATION_REASONS[reason];
    if (!this.signable(EXTERNAL_LIST)) throw new LeafgateError('bad_request', 'the device CA key is offline: the external-devices list cannot be signed');
    const now = this.now();
    const pem = pkix.toPem(c.der, 'CERTIFICATE');
    const row: CertificateRow = {
      serial: c.serial, subjectId: c.subjectId, kind: 'device', issuer: EXTERNAL_CA, fingerprint: fingerprint(c.der), notBefore: c.notBefore, notAfter: c.notAfter,
      status: 'revoked', requestId: null, pem, revokedAt: now, revocationReason: code, createdAt: now,
    };
    const recorded = await this.deps.store.recordExternalRevocation(row, {
      at: now, action: 'revoke', outcome: 'ok', serial: c.serial, deviceId: c.subjectId || null,
      detail: { reason, actor, kind: 'device', issuer: EXTERNAL_CA, notOnRecord: true, ...(why ?? {}) },
    });
    if (!recorded) return null;
    this.deps.onRevoked?.(reason);
    const external = externalNotice(pem);
    this.deps.logger?.warn({ serial: c.serial, subjectId: c.subjectId, reason, actor, externalIssuer: external.issuer }, 'certificate of the external CA that leafgate did not deliver recorded as revoked (its gateways refuse it): revoke it at the external CA too');
    const crl = await this.reissue([c.serial], EXTERNAL_LIST);
    return { serial: c.serial, subjectId: c.subjectId, kind: 'device', issuer: EXTERNAL_CA, crlNumber: crl.crlNumber.toString(), externalCa: external };
  }
}

/**
 * The external issuing CA's checks on a certificate leafgate may have no row for: signed by the
 * configured issuing CA (issuer name and signature, node:crypto), not a CA, a positive serial.
 * Answers the parsed certificate and its serial as leafgate records serials.
 */
export function checkExternalCertificate(pem: string, issuingPem: string | undefined): { cert: X509Certificate; serial: string } {
  if (!issuingPem) throw new LeafgateError('bad_request', 'no external device CA is configured (deviceIssuer): a certificate leafgate issued is revoked by --serial');
  let certs: X509Certificate[];
  try {
    certs = pkix.parseCertificates(pem);
  } catch (err) {
    throw new LeafgateError('bad_request', `certificate is not a readable PEM certificate: ${(err as Error).message}`);
  }
  if (certs.length !== 1) throw new LeafgateError('bad_request', `give exactly one certificate (the device's), not ${certs.length}`);
  const cert = certs[0];
  const issuing = new X509Certificate(issuingPem);
  const issuerName = issuing.subject.replace(/\n/g, ', ');
  if (!(cert.checkIssued(issuing) && cert.verify(issuing.publicKey))) throw new LeafgateError('bad_request', `certificate ${cert.subject.replace(/\n/g, ', ')} is not signed by the configured external issuing CA ${issuerName}: leafgate's gateways do not accept it, there is nothing to revoke`);
  if (cert.ca) throw new LeafgateError('bad_request', 'certificate is a CA certificate, not a device certificate');
  const serial = cert.serialNumber.toUpperCase();
  if (!/^[0-9A-F]+$/.test(serial) || /^0+$/.test(serial)) throw new LeafgateError('bad_request', `its serial number ${serial.slice(0, 48)} is not a positive integer (RFC 5280 4.1.2.2)`);
  return { cert, serial };
}

/** The CN of a certificate's subject ('' when it has none). */
function commonName(cert: X509Certificate): string {
  const cn = cert.subject.split('\n').find((l) => l.startsWith('CN='));
  return cn ? cn.slice(3) : '';
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

function isIndirect(der: Buffer, ca: X509Certificate): boolean {
  try {
    return pkix.parseCrl(der, ca.publicKey).indirect;
  } catch {
    return false;
  }
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
