//! kennel's persistent state behind one [`Store`] trait: tasks, attempts, task output, daemons
//! and their sessions, API keys (hashed) and the event log.
//!
//! Every state change that users can observe is written together with its event in one
//! transaction, and returned to the caller so it can be published live. Callers never see SQL.
//! Two backends implement it: [`SqliteStore`] (one file, one coordinator) and [`PgStore`]
//! (PostgreSQL, several coordinators on one database); [`open`] picks one from a location.
//! Time is passed in (`now`, in milliseconds since the epoch) so the callers' clocks stay
//! injectable. The rules of the task and attempt lifecycle live in [`machine`], apart from any
//! backend; what rows mean and which events a change records are shared too (`rows`,
//! `events`), so a backend holds only its SQL.

pub mod agents;
mod events;
pub mod machine;
mod postgres;
mod rows;
mod sql;
mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use kennel_proto::api::{ApiKey, Attempt, Daemon, Event, OutputChunk, Scope, Task};
use kennel_proto::link::{OutputStream, RepoSpec};
use kennel_proto::{AttemptStatus, TaskStatus};

pub use agents::{
    Advance, AgentStore, Changed, Claim, GuardCheck, NewCommand, NewMessage, PolicyChange, Redeem,
    Sent, Spawned,
};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Opens the store at `location`: a `postgres://` or `postgresql://` URL connects to
/// PostgreSQL ([`PgStore::connect`]), anything else is the path of a SQLite file
/// ([`SqliteStore::open`]).
pub async fn open(location: &str) -> Result<std::sync::Arc<dyn Backend>> {
    if PgStore::handles(location) {
        Ok(std::sync::Arc::new(PgStore::connect(location).await?))
    } else {
        let path = std::path::Path::new(location);
        Ok(std::sync::Arc::new(SqliteStore::open(path).await?))
    }
}

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

/// Formats a timestamp as RFC 3339 (UTC, millisecond precision).
pub fn rfc3339(ms: Millis) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// Reads an RFC 3339 timestamp back into milliseconds; 0 when it does not parse.
pub(crate) fn millis_from_rfc3339(s: &str) -> Millis {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .unwrap_or(0)
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Database(#[from] rusqlite::Error),
    #[error("database error")]
    Postgres(#[from] sqlx::Error),
    #[error("failed to apply database migration {version}")]
    Migrate {
        version: u32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "the database schema is at version {found} but this kennel knows only up to {known}; \
         run a newer kennel or restore a matching backup"
    )]
    SchemaTooNew { found: u32, known: u32 },
    #[error(
        "no schema named in the PostgreSQL search path ({search_path}) exists to hold kennel's \
         tables; create it, or name another in the URL (`?options=-c search_path=NAME`)"
    )]
    NoSchema { search_path: String },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// `path` is a file's path or a PostgreSQL URL without its password.
    #[error("failed to open database at {path}")]
    Open {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The group transaction this operation ran in could not be started or committed; nothing
    /// of it was stored. Shared because every operation of the group reports the same cause.
    #[error("failed to commit to the database: {0}")]
    Commit(std::sync::Arc<rusqlite::Error>),
    /// A PostgreSQL write group's transaction failed outside its calls (connecting, locking,
    /// storing events); nothing of it was stored. Shared by every call of the group.
    #[error("failed to write to the database: {0}")]
    NotStored(std::sync::Arc<sqlx::Error>),
    /// A PostgreSQL write group's commit failed: whether it was stored is unknown.
    #[error("the database did not confirm a commit (whether it was stored is unknown): {0}")]
    CommitUnknown(std::sync::Arc<sqlx::Error>),
    #[error("the store's writer thread stopped; restart kennel")]
    WriterStopped,
    #[error("a store operation did not finish: {0}")]
    Aborted(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A task to insert; ids and defaults are decided by the caller.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub id: String,
    pub name: String,
    pub prompt: String,
    pub repo: Option<RepoSpec>,
    pub agent: String,
    pub labels: BTreeMap<String, String>,
    pub priority: i32,
    pub env: BTreeMap<String, String>,
    pub timeout_secs: Option<u64>,
    pub max_attempts: u32,
    /// Present for a long-lived agent's session.
    pub session: Option<kennel_proto::link::SessionSpec>,
}

impl NewTask {
    /// The task as stored at `now`: queued, never dispatched.
    pub(crate) fn queued(self, now: Millis) -> Task {
        Task {
            id: self.id,
            name: self.name,
            prompt: self.prompt,
            repo: self.repo,
            agent: self.agent,
            labels: self.labels,
            priority: self.priority,
            env: self.env,
            timeout_secs: self.timeout_secs,
            max_attempts: self.max_attempts,
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
            session: self.session,
        }
    }
}

/// A task with its position in the creation order (for FIFO scheduling).
#[derive(Debug, Clone)]
pub struct QueuedTask {
    pub order: i64,
    pub task: Task,
}

/// Filter and page of `list_tasks`.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub status: Option<TaskStatus>,
    pub daemon_id: Option<String>,
    /// Return tasks created before this order value (newest first).
    pub before: Option<i64>,
    pub limit: u32,
}

