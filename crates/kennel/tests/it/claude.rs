//! The real Claude Code CLI (`@anthropic-ai/claude-code`) run by the real daemon, against a
//! scripted Anthropic upstream ([`ScriptedAnthropic`]): the file it writes lands in the pushed
//! branch and its stream-json events are stored as progress, each before its raw line.
//!
//! The CLI must be installed (`npm install -g @anthropic-ai/claude-code`; `.ci/run` does it);
//! without it the test fails and says so, rather than skipping.

use std::path::PathBuf;
use std::time::Duration;

use kennel_proto::api::{CreateTask, Daemon, OutputChunk};
use kennel_proto::link::{OutputStream, RepoSpec};
use kennel_proto::TaskStatus;
use kennel_testkit::anthropic::{has_tool_result, offers_tool, working_directory};
use kennel_testkit::{wait_task_status, GitFixture, KennelDaemon, KennelServer, ScriptedAnthropic};

use crate::{bin, server};

/// Claude Code starts a JavaScript runtime of ~250 MB; a cold start on a loaded machine is slow.
const SLOW: Duration = Duration::from_secs(120);
/// The API key Claude Code sends; the scripted upstream accepts any.
const API_KEY: &str = "sk-ant-kennel-test";

/// Where `claude` is on PATH, or an error that says how to install it.
pub(crate) fn claude_binary() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("claude"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the Claude Code CLI (`claude`) is not on PATH; this test runs the real CLI: \
                 install it with `npm install -g @anthropic-ai/claude-code` (.ci/run does)"
            )
        })
}

/// `[daemon.agents.claude.env]` entries that keep Claude Code off the network (no telemetry,
/// updates or error reports) and out of the real home, in `home`.
pub(crate) fn offline_claude_env(home: &std::path::Path) -> String {
    let home = home.display();
    format!(
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC = \"1\"\nDISABLE_TELEMETRY = \"1\"\n\
         DISABLE_AUTOUPDATER = \"1\"\nDISABLE_ERROR_REPORTING = \"1\"\nHOME = \"{home}\"\n\
         CLAUDE_CONFIG_DIR = \"{home}/.claude\"\n"
    )
}

/// Daemon config: the built-in `claude` profile (default argv) with an environment that
/// points Claude Code at `upstream` and keeps it off the network and out of the real home.
pub(crate) fn daemon_config(upstream: &ScriptedAnthropic, home: &std::path::Path) -> String {
    format!(
        r#"
[daemon]
max_concurrent_tasks = 1

[daemon.agents.claude]
kind = "claude"

[daemon.agents.claude.env]
ANTHROPIC_BASE_URL = "{url}"
ANTHROPIC_API_KEY = "{API_KEY}"
{offline}"#,
        url = upstream.url(),
        offline = offline_claude_env(home),
    )
}

/// Every stored output chunk of an attempt, across pages.
async fn all_output(
    srv: &KennelServer,
    id: &str,
    attempt: u32,
) -> anyhow::Result<Vec<OutputChunk>> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = srv.api().output(id, Some(attempt), after).await?;
        if page.items.is_empty() || page.next_after_seq == after {
            return Ok(all);
        }
        after = page.next_after_seq;
        all.extend(page.items);
    }
}

