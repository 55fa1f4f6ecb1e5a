-- When a worker row is deleted (by hand: the dashboard only disables), what
-- workerctl observed of its container goes with it.
DELETE FROM workerctl_observed o
 WHERE NOT EXISTS (SELECT 1 FROM user_workers w WHERE w.id = o.worker_id);

CREATE OR REPLACE FUNCTION workerctl_forget_observed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM workerctl_observed WHERE worker_id = OLD.id;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS workerctl_forget_observed ON user_workers;
CREATE TRIGGER workerctl_forget_observed
    AFTER DELETE ON user_workers
    FOR EACH ROW EXECUTE FUNCTION workerctl_forget_observed();
