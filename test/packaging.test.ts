/**
 * Packaging: the IoT Edge deployment manifest (deploy/deployment.template.json) and the
 * Compose topology (docker-compose.yml) say what docs/azure.md and the README say.
 *
 * - manifest: a supported IoT Edge runtime (1.6 LTS; 1.5 ended on 10 Nov 2026, 1.4 on 12 Nov 2024) and schema;
 *   edgeHub keeps 8883/5671/443 as IoT Edge deploys it, leafgate listens on its own port;
 *   routes name exactly the outputs the module writes, plus the transparent-gateway route
 *   for leaf devices;
 * - compose: the gateways get none of the authority's secrets.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';

const root = join(import.meta.dirname, '..');
const manifest = JSON.parse(readFileSync(join(root, 'deploy', 'deployment.template.json'), 'utf8'));
const agent = manifest.modulesContent.$edgeAgent['properties.desired'];
const hubDesired = manifest.modulesContent.$edgeHub['properties.desired'];

/** IoT Edge LTS releases in support (Microsoft lifecycle: 1.5 ended on 10 Nov 2026; 1.6 LTS until 14 Nov 2028). */
const SUPPORTED_RUNTIME = ['1.6'];

type CreateOptions = { ExposedPorts?: Record<string, object>; HostConfig?: { PortBindings?: Record<string, Array<{ HostIp?: string; HostPort: string }>> } };
const createOptions = (mod: { settings: { createOptions?: string } }): CreateOptions => JSON.parse(mod.settings.createOptions || '{}');
const hostPorts = (o: CreateOptions) => Object.values(o.HostConfig?.PortBindings ?? {}).flat().map((b) => b.HostPort);

test('manifest: a supported IoT Edge runtime for edgeAgent and edgeHub, and a schema version it documents', () => {
  for (const name of ['edgeAgent', 'edgeHub']) {
    const image: string = agent.systemModules[name].settings.image;
    const m = /^mcr\.microsoft\.com\/azureiotedge-(agent|hub):(\d+\.\d+)$/.exec(image);
    assert.ok(m, `${name} image ${image} is an official IoT Edge image with a minor-version tag`);
    assert.ok(SUPPORTED_RUNTIME.includes(m[2]), `${name} ${m[2]} is a supported IoT Edge LTS`);
  }
  assert.equal(agent.schemaVersion, '1.1');
  assert.equal(hubDesired.schemaVersion, '1.1');
});

test('manifest: edgeHub keeps 8883, 5671 and 443; leafgate serves devices on its own port', () => {
  const hub = createOptions(agent.systemModules.edgeHub);
  assert.deepEqual(hub.HostConfig?.PortBindings, {
    '5671/tcp': [{ HostPort: '5671' }], '8883/tcp': [{ HostPort: '8883' }], '443/tcp': [{ HostPort: '443' }],
  });
  const leafgate = agent.modules.leafgate;
  const opts = createOptions(leafgate);
  const port = leafgate.env.LEAFGATE_GATEWAY_PORT?.value;
  assert.ok(port && !['8883', '5671', '443'].includes(port), `leafgate listens on its own port (${port})`);
  assert.ok(opts.ExposedPorts?.[`${port}/tcp`], 'its port is exposed');
  assert.deepEqual(opts.HostConfig?.PortBindings?.[`${port}/tcp`], [{ HostPort: port }], 'and published on the same host port');
  // No custom module takes a port of edgeHub's.
  for (const [name, mod] of Object.entries<any>(agent.modules)) {
    for (const p of hostPorts(createOptions(mod))) assert.ok(!['8883', '5671', '443'].includes(p), `module ${name} binds host port ${p} of edgeHub`);
  }
  // Metrics stay on the host's loopback.
  assert.deepEqual(opts.HostConfig?.PortBindings?.['9464/tcp'], [{ HostIp: '127.0.0.1', HostPort: '9464' }]);
});

