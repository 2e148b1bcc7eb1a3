//! `kennel daemon`: run the worker, or show the state of the one on this machine.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use kennel_daemon::daemon::{read_status, start};

use crate::commands::print_json;
use crate::config::{self, Config};
use crate::lock::DataDirLock;
use crate::Global;

#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[command(subcommand)]
    pub cmd: Option<DaemonCmd>,
    /// Directory for the outbox, repository caches and worktrees
    /// (default: <server.data_dir>/daemon).
    #[arg(long, value_name = "DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Agents to run at once.
    #[arg(long, value_name = "N")]
    pub max_tasks: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum DaemonCmd {
    /// Connect to the coordinator (--url, daemon.server) and run tasks (the default).
    Run,
    /// Show the local daemon: upstream link, running tasks, outbox depth.
    Status,
}

/// The daemon's data directory from flags and config.
pub fn data_dir(cfg: &Config, flag: Option<&PathBuf>) -> PathBuf {
    flag.cloned()
        .or_else(|| cfg.daemon.data_dir.clone())
        .unwrap_or_else(|| cfg.server.data_dir.join("daemon"))
}

pub async fn run(g: &Global, args: DaemonArgs) -> anyhow::Result<ExitCode> {
    let (mut cfg, _) = config::load(g.config.as_deref(), &[])?;
    let dir = data_dir(&cfg, args.data_dir.as_ref());
    match args.cmd.unwrap_or(DaemonCmd::Run) {
        DaemonCmd::Status => status(g, &dir),
        DaemonCmd::Run => {
            crate::commands::server::init_tracing(cfg.log.as_deref());
            if let Some(url) = &g.url {
                cfg.daemon.server = url.clone();
            }
            if let Some(key) = &g.api_key {
                cfg.daemon.api_key = Some(key.clone());
            }
            if let Some(n) = args.max_tasks {
                cfg.daemon.max_concurrent_tasks = n;
            }
            // Before anything else touches the directory: a second daemon on it would share
            // the first one's id, outbox and worktrees.
            let _lock = DataDirLock::acquire(&dir).context("failed to start the daemon")?;
            let mut handle = start(cfg.daemon.clone(), dir.clone())
                .await
                .context("failed to start the daemon")?;
            println!(
                "kennel: daemon running, data in {}; `kennel daemon status` shows its state",
                dir.display()
            );
            // Say when the link comes up (scripts and tests wait for this line).
            let mut state = handle.state.clone();
            let configured = cfg.daemon.server.clone();
            tokio::spawn(async move {
                let mut was = false;
                loop {
                    let now = state.borrow_and_update().clone();
                    if now.connected && !was {
                        println!(
                            "kennel: connected to {} as {}",
                            now.upstream.as_deref().unwrap_or(&configured),
                            now.daemon_id.as_deref().unwrap_or("?")
                        );
                    }
                    was = now.connected;
                    if state.changed().await.is_err() {
                        return;
                    }
                }
            });
            tokio::select! {
                r = handle.wait() => {
                    r?;
                }
                _ = crate::commands::server::shutdown_signal() => {
                    let again = crate::commands::server::next_shutdown_signal();
                    crate::commands::up::announce_stop(&handle, cfg.daemon.shutdown_grace);
                    handle.stop(again).await;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn status(g: &Global, dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    // `kennel up --data-dir D` keeps its local daemon in `D/daemon`; a user who passes the
    // directory they gave `up` means that daemon.
    let nested = dir.join("daemon");
    let dir = if read_status(dir).is_none() && read_status(&nested).is_some() {
        nested.as_path()
    } else {
        dir
    };
    let Some(mut s) = read_status(dir) else {
        anyhow::bail!(
            "no daemon state in {} (start one with `kennel daemon`, or pass --data-dir)",
            dir.display()
        );
    };
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.pid as i32), None).is_ok();
    // The link's state comes from the status file; tasks and the outbox are read live from
    // the outbox database, which the daemon updates as it works.
    if let Ok(outbox) = kennel_daemon::outbox::Outbox::open(&dir.join("outbox.db")) {
        if let Ok(depth) = outbox.depth() {
            s.outbox_depth = depth;
        }
        if let Ok(held) = outbox.held() {
            s.running = held
                .into_iter()
                .filter(|h| !h.finished)
                .map(|h| kennel_daemon::daemon::RunningStatus {
                    task_id: h.task_id,
                    attempt: h.attempt,
                })
                .collect();
        }
    }
    if g.json {
        let mut v = serde_json::to_value(&s)?;
        v["alive"] = serde_json::Value::Bool(alive);
        print_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    let link = match (alive, s.connected) {
        (false, _) => "not running".to_string(),
        (true, true) => format!("connected as {}", s.daemon_id.as_deref().unwrap_or("?")),
        (true, false) => format!(
            "disconnected, reconnecting ({})",
            s.last_error.as_deref().unwrap_or("no answer yet")
        ),
    };
    println!(
        "daemon     pid {} ({})",
        s.pid,
        if alive { "alive" } else { "gone" }
    );
    println!("upstream   {} — {link}", s.upstream);
    println!(
        "agents     {}",
        if s.agents.is_empty() {
            "none passed preflight".to_string()
        } else {
            s.agents.join(", ")
        }
    );
    println!(
        "tasks      {} of {} slots",
        s.running.len(),
        s.max_concurrent_tasks
    );
    for r in &s.running {
        println!("           {} (attempt {})", r.task_id, r.attempt);
    }
    println!(
        "outbox     {} message(s) waiting for an ack",
        s.outbox_depth
    );
    Ok(ExitCode::SUCCESS)
}
