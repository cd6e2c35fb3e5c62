/**
 * A small, strict DER (X.690) encoder and decoder: just what PKCS#10, X.509 and CRLs need.
 * The decoder rejects indefinite lengths, non-minimal lengths, lengths past the buffer and
 * deep nesting, so hostile input fails fast with a clear reason instead of allocating.
 */

export const TAG = {
  BOOLEAN: 0x01,
  INTEGER: 0x02,
  BIT_STRING: 0x03,
  OCTET_STRING: 0x04,
  NULL: 0x05,
  OID: 0x06,
  ENUMERATED: 0x0a,
  UTF8_STRING: 0x0c,
  PRINTABLE_STRING: 0x13,
  TELETEX_STRING: 0x14,
  IA5_STRING: 0x16,
  UNIVERSAL_STRING: 0x1c,
  BMP_STRING: 0x1e,
  UTC_TIME: 0x17,
  GENERALIZED_TIME: 0x18,
  SEQUENCE: 0x30,
  SET: 0x31,
} as const;

export class DerError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DerError';
  }
}

/**
 * Well-formed, but outside what leafgate signs (a curve, a key form, a string type, a
 * duplicate name): the authority answers `policy_violation`, where a plain DerError -- the
 * input is malformed -- is `bad_csr`. A DerError subclass, so every refusal of the codec
 * is still a DerError.
 */
export class NotAcceptedError extends DerError {
  constructor(message: string) {
    super(message);
    this.name = 'NotAcceptedError';
  }
}

// ---- encoder -----------------------------------------------------------------------------

function lengthBytes(len: number): Buffer {
  if (len < 0x80) return Buffer.from([len]);
  const bytes: number[] = [];
  for (let n = len; n > 0; n = Math.floor(n / 256)) bytes.unshift(n & 0xff);
  return Buffer.from([0x80 | bytes.length, ...bytes]);
}

export function tlv(tag: number, content: Buffer): Buffer {
  return Buffer.concat([Buffer.from([tag]), lengthBytes(content.length), content]);
}

export const seq = (...items: Buffer[]): Buffer => tlv(TAG.SEQUENCE, Buffer.concat(items));

/** SET OF with DER ordering (X.690 11.6): elements sorted by their encodings. */
export const setOf = (...items: Buffer[]): Buffer => tlv(TAG.SET, Buffer.concat([...items].sort(Buffer.compare)));

export const nullValue = (): Buffer => Buffer.from([TAG.NULL, 0]);

export const bool = (v: boolean): Buffer => Buffer.from([TAG.BOOLEAN, 1, v ? 0xff : 0]);

/** INTEGER from a non-negative bigint or unsigned big-endian bytes, minimal two's complement. */
export function integer(v: bigint | number | Buffer): Buffer {
  let bytes: Buffer;
  if (Buffer.isBuffer(v)) {
    let i = 0;
    while (i < v.length - 1 && v[i] === 0) i++;
    bytes = v.subarray(i);
  } else {
    let n = BigInt(v);
    if (n < 0n) throw new DerError('negative INTEGER not supported');
    const hex = n.toString(16);
    bytes = Buffer.from(hex.length % 2 ? '0' + hex : hex, 'hex');
  }
  if (bytes.length === 0) bytes = Buffer.from([0]);
  if (bytes[0] & 0x80) bytes = Buffer.concat([Buffer.from([0]), bytes]);
  return tlv(TAG.INTEGER, bytes);
}

export function oid(dotted: string): Buffer {
  const parts = dotted.split('.').map((p) => BigInt(p));
  if (parts.length < 2) throw new DerError(`bad OID ${dotted}`);
  const out: number[] = [];
  const encodeArc = (arc: bigint) => {
    const stack: number[] = [Number(arc & 0x7fn)];
    for (let n = arc >> 7n; n > 0n; n >>= 7n) stack.unshift(Number(n & 0x7fn) | 0x80);
    out.push(...stack);
  };
  encodeArc(parts[0] * 40n + parts[1]);
  for (const p of parts.slice(2)) encodeArc(p);
  return tlv(TAG.OID, Buffer.from(out));
}

export const octetString = (b: Buffer): Buffer => tlv(TAG.OCTET_STRING, b);
export const bitString = (b: Buffer, unusedBits = 0): Buffer => tlv(TAG.BIT_STRING, Buffer.concat([Buffer.from([unusedBits]), b]));
export const utf8String = (s: string): Buffer => tlv(TAG.UTF8_STRING, Buffer.from(s, 'utf8'));
export const printableString = (s: string): Buffer => tlv(TAG.PRINTABLE_STRING, Buffer.from(s, 'ascii'));
export const ia5String = (s: string): Buffer => tlv(TAG.IA5_STRING, Buffer.from(s, 'ascii'));
export const enumerated = (n: number): Buffer => tlv(TAG.ENUMERATED, Buffer.from([n]));

