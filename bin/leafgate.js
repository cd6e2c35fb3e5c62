#!/usr/bin/env node
// Installed entry point (`npx leafgate`, the container). Production runs the compiled CLI
// in dist/ (`npm run build`), with no dev dependency. A source checkout (bin/leafgate.ts
// present and tsx installed, as after `npm ci`) runs the TypeScript sources instead, so a
// developer never runs a stale build.
import { existsSync } from 'node:fs';

const source = new URL('./leafgate.ts', import.meta.url);
const built = new URL('../dist/bin/leafgate.js', import.meta.url);

async function fromSource() {
  if (!existsSync(source)) return false;
  try {
    const { register } = await import('tsx/esm/api');
    register();
    return true;
  } catch {
    return false;
  }
}

if (await fromSource()) await import(source.href);
else if (existsSync(built)) await import(built.href);
else {
  process.stderr.write('error: leafgate is not built: run `npm run build` (or `npm ci` for the sources)\n');
  process.exitCode = 1;
}
