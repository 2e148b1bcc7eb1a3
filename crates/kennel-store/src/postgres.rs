//! The PostgreSQL store: several coordinators on one database, each with its own [`PgStore`]
//! (a small pool of connections). Every write that records events goes through the store's
//! writers, which commit concurrent calls together ([`group`]); anything else is one
//! statement on the pool.
//!
//! What keeps it correct with several writers at once:
//! - the task lifecycle ([`lifecycle`]) locks the rows it decides on before the state machine
//!   decides, tasks in id order, so coordinators wait for each other instead of deciding on
//!   stale facts, and one attempt can be dispatched only once;
//! - event ids come from a sequence, without a lock ([`insert_events`]), so they are
//!   committed out of order and some go missing for good (rolled back); a reader resuming
//!   after an id (`events_after`, SSE's `Last-Event-ID` on any coordinator) stops at a missing
//!   id until it is committed or can no longer be, so it never skips one;
//! - revoking a key locks the live keys it counts; a daemon's link is ended only by the
//!   coordinator holding it, checked under the daemon row's lock.
//!
//! This module holds the SQL only: the rules are the machine's (`machine`), what rows mean is
//! `rows`, what events say is `events`. It never logs or reports the URL's password.

mod agents;
mod group;
mod lifecycle;
mod new_tasks;
mod schema;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use kennel_proto::api::{ApiKey, Attempt, Daemon, Event, OutputChunk, Task};
use kennel_proto::{AttemptStatus, TaskStatus};
use sqlx::postgres::{
    PgArguments, PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow, Postgres,
};
use sqlx::{Connection, Row};

use self::group::Tx;
use crate::events::NewEvent;
use crate::rows::{self, columns, daemon_select, to_json};
use crate::{
    millis_from_rfc3339, Applied, DaemonHello, Dispatch, EndAttempt, Ended, GatewayOp, GatewayRows,
    GatewayStore, KeyRecord, Millis, NewTask, QueuedTask, Report, Result, Retry, Revoke, Store,
    StoreError, TaskFilter,
};

/// Connections per store (per coordinator): enough for the scheduler, the daemon links' report
/// batches and API reads to overlap, few enough that three coordinators stay far below
/// PostgreSQL's default of 100 connections.
const POOL_SIZE: u32 = 8;

/// How long connecting, or waiting for a free connection, may take before the call fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection idle for longer is pinged before use, so one the server dropped meanwhile is
/// replaced instead of failing a call; busier ones are used at once (a ping per call would
/// double the round trips).
const PING_WHEN_IDLE: Duration = Duration::from_secs(5);

/// PostgreSQL implementation of [`Store`] and [`GatewayStore`]. Cloning shares the pool and
/// the writers.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The connection new tasks are stored on ([`new_tasks`]).
    new_tasks: PgPool,
    /// Where every write that records events goes, to share commits ([`group`]).
    writers: group::Writers,
    /// Heartbeats not yet written: daemon id → when last seen.
    seen: Arc<Mutex<HashMap<String, Millis>>>,
    /// What settles event ids found missing ([`PgStore::events_after`]).
    probe: Arc<Mutex<Option<Probe>>>,
}

rows::impl_columns!(PgRow, try_get);

impl PgStore {
    /// Whether `location` names a PostgreSQL database rather than a SQLite file.
    pub(crate) fn handles(location: &str) -> bool {
        location.starts_with("postgres://") || location.starts_with("postgresql://")
    }

    /// Connects to the database at `url` (`postgres://user:password@host:port/database`; the
    /// parameter `options=-c search_path=NAME` picks the schema, which must exist) and brings
    /// its schema up to date.
    pub async fn connect(url: &str) -> Result<PgStore> {
        let open_err = |e: sqlx::Error| StoreError::Open {
            path: redact(url),
            source: e.into(),
        };
        let options = connect_options(url, "force_custom_plan").map_err(open_err)?;
        let pool = open_pool(options, POOL_SIZE).await.map_err(open_err)?;
        schema::migrate(&pool).await?;
        // The statement storing new tasks inserts from its parameters and reads no table, so
        // one plan does for every run: its own connection keeps it (`force_generic_plan`)
        // instead of planning it again each time (the store's other statements must be).
        let options = connect_options(url, "force_generic_plan").map_err(open_err)?;
        let new_tasks = open_pool(options, 1).await.map_err(open_err)?;
        let writers = group::Writers::start(pool.clone(), new_tasks.clone());
        let seen = Arc::default();
        tokio::spawn(write_seen(pool.clone(), Arc::downgrade(&seen)));
        Ok(PgStore {
            pool,
            new_tasks,
            writers,
            seen,
            probe: Arc::default(),
        })
    }

