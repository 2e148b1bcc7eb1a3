//! `kennel relay`: runs the edge relay until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use figment::value::Value;
use kennel_relay::RelayServer;

use crate::config;
use crate::Global;

#[derive(Debug, Args)]
pub struct RelayArgs {
    /// Address for downstream daemons and the admin endpoints (port 0 picks a free one).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory for the relay's database (history, queue, buffered messages, log).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// Makima's edge-relay variables, accepted as aliases of `relay.*` keys.
const MAKIMA_ALIASES: [(&str, &str); 3] = [
    ("MAKIMA_SERVER_URL", "relay.upstream"),
    ("MAKIMA_API_KEY", "relay.api_key"),
    ("MAKIMA_AGENT_NAME", "relay.agent_name"),
];

/// Overrides from the Makima variables that `env` has set (and not left empty).
fn makima_aliases(env: impl Fn(&str) -> Option<String>) -> Vec<(&'static str, Value)> {
    MAKIMA_ALIASES
        .iter()
        .filter_map(|(var, key)| {
            env(var)
                .filter(|v| !v.is_empty())
                .map(|v| (*key, Value::from(v)))
        })
        .collect()
}

pub async fn run(g: &Global, args: RelayArgs) -> anyhow::Result<ExitCode> {
    let mut overrides = makima_aliases(|v| std::env::var(v).ok());
    if let Some(url) = &g.url {
        overrides.push(("relay.upstream", Value::from(url.clone())));
    }
    if let Some(key) = &g.api_key {
        overrides.push(("relay.api_key", Value::from(key.clone())));
    }
    if let Some(l) = args.listen {
        overrides.push(("relay.listen", Value::from(l.to_string())));
    }
    if let Some(d) = &args.data_dir {
        overrides.push(("relay.data_dir", Value::from(d.display().to_string())));
    }
    let (cfg, file) = config::load(g.config.as_deref(), &overrides)?;
    crate::commands::server::init_tracing(cfg.log.as_deref());
    if let Some(f) = &file {
        tracing::info!(file = %f.display(), "configuration loaded");
    }
    let server = RelayServer::start(cfg.relay.clone())
        .await
        .context("failed to start the relay")?;
    println!("kennel: relay listening on http://{}", server.addr);
    println!("kennel: relay data in {}", cfg.relay.data_dir.display());
    // Say when the upstream link comes up (scripts and tests wait for this line).
    let mut link = server.relay().subscribe_link();
    let upstream = cfg.relay.upstream.clone();
    tokio::spawn(async move {
        loop {
            if let Some(id) = link.borrow_and_update().clone() {
                println!("kennel: relay connected to {upstream} as {id}");
            }
            if link.changed().await.is_err() {
                return;
            }
        }
    });
    server
        .serve(crate::commands::server::shutdown_signal())
        .await
        .context("the relay stopped with an error")?;
    tracing::info!("relay stopped");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makima_variables_are_aliases_of_relay_keys() {
        let env = |v: &str| match v {
            "MAKIMA_SERVER_URL" => Some("https://makima.example".to_string()),
            "MAKIMA_API_KEY" => Some(String::new()),
            "MAKIMA_AGENT_NAME" => Some("edge-7".to_string()),
            _ => None,
        };
        let got: Vec<(&str, String)> = makima_aliases(env)
            .into_iter()
            .map(|(k, v)| (k, v.into_string().unwrap_or_default()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("relay.upstream", "https://makima.example".to_string()),
                ("relay.agent_name", "edge-7".to_string()),
            ]
        );
    }
}
