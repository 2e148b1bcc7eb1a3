//! Spawn policies keeping real agents alive on the real daemon: an on-demand agent started by
//! a message and stopped when idle, an always-on agent killed and restarted after its backoff,
//! a policy waiting for a daemon that can take it, a start that never registers, an agent that
//! exits at once, a coordinator killed mid-conversation, and the real Claude Code CLI as a
//! session agent. Synchronised on the event stream, never on sleeps.

use std::time::Duration;

use kennel_proto::agents::{
    Agent, Command, CommandState, InboxPage, Message, MessageState, RegisterAgent,
};
use kennel_proto::api::Scope;
use kennel_testkit::sse::{EventStream, SseMsg};
use kennel_testkit::{Api, KennelDaemon, KennelServer, ScriptedAnthropic};

use crate::{bin, server};

/// A shell agent's process start, a daemon's first connection: slow on a loaded machine.
const SLOW: Duration = Duration::from_secs(60);

/// A daemon offering `echoer` (each stdin line back as `echo: LINE`, a reply per line),
/// `quitter` (exits at once, saying why on stderr) and `sleeper` (holds its slot).
fn daemon_config(marker: &str, extra: &str) -> String {
    format!(
        r#"
[daemon]
max_concurrent_tasks = 2
interrupt_grace = "1s"
{extra}

[daemon.agents.echoer]
kind = "command"
command = ["sh", "-c", "while IFS= read -r line; do echo \"echo: $line\"; done # {marker}"]

[daemon.agents.quitter]
kind = "command"
command = ["sh", "-c", "echo 'cannot start: no config' >&2; exit 3"]

[daemon.agents.sleeper]
kind = "command"
command = ["sleep", "600"]
"#
    )
}

async fn events(srv: &KennelServer) -> anyhow::Result<EventStream> {
    EventStream::connect(
        &format!("{}/api/v1/events", srv.url()),
        Some(srv.admin_key()),
        None,
    )
    .await
}

/// Waits for `policy` to reach `status`; returns its state then.
async fn wait_policy(
    events: &mut EventStream,
    policy: &str,
    status: &str,
) -> anyhow::Result<serde_json::Value> {
    let m = events
        .wait_for(SLOW, |m| {
            m.event == "policy.state.changed"
                && m.json()
                    .is_ok_and(|v| v["data"]["policy"] == policy && v["data"]["status"] == status)
        })
        .await?;
    Ok(m.json()?["data"]["state"].clone())
}

fn is_message_from(m: &SseMsg, from: &str) -> bool {
    m.event == "message.available" && m.json().is_ok_and(|v| v["data"]["from"] == from)
}

async fn apply(srv: &KennelServer, policy: serde_json::Value) -> anyhow::Result<()> {
    let _: serde_json::Value = srv.api().post("/api/v1/policies", &policy).await?;
    Ok(())
}

/// An agent registered with a key of its own, as a sender of messages.
async fn sender(srv: &KennelServer, id: &str) -> anyhow::Result<Api> {
    let key = srv.api().create_key(id, &[Scope::Agent]).await?;
    let api = srv.api().with_key(Some(key.key));
    let _: Agent = api
        .post(
            "/api/v1/agents",
            &RegisterAgent {
                id: id.into(),
                name: id.into(),
                machine: "m1".into(),
                instance_id: "p1".into(),
                ..RegisterAgent::default()
            },
        )
        .await?;
    Ok(api)
}

async fn send(api: &Api, from: &str, to: &str, body: &str) -> anyhow::Result<Message> {
    api.post(
        "/api/v1/messages",
        &serde_json::json!({ "from": from, "to": to, "body": body }),
    )
    .await
}

async fn inbox(api: &Api, agent: &str) -> anyhow::Result<Vec<Message>> {
    let page: InboxPage = api.get(&format!("/api/v1/agents/{agent}/inbox")).await?;
    Ok(page.messages)
}

