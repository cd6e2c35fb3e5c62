-- DPS individual enrollments follow the same derived-from-certificates pattern as IoT Hub.
ALTER TABLE certificates ADD COLUMN dps_synced_at BIGINT;
ALTER TABLE devices ADD COLUMN dps_state TEXT;
