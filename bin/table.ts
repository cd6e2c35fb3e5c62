/** Plain-text tables for CLI output: columns from the first row's keys. */
export function formatTable(rows: Record<string, unknown>[]): string {
  if (!rows.length) return '(none)';
  const head = Object.keys(rows[0]);
  const cells = rows.map((r) => head.map((h) => (r[h] === null || r[h] === undefined ? '' : String(r[h]))));
  const widths = head.map((h, i) => Math.max(h.length, ...cells.map((c) => c[i].length)));
  const line = (c: string[]) => c.map((x, i) => (i === c.length - 1 ? x : x.padEnd(widths[i]))).join('  ');
  return [line(head), widths.map((w) => '-'.repeat(w)).join('  '), ...cells.map(line)].join('\n');
}

export function printTable(rows: Record<string, unknown>[]): void {
  process.stdout.write(formatTable(rows) + '\n');
}
