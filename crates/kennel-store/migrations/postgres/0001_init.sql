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
-- (`Last-Event-ID`, on any coordinator) never skips one. A plain sequence would not do: ids
-- are taken in one order and committed in another. Every transaction that writes events
-- takes its ids from `event_ids` as its last statement; the row lock it holds until it
-- commits makes the next writer wait, so ids are handed out, and become visible, in commit
-- order. Rolled-back ids are handed out again: ids have no gaps.
CREATE TABLE events (
    id        BIGINT PRIMARY KEY,
    kind      TEXT NOT NULL,
    task_id   TEXT,
    daemon_id TEXT,
    data      TEXT NOT NULL,
    at        BIGINT NOT NULL
);

CREATE TABLE event_ids (
    one  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    last BIGINT NOT NULL
);
INSERT INTO event_ids (last) VALUES (0);

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