#[tokio::test]
async fn claude_code_writes_a_file_that_lands_in_the_pushed_branch() -> anyhow::Result<()> {
    claude_binary()?;
    let upstream = ScriptedAnthropic::write_file("hello.txt", "hi\n").await?;
    let home = tempfile::Builder::new()
        .prefix("kennel-test-claude-home-")
        .tempdir()?;
    let git = GitFixture::new(&[])?;
    let srv = server().await?;
    let d = KennelDaemon::start(bin(), &srv, &daemon_config(&upstream, home.path())).await?;

    // Preflight ran `claude --version`; a daemon that cannot run it would not offer `claude`
    // and the task would wait in the queue forever.
    let daemons: Vec<Daemon> = srv.api().get("/api/v1/daemons").await?;
    let me = daemons.iter().find(|x| x.machine_id == d.machine_id());
    assert!(
        me.is_some_and(|m| m.agents.iter().any(|a| a == "claude")),
        "the daemon does not offer the claude profile (its log above says why): {daemons:?}"
    );

    let t = srv
        .api()
        .submit(&CreateTask {
            name: "claude hello".into(),
            prompt: "Create hello.txt containing hi".into(),
            agent: Some("claude".into()),
            repo: Some(RepoSpec {
                url: git.url(),
                base_branch: "main".into(),
            }),
            max_attempts: Some(1),
            ..CreateTask::default()
        })
        .await?;
    let done = wait_task_status(
        &srv.url(),
        srv.admin_key(),
        &t.id,
        TaskStatus::Completed,
        SLOW,
    )
    .await;
    let output = all_output(&srv, &t.id, 1).await?;
    let done = match done {
        Ok(done) => done,
        Err(e) => {
            let seen: Vec<String> = upstream
                .recorded()
                .iter()
                .map(|r| format!("{} {}", r.method, r.uri))
                .collect();
            anyhow::bail!("{e}\nstored output:\n{output:#?}\nupstream saw: {seen:?}")
        }
    };

    // What a user gets: a branch with the file Claude Code wrote, and nothing else new.
    let branch = format!("kennel/{}", t.id);
    assert_eq!(done.branch.as_deref(), Some(branch.as_str()));
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(git.show(&branch, "hello.txt")?, "hi");
    let files =
        kennel_testkit::git::git(&git.remote(), &["ls-tree", "-r", "--name-only", &branch])?;
    assert_eq!(
        files.lines().collect::<Vec<_>>(),
        ["README.md", "hello.txt"],
        "only the written file is new"
    );

    // Its stream-json events, stored as progress (`{summary, detail}`) in the order they
    // happened, beside the raw lines.
    let progress: Vec<serde_json::Value> = output
        .iter()
        .filter(|c| c.stream == OutputStream::Progress)
        .map(|c| serde_json::from_str(&c.output))
        .collect::<Result<_, _>>()?;
    let summaries: Vec<&str> = progress
        .iter()
        .filter_map(|p| p["summary"].as_str())
        .collect();
    let expected = [
        "session started",
        "tool: Write ",
        "tool result",
        "assistant: Wrote the file.",
        "result: success",
    ];
    let mut rest = summaries.iter();
    for want in expected {
        assert!(
            rest.any(|s| s.starts_with(want)),
            "no `{want}…` in order in {summaries:#?}"
        );
    }
    let write = progress
        .iter()
        .find(|p| p["detail"]["tools"][0]["name"] == "Write")
        .map(|p| p["detail"]["tools"][0]["target"].clone());
    let result = progress.iter().find(|p| p["detail"]["event"] == "result");
    assert_eq!(
        result.map(|r| r["detail"]["numTurns"].clone()),
        Some(2.into())
    );
    // Every raw stream-json line is kept too, right after the progress entry read from it,
    // which names its seqs so `kennel task logs` can show the summary instead.
    let mut line = String::new();
    let mut first_seq = None;
    for (i, chunk) in output.iter().enumerate() {
        if chunk.stream != OutputStream::Stdout {
            continue;
        }
        let first = *first_seq.get_or_insert(chunk.seq);
        line.push_str(&chunk.output);
        if chunk.is_partial {
            continue;
        }
        let event: serde_json::Value = serde_json::from_str(&line)?;
        assert!(event["type"].is_string(), "not stream-json: {line}");
        let entry = output[..i]
            .iter()
            .rev()
            .find(|c| c.stream == OutputStream::Progress)
            .map(|c| serde_json::from_str::<serde_json::Value>(&c.output))
            .transpose()?;
        assert_eq!(
            entry.as_ref().map(|e| e["detail"]["rawSeqs"].clone()),
            Some(serde_json::json!([first, chunk.seq])),
            "the raw line {line} follows no progress entry naming it: {entry:?}"
        );
        line.clear();
        first_seq = None;
    }

    // What the upstream saw: two streamed turns of one conversation, with our key; the first
    // offered the Write tool in the task's worktree, the second returned its result.
    let requests = upstream.requests();
    assert_eq!(requests.len(), 2, "{:#?}", upstream.recorded());
    let (first, second) = (&requests[0], &requests[1]);
    assert!(
        requests.iter().all(|r| r["stream"] == true),
        "Claude Code streams its turns"
    );
    assert!(offers_tool(first, "Write"));
    assert!(!has_tool_result(first) && has_tool_result(second));
    assert!(first.to_string().contains("Create hello.txt containing hi"));
    let cwd = working_directory(first).unwrap_or_default();
    assert!(
        cwd.starts_with(d.data_dir().join("worktrees")),
        "Claude Code ran in {}, not in a worktree of the daemon",
        cwd.display()
    );
    let written = cwd.join("hello.txt").display().to_string();
    assert_eq!(
        write,
        Some(written.into()),
        "the Write progress names the file"
    );
    let messages = upstream
        .recorded()
        .into_iter()
        .filter(|r| r.path() == "/v1/messages")
        .collect::<Vec<_>>();
    assert!(messages
        .iter()
        .all(|r| r.headers.get("x-api-key").map(String::as_str) == Some(API_KEY)));
    Ok(())
}
