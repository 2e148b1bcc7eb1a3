//! `kennel daemons`: list daemons, show one, drain or undrain one.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use kennel_proto::api::Daemon;

use crate::client::Client;
use crate::commands::print_json;
use crate::table;
use crate::Global;

#[derive(Debug, Args)]
pub struct DaemonsArgs {
    #[command(flatten)]
    pub target: crate::client::Target,
    #[command(subcommand)]
    pub cmd: Option<DaemonsCmd>,
}

#[derive(Debug, Subcommand)]
pub enum DaemonsCmd {
    /// List daemons (the default).
    List,
    /// Show one daemon.
    Show { id: String },
    /// Let a daemon finish its running tasks and give it no new ones (admin).
    Drain { id: String },
    /// Give a drained daemon work again (admin).
    Undrain { id: String },
}

pub async fn run(c: &Client, g: &Global, args: DaemonsArgs) -> anyhow::Result<ExitCode> {
    let one = |d: Daemon| -> anyhow::Result<()> {
        if g.json {
            print_json(&d)
        } else {
            print!("{}", render(&[d]));
            Ok(())
        }
    };
    match args.cmd.unwrap_or(DaemonsCmd::List) {
        DaemonsCmd::List => {
            let ds: Vec<Daemon> = c.get("/api/v1/daemons").await?;
            if g.json {
                print_json(&ds)?;
            } else if ds.is_empty() {
                println!("no daemons have connected yet; start one with `kennel daemon`");
            } else {
                print!("{}", render(&ds));
            }
        }
        DaemonsCmd::Show { id } => one(c.get(&format!("/api/v1/daemons/{id}")).await?)?,
        DaemonsCmd::Drain { id } => {
            one(c.post_empty(&format!("/api/v1/daemons/{id}/drain")).await?)?
        }
        DaemonsCmd::Undrain { id } => one(c
            .post_empty(&format!("/api/v1/daemons/{id}/undrain"))
            .await?)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn render(ds: &[Daemon]) -> String {
    let rows: Vec<Vec<String>> = ds
        .iter()
        .map(|d| {
            let state = match (d.connected, d.draining) {
                (true, false) => "connected",
                (true, true) => "draining",
                (false, _) => "disconnected",
            };
            vec![
                d.id.clone(),
                d.hostname.clone(),
                state.to_string(),
                format!("{}/{}", d.active_tasks, d.max_concurrent_tasks),
                d.agents.join(","),
                d.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
                d.last_seen_at.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table::render(
        &[
            "ID",
            "HOST",
            "STATE",
            "TASKS",
            "AGENTS",
            "LABELS",
            "LAST SEEN",
        ],
        &rows,
    )
}
