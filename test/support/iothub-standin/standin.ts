/**
 * A local, wire-level Azure IoT Hub stand-in for tests: the REAL azure-iothub and
 * azure-iot-device(-mqtt) clients talk to it over TLS on 127.0.0.1 (ports chosen by the OS).
 *
 * - HTTPS registry REST surface (http.ts): devices, modules, twins, direct methods, with SAS
 *   verification on every request, IoT Hub's status codes and error bodies, request log and
 *   fault injection.
 * - MQTT device/module surface on aedes (mqtt.ts): the `{hub}/{device}[/{module}]/?api-version=`
 *   username, SAS or X.509 authentication, twin GET / reported PATCH / desired push, direct
 *   methods, telemetry and module output events.
 *
 * State is in memory and shared by both surfaces (a device disabled over REST loses its MQTT
 * session, a desired patch over REST reaches the connected module, ...).
 */
import { EventEmitter } from 'node:events';
import type { IncomingHttpHeaders } from 'node:http';
import {
  HubError,
  NEVER,
  isPlainObject,
  findBadPropertyName,
  mergePatch,
  newGenerationId,
  newIdentityEtag,
  newSymmetricKey,
  newTwin,
  newTwinEtag,
  normalizeAuthentication,
  unquoteEtag,
  validIdentityId,
  type DeviceRecord,
  type Json,
  type JsonObject,
  type ModuleRecord,
  type TwinState,
} from './model.ts';
import { createTestCa, issueServerCert, type TestCa } from './pki.ts';
import { startRegistryServer, type RegistryServer } from './http.ts';
import { startMqttSurface, type MqttSurface } from './mqtt.ts';

export type Right = 'RegistryRead' | 'RegistryWrite' | 'ServiceConnect' | 'DeviceConnect';

export interface Policy {
  name: string;
  primaryKey: string;
  secondaryKey: string;
  rights: ReadonlySet<Right>;
}

export interface RecordedRequest {
  method: string;
  /** Path without the query, as sent (still url-encoded), e.g. `/devices/leaf-1`. */
  path: string;
  query: Record<string, string>;
  /** Node's lower-cased request headers. */
  headers: IncomingHttpHeaders;
  /** Parsed JSON body (or the raw text when it is not JSON; undefined when empty). */
  body: unknown;
  /** Status the stand-in answered. */
  status: number;
  at: number;
}

export interface TelemetryMessage {
  deviceId: string;
  moduleId?: string;
  topic: string;
  /** `$.on` of a module output event (ModuleClient.sendOutputEvent). */
  outputName?: string;
  /** Application properties (topic property bag entries not starting with `$.`). */
  properties: Record<string, string>;
  /** System properties (`$.mid`, `$.cid`, `$.ct`, `$.ce`, `$.on`, ...). */
  systemProperties: Record<string, string>;
  body: Buffer;
  qos: number;
  at: number;
}

export interface MqttConnectRecord {
  clientId: string;
  username: string;
  deviceId?: string;
  moduleId?: string;
  apiVersion?: string;
  auth: 'sas' | 'x509' | 'none';
  accepted: boolean;
  /** CONNACK return code (0 = accepted). */
  returnCode: number;
  reason?: string;
  at: number;
}

export interface ReportedPatchEvent {
  deviceId: string;
  moduleId?: string;
  patch: JsonObject;
  version: number;
}

export interface Fault {
  remaining: number;
  status: number;
  headers: Record<string, string>;
  match?: (req: { method: string; path: string }) => boolean;
}

export interface MethodResult {
  status: number;
  payload: unknown;
}

export interface InvokeOptions {
  /** How long the hub waits for the device's answer (IoT Hub: responseTimeoutInSeconds, default 30 s). */
  responseTimeoutMs?: number;
  /** How long the hub waits for the device to be connected and subscribed (IoT Hub: connectTimeoutInSeconds, default 0). */
  connectTimeoutMs?: number;
}

export interface StandinOptions {
  /** Hub name: the first label of the host name (default `leafgate-standin`). */
  hubName?: string;
  /**
   * Host name the SDKs put in SAS tokens, MQTT user names and TLS SNI. It is never resolved:
   * the SDKs are pointed at 127.0.0.1. The default ends in `.invalid` (RFC 6761), so a client
   * that was NOT redirected fails at DNS instead of reaching a real hub.
   */
  hostName?: string;
  /** Address to listen on (default 127.0.0.1). */
  listenHost?: string;
  /** Extra CA certificates trusted for `certificateAuthority` X.509 devices. */
  trustedCas?: string[];
}