#[tokio::test]
async fn a_message_to_an_on_demand_policy_starts_its_agent_the_reply_reaches_the_sender_and_idle_stops_it(
) -> anyhow::Result<()> {
    let srv = server().await?;
    let _d = KennelDaemon::start(bin(), &srv, &daemon_config("on-demand", "")).await?;
    let mut ev = events(&srv).await?;
    apply(
        &srv,
        serde_json::json!({
            "name": "reviewer", "provider": "echoer", "mode": "on-demand",
            "onDemand": { "keepaliveSeconds": 2 },
        }),
    )
    .await?;
    let triager = sender(&srv, "triager").await?;
    let asked = send(&triager, "triager", "policy:reviewer", "look at PR 7").await?;

    wait_policy(&mut ev, "reviewer", "running").await?;
    ev.wait_for(SLOW, |m| is_message_from(m, "reviewer-1"))
        .await?;
    let (_, metrics) = srv
        .api()
        .raw(
            reqwest::Method::GET,
            "/metrics",
            Some(srv.admin_key()),
            None,
        )
        .await?;
    for line in [
        "kennel_policies{status=\"running\"} 1",
        "kennel_messages{state=",
    ] {
        assert!(
            metrics.contains(line),
            "no `{line}` in /metrics:\n{metrics}"
        );
    }
    let got = inbox(&triager, "triager").await?;
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].body, "echo: look at PR 7");
    assert_eq!(got[0].from, "reviewer-1");
    assert_eq!(got[0].reply_to.as_deref(), Some(asked.id.as_str()));
    let asked: Message = srv
        .api()
        .get(&format!("/api/v1/messages/{}", asked.id))
        .await?;
    assert_eq!(asked.state, MessageState::Delivered);
    assert_eq!(asked.delivered_to.as_deref(), Some("reviewer-1"));

    // Idle past its keepalive: stopped, and offline in the registry.
    wait_policy(&mut ev, "reviewer", "stopped").await?;
    let agent: Agent = srv.api().get("/api/v1/agents/reviewer-1").await?;
    assert!(!agent.online);
    // Each step was a command with its correlation id, its state and its deadline.
    let commands: Vec<Command> = srv.api().get("/api/v1/commands").await?;
    let done: Vec<(&str, &str, CommandState)> = commands
        .iter()
        .rev()
        .map(|c| (c.kind.as_str(), c.target.as_str(), c.state))
        .collect();
    assert_eq!(
        done,
        [
            ("agent.spawn", "reviewer-1", CommandState::Succeeded),
            ("agent.shutdown", "reviewer-1", CommandState::Succeeded),
        ]
    );
    assert_eq!(commands[0].args["graceful"], true);

    // Mail again: a new agent.
    send(&triager, "triager", "policy:reviewer", "and PR 8").await?;
    ev.wait_for(SLOW, |m| is_message_from(m, "reviewer-2"))
        .await?;
    let bodies: Vec<String> = inbox(&triager, "triager")
        .await?
        .into_iter()
        .map(|m| m.body)
        .collect();
    assert_eq!(bodies, ["echo: look at PR 7", "echo: and PR 8"]);
    Ok(())
}

