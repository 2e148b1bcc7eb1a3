//! Several coordinators on one PostgreSQL, as real processes: `kennel server` with
//! `server.database_url` pointing at a fresh schema of the PostgreSQL at
//! `KENNEL_TEST_POSTGRES_URL` (default `postgres://root@127.0.0.1:5432/test`), real daemons
//! linked to different coordinators, and the API and event streams of others.

use std::collections::BTreeMap;
use std::time::Duration;

use kennel_proto::api::{CreateTask, Daemon, ServerStatus, Task};
use kennel_proto::TaskStatus;
use kennel_testkit::{wait_task_status, EventStream, KennelDaemon, KennelServer, PgSchema};

use crate::bin;

/// Long enough for a shell, a store round trip and a reconnect on a loaded 2-core machine.
const SLOW: Duration = Duration::from_secs(60);

/// The same on every coordinator: the database and the secret API keys are hashed with.
fn shared(schema: &PgSchema) -> String {
    format!(
        "[server]\ndatabase_url = \"{}\"\n\
         [server.auth]\nhash_key = \"e2e-cluster-hash-key-0123456789abcdef\"\n\
         [server.cluster]\nbeat = \"200ms\"\ndead_after = \"1s\"\n\
         [server.scheduler]\nreattach_grace = \"2s\"\n",
        schema.url()
    )
}

async fn coordinators(schema: &PgSchema, n: usize) -> anyhow::Result<Vec<KennelServer>> {
    let mut all = Vec::new();
    for _ in 0..n {
        all.push(KennelServer::start_with_config(bin(), &shared(schema)).await?);
    }
    Ok(all)
}

/// A daemon with two `sh` slots linked to `srv`, trying `fallbacks` in order when it cannot.
async fn daemon(srv: &KennelServer, fallbacks: &[&KennelServer]) -> anyhow::Result<KennelDaemon> {
    let urls: Vec<String> = fallbacks
        .iter()
        .map(|s| format!("\"{}\"", s.ws_url()))
        .collect();
    let toml = format!(
        "[daemon]\nmax_concurrent_tasks = 2\ninterrupt_grace = \"1s\"\nfallback_servers = [{}]\n\
         [daemon.agents.sh]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"{{prompt}}\"]\n",
        urls.join(", ")
    );
    KennelDaemon::start(bin(), srv, &toml).await
}

fn sh(name: &str, script: &str) -> CreateTask {
    CreateTask {
        name: name.into(),
        prompt: script.into(),
        agent: Some("sh".into()),
        ..CreateTask::default()
    }
}

async fn wait(srv: &KennelServer, t: &Task, status: TaskStatus) -> anyhow::Result<Task> {
    wait_task_status(&srv.url(), srv.admin_key(), &t.id, status, SLOW).await
}

#[tokio::test]
async fn any_coordinator_takes_submits_streams_events_and_cancels_work_linked_to_another(
) -> anyhow::Result<()> {
    let schema = PgSchema::create().await?;
    let cs = coordinators(&schema, 3).await?;
    let (a, b, c) = (&cs[0], &cs[1], &cs[2]);
    let d = daemon(b, &[]).await?;
    // Every coordinator shows B's daemon connected and counts its slots, not only B.
    for srv in [a, b, c] {
        let listed: Vec<Daemon> = srv.api().get("/api/v1/daemons").await?;
        let shown: Vec<_> = listed
            .iter()
            .map(|x| (x.machine_id.as_str(), x.connected))
            .collect();
        assert_eq!(
            shown,
            [(d.machine_id(), true)],
            "as {} lists them",
            srv.url()
        );
        let status: ServerStatus = srv.api().get("/api/v1/status").await?;
        assert_eq!(
            (status.daemons_connected, status.capacity_total),
            (1, 2),
            "as {} counts them",
            srv.url()
        );
    }
    let mut events_a = EventStream::connect(
        &format!("{}/api/v1/events", a.url()),
        Some(a.admin_key()),
        None,
    )
    .await?;

    // Submitted on A, run by B's daemon, seen finished on C and streamed on A.
    let t = a.api().submit(&sh("hello", "echo hello from b")).await?;
    wait(c, &t, TaskStatus::Completed).await?;
    events_a
        .wait_for(SLOW, |m| {
            m.event == "task.status" && m.data.contains(&t.id) && m.data.contains("completed")
        })
        .await?;
    let out = c.api().output(&t.id, None, 0).await?;
    assert!(
        out.items.iter().any(|o| o.output.contains("hello from b")),
        "{out:?}"
    );

    // Cancelled on A while it runs on B's daemon: the daemon stops it.
    let long = c
        .api()
        .submit(&sh("long", "echo started; sleep 60"))
        .await?;
    wait(a, &long, TaskStatus::Running).await?;
    let cancelled: Task = a
        .api()
        .post_empty(&format!("/api/v1/tasks/{}/cancel", long.id))
        .await?;
    assert_eq!(cancelled.status, TaskStatus::Cancelled);
    drop(cs);
    schema.drop_schema().await
}

