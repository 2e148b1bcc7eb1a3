//! The core promise under ordinary load and ordinary mistakes: more tasks than slots all run,
//! a capacity refusal is not the task's failure, a task nobody can take says why, and a clean
//! stop hands unfinished work back instead of failing it.

use std::path::Path;
use std::time::Duration;

use kennel_proto::api::{CreateTask, ServerStatus, TaskDetail};
use kennel_proto::link::{RejectCode, RepoSpec, TaskRef};
use kennel_proto::{AttemptStatus, TaskStatus};
use kennel_testkit::{wait_task_status, EventStream, GitFixture, KennelDaemon, KennelUp};

use crate::{bin, daemon, server, server_with, task, WAIT};

/// Long enough for git clones and shells on a loaded 2-core machine.
const SLOW: Duration = Duration::from_secs(90);

fn sh_daemon(slots: u32, shutdown_grace_secs: u64) -> String {
    format!(
        r#"
[daemon]
max_concurrent_tasks = {slots}
interrupt_grace = "1s"
shutdown_grace = "{shutdown_grace_secs}s"

[daemon.agents.sh]
kind = "command"
command = ["sh", "-c", "{{prompt}}"]
"#
    )
}

fn sh_task(name: &str, script: &str, git: &GitFixture, max_attempts: u32) -> CreateTask {
    CreateTask {
        name: name.into(),
        prompt: script.into(),
        agent: Some("sh".into()),
        repo: Some(RepoSpec {
            url: git.url(),
            base_branch: "main".into(),
        }),
        max_attempts: Some(max_attempts),
        ..CreateTask::default()
    }
}

/// A script that prints `started`, then waits until `flag` exists (the test's signal to
/// finish), then writes `out` and prints `done`.
fn wait_for_flag(flag: &Path, out: &str) -> String {
    format!(
        "echo started; while [ ! -e '{}' ]; do sleep 0.05; done; echo {out} > {out}.txt; echo done",
        flag.display()
    )
}

fn statuses(d: &TaskDetail) -> Vec<AttemptStatus> {
    d.attempts.iter().map(|a| a.status).collect()
}

#[tokio::test]
async fn more_quick_tasks_than_slots_all_run_and_none_is_refused() -> anyhow::Result<()> {
    let git = GitFixture::new(&[])?;
    let srv = server().await?;
    let _d = KennelDaemon::start(bin(), &srv, &sh_daemon(1, 5)).await?;
    let api = srv.api();
    let mut events = EventStream::connect(
        &format!("{}/api/v1/events?after=0", srv.url()),
        Some(srv.admin_key()),
        None,
    )
    .await?;
    let mut ids = Vec::new();
    for i in 0..12 {
        let t = api
            .submit(&sh_task(
                &format!("quick-{i}"),
                "echo $KENNEL_TASK_ID > $KENNEL_TASK_ID.txt",
                &git,
                3,
            ))
            .await?;
        ids.push(t.id);
    }
    let mut done = 0;
    while done < ids.len() {
        let m = events
            .wait_for(SLOW, |m| {
                kennel_testkit::is_task_status(m, TaskStatus::Completed)
                    || kennel_testkit::is_task_status(m, TaskStatus::Failed)
            })
            .await?;
        assert!(
            kennel_testkit::is_task_status(&m, TaskStatus::Completed),
            "a task failed: {}",
            m.data
        );
        done += 1;
    }
    for id in &ids {
        let d = api.task(id).await?;
        assert_eq!(
            statuses(&d),
            vec![AttemptStatus::Completed],
            "task {id} ran once, on its first attempt: {:?}",
            d.attempts
        );
        let branch = format!("kennel/{id}");
        assert_eq!(git.show(&branch, &format!("{id}.txt"))?, *id);
    }
    Ok(())
}