    /// Ends the task `task_id`, if still queued, as `status` for `reason`.
    async fn end_queued(
        &self,
        task_id: &str,
        status: TaskStatus,
        reason: &str,
        now: Millis,
    ) -> Result<Option<Ended>> {
        let input = (task_id.to_string(), status, reason.to_string(), now);
        self.writers
            .call(
                vec![input.0.clone()],
                input,
                |tx, (id, status, reason, now)| {
                    Box::pin(lifecycle::end_queued(tx, id, *status, reason, *now))
                },
            )
            .await
    }

    /// Writes the heartbeats not yet written, then closes every connection; calls made
    /// afterwards fail.
    pub async fn close(&self) {
        let _ = flush_seen(&self.pool, &self.seen).await;
        self.pool.close().await;
        self.new_tasks.close().await;
    }

    /// Runs `query` on the pool and decodes every row it returns with `decode`.
    async fn rows<T>(
        &self,
        query: Query<'_>,
        decode: impl Fn(&PgRow) -> Result<T>,
    ) -> Result<Vec<T>> {
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(decode).collect()
    }
}

/// How often heartbeats are written. 10,000 daemons heartbeating every 5 s make 2,000 a second:
/// written as they come that is 2,000 commits a second for a timestamp only the rescue of
/// stranded attempts reads (with a margin of seconds); written together it is one statement.
const SEEN_EVERY: Duration = Duration::from_secs(1);

/// Writes the heartbeats `seen` collects every [`SEEN_EVERY`], until the store is gone.
async fn write_seen(pool: PgPool, seen: Weak<Mutex<HashMap<String, Millis>>>) {
    let mut tick = tokio::time::interval(SEEN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(seen) = seen.upgrade() else {
            return;
        };
        if let Err(e) = flush_seen(&pool, &seen).await {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "failed to record daemons' heartbeats; trying again in {SEEN_EVERY:?}"
            );
        }
    }
}

/// Writes the heartbeats in `seen` in one statement; on failure they are kept for the next try
/// (unless a newer one came meanwhile).
async fn flush_seen(pool: &PgPool, seen: &Mutex<HashMap<String, Millis>>) -> Result<()> {
    let taken = std::mem::take(&mut *seen.lock().unwrap_or_else(|p| p.into_inner()));
    if taken.is_empty() {
        return Ok(());
    }
    // In id order, like every other writer of several daemon rows.
    let mut rows: Vec<(String, Millis)> = taken.into_iter().collect();
    rows.sort_unstable();
    let written = sqlx::query(
        "UPDATE daemons SET last_seen_at = GREATEST(last_seen_at, s.at) \
         FROM UNNEST($1::text[], $2::bigint[]) AS s(id, at) WHERE daemons.id = s.id",
    )
    .bind(rows.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, at)| *at).collect::<Vec<_>>())
    .execute(pool)
    .await;
    if let Err(e) = written {
        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        for (id, at) in rows {
            seen.entry(id).or_insert(at);
        }
        return Err(e.into());
    }
    Ok(())
}

/// `url` without its password and parameters, for messages.
fn redact(url: &str) -> String {
    let base = url.split('?').next().unwrap_or_default();
    let Some((scheme, rest)) = base.split_once("://") else {
        return "(a URL that does not parse)".into();
    };
    match rest.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}@{host}")
        }
        None => format!("{scheme}://{rest}"),
    }
}

type Query<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// Decodes rows of `columns!(task)`.
fn tasks_of(rows: &[PgRow]) -> Result<Vec<QueuedTask>> {
    rows.iter().map(rows::task).collect()
}

/// The ids a write's events were stored with, in the order of its events. While the write
/// runs, its events carry provisional ids ([`group::Tx::events`]): `-(place + 1)`.
#[derive(Debug, Default)]
pub(crate) struct EventIds(Vec<i64>);

impl EventIds {
    /// Gives `event` its stored id if it has a provisional one.
    fn number(&self, event: &mut Event) {
        if event.id < 0 {
            let place = usize::try_from(-event.id - 1).unwrap_or(usize::MAX);
            if let Some(id) = self.0.get(place) {
                event.id = *id;
            }
        }
    }
}

/// Stores `events`, each with its time, in order; returns their ids.
///
/// Ids are drawn from a sequence without a lock (`draw_event_ids`, migration 4), in
/// increasing order within the transaction; transactions commit in any order, and
/// [`PgStore::events_after`] does not pass an id that may still be committed.
async fn insert_events(
    conn: &mut PgConnection,
    events: &[(NewEvent, Millis)],
) -> sqlx::Result<EventIds> {
    if events.is_empty() {
        return Ok(EventIds::default());
    }
    let events: Vec<(&NewEvent, Millis)> = events.iter().map(|(e, at)| (e, *at)).collect();
    let query = sqlx::query(
        "WITH d AS (SELECT draw_event_ids($1) AS ids), \
         stored AS (INSERT INTO events (id, kind, task_id, daemon_id, data, at) \
         SELECT d.ids[e.n], e.kind, e.task_id, e.daemon_id, e.data, e.at \
         FROM d, UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[]) \
         WITH ORDINALITY AS e(kind, task_id, daemon_id, data, at, n)) \
         SELECT ids FROM d",
    )
    .bind(events.len() as i32);
    let row = bind_events(query, &events).fetch_one(&mut *conn).await?;
    Ok(EventIds(row.try_get(0)?))
}

