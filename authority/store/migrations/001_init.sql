-- leafgate authority schema, version 1. Portable SQL (SQLite and PostgreSQL): TEXT ids,
-- BIGINT epoch milliseconds, no engine-specific types.

CREATE TABLE gateways (
  id            TEXT PRIMARY KEY,
  status        TEXT NOT NULL,            -- active | disabled
  cert_serial   TEXT,
  cert_fingerprint TEXT,
  created_at    BIGINT NOT NULL,
  updated_at    BIGINT NOT NULL
);

CREATE TABLE enrollment_tokens (
  token_hash    TEXT PRIMARY KEY,         -- SHA-256 of the token; the token itself is never stored
  gateway_id    TEXT NOT NULL,
  expires_at    BIGINT NOT NULL,
  used_at       BIGINT
);

CREATE TABLE devices (
  id            TEXT PRIMARY KEY,
  group_name    TEXT NOT NULL,
  method        TEXT NOT NULL,            -- pki-signature | ddkg
  status        TEXT NOT NULL,            -- registered | enrolled | disabled
  gateway_id    TEXT,
  ddkg_salt     TEXT,                     -- base64, stable per device
  ddkg_public_key TEXT,                   -- SPKI PEM once enrolled
  birth_cert_fingerprint TEXT,
  created_at    BIGINT NOT NULL,
  updated_at    BIGINT NOT NULL
);

CREATE TABLE enrollment_codes (
  code_hash     TEXT PRIMARY KEY,
  device_id     TEXT NOT NULL,
  group_name    TEXT NOT NULL,
  expires_at    BIGINT NOT NULL,
  used_at       BIGINT
);

CREATE TABLE challenges (
  id            TEXT PRIMARY KEY,
  device_id     TEXT NOT NULL,
  gateway_id    TEXT NOT NULL,
  method        TEXT NOT NULL,
  nonce         TEXT NOT NULL,
  context       TEXT NOT NULL,            -- JSON: birth cert, key preference, enrollment code hash
  expires_at    BIGINT NOT NULL,
  used_at       BIGINT
);
CREATE INDEX challenges_expiry ON challenges (expires_at);

CREATE TABLE auth_sessions (
  id            TEXT PRIMARY KEY,
  device_id     TEXT NOT NULL,
  gateway_id    TEXT NOT NULL,
  instruction   TEXT NOT NULL,            -- JSON of the instruction the CSR must match
  expires_at    BIGINT NOT NULL,
  used_at       BIGINT
);
CREATE INDEX auth_sessions_device ON auth_sessions (device_id, expires_at);

-- One row per (device, requestId): the stored answer makes every request idempotent.
CREATE TABLE requests (
  device_id     TEXT NOT NULL,
  request_id    TEXT NOT NULL,
  kind          TEXT NOT NULL,            -- register | auth | csr
  body_hash     TEXT NOT NULL,
  response      TEXT NOT NULL,            -- JSON answer
  created_at    BIGINT NOT NULL,
  PRIMARY KEY (device_id, request_id)
);

CREATE TABLE certificates (
  serial        TEXT PRIMARY KEY,         -- unique across the CA: the primary key guards it
  subject_id    TEXT NOT NULL,            -- device or gateway id
  kind          TEXT NOT NULL,            -- device | gateway | server
  fingerprint   TEXT NOT NULL,
  not_before    BIGINT NOT NULL,
  not_after     BIGINT NOT NULL,
  status        TEXT NOT NULL,            -- active | superseded | revoked
  request_id    TEXT,
  pem           TEXT NOT NULL,
  revoked_at    BIGINT,
  revocation_reason INTEGER,
  created_at    BIGINT NOT NULL
);
CREATE INDEX certificates_subject ON certificates (subject_id, status);

-- Append-only: no UPDATE or DELETE is ever issued against this table.
CREATE TABLE audit_log (
  seq           INTEGER PRIMARY KEY AUTOINCREMENT,
  at            BIGINT NOT NULL,
  action        TEXT NOT NULL,            -- register | auth | issue | refuse | enroll-gateway | ...
  outcome       TEXT NOT NULL,            -- ok | refused | error
  code          TEXT,
  device_id     TEXT,
  gateway_id    TEXT,
  request_id    TEXT,
  serial        TEXT,
  detail        TEXT
);
