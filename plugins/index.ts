/** Broker plugins, one per concern, composed in a fixed order (see README, "Plugin chain"). */
export { ConnectRefusal, PublishRefusal, type BrokerPlugin, type ConnectInfo } from './types.ts';
export { SessionRegistry, type DeviceSession } from './sessions.ts';
export { authenticationPlugin, type AuthenticationOptions } from './authentication.ts';
export { authorizationPlugin, publishDenial, subscriptionAllowed } from './authorization.ts';
export { payloadLimitPlugin, type PayloadLimitOptions } from './payload-limit.ts';
export { composePlugins, DROPPED_TOPIC, type ComposeOptions } from './compose.ts';
export { rateLimitPlugin, memoryLimiters, DEFAULT_RATE_LIMITS, type RateLimitConfig, type RateLimitPlugin, type Limit, type LimiterFactory, type RateLimitObserver } from './rate-limit.ts';
export { parsedTopicOf, topicMemo, type TopicMemo } from './topic-memo.ts';
export { TokenBucket } from './token-bucket.ts';
export { RefusalSampler, DEFAULT_REFUSAL_LOG, type RefusalLogLimits, type RefusalVerdict } from './refusal-log.ts';
