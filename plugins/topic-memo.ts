/**
 * The last topic each client published to, parsed once. Every plugin on the publish path
 * needs the topic's kind (ACL, payload cap, which limit, the outbox), and a device
 * publishes to very few topics -- usually one telemetry topic -- so the parse of the last
 * one is kept per client and reused while the topic string is the same. Kept per client,
 * never across clients: memory is one small object per connection, whatever the fleet size.
 *
 * The memo is overwritten in place by the client's next publish (aedes runs the publishes
 * of one socket read concurrently). A hook that awaits must therefore read what it needs
 * from the memo before its first await; a ParsedTopic object itself is never mutated.
 */
import { parseTopic, type ParsedTopic } from '../protocol/index.ts';

export interface TopicMemo {
  topic: string;
  parsed: ParsedTopic | null;
  /** The session the ACL verdict below was computed for (authorization plugin). */
  aclSession: object | undefined;
  /** The ACL verdict for `topic`: null = allowed, a string = the reason it is denied. */
  denial: string | null;
}

const memos = new WeakMap<object, TopicMemo>();
/**
 * The hooks of one publish ask one after the other for the same client: the last client's
 * memo is kept at hand, so only the first of them pays the WeakMap lookup. (It keeps the
 * last publishing client reachable until another client publishes: one object.)
 */
let lastClient: object | undefined;
let lastMemo: TopicMemo | undefined;

/** The memo for `client`, holding `topic` parsed. */
export function topicMemo(client: object, topic: string): TopicMemo {
  let m: TopicMemo | undefined;
  if (client === lastClient) m = lastMemo!;
  else {
    m = memos.get(client);
    if (m === undefined) {
      m = { topic, parsed: parseTopic(topic), aclSession: undefined, denial: null };
      memos.set(client, m);
    }
    lastClient = client;
    lastMemo = m;
  }
  if (m.topic !== topic) {
    m.topic = topic;
    m.parsed = parseTopic(topic);
    m.aclSession = undefined;
    m.denial = null;
  }
  return m;
}

/** `parseTopic(topic)` through the per-client memo. */
export function parsedTopicOf(client: object, topic: string): ParsedTopic | null {
  return topicMemo(client, topic).parsed;
}
