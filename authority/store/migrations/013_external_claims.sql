-- A claim per (device, requestId) taken before a device's CSR is forwarded to an external CA
-- (EST): the CA has no idempotency key, so only the node (or request) holding the claim may
-- ask it. Released when the answer is committed or the call failed; a claim of a node that
-- crashed expires (expires_at: the EST timeout plus a margin) and is then taken over.
-- Portable SQL (SQLite, PostgreSQL).
CREATE TABLE external_claims (
  device_id TEXT NOT NULL,
  request_id TEXT NOT NULL,
  node TEXT NOT NULL,
  claimed_at BIGINT NOT NULL,
  expires_at BIGINT NOT NULL,
  PRIMARY KEY (device_id, request_id)
);
CREATE INDEX external_claims_expires ON external_claims (expires_at);
