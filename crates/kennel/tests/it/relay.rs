//! `kennel relay` between a coordinator and protocol-level daemons: least-loaded dispatch,
//! capacity offered upstream, queueing, lost daemons, restarts on either side, keys, and the
//! admin endpoints. Every wait is on a message or a printed line, with a deadline.

use std::collections::BTreeMap;

use kennel_proto::link::{Capacity, ErrorCode, TaskRef};
use kennel_proto::{AttemptStatus, DaemonMessage, ServerMessage, TaskStatus};
use kennel_testkit::{
    wait_task_status, DaemonOpts, KennelRelay, KennelServer, Method, StatusCode, TestDaemon,
    RELAY_DAEMON_KEY,
};

use crate::{bin, daemon, server, server_with, task, WAIT};

async fn relay(srv: &KennelServer, extra: &str) -> anyhow::Result<KennelRelay> {
    let mut r = KennelRelay::start(bin(), srv, extra).await?;
    r.wait_upstream(WAIT).await?;
    Ok(r)
}

fn opts(machine: &str, slots: u32, agents: &[&str]) -> DaemonOpts {
    DaemonOpts {
        machine_id: machine.to_string(),
        hostname: machine.to_string(),
        max_concurrent_tasks: slots,
        agents: agents.iter().map(|a| a.to_string()).collect(),
        ..DaemonOpts::with_key(RELAY_DAEMON_KEY)
    }
}

async fn down(r: &KennelRelay, machine: &str, slots: u32) -> anyhow::Result<TestDaemon> {
    TestDaemon::connect(&r.ws_url(), opts(machine, slots, &["command"])).await
}

/// Texts of the stored output of one attempt.
async fn output_of(srv: &KennelServer, id: &str, attempt: u32) -> anyhow::Result<Vec<String>> {
    let page = srv.api().output(id, Some(attempt), 0).await?;
    Ok(page.items.into_iter().map(|c| c.output).collect())
}

#[tokio::test]
async fn tasks_go_to_the_least_loaded_daemon_and_reports_flow_end_to_end() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let r = relay(&srv, "").await?;
    let mut ds = [
        down(&r, "edge-a", 2).await?,
        down(&r, "edge-b", 2).await?,
        down(&r, "edge-c", 2).await?,
    ];
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(api.submit(&task(&format!("r{i}"))).await?.id);
    }
    // Three idle daemons, three tasks: one each.
    let mut got = Vec::new();
    let mut held = Vec::new();
    for d in ds.iter_mut() {
        let s = d.expect_spawn(WAIT).await?;
        d.accept(&s.task_id, s.attempt).await?;
        d.output(
            &s.task_id,
            s.attempt,
            &format!("hello from {}", d.machine_id()),
        )
        .await?;
        // The coordinator's acks come back through the relay.
        d.expect_ack(&s.task_id, s.attempt, 2, WAIT).await?;
        held.push(s.task_id.clone());
        got.push(s.task_id);
    }
    got.sort();
    ids.sort();
    assert_eq!(got, ids, "each daemon got one of the three tasks");

    // a finishes; the next task goes to a (0 active) rather than b or c (1 active each).
    let done_id = held[0].clone();
    ds[0].complete(&done_id, 1, true).await?;
    ds[0].expect_ack(&done_id, 1, 3, WAIT).await?;
    wait_task_status(
        &srv.url(),
        srv.admin_key(),
        &done_id,
        TaskStatus::Completed,
        WAIT,
    )
    .await?;
    assert_eq!(
        output_of(&srv, &done_id, 1).await?,
        vec!["hello from edge-a".to_string()]
    );
    let t4 = api.submit(&task("r4")).await?;
    let s4 = ds[0].expect_spawn(WAIT).await?;
    assert_eq!(
        s4.task_id, t4.id,
        "the least-loaded daemon gets the next task"
    );
    assert!(crate::only_acks_pending(&mut ds[1]));
    assert!(crate::only_acks_pending(&mut ds[2]));

    // The coordinator sees the relay as one daemon with the sum of the slots.
    let daemons: Vec<kennel_proto::api::Daemon> = api.get("/api/v1/daemons").await?;
    let me = daemons
        .iter()
        .find(|d| d.machine_id.starts_with("test-relay-"))
        .ok_or_else(|| anyhow::anyhow!("relay not listed: {daemons:?}"))?;
    assert!(me.connected);
    assert_eq!(me.max_concurrent_tasks, 6);
    Ok(())
}