/// The lines a task of [`lines`] prints, in order.
fn expected_lines(i: usize) -> Vec<String> {
    (1..=3).map(|n| format!("line {n} of {i}")).collect()
}

/// The lines of output of attempt `attempt` of task `id`, in order.
async fn output_lines(srv: &KennelServer, id: &str, attempt: u32) -> anyhow::Result<Vec<String>> {
    let out = srv.api().output(id, Some(attempt), 0).await?;
    Ok(out.items.into_iter().map(|o| o.output).collect())
}

/// A task printing three numbered lines after a short pause, so that some are running at any
/// moment.
fn lines(i: usize) -> CreateTask {
    sh(
        &format!("t{i}"),
        &format!("sleep 0.05; for n in 1 2 3; do echo line $n of {i}; done"),
    )
}

/// Every task completed with exactly one completed attempt, and that attempt's output is what
/// [`lines`] prints, in order; returns the attempts per task.
async fn all_completed_once(
    srv: &KennelServer,
    tasks: &[Task],
) -> anyhow::Result<BTreeMap<usize, usize>> {
    let mut runs = BTreeMap::new();
    for (i, t) in tasks.iter().enumerate() {
        let done = wait(srv, t, TaskStatus::Completed).await?;
        let detail = srv.api().task(&t.id).await?;
        let completed = detail
            .attempts
            .iter()
            .filter(|a| a.status.to_string() == "completed")
            .count();
        assert_eq!(
            completed, 1,
            "task {i} completed {completed} times: {detail:?}"
        );
        let printed = output_lines(srv, &t.id, done.attempt).await?;
        assert_eq!(
            printed,
            expected_lines(i),
            "task {i}: output complete and in order"
        );
        runs.insert(i, detail.attempts.len());
    }
    Ok(runs)
}

#[tokio::test]
async fn kill_9_of_a_coordinator_loses_no_task_and_runs_none_twice() -> anyhow::Result<()> {
    let schema = PgSchema::create().await?;
    let mut cs = coordinators(&schema, 3).await?;
    // Three daemons of two slots, one on each coordinator: six slots for 200 tasks.
    let d1 = daemon(&cs[0], &[&cs[1], &cs[2]]).await?;
    let _d2 = daemon(&cs[1], &[&cs[2], &cs[0]]).await?;
    let _d3 = daemon(&cs[2], &[&cs[1], &cs[0]]).await?;
    let mut tasks = Vec::new();
    for i in 0..200 {
        tasks.push(cs[1].api().submit(&lines(i)).await?);
    }
    // Once some have finished, the first coordinator dies; its daemon moves on.
    wait(&cs[1], &tasks[20], TaskStatus::Completed).await?;
    cs[0].kill9().await?;
    d1.wait_line(SLOW, |l| {
        l.starts_with("kennel: connected to ") && !l.contains(&cs[0].ws_url())
    })
    .await?;

    let runs = all_completed_once(&cs[2], &tasks).await?;
    drop(cs);
    schema.drop_schema().await?;
    let retried: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!("tasks with more than one attempt: {retried:?}");
    Ok(())
}

/// An SSE client that loses its coordinator resumes on another with `Last-Event-ID` and
/// misses nothing: event ids are global.
#[tokio::test]
async fn an_event_stream_resumes_on_another_coordinator_from_its_last_event_id(
) -> anyhow::Result<()> {
    let schema = PgSchema::create().await?;
    let cs = coordinators(&schema, 3).await?;
    let (a, b, c) = (&cs[0], &cs[1], &cs[2]);
    let events = |srv: &KennelServer| format!("{}/api/v1/events", srv.url());
    let mut on_a = EventStream::connect(&events(a), Some(a.admin_key()), None).await?;
    let first = b.api().submit(&sh("first", "true")).await?;
    let seen = on_a
        .wait_for(SLOW, |m| {
            m.event == "task.created" && m.data.contains(&first.id)
        })
        .await?;
    let last = seen.id.clone();
    drop(on_a);

    // While no stream is open, more happens, on two other coordinators.
    let mut later = Vec::new();
    for (i, srv) in [b, c, b, c].into_iter().enumerate() {
        later.push(srv.api().submit(&sh(&format!("later{i}"), "true")).await?);
    }
    let mut on_c = EventStream::connect(&events(c), Some(c.admin_key()), Some(&last)).await?;
    let mut expected: i64 = last.parse()?;
    let mut created = Vec::new();
    while created.len() < later.len() {
        let m = on_c.next(SLOW).await?;
        let id: i64 = m.id.parse()?;
        expected += 1;
        assert_eq!(id, expected, "ids continue from {last} without a gap");
        if m.event == "task.created" {
            created.push(m.json()?["taskId"].as_str().unwrap_or_default().to_string());
        }
    }
    let later: Vec<String> = later.into_iter().map(|t| t.id).collect();
    assert_eq!(created, later, "every later submit, in order");
    drop(cs);
    schema.drop_schema().await
}

