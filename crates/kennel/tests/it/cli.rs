//! The command line as a user runs it: the real binary, its output and exit codes.

use std::process::Output;

use tokio::process::Command;

use crate::{bin, daemon, server, WAIT};

use crate::kennel_cli as kennel;

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[tokio::test]
async fn submit_list_show_and_follow_logs() -> anyhow::Result<()> {
    let srv = server().await?;
    let mut d = daemon(&srv, "cli", 1).await?;
    let out = kennel(
        &srv,
        &[
            "task",
            "submit",
            "write the docs",
            "--name",
            "docs",
            "--agent",
            "command",
            "--label",
            "x=y",
            "--priority",
            "3",
        ],
    )
    .await?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let id = stdout.trim().to_string();
    assert!(id.starts_with("t-"), "{stdout}");

    let out = kennel(&srv, &["task", "list"]).await?;
    let (stdout, _) = text(&out);
    assert!(stdout.starts_with("ID"), "{stdout}");
    assert!(
        stdout.contains(&id) && stdout.contains("docs") && stdout.contains("queued"),
        "{stdout}"
    );

    let out = kennel(&srv, &["--json", "task", "show", &id]).await?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["labels"]["x"], "y");
    assert_eq!(v["priority"], 3);

    // The label is not offered by the daemon; a plain task runs and `logs -f` follows it.
    let out = kennel(&srv, &["task", "submit", "run it", "--agent", "command"]).await?;
    let id2 = text(&out).0.trim().to_string();
    let spawn = d.expect_spawn(WAIT).await?;
    assert_eq!(spawn.task_id, id2);
    let follower = tokio::spawn({
        let url = srv.url();
        let key = srv.admin_key().to_string();
        let id2 = id2.clone();
        async move {
            Command::new(bin())
                .args(["task", "logs", "-f", &id2])
                .env("KENNEL_URL", url)
                .env("KENNEL_API_KEY", key)
                .kill_on_drop(true)
                .output()
                .await
        }
    });
    d.accept(&id2, 1).await?;
    d.output(&id2, 1, "hello from the agent").await?;
    d.complete(&id2, 1, true).await?;
    let out = kennel_testkit::within(WAIT, "logs -f to end", follower).await???;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("hello from the agent"), "{stdout}");
    assert!(stderr.contains("completed"), "{stderr}");

    let out = kennel(&srv, &["task", "logs", &id2]).await?;
    assert_eq!(text(&out).0, "hello from the agent\n");
    let out = kennel(&srv, &["task", "cancel", &id]).await?;
    assert!(text(&out).0.contains("cancelled"));
    let out = kennel(&srv, &["status"]).await?;
    assert!(text(&out).0.contains("1 connected"), "{}", text(&out).0);
    let out = kennel(&srv, &["daemons"]).await?;
    assert!(text(&out).0.contains("cli"));
    Ok(())
}

