-- What workerctl last observed of each worker's container, for the CLI and
-- the status page. workerctl's own table: user_workers is left as it is.
--
-- No foreign key to user_workers: a worker row can be deleted by hand while
-- its container still runs, and that observation must still be recordable.

CREATE TABLE IF NOT EXISTS workerctl_observed (
    worker_id        UUID PRIMARY KEY,
    running_revision INT NULL,
    container        TEXT NULL,
    container_state  TEXT NOT NULL,
    restarts         INT NOT NULL DEFAULT 0,
    last_exit_code   BIGINT NULL,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
