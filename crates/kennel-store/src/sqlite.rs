//! The embedded SQLite store: one file in WAL mode, one writer thread that owns the only
//! read-write connection (so writers never race for the lock), a small pool of read-only
//! connections that never block it, and a thread that flushes the WAL in the background so the
//! writer's checkpoints stay short (see [`wal_flusher`]).
//!
//! Writes are closures run by the writer thread with group commit (see [`writer`]): concurrent
//! callers share one transaction and one commit, each in its own savepoint, and a caller gets
//! its answer only once its changes are committed. A reply means committed: `kill -9` after it
//! loses nothing. This module holds the SQL; it must keep each trait method's effects in one
//! job, so they commit or roll back together with the events they write.

mod agents;
mod readers;
mod schema;
mod wal_flusher;
mod writer;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use kennel_proto::api::{ApiKey, Attempt, Daemon, Event, OutputChunk, Task};
use kennel_proto::TaskStatus;
use rusqlite::types::ToSql;
use rusqlite::{params, Connection, OptionalExtension, Row};

use self::readers::Readers;
use self::wal_flusher::WalFlusher;
use self::writer::Writer;
use crate::events::NewEvent;
use crate::machine::{
    self, AttemptFacts, Change, Chunk, Ending, Outcome, Step, TaskAfter, TaskFacts,
};
use crate::rows::{self, columns, daemon_select, to_json};
use crate::{
    millis_from_rfc3339, Applied, DaemonHello, Dispatch, EndAttempt, Ended, GatewayOp, GatewayRows,
    GatewayStore, KeyRecord, Millis, NewTask, QueuedTask, Report, Result, Revoke, Store,
    StoreError, TaskFilter,
};

/// SQLite implementation of [`Store`]. Cloning shares the writer thread and the read pool.
#[derive(Clone)]
pub struct SqliteStore {
    writer: Writer,
    readers: Arc<Readers>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file, runs migrations and starts the writer.
    pub async fn open(path: &Path) -> Result<Self> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || Self::open_blocking(&path))
            .await
            .map_err(|e| StoreError::Aborted(format!("opening the database failed: {e}")))?
    }

    fn open_blocking(path: &Path) -> Result<Self> {
        let open_err = |source: Box<dyn std::error::Error + Send + Sync>| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| open_err(e.into()))?;
            }
        }
        let mut conn = schema::open_writer(path).map_err(|e| open_err(e.into()))?;
        schema::migrate(&mut conn)?;
        let first_reader = schema::open_reader(path).map_err(|e| open_err(e.into()))?;
        let flusher = WalFlusher::start(path.to_path_buf()).map_err(|e| open_err(e.into()))?;
        let writer = Writer::start(conn, flusher).map_err(|e| open_err(e.into()))?;
        Ok(SqliteStore {
            writer,
            readers: Arc::new(Readers::new(path.to_path_buf(), first_reader)),
        })
    }

    /// Runs `work` on the writer, in a transaction shared with concurrent writes.
    async fn write<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.writer.call(work).await
    }

    /// Runs `work` on a read-only connection: sees everything committed before it starts.
    async fn read<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.readers.call(work).await
    }
}

rows::impl_columns!(Row<'_>, get);

/// Runs a cached statement and maps every row with `from_row`.
fn query_all<T>(
    conn: &Connection,
    sql: &str,
    args: &[&dyn ToSql],
    from_row: impl Fn(&Row<'_>) -> Result<T>,
) -> Result<Vec<T>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(args)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(from_row(row)?);
    }
    Ok(out)
}

/// Runs a statement returning `columns!(task)` rows and collects them.
fn query_tasks(conn: &Connection, sql: &str, args: &[&dyn ToSql]) -> Result<Vec<QueuedTask>> {
    query_all(conn, sql, args, |row| rows::task(row))
}

/// Runs a statement returning at most one `columns!(task)` row (a select by id or an
/// `UPDATE … RETURNING`).
fn query_task(conn: &Connection, sql: &str, args: &[&dyn ToSql]) -> Result<Option<Task>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(args)?;
    let task = match rows.next()? {
        Some(row) => Some(rows::task(row)?.task),
        None => None,
    };
    // Step to the end so an `UPDATE … RETURNING` is complete before the statement resets.
    while rows.next()?.is_some() {}
    Ok(task)
}

fn load_task(conn: &Connection, id: &str) -> Result<Option<Task>> {
    query_task(
        conn,
        concat!("SELECT ", columns!(task), " FROM tasks WHERE id = ?1"),
        &[&id],
    )
}

