-- Which tags a project builds (a glob, e.g. `v*`; `*` for all; empty for none). The branch
-- column may hold a glob too (`release/*`).
ALTER TABLE projects ADD COLUMN tags TEXT NOT NULL DEFAULT '';
