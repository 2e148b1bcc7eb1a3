-- The LLM gateway's state (`kennel gateway`): per-upstream health, totals and the takeover
-- flags as key → JSON text, the newest heartbeats from local agents, and incidents. The
-- gateway keeps it in memory and writes changes here; it reads it back at start.
CREATE TABLE gateway_kv (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE gateway_heartbeats (
    id   INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL
);

CREATE TABLE gateway_incidents (
    id   INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL
);
