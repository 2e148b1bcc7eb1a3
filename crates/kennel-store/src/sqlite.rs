//! The embedded SQLite store: one file in WAL mode, one writer connection (so writers never
//! race for the lock) and a small pool of readers that never block it.
//!
//! `synchronous=NORMAL` in WAL mode keeps every committed transaction across a `kill -9` of the
//! process (the WAL is in the OS page cache); only a power loss can drop the last commits.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use kennel_proto::api::{ApiKey, Attempt, Daemon, Event, OutputChunk, Task};
use kennel_proto::link::{OutputStream, RepoSpec};
use kennel_proto::{AttemptStatus, TaskStatus};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use crate::{
    parse_scopes, rfc3339, Applied, DaemonHello, Dispatch, Effect, EndAttempt, Ended, KeyRecord,
    Millis, NewTask, QueuedTask, Report, Result, Store, StoreError, TaskFilter,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// SQLite implementation of [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

const TASK_COLUMNS: &str =
    "seq, id, name, prompt, repo_url, base_branch, agent, labels, priority, env, \
     timeout_secs, max_attempts, status, attempt, daemon_id, created_at, updated_at, finished_at, \
     error, exit_code, branch, commit_sha";

impl SqliteStore {
    /// Opens (creating if needed) the database file and runs migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
                    path: path.display().to_string(),
                    source: sqlx::Error::Io(e),
                })?;
            }
        }
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            .pragma("cache_size", "-32000");
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(opts.clone())
            .await
            .map_err(open_err)?;
        MIGRATOR.run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.read_only(true))
            .await
            .map_err(open_err)?;
        Ok(SqliteStore { writer, reader })
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

fn task_from_row(row: &SqliteRow) -> Result<QueuedTask> {
    let repo_url: Option<String> = row.try_get("repo_url")?;
    let base_branch: Option<String> = row.try_get("base_branch")?;
    let opt_ms = |col: &str| -> Result<Option<String>> {
        Ok(row.try_get::<Option<i64>, _>(col)?.map(rfc3339))
    };
    Ok(QueuedTask {
        order: row.try_get("seq")?,
        task: Task {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            prompt: row.try_get("prompt")?,
            repo: repo_url.map(|url| RepoSpec {
                url,
                base_branch: base_branch.unwrap_or_else(kennel_proto::link::default_base_branch),
            }),
            agent: row.try_get("agent")?,
            labels: json_map(row.try_get("labels")?, "task labels")?,
            priority: row.try_get("priority")?,
            env: json_map(row.try_get("env")?, "task env")?,
            timeout_secs: row
                .try_get::<Option<i64>, _>("timeout_secs")?
                .map(|v| v as u64),
            max_attempts: row.try_get::<i64, _>("max_attempts")? as u32,
            status: status(row.try_get("status")?)?,
            attempt: row.try_get::<i64, _>("attempt")? as u32,
            daemon_id: row.try_get("daemon_id")?,
            created_at: rfc3339(row.try_get("created_at")?),
            updated_at: rfc3339(row.try_get("updated_at")?),
            finished_at: opt_ms("finished_at")?,
            error: row.try_get("error")?,
            exit_code: row
                .try_get::<Option<i64>, _>("exit_code")?
                .map(|v| v as i32),
            branch: row.try_get("branch")?,
            commit: row.try_get("commit_sha")?,
        },
    })
}

fn daemon_from_row(row: &SqliteRow) -> Result<Daemon> {
    let agents: String = row.try_get("agents")?;
    Ok(Daemon {
        id: row.try_get("id")?,
        machine_id: row.try_get("machine_id")?,
        hostname: row.try_get("hostname")?,
        connected: row.try_get::<i64, _>("connected")? != 0,
        draining: row.try_get::<i64, _>("draining")? != 0,
        max_concurrent_tasks: row.try_get::<i64, _>("max_concurrent_tasks")? as u32,
        active_tasks: row.try_get::<i64, _>("active_tasks")? as u32,
        labels: json_map(row.try_get("labels")?, "daemon labels")?,
        agents: serde_json::from_str(&agents)
            .map_err(|e| StoreError::Corrupt(format!("daemon agents: {e}")))?,
        version: row.try_get("version")?,
        protocol_version: row.try_get::<i64, _>("protocol_version")? as u32,
        connected_at: row.try_get::<Option<i64>, _>("connected_at")?.map(rfc3339),
        last_seen_at: row.try_get::<Option<i64>, _>("last_seen_at")?.map(rfc3339),
    })
}

