//! The real daemon (`kennel daemon`) running real processes in real git worktrees, against
//! the real coordinator: branches pushed, concurrency, pause/resume, interrupts, rejections,
//! crashes of either side, and awkward output.

use std::time::Duration;

use kennel_proto::api::{CreateTask, Daemon, Task};
use kennel_proto::link::{OutputStream, RepoSpec};
use kennel_proto::TaskStatus;
use kennel_testkit::{wait_task_status, EventStream, GitFixture, KennelDaemon, KennelServer};

use crate::{bin, server, WAIT};

/// Long enough for a cold git clone and a shell on a loaded 2-core machine.
const SLOW: Duration = Duration::from_secs(60);

const DAEMON: &str = r#"
[daemon]
max_concurrent_tasks = 2
interrupt_grace = "2s"

[daemon.agents.sh]
kind = "command"
command = ["sh", "-c", "{prompt}"]
"#;

fn sh(name: &str, script: &str, repo: Option<&GitFixture>) -> CreateTask {
    CreateTask {
        name: name.into(),
        prompt: script.into(),
        agent: Some("sh".into()),
        repo: repo.map(|g| RepoSpec {
            url: g.url(),
            base_branch: "main".into(),
        }),
        max_attempts: Some(1),
        ..CreateTask::default()
    }
}

async fn setup() -> anyhow::Result<(KennelServer, KennelDaemon)> {
    let srv = server().await?;
    let d = KennelDaemon::start(bin(), &srv, DAEMON).await?;
    Ok((srv, d))
}

/// Stdout text of an attempt, one entry per stored chunk.
async fn stdout_of(srv: &KennelServer, id: &str, attempt: u32) -> anyhow::Result<Vec<String>> {
    let page = srv.api().output(id, Some(attempt), 0).await?;
    Ok(page
        .items
        .into_iter()
        .filter(|c| c.stream == OutputStream::Stdout)
        .map(|c| c.output)
        .collect())
}

/// The task's live output stream, from its first chunk.
async fn output_stream(srv: &KennelServer, id: &str) -> anyhow::Result<EventStream> {
    let url = format!("{}/api/v1/tasks/{id}/output/stream", srv.url());
    EventStream::connect(&url, Some(srv.admin_key()), None).await
}

