/**
 * Device policy: data per device group, enforced here and nowhere else. Steps run in a
 * fixed order -- choose (key, names) when instructing, then validate the CSR against
 * exactly that instruction before anything is signed.
 */
import { LeafgateError, pkix, type AuthMethod, type InstructionMessage, type KeySpec } from '../../protocol/index.ts';
import { ConfigError, checkConfig, type Schema } from '../../config-schema/index.ts';

export interface DevicePolicy {
  /** Auth methods a device of this group may use. */
  methods: AuthMethod[];
  /** Subject CN; `{deviceId}` and `{group}` are replaced. */
  cnTemplate: string;
  /** Allowed keys; the first is used when the device states no preference. */
  keys: KeySpec[];
  /**
   * RSA public exponents the authority signs (default [65537]). Each odd, 65537..2^53-1
   * (FIPS 186-5 A.1.1 asks for e > 2^16): e = 3 cannot be configured.
   */
  rsaPublicExponents: number[];
  /** SAN templates put in the instruction; the CSR may carry these and nothing else. */
  sans: { dns: string[]; uri: string[] };
  validityDays: number;
  /** Renewal opens when this fraction of the lifetime has passed (e.g. 2/3). */
  renewAfterFraction: number;
  /** Active (unexpired, unrevoked) certificates a device may hold at once. */
  maxActiveCerts: number;
  /**
   * First issuance by the classic three-exchange flow (register, auth, csr). Its challenge
   * signature does not cover the CSR, so a gateway relaying it could substitute its own CSR
   * (docs/security.md); the compact flow (begin, enroll) signs both. False refuses the
   * classic `csr` with policy_violation, so devices of the group must use the compact flow.
   * Default true: devices in the field keep working.
   */
  allowClassicFlow: boolean;
  pkiSignature: {
    /** Manufacturer CA certificates (PEM) that birth certificates must chain to. */
    manufacturerCAs: string[];
    /** Which birth-cert subject attribute must equal the device id. */
    deviceIdFrom: 'CN' | 'serialNumber';
  };
  ddkg: {
    /** How a first ddkg enrollment is approved (DESIGN.md: allow-list, one-time code, auto-approve). */
    enrollment: 'allow-list' | 'one-time-code' | 'auto-approve';
    /** Device id patterns; `*` matches any run of characters. */
    allowList: string[];
  };
  renewal: {
    /**
     * A renewal CSR must carry `proof`: a signature by the current certificate's key over
     * the new CSR (docs/protocol.md). False only for devices in the field that cannot sign
     * yet: their renewal is then accepted from their own gateway alone, and audited so.
     */
    requireDeviceProof: boolean;
    /** A proof's `signedAt` may differ from the authority's clock by this much ... */
    proofWindowSeconds: number;
    /** ... plus this clock-skew tolerance (device and authority clocks). */
    clockSkewSeconds: number;
  };
}

export const DEFAULT_POLICY: DevicePolicy = {
  methods: ['pki-signature', 'ddkg'],
  cnTemplate: '{deviceId}',
  keys: [
    { keyType: 'ec', keySize: 256 },
    { keyType: 'ec', keySize: 384 },
    { keyType: 'rsa', keySize: 2048 },
    { keyType: 'rsa', keySize: 3072 },
    { keyType: 'rsa', keySize: 4096 },
  ],
  rsaPublicExponents: [65537],
  sans: { dns: [], uri: [] },
  validityDays: 365,
  renewAfterFraction: 2 / 3,
  maxActiveCerts: 2,
  allowClassicFlow: true,
  pkiSignature: { manufacturerCAs: [], deviceIdFrom: 'CN' },
  ddkg: { enrollment: 'allow-list', allowList: [] },
  renewal: { requireDeviceProof: true, proofWindowSeconds: 600, clockSkewSeconds: 300 },
};

const ALLOWED_KEYS = new Set(['ec-256', 'ec-384', 'rsa-2048', 'rsa-3072', 'rsa-4096']);

const strings = (description: string, def: string[]): Schema => ({ type: 'array', items: { type: 'string', minLength: 1 }, default: def, description });

/**
 * What a policy override in the authority config may hold (every key optional, unknown keys
 * refused). The range checks that need the merged policy are in validatePolicy.
 */
