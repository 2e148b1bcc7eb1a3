//! Every transition of the reconciler, on a manual clock: time is a number the test moves.

use super::*;
use kennel_proto::policy::{Backoff, SpawnPolicy};

const T0: Millis = 1_800_000_000_000;
const S: Millis = 1_000;

fn policy(mode: &str) -> SpawnPolicy {
    serde_json::from_value(serde_json::json!({
        "name": "reviewer",
        "provider": "claude",
        "mode": mode,
        "onDemand": { "keepaliveSeconds": 300 },
        "backoff": { "schedule": [1, 5, 30], "resetAfterSeconds": 600 },
        "spawnTimeoutSecs": 60,
        "stopTimeoutSecs": 10,
    }))
    .expect("a valid policy")
}

fn facts() -> Facts {
    Facts {
        agent: AgentFact::Unknown,
        queued_messages: 0,
        target_online: true,
        version: "1.0.0".into(),
        restart_requested: false,
    }
}

fn alive(last_active_at: Millis) -> AgentFact {
    AgentFact::Alive {
        agent_id: "agent-1".into(),
        last_active_at,
    }
}

fn gone(reason: &str) -> AgentFact {
    AgentFact::Gone {
        reason: reason.into(),
    }
}

/// A policy under test: its state moves through each reconcile, like the manager keeps it.
struct Sim {
    policy: SpawnPolicy,
    state: ManagedState,
    facts: Facts,
    now: Millis,
}

impl Sim {
    fn new(mode: &str) -> Sim {
        Sim {
            policy: policy(mode),
            state: ManagedState::default(),
            facts: facts(),
            now: T0,
        }
    }

    /// Reconciles at the current time; returns the actions.
    fn step(&mut self) -> Vec<Action> {
        let d = reconcile(&self.policy, &self.state, &self.facts, self.now);
        self.state = d.state;
        d.actions
    }

    fn at(&mut self, now: Millis) -> Vec<Action> {
        self.now = now;
        self.step()
    }

    fn wake(&self) -> Option<Millis> {
        reconcile(&self.policy, &self.state, &self.facts, self.now).wake_at
    }

    fn status(&self) -> PolicyStatus {
        self.state.status
    }

    /// Spawns and registers an agent at `now`: the policy is running.
    fn run(&mut self, now: Millis) {
        self.facts.agent = AgentFact::Unknown;
        let spawned = self.at(now);
        assert!(matches!(spawned[..], [Action::Spawn { .. }]), "{spawned:?}");
        self.facts.agent = alive(now);
        assert!(self.step().is_empty());
        assert_eq!(self.status(), PolicyStatus::Running);
    }
}

fn spawn(id: &str) -> Action {
    Action::Spawn {
        request_id: id.into(),
    }
}

fn is_stop(actions: &[Action], graceful: bool) -> bool {
    matches!(actions, [Action::Stop { graceful: g, .. }] if *g == graceful)
}

#[test]
fn an_always_on_policy_spawns_at_once_and_runs_once_its_agent_registers() {
    let mut sim = Sim::new("always-on");
    assert_eq!(sim.step(), [spawn("reviewer-1")]);
    assert_eq!(sim.status(), PolicyStatus::Starting);
    assert_eq!(sim.state.last_spawn_at, Some(T0));
    assert_eq!(sim.state.spawned_version.as_deref(), Some("1.0.0"));
    // Nothing more until it registers or its start times out.
    assert!(sim.at(T0 + 10 * S).is_empty());
    assert_eq!(sim.wake(), Some(T0 + 60 * S));

    sim.facts.agent = alive(T0 + 12 * S);
    assert!(sim.at(T0 + 12 * S).is_empty());
    assert_eq!(sim.status(), PolicyStatus::Running);
    assert_eq!(sim.state.agent_id.as_deref(), Some("agent-1"));
    assert_eq!(sim.state.healthy_since, Some(T0 + 12 * S));
    // A healthy always-on agent with no failures behind it needs no tick.
    assert_eq!(sim.wake(), None);
}

