/**
 * IoT Hub registry connector (azure-iothub): mirrors device certificates into the hub as
 * X.509 devices that are children of their edge gateway, so they can authenticate through
 * IoT Edge, also offline. Work is derived from the certificates table (rows not yet synced),
 * so nothing is lost if the authority stops between issuance and registration. Calls are
 * retried with backoff on 429/5xx, honouring Retry-After; every call is audited.
 *
 *   new certificate, device absent   -> create {x509Thumbprint, deviceScope, parentScopes}
 *   new certificate, device present  -> secondary := new, then primary := new, secondary := old
 *                                       (both keep working in between: the device never drops)
 *   certificate revoked, none active -> status := disabled
 *   device decommissioned            -> delete
 */
import { createHash, X509Certificate } from 'node:crypto';
import type { Logger } from 'pino';
import type { AuthorityStore, CertificateRow } from '../store/index.ts';

/** The part of azure-iothub's Registry this connector uses (promise forms). */
export interface HubRegistry {
  create(device: Record<string, unknown>): Promise<{ responseBody: HubDevice }>;
  update(device: Record<string, unknown>): Promise<{ responseBody: HubDevice }>;
  get(deviceId: string): Promise<{ responseBody: HubDevice }>;
  delete(deviceId: string): Promise<unknown>;
}

export interface HubDevice {
  deviceId: string;
  etag?: string;
  status?: string;
  deviceScope?: string;
  parentScopes?: string[];
  authentication?: { type?: string; x509Thumbprint?: { primaryThumbprint?: string | null; secondaryThumbprint?: string | null } };
  capabilities?: { iotEdge?: boolean };
}

export interface IotHubConnectorOptions {
  registry: HubRegistry;
  store: AuthorityStore;
  logger: Logger;
  /** selfSigned: thumbprints per device; certificateAuthority: the hub trusts our device CA. */
  authentication: (deviceGroup: string) => 'selfSigned' | 'certificateAuthority';
  /** IoT Hub id of the edge device for a gateway (default: the gateway id). */
  edgeDeviceId?: (gatewayId: string) => string;
  pollMs?: number;
  maxBackoffMs?: number;
  now?: () => number;
}

/** SHA-256 of the DER, upper-case hex: the thumbprint form IoT Hub accepts. */
export function thumbprint(pem: string): string {
  return createHash('sha256').update(new X509Certificate(pem).raw).digest('hex').toUpperCase();
}

interface HubError extends Error {
  responseBody?: unknown;
  response?: { statusCode?: number; headers?: Record<string, string | string[] | undefined> };
  statusCode?: number;
}

function statusOf(err: HubError): number | undefined {
  return err.response?.statusCode ?? err.statusCode;
}

export class IotHubConnector {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | null = null;
  private backoffUntil = 0;
  private failures = 0;
  private readonly scopes = new Map<string, string>();

  constructor(private readonly opts: IotHubConnectorOptions) {}

  private now(): number {
    return this.opts.now?.() ?? Date.now();
  }

