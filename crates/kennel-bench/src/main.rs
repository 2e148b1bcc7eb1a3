//! `kennel-bench dispatch`: starts a real `kennel server` on loopback with a fresh SQLite
//! store, connects N protocol-level daemons, submits tasks over the REST API and measures
//! submit → `spawnTask` latency (fixed-rate phase) and sustained submit → dispatch → complete
//! throughput (saturation phase). The daemons accept and complete every task at once, so the
//! figures are the coordinator's own cost.
//!
//! Everything runs on one machine: the load generator competes with the server for CPU, which
//! the report states with the machine's description.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use kennel_proto::link::{Authenticate, Heartbeat, Secret, TaskAccepted, TaskComplete};
use kennel_proto::{decode_server_frame, DaemonMessage, Decoded, ServerMessage};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Parser)]
#[command(name = "kennel-bench", about = "Load generators for kennel")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

mod agents_bench;
mod connections_bench;
mod daemon_bench;
mod gateway_bench;
mod relay_bench;
mod soak_bench;

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Dispatch latency at a fixed submit rate, then sustained throughput.
    Dispatch(DispatchArgs),
    /// Daemon: time from spawnTask to the agent running.
    Spawn(daemon_bench::SpawnArgs),
    /// Daemon: worktree creation time for a large repository.
    Worktree(daemon_bench::WorktreeArgs),
    /// Gateway: latency added over calling the upstream directly.
    Gateway(gateway_bench::GatewayArgs),
    /// Relay: latency and throughput a `kennel relay` adds to the daemon link.
    Relay(relay_bench::RelayArgs),
    /// Many idle daemons on one coordinator: memory per connection, heartbeat cost, dispatch
    /// latency with all of them connected.
    Connections(connections_bench::ConnectionsArgs),
    /// Many tasks on real daemons with crashes and clean stops: throughput, start latency,
    /// attempts per task, refusals.
    Soak(soak_bench::SoakArgs),
    /// Build agents converging on a pipeline of stories: time, document size, sync traffic.
    Agents(agents_bench::AgentsArgs),
}

#[derive(Debug, clap::Args)]
struct DispatchArgs {
    /// The kennel binary to benchmark (build it with `cargo build --release`).
    #[arg(long, default_value = "target/release/kennel")]
    kennel_bin: PathBuf,
    /// Protocol-level daemons to connect.
    #[arg(long, default_value_t = 100)]
    daemons: u32,
    /// Task slots per daemon.
    #[arg(long, default_value_t = 50)]
    capacity: u32,
    /// Submit rate of the latency phase, tasks per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Length of the latency phase, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Tasks in the throughput phase (0 skips it).
    #[arg(long, default_value_t = 20000)]
    tasks: u64,
    /// Concurrent submitters in the throughput phase.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Keep the state in PostgreSQL (a fresh schema of the database at
    /// `KENNEL_TEST_POSTGRES_URL`, default `postgres://root@127.0.0.1:5432/test`) instead of
    /// SQLite.
    #[arg(long)]
    postgres: bool,
    /// Coordinators sharing that database (needs --postgres); daemons and submits are spread
    /// over them in turn.
    #[arg(long, default_value_t = 1)]
    coordinators: usize,
}

impl Timings {
    /// Submit → `spawnTask` of every task seen at both ends, in milliseconds, sorted.
    pub(crate) fn sorted_latencies_ms(&self) -> Vec<f64> {
        let mut lat: Vec<f64> = self
            .submitted
            .iter()
            .filter_map(|(k, s)| {
                self.spawned
                    .get(k)
                    .map(|d| d.duration_since(*s).as_secs_f64() * 1000.0)
            })
            .collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        lat
    }
}

/// Submit instants and spawn instants, keyed by task name.
#[derive(Default)]
pub(crate) struct Timings {
    pub(crate) submitted: HashMap<String, Instant>,
    pub(crate) spawned: HashMap<String, Instant>,
}

