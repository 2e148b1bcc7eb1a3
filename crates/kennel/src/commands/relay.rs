//! `kennel relay`: runs the edge relay until Ctrl-C or SIGTERM. It accepts a Makima edge
//! relay's `MAKIMA_*` variables as aliases of `relay.*` keys and says at start when one of them
//! loses to a kennel setting; it never prints a key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use figment::value::Value;
use kennel_relay::RelayServer;

use crate::config;
use crate::Global;

/// Where the relay's upstream, key and name come from, for `kennel relay --help`. Mirrors the
/// merge order of `config::load` and `run` below.
const SOURCES_HELP: &str = "\
Where relay.upstream, relay.api_key and relay.agent_name come from, later ones winning:
  1. the config file ([relay] upstream, api_key, agent_name)
  2. KENNEL_RELAY__UPSTREAM, KENNEL_RELAY__API_KEY, KENNEL_RELAY__AGENT_NAME
  3. Makima's variables: MAKIMA_SERVER_URL (upstream), MAKIMA_API_KEY (api_key),
     MAKIMA_AGENT_NAME (agent_name); empty ones are ignored
  4. --url / KENNEL_URL (upstream) and --api-key / KENNEL_API_KEY (api_key)
When a kennel setting and the matching MAKIMA_* variable are both set to different values,
the relay prints a warning at start naming both and the one it uses (never the values).";

#[derive(Debug, Args)]
#[command(after_help = SOURCES_HELP)]
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

/// The setting a Makima variable competes with on the kennel side, per relay key: the
/// `KENNEL_RELAY__*` variable it beats, and the global flag (with its variable) that beats it.
fn kennel_rivals(key: &str) -> (&'static str, Option<(&'static str, &'static str)>) {
    match key {
        "relay.upstream" => ("KENNEL_RELAY__UPSTREAM", Some(("--url", "KENNEL_URL"))),
        "relay.api_key" => (
            "KENNEL_RELAY__API_KEY",
            Some(("--api-key", "KENNEL_API_KEY")),
        ),
        _ => ("KENNEL_RELAY__AGENT_NAME", None),
    }
}

/// Warnings for every Makima variable that is set alongside a kennel setting of the same key
/// with a different value, naming both and the one used. `flag` gives the value of the global
/// `--url` or `--api-key` (clap fills them from `KENNEL_URL`/`KENNEL_API_KEY`). Values are
/// compared, never shown.
fn makima_conflicts(
    env: impl Fn(&str) -> Option<String>,
    flag: impl Fn(&str) -> Option<String>,
) -> Vec<String> {
    let set = |v: &str| env(v).filter(|x| !x.is_empty());
    let mut out = Vec::new();
    for (var, key) in MAKIMA_ALIASES {
        let Some(makima) = set(var) else { continue };
        let (config_var, global) = kennel_rivals(key);
        // The global flag or its variable, if given, beats the Makima variable.
        let top = global.and_then(|(flag_name, flag_var)| {
            let v = flag(flag_name)?;
            // A value other than the variable's came from the command line.
            let from = if set(flag_var).as_deref() == Some(v.as_str()) {
                flag_var
            } else {
                flag_name
            };
            Some((from, v))
        });
        let winner = top.as_ref().map_or(var, |(from, _)| *from);
        let rivals = std::iter::once(config_var).chain(global.map(|(_, flag_var)| flag_var));
        let mut named = false;
        for rival in rivals {
            if set(rival).is_some_and(|v| v != makima) {
                out.push(format!(
                    "{rival} and {var} are both set, to different values; {key} comes from {winner}"
                ));
                named |= Some(rival) == global.map(|(_, flag_var)| flag_var);
            }
        }
        if let Some((from, v)) = &top {
            if from.starts_with("--") && *v != makima && !named {
                out.push(format!(
                    "{from} is given and {var} is set, to different values; {key} comes from {from}"
                ));
            }
        }
    }
    out
}