export const POLICY_OVERRIDE_SCHEMA: Schema = {
  type: 'object',
  additionalProperties: false,
  properties: {
    methods: { type: 'array', minItems: 1, items: { enum: ['pki-signature', 'ddkg'] }, default: DEFAULT_POLICY.methods, description: 'Auth methods a device of this group may use.' },
    cnTemplate: { type: 'string', pattern: '\\{deviceId\\}', expected: 'a template containing {deviceId}', default: DEFAULT_POLICY.cnTemplate, description: 'Subject CN; {deviceId} and {group} are replaced.' },
    keys: {
      type: 'array', minItems: 1, default: DEFAULT_POLICY.keys, description: 'Allowed keys (EC P-256/P-384, RSA 2048/3072/4096); the first is used when the device states no preference.',
      items: { type: 'object', additionalProperties: false, required: ['keyType', 'keySize'], properties: { keyType: { enum: ['ec', 'rsa'] }, keySize: { enum: [256, 384, 2048, 3072, 4096] } } },
    },
    rsaPublicExponents: {
      type: 'array', minItems: 1, items: { type: 'integer', minimum: 65537, not: { multipleOf: 2 } }, default: [65537],
      description: 'RSA public exponents accepted in device CSRs (odd, >= 65537).',
    },
    sans: {
      type: 'object', additionalProperties: false,
      properties: { dns: strings('DNS SAN templates put in the instruction; the CSR may carry these and nothing else.', []), uri: strings('URI SAN templates, likewise.', []) },
    },
    allowClassicFlow: { type: 'boolean', default: true, description: 'Accept the classic register/auth/csr flow besides the compact one (whose signature covers the CSR); false requires the compact flow.' },
    validityDays: { type: 'integer', minimum: 1, maximum: 3650, default: DEFAULT_POLICY.validityDays, description: 'Lifetime of a device certificate (days).' },
    renewAfterFraction: { type: 'number', exclusiveMinimum: 0, exclusiveMaximum: 1, default: DEFAULT_POLICY.renewAfterFraction, description: 'Renewal opens when this fraction of the lifetime has passed.' },
    maxActiveCerts: { type: 'integer', minimum: 1, default: DEFAULT_POLICY.maxActiveCerts, description: 'Active (unexpired, unrevoked) certificates a device may hold at once.' },
    pkiSignature: {
      type: 'object', additionalProperties: false,
      properties: {
        manufacturerCAs: strings('Manufacturer CA certificates (PEM) that birth certificates must chain to.', []),
        deviceIdFrom: { enum: ['CN', 'serialNumber'], default: 'CN', description: 'Which birth-certificate subject attribute must equal the device id.' },
      },
    },
    ddkg: {
      type: 'object', additionalProperties: false,
      properties: {
        enrollment: { enum: ['allow-list', 'one-time-code', 'auto-approve'], default: 'allow-list', description: 'How a first ddkg enrollment is approved.' },
        allowList: strings('Device id patterns (* matches any run of characters).', []),
      },
    },
    renewal: {
      type: 'object', additionalProperties: false,
      properties: {
        requireDeviceProof: { type: 'boolean', default: true, description: 'A renewal CSR must carry a proof signed by the current key (false: accepted from the device\'s own gateway alone, audited so).' },
        proofWindowSeconds: { type: 'integer', minimum: 1, maximum: 86_400, default: 600, description: 'A proof\'s signedAt may differ from the authority clock by this much ...' },
        clockSkewSeconds: { type: 'integer', minimum: 0, maximum: 3_600, default: 300, description: '... plus this clock-skew tolerance.' },
      },
    },
    manufacturerCAFiles: strings('Files of manufacturer CA certificates, added to pkiSignature.manufacturerCAs.', []),
  },
};

/** Checks an override from a config file (types, ranges, unknown keys) before it is merged. */
export function validatePolicyOverride(name: string, override: unknown): void {
  checkConfig(POLICY_OVERRIDE_SCHEMA, override, `policy ${name}`);
}

/** Refuses a policy that would allow weak keys or nonsense values, at start-up. */
export function validatePolicy(name: string, p: DevicePolicy): void {
  const fail = (m: string): never => {
    throw new ConfigError(`policy ${name}`, [m]);
  };
  if (!p.methods.length) fail('methods is empty');
  for (const m of p.methods) if (m !== 'pki-signature' && m !== 'ddkg') fail(`unknown method ${m}`);
  if (!p.cnTemplate.includes('{deviceId}')) fail('cnTemplate must contain {deviceId}');
  if (!p.keys.length) fail('keys is empty');
  for (const k of p.keys) if (!ALLOWED_KEYS.has(`${k.keyType}-${k.keySize}`)) fail(`key ${k.keyType}-${k.keySize} is not allowed (EC P-256/P-384, RSA 2048-4096)`);
  if (!Array.isArray(p.rsaPublicExponents) || !p.rsaPublicExponents.length) fail('rsaPublicExponents is empty');
  for (const e of p.rsaPublicExponents) {
    if (!(Number.isSafeInteger(e) && e >= 65537 && e % 2 === 1)) fail(`RSA public exponent ${String(e)} is not allowed (odd, 65537..2^53-1)`);
  }
  if (!(p.validityDays >= 1 && p.validityDays <= 3650)) fail('validityDays must be 1..3650');
  if (!(p.renewAfterFraction > 0 && p.renewAfterFraction < 1)) fail('renewAfterFraction must be in (0, 1)');
  if (!(Number.isInteger(p.maxActiveCerts) && p.maxActiveCerts >= 1)) fail('maxActiveCerts must be >= 1');
  if (typeof p.allowClassicFlow !== 'boolean') fail('allowClassicFlow must be true or false');
  if (!['allow-list', 'one-time-code', 'auto-approve'].includes(p.ddkg.enrollment)) fail('ddkg.enrollment is invalid');
  if (typeof p.renewal?.requireDeviceProof !== 'boolean') fail('renewal.requireDeviceProof must be true or false');
  if (!(Number.isInteger(p.renewal.proofWindowSeconds) && p.renewal.proofWindowSeconds >= 1 && p.renewal.proofWindowSeconds <= 86_400)) fail('renewal.proofWindowSeconds must be 1..86400');
  if (!(Number.isInteger(p.renewal.clockSkewSeconds) && p.renewal.clockSkewSeconds >= 0 && p.renewal.clockSkewSeconds <= 3_600)) fail('renewal.clockSkewSeconds must be 0..3600');
}

