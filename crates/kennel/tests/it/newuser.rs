//! The new user's path: the dead ends a first-time user ran into, each checked through the
//! real binary as they would meet it. One long-running process per data directory; a busy
//! port that leaves nothing behind; refusals that say what is wrong and what to do.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Output, Stdio};

use kennel_proto::api::Scope;
use tokio::process::Command;

use crate::{bin, daemon, server, WAIT};

const DAEMON: &str = r#"
[daemon]
max_concurrent_tasks = 1

[daemon.agents.sh]
kind = "command"
command = ["sh", "-c", "{prompt}"]
"#;

/// `kennel ARGS` as a client of `srv`, with the admin key unless `key` is given.
async fn kennel_as(
    srv: &kennel_testkit::KennelServer,
    key: Option<&str>,
    args: &[&str],
) -> anyhow::Result<Output> {
    Ok(Command::new(bin())
        .args(args)
        .env("KENNEL_URL", srv.url())
        .env("KENNEL_API_KEY", key.unwrap_or(srv.admin_key()))
        .env_remove("KENNEL_CONFIG")
        .current_dir(srv.data_dir())
        .kill_on_drop(true)
        .output()
        .await?)
}

async fn kennel(srv: &kennel_testkit::KennelServer, args: &[&str]) -> anyhow::Result<Output> {
    kennel_as(srv, None, args).await
}

/// A `kennel` process with no inherited settings, run to completion with both streams kept.
async fn isolated(args: &[&str], cwd: &Path) -> anyhow::Result<Output> {
    Ok(kennel_testkit::server::isolated_command(bin())
        .args(args)
        .current_dir(cwd)
        .stderr(Stdio::piped())
        .output()
        .await?)
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

/// The names in `dir`, to show that a refused start created nothing.
/// The entries of `dir`, without the `.tmp` file a running daemon rewrites its status through
/// every 2 s (it comes and goes on its own, refused start or not).
fn names(dir: &Path) -> anyhow::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name().to_string_lossy().to_string();
        if !name.ends_with(".tmp") {
            out.insert(name);
        }
    }
    Ok(out)
}

#[tokio::test]
async fn a_second_server_on_the_same_data_directory_is_refused_before_it_touches_it(
) -> anyhow::Result<()> {
    let srv = server().await?;
    let dir = srv.data_dir().to_path_buf();
    let pid = srv
        .pid()
        .ok_or_else(|| anyhow::anyhow!("the server has no pid"))?;
    let before = names(&dir)?;
    assert!(before.contains("kennel.lock"), "{before:?}");
    assert!(!before.contains("admin.key"), "{before:?}");
    let lock = std::fs::read_to_string(dir.join("kennel.lock"))?;
    assert_eq!(lock.trim(), pid.to_string());

    // No admin key is configured for this one: had it opened the database, it would mint one.
    let out = isolated(
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &dir.display().to_string(),
        ],
        &dir,
    )
    .await?;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the data directory {} is in use by another kennel process (pid {pid})",
            dir.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("--data-dir"), "{stderr}");
    assert_eq!(
        names(&dir)?,
        before,
        "a refused start changed the directory"
    );
    assert_eq!(std::fs::read_to_string(dir.join("kennel.lock"))?, lock);

    // The first server is unaffected.
    let out = kennel(&srv, &["status"]).await?;
    assert!(out.status.success(), "{}", text(&out).1);
    Ok(())
}

#[tokio::test]
async fn a_busy_port_leaves_no_data_directory_and_says_so_once() -> anyhow::Result<()> {
    let srv = server().await?;
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("fresh");
    for cmd in ["server", "up"] {
        let out = isolated(
            &[
                cmd,
                "--listen",
                &srv.addr().to_string(),
                "--data-dir",
                &data.display().to_string(),
            ],
            tmp.path(),
        )
        .await?;
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {stderr}");
        assert_eq!(
            stderr.matches("failed to bind").count(),
            1,
            "{cmd}: {stderr}"
        );
        assert_eq!(stderr.matches("in use").count(), 1, "{cmd}: {stderr}");
        assert!(stderr.contains("--listen"), "{cmd}: {stderr}");
        assert!(!data.exists(), "{cmd} created {}", data.display());
    }
    Ok(())
}

