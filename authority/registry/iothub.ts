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
import type { CertificateRow } from '../store/index.ts';
import { RegistrySync, type RegistrySyncOptions } from './sync.ts';

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

export interface IotHubConnectorOptions extends RegistrySyncOptions {
  registry: HubRegistry;
  /** selfSigned: thumbprints per device; certificateAuthority: the hub trusts our device CA. */
  authentication: (deviceGroup: string) => 'selfSigned' | 'certificateAuthority';
  /** IoT Hub id of the edge device for a gateway (default: the gateway id). */
  edgeDeviceId?: (gatewayId: string) => string;
}

/** SHA-256 of the DER, upper-case hex: the thumbprint form IoT Hub accepts. */
export function thumbprint(pem: string): string {
  return createHash('sha256').update(new X509Certificate(pem).raw).digest('hex').toUpperCase();
}

export class IotHubConnector extends RegistrySync {
  private readonly scopes = new Map<string, string>();

  constructor(private readonly opts: IotHubConnectorOptions) {
    super(opts, 'hub');
  }

  protected async removeDevice(deviceId: string): Promise<void> {
    await this.call('iothub-delete', deviceId, () => this.opts.registry.delete(deviceId), [404]);
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

  protected async syncCertificate(cert: CertificateRow): Promise<void> {
    const deviceId = cert.subjectId;
    const device = await this.opts.store.getDevice(deviceId);
    if (!device) return this.opts.store.markHubSynced(cert.serial, this.now(), 'device row missing', 'hub', cert.status);
    if (cert.status === 'superseded') return this.opts.store.markHubSynced(cert.serial, this.now(), undefined, 'hub', cert.status);
    if (cert.status === 'revoked') {
      const stillActive = (await this.opts.store.listCertificates({ subjectId: deviceId, status: 'active' })).length;
      if (!stillActive && device.hubState !== 'deleted') {
        const current = await this.call('iothub-get', deviceId, () => this.opts.registry.get(deviceId), [404]);
        if (current) {
          await this.call('iothub-disable', deviceId, () => this.opts.registry.update({ ...current.responseBody, status: 'disabled' }));
          await this.opts.store.setDeviceHubState(deviceId, 'disabled');
        }
      }
      return this.opts.store.markHubSynced(cert.serial, this.now(), undefined, 'hub', cert.status);
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
    await this.opts.store.markHubSynced(cert.serial, this.now(), undefined, 'hub', cert.status);
  }
}
