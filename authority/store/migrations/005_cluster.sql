-- Several authority nodes on one PostgreSQL database.
-- CA material shared by every node: written once by the first node to start (insert if
-- absent; a node that loses the race loads the winner's). The keys are the encrypted PKCS#8
-- PEM (PBES2 + scrypt) exactly as the file CA writes them: the database never holds a usable
-- key, and every node needs the same LEAFGATE_CA_PASSPHRASE. The embedded SQLite default
-- keeps its CA in <dataDir>/ca/ and leaves this table empty.
CREATE TABLE ca_material (
  name          TEXT PRIMARY KEY,         -- root | device-ca | infra-ca
  cert_pem      TEXT NOT NULL,
  key_pem       TEXT NOT NULL,            -- ENCRYPTED PRIVATE KEY
  created_at    BIGINT NOT NULL
);

-- Periodic jobs that one node should do per period for the whole cluster (the renewal
-- announcement): a node claims a run with a conditional upsert on last_run_at.
CREATE TABLE job_runs (
  name          TEXT PRIMARY KEY,
  last_run_at   BIGINT NOT NULL
);
