-- Long-lived agents (the lifecycle manager): spawn policies with every version they had and
-- the reconciler's state of each, the agent registry, messages between agents, and commands
-- to agents. The PostgreSQL schema has the same tables and columns (its migration 3): the
-- store's operations on them are written once for both.

CREATE TABLE policies (
    name       TEXT PRIMARY KEY,
    version    INTEGER NOT NULL,
    doc        TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);

-- Every version of every policy; `doc` is NULL for the version that deleted it.
CREATE TABLE policy_history (
    name    TEXT NOT NULL,
    version INTEGER NOT NULL,
    doc     TEXT,
    at      INTEGER NOT NULL,
    PRIMARY KEY (name, version)
);

-- The reconciler's state of each policy (JSON), kept until its agent is stopped for good.
CREATE TABLE policy_states (
    name       TEXT PRIMARY KEY,
    status     TEXT NOT NULL,
    state      TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);

-- `key_id`: the API key that registered the agent (none for one a policy spawned); only that
-- key may register it again or act as it.
CREATE TABLE agents (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    machine          TEXT NOT NULL,
    daemon_id        TEXT,
    policy           TEXT,
    spawn_request_id TEXT,
    label            TEXT,
    tags             TEXT NOT NULL,
    capabilities     TEXT NOT NULL,
    channels         TEXT NOT NULL,
    instance_id      TEXT NOT NULL,
    epoch            INTEGER NOT NULL,
    online           INTEGER NOT NULL,
    registered_at    INTEGER NOT NULL,
    last_seen_at     INTEGER NOT NULL,
    last_active_at   INTEGER NOT NULL,
    offline_reason   TEXT,
    key_id           TEXT
);

CREATE TABLE messages (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    sender           TEXT NOT NULL,
    recipient        TEXT NOT NULL,
    kind             TEXT NOT NULL,
    subject          TEXT,
    body             TEXT NOT NULL,
    payload          TEXT,
    idempotency_key  TEXT,
    claimable        INTEGER NOT NULL,
    state            TEXT NOT NULL,
    claimed_by       TEXT,
    claim_expires_at INTEGER,
    delivered_to     TEXT,
    reply_to         TEXT,
    created_at       INTEGER NOT NULL,
    expires_at       INTEGER,
    delivered_at     INTEGER,
    read_at          INTEGER,
    UNIQUE (sender, idempotency_key)
);
CREATE INDEX messages_recipient ON messages (recipient, seq);
CREATE INDEX messages_open ON messages (expires_at) WHERE state IN ('queued', 'delivered');
CREATE INDEX messages_claimed ON messages (claim_expires_at) WHERE claimed_by IS NOT NULL;

CREATE TABLE commands (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    policy      TEXT,
    target      TEXT NOT NULL,
    args        TEXT NOT NULL,
    state       TEXT NOT NULL,
    error       TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    deadline_at INTEGER NOT NULL
);
CREATE INDEX commands_open ON commands (deadline_at) WHERE state IN ('requested', 'delivered', 'running');

-- A task that is a long-lived agent's session: its policy and agent id (JSON), sent to the
-- daemon with the task.
ALTER TABLE tasks ADD COLUMN session TEXT;

-- One-time join tokens for build agents: exchanged once, before they expire, for an agent key.
-- `hash` is the keyed hash of the token (hex); the token itself is never stored.
CREATE TABLE join_tokens (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    hash       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER,
    key_id     TEXT
);
