//! `kennel keys`: API key management (admin scope).

use std::process::ExitCode;

use clap::Subcommand;
use kennel_proto::api::{ApiKey, CreateKey, CreatedKey, Scope};

use crate::client::Client;
use crate::commands::print_json;
use crate::table;
use crate::Global;

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Create a key; it is printed once and never shown again.
    Create {
        /// A name to recognise the key by.
        #[arg(long)]
        name: String,
        /// Scope(s): admin, client, daemon, relay, agent, gateway (repeat or comma-separate).
        #[arg(long = "scope", required = true, value_delimiter = ',')]
        scopes: Vec<Scope>,
    },
    /// List keys (ids, names, scopes; never the secrets).
    List,
    /// Revoke a key by id.
    Revoke {
        /// The key's id (the part after `kn_`).
        id: String,
    },
}

pub async fn run(c: &Client, g: &Global, cmd: KeysCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCmd::Create { name, scopes } => {
            let k: CreatedKey = c.post("/api/v1/keys", &CreateKey { name, scopes }).await?;
            if g.json {
                print_json(&k)?;
            } else {
                println!("{}", k.key);
                eprintln!(
                    "key id {} created; store it now, it is not shown again",
                    k.info.id
                );
            }
        }
        KeysCmd::List => {
            let keys: Vec<ApiKey> = c.get("/api/v1/keys").await?;
            if g.json {
                print_json(&keys)?;
            } else {
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.id.clone(),
                            k.name.clone(),
                            k.scopes
                                .iter()
                                .map(|s| s.as_str())
                                .collect::<Vec<_>>()
                                .join(","),
                            k.created_at.clone(),
                            k.last_used_at.clone().unwrap_or_else(|| "-".into()),
                            if k.revoked_at.is_some() {
                                "revoked".into()
                            } else {
                                "active".into()
                            },
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table::render(
                        &["ID", "NAME", "SCOPES", "CREATED", "LAST USED", "STATE"],
                        &rows
                    )
                );
            }
        }
        KeysCmd::Revoke { id } => {
            let k: ApiKey = c.delete(&format!("/api/v1/keys/{id}")).await?;
            if g.json {
                print_json(&k)?;
            } else {
                println!("revoked key {} ({})", k.id, k.name);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
