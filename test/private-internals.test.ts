/**
 * leafgate reaches into private internals of a few libraries where they offer no public
 * extension point. Each such library is pinned to an exact version in package.json, and
 * each internal is checked here: an upgrade that moves one fails with a message that says
 * which of our files depends on it, instead of a silent change in production.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { PassThrough } from 'node:stream';
import { test } from 'node:test';
import { Aedes } from 'aedes';
import mqttPacket from 'mqtt-packet';
import createMq from 'mqemitter-redis';
import msgpack from 'msgpack-lite';
import azureIotHub from 'azure-iothub';
import azureProvisioning from 'azure-iot-provisioning-service';

const require = createRequire(import.meta.url);
const manifest = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { dependencies: Record<string, string> };

/** Which of our files uses which private internal of which package. */
const PINNED: Record<string, string> = {
  aedes: 'broker/index.ts (client._parser, aedes.clients, aedes.persistence), gateway/service.ts (client.will)',
  'mqtt-packet': 'broker/index.ts (Parser.prototype._parseLength, parser._list)',
  'mqemitter-redis': 'gateway/cluster.ts (emit replaced: _emit, _cache, pubConn and the {id, msg} msgpack wire packet)',
  'msgpack-lite': 'gateway/cluster.ts (the wire encoding of mqemitter-redis)',
  'azure-iothub': 'authority/registry/iothub-adapter.ts (Registry._restApiClient.setOptions)',
  'azure-iot-provisioning-service': 'authority/registry/dps.ts (ProvisioningServiceClient._restApiClient.setOptions)',
};

const changed = (pkg: string, what: string) => `${pkg}: ${what} changed; ${PINNED[pkg]} depends on it: adapt that code, then update the exact pin in package.json`;

test('every library whose internals we use is pinned to the exact version installed', () => {
  for (const pkg of Object.keys(PINNED)) {
    const pin = manifest.dependencies[pkg];
    assert.match(pin ?? '', /^\d+\.\d+\.\d+$/, `${pkg} must be pinned to an exact version in package.json (its private internals are used by ${PINNED[pkg]}), got ${pin}`);
    const installed = (JSON.parse(readFileSync(new URL(`../node_modules/${pkg}/package.json`, import.meta.url), 'utf8')) as { version: string }).version;
    assert.equal(installed, pin, `${pkg} ${installed} is installed but ${pin} is the version whose internals were checked: ${changed(pkg, 'the version')}`);
  }
});

test('mqtt-packet: the parser has _parseLength on its prototype and a BufferList in _list', () => {
  const parser = mqttPacket.parser() as unknown as { _list?: { constructor: { BufferList?: unknown }; length: number }; packet?: unknown };
  assert.equal(typeof (Object.getPrototypeOf(parser) as { _parseLength?: unknown })._parseLength, 'function', changed('mqtt-packet', 'Parser.prototype._parseLength'));
  assert.ok(parser._list && typeof parser._list.length === 'number', changed('mqtt-packet', 'parser._list'));
  assert.equal(typeof parser._list.constructor.BufferList, 'function', changed('mqtt-packet', 'parser._list.constructor.BufferList'));
  assert.ok('packet' in parser, changed('mqtt-packet', 'parser.packet'));
});

test('aedes: broker.clients, broker.persistence.destroy, client._parser and client.will', async () => {
  const broker = await Aedes.createBroker();
  try {
    const internals = broker as unknown as { clients?: unknown; persistence?: { destroy?: unknown } };
    assert.equal(typeof internals.clients, 'object', changed('aedes', 'broker.clients'));
    assert.equal(typeof internals.persistence?.destroy, 'function', changed('aedes', 'broker.persistence.destroy'));
    const stream = new PassThrough();
    const client = broker.handle(stream as never) as unknown as { _parser?: { _parseLength?: unknown }; will?: unknown };
    assert.equal(typeof client._parser?._parseLength, 'function', changed('aedes', 'client._parser (an mqtt-packet parser)'));
    assert.ok('will' in client, changed('aedes', 'client.will'));
    stream.destroy();
  } finally {
    await new Promise<void>((resolve) => broker.close(() => resolve()));
  }
});

test('mqemitter-redis: emit, _emit, and the {id, msg} msgpack packet it decodes', () => {
  const proto = (createMq as unknown as { prototype?: Record<string, unknown> }).prototype ?? {};
  // The factory is the constructor (called without new).
  assert.equal(typeof proto.emit, 'function', changed('mqemitter-redis', 'MQEmitterRedis.prototype.emit'));
  assert.equal(typeof proto._emit, 'function', changed('mqemitter-redis', 'MQEmitterRedis.prototype._emit (mqemitter\'s local delivery)'));
  const source = readFileSync(require.resolve('mqemitter-redis'), 'utf8');
  for (const needle of ['msgpack.decode(payload)', '_cache', 'packet.id', 'packet.msg']) {
    assert.ok(source.includes(needle), changed('mqemitter-redis', `the wire packet handling (${needle})`));
  }
  const packet = { id: 'x', msg: { topic: 'a/b', payload: Buffer.from('p') } };
  assert.deepEqual(msgpack.decode(msgpack.encode(packet)), packet, changed('msgpack-lite', 'the encoding'));
});

test('azure-iothub and azure-iot-provisioning-service: _restApiClient.setOptions', () => {
  const cs = 'HostName=hub.example;SharedAccessKeyName=iothubowner;SharedAccessKey=a2V5';
  const registry = azureIotHub.Registry.fromConnectionString(cs) as unknown as { _restApiClient?: { setOptions?: unknown } };
  assert.equal(typeof registry._restApiClient?.setOptions, 'function', changed('azure-iothub', 'Registry._restApiClient.setOptions'));
  const dps = azureProvisioning.ProvisioningServiceClient.fromConnectionString('HostName=dps.example;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=a2V5') as unknown as { _restApiClient?: { setOptions?: unknown } };
  assert.equal(typeof dps._restApiClient?.setOptions, 'function', changed('azure-iot-provisioning-service', 'ProvisioningServiceClient._restApiClient.setOptions'));
});
