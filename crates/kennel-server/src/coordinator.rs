//! The coordinator's live state: the queue of runnable tasks, the connected daemons with their
//! capacity, and the attempts they hold. It decides who runs what (least-loaded daemon that
//! satisfies the task, FIFO within priority) and reacts to daemons coming, going and reporting.
//!
//! The store is the source of truth; this is its in-memory index. Every change goes to the
//! store first (conditionally, so a racing change loses cleanly) and is mirrored here after.
//! The state lock is never held across an `.await`. Scheduling runs on events (submit,
//! capacity change, daemon connect) through a [`Notify`]; timers exist only for deadlines
//! (lease, reattach grace).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kennel_clock::Deadlines;
use kennel_link::schedule::{self, Candidate, Generation, Needs, Ties};
use kennel_proto::api::WaitingTasks;
use kennel_proto::api::{CreateTask, Daemon, Event, Task};
use kennel_proto::link::{
    ErrorCode, ErrorFrame, InterruptTask, RejectCode, SendMessage, ServerMessage, SpawnTask,
    TaskCommand, TaskLimits, TaskRef,
};
use kennel_proto::{validate_id, AttemptStatus, TaskStatus};
use kennel_store::{
    Applied, DaemonHello, Dispatch, Effect, EndAttempt, Ended, NewTask, Report, Retry, Store,
    StoreError,
};
use tokio::sync::{broadcast, mpsc, Notify};

use crate::cluster::{Heard, Peers, Signal, Solo};
use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::outbound::LinkTx;
pub use crate::outbound::Outbound;
use crate::Clock;

/// Labels a task may require (a daemon advertises at most this many).
const MAX_LABELS: usize = 64;
/// Environment variables a task may set for its agent.
const MAX_ENV_VARS: usize = 256;
/// Room in a `spawnTask` frame for everything besides the submitter's fields: type, ids,
/// attempt, agent, limits, JSON punctuation (a quarter of the frame when that is smaller).
const FRAME_MARGIN: usize = 4096;

/// The size of a submitted value as it will be encoded in a frame.
fn json_len<T: serde::Serialize + ?Sized>(v: &T) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX / 4, |v| v.len())
}

/// `1.5 MiB`, `12 KiB`, `900 B`.
fn human_bytes(n: usize) -> String {
    const KIB: f64 = 1024.0;
    let f = n as f64;
    if f >= KIB * KIB {
        format!("{:.1} MiB", f / (KIB * KIB))
    } else if f >= KIB {
        format!("{:.1} KiB", f / KIB)
    } else {
        format!("{n} B")
    }
}

/// Most dispatches recorded in one store transaction.
const DISPATCH_BATCH: usize = 256;

/// How often the event log is pruned of events older than `api.event_retention`.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// With several coordinators, how long the event tail lets events gather after a read: a
/// read every event commit would cost the database a statement per commit and coordinator.
const TAIL_GATHER: Duration = Duration::from_millis(50);

/// With several coordinators, how often the event tail reads even when nothing woke it.
const TAIL_RECHECK: Duration = Duration::from_secs(1);

/// With several coordinators, how often at most one not leading reads which daemons the others
/// hold (for the waiting reason in a submit's answer).
const ELSEWHERE_EVERY: Duration = Duration::from_secs(2);

/// With several coordinators, how often each reads the queue from the store whatever it heard:
/// a task committed by a coordinator that died before its signal went out is queued nowhere
/// else (no one else has heard of it) until then.
const QUEUE_RESYNC_EVERY: Duration = Duration::from_secs(10);

/// How long a task must stay unschedulable before it is announced as waiting: long enough that
/// daemons reconnecting after a coordinator restart do not flood the event stream, short
/// enough that a user sees why within a second or two.
const WAITING_SETTLE: Duration = Duration::from_millis(700);

/// The sending half of one daemon connection.
#[derive(Clone)]
pub struct Conn {
    pub id: u64,
    pub tx: LinkTx,
    /// The API key it authenticated with; revoking it closes the connection.
    pub key_id: Arc<str>,
}

impl Conn {
    fn send(&self, m: ServerMessage) {
        // A closed channel means the connection is going away; its disconnect handles the rest.
        self.tx.msg(m);
    }
}

struct Pending {
    task: Task,
    since: Instant,
}

struct Live {
    attempt: u32,
    daemon_id: String,
    accepted: bool,
    /// A relay holds it in its queue (`taskQueued`): no accept deadline.
    queued: bool,
}

struct DaemonSlot {
    id: String,
    max: u32,
    labels: BTreeMap<String, String>,
    agents: BTreeSet<String>,
    draining: bool,
    conn: Option<Conn>,
    /// Tasks whose live attempt this daemon holds.
    held: HashSet<String>,
    /// Dispatch counter value at its last dispatch (tie-break: longest idle first).
    last_pick: u64,
    /// Bumped on every connect and disconnect, so a stale grace timer knows to do nothing.
    generation: Generation,
    /// It refused a task for capacity: nothing more goes to it until it reports a free slot
    /// (an attempt of its ends, a heartbeat with fewer active tasks than its maximum, a
    /// `capacity` message or a reconnect).
    full: bool,
}

impl DaemonSlot {
    /// How the shared scheduling rules see it.
    fn candidate(&self) -> Candidate<'_> {
        Candidate {
            id: &self.id,
            connected: self.conn.is_some(),
            draining: self.draining,
            max: self.max,
            running: self.held.len() as u32,
            full: self.full,
            agents: &self.agents,
            labels: &self.labels,
            last_pick: self.last_pick,
        }
    }

    /// Whether it could ever run `task` as it is now (free slots aside).
    fn serves(&self, task: &Task) -> bool {
        self.candidate().serves(&needs(task))
    }
}

/// What `task` needs of a daemon.
fn needs(task: &Task) -> Needs<'_> {
    Needs {
        agent: &task.agent,
        labels: &task.labels,
    }
}

/// A queued task that no connected daemon can run, and why.
struct Waiting {
    reason: String,
    since: Instant,
    /// Published as a `task.waiting` event (after [`WAITING_SETTLE`]).
    announced: bool,
}

/// What a task needs of a daemon: its agent and its labels.
type Requirement = (String, Vec<(String, String)>);

/// A change of a task's waiting reason, to publish.
struct WaitingChange {
    task_id: String,
    /// `None`: it can be scheduled again.
    reason: Option<String>,
}

/// Higher priority first; within one priority, older first (task ids are UUIDv7, which sort
/// by creation time and are monotonic within a process).
type QueueKey = (Reverse<i32>, String);

#[derive(Default)]
struct State {
    queue: BTreeMap<QueueKey, Pending>,
    queued: HashMap<String, QueueKey>,
    /// Queued tasks another coordinator claimed, until it dispatches them or the claim
    /// lapses ([`Timer::Claimed`]).
    claimed_elsewhere: HashSet<String>,
    daemons: HashMap<String, DaemonSlot>,
    by_machine: HashMap<String, String>,
    live: HashMap<String, Live>,
    next_conn: u64,
    picks: u64,
    /// Queued tasks no connected daemon can run.
    waiting: HashMap<String, Waiting>,
    /// Tasks queued since the last waiting check.
    unchecked: Vec<String>,
    /// Daemons came, went, drained or changed what they offer: check every queued task.
    recheck_all: bool,
    /// With several coordinators: the daemons connected to the others (from the store), which
    /// can run what is queued here just as well; only waiting reasons read it.
    elsewhere: Vec<DaemonSlot>,
    /// With several coordinators, on one not leading: why queued tasks wait, as the leader
    /// announced it (`task.waiting` events, read by the event tail).
    waiting_heard: HashMap<String, String>,
}

impl State {
    fn enqueue(&mut self, task: Task) {
        let key = (Reverse(task.priority), task.id.clone());
        self.unchecked.push(task.id.clone());
        self.queued.insert(task.id.clone(), key.clone());
        self.queue.insert(
            key,
            Pending {
                task,
                since: Instant::now(),
            },
        );
    }

    fn unqueue(&mut self, task_id: &str) -> Option<Pending> {
        self.waiting_heard.remove(task_id);
        let key = self.queued.remove(task_id)?;
        self.unchecked.push(task_id.to_string());
        self.queue.remove(&key)
    }

    /// Mirrors a task's new state from the store: requeued tasks go back in the queue,
    /// finished ones free their slot, running ones have their lease satisfied.
    fn observe(&mut self, task: &Task) {
        match task.status {
            TaskStatus::Queued => {
                self.release(&task.id);
                if !self.queued.contains_key(&task.id) {
                    self.enqueue(task.clone());
                }
            }
            status => self.observe_status(&task.id, status),
        }
    }

    /// [`State::observe`] of a task that is not queued.
    fn observe_status(&mut self, id: &str, status: TaskStatus) {
        match status {
            TaskStatus::Completed
            | TaskStatus::Failed
            | TaskStatus::Cancelled
            | TaskStatus::Lost => self.release(id),
            TaskStatus::Running | TaskStatus::Paused => {
                if let Some(l) = self.live.get_mut(id) {
                    l.accepted = true;
                }
            }
            TaskStatus::Queued | TaskStatus::Dispatched => {}
        }
    }

    /// The first part of observing a change another coordinator made: the task leaves this
    /// queue unless it is queued, and an attempt of it held here is released if the change
    /// is of a newer attempt. False when the change is of an older attempt than the one held
    /// here (a signal overtaken by a later one): it is then ignored.
    fn observe_elsewhere(&mut self, id: &str, status: TaskStatus, attempt: u32) -> bool {
        self.claimed_elsewhere.remove(id);
        if let Some(l) = self.live.get(id) {
            if attempt < l.attempt {
                return false;
            }
            if attempt > l.attempt {
                self.release(id);
            }
        }
        if status != TaskStatus::Queued {
            self.unqueue(id);
        }
        true
    }

    fn release(&mut self, task_id: &str) {
        if let Some(live) = self.live.remove(task_id) {
            if let Some(d) = self.daemons.get_mut(&live.daemon_id) {
                d.held.remove(task_id);
                // An attempt of its ended: it has a free slot again.
                d.full = false;
            }
        }
    }

    /// Why no connected daemon can run `task` (free slots aside), or `None` if one can.
    fn why_unschedulable(&self, task: &Task) -> Option<String> {
        let mut connected: Vec<&DaemonSlot> = self
            .daemons
            .values()
            .filter(|d| d.conn.is_some())
            .chain(&self.elsewhere)
            .collect();
        if connected.is_empty() {
            return Some(
                "no daemon is connected (start one with `kennel daemon`, or check that yours \
                 can reach the coordinator)"
                    .into(),
            );
        }
        if connected.iter().any(|d| !d.draining && d.serves(task)) {
            return None;
        }
        connected.sort_by(|a, b| a.id.cmp(&b.id));
        let serving: Vec<&str> = connected
            .iter()
            .filter(|d| d.serves(task))
            .map(|d| d.id.as_str())
            .collect();
        if !serving.is_empty() {
            return Some(format!(
                "every daemon that can run it is draining ({}); `kennel daemons undrain ID` \
                 lets one take work again",
                serving.join(", ")
            ));
        }
        let with_agent: Vec<&&DaemonSlot> = connected
            .iter()
            .filter(|d| d.agents.contains(&task.agent))
            .collect();
        if with_agent.is_empty() {
            let offered: Vec<String> = connected
                .iter()
                .map(|d| {
                    let mut agents: Vec<&str> = d.agents.iter().map(String::as_str).collect();
                    agents.sort_unstable();
                    let agents = if agents.is_empty() {
                        "nothing".to_string()
                    } else {
                        agents.join(", ")
                    };
                    format!("{agents} on {}", d.id)
                })
                .collect();
            return Some(format!(
                "no connected daemon offers agent \"{}\" (offered: {})",
                task.agent,
                offered.join("; ")
            ));
        }
        let want: Vec<String> = task
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let have: Vec<String> = with_agent
            .iter()
            .map(|d| {
                let labels: Vec<String> =
                    d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let labels = if labels.is_empty() {
                    "no labels".to_string()
                } else {
                    labels.join(",")
                };
                format!("{}: {labels}", d.id)
            })
            .collect();
        Some(format!(
            "no connected daemon offering agent \"{}\" has the labels {} ({})",
            task.agent,
            want.join(","),
            have.join("; ")
        ))
    }

    /// Brings [`State::waiting`] up to date and returns what to announce: tasks that stayed
    /// unschedulable for [`WAITING_SETTLE`], and announced ones that can run again.
    fn refresh_waiting(&mut self, now: Instant) -> Vec<WaitingChange> {
        let check: Vec<String> = if std::mem::take(&mut self.recheck_all) {
            self.unchecked.clear();
            self.queued.keys().cloned().collect()
        } else {
            std::mem::take(&mut self.unchecked)
        };
        let mut changes = Vec::new();
        // Tasks with the same requirements get the same answer; ask once per requirement.
        let mut answers: HashMap<Requirement, Option<String>> = HashMap::new();
        for id in check {
            let Some(key) = self.queued.get(&id) else {
                if let Some(w) = self.waiting.remove(&id) {
                    if w.announced {
                        changes.push(WaitingChange {
                            task_id: id,
                            reason: None,
                        });
                    }
                }
                continue;
            };
            let Some(p) = self.queue.get(key) else {
                continue;
            };
            let req = (
                p.task.agent.clone(),
                p.task
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            );
            let reason = match answers.get(&req) {
                Some(r) => r.clone(),
                None => {
                    let r = self.why_unschedulable(&p.task);
                    answers.insert(req, r.clone());
                    r
                }
            };
            match (reason, self.waiting.get_mut(&id)) {
                (None, Some(_)) => {
                    if self.waiting.remove(&id).is_some_and(|w| w.announced) {
                        changes.push(WaitingChange {
                            task_id: id,
                            reason: None,
                        });
                    }
                }
                (None, None) => {}
                (Some(r), Some(w)) => {
                    if w.reason != r {
                        w.reason = r;
                        w.announced = false;
                    }
                }
                (Some(r), None) => {
                    self.waiting.insert(
                        id,
                        Waiting {
                            reason: r,
                            since: now,
                            announced: false,
                        },
                    );
                }
            }
        }
        // Dispatched or ended tasks leave the waiting set.
        let gone: Vec<String> = self
            .waiting
            .keys()
            .filter(|id| !self.queued.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if self.waiting.remove(&id).is_some_and(|w| w.announced) {
                changes.push(WaitingChange {
                    task_id: id,
                    reason: None,
                });
            }
        }
        for (id, w) in self.waiting.iter_mut() {
            if !w.announced && now.duration_since(w.since) >= WAITING_SETTLE {
                w.announced = true;
                changes.push(WaitingChange {
                    task_id: id.clone(),
                    reason: Some(w.reason.clone()),
                });
            }
        }
        changes
    }

    fn update_gauges(&self) {
        metrics::gauge!("kennel_queue_depth").set(self.queue.len() as f64);
        let connected = self.daemons.values().filter(|d| d.conn.is_some());
        let (mut n, mut total, mut used) = (0u32, 0u32, 0u32);
        for d in connected {
            n += 1;
            total += d.max;
            used += d.held.len() as u32;
        }
        metrics::gauge!("kennel_daemons_connected").set(n as f64);
        metrics::gauge!("kennel_capacity_total").set(total as f64);
        metrics::gauge!("kennel_capacity_used").set(used as f64);
    }

