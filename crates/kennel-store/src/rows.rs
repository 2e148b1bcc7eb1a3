//! What a stored row means, for every backend: the columns the backends select, and the one
//! decoding of those rows into kennel's types (tasks, attempts, output, daemons, keys, events)
//! and into the facts the state machine reads; and the few values a change stores in a form of
//! its own (JSON texts, a chunk of progress).
//!
//! A backend supplies only how to read one column of its rows ([`Columns`]); it must not decode
//! a row itself, so the backends cannot drift apart. The SQL here has no parameters, whose
//! spelling differs between backends; both schemas use the same table and column names.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::str::FromStr;

use kennel_proto::api::{ApiKey, Attempt, Daemon, Event, OutputChunk, Task};
use kennel_proto::link::{OutputStream, RepoSpec};
use kennel_proto::TaskStatus;

use crate::machine::{AttemptFacts, Chunk, TaskFacts};
use crate::{parse_scopes, rfc3339, KeyRecord, QueuedTask, Result, StoreError};

/// One result row, read by column position. Integers are 64-bit in both schemas; flags are
/// booleans (integers 0 and 1 in SQLite).
pub(crate) trait Columns {
    fn text(&self, at: usize) -> Result<String>;
    fn text_opt(&self, at: usize) -> Result<Option<String>>;
    fn int(&self, at: usize) -> Result<i64>;
    fn int_opt(&self, at: usize) -> Result<Option<i64>>;
    fn flag(&self, at: usize) -> Result<bool>;
    fn bytes(&self, at: usize) -> Result<Vec<u8>>;
}

/// Implements [`Columns`] for a backend's row type whose method `$get` reads a column by
/// position into any type the column converts to.
macro_rules! impl_columns {
    ($row:ty, $get:ident) => {
        impl $crate::rows::Columns for $row {
            fn text(&self, at: usize) -> $crate::Result<String> {
                Ok(self.$get(at)?)
            }
            fn text_opt(&self, at: usize) -> $crate::Result<Option<String>> {
                Ok(self.$get(at)?)
            }
            fn int(&self, at: usize) -> $crate::Result<i64> {
                Ok(self.$get(at)?)
            }
            fn int_opt(&self, at: usize) -> $crate::Result<Option<i64>> {
                Ok(self.$get(at)?)
            }
            fn flag(&self, at: usize) -> $crate::Result<bool> {
                Ok(self.$get(at)?)
            }
            fn bytes(&self, at: usize) -> $crate::Result<Vec<u8>> {
                Ok(self.$get(at)?)
            }
        }
    };
}
pub(crate) use impl_columns;

/// The columns each decoder below reads, in its order, as a literal for `concat!`:
/// `columns!(task)` for [`task`], `columns!(task_facts)` for [`task_facts`] (from `tasks`),
/// `columns!(attempt_facts)` for [`attempt_facts`] (from `attempts a` joined with `tasks t`),
/// and `attempt`, `output`, `key`, `event` for the tables `attempts`, `task_output`,
/// `api_keys` and `events`.
macro_rules! columns {
    (task) => {
        "seq, id, name, prompt, repo_url, base_branch, agent, labels, priority, env, \
         timeout_secs, max_attempts, status, attempt, daemon_id, created_at, updated_at, \
         finished_at, error, exit_code, branch, commit_sha, session"
    };
    (task_facts) => {
        "status, attempt, max_attempts, returned_attempts"
    };
    (attempt_facts) => {
        "a.daemon_id, a.status, a.last_seq, t.status, t.attempt, t.max_attempts, \
         t.returned_attempts"
    };
    (attempt) => {
        "attempt, daemon_id, status, dispatched_at, started_at, finished_at, error"
    };
    (output) => {
        "seq, stream, output, is_partial, at"
    };
    (key) => {
        "id, name, hash, scopes, created_at, last_used_at, revoked_at"
    };
    (event) => {
        "id, kind, task_id, daemon_id, data, at"
    };
}
pub(crate) use columns;