/// What the state machine needs to know about a task; `None` when there is no such task.
fn load_task_facts(conn: &Connection, id: &str) -> Result<Option<TaskFacts>> {
    let mut stmt = conn.prepare_cached(concat!(
        "SELECT ",
        columns!(task_facts),
        " FROM tasks WHERE id = ?1"
    ))?;
    let mut rows = stmt.query([id])?;
    let facts = match rows.next()? {
        Some(row) => Some(rows::task_facts(row, 0)?),
        None => None,
    };
    Ok(facts)
}

/// What the state machine needs to know about an attempt and its task; `None` when the task
/// has no such attempt.
fn load_attempt_facts(
    conn: &Connection,
    task_id: &str,
    attempt: u32,
) -> Result<Option<AttemptFacts>> {
    let mut stmt = conn.prepare_cached(concat!(
        "SELECT ",
        columns!(attempt_facts),
        " FROM attempts a JOIN tasks t ON t.id = a.task_id \
         WHERE a.task_id = ?1 AND a.attempt = ?2"
    ))?;
    let mut rows = stmt.query(params![task_id, attempt as i64])?;
    match rows.next()? {
        Some(row) => Ok(Some(rows::attempt_facts(row, 0)?)),
        None => Ok(None),
    }
}

/// Records a daemon's link as ended, with its event.
fn disconnect(conn: &Connection, daemon_id: &str, reason: &str, now: Millis) -> Result<Event> {
    conn.prepare_cached(
        "UPDATE daemons SET connected = 0, coordinator_id = NULL, last_seen_at = ?1 WHERE id = ?2",
    )?
    .execute(params![now, daemon_id])?;
    conn.prepare_cached(
        "UPDATE daemon_sessions SET disconnected_at = ?1, reason = ?2 \
         WHERE daemon_id = ?3 AND disconnected_at IS NULL",
    )?
    .execute(params![now, reason, daemon_id])?;
    insert_event(conn, NewEvent::daemon_disconnected(daemon_id, reason), now)
}

fn query_daemons(conn: &Connection, sql: &str, args: &[&dyn ToSql]) -> Result<Vec<Daemon>> {
    query_all(conn, sql, args, |row| rows::daemon(row))
}

fn load_daemon(conn: &Connection, id: &str) -> Result<Option<Daemon>> {
    Ok(query_daemons(conn, &daemon_select("WHERE d.id = ?1"), &[&id])?.pop())
}

const KEY_BY_ID: &str = concat!("SELECT ", columns!(key), " FROM api_keys WHERE id = ?1");

/// Revokes a key (keeping the time of an earlier revocation) and returns it.
const REVOKE_KEY: &str = concat!(
    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?1) WHERE id = ?2 RETURNING ",
    columns!(key)
);

fn query_keys(conn: &Connection, sql: &str, args: &[&dyn ToSql]) -> Result<Vec<KeyRecord>> {
    query_all(conn, sql, args, |row| rows::key(row))
}

/// Stores `event` at `now`.
fn insert_event(conn: &Connection, event: NewEvent, now: Millis) -> Result<Event> {
    conn.prepare_cached(
        "INSERT INTO events (kind, task_id, daemon_id, data, at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        event.kind,
        event.task_id,
        event.daemon_id,
        to_json(&event.data),
        now
    ])?;
    Ok(event.stored(conn.last_insert_rowid(), now))
}

fn task_status_event(conn: &Connection, task: &Task, now: Millis) -> Result<Event> {
    insert_event(conn, NewEvent::task_status(task), now)
}

/// Ends an attempt; see [`Store::end_attempt`].
fn end_attempt_tx(conn: &Connection, end: &EndAttempt<'_>, now: Millis) -> Result<Option<Ended>> {
    let Some(facts) = load_task_facts(conn, end.task_id)? else {
        return Ok(None);
    };
    let Some(ending) = machine::end_attempt(&facts, end) else {
        return Ok(None);
    };
    let Some(task) = write_ending(conn, end.task_id, end.attempt, &ending, now)? else {
        return Ok(None);
    };
    let ev = task_status_event(conn, &task, now)?;
    Ok(Some(Ended {
        task,
        events: vec![ev],
    }))
}

/// Writes how an attempt ended and what became of its task; returns the task after.
fn write_ending(
    conn: &Connection,
    task_id: &str,
    attempt: u32,
    ending: &Ending,
    now: Millis,
) -> Result<Option<Task>> {
    conn.prepare_cached(
        "UPDATE attempts SET status = ?1, finished_at = ?2, error = ?3 \
         WHERE task_id = ?4 AND attempt = ?5",
    )?
    .execute(params![
        ending.attempt.as_str(),
        now,
        ending.reason,
        task_id,
        attempt as i64
    ])?;
    if ending.returned {
        conn.prepare_cached(
            "UPDATE tasks SET returned_attempts = returned_attempts + 1 WHERE id = ?1",
        )?
        .execute(params![task_id])?;
    }
    match ending.task {
        TaskAfter::Requeued => query_task(
            conn,
            concat!(
                "UPDATE tasks SET status = ?1, daemon_id = NULL, updated_at = ?2, error = ?3 \
                 WHERE id = ?4 RETURNING ",
                columns!(task)
            ),
            &[&TaskStatus::Queued.as_str(), &now, &ending.error, &task_id],
        ),
        TaskAfter::Ended(status) => query_task(
            conn,
            concat!(
                "UPDATE tasks SET status = ?1, updated_at = ?2, finished_at = ?2, error = ?3 \
                 WHERE id = ?4 RETURNING ",
                columns!(task)
            ),
            &[&status.as_str(), &now, &ending.error, &task_id],
        ),
    }
}

