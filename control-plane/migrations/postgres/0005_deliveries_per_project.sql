-- A webhook delivery id is scoped to its project: one push to a repository that several
-- projects build is one delivery for each of them.
ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_pkey;
ALTER TABLE webhook_deliveries ADD PRIMARY KEY (project_id, delivery_id);
