/**
 * The gateway as an Azure IoT Edge custom module (azure-iot-device ModuleClient over MQTT).
 * Active when the IoT Edge runtime's environment is present (`IOTEDGE_WORKLOADURI`), or
 * with an explicit module connection string (tests, or a module outside the runtime).
 *
 * - desired properties: `policyGroup` (group asked for devices that name none),
 *   `relayTelemetry` (leaf telemetry as module output `telemetry`, the only output the
 *   module writes; UTF-8 JSON payloads labelled `application/json` + `utf-8`, other bytes
 *   unlabelled), `rateLimits` (applied
 *   at once; counters restart);
 * - reported properties: status (connections, outbox queue, certificate expiries, authority
 *   link, CRL, renewals), refreshed every `reportIntervalMs` and after each change;
 * - direct methods: `status`, `renewNow` (gateway certificate and edge CA), `revokeDevice`
 *   ({deviceId, reason}: asks the authority to revoke a device of this gateway).
 */
import azureIotDevice from 'azure-iot-device';
import azureIotDeviceMqtt from 'azure-iot-device-mqtt';
import type { Logger } from 'pino';

const { ModuleClient, Message } = azureIotDevice;
const { Mqtt } = azureIotDeviceMqtt;

export interface EdgeModuleSettings {
  policyGroup?: string;
  relayTelemetry: boolean;
  /** Partial RateLimitConfig from the twin, already shape-checked. */
  rateLimits?: Record<string, unknown>;
}

export interface EdgeModuleHooks {
  status(): Record<string, unknown>;
  renewNow(): Promise<Record<string, unknown>>;
  revokeDevice(deviceId: string, reason: string): Promise<Record<string, unknown>>;
  /** Desired properties changed what the gateway does. */
  apply(settings: EdgeModuleSettings): void;
}

export interface EdgeModuleOptions {
  logger: Logger;
  hooks: EdgeModuleHooks;
  /** Explicit module connection string (otherwise the IoT Edge environment). */
  connectionString?: string;
  /** CA of the hub or edgeHub, when not from the environment. */
  ca?: string;
  reportIntervalMs?: number;
  env?: NodeJS.ProcessEnv;
}

export interface RunningEdgeModule {
  settings: EdgeModuleSettings;
  relayTelemetry(deviceId: string, subtopic: string, payload: Buffer): void;
  report(): Promise<void>;
  close(): Promise<void>;
}

type ModuleClientT = InstanceType<typeof ModuleClient>;
type TwinT = Awaited<ReturnType<ModuleClientT['getTwin']>>;

const strictUtf8 = new TextDecoder('utf-8', { fatal: true });

/** Whether a relayed payload is JSON text in UTF-8 (what `application/json; utf-8` promises). */
function isUtf8Json(payload: Buffer): boolean {
  try {
    JSON.parse(strictUtf8.decode(payload));
    return true;
  } catch {
    return false;
  }
}

export function edgeModuleWanted(env: NodeJS.ProcessEnv, connectionString?: string): boolean {
  return Boolean(connectionString ?? env.LEAFGATE_MODULE_CONNECTION_STRING ?? env.IOTEDGE_WORKLOADURI);
}

