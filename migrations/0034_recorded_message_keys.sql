-- A recorded message a worker runtime recorded itself (README, "Recording")
-- carries the key its runtime gave it (a per-process id and a sequence
-- number): the daemon's taker and a read of the tap may both store the same
-- batch, and the key makes the second insert do nothing. A copy taken by
-- the broker has none (it is matched against the table's tail instead).
-- workerctl's own table (migrations/0032). Re-runnable.

ALTER TABLE workerctl_recorded_messages ADD COLUMN IF NOT EXISTS record_key TEXT NULL;

CREATE UNIQUE INDEX IF NOT EXISTS workerctl_recorded_messages_by_key
    ON workerctl_recorded_messages (worker_id, record_key)
    WHERE record_key IS NOT NULL;
