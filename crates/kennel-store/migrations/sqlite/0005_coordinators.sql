-- Several coordinators may share one database (PostgreSQL); the same tables exist here so the
-- store behaves the same on both. Which coordinator holds a daemon's link:
ALTER TABLE daemons ADD COLUMN coordinator_id TEXT;

-- Each coordinator's liveness: seen_at moves forward while it runs.
CREATE TABLE coordinators (
    id         TEXT PRIMARY KEY,
    started_at INTEGER NOT NULL,
    seen_at    INTEGER NOT NULL
);

-- Work one coordinator at a time does (rescuing a dead coordinator's daemons): held by
-- `holder` until `until`, renewed while it runs.
CREATE TABLE leases (
    name   TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until  INTEGER NOT NULL
);
