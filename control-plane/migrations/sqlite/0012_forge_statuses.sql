-- Commit statuses back to the forges (issue 14).
--
-- A project's forge credentials, apart from the `projects` row: which forge API to call, the
-- repository there, and either a token or a GitHub App (id + private key), each sealed with
-- the secrets key (`crate::secrets`; the project id and a fixed name are the associated data).
-- No API returns them.
CREATE TABLE project_forges (
    project_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    api_url TEXT NOT NULL,
    repo_path TEXT NOT NULL,
    token_nonce TEXT NOT NULL DEFAULT '',
    token_sealed TEXT NOT NULL DEFAULT '',
    app_id BIGINT NOT NULL DEFAULT 0,
    app_key_nonce TEXT NOT NULL DEFAULT '',
    app_key_sealed TEXT NOT NULL DEFAULT '',
    updated_at_ms BIGINT NOT NULL
);

-- The outbox: one row per build state change of a project with a forge, written by the
-- trigger below in the transaction of the change itself (every write path of a state change
-- inserts its `build_transitions` row, the PostgreSQL webhook group commit's one statement
-- included, so none can be missed). The `forge` task sends them: pending -> sent, or failed
-- once it gives up; claimed with a conditional update (`claimed_by`, `claim_until_ms`).
CREATE TABLE forge_statuses (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    build_id TEXT NOT NULL,
    project_id TEXT NOT NULL,
    revision TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts BIGINT NOT NULL DEFAULT 0,
    next_at_ms BIGINT NOT NULL DEFAULT 0,
    claimed_by TEXT NOT NULL DEFAULT '',
    claim_until_ms BIGINT NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    done_at_ms BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX forge_statuses_due ON forge_statuses (status, next_at_ms);
CREATE INDEX forge_statuses_commit ON forge_statuses (project_id, revision, id);

-- `placed` says nothing to a forge (queued -> pending, running -> running).
CREATE TRIGGER forge_status_on_transition AFTER INSERT ON build_transitions
WHEN NEW.state <> 'placed'
BEGIN
    INSERT INTO forge_statuses (build_id, project_id, revision, state, reason, at_ms)
    SELECT b.id, b.project_id, b.revision, NEW.state, NEW.reason, NEW.at_ms
    FROM builds b JOIN project_forges f ON f.project_id = b.project_id
    WHERE b.id = NEW.build_id;
END;

-- A deleted project's credentials go with it.
CREATE TRIGGER project_forges_of_deleted_project AFTER DELETE ON projects
BEGIN
    DELETE FROM project_forges WHERE project_id = OLD.id;
END;
