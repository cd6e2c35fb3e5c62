-- The CRL DER as bytes: BLOB, which PostgreSQL spells BYTEA (one of the two rewrites in
-- authority/store/sql.ts rewriteDdl). Migration 002 stored it base64 in TEXT. Base64 cannot
-- be decoded in portable SQL, so the current CRL's number is carried over (CRL numbers only
-- ever go up, RFC 5280 5.2.3) without its DER and with next_update 0: the authority signs
-- number + 1 as it starts, before it serves anything.
CREATE TABLE crls_v2 (
  issuer        TEXT PRIMARY KEY,         -- device-ca | infra-ca
  crl_number    BIGINT NOT NULL,
  this_update   BIGINT NOT NULL,
  next_update   BIGINT NOT NULL,
  der           BLOB                      -- NULL only for a CRL carried over by this migration
);
INSERT INTO crls_v2 (issuer, crl_number, this_update, next_update, der) SELECT issuer, crl_number, 0, 0, NULL FROM crls;
DROP TABLE crls;
ALTER TABLE crls_v2 RENAME TO crls;
