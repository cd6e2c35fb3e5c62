-- Revocation: the current CRL per issuing CA, numbered monotonically (RFC 5280 5.2.3).
CREATE TABLE crls (
  issuer        TEXT PRIMARY KEY,         -- device-ca | infra-ca
  crl_number    BIGINT NOT NULL,
  this_update   BIGINT NOT NULL,
  next_update   BIGINT NOT NULL,
  der           TEXT NOT NULL             -- base64
);
CREATE INDEX certificates_revoked ON certificates (status, kind);
