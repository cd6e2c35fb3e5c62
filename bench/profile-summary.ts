/**
 * Summarizes a V8 .cpuprofile (from `node --cpu-prof` or `npm run bench -- issuance
 * --cpu-prof FILE`): self time and inclusive time per function, top N by self time.
 *
 *   node --import tsx bench/profile-summary.ts FILE.cpuprofile [N]
 */
import { readFileSync } from 'node:fs';
import { relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { REPO_ROOT } from './common.ts';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
  startTime: number;
  endTime: number;
}

function label(n: ProfileNode): string {
  const { functionName, url, lineNumber } = n.callFrame;
  let where = url.replace(/^file:\/\//, '');
  if (where.startsWith(REPO_ROOT)) where = relative(REPO_ROOT, where);
  where = where.replace(/^.*node_modules\//, '');
  return `${functionName || '(anonymous)'} ${where ? `${where}:${lineNumber + 1}` : ''}`.trim();
}

export function summarizeProfile(file: string, top = 25): string[] {
  const p = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile;
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of p.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const selfUs = new Map<number, number>();
  for (let i = 0; i < p.samples.length; i++) selfUs.set(p.samples[i], (selfUs.get(p.samples[i]) ?? 0) + (p.timeDeltas[i] ?? 0));
  const total = [...selfUs.values()].reduce((a, b) => a + b, 0);
  const self = new Map<string, number>();
  const incl = new Map<string, number>();
  /** Native frames (no script) are named with their JS caller: `run <- recordIssuance`. */
  const selfLabel = (id: number): string => {
    const n = byId.get(id)!;
    if (n.callFrame.url || n.callFrame.functionName.startsWith('(')) return label(n);
    const up = parent.get(id);
    return up === undefined ? label(n) : `${n.callFrame.functionName} [native] <- ${label(byId.get(up)!)}`;
  };
  for (const [id, us] of selfUs) {
    const l0 = selfLabel(id);
    self.set(l0, (self.get(l0) ?? 0) + us);
    // Inclusive: once per distinct function on the stack (recursion counted once).
    const seen = new Set<string>();
    for (let cur: number | undefined = id; cur !== undefined; cur = parent.get(cur)) {
      const l = label(byId.get(cur)!);
      if (seen.has(l)) continue;
      seen.add(l);
      incl.set(l, (incl.get(l) ?? 0) + us);
    }
  }
  // PROFILE_SORT=incl ranks by inclusive time (where a request's time goes, not which leaf burns it).
  const rank = process.env.PROFILE_SORT === 'incl' ? incl : self;
  const rows = [...rank.entries()].sort((a, b) => b[1] - a[1]).slice(0, top);
  const out = [`profile ${file}: ${(total / 1000).toFixed(0)} ms sampled`, '  self%  incl%  function'];
  for (const [l, us] of rows) {
    const inclUs = incl.get(l) ?? us;
    const selfUs0 = self.get(l) ?? 0;
    out.push(`  ${((selfUs0 / total) * 100).toFixed(1).padStart(5)}  ${((inclUs / total) * 100).toFixed(1).padStart(5)}  ${l}`);
  }
  return out;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const [file, n] = process.argv.slice(2);
  if (!file) {
    process.stderr.write('usage: node --import tsx bench/profile-summary.ts FILE.cpuprofile [N]\n');
    process.exit(2);
  }
  for (const line of summarizeProfile(file, n ? Number(n) : 25)) process.stdout.write(line + '\n');
}
