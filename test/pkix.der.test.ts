/**
 * protocol/pkix/der.ts: encoder round trips (checked byte for byte and against `openssl
 * asn1parse`) and decoder refusals, which must all be DerError -- never a RangeError or a hang.
 */
import { throwsDer } from './support/der.ts';
import assert from 'node:assert/strict';
import { test } from 'node:test';
import * as der from '../protocol/pkix/der.ts';
import { DerError } from '../protocol/pkix/der.ts';
import { parseCsrDer } from '../protocol/pkix/csr.ts';
import { prng, workdir } from './support/openssl.ts';

const hex = (b: Buffer) => b.toString('hex');
const h = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex');


/** Recursive walk the way a parser would descend, passing depth so MAX_DEPTH applies. */
function walk(node: der.DerNode, depth = 0): number {
  if (!node.constructed) return 1;
  let n = 1;
  for (const c of der.children(node, depth)) n += walk(c, depth + 1);
  return n;
}

test('INTEGER encodings are minimal two\'s complement and round-trip', () => {
  const cases: Array<[bigint | number, string]> = [
    [0, '020100'],
    [1, '020101'],
    [127, '02017f'],
    [128, '02020080'],
    [255, '020200ff'],
    [256, '02020100'],
    [32767, '02027fff'],
    [32768, '0203008000'],
    [65535, '020300ffff'],
    [2n ** 64n - 1n, '020900ffffffffffffffff'],
  ];
  for (const [v, expected] of cases) {
    const enc = der.integer(v);
    assert.equal(hex(enc), expected, `integer(${v})`);
    assert.equal(der.decodeInteger(der.parseDer(enc)), BigInt(v), `decode ${expected}`);
  }
  // unsigned big-endian bytes: leading zeros dropped, a zero octet prepended when the top bit is set
  assert.equal(hex(der.integer(Buffer.from([0, 0, 1]))), '020101');
  assert.equal(hex(der.integer(Buffer.from([0, 0, 0]))), '020100');
  assert.equal(hex(der.integer(Buffer.alloc(0))), '020100');
  assert.equal(hex(der.integer(Buffer.from([0x00, 0x80]))), '02020080');
  // decoding two's complement negatives (only the decoder supports them)
  assert.equal(der.decodeInteger(der.parseDer(h('0201ff'))), -1n);
  assert.equal(der.decodeInteger(der.parseDer(h('020180'))), -128n);
  assert.equal(der.decodeInteger(der.parseDer(h('0202ff7f'))), -129n);
  throwsDer(() => der.integer(-1), /negative/);
  throwsDer(() => der.decodeInteger(der.parseDer(h('0200'))), /empty INTEGER/);
  throwsDer(() => der.decodeInteger(der.parseDer(h('0400'))), /expected tag 0x2/);
});

test('big serials with the high bit set stay positive', () => {
  const rand = prng(0x5e71a1);
  for (const size of [1, 8, 16, 19, 20]) {
    for (let i = 0; i < 20; i++) {
      const bytes = Buffer.from(Array.from({ length: size }, () => Math.floor(rand() * 256)));
      bytes[0] |= 0x80;
      const enc = der.integer(bytes);
      assert.equal(enc[1], size + 1, 'one leading zero octet added');
      assert.equal(enc[2], 0);
      assert.equal(der.decodeInteger(der.parseDer(enc)), BigInt('0x' + hex(bytes)));
      assert.ok(der.decodeInteger(der.parseDer(enc)) > 0n);
    }
  }
  const big = 2n ** 159n + 12345n; // 160-bit, top bit set: RFC 5280's 20-octet maximum + sign octet
  const enc = der.integer(big);
  assert.equal(enc.length, 2 + 21);
  assert.equal(der.decodeInteger(der.parseDer(enc)), big);
});

test('non-minimal INTEGER encodings are refused (X.690 8.3.2)', {
}, () => {
  throwsDer(() => der.decodeInteger(der.parseDer(h('02020001'))));
  throwsDer(() => der.decodeInteger(der.parseDer(h('02020000'))));
  throwsDer(() => der.decodeInteger(der.parseDer(h('0202ffff'))));
});

