-- External registry sync (IoT Hub): derived from the certificates themselves, so a crash
-- between issuance and registration loses nothing: unsynced rows are simply picked up again.
ALTER TABLE certificates ADD COLUMN hub_synced_at BIGINT;
ALTER TABLE certificates ADD COLUMN hub_error TEXT;
ALTER TABLE devices ADD COLUMN hub_state TEXT;
CREATE INDEX certificates_hub_pending ON certificates (kind, hub_synced_at);
