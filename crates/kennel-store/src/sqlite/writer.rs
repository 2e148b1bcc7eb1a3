//! The store's one writer: a dedicated OS thread that owns the only read-write connection and
//! runs every write as a job sent over a channel.
//!
//! **Group commit.** The thread blocks for a job, then takes every job already queued (up to
//! [`MAX_GROUP`]) and runs them all in one transaction, each inside its own savepoint so a
//! failing job rolls back only its own changes and gets its own error. One commit then covers
//! the whole group, and only after it do the callers get their answers: **an answer means
//! committed**, so whatever a caller publishes after it survives a `kill -9`. Under load many
//! callers share one commit; alone, a call costs one transaction as before.
//!
//! Jobs must not block on anything but SQLite: every other write waits behind them.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc};

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::wal_flusher::WalFlusher;
use crate::{Result, StoreError};

/// Most jobs committed together; bounds the time the first of them waits for its answer.
const MAX_GROUP: usize = 512;

/// Handle to the writer thread; cloning shares the thread. The thread ends when every handle
/// is gone and the queued jobs are done.
#[derive(Clone)]
pub(super) struct Writer {
    jobs: mpsc::Sender<Box<dyn Job>>,
}

impl Writer {
    /// Starts the writer thread on `conn`, already migrated; it pokes `flusher` after its
    /// commits.
    pub(super) fn start(conn: Connection, flusher: WalFlusher) -> std::io::Result<Writer> {
        let (jobs, queue) = mpsc::channel();
        std::thread::Builder::new()
            .name("kennel-store-writer".into())
            .spawn(move || run(&conn, &queue, &flusher))?;
        Ok(Writer { jobs })
    }

    /// Runs `work` in the writer's transaction; returns once its changes are committed (or
    /// with the error that undid them).
    pub(super) async fn call<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Box::new(Call { work, reply }))
            .map_err(|_| StoreError::WriterStopped)?;
        answer.await.map_err(|_| StoreError::WriterStopped)?
    }
}

/// One queued call, type-erased so calls of any result type share the queue.
trait Job: Send {
    /// The caller stopped waiting (its future was dropped): skip the work.
    fn abandoned(&self) -> bool;
    /// Does the work inside the open transaction.
    fn run(self: Box<Self>, conn: &Connection) -> Ran;
    /// Answers without running: the group's transaction could not be used.
    fn refuse(self: Box<Self>, cause: &Arc<rusqlite::Error>);
}

/// A job that ran, holding its answer until the group's fate is known.
struct Ran {
    ok: bool,
    answer: Box<dyn Answer>,
}

trait Answer: Send {
    /// Sends the job's own result, or `lost` when the group was rolled back.
    fn send(self: Box<Self>, lost: Option<&Arc<rusqlite::Error>>);
}

struct Call<T, F> {
    work: F,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> Job for Call<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T> + Send + 'static,
{
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    fn run(self: Box<Self>, conn: &Connection) -> Ran {
        let Call { work, reply } = *self;
        // A panicking job must not take the writer (and every later write) down with it; its
        // savepoint is rolled back like any failed job's.
        let result = catch_unwind(AssertUnwindSafe(|| work(conn)))
            .unwrap_or_else(|panic| Err(StoreError::Aborted(panic_message(&*panic))));
        Ran {
            ok: result.is_ok(),
            answer: Box::new(Reply { result, reply }),
        }
    }

    fn refuse(self: Box<Self>, cause: &Arc<rusqlite::Error>) {
        let _ = self.reply.send(Err(StoreError::Commit(cause.clone())));
    }
}

struct Reply<T> {
    result: Result<T>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T: Send> Answer for Reply<T> {
    fn send(self: Box<Self>, lost: Option<&Arc<rusqlite::Error>>) {
        let result = match lost {
            Some(cause) => Err(StoreError::Commit(cause.clone())),
            None => self.result,
        };
        // The caller may have stopped waiting; its work is committed all the same.
        let _ = self.reply.send(result);
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    let msg = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("the operation panicked: {msg}")
}

/// The writer thread: one group commit per wake-up until every handle is gone.
fn run(conn: &Connection, queue: &mpsc::Receiver<Box<dyn Job>>, flusher: &WalFlusher) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    let mut ran = Vec::with_capacity(MAX_GROUP);
    while let Ok(first) = queue.recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        commit_group(conn, &mut group, &mut ran);
        flusher.poke();
    }
    tracing::debug!("store writer stopped: every store handle is gone");
}

/// Runs `group` in one transaction and answers every job; leaves both vectors empty.
fn commit_group(conn: &Connection, group: &mut Vec<Box<dyn Job>>, ran: &mut Vec<Ran>) {
    group.retain(|job| !job.abandoned());
    if group.is_empty() {
        return;
    }
    if !conn.is_autocommit() {
        // A failed rollback left a transaction open; start from a clean state.
        let _ = exec(conn, "ROLLBACK");
    }
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE") {
        tracing::error!(error = %e, "failed to begin a store transaction");
        let cause = Arc::new(e);
        for job in group.drain(..) {
            job.refuse(&cause);
        }
        return;
    }
    // A lone job needs no savepoint: if it fails, the whole transaction is its own.
    let savepoints = group.len() > 1;
    let mut broken: Option<Arc<rusqlite::Error>> = None;
    for job in group.drain(..) {
        if let Some(cause) = &broken {
            job.refuse(cause);
            continue;
        }
        if savepoints {
            if let Err(e) = exec(conn, "SAVEPOINT job") {
                let cause = Arc::new(e);
                job.refuse(&cause);
                broken = Some(cause);
                continue;
            }
        }
        let done = job.run(conn);
        if savepoints {
            let end = if done.ok {
                exec(conn, "RELEASE job")
            } else {
                exec(conn, "ROLLBACK TO job").and_then(|()| exec(conn, "RELEASE job"))
            };
            // Fails when SQLite already rolled the whole transaction back (disk full, I/O
            // error): the jobs before this one are lost too.
            if let Err(e) = end {
                broken = Some(Arc::new(e));
            }
        }
        ran.push(done);
    }
    let lone_failure = !savepoints && ran.iter().any(|r| !r.ok);
    let lost = match broken {
        Some(cause) => {
            rollback(conn);
            Some(cause)
        }
        None if lone_failure => {
            rollback(conn);
            None
        }
        None => match exec(conn, "COMMIT") {
            Ok(()) => None,
            Err(e) => {
                rollback(conn);
                Some(Arc::new(e))
            }
        },
    };
    if let Some(cause) = &lost {
        tracing::error!(error = %cause, jobs = ran.len(), "a store transaction was rolled back");
    }
    for done in ran.drain(..) {
        done.answer.send(lost.as_ref());
    }
}

