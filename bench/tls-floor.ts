/**
 * The TLS floor of onboarding: the CPU that the two TLS handshakes of every onboarding cost
 * on this runtime, both ends together, with nothing else around them.
 *
 * A device opens two connections: the bootstrap one (it checks the gateway's certificate
 * chain and host name; it has no certificate of its own yet) and, once issued, the mutual
 * TLS one. Here the server is node's tls.Server with the broker's exact options (the
 * node-tls reference of bench/reference-brokers.ts, its own process) and the client is this
 * process, which makes the same two handshakes per "device" as the simulator does (the same
 * anchors, the host-name check, one CONNECT/CONNACK exchange each) and nothing else: no
 * MQTT client library, no registration, no CSR, no issuance. The client contexts are built
 * once, not per device, so the figure is a lower bound of what any onboarding through node's
 * TLS costs on this machine, to set beside `cpu_ms_per_device` of the same run.
 */
import { generateKeyPairSync } from 'node:crypto';
import tls from 'node:tls';
import mqttPacket from 'mqtt-packet';
import { LocalCa } from '../authority/index.ts';
import { BACKDATE_MS } from '../authority/ca/index.ts';
import { pkix } from '../protocol/index.ts';
import { CpuMeter, spawnNode } from './common.ts';

export interface TlsFloorResult {
  devices: number;
  failed: number;
  /** CPU ms per device (two handshakes) in the client process and in the server process. */
  clientMs: number;
  serverMs: number;
  wallMs: number;
}

function exchange(port: number, ctx: tls.SecureContext, connect: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ host: '127.0.0.1', port, secureContext: ctx, rejectUnauthorized: true, minVersion: 'TLSv1.2' });
    const timer = setTimeout(() => fail(new Error('timeout')), 30_000);
    function fail(err: Error) {
      clearTimeout(timer);
      socket.destroy();
      reject(err);
    }
    socket.once('error', fail);
    socket.once('secureConnect', () => {
      socket.setNoDelay(true);
      socket.write(connect);
    });
    socket.once('data', (d: Buffer) => {
      clearTimeout(timer);
      socket.destroy();
      if (d[0] === 0x20) resolve();
      else reject(new Error(`unexpected first byte ${d[0]}`));
    });
  });
}

export async function measureTlsFloor(o: {
  gatewayDir: string;
  caDir: string;
  passphrase: string;
  /** The anchors the simulated devices are given for the gateway (the root). */
  anchors: string;
  devices: number;
  concurrency: number;
}): Promise<TlsFloorResult> {
  const ref = spawnNode('bench/reference-brokers.ts', [o.gatewayDir, 'node-tls'], { name: 'node-tls' });
  try {
    const port = Number((await ref.waitFor(/on port (\d+)/))[1]);
    const ca = LocalCa.open(o.caDir, o.passphrase);
    const pair = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const now = Date.now();
    const issued = ca.issue('device', {
      subjectDer: pkix.encodeName('bench-tls-floor'), spkiDer: pair.publicKey.export({ type: 'spki', format: 'der' }), profile: { kind: 'device', keyType: 'ec' },
      notBefore: new Date(now - BACKDATE_MS), notAfter: new Date(now + 86_400_000),
    });
    const bootstrap = tls.createSecureContext({ ca: o.anchors, minVersion: 'TLSv1.2' });
    const operational = tls.createSecureContext({ ca: o.anchors, key: pair.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, cert: issued.pem, minVersion: 'TLSv1.2' });
    const connect = mqttPacket.generate({ cmd: 'connect', protocolId: 'MQTT', protocolVersion: 4, clientId: 'bench-tls-floor', clean: true, keepalive: 60 });

    const device = async () => {
      await exchange(port, bootstrap, connect);
      await exchange(port, operational, connect);
    };
    let failed = 0;
    const runMany = async (n: number) => {
      let next = 0;
      const lane = async () => {
        while (next++ < n) await device().catch(() => failed++);
      };
      await Promise.all(Array.from({ length: Math.min(o.concurrency, n) }, lane));
    };
    await runMany(Math.min(200, o.devices)); // JIT, allocator, OpenSSL's lazily built tables
    failed = 0;
    const meter = new CpuMeter({ client: 'self', server: ref.pid });
    meter.begin();
    await runMany(o.devices);
    const { cpuMs, wallMs } = meter.end();
    const ok = Math.max(1, o.devices - failed);
    return { devices: o.devices, failed, clientMs: cpuMs.client / ok, serverMs: cpuMs.server / ok, wallMs };
  } finally {
    await ref.stop();
  }
}
