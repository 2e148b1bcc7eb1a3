//! `kennel up`: the coordinator and a local daemon in one process, on embedded SQLite in the
//! data directory. The one-machine default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use figment::value::Value;
use kennel_proto::api::Scope;

use crate::config;
use crate::lock::DataDirLock;
use crate::Global;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory for the database, keys, repository caches and worktrees.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Agents the local daemon runs at once.
    #[arg(long, value_name = "N")]
    pub max_tasks: Option<u32>,
}

pub async fn run(g: &Global, args: UpArgs) -> anyhow::Result<ExitCode> {
    let mut overrides = Vec::new();
    if let Some(l) = args.listen {
        overrides.push(("server.listen", Value::from(l.to_string())));
    }
    if let Some(d) = &args.data_dir {
        overrides.push(("server.data_dir", Value::from(d.display().to_string())));
    }
    let (mut cfg, _) = config::load(g.config.as_deref(), &overrides)?;
    crate::commands::server::init_tracing(cfg.log.as_deref());
    let (server, _lock) = crate::commands::server::start_locked(&cfg.server).await?;
    let state = server.state.clone();
    let url = format!("http://{}", server.addr);
    let data = cfg.server.data_dir.clone();

    // The local daemon's key: kept in the data directory, minted on first use.
    let key_path = data.join("daemon.key");
    let now = state.clock.now_ms();
    let existing = std::fs::read_to_string(&key_path)
        .ok()
        .map(|s| s.trim().to_string());
    let key = match existing {
        Some(k)
            if state
                .keys
                .verify(state.store.as_ref(), &k, now)
                .await?
                .is_some() =>
        {
            k
        }
        _ => {
            let (k, rec) = state.keys.mint(
                "local daemon",
                vec![Scope::Daemon],
                kennel_store::rfc3339(now),
            );
            state.store.insert_key(&rec).await?;
            kennel_server::auth::write_private(&key_path, &k)?;
            k
        }
    };
    cfg.daemon.server = format!("ws://{}/ws/daemon", server.addr);
    cfg.daemon.api_key = Some(key);
    if let Some(n) = args.max_tasks {
        cfg.daemon.max_concurrent_tasks = n;
    }
    let daemon_dir = crate::commands::daemon::data_dir(&cfg, None);
    // The local daemon's directory gets its own lock: a separate `kennel daemon` pointed at it
    // would otherwise share this daemon's id, outbox and worktrees.
    let _daemon_lock =
        DataDirLock::acquire(&daemon_dir).context("failed to start the local daemon")?;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async {
        let _ = stop_rx.await;
    }));
    let gateway = crate::commands::gateway::embedded(&cfg, state.store.clone()).await?;
    let daemon = kennel_daemon::daemon::start(cfg.daemon.clone(), daemon_dir)
        .await
        .context("failed to start the local daemon")?;

    println!("kennel: up at {url}");
    println!("kennel: admin key in {}", data.join("admin.key").display());
    println!(
        "kennel: try `kennel task submit \"describe the repo\" --repo PATH --agent claude -f`"
    );
    crate::commands::server::shutdown_signal().await;
    let again = crate::commands::server::next_shutdown_signal();
    announce_stop(&daemon, cfg.daemon.shutdown_grace_secs);
    daemon.stop(again).await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), serving).await;
    if let Some((stop, serving)) = gateway {
        let _ = stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), serving).await;
    }
    println!("kennel: stopped");
    Ok(ExitCode::SUCCESS)
}

/// What a clean stop is about to do, for the person who pressed Ctrl-C.
pub fn announce_stop(daemon: &kennel_daemon::daemon::DaemonHandle, grace_secs: u64) {
    let running = daemon.exec.running_now().len();
    if running == 0 {
        println!("kennel: stopping");
    } else {
        println!(
            "kennel: stopping: no new work; waiting up to {grace_secs}s for {running} running \
             agent(s) to finish, then their tasks go back to the queue (Ctrl-C again to stop now)"
        );
    }
}
