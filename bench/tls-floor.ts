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
import tls from 'node:tls';
import { LocalCa } from '../authority/index.ts';
import { CpuMeter, spawnNode } from './common.ts';
import { issueBenchIdentity } from './identities.ts';
import { RawMqtt } from './mqtt-raw.ts';

export interface TlsFloorResult {
  devices: number;
  failed: number;
  /** CPU ms per device (two handshakes) in the client process and in the server process. */
  clientMs: number;
  serverMs: number;
  wallMs: number;
}

/** TLS (the gateway's chain and host name checked), CONNECT, CONNACK, close. */
async function exchange(port: number, secureContext: tls.SecureContext, anchors: string): Promise<void> {
  // `ca` only switches the verification on; the anchors are in the context.
  const c = await RawMqtt.connect({ host: '127.0.0.1', port, clientId: 'bench-tls-floor', secureContext, ca: anchors, timeoutMs: 30_000 });
  c.socket.destroy();
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
    const identity = await issueBenchIdentity(LocalCa.open(o.caDir, o.passphrase), 'bench-tls-floor');
    const bootstrap = tls.createSecureContext({ ca: o.anchors, minVersion: 'TLSv1.2' });
    const operational = tls.createSecureContext({ ca: o.anchors, key: identity.keyPem, cert: identity.certPem, minVersion: 'TLSv1.2' });

    const device = async () => {
      await exchange(port, bootstrap, o.anchors);
      await exchange(port, operational, o.anchors);
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
