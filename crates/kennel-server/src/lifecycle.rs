//! The lifecycle manager: keeps the agents of spawn policies alive, and carries messages to
//! and from them. Its decisions are the reconciler's (`kennel_lifecycle::reconcile`, a pure
//! function); this module gathers the facts it decides on, stores the state it returns and
//! carries out its actions through the coordinator. It is not part of the coordinator: it
//! uses the coordinator's public calls only (submit a session, cancel, hand a message over).
//!
//! - **An agent is a session task.** Spawning submits a task with a `session`; the daemon
//!   runs the agent with its stdin open. Stopping cancels the task (the daemon interrupts the
//!   agent, then kills it after the grace). The task's end is the agent's end.
//! - **Messages in**: messages queued for a running agent (to its id, `policy:<name>`, its
//!   label, tags, capabilities, channels) are sent to its daemon as `deliverMessage`, again
//!   on every pass until the daemon confirms one (`messageDelivered`, kept in the attempt's
//!   output), which marks it delivered. The daemon writes each message once.
//! - **Messages out**: each `agentMessage` (kept in the attempt's output) becomes a message
//!   from the agent, named by task, attempt and seq, so a pass that reads it again after a
//!   crash stores nothing twice.
//! - **When it runs**: on every event that can matter (a message, a task or daemon change)
//!   and at least every [`TICK_MS`]; and the sweeper's timers every second.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use kennel_clock::Clock;
use kennel_lifecycle::{
    reconcile, reconcile_retired, retire, Action, AgentFact, Facts, ManagedState,
};
use kennel_proto::agents::CommandState;
use kennel_proto::agents::{Address, RegisterAgent};
use kennel_proto::api::{CreateTask, Daemon, Task};
use kennel_proto::link::{OutputStream, SessionSpec};
use kennel_proto::policy::SpawnPolicy;
use kennel_proto::TaskStatus;
use kennel_store::{AgentStore, NewCommand, NewMessage, Spawned, Store};
use serde::{Deserialize, Serialize};

use crate::coordinator::Coordinator;

/// How often the timers run.
const SWEEP_EVERY_MS: i64 = 1_000;

/// Reconcile at least this often, events or not.
pub const TICK_MS: i64 = 1_000;

/// What is stored per policy: the reconciler's state, and the task of its current agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Kept {
    #[serde(flatten)]
    state: ManagedState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    task_id: Option<String>,
    /// The `agent.spawn` command of the current agent, until it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spawn_command: Option<String>,
    /// The `agent.shutdown` command of the current agent, until it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stop_command: Option<String>,
    /// An `agent.restart` command being carried out, until the new agent runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    restart_command: Option<String>,
}

/// What the manager remembers between passes, and loses at a restart without harm.
#[derive(Default)]
struct Memory {
    /// Per session task: the attempt and the last output seq read from it.
    read_to: HashMap<String, (u32, u64)>,
    /// Per agent: its last message in or out.
    active: HashMap<String, i64>,
}

pub struct Lifecycle {
    agents: Arc<dyn AgentStore>,
    store: Arc<dyn Store>,
    coord: Arc<Coordinator>,
    clock: Arc<dyn Clock>,
    /// The coordinator's version: a change restarts agents whose policy asks for it.
    version: String,
    memory: Mutex<Memory>,
    wake: tokio::sync::Notify,
    /// The tasks of the policies' agents: the only tasks whose events wake the manager.
    followed: Mutex<HashSet<String>>,
}

impl Lifecycle {
    pub fn new(
        agents: Arc<dyn AgentStore>,
        store: Arc<dyn Store>,
        coord: Arc<Coordinator>,
        clock: Arc<dyn Clock>,
        version: String,
    ) -> Arc<Lifecycle> {
        Arc::new(Lifecycle {
            agents,
            store,
            coord,
            clock,
            version,
            memory: Mutex::new(Memory::default()),
            wake: tokio::sync::Notify::new(),
            followed: Mutex::default(),
        })
    }