#[tokio::test]
async fn a_second_daemon_on_the_same_data_directory_is_refused_and_status_still_reads_it(
) -> anyhow::Result<()> {
    let srv = server().await?;
    let d = kennel_testkit::KennelDaemon::start(bin(), &srv, DAEMON).await?;
    let dir = d.data_dir().to_path_buf();
    let pid = d
        .pid()
        .ok_or_else(|| anyhow::anyhow!("the daemon has no pid"))?;
    let before = names(&dir)?;

    let out = kennel_testkit::server::isolated_command(bin())
        .args(["daemon", "--data-dir"])
        .arg(&dir)
        .env("KENNEL_DAEMON__SERVER", srv.ws_url())
        .env("KENNEL_DAEMON__API_KEY", srv.admin_key())
        .current_dir(&dir)
        .stderr(Stdio::piped())
        .output()
        .await?;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the data directory {} is in use by another kennel process (pid {pid})",
            dir.display()
        )),
        "{stderr}"
    );
    assert_eq!(
        names(&dir)?,
        before,
        "a refused start changed the directory"
    );
    assert!(
        !text(&out).0.contains("daemon running"),
        "the refused daemon started: {}",
        text(&out).0
    );

    // Reading the state takes no lock.
    let status = d.status(false).await?;
    assert!(status.contains(&format!("pid {pid} (alive)")), "{status}");
    Ok(())
}

#[tokio::test]
async fn kennel_up_holds_both_locks_and_daemon_status_finds_its_daemon() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let cfg = tmp.path().join("kennel.toml");
    std::fs::write(&cfg, DAEMON)?;
    let data = tmp.path().join("data");
    let (cfg_s, data_s) = (cfg.display().to_string(), data.display().to_string());
    let up = kennel_testkit::KennelUp::start(bin(), &cfg, &data, WAIT).await?;
    let pid = up
        .pid()
        .ok_or_else(|| anyhow::anyhow!("kennel up has no pid"))?;
    let ws = format!("{}/ws/daemon", up.url().replacen("http", "ws", 1));
    let key = up.admin_key()?;

    // The directory given to `up` finds the daemon in `<data>/daemon`. Its status file is
    // written as the daemon starts; wait for it rather than assume it is there.
    let status = kennel_testkit::within(WAIT, "the local daemon's status", async {
        loop {
            let out = isolated(&["daemon", "status", "--data-dir", &data_s], tmp.path()).await?;
            if out.status.success() {
                return anyhow::Ok(text(&out).0);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await??;
    assert!(status.contains(&format!("pid {pid} (alive)")), "{status}");

    // A second `up` on the same directory is refused, naming the first one.
    let out = isolated(
        &[
            "--config",
            &cfg_s,
            "up",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data_s,
        ],
        tmp.path(),
    )
    .await?;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{data_s} is in use by another kennel process (pid {pid})"
        )),
        "{stderr}"
    );

    // So is a separate daemon on the local daemon's directory.
    let daemon_dir = data.join("daemon");
    let out = kennel_testkit::server::isolated_command(bin())
        .args(["--config", &cfg_s, "daemon", "--data-dir"])
        .arg(&daemon_dir)
        .env("KENNEL_DAEMON__SERVER", &ws)
        .env("KENNEL_DAEMON__API_KEY", &key)
        .current_dir(tmp.path())
        .stderr(Stdio::piped())
        .output()
        .await?;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{} is in use by another kennel process (pid {pid})",
            daemon_dir.display()
        )),
        "{stderr}"
    );
    drop(up); // killed when dropped
    Ok(())
}

