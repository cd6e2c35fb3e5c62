/**
 * The main job: an authority and a gateway on embedded defaults, N simulated leaf devices
 * onboarding end to end (mixed methods and key types), a summary table, a chain check of
 * every certificate, then either exit (--exit) or keep serving with the commands a person
 * needs to onboard a real device.
 */
import { execFileSync } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import pino from 'pino';
import { resolveAuthorityConfig, startAuthority } from '../authority/index.ts';
import { LeafDevice, ManufacturerCa, type OnboardResult } from '../device/index.ts';
import { enrollGateway, resolveGatewayConfig, startGateway } from '../gateway/index.ts';
import { pkix, type AuthMethod, type KeySpec } from '../protocol/index.ts';
import { intOption, parse, serveUntilSignal } from './cli.ts';
import { formatTable } from './table.ts';

const USAGE = `leafgate demo [options]

Starts an authority and a gateway (no Redis, no PostgreSQL, no Azure), onboards simulated
leaf devices end to end, prints a summary and keeps serving (Ctrl-C stops it).

Options:
  --devices N       simulated devices (default 10)
  --concurrency N   devices onboarding at once (default 10)
  --port N          gateway MQTT/TLS port (default 8883; 0 picks a free one)
  --data-dir DIR    where CA, database and files go (default: a new temp directory)
  --exit            exit after the summary: status 0 only if every device got a valid cert
  --log-level LVL   pino level for service logs on stderr (default warn)

To mirror the demo devices into an IoT Hub, set LEAFGATE_IOTHUB_CONNECTION_STRING (a hub
with an IoT Edge device named demo-gateway): they are registered as its children. (The
former --local-hub option ran the test stand-in, which is test code: it was removed.)
  -h, --help        this text
`;

const DEMO_PASSPHRASE = 'demo-only-passphrase-change-me';

interface Row {
  id: string;
  method: AuthMethod;
  key: KeySpec;
  result?: OnboardResult;
  error?: string;
  chainOk?: boolean;
  mtlsOk?: boolean;
}

function plan(n: number): Row[] {
  const keys: KeySpec[] = [{ keyType: 'ec', keySize: 256 }, { keyType: 'rsa', keySize: 2048 }];
  return Array.from({ length: n }, (_, i) => ({
    id: `sim-${String(i + 1).padStart(String(n).length < 3 ? 3 : String(n).length, '0')}`,
    method: i % 2 === 0 ? 'pki-signature' : 'ddkg',
    key: keys[Math.floor(i / 2) % 2],
  }));
}

function table(rows: Row[]): string {
  return formatTable(rows.map((r) => ({
    device: r.id,
    method: r.method,
    key: pkix.keySpecLabel(r.key),
    serial: r.result?.serial ?? '-',
    'not after': r.result?.notAfter.slice(0, 19).replace('T', ' ') ?? '-',
    ms: r.result ? r.result.ms.total.toFixed(0) : '-',
    chain: r.error ? `FAILED: ${r.error}` : r.chainOk && r.mtlsOk ? 'ok' : 'INVALID',
  })));
}