/// A task the relay queues outlives the coordinator's accept deadline: the relay announces it
/// with `taskQueued`, so the coordinator does not expire and retry it while it waits.
#[tokio::test]
async fn a_task_no_daemon_can_take_is_queued_then_dispatched() -> anyhow::Result<()> {
    let srv = server_with("[server.scheduler]\naccept_timeout = \"1s\"\n").await?;
    let api = srv.api();
    let r = relay(&srv, "").await?;
    // The relay offers 2 slots and both agents; only `a` runs `command`.
    let mut a = TestDaemon::connect(&r.ws_url(), opts("q-a", 1, &["command"])).await?;
    let mut b = TestDaemon::connect(&r.ws_url(), opts("q-b", 1, &["claude"])).await?;
    let t1 = api.submit(&task("q1")).await?;
    let s1 = a.expect_spawn(WAIT).await?;
    assert_eq!(s1.task_id, t1.id);
    a.accept(&t1.id, 1).await?;
    a.expect_ack(&t1.id, 1, 1, WAIT).await?;
    let t2 = api.submit(&task("q2")).await?;
    // The coordinator hands t2 to the relay; the relay holds it until a has room.
    wait_relay(&r, |s| s["queuedTasks"] == 1).await?;

    // A clock made of events: a task dispatched after t2 to a direct daemon that never
    // accepts. Its second attempt proves t2's accept deadline has passed as well.
    let mut clock = TestDaemon::connect(
        &srv.ws_url(),
        DaemonOpts {
            agents: vec!["probe".into()],
            ..DaemonOpts::with_key(srv.admin_key())
        },
    )
    .await?;
    let probe = api
        .submit(&kennel_proto::api::CreateTask {
            agent: Some("probe".into()),
            ..task("deadline-clock")
        })
        .await?;
    assert_eq!(clock.expect_spawn(WAIT).await?.attempt, 1);
    let again = clock.expect_spawn(WAIT).await?;
    assert_eq!(
        (again.task_id.as_str(), again.attempt),
        (probe.id.as_str(), 2)
    );

    let t2_now = api.task(&t2.id).await?;
    assert_eq!(
        (t2_now.task.attempt, t2_now.attempts.len()),
        (1, 1),
        "t2 was not expired and retried: {t2_now:?}"
    );
    a.complete(&t1.id, 1, true).await?;
    let s2 = a.expect_spawn(WAIT).await?;
    assert_eq!(
        (s2.task_id.as_str(), s2.attempt),
        (t2.id.as_str(), 1),
        "the queued attempt went out once a slot freed"
    );
    a.accept(&t2.id, 1).await?;
    a.expect_ack(&t2.id, 1, 1, WAIT).await?;
    assert!(
        crate::only_acks_pending(&mut b),
        "b does not offer `command`"
    );
    let tasks = r.api().get::<serde_json::Value>("/tasks").await?;
    let t2row = tasks["tasks"]
        .as_array()
        .and_then(|v| v.iter().find(|t| t["taskId"] == t2.id.as_str()))
        .cloned()
        .unwrap_or_default();
    assert_eq!(t2row["daemon"], "q-a");
    assert_eq!(t2row["status"], "running");
    Ok(())
}

#[tokio::test]
async fn wrong_keys_and_foreign_tasks_are_refused() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let r = relay(&srv, "").await?;
    let hello = serde_json::json!({
        "type": "authenticate", "apiKey": "not-a-relay-key", "machineId": "intruder",
        "hostname": "intruder", "maxConcurrentTasks": 1, "protocolVersion": 1,
    });
    let (first, close) = TestDaemon::connect_raw(&r.ws_url(), hello.to_string()).await?;
    match first {
        Some(ServerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::Unauthorized),
        other => panic!("expected unauthorized, got {other:?}"),
    }
    let (code, reason) = close.unwrap_or_default();
    assert_eq!(code, 4001, "{reason}");
    assert!(reason.contains("daemon_keys"), "{reason}");

    let mut a = down(&r, "own-a", 1).await?;
    let mut b = down(&r, "own-b", 1).await?;
    let t = api.submit(&task("mine")).await?;
    // Whoever got it, the other claims it.
    let (holder, other) = tokio::select! {
        s = a.expect_spawn(WAIT) => { s?; (&mut a, &mut b) }
        s = b.expect_spawn(WAIT) => { s?; (&mut b, &mut a) }
    };
    other.output(&t.id, 1, "not mine").await?;
    let e = other.expect_error(WAIT).await?;
    assert_eq!(e.code, ErrorCode::StaleAttempt);
    assert_eq!(e.task_id.as_deref(), Some(t.id.as_str()));
    holder.accept(&t.id, 1).await?;
    holder.expect_ack(&t.id, 1, 1, WAIT).await?;
    assert!(
        output_of(&srv, &t.id, 1).await?.is_empty(),
        "nothing forwarded"
    );
    Ok(())
}