    /// Reserves a slot for a new task with these needs, as [`State::pick`] would for a queued
    /// one, if a daemon linked here can take it and nothing queued here waits before it;
    /// returns the daemon.
    fn reserve_for_new(
        &mut self,
        task_id: &str,
        agent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<String> {
        if !self.queue.is_empty() {
            return None;
        }
        let daemon_id = best_daemon(&self.daemons, &Needs { agent, labels })?;
        hold(&mut self.picks, &mut self.daemons, &daemon_id, task_id);
        self.go_live(task_id, &daemon_id, 1);
        Some(daemon_id)
    }

    /// Whether a daemon linked here could take `task` now.
    fn has_slot_for(&self, task: &Task) -> bool {
        best_daemon(&self.daemons, &needs(task)).is_some()
    }

    /// Records attempt `attempt` of `task_id` as handed to `daemon_id`, not yet accepted.
    fn go_live(&mut self, task_id: &str, daemon_id: &str, attempt: u32) {
        let live = Live {
            attempt,
            daemon_id: daemon_id.to_string(),
            accepted: false,
            queued: false,
        };
        self.live.insert(task_id.to_string(), live);
    }

    /// Picks up to `max` (task, daemon) pairs and reserves them in memory.
    fn pick(&mut self, max: usize) -> Vec<(Pending, Dispatch)> {
        let mut out = Vec::new();
        let mut free: u32 = self
            .daemons
            .values()
            .filter(|d| d.conn.is_some() && !d.draining)
            .map(|d| d.candidate().free())
            .sum();
        let mut chosen_keys = Vec::new();
        for (key, pending) in &self.queue {
            if free == 0 || chosen_keys.len() >= max {
                break;
            }
            let Some(daemon_id) = best_daemon(&self.daemons, &needs(&pending.task)) else {
                continue;
            };
            hold(
                &mut self.picks,
                &mut self.daemons,
                &daemon_id,
                &pending.task.id,
            );
            free -= 1;
            chosen_keys.push((key.clone(), daemon_id));
        }
        for (key, daemon_id) in chosen_keys {
            if let Some(p) = self.queue.remove(&key) {
                self.queued.remove(&p.task.id);
                let attempt = p.task.attempt + 1;
                self.go_live(&p.task.id, &daemon_id, attempt);
                let d = Dispatch {
                    task_id: p.task.id.clone(),
                    attempt,
                    daemon_id,
                };
                out.push((p, d));
            }
        }
        out
    }
}

/// The daemon linked here that a task with `needs` goes to: least loaded, then longest idle.
fn best_daemon(daemons: &HashMap<String, DaemonSlot>, needs: &Needs<'_>) -> Option<String> {
    schedule::pick(
        daemons.values().map(DaemonSlot::candidate),
        needs,
        Ties::MostFreeThenIdlest,
    )
    .map(str::to_string)
}

/// Reserves a slot of `daemon_id` (one of `daemons`) for `task_id`, counting the pick.
fn hold(
    picks: &mut u64,
    daemons: &mut HashMap<String, DaemonSlot>,
    daemon_id: &str,
    task_id: &str,
) {
    *picks += 1;
    if let Some(slot) = daemons.get_mut(daemon_id) {
        slot.last_pick = *picks;
        slot.held.insert(task_id.to_string());
    }
}

/// Why a daemon may not connect as the machine it names.
#[derive(Debug)]
pub enum IdentityRefused {
    /// Another key owns the machine id; the message says what to do.
    Taken(String),
    Store(StoreError),
}

impl From<StoreError> for IdentityRefused {
    fn from(e: StoreError) -> Self {
        IdentityRefused::Store(e)
    }
}

/// Where a daemon stands after `authenticate`.
pub struct Attached {
    pub conn_id: u64,
}

/// What the other coordinators hear of the task changes among published events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tell {
    /// Every change: a task they may hold queued, or run on a daemon that moved to them.
    /// `claimed` says this coordinator has a free slot for the newly queued task and
    /// dispatches it itself (see [`Signal::Task`]).
    Every { claimed: bool },
    /// Only tasks queued (again): the other changes are of attempts this coordinator's own
    /// links run, or of a task never queued, which no other coordinator holds.
    Queued,
}

/// The coordinator: shared by the HTTP API, the daemon hub and the timers.
pub struct Coordinator {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub cfg: ServerConfig,
    state: Mutex<State>,
    wake: Notify,
    events: broadcast::Sender<Arc<Event>>,
    /// Task ids whose output or status changed: wakes output streams.
    output: broadcast::Sender<Arc<str>>,
    /// Ids of API keys revoked on this coordinator: ends their live sessions.
    revoked: broadcast::Sender<Arc<str>>,
    started: Instant,
    /// Leases, reattach graces and dispatch retries, as deadlines on `clock`.
    deadlines: Deadlines<Timer>,
    /// Where they come back when due; taken by [`Coordinator::run_timers`].
    due: Mutex<Option<mpsc::UnboundedReceiver<Timer>>>,
    /// The other coordinators on the same database ([`Solo`] on SQLite).
    peers: Arc<dyn Peers>,
    /// Wakes the event tail ([`Coordinator::run_event_tail`]) when events were committed.
    tail: Notify,
    /// With several coordinators: this one holds the rescue lease, and so also announces
    /// which queued tasks wait and why (one coordinator does, for all).
    leading: std::sync::atomic::AtomicBool,
}

/// The lease held by the coordinator that rescues the others' daemons.
const RESCUE_LEASE: &str = "rescue";

/// Milliseconds since the epoch of an RFC 3339 time the store wrote.
fn millis_of(at: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Where the daemon running an attempt is linked.
enum Holder {
    Here(Conn),
    /// On another coordinator sharing the database: the daemon's id.
    Elsewhere(String),
}

/// What a deadline of the coordinator means when it is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Timer {
    /// `accept_timeout` after dispatch: the attempt must have been accepted by now.
    Lease { task_id: String, attempt: u32 },
    /// `reattach_grace` after a daemon dropped: its attempts are lost unless it is back.
    Grace {
        daemon_id: String,
        generation: Generation,
    },
    /// Recording dispatches failed a second ago: try again.
    Redispatch,
    /// Another coordinator claimed this queued task [`crate::cluster::CLAIM_WAIT`] ago: queue
    /// it here too if it is still queued.
    Claimed { task_id: String },
}

