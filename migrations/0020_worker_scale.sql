-- Replicas per worker: between min_replicas and max_replicas containers,
-- one per per_replica ready messages in its queue (`workerctl worker
-- scale`). workerctl's own table beside user_workers, which is left as it
-- is: the dashboard's writes work unchanged, and a worker without a row
-- here runs exactly one replica, as before.
--
-- No foreign key to user_workers: a constraint on SensorBucket's table
-- would make its own `DROP TABLE user_workers` (a down migration) and a
-- hand-made TRUNCATE fail. Instead the settings go with their row by the
-- triggers below, workerctl sets them only while holding the row
-- (SELECT … FOR KEY SHARE, see src/store/scale.rs), and readers join with
-- user_workers, so a leftover row is never seen.

CREATE TABLE IF NOT EXISTS workerctl_worker_scale (
    worker_id    UUID PRIMARY KEY,
    min_replicas INT NOT NULL DEFAULT 1 CHECK (min_replicas >= 0),
    max_replicas INT NOT NULL DEFAULT 1 CHECK (max_replicas >= 1),
    per_replica  INT NOT NULL DEFAULT 20 CHECK (per_replica >= 1),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (min_replicas <= max_replicas)
);

CREATE OR REPLACE FUNCTION workerctl_forget_scale() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM workerctl_worker_scale;
    ELSE
        DELETE FROM workerctl_worker_scale WHERE worker_id = OLD.id;
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS workerctl_forget_scale ON user_workers;
CREATE TRIGGER workerctl_forget_scale
    AFTER DELETE ON user_workers
    FOR EACH ROW EXECUTE FUNCTION workerctl_forget_scale();

DROP TRIGGER IF EXISTS workerctl_forget_scale_all ON user_workers;
CREATE TRIGGER workerctl_forget_scale_all
    AFTER TRUNCATE ON user_workers
    FOR EACH STATEMENT EXECUTE FUNCTION workerctl_forget_scale();
