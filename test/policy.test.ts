/**
 * authority/policy: a parsed CSR must match its instruction exactly (subject, key, names,
 * extensions), and policies with weak keys or nonsense values are refused at start-up.
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync, sign, type KeyObject } from 'node:crypto';
import { test } from 'node:test';
import { buildInstruction, checkCsrAgainstInstruction, chooseKey, DEFAULT_POLICY, matchesPattern, mergePolicy, validatePolicy, validatePolicyOverride, type DevicePolicy } from '../authority/policy/index.ts';
import { ConfigError } from '../config-schema/index.ts';
import { LeafgateError } from '../protocol/errors.ts';
import type { InstructionMessage, KeySpec } from '../protocol/messages.ts';
import * as der from '../protocol/pkix/der.ts';
import { buildCsr, encodeName, parseCsr, parseCsrDer, type ParsedCsr } from '../protocol/pkix/csr.ts';
import { OID } from '../protocol/pkix/oids.ts';
import { workdir } from './support/openssl.ts';

const KEYS = {
  p256: generateKeyPairSync('ec', { namedCurve: 'P-256' }),
  p384: generateKeyPairSync('ec', { namedCurve: 'P-384' }),
  k256: generateKeyPairSync('ec', { namedCurve: 'secp256k1' }),
  rsa2048: generateKeyPairSync('rsa', { modulusLength: 2048 }),
  rsa3072: generateKeyPairSync('rsa', { modulusLength: 3072 }),
};

const INSTRUCTION: InstructionMessage = {
  requestId: 'req-1',
  subject: { commonName: 'dev-1' },
  keyType: 'ec',
  keySize: 256,
  sans: { dns: ['dev-1.devices.example'], uri: ['urn:leafgate:device:dev-1'] },
  validityDays: 365,
  csrDeadline: new Date(Date.now() + 60_000).toISOString(),
};

function csr(opts: { cn?: string; key?: { privateKey: KeyObject; publicKey: KeyObject }; sans?: { dns?: string[]; uri?: string[]; ip?: string[] } } = {}): ParsedCsr {
  const key = opts.key ?? KEYS.p256;
  return parseCsr(buildCsr({ commonName: opts.cn ?? 'dev-1', privateKey: key.privateKey, publicKey: key.publicKey, sans: opts.sans }));
}

/** A CSR with an arbitrary subject Name and extensionRequest, signed with P-256. */
function craftedCsr(subjectDer: Buffer, extensions: Buffer[] = []): ParsedCsr {
  const key = KEYS.p256;
  const spki = key.publicKey.export({ type: 'spki', format: 'der' });
  const attrs = extensions.length ? der.seq(der.oid(OID.extensionRequest), der.setOf(der.seq(...extensions))) : Buffer.alloc(0);
  const info = der.seq(der.integer(0), subjectDer, spki, der.contextTag(0, attrs));
  return parseCsrDer(der.seq(info, der.seq(der.oid(OID.ecdsaWithSHA256)), der.bitString(sign('sha256', info, key.privateKey))));
}

const ext = (oid: string, value: Buffer, critical = false) =>
  critical ? der.seq(der.oid(oid), der.bool(true), der.octetString(value)) : der.seq(der.oid(oid), der.octetString(value));

function refused(c: ParsedCsr, message: RegExp, instruction: InstructionMessage = INSTRUCTION): void {
  assert.throws(() => checkCsrAgainstInstruction(c, instruction, DEFAULT_POLICY), (err: unknown) => {
    assert.ok(err instanceof LeafgateError, `expected LeafgateError, got ${String(err)}`);
    assert.equal(err.code, 'policy_violation');
    assert.equal(err.status, 403);
    assert.match(err.message, message);
    return true;
  });
}

// ---- checkCsrAgainstInstruction ---------------------------------------------------------------

