/**
 * IoT Hub registry connector (azure-iothub): mirrors device certificates into the hub as
 * X.509 devices that are children of their edge gateway, so they can authenticate through
 * IoT Edge, also offline. Work is derived from the certificates table (rows not yet synced),
 * so nothing is lost if the authority stops between issuance and registration; each row
 * syncs on its own and the calls are paced under the hub's quota (see sync.ts).
 *
 *   new certificate, device never registered -> bulk create (Registry.addDevices, up to 100 a call)
 *                                               {x509Thumbprint, deviceScope, parentScopes}
 *   new certificate, device present          -> secondary := new, then primary := new, secondary := old
 *                                               (both keep working in between: the device never drops)
 *   certificate revoked, none active         -> status := disabled
 *   device decommissioned                    -> delete (Registry.removeDevices, bulk)
 *
 * Updates are conditional on the etag just read (Registry.updateDevices with forceUpdate=false,
 * import mode UpdateIfMatchETag), never `If-Match: *` (Registry.update sends that): a device
 * changed meanwhile answers 412 and is re-read. leafgate keeps the status it reads unless
 * leafgate set it: a device an operator disabled in the portal stays disabled at renewal;
 * one that leafgate disabled (revocation, devices.hub_state = 'disabled') is enabled again.
 *
 * The edge device's scope is cached per edge device and re-read when the hub refuses a child
 * with a 400 naming the scope or parent (the edge device was re-created: new generationId).
 */
import { createHash, X509Certificate } from 'node:crypto';
import type { CertificateRow, DeviceRow, PendingCertificateRow } from '../store/index.ts';
import { RegistrySync, isTargetWide, statusOf, type RegistrySyncOptions } from './sync.ts';

/** Result of a bulk registry call (BulkRegistryOperationResult of the REST API). */
export interface BulkResult {
  isSuccessful?: boolean;
  errors?: Array<{ deviceId?: string; errorCode?: string | number; errorStatus?: string }>;
  warnings?: unknown[];
}

/** The part of azure-iothub's Registry this connector uses (promise forms). */
export interface HubRegistry {
  create(device: Record<string, unknown>): Promise<{ responseBody: HubDevice }>;
  get(deviceId: string): Promise<{ responseBody: HubDevice }>;
  addDevices(devices: Array<Record<string, unknown>>): Promise<{ responseBody: BulkResult }>;
  updateDevices(devices: Array<Record<string, unknown>>, forceUpdate: boolean): Promise<{ responseBody: BulkResult }>;
  removeDevices(devices: Array<Record<string, unknown>>, forceRemove: boolean): Promise<{ responseBody: BulkResult }>;
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

/** Bulk is limited to 100 devices per call (Bulk Registry - Update Registry, REST API 2021-04-12). */
const BULK_MAX = 100;

/** A per-device error of a bulk call, with the HTTP status it stands for (so statusOf works). */
class DeviceOperationError extends Error {
  constructor(readonly statusCode: number, message: string) {
    super(message);
  }
}

const CODE_STATUS: Record<string, number> = {
  DeviceAlreadyExists: 409, PreconditionFailed: 412, DeviceNotFound: 404, ThrottlingException: 429, ThrottleBacklogLimitExceeded: 429, ServerError: 500, ServiceUnavailable: 503,
};

function deviceError(e: { errorCode?: string | number; errorStatus?: string }): DeviceOperationError {
  const code = e.errorCode;
  const status = typeof code === 'number' ? (code >= 100_000 ? Math.floor(code / 1000) : code) : /^\d{6}$/.test(String(code)) ? Math.floor(Number(code) / 1000) : (CODE_STATUS[String(code)] ?? 400);
  return new DeviceOperationError(status, `${String(code ?? 'error')}: ${e.errorStatus ?? ''}`.trim());
}

/** A 400 that names the device scope or parent: the cached edge scope is stale. */
function isScopeError(err: unknown): boolean {
  if (statusOf(err) !== 400) return false;
  const e = err as { message?: string; responseBody?: unknown };
  return /scope|parent/i.test(`${e.message ?? ''} ${typeof e.responseBody === 'string' ? e.responseBody : ''}`);
}

export class IotHubConnector extends RegistrySync {
  private readonly scopes = new Map<string, string>();

  constructor(private readonly opts: IotHubConnectorOptions) {
    super(opts, 'hub');
  }

  private edgeIdOf(gatewayId: string): string {
    return (this.opts.edgeDeviceId ?? ((g) => g))(gatewayId);
  }

  private async edgeScope(gatewayId: string): Promise<string> {
    const edgeId = this.edgeIdOf(gatewayId);
    let scope = this.scopes.get(edgeId);
    if (!scope) {
      const edge = await this.call('iothub-get-edge', edgeId, () => this.opts.registry.get(edgeId));
      scope = edge?.responseBody.deviceScope;
      if (!scope) throw new DeviceOperationError(409, `edge device ${edgeId} has no deviceScope (is it an IoT Edge device?)`);
      this.scopes.set(edgeId, scope);
    }
    return scope;
  }

