-- One CRL per issuing CA (root, device CA, infrastructure CA, edge issuer): each certificate
-- row names the CA that signed it, so that the CA's CRL lists exactly its own revoked
-- certificates. Rows written before this migration are attributed by kind: device
-- certificates to the device CA, gateway and authority TLS certificates to the
-- infrastructure CA, and gateway Sub-CAs to the root, which signed them directly until the
-- edge issuer existed (`leafgate authority migrate` lists them for re-issuance).
ALTER TABLE certificates ADD COLUMN issuer TEXT;
UPDATE certificates SET issuer = CASE kind WHEN 'device' THEN 'device-ca' WHEN 'subca' THEN 'root' ELSE 'infra-ca' END;
CREATE INDEX certificates_issuer_status ON certificates (issuer, status);