/// What a daemon message does, once its (task, attempt, seq) is checked.
#[derive(Debug, Clone)]
pub enum Effect {
    Accepted,
    Rejected {
        reason: String,
        code: Option<kennel_proto::link::RejectCode>,
    },
    Output {
        stream: OutputStream,
        output: String,
        is_partial: bool,
    },
    Progress {
        summary: String,
        detail: Option<serde_json::Value>,
    },
    /// `taskStatusChange`: what the attempt became on the daemon. `None` for a status this
    /// coordinator does not know (a newer daemon's): only the sequence number advances.
    StatusChange {
        new_status: Option<AttemptStatus>,
    },
    Complete {
        success: bool,
        error: Option<String>,
        exit_code: Option<i32>,
        branch: Option<String>,
        commit: Option<String>,
    },
}

/// One sequenced daemon message to apply.
#[derive(Debug, Clone)]
pub struct Report {
    pub daemon_id: String,
    pub task_id: String,
    pub attempt: u32,
    pub seq: u64,
    pub effect: Effect,
}

/// The result of applying one [`Report`].
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// Applied now; the events it produced (already stored).
    Done {
        events: Vec<Event>,
        /// The task after the change, when its state changed.
        task: Option<Box<Task>>,
    },
    /// Seq already applied: acknowledge again, change nothing.
    Duplicate { last_seq: u64 },
    /// Seq ahead of the next expected one.
    Gap { expected: u64 },
    /// The attempt is not current, not held by this daemon, or already over.
    Stale { reason: String },
}

/// A dispatch to record: task `task_id` goes to `daemon_id` as attempt `attempt`.
#[derive(Debug, Clone)]
pub struct Dispatch {
    pub task_id: String,
    pub attempt: u32,
    pub daemon_id: String,
}

/// Result of ending a live attempt from the server side (lease expiry, lost daemon, cancel).
#[derive(Debug, Clone, PartialEq)]
pub struct Ended {
    pub task: Task,
    pub events: Vec<Event>,
}

/// How to end a live attempt from the server side; see [`Store::end_attempt`].
#[derive(Debug, Clone)]
pub struct EndAttempt<'a> {
    pub task_id: &'a str,
    pub attempt: u32,
    /// What the attempt becomes: expired, lost, rejected, returned or cancelled.
    pub status: AttemptStatus,
    pub reason: &'a str,
    /// Whether the task goes back to the queue, and whether this attempt counts.
    pub retry: Retry,
    /// The task's state when it is not requeued.
    pub terminal: TaskStatus,
}

/// What happens to a task whose attempt ends without completing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The task ends in the terminal state (a cancel).
    Never,
    /// Requeued while attempts remain; this attempt counts against `max_attempts` (the task
    /// may have caused it: the agent crashed its daemon, hung past the lease…).
    Charged,
    /// Always requeued, and not counted: the daemon was full or stopping, which says nothing
    /// about the task.
    Free,
}

/// Daemon registration data, from `authenticate`.
#[derive(Debug, Clone)]
pub struct DaemonHello {
    pub machine_id: String,
    pub hostname: String,
    pub max_concurrent_tasks: u32,
    pub labels: BTreeMap<String, String>,
    pub agents: Vec<String>,
    pub version: String,
    pub protocol_version: u32,
    pub remote_addr: Option<String>,
    /// The key it authenticated with, to bind its machine id to; `None` for an admin key,
    /// which binds nothing.
    pub key_id: Option<String>,
}

/// A stored API key: what authentication needs to check a presented key.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub info: ApiKey,
    pub hash: Vec<u8>,
}

/// What [`Store::revoke_key_keeping_an_admin`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Revoke {
    /// The key is revoked (now, or it was already).
    Revoked(ApiKey),
    /// No key has this id.
    NotFound,
    /// The key is the only live admin key; it stays live.
    LastAdmin(ApiKey),
}

impl Revoke {
    /// Whether revoking `key` would leave no live admin key, given every `live` (unrevoked)
    /// key; the answer of [`Store::revoke_key_keeping_an_admin`] is then
    /// [`Revoke::LastAdmin`].
    pub(crate) fn is_last_admin(key: &KeyRecord, live: &[KeyRecord]) -> bool {
        let is_admin = |k: &KeyRecord| k.info.scopes.contains(&Scope::Admin);
        key.info.revoked_at.is_none()
            && is_admin(key)
            && live.iter().filter(|k| is_admin(k)).count() <= 1
    }
}

