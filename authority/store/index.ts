export { SqlStore, SqliteStore, listMigrations, openStore } from './sql-store.ts';
export { SqliteDriver, PostgresDriver, isPostgresUrl, isConnectionError, redactUrl, type SqlDriver, type Queryable } from './sql.ts';
export type * from './types.ts';
export { ISSUER_OF_KIND } from './types.ts';