    /// Runs the manager until the process ends.
    pub async fn run(self: Arc<Self>) {
        let mut events = self.coord.subscribe_events();
        let me = self.clone();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match events.recv().await {
                    Ok(ev) if me.concerns_agents(&ev) => me.wake.notify_one(),
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => me.wake.notify_one(),
                    Err(RecvError::Closed) => return,
                }
            }
        });
        loop {
            if let Err(e) = self.pass().await {
                tracing::error!(
                    error = &*e as &dyn std::error::Error,
                    "the lifecycle manager's pass failed; trying again in a second"
                );
            }
            let tick = self.clock.sleep_until(self.clock.now_ms() + TICK_MS);
            tokio::select! {
                () = tick => {}
                () = self.wake.notified() => {}
            }
        }
    }

    /// Whether `ev` can change a decision: a message, policy or daemon change, or a change of
    /// an agent's task. Other tasks' events (most of them, under load) do not wake the
    /// manager.
    fn concerns_agents(&self, ev: &kennel_proto::api::Event) -> bool {
        let followed = self.followed.lock().unwrap_or_else(|p| p.into_inner());
        concerns_agents(ev, &followed)
    }

    /// Notes that the manager follows `task_id`, an agent's task, from now on.
    fn follow_task(&self, task_id: &str) {
        self.followed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(task_id.to_string());
    }

    /// One pass over every policy and session.
    pub async fn pass(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        // With several coordinators, the one holding the rescue lease manages every policy.
        if !self.coord.leads() {
            return Ok(());
        }
        let policies: BTreeMap<String, SpawnPolicy> = self
            .agents
            .list_policies()
            .await?
            .into_iter()
            .map(|r| (r.policy.name.clone(), r.policy))
            .collect();
        let mut kept: BTreeMap<String, Kept> = BTreeMap::new();
        for (name, state) in self.agents.policy_states().await? {
            kept.insert(name, serde_json::from_value(state).unwrap_or_default());
        }
        let idle = policies.is_empty() && kept.is_empty();
        // Without policies, nothing below reads the daemons or the commands.
        let daemons = if idle {
            Vec::new()
        } else {
            self.store.list_daemons().await?
        };
        let open = if idle {
            Vec::new()
        } else {
            self.agents.list_commands(true, 1_000).await?
        };
        let restarts: BTreeMap<String, String> = open
            .into_iter()
            .filter(|c| c.kind == "agent.restart" && c.state == CommandState::Requested)
            .filter_map(|c| Some((c.policy?, c.id)))
            .collect();
        let mut by_status: BTreeMap<&'static str, u64> = BTreeMap::new();
        let followed: HashSet<String> = kept.values().filter_map(|k| k.task_id.clone()).collect();
        *self.followed.lock().unwrap_or_else(|p| p.into_inner()) = followed;
        for (name, policy) in &policies {
            let before = kept.remove(name).unwrap_or_default();
            let restart = restarts.get(name).cloned();
            let after = self.one(policy, before, &daemons, restart, false).await?;
            *by_status.entry(after.as_str()).or_default() += 1;
        }
        for status in ["stopped", "starting", "running", "stopping", "backoff"] {
            let n = by_status.get(status).copied().unwrap_or(0);
            metrics::gauge!("kennel_policies", "status" => status).set(n as f64);
        }
        // States of deleted policies: their agents are stopped, then the state goes.
        for (name, before) in kept {
            let policy = placeholder(&name);
            self.one(&policy, before, &daemons, None, true).await?;
        }
        Ok(())
    }

    /// Reconciles one policy and carries out the decision.
    async fn one(
        &self,
        policy: &SpawnPolicy,
        before: Kept,
        daemons: &[Daemon],
        restart: Option<String>,
        retired: bool,
    ) -> Result<kennel_lifecycle::PolicyStatus, Box<dyn std::error::Error + Send + Sync>> {
        let now = self.clock.now_ms();
        let task = match &before.task_id {
            Some(id) => self.coord.task(id).await.ok(),
            None => None,
        };
        let agent_id = before.state.spawn_request_id.clone();
        if let (Some(task), Some(agent_id)) = (&task, &agent_id) {
            self.follow(policy, task, agent_id, now).await?;
        }
        // A restart asked for through the API: carried out on a running agent, refused else.
        let running = before.state.status == kennel_lifecycle::PolicyStatus::Running;
        if let (Some(id), false) = (&restart, running) {
            let why = format!(
                "the agent is not running (its policy is {}); nothing to restart",
                before.state.status.as_str()
            );
            self.advance(&Some(id.clone()), CommandState::Failed, Some(&why))
                .await;
        }
        let facts = Facts {
            agent: self.agent_fact(&before, task.as_ref()),
            queued_messages: self
                .agents
                .queued_for(&Address::Policy(policy.name.clone()))
                .await?,
            target_online: daemons.iter().any(|d| serves(d, policy)),
            version: self.version.clone(),
            restart_requested: restart.is_some() && running,
        };
        let decision = if retired {
            if before.state.status == kennel_lifecycle::PolicyStatus::Stopping {
                reconcile_retired(policy, &before.state, &facts, now)
            } else {
                retire(policy, &before.state, now)
            }
        } else {
            reconcile(policy, &before.state, &facts, now)
        };
        let mut after = Kept {
            state: decision.state.clone(),
            ..before.clone()
        };
        if facts.restart_requested {
            self.advance(&restart, CommandState::Running, None).await;
            after.restart_command = restart.clone();
        }
        if after.state.waiting_for_target {
            after.state.last_error = Some(no_target(policy));
        }
        for action in &decision.actions {
            match action {
                Action::Spawn { request_id } => match self.spawn(policy, request_id).await {
                    Ok(task) => {
                        let args = serde_json::json!({
                            "taskId": task.id, "provider": policy.provider,
                        });
                        let deadline = secs(policy.spawn_timeout_secs);
                        after.spawn_command = self
                            .command("agent.spawn", policy, request_id, args, now + deadline)
                            .await;
                        self.follow_task(&task.id);
                        after.task_id = Some(task.id);
                    }
                    Err(reason) => {
                        // Refused before any daemon saw it: a start that failed, at once.
                        tracing::warn!(policy = %policy.name, "failed to spawn the agent: {reason}");
                        let failed = Facts {
                            agent: AgentFact::SpawnFailed {
                                reason: format!("the coordinator refused its task: {reason}"),
                            },
                            ..facts.clone()
                        };
                        after.state = reconcile(policy, &after.state, &failed, now).state;
                        after.task_id = None;
                    }
                },
                Action::Stop {
                    request_id,
                    graceful,
                    timeout_ms,
                    reason,
                } => {
                    if let Some(id) = &before.task_id {
                        tracing::info!(policy = %policy.name, task_id = %id, "stopping the agent: {reason}");
                        let args = serde_json::json!({
                            "graceful": graceful, "timeoutMs": timeout_ms, "reason": reason,
                        });
                        let deadline = *timeout_ms as i64 + 5_000;
                        let command = self
                            .command("agent.shutdown", policy, request_id, args, now + deadline)
                            .await;
                        // A graceful stop lets the agent finish (its daemon pushes its work and
                        // reports the end); a forced one ends the attempt at once.
                        let stopped = match (graceful, &task) {
                            (true, Some(t)) => {
                                let grace = timeout_ms.div_ceil(1000);
                                self.coord.interrupt(t, grace).await
                            }
                            _ => self.coord.cancel(id).await.map(|_| ()),
                        };
                        match stopped {
                            Ok(()) => self.advance(&command, CommandState::Delivered, None).await,
                            Err(e) => {
                                tracing::warn!(task_id = %id, "failed to stop the agent's task: {e}");
                                let why = format!("failed to stop the agent's task: {e}");
                                self.advance(&command, CommandState::Failed, Some(&why))
                                    .await;
                            }
                        }
                        after.stop_command = command;
                    }
                }
            }
        }
        self.track_commands(&mut after, task.as_ref()).await;
        if retired && after.state.status == kennel_lifecycle::PolicyStatus::Stopped {
            self.agents.forget_policy_state(&policy.name).await?;
            return Ok(after.state.status);
        }
        if after.state.restart_count > before.state.restart_count {
            metrics::counter!("kennel_agent_restarts_total", "policy" => policy.name.clone())
                .increment(1);
        }
        if after.state.consecutive_failures > before.state.consecutive_failures {
            metrics::counter!("kennel_agent_failures_total", "policy" => policy.name.clone())
                .increment(1);
        }
        if after != before {
            // What a user watches: the status, and the counts that say how it fares.
            let changed = decision.status_changed(&before.state)
                || after.state.consecutive_failures != before.state.consecutive_failures
                || after.state.restart_count != before.state.restart_count;
            let value = serde_json::to_value(&after)?;
            let status = after.state.status.as_str();
            let saved = self
                .agents
                .save_policy_state(&policy.name, status, &value, changed, now)
                .await?;
            if changed {
                tracing::info!(
                    policy = %policy.name,
                    from = before.state.status.as_str(),
                    to = status,
                    error = after.state.last_error.as_deref().unwrap_or(""),
                    "policy state changed"
                );
            }
            self.coord.publish_events(saved.events);
        }
        Ok(after.state.status)
    }

    /// Records a command to the agent; its id, unless it could not be stored.
    async fn command(
        &self,
        kind: &str,
        policy: &SpawnPolicy,
        target: &str,
        args: serde_json::Value,
        deadline_at: i64,
    ) -> Option<String> {
        let c = NewCommand {
            id: format!("c-{}", crate::ids::time_ordered()),
            kind: kind.to_string(),
            policy: Some(policy.name.clone()),
            target: target.to_string(),
            args,
            deadline_at,
        };
        match self.agents.create_command(&c, self.clock.now_ms()).await {
            Ok(done) => {
                self.coord.publish_events(done.events);
                Some(c.id)
            }
            Err(e) => {
                tracing::error!(
                    error = &e as &dyn std::error::Error,
                    "failed to record a command"
                );
                None
            }
        }
    }

    /// Moves a command on, if there is one and the move is allowed.
    async fn advance(&self, id: &Option<String>, next: CommandState, error: Option<&str>) {
        let Some(id) = id else {
            return;
        };
        match self
            .agents
            .advance_command(id, next, error, self.clock.now_ms())
            .await
        {
            Ok(done) => self.coord.publish_events(done.events),
            Err(e) => tracing::error!(
                error = &e as &dyn std::error::Error,
                "failed to update a command"
            ),
        }
    }

    /// Moves the agent's open commands along with its task: a spawn is delivered once the task
    /// is dispatched and succeeds once the agent runs, or fails with the policy's reason; a
    /// shutdown succeeds once the task ended.
    async fn track_commands(&self, kept: &mut Kept, task: Option<&Task>) {
        use kennel_lifecycle::PolicyStatus as P;
        if kept.spawn_command.is_some() {
            let status = task.map(|t| t.status);
            if matches!(status, Some(TaskStatus::Dispatched)) {
                self.advance(&kept.spawn_command, CommandState::Delivered, None)
                    .await;
            }
            match kept.state.status {
                P::Running | P::Stopping => {
                    self.advance(&kept.spawn_command, CommandState::Running, None)
                        .await;
                    self.advance(&kept.spawn_command, CommandState::Succeeded, None)
                        .await;
                    kept.spawn_command = None;
                }
                P::Backoff | P::Stopped => {
                    let why = kept.state.last_error.clone();
                    self.advance(&kept.spawn_command, CommandState::Failed, why.as_deref())
                        .await;
                    kept.spawn_command = None;
                }
                P::Starting => {}
            }
        }
        if kept.restart_command.is_some() {
            match kept.state.status {
                P::Running if kept.spawn_command.is_none() && kept.stop_command.is_none() => {
                    self.advance(&kept.restart_command, CommandState::Succeeded, None)
                        .await;
                    kept.restart_command = None;
                }
                P::Backoff | P::Stopped => {
                    let why = kept.state.last_error.clone();
                    self.advance(&kept.restart_command, CommandState::Failed, why.as_deref())
                        .await;
                    kept.restart_command = None;
                }
                _ => {}
            }
        }
        if kept.stop_command.is_some() && task.is_none_or(|t| t.status.is_terminal()) {
            self.advance(&kept.stop_command, CommandState::Succeeded, None)
                .await;
            kept.stop_command = None;
        }
    }

    /// What the reconciler knows of the current agent, from its task.
    fn agent_fact(&self, kept: &Kept, task: Option<&Task>) -> AgentFact {
        let Some(task) = task else {
            return AgentFact::Unknown;
        };
        let agent_id = kept.state.spawn_request_id.clone().unwrap_or_default();
        match task.status {
            TaskStatus::Queued | TaskStatus::Dispatched => AgentFact::Unknown,
            TaskStatus::Running | TaskStatus::Paused => {
                let active = self.memory().active.get(&agent_id).copied();
                let started = kept.state.last_spawn_at.unwrap_or(0);
                AgentFact::Alive {
                    agent_id,
                    last_active_at: active.unwrap_or(started),
                }
            }
            _ => {
                let reason = match (&task.error, task.exit_code) {
                    (Some(e), _) => e.clone(),
                    (None, Some(code)) => format!("it exited with status {code}"),
                    (None, None) => format!("its task ended {}", task.status),
                };
                if kept.state.status == kennel_lifecycle::PolicyStatus::Starting {
                    AgentFact::SpawnFailed { reason }
                } else {
                    AgentFact::Gone { reason }
                }
            }
        }
    }

    /// Submits the session task of a new agent.
    async fn spawn(&self, policy: &SpawnPolicy, request_id: &str) -> Result<Task, String> {
        let mut env = policy.env.clone();
        env.insert("KENNEL_AGENT_ID".into(), request_id.to_string());
        env.insert("KENNEL_POLICY".into(), policy.name.clone());
        let req = CreateTask {
            name: format!("agent {}", policy.name),
            prompt: policy.prompt.clone().unwrap_or_default(),
            repo: policy.repo.clone(),
            agent: Some(policy.provider.clone()),
            labels: policy.target.labels.clone(),
            env,
            max_attempts: Some(1),
            ..CreateTask::default()
        };
        let session = SessionSpec {
            policy: policy.name.clone(),
            agent_id: request_id.to_string(),
        };
        self.coord
            .submit_session(req, session)
            .await
            .map_err(|e| e.message)
    }

    /// Follows a session task: registers its agent once it runs, hands it its messages, stores
    /// what it said, and marks it offline once it ended.
    async fn follow(
        &self,
        policy: &SpawnPolicy,
        task: &Task,
        agent_id: &str,
        now: i64,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let running = matches!(task.status, TaskStatus::Running | TaskStatus::Paused);
        let registered = self.agents.get_agent(agent_id).await?;
        if running && registered.as_ref().is_none_or(|a| !a.online) {
            let reg = RegisterAgent {
                id: agent_id.to_string(),
                name: format!("{} ({})", policy.name, policy.provider),
                machine: task.daemon_id.clone().unwrap_or_else(|| "unknown".into()),
                instance_id: format!("{}.{}", task.id, task.attempt),
                label: policy.label.clone(),
                tags: policy.tags.clone(),
                capabilities: policy.capabilities.clone(),
                channels: Vec::new(),
            };
            let spawned = Spawned {
                daemon_id: task.daemon_id.clone().unwrap_or_default(),
                policy: policy.name.clone(),
                spawn_request_id: agent_id.to_string(),
            };
            let done = self
                .agents
                .register_agent(&reg, Some(&spawned), None, now)
                .await?;
            self.coord.publish_events(done.events);
            self.memory().active.insert(agent_id.to_string(), now);
        }
        self.read_output(task, agent_id, now).await?;
        if running {
            for m in self.agents.pending_for(agent_id, 100).await? {
                if let Err(e) = self
                    .coord
                    .deliver_to_session(task, &m.id, &m.from, &m.body)
                    .await
                {
                    tracing::debug!(task_id = %task.id, "message not handed over yet: {e}");
                    break;
                }
            }
        } else if task.status.is_terminal() && registered.is_some_and(|a| a.online) {
            let why = task
                .error
                .clone()
                .unwrap_or_else(|| format!("its task {}", task.status));
            let done = self.agents.agent_offline(agent_id, &why, now).await?;
            self.coord.publish_events(done.events);
        }
        Ok(())
    }

    /// Reads what the session's attempt reported since the last pass: deliveries and answers.
    async fn read_output(
        &self,
        task: &Task,
        agent_id: &str,
        now: i64,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if task.attempt == 0 {
            return Ok(());
        }
        let after = match self.memory().read_to.get(&task.id) {
            Some((attempt, seq)) if *attempt == task.attempt => *seq,
            _ => 0,
        };
        let chunks = self
            .store
            .task_output(&task.id, task.attempt, after, 1_000)
            .await?;
        let mut last = after;
        for c in chunks {
            last = last.max(c.seq);
            match c.stream {
                OutputStream::Delivered => {
                    let done = self.agents.mark_delivered(&c.output, agent_id, now).await?;
                    self.coord.publish_events(done.events);
                    self.memory().active.insert(agent_id.to_string(), now);
                }
                OutputStream::Message => {
                    let said: Said = serde_json::from_str(&c.output).unwrap_or_default();
                    let to = said
                        .to
                        .as_deref()
                        .and_then(|t| Address::parse(t).ok())
                        .unwrap_or_else(|| Address::Agent("user".into()));
                    let message = NewMessage {
                        id: format!("r-{}-{}-{}", task.id, task.attempt, c.seq),
                        from: agent_id.to_string(),
                        to,
                        kind: "chat".into(),
                        subject: None,
                        body: said.body,
                        payload: None,
                        idempotency_key: Some(format!("{}.{}.{}", task.id, task.attempt, c.seq)),
                        claimable: false,
                        expires_at: None,
                        reply_to: said.in_reply_to,
                    };
                    let sent = self.agents.send_message(&message, now).await?;
                    self.coord.publish_events(sent.events);
                    self.agents.agent_active(agent_id, now).await?;
                    self.memory().active.insert(agent_id.to_string(), now);
                }
                _ => {}
            }
        }
        self.memory()
            .read_to
            .insert(task.id.clone(), (task.attempt, last));
        Ok(())
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An `agentMessage` as its output chunk keeps it.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Said {
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    in_reply_to: Option<String>,
    #[serde(default)]
    body: String,
}

fn secs(s: u64) -> i64 {
    i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// Whether `ev` can change a policy's decision, the agents' tasks being `followed`.
fn concerns_agents(ev: &kennel_proto::api::Event, followed: &HashSet<String>) -> bool {
    let kind = ev.kind.as_str();
    if kind.starts_with("task.") {
        return ev.task_id.as_ref().is_some_and(|t| followed.contains(t));
    }
    kind.starts_with("message.") || kind.starts_with("policy.") || kind.starts_with("daemon.")
}

/// Why no daemon can take `policy`'s agent, with what the policy asks for.
fn no_target(policy: &SpawnPolicy) -> String {
    let mut wants = format!("agent profile `{}`", policy.provider);
    if !policy.target.labels.is_empty() {
        let labels: Vec<String> = policy
            .target
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        wants.push_str(&format!(" and labels {}", labels.join(",")));
    }
    format!(
        "no online daemon offers {wants}; a daemon leaves out a profile whose program it \
         cannot find (its log says why; `kennel daemons` lists what each offers)"
    )
}

/// Whether daemon `d` can run `policy`'s agent now.
fn serves(d: &Daemon, policy: &SpawnPolicy) -> bool {
    d.connected
        && !d.draining
        && d.agents.iter().any(|a| a == &policy.provider)
        && policy
            .target
            .labels
            .iter()
            .all(|(k, v)| d.labels.get(k) == Some(v))
}

/// The stand-in for a deleted policy while its agent stops: only its name and timeouts count.
fn placeholder(name: &str) -> SpawnPolicy {
    SpawnPolicy {
        name: name.to_string(),
        target: Default::default(),
        provider: "command".into(),
        repo: None,
        label: None,
        tags: Vec::new(),
        capabilities: Vec::new(),
        permission_mode: None,
        provider_args: Vec::new(),
        prompt: None,
        env: BTreeMap::new(),
        mode: kennel_proto::policy::PolicyMode::OnDemand,
        on_demand: Default::default(),
        backoff: Default::default(),
        restart_on_update: false,
        restart_on_update_idle_secs: 60,
        scheduled_daily_restart: false,
        spawn_timeout_secs: 120,
        stop_timeout_secs: 10,
    }
}

/// Runs the timers until the process ends; `stale_after_ms` is `server.agents.stale_after`.
pub async fn run_sweeper(
    agents: Arc<dyn AgentStore>,
    coord: Arc<Coordinator>,
    clock: Arc<dyn Clock>,
    stale_after_ms: i64,
) {
    loop {
        clock
            .sleep_until(clock.now_ms().saturating_add(SWEEP_EVERY_MS))
            .await;
        sweep(agents.as_ref(), &coord, clock.now_ms(), stale_after_ms).await;
    }
}

/// One pass of the timers at `now`: unread messages past their time to live expire, claims
/// that ran out are released, agents that stopped heartbeating go offline, commands past
/// their deadline expire. Each is one conditional statement, so several coordinators running
/// it at once do each change once.
pub async fn sweep(agents: &dyn AgentStore, coord: &Coordinator, now: i64, stale_after_ms: i64) {
    let report = |what: &str, e: &kennel_store::StoreError| {
        tracing::error!(
            error = e as &dyn std::error::Error,
            "failed to {what}; retrying in a second"
        );
    };
    match agents.expire_messages(now).await {
        Ok(c) => coord.publish_events(c.events),
        Err(e) => report("expire messages", &e),
    }
    match agents.release_expired_claims(now).await {
        Ok(c) => coord.publish_events(c.events),
        Err(e) => report("release expired claims", &e),
    }
    match agents.mark_stale_agents(now - stale_after_ms, now).await {
        Ok(c) => coord.publish_events(c.events),
        Err(e) => report("mark silent agents offline", &e),
    }
    match agents.expire_commands(now).await {
        Ok(c) => coord.publish_events(c.events),
        Err(e) => report("expire commands", &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, task: Option<&str>) -> kennel_proto::api::Event {
        kennel_proto::api::Event {
            id: 1,
            kind: kind.into(),
            task_id: task.map(String::from),
            daemon_id: None,
            data: serde_json::Value::Null,
            at: String::new(),
        }
    }

    #[test]
    fn only_the_agents_tasks_among_task_events_wake_the_manager() {
        let followed: HashSet<String> = ["t-agent".to_string()].into();
        for kind in ["task.created", "task.status", "task.waiting"] {
            assert!(concerns_agents(&event(kind, Some("t-agent")), &followed));
            assert!(!concerns_agents(&event(kind, Some("t-other")), &followed));
            assert!(!concerns_agents(&event(kind, None), &followed));
        }
        for kind in [
            "message.available",
            "policy.updated",
            "daemon.connected",
            "daemon.disconnected",
        ] {
            assert!(concerns_agents(&event(kind, None), &followed), "{kind}");
        }
        assert!(!concerns_agents(&event("key.revoked", None), &followed));
    }
}
