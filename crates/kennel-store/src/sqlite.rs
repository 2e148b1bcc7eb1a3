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

mod readers;
mod schema;
mod wal_flusher;
mod writer;

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use kennel_proto::api::{ApiKey, Attempt, Daemon, Event, OutputChunk, Scope, Task};
use kennel_proto::link::{OutputStream, RepoSpec};
use kennel_proto::TaskStatus;
use rusqlite::types::ToSql;
use rusqlite::{params, Connection, OptionalExtension, Row};

use self::readers::Readers;
use self::wal_flusher::WalFlusher;
use self::writer::Writer;
use crate::machine::{
    self, AttemptFacts, Change, Chunk, Ending, Outcome, Step, TaskAfter, TaskFacts, Verdict,
};
use crate::{
    parse_scopes, rfc3339, Applied, DaemonHello, Dispatch, EndAttempt, Ended, GatewayOp,
    GatewayRows, GatewayStore, KeyRecord, Millis, NewTask, QueuedTask, Report, Result, Revoke,
    Store, StoreError, TaskFilter,
};

/// SQLite implementation of [`Store`]. Cloning shares the writer thread and the read pool.
#[derive(Clone)]
pub struct SqliteStore {
    writer: Writer,
    readers: Arc<Readers>,
}

/// The columns [`task_from_row`] reads, in its order.
macro_rules! task_columns {
    () => {
        "seq, id, name, prompt, repo_url, base_branch, agent, labels, priority, env, \
         timeout_secs, max_attempts, status, attempt, daemon_id, created_at, updated_at, \
         finished_at, error, exit_code, branch, commit_sha"
    };
}

/// The statuses of a task that holds a live attempt, as an SQL list (`'dispatched',…`), from
/// [`TaskStatus::is_active`] so that the SQL cannot drift from the enum.
fn active_statuses() -> String {
    let quoted: Vec<String> = TaskStatus::ALL
        .into_iter()
        .filter(|s| s.is_active())
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    quoted.join(",")
}

/// Selects daemons with their live task count, as [`daemon_from_row`] reads them; `tail`
/// filters and orders.
fn daemon_select(tail: &str) -> String {
    format!(
        "SELECT d.*, (SELECT COUNT(*) FROM tasks t WHERE t.daemon_id = d.id \
         AND t.status IN ({})) AS active_tasks FROM daemons d {tail}",
        active_statuses()
    )
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

fn json_map(s: &str, what: &str) -> Result<BTreeMap<String, String>> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    // Maps of strings and JSON values always serialise.
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn status<T: FromStr>(s: &str) -> Result<T> {
    s.parse()
        .map_err(|_| StoreError::Corrupt(format!("unknown status `{s}`")))
}

/// Reads a row of [`task_columns!`].
fn task_from_row(row: &Row<'_>) -> Result<QueuedTask> {
    let repo_url: Option<String> = row.get(4)?;
    let base_branch: Option<String> = row.get(5)?;
    let labels: String = row.get(7)?;
    let env: String = row.get(9)?;
    let st: String = row.get(12)?;
    Ok(QueuedTask {
        order: row.get(0)?,
        task: Task {
            id: row.get(1)?,
            name: row.get(2)?,
            prompt: row.get(3)?,
            repo: repo_url.map(|url| RepoSpec {
                url,
                base_branch: base_branch.unwrap_or_default(),
            }),
            agent: row.get(6)?,
            labels: json_map(&labels, "task labels")?,
            priority: row.get(8)?,
            env: json_map(&env, "task env")?,
            timeout_secs: row.get::<_, Option<i64>>(10)?.map(|v| v as u64),
            max_attempts: row.get::<_, i64>(11)? as u32,
            status: status(&st)?,
            attempt: row.get::<_, i64>(13)? as u32,
            daemon_id: row.get(14)?,
            created_at: rfc3339(row.get(15)?),
            updated_at: rfc3339(row.get(16)?),
            finished_at: row.get::<_, Option<i64>>(17)?.map(rfc3339),
            error: row.get(18)?,
            exit_code: row.get::<_, Option<i64>>(19)?.map(|v| v as i32),
            branch: row.get(20)?,
            commit: row.get(21)?,
            waiting: None,
        },
    })
}

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

/// Runs a statement returning [`task_columns!`] rows and collects them.
fn query_tasks(conn: &Connection, sql: &str, args: &[&dyn ToSql]) -> Result<Vec<QueuedTask>> {
    query_all(conn, sql, args, task_from_row)
}

/// Runs a statement returning at most one [`task_columns!`] row (a select by id or an
/// `UPDATE … RETURNING`).
fn query_task(conn: &Connection, sql: &str, args: &[&dyn ToSql]) -> Result<Option<Task>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(args)?;
    let task = match rows.next()? {
        Some(row) => Some(task_from_row(row)?.task),
        None => None,
    };
    // Step to the end so an `UPDATE … RETURNING` is complete before the statement resets.
    while rows.next()?.is_some() {}
    Ok(task)
}