pub(crate) struct ServerProc {
    pub(crate) child: Child,
    pub(crate) url: String,
    _dir: TempDir,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory removed on drop (no extra dependency for one directory).
pub(crate) struct TempDir(pub(crate) PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const ADMIN_KEY: &str = "kennel-bench-admin-key-0123456789";

/// The `n`th server of a benchmark; with `database_url`, on that PostgreSQL with the hash key
/// every coordinator of it shares.
pub(crate) fn start_server_with(
    bin: &PathBuf,
    n: usize,
    database_url: Option<&str>,
) -> anyhow::Result<ServerProc> {
    let dir = std::env::temp_dir().join(format!("kennel-bench-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let dir = TempDir(dir);
    let mut cmd = Command::new(bin);
    // The server reads every `KENNEL_*` variable as configuration; the bench's own (such as
    // `KENNEL_TEST_POSTGRES_URL`) are not for it.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KENNEL_") {
            cmd.env_remove(name);
        }
    }
    if let Some(url) = database_url {
        cmd.env("KENNEL_SERVER__DATABASE_URL", url).env(
            "KENNEL_SERVER__AUTH__HASH_KEY",
            "kennel-bench-hash-key-0123456789abcdef",
        );
    }
    let mut child = cmd
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir.0)
        .env("KENNEL_SERVER__AUTH__ADMIN_KEY", ADMIN_KEY)
        .env("KENNEL_LOG", "warn")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| {
            format!(
                "failed to start {} (build it with cargo build --release)",
                bin.display()
            )
        })?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        let Some(line) = lines.next() else {
            bail!("kennel server exited before it was ready");
        };
        let line = line?;
        if let Some(u) = line.strip_prefix("kennel: listening on ") {
            break u.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok(ServerProc {
        child,
        url,
        _dir: dir,
    })
}

pub(crate) async fn run_daemon(
    ws_url: String,
    n: u32,
    capacity: u32,
    timings: Arc<Mutex<Timings>>,
    completed: Arc<AtomicU64>,
    ready: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<()> {
    let (ws, _) = tokio_tungstenite::connect_async_with_config(&ws_url, None, true).await?;
    let (mut sink, mut stream) = ws.split();
    let hello = DaemonMessage::Authenticate(Authenticate {
        api_key: Secret(ADMIN_KEY.into()),
        machine_id: format!("bench-{n}"),
        hostname: format!("bench-{n}"),
        max_concurrent_tasks: capacity,
        protocol_version: kennel_proto::PROTOCOL_VERSION,
        min_protocol_version: None,
        version: "bench".into(),
        labels: Default::default(),
        agents: vec!["command".into()],
        running_tasks: vec![],
    });
    sink.send(Message::Text(hello.to_json().into())).await?;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
    let mut announced = false;
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                let hb = DaemonMessage::Heartbeat(Heartbeat { active_tasks: vec![] });
                sink.send(Message::Text(hb.to_json().into())).await?;
            }
            frame = stream.next() => {
                let Some(frame) = frame else { return Ok(()) };
                let Message::Text(text) = frame? else { continue };
                let Decoded::Known(msg) = decode_server_frame(text.as_str(), usize::MAX)? else { continue };
                match msg {
                    ServerMessage::Authenticated(_) if !announced => {
                        announced = true;
                        let _ = ready.send(()).await;
                    }
                    ServerMessage::SpawnTask(s) => {
                        timings.lock().map_err(|_| anyhow::anyhow!("poisoned"))?
                            .spawned.insert(s.task_name.clone(), Instant::now());
                        let acc = DaemonMessage::TaskAccepted(TaskAccepted {
                            task_id: s.task_id.clone(), attempt: s.attempt, seq: 1,
                        });
                        let done = DaemonMessage::TaskComplete(TaskComplete {
                            task_id: s.task_id, attempt: s.attempt, seq: 2, success: true,
                            error: None, exit_code: Some(0), branch: None, commit: None,
                        });
                        sink.feed(Message::Text(acc.to_json().into())).await?;
                        sink.send(Message::Text(done.to_json().into())).await?;
                    }
                    ServerMessage::Ack(a) if a.seq == 2 => {
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                    ServerMessage::Error(e) => eprintln!("daemon {n}: server error: {}", e.message),
                    _ => {}
                }
            }
        }
    }
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {mem}")
}

pub(crate) async fn submit(http: &reqwest::Client, url: &str, name: &str) -> anyhow::Result<()> {
    let body = serde_json::json!({"name": name, "prompt": "bench", "agent": "command"});
    let resp = http
        .post(format!("{url}/api/v1/tasks"))
        .bearer_auth(ADMIN_KEY)
        .json(&body)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("submit failed: HTTP {}", resp.status());
    }
    Ok(())
}

/// The servers of a benchmark: one on SQLite, or `coordinators` on a fresh schema of the
/// PostgreSQL at `KENNEL_TEST_POSTGRES_URL` (returned, to drop at the end).
pub(crate) async fn start_servers(
    bin: &PathBuf,
    postgres: bool,
    coordinators: usize,
) -> anyhow::Result<(Option<kennel_testkit::PgSchema>, Vec<ServerProc>)> {
    if coordinators == 0 || (coordinators > 1 && !postgres) {
        bail!(
            "--coordinators {coordinators} needs --postgres (several coordinators share one \
             PostgreSQL)"
        );
    }
    let schema = match postgres {
        true => Some(kennel_testkit::PgSchema::create().await?),
        false => None,
    };
    let mut servers = Vec::new();
    for n in 0..coordinators {
        servers.push(start_server_with(bin, n, schema.as_ref().map(|s| s.url()))?);
    }
    Ok((schema, servers))
}

