/**
 * The gateway's copy of the authority's device CRL: loaded from disk at start (so a restart
 * while the authority is down still refuses revoked devices), refreshed from the authority
 * on a schedule and whenever the event stream says a new one exists. A CRL is accepted only
 * if its signature verifies with the device CA key and its number is higher than ours.
 *
 * The gateway holds two of these: the device CA's CRL (direct, /v1/crl) and the authority's
 * list of revoked certificates of the external device CA (EST; indirect,
 * /v1/crl/external-devices.crl). Both are signed by the device CA key, so each cache accepts
 * only its kind (`indirect`): one can never be passed off as the other to roll revocations back.
 */
import { EventEmitter } from 'node:events';
import { existsSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import type { X509Certificate } from 'node:crypto';
import type { Logger } from 'pino';
import { pkix } from '../protocol/index.ts';
import type { AuthorityClient } from './authority-client.ts';

export interface RevocationCacheOptions {
  authority: AuthorityClient;
  deviceCa: X509Certificate;
  /** Where the last good CRL is kept (DER). */
  file: string;
  refreshMs: number;
  logger: Logger;
  /** Where the authority serves it; /v1/crl (the device CA's CRL) by default. */
  path?: string;
  /** The external-CA list: an indirect CRL is required (and a direct one refused); otherwise the reverse. */
  indirect?: boolean;
  /** For log lines. */
  label?: string;
}

export class RevocationCache extends EventEmitter<{ updated: [{ crlNumber: bigint; newlyRevoked: string[] }] }> {
  private crl: pkix.ParsedCrl | null = null;
  private timer: NodeJS.Timeout | undefined;
  private inflight: Promise<boolean> | null = null;

  constructor(private readonly opts: RevocationCacheOptions) {
    super();
    if (existsSync(opts.file)) {
      try {
        this.crl = this.parse(readFileSync(opts.file));
      } catch (err) {
        opts.logger.warn({ err: (err as Error).message }, 'cached CRL is unreadable; waiting for a fresh one');
      }
    }
  }

  /** Parses and verifies, and refuses a CRL of the other kind (direct / indirect). */
  private parse(der: Buffer): pkix.ParsedCrl {
    const parsed = pkix.parseCrl(der, this.opts.deviceCa.publicKey);
    const want = this.opts.indirect === true;
    if (parsed.indirect !== want) throw new Error(want ? 'not the external-CA revocation list (a direct CRL)' : 'not the device CA\'s CRL (an indirect CRL)');
    return parsed;
  }

  get crlNumber(): bigint | undefined {
    return this.crl?.crlNumber;
  }

  get nextUpdate(): Date | undefined {
    return this.crl?.nextUpdate;
  }

  /** True when the cache holds a CRL (from disk or the authority). */
  get warm(): boolean {
    return this.crl !== null;
  }

  /** True when the CRL held is past its nextUpdate (or there is none). */
  isStale(now = Date.now()): boolean {
    return !this.crl?.nextUpdate || this.crl.nextUpdate.getTime() < now;
  }

  /** CRLs refused for a bad signature or encoding since start (a planted or corrupted CRL shows here). */
  refusedCount = 0;

  /** DER of the CRL held, to share it with the other gateways of a cluster. */
  get der(): Buffer | undefined {
    return this.crl?.der;
  }

  /**
   * Applies a CRL that came from elsewhere than the authority (the cluster's Redis): it is
   * trusted only if its signature verifies with the device CA. False when it does not.
   */
  applyDer(der: Buffer, source: string): boolean {
    let parsed: pkix.ParsedCrl;
    try {
      parsed = this.parse(der);
    } catch (err) {
      this.refusedCount++;
      this.opts.logger.warn({ err: (err as Error).message, source }, 'refusing a CRL whose signature or encoding is bad');
      return false;
    }
    this.apply(parsed);
    return true;
  }

  isRevoked(serial: string): boolean {
    return this.crl?.revoked.has(serial) ?? false;
  }

  start(): void {
    void this.refresh();
    this.timer = setInterval(() => void this.refresh(), this.opts.refreshMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  /** Fetches the CRL; concurrent calls share one request. Resolves false when it failed. */
  refresh(): Promise<boolean> {
    this.inflight ??= this.fetch().finally(() => {
      this.inflight = null;
    });
    return this.inflight;
  }

  private async fetch(): Promise<boolean> {
    let parsed: pkix.ParsedCrl;
    try {
      const der = await this.opts.authority.getBuffer(this.opts.path ?? '/v1/crl');
      parsed = this.parse(der);
    } catch (err) {
      this.opts.logger.warn({ err: (err as Error).message, cached: this.crl?.crlNumber?.toString(), list: this.opts.label ?? 'device-ca' }, 'CRL refresh failed; keeping the cached CRL');
      return false;
    }
    this.apply(parsed);
    return true;
  }

  /**
   * Applies a verified CRL if it is newer than the one held. An older one, or another one with
   * the same number (the authority numbers every CRL it signs, so a second CRL of one number is
   * a replay or a rollback, never news), is ignored: it could un-revoke a serial.
   */
  apply(parsed: pkix.ParsedCrl): void {
    if (this.crl && parsed.crlNumber <= this.crl.crlNumber) return;
    const before = this.crl?.revoked ?? new Map();
    const newlyRevoked = [...parsed.revoked.keys()].filter((s) => !before.has(s));
    this.crl = parsed;
    // Write-then-rename: a crash never leaves a torn CRL behind.
    writeFileSync(`${this.opts.file}.tmp`, parsed.der);
    renameSync(`${this.opts.file}.tmp`, this.opts.file);
    this.opts.logger.info({ crlNumber: parsed.crlNumber.toString(), revoked: parsed.revoked.size, newlyRevoked: newlyRevoked.length, list: this.opts.label ?? 'device-ca' }, 'CRL updated');
    this.emit('updated', { crlNumber: parsed.crlNumber, newlyRevoked });
  }
}
