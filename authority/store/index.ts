export { SqliteStore, listMigrations } from './sqlite.ts';
export type * from './types.ts';