/** Context-specific tag [n]; constructed for EXPLICIT wrappers and constructed IMPLICIT types. */
export const contextTag = (n: number, content: Buffer, constructed = true): Buffer => tlv((constructed ? 0xa0 : 0x80) | n, content);

/** RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050, always Zulu, no fractions. */
export function time(d: Date): Buffer {
  const year = d.getUTCFullYear();
  if (!(year >= 0 && year <= 9999)) throw new DerError(`time out of range: ${d.getTime()}`);
  const utc = year >= 1950 && year < 2050;
  const out = Buffer.allocUnsafe(utc ? 15 : 17);
  out[0] = utc ? TAG.UTC_TIME : TAG.GENERALIZED_TIME;
  out[1] = out.length - 2;
  let o = 2;
  const two = (n: number) => {
    out[o++] = 0x30 + ((n / 10) | 0);
    out[o++] = 0x30 + (n % 10);
  };
  if (!utc) two((year / 100) | 0);
  two(year % 100);
  two(d.getUTCMonth() + 1);
  two(d.getUTCDate());
  two(d.getUTCHours());
  two(d.getUTCMinutes());
  two(d.getUTCSeconds());
  out[o] = 0x5a; // Z
  return out;
}

// ---- decoder -----------------------------------------------------------------------------

export interface DerNode {
  tag: number;
  /** Whole element: header + content. */
  raw: Buffer;
  /** Content octets. */
  value: Buffer;
  constructed: boolean;
  /** Nesting level: 0 for an element read from a buffer, its parent's + 1 through children(). */
  depth: number;
}

/** Constructed levels below the outermost element a decoder descends (children() refuses deeper). */
export const MAX_DEPTH = 32;

/**
 * Reads one element at `offset`; returns it and the offset after it. `depth` is the nesting
 * level the element is at: a caller that parses DER found inside another element (an
 * extnValue, a key BIT STRING) passes the container's depth + 1, so the limit holds across.
 */
export function readElement(buf: Buffer, offset = 0, depth = 0): { node: DerNode; next: number } {
  if (offset + 2 > buf.length) throw new DerError('truncated header');
  const tag = buf[offset];
  if ((tag & 0x1f) === 0x1f) throw new DerError('high tag numbers are not used here');
  let len = buf[offset + 1];
  let header = 2;
  if (len & 0x80) {
    const n = len & 0x7f;
    if (n === 0) throw new DerError('indefinite length is not DER');
    if (n > 4) throw new DerError('length too large');
    if (offset + 2 + n > buf.length) throw new DerError('truncated length');
    len = 0;
    for (let i = 0; i < n; i++) len = len * 256 + buf[offset + 2 + i];
    if (buf[offset + 2] === 0 || len < 0x80) throw new DerError('non-minimal length');
    header += n;
  }
  const start = offset + header;
  const end = start + len;
  if (end > buf.length) throw new DerError('element runs past the end of the input');
  return {
    node: { tag, raw: buf.subarray(offset, end), value: buf.subarray(start, end), constructed: (tag & 0x20) !== 0, depth },
    next: end,
  };
}

/** Parses a buffer that must hold exactly one element. */
export function parseDer(buf: Buffer, depth = 0): DerNode {
  const { node, next } = readElement(buf, 0, depth);
  if (next !== buf.length) throw new DerError('trailing data after the outer element');
  return node;
}

/** The elements inside a constructed one, at its depth + 1 (`depth` overrides the node's own). */
export function children(node: DerNode, depth = node.depth): DerNode[] {
  if (!node.constructed) throw new DerError(`tag 0x${node.tag.toString(16)} is not constructed`);
  if (depth > MAX_DEPTH) throw new DerError('nesting too deep');
  const out: DerNode[] = [];
  for (let off = 0; off < node.value.length; ) {
    const { node: child, next } = readElement(node.value, off, depth + 1);
    out.push(child);
    off = next;
  }
  return out;
}

export function expectTag(node: DerNode | undefined, tag: number, what: string): DerNode {
  if (!node) throw new DerError(`${what} is missing`);
  if (node.tag !== tag) throw new DerError(`${what}: expected tag 0x${tag.toString(16)}, got 0x${node.tag.toString(16)}`);
  return node;
}

