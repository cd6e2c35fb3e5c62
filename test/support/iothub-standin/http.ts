/**
 * The stand-in's registry REST surface (HTTPS, node:https), the part of IoT Hub's service API
 * that azure-iothub's Registry and Client use:
 *
 *   GET    /devices                              list              RegistryRead
 *   POST   /devices                              bulk create / update / delete (<= 100)  RegistryWrite
 *   PUT    /devices/{id}                         create / replace  RegistryWrite
 *   GET    /devices/{id}                         read              RegistryRead
 *   DELETE /devices/{id}                         delete            RegistryWrite
 *   GET    /devices/{id}/modules                 list modules      RegistryRead
 *   PUT    /devices/{id}/modules/{mid}           create / replace  RegistryWrite
 *   GET    /devices/{id}/modules/{mid}           read              RegistryRead
 *   DELETE /devices/{id}/modules/{mid}           delete            RegistryWrite
 *   GET    /twins/{id}[/modules/{mid}]           twin              ServiceConnect
 *   PATCH  /twins/{id}[/modules/{mid}]           tags / desired    ServiceConnect
 *   POST   /twins/{id}[/modules/{mid}]/methods   direct method     ServiceConnect
 *
 * every one with `?api-version=` and `Authorization: SharedAccessSignature sr=..&sig=..&se=..&skn=..`.
 * Errors use IoT Hub's body (`{"Message":"ErrorCode:{code};{text}","ExceptionMessage":...}`)
 * and `iothub-errorcode` header, which azure-iot-http-base turns into its typed errors.
 */
import https from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { once } from 'node:events';
import { HubError } from './model.ts';
import { parseSas, signatureMatches } from './sas.ts';
import type { IotHubStandin, RecordedRequest, Right } from './standin.ts';

export interface RegistryServer {
  port: number;
  close(): Promise<void>;
}

const MAX_BODY = 1024 * 1024;

/**
 * api-versions the registry surface serves: the one azure-iothub 1.16 sends (dist/version.js).
 * IoT Hub refuses others with 400 (error code InvalidProtocolVersion, 400001).
 */
export const REGISTRY_API_VERSIONS = new Set(['2021-04-12']);

interface Route {
  right: Right;
  run: (ctx: { body: unknown; ifMatch: string | undefined; query: Record<string, string> }) => Promise<{ status: number; body?: unknown; etag?: string }> | { status: number; body?: unknown; etag?: string };
}

function segment(s: string): string {
  return decodeURIComponent(s);
}

function route(standin: IotHubStandin, method: string, path: string): Route | null {
  const parts = path.split('/').filter(Boolean);
  const [root, id, sub, mid, tail] = parts;
  if (root === 'devices') {
    if (parts.length === 1 && method === 'GET') {
      return { right: 'RegistryRead', run: ({ query }) => ({ status: 200, body: [...standin.devices.values()].slice(0, Number(query.top) || 1000) }) };
    }
    if (parts.length === 1 && method === 'POST') {
      return {
        right: 'RegistryWrite',
        run: ({ body }) => {
          const r = standin.bulkDevices(body);
          // Azure answers 400 with the BulkRegistryOperationResult when an operation failed
          // (Bulk Registry - Update Registry, REST API 2021-04-12).
          return { status: r.isSuccessful ? 200 : 400, body: r };
        },
      };
    }
    if (parts.length === 2) {
      const deviceId = segment(id);
      if (method === 'GET') return { right: 'RegistryRead', run: () => { const d = standin.getDevice(deviceId); return { status: 200, body: d, etag: d.etag }; } };
      if (method === 'PUT') return { right: 'RegistryWrite', run: ({ body, ifMatch }) => { const d = standin.putDevice(deviceId, body, ifMatch); return { status: 200, body: d, etag: d.etag }; } };
      if (method === 'DELETE') return { right: 'RegistryWrite', run: ({ ifMatch }) => { standin.deleteDevice(deviceId, ifMatch); return { status: 204 }; } };
    }
    if (sub === 'modules' && parts.length === 3 && method === 'GET') {
      const deviceId = segment(id);
      return { right: 'RegistryRead', run: () => { standin.getDevice(deviceId); return { status: 200, body: [...standin.modules.values()].filter((m) => m.deviceId === deviceId) }; } };
    }
    if (sub === 'modules' && parts.length === 4) {
      const deviceId = segment(id);
      const moduleId = segment(mid);
      if (method === 'GET') return { right: 'RegistryRead', run: () => { const m = standin.getModule(deviceId, moduleId); return { status: 200, body: m, etag: m.etag }; } };
      if (method === 'PUT') return { right: 'RegistryWrite', run: ({ body, ifMatch }) => { const m = standin.putModule(deviceId, moduleId, body, ifMatch); return { status: 200, body: m, etag: m.etag }; } };
      if (method === 'DELETE') return { right: 'RegistryWrite', run: ({ ifMatch }) => { standin.deleteModule(deviceId, moduleId, ifMatch); return { status: 204 }; } };
    }
  }
  if (root === 'twins' && id) {
    const deviceId = segment(id);
    const moduleId = sub === 'modules' && mid ? segment(mid) : undefined;
    const rest = moduleId ? parts.slice(4) : parts.slice(2);
    if (sub !== undefined && sub !== 'modules' && sub !== 'methods') return null;
    if (rest.length === 0 && (moduleId || parts.length === 2)) {
      if (method === 'GET') return { right: 'ServiceConnect', run: () => { const t = standin.twinJson(deviceId, moduleId); return { status: 200, body: t, etag: t.etag as string }; } };
      if (method === 'PATCH') return { right: 'ServiceConnect', run: ({ body, ifMatch }) => { const t = standin.patchTwin(deviceId, moduleId, body, ifMatch); return { status: 200, body: t, etag: t.etag as string }; } };
    }
    const isMethods = (moduleId ? tail === 'methods' && parts.length === 5 : sub === 'methods' && parts.length === 3) && method === 'POST';
    if (isMethods) {
      return {
        right: 'ServiceConnect',
        run: async ({ body }) => {
          const b = (body ?? {}) as { methodName?: unknown; payload?: unknown; responseTimeoutInSeconds?: unknown; connectTimeoutInSeconds?: unknown };
          if (typeof b.methodName !== 'string' || !b.methodName) throw new HubError('ArgumentInvalid', 'methodName is required');
          const r = await standin.invokeMethod(deviceId, moduleId, b.methodName, b.payload ?? null, {
            responseTimeoutMs: typeof b.responseTimeoutInSeconds === 'number' ? b.responseTimeoutInSeconds * 1000 : undefined,
            connectTimeoutMs: typeof b.connectTimeoutInSeconds === 'number' ? b.connectTimeoutInSeconds * 1000 : undefined,
          });
          return { status: 200, body: { status: r.status, payload: r.payload } };
        },
      };
    }
  }
  return null;
}