test('a CSR that matches the instruction passes', () => {
  assert.doesNotThrow(() => checkCsrAgainstInstruction(csr({ sans: { dns: ['dev-1.devices.example'], uri: ['urn:leafgate:device:dev-1'] } }), INSTRUCTION, DEFAULT_POLICY));
  // a subset of the instructed names is fine, and so are no names at all
  assert.doesNotThrow(() => checkCsrAgainstInstruction(csr({ sans: { dns: ['dev-1.devices.example'] } }), INSTRUCTION, DEFAULT_POLICY));
  assert.doesNotThrow(() => checkCsrAgainstInstruction(csr(), INSTRUCTION, DEFAULT_POLICY));
  // other key types when instructed
  assert.doesNotThrow(() => checkCsrAgainstInstruction(csr({ key: KEYS.rsa2048 }), { ...INSTRUCTION, keyType: 'rsa', keySize: 2048 }, DEFAULT_POLICY));
  assert.doesNotThrow(() => checkCsrAgainstInstruction(csr({ key: KEYS.p384 }), { ...INSTRUCTION, keySize: 384 }, DEFAULT_POLICY));
});

test('a matching CSR made by openssl passes too, tolerated extensions included', (t) => {
  const w = workdir(t);
  w.write('key.pem', KEYS.p256.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string);
  w.openssl([
    'req', '-new', '-key', 'key.pem', '-subj', '/CN=dev-1', '-out', 'req.pem',
    '-addext', 'subjectAltName=DNS:dev-1.devices.example,URI:urn:leafgate:device:dev-1',
    '-addext', 'keyUsage=critical,digitalSignature',
    '-addext', 'extendedKeyUsage=clientAuth',
    '-addext', 'subjectKeyIdentifier=hash',
  ]);
  const parsed = parseCsr(w.read('req.pem').toString());
  assert.deepEqual(parsed.requestedExtensions.map((e) => e.oid), [OID.subjectAltName, OID.keyUsage, OID.extKeyUsage, OID.subjectKeyIdentifier]);
  assert.doesNotThrow(() => checkCsrAgainstInstruction(parsed, INSTRUCTION, DEFAULT_POLICY));
});

test('CN mismatch is refused', () => {
  refused(csr({ cn: 'dev-2' }), /^CN must be dev-1$/);
  refused(csr({ cn: 'DEV-1' }), /^CN must be dev-1$/);
  refused(csr({ cn: 'dev-1 ' }), /^CN must be dev-1$/);
  refused(csr({ cn: '' }), /^CN must be dev-1$/);
});

test('extra subject attributes are refused', (t) => {
  const w = workdir(t);
  w.write('key.pem', KEYS.p256.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string);
  w.openssl(['req', '-new', '-key', 'key.pem', '-subj', '/CN=dev-1/O=Acme', '-out', 'o.pem']);
  const withO = parseCsr(w.read('o.pem').toString());
  assert.equal(withO.commonName, 'dev-1');
  refused(withO, /subject must be exactly one CN/);

  // O before CN, multi-valued RDN, two CNs, no CN at all
  const atv = (oid: string, v: string) => der.seq(der.oid(oid), der.utf8String(v));
  refused(craftedCsr(der.seq(der.setOf(atv(OID.organizationName, 'Acme')), der.setOf(atv(OID.commonName, 'dev-1')))), /exactly one CN/);
  refused(craftedCsr(der.seq(der.setOf(atv(OID.commonName, 'dev-1'), atv(OID.serialNumber, '42')))), /exactly one CN/);
  refused(craftedCsr(der.seq(der.setOf(atv(OID.commonName, 'dev-1')), der.setOf(atv(OID.commonName, 'dev-1')))), /exactly one CN/);
  refused(craftedCsr(der.seq(der.setOf(atv(OID.organizationName, 'dev-1')))), /exactly one CN/);
  refused(craftedCsr(der.seq()), /exactly one CN/);
  // the crafted path itself is sound
  assert.doesNotThrow(() => checkCsrAgainstInstruction(craftedCsr(encodeName('dev-1')), INSTRUCTION, DEFAULT_POLICY));
});

