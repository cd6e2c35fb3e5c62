import assert from 'node:assert/strict';
import { DerError } from '../../protocol/index.ts';

/** assert.throws that also insists on the error class (DerError) and, optionally, the message. */
export function throwsDer(fn: () => unknown, message?: RegExp, what = ''): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof DerError, `${what ? what + ': ' : ''}expected DerError, got ${(err as Error)?.name}: ${(err as Error)?.message}`);
    if (message) assert.match(err.message, message, what || undefined);
    return true;
  }, what || undefined);
}
