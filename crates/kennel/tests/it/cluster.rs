//! Several coordinators on one PostgreSQL, as real processes: `kennel server` with
//! `server.database_url` pointing at a fresh schema of the PostgreSQL at
//! `KENNEL_TEST_POSTGRES_URL` (default `postgres://root@127.0.0.1:5432/test`), real daemons
//! linked to different coordinators, and the API and event streams of others.

use std::collections::BTreeMap;
use std::time::Duration;

use kennel_proto::api::{CreateTask, Task};
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
    let _d = daemon(b, &[]).await?;
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

#[tokio::test]
async fn kill_9_of_a_coordinator_loses_no_task_and_runs_none_twice() -> anyhow::Result<()> {
    let schema = PgSchema::create().await?;
    let mut cs = coordinators(&schema, 3).await?;
    let d1 = daemon(&cs[0], &[&cs[1], &cs[2]]).await?;
    let _d2 = daemon(&cs[2], &[&cs[1], &cs[0]]).await?;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let t = cs[1]
            .api()
            .submit(&sh(&format!("t{i}"), &format!("sleep 0.3; echo done {i}")))
            .await?;
        tasks.push(t);
    }
    // Once a few have finished, the first coordinator dies; its daemon moves on.
    wait(&cs[1], &tasks[2], TaskStatus::Completed).await?;
    cs[0].kill9().await?;
    d1.wait_line(SLOW, |l| {
        l.starts_with("kennel: connected to ") && !l.contains(&cs[0].ws_url())
    })
    .await?;

    let mut runs = BTreeMap::new();
    for (i, t) in tasks.iter().enumerate() {
        let done = wait(&cs[2], t, TaskStatus::Completed).await?;
        let detail = cs[1].api().task(&t.id).await?;
        let completed = detail
            .attempts
            .iter()
            .filter(|a| a.status.to_string() == "completed")
            .count();
        assert_eq!(
            completed, 1,
            "task {i} completed {completed} times: {detail:?}"
        );
        let out = cs[2].api().output(&t.id, Some(done.attempt), 0).await?;
        let text: String = out.items.iter().map(|o| o.output.as_str()).collect();
        assert!(text.contains(&format!("done {i}")), "task {i}: {text:?}");
        runs.insert(i, detail.attempts.len());
    }
    drop(cs);
    schema.drop_schema().await?;
    eprintln!("attempts per task: {runs:?}");
    Ok(())
}
