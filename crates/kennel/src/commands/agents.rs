//! `kennel agents`: the registry of long-lived agents.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use kennel_proto::agents::Agent;

use crate::client::Client;
use crate::commands::print_json;
use crate::table;
use crate::Global;

#[derive(Debug, Args)]
pub struct AgentsArgs {
    #[command(flatten)]
    pub target: crate::client::Target,
    #[command(subcommand)]
    pub cmd: Option<AgentsCmd>,
}

#[derive(Debug, Subcommand)]
pub enum AgentsCmd {
    /// List agents (the default).
    List,
    /// Show one agent.
    Show { id: String },
}

pub async fn run(c: &Client, g: &Global, args: AgentsArgs) -> anyhow::Result<ExitCode> {
    match args.cmd.unwrap_or(AgentsCmd::List) {
        AgentsCmd::List => {
            let all: Vec<Agent> = c.get("/api/v1/agents").await?;
            if g.json {
                print_json(&all)?;
            } else if all.is_empty() {
                println!(
                    "no agents yet: a spawn policy starts one (`kennel policy apply`), or an \
                     agent registers itself with an agent-scope key"
                );
            } else {
                print!("{}", render(&all));
            }
        }
        AgentsCmd::Show { id } => {
            let a: Agent = c.get(&format!("/api/v1/agents/{id}")).await?;
            if g.json {
                print_json(&a)?;
            } else {
                print!("{}", render(std::slice::from_ref(&a)));
                if let Some(why) = &a.offline_reason {
                    println!("offline: {why}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn render(all: &[Agent]) -> String {
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                a.name.clone(),
                if a.online { "online" } else { "offline" }.into(),
                a.machine.clone(),
                a.policy.clone().unwrap_or_else(|| "-".into()),
                a.epoch.to_string(),
                a.tags.join(","),
                a.last_seen_at.clone(),
            ]
        })
        .collect();
    table::render(
        &[
            "ID",
            "NAME",
            "STATE",
            "MACHINE",
            "POLICY",
            "EPOCH",
            "TAGS",
            "LAST SEEN",
        ],
        &rows,
    )
}