fn load_task(conn: &Connection, id: &str) -> Result<Option<Task>> {
    query_task(
        conn,
        concat!("SELECT ", task_columns!(), " FROM tasks WHERE id = ?1"),
        &[&id],
    )
}

/// Reads [`TaskFacts`] from the columns `status, attempt, max_attempts, returned_attempts` of
/// the task, starting at column `at`.
fn task_facts_from(row: &Row<'_>, at: usize) -> Result<TaskFacts> {
    let st: String = row.get(at)?;
    Ok(TaskFacts {
        status: status(&st)?,
        attempt: row.get::<_, i64>(at + 1)? as u32,
        max_attempts: row.get::<_, i64>(at + 2)? as u32,
        returned_attempts: row.get::<_, i64>(at + 3)? as u32,
    })
}

/// What the state machine needs to know about a task; `None` when there is no such task.
fn load_task_facts(conn: &Connection, id: &str) -> Result<Option<TaskFacts>> {
    let mut stmt = conn.prepare_cached(
        "SELECT status, attempt, max_attempts, returned_attempts FROM tasks WHERE id = ?1",
    )?;
    let mut rows = stmt.query([id])?;
    let facts = match rows.next()? {
        Some(row) => Some(task_facts_from(row, 0)?),
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
    let mut stmt = conn.prepare_cached(
        "SELECT a.daemon_id, a.status, a.last_seq, \
         t.status, t.attempt, t.max_attempts, t.returned_attempts \
         FROM attempts a JOIN tasks t ON t.id = a.task_id \
         WHERE a.task_id = ?1 AND a.attempt = ?2",
    )?;
    let mut rows = stmt.query(params![task_id, attempt as i64])?;
    let Some(row) = rows.next()? else {
        return Ok(None);
    };
    let st: String = row.get(1)?;
    Ok(Some(AttemptFacts {
        holder: row.get(0)?,
        status: status(&st)?,
        last_seq: row.get::<_, i64>(2)? as u64,
        task: task_facts_from(row, 3)?,
    }))
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
    insert_event(
        conn,
        "daemon.disconnected",
        None,
        Some(daemon_id),
        serde_json::json!({ "reason": reason }),
        now,
    )
}

fn daemon_from_row(row: &Row<'_>) -> Result<Daemon> {
    let agents: String = row.get("agents")?;
    let labels: String = row.get("labels")?;
    Ok(Daemon {
        id: row.get("id")?,
        machine_id: row.get("machine_id")?,
        hostname: row.get("hostname")?,
        connected: row.get::<_, i64>("connected")? != 0,
        draining: row.get::<_, i64>("draining")? != 0,
        max_concurrent_tasks: row.get::<_, i64>("max_concurrent_tasks")? as u32,
        active_tasks: row.get::<_, i64>("active_tasks")? as u32,
        labels: json_map(&labels, "daemon labels")?,
        agents: serde_json::from_str(&agents)
            .map_err(|e| StoreError::Corrupt(format!("daemon agents: {e}")))?,
        version: row.get("version")?,
        protocol_version: row.get::<_, i64>("protocol_version")? as u32,
        connected_at: row.get::<_, Option<i64>>("connected_at")?.map(rfc3339),
        last_seen_at: row.get::<_, Option<i64>>("last_seen_at")?.map(rfc3339),
        key_id: row.get("key_id")?,
    })
}

fn query_daemons(conn: &Connection, sql: &str, args: &[&dyn ToSql]) -> Result<Vec<Daemon>> {
    query_all(conn, sql, args, daemon_from_row)
}

fn load_daemon(conn: &Connection, id: &str) -> Result<Option<Daemon>> {
    Ok(query_daemons(conn, &daemon_select("WHERE d.id = ?1"), &[&id])?.pop())
}

fn key_from_row(row: &Row<'_>) -> Result<KeyRecord> {
    let scopes: String = row.get("scopes")?;
    Ok(KeyRecord {
        info: ApiKey {
            id: row.get("id")?,
            name: row.get("name")?,
            scopes: parse_scopes(&scopes)?,
            created_at: rfc3339(row.get("created_at")?),
            last_used_at: row.get::<_, Option<i64>>("last_used_at")?.map(rfc3339),
            revoked_at: row.get::<_, Option<i64>>("revoked_at")?.map(rfc3339),
        },
        hash: row.get("hash")?,
    })
}

fn query_keys(conn: &Connection, sql: &str, args: &[&dyn ToSql]) -> Result<Vec<KeyRecord>> {
    query_all(conn, sql, args, key_from_row)
}

fn event_from_row(row: &Row<'_>) -> Result<Event> {
    let data: String = row.get("data")?;
    Ok(Event {
        id: row.get("id")?,
        kind: row.get("kind")?,
        task_id: row.get("task_id")?,
        daemon_id: row.get("daemon_id")?,
        data: serde_json::from_str(&data)
            .map_err(|e| StoreError::Corrupt(format!("event data: {e}")))?,
        at: rfc3339(row.get("at")?),
    })
}

fn insert_event(
    conn: &Connection,
    kind: &str,
    task_id: Option<&str>,
    daemon_id: Option<&str>,
    data: serde_json::Value,
    now: Millis,
) -> Result<Event> {
    conn.prepare_cached(
        "INSERT INTO events (kind, task_id, daemon_id, data, at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![kind, task_id, daemon_id, to_json(&data), now])?;
    Ok(Event {
        id: conn.last_insert_rowid(),
        kind: kind.to_string(),
        task_id: task_id.map(str::to_string),
        daemon_id: daemon_id.map(str::to_string),
        data,
        at: rfc3339(now),
    })
}

/// The `task.status` event every task state change writes.
fn status_event_data(task: &Task) -> serde_json::Value {
    serde_json::json!({
        "status": task.status,
        "attempt": task.attempt,
        "daemonId": task.daemon_id,
        "error": task.error,
        "exitCode": task.exit_code,
        "branch": task.branch,
        "commit": task.commit,
    })
}

fn task_status_event(conn: &Connection, task: &Task, now: Millis) -> Result<Event> {
    insert_event(
        conn,
        "task.status",
        Some(&task.id),
        task.daemon_id.as_deref(),
        status_event_data(task),
        now,
    )
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
                task_columns!()
            ),
            &[&TaskStatus::Queued.as_str(), &now, &ending.error, &task_id],
        ),
        TaskAfter::Ended(status) => query_task(
            conn,
            concat!(
                "UPDATE tasks SET status = ?1, updated_at = ?2, finished_at = ?2, error = ?3 \
                 WHERE id = ?4 RETURNING ",
                task_columns!()
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
            task_columns!()
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
    let change = match machine::report(facts.as_ref(), r) {
        Verdict::Apply(change) => change,
        Verdict::Duplicate { last_seq } => return Ok(Applied::Duplicate { last_seq }),
        Verdict::Gap { expected } => return Ok(Applied::Gap { expected }),
        Verdict::Stale(stale) => {
            return Ok(Applied::Stale {
                reason: stale.reason(r),
            })
        }
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
            task_columns!()
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
            task_columns!()
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

/// Stores a chunk of output under the report's seq; progress is stored as JSON on its own
/// stream.
fn insert_output(conn: &Connection, r: &Report, chunk: &Chunk<'_>, now: Millis) -> Result<()> {
    let progress;
    let (stream, text, is_partial) = match chunk {
        Chunk::Output {
            stream,
            text,
            is_partial,
        } => (*stream, *text, *is_partial),
        Chunk::Progress { summary, detail } => {
            progress = match detail {
                Some(d) => to_json(&serde_json::json!({"summary": summary, "detail": d})),
                None => to_json(&serde_json::json!({ "summary": summary })),
            };
            (OutputStream::Progress, progress.as_str(), false)
        }
    };
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
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO tasks (id, name, prompt, repo_url, base_branch, agent, labels, \
                 priority, env, timeout_secs, max_attempts, status, attempt, created_at, \
                 updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 0, \
                 ?13, ?13)",
            )?
            .execute(params![
                t.id,
                t.name,
                t.prompt,
                t.repo.as_ref().map(|r| r.url.as_str()),
                t.repo.as_ref().map(|r| r.base_branch.as_str()),
                t.agent,
                to_json(&t.labels),
                t.priority,
                to_json(&t.env),
                t.timeout_secs.map(|v| v as i64),
                t.max_attempts as i64,
                TaskStatus::Queued.as_str(),
                now,
            ])?;
            // `seq` is the rowid.
            let order = conn.last_insert_rowid();
            let task = Task {
                id: t.id,
                name: t.name,
                prompt: t.prompt,
                repo: t.repo,
                agent: t.agent,
                labels: t.labels,
                priority: t.priority,
                env: t.env,
                timeout_secs: t.timeout_secs,
                max_attempts: t.max_attempts,
                status: TaskStatus::Queued,
                attempt: 0,
                daemon_id: None,
                created_at: rfc3339(now),
                updated_at: rfc3339(now),
                finished_at: None,
                error: None,
                exit_code: None,
                branch: None,
                commit: None,
                waiting: None,
            };
            let ev = insert_event(
                conn,
                "task.created",
                Some(&task.id),
                None,
                serde_json::json!({
                    "status": task.status,
                    "name": task.name,
                    "priority": task.priority,
                }),
                now,
            )?;
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
            let mut sql =
                String::from(concat!("SELECT ", task_columns!(), " FROM tasks WHERE 1=1"));
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
            let mut stmt =
                conn.prepare_cached("SELECT * FROM attempts WHERE task_id = ?1 ORDER BY attempt")?;
            let mut rows = stmt.query([&task_id])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let st: String = row.get("status")?;
                out.push(Attempt {
                    attempt: row.get::<_, i64>("attempt")? as u32,
                    daemon_id: row.get("daemon_id")?,
                    status: status(&st)?,
                    dispatched_at: rfc3339(row.get("dispatched_at")?),
                    started_at: row.get::<_, Option<i64>>("started_at")?.map(rfc3339),
                    finished_at: row.get::<_, Option<i64>>("finished_at")?.map(rfc3339),
                    error: row.get("error")?,
                });
            }
            Ok(out)
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
                    task_columns!(),
                    " FROM tasks WHERE status = ?1 ORDER BY seq"
                ),
                &[&TaskStatus::Queued.as_str()],
            )
        })
        .await
    }

    async fn active_tasks(&self) -> Result<Vec<Task>> {
        self.write(|conn| {
            let sql = format!(
                concat!(
                    "SELECT ",
                    task_columns!(),
                    " FROM tasks WHERE status IN ({}) ORDER BY seq"
                ),
                active_statuses()
            );
            let tasks = query_tasks(conn, &sql, &[])?;
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
                out.insert(status(&st)?, row.get::<_, i64>(1)? as u64);
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
                        task_columns!()
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
                    task_columns!()
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
            let mut stmt = conn.prepare_cached(
                "SELECT seq, stream, output, is_partial, at FROM task_output \
                 WHERE task_id = ?1 AND attempt = ?2 AND seq > ?3 ORDER BY seq LIMIT ?4",
            )?;
            let mut rows = stmt.query(params![
                task_id,
                attempt as i64,
                after_seq as i64,
                limit as i64
            ])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let stream: String = row.get(1)?;
                out.push(OutputChunk {
                    task_id: task_id.clone(),
                    attempt,
                    seq: row.get::<_, i64>(0)? as u64,
                    stream: OutputStream::parse(&stream)
                        .ok_or_else(|| StoreError::Corrupt(format!("output stream `{stream}`")))?,
                    output: row.get(2)?,
                    is_partial: row.get(3)?,
                    at: rfc3339(row.get(4)?),
                });
            }
            Ok(out)
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
            let ev = insert_event(
                conn,
                "daemon.connected",
                None,
                Some(&daemon_id),
                serde_json::json!({
                    "hostname": h.hostname,
                    "machineId": h.machine_id,
                    "maxConcurrentTasks": h.max_concurrent_tasks,
                    "agents": h.agents,
                }),
                now,
            )?;
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
                 WHERE d.connected = 1 AND (c.id IS NULL OR c.seen_at < ?1) ORDER BY d.id",
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
            let ev = insert_event(
                conn,
                "daemon.draining",
                None,
                Some(&daemon_id),
                serde_json::json!({ "draining": draining }),
                now,
            )?;
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
                now_from_rfc3339(&key.info.created_at),
            ])?;
            Ok(())
        })
        .await
    }

    async fn find_key(&self, id: &str) -> Result<Option<KeyRecord>> {
        let id = id.to_string();
        self.read(move |conn| {
            Ok(query_keys(conn, "SELECT * FROM api_keys WHERE id = ?1", &[&id])?.pop())
        })
        .await
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>> {
        self.read(|conn| {
            let keys = query_keys(conn, "SELECT * FROM api_keys ORDER BY created_at, id", &[])?;
            Ok(keys.into_iter().map(|k| k.info).collect())
        })
        .await
    }

    async fn revoke_key(&self, id: &str, now: Millis) -> Result<Option<ApiKey>> {
        let id = id.to_string();
        self.write(move |conn| {
            let keys = query_keys(
                conn,
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?1) WHERE id = ?2 \
                 RETURNING *",
                &[&now, &id],
            )?;
            Ok(keys.into_iter().next().map(|k| k.info))
        })
        .await
    }

    async fn revoke_key_keeping_an_admin(&self, id: &str, now: Millis) -> Result<Revoke> {
        let id = id.to_string();
        self.write(move |conn| {
            let Some(key) = query_keys(conn, "SELECT * FROM api_keys WHERE id = ?1", &[&id])?.pop()
            else {
                return Ok(Revoke::NotFound);
            };
            let is_admin = |k: &KeyRecord| k.info.scopes.contains(&Scope::Admin);
            if key.info.revoked_at.is_none() && is_admin(&key) {
                let live =
                    query_keys(conn, "SELECT * FROM api_keys WHERE revoked_at IS NULL", &[])?;
                if live.iter().filter(|k| is_admin(k)).count() <= 1 {
                    return Ok(Revoke::LastAdmin(key.info));
                }
            }
            let keys = query_keys(
                conn,
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?1) WHERE id = ?2 \
                 RETURNING *",
                &[&now, &id],
            )?;
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
        let kind = kind.to_string();
        let task_id = task_id.map(str::to_string);
        let daemon_id = daemon_id.map(str::to_string);
        self.write(move |conn| {
            insert_event(
                conn,
                &kind,
                task_id.as_deref(),
                daemon_id.as_deref(),
                data,
                now,
            )
        })
        .await
    }

    async fn events_after(&self, after_id: i64, limit: u32) -> Result<Vec<Event>> {
        self.read(move |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT * FROM events WHERE id > ?1 ORDER BY id LIMIT ?2")?;
            let mut rows = stmt.query(params![after_id, limit as i64])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(event_from_row(row)?);
            }
            Ok(out)
        })
        .await
    }

    async fn last_event_id(&self) -> Result<i64> {
        self.read(|conn| {
            Ok(conn.query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))?)
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

/// Key records carry RFC 3339 strings; the table wants milliseconds.
fn now_from_rfc3339(s: &str) -> i64 {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, scopes: Vec<Scope>) -> KeyRecord {
        KeyRecord {
            info: ApiKey {
                id: id.into(),
                name: id.into(),
                scopes,
                created_at: rfc3339(0),
                last_used_at: None,
                revoked_at: None,
            },
            hash: vec![1; 32],
        }
    }

    #[tokio::test]
    async fn the_last_live_admin_key_stays() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("k.db")).await.unwrap();
        for k in [
            key("admin1", vec![Scope::Admin]),
            key("admin2", vec![Scope::Client, Scope::Admin]),
            key("client", vec![Scope::Client]),
        ] {
            store.insert_key(&k).await.unwrap();
        }
        let revoke = |id: &'static str| {
            let store = store.clone();
            async move { store.revoke_key_keeping_an_admin(id, 5).await.unwrap() }
        };
        assert!(matches!(revoke("admin1").await, Revoke::Revoked(k) if k.revoked_at.is_some()));
        assert!(matches!(revoke("admin2").await, Revoke::LastAdmin(k) if k.revoked_at.is_none()));
        // Revoking again is harmless; other scopes never count.
        assert!(matches!(revoke("admin1").await, Revoke::Revoked(_)));
        assert!(matches!(revoke("client").await, Revoke::Revoked(_)));
        assert_eq!(revoke("nope").await, Revoke::NotFound);
        let live: Vec<_> = store
            .list_keys()
            .await
            .unwrap()
            .into_iter()
            .filter(|k| k.revoked_at.is_none())
            .map(|k| k.id)
            .collect();
        assert_eq!(live, vec!["admin2".to_string()]);
    }
}
