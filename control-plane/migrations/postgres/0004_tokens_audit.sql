-- API tokens (issue 10): only the SHA-256 of each token is kept. A revoked token keeps its row
-- (revoked_at_ms > 0) so the audit log can still name it.
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    -- A submitter's project (id, and name when the token was made); '' = every project.
    project_id TEXT NOT NULL DEFAULT '',
    project_name TEXT NOT NULL DEFAULT '',
    token_hash TEXT NOT NULL UNIQUE,
    created_at_ms BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    revoked_at_ms BIGINT NOT NULL DEFAULT 0
);

-- Who changed what through the API, and when; written in the change's own transaction.
CREATE TABLE audit_log (
    id TEXT PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    token_id TEXT NOT NULL,
    token_name TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at_ms, id);
