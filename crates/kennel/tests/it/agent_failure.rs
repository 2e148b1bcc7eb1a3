//! An agent that fails says why, wherever a user looks. A fake `claude` (a script first on the
//! agent's `PATH`) replays what Claude Code 2.1.197 printed when the API refused its key,
//! through the real daemon and coordinator; `kennel task show` carries the agent's reason and
//! `kennel task logs` shows progress, not raw stream-json.

use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use std::time::Duration;

use kennel_proto::api::{CreateTask, OutputChunk};
use kennel_proto::link::OutputStream;
use kennel_proto::TaskStatus;
use kennel_testkit::{wait_task_status, KennelDaemon, KennelServer};
use tokio::process::Command;

use crate::{bin, server};

/// A daemon start and one shell script; generous for a loaded machine.
const SLOW: Duration = Duration::from_secs(60);

/// What `claude -p hi --output-format stream-json --verbose` (2.1.197) printed on stdout when
/// the API answered 401 to its key (`CLAUDE_CODE_MAX_RETRIES=0` for the retry count; the
/// first retry notice is from a run with retries), then exited with code 1, printing nothing
/// on stderr. The `init` line is longer than the daemon's line cap below, so it arrives in
/// chunks.
const TRANSCRIPT: [&str; 4] = [
    r#"{"type":"system","subtype":"init","cwd":"/tmp/cx","session_id":"857bac8a-e133-4e2d-977b-08f3ae9e6f48","tools":["Task","Bash","CronCreate","CronDelete","CronList","Edit","EnterWorktree","ExitWorktree","NotebookEdit","Read","ReportFindings","ScheduleWakeup","SendMessage","Skill","TaskCreate","TaskGet","TaskList","TaskOutput","TaskStop","TaskUpdate","WebFetch","WebSearch","Workflow","Write"],"mcp_servers":[],"model":"claude-opus-4-8[1m]","permissionMode":"acceptEdits","slash_commands":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator","clear","compact","config","context","heapdump","init","reload-skills","review","security-review","usage","insights","goal","team-onboarding"],"apiKeySource":"ANTHROPIC_API_KEY","claude_code_version":"2.1.197","output_style":"default","agents":["claude","Explore","general-purpose","Plan","statusline-setup"],"skills":["deep-research","update-config","verify","debug","code-review","simplify","batch","fewer-permission-prompts","loop","claude-api","run","run-skill-generator"],"plugins":[],"analytics_disabled":true,"product_feedback_disabled":true,"uuid":"afb41f2b-8937-4f15-a11a-c3cb11622ecc","memory_paths":{"auto":"/tmp/cx/home/.claude/projects/-tmp-cx/memory/"},"fast_mode_state":"off"}"#,
    r#"{"type":"system","subtype":"api_retry","attempt":1,"max_retries":10,"retry_delay_ms":594.6126279581862,"error_status":401,"error":"authentication_failed","session_id":"857bac8a-e133-4e2d-977b-08f3ae9e6f48","uuid":"54fd4b44-9f02-4b49-9fca-4d2878bd6e42"}"#,
    r#"{"type":"assistant","message":{"id":"dedcaf6e-a46f-4268-bbe0-1a3bdcc2f890","container":null,"model":"<synthetic>","role":"assistant","stop_details":null,"stop_reason":"stop_sequence","stop_sequence":"","type":"message","usage":{"input_tokens":0,"output_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":null,"cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":null,"iterations":null,"speed":null},"content":[{"type":"text","text":"Invalid API key · Fix external API key"}],"context_management":null},"parent_tool_use_id":null,"session_id":"857bac8a-e133-4e2d-977b-08f3ae9e6f48","uuid":"28953be6-019f-4a29-98a1-b7d7c0fee470","error":"authentication_failed","request_id":"req_x"}"#,
    r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":401,"duration_ms":155,"duration_api_ms":0,"num_turns":1,"result":"Invalid API key · Fix external API key","stop_reason":"stop_sequence","session_id":"857bac8a-e133-4e2d-977b-08f3ae9e6f48","total_cost_usd":0,"usage":{"input_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":0,"server_tool_use":{"web_search_requests":0,"web_fetch_requests":0},"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":0},"inference_geo":"","iterations":[],"speed":"standard"},"modelUsage":{},"permission_denials":[],"terminal_reason":"completed","fast_mode_state":"off","uuid":"d8c5db3f-3496-4bbd-8be6-7fc63e16e65e"}"#,
];

/// The agent's own reason, as the result event gives it.
const REASON: &str = "Invalid API key · Fix external API key";