test('OBJECT IDENTIFIERs round-trip, including multi-byte and 2.x arcs', () => {
  const cases: Array<[string, string]> = [
    ['1.2.840.113549.1.9.14', '06092a864886f70d01090e'],
    ['2.999.3', '0603883703'],
    ['2.5.4.3', '0603550403'],
    ['2.5.29.19', '0603551d13'],
    ['1.2.840.10045.4.3.2', '06082a8648ce3d040302'],
    ['0.9.2342.19200300.100.1.1', '060a0992268993f22c640101'],
    ['1.3.6.1.4.1.311.21.20', '06092b0601040182371514'],
    ['0.0', '060100'],
    ['1.39', '06014f'],
    ['2.40', '060178'],
    ['2.47', '06017f'],
    ['2.48', '06028100'], // 2*40+48 = 128: first subidentifier needs two octets
  ];
  for (const [dotted, expected] of cases) {
    assert.equal(hex(der.oid(dotted)), expected, `oid(${dotted})`);
    assert.equal(der.decodeOid(der.parseDer(der.oid(dotted))), dotted);
  }
  // arcs past 2^53 and past 2^64 (UUID-style 2.25.x)
  for (const dotted of ['1.2.9007199254740993', '1.2.3.18446744073709551616', '2.25.329800735698586629295641978511506172918']) {
    assert.equal(der.decodeOid(der.parseDer(der.oid(dotted))), dotted);
  }
});

test('malformed OBJECT IDENTIFIERs are refused with DerError', () => {
  throwsDer(() => der.decodeOid(der.parseDer(h('0600'))), /bad OID length/);
  throwsDer(() => der.decodeOid(der.parseDer(h('06032a8001'))), /non-minimal OID arc/);
  throwsDer(() => der.decodeOid(der.parseDer(h('0602802a'))), /non-minimal OID arc/);
  throwsDer(() => der.decodeOid(der.parseDer(h('06022a86'))), /truncated OID/);
  throwsDer(() => der.decodeOid(der.parseDer(Buffer.concat([h('0641'), Buffer.alloc(65, 0x2a)]))), /bad OID length/);
  throwsDer(() => der.decodeOid(der.parseDer(h('020100'))), /expected tag 0x6/);
  throwsDer(() => der.oid('1'), /bad OID/);
});

test('UTCTime through 2049, GeneralizedTime from 2050 (RFC 5280 4.1.2.5)', () => {
  const cases: Array<[string, number, string]> = [
    ['2049-12-31T23:59:59.999Z', der.TAG.UTC_TIME, '491231235959Z'],
    ['2050-01-01T00:00:00.000Z', der.TAG.GENERALIZED_TIME, '20500101000000Z'],
    ['1950-01-01T00:00:00.000Z', der.TAG.UTC_TIME, '500101000000Z'],
    ['1949-12-31T23:59:59.000Z', der.TAG.GENERALIZED_TIME, '19491231235959Z'],
    ['2000-02-29T12:34:56.000Z', der.TAG.UTC_TIME, '000229123456Z'],
    ['9999-12-31T23:59:59.000Z', der.TAG.GENERALIZED_TIME, '99991231235959Z'],
  ];
  for (const [iso, tag, text] of cases) {
    const enc = der.time(new Date(iso));
    const node = der.parseDer(enc);
    assert.equal(node.tag, tag, iso);
    assert.equal(node.value.toString('ascii'), text, iso);
    // fractions are dropped on encode: the decoded value is the second it started in
    assert.equal(der.decodeTime(node).toISOString(), iso.slice(0, 19) + '.000Z');
  }
  throwsDer(() => der.decodeTime(der.parseDer(Buffer.concat([h('170d'), Buffer.from('4912312359590')]))), /bad time/);
  throwsDer(() => der.decodeTime(der.parseDer(Buffer.concat([h('1811'), Buffer.from('20500101000000.5Z')]))), /bad time/);
  throwsDer(() => der.decodeTime(der.parseDer(Buffer.concat([h('180d'), Buffer.from('491231235959Z')]))), /bad time/, 'GeneralizedTime with 2-digit year');
  throwsDer(() => der.decodeTime(der.parseDer(Buffer.concat([h('170f'), Buffer.from('20500101000000Z')]))), /bad time/, 'UTCTime with 4-digit year');
  throwsDer(() => der.decodeTime(der.parseDer(Buffer.concat([h('170b'), Buffer.from('4912312359Z')]))), /bad time/, 'no seconds');
});

