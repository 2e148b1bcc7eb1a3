//! The reconciler: one pure function from (policy, managed state, facts, now) to the next
//! state and the actions that get there. It reads no clock and does no I/O; the lifecycle
//! manager gathers the facts, calls it on every event that concerns a policy and on a tick,
//! stores the state it returns and carries out its actions. The same inputs always give the
//! same decision, so every transition is tested on plain numbers.
//!
//! The states: `stopped → starting → running → stopping → stopped`, and `backoff` after a
//! failure or while no daemon can take the agent. What moves them:
//! - **stopped**: an `always-on` policy, or a message queued for the policy, spawns.
//! - **starting**: the agent registering makes it `running`; the daemon failing to start it
//!   (binary missing, exited at once) or `spawnTimeoutSecs` passing without a registration is
//!   a failure, with its reason kept in `lastError`. (The reference never times out here.)
//! - **running**: the agent gone is a failure. After `backoff.resetAfterSeconds` of healthy
//!   running the failure count starts again from zero. An idle `on-demand` agent is stopped
//!   after its keepalive; a daily restart (24 h since its spawn, idle for an hour) and a
//!   restart after the coordinator's release changed (idle for `restartOnUpdateIdleSecs`, a
//!   minute by default) stop it to start it again.
//! - **stopping**: once the agent is gone, what the stop was for follows (stopped, or a new
//!   spawn); an agent still there after `stopTimeoutSecs` is killed.
//! - **backoff**: after failure `n` (counted from zero) the policy waits
//!   `backoff.schedule[min(n, len - 1)]` seconds, then spawns again if it is still wanted, or
//!   stops. While no daemon matching the target is online it waits too, without counting a
//!   failure, and spawns as soon as one is.

use kennel_proto::policy::{PolicyMode, SpawnPolicy};
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// How long an agent must have been idle before its daily restart.
pub const DAILY_RESTART_IDLE_MS: Millis = 3_600_000;

/// How long an agent runs before its daily restart is due.
pub const DAILY_RESTART_AFTER_MS: Millis = 24 * 3_600_000;

/// Why a policy waits in backoff while no daemon can take its agent.
pub const NO_TARGET: &str =
    "no daemon that matches the policy's target and offers its provider is online";

/// Where a policy's agent is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyStatus {
    #[default]
    Stopped,
    Starting,
    Running,
    Stopping,
    Backoff,
}

impl PolicyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyStatus::Stopped => "stopped",
            PolicyStatus::Starting => "starting",
            PolicyStatus::Running => "running",
            PolicyStatus::Stopping => "stopping",
            PolicyStatus::Backoff => "backoff",
        }
    }
}

/// Why an agent is being stopped, which says what comes after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    /// An on-demand agent idle past its keepalive: stopped, until a message comes.
    Idle,
    /// Its daily restart: started again.
    DailyRestart,
    /// The coordinator's version changed: started again.
    Update,
    /// Its policy was deleted: stopped for good.
    Retired,
    /// Someone asked for a restart (an `agent.restart` command): started again.
    Requested,
}

impl StopReason {
    fn restarts(self) -> bool {
        matches!(
            self,
            StopReason::DailyRestart | StopReason::Update | StopReason::Requested
        )
    }

    fn describe(self) -> &'static str {
        match self {
            StopReason::Idle => "idle past its keepalive",
            StopReason::DailyRestart => "daily restart",
            StopReason::Update => "restart for a new kennel version",
            StopReason::Retired => "its policy was deleted",
            StopReason::Requested => "restart requested",
        }
    }
}

/// What the manager keeps of one policy between reconciles.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagedState {
    pub status: PolicyStatus,
    /// The running agent's id, once it registered.
    pub agent_id: Option<String>,
    /// The id of the current spawn (`<policy>-<n>`): the agent instance commands address.
    pub spawn_request_id: Option<String>,
    /// Spawns so far; numbers the spawn requests.
    pub spawns: u64,
    pub last_spawn_at: Option<Millis>,
    pub last_stop_at: Option<Millis>,
    /// When the current agent registered; none unless running.
    pub healthy_since: Option<Millis>,
    /// Restarts of a running agent (daily, for an update).
    pub restart_count: u32,
    /// Failures since the last healthy stretch of `backoff.resetAfterSeconds`.
    pub consecutive_failures: u32,
    pub backoff_until: Option<Millis>,
    /// Why the last failure or wait happened, for the user.
    pub last_error: Option<String>,
    /// The coordinator version the current agent was spawned under.
    pub spawned_version: Option<String>,
    /// Why the agent is being stopped; set while `stopping`.
    pub stop_reason: Option<StopReason>,
    pub stop_requested_at: Option<Millis>,
    /// The graceful stop ran out and the agent was killed.
    pub stop_forced: bool,
    /// In backoff because no daemon can take the agent, not because of a failure.
    pub waiting_for_target: bool,
}

