/**
 * The gateway's publish hooks alone, without sockets: `composePlugins` over the gateway's
 * plugin list (publish budget, ACL, payload caps, rate limits, the outbox hook), driven the
 * way aedes drives them -- authorizePublish, then published -- for M messages of one
 * operational device to its telemetry topic, in batches like one socket read. Prints the
 * nanoseconds and heap bytes per message. It isolates what the plugin layer costs per
 * message from TLS, parsing and aedes, and is quiet enough to compare two versions on a
 * busy machine (or under `valgrind --tool=callgrind`, where instruction counts replace
 * time). `minor_gcs_per_million` (scavenges while measuring) stands for the allocation
 * per message:
 *
 *   node --import tsx bench/plugin-chain.ts [messages=2000000] [batch=64]
 *
 * With a third argument `full` or `bare`, only that chain runs (warm-up + messages), for
 * instruction counts: the difference of two callgrind totals (messages = N and 2N) over N
 * is the instructions per message, without start-up and compilation:
 *
 *   valgrind --tool=callgrind --callgrind-out-file=/dev/null node --import tsx bench/plugin-chain.ts 100000 64 full
 */
import type { Client, PublishPacket } from 'aedes';
import { PerformanceObserver, constants } from 'node:perf_hooks';
import pino from 'pino';
import { OnboardingRelay, type RelayOptions } from '../cloud-bridge/index.ts';
import { DEFAULT_RATE_LIMITS, SessionRegistry, authorizationPlugin, composePlugins, parsedTopicOf, payloadLimitPlugin, rateLimitPlugin } from '../plugins/index.ts';
import { upTopic } from '../protocol/index.ts';

const messages = Number(process.argv[2] ?? 2_000_000);
const batch = Number(process.argv[3] ?? 64);
const only = process.argv[4] as 'full' | 'bare' | undefined;

const sessions = new SessionRegistry();
let relayed = 0;

/** The gateway's publish hooks; with `plugins: false` the same composition with no plugin (the harness' own cost). */
function gatewayHooks(plugins: boolean) {
  const limits = rateLimitPlugin({ sessions, limits: { ...DEFAULT_RATE_LIMITS, publishesPerClient: { points: 1e12, durationSeconds: 1 } } });
  const relay = new OnboardingRelay({ sessions } as unknown as RelayOptions);
  return composePlugins(plugins ? [limits.publishBudget, authorizationPlugin({ sessions }), payloadLimitPlugin(), limits, relay.plugin()] : [], {
    logger: pino({ level: 'silent' }),
    onPublishRefused() {
      throw new Error('refused');
    },
    // As the gateway's: the kind decides what happens to an accepted publish.
    onPublished: plugins
      ? (client, packet) => {
        const session = sessions.get(client);
        const t = parsedTopicOf(client, packet.topic);
        if (!session || !t || t.direction !== 'up') return;
        if (t.kind === 'register' || t.kind === 'auth') relayed++;
      }
      : () => undefined,
  });
}

const client = { id: 'bench-dev', closed: false, conn: {} } as unknown as Client;
sessions.attach(client, { deviceId: 'bench-dev', kind: 'operational', connectedAt: Date.now(), challengeIds: new Set(), authenticated: false, remoteAddress: '127.0.0.1', certSerial: '01' });
const topic = Buffer.from(upTopic('bench-dev', 'telemetry', 'bench'));
const payload = Buffer.alloc(100, 0x61);

let done = 0;
const onAuthorized = (err?: Error | null) => {
  if (err) throw err;
  done++;
};
const onPublished = () => undefined;

async function run(hooks: ReturnType<typeof gatewayHooks>, n: number): Promise<number> {
  const t0 = process.hrtime.bigint();
  for (let sent = 0; sent < n; sent += batch) {
    const target = done + batch;
    for (let i = 0; i < batch; i++) {
      // A fresh topic string each time, as mqtt-packet decodes one per PUBLISH.
      const packet = { cmd: 'publish', topic: topic.toString(), payload, qos: 0, retain: false, dup: false, messageId: 0 } as unknown as PublishPacket;
      hooks.authorizePublish(client, packet, onAuthorized);
      hooks.published(packet as never, client, onPublished);
    }
    // Hooks that answer with a promise finish in later microtasks: the next read waits for them.
    while (done < target) await new Promise<void>((r) => setImmediate(r));
  }
  return Number(process.hrtime.bigint() - t0);
}

const bare = gatewayHooks(false);
const full = gatewayHooks(true);
if (only) {
  const hooks = only === 'full' ? full : bare;
  await run(hooks, 100_000); // warm-up
  const ns = await run(hooks, messages);
  process.stdout.write(JSON.stringify({ bench: 'plugin-chain', metric: 'ns_per_publish', value: Math.round((ns / messages) * 10) / 10, unit: 'ns', chain: only, messages, batch }) + '\n');
  process.exit(0);
}
await run(bare, Math.min(200_000, messages)); // warm-up: JIT, inline caches
await run(full, Math.min(200_000, messages));
let minorGcs = 0;
const gcs = new PerformanceObserver((list) => {
  for (const e of list.getEntries()) if ((e as unknown as { detail?: { kind?: number } }).detail?.kind === constants.NODE_PERFORMANCE_GC_MINOR) minorGcs++;
});
const measure = async (hooks: ReturnType<typeof gatewayHooks>) => {
  minorGcs = 0;
  gcs.observe({ entryTypes: ['gc'] });
  const ns = await run(hooks, messages);
  await new Promise((r) => setTimeout(r, 50));
  gcs.disconnect();
  return { ns: ns / messages, gcs: (minorGcs * 1e6) / messages };
};
const b = await measure(bare);
const f = await measure(full);
const r1 = (v: number) => Math.round(v * 10) / 10;
process.stdout.write(JSON.stringify({
  bench: 'plugin-chain', metric: 'plugin_ns_per_publish', value: r1(f.ns - b.ns), unit: 'ns',
  with_plugins_ns: r1(f.ns), no_plugins_ns: r1(b.ns), minor_gcs_per_million: { with_plugins: r1(f.gcs), no_plugins: r1(b.gcs) },
  messages, batch, relayed, node: process.version,
}) + '\n');