test('wrong key type or size is refused', () => {
  refused(csr({ key: KEYS.rsa2048 }), /^key must be EC P-256, got RSA-2048$/);
  refused(csr({ key: KEYS.p384 }), /^key must be EC P-256, got EC P-384$/);
  refused(csr({ key: KEYS.p256 }), /^key must be RSA-2048, got EC P-256$/, { ...INSTRUCTION, keyType: 'rsa', keySize: 2048 });
  refused(csr({ key: KEYS.rsa3072 }), /^key must be RSA-2048, got RSA-3072$/, { ...INSTRUCTION, keyType: 'rsa', keySize: 2048 });
  refused(csr({ key: KEYS.rsa2048 }), /^key must be RSA-3072, got RSA-2048$/, { ...INSTRUCTION, keyType: 'rsa', keySize: 3072 });
  // a 256-bit curve that is not P-256: refused by the parser already (NotAcceptedError -> policy_violation)
  assert.throws(() => csr({ key: KEYS.k256 }), (err: unknown) => err instanceof der.NotAcceptedError && /EC curve 1\.3\.132\.0\.10 \(secp256k1\) is not accepted/.test(err.message));
});

test('RSA public exponents: 65537 unless the policy lists others; the policy cannot list small ones', () => {
  const rsaInstruction: InstructionMessage = { ...INSTRUCTION, keyType: 'rsa', keySize: 2048 };
  const e3 = generateKeyPairSync('rsa', { modulusLength: 2048, publicExponent: 3 });
  const e65539 = generateKeyPairSync('rsa', { modulusLength: 2048, publicExponent: 65539 });
  const c3 = csr({ key: e3 });
  assert.equal(c3.key.publicExponent, 3);
  assert.throws(() => checkCsrAgainstInstruction(c3, rsaInstruction, DEFAULT_POLICY), (err: unknown) => err instanceof LeafgateError && err.code === 'policy_violation' && /RSA public exponent must be 65537/.test(err.message));
  const c65539 = csr({ key: e65539 });
  assert.throws(() => checkCsrAgainstInstruction(c65539, rsaInstruction, DEFAULT_POLICY), /RSA public exponent must be 65537/);
  assert.doesNotThrow(() => checkCsrAgainstInstruction(c65539, rsaInstruction, { rsaPublicExponents: [65537, 65539] }));
  assert.doesNotThrow(() => checkCsrAgainstInstruction(csr({ key: KEYS.rsa2048 }), rsaInstruction, DEFAULT_POLICY));
  // EC keys have no exponent to check
  assert.doesNotThrow(() => checkCsrAgainstInstruction(csr(), INSTRUCTION, { rsaPublicExponents: [65539] }));

  assert.doesNotThrow(() => validatePolicy('ok', mergePolicy(DEFAULT_POLICY, { rsaPublicExponents: [65537, 65539] })));
  for (const bad of [[], [3], [17], [65536], [65537.5], [2 ** 53 + 1]] as number[][]) {
    assert.throws(() => validatePolicy('bad', mergePolicy(DEFAULT_POLICY, { rsaPublicExponents: bad })), (err: unknown) => err instanceof Error && err.name === 'ConfigError' && /rsaPublicExponents is empty|RSA public exponent .* is not allowed/.test(err.message), JSON.stringify(bad));
  }
});

test('SANs not in the instruction are refused', () => {
  refused(csr({ sans: { dns: ['dev-2.devices.example'] } }), /SAN DNS dev-2\.devices\.example is not allowed/);
  refused(csr({ sans: { dns: ['dev-1.devices.example', 'evil.example'] } }), /SAN DNS evil\.example is not allowed/);
  refused(csr({ sans: { dns: ['DEV-1.devices.example'] } }), /SAN DNS/);
  refused(csr({ sans: { uri: ['urn:leafgate:device:dev-2'] } }), /SAN URI urn:leafgate:device:dev-2 is not allowed/);
  refused(csr({ sans: { dns: ['urn:leafgate:device:dev-1'] } }), /SAN DNS/, INSTRUCTION); // a URI value in the DNS slot
  refused(csr({ sans: { dns: ['dev-1.devices.example'] } }), /SAN DNS/, { ...INSTRUCTION, sans: { dns: [], uri: [] } });
});

test('IP and e-mail SANs are refused, even alongside allowed names', () => {
  refused(csr({ sans: { ip: ['10.0.0.1'] } }), /IP and e-mail SANs are not allowed/);
  refused(csr({ sans: { dns: ['dev-1.devices.example'], ip: ['fd00::1'] } }), /IP and e-mail SANs are not allowed/);
  const email = craftedCsr(encodeName('dev-1'), [ext(OID.subjectAltName, der.seq(der.tlv(0x81, Buffer.from('dev-1@example.com'))))]);
  assert.deepEqual(email.sans.email, ['dev-1@example.com']);
  refused(email, /IP and e-mail SANs are not allowed/);
});