/// A key revoked on one coordinator stops working on the others at once: they hear of it and
/// drop it from their key cache, so it does not live on for the cache's 5 s. (The deadline is
/// below those 5 s, and far above the tens of milliseconds it takes.)
#[tokio::test]
async fn a_key_revoked_on_one_coordinator_is_refused_by_every_coordinator() -> anyhow::Result<()> {
    let schema = PgSchema::create().await?;
    let cs = coordinators(&schema, 3).await?;
    let key = cs[0]
        .api()
        .create_key("ci", &[kennel_proto::api::Scope::Client])
        .await?;
    let status = |srv: &KennelServer| {
        let api = srv.api();
        let secret = key.key.clone();
        async move {
            let (status, _) = api
                .raw(reqwest::Method::GET, "/api/v1/tasks", Some(&secret), None)
                .await?;
            anyhow::Ok(status.as_u16())
        }
    };
    for srv in &cs {
        assert_eq!(
            status(srv).await?,
            200,
            "the new key works on {}",
            srv.url()
        );
    }
    let _: serde_json::Value = cs[2]
        .api()
        .delete(&format!("/api/v1/keys/{}", key.info.id))
        .await?;
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(4);
    let mut refused = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while refused.len() < cs.len() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the revoked key still works on some coordinators after 4 s: refused by {refused:?}"
        );
        tick.tick().await;
        for srv in &cs {
            if !refused.contains_key(&srv.url()) && status(srv).await? == 401 {
                refused.insert(srv.url(), started.elapsed());
            }
        }
    }
    eprintln!("refused after: {refused:?}");
    drop(cs);
    schema.drop_schema().await
}

/// Every coordinator dies at once and comes back: finished work, queued work, keys and a task
/// that was running all survive.
#[tokio::test]
async fn restarting_every_coordinator_keeps_tasks_keys_and_running_work() -> anyhow::Result<()> {
    let schema = PgSchema::create().await?;
    let mut cs = coordinators(&schema, 2).await?;
    let key = cs[0]
        .api()
        .create_key("ci", &[kennel_proto::api::Scope::Client])
        .await?;
    let _d = daemon(&cs[0], &[&cs[1]]).await?;
    let done = cs[1].api().submit(&lines(0)).await?;
    wait(&cs[0], &done, TaskStatus::Completed).await?;
    let running = cs[1]
        .api()
        .submit(&sh("running", "sleep 3; echo still here"))
        .await?;
    wait(&cs[1], &running, TaskStatus::Running).await?;

    for c in cs.iter_mut() {
        c.kill9().await?;
    }
    for c in cs.iter_mut() {
        c.restart().await?;
    }
    let with_key = cs[1].api().with_key(Some(key.key.clone()));
    let kept = with_key.task(&done.id).await?;
    assert_eq!(kept.task.status, TaskStatus::Completed);
    all_completed_once(&cs[1], &[done]).await?;
    let finished = wait(&cs[0], &running, TaskStatus::Completed).await?;
    let printed = output_lines(&cs[0], &running.id, finished.attempt).await?;
    assert_eq!(printed, ["still here"]);
    // Work submitted after the restart runs too.
    let after = cs[0].api().submit(&lines(1)).await?;
    let finished = wait(&cs[1], &after, TaskStatus::Completed).await?;
    let printed = output_lines(&cs[1], &after.id, finished.attempt).await?;
    assert_eq!(printed, expected_lines(1));
    drop(cs);
    schema.drop_schema().await
}

/// A task no daemon of any coordinator can run: every coordinator, leading or not, says why in
/// the task and in its status, and the submit's answer already said it.
#[tokio::test]
async fn every_coordinator_says_why_a_task_waits() -> anyhow::Result<()> {
    let schema = PgSchema::create().await?;
    let cs = coordinators(&schema, 3).await?;
    let _d = daemon(&cs[0], &[]).await?;
    let mut streams = Vec::new();
    for srv in &cs {
        let url = format!("{}/api/v1/events", srv.url());
        streams.push(EventStream::connect(&url, Some(srv.admin_key()), None).await?);
    }
    let t = cs[2]
        .api()
        .submit(&CreateTask {
            agent: Some("nosuch".into()),
            ..sh("typo", "true")
        })
        .await?;
    let said = t.waiting.clone().unwrap_or_default();
    assert!(
        said.contains("no connected daemon offers agent \"nosuch\""),
        "the submit's answer: {said:?}"
    );
    // A coordinator keeps the leader's reason before its stream shows the event.
    for (srv, stream) in cs.iter().zip(&mut streams) {
        stream
            .wait_for(SLOW, |m| {
                m.event == "task.waiting" && m.data.contains(&t.id)
            })
            .await?;
        let shown = srv.api().task(&t.id).await?.task.waiting;
        let reason = shown.unwrap_or_default();
        assert!(reason.contains("nosuch"), "{}: {reason:?}", srv.url());
        let status: kennel_proto::api::ServerStatus = srv.api().get("/api/v1/status").await?;
        let summary = status.waiting.iter().find(|w| w.example_task_id == t.id);
        assert_eq!(
            summary.map(|w| w.reason.as_str()),
            Some(reason.as_str()),
            "{}: {:?}",
            srv.url(),
            status.waiting
        );
    }
    drop(cs);
    schema.drop_schema().await
}
