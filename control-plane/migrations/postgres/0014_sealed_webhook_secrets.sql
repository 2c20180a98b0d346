-- Issue 10: webhook secrets sealed at rest, like project secrets. `secret` holds the sealed
-- value (base64) when `secret_nonce` is set; a row from before this migration keeps its
-- plaintext with an empty nonce until the control plane seals it at start (the key is not
-- the database's to know, so SQL cannot do it).
ALTER TABLE projects ADD COLUMN secret_nonce TEXT NOT NULL DEFAULT '';
-- Which builds see a project secret: a comma-separated list of branch/tag globs (refglob),
-- matched against the build's ref without refs/heads/ or refs/tags/. Secrets set before this
-- migration keep being handed to every build ('*'), as they were.
ALTER TABLE project_secrets ADD COLUMN refs TEXT NOT NULL DEFAULT '*';
