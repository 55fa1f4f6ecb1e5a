-- Replicas of each worker as the last pass saw them: how many the scaler
-- wants and how many have a running container. A row written before
-- replicas reads as one wanted, one running when its container runs.
ALTER TABLE workerctl_observed
    ADD COLUMN IF NOT EXISTS desired_replicas INT NOT NULL DEFAULT 1,
    ADD COLUMN IF NOT EXISTS running_replicas INT NOT NULL DEFAULT 0;

UPDATE workerctl_observed
   SET running_replicas = 1
 WHERE container_state = 'running' AND running_replicas = 0;

-- A change of replica bounds (`workerctl worker scale`, or a hand edit)
-- wakes the daemon like a change of the worker's row does.
DROP TRIGGER IF EXISTS workerctl_notify_scale ON workerctl_worker_scale;

CREATE TRIGGER workerctl_notify_scale
    AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF min_replicas, max_replicas, per_replica
    ON workerctl_worker_scale
    FOR EACH STATEMENT EXECUTE FUNCTION workerctl_notify_user_workers();