/** Endpoint of the registry REST surface, in the shape authority/registry/iothub-adapter.ts takes. */
export interface LocalHubEndpoint {
  host: string;
  port: number;
  ca: string;
}

const ALL_RIGHTS: Right[] = ['RegistryRead', 'RegistryWrite', 'ServiceConnect', 'DeviceConnect'];

export class IotHubStandin extends EventEmitter {
  readonly hubName: string;
  readonly hostName: string;
  readonly listenHost: string;
  /** Root CA (PEM) of the stand-in's TLS certificates: give it to the SDKs as `ca`. */
  readonly ca: string;
  /** @internal */ readonly testCa: TestCa;
  /** @internal */ readonly serverTls: { key: string; cert: string };
  /** @internal */ trustedCas: string[];

  /** Device identities by id, as GET /devices/{id} returns them. */
  readonly devices = new Map<string, DeviceRecord>();
  /** Module identities by `{deviceId}/{moduleId}`. */
  readonly modules = new Map<string, ModuleRecord>();
  /** Twins by `{deviceId}` or `{deviceId}/{moduleId}`. */
  readonly twins = new Map<string, TwinState>();
  /** Shared access policies (iothubowner, service, device, registryRead, registryReadWrite). */
  readonly policies = new Map<string, Policy>();
  /** Every registry REST request, in arrival order (also the refused and fault-injected ones). */
  readonly requests: RecordedRequest[] = [];
  /** Every device-to-cloud message (telemetry and module output events). */
  readonly telemetry: TelemetryMessage[] = [];
  /** Every MQTT CONNECT, accepted or not. */
  readonly connections: MqttConnectRecord[] = [];
  /** @internal */ readonly faults: Fault[] = [];

  private http!: RegistryServer;
  /** @internal */ mqtt!: MqttSurface;
  private closed = false;

  private constructor(opts: StandinOptions) {
    super();
    this.hubName = opts.hubName ?? 'leafgate-standin';
    this.hostName = opts.hostName ?? `${this.hubName}.azure-devices.invalid`;
    this.listenHost = opts.listenHost ?? '127.0.0.1';
    this.testCa = createTestCa(`${this.hubName} test root`);
    this.ca = this.testCa.cert;
    this.serverTls = issueServerCert(this.testCa, [this.hostName]);
    this.trustedCas = [...(opts.trustedCas ?? [])];
    const policy = (name: string, rights: Right[]) =>
      this.policies.set(name, { name, primaryKey: newSymmetricKey(), secondaryKey: newSymmetricKey(), rights: new Set(rights) });
    policy('iothubowner', ALL_RIGHTS);
    policy('service', ['ServiceConnect']);
    policy('device', ['DeviceConnect']);
    policy('registryRead', ['RegistryRead']);
    policy('registryReadWrite', ['RegistryRead', 'RegistryWrite']);
  }

  static async start(opts: StandinOptions = {}): Promise<IotHubStandin> {
    const s = new IotHubStandin(opts);
    s.http = await startRegistryServer(s);
    try {
      s.mqtt = await startMqttSurface(s);
    } catch (err) {
      await s.http.close();
      throw err;
    }
    return s;
  }

  // ---------------------------------------------------------------- endpoints and credentials

  /** HTTPS port of the registry REST surface. */
  get httpsPort(): number {
    return this.http.port;
  }

  /** MQTT-over-TLS port of the device surface. */
  get mqttPort(): number {
    return this.mqtt.port;
  }

  /** `{host, port, ca}` of the registry REST surface (what the Registry's HTTP agent must reach). */
  get registryEndpoint(): LocalHubEndpoint {
    return { host: this.listenHost, port: this.httpsPort, ca: this.ca };
  }

  /** `127.0.0.1:{port}`: the `GatewayHostName` that points azure-iot-device-mqtt at the MQTT surface. */
  get mqttGatewayHostName(): string {
    return `${this.listenHost.includes(':') ? `[${this.listenHost}]` : this.listenHost}:${this.mqttPort}`;
  }

