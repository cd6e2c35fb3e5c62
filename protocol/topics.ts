/**
 * Topic names of the gateway broker. One root, one segment for the device, then the
 * direction, so the ACL is a single prefix rule: a device publishes under `up/` and
 * subscribes under `down/` of its own id, nothing else.
 */
export const TOPIC_ROOT = 'lg/v1';

export const UP_KINDS = ['register', 'auth', 'csr', 'begin', 'enroll', 'telemetry'] as const;
export const DOWN_KINDS = ['challenge', 'instruction', 'pending', 'cert', 'error', 'revoked', 'offer', 'enrolled'] as const;
export type UpKind = (typeof UP_KINDS)[number];
export type DownKind = (typeof DOWN_KINDS)[number];

/** Onboarding topics a bootstrap session (no operational cert yet) may publish to. */
export const BOOTSTRAP_UP_KINDS: readonly UpKind[] = ['register', 'auth', 'csr', 'begin', 'enroll'];

/**
 * The compact onboarding (two request/response exchanges, docs/protocol.md §4.11): each
 * request kind has ONE down kind that carries its answer AND its refusals (an error body,
 * recognisable by its `code`), so that a client waiting on a single response topic -- e.g.
 * `mosquitto_rr -e` -- sees whichever comes. Other kinds refuse on `down/error`.
 */
export const COMPACT_ANSWER_KINDS = { begin: 'offer', enroll: 'enrolled' } as const satisfies Partial<Record<UpKind, DownKind>>;

/** The down kind on which a refusal of a publish on `up/{kind}` is sent. */
export function refusalKindFor(upKind: string | undefined): DownKind {
  return upKind === 'begin' || upKind === 'enroll' ? COMPACT_ANSWER_KINDS[upKind] : 'error';
}

export const DEVICE_ID_MAX_LENGTH = 128;
/**
 * Letters, digits and `. _ : -`, starting with a letter or digit. This is a subset of what
 * IoT Hub accepts for device ids and excludes every MQTT special character (`/ + #`),
 * whitespace, NUL and `$`, so a valid id can be spliced into a topic or a CN unescaped.
 */
const DEVICE_ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._:-]*$/;

export function isValidDeviceId(id: unknown): id is string {
  return typeof id === 'string' && id.length >= 1 && id.length <= DEVICE_ID_MAX_LENGTH && DEVICE_ID_PATTERN.test(id);
}

export function upTopic(deviceId: string, kind: UpKind, ...rest: string[]): string {
  return [TOPIC_ROOT, deviceId, 'up', kind, ...rest].join('/');
}

export function downTopic(deviceId: string, kind: DownKind): string {
  return `${TOPIC_ROOT}/${deviceId}/down/${kind}`;
}

/** Filter a device subscribes to in order to get every answer addressed to it. */
export function downFilter(deviceId: string): string {
  return `${TOPIC_ROOT}/${deviceId}/down/#`;
}

export interface ParsedTopic {
  deviceId: string;
  direction: 'up' | 'down';
  kind: string;
  /** Levels after the kind, e.g. the sub-topic of `telemetry/...`. */
  rest: string[];
}

const ROOT_PREFIX = `${TOPIC_ROOT}/`;

/**
 * Splits a concrete topic (no wildcards) of our tree; null when it is not one of ours.
 * On the broker's per-publish path: it scans with indexOf instead of splitting the whole
 * topic, and splits only the levels after the kind.
 */
export function parseTopic(topic: string): ParsedTopic | null {
  if (!topic.startsWith(ROOT_PREFIX)) return null;
  const idEnd = topic.indexOf('/', ROOT_PREFIX.length);
  if (idEnd < 0) return null;
  const dirEnd = topic.indexOf('/', idEnd + 1);
  if (dirEnd < 0) return null;
  const deviceId = topic.slice(ROOT_PREFIX.length, idEnd);
  if (!isValidDeviceId(deviceId)) return null;
  const direction = topic.slice(idEnd + 1, dirEnd);
  if (direction !== 'up' && direction !== 'down') return null;
  const kindEnd = topic.indexOf('/', dirEnd + 1);
  const kind = kindEnd < 0 ? topic.slice(dirEnd + 1) : topic.slice(dirEnd + 1, kindEnd);
  if (kind.length === 0) return null;
  return { deviceId, direction, kind, rest: kindEnd < 0 ? [] : topic.slice(kindEnd + 1).split('/') };
}
