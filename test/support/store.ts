/**
 * The store contract tests' engines: the embedded SQLite file and the real PostgreSQL server
 * (LEAFGATE_TEST_DATABASE_URL, one random schema per test).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import { openStore, type SqlStore } from '../../authority/store/index.ts';
import { pgSchema } from './pg.ts';

export type Engine = 'sqlite' | 'postgres';
export const ENGINES: Engine[] = ['sqlite', 'postgres'];

/** The store on a fresh database of the engine; `reopen` opens a second store (another node) on it. */
export async function openTestStore(t: TestContext, engine: Engine): Promise<{ store: SqlStore; reopen: () => Promise<SqlStore> }> {
  let database: string;
  if (engine === 'sqlite') {
    const dir = mkdtempSync(join(tmpdir(), 'leafgate-store-'));
    t.after(() => rmSync(dir, { recursive: true, force: true }));
    database = join(dir, 'authority.db');
  } else database = (await pgSchema(t)).url;
  const opened: SqlStore[] = [];
  t.after(async () => {
    for (const s of opened) await s.close();
  });
  const reopen = async () => {
    const s = await openStore(database);
    opened.push(s);
    return s;
  };
  return { store: await reopen(), reopen };
}