async fn dispatch(args: DispatchArgs) -> anyhow::Result<()> {
    let (schema, servers) =
        start_servers(&args.kennel_bin, args.postgres, args.coordinators).await?;
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let ws_urls: Vec<String> = urls
        .iter()
        .map(|u| format!("{}/ws/daemon", u.replacen("http://", "ws://", 1)))
        .collect();
    let timings = Arc::new(Mutex::new(Timings::default()));
    let completed = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(args.daemons as usize + 1);
    // Set before the server is stopped, so the daemons' disconnects are not reported as errors.
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for n in 0..args.daemons {
        let (u, t, c, r) = (
            ws_urls[n as usize % ws_urls.len()].clone(),
            timings.clone(),
            completed.clone(),
            ready_tx.clone(),
        );
        let cap = args.capacity;
        let stopping = stopping.clone();
        tokio::spawn(async move {
            let result = run_daemon(u, n, cap, t, c, r).await;
            if let Err(e) = result {
                if !stopping.load(Ordering::Relaxed) {
                    eprintln!("daemon {n} stopped: {e:#}");
                }
            }
        });
    }
    for _ in 0..args.daemons {
        tokio::time::timeout(Duration::from_secs(30), ready_rx.recv())
            .await
            .context("daemons did not all authenticate within 30s")?;
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    println!("machine: {}", machine());
    let store = match args.postgres {
        true => format!("PostgreSQL, {} coordinator(s)", args.coordinators),
        false => "SQLite".to_string(),
    };
    println!(
        "setup: kennel server ({store}, {}) with {} daemons x {} slots on loopback",
        args.kennel_bin.display(),
        args.daemons,
        args.capacity
    );

    // Phase 1: fixed rate.
    let total = args.rate as u64 * args.seconds;
    let period = Duration::from_secs_f64(1.0 / args.rate as f64);
    let start = Instant::now();
    let mut handles = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + period * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let name = format!("lat-{i}");
        timings
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .submitted
            .insert(name.clone(), Instant::now());
        let (h, u) = (http.clone(), urls[i as usize % urls.len()].clone());
        handles.push(tokio::spawn(async move { submit(&h, &u, &name).await }));
    }
    for h in handles {
        h.await??;
    }
    let offered = total as f64 / start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    while completed.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lat = timings
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .sorted_latencies_ms();
    println!(
        "latency phase: {} tasks offered at {:.0}/s; submit->spawnTask ms: p50 {:.2}, p90 {:.2}, p99 {:.2}, max {:.2} ({} measured)",
        total,
        offered,
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN),
        lat.len()
    );

    // Phase 2: saturation.
    if args.tasks > 0 {
        let before = completed.load(Ordering::Relaxed);
        let next = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..args.concurrency {
            let (h, urls, next, n) = (http.clone(), urls.clone(), next.clone(), args.tasks);
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return anyhow::Ok(());
                    }
                    let u = &urls[i as usize % urls.len()];
                    submit(&h, u, &format!("tp-{i}")).await?;
                }
            }));
        }
        for w in workers {
            w.await??;
        }
        let submitted_in = start.elapsed();
        let deadline = Instant::now() + Duration::from_secs(120);
        while completed.load(Ordering::Relaxed) - before < args.tasks && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let done = completed.load(Ordering::Relaxed) - before;
        let elapsed = start.elapsed();
        println!(
            "throughput phase: {} tasks submitted in {:.2}s ({:.0}/s); {} completed in {:.2}s: {:.0} tasks/s sustained (submit->dispatch->complete, {} concurrent submitters)",
            args.tasks,
            submitted_in.as_secs_f64(),
            args.tasks as f64 / submitted_in.as_secs_f64(),
            done,
            elapsed.as_secs_f64(),
            done as f64 / elapsed.as_secs_f64(),
            args.concurrency
        );
    }
    stopping.store(true, Ordering::Relaxed);
    drop(servers);
    if let Some(schema) = schema {
        schema.drop_schema().await?;
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The gateway bench's load generator and upstream run on one thread, like `wrk -t1`: on
    // two cores a second busy thread would take its CPU slices from the proxy under test.
    let builder = match cli.cmd {
        Cmd::Gateway(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    let rt = match builder {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kennel-bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async {
        match cli.cmd {
            Cmd::Dispatch(a) => dispatch(a).await,
            Cmd::Spawn(a) => daemon_bench::spawn(a).await,
            Cmd::Worktree(a) => daemon_bench::worktree(a).await,
            Cmd::Gateway(a) => gateway_bench::run(a).await,
            Cmd::Relay(a) => relay_bench::run(a).await,
            Cmd::Soak(a) => soak_bench::run(a).await,
            Cmd::Connections(a) => connections_bench::run(a).await,
            Cmd::Agents(a) => agents_bench::run(a).await,
        }
    });
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kennel-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