/// Ends a task that is still queued (never dispatched, or requeued): cancelled or failed.
fn end_queued_tx(
    conn: &Connection,
    task_id: &str,
    status: TaskStatus,
    error: &str,
    now: Millis,
) -> Result<Option<Ended>> {
    let Some(facts) = load_task_facts(conn, task_id)? else {
        return Ok(None);
    };
    let Some(status) = machine::end_queued(&facts, status) else {
        return Ok(None);
    };
    let task = query_task(
        conn,
        concat!(
            "UPDATE tasks SET status = ?1, updated_at = ?2, finished_at = ?2, error = ?3 \
             WHERE id = ?4 RETURNING ",
            columns!(task)
        ),
        &[&status.as_str(), &now, &error, &task_id],
    )?;
    let Some(task) = task else {
        return Ok(None);
    };
    let ev = task_status_event(conn, &task, now)?;
    Ok(Some(Ended {
        task,
        events: vec![ev],
    }))
}

/// Applies one report: loads the attempt, asks [`machine::report`] and writes its verdict.
fn apply_one(conn: &Connection, r: &Report, now: Millis) -> Result<Applied> {
    let facts = load_attempt_facts(conn, &r.task_id, r.attempt)?;
    let change = match machine::report(facts.as_ref(), r).into_change(r) {
        Ok(change) => change,
        Err(answer) => return Ok(answer),
    };
    let changed = match change {
        Change::Seq => {
            record_seq(conn, r)?;
            None
        }
        Change::Output(chunk) => {
            record_seq(conn, r)?;
            insert_output(conn, r, &chunk, now)?;
            None
        }
        Change::Live { to, started } => set_live_status(conn, r, to, now, started)?,
        Change::End(ending) => {
            record_seq(conn, r)?;
            write_ending(conn, &r.task_id, r.attempt, &ending, now)?
        }
        Change::Finish { to, outcome } => finish(conn, r, to, &outcome, now)?,
    };
    let events = match &changed {
        Some(task) => vec![task_status_event(conn, task, now)?],
        None => Vec::new(),
    };
    Ok(Applied::Done {
        events,
        task: changed.map(Box::new),
    })
}

/// Records that the report's seq is applied (exactly-once).
fn record_seq(conn: &Connection, r: &Report) -> Result<()> {
    conn.prepare_cached("UPDATE attempts SET last_seq = ?1 WHERE task_id = ?2 AND attempt = ?3")?
        .execute(params![r.seq as i64, r.task_id, r.attempt as i64])?;
    Ok(())
}

/// Moves a live attempt and its task to `to` and records the report's seq; returns the task
/// after the change.
fn set_live_status(
    conn: &Connection,
    r: &Report,
    to: Step,
    now: Millis,
    started: bool,
) -> Result<Option<Task>> {
    let started_at = started.then_some(now);
    conn.prepare_cached(
        "UPDATE attempts SET last_seq = ?1, status = ?2, started_at = COALESCE(started_at, ?3) \
         WHERE task_id = ?4 AND attempt = ?5",
    )?
    .execute(params![
        r.seq as i64,
        to.attempt.as_str(),
        started_at,
        r.task_id,
        r.attempt as i64
    ])?;
    query_task(
        conn,
        concat!(
            "UPDATE tasks SET status = ?1, updated_at = ?2 WHERE id = ?3 RETURNING ",
            columns!(task)
        ),
        &[&to.task.as_str(), &now, &r.task_id],
    )
}

