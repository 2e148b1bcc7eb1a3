//! Daemon benchmarks: how long from `spawnTask` to the agent running, and how long a worktree
//! of a large repository takes to create.
//!
//! `spawn` plays the coordinator itself (a WebSocket server speaking protocol v1) against the
//! real `kennel daemon` binary, so the figure is the daemon's own cost: decode, preflight,
//! outbox, process start, first line read and sent back. `worktree` calls the daemon's
//! worktree code directly on a generated repository.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use kennel_proto::link::{Ack, Authenticated, RepoSpec, SpawnTask, TaskLimits};
use kennel_proto::{decode_daemon_frame, DaemonMessage, Decoded, ServerMessage};
use tokio_tungstenite::tungstenite::Message;

use crate::{machine, percentile, TempDir};

#[derive(Debug, clap::Args)]
pub struct SpawnArgs {
    /// The kennel binary (build it with `cargo build --release`).
    #[arg(long, default_value = "target/release/kennel")]
    kennel_bin: PathBuf,
    /// Tasks to run, one after another.
    #[arg(long, default_value_t = 200)]
    tasks: u32,
}

#[derive(Debug, clap::Args)]
pub struct WorktreeArgs {
    /// Files in the generated repository.
    #[arg(long, default_value_t = 10_000)]
    files: u32,
    /// Worktrees to create after the first (which also clones).
    #[arg(long, default_value_t = 10)]
    runs: u32,
}

fn temp(prefix: &str) -> anyhow::Result<TempDir> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(TempDir(dir))
}

pub async fn spawn(args: SpawnArgs) -> anyhow::Result<()> {
    let dir = temp("kennel-bench-spawn")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = dir.0.join("kennel.toml");
    std::fs::write(
        &config,
        "[daemon.agents.echo]\nkind = \"command\"\ncommand = [\"sh\", \"-c\", \"echo started\"]\n",
    )?;
    let mut child = Command::new(&args.kennel_bin)
        .arg("--config")
        .arg(&config)
        .args(["daemon", "--data-dir"])
        .arg(dir.0.join("daemon"))
        .env("KENNEL_DAEMON__SERVER", format!("ws://{addr}/ws/daemon"))
        .env("KENNEL_DAEMON__API_KEY", "bench")
        .env("KENNEL_LOG", "warn")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("failed to start {}", args.kennel_bin.display()))?;
    let result = drive(listener, args.tasks).await;
    let _ = child.kill();
    let _ = child.wait();
    let (mut to_output, mut to_accept) = result?;
    to_output.sort_by(|a, b| a.total_cmp(b));
    to_accept.sort_by(|a, b| a.total_cmp(b));
    println!("machine: {}", machine());
    println!(
        "spawn: {} tasks, one at a time, `sh -c 'echo started'` as the agent (command profile, no repository)",
        args.tasks
    );
    println!(
        "spawnTask -> taskAccepted ms: p50 {:.2}, p90 {:.2}, p99 {:.2}",
        percentile(&to_accept, 0.5),
        percentile(&to_accept, 0.9),
        percentile(&to_accept, 0.99)
    );
    println!(
        "spawnTask -> first output line of the running agent ms: p50 {:.2}, p90 {:.2}, p99 {:.2}",
        percentile(&to_output, 0.5),
        percentile(&to_output, 0.9),
        percentile(&to_output, 0.99)
    );
    Ok(())
}