  /** Service connection string: `HostName=...;SharedAccessKeyName=...;SharedAccessKey=...`. */
  connectionString(policyName = 'iothubowner'): string {
    const p = this.policies.get(policyName);
    if (!p) throw new Error(`no shared access policy ${policyName}`);
    return `HostName=${this.hostName};SharedAccessKeyName=${p.name};SharedAccessKey=${p.primaryKey}`;
  }

  /**
   * Device connection string with `GatewayHostName={127.0.0.1:port}` so that azure-iot-device-mqtt
   * connects here (its MQTT URI is `mqtts://{GatewayHostName || HostName}`). SAS devices only.
   */
  deviceConnectionString(deviceId: string): string {
    const key = this.getDevice(deviceId).authentication.symmetricKey.primaryKey;
    if (!key) throw new Error(`device ${deviceId} does not use SAS authentication`);
    return `HostName=${this.hostName};DeviceId=${deviceId};SharedAccessKey=${key};GatewayHostName=${this.mqttGatewayHostName}`;
  }

  /** Module connection string (SAS), with `GatewayHostName` as for devices. */
  moduleConnectionString(deviceId: string, moduleId: string): string {
    const key = this.getModule(deviceId, moduleId).authentication.symmetricKey.primaryKey;
    if (!key) throw new Error(`module ${deviceId}/${moduleId} does not use SAS authentication`);
    return `HostName=${this.hostName};DeviceId=${deviceId};ModuleId=${moduleId};SharedAccessKey=${key};GatewayHostName=${this.mqttGatewayHostName}`;
  }

  /** Trusts a CA for `certificateAuthority` devices (applies to new TLS handshakes). */
  trustCa(pem: string): void {
    this.trustedCas.push(pem);
    this.mqtt.refreshTls();
  }

  // ---------------------------------------------------------------- fault injection

  /**
   * The next `n` registry REST requests (matching `match`, if given) are answered with `status`
   * and an IoT Hub error body, before authentication and before any state change. `headers` are
   * added to the answer (e.g. `{ 'Retry-After': '2' }`). `n` may be Infinity (a hub that is down)
   * until `clearFaults()`.
   */
  failNext(n: number, status: number, headers: Record<string, string> = {}, match?: Fault['match']): void {
    this.faults.push({ remaining: n, status, headers, match });
  }

  /**
   * Enforces a rate on the registry REST surface, as IoT Hub does per tier and unit: a token
   * bucket of `perMinute` requests (bulk calls count one) with `burst` tokens; beyond it 429
   * ThrottlingException with Retry-After in seconds or as an HTTP-date. null turns it off.
   */
  setRateLimit(limit: { perMinute: number; burst?: number; retryAfter?: 'seconds' | 'http-date' } | null): void {
    this.rate = limit ? { ...limit, burst: limit.burst ?? 1, tokens: limit.burst ?? 1, last: Date.now() } : null;
  }

  private rate: { perMinute: number; burst: number; retryAfter?: 'seconds' | 'http-date'; tokens: number; last: number } | null = null;

  /** @internal null when the request may go on, else the headers of the 429. */
  takeRateToken(): Record<string, string> | null {
    const r = this.rate;
    if (!r) return null;
    const now = Date.now();
    const msPerToken = 60_000 / r.perMinute;
    r.tokens = Math.min(r.burst, r.tokens + (now - r.last) / msPerToken);
    r.last = now;
    if (r.tokens >= 1) {
      r.tokens -= 1;
      return null;
    }
    const waitMs = (1 - r.tokens) * msPerToken;
    return { 'Retry-After': r.retryAfter === 'http-date' ? new Date(now + Math.max(1000, waitMs)).toUTCString() : String(Math.max(1, Math.ceil(waitMs / 1000))) };
  }

  /** Device ids the hub refuses permanently with 400 (a poisoned device), with the message. */
  readonly refusedDevices = new Map<string, string>();

  refuseDevice(deviceId: string, message = `device ${deviceId} is refused by the test`): void {
    this.refusedDevices.set(deviceId, message);
  }

