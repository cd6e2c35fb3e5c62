/**
 * Payload caps per topic class. The broker also has a hard MQTT packet cap that closes the
 * connection (broker/); this plugin refuses oversized messages politely with
 * `payload_too_large` so a device learns what went wrong -- with the requestId of an
 * onboarding message when a bounded scan of its ends finds a valid one (requestIdOfRaw).
 */
import { LIMITS, requestIdOfRaw } from '../protocol/index.ts';
import { parsedTopicOf } from './topic-memo.ts';
import { PublishRefusal, type BrokerPlugin } from './types.ts';

export interface PayloadLimitOptions {
  onboardingBytes?: number;
  telemetryBytes?: number;
}

export function payloadLimitPlugin(opts: PayloadLimitOptions = {}): BrokerPlugin {
  const onboarding = opts.onboardingBytes ?? LIMITS.onboardingPayloadBytes;
  const telemetry = opts.telemetryBytes ?? LIMITS.telemetryPayloadBytes;
  return {
    name: 'payload-limit',
    authorizePublish(client, packet) {
      const isTelemetry = parsedTopicOf(client, packet.topic)?.kind === 'telemetry';
      const cap = isTelemetry ? telemetry : onboarding;
      const size = typeof packet.payload === 'string' ? Buffer.byteLength(packet.payload) : packet.payload.length;
      if (size > cap) throw new PublishRefusal('payload_too_large', `payload of ${size} bytes exceeds ${cap}`, undefined, isTelemetry ? undefined : requestIdOfRaw(packet.payload));
    },
  };
}
