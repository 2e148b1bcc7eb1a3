//! The daemon's durable outbox: every task-scoped message is numbered and stored here before
//! it is sent, and stays until the upstream acknowledges it. After a reconnect, or a restart
//! of the daemon, whatever is unacknowledged is replayed in order; the upstream applies each
//! seq once, so nothing is lost and nothing is applied twice.
//!
//! It also remembers which attempts this daemon holds (so a restarted daemon can re-attach
//! them, flush their messages and report what happened to their processes). It does not send
//! anything itself; the link does.

use std::path::Path;
use std::sync::Mutex;

use kennel_proto::link::TaskRef;
use kennel_proto::DaemonMessage;
use kennel_sqlite::{MigrateError, Options, Schema};
use rusqlite::{params, Connection, OptionalExtension};

/// Why the outbox failed. The daemon cannot promise delivery without it, so callers treat
/// this as fatal for the message at hand and say so.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("failed to open the outbox at {path}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    /// The file is from a newer kennel, or a migration failed; the cause says which.
    #[error("failed to bring the outbox at {path} up to date")]
    Migrate {
        path: String,
        #[source]
        source: MigrateError,
    },
    #[error("outbox database error")]
    Db(#[from] rusqlite::Error),
}

/// A stored, numbered message waiting for its ack.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub task_id: String,
    pub attempt: u32,
    pub seq: u64,
    pub frame: String,
}

/// What the outbox knows about an attempt this daemon holds.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldAttempt {
    pub task_id: String,
    pub attempt: u32,
    /// The agent's process group while it runs; kept so a restarted daemon can kill leftovers.
    pub pgid: Option<i32>,
    /// The agent finished (its `taskComplete` may still be unacknowledged).
    pub finished: bool,
}

pub struct Outbox {
    conn: Mutex<Connection>,
}

