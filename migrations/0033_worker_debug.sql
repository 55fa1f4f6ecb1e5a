-- Workers whose containers run a debug adapter: a row here while
-- `workerctl worker dev --debug` runs for the worker (README, "Breakpoints").
-- A worker without a row never gets one. workerctl's own table beside
-- user_workers, which is left as it is.
--
-- No foreign key to user_workers, for the reasons of migrations/0020: the
-- row goes with its worker by the triggers below, and the daemon reads it
-- joined with user_workers.
--
-- A change here changes the containers' spec, so it wakes the daemon as a
-- change of user_workers does (the function of migrations/0003).
--
-- Re-runnable: IF NOT EXISTS, and every trigger dropped and recreated.

CREATE TABLE IF NOT EXISTS workerctl_worker_debug (
    worker_id UUID PRIMARY KEY,
    since     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION workerctl_forget_debug() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM workerctl_worker_debug;
    ELSE
        DELETE FROM workerctl_worker_debug WHERE worker_id = OLD.id;
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS workerctl_forget_debug ON user_workers;
CREATE TRIGGER workerctl_forget_debug
    AFTER DELETE ON user_workers
    FOR EACH ROW EXECUTE FUNCTION workerctl_forget_debug();

DROP TRIGGER IF EXISTS workerctl_forget_debug_all ON user_workers;
CREATE TRIGGER workerctl_forget_debug_all
    AFTER TRUNCATE ON user_workers
    FOR EACH STATEMENT EXECUTE FUNCTION workerctl_forget_debug();

DROP TRIGGER IF EXISTS workerctl_notify_debug ON workerctl_worker_debug;
CREATE TRIGGER workerctl_notify_debug
    AFTER INSERT OR DELETE OR TRUNCATE ON workerctl_worker_debug
    FOR EACH STATEMENT EXECUTE FUNCTION workerctl_notify_user_workers();
