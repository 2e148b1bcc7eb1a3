//! The lifecycle manager's timers: what runs out on its own in the agents' state. Every
//! second it expires unread messages past their time to live, releases claims that ran out,
//! marks agents that stopped heartbeating offline, and expires commands past their deadline,
//! publishing what each recorded. Each is one conditional statement, so several coordinators
//! running it at once do each change once.

use std::sync::Arc;

use kennel_clock::Clock;
use kennel_store::AgentStore;

use crate::coordinator::Coordinator;

/// How often the timers run.
const SWEEP_EVERY_MS: i64 = 1_000;

/// An agent that registered itself and sent no heartbeat for this long is offline.
pub const AGENT_STALE_AFTER_MS: i64 = 60_000;

/// Runs the timers until the process ends.
pub async fn run_sweeper(
    agents: Arc<dyn AgentStore>,
    coord: Arc<Coordinator>,
    clock: Arc<dyn Clock>,
) {
    loop {
        clock
            .sleep_until(clock.now_ms().saturating_add(SWEEP_EVERY_MS))
            .await;
        sweep(agents.as_ref(), &coord, clock.now_ms()).await;
    }
}

/// One pass of the timers at `now`.
pub async fn sweep(agents: &dyn AgentStore, coord: &Coordinator, now: i64) {
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
    match agents
        .mark_stale_agents(now - AGENT_STALE_AFTER_MS, now)
        .await
    {
        Ok(c) => coord.publish_events(c.events),
        Err(e) => report("mark silent agents offline", &e),
    }
    match agents.expire_commands(now).await {
        Ok(c) => coord.publish_events(c.events),
        Err(e) => report("expire commands", &e),
    }
}