/// Writes the fake `claude` into `dir`: `--version` answers as the real one does; a run prints
/// [`TRANSCRIPT`] and exits 1, or 0 when the prompt says `exit0`.
fn fake_claude(dir: &std::path::Path) -> anyhow::Result<()> {
    let transcript = dir.join("transcript.jsonl");
    std::fs::write(&transcript, TRANSCRIPT.join("\n") + "\n")?;
    let script = format!(
        "#!/bin/sh\n\
         if [ \"$1\" = --version ]; then echo '2.1.197 (Claude Code)'; exit 0; fi\n\
         cat '{}'\n\
         case \"$2\" in *exit0*) exit 0 ;; *) exit 1 ;; esac\n",
        transcript.display()
    );
    let claude = dir.join("claude");
    std::fs::write(&claude, script)?;
    std::fs::set_permissions(&claude, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The built-in `claude` profile (default argv), with `dir` first on the agent's PATH.
fn daemon_config(dir: &std::path::Path) -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    format!(
        r#"
[daemon]
max_concurrent_tasks = 1
max_line_bytes = 512

[daemon.agents.claude]
kind = "claude"

[daemon.agents.claude.env]
PATH = "{}:{path}"
"#,
        dir.display()
    )
}

async fn kennel(srv: &KennelServer, args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(bin())
        .args(args)
        .env("KENNEL_URL", srv.url())
        .env("KENNEL_API_KEY", srv.admin_key())
        .env_remove("KENNEL_CONFIG")
        .kill_on_drop(true)
        .output()
        .await?)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

async fn run_to_failure(srv: &KennelServer, prompt: &str) -> anyhow::Result<String> {
    let t = srv
        .api()
        .submit(&CreateTask {
            name: prompt.into(),
            prompt: prompt.into(),
            agent: Some("claude".into()),
            max_attempts: Some(1),
            ..CreateTask::default()
        })
        .await?;
    wait_task_status(&srv.url(), srv.admin_key(), &t.id, TaskStatus::Failed, SLOW).await?;
    Ok(t.id)
}

#[tokio::test]
async fn a_refused_claude_login_fails_the_task_with_claude_s_reason() -> anyhow::Result<()> {
    let fake = tempfile::tempdir()?;
    fake_claude(fake.path())?;
    let srv = server().await?;
    let _d = KennelDaemon::start(bin(), &srv, &daemon_config(fake.path())).await?;
    let id = run_to_failure(&srv, "fix the bug").await?;

    // The task's error is the agent's reason, with its exit code.
    let out = kennel(&srv, &["--json", "task", "show", &id]).await?;
    assert!(out.status.success(), "{out:?}");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        shown["error"],
        format!("the agent failed: {REASON} (exit code 1)"),
        "{shown:#}"
    );
    assert_eq!(shown["exitCode"], 1);

    // A person reading the logs sees progress, not stream-json, and never `result: success`;
    // following the finished task shows the same.
    let logs = kennel(&srv, &["task", "logs", &id]).await?;
    assert!(logs.status.success(), "{logs:?}");
    let follow = kennel(&srv, &["task", "logs", "-f", &id]).await?;
    for text in [stdout(&logs), stdout(&follow)] {
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "» session started (model claude-opus-4-8[1m])",
                "» API request failed; retry 1 of 10 (authentication_failed, HTTP 401)",
                &format!("» assistant error: {REASON} (authentication_failed)"),
                &format!("» result: error: {REASON}"),
            ],
            "{text}"
        );
    }
    assert!(String::from_utf8_lossy(&follow.stderr).contains(REASON));

    // The raw transcript is still stored, whole, for --json and the API.
    let out = kennel(&srv, &["--json", "task", "logs", &id]).await?;
    let chunks: Vec<OutputChunk> = stdout(&out)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let mut raw = String::new();
    for c in chunks.iter().filter(|c| c.stream == OutputStream::Stdout) {
        raw.push_str(&c.output);
        if !c.is_partial {
            raw.push('\n');
        }
    }
    assert_eq!(raw, TRANSCRIPT.join("\n") + "\n");
    let init_chunks = chunks
        .iter()
        .filter(|c| c.stream == OutputStream::Stdout && c.is_partial)
        .count();
    assert!(
        init_chunks >= 2,
        "the init line arrived in chunks: {chunks:#?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_claude_result_with_is_error_fails_the_task_even_with_exit_code_0() -> anyhow::Result<()>
{
    let fake = tempfile::tempdir()?;
    fake_claude(fake.path())?;
    let srv = server().await?;
    let _d = KennelDaemon::start(bin(), &srv, &daemon_config(fake.path())).await?;
    let id = run_to_failure(&srv, "exit0 please").await?;
    let task = srv.api().task(&id).await?.task;
    assert_eq!(task.exit_code, Some(0));
    assert_eq!(
        task.error.as_deref(),
        Some(format!("the agent failed: {REASON} (exit code 0)").as_str())
    );
    Ok(())
}