const DAEMON_SELECT: &str = "SELECT d.*, (SELECT COUNT(*) FROM tasks t WHERE t.daemon_id = d.id \
     AND t.status IN ('dispatched','running','paused')) AS active_tasks FROM daemons d";

fn key_from_row(row: &SqliteRow) -> Result<KeyRecord> {
    Ok(KeyRecord {
        info: ApiKey {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            scopes: parse_scopes(row.try_get("scopes")?)?,
            created_at: rfc3339(row.try_get("created_at")?),
            last_used_at: row.try_get::<Option<i64>, _>("last_used_at")?.map(rfc3339),
            revoked_at: row.try_get::<Option<i64>, _>("revoked_at")?.map(rfc3339),
        },
        hash: row.try_get("hash")?,
    })
}

fn event_from_row(row: &SqliteRow) -> Result<Event> {
    let data: String = row.try_get("data")?;
    Ok(Event {
        id: row.try_get("id")?,
        kind: row.try_get("kind")?,
        task_id: row.try_get("task_id")?,
        daemon_id: row.try_get("daemon_id")?,
        data: serde_json::from_str(&data)
            .map_err(|e| StoreError::Corrupt(format!("event data: {e}")))?,
        at: rfc3339(row.try_get("at")?),
    })
}

async fn insert_event(
    tx: &mut Transaction<'_, Sqlite>,
    kind: &str,
    task_id: Option<&str>,
    daemon_id: Option<&str>,
    data: serde_json::Value,
    now: Millis,
) -> Result<Event> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO events (kind, task_id, daemon_id, data, at) VALUES (?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(kind)
    .bind(task_id)
    .bind(daemon_id)
    .bind(to_json(&data))
    .bind(now)
    .fetch_one(&mut **tx)
    .await?;
    Ok(Event {
        id,
        kind: kind.to_string(),
        task_id: task_id.map(str::to_string),
        daemon_id: daemon_id.map(str::to_string),
        data,
        at: rfc3339(now),
    })
}