#[tokio::test]
async fn a_killed_always_on_agent_is_restarted_after_its_backoff() -> anyhow::Result<()> {
    let marker = format!("kennel-test-agent-{}", std::process::id());
    let srv = server().await?;
    let _d = KennelDaemon::start(bin(), &srv, &daemon_config(&marker, "")).await?;
    let mut ev = events(&srv).await?;
    apply(
        &srv,
        serde_json::json!({
            "name": "keeper", "provider": "echoer", "mode": "always-on",
            "backoff": { "schedule": [1, 2], "resetAfterSeconds": 3 },
        }),
    )
    .await?;
    let mut delays = Vec::new();
    for _ in 0..2 {
        wait_policy(&mut ev, "keeper", "running").await?;
        let killed = std::process::Command::new("pkill")
            .args(["-KILL", "-f", &marker])
            .status()?;
        assert!(killed.success(), "the agent's process was found and killed");
        let state = wait_policy(&mut ev, "keeper", "backoff").await?;
        let error = state["lastError"].as_str().unwrap_or_default().to_string();
        assert!(error.contains("the agent is gone"), "{state}");
        let until = state["backoffUntil"].as_i64().unwrap_or(0);
        let at = state["lastStopAt"].as_i64().unwrap_or(0);
        delays.push((until - at) / 1000);
    }
    assert_eq!(delays, [1, 2], "the schedule's delays, in order");
    let state = wait_policy(&mut ev, "keeper", "running").await?;
    assert_eq!(state["spawns"], 3);
    assert_eq!(state["consecutiveFailures"], 2);

    // Healthy for resetAfterSeconds: the failures are forgiven, and the next one waits the
    // schedule's first delay again.
    ev.wait_for(SLOW, |m| {
        m.event == "policy.state.changed"
            && m.json().is_ok_and(|v| {
                v["data"]["policy"] == "keeper"
                    && v["data"]["status"] == "running"
                    && v["data"]["state"]["consecutiveFailures"] == 0
            })
    })
    .await?;
    let killed = std::process::Command::new("pkill")
        .args(["-KILL", "-f", &marker])
        .status()?;
    assert!(killed.success());
    let state = wait_policy(&mut ev, "keeper", "backoff").await?;
    let delay = (state["backoffUntil"].as_i64().unwrap_or(0)
        - state["lastStopAt"].as_i64().unwrap_or(0))
        / 1000;
    assert_eq!((delay, state["consecutiveFailures"].as_i64()), (1, Some(1)));
    let state = wait_policy(&mut ev, "keeper", "running").await?;
    assert_eq!(state["spawns"], 4);

    // A restart asked for: the agent is stopped and a new one started, not counted a failure.
    let command: Command = srv
        .api()
        .post_empty("/api/v1/policies/keeper/restart")
        .await?;
    assert_eq!(command.state, CommandState::Requested);
    wait_policy(&mut ev, "keeper", "stopping").await?;
    // The command succeeds once the new agent runs (recorded just before the policy's state).
    ev.wait_for(SLOW, |m| {
        m.event == "command.state.changed"
            && m.json().is_ok_and(|v| {
                v["data"]["commandId"] == command.id.as_str() && v["data"]["state"] == "succeeded"
            })
    })
    .await?;
    let state = wait_policy(&mut ev, "keeper", "running").await?;
    assert_eq!(
        (state["spawns"].as_i64(), state["restartCount"].as_i64()),
        (Some(5), Some(1))
    );
    assert_eq!(
        state["consecutiveFailures"], 1,
        "a restart is not a failure"
    );
    Ok(())
}

#[tokio::test]
async fn a_policy_waits_for_a_daemon_that_can_take_it_and_says_why_then_spawns(
) -> anyhow::Result<()> {
    let srv = server().await?;
    let mut ev = events(&srv).await?;
    apply(
        &srv,
        serde_json::json!({
            "name": "gpu-agent", "provider": "echoer", "mode": "always-on",
            "target": { "labels": { "pool": "gpu" } },
        }),
    )
    .await?;
    let state = wait_policy(&mut ev, "gpu-agent", "backoff").await?;
    let error = state["lastError"].as_str().unwrap_or_default();
    assert!(
        error.contains("no online daemon offers agent profile `echoer` and labels pool=gpu"),
        "{state}"
    );
    // A daemon without the label does not count; one with it is used at once.
    let _plain = KennelDaemon::start(bin(), &srv, &daemon_config("plain", "")).await?;
    let _gpu = KennelDaemon::start(
        bin(),
        &srv,
        &daemon_config("gpu", "labels = { pool = \"gpu\" }"),
    )
    .await?;
    wait_policy(&mut ev, "gpu-agent", "running").await?;
    Ok(())
}

#[tokio::test]
async fn a_start_that_never_registers_times_out_and_one_that_exits_at_once_says_why(
) -> anyhow::Result<()> {
    let srv = server().await?;
    let _d = KennelDaemon::start(bin(), &srv, &daemon_config("timeouts", "")).await?;
    let mut ev = events(&srv).await?;
    // Both slots busy: the agent's task waits in the queue and never starts.
    for n in 0..2 {
        srv.api()
            .submit(&kennel_proto::api::CreateTask {
                name: format!("busy {n}"),
                prompt: "hold the slot".into(),
                agent: Some("sleeper".into()),
                ..kennel_proto::api::CreateTask::default()
            })
            .await?;
    }
    apply(
        &srv,
        serde_json::json!({
            "name": "late", "provider": "echoer", "mode": "always-on", "spawnTimeoutSecs": 1,
            "backoff": { "schedule": [600] },
        }),
    )
    .await?;
    let state = wait_policy(&mut ev, "late", "backoff").await?;
    assert!(
        state["lastError"]
            .as_str()
            .unwrap_or_default()
            .contains("did not register within spawnTimeoutSecs (1s)"),
        "{state}"
    );
    // Its task was withdrawn, so it never runs late.
    srv.api()
        .delete::<serde_json::Value>("/api/v1/policies/late")
        .await
        .ok();

    let srv = server().await?;
    let _d = KennelDaemon::start(bin(), &srv, &daemon_config("quits", "")).await?;
    let mut ev = events(&srv).await?;
    apply(
        &srv,
        serde_json::json!({
            "name": "quitter", "provider": "quitter", "mode": "always-on",
            "backoff": { "schedule": [600] },
        }),
    )
    .await?;
    let state = wait_policy(&mut ev, "quitter", "backoff").await?;
    let error = state["lastError"].as_str().unwrap_or_default();
    assert!(error.contains('3'), "the exit status is named: {state}");
    assert_eq!(state["consecutiveFailures"], 1);
    Ok(())
}