/// The one storage interface of the coordinator.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Backend name for status pages (`sqlite`, `postgres`).
    fn backend(&self) -> &'static str;
    /// Cheap round trip, for `/ready`.
    async fn ping(&self) -> Result<()>;

    async fn create_task(&self, task: NewTask, now: Millis) -> Result<(QueuedTask, Event)>;
    async fn get_task(&self, id: &str) -> Result<Option<Task>>;
    /// Creates `task` and dispatches it at once as attempt 1 to `daemon_id`: what a
    /// coordinator with a free slot and an empty queue does with a new task. A backend may do
    /// both in one transaction. The dispatch is `None` if the state machine refused it.
    async fn create_and_dispatch(
        &self,
        task: NewTask,
        daemon_id: &str,
        now: Millis,
    ) -> Result<(QueuedTask, Event, Option<(Task, Event)>)> {
        let (queued, created) = self.create_task(task, now).await?;
        let d = Dispatch {
            task_id: queued.task.id.clone(),
            attempt: 1,
            daemon_id: daemon_id.to_string(),
        };
        let dispatched = self.dispatch(&[d], now).await?.pop().flatten();
        Ok((queued, created, dispatched))
    }
    /// The tasks of `ids` that exist, in no particular order: what a coordinator reads when
    /// others tell it that tasks changed. A backend may read them in one query.
    async fn get_tasks(&self, ids: &[String]) -> Result<Vec<Task>> {
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            found.extend(self.get_task(id).await?);
        }
        Ok(found)
    }
    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<QueuedTask>>;
    async fn list_attempts(&self, task_id: &str) -> Result<Vec<Attempt>>;
    /// Every queued task, oldest first: rebuilds the scheduler's queue at start.
    async fn queued_tasks(&self) -> Result<Vec<QueuedTask>>;
    /// Every task with a live attempt (dispatched, running, paused).
    async fn active_tasks(&self) -> Result<Vec<Task>>;
    async fn count_tasks(&self) -> Result<BTreeMap<TaskStatus, u64>>;

    /// Records dispatches, each only if its task is still queued at `attempt - 1`. Returns, per
    /// dispatch, the dispatched task and its event, or `None` when the task moved on meanwhile.
    async fn dispatch(&self, batch: &[Dispatch], now: Millis)
        -> Result<Vec<Option<(Task, Event)>>>;
    /// Applies daemon reports in order, exactly once each, in one transaction.
    async fn apply(&self, batch: &[Report], now: Millis) -> Result<Vec<Applied>>;
    /// Ends a live attempt with `status` (expired, lost, rejected, cancelled): the task is
    /// requeued when attempts remain (and `retry`), otherwise ends as `terminal`.
    /// `None` when the attempt is not live any more.
    async fn end_attempt(&self, end: &EndAttempt<'_>, now: Millis) -> Result<Option<Ended>>;
    /// Cancels a queued task. `None` when it is not queued.
    async fn cancel_queued(&self, task_id: &str, now: Millis) -> Result<Option<Ended>>;
    /// Fails a task that is still queued (nothing could run it in time), with `reason`.
    async fn fail_queued(&self, task_id: &str, reason: &str, now: Millis) -> Result<Option<Ended>>;
    /// Sets `paused` / `running` on a task with a live attempt, as asked through the API.
    async fn set_paused(
        &self,
        task_id: &str,
        attempt: u32,
        paused: bool,
        now: Millis,
    ) -> Result<Option<Ended>>;
    async fn task_output(
        &self,
        task_id: &str,
        attempt: u32,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<OutputChunk>>;

    /// Registers or refreshes a daemon by machine id; returns its record and event.
    async fn daemon_connected(
        &self,
        daemon_id: &str,
        hello: &DaemonHello,
        now: Millis,
    ) -> Result<(Daemon, Event)>;
    async fn daemon_disconnected(
        &self,
        daemon_id: &str,
        reason: &str,
        now: Millis,
    ) -> Result<Event>;
    async fn daemon_seen(&self, daemon_id: &str, now: Millis) -> Result<()>;
    async fn set_draining(
        &self,
        daemon_id: &str,
        draining: bool,
        now: Millis,
    ) -> Result<Option<(Daemon, Event)>>;
    async fn get_daemon(&self, daemon_id: &str) -> Result<Option<Daemon>>;
    async fn daemon_by_machine(&self, machine_id: &str) -> Result<Option<Daemon>>;
    async fn list_daemons(&self) -> Result<Vec<Daemon>>;
    /// Marks every daemon disconnected (at start: no link survives a restart).
    async fn reset_connections(&self, now: Millis) -> Result<()>;

    // Several coordinators on one database.

    /// Records that `coordinator` holds `daemon_id`'s link (after [`Store::daemon_connected`]).
    async fn daemon_held_by(&self, daemon_id: &str, coordinator: &str) -> Result<()>;
    /// [`Store::daemon_disconnected`] if `coordinator` still holds the daemon's link; `None`
    /// (nothing written) when another coordinator took it over meanwhile.
    async fn daemon_left(
        &self,
        daemon_id: &str,
        coordinator: &str,
        reason: &str,
        now: Millis,
    ) -> Result<Option<Event>>;
    /// `coordinator` is alive at `now` (registered on first call).
    async fn coordinator_seen(&self, coordinator: &str, now: Millis) -> Result<()>;
    /// Daemons recorded as connected before `before` whose coordinator was last seen before
    /// it (or is unknown): their links died with it. A link recorded since is left alone: its
    /// holder may not have written that it holds it yet ([`Store::daemon_held_by`]).
    async fn stranded_daemons(&self, before: Millis) -> Result<Vec<Daemon>>;
    /// Takes or renews the lease `name` for `holder` until `now + ttl_ms`; `false` while
    /// another holder's lease runs.
    async fn lease(&self, name: &str, holder: &str, now: Millis, ttl_ms: i64) -> Result<bool>;

    async fn insert_key(&self, key: &KeyRecord) -> Result<()>;
    async fn find_key(&self, id: &str) -> Result<Option<KeyRecord>>;
    async fn list_keys(&self) -> Result<Vec<ApiKey>>;
    async fn revoke_key(&self, id: &str, now: Millis) -> Result<Option<ApiKey>>;
    /// Revokes a key unless it is the last live admin key, whose loss would lock every admin
    /// out. Checked and done in one transaction, so two admins revoking each other's keys at
    /// once cannot both succeed.
    async fn revoke_key_keeping_an_admin(&self, id: &str, now: Millis) -> Result<Revoke>;
    async fn touch_key(&self, id: &str, now: Millis) -> Result<()>;
    async fn count_keys(&self) -> Result<u64>;

    /// Appends an event that is not part of another change.
    async fn record_event(
        &self,
        kind: &str,
        task_id: Option<&str>,
        daemon_id: Option<&str>,
        data: serde_json::Value,
        now: Millis,
    ) -> Result<Event>;
    async fn events_after(&self, after_id: i64, limit: u32) -> Result<Vec<Event>>;
    /// The id of the newest event, 0 when there is none.
    async fn last_event_id(&self) -> Result<i64>;
    /// Deletes the events recorded before `before`, oldest first up to the first one that is
    /// not, and always keeps the newest (ids go on from it); returns how many went. Streams
    /// resuming from an id that was deleted start at the oldest event kept.
    async fn prune_events(&self, before: Millis) -> Result<u64>;
}

/// What [`Store::prune_events`] runs, with the time as its only parameter (`$1` / `?1`): from
/// the oldest event up to the first recorded at or after it, which walks only what goes.
pub(crate) const PRUNE_EVENTS: &str = "DELETE FROM events WHERE id < COALESCE(\
     (SELECT id FROM events WHERE at >= $1 ORDER BY id LIMIT 1), \
     (SELECT MAX(id) FROM events))";

/// The LLM gateway's own state, kept beside the coordinator's in the same database. Separate
/// from [`Store`] so the coordinator depends on nothing of the gateway's.
#[async_trait]
pub trait GatewayStore: Send + Sync + 'static {
    /// The LLM gateway's stored state: every key, and the newest `heartbeats` heartbeats and
    /// `incidents` incidents, oldest first.
    async fn gateway_state(&self, heartbeats: u32, incidents: u32) -> Result<GatewayRows>;
    /// Applies changes to the gateway's state in order, in one transaction.
    async fn gateway_write(&self, ops: Vec<GatewayOp>) -> Result<()>;
}

/// A database that holds it all: what a backend implements, and what `kennel up` shares
/// between its coordinator, its lifecycle manager and its gateway.
pub trait Backend: Store + GatewayStore + AgentStore {}

impl<T: Store + GatewayStore + AgentStore> Backend for T {}

/// The LLM gateway's state as stored: JSON texts the gateway encodes and decodes itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GatewayRows {
    pub kv: Vec<(String, String)>,
    pub heartbeats: Vec<String>,
    pub incidents: Vec<String>,
}

/// One change to the gateway's stored state.
#[derive(Debug, Clone, PartialEq)]
pub enum GatewayOp {
    Put(String, String),
    Delete(String),
    /// Appends a heartbeat and drops all but the newest `keep`.
    Heartbeat {
        body: String,
        keep: u32,
    },
    /// Appends an incident and drops all but the newest `keep`.
    Incident {
        body: String,
        keep: u32,
    },
    ClearHeartbeats,
    ClearIncidents,
}

/// Parses a scopes list as stored.
pub fn parse_scopes(s: &str) -> Result<Vec<Scope>> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("api key scopes: {e}")))
}