/// The statuses of a task that holds a live attempt, as an SQL list (`'dispatched',…`), from
/// [`TaskStatus::is_active`] so that the SQL cannot drift from the enum.
pub(crate) fn active_statuses() -> String {
    let quoted: Vec<String> = TaskStatus::ALL
        .into_iter()
        .filter(|s| s.is_active())
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    quoted.join(",")
}

/// Selects every task holding a live attempt, oldest first.
pub(crate) fn active_tasks_select() -> String {
    format!(
        concat!(
            "SELECT ",
            columns!(task),
            " FROM tasks WHERE status IN ({}) ORDER BY seq"
        ),
        active_statuses()
    )
}

/// Selects daemons (`daemons d`) with their live task count, as [`daemon`] reads them; `tail`
/// joins, filters and orders.
pub(crate) fn daemon_select(tail: &str) -> String {
    format!(
        "SELECT d.id, d.machine_id, d.hostname, d.connected, d.draining, \
         d.max_concurrent_tasks, d.labels, d.agents, d.version, d.protocol_version, \
         d.connected_at, d.last_seen_at, d.key_id, \
         (SELECT COUNT(*) FROM tasks t WHERE t.daemon_id = d.id \
         AND t.status IN ({})) AS active_tasks FROM daemons d {tail}",
        active_statuses()
    )
}

/// Parses a status as stored; an unknown one is corrupt data, never guessed.
pub(crate) fn status<T: FromStr>(s: &str) -> Result<T> {
    s.parse()
        .map_err(|_| StoreError::Corrupt(format!("unknown status `{s}`")))
}

fn json_map(s: &str, what: &str) -> Result<BTreeMap<String, String>> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// A value as the JSON text the tables hold.
pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> String {
    // Maps of strings and JSON values always serialise.
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// A counter stored as a 64-bit integer.
fn count(v: i64) -> u32 {
    v as u32
}

/// Reads a row of `columns!(task)`.
pub(crate) fn task(row: &impl Columns) -> Result<QueuedTask> {
    let repo_url = row.text_opt(4)?;
    let base_branch = row.text_opt(5)?;
    Ok(QueuedTask {
        order: row.int(0)?,
        task: Task {
            id: row.text(1)?,
            name: row.text(2)?,
            prompt: row.text(3)?,
            repo: repo_url.map(|url| RepoSpec {
                url,
                base_branch: base_branch.unwrap_or_default(),
            }),
            agent: row.text(6)?,
            labels: json_map(&row.text(7)?, "task labels")?,
            priority: row.int(8)? as i32,
            env: json_map(&row.text(9)?, "task env")?,
            timeout_secs: row.int_opt(10)?.map(|v| v as u64),
            max_attempts: count(row.int(11)?),
            status: status(&row.text(12)?)?,
            attempt: count(row.int(13)?),
            daemon_id: row.text_opt(14)?,
            created_at: rfc3339(row.int(15)?),
            updated_at: rfc3339(row.int(16)?),
            finished_at: row.int_opt(17)?.map(rfc3339),
            error: row.text_opt(18)?,
            exit_code: row.int_opt(19)?.map(|v| v as i32),
            branch: row.text_opt(20)?,
            commit: row.text_opt(21)?,
            waiting: None,
            session: row
                .text_opt(22)?
                .map(|s| serde_json::from_str(&s))
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("task session: {e}")))?,
        },
    })
}

/// Reads [`TaskFacts`] from the columns `columns!(task_facts)`, starting at column `at`.
pub(crate) fn task_facts(row: &impl Columns, at: usize) -> Result<TaskFacts> {
    Ok(TaskFacts {
        status: status(&row.text(at)?)?,
        attempt: count(row.int(at + 1)?),
        max_attempts: count(row.int(at + 2)?),
        returned_attempts: count(row.int(at + 3)?),
    })
}

/// Reads [`AttemptFacts`] from the columns `columns!(attempt_facts)`, starting at column `at`.
pub(crate) fn attempt_facts(row: &impl Columns, at: usize) -> Result<AttemptFacts> {
    Ok(AttemptFacts {
        holder: row.text(at)?,
        status: status(&row.text(at + 1)?)?,
        last_seq: row.int(at + 2)? as u64,
        task: task_facts(row, at + 3)?,
    })
}