export async function startEdgeModule(opts: EdgeModuleOptions): Promise<RunningEdgeModule> {
  const env = opts.env ?? process.env;
  const cs = opts.connectionString ?? env.LEAFGATE_MODULE_CONNECTION_STRING;
  const client: ModuleClientT = cs ? ModuleClient.fromConnectionString(cs, Mqtt) : await ModuleClient.fromEnvironment(Mqtt);
  if (opts.ca) await client.setOptions({ ca: opts.ca });
  client.on('error', (err: Error) => opts.logger.warn({ err: err.message }, 'module client error'));
  await client.open();

  const settings: EdgeModuleSettings = { relayTelemetry: false };
  let twin: TwinT | undefined;

  const report = async () => {
    if (!twin) return;
    const patch = { ...opts.hooks.status(), settings: { ...settings }, reportedAt: new Date().toISOString() };
    await new Promise<void>((resolve) => twin!.properties.reported.update(patch, (err?: Error) => {
      if (err) opts.logger.warn({ err: err.message }, 'reported properties update failed');
      resolve();
    }));
  };

  const applyDesired = (desired: Record<string, unknown>) => {
    if (typeof desired.policyGroup === 'string' && /^[A-Za-z0-9._-]{1,64}$/.test(desired.policyGroup)) settings.policyGroup = desired.policyGroup;
    if (typeof desired.relayTelemetry === 'boolean') settings.relayTelemetry = desired.relayTelemetry;
    if (desired.rateLimits && typeof desired.rateLimits === 'object') {
      const limits: Record<string, unknown> = {};
      for (const [k, v] of Object.entries(desired.rateLimits as Record<string, unknown>)) {
        const isLimit = (x: any) => x && Number.isInteger(x.points) && x.points > 0 && Number.isInteger(x.durationSeconds) && x.durationSeconds > 0;
        if (['connectionsPerAddress', 'publishesPerClient', 'onboardingsPerDevice', 'csrsPerDevice'].includes(k) && isLimit(v)) limits[k] = { points: (v as any).points, durationSeconds: (v as any).durationSeconds };
        else if (['concurrentOnboardings', 'abuseDisconnectAfter'].includes(k) && Number.isInteger(v) && (v as number) > 0) limits[k] = v;
        else opts.logger.warn({ key: k }, 'ignored invalid rateLimits entry in the module twin');
      }
      settings.rateLimits = { ...settings.rateLimits, ...limits };
    }
    opts.hooks.apply({ ...settings });
    opts.logger.info({ settings }, 'module twin applied');
    void report();
  };

  twin = await client.getTwin();
  applyDesired((twin.properties.desired ?? {}) as Record<string, unknown>);
  twin.on('properties.desired', (delta: Record<string, unknown>) => applyDesired(delta));

  const method = (name: string, fn: (payload: any) => Promise<Record<string, unknown>>) =>
    client.onMethod(name, (request, response) => {
      fn(request?.payload ?? {}).then(
        (result) => response?.send(200, result, () => undefined),
        (err: Error & { code?: string }) => response?.send(err.code === 'bad_request' ? 400 : 500, { code: err.code ?? 'internal', message: err.message }, () => undefined),
      );
    });
  method('status', async () => opts.hooks.status());
  method('renewNow', async () => {
    const r = await opts.hooks.renewNow();
    void report();
    return r;
  });
  method('revokeDevice', async (p: { deviceId?: unknown; reason?: unknown }) => {
    if (typeof p?.deviceId !== 'string') throw Object.assign(new Error('deviceId is required'), { code: 'bad_request' });
    return opts.hooks.revokeDevice(p.deviceId, typeof p.reason === 'string' ? p.reason : 'unspecified');
  });

  const timer = setInterval(() => void report(), opts.reportIntervalMs ?? 60_000);
  timer.unref();

  return {
    settings,
    report,
    relayTelemetry(deviceId, subtopic, payload) {
      if (!settings.relayTelemetry) return;
      const msg = new Message(payload);
      // IoT Hub routes on the body only when it is labelled JSON in UTF-8 ($.ct / $.ce on MQTT).
      // lg/v1 telemetry is JSON by convention but any bytes are allowed: label only what is
      // (other bytes go unlabelled; the SDK's Message types no other content type).
      if (isUtf8Json(payload)) {
        msg.contentType = 'application/json';
        msg.contentEncoding = 'utf-8';
      }
      msg.properties.add('leafDeviceId', deviceId);
      msg.properties.add('subtopic', subtopic);
      client.sendOutputEvent('telemetry', msg).catch((err: Error) => opts.logger.warn({ err: err.message, deviceId }, 'telemetry relay failed'));
    },
    async close() {
      clearInterval(timer);
      await client.close();
    },
  };
}