#[tokio::test]
async fn a_client_key_creating_keys_is_told_it_needs_the_admin_scope() -> anyhow::Result<()> {
    let srv = server().await?;
    let client = srv.api().create_key("ci", &[Scope::Client]).await?.key;
    let out = kennel_as(
        &srv,
        Some(&client),
        &["keys", "create", "--name", "x", "--scope", "client"],
    )
    .await?;
    let (_, stderr) = text(&out);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("it needs the admin scope"), "{stderr}");
    assert!(!stderr.contains("admin, "), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn json_follow_prints_json_lines_and_cancel_of_a_finished_task_fails() -> anyhow::Result<()> {
    let srv = server().await?;
    let mut d = daemon(&srv, "newuser", 1).await?;
    let follower = tokio::spawn({
        let (url, key, dir) = (
            srv.url(),
            srv.admin_key().to_string(),
            srv.data_dir().to_path_buf(),
        );
        async move {
            Command::new(bin())
                .args([
                    "--json", "task", "submit", "say hi", "--agent", "command", "-f",
                ])
                .env("KENNEL_URL", url)
                .env("KENNEL_API_KEY", key)
                .env_remove("KENNEL_CONFIG")
                .current_dir(dir)
                .kill_on_drop(true)
                .output()
                .await
        }
    });
    let spawn = d.expect_spawn(WAIT).await?;
    let id = spawn.task_id.clone();
    d.accept(&id, 1).await?;
    d.output(&id, 1, "hello from the agent").await?;
    d.complete(&id, 1, true).await?;
    let out = kennel_testkit::within(WAIT, "submit -f to end", follower).await???;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("stdout is not JSON lines ({e}): {stdout}"))?;
    assert!(
        lines.iter().any(|l| l["output"] == "hello from the agent"),
        "{stdout}"
    );
    let last = lines.last().ok_or_else(|| anyhow::anyhow!("no output"))?;
    assert_eq!(last["id"], id.as_str(), "{stdout}");
    assert_eq!(last["status"], "completed", "{stdout}");

    let out = kennel(&srv, &["task", "cancel", &id]).await?;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("task {id} already completed; nothing to cancel")),
        "{stderr}"
    );

    // A queued task cancels; cancelling it again is refused the same way.
    let out = kennel(&srv, &["task", "submit", "later", "--agent", "nobody"]).await?;
    let queued = text(&out).0.trim().to_string();
    let out = kennel(&srv, &["task", "cancel", &queued]).await?;
    assert!(out.status.success(), "{}", text(&out).1);
    assert!(text(&out).0.contains("cancelled"), "{}", text(&out).0);
    let out = kennel(&srv, &["task", "cancel", &queued]).await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out)
            .1
            .contains("already cancelled; nothing to cancel"),
        "{}",
        text(&out).1
    );
    Ok(())
}

#[tokio::test]
async fn the_paging_hint_repeats_the_filters_and_the_limit() -> anyhow::Result<()> {
    let srv = server().await?;
    for n in 0..3 {
        let out = kennel(
            &srv,
            &["task", "submit", &format!("t{n}"), "--agent", "none"],
        )
        .await?;
        assert!(out.status.success(), "{}", text(&out).1);
    }
    let out = kennel(
        &srv,
        &["task", "list", "--status", "queued", "--limit", "2"],
    )
    .await?;
    let (_, stderr) = text(&out);
    let hint = stderr
        .lines()
        .find_map(|l| l.strip_prefix("more: "))
        .ok_or_else(|| anyhow::anyhow!("no paging hint: {stderr}"))?;
    assert!(
        hint.starts_with("kennel task list --status queued --limit 2 --cursor "),
        "{hint}"
    );
    // The hint, run as printed, gives the rest of the same list.
    let args: Vec<&str> = hint.split_whitespace().skip(1).collect();
    let out = kennel(&srv, &args).await?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.lines().count(), 2, "a header and one task: {stdout}");
    assert!(!stderr.contains("more:"), "{stderr}");
    Ok(())
}

/// Profiles named like the built-ins whose programs do not exist, so none of them is offered
/// and only `sh` is, whatever is installed on the machine.
const ONLY_SH: &str = r#"
[daemon.agents.claude]
kind = "command"
command = ["kennel-test-no-such-claude"]

[daemon.agents.codex]
kind = "command"
command = ["kennel-test-no-such-codex"]

[daemon.agents.aider]
kind = "command"
command = ["kennel-test-no-such-aider"]
"#;