#[tokio::test]
async fn keys_are_shown_once_and_can_be_revoked() -> anyhow::Result<()> {
    let srv = server().await?;
    let out = kennel(
        &srv,
        &["keys", "create", "--name", "ci", "--scope", "client"],
    )
    .await?;
    let (key, _) = text(&out);
    let key = key.trim().to_string();
    assert!(key.starts_with("kn_"));
    let id = key[3..15].to_string();
    let out = kennel(&srv, &["keys", "list"]).await?;
    let (list, _) = text(&out);
    assert!(list.contains(&id) && !list.contains(&key), "{list}");
    let out = kennel(&srv, &["keys", "revoke", &id]).await?;
    assert!(out.status.success());
    let out = Command::new(bin())
        .args(["task", "list"])
        .env("KENNEL_URL", srv.url())
        .env("KENNEL_API_KEY", &key)
        .output()
        .await?;
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("invalid or revoked API key"), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn errors_say_what_to_do() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("kennel.toml");
    std::fs::write(&cfg, "[server]\nlisten = \"127.0.0.1:0\"\nlistne = 1\n")?;
    let out = Command::new(bin())
        .args(["--config", cfg.to_str().unwrap_or_default(), "server"])
        .output()
        .await?;
    let (_, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a configuration error: {stderr}"
    );
    assert!(
        stderr.contains("listne") && stderr.contains("kennel.toml"),
        "{stderr}"
    );

    let out = Command::new(bin())
        .args(["task", "list"])
        .env("KENNEL_URL", "http://127.0.0.1:9")
        .env("KENNEL_API_KEY", "x")
        .output()
        .await?;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "a runtime failure: {stderr}");
    assert!(
        stderr.contains("cannot reach the kennel server"),
        "{stderr}"
    );

    let out = Command::new(bin())
        .args(["server", "--listen", "127.0.0.1:0"])
        .env("KENNEL_SERVER__SCHEDULER__ACCEPT_TIMEOUT_SECS", "0")
        .env("KENNEL_SERVER__DATA_DIR", dir.path())
        .output()
        .await?;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "invalid configuration in the environment or flags: \
             server.scheduler.accept_timeout: must be at least 1s"
        ),
        "{stderr}"
    );
    // The variable used the old spelling of the key: it still counts, and says what to write.
    assert!(
        stderr.contains(
            "kennel: warning: server.scheduler.accept_timeout_secs \
             (KENNEL_SERVER__SCHEDULER__ACCEPT_TIMEOUT_SECS) is deprecated; write \
             accept_timeout = \"0s\""
        ),
        "{stderr}"
    );

    // Every section is checked whichever command runs, and the chain is printed once.
    std::fs::write(&cfg, "[relay]\nupstream = \"ftp://h\"\n")?;
    let out = Command::new(bin())
        .args(["--config", cfg.to_str().unwrap_or_default(), "task", "list"])
        .env("KENNEL_URL", "http://127.0.0.1:9")
        .env("KENNEL_API_KEY", "x")
        .output()
        .await?;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "kennel: invalid configuration in {}: relay.upstream: unsupported scheme `ftp`; \
             use ws, wss, http or https",
            cfg.display()
        )
    );
    let out = Command::new(bin())
        .args(["task", "list", "--no-such-flag"])
        .output()
        .await?;
    assert_eq!(out.status.code(), Some(2), "usage errors are 2 as well");

    let out = Command::new(bin())
        .args(["task", "--help"])
        .output()
        .await?;
    let (stdout, _) = text(&out);
    for sub in [
        "submit", "list", "show", "logs", "cancel", "pause", "resume", "send",
    ] {
        assert!(stdout.contains(sub), "{sub} missing from --help");
    }
    Ok(())
}

#[tokio::test]
async fn output_into_a_closed_pipe_ends_quietly() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    for i in 0..30 {
        api.submit(&crate::task(&format!("many-{i}"))).await?;
    }
    // `kennel task list | head -0`: the reader is gone before the table is written.
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let out = Command::new(bin())
        .args(["task", "list"])
        .env("KENNEL_URL", srv.url())
        .env("KENNEL_API_KEY", srv.admin_key())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        // Not `output()`, which would replace stdout with a pipe of its own.
        .spawn()?
        .wait_with_output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "no panic exit: {stderr}");
    Ok(())
}

