//! `kennel gateway`: runs the LLM gateway until Ctrl-C or SIGTERM; [`embedded`] runs it
//! inside `kennel up` when upstreams are configured.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use figment::value::Value;
use kennel_gateway::Gateway;

use crate::commands::server::{init_tracing, shutdown_signal};
use crate::config;
use crate::Global;

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Address to listen on (port 0 picks a free one; the chosen address is printed).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory of the kennel store (API keys) and the gateway's state (default: the
    /// server's data directory).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

pub async fn run(g: &Global, args: GatewayArgs) -> anyhow::Result<ExitCode> {
    let mut overrides = Vec::new();
    if let Some(l) = args.listen {
        overrides.push(("gateway.listen", Value::from(l.to_string())));
    }
    if let Some(d) = &args.data_dir {
        overrides.push(("gateway.data_dir", Value::from(d.display().to_string())));
    }
    let (cfg, file) = config::load(g.config.as_deref(), &overrides)?;
    init_tracing(cfg.log.as_deref());
    if let Some(f) = &file {
        tracing::info!(file = %f.display(), "configuration loaded");
    }
    let data_dir = kennel_gateway::data_dir(&cfg.gateway, &cfg.server.data_dir);
    let gateway = Gateway::start(cfg.gateway.clone(), &data_dir, &cfg.server.auth)
        .await
        .context("failed to start the gateway")?;
    println!("kennel: gateway listening on http://{}", gateway.addr);
    println!("kennel: data in {}", data_dir.display());
    if let Some(key) = &gateway.new_admin_key {
        println!(
            "kennel: created the first admin key (shown once; also saved to {}):\n  {key}",
            data_dir.join("admin.key").display()
        );
    }
    gateway.serve(shutdown_signal()).await?;
    tracing::info!("gateway stopped");
    Ok(ExitCode::SUCCESS)
}

/// A gateway running inside `kennel up`.
pub struct Embedded {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Send to stop it.
    pub stop: tokio::sync::oneshot::Sender<()>,
    /// Resolves when it has stopped.
    pub serving: tokio::task::JoinHandle<Result<(), kennel_gateway::StartError>>,
}

/// Starts the gateway inside `kennel up` when `[gateway]` has upstreams (or
/// `ZEPTOCLAW_GATEWAY_URL` is set), sharing the coordinator's store for API keys.
pub async fn embedded(
    cfg: &config::Config,
    store: std::sync::Arc<dyn kennel_store::Store>,
    state: std::sync::Arc<dyn kennel_store::GatewayStore>,
) -> anyhow::Result<Option<Embedded>> {
    if !kennel_gateway::configured(&cfg.gateway) {
        return Ok(None);
    }
    let data_dir = kennel_gateway::data_dir(&cfg.gateway, &cfg.server.data_dir);
    let gateway = Gateway::start_with_store(
        cfg.gateway.clone(),
        &data_dir,
        &cfg.server.auth,
        store,
        state,
    )
    .await
    .context("failed to start the gateway")?;
    println!("kennel: gateway listening on http://{}", gateway.addr);
    let addr = gateway.addr;
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(gateway.serve(async {
        let _ = rx.await;
    }));
    Ok(Some(Embedded {
        addr,
        stop,
        serving,
    }))
}
