-- The forge status outbox (0012) filled by one trigger call per statement instead of one per
-- transition row: the webhook group commit's single statement inserts a transition for each
-- of its builds, and a PL/pgSQL call with a query of its own for each row was about a tenth of
-- the statement's time (`hive-bench webhooks`). The rows a statement inserted are its
-- transition table; rows go to the outbox in their transitions' order (`forge_statuses.id`
-- orders a commit's statuses). `placed` still says nothing to a forge.
CREATE FUNCTION hive_forge_statuses_of_transitions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO forge_statuses (build_id, project_id, revision, state, reason, at_ms)
    SELECT b.id, b.project_id, b.revision, n.state, n.reason, n.at_ms
    FROM new_transitions n
    JOIN builds b ON b.id = n.build_id
    JOIN project_forges f ON f.project_id = b.project_id
    WHERE n.state <> 'placed'
    ORDER BY n.id;
    RETURN NULL;
END
$$;
DROP TRIGGER forge_status_on_transition ON build_transitions;
DROP FUNCTION hive_forge_status_on_transition();
CREATE TRIGGER forge_statuses_of_transitions AFTER INSERT ON build_transitions
REFERENCING NEW TABLE AS new_transitions
FOR EACH STATEMENT EXECUTE FUNCTION hive_forge_statuses_of_transitions();
