-- Replicas of each worker as the last pass saw them: how many the scaler
-- wants and how many have a running container. A row written before
-- replicas reads as one wanted, one running when its container runs.
ALTER TABLE workerctl_observed
    ADD COLUMN IF NOT EXISTS desired_replicas INT NOT NULL DEFAULT 1,
    ADD COLUMN IF NOT EXISTS running_replicas INT NOT NULL DEFAULT 0;

UPDATE workerctl_observed
   SET running_replicas = 1
 WHERE container_state = 'running' AND running_replicas = 0;
