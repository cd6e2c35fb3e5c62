-- A certificate answer stored for idempotent repeats (requests.response) names its CA chain
-- by reference instead of carrying it: the chain (Device CA + root, ~1.2 kB) is the same for
-- every device certificate of one issuing CA, and was a third of the bytes written per
-- issuance. Rows written before this migration keep their inline chain and read as before.
CREATE TABLE answer_chains (
  ref           TEXT PRIMARY KEY,         -- sha256 hex of the chain's JSON
  chain         TEXT NOT NULL             -- JSON array of PEM certificates, issuing CA first
);
