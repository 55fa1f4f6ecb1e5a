-- The worker table of SensorBucket's user worker service (CONTRACT.md §1).
--
-- On an empty database this creates it. On a database where that service
-- already created it, nothing is recreated, renamed or redefined (older
-- databases call tenant_id `organisation`, and some columns there have no
-- default): only a column workerctl reads and that is missing is added, each
-- with a default so that existing rows stay valid.
--
-- Applied migrations are checksummed: change behaviour in a new file, never here.

CREATE TABLE IF NOT EXISTS user_workers (
    id          UUID PRIMARY KEY,
    name        VARCHAR NOT NULL,
    description VARCHAR NOT NULL DEFAULT '',
    state       VARCHAR NOT NULL DEFAULT 'disabled',
    language    VARCHAR NOT NULL DEFAULT 'python',
    tenant_id   BIGINT,
    revision    INT NOT NULL DEFAULT 1,
    status      VARCHAR NOT NULL DEFAULT 'unknown',
    status_info TEXT NOT NULL DEFAULT '',
    source      BYTEA,
    entrypoint  VARCHAR NOT NULL DEFAULT 'main.main'
);

-- tenant_id is not here: workerctl never reads it, and adding it beside an
-- `organisation` column would leave two owners per row.
ALTER TABLE user_workers
    ADD COLUMN IF NOT EXISTS name        VARCHAR NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS state       VARCHAR NOT NULL DEFAULT 'disabled',
    ADD COLUMN IF NOT EXISTS language    VARCHAR NOT NULL DEFAULT 'python',
    ADD COLUMN IF NOT EXISTS revision    INT NOT NULL DEFAULT 1,
    ADD COLUMN IF NOT EXISTS status      VARCHAR NOT NULL DEFAULT 'unknown',
    ADD COLUMN IF NOT EXISTS status_info TEXT NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS source      BYTEA,
    ADD COLUMN IF NOT EXISTS entrypoint  VARCHAR NOT NULL DEFAULT 'main.main';