test('unsupported GeneralName forms (directoryName, otherName) are refused', () => {
  const dirName = craftedCsr(encodeName('dev-1'), [ext(OID.subjectAltName, der.seq(der.contextTag(4, encodeName('dev-1'))))]);
  refused(dirName, /SAN URI unsupported:\[4\] is not allowed/);
  const otherName = craftedCsr(encodeName('dev-1'), [ext(OID.subjectAltName, der.seq(der.contextTag(0, Buffer.concat([der.oid('1.3.6.1.5.5.7.8.4'), der.contextTag(0, der.utf8String('x'))]))))]);
  refused(otherName, /SAN URI unsupported:\[0\] is not allowed/);
});

test('disallowed requested extensions are refused', (t) => {
  const w = workdir(t);
  w.write('key.pem', KEYS.p256.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string);
  w.openssl(['req', '-new', '-key', 'key.pem', '-subj', '/CN=dev-1', '-addext', 'basicConstraints=critical,CA:TRUE', '-out', 'bc.pem']);
  refused(parseCsr(w.read('bc.pem').toString()), /requested extension 2\.5\.29\.19 is not allowed/);
  // basicConstraints CA:FALSE is refused too: the profile decides, the CSR may not ask
  refused(craftedCsr(encodeName('dev-1'), [ext(OID.basicConstraints, der.seq())]), /2\.5\.29\.19/);
  refused(craftedCsr(encodeName('dev-1'), [ext(OID.nameConstraints, der.seq(der.contextTag(0, der.seq(der.tlv(0x82, Buffer.from('example.com'))))), true)]), /2\.5\.29\.30/);
  refused(craftedCsr(encodeName('dev-1'), [ext(OID.cRLDistributionPoints, der.seq())]), /2\.5\.29\.31/);
  refused(craftedCsr(encodeName('dev-1'), [ext('1.3.6.1.5.5.7.1.1', der.seq())]), /1\.3\.6\.1\.5\.5\.7\.1\.1/);
  // tolerated ones, critical or not
  assert.doesNotThrow(() =>
    checkCsrAgainstInstruction(
      craftedCsr(encodeName('dev-1'), [
        ext(OID.keyUsage, der.bitString(Buffer.from([0x80]), 7), true),
        ext(OID.extKeyUsage, der.seq(der.oid(OID.clientAuth))),
        ext(OID.subjectKeyIdentifier, der.octetString(Buffer.alloc(20, 1))),
      ]),
      INSTRUCTION,
      DEFAULT_POLICY,
    ),
  );
});

test('instruction built from a policy accepts exactly the CSR it describes', () => {
  const policy = mergePolicy(DEFAULT_POLICY, { cnTemplate: '{group}-{deviceId}', sans: { dns: ['{deviceId}.{group}.example'], uri: ['urn:dev:{deviceId}'] } });
  const key = chooseKey(policy, [{ keyType: 'rsa', keySize: 3072 }]);
  assert.deepEqual(key, { keyType: 'rsa', keySize: 3072 });
  const instruction = buildInstruction(policy, { requestId: 'r', deviceId: 'd7', group: 'lab', key, csrDeadline: new Date('2030-01-01T00:00:00Z') });
  assert.deepEqual(instruction.subject, { commonName: 'lab-d7' });
  assert.deepEqual(instruction.sans, { dns: ['d7.lab.example'], uri: ['urn:dev:d7'] });
  assert.equal(instruction.csrDeadline, '2030-01-01T00:00:00.000Z');
  assert.doesNotThrow(() => checkCsrAgainstInstruction(csr({ cn: 'lab-d7', key: KEYS.rsa3072, sans: { dns: ['d7.lab.example'], uri: ['urn:dev:d7'] } }), instruction, DEFAULT_POLICY));
  refused(csr({ cn: 'lab-d7', key: KEYS.rsa2048, sans: { dns: ['d7.lab.example'] } }), /key must be RSA-3072/, instruction);
});