#[tokio::test]
async fn client_commands_find_a_kennel_up_through_its_data_directory() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let cfg = tmp.path().join("kennel.toml");
    std::fs::write(&cfg, format!("{DAEMON}{ONLY_SH}"))?;
    let data = tmp.path().join("my data");
    let data_s = data.display().to_string();
    let mut up = kennel_testkit::KennelUp::start(bin(), &cfg, &data, WAIT).await?;

    // The banner says how to reach it from another shell, and suggests only an agent the
    // local daemon offers.
    let another = up
        .wait_line(WAIT, |l| l.starts_with("kennel: from another shell"))
        .await?;
    assert!(
        another.contains(&format!("`kennel status --data-dir '{data_s}'`")),
        "{another}"
    );
    let try_line = up.wait_line(WAIT, |l| l.starts_with("kennel: try")).await?;
    assert!(try_line.contains("--agent sh"), "{try_line}");
    assert!(!try_line.contains("claude"), "{try_line}");

    // No URL, no key: the command the banner prints works as printed, in a shell.
    let status = another
        .split('`')
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no command in {another}"))?;
    let out = kennel_testkit::server::isolated_command(Path::new("sh"))
        .arg("-c")
        .arg(status.replacen("kennel", "\"$KENNEL\"", 1))
        .env("KENNEL", bin())
        .current_dir(tmp.path())
        .stderr(Stdio::piped())
        .output()
        .await?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{status}: {stderr}");
    assert!(stdout.contains(up.url()), "{stdout}");
    let out = isolated(&["task", "--data-dir", &data_s, "list"], tmp.path()).await?;
    assert!(out.status.success(), "{}", text(&out).1);
    let out = isolated(&["--json", "daemons", "--data-dir", &data_s], tmp.path()).await?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let daemons: Vec<serde_json::Value> = serde_json::from_str(&stdout)?;
    assert_eq!(daemons.len(), 1, "{stdout}");

    // Stopped, it is no longer recorded, and a client says what to do.
    up.signal(nix::sys::signal::Signal::SIGTERM)?;
    let (status, _) = up.wait_exit(WAIT).await?;
    assert!(status.success(), "{status}");
    assert!(!data.join("endpoint.json").exists());
    let out = isolated(&["status", "--data-dir", &data_s], tmp.path()).await?;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "No running kennel server is recorded in {data_s}. Start one with `kennel up`"
        )),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn client_commands_find_a_kennel_up_on_the_default_data_directory() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let cfg = tmp.path().join("kennel.toml");
    std::fs::write(&cfg, DAEMON)?;
    // The default data directory is `$XDG_DATA_HOME/kennel`; `up` listens on a port of its
    // choosing, which only its record tells.
    let xdg = tmp.path().join("xdg");
    std::fs::create_dir(&xdg)?;
    let env = vec![("XDG_DATA_HOME".to_string(), xdg.display().to_string())];
    let options = kennel_testkit::UpOptions {
        env: env.clone(),
        implicit_data_dir: true,
    };
    let mut up =
        kennel_testkit::KennelUp::start_with(bin(), &cfg, &xdg.join("kennel"), &options, WAIT)
            .await?;
    let another = up
        .wait_line(WAIT, |l| l.starts_with("kennel: from another shell"))
        .await?;
    assert!(another.contains("`kennel status`"), "{another}");

    let out = kennel_testkit::server::isolated_command(bin())
        .arg("status")
        .env("XDG_DATA_HOME", &xdg)
        .current_dir(tmp.path())
        .stderr(Stdio::piped())
        .output()
        .await?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains(up.url()), "{stdout}");
    Ok(())
}