/// Ends the attempt and its task as the agent finished, records the report's seq and stores
/// what the agent reported; returns the task after the change.
fn finish(
    conn: &Connection,
    r: &Report,
    to: Step,
    outcome: &Outcome<'_>,
    now: Millis,
) -> Result<Option<Task>> {
    conn.prepare_cached(
        "UPDATE attempts SET last_seq = ?1, status = ?2, finished_at = ?3, error = ?4, \
         started_at = COALESCE(started_at, ?3) WHERE task_id = ?5 AND attempt = ?6",
    )?
    .execute(params![
        r.seq as i64,
        to.attempt.as_str(),
        now,
        outcome.error,
        r.task_id,
        r.attempt as i64
    ])?;
    query_task(
        conn,
        concat!(
            "UPDATE tasks SET status = ?1, updated_at = ?2, finished_at = ?2, \
             error = ?3, exit_code = ?4, branch = ?5, commit_sha = ?6 WHERE id = ?7 \
             RETURNING ",
            columns!(task)
        ),
        &[
            &to.task.as_str(),
            &now,
            &outcome.error,
            &outcome.exit_code,
            &outcome.branch,
            &outcome.commit,
            &r.task_id,
        ],
    )
}

/// Stores a chunk of output under the report's seq.
fn insert_output(conn: &Connection, r: &Report, chunk: &Chunk<'_>, now: Millis) -> Result<()> {
    let (stream, text, is_partial) = rows::stored_chunk(chunk);
    conn.prepare_cached(
        "INSERT INTO task_output (task_id, attempt, seq, stream, output, is_partial, at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        r.task_id,
        r.attempt as i64,
        r.seq as i64,
        stream.as_str(),
        text,
        is_partial,
        now
    ])?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> Result<()> {
        self.read(|conn| {
            conn.prepare_cached("SELECT 1")?
                .query_row([], |row| row.get::<_, i64>(0))?;
            Ok(())
        })
        .await
    }

    async fn create_task(&self, t: NewTask, now: Millis) -> Result<(QueuedTask, Event)> {
        let task = t.queued(now);
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO tasks (id, name, prompt, repo_url, base_branch, agent, labels, \
                 priority, env, timeout_secs, max_attempts, status, attempt, created_at, \
                 updated_at, session) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, \
                 ?12, 0, ?13, ?13, ?14)",
            )?
            .execute(params![
                task.id,
                task.name,
                task.prompt,
                task.repo.as_ref().map(|r| r.url.as_str()),
                task.repo.as_ref().map(|r| r.base_branch.as_str()),
                task.agent,
                to_json(&task.labels),
                task.priority,
                to_json(&task.env),
                task.timeout_secs.map(|v| v as i64),
                task.max_attempts as i64,
                task.status.as_str(),
                now,
                task.session.as_ref().map(to_json),
            ])?;
            // `seq` is the rowid.
            let order = conn.last_insert_rowid();
            let ev = insert_event(conn, NewEvent::task_created(&task), now)?;
            Ok((QueuedTask { order, task }, ev))
        })
        .await
    }

    async fn get_task(&self, id: &str) -> Result<Option<Task>> {
        let id = id.to_string();
        self.read(move |conn| load_task(conn, &id)).await
    }

    async fn list_tasks(&self, f: &TaskFilter) -> Result<Vec<QueuedTask>> {
        let f = f.clone();
        self.read(move |conn| {
            let mut sql = String::from(concat!("SELECT ", columns!(task), " FROM tasks WHERE 1=1"));
            let status = f.status.map(|s| s.as_str());
            let limit = f.limit as i64;
            let mut args: Vec<&dyn ToSql> = Vec::new();
            if let Some(s) = &status {
                sql.push_str(" AND status = ?");
                args.push(s);
            }
            if let Some(d) = &f.daemon_id {
                sql.push_str(" AND daemon_id = ?");
                args.push(d);
            }
            if let Some(b) = &f.before {
                sql.push_str(" AND seq < ?");
                args.push(b);
            }
            sql.push_str(" ORDER BY seq DESC LIMIT ?");
            args.push(&limit);
            query_tasks(conn, &sql, &args)
        })
        .await
    }

    async fn list_attempts(&self, task_id: &str) -> Result<Vec<Attempt>> {
        let task_id = task_id.to_string();
        self.read(move |conn| {
            let sql = concat!(
                "SELECT ",
                columns!(attempt),
                " FROM attempts WHERE task_id = ?1 ORDER BY attempt"
            );
            query_all(conn, sql, &[&task_id], |row| rows::attempt(row))
        })
        .await
    }

    async fn queued_tasks(&self) -> Result<Vec<QueuedTask>> {
        // On the writer: sees every write answered before, with no reader lag to reason about.
        self.write(|conn| {
            query_tasks(
                conn,
                concat!(
                    "SELECT ",
                    columns!(task),
                    " FROM tasks WHERE status = ?1 ORDER BY seq"
                ),
                &[&TaskStatus::Queued.as_str()],
            )
        })
        .await
    }

    async fn active_tasks(&self) -> Result<Vec<Task>> {
        self.write(|conn| {
            let tasks = query_tasks(conn, &rows::active_tasks_select(), &[])?;
            Ok(tasks.into_iter().map(|q| q.task).collect())
        })
        .await
    }

    async fn count_tasks(&self) -> Result<BTreeMap<TaskStatus, u64>> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT status, COUNT(*) FROM tasks GROUP BY status")?;
            let mut rows = stmt.query([])?;
            let mut out = BTreeMap::new();
            while let Some(row) = rows.next()? {
                let st: String = row.get(0)?;
                out.insert(rows::status(&st)?, row.get::<_, i64>(1)? as u64);
            }
            Ok(out)
        })
        .await
    }

    async fn dispatch(
        &self,
        batch: &[Dispatch],
        now: Millis,
    ) -> Result<Vec<Option<(Task, Event)>>> {
        let batch = batch.to_vec();
        self.write(move |conn| {
            let mut out = Vec::with_capacity(batch.len());
            for d in &batch {
                let facts = load_task_facts(conn, &d.task_id)?;
                let Some(to) = facts.and_then(|f| machine::dispatch(&f, d.attempt)) else {
                    out.push(None);
                    continue;
                };
                let attempt = d.attempt as i64;
                let task = query_task(
                    conn,
                    concat!(
                        "UPDATE tasks SET status = ?1, attempt = ?2, daemon_id = ?3, \
                         updated_at = ?4, error = NULL WHERE id = ?5 RETURNING ",
                        columns!(task)
                    ),
                    &[&to.task.as_str(), &attempt, &d.daemon_id, &now, &d.task_id],
                )?;
                let Some(task) = task else {
                    out.push(None);
                    continue;
                };
                conn.prepare_cached(
                    "INSERT INTO attempts (task_id, attempt, daemon_id, status, dispatched_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    d.task_id,
                    attempt,
                    d.daemon_id,
                    to.attempt.as_str(),
                    now
                ])?;
                let ev = task_status_event(conn, &task, now)?;
                out.push(Some((task, ev)));
            }
            Ok(out)
        })
        .await
    }

    async fn apply(&self, batch: &[Report], now: Millis) -> Result<Vec<Applied>> {
        let batch = batch.to_vec();
        self.write(move |conn| batch.iter().map(|r| apply_one(conn, r, now)).collect())
            .await
    }

    async fn end_attempt(&self, end: &EndAttempt<'_>, now: Millis) -> Result<Option<Ended>> {
        let task_id = end.task_id.to_string();
        let reason = end.reason.to_string();
        let (attempt, status, retry, terminal) = (end.attempt, end.status, end.retry, end.terminal);
        self.write(move |conn| {
            let end = EndAttempt {
                task_id: &task_id,
                attempt,
                status,
                reason: &reason,
                retry,
                terminal,
            };
            end_attempt_tx(conn, &end, now)
        })
        .await
    }

    async fn cancel_queued(&self, task_id: &str, now: Millis) -> Result<Option<Ended>> {
        let task_id = task_id.to_string();
        self.write(move |conn| {
            end_queued_tx(
                conn,
                &task_id,
                TaskStatus::Cancelled,
                "cancelled before it ran",
                now,
            )
        })
        .await
    }

    async fn fail_queued(&self, task_id: &str, reason: &str, now: Millis) -> Result<Option<Ended>> {
        let (task_id, reason) = (task_id.to_string(), reason.to_string());
        self.write(move |conn| end_queued_tx(conn, &task_id, TaskStatus::Failed, &reason, now))
            .await
    }

    async fn set_paused(
        &self,
        task_id: &str,
        attempt: u32,
        paused: bool,
        now: Millis,
    ) -> Result<Option<Ended>> {
        let task_id = task_id.to_string();
        self.write(move |conn| {
            let facts = load_task_facts(conn, &task_id)?;
            let Some(to) = facts.and_then(|f| machine::pause(&f, attempt, paused)) else {
                return Ok(None);
            };
            let task = query_task(
                conn,
                concat!(
                    "UPDATE tasks SET status = ?1, updated_at = ?2 WHERE id = ?3 RETURNING ",
                    columns!(task)
                ),
                &[&to.task.as_str(), &now, &task_id],
            )?;
            let Some(task) = task else {
                return Ok(None);
            };
            conn.prepare_cached(
                "UPDATE attempts SET status = ?1 WHERE task_id = ?2 AND attempt = ?3",
            )?
            .execute(params![to.attempt.as_str(), task_id, attempt as i64])?;
            let ev = task_status_event(conn, &task, now)?;
            Ok(Some(Ended {
                task,
                events: vec![ev],
            }))
        })
        .await
    }

    async fn task_output(
        &self,
        task_id: &str,
        attempt: u32,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<OutputChunk>> {
        let task_id = task_id.to_string();
        self.read(move |conn| {
            let sql = concat!(
                "SELECT ",
                columns!(output),
                " FROM task_output WHERE task_id = ?1 AND attempt = ?2 AND seq > ?3 \
                 ORDER BY seq LIMIT ?4"
            );
            let args: [&dyn ToSql; 4] = [
                &task_id,
                &(attempt as i64),
                &(after_seq as i64),
                &(limit as i64),
            ];
            query_all(conn, sql, &args, |row| rows::output(row, &task_id, attempt))
        })
        .await
    }

    async fn daemon_connected(
        &self,
        daemon_id: &str,
        h: &DaemonHello,
        now: Millis,
    ) -> Result<(Daemon, Event)> {
        let daemon_id = daemon_id.to_string();
        let h = h.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO daemons (id, machine_id, hostname, max_concurrent_tasks, labels, \
                 agents, version, protocol_version, connected, connected_at, last_seen_at, \
                 key_id) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 1, ?9, ?9, ?10) \
                 ON CONFLICT (id) DO UPDATE SET hostname = excluded.hostname, \
                 max_concurrent_tasks = excluded.max_concurrent_tasks, labels = excluded.labels, \
                 agents = excluded.agents, version = excluded.version, \
                 protocol_version = excluded.protocol_version, connected = 1, \
                 connected_at = excluded.connected_at, last_seen_at = excluded.last_seen_at, \
                 key_id = COALESCE(excluded.key_id, daemons.key_id)",
            )?
            .execute(params![
                daemon_id,
                h.machine_id,
                h.hostname,
                h.max_concurrent_tasks as i64,
                to_json(&h.labels),
                to_json(&h.agents),
                h.version,
                h.protocol_version as i64,
                now,
                h.key_id,
            ])?;
            conn.prepare_cached(
                "INSERT INTO daemon_sessions (daemon_id, remote_addr, connected_at) \
                 VALUES (?1, ?2, ?3)",
            )?
            .execute(params![daemon_id, h.remote_addr, now])?;
            let ev = insert_event(conn, NewEvent::daemon_connected(&daemon_id, &h), now)?;
            let daemon = load_daemon(conn, &daemon_id)?.ok_or_else(|| {
                StoreError::Corrupt(format!("daemon {daemon_id} vanished while it was stored"))
            })?;
            Ok((daemon, ev))
        })
        .await
    }

    async fn daemon_disconnected(
        &self,
        daemon_id: &str,
        reason: &str,
        now: Millis,
    ) -> Result<Event> {
        let daemon_id = daemon_id.to_string();
        let reason = reason.to_string();
        self.write(move |conn| disconnect(conn, &daemon_id, &reason, now))
            .await
    }

    async fn daemon_held_by(&self, daemon_id: &str, coordinator: &str) -> Result<()> {
        let (daemon_id, coordinator) = (daemon_id.to_string(), coordinator.to_string());
        self.write(move |conn| {
            conn.prepare_cached("UPDATE daemons SET coordinator_id = ?1 WHERE id = ?2")?
                .execute(params![coordinator, daemon_id])?;
            Ok(())
        })
        .await
    }

    async fn daemon_left(
        &self,
        daemon_id: &str,
        coordinator: &str,
        reason: &str,
        now: Millis,
    ) -> Result<Option<Event>> {
        let (daemon_id, coordinator) = (daemon_id.to_string(), coordinator.to_string());
        let reason = reason.to_string();
        self.write(move |conn| {
            let held: Option<Option<String>> = conn
                .prepare_cached("SELECT coordinator_id FROM daemons WHERE id = ?1")?
                .query_row(params![daemon_id], |r| r.get(0))
                .optional()?;
            match held {
                Some(Some(c)) if c != coordinator => return Ok(None),
                _ => {}
            }
            disconnect(conn, &daemon_id, &reason, now).map(Some)
        })
        .await
    }

    async fn coordinator_seen(&self, coordinator: &str, now: Millis) -> Result<()> {
        let coordinator = coordinator.to_string();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO coordinators (id, started_at, seen_at) VALUES (?1, ?2, ?2) \
                 ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
            )?
            .execute(params![coordinator, now])?;
            Ok(())
        })
        .await
    }

    async fn stranded_daemons(&self, before: Millis) -> Result<Vec<Daemon>> {
        self.read(move |conn| {
            let sql = daemon_select(
                "LEFT JOIN coordinators c ON c.id = d.coordinator_id \
                 WHERE d.connected = 1 AND COALESCE(d.connected_at, 0) < ?1 \
                 AND (c.id IS NULL OR c.seen_at < ?1) ORDER BY d.id",
            );
            query_daemons(conn, &sql, &[&before])
        })
        .await
    }

    async fn lease(&self, name: &str, holder: &str, now: Millis, ttl_ms: i64) -> Result<bool> {
        let (name, holder) = (name.to_string(), holder.to_string());
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "INSERT INTO leases (name, holder, until) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
                     until = excluded.until WHERE leases.holder = excluded.holder \
                     OR leases.until < ?4",
                )?
                .execute(params![name, holder, now.saturating_add(ttl_ms), now])?;
            Ok(n == 1)
        })
        .await
    }

    async fn daemon_seen(&self, daemon_id: &str, now: Millis) -> Result<()> {
        let daemon_id = daemon_id.to_string();
        self.write(move |conn| {
            conn.prepare_cached("UPDATE daemons SET last_seen_at = ?1 WHERE id = ?2")?
                .execute(params![now, daemon_id])?;
            Ok(())
        })
        .await
    }

    async fn set_draining(
        &self,
        daemon_id: &str,
        draining: bool,
        now: Millis,
    ) -> Result<Option<(Daemon, Event)>> {
        let daemon_id = daemon_id.to_string();
        self.write(move |conn| {
            let n = conn
                .prepare_cached("UPDATE daemons SET draining = ?1 WHERE id = ?2")?
                .execute(params![draining, daemon_id])?;
            if n == 0 {
                return Ok(None);
            }
            let ev = insert_event(conn, NewEvent::daemon_draining(&daemon_id, draining), now)?;
            let daemon = load_daemon(conn, &daemon_id)?.ok_or_else(|| {
                StoreError::Corrupt(format!("daemon {daemon_id} vanished while it was updated"))
            })?;
            Ok(Some((daemon, ev)))
        })
        .await
    }

    async fn get_daemon(&self, daemon_id: &str) -> Result<Option<Daemon>> {
        let daemon_id = daemon_id.to_string();
        self.read(move |conn| load_daemon(conn, &daemon_id)).await
    }

    async fn daemon_by_machine(&self, machine_id: &str) -> Result<Option<Daemon>> {
        let machine_id = machine_id.to_string();
        // On the writer: a daemon registered a moment ago must be found, not registered twice.
        self.write(move |conn| {
            Ok(query_daemons(
                conn,
                &daemon_select("WHERE d.machine_id = ?1"),
                &[&machine_id],
            )?
            .pop())
        })
        .await
    }

    async fn list_daemons(&self) -> Result<Vec<Daemon>> {
        self.read(|conn| query_daemons(conn, &daemon_select("ORDER BY d.hostname, d.id"), &[]))
            .await
    }

    async fn reset_connections(&self, now: Millis) -> Result<()> {
        self.write(move |conn| {
            conn.prepare_cached("UPDATE daemons SET connected = 0 WHERE connected = 1")?
                .execute([])?;
            conn.prepare_cached(
                "UPDATE daemon_sessions SET disconnected_at = ?1, \
                 reason = 'coordinator restarted' WHERE disconnected_at IS NULL",
            )?
            .execute([now])?;
            Ok(())
        })
        .await
    }

    async fn insert_key(&self, key: &KeyRecord) -> Result<()> {
        let key = key.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO api_keys (id, name, hash, scopes, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                key.info.id,
                key.info.name,
                key.hash,
                to_json(&key.info.scopes),
                millis_from_rfc3339(&key.info.created_at),
            ])?;
            Ok(())
        })
        .await
    }

    async fn find_key(&self, id: &str) -> Result<Option<KeyRecord>> {
        let id = id.to_string();
        self.read(move |conn| Ok(query_keys(conn, KEY_BY_ID, &[&id])?.pop()))
            .await
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>> {
        self.read(|conn| {
            let sql = concat!(
                "SELECT ",
                columns!(key),
                " FROM api_keys ORDER BY created_at, id"
            );
            let keys = query_keys(conn, sql, &[])?;
            Ok(keys.into_iter().map(|k| k.info).collect())
        })
        .await
    }

    async fn revoke_key(&self, id: &str, now: Millis) -> Result<Option<ApiKey>> {
        let id = id.to_string();
        self.write(move |conn| {
            let keys = query_keys(conn, REVOKE_KEY, &[&now, &id])?;
            Ok(keys.into_iter().next().map(|k| k.info))
        })
        .await
    }

    async fn revoke_key_keeping_an_admin(&self, id: &str, now: Millis) -> Result<Revoke> {
        let id = id.to_string();
        self.write(move |conn| {
            let Some(key) = query_keys(conn, KEY_BY_ID, &[&id])?.pop() else {
                return Ok(Revoke::NotFound);
            };
            let sql = concat!(
                "SELECT ",
                columns!(key),
                " FROM api_keys WHERE revoked_at IS NULL"
            );
            if Revoke::is_last_admin(&key, &query_keys(conn, sql, &[])?) {
                return Ok(Revoke::LastAdmin(key.info));
            }
            let keys = query_keys(conn, REVOKE_KEY, &[&now, &id])?;
            Ok(keys
                .into_iter()
                .next()
                .map_or(Revoke::NotFound, |k| Revoke::Revoked(k.info)))
        })
        .await
    }

    async fn touch_key(&self, id: &str, now: Millis) -> Result<()> {
        let id = id.to_string();
        self.write(move |conn| {
            conn.prepare_cached("UPDATE api_keys SET last_used_at = ?1 WHERE id = ?2")?
                .execute(params![now, id])?;
            Ok(())
        })
        .await
    }

    async fn count_keys(&self) -> Result<u64> {
        self.write(|conn| {
            let n: i64 = conn
                .prepare_cached("SELECT COUNT(*) FROM api_keys")?
                .query_row([], |row| row.get(0))?;
            Ok(n as u64)
        })
        .await
    }

    async fn record_event(
        &self,
        kind: &str,
        task_id: Option<&str>,
        daemon_id: Option<&str>,
        data: serde_json::Value,
        now: Millis,
    ) -> Result<Event> {
        let event = NewEvent::new(kind, task_id, daemon_id, data);
        self.write(move |conn| insert_event(conn, event, now)).await
    }

    async fn events_after(&self, after_id: i64, limit: u32) -> Result<Vec<Event>> {
        self.read(move |conn| {
            let sql = concat!(
                "SELECT ",
                columns!(event),
                " FROM events WHERE id > ?1 ORDER BY id LIMIT ?2"
            );
            query_all(conn, sql, &[&after_id, &(limit as i64)], |row| {
                rows::event(row)
            })
        })
        .await
    }

    async fn last_event_id(&self) -> Result<i64> {
        self.read(|conn| {
            Ok(conn.query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))?)
        })
        .await
    }

    async fn prune_events(&self, before: Millis) -> Result<u64> {
        self.write(move |conn| {
            // SQLite reads `$1` as a numbered parameter, as PostgreSQL does.
            Ok(conn.execute(crate::PRUNE_EVENTS, params![before])? as u64)
        })
        .await
    }
}