export function decodeOid(node: DerNode): string {
  expectTag(node, TAG.OID, 'OID');
  const b = node.value;
  if (b.length === 0 || b.length > 64) throw new DerError('bad OID length');
  // Arcs are numbers while they stay exact (below 2^52 after the next shift), BigInt beyond.
  const arcs: Array<number | bigint> = [];
  let cur = 0;
  let big: bigint | null = null;
  for (let i = 0; i < b.length; i++) {
    if (cur === 0 && big === null && b[i] === 0x80) throw new DerError('non-minimal OID arc');
    if (big !== null) big = (big << 7n) | BigInt(b[i] & 0x7f);
    else if (cur >= 2 ** 45) big = (BigInt(cur) << 7n) | BigInt(b[i] & 0x7f);
    else cur = cur * 128 + (b[i] & 0x7f);
    if (!(b[i] & 0x80)) {
      arcs.push(big ?? cur);
      cur = 0;
      big = null;
    } else if (i === b.length - 1) throw new DerError('truncated OID');
  }
  const head = arcs[0];
  const [first, second] = typeof head === 'bigint' ? [2, head - 80n] : head < 80 ? [Math.floor(head / 40), head % 40] : [2, head - 80];
  arcs[0] = second;
  return `${first}.${arcs.join('.')}`;
}

export function decodeInteger(node: DerNode): bigint {
  expectTag(node, TAG.INTEGER, 'INTEGER');
  const v = node.value;
  if (v.length === 0) throw new DerError('empty INTEGER');
  // X.690 8.3.2: the first nine bits are never all zero or all one.
  if (v.length > 1 && ((v[0] === 0x00 && !(v[1] & 0x80)) || (v[0] === 0xff && v[1] & 0x80))) throw new DerError('non-minimal INTEGER');
  let n = BigInt('0x' + node.value.toString('hex'));
  if (node.value[0] & 0x80) n -= 1n << BigInt(node.value.length * 8);
  return n;
}

/** X.680 41.4: the PrintableString repertoire. */
const PRINTABLE = (() => {
  const t = new Uint8Array(128);
  for (const c of "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?") t[c.charCodeAt(0)] = 1;
  return t;
})();

const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/** Throws unless every octet is in the PrintableString set. */
export function checkPrintable(b: Buffer): void {
  for (let i = 0; i < b.length; i++) if (b[i] > 0x7f || !PRINTABLE[b[i]]) throw new DerError('PrintableString holds a character outside its set');
}

/** Throws unless every octet is 7-bit (IA5String, X.680 41.4: International Reference Alphabet). */
export function checkIa5(b: Buffer): void {
  for (let i = 0; i < b.length; i++) if (b[i] > 0x7f) throw new DerError('IA5String holds an octet above 0x7F');
}

/** UTF-8 that is well-formed (no overlongs, surrogates or code points past U+10FFFF). */
function utf8(b: Buffer): string {
  try {
    return UTF8.decode(b);
  } catch {
    throw new DerError('UTF8String is not valid UTF-8');
  }
}

/**
 * The value of a string element, its encoding checked: UTF8String well-formed UTF-8,
 * PrintableString in its set, IA5String 7-bit, BMPString UCS-2 without surrogates,
 * UniversalString UCS-4 scalar values. TeletexString (T.61, no usable definition) is read
 * as latin1 for display only. Which of them a caller accepts is the caller's decision.
 */
export function decodeString(node: DerNode): string {
  if (node.constructed) throw new DerError('constructed string encodings are not DER');
  const v = node.value;
  switch (node.tag) {
    case TAG.UTF8_STRING:
      return utf8(v);
    case TAG.PRINTABLE_STRING:
      checkPrintable(v);
      return v.toString('latin1');
    case TAG.IA5_STRING:
      checkIa5(v);
      return v.toString('latin1');
    case TAG.TELETEX_STRING:
      return v.toString('latin1');
    case TAG.BMP_STRING: {
      if (v.length % 2) throw new DerError('odd-length BMPString');
      for (let i = 0; i < v.length; i += 2) if (v[i] >= 0xd8 && v[i] <= 0xdf) throw new DerError('BMPString holds a surrogate');
      return Buffer.from(v).swap16().toString('utf16le');
    }
    case TAG.UNIVERSAL_STRING: {
      if (v.length % 4) throw new DerError('UniversalString length is not a multiple of 4');
      let out = '';
      for (let i = 0; i < v.length; i += 4) {
        const cp = v.readUInt32BE(i);
        if (cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) throw new DerError('UniversalString holds an invalid character');
        out += String.fromCodePoint(cp);
      }
      return out;
    }
    default:
      throw new DerError(`tag 0x${node.tag.toString(16)} is not a string type`);
  }
}