impl Coordinator {
    /// A coordinator on `store`, timing leases and graces on `clock`. Needs a tokio runtime (it
    /// starts the deadline queue); [`Coordinator::run_timers`] must run for deadlines to act.
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, cfg: ServerConfig) -> Arc<Self> {
        Self::with_peers(store, clock, cfg, Solo::peers(crate::ids::time_ordered()))
    }

    /// A coordinator that shares its database with `peers` (several coordinators on one
    /// PostgreSQL): it tells them what changes here and [`Coordinator::run_peers`] applies what
    /// they say.
    pub fn with_peers(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        cfg: ServerConfig,
        peers: Arc<dyn Peers>,
    ) -> Arc<Self> {
        let (deadlines, due) = Deadlines::start(clock.clone());
        let (events, _) = broadcast::channel(8192);
        let (output, _) = broadcast::channel(8192);
        let (revoked, _) = broadcast::channel(64);
        Arc::new(Coordinator {
            store,
            clock,
            cfg,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            events,
            output,
            revoked,
            started: Instant::now(),
            deadlines,
            due: Mutex::new(Some(due)),
            peers,
            tail: Notify::new(),
            leading: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Acts on deadlines as the clock reaches them. Runs until the process ends; each handler
    /// runs as its own task, so a slow store write for one does not hold up the others.
    pub async fn run_timers(self: Arc<Self>) {
        let Some(mut due) = self.due.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        while let Some(timer) = due.recv().await {
            let me = self.clone();
            match timer {
                Timer::Lease { task_id, attempt } => {
                    tokio::spawn(async move { me.lease_expired(&task_id, attempt).await });
                }
                Timer::Grace {
                    daemon_id,
                    generation,
                } => {
                    tokio::spawn(async move { me.grace_expired(&daemon_id, generation).await });
                }
                Timer::Redispatch => me.kick(),
                Timer::Claimed { task_id } => {
                    tokio::spawn(async move { me.claim_expired(&task_id).await });
                }
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; carry on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    pub fn subscribe_output(&self) -> broadcast::Receiver<Arc<str>> {
        self.output.subscribe()
    }

    /// A key was revoked: its daemon connections close now (4001), and its event streams end
    /// (see [`Coordinator::revocation_of`]).
    pub fn key_revoked(&self, key_id: &str) {
        self.close_revoked(key_id);
        if self.peers.shared() {
            self.peers.send(Signal::Revoked {
                key: key_id.to_string(),
            });
        }
    }

    /// Closes what `key_id` opened on this coordinator.
    fn close_revoked(&self, key_id: &str) {
        let conns: Vec<(String, Conn)> = {
            let st = self.lock();
            st.daemons
                .values()
                .filter_map(|d| d.conn.clone().map(|c| (d.id.clone(), c)))
                .filter(|(_, c)| &*c.key_id == key_id)
                .collect()
        };
        for (daemon_id, c) in conns {
            tracing::info!(
                daemon_id,
                key_id,
                "closing a daemon link whose key was revoked"
            );
            c.tx.send(Outbound::Close(
                kennel_proto::link::close::UNAUTHORIZED,
                "API key revoked".into(),
            ));
        }
        let _ = self.revoked.send(Arc::from(key_id));
    }

    /// Ids of keys as they are revoked, here or (with several coordinators) on another.
    pub fn subscribe_revoked(&self) -> broadcast::Receiver<Arc<str>> {
        self.revoked.subscribe()
    }

    /// Resolves when `key_id` is revoked on this coordinator. Subscribe before serving a
    /// long-lived response, so a revoke while it runs ends it.
    pub fn revocation_of(&self, key_id: &str) -> impl std::future::Future<Output = ()> + Send {
        let mut rx = self.revoked.subscribe();
        let key_id: Arc<str> = Arc::from(key_id);
        async move {
            loop {
                match rx.recv().await {
                    Ok(k) if k == key_id => return,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
                }
            }
        }
    }

    /// Whether this coordinator runs the work one coordinator does for all (it holds the
    /// rescue lease); always, on a database of its own.
    pub fn leads(&self) -> bool {
        !self.peers.shared() || self.leading.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Publishes events committed by another component (the lifecycle manager's changes):
    /// to this coordinator's streams, and with several coordinators to the others'.
    pub fn publish_events(&self, events: Vec<Event>) {
        if !events.is_empty() {
            self.publish(events)
        }
    }

    fn publish(&self, events: impl IntoIterator<Item = Event>) {
        self.publish_telling(events, Tell::Every { claimed: false })
    }

    /// [`Coordinator::publish`], telling the other coordinators of the task changes among
    /// `events` as `tell` says.
    fn publish_telling(&self, events: impl IntoIterator<Item = Event>, tell: Tell) {
        if self.peers.shared() {
            // Every coordinator's streams are fed by its event tail, in the store's id order,
            // whichever coordinator committed the event; the others re-read changed tasks.
            let mut any = false;
            for ev in events {
                any = true;
                self.signal_task(&ev, tell);
            }
            if any {
                self.peers.send(Signal::Events);
                self.tail.notify_one();
            }
            return;
        }
        for ev in events {
            self.broadcast(ev);
        }
    }

    /// Tells the other coordinators of a task's new status, if `ev` records one and `tell`
    /// says they hear of it.
    fn signal_task(&self, ev: &Event, tell: Tell) {
        let Some(id) = &ev.task_id else {
            return;
        };
        if matches!(ev.kind.as_str(), "task.created" | "task.status") {
            let status = serde_json::from_value(ev.data["status"].clone()).ok();
            let claimed = match tell {
                Tell::Every { claimed } => claimed,
                Tell::Queued if status == Some(TaskStatus::Queued) => false,
                Tell::Queued => return,
            };
            let attempt = ev.data["attempt"].as_u64().unwrap_or(0) as u32;
            self.peers.send(Signal::Task {
                id: id.clone(),
                status,
                attempt: Some(attempt),
                claimed,
            });
        }
    }

    fn broadcast(&self, ev: Event) {
        if let Some(t) = &ev.task_id {
            let _ = self.output.send(Arc::from(t.as_str()));
        }
        let _ = self.events.send(Arc::new(ev));
    }

    /// Output of `task_id` was stored here: wake its output streams, here and elsewhere.
    fn output_grew(&self, task_id: &str) {
        let _ = self.output.send(Arc::from(task_id));
        if self.peers.shared() {
            self.peers.send(Signal::Output {
                task: task_id.to_string(),
            });
        }
    }

    /// Feeds this coordinator's event and output streams from the store, in id order, when
    /// several coordinators share it: wakes when events were committed here or elsewhere.
    /// Returns at once on a database of its own (events are broadcast as they are made).
    pub async fn run_event_tail(self: Arc<Self>) {
        if !self.peers.shared() {
            return;
        }
        let mut last = loop {
            match self.store.last_event_id().await {
                Ok(id) => break id,
                Err(e) => {
                    tracing::error!(
                        error = &e as &dyn std::error::Error,
                        "failed to read the last event id; retrying in 1s"
                    );
                    self.clock
                        .sleep_until(self.clock.now_ms().saturating_add(1_000))
                        .await;
                }
            }
        };
        loop {
            // Woken by a commit here or elsewhere; and every second regardless, for events
            // held back behind an id whose transaction rolled back (no commit announces it).
            let _ = tokio::time::timeout(TAIL_RECHECK, self.tail.notified()).await;
            loop {
                let page = match self.store.events_after(last, 1_000).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(
                            error = &e as &dyn std::error::Error,
                            "failed to read new events; retrying when the next arrive"
                        );
                        break;
                    }
                };
                let full = page.len() == 1_000;
                let any = !page.is_empty();
                for ev in page {
                    last = ev.id;
                    match ev.kind.as_str() {
                        "task.waiting" => self.hear_waiting(&ev),
                        "daemon.draining" => self.hear_draining(&ev),
                        _ => {}
                    }
                    self.broadcast(ev);
                }
                if !full {
                    if any {
                        // Under load, events that commit meanwhile are read together.
                        tokio::time::sleep(TAIL_GATHER).await;
                    }
                    break;
                }
            }
        }
    }

    /// With several coordinators on one database: records every `server.cluster.beat` that this one
    /// is alive and, on the one coordinator holding the rescue lease, rescues the work of
    /// coordinators that died ([`Coordinator::rescue`]). Returns at once on a database of its
    /// own.
    pub async fn run_cluster(self: Arc<Self>) {
        if !self.peers.shared() {
            return;
        }
        let beat = self.cfg.cluster.beat.as_millis() as i64;
        let resync_every = QUEUE_RESYNC_EVERY.as_millis() as i64;
        let mut next_resync = self.clock.now_ms().saturating_add(resync_every);
        loop {
            self.clock
                .sleep_until(self.clock.now_ms().saturating_add(beat))
                .await;
            let now = self.clock.now_ms();
            if now >= next_resync {
                next_resync = now.saturating_add(resync_every);
                self.add_queued_from_store().await;
            }
            let me = self.peers.id();
            if let Err(e) = self.store.coordinator_seen(me, now).await {
                tracing::error!(
                    error = &e as &dyn std::error::Error,
                    "failed to record that this coordinator is alive"
                );
                continue;
            }
            let lead = self.store.lease(RESCUE_LEASE, me, now, 3 * beat).await;
            let leading = matches!(lead, Ok(true));
            if leading
                != self
                    .leading
                    .swap(leading, std::sync::atomic::Ordering::Relaxed)
            {
                self.lock().recheck_all = true;
            }
            match lead {
                Ok(true) => self.rescue(now).await,
                Ok(false) => {}
                Err(e) => tracing::error!(
                    error = &e as &dyn std::error::Error,
                    "failed to take the rescue lease"
                ),
            }
        }
    }

    /// Prunes the event log every [`PRUNE_EVERY`] until the process ends.
    pub async fn run_retention(self: Arc<Self>) {
        loop {
            let every = PRUNE_EVERY.as_millis() as i64;
            self.clock
                .sleep_until(self.clock.now_ms().saturating_add(every))
                .await;
            self.prune_events().await;
        }
    }

    /// Deletes events older than `api.event_retention`; with several coordinators, only the
    /// one holding the rescue lease does, so they do not all run the same delete.
    pub async fn prune_events(&self) {
        if self.peers.shared() && !self.leading.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let keep = self.cfg.api.event_retention.as_millis() as i64;
        let before = self.clock.now_ms().saturating_sub(keep);
        match self.store.prune_events(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                events = n,
                retention = %self.cfg.api.event_retention,
                "pruned the event log"
            ),
            Err(e) => tracing::error!(
                error = &e as &dyn std::error::Error,
                "failed to prune the event log; trying again in an hour"
            ),
        }
    }

    /// Run by one coordinator at a time. Links of daemons whose coordinator has not been seen
    /// for `server.cluster.dead_after` are recorded as ended; attempts of daemons that have been
    /// gone for longer than the reattach grace (and the time it takes to notice a dead
    /// coordinator) end as lost and their tasks are retried, as the coordinator that held
    /// them would have done.
    pub async fn rescue(&self, now: i64) {
        let dead_after = self.cfg.cluster.dead_after.as_millis() as i64;
        match self.store.stranded_daemons(now - dead_after).await {
            Ok(stranded) => {
                for d in stranded {
                    tracing::warn!(
                        daemon_id = d.id,
                        "the coordinator holding this daemon's link stopped; recording the link as ended"
                    );
                    let reason = format!(
                        "its coordinator stopped (not seen for {})",
                        self.cfg.cluster.dead_after
                    );
                    match self.store.daemon_disconnected(&d.id, &reason, now).await {
                        Ok(ev) => self.publish([ev]),
                        Err(e) => tracing::error!(
                            daemon_id = d.id,
                            error = &e as &dyn std::error::Error,
                            "failed to record a stranded daemon's link as ended"
                        ),
                    }
                }
            }
            Err(e) => tracing::error!(
                error = &e as &dyn std::error::Error,
                "failed to look for daemons of stopped coordinators"
            ),
        }
        let grace = self.cfg.scheduler.reattach_grace.get();
        let cutoff = now - grace.as_millis() as i64 - dead_after;
        let gone: HashSet<String> = match self.store.list_daemons().await {
            Ok(ds) => ds
                .into_iter()
                .filter(|d| !d.connected && d.active_tasks > 0)
                .filter(|d| {
                    d.last_seen_at
                        .as_deref()
                        .and_then(millis_of)
                        .is_none_or(|t| t < cutoff)
                })
                .map(|d| d.id)
                .collect(),
            Err(e) => {
                tracing::error!(
                    error = &e as &dyn std::error::Error,
                    "failed to list daemons for the rescue"
                );
                return;
            }
        };
        if gone.is_empty() {
            return;
        }
        let active = match self.store.active_tasks().await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(
                    error = &e as &dyn std::error::Error,
                    "failed to list attempts for the rescue"
                );
                return;
            }
        };
        for t in active {
            let Some(daemon_id) = t.daemon_id.as_deref().filter(|d| gone.contains(*d)) else {
                continue;
            };
            let reason = format!(
                "daemon {daemon_id} disconnected and did not return within {}s",
                grace.as_secs()
            );
            tracing::warn!(
                task_id = t.id,
                attempt = t.attempt,
                daemon_id,
                "attempt lost"
            );
            self.end_attempt(
                EndAttempt {
                    task_id: &t.id,
                    attempt: t.attempt,
                    status: AttemptStatus::Lost,
                    reason: &reason,
                    retry: Retry::Charged,
                    terminal: TaskStatus::Lost,
                },
                false,
            )
            .await;
        }
    }

    /// Applies what the other coordinators on the same database say, until they stop. Each
    /// signal is a hint: the task is read again from the store.
    pub async fn run_peers(self: Arc<Self>, mut heard: mpsc::UnboundedReceiver<Heard>) {
        while let Some(h) = heard.recv().await {
            match h {
                Heard::Resync => self.resync().await,
                Heard::Signals(signals) => {
                    // Tasks to read: queued here or there (a queue needs the whole task), or
                    // of a signal without its status.
                    let mut tasks: Vec<String> = Vec::new();
                    let mut statuses: Vec<(String, TaskStatus, u32)> = Vec::new();
                    let mut events = false;
                    for s in signals {
                        match s {
                            Signal::Task {
                                id,
                                status: Some(status),
                                attempt: Some(attempt),
                                ..
                            } if status != TaskStatus::Queued => {
                                statuses.push((id, status, attempt))
                            }
                            Signal::Task {
                                id, claimed: true, ..
                            } => {
                                self.lock().claimed_elsewhere.insert(id.clone());
                                self.deadlines.after(
                                    crate::cluster::CLAIM_WAIT,
                                    Timer::Claimed { task_id: id },
                                )
                            }
                            Signal::Task { id, .. } => {
                                if !tasks.contains(&id) {
                                    tasks.push(id);
                                }
                            }
                            Signal::Events => events = true,
                            Signal::Output { task } => {
                                let _ = self.output.send(Arc::from(task.as_str()));
                            }
                            Signal::Send { daemon, frame } => self.forward(&daemon, &frame),
                            Signal::Revoked { key } => self.close_revoked(&key),
                        }
                    }
                    self.observe_statuses_elsewhere(statuses);
                    if !tasks.is_empty() {
                        match self.store.get_tasks(&tasks).await {
                            Ok(changed) => changed
                                .into_iter()
                                .for_each(|task| self.observe_elsewhere(task)),
                            Err(e) => tracing::error!(
                                tasks = tasks.len(),
                                error = &e as &dyn std::error::Error,
                                "failed to read tasks another coordinator changed"
                            ),
                        }
                    }
                    if events {
                        // Streams show what changed once this coordinator has mirrored it;
                        // a daemon may have come or gone elsewhere: waiting reasons are
                        // checked again.
                        self.lock().recheck_all = true;
                        self.tail.notify_one();
                        self.wake.notify_one();
                    }
                }
            }
        }
    }

    /// A task changed on another coordinator: queue it here if it is queued (and not held
    /// here), take it out of this queue otherwise, and release an attempt of it held here
    /// if that ended.
    fn observe_elsewhere(&self, task: Task) {
        let mut st = self.lock();
        if st.observe_elsewhere(&task.id, task.status, task.attempt) {
            st.observe(&task);
        }
        st.update_gauges();
        drop(st);
        self.wake.notify_one();
    }

    /// The claimer of a task had [`crate::cluster::CLAIM_WAIT`] to dispatch it: if it is still
    /// queued, it is queued here too.
    async fn claim_expired(&self, task_id: &str) {
        if !self.lock().claimed_elsewhere.remove(task_id) {
            // It was dispatched (or changed) meanwhile: nothing to check.
            return;
        }
        match self.store.get_task(task_id).await {
            Ok(Some(task)) if task.status == TaskStatus::Queued => self.observe_elsewhere(task),
            Ok(_) => {}
            Err(e) => tracing::error!(
                task_id,
                error = &e as &dyn std::error::Error,
                "failed to read a task another coordinator claimed"
            ),
        }
    }

    /// As [`Coordinator::observe_elsewhere`] for a task that is not queued, known only by its
    /// status and attempt (from a signal, without reading it).
    fn observe_statuses_elsewhere(&self, statuses: Vec<(String, TaskStatus, u32)>) {
        let mut st = self.lock();
        let mut changed = false;
        for (id, status, attempt) in statuses {
            // Most tasks another coordinator changes were never queued or run here: nothing
            // to change, and no reason to wake the scheduler.
            let known = st.live.contains_key(&id)
                || st.queued.contains_key(&id)
                || st.claimed_elsewhere.contains(&id);
            if !known {
                continue;
            }
            changed = true;
            if st.observe_elsewhere(&id, status, attempt) {
                st.observe_status(&id, status);
            }
        }
        if changed {
            st.update_gauges();
            drop(st);
            self.wake.notify_one();
        }
    }

    /// Signals may have been missed: the queue is read again from the store and the event
    /// tail catches up.
    async fn resync(&self) {
        match self.store.queued_tasks().await {
            Ok(queued) => {
                let mut st = self.lock();
                let ids: HashSet<String> = queued.iter().map(|q| q.task.id.clone()).collect();
                let gone: Vec<String> = st
                    .queued
                    .keys()
                    .filter(|id| !ids.contains(*id))
                    .cloned()
                    .collect();
                for id in gone {
                    st.unqueue(&id);
                }
                for q in queued {
                    if !st.queued.contains_key(&q.task.id) && !st.live.contains_key(&q.task.id) {
                        st.enqueue(q.task);
                    }
                }
                st.update_gauges();
            }
            Err(e) => tracing::error!(
                error = &e as &dyn std::error::Error,
                "failed to reread the queue after missing signals"
            ),
        }
        self.tail.notify_one();
        self.wake.notify_one();
    }

    /// Queues every queued task of the store this coordinator has not queued (one whose signal
    /// it never heard). Adds only: a task it queued after the read would look gone.
    async fn add_queued_from_store(&self) {
        match self.store.queued_tasks().await {
            Ok(queued) => {
                let mut st = self.lock();
                let mut added = 0;
                for q in queued {
                    if !st.queued.contains_key(&q.task.id) && !st.live.contains_key(&q.task.id) {
                        st.enqueue(q.task);
                        added += 1;
                    }
                }
                if added > 0 {
                    tracing::info!(added, "queued tasks whose signal never arrived");
                    st.update_gauges();
                    drop(st);
                    self.wake.notify_one();
                }
            }
            Err(e) => tracing::error!(
                error = &e as &dyn std::error::Error,
                "failed to reread the queue"
            ),
        }
    }

    /// Sends `frame` to `daemon` if its link is here.
    fn forward(&self, daemon: &str, frame: &str) {
        let conn = self.lock().daemons.get(daemon).and_then(|d| d.conn.clone());
        let Some(conn) = conn else { return };
        match serde_json::from_str::<ServerMessage>(frame) {
            Ok(m) => conn.send(m),
            Err(e) => tracing::warn!(
                daemon_id = daemon,
                error = &e as &dyn std::error::Error,
                "ignoring a frame from another coordinator that does not decode"
            ),
        }
    }

    /// Sends `message` to the daemon holding an attempt: through its link if it is here,
    /// through the coordinator that holds it otherwise.
    fn send_to_holder(&self, holder: Holder, message: ServerMessage) {
        match holder {
            Holder::Here(conn) => conn.send(message),
            Holder::Elsewhere(daemon) => match serde_json::to_string(&message) {
                Ok(frame) => self.peers.send(Signal::Send { daemon, frame }),
                Err(e) => tracing::error!(
                    error = &e as &dyn std::error::Error,
                    "failed to encode a frame for another coordinator"
                ),
            },
        }
    }

    /// Rebuilds the in-memory index from the store after a start. Daemons that held work are
    /// given the reattach grace to come back.
    pub async fn restore(self: &Arc<Self>) -> Result<(), StoreError> {
        let now = self.clock.now_ms();
        if self.peers.shared() {
            // The other coordinators' daemons are theirs: this one starts with the queue, and
            // its daemons bring their attempts when they connect. Links that died with a
            // coordinator are found by the rescue (`run_cluster`).
            self.store.coordinator_seen(self.peers.id(), now).await?;
            let queued = self.store.queued_tasks().await?;
            let mut st = self.lock();
            for q in queued {
                st.enqueue(q.task);
            }
            st.update_gauges();
            drop(st);
            self.wake.notify_one();
            return Ok(());
        }
        self.store.reset_connections(now).await?;
        let queued = self.store.queued_tasks().await?;
        let active = self.store.active_tasks().await?;
        let mut holders = HashSet::new();
        for t in &active {
            if let Some(d) = &t.daemon_id {
                holders.insert(d.clone());
            }
        }
        let mut slots = Vec::new();
        for id in &holders {
            if let Some(d) = self.store.get_daemon(id).await? {
                slots.push(d);
            }
        }
        let mut st = self.lock();
        for q in queued {
            st.enqueue(q.task);
        }
        for d in slots {
            st.by_machine.insert(d.machine_id.clone(), d.id.clone());
            st.daemons.insert(d.id.clone(), slot_from(&d));
        }
        for t in active {
            let Some(daemon_id) = t.daemon_id.clone() else {
                continue;
            };
            if let Some(slot) = st.daemons.get_mut(&daemon_id) {
                slot.held.insert(t.id.clone());
            }
            st.live.insert(
                t.id.clone(),
                Live {
                    attempt: t.attempt,
                    daemon_id,
                    accepted: t.status != TaskStatus::Dispatched,
                    queued: false,
                },
            );
        }
        st.update_gauges();
        let waiting: Vec<(String, Generation)> = st
            .daemons
            .values()
            .filter(|d| !d.held.is_empty())
            .map(|d| (d.id.clone(), d.generation))
            .collect();
        drop(st);
        for (daemon_id, gen) in waiting {
            self.start_grace(daemon_id, gen);
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Wakes the scheduler.
    pub fn kick(&self) {
        self.wake.notify_one();
    }

    /// Announces tasks that no connected daemon can run (and those that can run again), and
    /// fails them after `unschedulable_timeout` when that is set. Runs until the process
    /// ends; a tick does work only when tasks were queued or daemons changed since the last.
    pub async fn run_waiting_watch(self: Arc<Self>) {
        let timeout = Some(self.cfg.scheduler.unschedulable_timeout.get()).filter(|t| !t.is_zero());
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut read_elsewhere: Option<Instant> = None;
        loop {
            tick.tick().await;
            let now = Instant::now();
            if self.peers.shared() && !self.leading.load(std::sync::atomic::Ordering::Relaxed) {
                // Another coordinator announces waiting tasks for all. This one still says
                // in a submit's answer why the task waits, which needs the others' daemons:
                // read again when daemons may have changed, at most every ELSEWHERE_EVERY.
                let due = {
                    let mut st = self.lock();
                    st.unchecked.clear();
                    st.waiting.clear();
                    let due = st.recheck_all
                        && read_elsewhere.is_none_or(|t| now.duration_since(t) >= ELSEWHERE_EVERY);
                    if due {
                        st.recheck_all = false;
                    }
                    due
                };
                if due {
                    read_elsewhere = Some(now);
                    self.refresh_elsewhere().await;
                }
                continue;
            }
            let idle = {
                let st = self.lock();
                !st.recheck_all
                    && st.unchecked.is_empty()
                    && st.waiting.values().all(|w| w.announced)
                    && timeout.is_none()
            };
            if idle {
                continue;
            }
            if self.peers.shared() {
                self.refresh_elsewhere().await;
            }
            let (changes, expired) = {
                let mut st = self.lock();
                let changes = st.refresh_waiting(now);
                let expired: Vec<(String, String)> = match timeout {
                    Some(t) => st
                        .waiting
                        .iter()
                        .filter(|(_, w)| w.announced && now.duration_since(w.since) >= t)
                        .map(|(id, w)| (id.clone(), w.reason.clone()))
                        .collect(),
                    None => Vec::new(),
                };
                (changes, expired)
            };
            for c in changes {
                self.announce_waiting(c).await;
            }
            for (task_id, reason) in expired {
                self.fail_unschedulable(&task_id, &reason).await;
            }
        }
    }

    /// Reads which daemons the other coordinators hold, for the waiting reasons.
    async fn refresh_elsewhere(&self) {
        match self.store.list_daemons().await {
            Ok(all) => {
                let mut st = self.lock();
                let here: HashSet<String> = st
                    .daemons
                    .values()
                    .filter(|d| d.conn.is_some())
                    .map(|d| d.id.clone())
                    .collect();
                st.elsewhere = all
                    .iter()
                    .filter(|d| d.connected && !here.contains(&d.id))
                    .map(slot_from)
                    .collect();
            }
            Err(e) => tracing::warn!(
                error = &e as &dyn std::error::Error,
                "failed to read the other coordinators' daemons for waiting reasons"
            ),
        }
    }

    async fn announce_waiting(&self, c: WaitingChange) {
        match &c.reason {
            Some(r) => tracing::info!(task_id = %c.task_id, "task waiting: {r}"),
            None => tracing::debug!(task_id = %c.task_id, "task can be scheduled again"),
        }
        let data = serde_json::json!({ "reason": c.reason });
        match self
            .store
            .record_event(
                "task.waiting",
                Some(&c.task_id),
                None,
                data,
                self.clock.now_ms(),
            )
            .await
        {
            Ok(ev) => self.publish([ev]),
            Err(e) => {
                tracing::warn!(task_id = %c.task_id, error = &e as &dyn std::error::Error, "failed to record a task.waiting event")
            }
        }
    }

    async fn fail_unschedulable(&self, task_id: &str, reason: &str) {
        let limit = self.cfg.scheduler.unschedulable_timeout;
        let error = format!(
            "no daemon could run it for {limit} (server.scheduler.unschedulable_timeout): {reason}"
        );
        match self
            .store
            .fail_queued(task_id, &error, self.clock.now_ms())
            .await
        {
            Ok(Some(ended)) => {
                tracing::warn!(task_id, "task failed: {error}");
                {
                    let mut st = self.lock();
                    st.unqueue(task_id);
                    st.waiting.remove(task_id);
                }
                self.mirror(ended);
            }
            Ok(None) => {}
            Err(e) => tracing::error!(
                task_id,
                error = &e as &dyn std::error::Error,
                "failed to fail an unschedulable task"
            ),
        }
    }

    /// Applies a drain (or undrain) of a daemon linked here, whichever coordinator recorded it:
    /// the scheduler that dispatches to the daemon is this one's.
    fn hear_draining(&self, ev: &Event) {
        let (Some(daemon_id), Some(draining)) = (&ev.daemon_id, ev.data["draining"].as_bool())
        else {
            return;
        };
        let mut st = self.lock();
        let Some(slot) = st.daemons.get_mut(daemon_id) else {
            return;
        };
        if slot.draining != draining {
            slot.draining = draining;
            st.recheck_all = true;
            drop(st);
            self.wake.notify_one();
        }
    }

    /// Keeps what the leader's `task.waiting` event says of a task queued here.
    fn hear_waiting(&self, ev: &Event) {
        let Some(task_id) = &ev.task_id else {
            return;
        };
        let mut st = self.lock();
        match ev.data["reason"].as_str() {
            Some(reason) if st.queued.contains_key(task_id) => {
                st.waiting_heard.insert(task_id.clone(), reason.to_string());
            }
            _ => {
                st.waiting_heard.remove(task_id);
            }
        }
    }

    /// The waiting reason of a queued task, if no connected daemon can run it: this
    /// coordinator's own, or on one not leading, the leader's.
    fn waiting_reason(&self, task_id: &str) -> Option<String> {
        let heard = !self.leads();
        let st = self.lock();
        if heard {
            return st.waiting_heard.get(task_id).cloned();
        }
        st.waiting.get(task_id).map(|w| w.reason.clone())
    }

    /// Adds what only memory knows (why a queued task waits) to a stored task.
    pub fn overlay_task(&self, mut t: Task) -> Task {
        if t.status == TaskStatus::Queued {
            t.waiting = self.waiting_reason(&t.id);
        }
        t
    }

    /// Queued tasks no connected daemon can run, grouped by reason, oldest example first.
    pub fn waiting_summary(&self) -> Vec<WaitingTasks> {
        let heard = !self.leads();
        let st = self.lock();
        let mut groups: BTreeMap<&str, (u64, &str)> = BTreeMap::new();
        let reasons: Vec<(&String, &str)> = if heard {
            st.waiting_heard
                .iter()
                .filter(|(id, _)| st.queued.contains_key(*id))
                .map(|(id, r)| (id, r.as_str()))
                .collect()
        } else {
            st.waiting
                .iter()
                .map(|(id, w)| (id, w.reason.as_str()))
                .collect()
        };
        for (id, reason) in reasons {
            let g = groups.entry(reason).or_insert((0, id.as_str()));
            g.0 += 1;
            if id.as_str() < g.1 {
                g.1 = id.as_str();
            }
        }
        groups
            .into_iter()
            .map(|(reason, (tasks, example))| WaitingTasks {
                reason: reason.to_string(),
                tasks,
                example_task_id: example.to_string(),
            })
            .collect()
    }

    /// Runs the dispatch loop until the process ends.
    pub async fn run_scheduler(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            loop {
                let picks = self.lock().pick(DISPATCH_BATCH);
                if picks.is_empty() {
                    break;
                }
                if let Err(e) = self.dispatch(picks).await {
                    tracing::error!(
                        error = &e as &dyn std::error::Error,
                        "failed to record dispatches; retrying in 1s"
                    );
                    self.deadlines
                        .after(Duration::from_secs(1), Timer::Redispatch);
                    break;
                }
            }
        }
    }

    async fn dispatch(self: &Arc<Self>, picks: Vec<(Pending, Dispatch)>) -> Result<(), StoreError> {
        let batch: Vec<Dispatch> = picks.iter().map(|(_, d)| d.clone()).collect();
        let results = match self.store.dispatch(&batch, self.clock.now_ms()).await {
            Ok(r) => r,
            Err(e) => {
                let mut st = self.lock();
                for (p, d) in picks {
                    st.release(&d.task_id);
                    st.enqueue(p.task);
                }
                return Err(e);
            }
        };
        let mut events = Vec::new();
        {
            let mut st = self.lock();
            for ((pending, d), result) in picks.into_iter().zip(results) {
                let Some((task, ev)) = result else {
                    // Cancelled or taken by another coordinator meanwhile.
                    st.release(&d.task_id);
                    continue;
                };
                self.hand_out(&st, d, &task, pending.since);
                events.push(ev);
            }
            st.update_gauges();
        }
        self.publish(events);
        Ok(())
    }

    /// A dispatch is recorded: the daemon is sent the task, and its lease starts.
    fn hand_out(&self, st: &State, d: Dispatch, task: &Task, since: Instant) {
        let conn = st.daemons.get(&d.daemon_id).and_then(|s| s.conn.clone());
        if let Some(conn) = conn {
            conn.send(ServerMessage::SpawnTask(spawn_message(task, d.attempt)));
        }
        metrics::histogram!("kennel_dispatch_latency_seconds")
            .record(since.elapsed().as_secs_f64());
        metrics::counter!("kennel_dispatches_total").increment(1);
        self.deadlines.after(
            self.cfg.scheduler.accept_timeout.get(),
            Timer::Lease {
                task_id: d.task_id,
                attempt: d.attempt,
            },
        );
    }

    async fn lease_expired(self: &Arc<Self>, task_id: &str, attempt: u32) {
        let pending = {
            let st = self.lock();
            st.live
                .get(task_id)
                .is_some_and(|l| l.attempt == attempt && !l.accepted && !l.queued)
        };
        if !pending {
            return;
        }
        let reason = format!(
            "no taskAccepted within {} of dispatch",
            self.cfg.scheduler.accept_timeout
        );
        tracing::warn!(task_id, attempt, "lease expired: {reason}");
        self.end_attempt(
            EndAttempt {
                task_id,
                attempt,
                status: AttemptStatus::Expired,
                reason: &reason,
                retry: Retry::Charged,
                terminal: TaskStatus::Failed,
            },
            true,
        )
        .await;
    }

    /// Ends a live attempt in the store and mirrors it; optionally tells the daemon to stop.
    async fn end_attempt(&self, end: EndAttempt<'_>, interrupt: bool) -> Option<Task> {
        let (task_id, attempt) = (end.task_id, end.attempt);
        let here = {
            let st = self.lock();
            st.live
                .get(task_id)
                .filter(|l| l.attempt == attempt)
                .and_then(|l| st.daemons.get(&l.daemon_id))
                .and_then(|d| d.conn.clone())
        };
        let holder = match here {
            Some(conn) => Some(Holder::Here(conn)),
            // With several coordinators the daemon may be linked to another one.
            None if interrupt && self.peers.shared() => match self.store.get_task(task_id).await {
                Ok(Some(t)) if t.attempt == attempt => t.daemon_id.map(Holder::Elsewhere),
                _ => None,
            },
            None => None,
        };
        let ended = match self.store.end_attempt(&end, self.clock.now_ms()).await {
            Ok(Some(e)) => e,
            Ok(None) => return None,
            Err(e) => {
                tracing::error!(
                    task_id,
                    attempt,
                    error = &e as &dyn std::error::Error,
                    "failed to end attempt"
                );
                return None;
            }
        };
        if interrupt {
            if let Some(holder) = holder {
                self.send_to_holder(
                    holder,
                    ServerMessage::InterruptTask(InterruptTask {
                        task_id: task_id.to_string(),
                        attempt,
                        grace_secs: self.cfg.scheduler.cancel_grace.as_secs(),
                    }),
                );
            }
        }
        let task = ended.task.clone();
        self.mirror(ended);
        Some(task)
    }

    /// Mirrors a store change of one task into memory and publishes its events.
    fn mirror(&self, ended: Ended) {
        {
            let mut st = self.lock();
            st.observe(&ended.task);
            st.update_gauges();
        }
        self.publish(ended.events);
        self.wake.notify_one();
    }

    // -----------------------------------------------------------------------------------------
    // API operations

    /// Validates and stores a new task, then queues it.
    pub async fn submit(&self, req: CreateTask) -> Result<Task, ApiError> {
        let new = self.validate_task(req, false)?;
        self.submit_new(new).await
    }

    /// Submits a long-lived agent's session for the lifecycle manager: a task like any other,
    /// whose daemon keeps the agent's stdin open and reports its answers.
    pub async fn submit_session(
        &self,
        req: CreateTask,
        session: kennel_proto::link::SessionSpec,
    ) -> Result<Task, ApiError> {
        let mut new = self.validate_task(req, true)?;
        new.session = Some(session);
        self.submit_new(new).await
    }

    async fn submit_new(&self, new: NewTask) -> Result<Task, ApiError> {
        // With PostgreSQL, a task that can go to a daemon here right away is dispatched in its
        // submit's transaction: one commit on its way to the daemon instead of two.
        if self.peers.shared() {
            let slot = self
                .lock()
                .reserve_for_new(&new.id, &new.agent, &new.labels);
            if let Some(daemon_id) = slot {
                return self.submit_dispatched(new, daemon_id).await;
            }
        }
        let (queued, ev) = self.store.create_task(new, self.clock.now_ms()).await?;
        let mut task = queued.task.clone();
        if self.peers.shared() && self.lock().why_unschedulable(&task).is_some() {
            // What this coordinator knows of the others' daemons may be old (it reads them
            // again at most every ELSEWHERE_EVERY): read them now, so the answer is not wrong.
            self.refresh_elsewhere().await;
        }
        let claimed = {
            let mut st = self.lock();
            // Said at once in the answer; announced as an event once it has settled.
            task.waiting = st.why_unschedulable(&task);
            let claimed = st.has_slot_for(&task);
            st.enqueue(queued.task);
            st.update_gauges();
            claimed
        };
        metrics::counter!("kennel_tasks_submitted_total").increment(1);
        self.publish_telling([ev], Tell::Every { claimed });
        self.wake.notify_one();
        Ok(task)
    }

    /// Creates `new` already dispatched to `daemon_id`, whose slot [`State::reserve_for_new`]
    /// reserved.
    async fn submit_dispatched(&self, new: NewTask, daemon_id: String) -> Result<Task, ApiError> {
        let since = Instant::now();
        let task_id = new.id.clone();
        let now = self.clock.now_ms();
        let (queued, created, dispatched) =
            match self.store.create_and_dispatch(new, &daemon_id, now).await {
                Ok(done) => done,
                Err(e) => {
                    self.lock().release(&task_id);
                    return Err(e.into());
                }
            };
        metrics::counter!("kennel_tasks_submitted_total").increment(1);
        let task = {
            let mut st = self.lock();
            let task = match dispatched {
                Some((task, ev)) => {
                    let d = Dispatch {
                        task_id: task_id.clone(),
                        attempt: 1,
                        daemon_id,
                    };
                    self.hand_out(&st, d, &task, since);
                    Some((task, ev))
                }
                None => {
                    // Not expected for a task nobody else knows yet; queue it as usual.
                    st.release(&task_id);
                    st.enqueue(queued.task.clone());
                    None
                }
            };
            st.update_gauges();
            task
        };
        match task {
            Some((task, ev)) => {
                // The event tails read the task's creation from the store; the other
                // coordinators hear nothing of it: it was never queued for them to take.
                self.publish_telling([ev], Tell::Queued);
                Ok(task)
            }
            None => {
                self.publish([created]);
                self.wake.notify_one();
                Ok(queued.task)
            }
        }
    }

    /// Checks a submitted task; `session` is the task of a long-lived agent, whose prompt
    /// (its first turn) may be empty.
    fn validate_task(&self, req: CreateTask, session: bool) -> Result<NewTask, ApiError> {
        let bad = |m: String| Err(ApiError::invalid(m));
        if req.name.trim().is_empty() || req.name.chars().count() > 200 {
            return bad("`name` must be 1 to 200 characters".into());
        }
        if req.prompt.is_empty() && !session {
            return bad("`prompt` must not be empty".into());
        }
        if req.prompt.len() > 512 * 1024 {
            return bad(
                "`prompt` is longer than 512 KiB; put large context in the repository".into(),
            );
        }
        self.check_fits_in_a_frame(&req)?;
        let agent = req
            .agent
            .unwrap_or_else(|| self.cfg.scheduler.default_agent.clone());
        validate_id("agent profile", &agent).map_err(|e| ApiError::invalid(e.to_string()))?;
        if let Some(repo) = &req.repo {
            repo.check()
                .map_err(|(field, reason)| ApiError::invalid(format!("`{field}` {reason}")))?;
        }
        for (k, v) in &req.labels {
            validate_id("label name", k).map_err(|e| ApiError::invalid(e.to_string()))?;
            if v.chars().count() > 256 {
                return bad(format!("label `{k}` is longer than 256 characters"));
            }
        }
        for k in req.env.keys() {
            let ok = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return bad(format!(
                    "environment variable name `{k}` must be letters, digits and `_`, not starting with a digit"
                ));
            }
        }
        if req.labels.len() > MAX_LABELS {
            return bad(format!(
                "{} labels; at most {MAX_LABELS} (a daemon offers at most that many)",
                req.labels.len()
            ));
        }
        if req.env.len() > MAX_ENV_VARS {
            return bad(format!(
                "{} environment variables; at most {MAX_ENV_VARS}",
                req.env.len()
            ));
        }
        let max_attempts = req
            .max_attempts
            .unwrap_or(self.cfg.scheduler.default_max_attempts);
        if !(1..=100).contains(&max_attempts) {
            return bad("`maxAttempts` must be between 1 and 100".into());
        }
        if req.timeout_secs == Some(0) {
            return bad("`timeoutSecs` must be at least 1".into());
        }
        Ok(NewTask {
            id: format!("t-{}", crate::ids::time_ordered()),
            name: req.name,
            prompt: req.prompt,
            repo: req.repo,
            agent,
            labels: req.labels,
            priority: req.priority,
            env: req.env,
            timeout_secs: req.timeout_secs,
            max_attempts,
            session: None,
        })
    }

    /// The task goes to its daemon in one `spawnTask` frame, which must fit the frame limit
    /// the daemon was told (`server.protocol.max_frame_bytes`) with room for the frame's own
    /// fields; otherwise it could never be dispatched. Says which fields take the room.
    fn check_fits_in_a_frame(&self, req: &CreateTask) -> Result<(), ApiError> {
        let max = self.cfg.protocol.max_frame_bytes;
        let limit = max.saturating_sub(FRAME_MARGIN.min(max / 4));
        let prompt = json_len(&req.prompt);
        let env = json_len(&req.env);
        let labels = json_len(&req.labels);
        let repo = req.repo.as_ref().map_or(0, json_len);
        let name = json_len(&req.name);
        let total = prompt + env + labels + repo + name;
        if total <= limit {
            return Ok(());
        }
        let mut parts = [
            ("prompt", prompt),
            ("env", env),
            ("labels", labels),
            ("repo", repo),
            ("name", name),
        ];
        parts.sort_by_key(|p| std::cmp::Reverse(p.1));
        let shown: Vec<String> = parts
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(f, n)| format!("`{f}` {}", human_bytes(*n)))
            .collect();
        let biggest_env = req
            .env
            .iter()
            .max_by_key(|(_, v)| v.len())
            .filter(|_| parts[0].0 == "env")
            .map(|(k, v)| format!("; the largest is `env.{k}` ({})", human_bytes(v.len())))
            .unwrap_or_default();
        Err(ApiError::invalid(format!(
            "the task is too large to send to a daemon: {} in all ({}) is {} over the {} a \
             spawnTask frame leaves for them (server.protocol.max_frame_bytes = {}){biggest_env}; \
             put large inputs in the repository instead",
            human_bytes(total),
            shown.join(", "),
            human_bytes(total - limit),
            human_bytes(limit),
            self.cfg.protocol.max_frame_bytes
        )))
    }

    pub async fn task(&self, id: &str) -> Result<Task, ApiError> {
        validate_id("task id", id).map_err(|e| ApiError::invalid(e.to_string()))?;
        let task = self.store.get_task(id).await?.ok_or_else(|| {
            ApiError::not_found(format!(
                "no task `{id}`; `kennel task list` shows the tasks"
            ))
        })?;
        Ok(self.overlay_task(task))
    }

    pub async fn cancel(&self, id: &str) -> Result<Task, ApiError> {
        let task = self.task(id).await?;
        if task.status.is_terminal() {
            return Ok(task);
        }
        if task.status == TaskStatus::Queued {
            if let Some(ended) = self.store.cancel_queued(id, self.clock.now_ms()).await? {
                self.lock().unqueue(id);
                let t = ended.task.clone();
                self.mirror(ended);
                return Ok(t);
            }
        }
        let task = self.task(id).await?;
        if task.status.is_active() {
            if let Some(t) = self
                .end_attempt(
                    EndAttempt {
                        task_id: id,
                        attempt: task.attempt,
                        status: AttemptStatus::Cancelled,
                        reason: "cancelled by request",
                        retry: Retry::Never,
                        terminal: TaskStatus::Cancelled,
                    },
                    true,
                )
                .await
            {
                return Ok(t);
            }
        }
        let task = self.task(id).await?;
        if task.status.is_terminal() {
            return Ok(task);
        }
        Err(ApiError::conflict(format!(
            "task `{id}` changed state while being cancelled (now {}); retry",
            task.status
        )))
    }

    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<Task, ApiError> {
        let task = self.task(id).await?;
        let want = if paused {
            TaskStatus::Paused
        } else {
            TaskStatus::Running
        };
        if task.status == want {
            return Ok(task);
        }
        let from = if paused {
            TaskStatus::Running
        } else {
            TaskStatus::Paused
        };
        if task.status != from {
            return Err(ApiError::conflict(format!(
                "task `{id}` is {}; only a {from} task can be {}",
                task.status,
                if paused { "paused" } else { "resumed" }
            )));
        }
        let holder = self.holder(&task).await?;
        let Some(ended) = self
            .store
            .set_paused(id, task.attempt, paused, self.clock.now_ms())
            .await?
        else {
            return Err(ApiError::conflict(format!(
                "task `{id}` changed state meanwhile; retry"
            )));
        };
        let cmd = TaskCommand {
            task_id: id.to_string(),
            attempt: task.attempt,
        };
        self.send_to_holder(
            holder,
            if paused {
                ServerMessage::PauseTask(cmd)
            } else {
                ServerMessage::ResumeTask(cmd)
            },
        );
        let t = ended.task.clone();
        self.mirror(ended);
        Ok(t)
    }

    pub async fn send_message(&self, id: &str, message: String) -> Result<(), ApiError> {
        if message.is_empty() {
            return Err(ApiError::invalid("`message` must not be empty"));
        }
        let task = self.task(id).await?;
        if !matches!(task.status, TaskStatus::Running | TaskStatus::Paused) {
            return Err(ApiError::conflict(format!(
                "task `{id}` is {}; messages go to running or paused tasks only",
                task.status
            )));
        }
        let holder = self.holder(&task).await?;
        self.send_to_holder(
            holder,
            ServerMessage::SendMessage(SendMessage {
                task_id: id.to_string(),
                attempt: task.attempt,
                message,
            }),
        );
        Ok(())
    }

    /// Asks the daemon running `task` to stop its agent (`interruptTask`) without ending the
    /// attempt here: the agent gets `grace_secs` to finish, and the daemon reports how the
    /// attempt ended (a session agent stopped this way ends completed, its work pushed).
    pub async fn interrupt(&self, task: &Task, grace_secs: u64) -> Result<(), ApiError> {
        if !task.status.is_active() {
            return Ok(());
        }
        let holder = self.holder(task).await?;
        self.send_to_holder(
            holder,
            ServerMessage::InterruptTask(InterruptTask {
                task_id: task.id.clone(),
                attempt: task.attempt,
                grace_secs,
            }),
        );
        Ok(())
    }

    /// Hands a message to a session agent's daemon (`deliverMessage`). The lifecycle manager
    /// sends it again until the daemon confirms it; the daemon writes it once.
    pub async fn deliver_to_session(
        &self,
        task: &Task,
        message_id: &str,
        from: &str,
        body: &str,
    ) -> Result<(), ApiError> {
        let holder = self.holder(task).await?;
        self.send_to_holder(
            holder,
            ServerMessage::DeliverMessage(kennel_proto::link::DeliverMessage {
                task_id: task.id.clone(),
                attempt: task.attempt,
                message_id: message_id.to_string(),
                from: from.to_string(),
                body: body.to_string(),
            }),
        );
        Ok(())
    }

    /// Where the daemon running `task`'s current attempt is linked: here, or (with several
    /// coordinators) on another coordinator.
    async fn holder(&self, task: &Task) -> Result<Holder, ApiError> {
        let id = &task.id;
        let disconnected = |daemon: &str| {
            ApiError::unavailable(format!(
                "daemon `{daemon}` holding task `{id}` is disconnected; retry when it reconnects"
            ))
        };
        let here = {
            let st = self.lock();
            st.live
                .get(id)
                .filter(|l| l.attempt == task.attempt)
                .map(|live| {
                    st.daemons
                        .get(&live.daemon_id)
                        .and_then(|d| d.conn.clone())
                        .ok_or_else(|| live.daemon_id.clone())
                })
        };
        match here {
            Some(Ok(conn)) => return Ok(Holder::Here(conn)),
            Some(Err(daemon)) if !self.peers.shared() => return Err(disconnected(&daemon)),
            _ => {}
        }
        let Some(daemon) = task.daemon_id.clone().filter(|_| self.peers.shared()) else {
            return Err(ApiError::conflict(format!(
                "task `{id}` has no live attempt here"
            )));
        };
        match self.store.get_daemon(&daemon).await? {
            Some(d) if d.connected => Ok(Holder::Elsewhere(daemon)),
            _ => Err(disconnected(&daemon)),
        }
    }

    pub async fn set_draining(&self, daemon_id: &str, draining: bool) -> Result<Daemon, ApiError> {
        validate_id("daemon id", daemon_id).map_err(|e| ApiError::invalid(e.to_string()))?;
        let Some((daemon, ev)) = self
            .store
            .set_draining(daemon_id, draining, self.clock.now_ms())
            .await?
        else {
            return Err(ApiError::not_found(format!(
                "no daemon `{daemon_id}`; `kennel daemons` lists them"
            )));
        };
        {
            let mut st = self.lock();
            if let Some(slot) = st.daemons.get_mut(daemon_id) {
                slot.draining = draining;
            }
            st.recheck_all = true;
        }
        self.publish([ev]);
        self.wake.notify_one();
        Ok(self.overlay(daemon))
    }

    /// Replaces stored connection facts with the live ones of a daemon linked here. A daemon
    /// linked to another coordinator of a shared database (or to none) keeps the stored facts:
    /// the database is what every coordinator knows of it. Alone on its database, a coordinator
    /// holds every link, so a daemon it does not hold is disconnected whatever a crash left
    /// stored.
    pub fn overlay(&self, mut d: Daemon) -> Daemon {
        let st = self.lock();
        match st.daemons.get(&d.id) {
            Some(slot) if slot.conn.is_some() => {
                d.connected = true;
                d.active_tasks = slot.held.len() as u32;
                d.draining = slot.draining;
                // A `capacity` message may have changed these since the store saw them.
                d.max_concurrent_tasks = slot.max;
                d.agents = slot.agents.iter().cloned().collect();
                d.agents.sort();
                d.labels = slot.labels.clone();
            }
            _ if self.peers.shared() => {}
            Some(slot) => {
                d.connected = false;
                d.active_tasks = slot.held.len() as u32;
                d.draining = slot.draining;
            }
            None => d.connected = false,
        }
        d
    }

    /// (connected daemons, total capacity, used capacity): of every coordinator sharing the
    /// database, or of this one alone.
    pub async fn capacity(&self) -> Result<(u32, u32, u32), StoreError> {
        let add = |(n, t, u): (u32, u32, u32), max: u32, used: u32| (n + 1, t + max, u + used);
        if self.peers.shared() {
            let all = self.store.list_daemons().await?;
            return Ok(all
                .into_iter()
                .map(|d| self.overlay(d))
                .filter(|d| d.connected)
                .fold((0, 0, 0), |acc, d| {
                    add(acc, d.max_concurrent_tasks, d.active_tasks)
                }));
        }
        let st = self.lock();
        Ok(st
            .daemons
            .values()
            .filter(|d| d.conn.is_some())
            .fold((0, 0, 0), |acc, d| add(acc, d.max, d.held.len() as u32)))
    }

    // -----------------------------------------------------------------------------------------
    // Daemon link

    /// Whether `key` may connect as `machine_id`: a machine id is bound to the first daemon- or
    /// relay-scoped key that authenticated as it, and no other key may pose as that machine
    /// (receive its tasks, claim its attempts, report for it) until the bound key is revoked,
    /// which frees the machine id for the next key. Admin keys may connect as any machine and
    /// bind nothing. Returns the key id to bind.
    pub async fn check_identity(
        &self,
        machine_id: &str,
        key: &kennel_auth::Principal,
    ) -> Result<Option<String>, IdentityRefused> {
        if key.scopes.contains(&kennel_proto::api::Scope::Admin) {
            return Ok(None);
        }
        let mine = Some(key.key_id.clone());
        let Some(d) = self.store.daemon_by_machine(machine_id).await? else {
            return Ok(mine);
        };
        let Some(bound) = d.key_id.filter(|k| *k != key.key_id) else {
            return Ok(mine);
        };
        let live = self
            .store
            .find_key(&bound)
            .await?
            .is_some_and(|k| k.info.revoked_at.is_none());
        if !live {
            tracing::info!(machine_id, old_key = %bound, new_key = %key.key_id, "machine id rebound to a new key (the old one is revoked)");
            return Ok(mine);
        }
        Err(IdentityRefused::Taken(format!(
            "machine id `{machine_id}` belongs to daemon {} and is bound to another API key \
             (id {bound}); connect with that daemon's own key, choose another machine id \
             (daemon.machine_id), or revoke key {bound} to let a new key take it over",
            d.id
        )))
    }

    /// The stable id of the daemon on `machine_id`, reusing the one it had before.
    pub async fn resolve_daemon_id(&self, machine_id: &str) -> Result<String, StoreError> {
        if let Some(id) = self.lock().by_machine.get(machine_id) {
            return Ok(id.clone());
        }
        if let Some(d) = self.store.daemon_by_machine(machine_id).await? {
            return Ok(d.id);
        }
        Ok(format!("d-{}", crate::ids::time_ordered()))
    }

    /// Registers an authenticated connection and re-attaches the attempts it still runs.
    pub async fn attach(
        self: &Arc<Self>,
        daemon_id: &str,
        hello: DaemonHello,
        running: Vec<TaskRef>,
        tx: LinkTx,
        authenticated: ServerMessage,
        key_id: &str,
    ) -> Result<Attached, StoreError> {
        let (daemon, ev) = self
            .store
            .daemon_connected(daemon_id, &hello, self.clock.now_ms())
            .await?;
        self.store
            .daemon_held_by(daemon_id, self.peers.id())
            .await?;
        // With several coordinators the daemon may come from another one (which died, or
        // whose link broke): its attempts are read from the store, not from memory.
        let adopted = if self.peers.shared() {
            let mut held: Vec<Task> = self.store.active_tasks().await?;
            held.retain(|t| t.daemon_id.as_deref() == Some(daemon_id));
            held
        } else {
            Vec::new()
        };
        let mut leases = Vec::new();
        let mut lost = Vec::new();
        let stale;
        let conn_id;
        {
            let mut st = self.lock();
            st.next_conn += 1;
            conn_id = st.next_conn;
            st.by_machine
                .insert(hello.machine_id.clone(), daemon_id.to_string());
            for t in adopted {
                if st.live.get(&t.id).is_some_and(|l| l.attempt == t.attempt) {
                    continue;
                }
                st.unqueue(&t.id);
                let accepted = t.status != TaskStatus::Dispatched;
                if !accepted {
                    leases.push((t.id.clone(), t.attempt));
                }
                st.live.insert(
                    t.id.clone(),
                    Live {
                        attempt: t.attempt,
                        daemon_id: daemon_id.to_string(),
                        accepted,
                        queued: false,
                    },
                );
                st.daemons
                    .entry(daemon_id.to_string())
                    .or_insert_with(|| slot_from(&daemon))
                    .held
                    .insert(t.id);
            }
            let slot = st
                .daemons
                .entry(daemon_id.to_string())
                .or_insert_with(|| slot_from(&daemon));
            if let Some(old) = slot.conn.take() {
                old.tx.send(Outbound::Close(
                    kennel_proto::link::close::REPLACED,
                    "replaced by a newer connection from the same machine".into(),
                ));
            }
            slot.max = hello.max_concurrent_tasks;
            slot.labels = hello.labels.clone();
            slot.agents = hello.agents.iter().cloned().collect();
            slot.draining = daemon.draining;
            slot.generation.bump();
            slot.full = false;
            // `authenticated` is queued before the connection becomes visible to the
            // scheduler, so it precedes any `spawnTask`, and a daemon that has read it is
            // already schedulable.
            tx.msg(authenticated);
            slot.conn = Some(Conn {
                id: conn_id,
                tx: tx.clone(),
                key_id: Arc::from(key_id),
            });
            let held: Vec<String> = slot.held.iter().cloned().collect();
            let held = held.into_iter().map(|task_id| TaskRef {
                attempt: st.live.get(&task_id).map_or(0, |l| l.attempt),
                task_id,
            });
            let settled = schedule::reattach(held, &running);
            stale = settled.stale;
            for r in settled.lost {
                let accepted = st.live.get(&r.task_id).is_some_and(|l| l.accepted);
                lost.push((r.task_id, r.attempt, accepted));
            }
            st.recheck_all = true;
            st.update_gauges();
        }
        tracing::info!(daemon_id, hostname = %hello.hostname, "daemon connected");
        self.publish([ev]);
        let accept = self.cfg.scheduler.accept_timeout.get();
        for (task_id, attempt) in leases {
            self.deadlines
                .after(accept, Timer::Lease { task_id, attempt });
        }
        for r in stale {
            tx.msg(ServerMessage::Error(ErrorFrame {
                code: ErrorCode::StaleAttempt,
                message: format!(
                    "attempt {} of task {} is not yours any more; stop it and drop its messages",
                    r.attempt, r.task_id
                ),
                task_id: Some(r.task_id.clone()),
                attempt: Some(r.attempt),
                expected_seq: None,
            }));
        }
        for (task_id, attempt, accepted) in lost {
            let reason = if accepted {
                format!("daemon {daemon_id} reconnected without attempt {attempt}")
            } else {
                format!(
                    "daemon {daemon_id} reconnected without attempt {attempt}, which it never \
                     received (not counted against the task)"
                )
            };
            // An attempt the daemon never received never ran: not the task's doing.
            let retry = if accepted {
                Retry::Charged
            } else {
                Retry::Free
            };
            self.end_attempt(
                EndAttempt {
                    task_id: &task_id,
                    attempt,
                    status: AttemptStatus::Lost,
                    reason: &reason,
                    retry,
                    terminal: TaskStatus::Lost,
                },
                false,
            )
            .await;
        }
        self.wake.notify_one();
        Ok(Attached { conn_id })
    }

    /// A connection ended. Its daemon keeps its attempts for the reattach grace.
    pub async fn detach(self: &Arc<Self>, daemon_id: &str, conn_id: u64, reason: &str) {
        let waiting = {
            let mut st = self.lock();
            let Some(slot) = st.daemons.get_mut(daemon_id) else {
                return;
            };
            if slot.conn.as_ref().map(|c| c.id) != Some(conn_id) {
                return; // replaced by a newer connection already
            }
            slot.conn = None;
            let generation = slot.generation.bump();
            let w = (!slot.held.is_empty()).then_some(generation);
            st.recheck_all = true;
            st.update_gauges();
            w
        };
        tracing::info!(daemon_id, reason, "daemon disconnected");
        match self
            .store
            .daemon_left(daemon_id, self.peers.id(), reason, self.clock.now_ms())
            .await
        {
            Ok(ev) => self.publish(ev),
            Err(e) => tracing::error!(
                daemon_id,
                error = &e as &dyn std::error::Error,
                "failed to record disconnect"
            ),
        }
        if let Some(gen) = waiting {
            self.start_grace(daemon_id.to_string(), gen);
        }
    }

    fn start_grace(self: &Arc<Self>, daemon_id: String, generation: Generation) {
        let grace = self.cfg.scheduler.reattach_grace.get();
        self.deadlines.after(
            grace,
            Timer::Grace {
                daemon_id,
                generation,
            },
        );
    }

    async fn grace_expired(&self, daemon_id: &str, generation: Generation) {
        if self.peers.shared() {
            match self.store.get_daemon(daemon_id).await {
                Ok(Some(d)) if d.connected => {
                    // It came back on another coordinator, which holds its attempts now.
                    let mut st = self.lock();
                    let gone = st
                        .daemons
                        .get(daemon_id)
                        .is_some_and(|s| s.conn.is_none() && s.generation == generation);
                    if gone {
                        if let Some(slot) = st.daemons.remove(daemon_id) {
                            for t in slot.held {
                                st.live.remove(&t);
                            }
                        }
                        st.update_gauges();
                    }
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(
                        daemon_id,
                        error = &e as &dyn std::error::Error,
                        "failed to check whether a daemon came back elsewhere; ending its attempts"
                    );
                }
            }
        }
        let held: Vec<(String, u32)> = {
            let st = self.lock();
            let Some(slot) = st.daemons.get(daemon_id) else {
                return;
            };
            if !slot
                .generation
                .grace_lapsed(generation, slot.conn.is_some())
            {
                return;
            }
            slot.held
                .iter()
                .filter_map(|t| st.live.get(t).map(|l| (t.clone(), l.attempt)))
                .collect()
        };
        let reason = format!(
            "daemon {daemon_id} disconnected and did not return within {}",
            self.cfg.scheduler.reattach_grace
        );
        for (task_id, attempt) in held {
            tracing::warn!(task_id, attempt, daemon_id, "attempt lost");
            self.end_attempt(
                EndAttempt {
                    task_id: &task_id,
                    attempt,
                    status: AttemptStatus::Lost,
                    reason: &reason,
                    retry: Retry::Charged,
                    terminal: TaskStatus::Lost,
                },
                false,
            )
            .await;
        }
    }

    /// Applies sequenced daemon reports and mirrors what they changed.
    pub async fn report(&self, reports: &[Report]) -> Result<Vec<Applied>, StoreError> {
        let results = self.store.apply(reports, self.clock.now_ms()).await?;
        let mut changed = false;
        let mut events = Vec::new();
        {
            let mut st = self.lock();
            for (r, res) in reports.iter().zip(&results) {
                let Applied::Done { events: evs, task } = res else {
                    continue;
                };
                match r.effect {
                    Effect::Output { .. } => self.output_grew(&r.task_id),
                    // No output: the others' streams wake on the change's events.
                    _ => {
                        let _ = self.output.send(Arc::from(r.task_id.as_str()));
                    }
                }
                events.extend(evs.iter().cloned());
                let Some(task) = task else { continue };
                changed = true;
                st.observe(task);
                if let Effect::Rejected { code: Some(c), .. } = &r.effect {
                    // Observed first: the release above clears `full`, this sets it.
                    if let Some(slot) = st.daemons.get_mut(&r.daemon_id) {
                        match c {
                            RejectCode::AtCapacity => {
                                tracing::info!(
                                    daemon_id = %r.daemon_id,
                                    task_id = %r.task_id,
                                    "daemon refused a task for capacity; it gets nothing more until it reports a free slot"
                                );
                                slot.full = true;
                            }
                            RejectCode::ShuttingDown => {
                                // Until it reconnects or offers capacity again.
                                slot.max = 0;
                                st.recheck_all = true;
                            }
                            RejectCode::Other => {}
                        }
                    }
                }
            }
            if changed {
                st.update_gauges();
            }
        }
        // The attempts are this coordinator's links': the others hold none of them, and
        // hear only of tasks queued again.
        self.publish_telling(events, Tell::Queued);
        if changed {
            self.wake.notify_one();
        }
        Ok(results)
    }

    /// A connected daemon (a relay, usually) offers a new capacity: what it may hold and which
    /// agents and labels it serves from now on. Tasks it already holds are kept.
    pub fn set_capacity(&self, daemon_id: &str, c: kennel_proto::link::Capacity) {
        {
            let mut st = self.lock();
            let Some(slot) = st.daemons.get_mut(daemon_id) else {
                return;
            };
            slot.max = c.max_concurrent_tasks;
            slot.agents = c.agents.into_iter().collect();
            slot.labels = c.labels;
            slot.full = false;
            st.recheck_all = true;
            st.update_gauges();
        }
        tracing::info!(daemon_id, "daemon capacity changed");
        self.wake.notify_one();
    }

    /// A relay keeps a dispatched attempt in its own queue: stop its accept deadline.
    pub fn attempt_queued(&self, daemon_id: &str, q: &kennel_proto::link::TaskQueued) {
        let mut st = self.lock();
        match st.live.get_mut(&q.task_id) {
            Some(l) if l.attempt == q.attempt && l.daemon_id == daemon_id && !l.accepted => {
                l.queued = true;
                tracing::info!(
                    daemon_id,
                    task_id = %q.task_id,
                    attempt = q.attempt,
                    reason = q.reason.as_deref().unwrap_or(""),
                    "attempt queued by a relay; its accept deadline is off"
                );
            }
            _ => {
                tracing::debug!(daemon_id, task_id = %q.task_id, "ignoring taskQueued for an attempt it does not hold")
            }
        }
    }

    /// A heartbeat: liveness, and `active` tasks running, which frees a daemon marked full
    /// after a capacity refusal once it runs fewer than its maximum.
    pub async fn heartbeat(&self, daemon_id: &str, active: usize) {
        let freed = {
            let mut st = self.lock();
            match st.daemons.get_mut(daemon_id) {
                Some(slot) if slot.full && (active as u32) < slot.max => {
                    slot.full = false;
                    true
                }
                _ => false,
            }
        };
        if freed {
            tracing::debug!(daemon_id, active, "daemon reports a free slot again");
            self.wake.notify_one();
        }
        if let Err(e) = self.store.daemon_seen(daemon_id, self.clock.now_ms()).await {
            tracing::warn!(
                daemon_id,
                error = &e as &dyn std::error::Error,
                "failed to record heartbeat"
            );
        }
    }
}

fn slot_from(d: &Daemon) -> DaemonSlot {
    DaemonSlot {
        id: d.id.clone(),
        max: d.max_concurrent_tasks,
        labels: d.labels.clone(),
        agents: d.agents.iter().cloned().collect(),
        draining: d.draining,
        conn: None,
        held: HashSet::new(),
        last_pick: 0,
        generation: Generation::default(),
        full: false,
    }
}

fn spawn_message(task: &Task, attempt: u32) -> SpawnTask {
    SpawnTask {
        task_id: task.id.clone(),
        attempt,
        task_name: task.name.clone(),
        prompt: task.prompt.clone(),
        repo: task.repo.clone(),
        agent: task.agent.clone(),
        env: task.env.clone(),
        limits: TaskLimits {
            timeout_secs: task.timeout_secs,
        },
        session: task.session.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, priority: i32, agent: &str, labels: &[(&str, &str)]) -> Task {
        Task {
            id: id.into(),
            name: id.into(),
            prompt: "p".into(),
            repo: None,
            agent: agent.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            priority,
            env: BTreeMap::new(),
            timeout_secs: None,
            max_attempts: 3,
            status: TaskStatus::Queued,
            attempt: 0,
            daemon_id: None,
            created_at: String::new(),
            updated_at: String::new(),
            finished_at: None,
            error: None,
            exit_code: None,
            branch: None,
            commit: None,
            waiting: None,
            session: None,
        }
    }

    fn slot(st: &mut State, id: &str, max: u32, labels: &[(&str, &str)]) {
        let (tx, _rx) = crate::outbound::channel(16);
        st.daemons.insert(
            id.into(),
            DaemonSlot {
                id: id.into(),
                max,
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                agents: ["command".to_string()].into(),
                draining: false,
                conn: Some(Conn {
                    id: 1,
                    tx,
                    key_id: Arc::from("k"),
                }),
                held: HashSet::new(),
                last_pick: 0,
                generation: Generation::default(),
                full: false,
            },
        );
    }

    fn picked(st: &mut State) -> Vec<(String, String)> {
        st.pick(100)
            .into_iter()
            .map(|(_, d)| (d.task_id, d.daemon_id))
            .collect()
    }

    #[test]
    fn spreads_over_the_least_loaded_daemons() {
        let mut st = State::default();
        slot(&mut st, "a", 2, &[]);
        slot(&mut st, "b", 2, &[]);
        if let Some(d) = st.daemons.get_mut("a") {
            d.held.insert("busy".into());
        }
        for i in 0..3 {
            st.enqueue(task(&format!("t{i}"), 0, "command", &[]));
        }
        let got = picked(&mut st);
        // b is idle so it goes first; then both hold one and a (idle longer) takes one; full.
        assert_eq!(
            got,
            vec![
                ("t0".into(), "b".into()),
                ("t1".into(), "a".into()),
                ("t2".into(), "b".into())
            ]
        );
        assert!(st.queue.is_empty());
        assert!(picked(&mut st).is_empty());
    }

    #[test]
    fn priority_then_fifo_and_unmatched_tasks_do_not_block() {
        let mut st = State::default();
        slot(&mut st, "gpu", 1, &[("gpu", "yes")]);
        slot(&mut st, "cpu", 2, &[]);
        st.enqueue(task("t-01-low", 0, "command", &[]));
        st.enqueue(task("t-02-codex", 9, "codex", &[]));
        st.enqueue(task("t-03-high", 5, "command", &[]));
        st.enqueue(task("t-04-gpu", 1, "command", &[("gpu", "yes")]));
        let got = picked(&mut st);
        // Equal load: the daemon with more free slots wins, so the plain task leaves the
        // labelled daemon to the task that needs it.
        assert_eq!(
            got,
            vec![
                ("t-03-high".into(), "cpu".into()),
                ("t-04-gpu".into(), "gpu".into()),
                ("t-01-low".into(), "cpu".into()),
            ]
        );
        assert!(
            !got.iter().any(|(t, _)| t == "t-02-codex"),
            "no daemon offers codex"
        );
        assert_eq!(st.queue.len(), 1);
    }

    #[test]
    fn draining_and_disconnected_daemons_get_nothing() {
        let mut st = State::default();
        slot(&mut st, "drained", 4, &[]);
        slot(&mut st, "gone", 4, &[]);
        if let Some(d) = st.daemons.get_mut("drained") {
            d.draining = true;
        }
        if let Some(d) = st.daemons.get_mut("gone") {
            d.conn = None;
        }
        st.enqueue(task("t1", 0, "command", &[]));
        assert!(picked(&mut st).is_empty());
        assert_eq!(st.queue.len(), 1);
    }
    #[test]
    fn a_daemon_marked_full_gets_nothing_until_it_frees_a_slot() {
        let mut st = State::default();
        slot(&mut st, "d", 2, &[]);
        if let Some(d) = st.daemons.get_mut("d") {
            d.full = true;
        }
        st.enqueue(task("t1", 0, "command", &[]));
        assert!(picked(&mut st).is_empty(), "full: nothing dispatched");
        if let Some(d) = st.daemons.get_mut("d") {
            d.held.insert("t0".into());
        }
        st.live.insert(
            "t0".into(),
            Live {
                attempt: 1,
                daemon_id: "d".into(),
                accepted: true,
                queued: false,
            },
        );
        st.release("t0");
        assert_eq!(picked(&mut st), vec![("t1".into(), "d".into())]);
    }

    #[test]
    fn the_waiting_reason_names_what_is_missing() {
        let mut st = State::default();
        let t = task("t1", 0, "nosuch", &[]);
        assert!(st
            .why_unschedulable(&t)
            .is_some_and(|r| r.starts_with("no daemon is connected")));
        slot(&mut st, "d-1", 1, &[("site", "a")]);
        assert_eq!(
            st.why_unschedulable(&t).as_deref(),
            Some("no connected daemon offers agent \"nosuch\" (offered: command on d-1)")
        );
        let gpu = task("t2", 0, "command", &[("gpu", "yes")]);
        assert_eq!(
            st.why_unschedulable(&gpu).as_deref(),
            Some("no connected daemon offering agent \"command\" has the labels gpu=yes (d-1: site=a)")
        );
        let plain = task("t3", 0, "command", &[]);
        assert_eq!(st.why_unschedulable(&plain), None, "busy is not waiting");
        if let Some(d) = st.daemons.get_mut("d-1") {
            d.draining = true;
        }
        assert!(st
            .why_unschedulable(&plain)
            .is_some_and(|r| r.starts_with("every daemon that can run it is draining (d-1)")));
    }

    #[test]
    fn waiting_is_announced_once_settled_and_cleared_when_a_daemon_can_run_it() {
        let mut st = State::default();
        slot(&mut st, "d-1", 1, &[]);
        let mut typo = task("t1", 0, "nosuch", &[]);
        typo.agent = "nosuch".into();
        st.enqueue(typo);
        let t0 = Instant::now();
        assert!(st.refresh_waiting(t0).is_empty(), "not settled yet");
        assert!(st.waiting.contains_key("t1"), "but known at once");
        let later = t0 + WAITING_SETTLE;
        let changes = st.refresh_waiting(later);
        assert_eq!(changes.len(), 1);
        assert!(changes[0].reason.is_some());
        assert!(st.refresh_waiting(later).is_empty(), "announced once");
        if let Some(d) = st.daemons.get_mut("d-1") {
            d.agents.insert("nosuch".into());
        }
        st.recheck_all = true;
        let changes = st.refresh_waiting(later);
        assert_eq!(changes.len(), 1);
        assert_eq!(
            (changes[0].task_id.as_str(), changes[0].reason.as_deref()),
            ("t1", None)
        );
        assert!(st.waiting.is_empty());
    }
}

/// Leases and reattach graces on a [`kennel_clock::ManualClock`]: the timeouts act when the
/// clock passes them, and not a millisecond before, without the test sleeping.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod timer_tests {
    use super::*;
    use crate::outbound::{self, LinkRx, Outbound};
    use kennel_clock::ManualClock;
    use kennel_proto::link::Authenticated;

    /// Real time a test waits for something that follows at once from what it did.
    const PROMPTLY: Duration = Duration::from_secs(10);

    struct Rig {
        _dir: tempfile::TempDir,
        clock: ManualClock,
        coord: Arc<Coordinator>,
        daemon_id: String,
        rx: LinkRx,
        conn_id: u64,
    }

    async fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let store = kennel_store::SqliteStore::open(&dir.path().join("kennel.db"))
            .await
            .unwrap();
        let clock = ManualClock::new(1_800_000_000_000);
        let coord = Coordinator::new(
            Arc::new(store),
            Arc::new(clock.clone()),
            ServerConfig::default(),
        );
        tokio::spawn(coord.clone().run_scheduler());
        tokio::spawn(coord.clone().run_timers());
        let (daemon_id, rx, conn_id) = connect_daemon(&coord, "m1").await;
        Rig {
            _dir: dir,
            clock,
            coord,
            daemon_id,
            rx,
            conn_id,
        }
    }

    /// Connects a daemon with one slot for agent "a" to `coord`: its id, what it is sent, and
    /// its connection id.
    pub(super) async fn connect_daemon(
        coord: &Arc<Coordinator>,
        machine: &str,
    ) -> (String, LinkRx, u64) {
        let daemon_id = coord.resolve_daemon_id(machine).await.unwrap();
        let (tx, rx) = outbound::channel(64);
        let hello = DaemonHello {
            machine_id: machine.into(),
            hostname: machine.into(),
            max_concurrent_tasks: 1,
            labels: BTreeMap::new(),
            agents: vec!["a".into()],
            version: "test".into(),
            protocol_version: 1,
            remote_addr: None,
            key_id: None,
        };
        let authenticated = ServerMessage::Authenticated(Authenticated {
            daemon_id: daemon_id.clone(),
            heartbeat_interval_secs: 10,
            protocol_version: 1,
            max_frame_bytes: 1 << 20,
        });
        let attached = coord
            .attach(&daemon_id, hello, Vec::new(), tx, authenticated, "k")
            .await
            .unwrap();
        (daemon_id, rx, attached.conn_id)
    }

    /// The next `spawnTask` the daemon is sent.
    async fn next_spawn(rx: &mut LinkRx) -> SpawnTask {
        tokio::time::timeout(PROMPTLY, async {
            loop {
                match rx.recv().await {
                    Some(Outbound::Msg(m)) => {
                        if let ServerMessage::SpawnTask(s) = *m {
                            return s;
                        }
                    }
                    Some(Outbound::Close(..)) | None => panic!("the link ended"),
                }
            }
        })
        .await
        .expect("no spawnTask")
    }

    /// Waits for the task's attempt `attempt` to end with `status`.
    async fn attempt_ends(coord: &Coordinator, task_id: &str, attempt: u32, status: &str) {
        let mut events = coord.subscribe_events();
        tokio::time::timeout(PROMPTLY, async {
            loop {
                let done = coord
                    .store
                    .list_attempts(task_id)
                    .await
                    .unwrap()
                    .iter()
                    .any(|a| a.attempt == attempt && a.status.to_string() == status);
                if done {
                    return;
                }
                let _ = events.recv().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("attempt {attempt} of {task_id} did not end {status}"));
    }

    fn task(prompt: &str) -> CreateTask {
        CreateTask {
            name: prompt.into(),
            prompt: prompt.into(),
            agent: Some("a".into()),
            ..CreateTask::default()
        }
    }

    /// Lets the timer and scheduler tasks run until they wait again.
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn an_attempt_not_accepted_expires_when_the_clock_passes_its_lease() {
        let mut r = rig().await;
        let t = r.coord.submit(task("lease")).await.unwrap();
        let spawn = next_spawn(&mut r.rx).await;
        assert_eq!((spawn.task_id.as_str(), spawn.attempt), (t.id.as_str(), 1));

        // One millisecond short of the 30 s lease: nothing happens.
        r.clock.advance(Duration::from_millis(29_999));
        settle().await;
        let a = r.coord.store.list_attempts(&t.id).await.unwrap();
        assert_eq!(a[0].status, AttemptStatus::Dispatched, "{a:?}");

        r.clock.advance(Duration::from_millis(1));
        attempt_ends(&r.coord, &t.id, 1, "expired").await;
        // Charged and retried: the next attempt goes to the same, only, daemon.
        let again = next_spawn(&mut r.rx).await;
        assert_eq!((again.task_id.as_str(), again.attempt), (t.id.as_str(), 2));
    }

    #[tokio::test]
    async fn a_daemon_gone_past_its_grace_loses_its_attempts_not_before() {
        let mut r = rig().await;
        let t = r.coord.submit(task("grace")).await.unwrap();
        next_spawn(&mut r.rx).await;
        let accepted = Report {
            daemon_id: r.daemon_id.clone(),
            task_id: t.id.clone(),
            attempt: 1,
            seq: 1,
            effect: Effect::Accepted,
        };
        r.coord.report(&[accepted]).await.unwrap();
        r.coord
            .detach(&r.daemon_id, r.conn_id, "link dropped")
            .await;

        // 60 s of grace: at 59.999 s the attempt is still the daemon's.
        r.clock.advance(Duration::from_millis(59_999));
        settle().await;
        let a = r.coord.store.list_attempts(&t.id).await.unwrap();
        assert_eq!(a[0].status, AttemptStatus::Running, "{a:?}");
        r.clock.advance(Duration::from_millis(1));
        attempt_ends(&r.coord, &t.id, 1, "lost").await;
    }
}

/// Several coordinators on one database, in one process: two coordinators share a SQLite store
/// and hear each other through an in-process stand-in for PostgreSQL's `NOTIFY`, on a manual
/// clock. (`cluster::tests` checks the real `NOTIFY` transport.)
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod cluster_tests {
    use super::*;
    use crate::outbound::{LinkRx, Outbound};
    use kennel_clock::ManualClock;

    const PROMPTLY: Duration = Duration::from_secs(10);
    const START: i64 = 1_800_000_000_000;

    /// Delivers what one coordinator sends to every other one, as `NOTIFY` would.
    struct Bus {
        ears: Mutex<Vec<(String, mpsc::UnboundedSender<Heard>)>>,
        /// Every task signal sent, with its sender.
        told: Mutex<Vec<(String, Signal)>>,
    }

    impl Bus {
        /// The task signals `from` sent, taken out of the log.
        fn take_told(&self, from: &str) -> Vec<Signal> {
            let mut told = self.told.lock().unwrap();
            let (theirs, rest): (Vec<_>, Vec<_>) = told.drain(..).partition(|(f, _)| f == from);
            *told = rest;
            theirs.into_iter().map(|(_, s)| s).collect()
        }
    }

    struct Member {
        id: String,
        bus: Arc<Bus>,
    }

    impl Peers for Member {
        fn id(&self) -> &str {
            &self.id
        }
        fn shared(&self) -> bool {
            true
        }
        fn send(&self, signal: Signal) {
            if matches!(signal, Signal::Task { .. }) {
                let mut told = self.bus.told.lock().unwrap();
                told.push((self.id.clone(), signal.clone()));
            }
            let ears = self.bus.ears.lock().unwrap();
            for (id, ear) in ears.iter() {
                if *id != self.id {
                    let _ = ear.send(Heard::Signals(vec![signal.clone()]));
                }
            }
        }
    }

    struct Cluster {
        _dir: tempfile::TempDir,
        clock: ManualClock,
        store: Arc<dyn Store>,
        bus: Arc<Bus>,
    }

    impl Cluster {
        async fn new() -> Cluster {
            let dir = tempfile::tempdir().unwrap();
            let store = kennel_store::SqliteStore::open(&dir.path().join("kennel.db"))
                .await
                .unwrap();
            Cluster {
                _dir: dir,
                clock: ManualClock::new(START),
                store: Arc::new(store),
                bus: Arc::new(Bus {
                    ears: Mutex::new(Vec::new()),
                    told: Mutex::new(Vec::new()),
                }),
            }
        }

        async fn coordinator(&self, id: &str) -> Arc<Coordinator> {
            let (ear, heard) = mpsc::unbounded_channel();
            self.bus.ears.lock().unwrap().push((id.to_string(), ear));
            let peers = Arc::new(Member {
                id: id.to_string(),
                bus: self.bus.clone(),
            });
            let coord = Coordinator::with_peers(
                self.store.clone(),
                Arc::new(self.clock.clone()),
                ServerConfig::default(),
                peers,
            );
            coord.restore().await.unwrap();
            tokio::spawn(coord.clone().run_scheduler());
            tokio::spawn(coord.clone().run_timers());
            tokio::spawn(coord.clone().run_peers(heard));
            tokio::spawn(coord.clone().run_event_tail());
            tokio::spawn(coord.clone().run_waiting_watch());
            coord
        }
    }

    /// Connects a daemon with one slot for agent "a" to `coord`.
    async fn daemon(coord: &Arc<Coordinator>, machine: &str) -> (String, LinkRx) {
        let (daemon_id, rx, _) = super::timer_tests::connect_daemon(coord, machine).await;
        (daemon_id, rx)
    }

    /// Two coordinators, `c-a` holding the rescue lease (leading) and `c-b` not.
    async fn a_leading_b_not() -> (Cluster, Arc<Coordinator>, Arc<Coordinator>) {
        let c = Cluster::new().await;
        let a = c.coordinator("c-a").await;
        let b = c.coordinator("c-b").await;
        a.leading.store(true, std::sync::atomic::Ordering::Relaxed);
        (c, a, b)
    }

    /// The next event of `kind` that `events` show (of `task`, if given).
    async fn next_event(
        events: &mut broadcast::Receiver<Arc<Event>>,
        kind: &str,
        task: Option<&str>,
    ) -> Arc<Event> {
        tokio::time::timeout(PROMPTLY, async {
            loop {
                let ev = events.recv().await.unwrap();
                if ev.kind == kind && task.is_none_or(|t| ev.task_id.as_deref() == Some(t)) {
                    return ev;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("a {kind} event is shown"))
    }

    /// The next `task.waiting` event `events` show (of `task`, if given).
    async fn next_waiting(
        events: &mut broadcast::Receiver<Arc<Event>>,
        task: Option<&str>,
    ) -> Arc<Event> {
        next_event(events, "task.waiting", task).await
    }

    /// The next message the daemon is sent that `pick` selects.
    async fn next_msg<T>(rx: &mut LinkRx, pick: impl Fn(ServerMessage) -> Option<T>) -> T {
        tokio::time::timeout(PROMPTLY, async {
            loop {
                match rx.recv().await {
                    Some(Outbound::Msg(m)) => {
                        if let Some(t) = pick(*m) {
                            return t;
                        }
                    }
                    Some(Outbound::Close(..)) | None => panic!("the link ended"),
                }
            }
        })
        .await
        .expect("the daemon is sent nothing")
    }

    async fn spawn_of(rx: &mut LinkRx) -> SpawnTask {
        next_msg(rx, |m| match m {
            ServerMessage::SpawnTask(s) => Some(s),
            _ => None,
        })
        .await
    }

    fn task(prompt: &str) -> CreateTask {
        CreateTask {
            name: prompt.into(),
            prompt: prompt.into(),
            agent: Some("a".into()),
            ..CreateTask::default()
        }
    }

    async fn accept(coord: &Coordinator, daemon_id: &str, task_id: &str, attempt: u32) {
        let r = Report {
            daemon_id: daemon_id.into(),
            task_id: task_id.into(),
            attempt,
            seq: 1,
            effect: Effect::Accepted,
        };
        coord.report(&[r]).await.unwrap();
    }

    async fn status_becomes(store: &Arc<dyn Store>, task_id: &str, want: TaskStatus) {
        tokio::time::timeout(PROMPTLY, async {
            loop {
                let t = store.get_task(task_id).await.unwrap().unwrap();
                if t.status == want {
                    return;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("task {task_id} did not become {want}"));
    }

    #[tokio::test]
    async fn a_task_whose_signal_never_came_is_found_in_the_store_and_runs() {
        let c = Cluster::new().await;
        let b = c.coordinator("c-b").await;
        tokio::spawn(b.clone().run_cluster());
        let (_daemon, mut rx) = daemon(&b, "m1").await;
        // Committed by a coordinator that died before its signal went out.
        let lost = kennel_store::NewTask {
            id: "t-lost".into(),
            name: "lost".into(),
            prompt: "p".into(),
            repo: None,
            agent: "a".into(),
            labels: BTreeMap::new(),
            priority: 0,
            env: BTreeMap::new(),
            timeout_secs: None,
            max_attempts: 1,
            session: None,
        };
        c.store.create_task(lost, START).await.unwrap();
        assert!(!b.lock().queued.contains_key("t-lost"), "B heard nothing");
        // B reads the queue from the store every QUEUE_RESYNC_EVERY, and runs it. The manual
        // clock moves a second at a time until the spawn comes (the loop's store calls take
        // real time between its beats).
        let spawn = tokio::time::timeout(PROMPTLY, async {
            loop {
                c.clock.advance(Duration::from_secs(1));
                let next = tokio::time::timeout(Duration::from_millis(20), spawn_of(&mut rx));
                if let Ok(spawn) = next.await {
                    return spawn;
                }
            }
        })
        .await
        .expect("B never found the task in the store");
        assert_eq!((spawn.task_id.as_str(), spawn.attempt), ("t-lost", 1));
    }

    #[tokio::test]
    async fn a_task_submitted_on_one_coordinator_runs_on_a_daemon_of_another_and_both_stream_it() {
        let c = Cluster::new().await;
        let a = c.coordinator("c-a").await;
        let b = c.coordinator("c-b").await;
        let mut events_a = a.subscribe_events();
        let (_daemon, mut rx) = daemon(&b, "m1").await;

        let t = a.submit(task("elsewhere")).await.unwrap();
        let spawn = spawn_of(&mut rx).await;
        assert_eq!((spawn.task_id.as_str(), spawn.attempt), (t.id.as_str(), 1));
        // A's stream shows what B did, in the store's order.
        let mut seen = Vec::new();
        tokio::time::timeout(PROMPTLY, async {
            while !seen
                .iter()
                .any(|(k, s): &(String, String)| k == "task.status" && s == "dispatched")
            {
                let ev = events_a.recv().await.unwrap();
                let status = ev.data["status"].as_str().unwrap_or_default().to_string();
                seen.push((ev.kind.clone(), status));
            }
        })
        .await
        .unwrap_or_else(|_| panic!("A's stream did not show the dispatch: {seen:?}"));
        // Nothing is left in A's queue once it has heard B's signal (which may come after the
        // event: A's tail reads whatever is committed).
        tokio::time::timeout(PROMPTLY, async {
            while !a.lock().queued.is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("A took the task out of its queue");
    }

    /// The task signals `from` sent since the last call, as (status, attempt) pairs.
    fn statuses_told(c: &Cluster, from: &str) -> Vec<(Option<TaskStatus>, Option<u32>)> {
        c.bus
            .take_told(from)
            .into_iter()
            .filter_map(|s| match s {
                Signal::Task {
                    status, attempt, ..
                } => Some((status, attempt)),
                _ => None,
            })
            .collect()
    }

    /// A task dispatched at submit and the reports of A's own daemon tell B of nothing, except
    /// a task queued again, which B then runs.
    #[tokio::test]
    async fn a_coordinators_own_work_tells_the_others_only_of_tasks_queued_again() {
        let c = Cluster::new().await;
        let a = c.coordinator("c-a").await;
        let b = c.coordinator("c-b").await;
        let (d1, mut rx1) = daemon(&a, "m1").await;

        let t1 = a.submit(task("runs on A")).await.unwrap();
        assert_eq!(spawn_of(&mut rx1).await.task_id, t1.id);
        accept(&a, &d1, &t1.id, 1).await;
        let done = Report {
            daemon_id: d1.clone(),
            task_id: t1.id.clone(),
            attempt: 1,
            seq: 2,
            effect: Effect::Complete {
                success: true,
                error: None,
                exit_code: Some(0),
                branch: None,
                commit: None,
            },
        };
        a.report(&[done]).await.unwrap();
        status_becomes(&c.store, &t1.id, TaskStatus::Completed).await;
        assert_eq!(
            statuses_told(&c, "c-a"),
            Vec::new(),
            "dispatched at submit, accepted and completed by A's daemon: nobody else holds it"
        );

        // B's daemon connects; A's daemon refuses the next task, which is queued again.
        let (_d2, mut rx2) = daemon(&b, "m2").await;
        let t2 = a.submit(task("refused on A")).await.unwrap();
        assert_eq!(spawn_of(&mut rx1).await.task_id, t2.id);
        let refused = Report {
            daemon_id: d1.clone(),
            task_id: t2.id.clone(),
            attempt: 1,
            seq: 1,
            effect: Effect::Rejected {
                reason: "full".into(),
                code: Some(RejectCode::AtCapacity),
            },
        };
        a.report(&[refused]).await.unwrap();
        assert_eq!(
            statuses_told(&c, "c-a"),
            vec![(Some(TaskStatus::Queued), Some(1))],
            "only the task queued again is told"
        );
        // A's daemon is full now: B heard of the task and runs it.
        let spawn = spawn_of(&mut rx2).await;
        assert_eq!(spawn.task_id, t2.id);
    }

    /// A drain recorded on A stops B dispatching to the daemon linked to B; an undrain on A
    /// lets it go on.
    #[tokio::test]
    async fn a_drain_on_one_coordinator_applies_to_the_daemon_linked_to_another() {
        let c = Cluster::new().await;
        let a = c.coordinator("c-a").await;
        let b = c.coordinator("c-b").await;
        let (daemon_id, mut rx) = daemon(&b, "m1").await;
        let mut events = b.subscribe_events();
        let drained = a.set_draining(&daemon_id, true).await.unwrap();
        assert!(drained.draining);
        // B's tail applies the drain before its streams show the event.
        next_event(&mut events, "daemon.draining", None).await;
        let t = b.submit(task("not for a draining daemon")).await.unwrap();
        assert_eq!(t.status, TaskStatus::Queued, "not dispatched at submit");

        a.set_draining(&daemon_id, false).await.unwrap();
        assert_eq!(spawn_of(&mut rx).await.task_id, t.id);
    }

    #[tokio::test]
    async fn a_cancel_on_one_coordinator_interrupts_the_daemon_linked_to_another() {
        let c = Cluster::new().await;
        let a = c.coordinator("c-a").await;
        let b = c.coordinator("c-b").await;
        let (daemon_id, mut rx) = daemon(&b, "m1").await;
        let t = b.submit(task("cancel me")).await.unwrap();
        spawn_of(&mut rx).await;
        accept(&b, &daemon_id, &t.id, 1).await;

        let cancelled = a.cancel(&t.id).await.unwrap();
        assert_eq!(cancelled.status, TaskStatus::Cancelled);
        let interrupt = next_msg(&mut rx, |m| match m {
            ServerMessage::InterruptTask(i) => Some(i),
            _ => None,
        })
        .await;
        assert_eq!(
            (interrupt.task_id.as_str(), interrupt.attempt),
            (t.id.as_str(), 1)
        );
        // B freed the slot: its daemon takes the next task.
        let next = a.submit(task("next")).await.unwrap();
        let spawn = spawn_of(&mut rx).await;
        assert_eq!(spawn.task_id, next.id);
    }

    #[tokio::test]
    async fn the_rescuer_ends_a_dead_coordinators_links_then_its_attempts_after_the_grace() {
        let c = Cluster::new().await;
        let a = c.coordinator("c-a").await;
        let b = c.coordinator("c-b").await;
        let (daemon_id, mut rx) = daemon(&b, "m1").await;
        let t = b.submit(task("orphan")).await.unwrap();
        spawn_of(&mut rx).await;
        accept(&b, &daemon_id, &t.id, 1).await;
        c.store.coordinator_seen("c-b", START).await.unwrap();
        // B dies (it is seen no more); A lives on.
        drop(rx);
        let t0 = START + 10_001;
        c.store.coordinator_seen("c-a", t0).await.unwrap();

        a.rescue(t0).await;
        let d = c.store.get_daemon(&daemon_id).await.unwrap().unwrap();
        assert!(
            !d.connected,
            "the dead coordinator's link is recorded as ended"
        );
        status_becomes(&c.store, &t.id, TaskStatus::Running).await;

        // Within the reattach grace (and the time to notice a dead coordinator): kept.
        let grace = ServerConfig::default().scheduler.reattach_grace.as_millis() as i64;
        a.rescue(t0 + grace + 10_000 - 1).await;
        let still = c.store.get_task(&t.id).await.unwrap().unwrap();
        assert_eq!(still.status, TaskStatus::Running);
        // Past it: lost, retried, and A's daemon runs it.
        let (_d2, mut rx2) = daemon(&a, "m2").await;
        a.rescue(t0 + grace + 10_001).await;
        let spawn = spawn_of(&mut rx2).await;
        assert_eq!((spawn.task_id.as_str(), spawn.attempt), (t.id.as_str(), 2));
        let attempts = c.store.list_attempts(&t.id).await.unwrap();
        assert_eq!(attempts[0].status, AttemptStatus::Lost);
    }

    /// A coordinator with a free slot claims the task submitted to it: the others leave it to
    /// that coordinator, and queue it themselves only if it is still queued once the claim
    /// has had its time.
    #[tokio::test]
    async fn a_claimed_task_is_left_to_its_claimer_until_the_claim_wait_is_over() {
        let c = Cluster::new().await;
        let a = c.coordinator("c-a").await;
        let b = c.coordinator("c-b").await;
        let (_da, mut rx_a) = daemon(&a, "m1").await;
        let (_db, mut rx_b) = daemon(&b, "m2").await;

        // Submitted on A, which has a free slot and nothing queued: dispatched in its submit,
        // to A's daemon; B never queues it.
        let t = a.submit(task("mine")).await.unwrap();
        assert_eq!((t.status, t.attempt), (TaskStatus::Dispatched, 1));
        assert_eq!(spawn_of(&mut rx_a).await.task_id, t.id);
        status_becomes(&c.store, &t.id, TaskStatus::Dispatched).await;
        assert!(
            b.lock().queued.is_empty(),
            "B never queued the task A dispatched"
        );

        // A claimer that never dispatches (it died, its slot was gone): after the wait, B does.
        let new = |id: &str, agent: &str| kennel_store::NewTask {
            id: id.into(),
            name: id.into(),
            prompt: id.into(),
            repo: None,
            agent: agent.into(),
            labels: BTreeMap::new(),
            priority: 0,
            env: BTreeMap::new(),
            timeout_secs: None,
            max_attempts: 1,
            session: None,
        };
        let (orphan, _) = c
            .store
            .create_task(new("t-orphan", "a"), START)
            .await
            .unwrap();
        // A task nobody can run, signalled after the claim without one: once B has queued it,
        // B has heard the claim too (signals are handled in order).
        let (marker, _) = c
            .store
            .create_task(new("t-marker", "zzz"), START)
            .await
            .unwrap();
        let ghost = Member {
            id: "c-ghost".into(),
            bus: c.bus.clone(),
        };
        for (t, claimed) in [(&orphan, true), (&marker, false)] {
            ghost.send(Signal::Task {
                id: t.task.id.clone(),
                status: Some(TaskStatus::Queued),
                attempt: Some(0),
                claimed,
            });
        }
        tokio::time::timeout(PROMPTLY, async {
            while !b.lock().queued.contains_key("t-marker") {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("B queues the unclaimed task");
        let taken = {
            let st = b.lock();
            st.queued.contains_key("t-orphan") || st.live.contains_key("t-orphan")
        };
        assert!(!taken, "B leaves the claimed task to its claimer for now");
        while let Some(o) = rx_b.try_recv() {
            assert!(
                !matches!(o, Outbound::Msg(ref m) if matches!(**m, ServerMessage::SpawnTask(_))),
                "B dispatched nothing"
            );
        }
        c.clock.advance(crate::cluster::CLAIM_WAIT);
        assert_eq!(spawn_of(&mut rx_b).await.task_id, orphan.task.id);
    }

    /// The event log is pruned past `api.event_retention`, by the coordinator holding the
    /// rescue lease only.
    #[tokio::test]
    async fn only_the_leading_coordinator_prunes_the_event_log_past_the_retention() {
        let (c, a, b) = a_leading_b_not().await;
        for name in ["one", "two", "three"] {
            a.submit(task(name)).await.unwrap();
        }
        let count =
            |store: Arc<dyn Store>| async move { store.events_after(0, 100).await.unwrap().len() };
        let before = count(c.store.clone()).await;
        assert!(before >= 3, "{before} events");
        let retention = ServerConfig::default().api.event_retention.as_millis();
        c.clock.advance(Duration::from_millis(retention + 1));
        b.prune_events().await;
        assert_eq!(
            count(c.store.clone()).await,
            before,
            "B does not lead: it leaves them"
        );
        a.prune_events().await;
        assert_eq!(
            count(c.store.clone()).await,
            1,
            "A prunes all but the newest"
        );
    }

    /// A signal of another coordinator carries a task's status and attempt; one overtaken by
    /// a newer change (an older attempt than this coordinator holds) is ignored, one of a
    /// newer attempt releases the attempt held here.
    #[tokio::test]
    async fn a_status_signal_of_an_older_attempt_is_ignored_and_of_a_newer_one_releases() {
        let c = Cluster::new().await;
        let a = c.coordinator("c-a").await;
        let (daemon_id, mut rx) = daemon(&a, "m1").await;
        let t = a.submit(task("held")).await.unwrap();
        spawn_of(&mut rx).await;
        accept(&a, &daemon_id, &t.id, 1).await;
        let held = |a: &Coordinator| a.lock().live.get(&t.id).map(|l| l.attempt);
        assert_eq!(held(&a), Some(1));

        a.observe_statuses_elsewhere(vec![(t.id.clone(), TaskStatus::Failed, 0)]);
        assert_eq!(
            held(&a),
            Some(1),
            "an older attempt's end leaves attempt 1 held"
        );
        a.observe_statuses_elsewhere(vec![(t.id.clone(), TaskStatus::Running, 1)]);
        assert_eq!(held(&a), Some(1), "its own attempt running: still held");
        a.observe_statuses_elsewhere(vec![(t.id.clone(), TaskStatus::Dispatched, 2)]);
        assert_eq!(held(&a), None, "a newer attempt elsewhere: released here");
        assert!(a.lock().queued.is_empty(), "and not queued here");
    }

    #[tokio::test]
    async fn the_leading_coordinator_says_why_a_task_waits_from_every_coordinators_daemons() {
        let (_c, a, b) = a_leading_b_not().await;
        let (daemon_id, _rx) = daemon(&b, "m1").await;
        let mut events = a.subscribe_events();
        a.submit(CreateTask {
            agent: Some("nosuch".into()),
            ..task("typo")
        })
        .await
        .unwrap();
        let ev = next_waiting(&mut events, None).await;
        let reason = ev.data["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("no connected daemon offers agent \"nosuch\"")
                && reason.contains(&daemon_id),
            "{reason}"
        );
    }

    /// A coordinator that does not lead shows the leader's waiting reasons (read from its
    /// `task.waiting` events) in its tasks and its status, and forgets them once the task
    /// leaves the queue.
    #[tokio::test]
    async fn a_coordinator_not_leading_shows_the_leaders_waiting_reasons() {
        let (c, a, b) = a_leading_b_not().await;
        let (_daemon_id, _rx) = daemon(&a, "m1").await;
        let mut events = b.subscribe_events();
        let t = b
            .submit(CreateTask {
                agent: Some("nosuch".into()),
                ..task("typo")
            })
            .await
            .unwrap();
        // B's tail keeps the reason before its streams show the event.
        next_waiting(&mut events, Some(&t.id)).await;
        let summary = b.waiting_summary();
        assert_eq!(summary.len(), 1);
        assert_eq!(summary[0].tasks, 1);
        assert_eq!(summary[0].example_task_id, t.id);
        assert!(
            summary[0]
                .reason
                .contains("no connected daemon offers agent"),
            "{}",
            summary[0].reason
        );
        let stored = c.store.get_task(&t.id).await.unwrap().unwrap();
        let shown = b.overlay_task(stored);
        assert_eq!(shown.waiting.as_deref(), Some(summary[0].reason.as_str()));

        b.cancel(&t.id).await.unwrap();
        assert!(
            b.waiting_summary().is_empty(),
            "a cancelled task no longer waits on b"
        );
    }
}