#[tokio::test]
async fn a_relative_repo_path_is_resolved_where_it_was_typed() -> anyhow::Result<()> {
    let srv = server().await?;
    let git = kennel_testkit::GitFixture::new(&[])?;
    // Run from a directory beside the bare remote, naming it relatively.
    let remote = git.remote();
    let parent = remote.parent().expect("the remote has a parent");
    let cwd = parent.join("work");
    std::fs::create_dir_all(&cwd)?;
    let submit = |repo: &str| {
        Command::new(bin())
            .args(["task", "submit", "x", "--agent", "command", "--repo", repo])
            .env("KENNEL_URL", srv.url())
            .env("KENNEL_API_KEY", srv.admin_key())
            .current_dir(&cwd)
            .kill_on_drop(true)
            .output()
    };
    let out = submit("../remote.git").await?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let id = stdout.lines().next().unwrap_or_default().trim().to_string();
    let task = srv.api().task(&id).await?.task;
    let want = std::fs::canonicalize(&remote)?.display().to_string();
    assert_eq!(task.repo.map(|r| r.url), Some(want));

    let out = submit("../no-such.git").await?;
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("is a relative path, but there is no such directory here"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn config_show_redacts_secrets_and_lists_built_in_profiles() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("kennel.toml");
    std::fs::write(
        &file,
        "[daemon]\nserver = \"wss://site:pw-from-file@coord.example/ws/daemon\"\n\
         [server.protocol]\nheartbeat_interval = \"90s\"\n\
         [[gateway.upstreams]]\nname = \"a\"\nkind = \"anthropic\"\n\
         base_url = \"https://api.example\"\napi_key_env = \"UPSTREAM_KEY\"\n",
    )?;
    let show = |json: bool| {
        let mut cmd = Command::new(bin());
        if json {
            cmd.arg("--json");
        }
        cmd.args(["config", "show"])
            .env_remove("KENNEL_CONFIG")
            .env("HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .env(
                "KENNEL_DAEMON__AGENTS__CLAUDE__ENV__ANTHROPIC_API_KEY",
                "sk-secret-123",
            )
            .env(
                "KENNEL_DAEMON__AGENTS__CLAUDE__ENV__ANTHROPIC_BASE_URL",
                "http://127.0.0.1:7071",
            )
            .env(
                "KENNEL_DAEMON__HOSTNAME",
                "kn_0123456789ab_0123456789abcdef0123",
            )
            .env("KENNEL_DAEMON__LABELS__GPU", "a100")
            .current_dir(dir.path())
            .kill_on_drop(true)
            .output()
    };

    let out = show(false).await?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("# loaded from kennel.toml"), "{stdout}");
    assert!(
        stdout.contains("ANTHROPIC_API_KEY = \"<redacted>\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("ANTHROPIC_BASE_URL = \"http://127.0.0.1:7071\""),
        "{stdout}"
    );
    for secret in ["sk-secret-123", "pw-from-file", "0123456789abcdef0123"] {
        assert!(!stdout.contains(secret), "{secret} in {stdout}");
    }
    assert!(
        stdout.contains("server = \"wss://site:<redacted>@coord.example/ws/daemon\""),
        "{stdout}"
    );
    assert!(stdout.contains("hostname = \"<redacted>\""), "{stdout}");
    assert!(
        stdout.contains("api_key_env = \"UPSTREAM_KEY\""),
        "{stdout}"
    );
    assert!(stdout.contains("GPU = \"a100\""), "{stdout}");
    // Durations are printed in their shortest form with a unit, under keys without one, and
    // one under a secret-sounding name (`cooldowns.auth`) is a duration, not a secret.
    for duration in [
        "heartbeat_interval = \"1m30s\"",
        "worktree_retention = \"1d\"",
        "auth = \"10m\"",
        "total_timeout = \"10m\"",
        "unschedulable_timeout = \"0s\"",
    ] {
        assert!(stdout.contains(duration), "{duration} in {stdout}");
    }
    for built_in in [
        "# built-in\n[daemon.agents.aider]\nkind = \"aider\"",
        "# built-in\n[daemon.agents.codex]\nkind = \"codex\"",
        "# built-in, changed by configuration\n[daemon.agents.claude]\nkind = \"claude\"",
    ] {
        assert!(stdout.contains(built_in), "{built_in:?} in {stdout}");
    }

    let out = show(true).await?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(!stdout.contains("sk-secret-123"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout)?;
    let claude = &v["daemon"]["agents"]["claude"];
    assert_eq!(claude["kind"], "claude");
    assert_eq!(claude["env"]["ANTHROPIC_API_KEY"], "<redacted>");
    assert_eq!(claude["env"]["ANTHROPIC_BASE_URL"], "http://127.0.0.1:7071");
    assert_eq!(v["daemon"]["agents"]["codex"]["kind"], "codex");
    assert_eq!(v["agent_origins"]["aider"], "builtin");
    assert_eq!(v["agent_origins"]["claude"], "builtin_changed");
    assert_eq!(v["server"]["protocol"]["heartbeat_interval"], "1m30s");
    assert_eq!(v["gateway"]["cooldowns"]["auth"], "10m");
    assert_eq!(v["relay"]["history_retention"], "30d");
    Ok(())
}
