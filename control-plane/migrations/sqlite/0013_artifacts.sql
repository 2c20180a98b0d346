-- Artefacts (issue 14): the files a build's hive.toml names, collected by the cell after the
-- steps and streamed through the box. The bytes are files under <data-dir>/artifacts/<build>/;
-- a row says what the cell reported (size) and how much arrived. complete = 1 once all of it
-- did; then sha256 is the file's hash. Deleted with the build by retention.
CREATE TABLE artifacts (
    build_id TEXT NOT NULL,
    path TEXT NOT NULL,
    size BIGINT NOT NULL,
    stored_bytes BIGINT NOT NULL DEFAULT 0,
    complete BIGINT NOT NULL DEFAULT 0,
    sha256 TEXT NOT NULL DEFAULT '',
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (build_id, path)
);