export function mergePolicy(base: DevicePolicy, override: Partial<DevicePolicy> | undefined): DevicePolicy {
  if (!override) return structuredClone(base);
  return {
    ...structuredClone(base),
    ...override,
    sans: { ...base.sans, ...override.sans },
    pkiSignature: { ...base.pkiSignature, ...override.pkiSignature },
    ddkg: { ...base.ddkg, ...override.ddkg },
    renewal: { ...base.renewal, ...override.renewal },
  } as DevicePolicy;
}

const fill = (template: string, deviceId: string, group: string) => template.replaceAll('{deviceId}', deviceId).replaceAll('{group}', group);

export function chooseKey(policy: DevicePolicy, preference: KeySpec[] | undefined): KeySpec {
  for (const want of preference ?? []) {
    const hit = policy.keys.find((k) => k.keyType === want.keyType && k.keySize === want.keySize);
    if (hit) return hit;
  }
  return policy.keys[0];
}

export function buildInstruction(policy: DevicePolicy, args: { requestId: string; deviceId: string; group: string; key: KeySpec; csrDeadline: Date }): InstructionMessage {
  return {
    requestId: args.requestId,
    subject: { commonName: fill(policy.cnTemplate, args.deviceId, args.group) },
    keyType: args.key.keyType,
    keySize: args.key.keySize,
    sans: { dns: policy.sans.dns.map((t) => fill(t, args.deviceId, args.group)), uri: policy.sans.uri.map((t) => fill(t, args.deviceId, args.group)) },
    validityDays: policy.validityDays,
    csrDeadline: args.csrDeadline.toISOString(),
  };
}

/** Extensions a CSR may request; the issued profile decides their values anyway. */
const TOLERATED_EXTENSIONS = new Set<string>([pkix.OID.subjectAltName, pkix.OID.keyUsage, pkix.OID.extKeyUsage, pkix.OID.subjectKeyIdentifier]);

/**
 * The CSR must match the instruction exactly: subject, key (and the policy's RSA exponents),
 * names, extensions. The parser already refused what is malformed (bad_csr) and what is never
 * signed (explicit curves, other key types, BMPString/TeletexString subjects, duplicate
 * SANs: policy_violation); the authority then signs the canonical key and a subject built
 * from the instruction's CN.
 */
export function checkCsrAgainstInstruction(csr: pkix.ParsedCsr, instruction: InstructionMessage, policy: Pick<DevicePolicy, 'rsaPublicExponents'>): void {
  const refuse = (reason: string, detail: Record<string, unknown> = {}) => {
    throw new LeafgateError('policy_violation', reason, { detail });
  };
  if (csr.subject.length !== 1 || csr.commonName === undefined) refuse('subject must be exactly one CN', { subject: csr.subject.map(([o]) => o) });
  if (csr.commonName !== instruction.subject.commonName) refuse(`CN must be ${instruction.subject.commonName}`, { commonName: csr.commonName?.slice(0, 128) });
  const key = csr.key;
  if (key.keyType !== instruction.keyType || key.keySize !== instruction.keySize) {
    refuse(`key must be ${pkix.keySpecLabel(instruction)}, got ${pkix.keySpecLabel(key)}`, { keyType: key.keyType, keySize: key.keySize });
  }
  if (key.keyType === 'rsa' && !policy.rsaPublicExponents.includes(key.publicExponent ?? NaN)) {
    refuse(`RSA public exponent must be ${policy.rsaPublicExponents.join(' or ')}`, { publicExponent: String(key.publicExponent).slice(0, 20) });
  }
  const allowedDns = new Set(instruction.sans.dns);
  const allowedUri = new Set(instruction.sans.uri);
  for (const d of csr.sans.dns) if (!allowedDns.has(d)) refuse(`SAN DNS ${d.slice(0, 64)} is not allowed`);
  for (const u of csr.sans.uri) if (!allowedUri.has(u)) refuse(`SAN URI ${u.slice(0, 64)} is not allowed`);
  if (csr.sans.ip.length || csr.sans.email.length) refuse('IP and e-mail SANs are not allowed for devices');
  for (const e of csr.requestedExtensions) {
    if (!TOLERATED_EXTENSIONS.has(e.oid)) refuse(`requested extension ${e.oid} is not allowed`);
  }
}

/** `*` glob over device ids; nothing else is special. */
export function matchesPattern(id: string, pattern: string): boolean {
  const re = new RegExp('^' + pattern.split('*').map((s) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')).join('.*') + '$');
  return re.test(id);
}
