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
import { RegistrySync, type RegistrySyncOptions } from './sync.ts';

const { ProvisioningServiceClient } = azureProvisioning;

/** The part of ProvisioningServiceClient this connector uses. */
export interface DpsClient {
  createOrUpdateIndividualEnrollment(e: Record<string, unknown>): Promise<{ responseBody: Record<string, any> }>;
  getIndividualEnrollment(id: string): Promise<{ responseBody: Record<string, any> }>;
  deleteIndividualEnrollment(id: string): Promise<unknown>;
  createOrUpdateEnrollmentGroup(g: Record<string, unknown>): Promise<{ responseBody: Record<string, any> }>;
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

export class DpsConnector extends RegistrySync {
  private groupDone = false;

  constructor(private readonly opts: DpsConnectorOptions) {
    super(opts, 'dps');
  }

  protected override async prepare(): Promise<void> {
    if (this.opts.mode !== 'group' || this.groupDone) return;
    const id = this.opts.groupId ?? 'leafgate-device-ca';
    await this.call('dps-group', id, () => this.opts.client.createOrUpdateEnrollmentGroup({
      enrollmentGroupId: id,
      attestation: { type: 'x509', x509: { signingCertificates: { primary: { certificate: this.opts.deviceCaPem } } } },
      provisioningStatus: 'enabled',
      ...(this.opts.iotHubHostName ? { iotHubHostName: this.opts.iotHubHostName } : {}),
    }));
    this.groupDone = true;
  }

  protected async removeDevice(deviceId: string): Promise<void> {
    if (this.opts.mode === 'individual') await this.call('dps-delete', deviceId, () => this.opts.client.deleteIndividualEnrollment(deviceId), [404]);
  }

  protected async syncCertificate(cert: CertificateRow): Promise<void> {
    const store = this.opts.store;
    const deviceId = cert.subjectId;
    if (this.opts.mode === 'group' || cert.status === 'superseded') return store.markHubSynced(cert.serial, this.now(), undefined, 'dps', cert.status);
    const active = await store.listCertificates({ subjectId: deviceId, status: 'active', limit: 1 });
    if (cert.status === 'revoked' && active.length) return store.markHubSynced(cert.serial, this.now(), undefined, 'dps', cert.status);
    await this.call(cert.status === 'revoked' ? 'dps-disable' : 'dps-enroll', deviceId, () => this.opts.client.createOrUpdateIndividualEnrollment({
      registrationId: deviceId,
      deviceId,
      attestation: { type: 'x509', x509: { clientCertificates: { primary: { certificate: cert.pem } } } },
      provisioningStatus: cert.status === 'revoked' ? 'disabled' : 'enabled',
      ...(this.opts.iotHubHostName ? { iotHubHostName: this.opts.iotHubHostName } : {}),
    }));
    await store.setDeviceHubState(deviceId, cert.status === 'revoked' ? 'disabled' : 'present', 'dps');
    await store.markHubSynced(cert.serial, this.now(), undefined, 'dps', cert.status);
  }
}