/// What is known of the current spawn's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentFact {
    /// Nothing yet (not registered), or no spawn.
    Unknown,
    /// Registered and alive; `last_active_at` is its latest message in or out, or when it
    /// registered.
    Alive {
        agent_id: String,
        last_active_at: Millis,
    },
    /// The daemon could not start it: its binary is missing, it exited at once.
    SpawnFailed { reason: String },
    /// It ran and is gone: it exited, was killed, or its daemon was lost.
    Gone { reason: String },
}

/// Everything outside the policy and its state the reconciler decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub agent: AgentFact,
    /// Messages queued for `policy:<name>`, not yet delivered.
    pub queued_messages: u32,
    /// A daemon matching the policy's target and offering its provider is connected.
    pub target_online: bool,
    /// The coordinator's version now.
    pub version: String,
    /// Someone asked for the running agent to be restarted.
    pub restart_requested: bool,
}

/// What the manager must do to carry out a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start an agent on a daemon matching the target, as spawn `request_id`.
    Spawn { request_id: String },
    /// Stop the agent of spawn `request_id`: gracefully within `timeout_ms`, or at once.
    Stop {
        request_id: String,
        graceful: bool,
        timeout_ms: u64,
        reason: String,
    },
}

/// The reconciler's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub state: ManagedState,
    pub actions: Vec<Action>,
    /// The latest time by which the policy must be reconciled again even if nothing happens
    /// (a backoff ends, a timeout runs out, a keepalive expires); none when only an event can
    /// change anything.
    pub wake_at: Option<Millis>,
}

impl Decision {
    /// The status moved: a `policy.state.changed` event is due.
    pub fn status_changed(&self, before: &ManagedState) -> bool {
        self.state.status != before.status
    }
}

/// Decides what `policy` needs next, given its `state` and the `facts`, at `now`.
pub fn reconcile(
    policy: &SpawnPolicy,
    state: &ManagedState,
    facts: &Facts,
    now: Millis,
) -> Decision {
    let mut r = Run {
        policy,
        facts,
        now,
        s: state.clone(),
        actions: Vec::new(),
    };
    r.step();
    let wake_at = r.wake_at();
    Decision {
        state: r.s,
        actions: r.actions,
        wake_at,
    }
}

/// What to do when `policy` is deleted: stop its agent, if it has one. The state returned is
/// `stopping` until the agent is gone (reconcile it with [`reconcile_retired`]), or `stopped`.
pub fn retire(policy: &SpawnPolicy, state: &ManagedState, now: Millis) -> Decision {
    let mut s = state.clone();
    let mut actions = Vec::new();
    match (s.status, s.spawn_request_id.clone()) {
        (PolicyStatus::Starting | PolicyStatus::Running | PolicyStatus::Stopping, Some(id)) => {
            actions.push(Action::Stop {
                request_id: id,
                graceful: true,
                timeout_ms: policy.stop_timeout_secs.saturating_mul(1000),
                reason: StopReason::Retired.describe().into(),
            });
            s.status = PolicyStatus::Stopping;
            s.stop_reason = Some(StopReason::Retired);
            s.stop_requested_at = Some(now);
            s.stop_forced = false;
        }
        _ => {
            s.status = PolicyStatus::Stopped;
            s.backoff_until = None;
        }
    }
    let wake_at =
        (s.status == PolicyStatus::Stopping).then(|| now + secs(policy.stop_timeout_secs));
    Decision {
        state: s,
        actions,
        wake_at,
    }
}

/// Reconciles a deleted policy whose agent is being stopped: kills it when the graceful stop
/// runs out, and settles on `stopped` once it is gone. Never spawns.
pub fn reconcile_retired(
    policy: &SpawnPolicy,
    state: &ManagedState,
    facts: &Facts,
    now: Millis,
) -> Decision {
    let mut state = state.clone();
    if state.status != PolicyStatus::Stopping {
        state.status = PolicyStatus::Stopped;
        return Decision {
            state,
            actions: Vec::new(),
            wake_at: None,
        };
    }
    state.stop_reason = Some(StopReason::Retired);
    reconcile(policy, &state, facts, now)
}

fn secs(s: u64) -> Millis {
    Millis::try_from(s.saturating_mul(1000)).unwrap_or(Millis::MAX)
}

/// One reconcile in progress.
struct Run<'a> {
    policy: &'a SpawnPolicy,
    facts: &'a Facts,
    now: Millis,
    s: ManagedState,
    actions: Vec<Action>,
}