  /**
   * POST /devices: bulk create / update / delete of up to 100 devices (ExportImportDevice[]
   * with importMode create, update, updateIfMatchETag, delete, deleteIfMatchETag). Each
   * device succeeds or fails on its own; failures are listed in the result.
   */
  bulkDevices(body: unknown): { isSuccessful: boolean; errors: Array<{ deviceId: string; errorCode: string; errorStatus: string }>; warnings: unknown[] } {
    if (!Array.isArray(body) || body.length === 0 || body.length > 100) throw new HubError('ArgumentInvalid', 'the body must be an array of 1 to 100 devices');
    const ids = body.map((d) => (isPlainObject(d) ? d.id : undefined));
    if (new Set(ids).size !== ids.length) throw new HubError('ArgumentInvalid', 'a device may appear only once in a bulk operation');
    const errors: Array<{ deviceId: string; errorCode: string; errorStatus: string }> = [];
    for (const d of body) {
      if (!isPlainObject(d) || typeof d.id !== 'string') throw new HubError('ArgumentInvalid', 'every device needs an id');
      const { id, importMode, eTag, ...rest } = d as Record<string, unknown> & { id: string };
      try {
        const refused = this.refusedDevices.get(id);
        if (refused) throw new HubError('ArgumentInvalid', refused);
        const mode = String(importMode ?? 'createOrUpdate').toLowerCase();
        const tag = typeof eTag === 'string' && eTag ? eTag : undefined;
        if (mode === 'create') this.putDevice(id, { ...rest, deviceId: id }, undefined);
        else if (mode === 'update') this.putDevice(id, { ...rest, deviceId: id }, '*');
        else if (mode === 'updateifmatchetag') {
          if (!tag) throw new HubError('ArgumentInvalid', 'updateIfMatchETag needs an eTag');
          this.putDevice(id, { ...rest, deviceId: id }, tag);
        } else if (mode === 'delete') this.deleteDevice(id, '*');
        else if (mode === 'deleteifmatchetag') {
          if (!tag) throw new HubError('ArgumentInvalid', 'deleteIfMatchETag needs an eTag');
          this.deleteDevice(id, tag);
        } else throw new HubError('ArgumentInvalid', `importMode ${String(importMode)} is not supported`);
      } catch (err) {
        if (!(err instanceof HubError)) throw err;
        errors.push({ deviceId: id, errorCode: String(err.code), errorStatus: err.message });
      }
    }
    return { isSuccessful: errors.length === 0, errors, warnings: [] };
  }

  clearFaults(): void {
    this.faults.length = 0;
  }

  /** @internal Takes one injected fault for this request, if any applies. */
  takeFault(req: { method: string; path: string }): Fault | undefined {
    const f = this.faults.find((x) => x.remaining > 0 && (!x.match || x.match(req)));
    if (!f) return undefined;
    f.remaining--;
    if (f.remaining <= 0) this.faults.splice(this.faults.indexOf(f), 1);
    return f;
  }

  // ---------------------------------------------------------------- registry operations

  getDevice(deviceId: string): DeviceRecord {
    const d = this.devices.get(deviceId);
    if (!d) throw new HubError('DeviceNotFound', `Device ${deviceId} not registered`);
    return d;
  }

  getModule(deviceId: string, moduleId: string): ModuleRecord {
    this.getDevice(deviceId);
    const m = this.modules.get(`${deviceId}/${moduleId}`);
    if (!m) throw new HubError('ModuleNotFound', `Module ${moduleId} on device ${deviceId} not registered`);
    return m;
  }

  /** Seeds a device without going through HTTP (same rules as PUT /devices/{id} without If-Match). */
  addDevice(device: { deviceId: string } & Record<string, unknown>): DeviceRecord {
    return this.putDevice(device.deviceId, device, undefined);
  }

  /** Seeds a SAS module identity on an existing device; returns it (its key is authentication.symmetricKey.primaryKey). */
  addModule(deviceId: string, moduleId: string, primaryKey?: string, secondaryKey?: string): ModuleRecord {
    return this.putModule(
      deviceId,
      moduleId,
      { deviceId, moduleId, authentication: { type: 'sas', symmetricKey: { primaryKey: primaryKey ?? '', secondaryKey: secondaryKey ?? '' } } },
      undefined,
    );
  }