test('manifest: routes name exactly the outputs the module writes, and leaf devices go upstream', () => {
  // Every output the gateway code writes (ModuleClient.sendOutputEvent('<name>', ...)).
  const written = new Set<string>();
  for (const f of readdirSync(join(root, 'gateway')).filter((n) => n.endsWith('.ts'))) {
    for (const m of readFileSync(join(root, 'gateway', f), 'utf8').matchAll(/sendOutputEvent\(\s*'([^']+)'/g)) written.add(m[1]);
  }
  assert.deepEqual([...written], ['telemetry'], 'the module writes one output');
  const routes = Object.values<string>(hubDesired.routes);
  const routed = new Set<string>();
  for (const r of routes) {
    const m = /^FROM \/messages\/modules\/leafgate\/outputs\/(\S+) /.exec(r);
    if (!m) continue;
    assert.ok(written.has(m[1]), `route ${r} names an output the module never writes`);
    routed.add(m[1]);
  }
  assert.deepEqual([...routed].sort(), [...written].sort(), 'every output is routed');
  // Transparent gateway: what the leaf devices send to edgeHub as themselves.
  assert.ok(routes.includes('FROM /messages/* WHERE NOT IS_DEFINED($connectionModuleId) INTO $upstream'));
});

test('docker-compose.yml: gateways get none of the authority\'s secrets; each secret goes only where it is used', (t) => {
  // No YAML parser in node_modules: PyYAML (merge keys resolved by safe_load) when the machine has it.
  const parsed = spawnSync('python3', ['-c', 'import json,sys,yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)', join(root, 'docker-compose.yml')], { encoding: 'utf8' });
  if (parsed.error || parsed.status !== 0) return t.skip(`python3 with PyYAML is not available here: ${parsed.error?.message ?? parsed.stderr.trim().split('\n').at(-1)}`);
  const compose = JSON.parse(parsed.stdout);
  const env = (name: string): Record<string, string> => {
    const e = compose.services[name]?.environment;
    assert.ok(compose.services[name], `service ${name}`);
    return Array.isArray(e) ? Object.fromEntries(e.map((x: string) => x.split(/=(.*)/s).slice(0, 2))) : (e ?? {});
  };
  const SECRETS = ['LEAFGATE_CA_PASSPHRASE', 'LEAFGATE_ADMIN_TOKEN', 'LEAFGATE_DATABASE_URL', 'POSTGRES_PASSWORD'];
  const gateways = Object.keys(compose.services).filter((n) => n.startsWith('gateway-'));
  assert.deepEqual(gateways, ['gateway-1', 'gateway-2']);
  for (const g of gateways) {
    const e = env(g);
    for (const s of SECRETS) assert.equal(e[s], undefined, `${g} gets ${s}`);
    for (const [k, v] of Object.entries(e)) assert.doesNotMatch(String(v), /postgres:\/\/|POSTGRES_PASSWORD|CA_PASSPHRASE|ADMIN_TOKEN/, `${g} ${k}`);
    assert.deepEqual(Object.keys(e).sort(), ['LEAFGATE_LOG_LEVEL', 'LEAFGATE_REDIS_PREFIX', 'LEAFGATE_REDIS_URL']);
    assert.ok(!compose.services[g].depends_on?.postgres, `${g} does not depend on the database`);
  }
  for (const a of ['authority-1', 'authority-2']) {
    assert.deepEqual(Object.keys(env(a)).filter((k) => SECRETS.includes(k)).sort(), ['LEAFGATE_ADMIN_TOKEN', 'LEAFGATE_CA_PASSPHRASE', 'LEAFGATE_DATABASE_URL']);
  }
  // The enrollment job mints gateway tokens (opens the CA and the database); it calls no admin API.
  assert.deepEqual(Object.keys(env('enroll')).filter((k) => SECRETS.includes(k)).sort(), ['LEAFGATE_CA_PASSPHRASE', 'LEAFGATE_DATABASE_URL']);
  for (const other of ['redis', 'lb']) for (const s of SECRETS) assert.equal(env(other)[s], undefined, `${other} gets ${s}`);
});
