-- The operator dashboard's read paths (authority/store/dashboard.ts), kept fast with
-- 1,000,000 audit rows and 100,000 devices (measured: bench/dashboard.ts). Portable SQL
-- (SQLite and PostgreSQL; partial indexes exist on both).
-- Audit log: keyset pages on seq, newest first, under one filter each.
CREATE INDEX audit_log_device_seq ON audit_log (device_id, seq);
CREATE INDEX audit_log_gateway_seq ON audit_log (gateway_id, seq);
CREATE INDEX audit_log_serial_seq ON audit_log (serial, seq);
CREATE INDEX audit_log_action_seq ON audit_log (action, seq);
-- Counts and plots over a time window read this index alone (covering).
CREATE INDEX audit_log_at ON audit_log (at, outcome, action);
-- Devices: keyset pages on id within a state or a gateway.
CREATE INDEX devices_status_id ON devices (status, id);
CREATE INDEX devices_gateway_id ON devices (gateway_id, id);
-- Certificates: expiries (counts, the plot, "expiring" filter) and the newest-first list.
CREATE INDEX certificates_expiry ON certificates (status, kind, not_after, subject_id);
CREATE INDEX certificates_created ON certificates (created_at, serial);
-- Registry sync failures are rare: a partial index counts them without a scan.
CREATE INDEX certificates_hub_error ON certificates (kind) WHERE hub_error IS NOT NULL;
