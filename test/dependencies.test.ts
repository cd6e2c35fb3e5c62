/**
 * What production runs imports only declared runtime dependencies (never a dev dependency
 * such as tsx), and `engines` agrees with what the lock file installs.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';

const ROOT = new URL('..', import.meta.url).pathname;
const RUNTIME = ['protocol', 'config-schema', 'broker', 'plugins', 'cloud-bridge', 'gateway', 'authority', 'device', 'bin', 'test/support/iothub-standin'];
const manifest = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { dependencies: Record<string, string>; devDependencies: Record<string, string>; engines: { node: string } };

function* files(dir: string): Generator<string> {
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) yield* files(p);
    else if (/\.(ts|js)$/.test(name) && !name.endsWith('.d.ts')) yield p;
  }
}

test('runtime code imports only declared runtime dependencies', () => {
  const missing: string[] = [];
  for (const dir of RUNTIME) {
    for (const file of files(join(ROOT, dir))) {
      const text = readFileSync(file, 'utf8');
      // `from '...'` of an import statement, `import('...')`: not a method call such as Buffer.from('...').
      for (const m of text.matchAll(/(?<![.\w])(?:from|import)\s*\(?\s*'([^'.][^']*)'/g)) {
        const spec = m[1];
        if (spec.startsWith('node:')) continue;
        const pkg = spec.startsWith('@') ? spec.split('/').slice(0, 2).join('/') : spec.split('/')[0];
        // bin/leafgate.js loads tsx only in a source checkout, and survives its absence.
        if (pkg === 'tsx' && file.endsWith('bin/leafgate.js')) continue;
        if (!manifest.dependencies[pkg]) missing.push(`${file.slice(ROOT.length)}: ${pkg}${manifest.devDependencies[pkg] ? ' (a dev dependency)' : ''}`);
      }
    }
  }
  assert.deepEqual(missing, [], 'declare these in dependencies');
});

test('engines.node is at least what every locked package asks for', () => {
  const lock = JSON.parse(readFileSync(join(ROOT, 'package-lock.json'), 'utf8')) as { packages: Record<string, { engines?: { node?: string }; dev?: boolean }> };
  const ours = Number(/>=\s*(\d+)/.exec(manifest.engines.node)?.[1]);
  const above: string[] = [];
  for (const [path, p] of Object.entries(lock.packages)) {
    const min = /^>=\s*(\d+)/.exec(p.engines?.node ?? '')?.[1];
    if (path && !p.dev && min && Number(min) > ours) above.push(`${path} wants node ${p.engines!.node}`);
  }
  assert.deepEqual(above, [], `engines.node is ${manifest.engines.node}`);
});
