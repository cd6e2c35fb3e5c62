/**
 * The admin API for operators (`leafgate authority devices|certs|revoke|policies|audit`).
 * Its own credential: a bearer token, compared in constant time against its SHA-256; the
 * token is never logged. Every mutating call is audited with actor `admin`.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { LeafgateError, isValidDeviceId, pkix } from '../../protocol/index.ts';
import type { DevicePolicy } from '../policy/index.ts';
import type { Revocation } from '../revocation.ts';
import type { AuthorityStore, CertificateRow } from '../store/index.ts';

export interface AdminDeps {
  store: AuthorityStore;
  revocation: Revocation;
  policies: Record<string, DevicePolicy>;
  /** SHA-256 of the admin token. */
  adminTokenHash: Buffer;
}

export const hashAdminToken = (token: string) => createHash('sha256').update(`leafgate-admin\n${token}`).digest();

const certView = (c: CertificateRow) => ({
  serial: c.serial, subject: c.subjectId, kind: c.kind, status: c.status, notBefore: new Date(c.notBefore).toISOString(), notAfter: new Date(c.notAfter).toISOString(),
  revokedAt: c.revokedAt ? new Date(c.revokedAt).toISOString() : null, revocationReason: c.revocationReason, fingerprint: c.fingerprint,
});

const limitOf = (q: Record<string, string | undefined>) => {
  const n = q.limit === undefined ? 100 : Number(q.limit);
  if (!Number.isInteger(n) || n < 1 || n > 10_000) throw new LeafgateError('bad_request', 'limit must be 1..10000');
  return n;
};

export function registerAdminRoutes(app: FastifyInstance, deps: AdminDeps): void {
  app.register(async (admin) => {
    admin.addHook('onRequest', async (req: FastifyRequest) => {
      const header = req.headers.authorization ?? '';
      const token = header.startsWith('Bearer ') ? header.slice(7) : '';
      if (!token || !timingSafeEqual(hashAdminToken(token), deps.adminTokenHash)) throw new LeafgateError('not_authenticated', 'admin token required');
    });

    admin.get('/admin/v1/devices', async (req) => {
      const q = req.query as Record<string, string | undefined>;
      // Devices whose cloud registry sync is parked after too many failed attempts.
      if (q.status === 'sync-failed') return syncFailed(deps, q);
      const devices = await deps.store.listDevices({ status: q.status, group: q.group, limit: limitOf(q) });
      return devices.map((d) => ({ id: d.id, group: d.groupName, method: d.method, status: d.status, gateway: d.gatewayId, createdAt: new Date(d.createdAt).toISOString(), updatedAt: new Date(d.updatedAt).toISOString() }));
    });

    admin.get('/admin/v1/certs', async (req) => {
      const q = req.query as Record<string, string | undefined>;
      let expiringBefore: number | undefined;
      if (q.expiring !== undefined) {
        const m = /^(\d{1,5})([dh])$/.exec(q.expiring);
        if (!m) throw new LeafgateError('bad_request', 'expiring must look like 7d or 12h');
        expiringBefore = Date.now() + Number(m[1]) * (m[2] === 'd' ? 86_400_000 : 3_600_000);
      }
      if (q.device !== undefined && !isValidDeviceId(q.device)) throw new LeafgateError('invalid_device_id');
      const certs = await deps.store.listCertificates({ subjectId: q.device, status: q.status ?? (expiringBefore ? 'active' : undefined), kind: q.kind, expiringBefore, limit: limitOf(q) });
      return certs.map(certView);
    });

    admin.post('/admin/v1/revoke', { schema: { body: { type: 'object' } } }, async (req) => {
      const b = req.body as Record<string, unknown>;
      const reason = (b.reason ?? 'unspecified') as pkix.RevocationReason;
      if (typeof reason !== 'string' || !(reason in pkix.REVOCATION_REASONS)) throw new LeafgateError('bad_request', `reason must be one of ${Object.keys(pkix.REVOCATION_REASONS).join(', ')}`);
      if (typeof b.serial === 'string' && /^[0-9A-Fa-f:]{2,64}$/.test(b.serial)) return [await deps.revocation.revokeSerial(b.serial, reason, 'admin')];
      // A certificate of the external issuing CA (EST) as PEM, on record or not (issued outside
      // leafgate, an orphan): checked to be that CA's, recorded revoked, refused by the gateways.
      if (typeof b.certificate === 'string') {
        if (b.certificate.length > 64 * 1024) throw new LeafgateError('bad_request', 'certificate is larger than 64 KiB');
        return [await deps.revocation.revokeCertificatePem(b.certificate, reason, 'admin')];
      }
      if (typeof b.device === 'string') return revokeDevice(deps, b.device, reason, b.decommission === true);
      if (typeof b.gateway === 'string') return revokeGateway(deps, b.gateway, reason);
      throw new LeafgateError('bad_request', 'give serial (hex), device, gateway or certificate (PEM of the external issuing CA)');
    });

    admin.get('/admin/v1/sync', async (req) => syncFailed(deps, req.query as Record<string, string | undefined>));

    /** Un-parks failed rows (all of a target, or one device's) for a fresh set of attempts. */
    admin.post('/admin/v1/sync/retry', { schema: { body: { type: 'object' } } }, async (req) => {
      const b = req.body as Record<string, unknown>;
      const target = b.target ?? 'hub';
      if (target !== 'hub' && target !== 'dps') throw new LeafgateError('bad_request', 'target must be hub or dps');
      if (b.device !== undefined && (typeof b.device !== 'string' || !isValidDeviceId(b.device))) throw new LeafgateError('invalid_device_id');
      const n = await deps.store.retrySyncFailed(target, b.device as string | undefined);
      await deps.store.appendAudit({ at: Date.now(), action: 'sync-retry', outcome: 'ok', deviceId: (b.device as string | undefined) ?? null, detail: { target, rows: n, actor: 'admin' } });
      return { retried: n };
    });

    admin.get('/admin/v1/policies', async () => deps.policies);

    admin.get('/admin/v1/audit', async (req) => {
      const q = req.query as Record<string, string | undefined>;
      if (q.device !== undefined && !isValidDeviceId(q.device)) throw new LeafgateError('invalid_device_id');
      const rows = await deps.store.listAudit({ deviceId: q.device, limit: limitOf(q) });
      return rows.map((r) => ({ ...r, at: new Date(r.at).toISOString() }));
    });
  });
}

