/**
 * Rewrites the configuration reference in README.md from the schemas that validate the
 * config files (`npm run docs:config`). `--check` exits 1 when the README is stale.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { referenceTable, replaceMarkedSection } from '../config-schema/index.ts';
import { AUTHORITY_CONFIG_SCHEMA } from '../authority/config.ts';
import { GATEWAY_CONFIG_SCHEMA } from '../gateway/config.ts';

export const README = fileURLToPath(new URL('../README.md', import.meta.url));

export function renderedReadme(text: string): string {
  let out = replaceMarkedSection(text, 'authority', referenceTable(AUTHORITY_CONFIG_SCHEMA));
  out = replaceMarkedSection(out, 'gateway', referenceTable(GATEWAY_CONFIG_SCHEMA));
  return out;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const text = readFileSync(README, 'utf8');
  const next = renderedReadme(text);
  if (process.argv.includes('--check')) {
    if (next !== text) {
      process.stderr.write('README.md configuration reference is stale: run `npm run docs:config`\n');
      process.exitCode = 1;
    }
  } else if (next !== text) {
    writeFileSync(README, next);
    process.stdout.write('README.md configuration reference rewritten\n');
  }
}
