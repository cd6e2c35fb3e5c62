/**
 * The stand-in's data model: device and module identities shaped as IoT Hub returns them
 * (api-version 2021-04-12), twins, hub errors with IoT Hub's codes and body format, and
 * the JSON merge-patch rules of twin properties.
 */
import { randomBytes } from 'node:crypto';

export type Json = null | boolean | number | string | Json[] | { [k: string]: Json };
export type JsonObject = { [k: string]: Json };

export type AuthType = 'sas' | 'selfSigned' | 'certificateAuthority' | 'none';

export interface Authentication {
  symmetricKey: { primaryKey: string | null; secondaryKey: string | null };
  x509Thumbprint: { primaryThumbprint: string | null; secondaryThumbprint: string | null };
  type: AuthType;
}

/** A device identity exactly as GET /devices/{id} returns it. */
export interface DeviceRecord {
  deviceId: string;
  generationId: string;
  etag: string;
  connectionState: 'Connected' | 'Disconnected';
  status: 'enabled' | 'disabled';
  statusReason: string | null;
  connectionStateUpdatedTime: string;
  statusUpdatedTime: string;
  lastActivityTime: string;
  cloudToDeviceMessageCount: number;
  authentication: Authentication;
  capabilities: { iotEdge: boolean };
  deviceScope?: string;
  parentScopes: string[];
}

/** A module identity exactly as GET /devices/{id}/modules/{mid} returns it. */
export interface ModuleRecord {
  moduleId: string;
  managedBy: string | null;
  deviceId: string;
  generationId: string;
  etag: string;
  connectionState: 'Connected' | 'Disconnected';
  connectionStateUpdatedTime: string;
  lastActivityTime: string;
  cloudToDeviceMessageCount: number;
  authentication: Authentication;
}

export interface TwinState {
  tags: JsonObject;
  desired: JsonObject;
  reported: JsonObject;
  desiredVersion: number;
  reportedVersion: number;
  /** Twin version: bumped on every change. */
  version: number;
  etag: string;
  desiredUpdated: string;
  reportedUpdated: string;
}

export const NEVER = '0001-01-01T00:00:00Z';

/** IoT Hub error codes: HTTP status, numeric code (newer bodies), name (the `Message` prefix). */
export const HUB_ERRORS = {
  InvalidProtocolVersion: [400, 400001],
  ArgumentInvalid: [400, 400004],
  IotHubUnauthorizedAccess: [401, 401002],
  DeviceNotFound: [404, 404001],
  ModuleNotFound: [404, 404010],
  DeviceNotOnline: [404, 404103],
  DeviceAlreadyExists: [409, 409001],
  ModuleAlreadyExistsOnDevice: [409, 409301],
  PreconditionFailed: [412, 412002],
  ThrottlingException: [429, 429001],
  ServerError: [500, 500001],
  ServiceUnavailable: [503, 503001],
  GatewayTimeout: [504, 504101],
} as const;

export type HubErrorCode = keyof typeof HUB_ERRORS;

const CODE_FOR_STATUS: Record<number, HubErrorCode> = {
  400: 'ArgumentInvalid',
  401: 'IotHubUnauthorizedAccess',
  404: 'DeviceNotFound',
  409: 'DeviceAlreadyExists',
  412: 'PreconditionFailed',
  429: 'ThrottlingException',
  500: 'ServerError',
  503: 'ServiceUnavailable',
  504: 'GatewayTimeout',
};

export class HubError extends Error {
  readonly status: number;
  readonly errorCode: number;
  constructor(readonly code: HubErrorCode | string, message: string, status?: number) {
    super(message.replace(/;/g, ','));
    const known = (HUB_ERRORS as Record<string, readonly [number, number]>)[code];
    this.status = status ?? known?.[0] ?? 500;
    this.errorCode = known?.[1] ?? this.status * 1000;
  }

  static forStatus(status: number, message?: string): HubError {
    const code = CODE_FOR_STATUS[status] ?? (status >= 500 ? 'ServerError' : 'ArgumentInvalid');
    return new HubError(code, message ?? `injected ${status}`, status);
  }

  /**
   * The REST error body. azure-iot-http-base parses `Message` as `ErrorCode:{code};{text}`
   * (Http.parseErrorBody) and maps the status to its error classes (RestApiClient.translateError).
   */
  restBody(): Record<string, unknown> {
    return {
      Message: `ErrorCode:${this.code};${this.message}`,
      ExceptionMessage: `Tracking ID:${randomBytes(16).toString('hex')}-G:0-TimeStamp:${new Date().toISOString()}`,
      errorCode: this.errorCode,
    };
  }

  /** The MQTT twin error body: azure-iot-device-mqtt fails a twin request only when `errorCode` is present. */
  mqttBody(): Record<string, unknown> {
    return { errorCode: this.errorCode, message: this.message };
  }
}

let etagCounter = 0;
/** Device/module etags look like base64 of a decimal counter (e.g. "MTQ5NjQ0NzYx"). */
export function newIdentityEtag(): string {
  return Buffer.from(String(100_000_000 + ++etagCounter)).toString('base64');
}

