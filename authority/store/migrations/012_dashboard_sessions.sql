-- Dashboard sessions live in the store, not in one node's memory: every authority node of a
-- cluster knows them (no sticky load balancing needed) and a restart logs nobody out. The
-- cookie's id is kept only as its SHA-256: reading this table gives no usable cookie (the
-- CSRF token is useless without the session). Portable SQL (SQLite, PostgreSQL).
CREATE TABLE dashboard_sessions (
  id_hash TEXT PRIMARY KEY,
  operator TEXT NOT NULL,
  via TEXT NOT NULL,
  csrf TEXT NOT NULL,
  created_at BIGINT NOT NULL,
  last_used_at BIGINT NOT NULL
);
CREATE INDEX dashboard_sessions_created ON dashboard_sessions (created_at);