/// The outbox's migrations (see `kennel_sqlite::Schema`). Migration 1 is the schema outboxes were
/// created with before they kept a version; its `IF NOT EXISTS` lets it run over such a file.
const MIGRATIONS: &[&str] = &["
CREATE TABLE IF NOT EXISTS outbox (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    frame   TEXT NOT NULL,
    UNIQUE (task_id, attempt, seq)
);
CREATE TABLE IF NOT EXISTS attempts (
    task_id  TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    next_seq INTEGER NOT NULL DEFAULT 1,
    pgid     INTEGER,
    finished INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (task_id, attempt)
);
"];

const SCHEMA: Schema = Schema {
    name: "outbox",
    migrations: MIGRATIONS,
    unversioned: None,
};

impl Outbox {
    /// Opens (creating) the outbox database and brings its schema up to date; kennel's SQLite
    /// settings (WAL, `synchronous=NORMAL`) keep every committed message across a `kill -9`
    /// of the daemon.
    pub fn open(path: &Path) -> Result<Self, OutboxError> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let mut conn =
            kennel_sqlite::open(path, &Options::DEFAULT).map_err(|source| OutboxError::Open {
                path: path.display().to_string(),
                source,
            })?;
        kennel_sqlite::migrate(&mut conn, &SCHEMA).map_err(|source| OutboxError::Migrate {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Outbox {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // The connection holds no invariant a panicking holder could break mid-way: every
        // change is one transaction.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts holding an attempt (its seqs count from 1).
    pub fn hold(&self, task_id: &str, attempt: u32) -> Result<(), OutboxError> {
        self.conn().execute(
            "INSERT OR IGNORE INTO attempts (task_id, attempt) VALUES (?1, ?2)",
            params![task_id, attempt],
        )?;
        Ok(())
    }

    /// Numbers and stores the message `make(seq)` builds; returns it ready to send.
    pub fn push(
        &self,
        task_id: &str,
        attempt: u32,
        make: impl FnOnce(u64) -> DaemonMessage,
    ) -> Result<Pending, OutboxError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT OR IGNORE INTO attempts (task_id, attempt) VALUES (?1, ?2)",
            params![task_id, attempt],
        )?;
        let seq: u64 = tx.query_row(
            "UPDATE attempts SET next_seq = next_seq + 1 WHERE task_id = ?1 AND attempt = ?2 \
             RETURNING next_seq - 1",
            params![task_id, attempt],
            |r| r.get(0),
        )?;
        let frame = make(seq).to_json();
        tx.execute(
            "INSERT INTO outbox (task_id, attempt, seq, frame) VALUES (?1, ?2, ?3, ?4)",
            params![task_id, attempt, seq, frame],
        )?;
        tx.commit()?;
        Ok(Pending {
            task_id: task_id.to_string(),
            attempt,
            seq,
            frame,
        })
    }

    /// Drops messages of (task, attempt) up to `seq`. A finished attempt with nothing left
    /// to deliver is forgotten.
    pub fn ack(&self, task_id: &str, attempt: u32, seq: u64) -> Result<(), OutboxError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM outbox WHERE task_id = ?1 AND attempt = ?2 AND seq <= ?3",
            params![task_id, attempt, seq],
        )?;
        forget_if_done(&tx, task_id, attempt)?;
        tx.commit()?;
        Ok(())
    }

    /// Forgets an attempt and its undelivered messages (the upstream refused it as stale).
    pub fn drop_attempt(&self, task_id: &str, attempt: u32) -> Result<(), OutboxError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM outbox WHERE task_id = ?1 AND attempt = ?2",
            params![task_id, attempt],
        )?;
        tx.execute(
            "DELETE FROM attempts WHERE task_id = ?1 AND attempt = ?2",
            params![task_id, attempt],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Every unacknowledged message, in the order it was produced.
    pub fn pending(&self) -> Result<Vec<Pending>, OutboxError> {
        self.pending_where("1 = 1", params![])
    }

    /// Unacknowledged messages of one attempt from `from_seq` on (after a `seqGap`).
    pub fn pending_from(
        &self,
        task_id: &str,
        attempt: u32,
        from_seq: u64,
    ) -> Result<Vec<Pending>, OutboxError> {
        self.pending_where(
            "task_id = ?1 AND attempt = ?2 AND seq >= ?3",
            params![task_id, attempt, from_seq],
        )
    }

    fn pending_where(
        &self,
        filter: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<Pending>, OutboxError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT task_id, attempt, seq, frame FROM outbox WHERE {filter} ORDER BY id"
        ))?;
        let rows = stmt.query_map(args, |r| {
            Ok(Pending {
                task_id: r.get(0)?,
                attempt: r.get(1)?,
                seq: r.get(2)?,
                frame: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Number of unacknowledged messages.
    pub fn depth(&self) -> Result<u64, OutboxError> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?)
    }

    pub fn set_pgid(&self, task_id: &str, attempt: u32, pgid: i32) -> Result<(), OutboxError> {
        self.conn().execute(
            "UPDATE attempts SET pgid = ?3 WHERE task_id = ?1 AND attempt = ?2",
            params![task_id, attempt, pgid],
        )?;
        Ok(())
    }

    /// The agent of this attempt is done; the attempt is forgotten once delivered.
    pub fn finish(&self, task_id: &str, attempt: u32) -> Result<(), OutboxError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE attempts SET finished = 1, pgid = NULL WHERE task_id = ?1 AND attempt = ?2",
            params![task_id, attempt],
        )?;
        forget_if_done(&tx, task_id, attempt)?;
        tx.commit()?;
        Ok(())
    }

    /// Attempts still held: running, or finished with messages to deliver.
    pub fn held(&self) -> Result<Vec<HeldAttempt>, OutboxError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT task_id, attempt, pgid, finished FROM attempts ORDER BY task_id, attempt",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(HeldAttempt {
                task_id: r.get(0)?,
                attempt: r.get(1)?,
                pgid: r.get(2)?,
                finished: r.get::<_, i64>(3)? != 0,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Held attempts as `authenticate.runningTasks` lists them.
    pub fn running_tasks(&self) -> Result<Vec<TaskRef>, OutboxError> {
        Ok(self
            .held()?
            .into_iter()
            .map(|h| TaskRef {
                task_id: h.task_id,
                attempt: h.attempt,
            })
            .collect())
    }

    /// The next seq of an attempt (for tests and status).
    pub fn next_seq(&self, task_id: &str, attempt: u32) -> Result<Option<u64>, OutboxError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT next_seq FROM attempts WHERE task_id = ?1 AND attempt = ?2",
                params![task_id, attempt],
                |r| r.get(0),
            )
            .optional()?)
    }
}

