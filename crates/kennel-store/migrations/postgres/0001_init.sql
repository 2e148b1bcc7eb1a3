-- kennel schema v1 (PostgreSQL): the tables of SQLite's migrations 1 to 5, with the same names,
-- columns and status texts. Times are milliseconds since the Unix epoch, UTC; every integer is
-- BIGINT and JSON is stored as text, as in SQLite, so both backends decode rows the same way.
-- Tables are created in the first schema of the connection's search_path.

CREATE TABLE tasks (
    seq               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, -- creation order: FIFO and list cursors
    id                TEXT NOT NULL UNIQUE,
    name              TEXT NOT NULL,
    prompt            TEXT NOT NULL,
    repo_url          TEXT,
    base_branch       TEXT,
    agent             TEXT NOT NULL,
    labels            TEXT NOT NULL,              -- JSON object
    priority          BIGINT NOT NULL,
    env               TEXT NOT NULL,              -- JSON object
    timeout_secs      BIGINT,
    max_attempts      BIGINT NOT NULL,
    status            TEXT NOT NULL,
    attempt           BIGINT NOT NULL DEFAULT 0,
    daemon_id         TEXT,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    finished_at       BIGINT,
    error             TEXT,
    exit_code         BIGINT,
    branch            TEXT,
    commit_sha        TEXT,
    -- Attempts that ended without being the task's fault; `attempt - returned_attempts` is
    -- what counts against `max_attempts`.
    returned_attempts BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX tasks_status ON tasks (status, seq);
CREATE INDEX tasks_daemon ON tasks (daemon_id, seq);

CREATE TABLE attempts (
    task_id       TEXT NOT NULL,
    attempt       BIGINT NOT NULL,
    daemon_id     TEXT NOT NULL,
    status        TEXT NOT NULL,
    last_seq      BIGINT NOT NULL DEFAULT 0, -- highest daemon seq applied (exactly-once)
    dispatched_at BIGINT NOT NULL,
    started_at    BIGINT,
    finished_at   BIGINT,
    error         TEXT,
    PRIMARY KEY (task_id, attempt)
);

CREATE TABLE task_output (
    task_id    TEXT NOT NULL,
    attempt    BIGINT NOT NULL,
    seq        BIGINT NOT NULL,
    stream     TEXT NOT NULL,
    output     TEXT NOT NULL,
    is_partial BOOLEAN NOT NULL,
    at         BIGINT NOT NULL,
    PRIMARY KEY (task_id, attempt, seq)
);

CREATE TABLE daemons (
    id                   TEXT PRIMARY KEY,
    machine_id           TEXT NOT NULL UNIQUE,
    hostname             TEXT NOT NULL,
    max_concurrent_tasks BIGINT NOT NULL,
    labels               TEXT NOT NULL,
    agents               TEXT NOT NULL,
    version              TEXT NOT NULL,
    protocol_version     BIGINT NOT NULL,
    draining             BOOLEAN NOT NULL DEFAULT FALSE,
    connected            BOOLEAN NOT NULL DEFAULT FALSE,
    connected_at         BIGINT,
    last_seen_at         BIGINT,
    -- The API key this machine id is bound to (the first daemon- or relay-scoped key).
    key_id               TEXT,
    -- The coordinator holding the daemon's link.
    coordinator_id       TEXT
);

CREATE TABLE daemon_sessions (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    daemon_id       TEXT NOT NULL,
    remote_addr     TEXT,
    connected_at    BIGINT NOT NULL,
    disconnected_at BIGINT,
    reason          TEXT
);
CREATE INDEX daemon_sessions_open ON daemon_sessions (daemon_id) WHERE disconnected_at IS NULL;

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,            -- public prefix
    name         TEXT NOT NULL,
    hash         BYTEA NOT NULL,              -- HMAC-SHA256(server secret, key)
    scopes       TEXT NOT NULL,               -- JSON array
    created_at   BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at   BIGINT
);

-- Event ids are global and become visible in id order, so a reader resuming after id n
-- (`Last-Event-ID`, on any coordinator) never skips one. Ids taken from a sequence while the
-- event is written would not do: transactions take ids in one order and commit in another.
-- So an event is written with its change but without an id (`seq` only orders what waits);
-- once committed it gets its id from `kennel_sequence_events`, which numbers every committed
-- event still without one, after the highest id given, under a lock held until it commits:
-- ids are handed out, and become visible, in order, and have no gaps. The writers' commits
-- stay concurrent; only the numbering, a batch at a time, is serial.
CREATE TABLE events (
    seq       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id        BIGINT UNIQUE,
    kind      TEXT NOT NULL,
    task_id   TEXT,
    daemon_id TEXT,
    data      TEXT NOT NULL,
    at        BIGINT NOT NULL
);
CREATE INDEX events_waiting ON events (seq) WHERE id IS NULL;

-- Numbers the committed events without an id (oldest `seq` first) and returns the ids of the
-- events `own` (by `seq`), numbered now or before. Each statement of a VOLATILE function sees
-- what committed before it started, so the events counted after the lock include every
-- earlier numbering. The lock is per schema: clusters in other schemas do not wait.
CREATE FUNCTION kennel_sequence_events(own BIGINT[])
RETURNS TABLE (event_seq BIGINT, event_id BIGINT)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    given BIGINT;
BEGIN
    -- "kevs" in ASCII; migrations lock "kenl".
    PERFORM pg_advisory_xact_lock(1801811571, hashtext(current_schema()));
    SELECT COALESCE(MAX(e.id), 0) INTO given FROM events e;
    UPDATE events e SET id = given + w.n
    FROM (SELECT e2.seq, row_number() OVER (ORDER BY e2.seq) AS n
          FROM events e2 WHERE e2.id IS NULL) AS w
    WHERE e.seq = w.seq;
    RETURN QUERY SELECT e.seq, e.id FROM events e WHERE e.seq = ANY (own);
END
$$;

-- The LLM gateway's state: key → JSON text, and its newest heartbeats and incidents.
CREATE TABLE gateway_kv (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE gateway_heartbeats (
    id   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    body TEXT NOT NULL
);

CREATE TABLE gateway_incidents (
    id   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    body TEXT NOT NULL
);

-- Each coordinator's liveness: seen_at moves forward while it runs.
CREATE TABLE coordinators (
    id         TEXT PRIMARY KEY,
    started_at BIGINT NOT NULL,
    seen_at    BIGINT NOT NULL
);

-- Work one coordinator at a time does: held by `holder` until `until`, renewed while it runs.
CREATE TABLE leases (
    name   TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until  BIGINT NOT NULL
);