test('out-of-range time fields are refused', {
}, () => {
  for (const s of ['251301000000Z', '250132000000Z', '250101240000Z', '250101006000Z', '250230000000Z']) {
    throwsDer(() => der.decodeTime(der.parseDer(Buffer.concat([h('170d'), Buffer.from(s)]))), /bad time/);
  }
});

test('definite lengths at the short/long form boundaries', () => {
  const cases: Array<[number, string]> = [
    [0, '0400'],
    [1, '0401'],
    [127, '047f'],
    [128, '048180'],
    [255, '0481ff'],
    [256, '04820100'],
    [65535, '0482ffff'],
    [65536, '0483010000'],
    [16777216, '048401000000'],
  ];
  for (const [len, header] of cases) {
    const content = Buffer.alloc(len, 0xa5);
    const enc = der.octetString(content);
    assert.equal(hex(enc.subarray(0, header.length / 2)), header, `length ${len}`);
    assert.equal(enc.length, header.length / 2 + len);
    const node = der.parseDer(enc);
    assert.equal(node.value.length, len);
    assert.ok(node.value.equals(content));
    assert.ok(node.raw.equals(enc));
  }
});

test('encodings agree with openssl asn1parse', (t) => {
  const w = workdir(t);
  const serial = h('80112233445566778899aabbccddeeff');
  const blob = der.seq(
    der.integer(0),
    der.integer(255),
    der.integer(serial),
    der.oid('1.2.840.113549.1.9.14'),
    der.oid('2.999.3'),
    der.time(new Date('2049-12-31T23:59:59Z')),
    der.time(new Date('2050-01-01T00:00:00Z')),
    der.octetString(Buffer.alloc(300, 1)),
    der.setOf(der.utf8String('b'), der.utf8String('a')),
    der.bool(true),
    der.nullValue(),
    der.bitString(h('0680'), 7),
    der.contextTag(0, der.integer(2)),
  );
  w.write('blob.der', blob);
  const out = w.openssl(['asn1parse', '-inform', 'DER', '-in', 'blob.der']);
  const lines = out.trim().split('\n').map((l) => l.replace(/^\s*\d+:d=\d+\s+hl=\s*\d+\s+l=\s*\d+\s+/, '').trim());
  assert.deepEqual(lines.slice(0, 8), [
    'cons: SEQUENCE',
    'prim: INTEGER           :00',
    'prim: INTEGER           :FF',
    'prim: INTEGER           :80112233445566778899AABBCCDDEEFF',
    'prim: OBJECT            :Extension Request',
    'prim: OBJECT            :2.999.3',
    'prim: UTCTIME           :491231235959Z',
    'prim: GENERALIZEDTIME   :20500101000000Z',
  ]);
  assert.match(lines[8], /^prim: OCTET STRING\s+\[HEX DUMP\]:(01){300}$/);
  assert.deepEqual(lines.slice(9), [
    'cons: SET',
    'prim: UTF8STRING        :a', // SET OF sorted by encoding (X.690 11.6)
    'prim: UTF8STRING        :b',
    'prim: BOOLEAN           :255',
    'prim: NULL',
    'prim: BIT STRING',
    'cons: cont [ 0 ]',
    'prim: INTEGER           :02',
  ]);
});