#[tokio::test]
async fn a_coordinator_killed_mid_conversation_loses_no_message_and_delivers_none_twice(
) -> anyhow::Result<()> {
    let mut srv = server().await?;
    let _d = KennelDaemon::start(bin(), &srv, &daemon_config("conversation", "")).await?;
    let mut ev = events(&srv).await?;
    apply(
        &srv,
        serde_json::json!({ "name": "talker", "provider": "echoer", "mode": "always-on" }),
    )
    .await?;
    let triager = sender(&srv, "triager").await?;
    wait_policy(&mut ev, "talker", "running").await?;
    send(&triager, "triager", "talker-1", "one").await?;
    ev.wait_for(SLOW, |m| is_message_from(m, "talker-1"))
        .await?;
    // Queued while the coordinator is down for good measure: sent, then kill -9 at once.
    send(&triager, "triager", "talker-1", "two").await?;
    srv.kill9().await?;
    srv.restart().await?;
    let mut ev = events(&srv).await?;
    send(&triager, "triager", "talker-1", "three").await?;
    // The replies to two and three, whenever the daemon is back.
    let got = async {
        loop {
            let bodies: Vec<String> = inbox(&triager, "triager")
                .await?
                .into_iter()
                .map(|m| m.body)
                .collect();
            if bodies.len() >= 3 {
                return anyhow::Ok(bodies);
            }
            ev.wait_for(SLOW, |m| is_message_from(m, "talker-1"))
                .await?;
        }
    };
    let bodies = tokio::time::timeout(SLOW, got).await??;
    assert_eq!(bodies, ["echo: one", "echo: two", "echo: three"]);
    // Nothing more comes: every message was written to the agent once.
    let all: InboxPage = srv.api().get("/api/v1/agents/triager/inbox").await?;
    assert_eq!(all.messages.len(), 3);
    Ok(())
}

/// The script of a reviewing agent: answers every turn with "LGTM: " and the user's text.
fn reviewer_script() -> kennel_testkit::anthropic::Script {
    std::sync::Arc::new(|request: &serde_json::Value| {
        let last = request["messages"]
            .as_array()
            .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
            .cloned()
            .unwrap_or_default();
        let text = match &last["content"] {
            serde_json::Value::String(s) => s.clone(),
            // Claude Code puts its own context blocks first; the user's text is the last.
            serde_json::Value::Array(blocks) => blocks
                .iter()
                .rev()
                .find_map(|b| b["text"].as_str())
                .unwrap_or_default()
                .to_string(),
            _ => String::new(),
        };
        kennel_testkit::anthropic::Reply::text(format!("LGTM: {}", text.trim()))
    })
}

#[tokio::test]
async fn claude_code_as_a_session_agent_answers_a_message_in_the_senders_inbox(
) -> anyhow::Result<()> {
    let upstream = ScriptedAnthropic::start(reviewer_script()).await?;
    let home = tempfile::Builder::new()
        .prefix("kennel-test-claude-home-")
        .tempdir()?;
    let srv = server().await?;
    let config = format!(
        r#"
[daemon]
max_concurrent_tasks = 1

[daemon.agents.claude]
kind = "claude"

[daemon.agents.claude.env]
ANTHROPIC_BASE_URL = "{url}"
ANTHROPIC_API_KEY = "sk-ant-kennel-test"
{offline}"#,
        url = upstream.url(),
        offline = crate::claude::offline_claude_env(home.path()),
    );
    let _d = KennelDaemon::start(bin(), &srv, &config).await?;
    let mut ev = events(&srv).await?;
    apply(
        &srv,
        serde_json::json!({
            "name": "claude-reviewer", "provider": "claude", "mode": "on-demand",
            "onDemand": { "keepaliveSeconds": 2 },
        }),
    )
    .await?;
    let triager = sender(&srv, "triager").await?;
    let asked = send(
        &triager,
        "triager",
        "policy:claude-reviewer",
        "please review PR 9",
    )
    .await?;
    wait_policy(&mut ev, "claude-reviewer", "running").await?;
    let slow = Duration::from_secs(120);
    let reply = ev
        .wait_for(slow, |m| is_message_from(m, "claude-reviewer-1"))
        .await;
    if let Err(e) = reply {
        let seen: Vec<String> = upstream
            .recorded()
            .iter()
            .map(|r| format!("{} {}", r.method, r.uri))
            .collect();
        anyhow::bail!("{e}\nupstream saw: {seen:?}");
    }
    let got = inbox(&triager, "triager").await?;
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].body, "LGTM: please review PR 9");
    assert_eq!(got[0].reply_to.as_deref(), Some(asked.id.as_str()));
    // Idle past its keepalive: Claude Code is stopped.
    wait_policy(&mut ev, "claude-reviewer", "stopped").await?;
    Ok(())
}