#[tokio::test]
async fn kennel_up_points_claude_code_at_its_own_gateway_with_a_key_it_keeps() -> anyhow::Result<()>
{
    use kennel_proto::api::{ApiKey, CreateTask};
    use kennel_proto::link::RepoSpec;
    use kennel_proto::TaskStatus;
    anyhow::ensure!(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .any(|d| d.join("claude").is_file()),
        "the Claude Code CLI (`claude`) is not on PATH; install it with \
         `npm install -g @anthropic-ai/claude-code` (scripts/test does)"
    );
    let upstream = kennel_testkit::ScriptedAnthropic::write_file("hello.txt", "hi\n").await?;
    let git = kennel_testkit::GitFixture::new(&[])?;
    let tmp = tempfile::tempdir()?;
    let home = tmp.path().join("home");
    std::fs::create_dir(&home)?;
    // The profile says nothing about where Claude Code sends its calls: `kennel up` does.
    let cfg = tmp.path().join("kennel.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[daemon]
max_concurrent_tasks = 1

[daemon.agents.claude]
kind = "claude"

[daemon.agents.claude.env]
{offline}
[gateway]
listen = "127.0.0.1:0"

[[gateway.upstreams]]
name = "anthropic"
kind = "anthropic"
base_url = "{url}"
api_key_env = "UPSTREAM_KEY"
"#,
            offline = crate::claude::offline_claude_env(&home),
            url = upstream.url(),
        ),
    )?;
    let data = tmp.path().join("data");
    let options = kennel_testkit::UpOptions {
        env: vec![("UPSTREAM_KEY".into(), "sk-ant-upstream".into())],
        implicit_data_dir: false,
    };
    let slow = std::time::Duration::from_secs(120);
    let mut up = kennel_testkit::KennelUp::start_with(bin(), &cfg, &data, &options, WAIT).await?;
    assert!(
        up.lines_before_url().iter().any(|l| l
            .starts_with("kennel: agents claude, codex send their LLM calls through this gateway")),
        "{:?}",
        up.lines_before_url()
    );
    let agents_key = std::fs::read_to_string(data.join("agents.key"))?;

    let api = up.api()?;
    let t = api
        .submit(&CreateTask {
            name: "claude through the gateway".into(),
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
    let done = kennel_testkit::wait_task_status(
        up.url(),
        &up.admin_key()?,
        &t.id,
        TaskStatus::Completed,
        slow,
    )
    .await;
    if let Err(e) = done {
        let out = api.output(&t.id, Some(1), 0).await?;
        anyhow::bail!("{e}\noutput: {out:#?}");
    }
    assert_eq!(git.show(&format!("kennel/{}", t.id), "hello.txt")?, "hi");
    // Only the gateway knows the upstream's key: every call the upstream saw came through it.
    let recorded = upstream.recorded();
    assert!(!recorded.is_empty());
    for r in &recorded {
        assert_eq!(
            r.headers.get("x-api-key").map(String::as_str),
            Some("sk-ant-upstream"),
            "{r:?}"
        );
    }

    // Started again on the same data, it keeps the key it minted: one key, not one per start.
    up.signal(nix::sys::signal::Signal::SIGTERM)?;
    up.wait_exit(WAIT).await?;
    let up = kennel_testkit::KennelUp::start_with(bin(), &cfg, &data, &options, WAIT).await?;
    assert_eq!(
        std::fs::read_to_string(data.join("agents.key"))?,
        agents_key
    );
    let keys: Vec<ApiKey> = up.api()?.get("/api/v1/keys").await?;
    let agent_keys: Vec<&ApiKey> = keys.iter().filter(|k| k.name == "local agents").collect();
    assert_eq!(agent_keys.len(), 1, "{keys:?}");
    assert_eq!(agent_keys[0].scopes, [Scope::Gateway]);
    Ok(())
}

#[tokio::test]
async fn without_base_a_task_starts_from_the_remotes_default_branch() -> anyhow::Result<()> {
    use kennel_testkit::git::git;
    let fixture = kennel_testkit::GitFixture::new(&[])?;
    // The remote's default branch is `trunk`, which has a file `main` lacks.
    let seed = fixture.remote().with_file_name("trunk-seed");
    git(
        fixture.remote().parent().unwrap_or(Path::new("/")),
        &["clone", "-q", &fixture.url(), "trunk-seed"],
    )?;
    git(&seed, &["checkout", "-q", "-b", "trunk"])?;
    std::fs::write(seed.join("trunk.txt"), "from trunk\n")?;
    git(&seed, &["add", "trunk.txt"])?;
    git(&seed, &["commit", "-q", "-m", "trunk"])?;
    git(&seed, &["push", "-q", "origin", "trunk"])?;
    git(
        &fixture.remote(),
        &["symbolic-ref", "HEAD", "refs/heads/trunk"],
    )?;

    let tmp = tempfile::tempdir()?;
    let cfg = tmp.path().join("kennel.toml");
    std::fs::write(&cfg, DAEMON)?;
    let data = tmp.path().join("data");
    let data_s = data.display().to_string();
    let _up = kennel_testkit::KennelUp::start(bin(), &cfg, &data, WAIT).await?;
    let out = isolated(
        &[
            "--json",
            "task",
            "submit",
            "--data-dir",
            &data_s,
            "--agent",
            "sh",
            "--repo",
            &fixture.url(),
            "cp trunk.txt seen.txt",
            "-f",
        ],
        tmp.path(),
    )
    .await?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}\n{stdout}");
    let last: serde_json::Value = serde_json::from_str(
        stdout
            .lines()
            .last()
            .ok_or_else(|| anyhow::anyhow!("no output"))?,
    )?;
    let id = last["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no task id in {last}"))?;
    assert_eq!(
        fixture.show(&format!("kennel/{id}"), "seen.txt")?,
        "from trunk"
    );
    let out = isolated(&["task", "show", "--data-dir", &data_s, id], tmp.path()).await?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("(from its default branch)"), "{stdout}");
    Ok(())
}