impl Run<'_> {
    /// The policy wants an agent now.
    fn wanted(&self) -> bool {
        self.policy.mode == PolicyMode::AlwaysOn || self.facts.queued_messages > 0
    }

    fn step(&mut self) {
        match self.s.status {
            PolicyStatus::Stopped => {
                if self.wanted() {
                    self.spawn();
                }
            }
            PolicyStatus::Starting => self.starting(),
            PolicyStatus::Running => self.running(),
            PolicyStatus::Stopping => self.stopping(),
            PolicyStatus::Backoff => self.backoff(),
        }
    }

    fn starting(&mut self) {
        match &self.facts.agent {
            AgentFact::Alive { agent_id, .. } => {
                self.s.status = PolicyStatus::Running;
                self.s.agent_id = Some(agent_id.clone());
                self.s.healthy_since = Some(self.now);
                // The running agent may already be due for something (a queue emptied while
                // it started, say): decide on it as running at once.
                self.running();
            }
            AgentFact::SpawnFailed { reason } => {
                let reason = format!("the daemon could not start the agent: {reason}");
                self.fail(reason);
            }
            AgentFact::Gone { reason } => {
                let reason = format!("the agent exited before it registered: {reason}");
                self.fail(reason);
            }
            AgentFact::Unknown => {
                let timeout = self.policy.spawn_timeout_secs;
                let started = self.s.last_spawn_at.unwrap_or(self.now);
                if self.now - started >= secs(timeout) {
                    if let Some(id) = self.s.spawn_request_id.clone() {
                        self.actions.push(Action::Stop {
                            request_id: id,
                            graceful: false,
                            timeout_ms: 0,
                            reason: "it did not register in time".into(),
                        });
                    }
                    self.fail(format!(
                        "the agent did not register within spawnTimeoutSecs ({timeout}s) of its spawn"
                    ));
                }
            }
        }
    }

    fn running(&mut self) {
        let last_active_at = match &self.facts.agent {
            AgentFact::Alive { last_active_at, .. } => *last_active_at,
            AgentFact::Gone { reason } | AgentFact::SpawnFailed { reason } => {
                let reason = format!("the agent is gone: {reason}");
                self.fail(reason);
                return;
            }
            AgentFact::Unknown => {
                self.fail("the agent is gone: it is no longer registered".into());
                return;
            }
        };
        if self.healthy_long_enough() {
            self.s.consecutive_failures = 0;
        }
        let since_spawn = self.s.last_spawn_at.unwrap_or(self.now);
        let idle = self.now - last_active_at.max(since_spawn);
        let p = self.policy;
        if self.facts.restart_requested {
            self.stop(StopReason::Requested);
        } else if p.mode == PolicyMode::OnDemand
            && self.facts.queued_messages == 0
            && idle >= secs(p.on_demand.keepalive_seconds)
        {
            self.stop(StopReason::Idle);
        } else if p.scheduled_daily_restart
            && self.now - since_spawn >= DAILY_RESTART_AFTER_MS
            && idle >= DAILY_RESTART_IDLE_MS
        {
            self.stop(StopReason::DailyRestart);
        } else if self.update_pending() && idle >= secs(p.restart_on_update_idle_secs) {
            self.stop(StopReason::Update);
        }
    }

    fn stopping(&mut self) {
        match &self.facts.agent {
            AgentFact::Alive { .. } => {
                let asked = self.s.stop_requested_at.unwrap_or(self.now);
                let timeout = secs(self.policy.stop_timeout_secs);
                if !self.s.stop_forced && self.now - asked >= timeout {
                    if let Some(id) = self.s.spawn_request_id.clone() {
                        self.actions.push(Action::Stop {
                            request_id: id,
                            graceful: false,
                            timeout_ms: 0,
                            reason: format!(
                                "it was still running stopTimeoutSecs ({}s) after a graceful stop",
                                self.policy.stop_timeout_secs
                            ),
                        });
                    }
                    self.s.stop_forced = true;
                }
            }
            AgentFact::Unknown | AgentFact::Gone { .. } | AgentFact::SpawnFailed { .. } => {
                let reason = self.s.stop_reason.take();
                self.s.status = PolicyStatus::Stopped;
                self.s.agent_id = None;
                self.s.healthy_since = None;
                self.s.last_stop_at = Some(self.now);
                self.s.stop_requested_at = None;
                self.s.stop_forced = false;
                match reason {
                    Some(StopReason::Retired) => {}
                    Some(r) if r.restarts() => {
                        self.s.restart_count += 1;
                        self.spawn();
                    }
                    _ => {
                        if self.wanted() {
                            self.spawn();
                        }
                    }
                }
            }
        }
    }

    fn backoff(&mut self) {
        if !self.wanted() {
            if self.s.waiting_for_target || self.backoff_over() {
                self.s.status = PolicyStatus::Stopped;
                self.s.backoff_until = None;
                self.s.waiting_for_target = false;
            }
            return;
        }
        let target_back = self.s.waiting_for_target && self.facts.target_online;
        if target_back || self.backoff_over() {
            self.spawn();
        }
    }

    fn backoff_over(&self) -> bool {
        self.s.backoff_until.is_none_or(|t| self.now >= t)
    }

    /// Spawns a new agent, or waits in backoff when no daemon can take it.
    fn spawn(&mut self) {
        if !self.facts.target_online {
            let delay = self.policy.backoff.delay_secs(self.s.consecutive_failures);
            self.s.status = PolicyStatus::Backoff;
            self.s.backoff_until = Some(self.now + secs(delay));
            self.s.waiting_for_target = true;
            self.s.last_error = Some(NO_TARGET.into());
            return;
        }
        self.s.spawns += 1;
        let id = format!("{}-{}", self.policy.name, self.s.spawns);
        self.actions.push(Action::Spawn {
            request_id: id.clone(),
        });
        self.s.status = PolicyStatus::Starting;
        self.s.spawn_request_id = Some(id);
        self.s.agent_id = None;
        self.s.healthy_since = None;
        self.s.last_spawn_at = Some(self.now);
        self.s.spawned_version = Some(self.facts.version.clone());
        self.s.backoff_until = None;
        self.s.waiting_for_target = false;
    }

    /// Stops the running agent gracefully, for `reason`.
    fn stop(&mut self, reason: StopReason) {
        if let Some(id) = self.s.spawn_request_id.clone() {
            self.actions.push(Action::Stop {
                request_id: id,
                graceful: true,
                timeout_ms: self.policy.stop_timeout_secs.saturating_mul(1000),
                reason: reason.describe().into(),
            });
        }
        self.s.status = PolicyStatus::Stopping;
        self.s.stop_reason = Some(reason);
        self.s.stop_requested_at = Some(self.now);
        self.s.stop_forced = false;
    }

    /// Records a failure and waits out its step of the schedule.
    fn fail(&mut self, reason: String) {
        if self.healthy_long_enough() {
            self.s.consecutive_failures = 0;
        }
        let delay = self.policy.backoff.delay_secs(self.s.consecutive_failures);
        self.s.consecutive_failures = self.s.consecutive_failures.saturating_add(1);
        self.s.status = PolicyStatus::Backoff;
        self.s.backoff_until = Some(self.now + secs(delay));
        self.s.last_error = Some(reason);
        self.s.agent_id = None;
        self.s.healthy_since = None;
        self.s.last_stop_at = Some(self.now);
        self.s.waiting_for_target = false;
    }

    fn healthy_long_enough(&self) -> bool {
        let reset = secs(self.policy.backoff.reset_after_seconds);
        self.s.healthy_since.is_some_and(|h| self.now - h >= reset)
    }

    fn update_pending(&self) -> bool {
        self.policy.restart_on_update
            && self
                .s
                .spawned_version
                .as_deref()
                .is_some_and(|v| v != self.facts.version)
    }

    /// The earliest time something can change without an event.
    fn wake_at(&self) -> Option<Millis> {
        let s = &self.s;
        let p = self.policy;
        match s.status {
            PolicyStatus::Stopped => None,
            PolicyStatus::Starting => s.last_spawn_at.map(|t| t + secs(p.spawn_timeout_secs)),
            PolicyStatus::Stopping if s.stop_forced => None,
            PolicyStatus::Stopping => s.stop_requested_at.map(|t| t + secs(p.stop_timeout_secs)),
            PolicyStatus::Backoff => s.backoff_until,
            PolicyStatus::Running => {
                let AgentFact::Alive { last_active_at, .. } = &self.facts.agent else {
                    return None;
                };
                let spawned = s.last_spawn_at.unwrap_or(self.now);
                let active = (*last_active_at).max(spawned);
                let mut due = Vec::new();
                if s.consecutive_failures > 0 {
                    due.extend(
                        s.healthy_since
                            .map(|h| h + secs(p.backoff.reset_after_seconds)),
                    );
                }
                if p.mode == PolicyMode::OnDemand && self.facts.queued_messages == 0 {
                    due.push(active + secs(p.on_demand.keepalive_seconds));
                }
                if p.scheduled_daily_restart {
                    due.push(
                        (spawned + DAILY_RESTART_AFTER_MS).max(active + DAILY_RESTART_IDLE_MS),
                    );
                }
                if self.update_pending() {
                    due.push(active + secs(p.restart_on_update_idle_secs));
                }
                due.into_iter().min()
            }
        }
    }
}

#[cfg(test)]
mod tests;