#[test]
fn an_on_demand_policy_waits_stopped_until_a_message_is_queued_for_it() {
    let mut sim = Sim::new("on-demand");
    assert!(sim.step().is_empty());
    assert_eq!(sim.status(), PolicyStatus::Stopped);
    assert_eq!(sim.wake(), None);

    sim.facts.queued_messages = 1;
    assert_eq!(sim.at(T0 + S), [spawn("reviewer-1")]);
    assert_eq!(sim.status(), PolicyStatus::Starting);
}

#[test]
fn a_start_that_never_registers_times_out_into_backoff_with_the_reason() {
    let mut sim = Sim::new("always-on");
    sim.step();
    assert!(sim.at(T0 + 60 * S - 1).is_empty());
    let actions = sim.at(T0 + 60 * S);
    // Whatever the daemon started is killed, so a late registration cannot run twice.
    assert!(is_stop(&actions, false), "{actions:?}");
    assert_eq!(sim.status(), PolicyStatus::Backoff);
    assert_eq!(sim.state.consecutive_failures, 1);
    assert_eq!(sim.state.backoff_until, Some(T0 + 61 * S));
    let err = sim.state.last_error.clone().unwrap_or_default();
    assert!(
        err.contains("did not register within spawnTimeoutSecs (60s)"),
        "{err}"
    );
}

#[test]
fn a_spawn_the_daemon_cannot_start_says_why_in_the_state() {
    let mut sim = Sim::new("always-on");
    sim.step();
    sim.facts.agent = AgentFact::SpawnFailed {
        reason: "agent binary `claude` not found on PATH".into(),
    };
    assert!(sim.at(T0 + S).is_empty());
    assert_eq!(sim.status(), PolicyStatus::Backoff);
    let err = sim.state.last_error.clone().unwrap_or_default();
    assert!(
        err.contains("could not start the agent") && err.contains("`claude` not found"),
        "{err}"
    );

    // Exiting before registering is a failure too.
    let mut sim = Sim::new("always-on");
    sim.step();
    sim.facts.agent = gone("exit status 2");
    sim.at(T0 + S);
    assert_eq!(sim.status(), PolicyStatus::Backoff);
    let err = sim.state.last_error.clone().unwrap_or_default();
    assert!(
        err.contains("exited before it registered: exit status 2"),
        "{err}"
    );
}

#[test]
fn a_killed_agent_is_respawned_after_each_step_of_the_schedule_and_the_last_step_repeats() {
    let mut sim = Sim::new("always-on");
    let mut now = T0;
    sim.run(now);
    let mut waits = Vec::new();
    for _ in 0..4 {
        now += 10 * S;
        sim.facts.agent = gone("killed by signal 9");
        assert!(sim.at(now).is_empty());
        assert_eq!(sim.status(), PolicyStatus::Backoff);
        let until = sim.state.backoff_until.expect("a backoff deadline");
        waits.push((until - now) / S);
        assert_eq!(sim.wake(), Some(until));
        // Not before the deadline...
        assert!(sim.at(until - 1).is_empty());
        // ...and at it, a new spawn with a new request id.
        now = until;
        sim.facts.agent = AgentFact::Unknown;
        let actions = sim.at(now);
        assert_eq!(actions, [spawn(&format!("reviewer-{}", sim.state.spawns))]);
        sim.facts.agent = alive(now);
        sim.step();
    }
    assert_eq!(waits, [1, 5, 30, 30]);
    assert_eq!(sim.state.consecutive_failures, 4);
    assert_eq!(sim.state.spawns, 5);
    assert!(sim
        .state
        .last_error
        .as_deref()
        .unwrap_or_default()
        .contains("signal 9"));
}

