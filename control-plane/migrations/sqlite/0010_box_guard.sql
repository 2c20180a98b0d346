-- One row per box id that ever joined: joins, renewals and revocations of one box take this
-- row's lock first, so on PostgreSQL two joins for one id, or a renewal racing a revocation,
-- happen one after the other (SQLite has one writer anyway).
CREATE TABLE box_guard (
    box_id TEXT PRIMARY KEY,
    revoked_at_ms BIGINT NOT NULL DEFAULT 0
);