test('chooseKey: first allowed preference, else the policy default', () => {
  assert.deepEqual(chooseKey(DEFAULT_POLICY, undefined), { keyType: 'ec', keySize: 256 });
  assert.deepEqual(chooseKey(DEFAULT_POLICY, [{ keyType: 'rsa', keySize: 1024 }, { keyType: 'ec', keySize: 384 }]), { keyType: 'ec', keySize: 384 });
  assert.deepEqual(chooseKey(DEFAULT_POLICY, [{ keyType: 'rsa', keySize: 1024 }]), { keyType: 'ec', keySize: 256 });
});

test('matchesPattern: * is the only special character', () => {
  assert.equal(matchesPattern('dev-1', 'dev-*'), true);
  assert.equal(matchesPattern('xdev-1', 'dev-*'), false);
  assert.equal(matchesPattern('dev-1', '*'), true);
  assert.equal(matchesPattern('a.b', 'a.b'), true);
  assert.equal(matchesPattern('axb', 'a.b'), false);
  assert.equal(matchesPattern('a+b', 'a+b'), true);
  assert.equal(matchesPattern('(x)', '(*)'), true);
  assert.equal(matchesPattern('dev-1-lab', 'dev-*-lab'), true);
  assert.equal(matchesPattern('dev-1-lab2', 'dev-*-lab'), false);
});

// ---- validatePolicy ----------------------------------------------------------------------------

function invalid(override: Partial<DevicePolicy>, message: RegExp): void {
  const p = mergePolicy(DEFAULT_POLICY, override);
  assert.throws(() => validatePolicy('lab', p), (err: unknown) => {
    assert.ok(err instanceof ConfigError, `expected ConfigError (exit code 2, not a wire code), got ${String(err)}`);
    assert.match(err.message, /^policy lab: /);
    assert.match(err.message, message);
    return true;
  });
}

test('validatePolicy accepts the default policy and sensible variations', () => {
  assert.doesNotThrow(() => validatePolicy('default', DEFAULT_POLICY));
  assert.doesNotThrow(() => validatePolicy('x', mergePolicy(DEFAULT_POLICY, { methods: ['ddkg'], cnTemplate: 'sensor-{deviceId}.{group}', keys: [{ keyType: 'rsa', keySize: 4096 }] })));
  assert.doesNotThrow(() => validatePolicy('x', mergePolicy(DEFAULT_POLICY, { validityDays: 1, renewAfterFraction: 0.01, maxActiveCerts: 1 })));
  assert.doesNotThrow(() => validatePolicy('x', mergePolicy(DEFAULT_POLICY, { validityDays: 3650, renewAfterFraction: 0.99 })));
});

test('validatePolicy refuses weak or unknown keys', () => {
  const keys = (...k: KeySpec[]) => ({ keys: k });
  invalid(keys({ keyType: 'rsa', keySize: 1024 }), /key rsa-1024 is not allowed/);
  invalid(keys({ keyType: 'ec', keySize: 192 }), /key ec-192 is not allowed/);
  invalid(keys({ keyType: 'ec', keySize: 224 }), /key ec-224 is not allowed/);
  invalid(keys({ keyType: 'ec', keySize: 521 }), /key ec-521 is not allowed/);
  invalid(keys({ keyType: 'rsa', keySize: 8192 }), /key rsa-8192 is not allowed/);
  invalid(keys({ keyType: 'rsa', keySize: 2047 }), /key rsa-2047 is not allowed/);
  invalid(keys({ keyType: 'ec', keySize: 256 }, { keyType: 'rsa', keySize: 1024 }), /rsa-1024/);
  invalid(keys(), /keys is empty/);
});

test('validatePolicy refuses empty or unknown methods', () => {
  invalid({ methods: [] }, /methods is empty/);
  invalid({ methods: ['password' as never] }, /unknown method password/);
});

test('validatePolicy refuses a cnTemplate without {deviceId}', () => {
  invalid({ cnTemplate: 'device' }, /cnTemplate must contain \{deviceId\}/);
  invalid({ cnTemplate: '{group}' }, /cnTemplate must contain \{deviceId\}/);
  invalid({ cnTemplate: '{deviceid}' }, /cnTemplate must contain \{deviceId\}/);
  invalid({ cnTemplate: '' }, /cnTemplate/);
});