#[tokio::test]
async fn a_vanished_daemon_s_task_is_lost_and_retried_elsewhere() -> anyhow::Result<()> {
    let srv = server().await?;
    let r = relay(&srv, "reattach_grace = \"0s\"").await?;
    let mut a = down(&r, "gone-a", 1).await?;
    let t = running_with_two_lines(&srv, &mut a, "lose").await?;
    // b arrives with a free slot; a dies mid-task.
    let mut b = down(&r, "gone-b", 1).await?;
    a.drop_connection().await;
    finish_second_attempt(&srv, &mut b, &t, Some("three")).await?;
    assert_eq!(output_of(&srv, &t, 1).await?, vec!["one", "two"]);
    assert_eq!(output_of(&srv, &t, 2).await?, vec!["three"]);
    Ok(())
}

/// Submits a task, lets `a` (the relay's only free daemon) take it and report two lines, and
/// waits for their ack. Returns the task id.
async fn running_with_two_lines(
    srv: &KennelServer,
    a: &mut TestDaemon,
    name: &str,
) -> anyhow::Result<String> {
    let t = srv.api().submit(&task(name)).await?;
    let s = a.expect_spawn(WAIT).await?;
    assert_eq!(s.task_id, t.id);
    a.accept(&t.id, 1).await?;
    a.output(&t.id, 1, "one").await?;
    a.output(&t.id, 1, "two").await?;
    a.expect_ack(&t.id, 1, 3, WAIT).await?;
    Ok(t.id)
}

/// `b` gets attempt 2 of `task_id`, optionally reports a line, completes it, and the task ends
/// completed.
async fn finish_second_attempt(
    srv: &KennelServer,
    b: &mut TestDaemon,
    task_id: &str,
    line: Option<&str>,
) -> anyhow::Result<()> {
    let s2 = b.expect_spawn(WAIT).await?;
    assert_eq!((s2.task_id.as_str(), s2.attempt), (task_id, 2));
    b.accept(task_id, 2).await?;
    let mut seq = 2;
    if let Some(line) = line {
        b.output(task_id, 2, line).await?;
        seq += 1;
    }
    b.complete(task_id, 2, true).await?;
    b.expect_ack(task_id, 2, seq, WAIT).await?;
    wait_task_status(
        &srv.url(),
        srv.admin_key(),
        task_id,
        TaskStatus::Completed,
        WAIT,
    )
    .await
    .map(|_| ())
}

