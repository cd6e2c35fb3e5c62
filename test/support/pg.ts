/**
 * PostgreSQL for tests: the real server from LEAFGATE_TEST_DATABASE_URL (default
 * postgres://postgres@127.0.0.1:5432/test). Each test gets its own schema with a random
 * name, selected through the URL's `?schema=` (search_path), and dropped at the end, so test
 * files and other people's runs never see each other's rows.
 */
import { randomBytes } from 'node:crypto';
import type { TestContext } from 'node:test';
import pg from 'pg';

export const TEST_DATABASE_URL = process.env.LEAFGATE_TEST_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test';

/** A fresh schema; returns the database URL that selects it. Dropped (CASCADE) after the test. */
export async function pgSchema(t: TestContext, prefix = 'lgtest'): Promise<{ url: string; schema: string; admin: pg.Client }> {
  const schema = `${prefix}_${randomBytes(6).toString('hex')}`;
  const admin = new pg.Client({ connectionString: TEST_DATABASE_URL });
  admin.on('error', () => undefined);
  await admin.connect();
  await admin.query(`CREATE SCHEMA "${schema}"`);
  t.after(async () => {
    await admin.query(`DROP SCHEMA "${schema}" CASCADE`).catch(() => undefined);
    await admin.end().catch(() => undefined);
  });
  const u = new URL(TEST_DATABASE_URL);
  u.searchParams.set('schema', schema);
  return { url: u.toString(), schema, admin };
}
