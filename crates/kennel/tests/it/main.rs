//! End-to-end tests: the real `kennel` binary on a free port, driven over real sockets by
//! protocol-level test daemons, the REST API, server-sent events and the CLI.

mod agent_failure;
mod agents;
mod api;
mod build_agents;
mod claude;
mod cli;
mod cluster;
mod delivery;
mod gateway;
mod lifecycle;
mod limits;
mod newuser;
mod openapi;
mod protocol;
mod relay;
mod resilience;
mod scheduling;
mod security;
mod soak;
mod stories;
mod worker;

use std::path::Path;
use std::time::Duration;

use kennel_proto::api::CreateTask;
use kennel_testkit::{DaemonOpts, KennelServer, TestDaemon};

/// Generous: the machine is shared and slow; a pass never waits this long.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kennel"))
}

/// `kennel ARGS` as a client of `srv` with its admin key, run to completion.
pub async fn kennel_cli(srv: &KennelServer, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(tokio::process::Command::new(bin())
        .args(args)
        .env("KENNEL_URL", srv.url())
        .env("KENNEL_API_KEY", srv.admin_key())
        .env_remove("KENNEL_CONFIG")
        .current_dir(srv.data_dir())
        .kill_on_drop(true)
        .output()
        .await?)
}

pub async fn server() -> anyhow::Result<KennelServer> {
    KennelServer::start(bin(), &[]).await
}

pub async fn server_with(toml: &str) -> anyhow::Result<KennelServer> {
    KennelServer::start_with_config(bin(), toml).await
}

/// A task for the `command` profile that test daemons offer.
pub fn task(name: &str) -> CreateTask {
    CreateTask {
        name: name.to_string(),
        prompt: format!("do {name}"),
        agent: Some("command".into()),
        ..CreateTask::default()
    }
}

pub async fn daemon(srv: &KennelServer, machine: &str, slots: u32) -> anyhow::Result<TestDaemon> {
    TestDaemon::connect(
        &srv.ws_url(),
        DaemonOpts {
            machine_id: machine.to_string(),
            hostname: machine.to_string(),
            max_concurrent_tasks: slots,
            ..DaemonOpts::with_key(srv.admin_key())
        },
    )
    .await
}

/// True when nothing but acks is waiting for `d` (no spawn or command slipped through).
pub fn only_acks_pending(d: &mut TestDaemon) -> bool {
    while let Some(m) = d.try_recv_now() {
        if !matches!(m, kennel_proto::ServerMessage::Ack(_)) {
            eprintln!("unexpected message: {m:?}");
            return false;
        }
    }
    true
}