/// The relay crashes while a daemon holds an attempt, and that daemon never comes back. The
/// restarted relay no longer knows the attempt's last seq (it does not write every report to
/// disk), so its `lost` report goes out with a probe seq, the coordinator answers `seqGap`, and
/// the relay sends it again with the expected seq: the task is retried, its output intact.
#[tokio::test]
async fn a_task_held_across_a_relay_crash_is_lost_and_retried_when_its_daemon_never_returns(
) -> anyhow::Result<()> {
    let srv = server_with("[server.scheduler]\nreattach_grace = \"60s\"\n").await?;
    let api = srv.api();
    let mut r = relay(&srv, "reattach_grace = \"1s\"").await?;
    let mut a = down(&r, "crash-a", 1).await?;
    let t = running_with_two_lines(&srv, &mut a, "crash").await?;

    r.restart().await?;
    r.wait_upstream(WAIT).await?;
    // `a` never reconnects; `b` has a free slot for the retry.
    let mut b = down(&r, "crash-b", 1).await?;
    finish_second_attempt(&srv, &mut b, &t, None).await?;
    assert_eq!(output_of(&srv, &t, 1).await?, vec!["one", "two"]);
    let task = api.task(&t).await?;
    let first = task
        .attempts
        .iter()
        .find(|x| x.attempt == 1)
        .ok_or_else(|| anyhow::anyhow!("attempt 1 missing: {task:?}"))?;
    assert_eq!(first.status, AttemptStatus::Lost, "{task:?}");
    // The probe was answered with exactly one `seqGap`.
    let (_, metrics) = api
        .raw(Method::GET, "/metrics", Some(srv.admin_key()), None)
        .await?;
    let gaps = metrics
        .lines()
        .find(|l| l.starts_with("kennel_frame_errors_total") && l.contains("seqGap"));
    assert!(
        gaps.is_some_and(|l| l.ends_with(" 1")),
        "expected one seqGap: {gaps:?}\n{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn the_relay_survives_an_upstream_restart_and_replays_what_it_buffered() -> anyhow::Result<()>
{
    let mut srv = server_with("[server.scheduler]\nreattach_grace = \"60s\"\n").await?;
    let mut r = relay(&srv, "").await?;
    let mut a = down(&r, "up-a", 1).await?;
    let t = srv.api().submit(&task("survive")).await?;
    let s = a.expect_spawn(WAIT).await?;
    a.accept(&s.task_id, 1).await?;
    a.output(&t.id, 1, "before").await?;
    a.expect_ack(&t.id, 1, 2, WAIT).await?;

    srv.kill9().await?;
    // Reports made while the upstream is down are kept by the relay...
    a.output(&t.id, 1, "during").await?;
    srv.restart().await?;
    r.wait_upstream(WAIT).await?;
    // ...and replayed once it is back; the coordinator applies and acks them.
    a.expect_ack(&t.id, 1, 3, WAIT).await?;
    a.output(&t.id, 1, "after").await?;
    a.complete(&t.id, 1, true).await?;
    a.expect_ack(&t.id, 1, 5, WAIT).await?;
    wait_task_status(
        &srv.url(),
        srv.admin_key(),
        &t.id,
        TaskStatus::Completed,
        WAIT,
    )
    .await?;
    assert_eq!(
        output_of(&srv, &t.id, 1).await?,
        vec!["before", "during", "after"]
    );
    Ok(())
}

#[tokio::test]
async fn a_killed_relay_restarts_with_its_history_queue_and_daemons() -> anyhow::Result<()> {
    let srv = server_with("[server.scheduler]\nreattach_grace = \"60s\"\n").await?;
    let api = srv.api();
    let mut r = relay(&srv, "").await?;
    let mut a = TestDaemon::connect(&r.ws_url(), opts("k-a", 1, &["command"])).await?;
    let _b = TestDaemon::connect(&r.ws_url(), opts("k-b", 1, &["claude"])).await?;
    let t1 = api.submit(&task("k1")).await?;
    let s1 = a.expect_spawn(WAIT).await?;
    a.accept(&s1.task_id, 1).await?;
    a.expect_ack(&t1.id, 1, 1, WAIT).await?;
    // t2 waits in the relay's queue: a is full, b does not run `command`.
    let t2 = api.submit(&task("k2")).await?;
    let queued = wait_relay(&r, |s| s["queuedTasks"] == 1).await?;
    assert_eq!(queued["activeTasks"], 1);

    r.restart().await?;
    r.wait_upstream(WAIT).await?;
    let st = r.api().get::<serde_json::Value>("/status").await?;
    assert_eq!(st["queuedTasks"], 1, "the queue survived: {st}");
    assert_eq!(st["activeTasks"], 1, "the held attempt survived: {st}");
    a.reconnect(vec![TaskRef {
        task_id: t1.id.clone(),
        attempt: 1,
    }])
    .await?;
    a.output(&t1.id, 1, "still here").await?;
    a.complete(&t1.id, 1, true).await?;
    a.expect_ack(&t1.id, 1, 3, WAIT).await?;
    let s2 = a.expect_spawn(WAIT).await?;
    assert_eq!((s2.task_id.as_str(), s2.attempt), (t2.id.as_str(), 1));
    wait_task_status(
        &srv.url(),
        srv.admin_key(),
        &t1.id,
        TaskStatus::Completed,
        WAIT,
    )
    .await?;
    let tasks = r.api().get::<serde_json::Value>("/tasks").await?;
    let rows = tasks["tasks"].as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 2, "history intact: {tasks}");
    // Paging counts tasks: the second page of one is the older task.
    let page = r
        .api()
        .get::<serde_json::Value>("/tasks?limit=1&offset=1")
        .await?;
    let ids: Vec<&str> = page["tasks"]
        .as_array()
        .map(|v| v.iter().filter_map(|t| t["taskId"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, vec![t1.id.as_str()], "{page}");
    Ok(())
}

/// Reads the relay's `/status` until `ok` holds for it (each read answers a real request).
async fn wait_relay(
    r: &KennelRelay,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    wait_relay_at(r, "/status", ok).await
}

/// Reads `path` on the relay until `ok` holds for the answer, within [`WAIT`].
async fn wait_relay_at(
    r: &KennelRelay,
    path: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let v = r.api().get::<serde_json::Value>(path).await?;
        if ok(&v) {
            return Ok(v);
        }
        if tokio::time::Instant::now() > until {
            anyhow::bail!("relay {path} never matched; last: {v}");
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn the_admin_endpoints_answer_as_documented() -> anyhow::Result<()> {
    let srv = server().await?;
    let mut r = relay(&srv, "").await?;
    let _a = down(&r, "http-a", 3).await?;
    let anon = r.api().with_key(None);
    let (code, body) = anon.raw(Method::GET, "/health", None, None).await?;
    assert_eq!(code, StatusCode::OK, "{body}");
    for path in ["/", "/status", "/tasks", "/logs", "/metrics"] {
        let (code, body) = anon.raw(Method::GET, path, None, None).await?;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{path}: {body}");
        let (code, _) = anon.raw(Method::GET, path, Some("wrong"), None).await?;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{path}");
    }
    let st = wait_relay(&r, |s| s["connectedDaemons"] == 1).await?;
    assert_eq!(st["status"], "ok");
    assert_eq!(st["upstreamConnected"], true);
    assert!(st["daemonId"].is_string());
    assert!(st["agentName"]
        .as_str()
        .is_some_and(|n| n.starts_with("test-relay-")));
    assert_eq!(st["daemons"][0]["id"], "http-a");
    assert_eq!(st["daemons"][0]["maxConcurrentTasks"], 3);
    assert_eq!(st["daemons"].as_array().map(Vec::len), Some(1), "{st}");
    assert_eq!(st["totalProcessed"], 0);
    assert_eq!(st["totalTasksProcessed"], 0);
    let tasks = r
        .api()
        .get::<serde_json::Value>("/tasks?limit=100000&offset=-3")
        .await?;
    assert_eq!(
        (tasks["limit"].clone(), tasks["offset"].clone()),
        (500.into(), 0.into())
    );
    let logs = r.api().get::<serde_json::Value>("/logs?limit=1").await?;
    assert_eq!(logs["logs"].as_array().map(Vec::len), Some(1));
    let (code, metrics) = r
        .api()
        .raw(
            Method::GET,
            "/metrics",
            Some(kennel_testkit::RELAY_ADMIN_KEY),
            None,
        )
        .await?;
    assert_eq!(code, StatusCode::OK);
    assert!(
        metrics.contains("kennel_relay_daemons_connected 1"),
        "{metrics}"
    );
    let (code, _) = r
        .api()
        .raw(
            Method::POST,
            "/reconnect",
            Some(kennel_testkit::RELAY_ADMIN_KEY),
            None,
        )
        .await?;
    assert_eq!(code, StatusCode::ACCEPTED);
    r.wait_upstream(WAIT).await?;
    Ok(())
}

#[tokio::test]
async fn a_refused_relay_keeps_retrying_and_says_why() -> anyhow::Result<()> {
    let srv = server().await?;
    let r = KennelRelay::start_to(bin(), &srv.url(), "not-a-key-of-this-server", "").await?;
    let logs = wait_relay_logs(&r, "upstream refused the relay").await?;
    assert!(logs.contains("relay.api_key"), "{logs}");
    assert!(
        !logs.contains("not-a-key-of-this-server"),
        "keys are never logged: {logs}"
    );
    let st = r.api().get::<serde_json::Value>("/status").await?;
    assert_eq!(st["status"], "disconnected");
    assert_eq!(st["upstreamConnected"], false);
    Ok(())
}

/// Reads the relay's `/logs` until an entry contains `needle`; returns them all as text.
async fn wait_relay_logs(r: &KennelRelay, needle: &str) -> anyhow::Result<String> {
    let logs = wait_relay_at(r, "/logs?limit=200", |v| v.to_string().contains(needle)).await?;
    Ok(logs.to_string())
}

#[tokio::test]
async fn a_capacity_update_changes_what_the_coordinator_dispatches() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let mut d = daemon(&srv, "grow", 1).await?;
    let t1 = api.submit(&task("g1")).await?;
    let t2 = api.submit(&task("g2")).await?;
    let s1 = d.expect_spawn(WAIT).await?;
    assert_eq!(s1.task_id, t1.id);
    d.accept(&t1.id, 1).await?;
    d.expect_ack(&t1.id, 1, 1, WAIT).await?;
    assert!(crate::only_acks_pending(&mut d), "one slot only");
    d.send(&DaemonMessage::Capacity(Capacity {
        max_concurrent_tasks: 2,
        agents: vec!["command".into()],
        labels: BTreeMap::new(),
    }))
    .await?;
    let s2 = d.expect_spawn(WAIT).await?;
    assert_eq!(s2.task_id, t2.id, "the second slot is used at once");
    Ok(())
}

#[tokio::test]
async fn relays_chain_to_another_relay() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let parent = relay(&srv, "").await?;
    // The child presents one of the parent's daemon keys, as any daemon would.
    let mut child = KennelRelay::start_to(bin(), &parent.url(), RELAY_DAEMON_KEY, "").await?;
    child.wait_upstream(WAIT).await?;
    let mut d = down(&child, "leaf", 2).await?;
    let t = api.submit(&task("chained")).await?;
    let s = d.expect_spawn(WAIT).await?;
    assert_eq!(s.task_id, t.id);
    d.accept(&t.id, 1).await?;
    d.output(&t.id, 1, "two hops").await?;
    d.complete(&t.id, 1, true).await?;
    d.expect_ack(&t.id, 1, 3, WAIT).await?;
    wait_task_status(
        &srv.url(),
        srv.admin_key(),
        &t.id,
        TaskStatus::Completed,
        WAIT,
    )
    .await?;
    assert_eq!(output_of(&srv, &t.id, 1).await?, vec!["two hops"]);
    let st = wait_relay(&parent, |s| s["totalProcessed"] == 1).await?;
    assert_eq!(st["daemons"][0]["maxConcurrentTasks"], 2, "{st}");
    assert_eq!(st["totalTasksProcessed"], 1, "{st}");
    Ok(())
}

/// Real daemons behind the relay: `kill -9` of the one running a task; the task is retried on
/// the other, and each attempt's output is stored once.
#[tokio::test]
async fn a_real_daemon_killed_mid_task_is_replaced_through_the_relay() -> anyhow::Result<()> {
    use kennel_testkit::{EventStream, KennelDaemon};
    const SLOW: std::time::Duration = std::time::Duration::from_secs(60);
    const DAEMON: &str = "[daemon]\nmax_concurrent_tasks = 1\n\
        [daemon.agents.sh]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"{prompt}\"]\n";
    let srv = server().await?;
    let api = srv.api();
    let r = relay(&srv, "reattach_grace = \"0s\"").await?;
    let mut ds = [
        KennelDaemon::start_at(bin(), &r.ws_url(), RELAY_DAEMON_KEY, "real-a", DAEMON).await?,
        KennelDaemon::start_at(bin(), &r.ws_url(), RELAY_DAEMON_KEY, "real-b", DAEMON).await?,
    ];
    wait_relay(&r, |s| s["connectedDaemons"] == 2).await?;
    let marker = tempfile::tempdir()?;
    let flag = marker.path().join("first-ran");
    let script = format!(
        "if [ -e {f} ]; then echo second; else touch {f}; echo first; sleep 120; fi",
        f = flag.display()
    );
    let t = api
        .submit(&kennel_proto::api::CreateTask {
            name: "crash".into(),
            prompt: script,
            agent: Some("sh".into()),
            max_attempts: Some(2),
            ..Default::default()
        })
        .await?;
    let url = format!("{}/api/v1/tasks/{}/output/stream", srv.url(), t.id);
    let mut s = EventStream::connect(&url, Some(srv.admin_key()), None).await?;
    s.wait_for(SLOW, |m| m.event == "output" && m.data.contains("first"))
        .await?;
    let tasks = r.api().get::<serde_json::Value>("/tasks").await?;
    let holder = tasks["tasks"][0]["daemon"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let victim = ds
        .iter_mut()
        .find(|d| d.machine_id() == holder)
        .ok_or_else(|| anyhow::anyhow!("no daemon `{holder}`: {tasks}"))?;
    victim.kill9().await?;
    let done = wait_task_status(
        &srv.url(),
        srv.admin_key(),
        &t.id,
        TaskStatus::Completed,
        SLOW,
    )
    .await?;
    assert_eq!(done.attempt, 2);
    assert_eq!(output_of(&srv, &t.id, 1).await?, vec!["first"]);
    assert_eq!(output_of(&srv, &t.id, 2).await?, vec!["second"]);
    // One row for the task: its latest attempt's state, and both attempts, newest first.
    let tasks = r.api().get::<serde_json::Value>("/tasks").await?;
    let rows = tasks["tasks"].as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 1, "{tasks}");
    let row = &rows[0];
    assert_eq!(row["taskId"], t.id.as_str(), "{tasks}");
    assert_eq!(
        (row["status"].clone(), row["attempt"].clone()),
        ("completed".into(), 2.into()),
        "{tasks}"
    );
    assert_eq!(row["attemptCount"], 2, "{tasks}");
    assert_ne!(row["daemon"], holder.as_str(), "{tasks}");
    let attempts: Vec<(String, String, String)> = row["attempts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|a| {
            (
                a["attempt"].to_string(),
                a["status"].to_string(),
                a["daemon"].to_string(),
            )
        })
        .collect();
    assert_eq!(attempts.len(), 2, "{tasks}");
    assert_eq!(
        (attempts[0].0.as_str(), attempts[0].1.as_str()),
        ("2", "\"completed\""),
        "{tasks}"
    );
    assert_eq!(
        attempts[1],
        (
            "1".to_string(),
            "\"lost\"".to_string(),
            format!("\"{holder}\"")
        ),
        "{tasks}"
    );
    Ok(())
}

#[tokio::test]
async fn bad_frames_get_errors_and_silence_before_authenticate_is_closed() -> anyhow::Result<()> {
    let srv = server().await?;
    let r = relay(&srv, "auth_timeout = \"1s\"").await?;
    let (first, close) =
        TestDaemon::connect_raw_with(&r.ws_url(), Vec::new(), std::time::Duration::from_secs(10))
            .await?;
    assert!(first.is_none(), "{first:?}");
    assert_eq!(close.map(|c| c.0), Some(4003));

    let mut d = down(&r, "noisy", 1).await?;
    d.send_raw_text("{not json".into()).await?;
    assert_eq!(d.expect_error(WAIT).await?.code, ErrorCode::MalformedFrame);
    d.send_raw_text(r#"{"type":"taskOutput","taskId":"t1"}"#.into())
        .await?;
    assert_eq!(d.expect_error(WAIT).await?.code, ErrorCode::InvalidMessage);
    // Still connected and still dispatched to.
    let t = srv.api().submit(&task("after-noise")).await?;
    assert_eq!(d.expect_spawn(WAIT).await?.task_id, t.id);
    Ok(())
}

/// Where `actual` lacks a field of `expected`, or has it with another JSON type; objects are
/// compared field by field, arrays element by element against the first expected element.
fn shape_mismatches(
    expected: &serde_json::Value,
    actual: &serde_json::Value,
    at: &str,
) -> Vec<String> {
    use serde_json::Value;
    let kind = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    if kind(expected) != kind(actual) {
        return vec![format!("{at}: expected {}, got {actual}", kind(expected))];
    }
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => e
            .iter()
            .flat_map(|(k, ev)| match a.get(k) {
                Some(av) => shape_mismatches(ev, av, &format!("{at}.{k}")),
                None => vec![format!("{at}.{k}: missing")],
            })
            .collect(),
        (Value::Array(e), Value::Array(a)) => match e.first() {
            Some(first) => a
                .iter()
                .enumerate()
                .flat_map(|(i, av)| shape_mismatches(first, av, &format!("{at}[{i}]")))
                .collect(),
            None => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// The Makima-shaped answers in `crates/kennel-relay/tests/fixtures/makima.json`.
fn makima_fixture() -> anyhow::Result<serde_json::Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../kennel-relay/tests/fixtures/makima.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("failed to read {}: {e}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

#[test]
fn the_shape_check_catches_missing_fields_and_other_types() {
    let expected = serde_json::json!({"a": true, "b": "x", "c": {"d": 1}, "e": [{"f": "g"}]});
    let same =
        serde_json::json!({"a": false, "b": "y", "c": {"d": 2, "z": 0}, "e": [], "extra": 1});
    assert!(shape_mismatches(&expected, &same, "$").is_empty());
    let off = serde_json::json!({"a": "true", "c": {"d": null}, "e": [{"f": 1}]});
    assert_eq!(
        shape_mismatches(&expected, &off, "$"),
        vec![
            "$.a: expected boolean, got \"true\"",
            "$.b: missing",
            "$.c.d: expected number, got null",
            "$.e[0].f: expected string, got 1",
        ]
    );
}

/// A monitor written for a Makima edge relay reads kennel's: every field of the fixture is in
/// `/health`, `/status` and a `/tasks` row, with the same JSON type.
#[tokio::test]
async fn the_makima_fixture_fields_are_all_in_the_answers() -> anyhow::Result<()> {
    let fixture = makima_fixture()?;
    // Heartbeats every second, so `lastHeartbeat` is set soon.
    let srv = server_with("[server.protocol]\nheartbeat_interval = \"1s\"\n").await?;
    let api = srv.api();
    let r = relay(&srv, "").await?;
    let mut d = down(&r, "mk-a", 1).await?;
    let t = api.submit(&task("makima")).await?;
    let s = d.expect_spawn(WAIT).await?;
    d.accept(&s.task_id, s.attempt).await?;
    d.complete(&t.id, 1, true).await?;
    d.expect_ack(&t.id, 1, 2, WAIT).await?;

    let st = wait_relay(&r, |s| {
        s["lastHeartbeat"].is_string() && s["totalTasksProcessed"] == 1
    })
    .await?;
    assert_eq!(
        shape_mismatches(&fixture["status"], &st, "/status"),
        Vec::<String>::new()
    );
    assert_eq!(st["connectedDaemons"], 1, "{st}");
    // `lastHeartbeat` is `lastHeartbeatMs` in RFC 3339.
    let at = st["lastHeartbeat"].as_str().unwrap_or_default();
    let parsed = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)?;
    assert_eq!(
        Some((parsed.unix_timestamp_nanos() / 1_000_000) as i64),
        st["lastHeartbeatMs"].as_i64(),
        "{st}"
    );

    let (code, body) = r
        .api()
        .with_key(None)
        .raw(Method::GET, "/health", None, None)
        .await?;
    assert_eq!(code, StatusCode::OK, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(
        shape_mismatches(&fixture["health"], &health, "/health"),
        Vec::<String>::new()
    );
    assert_eq!(
        (
            health["status"].clone(),
            health["healthy"].clone(),
            health["upstreamConnected"].clone()
        ),
        ("ok".into(), true.into(), true.into())
    );

    let tasks = r.api().get::<serde_json::Value>("/tasks").await?;
    let row = &tasks["tasks"][0];
    assert_eq!(row["taskId"], t.id.as_str(), "{tasks}");
    assert_eq!(
        shape_mismatches(&fixture["tasksRow"], row, "/tasks[0]"),
        Vec::<String>::new()
    );
    assert_eq!(
        (row["status"].clone(), row["attemptCount"].clone()),
        ("completed".into(), 1.into()),
        "{tasks}"
    );
    Ok(())
}

/// `/health` stays open and answers 200 while the upstream is down, saying so; once the
/// coordinator is up the relay connects by itself and `/health` says that too.
#[tokio::test]
async fn health_follows_the_upstream_down_then_up() -> anyhow::Result<()> {
    let mut srv = server().await?;
    let key = srv
        .api()
        .create_key("relay", &[kennel_proto::api::Scope::Relay])
        .await?
        .key;
    srv.kill9().await?;
    let mut r = KennelRelay::start_to(bin(), &srv.url(), &key, "").await?;
    let anon = r.api().with_key(None);
    let (code, body) = anon.raw(Method::GET, "/health", None, None).await?;
    assert_eq!(code, StatusCode::OK, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(
        (
            h["status"].clone(),
            h["healthy"].clone(),
            h["upstreamConnected"].clone()
        ),
        ("degraded".into(), true.into(), false.into()),
        "{h}"
    );
    let st = r.api().get::<serde_json::Value>("/status").await?;
    assert_eq!(
        (
            st["upstreamConnected"].clone(),
            st["lastHeartbeat"].clone(),
            st["connectedDaemons"].clone()
        ),
        (false.into(), serde_json::Value::Null, 0.into()),
        "{st}"
    );

    srv.restart().await?;
    // The relay retries on its own (backoff from 1 s); allow a few rounds of it.
    r.wait_upstream(WAIT * 3).await?;
    let (code, body) = anon.raw(Method::GET, "/health", None, None).await?;
    assert_eq!(code, StatusCode::OK, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(
        (
            h["status"].clone(),
            h["healthy"].clone(),
            h["upstreamConnected"].clone()
        ),
        ("ok".into(), true.into(), true.into()),
        "{h}"
    );
    Ok(())
}

#[tokio::test]
async fn relay_help_names_the_makima_variables_and_their_precedence() -> anyhow::Result<()> {
    let out = kennel_testkit::server::isolated_command(bin())
        .args(["relay", "--help"])
        .output()
        .await?;
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for name in [
        "MAKIMA_SERVER_URL",
        "MAKIMA_API_KEY",
        "MAKIMA_AGENT_NAME",
        "KENNEL_URL",
        "KENNEL_API_KEY",
        "later ones winning",
    ] {
        assert!(help.contains(name), "`{name}` missing from:\n{help}");
    }
    Ok(())
}

/// `KENNEL_URL`/`KENNEL_API_KEY` beat the Makima variables, and the relay says so at start,
/// naming both variables and never a key.
#[tokio::test]
async fn a_kennel_variable_beating_a_makima_one_is_warned_about_without_values(
) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let srv = server().await?;
    let key = srv
        .api()
        .create_key("relay", &[kennel_proto::api::Scope::Relay])
        .await?
        .key;
    const MAKIMA_KEY: &str = "kn_makima_key_that_must_not_be_printed";
    let data = tempfile::tempdir()?;
    let config = kennel_testkit::server::config_file(&format!(
        "[relay]\nagent_name = \"warn-relay\"\ndaemon_keys = [\"{RELAY_DAEMON_KEY}\"]\n"
    ))?;
    let mut child = kennel_testkit::server::isolated_command(bin())
        .env("KENNEL_URL", srv.url())
        .env("KENNEL_API_KEY", &key)
        .env("MAKIMA_SERVER_URL", "http://127.0.0.1:9")
        .env("MAKIMA_API_KEY", MAKIMA_KEY)
        .arg("--config")
        .arg(config.path())
        .args(["relay", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let mut err_lines = BufReader::new(stderr).lines();
    let mut out_lines = BufReader::new(stdout).lines();
    // The warnings come first, before the relay listens.
    let mut warnings = Vec::new();
    kennel_testkit::within(WAIT, "the two warnings", async {
        while warnings.len() < 2 {
            match err_lines.next_line().await? {
                Some(l) => {
                    eprintln!("[kennel relay stderr] {l}");
                    if l.starts_with("kennel: warning:") {
                        warnings.push(l);
                    }
                }
                None => anyhow::bail!("the relay exited: {warnings:?}"),
            }
        }
        anyhow::Ok(())
    })
    .await??;
    assert!(
        warnings[0].contains("KENNEL_URL and MAKIMA_SERVER_URL")
            && warnings[0].contains("relay.upstream comes from KENNEL_URL"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].contains("KENNEL_API_KEY and MAKIMA_API_KEY")
            && warnings[1].contains("relay.api_key comes from KENNEL_API_KEY"),
        "{warnings:?}"
    );
    for w in &warnings {
        assert!(
            !w.contains(MAKIMA_KEY) && !w.contains(&key),
            "a key was printed: {w}"
        );
    }
    // And the kennel settings are the ones used: the relay reaches the coordinator.
    kennel_testkit::within(WAIT, "the relay to connect upstream", async {
        while let Some(l) = out_lines.next_line().await? {
            eprintln!("[kennel relay stdout] {l}");
            if l.starts_with("kennel: relay connected to") {
                return anyhow::Ok(());
            }
        }
        anyhow::bail!("the relay exited before it connected")
    })
    .await??;
    child.start_kill()?;
    child.wait().await?;
    Ok(())
}