  /**
   * One bulk registry call, paced and audited per device. Answers the per-device errors (a
   * 400 carrying a BulkRegistryOperationResult is per-device too); anything else is thrown.
   */
  private async bulk(action: string, deviceIds: string[], fn: () => Promise<{ responseBody: BulkResult }>): Promise<Map<string, DeviceOperationError>> {
    await this.opts.pacer?.take();
    const at = this.now();
    let result: BulkResult | undefined;
    try {
      result = (await fn()).responseBody;
    } catch (err) {
      const status = statusOf(err);
      if (status === 429) this.opts.onThrottled?.();
      const body = (err as { responseBody?: unknown }).responseBody;
      let parsed: BulkResult | undefined;
      try {
        parsed = typeof body === 'string' ? JSON.parse(body) : (body as BulkResult | undefined);
      } catch {
        parsed = undefined;
      }
      if (status !== 400 || !Array.isArray(parsed?.errors) || !parsed.errors.length) {
        for (const id of deviceIds) await this.opts.store.appendAudit({ at, action, outcome: 'error', code: 'authority_unavailable', deviceId: id, detail: { status: status ?? null, message: (err as Error).message, bulk: true } });
        throw err;
      }
      result = parsed;
    }
    const errors = new Map<string, DeviceOperationError>();
    for (const e of result?.errors ?? []) if (e.deviceId) errors.set(e.deviceId, deviceError(e));
    for (const id of deviceIds) {
      const e = errors.get(id);
      await this.opts.store.appendAudit(e
        ? { at, action, outcome: 'error', code: 'authority_unavailable', deviceId: id, detail: { status: e.statusCode, message: e.message, bulk: true } }
        : { at, action, outcome: 'ok', deviceId: id, detail: { bulk: deviceIds.length } });
    }
    return errors;
  }

  /** A conditional update of one device (import mode UpdateIfMatchETag); throws its error. */
  private async updateOne(action: string, device: Record<string, unknown>): Promise<void> {
    const id = device.deviceId as string;
    const e = (await this.bulk(action, [id], () => this.opts.registry.updateDevices([device], false))).get(id);
    if (e) throw e;
  }

  protected async removeDevice(deviceId: string): Promise<void> {
    await this.removeDevices([deviceId]);
  }

  protected override async removeDevices(deviceIds: string[]): Promise<void> {
    for (let i = 0; i < deviceIds.length; i += BULK_MAX) {
      const ids = deviceIds.slice(i, i + BULK_MAX);
      const errors = await this.bulk('iothub-delete', ids, () => this.opts.registry.removeDevices(ids.map((deviceId) => ({ deviceId })), true));
      for (const id of ids) {
        const e = errors.get(id);
        if (!e || e.statusCode === 404) await this.opts.store.setDeviceHubState(id, 'deleted', 'hub');
        else this.opts.logger.warn({ deviceId: id, status: e.statusCode, err: e.message }, 'iothub delete failed; retried next pass');
      }
    }
  }

