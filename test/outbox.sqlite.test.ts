/**
 * The embedded (SQLite) outbox's group commit: the accepts of one event-loop turn share a
 * transaction and one fsync of the WAL; each still gets its own answer (new, repeat,
 * conflict), and nothing accepted is lost across a close and reopen.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { Outbox } from '../cloud-bridge/outbox.ts';

function tempFile(t: { after(fn: () => void): void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'leafgate-outbox-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return join(dir, 'outbox.db');
}

test('accepts of one turn are committed together; repeats and conflicts are answered one by one', async (t) => {
  const file = tempFile(t);
  const outbox = new Outbox(file);
  const body = (i: number) => ({ requestId: `r${i}`, csr: `csr-${i}` });
  const all = Array.from({ length: 40 }, (_, i) => outbox.accept(`dev-${i % 10}`, `r${i}`, 'csr', body(i), 1000 + i));
  // Same turn: a repeat of r3 for dev-3 (same body) and a conflicting body for r4 of dev-4.
  const repeat = outbox.accept('dev-3', 'r3', 'csr', body(3), 2000);
  const conflict = outbox.accept('dev-4', 'r4', 'csr', { requestId: 'r4', csr: 'another' }, 2000);
  const results = await Promise.all(all);
  assert.ok(results.every((r) => r.isNew && r.entry.state === 'queued'));
  assert.deepEqual(new Set(results.map((r) => r.entry.seq)).size, 40);
  const again = await repeat;
  assert.equal(again.isNew, false);
  assert.equal(again.entry.seq, results[3].entry.seq);
  await assert.rejects(conflict, { code: 'request_conflict' });
  assert.equal(outbox.pendingCount(), 40);
  // A later turn: a repeat is answered from the stored row.
  assert.equal((await outbox.accept('dev-0', 'r0', 'csr', body(0), 3000)).isNew, false);
  await outbox.close();
});

test('close waits for accepts in flight; a reopened outbox has them; accepts after close are refused', async (t) => {
  const file = tempFile(t);
  const outbox = new Outbox(file);
  const inFlight = [outbox.accept('dev-a', 'q1', 'csr', { csr: 'a' }, 1), outbox.accept('dev-b', 'q1', 'renew', { csr: 'b' }, 2)];
  const closing = outbox.close();
  const accepted = await Promise.all(inFlight);
  await closing;
  assert.ok(accepted.every((r) => r.isNew));
  await assert.rejects(outbox.accept('dev-c', 'q1', 'csr', { csr: 'c' }, 3), { code: 'gateway_unavailable' });

  const reopened = new Outbox(file);
  t.after(() => reopened.close());
  assert.equal(reopened.get('dev-a', 'q1')?.body.csr, 'a');
  assert.equal(reopened.get('dev-b', 'q1')?.kind, 'renew');
  assert.equal(reopened.get('dev-c', 'q1'), null);
  assert.deepEqual(reopened.due(10, 10).map((e) => e.deviceId), ['dev-a', 'dev-b']);
});

test('the WAL fd follows the file: accepts keep working across checkpoints that restart the WAL', async (t) => {
  const file = tempFile(t);
  const outbox = new Outbox(file);
  t.after(() => outbox.close());
  const big = 'x'.repeat(20_000);
  // ~1000+ pages: SQLite's auto-checkpoint runs and the WAL restarts from its beginning.
  for (let round = 0; round < 5; round++) {
    const batch = Array.from({ length: 60 }, (_, i) => outbox.accept(`dev-${round}`, `r${i}`, 'csr', { csr: big, i }, round));
    assert.equal((await Promise.all(batch)).filter((r) => r.isNew).length, 60);
  }
  assert.equal(outbox.pendingCount(), 300);
});