test('validatePolicy refuses out-of-range numbers and enrollment modes', () => {
  invalid({ validityDays: 0 }, /validityDays must be 1\.\.3650/);
  invalid({ validityDays: 3651 }, /validityDays/);
  invalid({ validityDays: Number.NaN }, /validityDays/);
  invalid({ renewAfterFraction: 0 }, /renewAfterFraction must be in \(0, 1\)/);
  invalid({ renewAfterFraction: 1 }, /renewAfterFraction/);
  invalid({ maxActiveCerts: 0 }, /maxActiveCerts must be >= 1/);
  invalid({ maxActiveCerts: 1.5 }, /maxActiveCerts/);
  invalid({ ddkg: { enrollment: 'whatever' as never, allowList: [] } }, /ddkg\.enrollment is invalid/);
});

test('validatePolicy refuses renewal settings that are not a boolean switch and sane windows', () => {
  const renewal = (r: Partial<DevicePolicy['renewal']>) => ({ renewal: r as DevicePolicy['renewal'] });
  invalid(renewal({ requireDeviceProof: 'false' as never }), /renewal\.requireDeviceProof must be true or false/);
  invalid(renewal({ proofWindowSeconds: 0 }), /renewal\.proofWindowSeconds must be 1\.\.86400/);
  invalid(renewal({ proofWindowSeconds: 86_401 }), /proofWindowSeconds/);
  invalid(renewal({ clockSkewSeconds: -1 }), /renewal\.clockSkewSeconds must be 0\.\.3600/);
  invalid(renewal({ clockSkewSeconds: 1.5 }), /clockSkewSeconds/);
  assert.deepEqual(mergePolicy(DEFAULT_POLICY, renewal({ requireDeviceProof: false })).renewal, { requireDeviceProof: false, proofWindowSeconds: 600, clockSkewSeconds: 300 });
  assert.doesNotThrow(() => validatePolicy('legacy', mergePolicy(DEFAULT_POLICY, renewal({ requireDeviceProof: false }))));
});

test('mergePolicy copies instead of sharing the base', () => {
  const merged = mergePolicy(DEFAULT_POLICY, undefined);
  merged.keys.push({ keyType: 'rsa', keySize: 1024 });
  merged.sans.dns.push('x');
  assert.equal(DEFAULT_POLICY.keys.length, 5);
  assert.deepEqual(DEFAULT_POLICY.sans, { dns: [], uri: [] });
  const partial = mergePolicy(DEFAULT_POLICY, { ddkg: { enrollment: 'auto-approve' } as DevicePolicy['ddkg'] });
  assert.deepEqual(partial.ddkg, { enrollment: 'auto-approve', allowList: [] });
});

test('validatePolicyOverride: unknown keys, wrong types and ranges in a config file are named with what they expect', () => {
  const refused = (override: unknown, message: RegExp) =>
    assert.throws(() => validatePolicyOverride('lab', override), (err: unknown) => {
      assert.ok(err instanceof ConfigError);
      assert.match(err.message, /^policy lab: /);
      assert.match(err.message, message);
      return true;
    });
  refused({ validityDay: 30 }, /validityDay: unknown key \(did you mean validityDays\?\)/);
  refused({ validityDays: 'ten' }, /validityDays: must be integer \(got "ten"\)/);
  refused({ keys: [{ keyType: 'rsa', keySize: 1024 }] }, /keys\.0\.keySize: must be one of 256, 384, 2048, 3072, 4096 \(got 1024\)/);
  refused({ renewal: { requireDeviceProof: 'yes' } }, /renewal\.requireDeviceProof: must be boolean/);
  refused({ renewal: { proofWindowSeconds: 0 } }, /renewal\.proofWindowSeconds: must be >= 1/);
  refused({ rsaPublicExponents: [3] }, /rsaPublicExponents\.0: must be >= 65537/);
  refused({ ddkg: { enrollment: 'anyone' } }, /ddkg\.enrollment: must be one of/);
  refused({ cnTemplate: 'fixed' }, /cnTemplate: must be a template containing \{deviceId\}/);
  assert.doesNotThrow(() => validatePolicyOverride('lab', { methods: ['ddkg'], rsaPublicExponents: [65537], renewal: { requireDeviceProof: false, proofWindowSeconds: 60, clockSkewSeconds: 0 }, manufacturerCAFiles: ['ca.pem'] }));
});
