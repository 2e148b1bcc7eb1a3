//! `kennel-bench connections`: many idle daemons on one coordinator, or spread over several
//! on one PostgreSQL (`--postgres --coordinators N`). Starts the real `kennel server`(s),
//! connects N protocol-level daemons (64 handshakes in flight at a time, as a fleet
//! reconnecting would; each then heartbeats every 5 s), and reports:
//! - resident memory per connected daemon (the servers' RSS with N connected minus RSS
//!   before, / N);
//! - the servers' CPU (and PostgreSQL's) while they only process heartbeats (N / 5 per
//!   second), over a window;
//! - submit → `spawnTask` latency for tasks submitted at a fixed rate with all N connected.
//!
//! Raises its own open-files limit to the hard limit; the server raises its own.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::{machine, percentile, run_daemon, start_servers, submit, Timings};

#[derive(Debug, clap::Args)]
pub struct ConnectionsArgs {
    /// The kennel binary to benchmark (build it with `cargo build --release`).
    #[arg(long, default_value = "target/release/kennel")]
    kennel_bin: std::path::PathBuf,
    /// Daemons to connect.
    #[arg(long, default_value_t = 10_000)]
    daemons: u32,
    /// Seconds over which the server's CPU for heartbeats is measured.
    #[arg(long, default_value_t = 20)]
    heartbeat_window_secs: u64,
    /// Tasks submitted (at `--rate` per second) to measure dispatch latency.
    #[arg(long, default_value_t = 500)]
    tasks: u64,
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Keep the state in PostgreSQL (a fresh schema of the database at
    /// `KENNEL_TEST_POSTGRES_URL`, default `postgres://root@127.0.0.1:5432/test`).
    #[arg(long)]
    postgres: bool,
    /// Coordinators sharing that database (needs --postgres); daemons and submits are spread
    /// over them in turn.
    #[arg(long, default_value_t = 1)]
    coordinators: usize,
}

/// CPU time all processes named `name` have used, in clock ticks.
fn cpu_ticks_named(name: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .filter_map(cpu_ticks)
        .sum()
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time a process has used (user + system), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after `) state`.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn raise_open_files() {
    let Ok((_, hard)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    else {
        return;
    };
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
}

pub async fn run(a: ConnectionsArgs) -> anyhow::Result<()> {
    raise_open_files();
    let (schema, servers) = start_servers(&a.kennel_bin, a.postgres, a.coordinators).await?;
    let pids: Vec<u32> = servers.iter().map(|s| s.child.id()).collect();
    let urls: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let ws_urls: Vec<String> = urls
        .iter()
        .map(|u| format!("{}/ws/daemon", u.replacen("http://", "ws://", 1)))
        .collect();
    let rss = || -> anyhow::Result<u64> {
        pids.iter()
            .map(|pid| rss_kib(*pid).context("cannot read a server's memory"))
            .sum()
    };
    let ticks = || -> anyhow::Result<u64> {
        pids.iter()
            .map(|pid| cpu_ticks(*pid).context("cannot read a server's CPU time"))
            .sum()
    };
    println!("machine: {}", machine());
    match a.postgres {
        true => println!(
            "setup: {} coordinator(s) on PostgreSQL, {} daemons spread over them",
            a.coordinators, a.daemons
        ),
        false => println!("setup: one coordinator on SQLite, {} daemons", a.daemons),
    }
    // Let the servers finish starting (store, scheduler) before the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = rss()?;

    let timings = Arc::new(Mutex::new(Timings::default()));
    let completed = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(a.daemons as usize + 1);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(64));
    let started = Instant::now();
    for n in 0..a.daemons {
        let permit = handshakes.clone().acquire_owned().await?;
        let u = ws_urls[n as usize % ws_urls.len()].clone();
        let (t, c) = (timings.clone(), completed.clone());
        let (one_tx, mut one_rx) = tokio::sync::mpsc::channel(1);
        let all = ready_tx.clone();
        tokio::spawn(async move {
            let _ = run_daemon(u, n, 1, t, c, one_tx).await;
        });
        tokio::spawn(async move {
            if one_rx.recv().await.is_some() {
                let _ = all.send(()).await;
            }
            drop(permit);
        });
    }
    for i in 0..a.daemons {
        tokio::time::timeout(Duration::from_secs(120), ready_rx.recv())
            .await
            .with_context(|| format!("only {i} of {} daemons authenticated", a.daemons))?;
    }
    let connect_secs = started.elapsed().as_secs_f64();
    // One heartbeat round so every link has settled into its steady state.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let with = rss()?;
    let per_conn = (with.saturating_sub(base)) as f64 * 1024.0 / a.daemons as f64;
    println!(
        "{} daemons connected in {connect_secs:.1}s; servers' RSS {base} KiB before, {with} KiB \
         after: {:.1} KiB per connected daemon",
        a.daemons,
        per_conn / 1024.0
    );

    // Clock ticks per second of /proc's CPU times (100 on Linux in practice).
    let clk_tck = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(100.0);
    let (t0, pg0) = (ticks()?, cpu_ticks_named("postgres"));
    tokio::time::sleep(Duration::from_secs(a.heartbeat_window_secs)).await;
    let (t1, pg1) = (ticks()?, cpu_ticks_named("postgres"));
    let window = a.heartbeat_window_secs as f64;
    let cpu = (t1 - t0) as f64 / clk_tck / window;
    let per_sec = a.daemons as f64 / 5.0;
    println!(
        "heartbeats: {per_sec:.0}/s for {}s; servers' CPU {:.1}% of one core ({:.1} µs per heartbeat)",
        a.heartbeat_window_secs,
        cpu * 100.0,
        cpu * 1e6 / per_sec
    );
    if a.postgres {
        let pg = pg1.saturating_sub(pg0) as f64 / clk_tck / window;
        println!(
            "  PostgreSQL's CPU meanwhile (every postgres process on the machine): {:.1}% of one core",
            pg * 100.0
        );
    }

    let http = reqwest::Client::new();
    let period = Duration::from_secs_f64(1.0 / a.rate.max(1) as f64);
    let start = Instant::now();
    let mut handles = Vec::new();
    for i in 0..a.tasks {
        tokio::time::sleep_until((start + period * i as u32).into()).await;
        let name = format!("conn-{i}");
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
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = timings
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .spawned
            .len() as u64;
        if n >= a.tasks || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lat = timings
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .sorted_latencies_ms();
    println!(
        "dispatch with {} connected: {} tasks at {}/s; submit->spawnTask ms p50 {:.2}, p99 {:.2} ({} measured)",
        a.daemons,
        a.tasks,
        a.rate,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.len()
    );
    drop(servers);
    if let Some(schema) = schema {
        schema.drop_schema().await?;
    }
    Ok(())
}
