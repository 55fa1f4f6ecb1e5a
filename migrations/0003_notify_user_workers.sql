-- Wakes workerctl when the desired state may have changed: a NOTIFY on
-- channel `workerctl_user_workers` after any statement that inserts, deletes
-- or truncates workers, or changes a column that decides what should run.
--
-- Statement-level, so that enabling 100 workers in one statement costs one
-- notification, not 100 (Postgres also folds identical notifications of one
-- transaction into one). The payload is empty on purpose: a wake-up carries
-- no input, the daemon re-reads everything.
--
-- status and status_info are not in the column list: they are what the daemon
-- itself writes, and its own writes must not wake it.
--
-- Re-runnable: the function is replaced and the trigger dropped and recreated.

CREATE OR REPLACE FUNCTION workerctl_notify_user_workers() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('workerctl_user_workers', '');
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS workerctl_notify ON user_workers;

CREATE TRIGGER workerctl_notify
    AFTER INSERT OR DELETE OR TRUNCATE
       OR UPDATE OF state, revision, source, entrypoint, language
    ON user_workers
    FOR EACH STATEMENT
    EXECUTE FUNCTION workerctl_notify_user_workers();
