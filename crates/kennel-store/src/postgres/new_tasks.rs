//! New tasks on PostgreSQL: the shortest way from a submit to its commit.
//!
//! A submit is the one write a task's latency waits for (submit → `spawnTask`), so new tasks
//! have a writer of their own ([`run`]) instead of joining the groups of reports and other
//! calls ([`super::group`]). It takes every new task already queued and stores them in one
//! statement, which is its own transaction: the tasks (those the coordinator dispatches at
//! once, already dispatched as attempt 1), their attempts and their events, with the events'
//! ids drawn as every other write draws them ([`super::insert_events`]). One round trip and
//! one commit, where a group spends one each on `BEGIN`, the tasks, their dispatch, the events
//! and `COMMIT`.
//!
//! New tasks lock no existing row, so this writer cannot deadlock with the groups. The state
//! machine still decides each dispatch ([`machine::dispatch`]) on the facts of a task nobody
//! else can see yet; the statement only writes what it decided.
//!
//! A failing statement stored nothing: each of its tasks is stored again alone, so only the
//! failing one (a duplicate id, say) gets the error. A statement whose answer was lost (the
//! connection dropped) may have committed: every caller gets
//! [`StoreError::CommitUnknown`], and none is stored again.

use std::sync::Arc;

use kennel_proto::api::{Event, Task};
use sqlx::postgres::PgPool;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

use super::bind_events;
use super::group::CreatedDispatched;
use crate::events::NewEvent;
use crate::machine::{self, TaskFacts};
use crate::rows::to_json;
use crate::{rfc3339, Millis, QueuedTask, Result, StoreError};

/// Most tasks in one statement.
const MAX_BATCH: usize = 256;

/// A task to store, dispatched at once to `dispatch_to` if given, and where its answer goes.
pub(super) struct NewCall {
    pub task: Task,
    pub dispatch_to: Option<String>,
    pub now: Millis,
    pub reply: oneshot::Sender<Result<CreatedDispatched>>,
}

/// The writer of new tasks: stores the tasks queued at a time in one statement, until every
/// sender is gone.
pub(super) async fn run(pool: PgPool, mut queue: mpsc::UnboundedReceiver<NewCall>) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(call) => batch.push(call),
                Err(_) => break,
            }
        }
        batch.retain(|c| !c.reply.is_closed());
        match store(&pool, &batch).await {
            Ok(done) => {
                for (call, done) in batch.into_iter().zip(done) {
                    let _ = call.reply.send(Ok(done));
                }
            }
            Err(e) if batch.len() == 1 => {
                let _ = batch.remove(0).reply.send(Err(e.into_error()));
            }
            Err(Failed::Statement(_)) => {
                // Nothing was stored: each task again, alone, so only the failing one fails.
                for call in batch {
                    let answer = match store(&pool, std::slice::from_ref(&call)).await {
                        Ok(mut done) => done.pop().ok_or_else(not_stored),
                        Err(e) => Err(e.into_error()),
                    };
                    let _ = call.reply.send(answer);
                }
            }
            Err(e) => {
                for call in batch {
                    let _ = call.reply.send(Err(e.to_error()));
                }
            }
        }
    }
}

fn not_stored() -> StoreError {
    StoreError::Corrupt("a new task was not stored".into())
}

/// Why a batch was not stored.
#[derive(Debug)]
enum Failed {
    /// No connection: nothing was sent.
    Connecting(Arc<sqlx::Error>),
    /// The database refused the statement: nothing was stored.
    Statement(sqlx::Error),
    /// The answer was lost: the statement may have committed.
    Unknown(Arc<sqlx::Error>),
    /// The database answered something the batch cannot have stored.
    Corrupt(String),
}

impl Failed {
    /// What every caller of the batch is told.
    fn to_error(&self) -> StoreError {
        match self {
            Failed::Connecting(e) => StoreError::NotStored(e.clone()),
            // Not `Clone`: its message is kept.
            Failed::Statement(e) => {
                StoreError::NotStored(Arc::new(sqlx::Error::Protocol(e.to_string())))
            }
            Failed::Unknown(e) => StoreError::CommitUnknown(e.clone()),
            Failed::Corrupt(why) => StoreError::Corrupt(why.clone()),
        }
    }

