import { createPrivateKey } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { LeafDevice, type DeviceCredential } from '../device/index.ts';
import { pkix, type KeySpec } from '../protocol/index.ts';
import { parse, readOptionFile, UsageError } from './cli.ts';

const USAGE = `leafgate device onboard [options]

Runs the whole onboarding flow of docs/protocol.md against a gateway, stores the key,
certificate and chain, reconnects with mutual TLS and publishes one telemetry message.

Options:
  --id ID                 device id (also the MQTT client id)
  --broker URL            gateway, e.g. mqtts://localhost:8883
  --ca FILE               root CA (PEM) that the gateway's certificate chains to
  --method METHOD         pki-signature | ddkg
  --birth-cert FILE       pki-signature: birth certificate (PEM)
  --factory-key FILE      pki-signature: factory private key (PEM)
  --attr NAME=VALUE       ddkg: a hardware attribute (repeatable)
  --enrollment-code CODE  ddkg: one-time code for the first enrollment, if the policy asks
  --group NAME            device group
  --key SPEC              preferred key: ec-256, ec-384, rsa-2048, rsa-3072, rsa-4096
  --out DIR               where key.pem, cert.pem and chain.pem go (default ./<id>)
  -h, --help              this text

Example:
  leafgate device onboard --id sensor-1 --broker mqtts://gw1:8883 --ca root.pem \\
    --method ddkg --attr serial=SN123 --attr mac=00:11:22:33:44:55

Environment: LEAFGATE_LOG_LEVEL.
`;

export function parseKeySpec(s: string): KeySpec {
  const m = /^(ec|rsa)-(\d+)$/.exec(s);
  if (!m) throw new UsageError(`--key ${s}: expected ec-256, ec-384, rsa-2048, ...`);
  return { keyType: m[1] as 'ec' | 'rsa', keySize: Number(m[2]) };
}

export async function deviceCommand(argv: string[]): Promise<number> {
  const parsed = parse(argv, {
    id: { type: 'string' }, broker: { type: 'string' }, ca: { type: 'string' }, method: { type: 'string' }, 'birth-cert': { type: 'string' }, 'factory-key': { type: 'string' },
    attr: { type: 'string', multiple: true }, 'enrollment-code': { type: 'string' }, group: { type: 'string' }, key: { type: 'string' }, out: { type: 'string' },
  }, USAGE);
  if (!parsed) return 0;
  const [command] = parsed.positionals;
  if (command !== 'onboard') throw new UsageError(`unknown command ${command ?? '(none)'}\n\n${USAGE}`);
  const v = parsed.values;
  for (const k of ['id', 'broker', 'ca', 'method']) if (!v[k]) throw new UsageError(`--${k} is required`);
  let credential: DeviceCredential;
  if (v.method === 'pki-signature') {
    if (!v['birth-cert'] || !v['factory-key']) throw new UsageError('pki-signature needs --birth-cert and --factory-key');
    credential = { method: 'pki-signature', birthCert: readOptionFile(v['birth-cert'], 'birth-cert'), factoryKey: createPrivateKey(readOptionFile(v['factory-key'], 'factory-key')) };
  } else if (v.method === 'ddkg') {
    const attributes: Record<string, string> = {};
    for (const a of v.attr ?? []) {
      const i = a.indexOf('=');
      if (i <= 0) throw new UsageError(`--attr ${a}: expected NAME=VALUE`);
      attributes[a.slice(0, i)] = a.slice(i + 1);
    }
    if (!Object.keys(attributes).length) throw new UsageError('ddkg needs at least one --attr NAME=VALUE');
    credential = { method: 'ddkg', attributes, ...(v['enrollment-code'] ? { enrollmentCode: v['enrollment-code'] } : {}) };
  } else throw new UsageError('--method must be pki-signature or ddkg');

  const device = new LeafDevice({
    deviceId: v.id, brokerUrl: v.broker, ca: readOptionFile(v.ca, 'ca'), credential, group: v.group,
    keyPreference: v.key ? [parseKeySpec(v.key)] : undefined, storeDir: v.out ?? `./${v.id}`,
  });
  const result = await device.onboard();
  process.stdout.write(`certificate ${result.serial} (${pkix.keySpecLabel(result.key)}), valid until ${result.notAfter}, in ${v.out ?? `./${v.id}`} (${result.ms.total.toFixed(0)} ms)\n`);
  const client = await device.connectOperational(result);
  await device.publishTelemetry(client, { hello: 'from leafgate device', at: new Date().toISOString() });
  await client.endAsync();
  process.stdout.write('reconnected with mutual TLS and published telemetry\n');
  return 0;
}
