-- Project secrets (issue 10): the value sealed with the control plane's secrets key
-- (XChaCha20-Poly1305; the project id and name are the associated data, so a sealed value
-- cannot be moved to another project or name). Never returned by any API.
CREATE TABLE project_secrets (
    project_id TEXT NOT NULL,
    name TEXT NOT NULL,
    nonce TEXT NOT NULL,
    sealed TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (project_id, name)
);
