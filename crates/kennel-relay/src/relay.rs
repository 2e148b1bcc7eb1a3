//! The relay's routing core: which downstream daemons are connected, which attempt each
//! holds, the queue, and the upstream sender. Every decision happens under one lock, with the
//! history written in the same critical section, so what the relay persists and what it sends
//! are always in the same order. It does no network I/O itself: connections hand it frames and
//! drain the channels it fills.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kennel_clock::{Clock, Deadlines, SystemClock};
use kennel_link::schedule::{self, Candidate, Generation, Needs, Ties};
use kennel_proto::link::{
    Authenticate, Capacity, ErrorCode, ErrorFrame, SpawnTask, TaskQueued, TaskRef,
    TaskStatusChange, RETURNED,
};
use kennel_proto::{DaemonMessage, ServerMessage};
use serde::Serialize;
use tokio::sync::{mpsc, watch, Notify};

use crate::config::RelayConfig;
use crate::history::{History, HistoryError};
use crate::pending::Pending;

/// The `seq` of a `lost` report for an attempt whose last seq the relay no longer knows (it
/// held the attempt before a restart and the daemon never came back). It is certainly past
/// the upstream's last applied seq, so the upstream answers `seqGap` with the seq it expects,
/// and the relay sends the report again with that seq.
const PROBE_SEQ: u64 = 1 << 53;

/// A frame (or a close) for one downstream connection's writer.
#[derive(Debug)]
pub enum Outbound {
    Text(String),
    Close(u16, String),
}

impl kennel_link::ws::IntoFrame for Outbound {
    fn into_frame(self) -> kennel_link::ws::Frame {
        match self {
            Outbound::Text(t) => kennel_link::ws::Frame::Text(t),
            Outbound::Close(code, reason) => kennel_link::ws::Frame::Close(code, reason),
        }
    }
}

/// One connected downstream daemon.
struct Down {
    conn_id: u64,
    tx: kennel_link::outbound::LinkTx<Outbound>,
    hostname: String,
    max: u32,
    agents: BTreeSet<String>,
    connected_ms: i64,
    last_heartbeat_ms: i64,
    /// Dispatch counter at its last dispatch (tie-break: longest idle first).
    last_pick: u64,
    /// It refused a task for capacity: nothing more goes to it until it reports a free slot
    /// (an attempt of its ends, a heartbeat with fewer active tasks, `capacity`, a reconnect).
    full: bool,
}

/// An attempt a downstream daemon holds.
struct Hold {
    attempt: u32,
    daemon: String,
    /// The highest seq seen for this attempt; `None` when it was restored after a restart
    /// (`relay.db` does not track every message).
    last_seq: Option<u64>,
    /// The `spawnTask` it was given, to queue again if the daemon refuses it for capacity or
    /// shutdown; `None` for holds restored after a restart.
    spawn: Option<SpawnTask>,
}

#[derive(Default)]
struct State {
    daemons: HashMap<String, Down>,
    holds: HashMap<String, Hold>,
    /// Queued `spawnTask`s, oldest first.
    queue: VecDeque<SpawnTask>,
    upstream: Option<mpsc::UnboundedSender<String>>,
    /// Reports sent upstream and not acked yet (the link is up).
    pending: Pending,
    /// Reports waiting in `relay.db` (kept there while the link was down).
    db_buffered: u64,
    /// `lost` reports the relay made itself, by attempt, with their seq: resent with the
    /// expected seq if the upstream answers `seqGap`.
    own_lost: HashMap<(String, u32), u64>,
    upstream_daemon_id: Option<String>,
    last_upstream_heartbeat_ms: Option<i64>,
    /// Bumped on every connect and disconnect of a machine, so a stale grace timer does nothing.
    generations: HashMap<String, Generation>,
    next_conn: u64,
    picks: u64,
}

/// A downstream daemon as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DownInfo {
    pub id: String,
    pub hostname: String,
    pub max_concurrent_tasks: u32,
    pub active_tasks: u32,
    pub agents: Vec<String>,
    pub connected_ms: i64,
    pub last_heartbeat_ms: i64,
}

/// What `GET /status` reports. Besides kennel's own fields it carries the fields of a Makima
/// edge relay's `/status` (`lastHeartbeat`, `totalTasksProcessed`, `connectedDaemons` as a
/// count), so dashboards and monitors written for one read the other.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// `ok` (upstream up, daemons connected), `degraded` (one of them missing) or
    /// `disconnected` (no upstream).
    pub status: &'static str,
    pub agent_name: String,
    pub upstream: String,
    pub upstream_connected: bool,
    /// The id the upstream gave this relay.
    pub daemon_id: Option<String>,
    /// When the last heartbeat went upstream, in ms since the epoch.
    pub last_heartbeat_ms: Option<i64>,
    /// The same instant as RFC 3339 (UTC, milliseconds); `None` before the first heartbeat.
    pub last_heartbeat: Option<String>,
    /// How many downstream daemons are connected (`daemons.len()`).
    pub connected_daemons: u32,
    /// The connected downstream daemons, by id.
    pub daemons: Vec<DownInfo>,
    pub active_tasks: u32,
    pub queued_tasks: u32,
    /// Attempts ever received, counting pruned ones.
    pub total_received: u64,
    /// Attempts that ended completed or failed, counting pruned ones.
    pub total_processed: u64,
    /// The same count under Makima's name. It counts attempts: a task retried here after a
    /// failure counts once per attempt that ran to an end.
    pub total_tasks_processed: u64,
    pub buffered_messages: u64,
    pub messages_forwarded: u64,
}

/// What the open `GET /health` reports: kennel's `status` plus Makima's `healthy` and
/// `upstreamConnected`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// `ok` (healthy, upstream connected), `degraded` (healthy, upstream down: the relay
    /// queues tasks and keeps reports until it is back) or `unhealthy`.
    pub status: &'static str,
    /// The relay serves and its database is usable: a read works now and the last write
    /// succeeded. The upstream link does not count: a relay whose upstream is down still does
    /// its job (it holds what it must deliver later).
    pub healthy: bool,
    pub upstream_connected: bool,
}