async fn load_task(tx: &mut Transaction<'_, Sqlite>, id: &str) -> Result<Option<Task>> {
    let row = sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?"))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
    row.map(|r| task_from_row(&r).map(|q| q.task)).transpose()
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

async fn task_status_event(
    tx: &mut Transaction<'_, Sqlite>,
    task: &Task,
    now: Millis,
) -> Result<Event> {
    insert_event(
        tx,
        "task.status",
        Some(&task.id),
        task.daemon_id.as_deref(),
        status_event_data(task),
        now,
    )
    .await
}

/// Ends an attempt inside `tx`; see [`Store::end_attempt`].
async fn end_attempt_tx(
    tx: &mut Transaction<'_, Sqlite>,
    end: &EndAttempt<'_>,
    now: Millis,
) -> Result<Option<Ended>> {
    let EndAttempt {
        task_id,
        attempt,
        status,
        reason,
        retry,
        terminal,
    } = *end;
    let Some(task) = load_task(tx, task_id).await? else {
        return Ok(None);
    };
    if task.attempt != attempt || !task.status.is_active() {
        return Ok(None);
    }
    sqlx::query(
        "UPDATE attempts SET status = ?, finished_at = ?, error = ? WHERE task_id = ? AND attempt = ?",
    )
    .bind(status.as_str())
    .bind(now)
    .bind(reason)
    .bind(task_id)
    .bind(attempt as i64)
    .execute(&mut **tx)
    .await?;
    let requeue = retry && task.attempt < task.max_attempts;
    if requeue {
        sqlx::query(
            "UPDATE tasks SET status = 'queued', daemon_id = NULL, updated_at = ?, error = ? WHERE id = ?",
        )
        .bind(now)
        .bind(reason)
        .bind(task_id)
        .execute(&mut **tx)
        .await?;
    } else {
        let error = if retry {
            format!(
                "{reason}; no attempts left ({} of {})",
                task.attempt, task.max_attempts
            )
        } else {
            reason.to_string()
        };
        sqlx::query(
            "UPDATE tasks SET status = ?, updated_at = ?, finished_at = ?, error = ? WHERE id = ?",
        )
        .bind(terminal.as_str())
        .bind(now)
        .bind(now)
        .bind(error)
        .bind(task_id)
        .execute(&mut **tx)
        .await?;
    }
    let Some(task) = load_task(tx, task_id).await? else {
        return Ok(None);
    };
    let ev = task_status_event(tx, &task, now).await?;
    Ok(Some(Ended {
        task,
        events: vec![ev],
    }))
}

/// Applies one report inside `tx`.
async fn apply_one(tx: &mut Transaction<'_, Sqlite>, r: &Report, now: Millis) -> Result<Applied> {
    let row = sqlx::query(
        "SELECT a.daemon_id, a.status, a.last_seq, t.attempt AS current FROM attempts a \
         JOIN tasks t ON t.id = a.task_id WHERE a.task_id = ? AND a.attempt = ?",
    )
    .bind(&r.task_id)
    .bind(r.attempt as i64)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else {
        return Ok(Applied::Stale {
            reason: format!("task {} has no attempt {}", r.task_id, r.attempt),
        });
    };
    let holder: String = row.try_get("daemon_id")?;
    let att_status: AttemptStatus = status(row.try_get("status")?)?;
    let last_seq = row.try_get::<i64, _>("last_seq")? as u64;
    let current = row.try_get::<i64, _>("current")? as u32;
    if holder != r.daemon_id {
        return Ok(Applied::Stale {
            reason: format!(
                "attempt {} of task {} is held by another daemon",
                r.attempt, r.task_id
            ),
        });
    }
    if r.seq <= last_seq {
        return Ok(Applied::Duplicate { last_seq });
    }
    if current != r.attempt || !att_status.is_live() {
        return Ok(Applied::Stale {
            reason: format!(
                "attempt {} of task {} is over ({att_status}); the current attempt is {current}",
                r.attempt, r.task_id
            ),
        });
    }
    if r.seq != last_seq + 1 {
        return Ok(Applied::Gap {
            expected: last_seq + 1,
        });
    }
    sqlx::query("UPDATE attempts SET last_seq = ? WHERE task_id = ? AND attempt = ?")
        .bind(r.seq as i64)
        .bind(&r.task_id)
        .bind(r.attempt as i64)
        .execute(&mut **tx)
        .await?;

    let mut events = Vec::new();
    let mut changed = None;
    match &r.effect {
        Effect::Output {
            stream,
            output,
            is_partial,
        } => {
            insert_output(tx, r, *stream, output, *is_partial, now).await?;
        }
        Effect::Progress { summary, detail } => {
            let text = match detail {
                Some(d) => to_json(&serde_json::json!({"summary": summary, "detail": d})),
                None => to_json(&serde_json::json!({ "summary": summary })),
            };
            insert_output(tx, r, OutputStream::Progress, &text, false, now).await?;
        }
        Effect::Accepted => {
            if att_status == AttemptStatus::Dispatched {
                set_live_status(tx, r, "running", now, true).await?;
                changed = load_task(tx, &r.task_id).await?;
            }
        }
        Effect::StatusChange { new_status } => {
            let target = match new_status.as_str() {
                "paused" => Some("paused"),
                "running" => Some("running"),
                _ => None,
            };
            if let Some(target) = target {
                if att_status.as_str() != target {
                    set_live_status(tx, r, target, now, false).await?;
                    changed = load_task(tx, &r.task_id).await?;
                }
            }
        }
        Effect::Rejected { reason } => {
            let reason = format!("rejected by daemon {}: {reason}", r.daemon_id);
            let end = EndAttempt {
                task_id: &r.task_id,
                attempt: r.attempt,
                status: AttemptStatus::Rejected,
                reason: &reason,
                retry: true,
                terminal: TaskStatus::Failed,
            };
            if let Some(ended) = end_attempt_tx(tx, &end, now).await? {
                events.extend(ended.events);
                changed = Some(ended.task);
            }
        }
        Effect::Complete {
            success,
            error,
            exit_code,
            branch,
            commit,
        } => {
            let (att, task_status) = if *success {
                ("completed", "completed")
            } else {
                ("failed", "failed")
            };
            sqlx::query(
                "UPDATE attempts SET status = ?, finished_at = ?, error = ?, \
                 started_at = COALESCE(started_at, ?) WHERE task_id = ? AND attempt = ?",
            )
            .bind(att)
            .bind(now)
            .bind(error)
            .bind(now)
            .bind(&r.task_id)
            .bind(r.attempt as i64)
            .execute(&mut **tx)
            .await?;
            sqlx::query(
                "UPDATE tasks SET status = ?, updated_at = ?, finished_at = ?, error = ?, \
                 exit_code = ?, branch = ?, commit_sha = ? WHERE id = ?",
            )
            .bind(task_status)
            .bind(now)
            .bind(now)
            .bind(error)
            .bind(exit_code)
            .bind(branch)
            .bind(commit)
            .bind(&r.task_id)
            .execute(&mut **tx)
            .await?;
            changed = load_task(tx, &r.task_id).await?;
        }
    }
    if let Some(task) = &changed {
        if events.is_empty() {
            events.push(task_status_event(tx, task, now).await?);
        }
    }
    Ok(Applied::Done {
        events,
        task: changed.map(Box::new),
    })
}

async fn set_live_status(
    tx: &mut Transaction<'_, Sqlite>,
    r: &Report,
    target: &str,
    now: Millis,
    started: bool,
) -> Result<()> {
    let started_at = started.then_some(now);
    sqlx::query(
        "UPDATE attempts SET status = ?, started_at = COALESCE(started_at, ?) \
         WHERE task_id = ? AND attempt = ?",
    )
    .bind(target)
    .bind(started_at)
    .bind(&r.task_id)
    .bind(r.attempt as i64)
    .execute(&mut **tx)
    .await?;
    sqlx::query("UPDATE tasks SET status = ?, updated_at = ? WHERE id = ?")
        .bind(target)
        .bind(now)
        .bind(&r.task_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn insert_output(
    tx: &mut Transaction<'_, Sqlite>,
    r: &Report,
    stream: OutputStream,
    output: &str,
    is_partial: bool,
    now: Millis,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO task_output (task_id, attempt, seq, stream, output, is_partial, at) \
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&r.task_id)
    .bind(r.attempt as i64)
    .bind(r.seq as i64)
    .bind(stream.as_str())
    .bind(output)
    .bind(is_partial)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn create_task(&self, t: NewTask, now: Millis) -> Result<(QueuedTask, Event)> {
        let mut tx = self.writer.begin().await?;
        let order: i64 = sqlx::query_scalar(
            "INSERT INTO tasks (id, name, prompt, repo_url, base_branch, agent, labels, priority, env, \
             timeout_secs, max_attempts, status, attempt, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', 0, ?, ?) RETURNING seq",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(&t.prompt)
        .bind(t.repo.as_ref().map(|r| r.url.as_str()))
        .bind(t.repo.as_ref().map(|r| r.base_branch.as_str()))
        .bind(&t.agent)
        .bind(to_json(&t.labels))
        .bind(t.priority)
        .bind(to_json(&t.env))
        .bind(t.timeout_secs.map(|v| v as i64))
        .bind(t.max_attempts as i64)
        .bind(now)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
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
        };
        let ev = insert_event(
            &mut tx,
            "task.created",
            Some(&task.id),
            None,
            serde_json::json!({"status": "queued", "name": task.name, "priority": task.priority}),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok((QueuedTask { order, task }, ev))
    }

    async fn get_task(&self, id: &str) -> Result<Option<Task>> {
        let row = sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| task_from_row(&r).map(|q| q.task)).transpose()
    }

    async fn list_tasks(&self, f: &TaskFilter) -> Result<Vec<QueuedTask>> {
        let mut sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE 1=1");
        if f.status.is_some() {
            sql.push_str(" AND status = ?");
        }
        if f.daemon_id.is_some() {
            sql.push_str(" AND daemon_id = ?");
        }
        if f.before.is_some() {
            sql.push_str(" AND seq < ?");
        }
        sql.push_str(" ORDER BY seq DESC LIMIT ?");
        let mut q = sqlx::query(&sql);
        if let Some(s) = f.status {
            q = q.bind(s.as_str());
        }
        if let Some(d) = &f.daemon_id {
            q = q.bind(d);
        }
        if let Some(b) = f.before {
            q = q.bind(b);
        }
        let rows = q.bind(f.limit as i64).fetch_all(&self.reader).await?;
        rows.iter().map(task_from_row).collect()
    }

    async fn list_attempts(&self, task_id: &str) -> Result<Vec<Attempt>> {
        let rows = sqlx::query("SELECT * FROM attempts WHERE task_id = ? ORDER BY attempt")
            .bind(task_id)
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(Attempt {
                    attempt: row.try_get::<i64, _>("attempt")? as u32,
                    daemon_id: row.try_get("daemon_id")?,
                    status: status(row.try_get("status")?)?,
                    dispatched_at: rfc3339(row.try_get("dispatched_at")?),
                    started_at: row.try_get::<Option<i64>, _>("started_at")?.map(rfc3339),
                    finished_at: row.try_get::<Option<i64>, _>("finished_at")?.map(rfc3339),
                    error: row.try_get("error")?,
                })
            })
            .collect()
    }

    async fn queued_tasks(&self) -> Result<Vec<QueuedTask>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE status = 'queued' ORDER BY seq"
        ))
        .fetch_all(&self.writer)
        .await?;
        rows.iter().map(task_from_row).collect()
    }

    async fn active_tasks(&self) -> Result<Vec<Task>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE status IN ('dispatched','running','paused') ORDER BY seq"
        ))
        .fetch_all(&self.writer)
        .await?;
        rows.iter()
            .map(|r| task_from_row(r).map(|q| q.task))
            .collect()
    }

    async fn count_tasks(&self) -> Result<BTreeMap<TaskStatus, u64>> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM tasks GROUP BY status")
            .fetch_all(&self.reader)
            .await?;
        let mut out = BTreeMap::new();
        for row in rows {
            let st: TaskStatus = status(row.try_get("status")?)?;
            out.insert(st, row.try_get::<i64, _>("n")? as u64);
        }
        Ok(out)
    }

    async fn dispatch(
        &self,
        batch: &[Dispatch],
        now: Millis,
    ) -> Result<Vec<Option<(Task, Event)>>> {
        let mut tx = self.writer.begin().await?;
        let mut out = Vec::with_capacity(batch.len());
        for d in batch {
            let updated = sqlx::query(
                "UPDATE tasks SET status = 'dispatched', attempt = ?, daemon_id = ?, updated_at = ?, \
                 error = NULL WHERE id = ? AND status = 'queued' AND attempt = ?",
            )
            .bind(d.attempt as i64)
            .bind(&d.daemon_id)
            .bind(now)
            .bind(&d.task_id)
            .bind(d.attempt as i64 - 1)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated == 0 {
                out.push(None);
                continue;
            }
            sqlx::query(
                "INSERT INTO attempts (task_id, attempt, daemon_id, status, dispatched_at) \
                 VALUES (?, ?, ?, 'dispatched', ?)",
            )
            .bind(&d.task_id)
            .bind(d.attempt as i64)
            .bind(&d.daemon_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            let Some(task) = load_task(&mut tx, &d.task_id).await? else {
                out.push(None);
                continue;
            };
            let ev = task_status_event(&mut tx, &task, now).await?;
            out.push(Some((task, ev)));
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn apply(&self, batch: &[Report], now: Millis) -> Result<Vec<Applied>> {
        let mut tx = self.writer.begin().await?;
        let mut out = Vec::with_capacity(batch.len());
        for r in batch {
            out.push(apply_one(&mut tx, r, now).await?);
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn end_attempt(&self, end: &EndAttempt<'_>, now: Millis) -> Result<Option<Ended>> {
        let mut tx = self.writer.begin().await?;
        let ended = end_attempt_tx(&mut tx, end, now).await?;
        tx.commit().await?;
        Ok(ended)
    }

    async fn cancel_queued(&self, task_id: &str, now: Millis) -> Result<Option<Ended>> {
        let mut tx = self.writer.begin().await?;
        let n = sqlx::query(
            "UPDATE tasks SET status = 'cancelled', updated_at = ?, finished_at = ?, \
             error = 'cancelled before it ran' WHERE id = ? AND status = 'queued'",
        )
        .bind(now)
        .bind(now)
        .bind(task_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Ok(None);
        }
        let Some(task) = load_task(&mut tx, task_id).await? else {
            return Ok(None);
        };
        let ev = task_status_event(&mut tx, &task, now).await?;
        tx.commit().await?;
        Ok(Some(Ended {
            task,
            events: vec![ev],
        }))
    }

    async fn set_paused(
        &self,
        task_id: &str,
        attempt: u32,
        paused: bool,
        now: Millis,
    ) -> Result<Option<Ended>> {
        let (from, to) = if paused {
            ("running", "paused")
        } else {
            ("paused", "running")
        };
        let mut tx = self.writer.begin().await?;
        let n = sqlx::query(
            "UPDATE tasks SET status = ?, updated_at = ? WHERE id = ? AND attempt = ? AND status = ?",
        )
        .bind(to)
        .bind(now)
        .bind(task_id)
        .bind(attempt as i64)
        .bind(from)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Ok(None);
        }
        sqlx::query("UPDATE attempts SET status = ? WHERE task_id = ? AND attempt = ?")
            .bind(to)
            .bind(task_id)
            .bind(attempt as i64)
            .execute(&mut *tx)
            .await?;
        let Some(task) = load_task(&mut tx, task_id).await? else {
            return Ok(None);
        };
        let ev = task_status_event(&mut tx, &task, now).await?;
        tx.commit().await?;
        Ok(Some(Ended {
            task,
            events: vec![ev],
        }))
    }

    async fn task_output(
        &self,
        task_id: &str,
        attempt: u32,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<OutputChunk>> {
        let rows = sqlx::query(
            "SELECT seq, stream, output, is_partial, at FROM task_output \
             WHERE task_id = ? AND attempt = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(task_id)
        .bind(attempt as i64)
        .bind(after_seq as i64)
        .bind(limit as i64)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                let stream: String = row.try_get("stream")?;
                Ok(OutputChunk {
                    task_id: task_id.to_string(),
                    attempt,
                    seq: row.try_get::<i64, _>("seq")? as u64,
                    stream: OutputStream::parse(&stream)
                        .ok_or_else(|| StoreError::Corrupt(format!("output stream `{stream}`")))?,
                    output: row.try_get("output")?,
                    is_partial: row.try_get("is_partial")?,
                    at: rfc3339(row.try_get("at")?),
                })
            })
            .collect()
    }

    async fn daemon_connected(
        &self,
        daemon_id: &str,
        h: &DaemonHello,
        now: Millis,
    ) -> Result<(Daemon, Event)> {
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "INSERT INTO daemons (id, machine_id, hostname, max_concurrent_tasks, labels, agents, version, \
             protocol_version, connected, connected_at, last_seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET hostname = excluded.hostname, \
             max_concurrent_tasks = excluded.max_concurrent_tasks, labels = excluded.labels, \
             agents = excluded.agents, version = excluded.version, \
             protocol_version = excluded.protocol_version, connected = 1, \
             connected_at = excluded.connected_at, last_seen_at = excluded.last_seen_at",
        )
        .bind(daemon_id)
        .bind(&h.machine_id)
        .bind(&h.hostname)
        .bind(h.max_concurrent_tasks as i64)
        .bind(to_json(&h.labels))
        .bind(to_json(&h.agents))
        .bind(&h.version)
        .bind(h.protocol_version as i64)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO daemon_sessions (daemon_id, remote_addr, connected_at) VALUES (?, ?, ?)",
        )
        .bind(daemon_id)
        .bind(&h.remote_addr)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let ev = insert_event(
            &mut tx,
            "daemon.connected",
            None,
            Some(daemon_id),
            serde_json::json!({
                "hostname": h.hostname,
                "machineId": h.machine_id,
                "maxConcurrentTasks": h.max_concurrent_tasks,
                "agents": h.agents,
            }),
            now,
        )
        .await?;
        let row = sqlx::query(&format!("{DAEMON_SELECT} WHERE d.id = ?"))
            .bind(daemon_id)
            .fetch_one(&mut *tx)
            .await?;
        let daemon = daemon_from_row(&row)?;
        tx.commit().await?;
        Ok((daemon, ev))
    }

    async fn daemon_disconnected(
        &self,
        daemon_id: &str,
        reason: &str,
        now: Millis,
    ) -> Result<Event> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("UPDATE daemons SET connected = 0, last_seen_at = ? WHERE id = ?")
            .bind(now)
            .bind(daemon_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE daemon_sessions SET disconnected_at = ?, reason = ? \
             WHERE daemon_id = ? AND disconnected_at IS NULL",
        )
        .bind(now)
        .bind(reason)
        .bind(daemon_id)
        .execute(&mut *tx)
        .await?;
        let ev = insert_event(
            &mut tx,
            "daemon.disconnected",
            None,
            Some(daemon_id),
            serde_json::json!({ "reason": reason }),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(ev)
    }

    async fn daemon_seen(&self, daemon_id: &str, now: Millis) -> Result<()> {
        sqlx::query("UPDATE daemons SET last_seen_at = ? WHERE id = ?")
            .bind(now)
            .bind(daemon_id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn set_draining(
        &self,
        daemon_id: &str,
        draining: bool,
        now: Millis,
    ) -> Result<Option<(Daemon, Event)>> {
        let mut tx = self.writer.begin().await?;
        let n = sqlx::query("UPDATE daemons SET draining = ? WHERE id = ?")
            .bind(draining)
            .bind(daemon_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Ok(None);
        }
        let ev = insert_event(
            &mut tx,
            "daemon.draining",
            None,
            Some(daemon_id),
            serde_json::json!({ "draining": draining }),
            now,
        )
        .await?;
        let row = sqlx::query(&format!("{DAEMON_SELECT} WHERE d.id = ?"))
            .bind(daemon_id)
            .fetch_one(&mut *tx)
            .await?;
        let daemon = daemon_from_row(&row)?;
        tx.commit().await?;
        Ok(Some((daemon, ev)))
    }

    async fn get_daemon(&self, daemon_id: &str) -> Result<Option<Daemon>> {
        let row = sqlx::query(&format!("{DAEMON_SELECT} WHERE d.id = ?"))
            .bind(daemon_id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(daemon_from_row).transpose()
    }

    async fn daemon_by_machine(&self, machine_id: &str) -> Result<Option<Daemon>> {
        let row = sqlx::query(&format!("{DAEMON_SELECT} WHERE d.machine_id = ?"))
            .bind(machine_id)
            .fetch_optional(&self.writer)
            .await?;
        row.as_ref().map(daemon_from_row).transpose()
    }

    async fn list_daemons(&self) -> Result<Vec<Daemon>> {
        let rows = sqlx::query(&format!("{DAEMON_SELECT} ORDER BY d.hostname, d.id"))
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(daemon_from_row).collect()
    }

    async fn reset_connections(&self, now: Millis) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("UPDATE daemons SET connected = 0 WHERE connected = 1")
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE daemon_sessions SET disconnected_at = ?, reason = 'coordinator restarted' \
             WHERE disconnected_at IS NULL",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn insert_key(&self, key: &KeyRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, name, hash, scopes, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&key.info.id)
        .bind(&key.info.name)
        .bind(&key.hash)
        .bind(to_json(&key.info.scopes))
        .bind(now_from_rfc3339(&key.info.created_at))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn find_key(&self, id: &str) -> Result<Option<KeyRecord>> {
        let row = sqlx::query("SELECT * FROM api_keys WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>> {
        let rows = sqlx::query("SELECT * FROM api_keys ORDER BY created_at, id")
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| key_from_row(r).map(|k| k.info))
            .collect()
    }

    async fn revoke_key(&self, id: &str, now: Millis) -> Result<Option<ApiKey>> {
        sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?")
            .bind(now)
            .bind(id)
            .execute(&self.writer)
            .await?;
        let row = sqlx::query("SELECT * FROM api_keys WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.writer)
            .await?;
        row.as_ref()
            .map(|r| key_from_row(r).map(|k| k.info))
            .transpose()
    }

    async fn touch_key(&self, id: &str, now: Millis) -> Result<()> {
        sqlx::query("UPDATE api_keys SET last_used_at = ? WHERE id = ?")
            .bind(now)
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn count_keys(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&self.writer)
            .await?;
        Ok(n as u64)
    }

    async fn record_event(
        &self,
        kind: &str,
        task_id: Option<&str>,
        daemon_id: Option<&str>,
        data: serde_json::Value,
        now: Millis,
    ) -> Result<Event> {
        let mut tx = self.writer.begin().await?;
        let ev = insert_event(&mut tx, kind, task_id, daemon_id, data, now).await?;
        tx.commit().await?;
        Ok(ev)
    }

    async fn events_after(&self, after_id: i64, limit: u32) -> Result<Vec<Event>> {
        let rows = sqlx::query("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?")
            .bind(after_id)
            .bind(limit as i64)
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(event_from_row).collect()
    }
}

/// Key records carry RFC 3339 strings; the table wants milliseconds.
fn now_from_rfc3339(s: &str) -> i64 {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .unwrap_or(0)
}