    /// What the one caller of a batch of one is told: a refused statement as the database
    /// said it.
    fn into_error(self) -> StoreError {
        match self {
            Failed::Statement(e) => StoreError::Postgres(e),
            other => other.to_error(),
        }
    }
}

/// One task of a batch as it will be stored, with its events.
struct Stored<'a> {
    call: &'a NewCall,
    /// The task after its dispatch, when it goes out at once.
    dispatched: Option<Task>,
    attempt_status: Option<&'static str>,
    events: Vec<NewEvent>,
}

impl<'a> Stored<'a> {
    /// Decides `call`'s dispatch, if any, with the state machine, on the facts of a task
    /// nobody else can see yet.
    fn decide(call: &'a NewCall) -> Stored<'a> {
        let task = &call.task;
        let mut events = vec![NewEvent::task_created(task)];
        let facts = TaskFacts {
            status: task.status,
            attempt: task.attempt,
            max_attempts: task.max_attempts,
            returned_attempts: 0,
        };
        let first = task.attempt + 1;
        let going = call
            .dispatch_to
            .as_ref()
            .and_then(|daemon| Some((daemon, machine::dispatch(&facts, first)?)));
        let (dispatched, attempt_status) = match going {
            Some((daemon, step)) => {
                let mut t = task.clone();
                t.status = step.task;
                t.attempt = first;
                t.daemon_id = Some(daemon.clone());
                t.updated_at = rfc3339(call.now);
                t.error = None;
                events.push(NewEvent::task_status(&t));
                (Some(t), Some(step.attempt.as_str()))
            }
            None => (None, None),
        };
        Stored {
            call,
            dispatched,
            attempt_status,
            events,
        }
    }

    /// The row as stored: the dispatched task if it goes out, else the new one.
    fn row(&self) -> &Task {
        self.dispatched.as_ref().unwrap_or(&self.call.task)
    }
}

/// The statement that stores a batch: its tasks, the attempts of those dispatched, and their
/// events, with ids drawn as [`super::insert_events`] draws them.
const STORE_NEW: &str = "\
WITH d AS (SELECT draw_event_ids($21) AS ids), \
t AS (INSERT INTO tasks (id, name, prompt, repo_url, base_branch, agent, labels, priority, \
 env, timeout_secs, max_attempts, status, attempt, daemon_id, created_at, updated_at, session) \
 SELECT id, name, prompt, repo_url, base_branch, agent, labels, priority, env, timeout_secs, \
 max_attempts, status, attempt, daemon_id, created, updated, session \
 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
 $7::text[], $8::bigint[], $9::text[], $10::bigint[], $11::bigint[], $12::text[], \
 $13::bigint[], $14::text[], $15::bigint[], $16::bigint[], $17::text[]) WITH ORDINALITY \
 AS t(id, name, prompt, repo_url, base_branch, agent, labels, priority, env, timeout_secs, \
 max_attempts, status, attempt, daemon_id, created, updated, session, n) \
 ORDER BY n RETURNING id, seq), \
a AS (INSERT INTO attempts (task_id, attempt, daemon_id, status, dispatched_at) \
 SELECT tid, n, holder, status, at FROM UNNEST($18::text[], $19::bigint[], $20::text[], \
 $22::text[], $23::bigint[]) AS a(tid, n, holder, status, at)), \
e AS (INSERT INTO events (id, kind, task_id, daemon_id, data, at) \
 SELECT d.ids[e.n], e.kind, e.task_id, e.daemon_id, e.data, e.at \
 FROM d, UNNEST($24::text[], $25::text[], $26::text[], $27::text[], $28::bigint[]) \
 WITH ORDINALITY AS e(kind, task_id, daemon_id, data, at, n)) \
SELECT t.id, t.seq, d.ids FROM t, d";