  private bodyFor(deviceId: string, auth: 'selfSigned' | 'certificateAuthority', thumb: string, scope: string | undefined): Record<string, unknown> {
    const scopes = scope ? { deviceScope: scope, parentScopes: [scope] } : {};
    return auth === 'selfSigned'
      ? { deviceId, status: 'enabled', authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: thumb, secondaryThumbprint: thumb } }, ...scopes }
      : { deviceId, status: 'enabled', authentication: { type: 'certificateAuthority' }, ...scopes };
  }

  /** New devices (never registered by leafgate) go in bulk creates; every other row on its own. */
  protected override async syncRows(rows: PendingCertificateRow[]): Promise<void> {
    const creates: Array<{ row: PendingCertificateRow; body: Record<string, unknown> }> = [];
    const later: PendingCertificateRow[] = [];
    for (const row of rows) {
      if (row.status === 'active') {
        const device = await this.opts.store.getDevice(row.subjectId);
        if (device && !device.hubState) {
          if (creates.some((c) => c.row.subjectId === row.subjectId)) {
            later.push(row);
            continue;
          }
          try {
            const scope = device.gatewayId ? await this.edgeScope(device.gatewayId) : undefined;
            creates.push({ row, body: this.bodyFor(row.subjectId, this.opts.authentication(device.groupName), thumbprint(row.pem), scope) });
          } catch (err) {
            if (isTargetWide(err)) throw err;
            await this.rowFailed(row, err);
          }
          continue;
        }
      }
      await this.syncRow(row);
    }
    for (let i = 0; i < creates.length; i += BULK_MAX) {
      const chunk = creates.slice(i, i + BULK_MAX);
      const ids = chunk.map((c) => c.row.subjectId);
      const errors = await this.bulk('iothub-create', ids, () => this.opts.registry.addDevices(chunk.map((c) => c.body)));
      for (const { row } of chunk) {
        const e = errors.get(row.subjectId);
        if (!e) {
          await this.opts.store.setDeviceHubState(row.subjectId, 'present', 'hub');
          await this.synced(row);
        } else if (isTargetWide(e)) {
          throw Object.assign(e, { response: { statusCode: e.statusCode, headers: {} } });
        } else if (e.statusCode === 409 || isScopeError(e)) {
          // Exists already (read and update it), or the edge scope is stale (re-read it).
          if (isScopeError(e)) this.forgetScopeOf(row.subjectId, chunk.find((c) => c.row === row)!.body);
          await this.syncRow(row);
        } else {
          await this.rowFailed(row, e);
        }
      }
    }
    for (const row of later) await this.syncRow(row);
  }

  private forgetScopeOf(_deviceId: string, body: Record<string, unknown>): void {
    for (const [edgeId, scope] of this.scopes) if (scope === body.deviceScope) this.scopes.delete(edgeId);
  }

  protected async syncCertificate(cert: CertificateRow): Promise<void> {
    const deviceId = cert.subjectId;
    const device = await this.opts.store.getDevice(deviceId);
    if (!device) return this.synced(cert, 'device row missing');
    if (cert.status === 'superseded') return this.synced(cert);
    if (cert.status === 'revoked') {
      const stillActive = (await this.opts.store.listCertificates({ subjectId: deviceId, status: 'active' })).length;
      if (!stillActive && device.hubState !== 'deleted') await this.disable(device);
      return this.synced(cert);
    }
    try {
      await this.writeActive(cert, device);
    } catch (err) {
      if (!device.gatewayId || !isScopeError(err)) throw err;
      // The edge device was re-created (new generationId, new scope): read it again, once.
      this.scopes.delete(this.edgeIdOf(device.gatewayId));
      await this.writeActive(cert, device);
    }
    await this.synced(cert);
  }

  /** Disables the device after its last certificate was revoked, unless it is disabled already. */
  private async disable(device: DeviceRow): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      const current = await this.call('iothub-get', device.id, () => this.opts.registry.get(device.id), [404]);
      if (!current) return;
      const cur = current.responseBody;
      // Already disabled: by an operator (leave the record saying so) or by leafgate earlier.
      if (cur.status === 'disabled') return;
      try {
        await this.updateOne('iothub-disable', { ...this.writable(cur), status: 'disabled' });
        await this.opts.store.setDeviceHubState(device.id, 'disabled', 'hub');
        return;
      } catch (err) {
        if (statusOf(err) !== 412 || attempt >= 3) throw err;
      }
    }
  }

  /** The fields of a read device that an update carries, with its etag as the condition. */
  private writable(cur: HubDevice): Record<string, unknown> {
    return {
      deviceId: cur.deviceId, eTag: cur.etag, status: cur.status, authentication: cur.authentication, capabilities: cur.capabilities,
      ...(cur.deviceScope ? { deviceScope: cur.deviceScope } : {}), ...(cur.parentScopes ? { parentScopes: cur.parentScopes } : {}),
    };
  }

  private async writeActive(cert: CertificateRow, device: DeviceRow): Promise<void> {
    const deviceId = cert.subjectId;
    const auth = this.opts.authentication(device.groupName);
    const thumb = thumbprint(cert.pem);
    const scope = device.gatewayId ? await this.edgeScope(device.gatewayId) : undefined;
    const scopes = scope ? { deviceScope: scope, parentScopes: [scope] } : {};
    for (let attempt = 0; ; attempt++) {
      try {
        const existing = await this.call('iothub-get', deviceId, () => this.opts.registry.get(deviceId), [404]);
        if (!existing) {
          await this.call('iothub-create', deviceId, () => this.opts.registry.create(this.bodyFor(deviceId, auth, thumb, scope)));
          break;
        }
        const cur = existing.responseBody;
        // Keep the status read, unless leafgate disabled the device itself (revocation): an
        // operator's "disabled" in the portal is theirs to lift.
        const status = cur.status === 'disabled' && device.hubState === 'disabled' ? 'enabled' : (cur.status ?? 'enabled');
        const scopeChanged = scope !== undefined && (cur.deviceScope !== scope || cur.parentScopes?.[0] !== scope);
        if (auth === 'selfSigned') {
          const old = cur.authentication?.x509Thumbprint?.primaryThumbprint ?? thumb;
          if (old !== thumb) {
            // Roll over in two steps so that the old and the new certificate both work throughout.
            await this.updateOne('iothub-update', { ...this.writable(cur), status, authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: old, secondaryThumbprint: thumb } }, ...scopes });
            const step1 = await this.call('iothub-get', deviceId, () => this.opts.registry.get(deviceId));
            await this.updateOne('iothub-update', { ...this.writable(step1!.responseBody), status, authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: thumb, secondaryThumbprint: old } }, ...scopes });
            break;
          }
        }
        if (status !== cur.status || scopeChanged) await this.updateOne('iothub-update', { ...this.writable(cur), status, ...scopes });
        break;
      } catch (err) {
        // 409: created meanwhile (e.g. by the bulk create); 412: changed since read. Read again.
        const s = statusOf(err);
        if ((s !== 409 && s !== 412) || attempt >= 3) throw err;
      }
    }
    await this.opts.store.setDeviceHubState(deviceId, 'present', 'hub');
  }
}