let twinEtagCounter = 0;
/** Twin etags look like base64 of an 8-byte big-endian counter ("AAAAAAAAAAE="). */
export function newTwinEtag(): string {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(++twinEtagCounter));
  return b.toString('base64');
}

export function newGenerationId(): string {
  return '63' + String(Date.now()).padStart(13, '0') + String(Math.floor(Math.random() * 1000)).padStart(3, '0');
}

export function newSymmetricKey(): string {
  return randomBytes(32).toString('base64');
}

export function newTwin(): TwinState {
  const now = new Date().toISOString();
  return { tags: {}, desired: {}, reported: {}, desiredVersion: 1, reportedVersion: 1, version: 1, etag: newTwinEtag(), desiredUpdated: now, reportedUpdated: now };
}

export function isPlainObject(v: unknown): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Twin property patch: nested objects merge, `null` removes, anything else replaces. */
export function mergePatch(target: JsonObject, patch: JsonObject): void {
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete target[k];
    else if (isPlainObject(v)) {
      const cur = target[k];
      const dest: JsonObject = isPlainObject(cur) ? cur : {};
      target[k] = dest;
      mergePatch(dest, v);
    } else target[k] = structuredClone(v);
  }
}

/** Property names that IoT Hub refuses in a patch ('$'-prefixed, '.', ' ', control chars). */
export function findBadPropertyName(patch: JsonObject, path = ''): string | null {
  for (const [k, v] of Object.entries(patch)) {
    if (!k || k.startsWith('$') || /[.\s\u0000-\u001f]/.test(k)) return path + k;
    if (isPlainObject(v)) {
      const bad = findBadPropertyName(v, `${path}${k}.`);
      if (bad) return bad;
    }
  }
  return null;
}

const THUMBPRINT = /^([0-9A-Fa-f]{40}|[0-9A-Fa-f]{64})$/;

/**
 * Validates and completes an `authentication` object from a PUT body. For `sas`, empty keys
 * are generated (the hub does this too; the SDK sends '' when the caller gave none); `previous`
 * keeps existing keys on update.
 */
export function normalizeAuthentication(input: unknown, previous?: Authentication): Authentication {
  const a = isPlainObject(input) ? input : {};
  const type = (a.type ?? 'sas') as AuthType;
  const sym = isPlainObject(a.symmetricKey) ? a.symmetricKey : {};
  const x5 = isPlainObject(a.x509Thumbprint) ? a.x509Thumbprint : {};
  const str = (v: Json | undefined) => (typeof v === 'string' && v.length > 0 ? v : null);
  switch (type) {
    case 'sas': {
      const keyOk = (k: string | null) => k === null || (/^[A-Za-z0-9+/]+={0,2}$/.test(k) && Buffer.from(k, 'base64').length >= 16 && Buffer.from(k, 'base64').length <= 64);
      const primaryKey = str(sym.primaryKey) ?? previous?.symmetricKey.primaryKey ?? newSymmetricKey();
      const secondaryKey = str(sym.secondaryKey) ?? previous?.symmetricKey.secondaryKey ?? newSymmetricKey();
      if (!keyOk(primaryKey) || !keyOk(secondaryKey)) throw new HubError('ArgumentInvalid', 'symmetric keys must be base64 of 16 to 64 bytes');
      return { symmetricKey: { primaryKey, secondaryKey }, x509Thumbprint: { primaryThumbprint: null, secondaryThumbprint: null }, type };
    }
    case 'selfSigned': {
      const primaryThumbprint = str(x5.primaryThumbprint);
      const secondaryThumbprint = str(x5.secondaryThumbprint);
      if (!primaryThumbprint) throw new HubError('ArgumentInvalid', 'selfSigned authentication requires x509Thumbprint.primaryThumbprint');
      for (const t of [primaryThumbprint, secondaryThumbprint]) {
        if (t !== null && !THUMBPRINT.test(t)) throw new HubError('ArgumentInvalid', `thumbprint ${t} is not 40 or 64 hex characters`);
      }
      return { symmetricKey: { primaryKey: null, secondaryKey: null }, x509Thumbprint: { primaryThumbprint, secondaryThumbprint }, type };
    }
    case 'certificateAuthority':
    case 'none':
      return { symmetricKey: { primaryKey: null, secondaryKey: null }, x509Thumbprint: { primaryThumbprint: null, secondaryThumbprint: null }, type };
    default:
      throw new HubError('ArgumentInvalid', `authentication type ${String(type)} is not supported`);
  }
}

/** Device and module ids as IoT Hub documents them: up to 128 of [A-Za-z0-9] and - . % _ * ? ! ( ) , : = @ $ '. */
export function validIdentityId(id: string): boolean {
  return /^[A-Za-z0-9\-.%_*?!(),:=@$']{1,128}$/.test(id);
}

/** Strips quotes and a weak prefix from an If-Match/ETag value. */
export function unquoteEtag(v: string): string {
  let s = v.trim();
  if (s.startsWith('W/')) s = s.slice(2);
  if (s.length >= 2 && s.startsWith('"') && s.endsWith('"')) s = s.slice(1, -1);
  return s;
}
