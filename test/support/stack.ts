/**
 * Test stack: a real authority (HTTPS mTLS, SQLite) and a real gateway (aedes over TLS),
 * both on port 0 in a fresh temp directory, with an enrolled gateway and a simulated
 * manufacturer CA. Each test builds its own and closes it in t.after.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import pino from 'pino';
import { resolveAuthorityConfig, startAuthority, type AuthorityConfigInput, type DevicePolicy, type RunningAuthority } from '../../authority/index.ts';
import { enrollGateway, resolveGatewayConfig, startGateway, type GatewayConfigInput, type RunningGateway } from '../../gateway/index.ts';
import { LeafDevice, ManufacturerCa, type DeviceCredential, type DeviceOptions } from '../../device/index.ts';

export interface Stack {
  dir: string;
  authority: RunningAuthority;
  gateway: RunningGateway;
  brokerUrl: string;
  rootPem: string;
  manufacturer: ManufacturerCa;
  gatewayId: string;
  /** A device with a fresh birth certificate (pki-signature) or hardware attributes (ddkg). */
  device(id: string, method: 'pki-signature' | 'ddkg', extra?: Partial<DeviceOptions>): LeafDevice;
  credential(id: string, method: 'pki-signature' | 'ddkg'): DeviceCredential;
  /** Stops the authority (the gateway stays up: the link is down). */
  stopAuthority(): Promise<void>;
  /** Starts the authority again on the same data directory and port. */
  startAuthorityAgain(): Promise<RunningAuthority>;
  /**
   * Enrolls and starts another gateway on the same authority (e.g. a second cluster node);
   * `authorityUrl` lets it reach the authority through something else (a cuttable proxy).
   * Closed with the stack.
   */
  addGateway(gatewayId: string, config?: GatewayConfigInput, opts?: { authorityUrl?: string }): Promise<RunningGateway>;
  close(): Promise<void>;
}

/**
 * Every certificate a test made the authority issue is checked once more by an independent
 * verifier, `openssl verify -x509_strict`, against the root and the intermediates (time not
 * checked: tests move the authority's clock). One openssl process per stack.
 */