test('decoder refuses malformed headers with DerError', () => {
  const cases: Array<[string, string, RegExp]> = [
    ['empty input', '', /truncated header/],
    ['tag only', '30', /truncated header/],
    ['indefinite length', '3080020100 0000', /indefinite length/],
    ['non-minimal long form for 5', '3081050201000500', /non-minimal length/],
    ['long form with leading zero', '308200050201000500', /non-minimal length/],
    ['long form with leading zero, >= 128', '30830000800000', /non-minimal length/],
    ['length past the end', '3005020100', /past the end/],
    ['long length past the end', '308180020100', /past the end/],
    ['4-byte length past the end', '3084ffffffff00', /past the end/],
    ['5-byte length', '3085000000000100', /length too large/],
    ['long-form length bytes missing', '3082', /truncated length/],
    ['long-form length byte missing', '308201', /truncated length/],
    ['trailing data', '02010000', /trailing data/],
    ['trailing data after sequence', '300302010000', /trailing data/],
    ['high tag number, universal', '1f0100', /high tag/],
    ['high tag number, context constructed', 'bf1f0100', /high tag/],
    ['high tag number, multi-byte', '9f818001 00', /high tag/],
  ];
  for (const [what, input, message] of cases) {
    assert.throws(() => der.parseDer(h(input)), (err: unknown) => {
      assert.ok(err instanceof DerError, `${what}: expected DerError, got ${String(err)}`);
      assert.match(err.message, message, what);
      return true;
    });
  }
});

test('children() checks inner elements and constructed flag', () => {
  // inner element runs past its parent's end even though the outer buffer is long enough
  const node = der.parseDer(h('3003 020500'));
  throwsDer(() => der.children(node), /past the end/);
  throwsDer(() => der.children(der.parseDer(h('3002 0281'))), /truncated length/);
  throwsDer(() => der.children(der.parseDer(h('3001 02'))), /truncated header/);
  throwsDer(() => der.children(der.parseDer(h('020100'))), /not constructed/);
  assert.deepEqual(der.children(der.parseDer(h('3000'))), []);
  assert.equal(der.children(der.parseDer(h('3006 020101 020102'))).length, 2);
});

test('deep nesting fails with DerError, not a stack overflow', () => {
  // children(node, depth) refuses depth > MAX_DEPTH (32): 33 nested constructed levels (0..32) are fine, 34 are not
  for (const levels of [34, 35, 200, 5000]) {
    let b: Buffer = der.nullValue();
    for (let i = 0; i < levels; i++) b = der.seq(b);
    const started = Date.now();
    throwsDer(() => walk(der.parseDer(b)), /nesting too deep/);
    assert.ok(Date.now() - started < 2000);
  }
  let ok: Buffer = der.nullValue();
  for (let i = 0; i < 33; i++) ok = der.seq(ok);
  assert.equal(walk(der.parseDer(ok)), 34);
  // and a deeply nested blob handed to the CSR parser is refused cleanly
  let deep: Buffer = der.nullValue();
  for (let i = 0; i < 3000; i++) deep = der.seq(deep);
  throwsDer(() => parseCsrDer(deep));
});

test('strings, BIT STRING and SET OF', () => {
  assert.equal(der.decodeString(der.parseDer(der.utf8String('grüße'))), 'grüße');
  assert.equal(der.decodeString(der.parseDer(der.printableString('Dev 1'))), 'Dev 1');
  assert.equal(der.decodeString(der.parseDer(der.ia5String('a@b.example'))), 'a@b.example');
  assert.equal(der.decodeString(der.parseDer(h('1e0400410042'))), 'AB');
  throwsDer(() => der.decodeString(der.parseDer(h('020100'))), /not a string type/);

  assert.equal(hex(der.decodeBitString(der.parseDer(der.bitString(h('abcd'))))), 'abcd');
  throwsDer(() => der.decodeBitString(der.parseDer(h('0300'))), /empty BIT STRING/);
  throwsDer(() => der.decodeBitString(der.parseDer(h('030208ff'))), /unused-bits/);

  const a = der.integer(1);
  const b = der.integer(2);
  assert.ok(der.setOf(b, a).equals(der.setOf(a, b)));
  assert.equal(hex(der.setOf(b, a)), '3106020101020102');
  assert.equal(hex(der.contextTag(3, der.nullValue())), 'a3020500');
  assert.equal(hex(der.contextTag(0, Buffer.from([1]), false)), '800101');
  throwsDer(() => der.expectTag(undefined, der.TAG.SEQUENCE, 'thing'), /thing is missing/);
});

