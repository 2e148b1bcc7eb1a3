-- kennel schema v1 (SQLite). Times are milliseconds since the Unix epoch, UTC.

CREATE TABLE tasks (
    seq           INTEGER PRIMARY KEY,        -- creation order: FIFO and list cursors
    id            TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL,
    prompt        TEXT NOT NULL,
    repo_url      TEXT,
    base_branch   TEXT,
    agent         TEXT NOT NULL,
    labels        TEXT NOT NULL,              -- JSON object
    priority      INTEGER NOT NULL,
    env           TEXT NOT NULL,              -- JSON object
    timeout_secs  INTEGER,
    max_attempts  INTEGER NOT NULL,
    status        TEXT NOT NULL,
    attempt       INTEGER NOT NULL DEFAULT 0,
    daemon_id     TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    finished_at   INTEGER,
    error         TEXT,
    exit_code     INTEGER,
    branch        TEXT,
    commit_sha    TEXT
);
CREATE INDEX tasks_status ON tasks (status, seq);
CREATE INDEX tasks_daemon ON tasks (daemon_id, seq);

CREATE TABLE attempts (
    task_id       TEXT NOT NULL,
    attempt       INTEGER NOT NULL,
    daemon_id     TEXT NOT NULL,
    status        TEXT NOT NULL,
    last_seq      INTEGER NOT NULL DEFAULT 0, -- highest daemon seq applied (exactly-once)
    dispatched_at INTEGER NOT NULL,
    started_at    INTEGER,
    finished_at   INTEGER,
    error         TEXT,
    PRIMARY KEY (task_id, attempt)
) WITHOUT ROWID;

CREATE TABLE task_output (
    task_id    TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    stream     TEXT NOT NULL,
    output     TEXT NOT NULL,
    is_partial INTEGER NOT NULL,
    at         INTEGER NOT NULL,
    PRIMARY KEY (task_id, attempt, seq)
) WITHOUT ROWID;

CREATE TABLE daemons (
    id                   TEXT PRIMARY KEY,
    machine_id           TEXT NOT NULL UNIQUE,
    hostname             TEXT NOT NULL,
    max_concurrent_tasks INTEGER NOT NULL,
    labels               TEXT NOT NULL,
    agents               TEXT NOT NULL,
    version              TEXT NOT NULL,
    protocol_version     INTEGER NOT NULL,
    draining             INTEGER NOT NULL DEFAULT 0,
    connected            INTEGER NOT NULL DEFAULT 0,
    connected_at         INTEGER,
    last_seen_at         INTEGER
);

CREATE TABLE daemon_sessions (
    id              INTEGER PRIMARY KEY,
    daemon_id       TEXT NOT NULL,
    remote_addr     TEXT,
    connected_at    INTEGER NOT NULL,
    disconnected_at INTEGER,
    reason          TEXT
);

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,            -- public prefix
    name         TEXT NOT NULL,
    hash         BLOB NOT NULL,               -- HMAC-SHA256(server secret, key)
    scopes       TEXT NOT NULL,               -- JSON array
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked_at   INTEGER
);

CREATE TABLE events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    kind      TEXT NOT NULL,
    task_id   TEXT,
    daemon_id TEXT,
    data      TEXT NOT NULL,
    at        INTEGER NOT NULL
);