/** BOOLEAN, DER only (X.690 11.1): one octet, 0x00 or 0xFF. */
export function decodeBoolean(node: DerNode): boolean {
  expectTag(node, TAG.BOOLEAN, 'BOOLEAN');
  if (node.value.length !== 1) throw new DerError('BOOLEAN must be one octet');
  if (node.value[0] === 0xff) return true;
  if (node.value[0] === 0x00) return false;
  throw new DerError('BOOLEAN TRUE must be 0xFF in DER');
}

/**
 * BIT STRING contents, DER (X.690 11.2): an unused-bits count of 0..7, none with empty
 * content, and the unused bits zero. `octetAligned` (keys, signatures) refuses any unused bits.
 */
export function decodeBitString(node: DerNode, octetAligned = true): Buffer {
  expectTag(node, TAG.BIT_STRING, 'BIT STRING');
  const v = node.value;
  if (v.length === 0) throw new DerError('empty BIT STRING');
  const unused = v[0];
  if (unused > 7) throw new DerError('bad unused-bits count');
  if (unused && v.length === 1) throw new DerError('BIT STRING with unused bits and no content');
  if (unused && v[v.length - 1] & ((1 << unused) - 1)) throw new DerError('BIT STRING padding bits are not zero');
  if (octetAligned && unused !== 0) throw new DerError('BIT STRING must be octet-aligned here');
  return v.subarray(1);
}

/**
 * Checks a whole DER tree (every element, at every level, within MAX_DEPTH) the way the
 * specific decoders check the parts they read, so the parts a parser skips -- attributes it
 * does not use, values it ignores -- are not a hiding place: definite minimal lengths,
 * SEQUENCE/SET constructed and the other universal types primitive, BOOLEAN 0x00/0xFF,
 * NULL empty, INTEGER minimal, BIT STRING unused bits zero, strings in their character sets.
 * Context-specific and application elements are checked for structure only (their types
 * are the schema's). One pass, no copies; recursion is bounded by MAX_DEPTH.
 */
export function checkDerTree(node: DerNode): void {
  const tag = node.tag;
  if ((tag & 0xc0) === 0) {
    const n = tag & 0x1f;
    const mustConstruct = n === 0x10 || n === 0x11;
    if (mustConstruct !== node.constructed) throw new DerError(`tag 0x${tag.toString(16)} has the wrong constructed flag for DER`);
    switch (tag) {
      case TAG.BOOLEAN:
        decodeBoolean(node);
        break;
      case TAG.INTEGER:
      case TAG.ENUMERATED:
        if (node.value.length === 0 || (node.value.length > 1 && ((node.value[0] === 0 && !(node.value[1] & 0x80)) || (node.value[0] === 0xff && node.value[1] & 0x80)))) {
          throw new DerError('non-minimal INTEGER');
        }
        break;
      case TAG.NULL:
        if (node.value.length) throw new DerError('NULL with content');
        break;
      case TAG.BIT_STRING:
        decodeBitString(node, false);
        break;
      case TAG.OID:
        decodeOid(node);
        break;
      case TAG.UTF8_STRING:
      case TAG.PRINTABLE_STRING:
      case TAG.IA5_STRING:
      case TAG.BMP_STRING:
      case TAG.UNIVERSAL_STRING:
        decodeString(node);
        break;
    }
  }
  if (node.constructed) for (const c of children(node)) checkDerTree(c);
}

export function decodeTime(node: DerNode): Date {
  const s = node.value.toString('ascii');
  let m: RegExpMatchArray | null;
  let parts: number[] | undefined;
  if (node.tag === TAG.UTC_TIME && (m = s.match(/^(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)Z$/))) {
    const yy = Number(m[1]);
    parts = [yy >= 50 ? 1900 + yy : 2000 + yy, ...m.slice(2, 7).map(Number)];
  } else if (node.tag === TAG.GENERALIZED_TIME && (m = s.match(/^(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)Z$/))) {
    parts = m.slice(1, 7).map(Number);
  }
  if (!parts) throw new DerError('bad time encoding');
  const [y, mo, d, h, mi, se] = parts;
  const date = new Date(Date.UTC(y, mo - 1, d, h, mi, se));
  // Date.UTC rolls 13/01 over into the next year; a round trip catches every out-of-range field.
  if (date.getUTCFullYear() !== y || date.getUTCMonth() !== mo - 1 || date.getUTCDate() !== d || date.getUTCHours() !== h || date.getUTCMinutes() !== mi || date.getUTCSeconds() !== se) {
    throw new DerError('bad time: field out of range');
  }
  return date;
}