/// Accepts the daemon, then sends tasks one by one; returns per-task latencies in ms.
async fn drive(
    listener: tokio::net::TcpListener,
    tasks: u32,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (tcp, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .context("the daemon did not connect within 30s")??;
    tcp.set_nodelay(true)?;
    let ws = tokio_tungstenite::accept_async(tcp).await?;
    let (mut sink, mut stream) = ws.split();
    let first = next_daemon(&mut stream).await?;
    let DaemonMessage::Authenticate(hello) = first else {
        bail!("expected authenticate, got {first:?}");
    };
    if !hello.agents.contains(&"echo".to_string()) {
        bail!(
            "the daemon did not offer the `echo` profile: {:?}",
            hello.agents
        );
    }
    let auth = ServerMessage::Authenticated(Authenticated {
        daemon_id: "d-bench".into(),
        heartbeat_interval_secs: 10,
        protocol_version: 1,
        max_frame_bytes: 1 << 20,
    });
    sink.send(Message::Text(auth.to_json().into())).await?;
    let (mut to_output, mut to_accept) = (Vec::new(), Vec::new());
    for i in 0..tasks {
        let task_id = format!("t-bench-{i}");
        let spawn = ServerMessage::SpawnTask(SpawnTask {
            task_id: task_id.clone(),
            attempt: 1,
            task_name: "bench".into(),
            prompt: "bench".into(),
            repo: None,
            agent: "echo".into(),
            env: Default::default(),
            limits: TaskLimits::default(),
            session: None,
        });
        let start = Instant::now();
        sink.send(Message::Text(spawn.to_json().into())).await?;
        let mut output_seen = false;
        loop {
            let m = next_daemon(&mut stream).await?;
            let Some(h) = m.seq_header() else { continue };
            let ack = ServerMessage::Ack(Ack {
                task_id: h.task_id.to_string(),
                attempt: h.attempt,
                seq: h.seq,
            });
            match &m {
                DaemonMessage::TaskAccepted(_) => to_accept.push(ms(start)),
                DaemonMessage::TaskOutput(o) if !output_seen && o.output == "started" => {
                    output_seen = true;
                    to_output.push(ms(start));
                }
                DaemonMessage::TaskRejected(r) => bail!("task rejected: {}", r.reason),
                _ => {}
            }
            let done = matches!(m, DaemonMessage::TaskComplete(_));
            sink.send(Message::Text(ack.to_json().into())).await?;
            if done {
                break;
            }
        }
    }
    Ok((to_output, to_accept))
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

async fn next_daemon<S>(stream: &mut S) -> anyhow::Result<DaemonMessage>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .context("the daemon went silent for 30s")?
            .context("the daemon disconnected")??;
        if let Message::Text(t) = frame {
            if let Decoded::Known(m) = decode_daemon_frame(t.as_str(), usize::MAX)? {
                return Ok(m);
            }
        }
    }
}

fn git(cwd: &Path, args: &[&str]) -> anyhow::Result<()> {
    let st = Command::new("git")
        .args([
            "-c",
            "user.name=bench",
            "-c",
            "user.email=bench@example.invalid",
        ])
        .args(args)
        .current_dir(cwd)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("git {args:?} failed");
    }
    Ok(())
}

pub async fn worktree(args: WorktreeArgs) -> anyhow::Result<()> {
    let dir = temp("kennel-bench-worktree")?;
    let seed = dir.0.join("seed");
    std::fs::create_dir_all(&seed)?;
    git(&seed, &["init", "-q", "-b", "main"])?;
    for i in 0..args.files {
        let sub = seed.join(format!("d{}", i / 100));
        std::fs::create_dir_all(&sub)?;
        std::fs::write(sub.join(format!("f{i}.txt")), format!("file {i}\n"))?;
    }
    git(&seed, &["add", "-A"])?;
    git(&seed, &["commit", "-q", "-m", "seed"])?;
    git(&dir.0, &["clone", "-q", "--bare", "seed", "remote.git"])?;
    let repo = RepoSpec {
        url: dir.0.join("remote.git").display().to_string(),
        base_branch: "main".into(),
    };
    let cache = kennel_daemon::worktree::RepoCache::new(
        &dir.0.join("daemon"),
        kennel_daemon::worktree::GitSettings {
            branch_prefix: "kennel/".into(),
            author_name: "bench".into(),
            author_email: "bench@example.invalid".into(),
            commit_message: "bench".into(),
        },
    );
    let start = Instant::now();
    let first = cache.prepare(&repo, "t-first", 1).await?;
    let cold = ms(start);
    first.remove().await?;
    let mut warm = Vec::new();
    let mut removal = Vec::new();
    for i in 0..args.runs {
        let start = Instant::now();
        let wt = cache.prepare(&repo, &format!("t-{i}"), 1).await?;
        warm.push(ms(start));
        let start = Instant::now();
        wt.remove().await?;
        removal.push(ms(start));
    }
    warm.sort_by(|a, b| a.total_cmp(b));
    removal.sort_by(|a, b| a.total_cmp(b));
    println!("machine: {}", machine());
    println!(
        "worktree: repository of {} files, local bare remote",
        args.files
    );
    println!("first task (clone + fetch + worktree add): {cold:.0} ms");
    println!(
        "later tasks (fetch + worktree add), {} runs: median {:.0} ms, max {:.0} ms; removal median {:.0} ms",
        args.runs,
        percentile(&warm, 0.5),
        warm.last().copied().unwrap_or(f64::NAN),
        percentile(&removal, 0.5)
    );
    Ok(())
}