/// `ms` since the epoch as RFC 3339 in UTC with milliseconds (`2024-05-01T12:00:00.123Z`).
pub fn rfc3339_ms(ms: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
    let t = t
        .replace_nanosecond(t.nanosecond() / 1_000_000 * 1_000_000)
        .ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// Why a daemon's message was refused.
pub enum Refusal {
    Stale(ErrorFrame),
}

pub struct Relay {
    pub cfg: RelayConfig,
    /// The time every record and deadline of the relay is taken from.
    pub clock: Arc<dyn Clock>,
    /// Reattach graces, as deadlines on `clock`.
    graces: Deadlines<Grace>,
    state: Mutex<State>,
    history: Mutex<History>,
    /// Ends the current upstream session so it reconnects now (`POST /reconnect`).
    pub reconnect: Notify,
    forwarded: AtomicU64,
    /// The last database operation failed (a full disk, a broken file); `/health` reports
    /// the relay unhealthy until one succeeds again.
    db_failing: AtomicBool,
    /// The id the upstream gave this relay while the link is up, `None` while it is down.
    link: watch::Sender<Option<String>>,
    /// Downstream links that have not authenticated yet.
    pub pre_auth: kennel_link::ws::PreAuthSlots,
}

/// A reattach grace that runs out: `machine`'s attempts are lost unless it came back since
/// (`generation` counts its disconnects).
#[derive(Debug)]
struct Grace {
    machine: String,
    generation: Generation,
}

fn stale_error(task_id: &str, attempt: u32, message: String) -> ErrorFrame {
    ErrorFrame {
        code: ErrorCode::StaleAttempt,
        message,
        task_id: Some(task_id.to_string()),
        attempt: Some(attempt),
        expected_seq: None,
    }
}

impl Relay {
    /// Opens the history and restores holds and the queue from it, on the system clock.
    pub fn open(cfg: RelayConfig) -> Result<Arc<Self>, HistoryError> {
        Self::open_with_clock(cfg, Arc::new(SystemClock))
    }

    /// [`Relay::open`] on `clock`. Needs a tokio runtime: it starts the relay's timer task.
    pub fn open_with_clock(
        cfg: RelayConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, HistoryError> {
        let history = History::open(&cfg.data_dir)?;
        let mut st = State {
            db_buffered: history.buffered_count()?,
            ..State::default()
        };
        for h in history.held()? {
            st.holds.insert(
                h.task_id,
                Hold {
                    attempt: h.attempt,
                    daemon: h.daemon,
                    last_seq: None,
                    spawn: None,
                },
            );
        }
        for frame in history.queued()? {
            match serde_json::from_str::<ServerMessage>(&frame) {
                Ok(ServerMessage::SpawnTask(s)) => st.queue.push_back(s),
                _ => tracing::warn!("ignoring an unreadable queued task in the relay database"),
            }
        }
        let cfg_unauthenticated = cfg.max_unauthenticated;
        let (graces, mut due) = Deadlines::start(clock.clone());
        let relay = Arc::new(Relay {
            cfg,
            clock,
            graces,
            state: Mutex::new(st),
            history: Mutex::new(history),
            reconnect: Notify::new(),
            forwarded: AtomicU64::new(0),
            db_failing: AtomicBool::new(false),
            link: watch::channel(None).0,
            pre_auth: kennel_link::ws::PreAuthSlots::new(cfg_unauthenticated),
        });
        relay.log("connect", "relay started");
        // Acts on graces as they fall due; holds the relay weakly, so dropping the relay ends it.
        let weak = Arc::downgrade(&relay);
        tokio::spawn(async move {
            while let Some(grace) = due.recv().await {
                let Some(relay) = weak.upgrade() else { return };
                relay.grace_expired(&grace.machine, grace.generation);
            }
        });
        Ok(relay)
    }

    /// Starts grace timers for daemons that held attempts before a restart.
    pub fn start_restored_graces(self: &Arc<Self>) {
        let machines: HashSet<String> = {
            let st = self.lock();
            st.holds.values().map(|h| h.daemon.clone()).collect()
        };
        for m in machines {
            self.start_grace(m, Generation::default());
        }
    }

    /// Watches the upstream link: the relay's upstream daemon id while connected.
    pub fn subscribe_link(&self) -> watch::Receiver<Option<String>> {
        self.link.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; carry on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn db(&self) -> MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the history, logging (not propagating) a failure: the relay keeps routing.
    fn with_db<T>(
        &self,
        what: &str,
        f: impl FnOnce(&History) -> Result<T, HistoryError>,
    ) -> Option<T> {
        match f(&self.db()) {
            Ok(v) => {
                self.db_failing.store(false, Ordering::Relaxed);
                Some(v)
            }
            Err(e) => {
                self.db_failing.store(true, Ordering::Relaxed);
                tracing::error!(error = &e as &dyn std::error::Error, "failed to {what}");
                None
            }
        }
    }

    /// Adds a connection-log entry (and traces it).
    pub fn log(&self, kind: &str, message: &str) {
        tracing::info!(kind, "{message}");
        self.with_db("write the connection log", |h| {
            h.log(kind, message, self.clock.now_ms())
        });
    }

    /// Drops the history of attempts that ended more than `history_retention` ago.
    pub fn prune_history(&self) {
        let keep = self.cfg.history_retention;
        if keep.is_zero() {
            return;
        }
        let before = self
            .clock
            .now_ms()
            .saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX / 2));
        if let Some(n) = self.with_db("prune the task history", |h| h.prune(before)) {
            if n > 0 {
                tracing::info!(
                    n,
                    retention = %keep,
                    "pruned the history of attempts that ended long ago"
                );
            }
        }
    }

    pub fn logs(&self, limit: u32) -> Result<Vec<crate::history::LogEntry>, HistoryError> {
        self.db().logs(limit)
    }

    pub fn tasks(
        &self,
        limit: u32,
        offset: u32,
    ) -> Result<Vec<crate::history::TaskRecord>, HistoryError> {
        self.db().tasks(limit, offset)
    }

    // -----------------------------------------------------------------------------------------
    // upstream side

    /// What the relay offers upstream: the sum of its daemons' slots (at least 1, as the
    /// protocol requires) and the union of their agents.
    fn capacity_of(&self, st: &State) -> Capacity {
        let max: u32 = st.daemons.values().map(|d| d.max).sum();
        let agents: BTreeSet<String> = st
            .daemons
            .values()
            .flat_map(|d| d.agents.iter().cloned())
            .collect();
        Capacity {
            max_concurrent_tasks: max.clamp(1, 10_000),
            agents: agents.into_iter().take(64).collect(),
            labels: self.cfg.labels.clone(),
        }
    }

    /// Attempts the relay is responsible for: held and queued.
    /// Attempts to list in `runningTasks` upstream: held, queued, and finished ones whose
    /// reports (a `taskComplete`, say) still wait for the upstream's ack, in memory or in
    /// `relay.db`; without them the upstream would end those attempts as lost and refuse the
    /// replayed reports as stale.
    fn running_of(&self, st: &State) -> Vec<TaskRef> {
        let buffered = if st.db_buffered > 0 {
            self.with_db("list buffered attempts", |h| h.buffered_attempts())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut v: Vec<TaskRef> = st
            .holds
            .iter()
            .map(|(t, h)| TaskRef {
                task_id: t.clone(),
                attempt: h.attempt,
            })
            .chain(st.queue.iter().map(|s| TaskRef {
                task_id: s.task_id.clone(),
                attempt: s.attempt,
            }))
            .chain(st.pending.attempts().map(|(t, a)| TaskRef {
                task_id: t.to_string(),
                attempt: a,
            }))
            .chain(
                buffered
                    .into_iter()
                    .map(|(task_id, attempt)| TaskRef { task_id, attempt }),
            )
            .collect();
        v.sort_by(|a, b| (&a.task_id, a.attempt).cmp(&(&b.task_id, b.attempt)));
        v.dedup();
        v
    }

    /// The `authenticate` frame for a new upstream session.
    pub fn hello(&self) -> DaemonMessage {
        let st = self.lock();
        let c = self.capacity_of(&st);
        DaemonMessage::Authenticate(Authenticate {
            api_key: kennel_proto::link::Secret(self.cfg.api_key.clone().unwrap_or_default()),
            machine_id: self.cfg.agent_name.clone(),
            hostname: self.cfg.agent_name.clone(),
            max_concurrent_tasks: c.max_concurrent_tasks,
            protocol_version: kennel_proto::PROTOCOL_VERSION,
            min_protocol_version: Some(kennel_proto::MIN_PROTOCOL_VERSION),
            version: env!("CARGO_PKG_VERSION").to_string(),
            labels: c.labels,
            agents: c.agents,
            running_tasks: self.running_of(&st),
        })
    }

    /// The upstream session is authenticated: replay what it has not acked, in order, then
    /// send new messages as they come. Both happen under the lock, so nothing overtakes.
    pub fn upstream_up(&self, daemon_id: &str, tx: mpsc::UnboundedSender<String>) {
        {
            let mut st = self.lock();
            let buffered = if st.db_buffered > 0 {
                self.with_db("read the buffered messages", |h| h.buffered())
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            let n = buffered.len();
            for f in buffered {
                let _ = tx.send(f);
            }
            // Capacity may have changed between `authenticate` and now.
            let _ = tx.send(DaemonMessage::Capacity(self.capacity_of(&st)).to_json());
            // The upstream may have restarted: it must not time out what waits here.
            for q in &st.queue {
                let _ = tx.send(self.queued_message(q).to_json());
            }
            st.upstream = Some(tx);
            st.upstream_daemon_id = Some(daemon_id.to_string());
            if n > 0 {
                tracing::info!(n, "replayed buffered daemon messages upstream");
            }
        }
        self.log("connect", &format!("upstream connected as {daemon_id}"));
        self.link.send_replace(Some(daemon_id.to_string()));
    }

    /// The upstream link ended: what it has not acked moves into `relay.db`, where it survives
    /// a relay restart until the next session replays it.
    pub fn upstream_down(&self, reason: &str) {
        let was = {
            let mut st = self.lock();
            let was = st.upstream.take().is_some();
            self.spill(&mut st);
            was
        };
        self.link.send_replace(None);
        if was {
            self.log("disconnect", &format!("upstream disconnected: {reason}"));
        }
    }

    /// A heartbeat for the upstream, noting when it went.
    pub fn upstream_heartbeat(&self) -> DaemonMessage {
        let mut st = self.lock();
        st.last_upstream_heartbeat_ms = Some(self.clock.now_ms());
        DaemonMessage::Heartbeat(kennel_proto::link::Heartbeat {
            active_tasks: self.running_of(&st),
        })
    }

    fn send_capacity(&self, st: &State) {
        if let Some(up) = &st.upstream {
            let _ = up.send(DaemonMessage::Capacity(self.capacity_of(st)).to_json());
        }
    }

    /// Moves the reports pending in memory into `relay.db`, after those already there.
    fn spill(&self, st: &mut State) {
        let items = st.pending.drain();
        if items.is_empty() {
            return;
        }
        let rows: Vec<(&str, u32, u64, &str)> = items
            .iter()
            .map(|i| (i.task_id.as_str(), i.attempt, i.seq, i.frame.as_str()))
            .collect();
        if self
            .with_db("keep unacknowledged messages", |h| h.buffer_all(&rows))
            .is_some()
        {
            st.db_buffered += rows.len() as u64;
        }
    }

    /// Sends task-scoped messages (task, attempt, seq, frame) upstream and keeps them in memory
    /// until acked (in `relay.db` beyond `max_pending_messages`); with the link down, keeps
    /// them in `relay.db` for the next session.
    fn send_up(&self, st: &mut State, items: &[(&str, u32, u64, &str)]) {
        let State {
            upstream,
            pending,
            db_buffered,
            ..
        } = st;
        match upstream {
            Some(up) => {
                for (task_id, attempt, seq, frame) in items {
                    pending.push(task_id, *attempt, *seq, frame);
                    let _ = up.send(frame.to_string());
                }
                self.forwarded
                    .fetch_add(items.len() as u64, Ordering::Relaxed);
                if pending.len() > self.cfg.max_pending_messages {
                    tracing::warn!(
                        pending = pending.len(),
                        "the upstream is not acking; moving unacknowledged reports to relay.db"
                    );
                    self.spill(st);
                }
            }
            None => {
                if self
                    .with_db("buffer daemon messages", |h| h.buffer_all(items))
                    .is_some()
                {
                    *db_buffered += items.len() as u64;
                }
            }
        }
    }

    /// Reports an attempt lost on the relay's own account, with `seq`.
    fn send_lost(&self, st: &mut State, task_id: &str, attempt: u32, seq: u64) {
        let m = DaemonMessage::TaskStatusChange(TaskStatusChange {
            task_id: task_id.to_string(),
            attempt,
            seq,
            old_status: "running".into(),
            new_status: "lost".into(),
        });
        self.send_up(st, &[(task_id, attempt, seq, &m.to_json())]);
        st.own_lost.insert((task_id.to_string(), attempt), seq);
    }

    /// One command from the upstream.
    pub fn from_upstream(self: &Arc<Self>, msg: ServerMessage, frame: &str) {
        match msg {
            ServerMessage::SpawnTask(s) => self.spawn(s, frame),
            ServerMessage::PauseTask(c) | ServerMessage::ResumeTask(c) => {
                self.to_holder(&c.task_id, c.attempt, frame)
            }
            ServerMessage::InterruptTask(c) => {
                if !self.unqueue(&c.task_id, c.attempt) {
                    self.to_holder(&c.task_id, c.attempt, frame)
                }
            }
            ServerMessage::SendMessage(c) => self.to_holder(&c.task_id, c.attempt, frame),
            ServerMessage::DeliverMessage(c) => self.to_holder(&c.task_id, c.attempt, frame),
            ServerMessage::Ack(a) => self.acks(&[(a, frame)]),
            ServerMessage::Error(e) => self.upstream_error(e, frame),
            ServerMessage::Authenticated(_) => {
                tracing::warn!("ignoring a second `authenticated` from upstream")
            }
        }
    }

    /// Unknown upstream commands go to every daemon (forward compatibility).
    pub fn broadcast(&self, frame: &str) {
        let st = self.lock();
        for d in st.daemons.values() {
            d.tx.send(Outbound::Text(frame.to_string()));
        }
    }

    fn upstream_error(self: &Arc<Self>, e: ErrorFrame, frame: &str) {
        let (Some(task_id), Some(attempt)) = (e.task_id.clone(), e.attempt) else {
            self.log(
                "error",
                &format!("upstream error {}: {}", e.code.as_str(), e.message),
            );
            return;
        };
        let mut st = self.lock();
        if e.code == ErrorCode::SeqGap {
            let own = st.own_lost.get(&(task_id.clone(), attempt)).copied();
            if let (Some(sent), Some(expected)) = (own, e.expected_seq) {
                // Our own `lost` report went out with a seq the upstream did not expect (the
                // attempt was restored after a restart): send it again as asked.
                tracing::info!(task_id, attempt, expected, "resending a lost report");
                st.pending.remove_seq(&task_id, attempt, sent);
                if st.db_buffered > 0 {
                    if let Some(n) = self.with_db("drop a resent report", |h| {
                        h.drop_seq(&task_id, attempt, sent)
                    }) {
                        st.db_buffered = st.db_buffered.saturating_sub(n);
                    }
                }
                self.send_lost(&mut st, &task_id, attempt, expected);
                return;
            }
        }
        let daemon = st
            .holds
            .get(&task_id)
            .filter(|h| h.attempt == attempt)
            .map(|h| h.daemon.clone())
            .or_else(|| {
                self.with_db("look up a task's daemon", |h| {
                    h.daemon_of(&task_id, attempt)
                })
                .flatten()
            });
        if e.code == ErrorCode::StaleAttempt {
            // The upstream will never apply this attempt's messages: stop keeping them.
            st.pending.drop_attempt(&task_id, attempt);
            st.own_lost.remove(&(task_id.clone(), attempt));
            if let Some(n) = self.with_db("drop a stale attempt", |h| {
                let n = h.drop_attempt(&task_id, attempt)?;
                h.set_status(
                    &task_id,
                    attempt,
                    "stale",
                    Some(&e.message),
                    Some(self.clock.now_ms()),
                )?;
                Ok(n)
            }) {
                st.db_buffered = st.db_buffered.saturating_sub(n);
            }
            if st.holds.get(&task_id).is_some_and(|h| h.attempt == attempt) {
                st.holds.remove(&task_id);
            }
            st.queue
                .retain(|s| !(s.task_id == task_id && s.attempt == attempt));
        }
        if let Some(d) = daemon.and_then(|d| st.daemons.get(&d)) {
            d.tx.send(Outbound::Text(frame.to_string()));
        }
        if e.code == ErrorCode::StaleAttempt {
            self.dispatch(&mut st);
        }
    }

    fn to_holder(&self, task_id: &str, attempt: u32, frame: &str) {
        let st = self.lock();
        let Some(h) = st.holds.get(task_id).filter(|h| h.attempt == attempt) else {
            tracing::info!(
                task_id,
                attempt,
                "no daemon holds this attempt; command dropped"
            );
            return;
        };
        if let Some(d) = st.daemons.get(&h.daemon) {
            d.tx.send(Outbound::Text(frame.to_string()));
        }
    }

    /// Removes a queued attempt (interrupted before any daemon got it).
    fn unqueue(&self, task_id: &str, attempt: u32) -> bool {
        let mut st = self.lock();
        let before = st.queue.len();
        st.queue
            .retain(|s| !(s.task_id == task_id && s.attempt == attempt));
        if st.queue.len() == before {
            return false;
        }
        self.with_db("record a cancelled task", |h| {
            h.set_status(
                task_id,
                attempt,
                "cancelled",
                None,
                Some(self.clock.now_ms()),
            )
        });
        true
    }

    fn spawn(self: &Arc<Self>, s: SpawnTask, frame: &str) {
        if let Err(e) = kennel_proto::validate_id("task id", &s.task_id) {
            self.log(
                "error",
                &format!("upstream sent a spawnTask with a bad id: {e}"),
            );
            return;
        }
        let mut st = self.lock();
        if let Some(h) = st.holds.get(&s.task_id) {
            if h.attempt >= s.attempt {
                return; // a repeat; the holder has it already
            }
            st.holds.remove(&s.task_id);
        }
        if st
            .queue
            .iter()
            .any(|q| q.task_id == s.task_id && q.attempt >= s.attempt)
        {
            return;
        }
        st.queue.retain(|q| q.task_id != s.task_id);
        let now = self.clock.now_ms();
        let fresh = self
            .with_db("record a received task", |h| {
                h.supersede(&s.task_id, s.attempt, now)?;
                h.received(&s, frame, now)
            })
            .unwrap_or(true);
        if !fresh {
            // Already recorded (and maybe finished) before a restart: nothing to do.
            return;
        }
        let (task_id, attempt) = (s.task_id.clone(), s.attempt);
        st.queue.push_back(s);
        self.dispatch(&mut st);
        if let Some(q) = st
            .queue
            .iter()
            .find(|q| q.task_id == task_id && q.attempt == attempt)
        {
            // Upstream, the accept deadline would retry it while it waits here.
            if let Some(up) = &st.upstream {
                let _ = up.send(self.queued_message(q).to_json());
            }
        }
    }

    /// `taskQueued` for an attempt waiting in the relay's queue.
    fn queued_message(&self, s: &SpawnTask) -> DaemonMessage {
        DaemonMessage::TaskQueued(TaskQueued {
            task_id: s.task_id.clone(),
            attempt: s.attempt,
            reason: Some(format!(
                "no daemon behind relay {} has a free slot for agent {}",
                self.cfg.agent_name, s.agent
            )),
        })
    }

    /// A relay below this one queued an attempt it was given: pass that on if it holds it.
    pub fn queued_below(&self, machine: &str, q: &TaskQueued, frame: &str) -> Option<Refusal> {
        let st = self.lock();
        let holds = st
            .holds
            .get(&q.task_id)
            .is_some_and(|h| h.attempt == q.attempt && h.daemon == machine);
        if !holds {
            return Some(Refusal::Stale(stale_error(
                &q.task_id,
                q.attempt,
                format!(
                    "this relay did not give attempt {} of task {} to you",
                    q.attempt, q.task_id
                ),
            )));
        }
        if let Some(up) = &st.upstream {
            let _ = up.send(frame.to_string());
        }
        None
    }

    /// Hands queued tasks to the least-loaded daemon that has a free slot and the agent.
    fn dispatch(&self, st: &mut State) {
        let mut active: HashMap<String, u32> = HashMap::new();
        for h in st.holds.values() {
            *active.entry(h.daemon.clone()).or_default() += 1;
        }
        let mut left = VecDeque::new();
        while let Some(s) = st.queue.pop_front() {
            let candidates = st.daemons.iter().map(|(id, d)| Candidate {
                id,
                // Only connected daemons are in the map, and the relay does not drain them.
                connected: true,
                draining: false,
                max: d.max,
                running: active.get(id).copied().unwrap_or(0),
                full: d.full,
                agents: &d.agents,
                labels: &schedule::NO_LABELS,
                last_pick: d.last_pick,
            });
            let needs = Needs {
                agent: &s.agent,
                // A spawn carries no labels: the coordinator matched them to the relay already.
                labels: &schedule::NO_LABELS,
            };
            let pick = schedule::pick(candidates, &needs, Ties::Idlest).map(str::to_string);
            let Some(id) = pick else {
                left.push_back(s);
                continue;
            };
            st.picks += 1;
            let picks = st.picks;
            let Some(d) = st.daemons.get_mut(&id) else {
                left.push_back(s);
                continue;
            };
            d.last_pick = picks;
            d.tx.send(Outbound::Text(
                ServerMessage::SpawnTask(s.clone()).to_json(),
            ));
            *active.entry(id.clone()).or_default() += 1;
            self.with_db("record a dispatch", |h| {
                h.dispatched(&s.task_id, s.attempt, &id, self.clock.now_ms())
            });
            tracing::info!(task_id = %s.task_id, attempt = s.attempt, daemon = %id, "dispatched");
            st.holds.insert(
                s.task_id.clone(),
                Hold {
                    attempt: s.attempt,
                    daemon: id,
                    last_seq: Some(0),
                    spawn: Some(s),
                },
            );
        }
        st.queue = left;
    }

    // -----------------------------------------------------------------------------------------
    // downstream side

    /// Registers an authenticated daemon (replacing an older connection of the same machine)
    /// and settles the attempts it says it still runs. Returns the connection id.
    pub fn attach(
        self: &Arc<Self>,
        hello: &Authenticate,
        tx: kennel_link::outbound::LinkTx<Outbound>,
        authenticated: ServerMessage,
    ) -> u64 {
        let machine = hello.machine_id.clone();
        let now = self.clock.now_ms();
        let conn_id = {
            let mut st = self.lock();
            st.next_conn += 1;
            let conn_id = st.next_conn;
            st.generations.entry(machine.clone()).or_default().bump();
            tx.send(Outbound::Text(authenticated.to_json()));
            let old = st.daemons.insert(
                machine.clone(),
                Down {
                    conn_id,
                    tx: tx.clone(),
                    hostname: hello.hostname.clone(),
                    max: hello.max_concurrent_tasks,
                    agents: hello.agents.iter().cloned().collect(),
                    connected_ms: now,
                    last_heartbeat_ms: now,
                    last_pick: 0,
                    full: false,
                },
            );
            if let Some(old) = old {
                old.tx.send(Outbound::Close(
                    kennel_proto::link::close::REPLACED,
                    "replaced by a newer connection from the same machine".into(),
                ));
            }
            let held = st
                .holds
                .iter()
                .filter(|(_, h)| h.daemon == machine)
                .map(|(task_id, h)| TaskRef {
                    task_id: task_id.clone(),
                    attempt: h.attempt,
                });
            let settled = schedule::reattach(held, &hello.running_tasks);
            for r in &settled.stale {
                let e = stale_error(
                    &r.task_id,
                    r.attempt,
                    format!(
                        "attempt {} of task {} is not yours; stop it and drop its messages",
                        r.attempt, r.task_id
                    ),
                );
                tx.send(Outbound::Text(ServerMessage::Error(e).to_json()));
            }
            let reason = format!("daemon {machine} reconnected without it");
            for r in settled.lost {
                self.report_lost(&mut st, &r.task_id, &reason);
            }
            self.send_capacity(&st);
            self.dispatch(&mut st);
            conn_id
        };
        self.log(
            "connect",
            &format!(
                "daemon {machine} ({}) connected with {} slots",
                hello.hostname, hello.max_concurrent_tasks
            ),
        );
        conn_id
    }

    /// A connection ended. Its attempts wait out the grace, then are reported lost.
    pub fn detach(self: &Arc<Self>, machine: &str, conn_id: u64, reason: &str) {
        let generation = {
            let mut st = self.lock();
            if st.daemons.get(machine).map(|d| d.conn_id) != Some(conn_id) {
                return; // replaced already
            }
            st.daemons.remove(machine);
            let g = st
                .generations
                .entry(machine.to_string())
                .or_default()
                .bump();
            self.send_capacity(&st);
            g
        };
        self.log(
            "disconnect",
            &format!("daemon {machine} disconnected: {reason}"),
        );
        self.start_grace(machine.to_string(), generation);
    }

    fn start_grace(self: &Arc<Self>, machine: String, generation: Generation) {
        let grace = self.cfg.reattach_grace.get();
        self.graces.after(
            grace,
            Grace {
                machine,
                generation,
            },
        );
    }

    /// A daemon's grace has run out: unless it is back (or newer news replaced it), its attempts
    /// are lost.
    fn grace_expired(self: &Arc<Self>, machine: &str, generation: Generation) {
        let mut st = self.lock();
        let current = st.generations.get(machine).copied().unwrap_or_default();
        if !current.grace_lapsed(generation, st.daemons.contains_key(machine)) {
            return;
        }
        let held: Vec<String> = st
            .holds
            .iter()
            .filter(|(_, h)| h.daemon == machine)
            .map(|(t, _)| t.clone())
            .collect();
        let reason = format!(
            "daemon {machine} disconnected and did not return within {}",
            self.cfg.reattach_grace
        );
        for task_id in held {
            self.report_lost(&mut st, &task_id, &reason);
        }
        self.dispatch(&mut st);
    }

    /// Tells the upstream an attempt is lost (seq = last seen + 1, or [`PROBE_SEQ`] when the
    /// relay does not know it) and frees its slot.
    fn report_lost(&self, st: &mut State, task_id: &str, reason: &str) {
        let Some(h) = st.holds.get(task_id) else {
            return;
        };
        let attempt = h.attempt;
        let seq = h.last_seq.map_or(PROBE_SEQ, |s| s + 1);
        tracing::warn!(task_id, attempt, "attempt lost: {reason}");
        self.send_lost(st, task_id, attempt, seq);
        st.holds.remove(task_id);
        self.with_db("record a lost attempt", |h| {
            h.set_status(
                task_id,
                attempt,
                "lost",
                Some(reason),
                Some(self.clock.now_ms()),
            )
        });
    }

    /// A daemon's heartbeat with the number of tasks it runs; fewer than its maximum frees
    /// it from a capacity refusal.
    pub fn heartbeat(&self, machine: &str, active: usize) {
        let mut st = self.lock();
        let freed = match st.daemons.get_mut(machine) {
            Some(d) => {
                d.last_heartbeat_ms = self.clock.now_ms();
                let freed = d.full && (active as u32) < d.max;
                if freed {
                    d.full = false;
                }
                freed
            }
            None => false,
        };
        if freed {
            self.dispatch(&mut st);
        }
    }

    /// Task-scoped messages from a daemon, in arrival order: each is relayed upstream
    /// unchanged if the daemon holds its attempt, refused otherwise (the refusals are
    /// returned). One lock and one history transaction for the whole batch.
    pub fn from_daemon(
        self: &Arc<Self>,
        machine: &str,
        batch: &[(DaemonMessage, &str)],
    ) -> Vec<Refusal> {
        let mut refused = Vec::new();
        let mut forward: Vec<(&str, u32, u64, &str)> = Vec::new();
        let mut ended_any = false;
        let mut requeued: Vec<SpawnTask> = Vec::new();
        let mut st = self.lock();
        let now = self.clock.now_ms();
        for (msg, frame) in batch {
            let Some(hdr) = msg.seq_header() else {
                continue;
            };
            let holds = st
                .holds
                .get(hdr.task_id)
                .is_some_and(|h| h.attempt == hdr.attempt && h.daemon == machine);
            if !holds {
                refused.push(Refusal::Stale(stale_error(
                    hdr.task_id,
                    hdr.attempt,
                    format!(
                        "this relay did not give attempt {} of task {} to you; stop it and drop its messages",
                        hdr.attempt, hdr.task_id
                    ),
                )));
                continue;
            }
            if let DaemonMessage::TaskRejected(m) = msg {
                if m.code.is_some_and(|c| c.is_daemon_state()) {
                    if let Some(spawn) = st.holds.get(hdr.task_id).and_then(|h| h.spawn.clone()) {
                        // The daemon is full or stopping, which says nothing about the task:
                        // it waits here for another slot; upstream never hears of it.
                        st.holds.remove(hdr.task_id);
                        if let Some(d) = st.daemons.get_mut(machine) {
                            d.full = true;
                            let ack = ServerMessage::Ack(kennel_proto::link::Ack {
                                task_id: hdr.task_id.to_string(),
                                attempt: hdr.attempt,
                                seq: hdr.seq,
                            });
                            d.tx.send(Outbound::Text(ack.to_json()));
                        }
                        tracing::info!(
                            task_id = hdr.task_id,
                            machine,
                            "daemon refused a task ({}); queued again",
                            m.reason
                        );
                        self.with_db("record a refused task", |h| {
                            h.set_status(hdr.task_id, hdr.attempt, "queued", Some(&m.reason), None)
                        });
                        requeued.push(spawn);
                        continue;
                    }
                }
            }
            if let Some(h) = st.holds.get_mut(hdr.task_id) {
                h.last_seq = Some(h.last_seq.map_or(hdr.seq, |s| s.max(hdr.seq)));
            }
            forward.push((hdr.task_id, hdr.attempt, hdr.seq, frame));
            let ended = match msg {
                DaemonMessage::TaskAccepted(_) => {
                    self.with_db("record an accepted task", |h| {
                        h.set_status(hdr.task_id, hdr.attempt, "running", None, None)
                    });
                    false
                }
                DaemonMessage::TaskRejected(m) => {
                    self.with_db("record a rejected task", |h| {
                        h.set_status(
                            hdr.task_id,
                            hdr.attempt,
                            "rejected",
                            Some(&m.reason),
                            Some(now),
                        )
                    });
                    true
                }
                DaemonMessage::TaskComplete(m) => {
                    let status = if m.success { "completed" } else { "failed" };
                    self.with_db("record a finished task", |h| {
                        h.set_status(
                            hdr.task_id,
                            hdr.attempt,
                            status,
                            m.error.as_deref(),
                            Some(now),
                        )
                    });
                    true
                }
                DaemonMessage::TaskStatusChange(m)
                    if m.new_status == "lost" || m.new_status == RETURNED =>
                {
                    self.with_db("record a lost task", |h| {
                        h.set_status(hdr.task_id, hdr.attempt, &m.new_status, None, Some(now))
                    });
                    true
                }
                _ => false,
            };
            if ended {
                st.holds.remove(hdr.task_id);
                // One of its slots is free again.
                if let Some(d) = st.daemons.get_mut(machine) {
                    d.full = false;
                }
                ended_any = true;
            }
        }
        if !forward.is_empty() {
            // Kept before it is sent, so an ack can never overtake what it drops.
            self.send_up(&mut st, &forward);
        }
        let back: HashSet<(String, u32)> = requeued
            .iter()
            .map(|s| (s.task_id.clone(), s.attempt))
            .collect();
        // Oldest first at the front, as they were before they went out.
        for s in requeued.into_iter().rev() {
            st.queue.push_front(s);
        }
        if ended_any || !back.is_empty() {
            self.dispatch(&mut st);
        }
        if let (false, Some(up)) = (back.is_empty(), st.upstream.clone()) {
            // Those still waiting here must not run into the upstream's accept deadline.
            for q in &st.queue {
                if back.contains(&(q.task_id.clone(), q.attempt)) {
                    let _ = up.send(self.queued_message(q).to_json());
                }
            }
        }
        refused
    }

    /// Cumulative acks from upstream: drop what they cover from memory (and from `relay.db`,
    /// in one transaction, if anything waits there) and pass each to the daemon holding the
    /// attempt.
    pub fn acks(&self, acks: &[(kennel_proto::link::Ack, &str)]) {
        let mut st = self.lock();
        for (a, _) in acks {
            st.pending.ack(&a.task_id, a.attempt, a.seq);
            if !st.own_lost.is_empty() {
                let key = (a.task_id.clone(), a.attempt);
                if st.own_lost.get(&key).is_some_and(|&s| a.seq >= s) {
                    st.own_lost.remove(&key);
                }
            }
        }
        if st.db_buffered > 0 {
            let rows: Vec<(String, u32, u64)> = acks
                .iter()
                .map(|(a, _)| (a.task_id.clone(), a.attempt, a.seq))
                .collect();
            if let Some(n) = self.with_db("drop acknowledged messages", |h| h.acked_all(&rows)) {
                st.db_buffered = st.db_buffered.saturating_sub(n);
            }
        }
        for (a, frame) in acks {
            let daemon = match st.holds.get(&a.task_id).filter(|h| h.attempt == a.attempt) {
                Some(h) => Some(h.daemon.clone()),
                // Finished attempts (the ack of `taskComplete`) are no longer held.
                None => self
                    .with_db("look up a task's daemon", |h| {
                        h.daemon_of(&a.task_id, a.attempt)
                    })
                    .flatten(),
            };
            if let Some(down) = daemon.and_then(|d| st.daemons.get(&d)) {
                down.tx.send(Outbound::Text(frame.to_string()));
            }
        }
    }

    /// A daemon offers a new capacity over its own link.
    pub fn set_daemon_capacity(&self, machine: &str, c: &Capacity) {
        let mut st = self.lock();
        if let Some(d) = st.daemons.get_mut(machine) {
            d.max = c.max_concurrent_tasks;
            d.agents = c.agents.iter().cloned().collect();
            d.full = false;
        }
        self.send_capacity(&st);
        self.dispatch(&mut st);
    }

    // -----------------------------------------------------------------------------------------
    // reporting

    pub fn status(&self) -> Status {
        let counts = self.db().counts().unwrap_or_default();
        let st = self.lock();
        let buffered = st.pending.len() as u64 + st.db_buffered;
        let mut active: BTreeMap<&str, u32> = BTreeMap::new();
        for h in st.holds.values() {
            *active.entry(h.daemon.as_str()).or_default() += 1;
        }
        let mut daemons: Vec<DownInfo> = st
            .daemons
            .iter()
            .map(|(id, d)| DownInfo {
                id: id.clone(),
                hostname: d.hostname.clone(),
                max_concurrent_tasks: d.max,
                active_tasks: active.get(id.as_str()).copied().unwrap_or(0),
                agents: d.agents.iter().cloned().collect(),
                connected_ms: d.connected_ms,
                last_heartbeat_ms: d.last_heartbeat_ms,
            })
            .collect();
        daemons.sort_by(|a, b| a.id.cmp(&b.id));
        let up = st.upstream.is_some();
        Status {
            status: match (up, daemons.is_empty()) {
                (false, _) => "disconnected",
                (true, true) => "degraded",
                (true, false) => "ok",
            },
            agent_name: self.cfg.agent_name.clone(),
            upstream: self
                .cfg
                .upstream_endpoint()
                .unwrap_or_else(|_| self.cfg.upstream.clone()),
            upstream_connected: up,
            daemon_id: st.upstream_daemon_id.clone(),
            last_heartbeat_ms: st.last_upstream_heartbeat_ms,
            last_heartbeat: st.last_upstream_heartbeat_ms.and_then(rfc3339_ms),
            connected_daemons: daemons.len() as u32,
            daemons,
            active_tasks: st.holds.len() as u32,
            queued_tasks: st.queue.len() as u32,
            total_received: counts.0,
            total_processed: counts.1,
            total_tasks_processed: counts.1,
            buffered_messages: buffered,
            messages_forwarded: self.forwarded.load(Ordering::Relaxed),
        }
    }

    /// What `/health` reports. Reads the database once (a cheap indexed query) and the
    /// upstream flag; takes no lock the routing path holds for long.
    pub fn health(&self) -> Health {
        let readable = match self.db().check() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(
                    error = &e as &dyn std::error::Error,
                    "the relay database failed a health check"
                );
                false
            }
        };
        let healthy = readable && !self.db_failing.load(Ordering::Relaxed);
        let upstream_connected = self.lock().upstream.is_some();
        Health {
            status: match (healthy, upstream_connected) {
                (false, _) => "unhealthy",
                (true, false) => "degraded",
                (true, true) => "ok",
            },
            healthy,
            upstream_connected,
        }
    }
}

impl Relay {
    /// Unknown daemon message types go upstream as they are (not buffered: they carry no seq).
    pub fn forward_unknown(&self, frame: &str) {
        let st = self.lock();
        if let Some(up) = &st.upstream {
            let _ = up.send(frame.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kennel_proto::link::{Secret, TaskAccepted};
    use std::time::Duration;

    fn cfg(dir: &std::path::Path) -> RelayConfig {
        RelayConfig {
            data_dir: dir.to_path_buf(),
            reattach_grace: kennel_proto::Span::from_secs(0),
            ..RelayConfig::default()
        }
    }

    fn hello(machine: &str, slots: u32, agents: &[&str]) -> Authenticate {
        Authenticate {
            api_key: Secret(String::new()),
            machine_id: machine.into(),
            hostname: machine.into(),
            max_concurrent_tasks: slots,
            protocol_version: 1,
            min_protocol_version: None,
            version: String::new(),
            labels: BTreeMap::new(),
            agents: agents.iter().map(|a| a.to_string()).collect(),
            running_tasks: Vec::new(),
        }
    }

    fn spawn(id: &str, agent: &str) -> (ServerMessage, String) {
        let m = ServerMessage::SpawnTask(SpawnTask {
            task_id: id.into(),
            attempt: 1,
            task_name: id.into(),
            prompt: "p".into(),
            repo: None,
            agent: agent.into(),
            env: BTreeMap::new(),
            limits: Default::default(),
            session: None,
        });
        let f = m.to_json();
        (m, f)
    }

    fn attach(
        r: &Arc<Relay>,
        machine: &str,
        slots: u32,
        agents: &[&str],
    ) -> (u64, kennel_link::outbound::LinkRx<Outbound>) {
        let (tx, mut rx) = kennel_link::outbound::channel(1024);
        let id = r.attach(
            &hello(machine, slots, agents),
            tx,
            ServerMessage::error(ErrorCode::Internal, "hello"),
        );
        let _ = rx.try_recv(); // the `authenticated` stand-in
        (id, rx)
    }

    fn spawned(rx: &mut kennel_link::outbound::LinkRx<Outbound>) -> Vec<String> {
        let mut v = Vec::new();
        while let Some(Outbound::Text(t)) = rx.try_recv() {
            if let Ok(ServerMessage::SpawnTask(s)) = serde_json::from_str(&t) {
                v.push(s.task_id);
            }
        }
        v
    }

    #[tokio::test]
    async fn least_loaded_then_queue_then_capacity_upstream() {
        let dir = tempfile::tempdir().unwrap();
        let r = Relay::open(cfg(dir.path())).unwrap();
        let (up_tx, mut up_rx) = mpsc::unbounded_channel();
        r.upstream_up("d-1", up_tx);
        let (_, mut a) = attach(&r, "a", 2, &["command"]);
        let (_, mut b) = attach(&r, "b", 1, &["command", "claude"]);
        for id in ["t1", "t2", "t3", "t4"] {
            let (m, f) = spawn(id, "command");
            r.from_upstream(m, &f);
        }
        let (ga, gb) = (spawned(&mut a), spawned(&mut b));
        assert_eq!(ga.len() + gb.len(), 3, "three slots: {ga:?} {gb:?}");
        assert_eq!((ga.len(), gb.len()), (2, 1));
        assert_eq!(r.status().queued_tasks, 1);

        // The last capacity sent upstream is the sum of slots and the union of agents.
        let mut last = None;
        let mut queued_upstream = Vec::new();
        while let Ok(f) = up_rx.try_recv() {
            match serde_json::from_str(&f) {
                Ok(DaemonMessage::Capacity(c)) => last = Some(c),
                Ok(DaemonMessage::TaskQueued(q)) => queued_upstream.push((q.task_id, q.attempt)),
                _ => {}
            }
        }
        let c = last.unwrap();
        assert_eq!(c.max_concurrent_tasks, 3);
        assert_eq!(
            queued_upstream,
            vec![("t4".to_string(), 1)],
            "t4 waits: taskQueued"
        );
        assert_eq!(c.agents, vec!["claude".to_string(), "command".to_string()]);

        // b finishes its task: the queued one goes to b.
        let done = gb[0].clone();
        let m = DaemonMessage::TaskComplete(kennel_proto::link::TaskComplete {
            task_id: done.clone(),
            attempt: 1,
            seq: 1,
            success: true,
            error: None,
            exit_code: None,
            branch: None,
            commit: None,
        });
        let f = m.to_json();
        assert!(r.from_daemon("b", &[(m, &f)]).is_empty());
        assert_eq!(spawned(&mut b), vec!["t4".to_string()]);
        assert_eq!(r.status().total_processed, 1);
    }

    #[tokio::test]
    async fn reports_on_foreign_attempts_are_refused_and_lost_ones_reported() {
        let dir = tempfile::tempdir().unwrap();
        let r = Relay::open(cfg(dir.path())).unwrap();
        let (_, mut a) = attach(&r, "a", 1, &["command"]);
        let (_, _b) = attach(&r, "b", 1, &["command"]);
        let (m, f) = spawn("t1", "command");
        r.from_upstream(m, &f);
        let holder = if spawned(&mut a).is_empty() { "b" } else { "a" };
        let other = if holder == "a" { "b" } else { "a" };
        let acc = DaemonMessage::TaskAccepted(TaskAccepted {
            task_id: "t1".into(),
            attempt: 1,
            seq: 1,
        });
        let f = acc.to_json();
        assert_eq!(r.from_daemon(other, &[(acc.clone(), &f)]).len(), 1);
        assert!(r.from_daemon(holder, &[(acc, &f)]).is_empty());

        // Upstream down: the report is kept. The holder comes back without the attempt (it
        // restarted): the relay reports it lost at once, and keeps that too.
        let _again = attach(&r, holder, 1, &["command"]);
        assert_eq!(r.status().active_tasks, 0);
        let buffered = r.db().buffered().unwrap();
        assert_eq!(buffered.len(), 2, "{buffered:?}");
        let lost: DaemonMessage = serde_json::from_str(&buffered[1]).unwrap();
        match lost {
            DaemonMessage::TaskStatusChange(s) => {
                assert_eq!((s.seq, s.new_status.as_str()), (2, "lost"))
            }
            other => panic!("{other:?}"),
        }
        // Reconnecting upstream replays both, in order.
        let (up_tx, mut up_rx) = mpsc::unbounded_channel();
        r.upstream_up("d-1", up_tx);
        assert_eq!(up_rx.try_recv().unwrap(), buffered[0]);
        assert_eq!(up_rx.try_recv().unwrap(), buffered[1]);
    }

    #[tokio::test]
    async fn a_daemon_gone_past_its_grace_has_its_attempt_reported_lost_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let clock = kennel_clock::ManualClock::new(1_800_000_000_000);
        let r = Relay::open_with_clock(
            RelayConfig {
                reattach_grace: kennel_proto::Span::from_secs(60),
                ..cfg(dir.path())
            },
            Arc::new(clock.clone()),
        )
        .unwrap();
        let (conn, mut a) = attach(&r, "a", 1, &["command"]);
        let (m, f) = spawn("t1", "command");
        r.from_upstream(m, &f);
        assert_eq!(spawned(&mut a), ["t1"]);
        let acc = DaemonMessage::TaskAccepted(TaskAccepted {
            task_id: "t1".into(),
            attempt: 1,
            seq: 1,
        });
        let f = acc.to_json();
        assert!(r.from_daemon("a", &[(acc, &f)]).is_empty());
        r.detach("a", conn, "link dropped");

        // The upstream is down, so what the relay reports is kept in its database: the
        // acceptance now, the loss once the grace has run out.
        let kept = |r: &Relay| r.db().buffered().unwrap();
        clock.advance(Duration::from_millis(59_999));
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert_eq!(kept(&r).len(), 1, "{:?}", kept(&r));
        clock.advance(Duration::from_millis(1));
        tokio::time::timeout(Duration::from_secs(10), async {
            while kept(&r).len() < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("no lost report after the grace");
        match serde_json::from_str::<DaemonMessage>(&kept(&r)[1]).unwrap() {
            DaemonMessage::TaskStatusChange(s) => {
                assert_eq!(
                    (s.task_id.as_str(), s.seq, s.new_status.as_str()),
                    ("t1", 2, "lost")
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn reports_stay_in_memory_while_up_and_move_to_disk_when_the_link_drops() {
        let dir = tempfile::tempdir().unwrap();
        let r = Relay::open(cfg(dir.path())).unwrap();
        let (up_tx, mut up_rx) = mpsc::unbounded_channel();
        r.upstream_up("d-1", up_tx);
        let (_, mut a) = attach(&r, "a", 1, &["command"]);
        let (m, f) = spawn("t1", "command");
        r.from_upstream(m, &f);
        assert_eq!(spawned(&mut a), vec!["t1".to_string()]);
        let out = |seq: u64| {
            let m = DaemonMessage::TaskOutput(kennel_proto::link::TaskOutput {
                task_id: "t1".into(),
                attempt: 1,
                seq,
                stream: kennel_proto::link::OutputStream::Stdout,
                output: format!("line {seq}"),
                is_partial: false,
            });
            let f = m.to_json();
            (m, f)
        };
        let batch: Vec<(DaemonMessage, String)> = (1..=3).map(out).collect();
        let refs: Vec<(DaemonMessage, &str)> =
            batch.iter().map(|(m, f)| (m.clone(), f.as_str())).collect();
        assert!(r.from_daemon("a", &refs).is_empty());
        let sent: Vec<String> = std::iter::from_fn(|| up_rx.try_recv().ok())
            .filter(|f| f.contains("taskOutput"))
            .collect();
        assert_eq!(sent.len(), 3, "forwarded at once");
        assert!(
            r.db().buffered().unwrap().is_empty(),
            "no disk write while up"
        );
        assert_eq!(r.status().buffered_messages, 3);

        // seq 1 acked; the link drops: 2 and 3 go to disk.
        let ack = |seq: u64| {
            let a = kennel_proto::link::Ack {
                task_id: "t1".into(),
                attempt: 1,
                seq,
            };
            let f = ServerMessage::Ack(a.clone()).to_json();
            (a, f)
        };
        let (a1, f1) = ack(1);
        r.acks(&[(a1, &f1)]);
        r.upstream_down("test");
        assert_eq!(
            r.db().buffered().unwrap(),
            vec![batch[1].1.clone(), batch[2].1.clone()]
        );
        // Reported while down: straight to disk, after the others.
        let (m4, f4) = out(4);
        assert!(r.from_daemon("a", &[(m4, &f4)]).is_empty());
        assert_eq!(r.status().buffered_messages, 3);

        // Up again: replayed in order; acks empty the disk buffer.
        let (up_tx, mut up_rx) = mpsc::unbounded_channel();
        r.upstream_up("d-1", up_tx);
        let replayed: Vec<String> = std::iter::from_fn(|| up_rx.try_recv().ok())
            .filter(|f| f.contains("taskOutput"))
            .collect();
        assert_eq!(
            replayed,
            vec![batch[1].1.clone(), batch[2].1.clone(), f4.clone()]
        );
        let (a4, f4) = ack(4);
        r.acks(&[(a4, &f4)]);
        assert!(r.db().buffered().unwrap().is_empty());
        assert_eq!(r.status().buffered_messages, 0);
    }

    #[tokio::test]
    async fn an_upstream_that_stops_acking_moves_reports_to_disk() {
        let dir = tempfile::tempdir().unwrap();
        let r = Relay::open(RelayConfig {
            max_pending_messages: 2,
            ..cfg(dir.path())
        })
        .unwrap();
        let (up_tx, _up_rx) = mpsc::unbounded_channel();
        r.upstream_up("d-1", up_tx);
        let (_, mut a) = attach(&r, "a", 1, &["command"]);
        let (m, f) = spawn("t1", "command");
        r.from_upstream(m, &f);
        assert_eq!(spawned(&mut a), vec!["t1".to_string()]);
        for seq in 1..=3 {
            let m = DaemonMessage::TaskAccepted(TaskAccepted {
                task_id: "t1".into(),
                attempt: 1,
                seq,
            });
            let f = m.to_json();
            assert!(r.from_daemon("a", &[(m, &f)]).is_empty());
        }
        assert_eq!(r.db().buffered().unwrap().len(), 3, "over the cap: on disk");
        assert_eq!(r.status().buffered_messages, 3);
        let ack = kennel_proto::link::Ack {
            task_id: "t1".into(),
            attempt: 1,
            seq: 3,
        };
        let f = ServerMessage::Ack(ack.clone()).to_json();
        r.acks(&[(ack, &f)]);
        assert!(r.db().buffered().unwrap().is_empty());
        assert_eq!(r.status().buffered_messages, 0);
    }

    #[test]
    fn heartbeat_times_are_rfc3339_in_utc_with_milliseconds() {
        assert_eq!(
            rfc3339_ms(1_700_000_000_123).as_deref(),
            Some("2023-11-14T22:13:20.123Z")
        );
        assert_eq!(rfc3339_ms(0).as_deref(), Some("1970-01-01T00:00:00Z"));
    }

    #[tokio::test]
    async fn health_is_degraded_without_upstream_and_unhealthy_after_a_database_failure() {
        let dir = tempfile::tempdir().unwrap();
        let r = Relay::open(cfg(dir.path())).unwrap();
        let h = r.health();
        assert_eq!(
            (h.status, h.healthy, h.upstream_connected),
            ("degraded", true, false)
        );
        let (up_tx, _up_rx) = mpsc::unbounded_channel();
        r.upstream_up("d-1", up_tx);
        assert_eq!(r.health().status, "ok");

        // A failed write (a full disk, say) makes it unhealthy until an operation succeeds.
        let failed: Option<()> = r.with_db("write something", |_| {
            Err(HistoryError::Db(rusqlite::Error::InvalidQuery))
        });
        assert!(failed.is_none());
        let h = r.health();
        assert_eq!(
            (h.status, h.healthy, h.upstream_connected),
            ("unhealthy", false, true)
        );
        r.log("connect", "the disk has room again");
        assert_eq!(r.health().status, "ok");

        let st = r.status();
        assert_eq!(
            (st.connected_daemons, st.last_heartbeat.as_deref()),
            (0, None)
        );
        r.upstream_heartbeat();
        let st = r.status();
        assert_eq!(st.last_heartbeat, st.last_heartbeat_ms.and_then(rfc3339_ms));
        assert!(st.last_heartbeat.is_some());
    }
}
