-- Several control planes on one database (issue 13).
-- Which control plane's session holds each box ('' when none): a session that ended on one
-- control plane after its box moved to another must not mark the box disconnected.
ALTER TABLE boxes ADD COLUMN session_owner TEXT NOT NULL DEFAULT '';
-- What every control plane of this database must share: the CA that signs box certificates
-- and the key that seals secrets (their SHA-256 fingerprints; the first to start writes them).
CREATE TABLE hive_identity (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
