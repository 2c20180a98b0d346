-- Bytes of log stored for the build (all attempts), checked against the per-build log cap, and
-- whether the truncation marker has been written.
ALTER TABLE builds ADD COLUMN log_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE builds ADD COLUMN log_truncated BIGINT NOT NULL DEFAULT 0;
