-- Hive control plane schema (PostgreSQL). Times are ms since the Unix epoch, ids are TEXT,
-- flags are 0/1 BIGINT so the same queries work through sqlx `Any` on PostgreSQL.
CREATE TABLE projects (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    repo_url TEXT NOT NULL,
    repo_key TEXT NOT NULL,
    secret TEXT NOT NULL,
    branch TEXT NOT NULL,
    size_class TEXT NOT NULL,
    private_network TEXT NOT NULL,
    steps_json TEXT NOT NULL,
    env_json TEXT NOT NULL,
    timeout_secs BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX projects_repo_key ON projects (repo_key);

CREATE TABLE builds (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    project_name TEXT NOT NULL,
    repo_url TEXT NOT NULL,
    revision TEXT NOT NULL,
    git_ref TEXT NOT NULL,
    state TEXT NOT NULL,
    box_id TEXT NOT NULL DEFAULT '',
    cell_id TEXT NOT NULL DEFAULT '',
    lease_id TEXT NOT NULL DEFAULT '',
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    started_at_ms BIGINT NOT NULL DEFAULT 0,
    exit_code BIGINT NOT NULL DEFAULT -1,
    message TEXT NOT NULL DEFAULT '',
    trigger_source TEXT NOT NULL,
    size_class TEXT NOT NULL,
    private_network TEXT NOT NULL,
    steps_json TEXT NOT NULL,
    env_json TEXT NOT NULL,
    timeout_secs BIGINT NOT NULL,
    warm_start BIGINT NOT NULL DEFAULT 0,
    attempt BIGINT NOT NULL DEFAULT 1,
    -- Offset added to the box's per-attempt log seq, so a re-queued build's log stays dense.
    log_base BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX builds_state_order ON builds (state, created_at_ms, id);
CREATE INDEX builds_project ON builds (project_id, created_at_ms);

CREATE TABLE build_transitions (
    id BIGSERIAL PRIMARY KEY,
    build_id TEXT NOT NULL,
    state TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX build_transitions_build ON build_transitions (build_id, id);

CREATE TABLE log_chunks (
    build_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    stream BIGINT NOT NULL,
    step BIGINT NOT NULL,
    data BYTEA NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (build_id, seq)
);

CREATE TABLE webhook_deliveries (
    delivery_id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    build_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    at_ms BIGINT NOT NULL
);

CREATE TABLE boxes (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    state TEXT NOT NULL,
    backend TEXT NOT NULL,
    pools_json TEXT NOT NULL,
    last_heartbeat_ms BIGINT NOT NULL,
    registered_at_ms BIGINT NOT NULL,
    acked_seq BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE cells (
    id TEXT PRIMARY KEY,
    box_id TEXT NOT NULL,
    size_class TEXT NOT NULL,
    state TEXT NOT NULL,
    build_id TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE INDEX cells_box ON cells (box_id);

CREATE TABLE leases (
    id TEXT PRIMARY KEY,
    build_id TEXT NOT NULL,
    box_id TEXT NOT NULL,
    deadline_ms BIGINT NOT NULL,
    confirmed BIGINT NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
-- Never two live leases for one build.
CREATE UNIQUE INDEX leases_one_live ON leases (build_id) WHERE state = 'live';
CREATE INDEX leases_live_deadline ON leases (state, deadline_ms);
CREATE INDEX leases_box ON leases (box_id, state);