#[tokio::test]
async fn a_new_release_restarts_the_agents_of_policies_that_follow_it_once_they_are_idle(
) -> anyhow::Result<()> {
    let config = |release: &str| format!("[server.agents]\nrelease = \"{release}\"\n");
    let mut srv = crate::server_with(&config("r1")).await?;
    let _d = KennelDaemon::start(bin(), &srv, &daemon_config("release", "")).await?;
    let mut ev = events(&srv).await?;
    for (name, follows) in [("follower", true), ("steady", false)] {
        apply(
            &srv,
            serde_json::json!({
                "name": name, "provider": "echoer", "mode": "always-on",
                "restartOnUpdate": follows, "restartOnUpdateIdleSecs": 1,
            }),
        )
        .await?;
        let state = wait_policy(&mut ev, name, "running").await?;
        assert_eq!(state["spawnedVersion"], "r1");
    }

    // A deploy: the coordinator comes back with another release.
    std::fs::write(srv.config_path().expect("a config file"), config("r2"))?;
    srv.restart().await?;
    let mut ev = events(&srv).await?;
    wait_policy(&mut ev, "follower", "stopping").await?;
    let state = wait_policy(&mut ev, "follower", "running").await?;
    assert_eq!(state["spawnedVersion"], "r2");
    assert_eq!(state["restartCount"], 1);
    let steady: serde_json::Value = srv.api().get("/api/v1/policies/steady").await?;
    assert_eq!(steady["state"]["spawnedVersion"], "r1", "{steady}");
    assert_eq!(steady["status"], "running");
    Ok(())
}

#[tokio::test]
async fn an_agent_stopped_on_purpose_keeps_its_work_on_a_pushed_branch() -> anyhow::Result<()> {
    let git = kennel_testkit::GitFixture::new(&[])?;
    let srv = server().await?;
    let config = r#"
[daemon]
max_concurrent_tasks = 1

[daemon.agents.notes]
kind = "command"
command = ["sh", "-c", "while IFS= read -r line; do echo \"$line\" >> NOTES.md; echo \"noted: $line\"; done"]
"#;
    let _d = KennelDaemon::start(bin(), &srv, config).await?;
    let mut ev = events(&srv).await?;
    apply(
        &srv,
        serde_json::json!({
            "name": "scribe", "provider": "notes", "mode": "always-on",
            "repo": { "url": git.url(), "baseBranch": "main" },
        }),
    )
    .await?;
    let state = wait_policy(&mut ev, "scribe", "running").await?;
    let task_id = state["taskId"].as_str().unwrap_or_default().to_string();
    send(&srv.api(), "user", "scribe-1", "remember the milk").await?;
    ev.wait_for(SLOW, |m| is_message_from(m, "scribe-1"))
        .await?;

    // A restart stops the agent gracefully: its session ends completed, its notes pushed.
    let _: Command = srv
        .api()
        .post_empty("/api/v1/policies/scribe/restart")
        .await?;
    let done = kennel_testkit::wait_task_status(
        &srv.url(),
        srv.admin_key(),
        &task_id,
        kennel_proto::TaskStatus::Completed,
        SLOW,
    )
    .await?;
    let branch = format!("kennel/{task_id}");
    assert_eq!(done.branch.as_deref(), Some(branch.as_str()));
    assert_eq!(git.show(&branch, "NOTES.md")?, "remember the milk");
    wait_policy(&mut ev, "scribe", "running").await?;
    Ok(())
}
