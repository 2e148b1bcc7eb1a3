//! The relay's own durable state in `relay.db` (SQLite, WAL): task history (received,
//! dispatched, completed, failed — with daemon and times), which attempt each daemon holds,
//! the queue of tasks no daemon could take yet, daemon messages not yet acknowledged upstream
//! that arrived or were pending while the upstream link was down, and the connection log (the last 200 entries). It survives `kill -9`; it sends nothing.

use std::path::Path;

use kennel_proto::link::SpawnTask;
use kennel_sqlite::{MigrateError, Options, Schema};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

/// Entries kept in the connection log.
pub const LOG_KEEP: i64 = 200;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(
        "failed to open the relay database at {path} (check that the data directory is writable)"
    )]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("failed to create the data directory {path}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is from a newer kennel, or a migration failed; the cause says which.
    #[error("failed to bring the relay database at {path} up to date")]
    Migrate {
        path: String,
        #[source]
        source: MigrateError,
    },
    #[error("relay database error")]
    Db(#[from] rusqlite::Error),
}

/// The relay's migrations (see `kennel_sqlite::Schema`). Relays used to create `relay.db`
/// without a version: migration 1 is the first relay's schema and migration 2 the table added
/// when history pruning came; their `IF NOT EXISTS` lets them run over such a file.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE IF NOT EXISTS tasks (
    task_id       TEXT NOT NULL,
    attempt       INTEGER NOT NULL,
    name          TEXT NOT NULL,
    agent         TEXT NOT NULL,
    status        TEXT NOT NULL,
    daemon        TEXT,
    last_seq      INTEGER NOT NULL DEFAULT 0, -- no longer written; kept for older relay.db files
    received_ms   INTEGER NOT NULL,
    dispatched_ms INTEGER,
    finished_ms   INTEGER,
    error         TEXT,
    spawn         TEXT NOT NULL,
    PRIMARY KEY (task_id, attempt)
);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks(status);
CREATE TABLE IF NOT EXISTS buffer (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    frame   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS buffer_attempt ON buffer(task_id, attempt, seq);
CREATE TABLE IF NOT EXISTS log (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    kind  TEXT NOT NULL,
    message TEXT NOT NULL
);
",
    // Counts of pruned history rows, so `counts` keeps including them.
    "
CREATE TABLE IF NOT EXISTS totals (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
",
];

const SCHEMA: Schema = Schema {
    name: "relay",
    migrations: MIGRATIONS,
    unversioned: None,
};

/// One attempt of a task, as `GET /tasks` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptRecord {
    pub attempt: u32,
    /// `queued`, `dispatched`, `running`, `completed`, `failed`, `rejected`, `lost` or `stale`.
    pub status: String,
    /// Machine id of the downstream daemon that got it.
    pub daemon: Option<String>,
    pub received_ms: i64,
    pub dispatched_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub error: Option<String>,
}

/// One task, as a row of `GET /tasks`: the state of its latest attempt, flattened into the
/// row, and every attempt of it this relay received (newest first; pruned ones are gone).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRecord {
    pub task_id: String,
    pub name: String,
    pub agent: String,
    #[serde(flatten)]
    pub latest: AttemptRecord,
    /// How many attempts of the task this relay holds in its history (`attempts.len()`).
    pub attempt_count: u32,
    pub attempts: Vec<AttemptRecord>,
}

/// One connection-log entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LogEntry {
    pub at_ms: i64,
    /// `connect`, `disconnect` or `error`.
    pub kind: String,
    pub message: String,
}

/// An attempt a downstream daemon holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub task_id: String,
    pub attempt: u32,
    pub daemon: String,
}

pub struct History {
    conn: Connection,
}

