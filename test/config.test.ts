/**
 * Config files and environment variables are checked against the schemas (ajv): unknown
 * keys refused, each error names its key and what it expects; the README's reference is
 * generated from the same schemas and the defaults they document are the ones applied.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { AUTHORITY_CONFIG_SCHEMA, resolveAuthorityConfig } from '../authority/config.ts';
import { ConfigError, type Schema } from '../config-schema/index.ts';
import { GATEWAY_CONFIG_SCHEMA, resolveGatewayConfig } from '../gateway/config.ts';
import { GATEWAY_AUTHORITY_TIMEOUT_MS } from '../protocol/index.ts';
import { README, renderedReadme } from '../scripts/docs-config.ts';

function refused(fn: () => unknown, ...messages: RegExp[]): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof ConfigError, `expected ConfigError, got ${String(err)}`);
    for (const m of messages) assert.match(err.message, m);
    return true;
  });
}

test('README configuration reference is generated from the schemas (run `npm run docs:config` when this fails)', () => {
  const text = readFileSync(README, 'utf8');
  assert.equal(renderedReadme(text), text, 'README.md is stale: run `npm run docs:config`');
});

/** Every default a schema documents is the value resolve applies when nothing is set. */
function defaultsOf(schema: Schema, prefix = ''): Array<[string, unknown]> {
  const out: Array<[string, unknown]> = [];
  for (const [k, s] of Object.entries(schema.properties ?? {})) {
    if (s.properties) out.push(...defaultsOf(s, `${prefix}${k}.`));
    else if (s.default !== undefined) out.push([`${prefix}${k}`, s.default]);
  }
  return out;
}
const at = (o: unknown, path: string) => path.split('.').reduce((v: any, k) => v?.[k], o);

test('the defaults documented by the schemas are the defaults applied', () => {
  const gw = resolveGatewayConfig({ redis: { url: 'redis://127.0.0.1:6379' } }, {});
  for (const [key, value] of defaultsOf(GATEWAY_CONFIG_SCHEMA)) {
    if (key === 'dataDir') assert.ok(gw.dataDir.endsWith('.leafgate/gateway'));
    else assert.deepEqual(at(gw, key), value, `gateway ${key}`);
  }
  const hub = 'HostName=h.example;SharedAccessKeyName=iothubowner;SharedAccessKey=a2V5';
  const au = resolveAuthorityConfig({
    iotHub: { connectionString: hub }, dps: { connectionString: hub },
    deviceIssuer: { type: 'est', url: 'https://est.example', serverCaFile: 'est-ca.pem', caChainFile: 'chain.pem', username: 'ra', passwordEnv: 'EST_PW' },
  }, {});
  // The settings of one key store apply only with that store.
  const kv = resolveAuthorityConfig({ caKeys: { store: 'keyvault', keyvault: { vaultUrl: 'https://v.vault.azure.net', keyName: 'k' } } }, {});
  for (const [key, value] of defaultsOf(AUTHORITY_CONFIG_SCHEMA)) {
    if (key === 'dataDir') assert.ok(au.dataDir.endsWith('.leafgate/authority'));
    else if (key.startsWith('caKeys.keyvault.')) assert.deepEqual(at(kv, key), value, `authority ${key}`);
    else assert.deepEqual(at(au, key), value, `authority ${key}`);
  }
});