/// Binds the columns of `events` as every insert of events takes them, in this order: kinds,
/// tasks, daemons, data (`text[]` each) and times (`bigint[]`).
fn bind_events<'q>(query: Query<'q>, events: &[(&NewEvent, Millis)]) -> Query<'q> {
    let column =
        |f: fn(&NewEvent) -> Option<String>| events.iter().map(|(e, _)| f(e)).collect::<Vec<_>>();
    query
        .bind(column(|e| Some(e.kind.clone())))
        .bind(column(|e| e.task_id.clone()))
        .bind(column(|e| e.daemon_id.clone()))
        .bind(column(|e| Some(to_json(&e.data))))
        .bind(events.iter().map(|(_, at)| *at).collect::<Vec<_>>())
}

/// Loads one daemon with its live task count.
async fn load_daemon(conn: &mut PgConnection, id: &str) -> Result<Daemon> {
    let row = sqlx::query(&daemon_select("WHERE d.id = $1"))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    let row = row.ok_or_else(|| {
        StoreError::Corrupt(format!("daemon {id} vanished while it was being stored"))
    })?;
    rows::daemon(&row)
}

/// Records a daemon's link as ended, with its event.
async fn disconnect(tx: &mut Tx, daemon_id: &str, reason: &str, now: Millis) -> Result<Event> {
    sqlx::query(
        "WITH s AS (UPDATE daemon_sessions SET disconnected_at = $1, reason = $2 \
         WHERE daemon_id = $3 AND disconnected_at IS NULL) \
         UPDATE daemons SET connected = FALSE, coordinator_id = NULL, last_seen_at = $1 \
         WHERE id = $3",
    )
    .bind(now)
    .bind(reason)
    .bind(daemon_id)
    .execute(&mut **tx)
    .await?;
    Ok(tx.event(NewEvent::daemon_disconnected(daemon_id, reason), now))
}

/// Records a daemon's accepted link: the daemon's row, a session, the event.
async fn connect_daemon(
    tx: &mut Tx,
    daemon_id: &str,
    h: &DaemonHello,
    now: Millis,
) -> Result<(Daemon, Event)> {
    sqlx::query(CONNECT_DAEMON)
        .bind(daemon_id)
        .bind(&h.machine_id)
        .bind(&h.hostname)
        .bind(i64::from(h.max_concurrent_tasks))
        .bind(to_json(&h.labels))
        .bind(to_json(&h.agents))
        .bind(&h.version)
        .bind(i64::from(h.protocol_version))
        .bind(now)
        .bind(&h.key_id)
        .bind(&h.remote_addr)
        .execute(&mut **tx)
        .await?;
    let daemon = load_daemon(tx, daemon_id).await?;
    let event = tx.event(NewEvent::daemon_connected(daemon_id, h), now);
    Ok((daemon, event))
}

/// Upserts a daemon's row as connected and opens a session.
const CONNECT_DAEMON: &str = "WITH d AS (INSERT INTO daemons (id, machine_id, hostname, \
     max_concurrent_tasks, labels, agents, version, protocol_version, connected, connected_at, \
     last_seen_at, key_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, TRUE, $9, $9, $10) \
     ON CONFLICT (id) DO UPDATE SET hostname = excluded.hostname, \
     max_concurrent_tasks = excluded.max_concurrent_tasks, labels = excluded.labels, \
     agents = excluded.agents, version = excluded.version, \
     protocol_version = excluded.protocol_version, connected = TRUE, \
     connected_at = excluded.connected_at, last_seen_at = excluded.last_seen_at, \
     key_id = COALESCE(excluded.key_id, daemons.key_id)) \
     INSERT INTO daemon_sessions (daemon_id, remote_addr, connected_at) VALUES ($1, $11, $9)";

/// [`EndAttempt`] with its text owned, to be run again if its group fails.
struct OwnedEnd {
    task_id: String,
    reason: String,
    attempt: u32,
    status: AttemptStatus,
    retry: Retry,
    terminal: TaskStatus,
}

