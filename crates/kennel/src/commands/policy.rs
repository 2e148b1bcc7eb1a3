//! `kennel policy`: apply spawn policies from a TOML file, list them, show one with its state
//! and history, delete one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use kennel_proto::agents::{PolicyVersion, PolicyView};

use crate::client::Client;
use crate::commands::print_json;
use crate::table;
use crate::Global;

#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(flatten)]
    pub target: crate::client::Target,
    #[command(subcommand)]
    pub cmd: PolicyCmd,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Create or update the policies of a TOML file (one `[[policy]]` table each).
    Apply {
        /// The policy file.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// List policies with where their agents are.
    List,
    /// Show one policy, its version and its state.
    Show { name: String },
    /// Every version a policy had.
    History { name: String },
    /// Delete a policy; its agent is stopped.
    Delete { name: String },
    /// Restart a policy's running agent (stop it gracefully, start a new one).
    Restart { name: String },
}

pub async fn run(c: &Client, g: &Global, cmd: PolicyCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCmd::Apply { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("failed to read the policy file {}", file.display()))?;
            let policies = kennel_lifecycle::parse_policies(&text)
                .with_context(|| format!("in {}", file.display()))?;
            let mut applied = Vec::new();
            for p in &policies {
                let view: PolicyView = c.post("/api/v1/policies", p).await?;
                applied.push(view);
            }
            if g.json {
                print_json(&applied)?;
            } else {
                for v in &applied {
                    println!("policy `{}` at version {}", v.policy.name, v.version);
                }
            }
        }
        PolicyCmd::List => {
            let all: Vec<PolicyView> = c.get("/api/v1/policies").await?;
            if g.json {
                print_json(&all)?;
            } else if all.is_empty() {
                println!(
                    "no policies yet; write one to a file and run `kennel policy apply -f FILE`"
                );
            } else {
                print!("{}", render(&all));
            }
        }
        PolicyCmd::Show { name } => {
            let v: PolicyView = c.get(&format!("/api/v1/policies/{name}")).await?;
            if g.json {
                print_json(&v)?;
            } else {
                print!("{}", render(std::slice::from_ref(&v)));
                let err = v
                    .state
                    .as_ref()
                    .and_then(|s| s.get("lastError"))
                    .and_then(|e| e.as_str());
                if let Some(err) = err {
                    println!("last error: {err}");
                }
            }
        }
        PolicyCmd::History { name } => {
            let versions: Vec<PolicyVersion> =
                c.get(&format!("/api/v1/policies/{name}/history")).await?;
            if g.json {
                print_json(&versions)?;
            } else {
                let rows: Vec<Vec<String>> = versions
                    .iter()
                    .map(|v| {
                        let what = match &v.policy {
                            Some(p) => format!("{} {}", mode(p.mode), p.provider),
                            None => "deleted".into(),
                        };
                        vec![v.version.to_string(), v.at.clone(), what]
                    })
                    .collect();
                print!("{}", table::render(&["VERSION", "AT", "POLICY"], &rows));
            }
        }
        PolicyCmd::Restart { name } => {
            let command: kennel_proto::agents::Command = c
                .post_empty(&format!("/api/v1/policies/{name}/restart"))
                .await?;
            if g.json {
                print_json(&command)?;
            } else {
                println!(
                    "restart of `{name}` requested as command {}; `kennel policy show {name}` follows it",
                    command.id
                );
            }
        }
        PolicyCmd::Delete { name } => {
            c.delete_no_content(&format!("/api/v1/policies/{name}"))
                .await?;
            if !g.json {
                println!("policy `{name}` deleted; its agent is being stopped");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn mode(m: kennel_proto::policy::PolicyMode) -> &'static str {
    match m {
        kennel_proto::policy::PolicyMode::AlwaysOn => "always-on",
        kennel_proto::policy::PolicyMode::OnDemand => "on-demand",
    }
}

fn render(all: &[PolicyView]) -> String {
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|v| {
            let state = v.state.as_ref();
            let field = |k: &str| {
                state
                    .and_then(|s| s.get(k))
                    .map(|x| match x {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Null => "-".into(),
                        other => other.to_string(),
                    })
                    .unwrap_or_else(|| "-".into())
            };
            vec![
                v.policy.name.clone(),
                mode(v.policy.mode).to_string(),
                v.policy.provider.clone(),
                v.version.to_string(),
                v.status.clone().unwrap_or_else(|| "-".into()),
                field("agentId"),
                field("restartCount"),
                field("consecutiveFailures"),
            ]
        })
        .collect();
    table::render(
        &[
            "NAME", "MODE", "PROVIDER", "VERSION", "STATUS", "AGENT", "RESTARTS", "FAILURES",
        ],
        &rows,
    )
}