test('authority config: typos, wrong types and ranges are refused, each naming the key and what it expects', () => {
  refused(() => resolveAuthorityConfig({ renewalScanSecond: 60 } as never, {}), /renewalScanSecond: unknown key \(did you mean renewalScanSeconds\?\)/);
  refused(
    () => resolveAuthorityConfig({ challengeTtlSeconds: 'abc', crlValidityHours: -5, renewalScanSeconds: 0 } as never, {}),
    /challengeTtlSeconds: must be integer \(got "abc"\)/,
    /crlValidityHours: must be > 0 \(got -5\)/,
    /renewalScanSeconds: must be >= 1 \(got 0\)/,
  );
  refused(() => resolveAuthorityConfig({ crlBaseUrl: 'https://crl.example/x?y=1' }, {}), /crlBaseUrl \(env LEAFGATE_CRL_BASE_URL\): must be an http\(s\) URL without query/);
  refused(() => resolveAuthorityConfig({}, { LEAFGATE_AUTHORITY_PORT: 'eighty' }), /listen\.port \(env LEAFGATE_AUTHORITY_PORT\): must be integer \(got "eighty"\)/);
  refused(() => resolveAuthorityConfig({ policies: { default: { validityDays: 0, extra: 1 } } } as never, {}), /policies\.default\.validityDays: must be >= 1/, /policies\.default\.extra: unknown key/);
  refused(() => resolveAuthorityConfig({ defaultGroup: 'lab' }, {}), /defaultGroup: must name a group of policies/);
  // A secret is never repeated in an error.
  assert.throws(() => resolveAuthorityConfig({ iotHub: { connectionString: 'hunter2-secret' } }, {}), (err: Error) => !err.message.includes('hunter2') && /iotHub\.connectionString/.test(err.message));
  assert.equal(resolveAuthorityConfig({ crlBaseUrl: 'http://crl.example:8080/pki' }, {}).crlBaseUrl, 'http://crl.example:8080/pki');
});

test('gateway config: typos, wrong types and ranges are refused, each naming the key and what it expects', () => {
  refused(
    () => resolveGatewayConfig({ authorityQueueMax: -1, rateLimits: { csrsPerDevice: 'ten' }, staleCrlPolicy: 'drop' } as never, {}),
    /authorityQueueMax: must be >= 0 \(got -1\)/,
    /rateLimits\.csrsPerDevice: must be object \(got "ten"\)/,
    /staleCrlPolicy: must be one of "keep", "refuse" \(got "drop"\)/,
  );
  refused(() => resolveGatewayConfig({ crlRefreshMS: 1000 } as never, {}), /crlRefreshMS: unknown key \(did you mean crlRefreshMs\?\)/);
  refused(() => resolveGatewayConfig({}, { LEAFGATE_GATEWAY_HTTP_PORT: '70000' }), /http\.port \(env LEAFGATE_GATEWAY_HTTP_PORT\): must be <= 65535 \(got 70000\)/);
  refused(() => resolveGatewayConfig({ onboardingPayloadBytes: 4096, maxPacketBytes: 2048 }, {}), /onboardingPayloadBytes: must not exceed maxPacketBytes/);
  assert.equal(resolveGatewayConfig({}, { LEAFGATE_GATEWAY_PORT: '1883' }).listen.port, 1883);
});

test('deviceIssuer: the answer deadline stays below the gateway\'s request timeout; maxConcurrent and failureThreshold are bounded; a misspelt key is refused', () => {
  const est = { type: 'est' as const, url: 'https://est.example', serverCaFile: 'est-ca.pem', caChainFile: 'chain.pem', username: 'ra', passwordEnv: 'EST_PW' };
  const props = (AUTHORITY_CONFIG_SCHEMA.properties as Record<string, Schema>).deviceIssuer.properties as Record<string, { maximum?: number; default?: number }>;
  // The authority answers (certificate or authority_unavailable) before the gateway gives up and retries.
  assert.ok(props.answerWithinMs.maximum! < GATEWAY_AUTHORITY_TIMEOUT_MS);
  assert.ok(props.answerWithinMs.default! < GATEWAY_AUTHORITY_TIMEOUT_MS);
  refused(() => resolveAuthorityConfig({ deviceIssuer: { ...est, answerWithinMs: GATEWAY_AUTHORITY_TIMEOUT_MS } }, {}), /deviceIssuer\.answerWithinMs: must be <= 14000/);
  refused(() => resolveAuthorityConfig({ deviceIssuer: { ...est, maxConcurrent: 0, failureThreshold: 0 } }, {}), /deviceIssuer\.maxConcurrent: must be >= 1/, /deviceIssuer\.failureThreshold: must be >= 1/);
  refused(() => resolveAuthorityConfig({ deviceIssuer: { ...est, maxConcurent: 4 } as never }, {}), /deviceIssuer\.maxConcurent: unknown key/);
  const cfg = resolveAuthorityConfig({ deviceIssuer: { ...est, answerWithinMs: 5000, maxConcurrent: 3, failureThreshold: 2 } }, {});
  assert.deepEqual([cfg.deviceIssuer?.answerWithinMs, cfg.deviceIssuer?.maxConcurrent, cfg.deviceIssuer?.failureThreshold], [5000, 3, 2]);
});
