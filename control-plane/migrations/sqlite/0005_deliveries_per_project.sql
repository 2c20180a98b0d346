-- A webhook delivery id is scoped to its project: one push to a repository that several
-- projects build is one delivery for each of them. SQLite cannot change a primary key in
-- place, so the table is rebuilt.
CREATE TABLE webhook_deliveries_new (
    project_id TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    build_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (project_id, delivery_id)
);
INSERT INTO webhook_deliveries_new (project_id, delivery_id, build_id, outcome, at_ms)
    SELECT project_id, delivery_id, build_id, outcome, at_ms FROM webhook_deliveries;
DROP TABLE webhook_deliveries;
ALTER TABLE webhook_deliveries_new RENAME TO webhook_deliveries;
