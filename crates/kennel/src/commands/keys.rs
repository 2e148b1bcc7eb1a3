//! `kennel keys`: API key management (admin scope) through the API, and `kennel keys recover`,
//! which mints an admin key straight into the store when no admin key is left.

use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use figment::value::Value;
use kennel_proto::api::{ApiKey, CreateKey, CreatedKey, Scope};

use crate::client::Target;
use crate::commands::print_json;
use crate::config;
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
    /// Revoke a key by id. The last live admin key cannot be revoked: create another first.
    Revoke {
        /// The key's id (the part after `kn_`).
        id: String,
    },
    /// Locked out? Mint a new admin key without the API, when every admin key is lost or
    /// revoked.
    ///
    /// Run it on the coordinator's machine with the server's configuration (data directory,
    /// `server.auth.hash_key`); it works whether the server is running or stopped, and the
    /// server accepts the key at once. The key is printed once and written to
    /// `<data_dir>/admin.key` (mode 0600), where the other commands find it. `--data-dir`
    /// names the server's data directory (default: `server.data_dir` of the configuration).
    Recover,
}

/// `kennel keys recover`: works on the data directory, not through the API, so it needs no key.
pub async fn recover(g: &Global, target: &Target) -> anyhow::Result<ExitCode> {
    let mut overrides = Vec::new();
    if let Some(d) = &target.data_dir {
        overrides.push(("server.data_dir", Value::from(d.display().to_string())));
    }
    let (cfg, _) = config::load(g.config.as_deref(), &overrides)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let r = kennel_server::auth::recover_admin(&cfg.server, now)
        .await
        .context("failed to mint a recovery admin key")?;
    if g.json {
        print_json(&CreatedKey {
            key: r.key.clone(),
            info: r.info.clone(),
        })?;
    } else {
        println!("{}", r.key);
        eprintln!(
            "admin key id {} created and saved to {}; it is not shown again",
            r.info.id,
            r.path.display()
        );
    }
    if let Some(id) = &r.configured_revoked {
        eprintln!(
            "note: the configured admin key (server.auth.admin_key, id {id}) is revoked; remove \
             it from the configuration or the server will refuse to start"
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run(g: &Global, target: &Target, cmd: KeysCmd) -> anyhow::Result<ExitCode> {
    if let KeysCmd::Recover = cmd {
        // Works on the data directory, without a key or a running server.
        return recover(g, target).await;
    }
    let c = &crate::commands::client(g, target)?;
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
        KeysCmd::Recover => unreachable!("handled above"),
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