async function verifyEverythingIssued(authority: RunningAuthority, dir: string): Promise<void> {
  // A test that dropped its database (a PostgreSQL schema removed by its own clean-up) has nothing left to check.
  const all = await authority.store.listCertificates({ limit: 1_000_000 }).catch(() => []);
  if (!all.length) return;
  const out = join(dir, 'issued-check');
  mkdirSync(out, { recursive: true });
  const ca = authority.ca;
  // Certificates of an external device CA (EST) are checked against that CA's chain.
  const external = authority.deviceIssuer.bundle().externalDeviceChain;
  const groups: Array<{ certs: typeof all; root: string; intermediates: string }> = [
    { certs: all.filter((c) => c.issuer !== 'external-ca'), root: ca.root.pem, intermediates: ca.deviceCa.pem + ca.infraCa.pem + ca.edgeIssuer.pem },
  ];
  const externalCerts = all.filter((c) => c.issuer === 'external-ca');
  if (externalCerts.length) {
    if (!external) throw new Error('certificates of an external CA are on record but no external chain is configured');
    groups.push({ certs: externalCerts, root: external.at(-1)!, intermediates: external.slice(0, -1).join('') });
  }
  for (const [g, group] of groups.entries()) {
    if (!group.certs.length) continue;
    writeFileSync(join(out, `root-${g}.pem`), group.root);
    writeFileSync(join(out, `intermediates-${g}.pem`), group.intermediates);
    const files = group.certs.map((c, i) => {
      writeFileSync(join(out, `${g}-${i}.pem`), c.pem);
      return `${g}-${i}.pem`;
    });
    const r = spawnSync('openssl', ['verify', '-x509_strict', '-no_check_time', '-CAfile', `root-${g}.pem`, '-untrusted', `intermediates-${g}.pem`, ...files], { cwd: out, encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
    if (r.status !== 0) {
      const failed = (r.stdout + r.stderr).split('\n').filter((l) => l && !/: OK$/.test(l)).slice(0, 10).join('\n');
      throw new Error(`a certificate the authority issued fails openssl verify -x509_strict:\n${failed}`);
    }
  }
}

export const logger = pino({ level: process.env.LEAFGATE_LOG_LEVEL ?? 'silent' });

export async function startStack(
  t: TestContext | null,
  opts: {
    authority?: AuthorityConfigInput;
    gateway?: GatewayConfigInput;
    /** merged into both test groups */
    policy?: Partial<DevicePolicy>;
    /** The authority's clock (expiry tests move it instead of sleeping). */
    authorityNow?: () => number;
    /** The gateway's logger (a test that counts log lines passes its own). */
    gatewayLogger?: pino.Logger;
  } = {},
): Promise<Stack> {
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-test-'));
  const manufacturer = ManufacturerCa.create();
  const authorityConfig = resolveAuthorityConfig({
    dataDir: join(dir, 'authority'),
    caPassphrase: 'test-passphrase-0123456789',
    listen: { host: '127.0.0.1', port: 0 },
    ...opts.authority,
    policies: opts.authority?.policies ?? {
      default: { ...opts.policy, pkiSignature: { manufacturerCAs: [manufacturer.pem], deviceIdFrom: 'CN' }, ddkg: { enrollment: 'allow-list', allowList: ['ddkg-*'] } },
      coded: { ...opts.policy, pkiSignature: { manufacturerCAs: [manufacturer.pem], deviceIdFrom: 'CN' }, ddkg: { enrollment: 'one-time-code', allowList: [] } },
    },
  }, {});
  let authority = await startAuthority(authorityConfig, { logger, now: opts.authorityNow });
  let authorityUp = true;
  const gatewayId = 'gw-test';
  const gatewayDir = join(dir, 'gateway');
  try {
    const token = await authority.enrollment.createToken(gatewayId);
    await enrollGateway({ authorityUrl: authority.url.replace('localhost', '127.0.0.1'), token, rootFingerprint: authority.rootFingerprint, gatewayId, dataDir: gatewayDir, hostnames: ['localhost', '127.0.0.1'] });
  } catch (err) {
    await authority.close();
    throw err;
  }
  let gateway: RunningGateway;
  try {
    gateway = await startGateway(resolveGatewayConfig({ dataDir: gatewayDir, listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 }, ...opts.gateway }, {}), { logger: opts.gatewayLogger ?? logger });
  } catch (err) {
    // A gateway that cannot start (a bad test config, say) must not leave the authority running:
    // the test file would never end.
    await authority.close();
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
  const brokerUrl = `mqtts://127.0.0.1:${gateway.port}`;
  const rootPem = gateway.rootPem;

  const credential = (id: string, method: 'pki-signature' | 'ddkg'): DeviceCredential =>
    method === 'pki-signature' ? { method, ...manufacturer.issueBirthCertificate(id) } : { method, attributes: { cpu: `cpu-${id}`, mac: '02:00:00:00:00:01', board: 'rev-b' } };

  let closed = false;
  const extraGateways: RunningGateway[] = [];
  const stack: Stack = {
    dir, authority, gateway,
    async stopAuthority() {
      if (!authorityUp) return;
      authorityUp = false;
      await stack.authority.close();
    },
    async startAuthorityAgain() {
      authority = await startAuthority({ ...authorityConfig, listen: { ...authorityConfig.listen, port: new URL(authority.url).port ? Number(new URL(authority.url).port) : 0 } }, { logger, now: opts.authorityNow });
      authorityUp = true;
      stack.authority = authority;
      return authority;
    },
    async addGateway(id, config = {}, o = {}) {
      const gwDir = join(dir, `gateway-${id}`);
      const token = await stack.authority.enrollment.createToken(id);
      await enrollGateway({ authorityUrl: o.authorityUrl ?? stack.authority.url.replace('localhost', '127.0.0.1'), token, rootFingerprint: stack.authority.rootFingerprint, gatewayId: id, dataDir: gwDir, hostnames: ['localhost', '127.0.0.1'] });
      const gw = await startGateway(resolveGatewayConfig({ dataDir: gwDir, listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 }, ...config }, {}), { logger });
      extraGateways.push(gw);
      return gw;
    },
    brokerUrl, rootPem, manufacturer, gatewayId, credential,
    device: (id, method, extra = {}) => new LeafDevice({ deviceId: id, brokerUrl, ca: rootPem, credential: credential(id, method), timeoutMs: 10_000, ...extra }),
    async close() {
      if (closed) return;
      closed = true;
      for (const gw of extraGateways) await gw.close();
      await stack.gateway.close();
      if (authorityUp) {
        try {
          await verifyEverythingIssued(stack.authority, dir);
        } finally {
          await stack.authority.close();
        }
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
  t?.after(() => stack.close());
  return stack;
}