#[test]
fn failures_reset_after_a_healthy_run_of_reset_after_seconds() {
    // Reset seen by a tick while running.
    let mut sim = Sim::new("always-on");
    sim.state.consecutive_failures = 2;
    sim.run(T0);
    assert_eq!(sim.wake(), Some(T0 + 600 * S));
    sim.at(T0 + 600 * S - 1);
    assert_eq!(sim.state.consecutive_failures, 2);
    sim.at(T0 + 600 * S);
    assert_eq!(sim.state.consecutive_failures, 0);
    sim.facts.agent = gone("exit status 1");
    sim.at(T0 + 700 * S);
    assert_eq!(
        sim.state.backoff_until,
        Some(T0 + 701 * S),
        "back to the first step"
    );

    // Reset decided at the failure itself, when no tick came in between.
    let mut sim = Sim::new("always-on");
    sim.state.consecutive_failures = 2;
    sim.run(T0);
    sim.facts.agent = gone("exit status 1");
    sim.at(T0 + 900 * S);
    assert_eq!(sim.state.consecutive_failures, 1);
    assert_eq!(sim.state.backoff_until, Some(T0 + 901 * S));

    // A short run does not reset.
    let mut sim = Sim::new("always-on");
    sim.state.consecutive_failures = 2;
    sim.run(T0);
    sim.facts.agent = gone("exit status 1");
    sim.at(T0 + 599 * S);
    assert_eq!(sim.state.consecutive_failures, 3);
    assert_eq!(sim.state.backoff_until, Some(T0 + 629 * S));
}

#[test]
fn with_no_daemon_for_the_target_it_waits_in_backoff_and_spawns_as_soon_as_one_is_back() {
    let mut sim = Sim::new("always-on");
    sim.facts.target_online = false;
    assert!(sim.step().is_empty());
    assert_eq!(sim.status(), PolicyStatus::Backoff);
    assert_eq!(sim.state.last_error.as_deref(), Some(NO_TARGET));
    assert_eq!(sim.state.consecutive_failures, 0, "not the agent's failure");
    // Still offline at the deadline: another wait.
    let until = sim.state.backoff_until.expect("deadline");
    assert!(sim.at(until).is_empty());
    assert_eq!(sim.status(), PolicyStatus::Backoff);

    // The daemon is back: spawned at once, without waiting out the backoff.
    sim.facts.target_online = true;
    assert_eq!(sim.at(until + 1), [spawn("reviewer-1")]);
    assert_eq!(sim.status(), PolicyStatus::Starting);

    // An on-demand policy whose messages are gone stops waiting.
    let mut sim = Sim::new("on-demand");
    sim.facts.target_online = false;
    sim.facts.queued_messages = 1;
    sim.step();
    assert_eq!(sim.status(), PolicyStatus::Backoff);
    sim.facts.queued_messages = 0;
    sim.at(T0 + S);
    assert_eq!(sim.status(), PolicyStatus::Stopped);
}

#[test]
fn after_a_failure_the_backoff_ends_in_a_spawn_only_if_the_agent_is_still_wanted() {
    let mut sim = Sim::new("on-demand");
    sim.facts.queued_messages = 1;
    sim.run(T0);
    sim.facts.agent = gone("exit status 1");
    sim.at(T0 + 5 * S);
    assert_eq!(sim.status(), PolicyStatus::Backoff);
    // The message was taken meanwhile: nothing to spawn for.
    sim.facts.queued_messages = 0;
    sim.facts.agent = AgentFact::Unknown;
    assert!(sim.at(T0 + 6 * S).is_empty());
    assert_eq!(sim.status(), PolicyStatus::Stopped);
    // A new message: spawned at once.
    sim.facts.queued_messages = 1;
    assert_eq!(sim.at(T0 + 7 * S), [spawn("reviewer-2")]);
}