#[tokio::test]
async fn a_capacity_refusal_is_not_charged_and_the_daemon_counts_as_full_until_it_frees_a_slot(
) -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let mut d = daemon(&srv, "refuser", 1).await?;
    let mut t = task("refused");
    t.max_attempts = Some(1);
    let t = api.submit(&t).await?;
    let s = d.expect_spawn(WAIT).await?;
    d.reject_with(
        &s.task_id,
        1,
        "daemon at capacity (1 of 1 tasks running)",
        Some(RejectCode::AtCapacity),
    )
    .await?;
    d.expect_ack(&s.task_id, 1, 1, WAIT).await?;
    let after = api.task(&t.id).await?;
    assert_eq!(
        after.task.status,
        TaskStatus::Queued,
        "requeued, although its one attempt was refused"
    );
    assert_eq!(statuses(&after), vec![AttemptStatus::Rejected]);
    // Full until it says otherwise: a heartbeat with every slot busy changes nothing, and
    // the ack of a later report proves the coordinator has read past it.
    d.heartbeat(vec![TaskRef {
        task_id: "t-elsewhere".into(),
        attempt: 1,
    }])
    .await?;
    d.reject(&s.task_id, 1, "late").await?;
    let stale = d.expect_error(WAIT).await?;
    assert_eq!(stale.code, kennel_proto::ErrorCode::StaleAttempt);
    assert!(
        crate::only_acks_pending(&mut d),
        "nothing dispatched to a daemon that said it is full"
    );
    // A heartbeat with a free slot: the task comes back as attempt 2 and may still run.
    d.heartbeat(vec![]).await?;
    let s2 = d.expect_spawn(WAIT).await?;
    assert_eq!((s2.task_id.as_str(), s2.attempt), (t.id.as_str(), 2));
    d.accept(&t.id, 2).await?;
    d.complete(&t.id, 2, true).await?;
    let done = wait_task_status(
        &srv.url(),
        srv.admin_key(),
        &t.id,
        TaskStatus::Completed,
        WAIT,
    )
    .await?;
    assert_eq!(done.attempt, 2);

    // An untyped refusal is the task's: with one attempt it fails.
    let mut t = task("untyped");
    t.max_attempts = Some(1);
    let t = api.submit(&t).await?;
    let s = d.expect_spawn(WAIT).await?;
    d.reject(&s.task_id, 1, "agent profile `command` failed preflight")
        .await?;
    let failed =
        wait_task_status(&srv.url(), srv.admin_key(), &t.id, TaskStatus::Failed, WAIT).await?;
    assert!(
        failed
            .error
            .unwrap_or_default()
            .contains("no attempts left"),
        "charged"
    );
    Ok(())
}

