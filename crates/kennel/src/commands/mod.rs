//! One module per subcommand. Each turns parsed arguments into library or API calls and
//! prints the result as a table or, with `--json`, as JSON.

pub mod agent;
pub mod agent_tokens;
pub mod agents;
pub mod config_cmd;
pub mod daemon;
pub mod daemons;
pub mod gateway;
pub mod keys;
pub mod msg;
pub mod policy;
pub mod relay;
pub mod server;
pub mod story;
pub mod task;
pub mod up;

use std::process::ExitCode;

use crate::client::{Client, Target};
use crate::config::{self, Config};
use crate::{Cli, Command, Global};

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = cli.global;
    if matches!(
        cli.command,
        Command::Up(_)
            | Command::Server(_)
            | Command::Daemon(_)
            | Command::Gateway(_)
            | Command::Relay(_)
            | Command::Agent(_)
    ) {
        raise_open_files_limit();
    }
    match cli.command {
        Command::Up(args) => up::run(&g, args).await,
        Command::Server(args) => server::run(&g, args).await,
        Command::Daemon(args) => daemon::run(&g, args).await,
        Command::Gateway(args) => gateway::run(&g, args).await,
        Command::Relay(args) => relay::run(&g, args).await,
        Command::Agent(args) => agent::run(&g, args).await,
        Command::Task(a) => task::run(&client(&g, &a.target)?, &g, a.cmd).await,
        Command::Daemons(a) => daemons::run(&client(&g, &a.target)?, &g, a).await,
        Command::Keys(a) => keys::run(&g, &a.target, a.cmd).await,
        Command::Policy(a) => policy::run(&client(&g, &a.target)?, &g, a.cmd).await,
        Command::Agents(a) => agents::run(&client(&g, &a.target)?, &g, a).await,
        Command::Msg(a) => msg::run(&client(&g, &a.target)?, &g, a.cmd).await,
        Command::Story(a) => story::run(&client(&g, &a.target)?, &g, a.cmd).await,
        Command::AgentTokens(a) => agent_tokens::run(&client(&g, &a.target)?, &g, a.cmd).await,
        Command::Status(a) => status(&client(&g, &a.target)?, &g).await,
        Command::Config(cmd) => config_cmd::run(&g, cmd),
    }
}

/// Long-running commands hold a socket per client, daemon and upstream connection: raise the
/// soft limit on open files to the hard limit (often 1024 → 524288), as servers usually do, so
/// a burst of connections does not end in "Too many open files".
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let want = hard.min(1 << 20);
    if soft >= want {
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
        Ok(()) => tracing::debug!(from = soft, to = want, "raised the open files limit"),
        Err(e) => tracing::warn!(
            soft,
            error = %e,
            "could not raise the open files limit; many connections may fail with EMFILE"
        ),
    }
}

fn load(g: &Global) -> anyhow::Result<Config> {
    Ok(config::load(g.config.as_deref(), &[])?.0)
}

pub(crate) fn client(g: &Global, target: &Target) -> anyhow::Result<Client> {
    let cfg = load(g)?;
    Client::resolve(&cfg, g.url.as_deref(), g.api_key.as_deref(), target)
}

/// Prints `value` as pretty JSON.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

async fn status(c: &Client, g: &Global) -> anyhow::Result<ExitCode> {
    let s: kennel_proto::api::ServerStatus = c.get("/api/v1/status").await?;
    if g.json {
        print_json(&s)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "server     {} (kennel {}, protocol v{}, store {})",
        c.base, s.version, s.protocol_version, s.store
    );
    println!("uptime     {}s", s.uptime_secs);
    println!(
        "daemons    {} connected, {} of {} task slots in use",
        s.daemons_connected, s.capacity_used, s.capacity_total
    );
    let counts: Vec<String> = s
        .tasks
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!(
        "tasks      {}",
        if counts.is_empty() {
            "none".to_string()
        } else {
            counts.join(", ")
        }
    );
    for w in &s.waiting {
        println!(
            "waiting    {} task(s) (e.g. {}): {}",
            w.tasks, w.example_task_id, w.reason
        );
    }
    Ok(ExitCode::SUCCESS)
}
