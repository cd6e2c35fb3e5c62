/**
 * Authorization: the topic ACL of DESIGN.md as one rule. A device publishes only under
 * `lg/v1/{id}/up/` and subscribes only under `lg/v1/{id}/down/`; bootstrap sessions only
 * to the onboarding kinds. Nothing else: no other device, no wildcards across devices,
 * no `$SYS`, no retained messages at all, no wills outside the device's own telemetry.
 */
import { BOOTSTRAP_UP_KINDS, DOWN_KINDS, TOPIC_ROOT, parseTopic, type ParsedTopic, type UpKind } from '../protocol/index.ts';
import type { DeviceSession, SessionRegistry } from './sessions.ts';
import { topicMemo } from './topic-memo.ts';
import { ConnectRefusal, PublishRefusal, type BrokerPlugin } from './types.ts';

const OPERATIONAL_UP_KINDS: readonly UpKind[] = ['csr', 'telemetry'];
const MAX_TELEMETRY_LEVELS = 8;

/** Null when allowed, else the reason. */
export function publishDenial(session: DeviceSession, topic: string): string | null {
  return denialFor(session, parseTopic(topic));
}

/** publishDenial on an already parsed topic. */
function denialFor(session: DeviceSession, t: ParsedTopic | null): string | null {
  if (!t || t.direction !== 'up') return 'devices publish only to their own up/ topics';
  if (t.deviceId !== session.deviceId) return 'devices publish only to their own topics';
  const kinds = session.kind === 'bootstrap' ? BOOTSTRAP_UP_KINDS : OPERATIONAL_UP_KINDS;
  if (!kinds.includes(t.kind as UpKind)) return `${session.kind} sessions may not publish to up/${t.kind}`;
  if (t.kind === 'telemetry' ? t.rest.length > MAX_TELEMETRY_LEVELS : t.rest.length > 0) return 'topic has too many levels';
  return null;
}

/** A device may subscribe to its whole down/ tree or one known kind under it. */
export function subscriptionAllowed(session: DeviceSession, filter: string): boolean {
  const prefix = `${TOPIC_ROOT}/${session.deviceId}/down/`;
  if (!filter.startsWith(prefix)) return false;
  const tail = filter.slice(prefix.length);
  return tail === '#' || tail === '+' || (DOWN_KINDS as readonly string[]).includes(tail);
}

export function authorizationPlugin(opts: { sessions: SessionRegistry }): BrokerPlugin {
  return {
    name: 'authorization',

    authenticate(client, info) {
      const session = opts.sessions.get(client);
      if (!session) throw new ConnectRefusal(5, 'no identity');
      if (info.will) {
        const t = parseTopic(info.will.topic);
        if (session.kind !== 'operational' || !t || t.deviceId !== session.deviceId || t.direction !== 'up' || t.kind !== 'telemetry') {
          throw new ConnectRefusal(5, 'a will may only target the device\'s own telemetry');
        }
        // Published by aedes after the client is gone: never retained either (see authorizePublish).
        info.will.retain = false;
      }
    },

    authorizePublish(client, packet) {
      const session = opts.sessions.get(client);
      if (!session) throw new Error('publish without a session');
      // The ACL is a function of the session (id, kind) and the topic: a verdict is kept
      // with the client's topic memo until either changes.
      const m = topicMemo(client, packet.topic);
      if (m.aclSession !== session) {
        m.denial = denialFor(session, m.parsed);
        m.aclSession = session;
      }
      if (m.denial !== null) throw new PublishRefusal('forbidden', m.denial);
      // Nothing a device sends is retained: onboarding requests are commands, and nobody
      // may read up/ telemetry back from the broker (the ACL), so a retained copy would only
      // hold memory (one message per topic, for good). Dropped here, before aedes stores it.
      packet.retain = false;
    },

    authorizeSubscribe(client, sub) {
      const session = opts.sessions.get(client);
      return !!session && subscriptionAllowed(session, sub.topic);
    },

    authorizeForward(client, packet) {
      // Defence in depth: even a subscription that slipped through gets only own down/ traffic.
      const session = opts.sessions.get(client);
      const t = parseTopic(packet.topic);
      return !!session && !!t && t.deviceId === session.deviceId && t.direction === 'down';
    },
  };
}