#[tokio::test]
async fn a_task_no_daemon_can_take_says_why_everywhere_and_can_time_out() -> anyhow::Result<()> {
    let srv = server_with("[server.scheduler]\nunschedulable_timeout = \"4s\"\n").await?;
    let api = srv.api();
    let url = srv.url();

    // No daemon at all.
    let lonely = api.submit(&task("lonely")).await?;
    assert!(
        lonely
            .waiting
            .as_deref()
            .unwrap_or_default()
            .contains("no daemon is connected"),
        "the answer to the submit says why at once: {:?}",
        lonely.waiting
    );

    let d = daemon(&srv, "offers-command", 2).await?;
    let daemon_id = d.daemon_id().to_string();
    let mut events = EventStream::connect(
        &format!("{url}/api/v1/events?after=0"),
        Some(srv.admin_key()),
        None,
    )
    .await?;
    let mut typo = task("typo");
    typo.agent = Some("nosuch".into());
    let typo = api.submit(&typo).await?;
    // Test daemons offer `claude` and `command`.
    let want = format!(
        "no connected daemon offers agent \"nosuch\" (offered: claude, command on {daemon_id})"
    );
    let ev = events
        .wait_for(WAIT, |m| {
            m.event == "task.waiting" && m.data.contains(&typo.id)
        })
        .await?;
    assert_eq!(
        ev.json()?.pointer("/data/reason").and_then(|r| r.as_str()),
        Some(want.as_str()),
        "{}",
        ev.data
    );
    let shown = api.task(&typo.id).await?;
    assert_eq!(shown.task.status, TaskStatus::Queued);
    assert_eq!(shown.task.waiting.as_deref(), Some(want.as_str()));
    let status: ServerStatus = api.get("/api/v1/status").await?;
    assert!(
        status
            .waiting
            .iter()
            .any(|w| w.reason == want && w.tasks == 1 && w.example_task_id == typo.id),
        "{:?}",
        status.waiting
    );

    // The CLI: a warning at submit, the reason while following, the failure at the end.
    let out = tokio::process::Command::new(bin())
        .args(["task", "submit", "typo again", "--agent", "nosuch", "-f"])
        .env("KENNEL_URL", &url)
        .env("KENNEL_API_KEY", srv.admin_key())
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a task that did not complete: {stderr}"
    );
    assert!(
        stderr.contains(
            "warning: no daemon has ever offered agent \"nosuch\" (offered: claude, command)"
        ),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("waiting: {want}")), "{stderr}");
    assert!(
        stderr.contains("failed: no daemon could run it for 4s"),
        "{stderr}"
    );

    // The timeout fails the first one too, with the reason.
    let failed =
        wait_task_status(&url, srv.admin_key(), &typo.id, TaskStatus::Failed, WAIT).await?;
    let error = failed.error.unwrap_or_default();
    assert!(
        error.contains("unschedulable_timeout") && error.contains(&want),
        "{error}"
    );
    Ok(())
}

/// Waits until the task's live output shows a line containing `needle`.
async fn wait_output(
    srv: &kennel_testkit::KennelServer,
    id: &str,
    needle: &str,
) -> anyhow::Result<()> {
    let url = format!("{}/api/v1/tasks/{id}/output/stream", srv.url());
    let mut s = EventStream::connect(&url, Some(srv.admin_key()), None).await?;
    s.wait_for(SLOW, |m| m.event == "output" && m.data.contains(needle))
        .await?;
    Ok(())
}

/// The daemon's line when a clean stop begins with agents still running.
fn stop_announced(l: &str) -> bool {
    l.starts_with("kennel: stopping: no new work")
}

#[tokio::test]
async fn a_daemon_stopped_cleanly_lets_running_agents_finish_within_the_grace() -> anyhow::Result<()>
{
    let git = GitFixture::new(&[])?;
    let flags = tempfile::tempdir()?;
    let srv = server().await?;
    let api = srv.api();
    let mut d = KennelDaemon::start(bin(), &srv, &sh_daemon(2, 60)).await?;
    let flag = flags.path().join("finish");
    let t = api
        .submit(&sh_task(
            "graceful",
            &wait_for_flag(&flag, "graceful"),
            &git,
            1,
        ))
        .await?;
    wait_output(&srv, &t.id, "started").await?;
    d.sigterm()?;
    d.wait_line(WAIT, stop_announced).await?;
    // Stopping: the coordinator gives it nothing new meanwhile.
    let other = api.submit(&sh_task("later", "true", &git, 1)).await?;
    std::fs::write(&flag, "")?;
    let status = d.wait_exit(SLOW).await?;
    assert!(status.success(), "a clean stop exits 0: {status:?}");
    let done = api.task(&t.id).await?;
    assert_eq!(statuses(&done), vec![AttemptStatus::Completed]);
    assert_eq!(
        git.show(&format!("kennel/{}", t.id), "graceful.txt")?,
        "graceful"
    );
    let later = api.task(&other.id).await?;
    assert!(
        later
            .attempts
            .iter()
            .all(|a| a.status == AttemptStatus::Rejected),
        "a stopping daemon runs nothing new: {:?}",
        later.attempts
    );
    assert_eq!(later.task.status, TaskStatus::Queued);
    Ok(())
}

