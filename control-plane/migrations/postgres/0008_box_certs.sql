-- Box join tokens (one-time; only the SHA-256 of the secret) and the client certificates the
-- control plane's CA issued to boxes (by serial), so a revoked box's certificates are refused.
CREATE TABLE join_tokens (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    -- Only this box id may join with it; '' = any.
    box_id TEXT NOT NULL DEFAULT '',
    created_at_ms BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    -- 0 until used; then the box that used it.
    used_at_ms BIGINT NOT NULL DEFAULT 0,
    used_by TEXT NOT NULL DEFAULT ''
);

CREATE TABLE box_certs (
    serial TEXT PRIMARY KEY,
    box_id TEXT NOT NULL,
    issued_at_ms BIGINT NOT NULL,
    not_after_ms BIGINT NOT NULL,
    -- 0 while in force.
    revoked_at_ms BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX box_certs_box ON box_certs (box_id);