test('odd-length BMPString is refused with DerError', {
}, () => {
  throwsDer(() => der.decodeString(der.parseDer(h('1e03004100'))));
});

test('random input never escapes as anything but DerError', () => {
  const rand = prng(20240611);
  const byte = () => Math.floor(rand() * 256);
  // structured-looking prefixes make the walker get past the first header more often
  const prefixes = [[], [0x30], [0x30, 0x81], [0x30, 0x82, 0x01], [0xa0], [0x31]];
  let refused = 0;
  for (let i = 0; i < 5000; i++) {
    const len = Math.floor(rand() * 40);
    const prefix = prefixes[i % prefixes.length];
    const buf = Buffer.from([...prefix, ...Array.from({ length: len }, byte)]);
    try {
      const visit = (n: der.DerNode, depth: number): void => {
        if (n.constructed) for (const c of der.children(n, depth)) visit(c, depth + 1);
        else if (n.tag === der.TAG.OID) der.decodeOid(n);
        else if (n.tag === der.TAG.INTEGER) der.decodeInteger(n);
        else if (n.tag === der.TAG.UTC_TIME || n.tag === der.TAG.GENERALIZED_TIME) der.decodeTime(n);
        else if (n.tag === der.TAG.BIT_STRING) der.decodeBitString(n);
        // BMPString (0x1e) is left out: see the todo test for odd lengths above
        else if ([0x0c, 0x13, 0x16, 0x14].includes(n.tag)) der.decodeString(n);
      };
      visit(der.parseDer(buf), 0);
    } catch (err) {
      assert.ok(err instanceof DerError, `input ${hex(buf)}: ${String(err)}`);
      refused++;
    }
  }
  assert.ok(refused > 4000, `most random inputs are refused (${refused})`);
});

// ---- strict DER: issue 14, point 4 ------------------------------------------------------------

test('BOOLEAN: DER accepts only 0x00 and 0xFF, one octet', () => {
  assert.equal(der.decodeBoolean(der.parseDer(h('0101ff'))), true);
  assert.equal(der.decodeBoolean(der.parseDer(h('010100'))), false);
  for (const bad of ['010101', '01017f', '010180']) throwsDer(() => der.decodeBoolean(der.parseDer(h(bad))), /must be 0xFF/, bad);
  throwsDer(() => der.decodeBoolean(der.parseDer(h('0100'))), /one octet/);
  throwsDer(() => der.decodeBoolean(der.parseDer(h('0102ffff'))), /one octet/);
});

test('strings: PrintableString set, IA5String 7-bit, UTF-8 well-formed, BMPString without surrogates, UniversalString scalar values', () => {
  assert.equal(der.decodeString(der.parseDer(der.printableString("A-z 0'()+,./:=?"))), "A-z 0'()+,./:=?");
  for (const c of ['_', '@', '*', '&', '!', '"', ';', '<', '\x00', '\x7f']) throwsDer(() => der.decodeString(der.parseDer(der.tlv(0x13, Buffer.from(`a${c}`, 'latin1')))), /outside its set/, JSON.stringify(c));
  throwsDer(() => der.decodeString(der.parseDer(der.tlv(0x16, Buffer.from([0x61, 0x80])))), /above 0x7F/);
  assert.equal(der.decodeString(der.parseDer(der.tlv(0x16, Buffer.from([0x61, 0x7f])))), 'a\x7f');
  for (const bad of ['c0af', 'e080af', 'eda080', 'f4908080', 'ff', 'c3']) throwsDer(() => der.decodeString(der.parseDer(der.tlv(0x0c, h(bad)))), /not valid UTF-8/, bad);
  assert.equal(der.decodeString(der.parseDer(der.tlv(0x0c, h('efbbbf61')))), '\ufeffa', 'a BOM is content, kept');
  throwsDer(() => der.decodeString(der.parseDer(h('1e02d800'))), /surrogate/);
  assert.equal(der.decodeString(der.parseDer(h('1c080000004100010000'))), 'A\u{10000}');
  throwsDer(() => der.decodeString(der.parseDer(h('1c0400110000'))), /invalid character/);
  throwsDer(() => der.decodeString(der.parseDer(h('1c03000041'))), /multiple of 4/);
  throwsDer(() => der.decodeString(der.parseDer(h('2c03 0c0161'))), /constructed/);
});