/** Verifies the Authorization header against the shared access policies; throws 401. */
function authorize(standin: IotHubStandin, header: string | undefined, right: Right, path: string): void {
  const deny = (why: string) => new HubError('IotHubUnauthorizedAccess', `Unauthorized: ${why}`);
  const sas = parseSas(header);
  if (!sas) throw deny('missing or malformed SharedAccessSignature');
  if (!sas.skn) throw deny('the token names no shared access policy (skn)');
  const policy = standin.policies.get(sas.skn);
  if (!policy) throw deny(`unknown policy ${sas.skn}`);
  const resource = sas.resource.toLowerCase().replace(/\/+$/, '');
  const target = `${standin.hostName}${path}`.toLowerCase();
  if (resource !== standin.hostName.toLowerCase() && !target.startsWith(resource + '/')) throw deny(`token audience ${sas.resource} is not this hub`);
  if (sas.se <= Math.floor(Date.now() / 1000)) throw deny(`token expired at ${new Date(sas.se * 1000).toISOString()}`);
  if (!signatureMatches(sas, [policy.primaryKey, policy.secondaryKey])) throw deny('signature does not match');
  const has = (r: Right) => policy.rights.has(r) || (r === 'RegistryRead' && policy.rights.has('RegistryWrite'));
  if (!has(right)) throw deny(`policy ${policy.name} lacks ${right}`);
}

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size > MAX_BODY) {
        reject(new HubError('ArgumentInvalid', 'request body too large', 413));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function send(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, {
    ...(text ? { 'Content-Type': 'application/json; charset=utf-8', 'Content-Length': String(Buffer.byteLength(text)) } : { 'Content-Length': '0' }),
    ...headers,
  });
  res.end(text);
}

function sendError(res: ServerResponse, err: HubError, headers: Record<string, string> = {}): void {
  send(res, err.status, err.restBody(), { 'iothub-errorcode': String(err.code), ...headers });
}

async function handle(standin: IotHubStandin, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const url = new URL(req.url ?? '/', `https://${standin.hostName}`);
  const method = req.method ?? 'GET';
  const path = url.pathname;
  const query = Object.fromEntries(url.searchParams);
  const record: RecordedRequest = { method, path, query, headers: req.headers, body: undefined, status: 0, at: Date.now() };
  standin.requests.push(record);
  res.on('finish', () => {
    record.status = res.statusCode;
    standin.emit('request', record);
  });
  try {
    const raw = await readBody(req);
    if (raw) {
      try {
        record.body = JSON.parse(raw);
      } catch {
        record.body = raw;
      }
    }
    const fault = standin.takeFault({ method, path });
    if (fault) return sendError(res, HubError.forStatus(fault.status), fault.headers);
    const throttled = standin.takeRateToken();
    if (throttled) return sendError(res, new HubError('ThrottlingException', 'Request throttled: identity registry operations per minute exceeded'), throttled);
    if (!query['api-version']) throw new HubError('ArgumentInvalid', 'api-version query parameter is required');
    if (!REGISTRY_API_VERSIONS.has(query['api-version'])) throw new HubError('InvalidProtocolVersion', `api-version ${query['api-version']} is not supported`);
    const r = route(standin, method, path);
    if (!r) throw new HubError('NotFound', `no route for ${method} ${path}`, 404);
    authorize(standin, req.headers.authorization, r.right, path);
    if (raw && typeof record.body === 'string') throw new HubError('ArgumentInvalid', 'request body is not valid JSON');
    const ifMatchHeader = req.headers['if-match'];
    const out = await r.run({ body: record.body, ifMatch: Array.isArray(ifMatchHeader) ? ifMatchHeader[0] : ifMatchHeader, query });
    send(res, out.status, out.body, out.etag ? { ETag: `"${out.etag}"` } : {});
  } catch (err) {
    if (err instanceof HubError) return sendError(res, err);
    sendError(res, new HubError('ServerError', (err as Error).message ?? String(err)));
  }
}

export async function startRegistryServer(standin: IotHubStandin): Promise<RegistryServer> {
  const server = https.createServer({ key: standin.serverTls.key, cert: standin.serverTls.cert, minVersion: 'TLSv1.2' }, (req, res) => {
    void handle(standin, req, res);
  });
  server.on('tlsClientError', (_err, socket) => socket.destroy());
  server.listen(0, standin.listenHost);
  await once(server, 'listening');
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : 0;
  return {
    port,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        // The SDK keeps its HTTPS connections alive: end them so close() does not wait for them.
        server.closeAllConnections();
      }),
  };
}