/// Waits for an output chunk containing `needle` on the task's live output stream.
async fn wait_output(srv: &KennelServer, id: &str, needle: &str) -> anyhow::Result<()> {
    let mut s = output_stream(srv, id).await?;
    s.wait_for(SLOW, |m| m.event == "output" && m.data.contains(needle))
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_task_pushes_its_branch_and_reports_the_commit() -> anyhow::Result<()> {
    let git = GitFixture::new(&[])?;
    let (srv, _d) = setup().await?;
    let api = srv.api();
    let t = api
        .submit(&sh(
            "hello",
            "echo hello > hello.txt && echo wrote it",
            Some(&git),
        ))
        .await?;
    let done = wait_task_status(
        &srv.url(),
        srv.admin_key(),
        &t.id,
        TaskStatus::Completed,
        SLOW,
    )
    .await?;
    let branch = format!("kennel/{}", t.id);
    assert_eq!(done.branch.as_deref(), Some(branch.as_str()));
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(
        done.commit,
        git.rev(&format!("refs/heads/{branch}")),
        "reported commit is the pushed one"
    );
    assert_eq!(git.show(&branch, "hello.txt")?, "hello");
    assert_eq!(
        git.show(&branch, "README.md")?,
        "hello",
        "branched from main"
    );
    assert_eq!(stdout_of(&srv, &t.id, 1).await?, vec!["wrote it"]);

    // Nothing to commit is a success without a branch, said plainly.
    let t = api.submit(&sh("noop", "true", Some(&git))).await?;
    let done = wait_task_status(
        &srv.url(),
        srv.admin_key(),
        &t.id,
        TaskStatus::Completed,
        SLOW,
    )
    .await?;
    assert_eq!(done.branch, None);
    let out = api.output(&t.id, Some(1), 0).await?;
    assert!(
        out.items
            .iter()
            .any(|c| c.output.contains("made no changes")),
        "{:?}",
        out.items
    );

    // A failing agent fails the task with its exit code and the last line it wrote on stderr
    // (its own words), and pushes nothing.
    let t = api
        .submit(&sh(
            "fails",
            "echo 'warning: slow' >&2; echo 'error: no such file: spec.md' >&2; echo done; exit 3",
            Some(&git),
        ))
        .await?;
    let done =
        wait_task_status(&srv.url(), srv.admin_key(), &t.id, TaskStatus::Failed, SLOW).await?;
    assert_eq!(done.exit_code, Some(3));
    assert_eq!(
        done.error.as_deref(),
        Some("the agent exited with code 3: error: no such file: spec.md")
    );
    assert_eq!(git.rev(&format!("refs/heads/kennel/{}", t.id)), None);
    Ok(())
}

#[tokio::test]
async fn two_tasks_on_one_repository_run_concurrently_in_separate_worktrees() -> anyhow::Result<()>
{
    let git = GitFixture::new(&[])?;
    let (srv, _d) = setup().await?;
    let api = srv.api();
    let gate = tempfile::tempdir()?;
    let mark = gate.path().join("go");
    // Neither can finish before the test opens the gate, so both must run at the same time.
    let script = format!(
        "pwd; echo $KENNEL_TASK_ID > who.txt; while [ ! -e {} ]; do sleep 0.05; done",
        mark.display()
    );
    let a = api.submit(&sh("a", &script, Some(&git))).await?;
    let b = api.submit(&sh("b", &script, Some(&git))).await?;
    wait_task_status(
        &srv.url(),
        srv.admin_key(),
        &a.id,
        TaskStatus::Running,
        SLOW,
    )
    .await?;
    wait_task_status(
        &srv.url(),
        srv.admin_key(),
        &b.id,
        TaskStatus::Running,
        SLOW,
    )
    .await?;
    wait_output(&srv, &a.id, "/").await?;
    wait_output(&srv, &b.id, "/").await?;
    std::fs::write(&mark, "")?;
    for t in [&a, &b] {
        let done = wait_task_status(
            &srv.url(),
            srv.admin_key(),
            &t.id,
            TaskStatus::Completed,
            SLOW,
        )
        .await?;
        let branch = done.branch.unwrap_or_default();
        assert_eq!(git.show(&branch, "who.txt")?, t.id);
    }
    let (wa, wb) = (
        stdout_of(&srv, &a.id, 1).await?,
        stdout_of(&srv, &b.id, 1).await?,
    );
    assert_ne!(wa[0], wb[0], "separate worktrees");
    Ok(())
}

#[tokio::test]
async fn pause_stops_output_and_resume_continues_it() -> anyhow::Result<()> {
    let (srv, _d) = setup().await?;
    let api = srv.api();
    let t = api
        .submit(&sh(
            "ticker",
            "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.05; done",
            None,
        ))
        .await?;
    let mut s = output_stream(&srv, &t.id).await?;
    s.wait_for(SLOW, |m| m.data.contains("tick 3")).await?;
    let paused: Task = api
        .post_empty(&format!("/api/v1/tasks/{}/pause", t.id))
        .await?;
    assert_eq!(paused.status, TaskStatus::Paused);
    s.wait_for(SLOW, |m| m.data.contains("kennel: paused"))
        .await?;
    // Lines already in the pipe may still arrive; after that, silence.
    while s.next(Duration::from_millis(500)).await.is_ok() {}
    let quiet = s.next(Duration::from_millis(1500)).await;
    assert!(quiet.is_err(), "output while paused: {quiet:?}");
    let before = stdout_of(&srv, &t.id, 1).await?;
    let last: u64 = before
        .last()
        .and_then(|l| l.strip_prefix("tick "))
        .unwrap_or("0")
        .parse()?;

    let _: Task = api
        .post_empty(&format!("/api/v1/tasks/{}/resume", t.id))
        .await?;
    let next = format!("tick {}", last + 1);
    s.wait_for(SLOW, |m| m.data.contains(&format!("\"{next}\"")))
        .await?;
    let _: Task = api
        .post_empty(&format!("/api/v1/tasks/{}/cancel", t.id))
        .await?;
    Ok(())
}

fn gone(pid: i32) -> bool {
    // Gone, or a zombie waiting for an init that may not reap it in this container.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

#[tokio::test]
async fn interrupt_kills_the_whole_process_group() -> anyhow::Result<()> {
    let (srv, _d) = setup().await?;
    let api = srv.api();
    let t = api
        .submit(&sh(
            "orphans",
            "sleep 1000 & echo child $!; sleep 1000 & echo child $!; wait",
            None,
        ))
        .await?;
    // Seq 1 is taskAccepted; the two `child` lines are seqs 2 and 3.
    let mut s = output_stream(&srv, &t.id).await?;
    s.wait_for(SLOW, |m| m.id == "1:3").await?;
    let pids: Vec<i32> = stdout_of(&srv, &t.id, 1)
        .await?
        .iter()
        .filter_map(|l| l.strip_prefix("child ").and_then(|p| p.parse().ok()))
        .collect();
    assert_eq!(pids.len(), 2);
    assert!(
        pids.iter().all(|p| !gone(*p)),
        "children run before the interrupt"
    );
    let c: Task = api
        .post_empty(&format!("/api/v1/tasks/{}/cancel", t.id))
        .await?;
    assert_eq!(c.status, TaskStatus::Cancelled);
    let deadline = tokio::time::Instant::now() + SLOW;
    while !pids.iter().all(|p| gone(*p)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "orphans left: {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_missing_agent_binary_is_rejected_with_a_reason() -> anyhow::Result<()> {
    let tools = tempfile::tempdir()?;
    let ghost = tools.path().join("ghost-agent");
    std::fs::write(&ghost, "#!/bin/sh\necho ghost\n")?;
    std::fs::set_permissions(&ghost, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let cfg = format!(
        "{DAEMON}\n[daemon.agents.ghost]\nkind = \"command\"\ncommand = [\"{}\", \"{{prompt}}\"]\n\
         [daemon.agents.never]\nkind = \"command\"\ncommand = [\"kennel-no-such-agent\", \"{{prompt}}\"]\n",
        ghost.display()
    );
    let srv = server().await?;
    let d = KennelDaemon::start(bin(), &srv, &cfg).await?;
    let daemons: Vec<Daemon> = srv.api().get("/api/v1/daemons").await?;
    let me = daemons
        .iter()
        .find(|x| x.machine_id == d.machine_id())
        .expect("listed");
    assert!(me.agents.contains(&"ghost".to_string()) && me.agents.contains(&"sh".to_string()));
    assert!(
        !me.agents.contains(&"never".to_string()),
        "a missing binary is not advertised"
    );

    // The binary disappears after start-up: the task is rejected with the reason, not run.
    std::fs::remove_file(&ghost)?;
    let mut t = sh("ghost", "boo", None);
    t.agent = Some("ghost".into());
    let t = srv.api().submit(&t).await?;
    let failed =
        wait_task_status(&srv.url(), srv.admin_key(), &t.id, TaskStatus::Failed, SLOW).await?;
    let err = failed.error.unwrap_or_default();
    assert!(
        err.contains("rejected by daemon") && err.contains("ghost-agent"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn a_daemon_killed_mid_task_replays_its_outbox_without_gaps_or_duplicates(
) -> anyhow::Result<()> {
    let (srv, mut d) = setup().await?;
    let api = srv.api();
    let mut t = sh(
        "crash",
        "echo pid $$; i=1; while [ $i -le 60 ]; do echo line $i; i=$((i+1)); sleep 0.01; done; sleep 1000",
        None,
    );
    t.max_attempts = Some(2);
    let t = api.submit(&t).await?;
    wait_output(&srv, &t.id, "line 20").await?;
    let agent: i32 = stdout_of(&srv, &t.id, 1).await?[0]
        .strip_prefix("pid ")
        .unwrap_or_default()
        .parse()?;
    assert!(!gone(agent), "the agent runs before the crash");
    d.kill9().await?;
    // The agent dies with its daemon (parent-death signal), before any restart cleans up.
    let deadline = tokio::time::Instant::now() + SLOW;
    while !gone(agent) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent {agent} outlived its daemon"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    d.restart().await?;
    // The restarted daemon delivers what it had and reports the attempt lost; it is retried.
    let url = format!("{}/api/v1/events?task={}", srv.url(), t.id);
    let mut ev = EventStream::connect(&url, Some(srv.admin_key()), None).await?;
    ev.wait_for(SLOW, |m| {
        m.event == "task.status"
            && m.json()
                .ok()
                .and_then(|v| v.pointer("/data/attempt").and_then(|a| a.as_u64()))
                == Some(2)
    })
    .await?;
    let out = api.output(&t.id, Some(1), 0).await?;
    let seqs: Vec<u64> = out.items.iter().map(|c| c.seq).collect();
    let first = seqs[0];
    assert_eq!(
        seqs,
        (first..first + seqs.len() as u64).collect::<Vec<_>>(),
        "no gap in seqs"
    );
    let lines: Vec<u32> = out
        .items
        .iter()
        .filter(|c| c.stream == OutputStream::Stdout)
        .filter_map(|c| c.output.strip_prefix("line ").and_then(|n| n.parse().ok()))
        .collect();
    assert!(lines.len() >= 20, "{lines:?}");
    assert_eq!(
        lines,
        (1..=lines.len() as u32).collect::<Vec<_>>(),
        "every line once, in order"
    );
    let detail = api.task(&t.id).await?;
    assert_eq!(detail.attempts[0].status, kennel_proto::AttemptStatus::Lost);
    let _: Task = api
        .post_empty(&format!("/api/v1/tasks/{}/cancel", t.id))
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_coordinator_restart_mid_task_loses_nothing() -> anyhow::Result<()> {
    let git = GitFixture::new(&[])?;
    let (mut srv, d) = setup().await?;
    let gate = tempfile::tempdir()?;
    let mark = gate.path().join("go");
    let script = format!(
        "echo start; while [ ! -e {m} ]; do sleep 0.05; done; echo after; echo done > result.txt",
        m = mark.display()
    );
    let t = srv
        .api()
        .submit(&sh("survivor", &script, Some(&git)))
        .await?;
    wait_output(&srv, &t.id, "start").await?;
    srv.kill9().await?;
    std::fs::write(&mark, "")?;
    srv.restart().await?;
    let done = wait_task_status(
        &srv.url(),
        srv.admin_key(),
        &t.id,
        TaskStatus::Completed,
        SLOW,
    )
    .await?;
    assert_eq!(done.attempt, 1, "the same attempt finished");
    assert_eq!(stdout_of(&srv, &t.id, 1).await?, vec!["start", "after"]);
    assert_eq!(
        git.show(&done.branch.unwrap_or_default(), "result.txt")?,
        "done"
    );
    let status = d.status(false).await?;
    assert!(status.contains("connected as"), "{status}");
    assert!(status.contains("message(s) waiting for an ack"), "{status}");
    let json: serde_json::Value = serde_json::from_str(&d.status(true).await?)?;
    assert_eq!(json["connected"], true);
    assert_eq!(json["alive"], true);
    assert!(json["outboxDepth"].is_u64());
    Ok(())
}

#[tokio::test]
async fn invalid_utf8_and_very_long_lines_are_handled() -> anyhow::Result<()> {
    let (srv, _d) = setup().await?;
    let t = srv
        .api()
        .submit(&sh(
            "bytes",
            r"printf 'caf\351\n'; head -c 100000 /dev/zero | tr '\0' x; echo; echo end",
            None,
        ))
        .await?;
    wait_task_status(
        &srv.url(),
        srv.admin_key(),
        &t.id,
        TaskStatus::Completed,
        SLOW,
    )
    .await?;
    let out = srv.api().output(&t.id, Some(1), 0).await?;
    let stdout: Vec<_> = out
        .items
        .iter()
        .filter(|c| c.stream == OutputStream::Stdout)
        .collect();
    assert_eq!(stdout[0].output, "caf\u{FFFD}");
    let mut long = String::new();
    let mut i = 1;
    while stdout[i].is_partial {
        long.push_str(&stdout[i].output);
        i += 1;
    }
    long.push_str(&stdout[i].output);
    assert!(i > 1, "a 100 kB line arrives in several chunks");
    assert_eq!(long.len(), 100_000);
    assert!(long.bytes().all(|b| b == b'x'));
    assert_eq!(stdout[i + 1].output, "end");
    Ok(())
}

#[tokio::test]
async fn kennel_up_runs_a_task_end_to_end() -> anyhow::Result<()> {
    let git = GitFixture::new(&[])?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("kennel.toml");
    std::fs::write(&cfg, DAEMON)?;
    let data = dir.path().join("data");
    let mut up = kennel_testkit::KennelUp::start(bin(), &cfg, &data, WAIT).await?;
    let (url, key) = (up.url().to_string(), up.admin_key()?);
    let out = tokio::process::Command::new(bin())
        .args([
            "task",
            "submit",
            "echo from up > up.txt; echo working",
            "--agent",
            "sh",
            "--repo",
            &git.url(),
            "-f",
        ])
        .env("KENNEL_URL", &url)
        .env("KENNEL_API_KEY", &key)
        .output()
        .await?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("working"), "{stdout}");
    assert!(
        stderr.contains("completed") && stderr.contains("branch kennel/"),
        "{stderr}"
    );
    let id = stdout.lines().next().unwrap_or_default().trim().to_string();
    assert_eq!(git.show(&format!("kennel/{id}"), "up.txt")?, "from up");

    // Ctrl-C stops it cleanly.
    up.signal(nix::sys::signal::Signal::SIGINT)?;
    let (status, rest) = up.wait_exit(WAIT).await?;
    assert!(status.success());
    assert!(rest.iter().any(|l| l == "kennel: stopped"), "{rest:?}");
    Ok(())
}

#[tokio::test]
async fn a_task_past_its_timeout_is_stopped_and_fails() -> anyhow::Result<()> {
    let (srv, _d) = setup().await?;
    let mut t = sh("slow", "echo begin; sleep 1000", None);
    t.timeout_secs = Some(1);
    let t = srv.api().submit(&t).await?;
    let failed =
        wait_task_status(&srv.url(), srv.admin_key(), &t.id, TaskStatus::Failed, SLOW).await?;
    assert!(
        failed
            .error
            .unwrap_or_default()
            .contains("timed out after 1s"),
        "the error says why"
    );
    assert_eq!(stdout_of(&srv, &t.id, 1).await?, vec!["begin"]);
    Ok(())
}

#[tokio::test]
async fn messages_reach_the_agent_on_stdin() -> anyhow::Result<()> {
    let (srv, _d) = setup().await?;
    let api = srv.api();
    let t = api
        .submit(&sh(
            "chat",
            "echo ready; read line; echo \"got: $line\"",
            None,
        ))
        .await?;
    wait_output(&srv, &t.id, "ready").await?;
    let (status, body) = api
        .raw(
            kennel_testkit::Method::POST,
            &format!("/api/v1/tasks/{}/messages", t.id),
            Some(srv.admin_key()),
            Some(r#"{"message":"add tests too"}"#.into()),
        )
        .await?;
    assert_eq!(status, kennel_testkit::StatusCode::ACCEPTED, "{body}");
    wait_task_status(
        &srv.url(),
        srv.admin_key(),
        &t.id,
        TaskStatus::Completed,
        SLOW,
    )
    .await?;
    assert_eq!(
        stdout_of(&srv, &t.id, 1).await?,
        vec!["ready", "got: add tests too"]
    );
    Ok(())
}

/// A daemon given several coordinators skips one that does not answer and runs its work on
/// the next, and says which it connected to.
#[tokio::test]
async fn a_daemon_with_fallback_servers_connects_to_the_one_that_answers() -> anyhow::Result<()> {
    let srv = server().await?;
    let key = srv
        .api()
        .create_key("fallback daemon", &[kennel_proto::api::Scope::Daemon])
        .await?
        .key;
    let dead = kennel_testkit::refused_addr().await?;
    let toml = DAEMON.replacen(
        "[daemon]\n",
        &format!("[daemon]\nfallback_servers = [\"{}\"]\n", srv.ws_url()),
        1,
    );
    let d = KennelDaemon::start_at(
        bin(),
        &format!("ws://{dead}/ws/daemon"),
        &key,
        "fallback-daemon",
        &toml,
    )
    .await?;
    let line = d
        .wait_line(WAIT, |l| l.starts_with("kennel: connected to "))
        .await?;
    assert!(line.contains(&srv.ws_url()), "{line}");
    let t = srv.api().submit(&sh("fallback", "echo ran", None)).await?;
    wait_task_status(
        &srv.url(),
        srv.admin_key(),
        &t.id,
        TaskStatus::Completed,
        SLOW,
    )
    .await?;
    Ok(())
}