fn forget_if_done(
    tx: &rusqlite::Transaction<'_>,
    task_id: &str,
    attempt: u32,
) -> Result<(), rusqlite::Error> {
    tx.execute(
        "DELETE FROM attempts WHERE task_id = ?1 AND attempt = ?2 AND finished = 1 \
         AND NOT EXISTS (SELECT 1 FROM outbox WHERE task_id = ?1 AND attempt = ?2)",
        params![task_id, attempt],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kennel_proto::link::{OutputStream, TaskOutput};

    fn line(task: &str, attempt: u32, seq: u64, text: &str) -> DaemonMessage {
        DaemonMessage::TaskOutput(TaskOutput {
            task_id: task.into(),
            attempt,
            seq,
            stream: OutputStream::Stdout,
            output: text.into(),
            is_partial: false,
        })
    }

    #[test]
    fn numbers_persists_acks_and_forgets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        {
            let ob = Outbox::open(&path).unwrap();
            ob.hold("t1", 1).unwrap();
            for text in ["a", "b", "c"] {
                ob.push("t1", 1, |seq| line("t1", 1, seq, text)).unwrap();
            }
            ob.push("t2", 1, |seq| line("t2", 1, seq, "x")).unwrap();
            ob.ack("t1", 1, 1).unwrap();
        }
        // Reopened after a crash: the unacked messages are still there, in order.
        let ob = Outbox::open(&path).unwrap();
        let p = ob.pending().unwrap();
        let got: Vec<_> = p.iter().map(|p| (p.task_id.as_str(), p.seq)).collect();
        assert_eq!(got, vec![("t1", 2), ("t1", 3), ("t2", 1)]);
        assert!(p[0].frame.contains("\"seq\":2") && p[0].frame.contains("\"b\""));
        assert_eq!(ob.next_seq("t1", 1).unwrap(), Some(4));
        assert_eq!(ob.pending_from("t1", 1, 3).unwrap().len(), 1);
        assert_eq!(ob.running_tasks().unwrap().len(), 2);

        ob.finish("t1", 1).unwrap();
        assert_eq!(
            ob.held().unwrap().len(),
            2,
            "t1 still has messages to deliver"
        );
        ob.ack("t1", 1, 3).unwrap();
        let held: Vec<_> = ob.held().unwrap().into_iter().map(|h| h.task_id).collect();
        assert_eq!(held, vec!["t2"], "t1 is done and delivered");
        ob.drop_attempt("t2", 1).unwrap();
        assert_eq!(ob.depth().unwrap(), 0);
        assert!(ob.held().unwrap().is_empty());
    }

    /// The outbox schema as daemons created it before the outbox kept a version, verbatim.
    const UNVERSIONED_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS outbox (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    frame   TEXT NOT NULL,
    UNIQUE (task_id, attempt, seq)
);
CREATE TABLE IF NOT EXISTS attempts (
    task_id  TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    next_seq INTEGER NOT NULL DEFAULT 1,
    pgid     INTEGER,
    finished INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (task_id, attempt)
);
";

    #[test]
    fn an_outbox_written_before_it_kept_a_version_is_adopted_with_its_messages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let frame = line("t1", 1, 1, "before the upgrade").to_json();
        {
            // The open code of that time, and a daemon that pushed one message and then died.
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "journal_mode", "WAL").unwrap();
            conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
            conn.busy_timeout(std::time::Duration::from_secs(5))
                .unwrap();
            conn.execute_batch(UNVERSIONED_SCHEMA).unwrap();
            conn.execute(
                "INSERT INTO attempts (task_id, attempt, next_seq, pgid) VALUES ('t1', 1, 2, 4242)",
                [],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO outbox (task_id, attempt, seq, frame) VALUES ('t1', 1, 1, ?1)",
                params![frame],
            )
            .unwrap();
        }

        let ob = Outbox::open(&path).unwrap();
        assert_eq!(
            ob.pending().unwrap(),
            vec![Pending {
                task_id: "t1".into(),
                attempt: 1,
                seq: 1,
                frame,
            }]
        );
        assert_eq!(
            ob.held().unwrap(),
            vec![HeldAttempt {
                task_id: "t1".into(),
                attempt: 1,
                pgid: Some(4242),
                finished: false,
            }]
        );
        assert_eq!(
            ob.push("t1", 1, |seq| line("t1", 1, seq, "after"))
                .unwrap()
                .seq,
            2
        );
        assert_eq!(kennel_sqlite::version(&ob.conn()).unwrap(), 1);
        drop(ob);
        // Reopening a current outbox changes nothing.
        let ob = Outbox::open(&path).unwrap();
        assert_eq!(ob.depth().unwrap(), 2);
        assert_eq!(kennel_sqlite::version(&ob.conn()).unwrap(), 1);
    }

    #[test]
    fn an_outbox_from_a_newer_kennel_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 2)
            .unwrap();
        let err = match Outbox::open(&path) {
            Err(e) => e,
            Ok(_) => panic!("a newer outbox opened"),
        };
        assert!(
            matches!(
                err,
                OutboxError::Migrate {
                    source: MigrateError::TooNew { found: 2, known: 1 },
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
}