#[tokio::test]
async fn a_daemon_stopped_cleanly_hands_unfinished_work_back_without_charging_it(
) -> anyhow::Result<()> {
    let git = GitFixture::new(&[])?;
    let flags = tempfile::tempdir()?;
    let srv = server().await?;
    let api = srv.api();
    let mut d = KennelDaemon::start(bin(), &srv, &sh_daemon(2, 1)).await?;
    let mut events = EventStream::connect(
        &format!("{}/api/v1/events?after=0", srv.url()),
        Some(srv.admin_key()),
        None,
    )
    .await?;
    let flag = flags.path().join("finish");
    let t = api
        .submit(&sh_task(
            "handed-back",
            &wait_for_flag(&flag, "back"),
            &git,
            1,
        ))
        .await?;
    wait_output(&srv, &t.id, "started").await?;
    let status = d.terminate(SLOW).await?;
    assert!(status.success(), "a clean stop exits 0: {status:?}");
    let closed = events
        .wait_for(WAIT, |m| m.event == "daemon.disconnected")
        .await?;
    assert!(
        closed.data.contains("shutting down (going away"),
        "the daemon closed its link with a Close frame: {}",
        closed.data
    );
    let back = api.task(&t.id).await?;
    assert_eq!(back.task.status, TaskStatus::Queued, "back in the queue");
    assert_eq!(statuses(&back), vec![AttemptStatus::Returned]);

    // The only attempt it was allowed was not used up: it runs again and completes.
    d.start_again().await?;
    wait_output(&srv, &t.id, "started").await?;
    std::fs::write(&flag, "")?;
    let done = wait_task_status(
        &srv.url(),
        srv.admin_key(),
        &t.id,
        TaskStatus::Completed,
        SLOW,
    )
    .await?;
    assert_eq!(done.attempt, 2);
    assert_eq!(git.show(&format!("kennel/{}", t.id), "back.txt")?, "back");
    Ok(())
}

#[tokio::test]
async fn kennel_up_stopped_twice_hands_the_running_task_back_and_runs_it_after_a_restart(
) -> anyhow::Result<()> {
    use nix::sys::signal::Signal;
    let git = GitFixture::new(&[])?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("kennel.toml");
    std::fs::write(&cfg, sh_daemon(2, 600))?;
    let data = dir.path().join("data");
    let flag = dir.path().join("finish");
    let mut up = KennelUp::start(bin(), &cfg, &data, WAIT).await?;
    let (url, key) = (up.url().to_string(), up.admin_key()?);
    let t = up
        .api()?
        .submit(&sh_task("up-task", &wait_for_flag(&flag, "up"), &git, 1))
        .await?;
    {
        let stream = format!("{url}/api/v1/tasks/{}/output/stream", t.id);
        let mut s = EventStream::connect(&stream, Some(&key), None).await?;
        s.wait_for(SLOW, |m| m.event == "output" && m.data.contains("started"))
            .await?;
    }
    up.signal(Signal::SIGTERM)?;
    up.wait_line(WAIT, stop_announced).await?;
    // The grace is 10 minutes; a second signal stops it now.
    up.signal(Signal::SIGINT)?;
    let (status, _) = up.wait_exit(WAIT).await?;
    assert!(status.success(), "{status:?}");

    let mut up = KennelUp::start(bin(), &cfg, &data, WAIT).await?;
    let url = up.url().to_string();
    let back = up.api()?.task(&t.id).await?;
    assert_eq!(
        back.attempts.first().map(|a| a.status),
        Some(AttemptStatus::Returned),
        "attempt 1 was handed back, not failed: {:?}",
        back.attempts
    );
    std::fs::write(&flag, "")?;
    let done = wait_task_status(&url, &key, &t.id, TaskStatus::Completed, SLOW).await?;
    assert_eq!(done.attempt, 2, "its one allowed attempt was not used up");
    assert_eq!(git.show(&format!("kennel/{}", t.id), "up.txt")?, "up");
    up.signal(Signal::SIGTERM)?;
    up.wait_exit(WAIT).await?;
    Ok(())
}