  private edgeScopes(): Set<string> {
    const scopes = new Set<string>();
    for (const d of this.devices.values()) if (d.capabilities.iotEdge && d.deviceScope) scopes.add(d.deviceScope);
    return scopes;
  }

  /** Applies the If-Match rules of a PUT/DELETE. `existing` undefined means the identity does not exist. */
  private checkPrecondition(kind: 'device' | 'module', id: string, existingEtag: string | undefined, ifMatch: string | undefined, creating: boolean): void {
    const notFound = () => (kind === 'device' ? new HubError('DeviceNotFound', `Device ${id} not registered`) : new HubError('ModuleNotFound', `Module ${id} not registered`));
    if (ifMatch === undefined) {
      if (creating && existingEtag !== undefined) {
        throw kind === 'device'
          ? new HubError('DeviceAlreadyExists', `A device with ID '${id}' is already registered`)
          : new HubError('ModuleAlreadyExistsOnDevice', `A module with ID '${id}' is already registered`);
      }
      if (!creating && existingEtag === undefined) throw notFound();
      return;
    }
    if (existingEtag === undefined) throw notFound();
    const want = unquoteEtag(ifMatch);
    if (want !== '*' && want !== existingEtag) {
      throw new HubError('PreconditionFailed', `Precondition failed: device etag ${existingEtag} does not match If-Match ${want}`);
    }
  }

  /**
   * PUT /devices/{id}: without If-Match it creates (409 DeviceAlreadyExists if present); with
   * If-Match `*` or the current etag it replaces (404 if absent, 412 on a stale etag).
   */
  putDevice(deviceId: string, body: unknown, ifMatch: string | undefined): DeviceRecord {
    if (!validIdentityId(deviceId)) throw new HubError('ArgumentInvalid', `DeviceId ${deviceId} is invalid`);
    const refused = this.refusedDevices.get(deviceId);
    if (refused) throw new HubError('ArgumentInvalid', refused);
    if (!isPlainObject(body)) throw new HubError('ArgumentInvalid', 'request body must be a device JSON object');
    if (body.deviceId !== undefined && body.deviceId !== deviceId) {
      throw new HubError('ArgumentInvalid', `deviceId in the body (${String(body.deviceId)}) does not match the URI (${deviceId})`);
    }
    const existing = this.devices.get(deviceId);
    this.checkPrecondition('device', deviceId, existing?.etag, ifMatch, ifMatch === undefined);

    const now = new Date().toISOString();
    const status = body.status ?? existing?.status ?? 'enabled';
    if (status !== 'enabled' && status !== 'disabled') throw new HubError('ArgumentInvalid', `status ${String(status)} is invalid`);
    const authentication = normalizeAuthentication(body.authentication, existing?.authentication);
    const caps = isPlainObject(body.capabilities) ? body.capabilities : {};
    const iotEdge = caps.iotEdge === true;
    const generationId = existing?.generationId ?? newGenerationId();

    const edgeScopes = this.edgeScopes();
    const rawParents = body.parentScopes;
    if (rawParents !== undefined && rawParents !== null && !(Array.isArray(rawParents) && rawParents.every((s) => typeof s === 'string'))) {
      throw new HubError('ArgumentInvalid', 'parentScopes must be an array of scope strings');
    }
    let parentScopes = (rawParents as string[] | null | undefined) ?? [];
    for (const s of parentScopes) if (!edgeScopes.has(s)) throw new HubError('ArgumentInvalid', `parent scope ${s} is not the scope of an IoT Edge device`);
    let deviceScope: string | undefined;
    if (iotEdge) {
      deviceScope = existing?.capabilities.iotEdge && existing.deviceScope ? existing.deviceScope : `ms-azure-iot-edge://${deviceId}-${generationId}`;
    } else {
      const given = typeof body.deviceScope === 'string' && body.deviceScope ? body.deviceScope : undefined;
      if (given !== undefined && !edgeScopes.has(given)) throw new HubError('ArgumentInvalid', `deviceScope ${given} is not the scope of an IoT Edge device`);
      if (parentScopes.length > 1) throw new HubError('ArgumentInvalid', 'a leaf device has at most one parent');
      if (given && parentScopes.length && parentScopes[0] !== given) {
        throw new HubError('ArgumentInvalid', `deviceScope ${given} and parentScopes[0] ${parentScopes[0]} must be the same for a leaf device`);
      }
      deviceScope = given ?? parentScopes[0];
      if (deviceScope && !parentScopes.length) parentScopes = [deviceScope];
    }

    const record: DeviceRecord = {
      deviceId,
      generationId,
      etag: newIdentityEtag(),
      connectionState: existing?.connectionState ?? 'Disconnected',
      status,
      statusReason: typeof body.statusReason === 'string' ? body.statusReason : (existing?.statusReason ?? null),
      connectionStateUpdatedTime: existing?.connectionStateUpdatedTime ?? NEVER,
      statusUpdatedTime: existing && existing.status === status ? existing.statusUpdatedTime : existing ? now : NEVER,
      lastActivityTime: existing?.lastActivityTime ?? NEVER,
      cloudToDeviceMessageCount: existing?.cloudToDeviceMessageCount ?? 0,
      authentication,
      capabilities: { iotEdge },
      ...(deviceScope ? { deviceScope } : {}),
      parentScopes,
    };
    this.devices.set(deviceId, record);
    if (!this.twins.has(deviceId)) this.twins.set(deviceId, newTwin());
    if (status === 'disabled') this.mqtt?.disconnectDevice(deviceId, 'device disabled');
    return record;
  }