test('BIT STRING: unused bits 0..7, zero, and never without content', () => {
  assert.equal(hex(der.decodeBitString(der.parseDer(h('03020780')), false)), '80');
  throwsDer(() => der.decodeBitString(der.parseDer(h('03020781')), false), /padding bits are not zero/);
  throwsDer(() => der.decodeBitString(der.parseDer(h('030201ff')), false), /padding bits are not zero/);
  throwsDer(() => der.decodeBitString(der.parseDer(h('03020880')), false), /unused-bits count/);
  throwsDer(() => der.decodeBitString(der.parseDer(h('030103')), false), /no content/);
  assert.equal(hex(der.decodeBitString(der.parseDer(h('030100')), false)), '');
  throwsDer(() => der.decodeBitString(der.parseDer(h('03020780'))), /octet-aligned/);
});

test('nesting depth is carried through children() and into DER parsed out of a value', () => {
  let b: Buffer = der.nullValue();
  for (let i = 0; i < 34; i++) b = der.seq(b);
  // no depth passed by the caller: the nodes know theirs
  const walkOwn = (n: der.DerNode): number => (n.constructed ? 1 + der.children(n).map(walkOwn).reduce((a, c) => a + c, 0) : 1);
  throwsDer(() => walkOwn(der.parseDer(b)), /nesting too deep/);
  const ok = der.parseDer(b.subarray(2)); // 33 levels
  assert.equal(walkOwn(ok), 34);
  // the same 33 levels found inside an element at depth 5 are too deep
  throwsDer(() => walkOwn(der.parseDer(b.subarray(2), 5)), /nesting too deep/);
  assert.equal(der.parseDer(h('3000'), 7).depth, 7);
  assert.equal(der.children(der.parseDer(h('30023000'), 3))[0].depth, 4);
});

test('checkDerTree: every element of a tree is DER, whatever the schema reads', () => {
  const good = der.seq(der.bool(true), der.integer(5), der.nullValue(), der.oid('1.2.3'), der.bitString(h('80'), 7), der.utf8String('é'), der.setOf(der.printableString('A')), der.contextTag(0, der.octetString(h('ff'))));
  der.checkDerTree(der.parseDer(good));
  const bad: Array<[string, Buffer, RegExp]> = [
    ['BOOLEAN 01', der.seq(h('010101')), /BOOLEAN/],
    ['INTEGER 0001', der.seq(h('02020001')), /non-minimal INTEGER/],
    ['empty INTEGER', der.seq(h('0200')), /non-minimal INTEGER/],
    ['ENUMERATED 00ff... ', der.seq(h('0a020001')), /non-minimal INTEGER/],
    ['NULL with content', der.seq(h('050100')), /NULL with content/],
    ['BIT STRING padding', der.seq(h('03020701')), /padding/],
    ['OID 0x80 arc', der.seq(h('0602802a')), /non-minimal OID/],
    ['PrintableString _', der.seq(h('13015f')), /PrintableString/],
    ['IA5String 0x80', der.seq(h('160180')), /IA5String/],
    ['UTF8String ff', der.seq(h('0c01ff')), /UTF-8/],
    ['BMPString surrogate', der.seq(h('1e02dc00')), /surrogate/],
    ['constructed OCTET STRING', der.seq(h('2403 040100')), /constructed flag/],
    ['primitive SEQUENCE', der.seq(h('1000')), /constructed flag/],
    ['deep in a context tag', der.seq(der.contextTag(1, der.seq(h('010101')))), /BOOLEAN/],
  ];
  for (const [what, b, re] of bad) throwsDer(() => der.checkDerTree(der.parseDer(b)), re, what);
  let deep: Buffer = der.nullValue();
  for (let i = 0; i < 40; i++) deep = der.seq(deep);
  throwsDer(() => der.checkDerTree(der.parseDer(deep)), /nesting too deep/);
});