function openssl(args: string[]): boolean {
  try {
    execFileSync('openssl', args, { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

export async function demoCommand(argv: string[]): Promise<number> {
  const parsed = parse(argv, {
    devices: { type: 'string' }, concurrency: { type: 'string' }, port: { type: 'string' }, 'data-dir': { type: 'string' }, exit: { type: 'boolean' }, 'log-level': { type: 'string' },
  }, USAGE);
  if (!parsed) return 0;
  const v = parsed.values;
  const count = intOption(v.devices, 'devices', 1, 100_000) ?? 10;
  const concurrency = intOption(v.concurrency, 'concurrency', 1, 10_000) ?? 10;
  const port = intOption(v.port, 'port', 0, 65535) ?? 8883;
  const dir = resolve(v['data-dir'] ?? mkdtempSync(join(tmpdir(), 'leafgate-demo-')));
  mkdirSync(dir, { recursive: true });
  const logger = pino({ level: v['log-level'] ?? 'warn' }, pino.destination(2));
  const out = (s = '') => process.stdout.write(s + '\n');

  out(`leafgate demo — data in ${dir}`);
  const manufacturer = ManufacturerCa.create('Demo Manufacturer CA');
  writeFileSync(join(dir, 'manufacturer-ca.pem'), manufacturer.pem);
  const passphrase = process.env.LEAFGATE_CA_PASSPHRASE ?? DEMO_PASSPHRASE;
  // The stand-in lives with the tests; the demo borrows it to show the IoT Hub connector.
  if (!process.env.LEAFGATE_CA_PASSPHRASE) out('note: CA keys are encrypted with the demo passphrase; set LEAFGATE_CA_PASSPHRASE for anything real');
  const authority = await startAuthority(
    resolveAuthorityConfig({
      dataDir: join(dir, 'authority'),
      caPassphrase: passphrase,
      listen: { host: '127.0.0.1', port: 0 },
      policies: {
        default: { pkiSignature: { manufacturerCAs: [manufacturer.pem], deviceIdFrom: 'CN' }, ddkg: { enrollment: 'allow-list', allowList: ['sim-*', 'demo-*'] } },
      },
    }, {}),
    { logger },
  );
  out(`authority   ${authority.url}  root ${authority.rootFingerprint.slice(0, 23)}…`);
  const token = await authority.enrollment.createToken('demo-gateway');
  const gatewayDir = join(dir, 'gateway');
  await enrollGateway({ authorityUrl: authority.url.replace('localhost', '127.0.0.1'), token, rootFingerprint: authority.rootFingerprint, gatewayId: 'demo-gateway', dataDir: gatewayDir, hostnames: ['localhost', '127.0.0.1'] });
  let gateway;
  try {
    gateway = await startGateway(resolveGatewayConfig({
      dataDir: gatewayDir,
      listen: { host: '0.0.0.0', port },
      http: { host: '127.0.0.1', port: 0 },
      // Every simulated device connects from this one address, twice.
      rateLimits: { connectionsPerAddress: { points: Math.max(200, count * 4), durationSeconds: 10 } },
    }, {}), { logger });
  } catch (err) {
    await authority.close();
    if ((err as NodeJS.ErrnoException).code === 'EADDRINUSE') {
      process.stderr.write(`port ${port} is in use: run with --port 0 (any free port) or another --port\n`);
      return 2;
    }
    throw err;
  }
  const brokerUrl = `mqtts://localhost:${gateway.port}`;
  out(`gateway     demo-gateway  ${brokerUrl}  metrics http://127.0.0.1:${gateway.httpPort}/metrics`);
  out(`onboarding ${count} simulated devices (${concurrency} at a time)…`);

  const rows = plan(count);
  const roots = pkix.parseCertificates(gateway.rootPem);
  let done = 0;
  const started = performance.now();
  const runOne = async (row: Row) => {
    const credential = row.method === 'pki-signature'
      ? { method: 'pki-signature' as const, ...manufacturer.issueBirthCertificate(row.id) }
      : { method: 'ddkg' as const, attributes: { serial: `SN-${row.id}`, mac: '02:00:5e:00:53:01', board: 'demo-rev-a' } };
    const device = new LeafDevice({ deviceId: row.id, brokerUrl, ca: gateway.rootPem, credential, keyPreference: [row.key], timeoutMs: 60_000 });
    try {
      row.result = await device.onboard();
      const leaf = new X509Certificate(row.result.certificate);
      const check = pkix.verifyChain(leaf, pkix.parseCertificates(row.result.chain.join('')), roots);
      row.chainOk = check.ok;
      if (!check.ok) row.error = check.reason;
      const client = await device.connectOperational(row.result);
      await device.publishTelemetry(client, { demo: true, at: new Date().toISOString() });
      await client.endAsync();
      row.mtlsOk = true;
    } catch (err) {
      row.error = (err as { code?: string }).code ?? (err as Error).message;
    }
    done++;
    out(`  [${String(done).padStart(String(count).length)}/${count}] ${row.id.padEnd(8)} ${row.method.padEnd(13)} ${pkix.keySpecLabel(row.key).padEnd(9)} ${row.error ? `FAILED ${row.error}` : `ok ${row.result!.ms.total.toFixed(0)} ms`}`);
  };
  const queue = [...rows];
  await Promise.all(Array.from({ length: Math.min(concurrency, count) }, async () => {
    for (let row = queue.shift(); row; row = queue.shift()) await runOne(row);
  }));
  const elapsed = (performance.now() - started) / 1000;

  out();
  out(table(rows));
  const valid = rows.filter((r) => !r.error && r.chainOk && r.mtlsOk).length;
  out();
  out(`${valid}/${count} devices hold a valid certificate (chain checked to the root, mTLS reconnect done) in ${elapsed.toFixed(2)} s (${(count / elapsed).toFixed(1)} devices/s)`);

  // Cross-check with the openssl command line when it is installed.
  const first = rows.find((r) => r.result);
  if (first?.result) {
    const sample = join(dir, 'sample');
    mkdirSync(sample, { recursive: true });
    writeFileSync(join(sample, 'cert.pem'), first.result.certificate);
    writeFileSync(join(sample, 'chain.pem'), first.result.chain[0]);
    writeFileSync(join(sample, 'root.pem'), gateway.rootPem);
    if (openssl(['version'])) {
      const ok = openssl(['verify', '-x509_strict', '-purpose', 'sslclient', '-CAfile', join(sample, 'root.pem'), '-untrusted', join(sample, 'chain.pem'), join(sample, 'cert.pem')]);
      out(`openssl verify of ${first.id}: ${ok ? 'OK' : 'FAILED'}`);
    }
  }

  if (authority.hub) {
    // A pass may already be running from before the last issuance: one more picks up the rest.
    await authority.hub.sync();
    await authority.hub.sync();
    const c = await authority.store.countSync('hub');
    out(`IoT Hub: ${c.pending} device(s) still pending, ${c.failed} parked as sync-failed`);
  }

  if (v.exit) {
    await gateway.close();
    await authority.close();
    return valid === count ? 0 : 1;
  }

  // Material for a person to onboard a real device by hand (docs/protocol.md, walk-through).
  const example = join(dir, 'example-device');
  mkdirSync(example, { recursive: true });
  const birth = manufacturer.issueBirthCertificate('demo-device-1');
  writeFileSync(join(example, 'birth-cert.pem'), birth.birthCert);
  writeFileSync(join(example, 'factory-key.pem'), birth.factoryKey.export({ type: 'pkcs8', format: 'pem' }) as string, { mode: 0o600 });
  writeFileSync(join(dir, 'root-ca.pem'), gateway.rootPem);
  out();
  // Handlers before the lines that say it is serving (see gateway start).
  const served = serveUntilSignal(async () => {
    await gateway.close();
    await authority.close();
  });
  out('The gateway keeps serving. Onboard a device yourself:');
  out(`  npx tsx bin/leafgate.ts device onboard --id demo-device-1 --broker ${brokerUrl} --ca ${join(dir, 'root-ca.pem')} \\`);
  out(`      --method pki-signature --birth-cert ${join(example, 'birth-cert.pem')} --factory-key ${join(example, 'factory-key.pem')} --key ec-256`);
  out(`  npx tsx bin/leafgate.ts device onboard --id demo-ddkg-1 --broker ${brokerUrl} --ca ${join(dir, 'root-ca.pem')} \\`);
  out('      --method ddkg --attr serial=SN-0001 --attr mac=02:00:5e:00:53:99');
  out('or by hand with openssl alone: docs/protocol.md, "Walk-through" (onboarding needs one MQTT');
  out('connection for register, auth and csr; after that, stock clients work with mutual TLS:)');
  out('  cat demo-device-1/cert.pem demo-device-1/chain.pem > demo-device-1/cert-and-chain.pem');
  out(`  mosquitto_pub -h localhost -p ${gateway.port} --cafile ${join(dir, 'root-ca.pem')} -i demo-device-1 \\`);
  out('      --cert demo-device-1/cert-and-chain.pem --key demo-device-1/key.pem -t lg/v1/demo-device-1/up/telemetry/state -m \'{"ok":true}\' -q 1');
  out('Ctrl-C stops the demo.');
  await served;
  return 0;
}