  start(): void {
    this.timer = setInterval(() => void this.sync(), this.opts.pollMs ?? 1000);
    this.timer.unref();
    void this.sync();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  /** One pass over pending work; concurrent calls share it. Resolves when done or backing off. */
  sync(): Promise<void> {
    this.running ??= this.pass().finally(() => {
      this.running = null;
    });
    return this.running;
  }

  private async pass(): Promise<void> {
    if (this.now() < this.backoffUntil) return;
    try {
      for (const cert of await this.opts.store.listHubPending(50)) await this.syncCertificate(cert);
      for (const deviceId of await this.opts.store.listHubDecommissioned(50)) {
        await this.call('iothub-delete', deviceId, () => this.opts.registry.delete(deviceId), [404]);
        await this.opts.store.setDeviceHubState(deviceId, 'deleted');
      }
      this.failures = 0;
    } catch (err) {
      const e = err as HubError;
      const status = statusOf(e);
      const retryAfter = Number([e.response?.headers?.['retry-after']].flat()[0]);
      const backoff = Math.min(this.opts.maxBackoffMs ?? 60_000, 500 * 2 ** this.failures++);
      this.backoffUntil = this.now() + Math.max(Number.isFinite(retryAfter) ? retryAfter * 1000 : 0, backoff);
      this.opts.logger.warn({ status, err: e.message, retryInMs: this.backoffUntil - this.now() }, 'IoT Hub sync paused');
    }
  }

  /** Audits one hub call; statuses in `tolerated` count as done (e.g. 404 on delete). */
  private async call<T>(action: string, deviceId: string, fn: () => Promise<T>, tolerated: number[] = []): Promise<T | null> {
    const at = this.now();
    try {
      const r = await fn();
      await this.opts.store.appendAudit({ at, action, outcome: 'ok', deviceId });
      return r;
    } catch (err) {
      const status = statusOf(err as HubError);
      if (status !== undefined && tolerated.includes(status)) {
        await this.opts.store.appendAudit({ at, action, outcome: 'ok', deviceId, detail: { status } });
        return null;
      }
      await this.opts.store.appendAudit({ at, action, outcome: 'error', code: 'authority_unavailable', deviceId, detail: { status: status ?? null, message: (err as Error).message } });
      throw err;
    }
  }

  private async edgeScope(gatewayId: string): Promise<string> {
    const edgeId = (this.opts.edgeDeviceId ?? ((g) => g))(gatewayId);
    let scope = this.scopes.get(edgeId);
    if (!scope) {
      const edge = await this.call('iothub-get-edge', edgeId, () => this.opts.registry.get(edgeId));
      scope = edge?.responseBody.deviceScope;
      if (!scope) throw Object.assign(new Error(`edge device ${edgeId} has no deviceScope (is it an IoT Edge device?)`), { statusCode: 409 });
      this.scopes.set(edgeId, scope);
    }
    return scope;
  }

  private async syncCertificate(cert: CertificateRow): Promise<void> {
    const deviceId = cert.subjectId;
    const device = await this.opts.store.getDevice(deviceId);
    if (!device) return this.opts.store.markHubSynced(cert.serial, this.now(), 'device row missing');
    if (cert.status === 'superseded') return this.opts.store.markHubSynced(cert.serial, this.now());
    if (cert.status === 'revoked') {
      const stillActive = (await this.opts.store.listCertificates({ subjectId: deviceId, status: 'active' })).length;
      if (!stillActive && device.hubState !== 'deleted') {
        const current = await this.call('iothub-get', deviceId, () => this.opts.registry.get(deviceId), [404]);
        if (current) {
          await this.call('iothub-disable', deviceId, () => this.opts.registry.update({ ...current.responseBody, status: 'disabled' }));
          await this.opts.store.setDeviceHubState(deviceId, 'disabled');
        }
      }
      return this.opts.store.markHubSynced(cert.serial, this.now());
    }

    const auth = this.opts.authentication(device.groupName);
    const thumb = thumbprint(cert.pem);
    const scope = device.gatewayId ? await this.edgeScope(device.gatewayId) : undefined;
    const scopes = scope ? { deviceScope: scope, parentScopes: [scope] } : {};
    const existing = await this.call('iothub-get', deviceId, () => this.opts.registry.get(deviceId), [404]);
    if (!existing) {
      const body = auth === 'selfSigned'
        ? { deviceId, status: 'enabled', authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: thumb, secondaryThumbprint: thumb } }, ...scopes }
        : { deviceId, status: 'enabled', authentication: { type: 'certificateAuthority' }, ...scopes };
      await this.call('iothub-create', deviceId, () => this.opts.registry.create(body));
    } else if (auth === 'selfSigned') {
      const old = existing.responseBody.authentication?.x509Thumbprint?.primaryThumbprint ?? thumb;
      if (old !== thumb) {
        // Roll over in two steps so that the old and the new certificate both work throughout.
        const step1 = await this.call('iothub-update', deviceId, () =>
          this.opts.registry.update({ ...existing.responseBody, status: 'enabled', authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: old, secondaryThumbprint: thumb } }, ...scopes }),
        );
        await this.call('iothub-update', deviceId, () =>
          this.opts.registry.update({ ...(step1?.responseBody ?? existing.responseBody), status: 'enabled', authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: thumb, secondaryThumbprint: old } }, ...scopes }),
        );
      } else if (existing.responseBody.status !== 'enabled') {
        await this.call('iothub-update', deviceId, () => this.opts.registry.update({ ...existing.responseBody, status: 'enabled', ...scopes }));
      }
    } else if (existing.responseBody.status !== 'enabled') {
      await this.call('iothub-update', deviceId, () => this.opts.registry.update({ ...existing.responseBody, status: 'enabled', ...scopes }));
    }
    await this.opts.store.setDeviceHubState(deviceId, 'present');
    await this.opts.store.markHubSynced(cert.serial, this.now());
  }
}