/// Reads a row of `columns!(attempt)`.
pub(crate) fn attempt(row: &impl Columns) -> Result<Attempt> {
    Ok(Attempt {
        attempt: count(row.int(0)?),
        daemon_id: row.text(1)?,
        status: status(&row.text(2)?)?,
        dispatched_at: rfc3339(row.int(3)?),
        started_at: row.int_opt(4)?.map(rfc3339),
        finished_at: row.int_opt(5)?.map(rfc3339),
        error: row.text_opt(6)?,
    })
}

/// Reads a row of `columns!(output)` of attempt `attempt` of `task_id`.
pub(crate) fn output(row: &impl Columns, task_id: &str, attempt: u32) -> Result<OutputChunk> {
    let stream = row.text(1)?;
    Ok(OutputChunk {
        task_id: task_id.to_string(),
        attempt,
        seq: row.int(0)? as u64,
        stream: OutputStream::parse(&stream)
            .ok_or_else(|| StoreError::Corrupt(format!("output stream `{stream}`")))?,
        output: row.text(2)?,
        is_partial: row.flag(3)?,
        at: rfc3339(row.int(4)?),
    })
}

/// Reads a row of [`daemon_select`].
pub(crate) fn daemon(row: &impl Columns) -> Result<Daemon> {
    Ok(Daemon {
        id: row.text(0)?,
        machine_id: row.text(1)?,
        hostname: row.text(2)?,
        connected: row.flag(3)?,
        draining: row.flag(4)?,
        max_concurrent_tasks: count(row.int(5)?),
        labels: json_map(&row.text(6)?, "daemon labels")?,
        agents: serde_json::from_str(&row.text(7)?)
            .map_err(|e| StoreError::Corrupt(format!("daemon agents: {e}")))?,
        version: row.text(8)?,
        protocol_version: count(row.int(9)?),
        connected_at: row.int_opt(10)?.map(rfc3339),
        last_seen_at: row.int_opt(11)?.map(rfc3339),
        key_id: row.text_opt(12)?,
        active_tasks: count(row.int(13)?),
    })
}

/// Reads a row of `columns!(key)`.
pub(crate) fn key(row: &impl Columns) -> Result<KeyRecord> {
    Ok(KeyRecord {
        info: ApiKey {
            id: row.text(0)?,
            name: row.text(1)?,
            scopes: parse_scopes(&row.text(3)?)?,
            created_at: rfc3339(row.int(4)?),
            last_used_at: row.int_opt(5)?.map(rfc3339),
            revoked_at: row.int_opt(6)?.map(rfc3339),
        },
        hash: row.bytes(2)?,
    })
}

/// Reads a row of `columns!(event)`.
pub(crate) fn event(row: &impl Columns) -> Result<Event> {
    Ok(Event {
        id: row.int(0)?,
        kind: row.text(1)?,
        task_id: row.text_opt(2)?,
        daemon_id: row.text_opt(3)?,
        data: serde_json::from_str(&row.text(4)?)
            .map_err(|e| StoreError::Corrupt(format!("event data: {e}")))?,
        at: rfc3339(row.int(5)?),
    })
}

/// A chunk of output as `task_output` stores it: stream, text and whether it is partial.
/// Progress is stored as JSON on its own stream.
pub(crate) fn stored_chunk<'c>(chunk: &Chunk<'c>) -> (OutputStream, Cow<'c, str>, bool) {
    match chunk {
        Chunk::Output {
            stream,
            text,
            is_partial,
        } => (*stream, Cow::Borrowed(*text), *is_partial),
        Chunk::Progress { summary, detail } => {
            let progress = match detail {
                Some(d) => to_json(&serde_json::json!({"summary": summary, "detail": d})),
                None => to_json(&serde_json::json!({ "summary": summary })),
            };
            (OutputStream::Progress, Cow::Owned(progress), false)
        }
    }
}