fn exec(conn: &Connection, sql: &str) -> Result<(), rusqlite::Error> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn rollback(conn: &Connection) {
    if !conn.is_autocommit() {
        if let Err(e) = exec(conn, "ROLLBACK") {
            tracing::error!(error = %e, "failed to roll back a store transaction");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer() -> (tempfile::TempDir, Writer) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.db");
        let conn = super::super::schema::open_writer(&path).expect("open");
        conn.execute_batch("CREATE TABLE t (v INTEGER NOT NULL UNIQUE)")
            .expect("table");
        let flusher = WalFlusher::start(path).expect("start flusher");
        (dir, Writer::start(conn, flusher).expect("start"))
    }

    fn insert(v: i64) -> impl FnOnce(&Connection) -> Result<()> + Send + 'static {
        move |c: &Connection| {
            c.execute("INSERT INTO t (v) VALUES (?1)", [v])?;
            Ok(())
        }
    }

    async fn values(w: &Writer) -> Vec<i64> {
        w.call(|c| {
            let mut st = c.prepare("SELECT v FROM t ORDER BY v")?;
            let rows = st.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<Result<Vec<i64>, _>>()?)
        })
        .await
        .expect("select")
    }

    #[tokio::test]
    async fn a_failing_job_in_a_group_rolls_back_only_itself() {
        let (_dir, w) = writer();
        w.call(insert(1)).await.expect("seed");
        // Hold the writer inside a job until three more are queued, so they form one group.
        let (entered_tx, entered) = oneshot::channel();
        let (open_gate, gate) = mpsc::channel::<()>();
        let held = tokio::spawn({
            let w = w.clone();
            async move {
                w.call(move |_| {
                    let _ = entered_tx.send(());
                    let _ = gate.recv();
                    Ok(())
                })
                .await
            }
        });
        entered.await.expect("writer entered the gate job");
        // `join!` polls every branch once in order: the three jobs are queued before the gate
        // opens.
        let (a, b, c, ()) = tokio::join!(
            w.call(insert(2)),
            w.call(insert(1)),
            w.call(insert(3)),
            async {
                let _ = open_gate.send(());
            }
        );
        assert!(held.await.expect("join").is_ok());
        assert!(a.is_ok());
        assert!(matches!(b, Err(StoreError::Database(_))), "{b:?}");
        assert!(c.is_ok());
        assert_eq!(values(&w).await, vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn a_lone_failing_job_leaves_nothing_behind() {
        let (_dir, w) = writer();
        let r = w
            .call(|c| {
                c.execute("INSERT INTO t (v) VALUES (7)", [])?;
                c.execute("INSERT INTO t (v) VALUES (7)", [])?;
                Ok(())
            })
            .await;
        assert!(r.is_err());
        assert_eq!(values(&w).await, Vec::<i64>::new());
    }

    #[tokio::test]
    async fn a_panicking_job_is_an_error_and_the_writer_carries_on() {
        let (_dir, w) = writer();
        let (p, ok) = tokio::join!(
            w.call(|c| -> Result<()> {
                c.execute("INSERT INTO t (v) VALUES (5)", [])?;
                panic!("boom")
            }),
            w.call(insert(6)),
        );
        assert!(matches!(p, Err(StoreError::Aborted(ref m)) if m.contains("boom")));
        assert!(ok.is_ok());
        assert_eq!(values(&w).await, vec![6]);
    }
}
