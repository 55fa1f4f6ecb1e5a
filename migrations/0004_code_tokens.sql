-- The key of the tokens that authenticate code downloads. Each worker's
-- CODE_URL carries `?token=<t>`, t = first 32 hex digits of
-- sha256(key || ':' || worker id): only the worker's own container knows it,
-- so the code endpoint serves a worker's code to that worker alone. Made once
-- per database, so tokens (and the containers that carry them) survive a
-- restart of workerctl.
CREATE TABLE IF NOT EXISTS workerctl_code_key (
    only_row BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
    value    TEXT NOT NULL
);

INSERT INTO workerctl_code_key (value)
SELECT replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '')
ON CONFLICT (only_row) DO NOTHING;

-- The token of one worker; NULL if the key is missing.
CREATE OR REPLACE FUNCTION workerctl_code_token(worker UUID) RETURNS TEXT
LANGUAGE sql STABLE AS $$
    SELECT left(encode(sha256(convert_to(value || ':' || worker::text, 'UTF8')), 'hex'), 32)
      FROM workerctl_code_key
$$;
