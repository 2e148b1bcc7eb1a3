//! `kennel server`: runs the coordinator until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use figment::value::Value;
use kennel_server::Server;

use crate::config;
use crate::endpoint;
use crate::lock::DataDirLock;
use crate::Global;

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address to listen on (port 0 picks a free one; the chosen address is printed).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory for the database and keys.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL URL shared by several coordinators (`server.database_url`; unset: SQLite in
    /// the data directory). Needs `server.auth.hash_key`, the same on every coordinator.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
}

/// Sets up logging to stderr: `RUST_LOG`, else the config's `log`, else `info`. The filter is
/// a default level and per-target levels, `info,kennel_daemon=debug` (targets match by module
/// path prefix); a filter that does not parse falls back to `info`, with a warning.
pub fn init_tracing(level: Option<&str>) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let (text, from) = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => (v, "RUST_LOG"),
        _ => (level.unwrap_or("info").to_string(), "log"),
    };
    let (filter, problem) = match text.parse::<Targets>() {
        Ok(f) => (f, None),
        Err(e) => (Targets::new().with_default(tracing::Level::INFO), Some(e)),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .try_init();
    if let Some(e) = problem {
        tracing::warn!("ignoring the log filter `{text}` from {from} ({e}); logging at info");
    }
}

pub async fn run(g: &Global, args: ServerArgs) -> anyhow::Result<ExitCode> {
    let mut overrides = Vec::new();
    if let Some(l) = args.listen {
        overrides.push(("server.listen", Value::from(l.to_string())));
    }
    if let Some(d) = &args.data_dir {
        overrides.push(("server.data_dir", Value::from(d.display().to_string())));
    }
    if let Some(u) = &args.database_url {
        overrides.push(("server.database_url", Value::from(u.clone())));
    }
    let (cfg, file) = config::load(g.config.as_deref(), &overrides)?;
    init_tracing(cfg.log.as_deref());
    if let Some(f) = &file {
        tracing::info!(file = %f.display(), "configuration loaded");
    }
    let (server, _lock) = start_locked(&cfg.server).await?;
    println!("kennel: listening on http://{}", server.addr);
    println!("kennel: data in {}", cfg.server.data_dir.display());
    if let Some(url) = &cfg.server.database_url {
        // Never the password: only what follows the credentials.
        let place = url.rsplit_once('@').map_or(url.as_str(), |(_, rest)| rest);
        println!("kennel: state in PostgreSQL at {place}, shared with any other coordinator there");
    }
    if let Some(key) = &server.new_admin_key {
        println!(
            "kennel: created the first admin key (shown once; also saved to {}):\n  {key}",
            cfg.server.data_dir.join("admin.key").display()
        );
    }
    tracing::info!(addr = %server.addr, "coordinator ready");
    server.serve(shutdown_signal()).await?;
    tracing::info!("coordinator stopped");
    Ok(ExitCode::SUCCESS)
}

/// What a running coordinator holds on its data directory: the lock, and the record of where
/// it listens (removed when this is dropped). Keep it for the life of the process.
#[derive(Debug)]
pub struct Holding {
    _lock: DataDirLock,
    _endpoint: endpoint::Published,
}

/// Starts the coordinator holding the lock on its data directory. The port is bound first, so
/// a busy port leaves nothing behind; the lock is taken next, so a second process on the same
/// directory is refused before it opens the database or mints a key. Once started, where it
/// listens is recorded in the directory for client commands to find.
pub async fn start_locked(
    cfg: &kennel_server::config::ServerConfig,
) -> anyhow::Result<(Server, Holding)> {
    let listener = Server::bind(cfg)
        .await
        .context("failed to start the coordinator")?;
    let lock = DataDirLock::acquire(&cfg.data_dir).context("failed to start the coordinator")?;
    let server = Server::start_on(cfg.clone(), listener)
        .await
        .context("failed to start the coordinator")?;
    let endpoint = endpoint::publish(&cfg.data_dir, &local_url(server.addr))?;
    Ok((
        server,
        Holding {
            _lock: lock,
            _endpoint: endpoint,
        },
    ))
}

/// The URL a client on this machine uses to reach a listener at `addr`: a wildcard address
/// (`0.0.0.0`, `::`) is reached through loopback.
pub fn local_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// Resolves on the next SIGINT (Ctrl-C) or SIGTERM after this call. Unlike
/// [`shutdown_signal`], the signals are caught from the moment it is called, not from its first
/// poll, so a second Ctrl-C pressed while the first one's message is printed is not lost.
pub fn next_shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let int = signal(SignalKind::interrupt());
    let term = signal(SignalKind::terminate());
    async move {
        let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = wait(int) => {},
            () = wait(term) => {},
        }
        tracing::info!("second shutdown signal: stopping now");
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested");
}