  /** DELETE /devices/{id}: If-Match `*` or the current etag; removes its modules and twins and ends its MQTT sessions. */
  deleteDevice(deviceId: string, ifMatch: string | undefined): void {
    if (ifMatch === undefined) throw new HubError('ArgumentInvalid', 'If-Match header is required (use * for an unconditional delete)');
    const existing = this.devices.get(deviceId);
    this.checkPrecondition('device', deviceId, existing?.etag, ifMatch, false);
    this.devices.delete(deviceId);
    this.twins.delete(deviceId);
    for (const key of [...this.modules.keys()]) {
      if (key.startsWith(`${deviceId}/`)) {
        this.modules.delete(key);
        this.twins.delete(key);
      }
    }
    this.mqtt?.disconnectDevice(deviceId, 'device deleted');
  }

  /** PUT /devices/{id}/modules/{mid}: same If-Match rules as devices (409 ModuleAlreadyExistsOnDevice). */
  putModule(deviceId: string, moduleId: string, body: unknown, ifMatch: string | undefined): ModuleRecord {
    this.getDevice(deviceId);
    if (!validIdentityId(moduleId)) throw new HubError('ArgumentInvalid', `ModuleId ${moduleId} is invalid`);
    if (!isPlainObject(body)) throw new HubError('ArgumentInvalid', 'request body must be a module JSON object');
    if ((body.deviceId !== undefined && body.deviceId !== deviceId) || (body.moduleId !== undefined && body.moduleId !== moduleId)) {
      throw new HubError('ArgumentInvalid', 'deviceId/moduleId in the body do not match the URI');
    }
    const key = `${deviceId}/${moduleId}`;
    const existing = this.modules.get(key);
    this.checkPrecondition('module', key, existing?.etag, ifMatch, ifMatch === undefined);
    const record: ModuleRecord = {
      moduleId,
      managedBy: typeof body.managedBy === 'string' ? body.managedBy : (existing?.managedBy ?? null),
      deviceId,
      generationId: existing?.generationId ?? newGenerationId(),
      etag: newIdentityEtag(),
      connectionState: existing?.connectionState ?? 'Disconnected',
      connectionStateUpdatedTime: existing?.connectionStateUpdatedTime ?? NEVER,
      lastActivityTime: existing?.lastActivityTime ?? NEVER,
      cloudToDeviceMessageCount: existing?.cloudToDeviceMessageCount ?? 0,
      authentication: normalizeAuthentication(body.authentication, existing?.authentication),
    };
    this.modules.set(key, record);
    if (!this.twins.has(key)) this.twins.set(key, newTwin());
    return record;
  }

  deleteModule(deviceId: string, moduleId: string, ifMatch: string | undefined): void {
    this.getDevice(deviceId);
    const key = `${deviceId}/${moduleId}`;
    const existing = this.modules.get(key);
    this.checkPrecondition('module', key, existing?.etag, ifMatch ?? '*', false);
    this.modules.delete(key);
    this.twins.delete(key);
    this.mqtt?.disconnectIdentity(deviceId, moduleId, 'module deleted');
  }

