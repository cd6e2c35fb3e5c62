-- Per-row retry state of the external registry sync (IoT Hub, DPS): a failing certificate row
-- backs off alone (attempts, next attempt time) and is parked (failed_at) past the attempt
-- limit, visible to operators, while the other rows go on. Portable SQL (SQLite, PostgreSQL).
ALTER TABLE certificates ADD COLUMN hub_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE certificates ADD COLUMN hub_next_at BIGINT;
ALTER TABLE certificates ADD COLUMN hub_failed_at BIGINT;
ALTER TABLE certificates ADD COLUMN dps_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE certificates ADD COLUMN dps_next_at BIGINT;
ALTER TABLE certificates ADD COLUMN dps_failed_at BIGINT;
ALTER TABLE certificates ADD COLUMN dps_error TEXT;
