//! `kennel agent`: run a build agent that syncs the pipeline of stories with a rendezvous and
//! builds the stories it claims (see the `kennel-agent` crate).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use kennel_agent::AgentConfig;
use kennel_proto::Span;

use crate::config;
use crate::lock::DataDirLock;
use crate::Global;

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The rendezvous: `ws://HOST:PORT/crdt-sync`, or the coordinator's `http://HOST:PORT`.
    #[arg(long, env = "KENNEL_AGENT_RENDEZVOUS", value_name = "URL", value_parser = rendezvous_url)]
    pub rendezvous: String,
    /// A one-time join token (`kennel agent-tokens create`), turned into this agent's key on
    /// its first start; later starts use the key kept in the data directory.
    #[arg(
        long,
        env = "KENNEL_JOIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub join_token: Option<String>,
    /// Directory for the pipeline document, the key, repository caches, worktrees and logs
    /// (default: <server.data_dir>/agent).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Stories built at once (default: daemon.max_concurrent_tasks).
    #[arg(long, value_name = "N")]
    pub max_tasks: Option<u32>,
    /// Time between heartbeats and plans.
    #[arg(long, default_value = "15s", value_parser = Span::parse, value_name = "DURATION")]
    pub tick: Span,
    /// How long a story's holder may stay silent before another agent takes it over.
    #[arg(long, default_value = "10m", value_parser = Span::parse, value_name = "DURATION")]
    pub claim_ttl: Span,
    /// Serve `/crdt-sync` to other agents on this address (`0.0.0.0:7075`, port 0 for any) and
    /// sync with a few of them, so work goes on while the rendezvous is down.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// The address other agents reach this one on (default: ws://<--listen>/crdt-sync).
    #[arg(long, value_name = "URL", requires = "listen")]
    pub advertise: Option<String>,
    /// Other agents it keeps mesh links to.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub max_mesh_peers: usize,
}

/// `--rendezvous`, checked before anything starts (a wrong one is a usage error).
fn rendezvous_url(url: &str) -> Result<String, String> {
    kennel_agent::peer::Urls::parse(url)
        .map(|_| url.to_string())
        .map_err(|e| e.to_string())
}

pub async fn run(g: &Global, args: AgentArgs) -> anyhow::Result<ExitCode> {
    let (mut cfg, _) = config::load(g.config.as_deref(), &[])?;
    crate::commands::server::init_tracing(cfg.log.as_deref());
    if args.tick.is_zero() || args.claim_ttl.is_zero() {
        anyhow::bail!("--tick and --claim-ttl must be longer than 0s");
    }
    if let Some(n) = args.max_tasks {
        cfg.daemon.max_concurrent_tasks = n;
    }
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| cfg.server.data_dir.join("agent"));
    let _lock = DataDirLock::acquire(&dir).context("failed to start the agent")?;
    let mut agent = AgentConfig::new(args.rendezvous.clone(), dir.clone(), cfg.daemon.clone());
    agent.join_token = args.join_token.clone();
    agent.tick = args.tick.get();
    agent.claim_ttl = args.claim_ttl.get();
    agent.listen = args.listen;
    agent.advertise = args.advertise.clone();
    agent.max_mesh_peers = args.max_mesh_peers;
    let mut handle = kennel_agent::start(agent)
        .await
        .context("failed to start the agent")?;
    println!(
        "kennel: agent {} running ({} at once; agents: {}), data in {}",
        handle.node,
        cfg.daemon.max_concurrent_tasks,
        if handle.agents.is_empty() {
            "none".to_string()
        } else {
            handle.agents.join(", ")
        },
        dir.display()
    );
    if let Some(addr) = &handle.advertise {
        println!("kennel: mesh: serving /crdt-sync at {addr}");
    }
    // Say when the sync comes up or goes (scripts and tests wait for these lines).
    let mut synced = handle.synced.clone();
    let url = args.rendezvous.clone();
    tokio::spawn(async move {
        let mut was = false;
        loop {
            let now = *synced.borrow_and_update();
            if now != was {
                if now {
                    println!("kennel: syncing with {url}");
                } else {
                    println!("kennel: lost the rendezvous; working offline");
                }
            }
            was = now;
            if synced.changed().await.is_err() {
                return;
            }
        }
    });
    let mut notices = handle.notices.take().expect("a new agent has its notices");
    tokio::spawn(async move {
        while let Some(line) = notices.recv().await {
            println!("kennel: {line}");
        }
    });
    crate::commands::server::shutdown_signal().await;
    println!("kennel: stopping the agent; its stories stay claimed until it returns");
    handle.stop().await;
    Ok(ExitCode::SUCCESS)
}
