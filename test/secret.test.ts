/**
 * Secrets handed to operators go through command lines: none may look like an option.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parseArgs } from 'node:util';
import { newSecret } from '../authority/secret.ts';

test('enrollment tokens and codes never start with "-" and survive `--token VALUE` parsing', () => {
  const seen = new Set<string>();
  for (let i = 0; i < 5000; i++) {
    const s = newSecret(24);
    assert.match(s, /^[A-Za-z0-9_][A-Za-z0-9_-]{31}$/);
    seen.add(s);
    const { values } = parseArgs({ args: ['--token', s], options: { token: { type: 'string' } }, strict: true });
    assert.equal(values.token, s);
  }
  assert.equal(seen.size, 5000, 'no repeats');
  assert.match(newSecret(12), /^[A-Za-z0-9_][A-Za-z0-9_-]{15}$/);
});