impl History {
    pub fn open(dir: &Path) -> Result<Self, HistoryError> {
        std::fs::create_dir_all(dir).map_err(|source| HistoryError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let path = dir.join("relay.db");
        let mut conn =
            kennel_sqlite::open(&path, &Options::DEFAULT).map_err(|source| HistoryError::Open {
                path: path.display().to_string(),
                source,
            })?;
        kennel_sqlite::migrate(&mut conn, &SCHEMA).map_err(|source| HistoryError::Migrate {
            path: path.display().to_string(),
            source,
        })?;
        Ok(History { conn })
    }

    /// Records a `spawnTask` as received and queued. A repeat of the same attempt is ignored;
    /// returns whether it was new.
    pub fn received(&self, s: &SpawnTask, frame: &str, now: i64) -> Result<bool, HistoryError> {
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO tasks (task_id, attempt, name, agent, status, received_ms, spawn)
             VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6)",
            params![s.task_id, s.attempt, s.task_name, s.agent, now, frame],
        )?;
        Ok(n == 1)
    }

    pub fn dispatched(
        &self,
        task_id: &str,
        attempt: u32,
        daemon: &str,
        now: i64,
    ) -> Result<(), HistoryError> {
        self.conn.execute(
            "UPDATE tasks SET status = 'dispatched', daemon = ?3, dispatched_ms = ?4
             WHERE task_id = ?1 AND attempt = ?2",
            params![task_id, attempt, daemon, now],
        )?;
        Ok(())
    }

    /// Sets a status; `finished` also stamps the end time.
    pub fn set_status(
        &self,
        task_id: &str,
        attempt: u32,
        status: &str,
        error: Option<&str>,
        finished: Option<i64>,
    ) -> Result<(), HistoryError> {
        self.conn.execute(
            "UPDATE tasks SET status = ?3, error = COALESCE(?4, error),
                 finished_ms = COALESCE(?5, finished_ms)
             WHERE task_id = ?1 AND attempt = ?2",
            params![task_id, attempt, status, error, finished],
        )?;
        Ok(())
    }

    /// Ends every open attempt of `task_id` older than `attempt` (the upstream moved on).
    pub fn supersede(&self, task_id: &str, attempt: u32, now: i64) -> Result<(), HistoryError> {
        self.conn.execute(
            "UPDATE tasks SET status = 'stale', finished_ms = ?3
             WHERE task_id = ?1 AND attempt < ?2 AND status IN ('queued', 'dispatched', 'running')",
            params![task_id, attempt, now],
        )?;
        Ok(())
    }

    /// Queued `spawnTask` frames, oldest first.
    pub fn queued(&self) -> Result<Vec<String>, HistoryError> {
        let mut st = self.conn.prepare(
            "SELECT spawn FROM tasks WHERE status = 'queued' ORDER BY received_ms, rowid",
        )?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Attempts downstream daemons hold.
    pub fn held(&self) -> Result<Vec<Held>, HistoryError> {
        let mut st = self.conn.prepare(
            "SELECT task_id, attempt, daemon FROM tasks
             WHERE status IN ('dispatched', 'running') AND daemon IS NOT NULL",
        )?;
        let rows = st.query_map([], |r| {
            Ok(Held {
                task_id: r.get(0)?,
                attempt: r.get(1)?,
                daemon: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The daemon an attempt was given to, if any.
    pub fn daemon_of(&self, task_id: &str, attempt: u32) -> Result<Option<String>, HistoryError> {
        Ok(self
            .conn
            .query_row(
                "SELECT daemon FROM tasks WHERE task_id = ?1 AND attempt = ?2",
                params![task_id, attempt],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?
            .flatten())
    }

    /// Stores daemon messages (task, attempt, seq, frame) in one transaction.
    pub fn buffer_all(&self, items: &[(&str, u32, u64, &str)]) -> Result<(), HistoryError> {
        let tx = self.conn.unchecked_transaction()?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO buffer (task_id, attempt, seq, frame) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (task_id, attempt, seq, frame) in items {
                ins.execute(params![task_id, attempt, *seq as i64, frame])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Drops what cumulative acks (task, attempt, seq) cover, in one transaction. Returns how many rows went.
    pub fn acked_all(&self, acks: &[(String, u32, u64)]) -> Result<u64, HistoryError> {
        let tx = self.conn.unchecked_transaction()?;
        let mut n = 0;
        {
            let mut del = tx.prepare_cached(
                "DELETE FROM buffer WHERE task_id = ?1 AND attempt = ?2 AND seq <= ?3",
            )?;
            for (task_id, attempt, seq) in acks {
                n += del.execute(params![task_id, attempt, *seq as i64])? as u64;
            }
        }
        tx.commit()?;
        Ok(n)
    }

    /// Drops one buffered message of (task, attempt) by its seq. Returns how many rows went.
    pub fn drop_seq(&self, task_id: &str, attempt: u32, seq: u64) -> Result<u64, HistoryError> {
        Ok(self.conn.execute(
            "DELETE FROM buffer WHERE task_id = ?1 AND attempt = ?2 AND seq = ?3",
            params![task_id, attempt, seq as i64],
        )? as u64)
    }

    /// The upstream refused the attempt: its messages will never be applied.
    pub fn drop_attempt(&self, task_id: &str, attempt: u32) -> Result<u64, HistoryError> {
        Ok(self.conn.execute(
            "DELETE FROM buffer WHERE task_id = ?1 AND attempt = ?2",
            params![task_id, attempt],
        )? as u64)
    }

    /// Every unacknowledged message, in the order it arrived.
    pub fn buffered(&self) -> Result<Vec<String>, HistoryError> {
        let mut st = self.conn.prepare("SELECT frame FROM buffer ORDER BY id")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every (task, attempt) with a message in the buffer.
    pub fn buffered_attempts(&self) -> Result<Vec<(String, u32)>, HistoryError> {
        let mut st = self
            .conn
            .prepare("SELECT DISTINCT task_id, attempt FROM buffer")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u32)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn buffered_count(&self) -> Result<u64, HistoryError> {
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM buffer", [], |r| r.get::<_, i64>(0))?
            as u64)
    }

    /// A page of tasks, the one whose latest attempt arrived last first, each with all its
    /// attempts. `limit` and `offset` count tasks, not attempts.
    pub fn tasks(&self, limit: u32, offset: u32) -> Result<Vec<TaskRecord>, HistoryError> {
        let mut st = self.conn.prepare(
            "WITH page AS (
                 SELECT task_id, MAX(received_ms) AS last_ms, MAX(rowid) AS last_row
                 FROM tasks GROUP BY task_id
                 ORDER BY last_ms DESC, last_row DESC LIMIT ?1 OFFSET ?2
             )
             SELECT t.task_id, t.name, t.agent, t.attempt, t.status, t.daemon, t.received_ms,
                    t.dispatched_ms, t.finished_ms, t.error
             FROM tasks t JOIN page p ON p.task_id = t.task_id
             ORDER BY p.last_ms DESC, p.last_row DESC, t.attempt DESC",
        )?;
        let rows = st.query_map(params![limit, offset], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                AttemptRecord {
                    attempt: r.get(3)?,
                    status: r.get(4)?,
                    daemon: r.get(5)?,
                    received_ms: r.get(6)?,
                    dispatched_ms: r.get(7)?,
                    finished_ms: r.get(8)?,
                    error: r.get(9)?,
                },
            ))
        })?;
        let mut tasks: Vec<TaskRecord> = Vec::new();
        for row in rows {
            let (task_id, name, agent, attempt) = row?;
            // Rows come grouped by task, its newest attempt first.
            match tasks.last_mut().filter(|t| t.task_id == task_id) {
                Some(t) => {
                    t.attempt_count += 1;
                    t.attempts.push(attempt);
                }
                None => tasks.push(TaskRecord {
                    task_id,
                    name,
                    agent,
                    latest: attempt.clone(),
                    attempt_count: 1,
                    attempts: vec![attempt],
                }),
            }
        }
        Ok(tasks)
    }

    /// Fails when the database cannot be read (for `/health`).
    pub fn check(&self) -> Result<(), HistoryError> {
        self.conn
            .query_row("SELECT 1 FROM tasks LIMIT 1", [], |_| Ok(()))
            .optional()?;
        Ok(())
    }

    /// (received, processed): every attempt ever recorded and those that completed or
    /// failed, counting the ones pruned since.
    pub fn counts(&self) -> Result<(u64, u64), HistoryError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) + COALESCE((SELECT value FROM totals WHERE name = 'pruned_received'), 0),
                    COALESCE(SUM(status IN ('completed', 'failed')), 0)
                    + COALESCE((SELECT value FROM totals WHERE name = 'pruned_processed'), 0)
             FROM tasks",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    /// Deletes history rows of attempts that ended before `before_ms` (the totals keep
    /// counting them). Returns how many went.
    pub fn prune(&self, before_ms: i64) -> Result<u64, HistoryError> {
        const ENDED: &str =
            "status IN ('completed', 'failed', 'rejected', 'lost', 'stale', 'cancelled')
             AND finished_ms IS NOT NULL AND finished_ms < ?1";
        let tx = self.conn.unchecked_transaction()?;
        let (n, done): (i64, i64) = tx.query_row(
            &format!(
                "SELECT COUNT(*), COALESCE(SUM(status IN ('completed', 'failed')), 0)
                 FROM tasks WHERE {ENDED}"
            ),
            params![before_ms],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if n > 0 {
            let mut add = tx.prepare_cached(
                "INSERT INTO totals (name, value) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            )?;
            add.execute(params!["pruned_received", n])?;
            add.execute(params!["pruned_processed", done])?;
            drop(add);
            tx.execute(
                &format!("DELETE FROM tasks WHERE {ENDED}"),
                params![before_ms],
            )?;
        }
        tx.commit()?;
        Ok(n as u64)
    }

    pub fn log(&self, kind: &str, message: &str, now: i64) -> Result<(), HistoryError> {
        self.conn.execute(
            "INSERT INTO log (at_ms, kind, message) VALUES (?1, ?2, ?3)",
            params![now, kind, message],
        )?;
        self.conn.execute(
            "DELETE FROM log WHERE id <= (SELECT MAX(id) FROM log) - ?1",
            params![LOG_KEEP],
        )?;
        Ok(())
    }

    /// The newest `limit` log entries, newest first.
    pub fn logs(&self, limit: u32) -> Result<Vec<LogEntry>, HistoryError> {
        let mut st = self
            .conn
            .prepare("SELECT at_ms, kind, message FROM log ORDER BY id DESC LIMIT ?1")?;
        let rows = st.query_map(params![limit], |r| {
            Ok(LogEntry {
                at_ms: r.get(0)?,
                kind: r.get(1)?,
                message: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn(id: &str, attempt: u32) -> SpawnTask {
        SpawnTask {
            task_id: id.into(),
            attempt,
            task_name: id.into(),
            prompt: "p".into(),
            repo: None,
            agent: "command".into(),
            env: Default::default(),
            limits: Default::default(),
            session: None,
        }
    }

    #[test]
    fn history_queue_and_buffer_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let h = History::open(dir.path()).unwrap();
            assert!(h.received(&spawn("t1", 1), "{\"a\":1}", 1).unwrap());
            assert!(!h.received(&spawn("t1", 1), "{\"a\":1}", 2).unwrap());
            assert!(h.received(&spawn("t2", 1), "{\"b\":1}", 3).unwrap());
            h.dispatched("t1", 1, "m1", 4).unwrap();
            h.buffer_all(&[("t1", 1, 1, "f1"), ("t1", 1, 2, "f2")])
                .unwrap();
            h.acked_all(&[("t1".into(), 1, 1)]).unwrap();
            for i in 0..250 {
                h.log("connect", &format!("n{i}"), i).unwrap();
            }
        }
        let h = History::open(dir.path()).unwrap();
        assert_eq!(h.queued().unwrap(), vec!["{\"b\":1}".to_string()]);
        assert_eq!(
            h.held().unwrap(),
            vec![Held {
                task_id: "t1".into(),
                attempt: 1,
                daemon: "m1".into(),
            }]
        );
        assert_eq!(h.buffered().unwrap(), vec!["f2".to_string()]);
        let logs = h.logs(500).unwrap();
        assert_eq!(logs.len(), 200);
        assert_eq!(logs[0].message, "n249");
        assert_eq!(h.tasks(1, 1).unwrap()[0].task_id, "t1");
    }

    #[test]
    fn pruning_drops_only_old_ended_attempts_and_keeps_the_totals() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::open(dir.path()).unwrap();
        for (id, status, finished) in [
            ("old-done", "completed", Some(10)),
            ("old-lost", "lost", Some(20)),
            ("new-done", "completed", Some(1_000)),
            ("running", "running", None),
        ] {
            assert!(h.received(&spawn(id, 1), "{}", 1).unwrap());
            h.set_status(id, 1, status, None, finished).unwrap();
        }
        assert_eq!(h.counts().unwrap(), (4, 2));
        assert_eq!(h.prune(500).unwrap(), 2);
        let left: Vec<String> = h
            .tasks(10, 0)
            .unwrap()
            .into_iter()
            .map(|t| t.task_id)
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left.contains(&"running".to_string()) && left.contains(&"new-done".to_string()));
        assert_eq!(h.counts().unwrap(), (4, 2), "totals survive pruning");
        assert_eq!(h.prune(500).unwrap(), 0);
    }

    #[test]
    fn tasks_are_listed_once_with_their_attempts_and_paged_by_task() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::open(dir.path()).unwrap();
        // a: attempt 1 lost, attempt 2 (received last of all) completed; b, c: one attempt each.
        assert!(h.received(&spawn("a", 1), "{}", 10).unwrap());
        h.dispatched("a", 1, "m1", 11).unwrap();
        h.set_status("a", 1, "lost", Some("gone"), Some(12))
            .unwrap();
        assert!(h.received(&spawn("b", 1), "{}", 20).unwrap());
        assert!(h.received(&spawn("c", 1), "{}", 30).unwrap());
        assert!(h.received(&spawn("a", 2), "{}", 40).unwrap());
        h.dispatched("a", 2, "m2", 41).unwrap();
        h.set_status("a", 2, "completed", None, Some(42)).unwrap();

        let all = h.tasks(10, 0).unwrap();
        let order: Vec<&str> = all.iter().map(|t| t.task_id.as_str()).collect();
        assert_eq!(order, vec!["a", "c", "b"], "by latest attempt received");
        let a = &all[0];
        assert_eq!(
            (
                a.latest.attempt,
                a.latest.status.as_str(),
                a.latest.daemon.as_deref()
            ),
            (2, "completed", Some("m2"))
        );
        assert_eq!(a.attempt_count, 2);
        let attempts: Vec<(u32, &str, Option<&str>)> = a
            .attempts
            .iter()
            .map(|x| (x.attempt, x.status.as_str(), x.error.as_deref()))
            .collect();
        assert_eq!(
            attempts,
            vec![(2, "completed", None), (1, "lost", Some("gone"))]
        );
        assert_eq!(
            (all[1].attempt_count, all[1].latest.status.as_str()),
            (1, "queued")
        );

        // `limit` and `offset` count tasks, not attempts.
        let page: Vec<(String, u32)> = h
            .tasks(2, 1)
            .unwrap()
            .into_iter()
            .map(|t| (t.task_id, t.attempt_count))
            .collect();
        assert_eq!(page, vec![("c".to_string(), 1), ("b".to_string(), 1)]);
        assert_eq!(h.tasks(1, 0).unwrap()[0].attempt_count, 2);
        assert!(h.tasks(5, 3).unwrap().is_empty());

        // The row's JSON: the latest attempt flattened, every attempt nested.
        let row = serde_json::to_value(&all[0]).unwrap();
        assert_eq!(row["status"], "completed");
        assert_eq!(row["attempt"], 2);
        assert_eq!(row["attemptCount"], 2);
        assert_eq!(row["attempts"][1]["status"], "lost");
        assert!(row.get("latest").is_none(), "{row}");
    }

    #[test]
    fn the_health_check_fails_when_the_database_cannot_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::open(dir.path()).unwrap();
        h.check().unwrap();
        h.conn.execute_batch("DROP TABLE tasks").unwrap();
        assert!(h.check().is_err());
    }

    /// `relay.db` as the first relay created it (no version, no `totals`), verbatim.
    const FIRST_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tasks (
    task_id       TEXT NOT NULL,
    attempt       INTEGER NOT NULL,
    name          TEXT NOT NULL,
    agent         TEXT NOT NULL,
    status        TEXT NOT NULL,
    daemon        TEXT,
    last_seq      INTEGER NOT NULL DEFAULT 0,
    received_ms   INTEGER NOT NULL,
    dispatched_ms INTEGER,
    finished_ms   INTEGER,
    error         TEXT,
    spawn         TEXT NOT NULL,
    PRIMARY KEY (task_id, attempt)
);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks(status);
CREATE TABLE IF NOT EXISTS buffer (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    frame   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS buffer_attempt ON buffer(task_id, attempt, seq);
CREATE TABLE IF NOT EXISTS log (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    kind  TEXT NOT NULL,
    message TEXT NOT NULL
);
";

    /// `relay.db` as relays created it since pruning came (no version), verbatim.
    const PRUNING_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tasks (
    task_id       TEXT NOT NULL,
    attempt       INTEGER NOT NULL,
    name          TEXT NOT NULL,
    agent         TEXT NOT NULL,
    status        TEXT NOT NULL,
    daemon        TEXT,
    last_seq      INTEGER NOT NULL DEFAULT 0, -- no longer written; kept for older relay.db files
    received_ms   INTEGER NOT NULL,
    dispatched_ms INTEGER,
    finished_ms   INTEGER,
    error         TEXT,
    spawn         TEXT NOT NULL,
    PRIMARY KEY (task_id, attempt)
);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks(status);
CREATE TABLE IF NOT EXISTS buffer (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    frame   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS buffer_attempt ON buffer(task_id, attempt, seq);
CREATE TABLE IF NOT EXISTS totals (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS log (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    kind  TEXT NOT NULL,
    message TEXT NOT NULL
);
";

    /// Writes `relay.db` in `dir` with the open code relays used before `relay.db` kept a
    /// version: one dispatched task with a buffered report, one log entry, and `extra`.
    fn write_unversioned(dir: &Path, schema: &str, extra: &str) {
        let c = Connection::open(dir.join("relay.db")).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.pragma_update(None, "synchronous", "NORMAL").unwrap();
        c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        c.execute_batch(schema).unwrap();
        c.execute_batch(
            "INSERT INTO tasks (task_id, attempt, name, agent, status, daemon, received_ms,
                                dispatched_ms, spawn)
             VALUES ('t-old', 1, 'old task', 'command', 'dispatched', 'm1', 10, 11, '{}');
             INSERT INTO buffer (task_id, attempt, seq, frame) VALUES ('t-old', 1, 1, 'f-old');
             INSERT INTO log (at_ms, kind, message) VALUES (12, 'connect', 'old link');",
        )
        .unwrap();
        c.execute_batch(extra).unwrap();
    }

    fn assert_old_rows_kept(h: &History) {
        assert_eq!(
            h.held().unwrap(),
            vec![Held {
                task_id: "t-old".into(),
                attempt: 1,
                daemon: "m1".into(),
            }]
        );
        assert_eq!(h.buffered().unwrap(), vec!["f-old".to_string()]);
        assert_eq!(h.logs(10).unwrap()[0].message, "old link");
        assert_eq!(kennel_sqlite::version(&h.conn).unwrap(), 2);
    }

    #[test]
    fn a_relay_db_of_the_first_relay_is_upgraded_with_its_history() {
        let dir = tempfile::tempdir().unwrap();
        write_unversioned(dir.path(), FIRST_SCHEMA, "");
        let h = History::open(dir.path()).unwrap();
        assert_old_rows_kept(&h);
        // Migration 2 made `totals`: pruning works and keeps counting.
        h.set_status("t-old", 1, "completed", None, Some(20))
            .unwrap();
        assert_eq!(h.prune(100).unwrap(), 1);
        assert_eq!(h.counts().unwrap(), (1, 1));
    }

    #[test]
    fn a_relay_db_written_before_it_kept_a_version_is_adopted_with_its_history() {
        let dir = tempfile::tempdir().unwrap();
        write_unversioned(
            dir.path(),
            PRUNING_SCHEMA,
            "INSERT INTO totals (name, value) VALUES ('pruned_received', 5), ('pruned_processed', 4);",
        );
        let h = History::open(dir.path()).unwrap();
        assert_old_rows_kept(&h);
        assert_eq!(h.counts().unwrap(), (6, 4), "pruned totals kept");
        drop(h);
        // Reopening a current file changes nothing.
        let h = History::open(dir.path()).unwrap();
        assert_old_rows_kept(&h);
    }

    #[test]
    fn a_relay_db_from_a_newer_kennel_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Connection::open(dir.path().join("relay.db"))
            .unwrap()
            .pragma_update(None, "user_version", 3)
            .unwrap();
        let err = match History::open(dir.path()) {
            Err(e) => e,
            Ok(_) => panic!("a newer relay.db opened"),
        };
        assert!(
            matches!(
                err,
                HistoryError::Migrate {
                    source: MigrateError::TooNew { found: 3, known: 2 },
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("relay.db"), "{err}");
    }
}