pub async fn run(g: &Global, args: RelayArgs) -> anyhow::Result<ExitCode> {
    let flag = |name: &str| match name {
        "--url" => g.url.clone(),
        "--api-key" => g.api_key.clone(),
        _ => None,
    };
    for w in makima_conflicts(|v| std::env::var(v).ok(), flag) {
        eprintln!("kennel: warning: {w} (see `kennel relay --help`)");
    }
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

    /// A fake environment and the global flags clap would build from it plus `--url`/`--api-key`.
    fn conflicts(vars: &[(&str, &str)], url: Option<&str>, key: Option<&str>) -> Vec<String> {
        let env = |v: &str| {
            vars.iter()
                .find(|(n, _)| *n == v)
                .map(|(_, x)| x.to_string())
        };
        let flag = |name: &str| {
            let (given, var) = match name {
                "--url" => (url, "KENNEL_URL"),
                _ => (key, "KENNEL_API_KEY"),
            };
            given.map(str::to_string).or_else(|| env(var))
        };
        makima_conflicts(env, flag)
    }

    #[test]
    fn a_kennel_setting_beside_a_different_makima_one_is_named_with_the_winner() {
        assert_eq!(
            conflicts(
                &[
                    ("KENNEL_URL", "http://a:7070"),
                    ("MAKIMA_SERVER_URL", "http://b:7070"),
                    ("KENNEL_API_KEY", "kn_secret_one"),
                    ("MAKIMA_API_KEY", "kn_secret_two"),
                    ("KENNEL_RELAY__AGENT_NAME", "site-a"),
                    ("MAKIMA_AGENT_NAME", "site-b"),
                ],
                None,
                None,
            ),
            vec![
                "KENNEL_URL and MAKIMA_SERVER_URL are both set, to different values; relay.upstream comes from KENNEL_URL",
                "KENNEL_API_KEY and MAKIMA_API_KEY are both set, to different values; relay.api_key comes from KENNEL_API_KEY",
                "KENNEL_RELAY__AGENT_NAME and MAKIMA_AGENT_NAME are both set, to different values; relay.agent_name comes from MAKIMA_AGENT_NAME",
            ]
        );
        // The config-key variables lose to Makima's; the flag beats both.
        assert_eq!(
            conflicts(
                &[
                    ("KENNEL_RELAY__UPSTREAM", "http://a:7070"),
                    ("MAKIMA_SERVER_URL", "http://b:7070"),
                ],
                None,
                None,
            ),
            vec!["KENNEL_RELAY__UPSTREAM and MAKIMA_SERVER_URL are both set, to different values; relay.upstream comes from MAKIMA_SERVER_URL"]
        );
        assert_eq!(
            conflicts(
                &[
                    ("KENNEL_URL", "http://a:7070"),
                    ("MAKIMA_SERVER_URL", "http://b:7070"),
                ],
                Some("http://c:7070"),
                None,
            ),
            vec!["KENNEL_URL and MAKIMA_SERVER_URL are both set, to different values; relay.upstream comes from --url"]
        );
        assert_eq!(
            conflicts(&[("MAKIMA_API_KEY", "kn_secret_two")], None, Some("kn_secret_one")),
            vec!["--api-key is given and MAKIMA_API_KEY is set, to different values; relay.api_key comes from --api-key"]
        );
    }

    #[test]
    fn equal_or_empty_settings_are_not_conflicts() {
        assert!(conflicts(
            &[
                ("KENNEL_URL", "http://a:7070"),
                ("MAKIMA_SERVER_URL", "http://a:7070"),
                ("KENNEL_API_KEY", "kn_same"),
                ("MAKIMA_API_KEY", "kn_same"),
                ("KENNEL_RELAY__AGENT_NAME", "site-a"),
                ("MAKIMA_AGENT_NAME", ""),
            ],
            None,
            None,
        )
        .is_empty());
        assert!(conflicts(&[("MAKIMA_SERVER_URL", "http://b:7070")], None, None).is_empty());
    }
}
