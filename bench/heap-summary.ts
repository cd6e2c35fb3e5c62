/**
 * Compares two V8 heap snapshots (`.heapsnapshot`, e.g. written by `node
 * --heapsnapshot-signal=SIGUSR2`): self size and count per node kind and constructor
 * (objects by constructor, closures by function name, strings, arrays, hidden/native
 * wrappers), after minus before, optionally per connection. This is where the JS share of a
 * connection goes, without a DevTools session.
 *
 *   node --import tsx bench/heap-summary.ts BEFORE.heapsnapshot AFTER.heapsnapshot [PER] [N]
 */
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

interface HeapSnapshot {
  snapshot: { meta: { node_fields: string[]; node_types: [string[], ...unknown[]] } };
  nodes: number[];
  strings: string[];
}

export type HeapCensus = Map<string, { count: number; bytes: number }>;

/** Self size and count per `type:name` (names of objects are their constructors). */
export function heapCensus(file: string): HeapCensus {
  const snap = JSON.parse(readFileSync(file, 'utf8')) as HeapSnapshot;
  const fields = snap.snapshot.meta.node_fields;
  const types = snap.snapshot.meta.node_types[0];
  const width = fields.length;
  const fType = fields.indexOf('type');
  const fName = fields.indexOf('name');
  const fSize = fields.indexOf('self_size');
  const out: HeapCensus = new Map();
  const nodes = snap.nodes;
  for (let i = 0; i < nodes.length; i += width) {
    const type = types[nodes[i + fType]];
    // Strings and numbers are grouped by kind alone: their names are their values.
    const name = type === 'string' || type === 'concatenated string' || type === 'sliced string' || type === 'number' || type === 'code'
      ? ''
      : snap.strings[nodes[i + fName]].slice(0, 60);
    const key = name ? `${type}:${name}` : type;
    const e = out.get(key) ?? { count: 0, bytes: 0 };
    e.count++;
    e.bytes += nodes[i + fSize];
    out.set(key, e);
  }
  return out;
}

export interface HeapDelta {
  key: string;
  count: number;
  bytes: number;
}

/** after - before, largest byte growth first. */
export function heapDelta(before: HeapCensus, after: HeapCensus): HeapDelta[] {
  const keys = new Set([...before.keys(), ...after.keys()]);
  const rows: HeapDelta[] = [];
  for (const key of keys) {
    const a = after.get(key) ?? { count: 0, bytes: 0 };
    const b = before.get(key) ?? { count: 0, bytes: 0 };
    rows.push({ key, count: a.count - b.count, bytes: a.bytes - b.bytes });
  }
  return rows.sort((x, y) => y.bytes - x.bytes);
}

export function formatDelta(rows: HeapDelta[], per: number, top = 30): string[] {
  const total = rows.reduce((s, r) => s + r.bytes, 0);
  const lines = [`total ${(total / per).toFixed(0)} B per unit (${per} units)`, '     bytes   count  kind:constructor'];
  for (const r of rows.slice(0, top)) {
    lines.push(`${(r.bytes / per).toFixed(0).padStart(10)} ${(r.count / per).toFixed(2).padStart(7)}  ${r.key}`);
  }
  return lines;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const [before, after, per = '1', top = '30'] = process.argv.slice(2);
  if (!before || !after) {
    process.stderr.write('usage: heap-summary.ts BEFORE.heapsnapshot AFTER.heapsnapshot [PER] [N]\n');
    process.exit(2);
  }
  for (const l of formatDelta(heapDelta(heapCensus(before), heapCensus(after)), Number(per), Number(top))) process.stdout.write(l + '\n');
}
