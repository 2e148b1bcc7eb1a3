//! `kennel`: the one binary. Parses the command line, loads configuration and calls into the
//! libraries; no behaviour lives here beyond presenting results.

mod client;
mod commands;
mod config;
mod endpoint;
mod lock;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Run a pack of AI coding agents across many machines.
#[derive(Debug, Parser)]
#[command(name = "kennel", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Config file (default: ./kennel.toml, then ~/.config/kennel/kennel.toml).
    #[arg(long, global = true, env = "KENNEL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Coordinator URL for client commands (default: from config, else http://127.0.0.1:7070).
    #[arg(long, global = true, env = "KENNEL_URL", value_name = "URL")]
    pub url: Option<String>,
    /// API key for client commands (default: from config, else the local admin.key).
    #[arg(
        long,
        global = true,
        env = "KENNEL_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator and a local daemon in one process (the one-machine default).
    Up(commands::up::UpArgs),
    /// Run the coordinator: task queue, daemon hub, REST API and events.
    Server(commands::server::ServerArgs),
    /// Run a worker that executes agents in git worktrees, or show its state.
    Daemon(commands::daemon::DaemonArgs),
    /// Run the LLM gateway: an OpenAI- and Anthropic-compatible router with failover.
    Gateway(commands::gateway::GatewayArgs),
    /// Run an edge relay: one upstream link shared by many daemons.
    Relay(commands::relay::RelayArgs),
    /// Submit and manage tasks.
    Task(TaskArgs),
    /// List daemons, or drain one.
    Daemons(commands::daemons::DaemonsArgs),
    /// Create, list and revoke API keys (admin); `recover` mints an admin key when locked out.
    Keys(KeysArgs),
    /// Spawn policies that keep long-lived agents running: apply, list, show, history, restart,
    /// delete.
    Policy(commands::policy::PolicyArgs),
    /// The registry of long-lived agents.
    Agents(commands::agents::AgentsArgs),
    /// Messages between agents: send, read an inbox, claim.
    Msg(commands::msg::MsgArgs),
    /// The build agents' stories: add, list, show, move, block, delete.
    Story(commands::story::StoryArgs),
    /// Run a build agent: sync the stories with a rendezvous, claim and build them.
    Agent(commands::agent::AgentArgs),
    /// One-time join tokens for build agents (admin).
    AgentTokens(commands::agent_tokens::AgentTokensArgs),
    /// Show the coordinator's state: daemons, capacity, tasks by state.
    Status(StatusArgs),
    /// Inspect configuration.
    #[command(subcommand)]
    Config(commands::config_cmd::ConfigCmd),
}

#[derive(Debug, Args)]
pub struct TaskArgs {
    #[command(flatten)]
    pub target: client::Target,
    #[command(subcommand)]
    pub cmd: commands::task::TaskCmd,
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(flatten)]
    pub target: client::Target,
    #[command(subcommand)]
    pub cmd: commands::keys::KeysCmd,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: client::Target,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serves = matches!(
        cli.command,
        Command::Up(_)
            | Command::Server(_)
            | Command::Daemon(_)
            | Command::Relay(_)
            | Command::Gateway(_)
            | Command::Agent(_)
    );
    if !serves {
        quiet_on_closed_pipe();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kennel: failed to start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // The chain once, outermost first: `kennel: failed to X: because Y: because Z`.
            eprintln!("kennel: {}", chain(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Exit codes, as documented in the README:
pub mod exit {
    /// The command could not do what was asked (server unreachable or refusing, a failure
    /// while running, an agent's task that was refused).
    pub const FAILURE: u8 = 1;
    /// The command line or the configuration is wrong (clap uses 2 for usage errors too): fix
    /// it and run again.
    pub const USAGE: u8 = 2;
    /// `-f` followed a task that ended without completing (failed or cancelled).
    pub const TASK_DID_NOT_COMPLETE: u8 = 3;
}

/// [`exit::USAGE`] for configuration mistakes anywhere in the chain, else [`exit::FAILURE`].
/// The error and its causes, outermost first, joined by `: `. A cause whose text the one
/// before it already shows is left out: some libraries print their cause and also return it
/// as the source, which would show it twice.
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut before = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if before.is_empty() || !before.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        before = text;
    }
    out
}

fn exit_code(e: &anyhow::Error) -> u8 {
    let misconfigured = e
        .chain()
        .any(|cause| cause.is::<config::LoadError>() || cause.is::<kennel_proto::ConfigError>());
    if misconfigured {
        exit::USAGE
    } else {
        exit::FAILURE
    }
}

/// A client command whose output is piped into a reader that stops early (`kennel task list |
/// head`) ends quietly, as other command-line tools do, instead of panicking on the closed
/// pipe. Long-running commands keep Rust's default (SIGPIPE ignored, errors returned).
#[allow(unsafe_code)]
fn quiet_on_closed_pipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: runs first thing in `main`, before any other thread exists, and only restores
    // the default disposition of SIGPIPE; no handler code is installed.
    unsafe {
        let _ = signal(Signal::SIGPIPE, SigHandler::SigDfl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Both(std::io::Error);

    impl std::fmt::Display for Both {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "error communicating with database: {}", self.0)
        }
    }

    impl std::error::Error for Both {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn the_chain_shows_each_cause_once() {
        let io = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        let e = anyhow::Error::new(Both(io)).context("failed to open the store");
        assert_eq!(
            chain(&e),
            "failed to open the store: error communicating with database: invalid peer \
             certificate: UnknownIssuer"
        );
        let plain = anyhow::anyhow!("no such file").context("failed to read kennel.toml");
        assert_eq!(chain(&plain), "failed to read kennel.toml: no such file");
    }
}