#[test]
fn an_idle_on_demand_agent_is_stopped_after_its_keepalive_and_activity_or_mail_keeps_it() {
    let mut sim = Sim::new("on-demand");
    sim.facts.queued_messages = 1;
    sim.run(T0);
    // Delivered: nothing queued any more; its last activity counts from there.
    sim.facts.queued_messages = 0;
    sim.facts.agent = alive(T0 + 100 * S);
    assert!(sim.at(T0 + 200 * S).is_empty());
    assert_eq!(sim.wake(), Some(T0 + 400 * S));
    assert!(sim.at(T0 + 400 * S - 1).is_empty());
    // Mail waiting for it keeps it up however idle it is.
    sim.facts.queued_messages = 1;
    assert!(sim.at(T0 + 500 * S).is_empty());
    sim.facts.queued_messages = 0;
    let actions = sim.at(T0 + 500 * S);
    assert!(is_stop(&actions, true), "{actions:?}");
    let Action::Stop {
        timeout_ms, reason, ..
    } = &actions[0]
    else {
        unreachable!()
    };
    assert_eq!(*timeout_ms, 10_000);
    assert!(reason.contains("idle"), "{reason}");
    assert_eq!(sim.status(), PolicyStatus::Stopping);

    // Gone: stopped, no failure counted, no respawn.
    sim.facts.agent = gone("stopped");
    assert!(sim.at(T0 + 502 * S).is_empty());
    assert_eq!(sim.status(), PolicyStatus::Stopped);
    assert_eq!(sim.state.consecutive_failures, 0);
    assert_eq!(sim.state.last_stop_at, Some(T0 + 502 * S));

    // An always-on agent is never stopped for idling.
    let mut sim = Sim::new("always-on");
    sim.run(T0);
    assert!(sim.at(T0 + 10_000 * S).is_empty());
    assert_eq!(sim.status(), PolicyStatus::Running);
}

#[test]
fn a_message_that_arrives_while_the_agent_stops_spawns_it_again() {
    let mut sim = Sim::new("on-demand");
    sim.facts.queued_messages = 1;
    sim.run(T0);
    sim.facts.queued_messages = 0;
    sim.at(T0 + 300 * S);
    assert_eq!(sim.status(), PolicyStatus::Stopping);
    sim.facts.queued_messages = 1;
    sim.facts.agent = gone("stopped");
    assert_eq!(sim.at(T0 + 301 * S), [spawn("reviewer-2")]);
}

#[test]
fn an_agent_that_ignores_a_graceful_stop_is_killed_once_the_stop_timeout_runs_out() {
    let mut sim = Sim::new("on-demand");
    sim.facts.queued_messages = 1;
    sim.run(T0);
    sim.facts.queued_messages = 0;
    sim.at(T0 + 300 * S);
    assert_eq!(sim.wake(), Some(T0 + 310 * S));
    assert!(sim.at(T0 + 310 * S - 1).is_empty());
    let actions = sim.at(T0 + 310 * S);
    assert!(is_stop(&actions, false), "{actions:?}");
    assert!(sim.state.stop_forced);
    // Killed once, not on every tick.
    assert!(sim.at(T0 + 320 * S).is_empty());
    assert_eq!(sim.wake(), None);
}

#[test]
fn the_daily_restart_waits_for_24_hours_and_an_idle_hour_then_starts_a_new_agent() {
    let mut sim = Sim::new("always-on");
    sim.policy.scheduled_daily_restart = true;
    sim.run(T0);
    let day = DAILY_RESTART_AFTER_MS;
    // Busy at the 24th hour: not yet.
    sim.facts.agent = alive(T0 + day - 10 * S);
    assert!(sim.at(T0 + day).is_empty());
    assert_eq!(sim.wake(), Some(T0 + day - 10 * S + DAILY_RESTART_IDLE_MS));
    let actions = sim.at(T0 + day - 10 * S + DAILY_RESTART_IDLE_MS);
    assert!(is_stop(&actions, true), "{actions:?}");
    sim.facts.agent = gone("stopped");
    let now = T0 + day + 2 * DAILY_RESTART_IDLE_MS;
    assert_eq!(sim.at(now), [spawn("reviewer-2")]);
    assert_eq!(sim.state.restart_count, 1);
    assert_eq!(sim.state.consecutive_failures, 0);
}

#[test]
fn a_new_coordinator_version_restarts_the_agent_once_it_is_idle_for_a_minute() {
    let mut sim = Sim::new("always-on");
    sim.policy.restart_on_update = true;
    sim.run(T0);
    sim.facts.version = "1.1.0".into();
    sim.facts.agent = alive(T0 + 100 * S);
    assert!(sim.at(T0 + 120 * S).is_empty());
    assert_eq!(sim.wake(), Some(T0 + 160 * S));
    let actions = sim.at(T0 + 160 * S);
    assert!(is_stop(&actions, true), "{actions:?}");
    sim.facts.agent = gone("stopped");
    assert_eq!(sim.at(T0 + 161 * S), [spawn("reviewer-2")]);
    assert_eq!(sim.state.spawned_version.as_deref(), Some("1.1.0"));
    assert_eq!(sim.state.restart_count, 1);

    // Without restartOnUpdate the agent keeps running.
    let mut sim = Sim::new("always-on");
    sim.run(T0);
    sim.facts.version = "1.1.0".into();
    assert!(sim.at(T0 + 3600 * S).is_empty());
    assert_eq!(sim.status(), PolicyStatus::Running);
}