#[async_trait]
impl GatewayStore for SqliteStore {
    async fn gateway_state(&self, heartbeats: u32, incidents: u32) -> Result<GatewayRows> {
        self.read(move |conn| {
            let mut rows = GatewayRows::default();
            let mut stmt = conn.prepare_cached("SELECT key, value FROM gateway_kv ORDER BY key")?;
            let kv = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            for row in kv {
                rows.kv.push(row?);
            }
            for (table, keep, out) in [
                ("gateway_heartbeats", heartbeats, &mut rows.heartbeats),
                ("gateway_incidents", incidents, &mut rows.incidents),
            ] {
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT body FROM (SELECT id, body FROM {table} ORDER BY id DESC LIMIT ?1) \
                     ORDER BY id"
                ))?;
                for body in stmt.query_map([keep as i64], |r| r.get::<_, String>(0))? {
                    out.push(body?);
                }
            }
            Ok(rows)
        })
        .await
    }

    async fn gateway_write(&self, ops: Vec<GatewayOp>) -> Result<()> {
        self.write(move |conn| {
            for op in &ops {
                match op {
                    GatewayOp::Put(k, v) => {
                        conn.prepare_cached(
                            "INSERT INTO gateway_kv (key, value) VALUES (?1, ?2) \
                             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        )?
                        .execute(params![k, v])?;
                    }
                    GatewayOp::Delete(k) => {
                        conn.prepare_cached("DELETE FROM gateway_kv WHERE key = ?1")?
                            .execute(params![k])?;
                    }
                    GatewayOp::Heartbeat { body, keep } => {
                        append_capped(conn, "gateway_heartbeats", body, *keep)?
                    }
                    GatewayOp::Incident { body, keep } => {
                        append_capped(conn, "gateway_incidents", body, *keep)?
                    }
                    GatewayOp::ClearHeartbeats => {
                        conn.prepare_cached("DELETE FROM gateway_heartbeats")?
                            .execute([])?;
                    }
                    GatewayOp::ClearIncidents => {
                        conn.prepare_cached("DELETE FROM gateway_incidents")?
                            .execute([])?;
                    }
                }
            }
            Ok(())
        })
        .await
    }
}

/// Appends `body` to a gateway log table and keeps only its newest `keep` rows.
fn append_capped(conn: &Connection, table: &str, body: &str, keep: u32) -> rusqlite::Result<()> {
    conn.prepare_cached(&format!("INSERT INTO {table} (body) VALUES (?1)"))?
        .execute(params![body])?;
    conn.prepare_cached(&format!(
        "DELETE FROM {table} WHERE id <= (SELECT MAX(id) FROM {table}) - ?1"
    ))?
    .execute(params![keep as i64])?;
    Ok(())
}