/// Stores `batch` in one statement; answers in its order.
async fn store(
    pool: &PgPool,
    batch: &[NewCall],
) -> std::result::Result<Vec<CreatedDispatched>, Failed> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let stored: Vec<Stored<'_>> = batch.iter().map(Stored::decide).collect();
    let rows: Vec<&Task> = stored.iter().map(Stored::row).collect();
    let text = |f: fn(&Task) -> Option<String>| rows.iter().map(|t| f(t)).collect::<Vec<_>>();
    let number = |f: fn(&Task) -> Option<i64>| rows.iter().map(|t| f(t)).collect::<Vec<_>>();
    let at = |f: fn(&NewCall) -> Millis| batch.iter().map(f).collect::<Vec<_>>();
    let sent: Vec<(&Task, &str)> = stored
        .iter()
        .filter_map(|s| Some((s.dispatched.as_ref()?, s.attempt_status?)))
        .collect();
    let events: Vec<(&NewEvent, Millis)> = stored
        .iter()
        .flat_map(|s| s.events.iter().map(|e| (e, s.call.now)))
        .collect();
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| Failed::Connecting(Arc::new(e)))?;
    let query = sqlx::query(STORE_NEW)
        .bind(text(|t| Some(t.id.clone())))
        .bind(text(|t| Some(t.name.clone())))
        .bind(text(|t| Some(t.prompt.clone())))
        .bind(text(|t| t.repo.as_ref().map(|r| r.url.clone())))
        .bind(text(|t| t.repo.as_ref().map(|r| r.base_branch.clone())))
        .bind(text(|t| Some(t.agent.clone())))
        .bind(text(|t| Some(to_json(&t.labels))))
        .bind(number(|t| Some(i64::from(t.priority))))
        .bind(text(|t| Some(to_json(&t.env))))
        .bind(number(|t| t.timeout_secs.map(|v| v as i64)))
        .bind(number(|t| Some(i64::from(t.max_attempts))))
        .bind(text(|t| Some(t.status.as_str().to_string())))
        .bind(number(|t| Some(i64::from(t.attempt))))
        .bind(text(|t| t.daemon_id.clone()))
        .bind(at(|c| c.now))
        .bind(at(|c| c.now))
        .bind(text(|t| t.session.as_ref().map(to_json)))
        .bind(sent.iter().map(|(t, _)| t.id.clone()).collect::<Vec<_>>())
        .bind(
            sent.iter()
                .map(|(t, _)| i64::from(t.attempt))
                .collect::<Vec<_>>(),
        )
        .bind(
            sent.iter()
                .map(|(t, _)| t.daemon_id.clone())
                .collect::<Vec<_>>(),
        )
        .bind(events.len() as i32)
        .bind(sent.iter().map(|(_, s)| s.to_string()).collect::<Vec<_>>())
        .bind(
            stored
                .iter()
                .filter(|s| s.dispatched.is_some())
                .map(|s| s.call.now)
                .collect::<Vec<_>>(),
        );
    let answer = bind_events(query, &events).fetch_all(&mut *conn).await;
    let answer = match answer {
        Ok(rows) => rows,
        Err(e @ sqlx::Error::Database(_)) => return Err(Failed::Statement(e)),
        Err(e) => return Err(Failed::Unknown(Arc::new(e))),
    };
    let corrupt = |e: sqlx::Error| Failed::Corrupt(e.to_string());
    let mut order = std::collections::HashMap::with_capacity(answer.len());
    let mut ids = None;
    for row in &answer {
        order.insert(
            row.try_get::<String, _>(0).map_err(corrupt)?,
            row.try_get::<i64, _>(1).map_err(corrupt)?,
        );
        ids = Some(row.try_get::<Vec<i64>, _>(2).map_err(corrupt)?);
    }
    let ids = ids.ok_or_else(|| Failed::Corrupt("no task of the batch was stored".into()))?;
    if ids.len() != events.len() {
        return Err(Failed::Corrupt(format!(
            "{} event ids drawn for {} events",
            ids.len(),
            events.len()
        )));
    }
    let mut ids = ids.into_iter();
    let mut done = Vec::with_capacity(stored.len());
    for s in stored {
        let task = &s.call.task;
        let order = order.get(&task.id).copied().ok_or_else(|| {
            Failed::Corrupt(format!("task {} was not stored with the others", task.id))
        })?;
        let mut events = s
            .events
            .into_iter()
            .zip(ids.by_ref())
            .map(|(e, id)| -> Event { e.stored(id, s.call.now) });
        let created = events
            .next()
            .ok_or_else(|| Failed::Corrupt("no event".into()))?;
        let sent = match (s.dispatched, events.next()) {
            (Some(t), Some(e)) => Some((t, e)),
            _ => None,
        };
        let queued = QueuedTask {
            order,
            task: task.clone(),
        };
        done.push((queued, created, sent));
    }
    Ok(done)
}