/// Revokes a key (keeping the time of an earlier revocation) and returns it.
const REVOKE_KEY: &str = concat!(
    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2 RETURNING ",
    columns!(key)
);

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_task(&self, t: NewTask, now: Millis) -> Result<(QueuedTask, Event)> {
        let (queued, created, _) = self.writers.create(t.queued(now), None, now).await?;
        Ok((queued, created))
    }

    /// In one transaction: the dispatch needs no second commit.
    async fn create_and_dispatch(
        &self,
        t: NewTask,
        daemon_id: &str,
        now: Millis,
    ) -> Result<(QueuedTask, Event, Option<(Task, Event)>)> {
        self.writers
            .create(t.queued(now), Some(daemon_id.to_string()), now)
            .await
    }

    async fn get_task(&self, id: &str) -> Result<Option<Task>> {
        let query = sqlx::query(concat!(
            "SELECT ",
            columns!(task),
            " FROM tasks WHERE id = $1"
        ))
        .bind(id);
        Ok(self.rows(query, rows::task).await?.pop().map(|q| q.task))
    }

    async fn get_tasks(&self, ids: &[String]) -> Result<Vec<Task>> {
        let query = sqlx::query(concat!(
            "SELECT ",
            columns!(task),
            " FROM tasks WHERE id = ANY($1)"
        ))
        .bind(ids);
        let tasks = self.rows(query, rows::task).await?;
        Ok(tasks.into_iter().map(|q| q.task).collect())
    }

    async fn list_tasks(&self, f: &TaskFilter) -> Result<Vec<QueuedTask>> {
        let mut sql = String::from(concat!("SELECT ", columns!(task), " FROM tasks WHERE TRUE"));
        let mut n = 0;
        let mut and = |sql: &mut String, condition: &str| {
            n += 1;
            sql.push_str(&format!(" AND {condition} ${n}"));
        };
        if f.status.is_some() {
            and(&mut sql, "status =");
        }
        if f.daemon_id.is_some() {
            and(&mut sql, "daemon_id =");
        }
        if f.before.is_some() {
            and(&mut sql, "seq <");
        }
        sql.push_str(&format!(" ORDER BY seq DESC LIMIT ${}", n + 1));
        let mut query = sqlx::query(&sql);
        if let Some(status) = f.status {
            query = query.bind(status.as_str());
        }
        if let Some(daemon) = &f.daemon_id {
            query = query.bind(daemon);
        }
        if let Some(before) = f.before {
            query = query.bind(before);
        }
        self.rows(query.bind(i64::from(f.limit)), rows::task).await
    }

    async fn list_attempts(&self, task_id: &str) -> Result<Vec<Attempt>> {
        let query = sqlx::query(concat!(
            "SELECT ",
            columns!(attempt),
            " FROM attempts WHERE task_id = $1 ORDER BY attempt"
        ));
        self.rows(query.bind(task_id), rows::attempt).await
    }

    async fn queued_tasks(&self) -> Result<Vec<QueuedTask>> {
        let query = sqlx::query(concat!(
            "SELECT ",
            columns!(task),
            " FROM tasks WHERE status = $1 ORDER BY seq"
        ));
        let queued = TaskStatus::Queued.as_str();
        self.rows(query.bind(queued), rows::task).await
    }

    async fn active_tasks(&self) -> Result<Vec<Task>> {
        let sql = rows::active_tasks_select();
        let tasks = self.rows(sqlx::query(&sql), rows::task).await?;
        Ok(tasks.into_iter().map(|q| q.task).collect())
    }

    async fn count_tasks(&self) -> Result<BTreeMap<TaskStatus, u64>> {
        let rows = sqlx::query("SELECT status, COUNT(*) FROM tasks GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        let mut out = BTreeMap::new();
        for row in &rows {
            let status: String = row.try_get(0)?;
            let n: i64 = row.try_get(1)?;
            out.insert(rows::status(&status)?, n as u64);
        }
        Ok(out)
    }

    async fn dispatch(
        &self,
        batch: &[Dispatch],
        now: Millis,
    ) -> Result<Vec<Option<(Task, Event)>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        // No tasks to lock first: a dispatch skips tasks others hold rather than wait for them.
        self.writers
            .call(Vec::new(), (batch.to_vec(), now), |tx, (batch, now)| {
                Box::pin(lifecycle::dispatch(tx, batch, *now))
            })
            .await
    }

    async fn apply(&self, batch: &[Report], now: Millis) -> Result<Vec<Applied>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.writers.apply(batch.to_vec(), now).await
    }

    async fn end_attempt(&self, end: &EndAttempt<'_>, now: Millis) -> Result<Option<Ended>> {
        let owned = OwnedEnd {
            task_id: end.task_id.to_string(),
            reason: end.reason.to_string(),
            attempt: end.attempt,
            status: end.status,
            retry: end.retry,
            terminal: end.terminal,
        };
        let tasks = vec![owned.task_id.clone()];
        self.writers
            .call(tasks, (owned, now), |tx, (owned, now)| {
                Box::pin(async move {
                    let end = EndAttempt {
                        task_id: &owned.task_id,
                        reason: &owned.reason,
                        attempt: owned.attempt,
                        status: owned.status,
                        retry: owned.retry,
                        terminal: owned.terminal,
                    };
                    lifecycle::end_attempt(tx, &end, *now).await
                })
            })
            .await
    }

    async fn cancel_queued(&self, task_id: &str, now: Millis) -> Result<Option<Ended>> {
        let why = "cancelled before it ran";
        self.end_queued(task_id, TaskStatus::Cancelled, why, now)
            .await
    }

    async fn fail_queued(&self, task_id: &str, reason: &str, now: Millis) -> Result<Option<Ended>> {
        self.end_queued(task_id, TaskStatus::Failed, reason, now)
            .await
    }

    async fn set_paused(
        &self,
        task_id: &str,
        attempt: u32,
        paused: bool,
        now: Millis,
    ) -> Result<Option<Ended>> {
        let input = (task_id.to_string(), attempt, paused, now);
        self.writers
            .call(
                vec![input.0.clone()],
                input,
                |tx, (task_id, attempt, paused, now)| {
                    Box::pin(lifecycle::set_paused(tx, task_id, *attempt, *paused, *now))
                },
            )
            .await
    }

    async fn task_output(
        &self,
        task_id: &str,
        attempt: u32,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<OutputChunk>> {
        let query = sqlx::query(concat!(
            "SELECT ",
            columns!(output),
            " FROM task_output WHERE task_id = $1 AND attempt = $2 AND seq > $3 \
             ORDER BY seq LIMIT $4"
        ))
        .bind(task_id)
        .bind(i64::from(attempt))
        .bind(after_seq as i64)
        .bind(i64::from(limit));
        self.rows(query, |row| rows::output(row, task_id, attempt))
            .await
    }

    async fn daemon_connected(
        &self,
        daemon_id: &str,
        h: &DaemonHello,
        now: Millis,
    ) -> Result<(Daemon, Event)> {
        let input = (daemon_id.to_string(), h.clone(), now);
        self.writers
            .call(Vec::new(), input, |tx, (id, h, now)| {
                Box::pin(connect_daemon(tx, id, h, *now))
            })
            .await
    }

    async fn daemon_disconnected(
        &self,
        daemon_id: &str,
        reason: &str,
        now: Millis,
    ) -> Result<Event> {
        let input = (daemon_id.to_string(), reason.to_string(), now);
        self.writers
            .call(Vec::new(), input, |tx, (id, reason, now)| {
                Box::pin(disconnect(tx, id, reason, *now))
            })
            .await
    }

    async fn daemon_held_by(&self, daemon_id: &str, coordinator: &str) -> Result<()> {
        sqlx::query("UPDATE daemons SET coordinator_id = $1 WHERE id = $2")
            .bind(coordinator)
            .bind(daemon_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn daemon_left(
        &self,
        daemon_id: &str,
        coordinator: &str,
        reason: &str,
        now: Millis,
    ) -> Result<Option<Event>> {
        let input = (
            daemon_id.to_string(),
            coordinator.to_string(),
            reason.to_string(),
        );
        self.writers
            .call(
                Vec::new(),
                (input, now),
                |tx, ((id, coordinator, reason), now)| {
                    Box::pin(async move {
                        let held: Option<Option<String>> = sqlx::query_scalar(
                            "SELECT coordinator_id FROM daemons WHERE id = $1 FOR UPDATE",
                        )
                        .bind(id)
                        .fetch_optional(&mut **tx)
                        .await?;
                        if matches!(&held, Some(Some(c)) if c != coordinator) {
                            return Ok(None);
                        }
                        Ok(Some(disconnect(tx, id, reason, *now).await?))
                    })
                },
            )
            .await
    }

    async fn coordinator_seen(&self, coordinator: &str, now: Millis) -> Result<()> {
        sqlx::query(
            "INSERT INTO coordinators (id, started_at, seen_at) VALUES ($1, $2, $2) \
             ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
        )
        .bind(coordinator)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn stranded_daemons(&self, before: Millis) -> Result<Vec<Daemon>> {
        let sql = daemon_select(
            "LEFT JOIN coordinators c ON c.id = d.coordinator_id \
             WHERE d.connected AND COALESCE(d.connected_at, 0) < $1 \
             AND (c.id IS NULL OR c.seen_at < $1) ORDER BY d.id",
        );
        self.rows(sqlx::query(&sql).bind(before), rows::daemon)
            .await
    }

    async fn lease(&self, name: &str, holder: &str, now: Millis, ttl_ms: i64) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO leases (name, holder, until) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
             until = excluded.until WHERE leases.holder = excluded.holder \
             OR leases.until < $4",
        )
        .bind(name)
        .bind(holder)
        .bind(now.saturating_add(ttl_ms))
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Recorded now and written within [`SEEN_EVERY`], with the other heartbeats of that
    /// second.
    async fn daemon_seen(&self, daemon_id: &str, now: Millis) -> Result<()> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let at = seen.entry(daemon_id.to_string()).or_insert(now);
        *at = (*at).max(now);
        Ok(())
    }

    async fn set_draining(
        &self,
        daemon_id: &str,
        draining: bool,
        now: Millis,
    ) -> Result<Option<(Daemon, Event)>> {
        let input = (daemon_id.to_string(), draining, now);
        self.writers
            .call(Vec::new(), input, |tx, (id, draining, now)| {
                Box::pin(async move {
                    let done = sqlx::query("UPDATE daemons SET draining = $1 WHERE id = $2")
                        .bind(*draining)
                        .bind(id)
                        .execute(&mut **tx)
                        .await?;
                    if done.rows_affected() == 0 {
                        return Ok(None);
                    }
                    let daemon = load_daemon(tx, id).await?;
                    let event = tx.event(NewEvent::daemon_draining(id, *draining), *now);
                    Ok(Some((daemon, event)))
                })
            })
            .await
    }

    async fn get_daemon(&self, daemon_id: &str) -> Result<Option<Daemon>> {
        let sql = daemon_select("WHERE d.id = $1");
        let query = sqlx::query(&sql).bind(daemon_id);
        Ok(self.rows(query, rows::daemon).await?.pop())
    }

    async fn daemon_by_machine(&self, machine_id: &str) -> Result<Option<Daemon>> {
        let sql = daemon_select("WHERE d.machine_id = $1");
        let query = sqlx::query(&sql).bind(machine_id);
        Ok(self.rows(query, rows::daemon).await?.pop())
    }

    async fn list_daemons(&self) -> Result<Vec<Daemon>> {
        let sql = daemon_select("ORDER BY d.hostname, d.id");
        self.rows(sqlx::query(&sql), rows::daemon).await
    }

    async fn reset_connections(&self, now: Millis) -> Result<()> {
        sqlx::query(
            "WITH s AS (UPDATE daemon_sessions SET disconnected_at = $1, \
             reason = 'coordinator restarted' WHERE disconnected_at IS NULL) \
             UPDATE daemons SET connected = FALSE WHERE connected",
        )
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn insert_key(&self, key: &KeyRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, name, hash, scopes, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&key.info.id)
        .bind(&key.info.name)
        .bind(&key.hash)
        .bind(to_json(&key.info.scopes))
        .bind(millis_from_rfc3339(&key.info.created_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn find_key(&self, id: &str) -> Result<Option<KeyRecord>> {
        let query = sqlx::query(concat!(
            "SELECT ",
            columns!(key),
            " FROM api_keys WHERE id = $1"
        ));
        Ok(self.rows(query.bind(id), rows::key).await?.pop())
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>> {
        let query = sqlx::query(concat!(
            "SELECT ",
            columns!(key),
            " FROM api_keys ORDER BY created_at, id"
        ));
        self.rows(query, |row| Ok(rows::key(row)?.info)).await
    }

    async fn revoke_key(&self, id: &str, now: Millis) -> Result<Option<ApiKey>> {
        let query = sqlx::query(REVOKE_KEY).bind(now).bind(id);
        Ok(self.rows(query, rows::key).await?.pop().map(|k| k.info))
    }

    async fn revoke_key_keeping_an_admin(&self, id: &str, now: Millis) -> Result<Revoke> {
        let mut tx = self.pool.begin().await?;
        // The key and every live key, locked: two admins revoking each other's keys at once
        // are decided one after the other, the second on what the first left.
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(key),
            " FROM api_keys WHERE id = $1 OR revoked_at IS NULL ORDER BY id FOR UPDATE"
        ))
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        let keys: Vec<KeyRecord> = rows.iter().map(rows::key).collect::<Result<_>>()?;
        let Some(key) = keys.iter().find(|k| k.info.id == id) else {
            return Ok(Revoke::NotFound);
        };
        let live: Vec<KeyRecord> = keys
            .iter()
            .filter(|k| k.info.revoked_at.is_none())
            .cloned()
            .collect();
        if Revoke::is_last_admin(key, &live) {
            return Ok(Revoke::LastAdmin(key.info.clone()));
        }
        let row = sqlx::query(REVOKE_KEY)
            .bind(now)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let revoked = row.as_ref().map(rows::key).transpose()?;
        tx.commit().await?;
        Ok(revoked.map_or(Revoke::NotFound, |k| Revoke::Revoked(k.info)))
    }

    async fn touch_key(&self, id: &str, now: Millis) -> Result<()> {
        sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn count_keys(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&self.pool)
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
        let event = NewEvent::new(kind, task_id, daemon_id, data);
        self.writers
            .call(Vec::new(), (event, now), |tx, (event, now)| {
                Box::pin(async move { Ok(tx.event(event.clone(), *now)) })
            })
            .await
    }

    /// Events after `after_id` up to the first missing id that may still be committed (see
    /// [`PgStore::settled_events_after`]). A page shorter than `limit` means the reader is at
    /// the newest events, or held at a missing id for [`HELD_WAIT`]: a missing id is waited
    /// for a little (and read past as soon as it is settled), so a reader woken by a later
    /// commit does not go away empty-handed.
    async fn events_after(&self, after_id: i64, limit: u32) -> Result<Vec<Event>> {
        let since = std::time::Instant::now();
        let mut page: Vec<Event> = Vec::new();
        loop {
            let after = page.last().map_or(after_id, |e| e.id);
            let room = limit.saturating_sub(page.len() as u32);
            let (events, held) = self.settled_events_after(after, room).await?;
            let moved = !events.is_empty();
            page.extend(events);
            if page.len() >= limit as usize || !held || since.elapsed() >= HELD_WAIT {
                return Ok(page);
            }
            if !moved {
                tokio::time::sleep(HELD_RETRY).await;
            }
        }
    }

    async fn prune_events(&self, before: Millis) -> Result<u64> {
        let done = sqlx::query(crate::PRUNE_EVENTS)
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// The newest event once every id below it is settled, so a reader starting after it
    /// misses nothing: the newest id is read first, then a probe taken, then the transactions
    /// older than the probe waited for (at most [`START_WAIT`]: a transaction of another
    /// application holding them up longer is not waited for).
    async fn last_event_id(&self) -> Result<i64> {
        let newest: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM events")
            .fetch_one(&self.pool)
            .await?;
        let probe = self
            .take_probe(newest.unwrap_or(0).saturating_add(1))
            .await?;
        let since = std::time::Instant::now();
        while since.elapsed() < START_WAIT && self.xmin().await? < probe.xid {
            tokio::time::sleep(HELD_RETRY).await;
        }
        Ok(newest.unwrap_or(0))
    }
}

/// A transaction id taken after every id below `below` had been drawn: once no transaction
/// older than it runs, an id below `below` still missing will never be committed (migration 4).
#[derive(Clone, Copy, Debug)]
struct Probe {
    below: i64,
    xid: i64,
}

/// How long [`PgStore::events_after`] waits for a missing id before it answers with what it
/// read so far (maybe nothing); the reader comes back.
const HELD_WAIT: Duration = Duration::from_millis(50);

/// How often it looks again meanwhile.
const HELD_RETRY: Duration = Duration::from_millis(2);

/// How long [`PgStore::last_event_id`] waits for the transactions older than its probe.
const START_WAIT: Duration = Duration::from_secs(5);

impl PgStore {
    /// Events after `after_id`, in id order, up to the first missing id that may still be
    /// committed; and whether the answer stopped at one.
    ///
    /// An id is missing while the transaction that drew it runs, and for good if it rolled
    /// back. It may be passed once a probe taken after a later id was seen ([`Probe`]) is
    /// older than every running transaction: the id is then here, or never will be. A missing
    /// id with no such probe yet gets one, for the next read.
    async fn settled_events_after(&self, after_id: i64, limit: u32) -> Result<(Vec<Event>, bool)> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(event),
            ", pg_snapshot_xmin(pg_current_snapshot())::text::bigint \
             FROM events WHERE id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let probe = *self.probe.lock().unwrap_or_else(|p| p.into_inner());
        let mut events = Vec::with_capacity(rows.len());
        let mut next = after_id.saturating_add(1);
        for row in &rows {
            let event = rows::event(row)?;
            let xmin: i64 = row.try_get(6)?;
            if event.id != next {
                let settled = probe.is_some_and(|p| event.id <= p.below && xmin >= p.xid);
                if !settled {
                    if probe.is_none_or(|p| p.below < event.id) {
                        self.take_probe(event.id).await?;
                    }
                    return Ok((events, true));
                }
            }
            next = event.id.saturating_add(1);
            events.push(event);
        }
        Ok((events, false))
    }

    /// Takes a probe for the ids below `below`, seen committed or missing before this call.
    async fn take_probe(&self, below: i64) -> Result<Probe> {
        // A transaction of its own, with an id: assigned now, after every id below `below` was
        // drawn, so above the id of every transaction that drew one.
        let xid: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
            .fetch_one(&self.pool)
            .await?;
        let probe = Probe { below, xid };
        let mut kept = self.probe.lock().unwrap_or_else(|p| p.into_inner());
        if kept.is_none_or(|p| p.below < below) {
            *kept = Some(probe);
        }
        Ok(probe)
    }

    /// The oldest transaction id still running (or the next to be handed out).
    async fn xmin(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
                .fetch_one(&self.pool)
                .await?,
        )
    }
}

#[async_trait]
impl GatewayStore for PgStore {
    async fn gateway_state(&self, heartbeats: u32, incidents: u32) -> Result<GatewayRows> {
        let mut conn = self.pool.acquire().await?;
        let kv = sqlx::query_as("SELECT key, value FROM gateway_kv ORDER BY key")
            .fetch_all(&mut *conn)
            .await?;
        let mut rows = GatewayRows {
            kv,
            ..GatewayRows::default()
        };
        for (table, keep, out) in [
            ("gateway_heartbeats", heartbeats, &mut rows.heartbeats),
            ("gateway_incidents", incidents, &mut rows.incidents),
        ] {
            let sql = format!(
                "SELECT body FROM (SELECT id, body FROM {table} ORDER BY id DESC LIMIT $1) \
                 AS newest ORDER BY id"
            );
            *out = sqlx::query_scalar(&sql)
                .bind(i64::from(keep))
                .fetch_all(&mut *conn)
                .await?;
        }
        Ok(rows)
    }

    async fn gateway_write(&self, ops: Vec<GatewayOp>) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for op in &ops {
            let (sql, a, b): (&str, Option<&str>, Option<&str>) = match op {
                GatewayOp::Put(k, v) => (
                    "INSERT INTO gateway_kv (key, value) VALUES ($1, $2) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    Some(k),
                    Some(v),
                ),
                GatewayOp::Delete(k) => ("DELETE FROM gateway_kv WHERE key = $1", Some(k), None),
                GatewayOp::Heartbeat { body, keep } => {
                    append_capped(&mut tx, "gateway_heartbeats", body, *keep).await?;
                    continue;
                }
                GatewayOp::Incident { body, keep } => {
                    append_capped(&mut tx, "gateway_incidents", body, *keep).await?;
                    continue;
                }
                GatewayOp::ClearHeartbeats => ("DELETE FROM gateway_heartbeats", None, None),
                GatewayOp::ClearIncidents => ("DELETE FROM gateway_incidents", None, None),
            };
            let mut query = sqlx::query(sql);
            for value in [a, b].into_iter().flatten() {
                query = query.bind(value);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Appends `body` to a gateway log table and keeps only its newest `keep` rows.
async fn append_capped(conn: &mut PgConnection, table: &str, body: &str, keep: u32) -> Result<()> {
    sqlx::query(&format!("INSERT INTO {table} (body) VALUES ($1)"))
        .bind(body)
        .execute(&mut *conn)
        .await?;
    let sql = format!("DELETE FROM {table} WHERE id <= (SELECT MAX(id) FROM {table}) - $1");
    sqlx::query(&sql)
        .bind(i64::from(keep))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The connection options for `url`, with `plan_cache_mode` as given unless the URL sets it.
///
/// The store's pool plans each run of a statement for its own values and the tables' present
/// size (`force_custom_plan`): a plan PostgreSQL keeps once made for the near-empty tables of
/// a fresh database reads the whole table on every later run as the tables grow (measured: 19
/// million rows read in 10 s of 1,000 tasks/s, and a third of the throughput;
/// docs/benchmarks.md).
fn connect_options(url: &str, mode: &str) -> std::result::Result<PgConnectOptions, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    if options
        .get_options()
        .is_some_and(|o| o.contains("plan_cache_mode"))
    {
        return Ok(options);
    }
    Ok(options.options([("plan_cache_mode", mode)]))
}

/// A pool of up to `size` connections with `options`.
async fn open_pool(options: PgConnectOptions, size: u32) -> sqlx::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(size)
        .min_connections(1)
        .acquire_timeout(CONNECT_TIMEOUT)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_WHEN_IDLE {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_with(options)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_planned_for_their_values_unless_the_url_says_otherwise() {
        let plain = connect_options("postgres://root@127.0.0.1/test", "force_custom_plan").unwrap();
        assert_eq!(
            plain.get_options(),
            Some("-c plan_cache_mode=force_custom_plan")
        );
        let url = "postgres://h/db?options=-c%20search_path%3Dk";
        let with_schema = connect_options(url, "force_custom_plan").unwrap();
        assert_eq!(
            with_schema.get_options(),
            Some("-c search_path=k -c plan_cache_mode=force_custom_plan")
        );
        let url = "postgres://h/db?options=-c%20plan_cache_mode%3Dauto";
        let chosen = connect_options(url, "force_custom_plan").unwrap();
        assert_eq!(chosen.get_options(), Some("-c plan_cache_mode=auto"));
    }

    #[test]
    fn messages_show_the_url_without_its_password_or_parameters() {
        let cases = [
            (
                "postgres://kennel:s3cret@db.example:5432/kennel?options=-c%20search_path%3Dk",
                "postgres://kennel@db.example:5432/kennel",
            ),
            ("postgresql://u:p@ss/w@rd@host/db", "postgresql://u@host/db"),
            (
                "postgres://root@127.0.0.1/test",
                "postgres://root@127.0.0.1/test",
            ),
            ("postgres://host/db?password=x", "postgres://host/db"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact(url), shown, "{url}");
        }
    }

    /// Connecting can run on a spawned task (the future is `Send`, which a careless use of
    /// sqlx's executors breaks); checked when the tests compile.
    #[allow(dead_code)]
    fn connecting_is_spawnable() {
        fn spawnable<F: std::future::Future + Send + 'static>(_: F) {}
        spawnable(async { PgStore::connect("postgres://h/db").await.map(drop) });
        spawnable(async { crate::open("postgres://h/db").await.map(drop) });
    }

    #[test]
    fn postgres_urls_pick_postgres_and_anything_else_is_a_file() {
        assert!(PgStore::handles("postgres://h/db"));
        assert!(PgStore::handles("postgresql://h/db"));
        assert!(!PgStore::handles("/var/lib/kennel/kennel.db"));
        assert!(!PgStore::handles("postgres.db"));
    }
}
