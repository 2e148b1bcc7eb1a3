//! `kennel agent-tokens`: one-time join tokens for build agents (admin).

use std::process::ExitCode;

use clap::{Args, Subcommand};
use kennel_proto::api::{CreateJoinToken, CreatedJoinToken};

use crate::client::Client;
use crate::commands::print_json;
use crate::Global;

#[derive(Debug, Args)]
pub struct AgentTokensArgs {
    #[command(flatten)]
    pub target: crate::client::Target,
    #[command(subcommand)]
    pub cmd: AgentTokensCmd,
}

#[derive(Debug, Subcommand)]
pub enum AgentTokensCmd {
    /// Mint a join token: a build agent exchanges it once for a key of its own.
    Create {
        /// Who it is for.
        #[arg(long)]
        name: String,
        /// Seconds until it expires unused (default 3600).
        #[arg(long, value_name = "SECS")]
        ttl: Option<u64>,
    },
}

pub async fn run(c: &Client, g: &Global, cmd: AgentTokensCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AgentTokensCmd::Create { name, ttl } => {
            let req = CreateJoinToken {
                name,
                ttl_secs: ttl,
            };
            let t: CreatedJoinToken = c.post("/api/v1/agent-tokens", &req).await?;
            if g.json {
                print_json(&t)?;
            } else {
                println!("{}", t.token);
                eprintln!(
                    "kennel: join token for `{}`, usable once until {} (the server keeps only a hash)",
                    t.name, t.expires_at
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