#[test]
fn a_deleted_policy_stops_its_agent_and_never_spawns_again() {
    let mut sim = Sim::new("always-on");
    sim.run(T0);
    let d = retire(&sim.policy, &sim.state, T0 + S);
    assert!(is_stop(&d.actions, true), "{:?}", d.actions);
    assert_eq!(d.state.status, PolicyStatus::Stopping);
    assert_eq!(d.wake_at, Some(T0 + 11 * S));
    let d = reconcile_retired(&sim.policy, &d.state, &sim.facts, T0 + 11 * S);
    assert!(is_stop(&d.actions, false), "killed after the stop timeout");
    sim.facts.agent = gone("killed");
    let d = reconcile_retired(&sim.policy, &d.state, &sim.facts, T0 + 12 * S);
    assert!(
        d.actions.is_empty(),
        "an always-on policy that is deleted is not respawned"
    );
    assert_eq!(d.state.status, PolicyStatus::Stopped);

    // Nothing running: stopped at once, whatever it was waiting for.
    let mut sim = Sim::new("always-on");
    sim.facts.target_online = false;
    sim.step();
    let d = retire(&sim.policy, &sim.state, T0 + S);
    assert!(d.actions.is_empty());
    assert_eq!(d.state.status, PolicyStatus::Stopped);
    assert_eq!(d.wake_at, None);
}

#[test]
fn a_running_agent_that_is_no_longer_registered_counts_as_gone() {
    let mut sim = Sim::new("always-on");
    sim.run(T0);
    sim.facts.agent = AgentFact::Unknown;
    sim.at(T0 + S);
    assert_eq!(sim.status(), PolicyStatus::Backoff);
    assert!(sim
        .state
        .last_error
        .as_deref()
        .unwrap_or_default()
        .contains("no longer registered"));
}

#[test]
fn the_same_inputs_give_the_same_decision_and_a_settled_policy_does_nothing() {
    let mut sim = Sim::new("always-on");
    sim.run(T0);
    let a = reconcile(&sim.policy, &sim.state, &sim.facts, T0 + 5 * S);
    let b = reconcile(&sim.policy, &sim.state, &sim.facts, T0 + 5 * S);
    assert_eq!(a, b);
    assert!(a.actions.is_empty());
    assert!(!a.status_changed(&sim.state));
    assert_eq!(a.state, sim.state);
}

#[test]
fn the_state_round_trips_through_json_for_the_store() {
    let mut sim = Sim::new("always-on");
    sim.policy.backoff = Backoff {
        schedule: vec![3],
        reset_after_seconds: 60,
    };
    sim.run(T0);
    sim.facts.agent = gone("exit status 1");
    sim.at(T0 + S);
    let json = serde_json::to_string(&sim.state).expect("encode");
    assert!(json.contains("\"status\":\"backoff\""), "{json}");
    let back: ManagedState = serde_json::from_str(&json).expect("decode");
    assert_eq!(back, sim.state);
}

#[test]
fn a_requested_restart_stops_the_running_agent_and_starts_a_new_one_at_once() {
    let mut sim = Sim::new("always-on");
    sim.run(T0);
    sim.facts.restart_requested = true;
    let actions = sim.at(T0 + S);
    assert!(is_stop(&actions, true), "{actions:?}");
    let Action::Stop { reason, .. } = &actions[0] else {
        unreachable!()
    };
    assert!(reason.contains("restart requested"), "{reason}");
    sim.facts.agent = gone("stopped");
    assert_eq!(sim.at(T0 + 2 * S), [spawn("reviewer-2")]);
    assert_eq!(sim.state.restart_count, 1);
    assert_eq!(
        sim.state.consecutive_failures, 0,
        "a restart is not a failure"
    );
}