  // ---------------------------------------------------------------- twins

  private twinKey(deviceId: string, moduleId?: string | null): string {
    if (moduleId) this.getModule(deviceId, moduleId);
    else this.getDevice(deviceId);
    return moduleId ? `${deviceId}/${moduleId}` : deviceId;
  }

  /** @internal */
  twinState(deviceId: string, moduleId?: string | null): TwinState {
    return this.twins.get(this.twinKey(deviceId, moduleId))!;
  }

  /** A copy of a twin's properties, as a device sees them over MQTT (`$version` included). */
  twin(deviceId: string, moduleId?: string | null): { tags: JsonObject; desired: JsonObject; reported: JsonObject } {
    const t = this.twinState(deviceId, moduleId);
    return {
      tags: structuredClone(t.tags),
      desired: { ...structuredClone(t.desired), $version: t.desiredVersion },
      reported: { ...structuredClone(t.reported), $version: t.reportedVersion },
    };
  }

  /** @internal The twin document of the service API (GET /twins/{id}[/modules/{mid}]). */
  twinJson(deviceId: string, moduleId?: string | null): Record<string, unknown> {
    const t = this.twinState(deviceId, moduleId);
    const d = this.getDevice(deviceId);
    const m = moduleId ? this.getModule(deviceId, moduleId) : undefined;
    const auth = (m ?? d).authentication;
    return {
      deviceId,
      ...(moduleId ? { moduleId } : {}),
      etag: t.etag,
      deviceEtag: (m ?? d).etag,
      status: d.status,
      statusUpdateTime: d.statusUpdatedTime,
      connectionState: (m ?? d).connectionState,
      lastActivityTime: (m ?? d).lastActivityTime,
      cloudToDeviceMessageCount: (m ?? d).cloudToDeviceMessageCount,
      authenticationType: auth.type,
      x509Thumbprint: auth.x509Thumbprint,
      modelId: '',
      version: t.version,
      tags: structuredClone(t.tags),
      properties: {
        desired: { ...structuredClone(t.desired), $metadata: { $lastUpdated: t.desiredUpdated }, $version: t.desiredVersion },
        reported: { ...structuredClone(t.reported), $metadata: { $lastUpdated: t.reportedUpdated }, $version: t.reportedVersion },
      },
      capabilities: d.capabilities,
      ...(moduleId ? {} : { deviceScope: d.deviceScope, parentScopes: d.parentScopes }),
    };
  }

  /**
   * Applies a desired-properties patch (null removes a property) and pushes it to the connected
   * client on `$iothub/twin/PATCH/properties/desired/?$version={n}`. Returns the new desired `$version`.
   */
  patchDesired(deviceId: string, moduleId: string | null | undefined, patch: JsonObject): number {
    const t = this.twinState(deviceId, moduleId);
    const bad = findBadPropertyName(patch);
    if (bad !== null) throw new HubError('ArgumentInvalid', `property name ${bad} is not allowed`);
    mergePatch(t.desired, patch);
    t.desiredVersion++;
    t.version++;
    t.etag = newTwinEtag();
    t.desiredUpdated = new Date().toISOString();
    this.mqtt.pushDesired(deviceId, moduleId ?? undefined, { ...structuredClone(patch), $version: t.desiredVersion });
    return t.desiredVersion;
  }

  /** @internal A reported-properties patch from the device (over MQTT). */
  patchReported(deviceId: string, moduleId: string | undefined, patch: unknown): number {
    if (!isPlainObject(patch)) throw new HubError('ArgumentInvalid', 'reported properties patch must be a JSON object');
    const bad = findBadPropertyName(patch);
    if (bad !== null) throw new HubError('ArgumentInvalid', `property name ${bad} is not allowed`);
    const t = this.twinState(deviceId, moduleId);
    mergePatch(t.reported, patch);
    t.reportedVersion++;
    t.version++;
    t.etag = newTwinEtag();
    t.reportedUpdated = new Date().toISOString();
    const event: ReportedPatchEvent = { deviceId, ...(moduleId ? { moduleId } : {}), patch: structuredClone(patch), version: t.reportedVersion };
    this.emit('reported', event);
    return t.reportedVersion;
  }

