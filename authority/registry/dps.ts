/**
 * DPS connector (azure-iot-provisioning-service), per configuration:
 *   individual: one X.509 individual enrollment per device (its current certificate);
 *               renewal replaces it, revocation disables it, decommission deletes it;
 *   group:      one enrollment group on leafgate's device CA, so every device certificate
 *               the authority issues can provision (revocation is then the CRL's job).
 */
import azureProvisioning from 'azure-iot-provisioning-service';
import https from 'node:https';
import type { CertificateRow } from '../store/index.ts';
import { RegistrySync, statusOf, type RegistrySyncOptions } from './sync.ts';

const { ProvisioningServiceClient } = azureProvisioning;

/** The part of ProvisioningServiceClient this connector uses. */
export interface DpsClient {
  createOrUpdateIndividualEnrollment(e: Record<string, unknown>): Promise<{ responseBody: Record<string, any> }>;
  getIndividualEnrollment(id: string): Promise<{ responseBody: Record<string, any> }>;
  deleteIndividualEnrollment(id: string): Promise<unknown>;
  createOrUpdateEnrollmentGroup(g: Record<string, unknown>): Promise<{ responseBody: Record<string, any> }>;
  getEnrollmentGroup(id: string): Promise<{ responseBody: Record<string, any> }>;
}

export interface DpsConnectorOptions extends RegistrySyncOptions {
  client: DpsClient;
  mode: 'individual' | 'group';
  /** Device CA PEM (group mode). */
  deviceCaPem: string;
  groupId?: string;
  /** Hub the enrollments provision into (optional; DPS allocation policy otherwise). */
  iotHubHostName?: string;
}

/** Same single private hook as the IoT Hub adapter: the REST client's HTTP agent. */
export function createDpsClient(connectionString: string, local?: { host: string; port: number; ca: string }): DpsClient {
  const client = ProvisioningServiceClient.fromConnectionString(connectionString);
  if (local) {
    // Agent options (host, port, ca) override the request's: sockets go to the local
    // endpoint while Host, SNI and the certificate check stay on the DPS host name.
    const agent = new https.Agent({ keepAlive: true, host: local.host, port: local.port, ca: local.ca });
    (client as unknown as { _restApiClient: { setOptions(o: unknown): void } })._restApiClient.setOptions({ http: { agent } });
  }
  return client as unknown as DpsClient;
}

/**
 * DPS refuses to replace an existing enrollment without its ETag (If-Match): the REST API's
 * Create Or Update takes `If-Match: <etag of the enrollment record>` (Individual Enrollment -
 * Create Or Update, api-version 2021-10-01), and the SDK sends it when the object carries
 * `etag`. So every write reads first: absent -> create (no etag; 409 if someone created it
 * meanwhile), present -> write with its etag (412 if it changed meanwhile); both re-read.
 */
export class DpsConnector extends RegistrySync {
  private groupDone = false;

  constructor(private readonly opts: DpsConnectorOptions) {
    super(opts, 'dps');
  }

  /** Reads, merges and writes one record with its etag; retries 409/412 by reading again. */
  private async upsert(
    action: string,
    id: string,
    read: () => Promise<{ responseBody: Record<string, any> }>,
    write: (e: Record<string, unknown>) => Promise<unknown>,
    desired: (current: Record<string, any> | null) => Record<string, unknown> | null,
  ): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      const current = (await this.call(`${action}-read`, id, read, [404]))?.responseBody ?? null;
      const next = desired(current);
      if (!next) return; // already as wanted
      try {
        await this.call(action, id, () => write(current?.etag ? { ...next, etag: current.etag } : next));
        return;
      } catch (err) {
        const s = statusOf(err);
        if ((s !== 409 && s !== 412) || attempt >= 3) throw err;
      }
    }
  }

  protected override async prepare(): Promise<void> {
    if (this.opts.mode !== 'group' || this.groupDone) return;
    const id = this.opts.groupId ?? 'leafgate-device-ca';
    const client = this.opts.client;
    await this.upsert('dps-group', id, () => client.getEnrollmentGroup(id), (g) => client.createOrUpdateEnrollmentGroup(g), (cur) => {
      const same = cur && cur.attestation?.x509?.signingCertificates?.primary?.certificate === this.opts.deviceCaPem && cur.provisioningStatus === 'enabled' &&
        (!this.opts.iotHubHostName || cur.iotHubHostName === this.opts.iotHubHostName);
      if (same) return null;
      return {
        ...(cur ?? {}),
        enrollmentGroupId: id,
        attestation: { type: 'x509', x509: { signingCertificates: { primary: { certificate: this.opts.deviceCaPem } } } },
        provisioningStatus: 'enabled',
        ...(this.opts.iotHubHostName ? { iotHubHostName: this.opts.iotHubHostName } : {}),
      };
    });
    this.groupDone = true;
  }

  protected async removeDevice(deviceId: string): Promise<void> {
    if (this.opts.mode === 'individual') await this.call('dps-delete', deviceId, () => this.opts.client.deleteIndividualEnrollment(deviceId), [404]);
  }

  protected async syncCertificate(cert: CertificateRow): Promise<void> {
    const store = this.opts.store;
    const deviceId = cert.subjectId;
    if (this.opts.mode === 'group' || cert.status === 'superseded') return this.synced(cert);
    const active = await store.listCertificates({ subjectId: deviceId, status: 'active', limit: 1 });
    if (cert.status === 'revoked' && active.length) return this.synced(cert);
    const device = await store.getDevice(deviceId);
    const client = this.opts.client;
    let state: 'present' | 'disabled' = cert.status === 'revoked' ? 'disabled' : 'present';
    await this.upsert(cert.status === 'revoked' ? 'dps-disable' : 'dps-enroll', deviceId, () => client.getIndividualEnrollment(deviceId), (e) => client.createOrUpdateIndividualEnrollment(e), (cur) => {
      let status: string;
      if (cert.status === 'revoked') {
        if (!cur) return null; // nothing to disable
        // Disabled already by an operator: leave it and do not claim it as leafgate's.
        if (cur.provisioningStatus === 'disabled') {
          if (device?.dpsState !== 'disabled') state = 'present';
          return null;
        }
        status = 'disabled';
      } else {
        // Keep an operator's "disabled"; enable only what leafgate disabled (revocation).
        status = cur?.provisioningStatus === 'disabled' && device?.dpsState !== 'disabled' ? 'disabled' : 'enabled';
      }
      const sameCert = cur?.attestation?.x509?.clientCertificates?.primary?.certificate === cert.pem;
      if (cur && sameCert && cur.provisioningStatus === status) return null;
      return {
        ...(cur ?? {}),
        registrationId: deviceId,
        deviceId,
        attestation: { type: 'x509', x509: { clientCertificates: { primary: { certificate: cert.pem } } } },
        provisioningStatus: status,
        ...(this.opts.iotHubHostName ? { iotHubHostName: this.opts.iotHubHostName } : {}),
      };
    });
    await store.setDeviceHubState(deviceId, state, 'dps');
    await this.synced(cert);
  }
}