async function syncFailed(deps: AdminDeps, q: Record<string, string | undefined>) {
  if (q.target !== undefined && q.target !== 'hub' && q.target !== 'dps') throw new LeafgateError('bad_request', 'target must be hub or dps');
  const rows = await deps.store.listSyncFailed({ target: q.target as 'hub' | 'dps' | undefined, limit: limitOf(q) });
  return rows.map((r) => ({ id: r.deviceId, status: 'sync-failed', target: r.target, serial: r.serial, certStatus: r.status, attempts: r.attempts, failedAt: new Date(r.failedAt).toISOString(), error: r.error }));
}

/** Revokes every active certificate of a device; decommission also disables the device. */
async function revokeDevice(deps: AdminDeps, deviceId: string, reason: pkix.RevocationReason, decommission: boolean) {
  if (!isValidDeviceId(deviceId)) throw new LeafgateError('invalid_device_id');
  const device = await deps.store.getDevice(deviceId);
  if (!device) throw new LeafgateError('unknown_device');
  const active = await deps.store.listCertificates({ subjectId: deviceId, status: 'active', kind: 'device' });
  const out = [];
  for (const c of active) out.push(await deps.revocation.revokeSerial(c.serial, reason, 'admin'));
  if (decommission) {
    const now = Date.now();
    await deps.store.updateDevice(deviceId, { status: 'disabled' }, now);
    await deps.store.appendAudit({ at: now, action: 'decommission', outcome: 'ok', deviceId, detail: { revoked: out.length, actor: 'admin' } });
  }
  return out;
}

/**
 * Shuts a gateway out: disabled first (the authority refuses its next request, whatever
 * certificate it presents), then its identity certificates and its Sub-CA revoked, so that
 * devices and IoT Edge see it in the CRLs too.
 */
async function revokeGateway(deps: AdminDeps, gatewayId: string, reason: pkix.RevocationReason) {
  if (!isValidDeviceId(gatewayId)) throw new LeafgateError('invalid_device_id', 'gateway id is not allowed');
  const gateway = await deps.store.getGateway(gatewayId);
  if (!gateway) throw new LeafgateError('unknown_gateway', `no gateway ${gatewayId}`);
  await deps.store.setGatewayStatus(gatewayId, 'disabled', { at: Date.now(), action: 'disable-gateway', outcome: 'ok', gatewayId, detail: { reason, actor: 'admin' } });
  const out = [];
  for (const kind of ['gateway', 'subca', 'edge-identity'] as const) {
    for (const c of await deps.store.listCertificates({ subjectId: gatewayId, status: 'active', kind })) out.push(await deps.revocation.revokeSerial(c.serial, reason, 'admin'));
  }
  return out;
}
