/**
 * A local stand-in for the Device Provisioning Service's service REST surface, enough for
 * the real azure-iot-provisioning-service client: individual enrollments and enrollment
 * groups (PUT/GET/DELETE with etags), SAS verification on every request, fault injection.
 *
 * As DPS does (Individual Enrollment - Create Or Update, api-version 2021-10-01: `If-Match`
 * carries the ETag of the enrollment record): a PUT of an existing record without If-Match is
 * refused 409 (it would be a create), one with a stale If-Match 412; an api-version other than
 * the one azure-iot-provisioning-service 1.11 sends is refused 400.
 */
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import https from 'node:https';
import { createTestCa, issueServerCert } from './iothub-standin/pki.ts';
import { parseSas, signatureMatches } from './iothub-standin/sas.ts';

export interface DpsRequest {
  method: string;
  path: string;
  status: number;
  body: any;
}

/** The api-version the SDK sends (provisioningserviceclient.js: `?api-version=2021-10-01`). */
export const DPS_API_VERSIONS = new Set(['2021-10-01']);

export class DpsStandin {
  readonly hostName = 'leafgate-dps.azure-devices-provisioning.invalid';
  readonly enrollments = new Map<string, any>();
  readonly groups = new Map<string, any>();
  readonly requests: DpsRequest[] = [];
  readonly key = randomBytes(32).toString('base64');
  private faults: Array<{ status: number; headers: Record<string, string> }> = [];
  /** Ids whose next PUT is answered 412, as if someone changed the record between read and write. */
  readonly staleNextWrite = new Set<string>();
  private constructor(readonly ca: string, private readonly server: https.Server, readonly port: number) {}

  static async start(): Promise<DpsStandin> {
    const ca = createTestCa('dps-standin test root');
    const serverCert = issueServerCert(ca, ['leafgate-dps.azure-devices-provisioning.invalid']);
    let self: DpsStandin | undefined;
    const server = https.createServer({ key: serverCert.key, cert: serverCert.cert }, (req, res) => self!.handle(req, res));
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    self = new DpsStandin(ca.cert, server, (server.address() as { port: number }).port);
    return self;
  }

  get endpoint(): { host: string; port: number; ca: string } {
    return { host: '127.0.0.1', port: this.port, ca: this.ca };
  }

  connectionString(): string {
    return `HostName=${this.hostName};SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=${this.key}`;
  }

  failNext(n: number, status: number, headers: Record<string, string> = {}): void {
    for (let i = 0; i < n; i++) this.faults.push({ status, headers });
  }

  private handle(req: import('node:http').IncomingMessage, res: import('node:http').ServerResponse): void {
    const chunks: Buffer[] = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const text = Buffer.concat(chunks).toString('utf8');
      const body = text ? JSON.parse(text) : undefined;
      const url = new URL(req.url ?? '/', 'https://x');
      const send = (status: number, payload?: unknown, headers: Record<string, string> = {}) => {
        this.requests.push({ method: req.method!, path: url.pathname, status, body });
        res.writeHead(status, { 'content-type': 'application/json', ...headers });
        res.end(payload === undefined ? '' : JSON.stringify(payload));
      };
      const fault = this.faults.shift();
      if (fault) return send(fault.status, { errorCode: fault.status, message: 'injected fault' }, fault.headers);
      const apiVersion = url.searchParams.get('api-version');
      if (!apiVersion || !DPS_API_VERSIONS.has(apiVersion)) return send(400, { errorCode: 400001, message: `api-version ${apiVersion ?? '(none)'} is not supported` });
      const sas = parseSas(req.headers.authorization);
      if (!sas || sas.se * 1000 < Date.now() || !signatureMatches(sas, [this.key])) return send(401, { errorCode: 401002, message: 'Unauthorized' });
      const m = /^\/(enrollments|enrollmentGroups)\/([^/]+)$/.exec(url.pathname);
      if (!m) return send(404, { errorCode: 404001, message: 'not found' });
      const store = m[1] === 'enrollments' ? this.enrollments : this.groups;
      const id = decodeURIComponent(m[2]);
      const existing = store.get(id);
      if (req.method === 'GET') return existing ? send(200, existing) : send(404, { errorCode: 404201, message: 'Enrollment not found' });
      if (req.method === 'DELETE') {
        if (!existing) return send(404, { errorCode: 404201, message: 'Enrollment not found' });
        store.delete(id);
        return send(204);
      }
      if (req.method === 'PUT') {
        const raw = req.headers['if-match'];
        const ifMatch = typeof raw === 'string' ? raw.replace(/^W\//, '').replace(/^"(.*)"$/, '$1') : undefined;
        if (existing && !ifMatch) return send(409, { errorCode: 409203, message: 'Enrollment already exists: an update needs If-Match with its ETag' });
        if (ifMatch && !existing) return send(404, { errorCode: 404201, message: 'Enrollment not found' });
        if (existing && ifMatch !== existing.etag && ifMatch !== '*') return send(412, { errorCode: 412002, message: 'etag mismatch' });
        if (this.staleNextWrite.delete(id)) return send(412, { errorCode: 412002, message: 'etag mismatch (changed meanwhile)' });
        const record = { ...body, etag: randomBytes(6).toString('hex'), createdDateTimeUtc: existing?.createdDateTimeUtc ?? new Date().toISOString(), lastUpdatedDateTimeUtc: new Date().toISOString() };
        store.set(id, record);
        return send(200, record);
      }
      send(405, { errorCode: 405000, message: 'method not allowed' });
    });
  }

  close(): Promise<void> {
    return new Promise((r) => this.server.close(() => r()));
  }
}