  /** @internal PATCH /twins/...: tags and desired properties, If-Match on the twin etag. */
  patchTwin(deviceId: string, moduleId: string | undefined, body: unknown, ifMatch: string | undefined): Record<string, unknown> {
    const t = this.twinState(deviceId, moduleId);
    if (!isPlainObject(body)) throw new HubError('ArgumentInvalid', 'twin patch must be a JSON object');
    if (ifMatch !== undefined) {
      const want = unquoteEtag(ifMatch);
      if (want !== '*' && want !== t.etag) throw new HubError('PreconditionFailed', `Precondition failed: twin etag ${t.etag} does not match If-Match ${want}`);
    }
    const props = isPlainObject(body.properties) ? body.properties : {};
    const desired = isPlainObject(props.desired) ? props.desired : undefined;
    if (isPlainObject(body.tags)) {
      mergePatch(t.tags, body.tags);
      t.version++;
      t.etag = newTwinEtag();
    }
    if (desired) {
      const { $version: _v, $metadata: _m, ...clean } = desired;
      this.patchDesired(deviceId, moduleId, clean);
    }
    return this.twinJson(deviceId, moduleId);
  }

  // ---------------------------------------------------------------- devices over MQTT

  /**
   * Invokes a direct method the way IoT Hub does: publishes `$iothub/methods/POST/{name}/?$rid={rid}`
   * to the connected device/module and resolves with the status and JSON payload it answers on
   * `$iothub/methods/res/{status}/?$rid={rid}`. Rejects with a HubError: 404 DeviceNotOnline
   * (not connected/subscribed within connectTimeoutMs), 504 GatewayTimeout (no answer in time).
   */
  async invokeMethod(deviceId: string, moduleId: string | null | undefined, methodName: string, payload: unknown, opts: InvokeOptions = {}): Promise<MethodResult> {
    this.twinKey(deviceId, moduleId); // DeviceNotFound / ModuleNotFound
    return this.mqtt.invokeMethod(deviceId, moduleId ?? undefined, methodName, payload, opts);
  }

  /** Resolves once the identity's current MQTT client holds a subscription to exactly `filter`. */
  waitSubscribed(deviceId: string, moduleId: string | null | undefined, filter: string, timeoutMs = 5000): Promise<void> {
    return this.mqtt.waitSubscribed(deviceId, moduleId ?? undefined, filter, timeoutMs);
  }

  /** True when the identity has a connected MQTT client. */
  isConnected(deviceId: string, moduleId?: string | null): boolean {
    return this.mqtt.isConnected(deviceId, moduleId ?? undefined);
  }

  /** Resolves with the first telemetry message (already received or arriving) that matches. */
  waitForTelemetry(predicate: (m: TelemetryMessage) => boolean, timeoutMs = 5000): Promise<TelemetryMessage> {
    const found = this.telemetry.find(predicate);
    if (found) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const onMessage = (m: TelemetryMessage) => {
        if (!predicate(m)) return;
        clearTimeout(timer);
        this.off('telemetry', onMessage);
        resolve(m);
      };
      const timer = setTimeout(() => {
        this.off('telemetry', onMessage);
        reject(new Error(`no matching telemetry within ${timeoutMs} ms`));
      }, timeoutMs);
      this.on('telemetry', onMessage);
    });
  }

  /** Ends the MQTT sessions of a device and of its modules. */
  disconnect(deviceId: string, moduleId?: string): void {
    if (moduleId) this.mqtt.disconnectIdentity(deviceId, moduleId, 'disconnected by test');
    else this.mqtt.disconnectDevice(deviceId, 'disconnected by test');
  }

  /** @internal */
  markConnection(deviceId: string, moduleId: string | undefined, state: 'Connected' | 'Disconnected'): void {
    const rec = moduleId ? this.modules.get(`${deviceId}/${moduleId}`) : this.devices.get(deviceId);
    if (!rec) return;
    const now = new Date().toISOString();
    rec.connectionState = state;
    rec.connectionStateUpdatedTime = now;
    rec.lastActivityTime = now;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.allSettled([this.mqtt.close(), this.http.close()]);
  }
}

export type { DeviceRecord, ModuleRecord, TwinState, Json, JsonObject };
