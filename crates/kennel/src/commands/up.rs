//! `kennel up`: the coordinator and a local daemon in one process, on embedded SQLite in the
//! data directory. The one-machine default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use figment::value::Value;
use kennel_daemon::agent::AgentKind;
use kennel_proto::api::Scope;

use crate::commands::server::local_url;
use crate::config;
use crate::lock::DataDirLock;
use crate::Global;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory for the database, keys, repository caches and worktrees.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Agents the local daemon runs at once.
    #[arg(long, value_name = "N")]
    pub max_tasks: Option<u32>,
}

pub async fn run(g: &Global, args: UpArgs) -> anyhow::Result<ExitCode> {
    let mut overrides = Vec::new();
    if let Some(l) = args.listen {
        overrides.push(("server.listen", Value::from(l.to_string())));
    }
    if let Some(d) = &args.data_dir {
        overrides.push(("server.data_dir", Value::from(d.display().to_string())));
    }
    let (mut cfg, _) = config::load(g.config.as_deref(), &overrides)?;
    crate::commands::server::init_tracing(cfg.log.as_deref());
    let (server, _holding) = crate::commands::server::start_locked(&cfg.server).await?;
    let state = server.state.clone();
    let url = local_url(server.addr);
    let data = cfg.server.data_dir.clone();

    // The local daemon's key: kept in the data directory, minted on first use.
    let key = local_key(
        &state,
        &data.join("daemon.key"),
        "local daemon",
        Scope::Daemon,
    )
    .await?;
    cfg.daemon.server = format!("ws://{}/ws/daemon", server.addr);
    cfg.daemon.api_key = Some(key);
    if let Some(n) = args.max_tasks {
        cfg.daemon.max_concurrent_tasks = n;
    }
    let daemon_dir = crate::commands::daemon::data_dir(&cfg, None);
    // The local daemon's directory gets its own lock: a separate `kennel daemon` pointed at it
    // would otherwise share this daemon's id, outbox and worktrees.
    let _daemon_lock =
        DataDirLock::acquire(&daemon_dir).context("failed to start the local daemon")?;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async {
        let _ = stop_rx.await;
    }));
    let gateway =
        crate::commands::gateway::embedded(&cfg, state.store.clone(), state.gateway_store.clone())
            .await?;
    if let Some(gw) = &gateway {
        // The local agents reach LLMs through this gateway, with a key of their own.
        let key_path = data.join(AGENTS_KEY_FILE);
        let key = local_key(&state, &key_path, "local agents", Scope::Gateway).await?;
        let wired = wire_to_gateway(&mut cfg.daemon, &local_url(gw.addr), &key, |v| {
            std::env::var_os(v).is_some()
        });
        if !wired.is_empty() {
            println!(
                "kennel: agents {} send their LLM calls through this gateway (key in {})",
                wired.join(", "),
                key_path.display()
            );
        }
    }
    let daemon = kennel_daemon::daemon::start(cfg.daemon.clone(), daemon_dir)
        .await
        .context("failed to start the local daemon")?;

    println!("kennel: up at {url}");
    let data_shown = std::path::absolute(&data).unwrap_or_else(|_| data.clone());
    println!("kennel: data and admin key in {}", data_shown.display());
    // `--data-dir` belongs to the client subcommand, so it goes after it.
    let dir = if data == kennel_server::config::default_data_dir() {
        String::new()
    } else {
        format!(
            " --data-dir {}",
            shell_word(&data_shown.display().to_string())
        )
    };
    println!("kennel: from another shell: `kennel status{dir}`, `kennel task list{dir}`");
    match suggested_agent(&daemon.agents, &cfg.server.scheduler.default_agent) {
        Some(agent) => println!(
            "kennel: try `kennel task submit{dir} \"describe the repo\" --repo PATH{agent} -f`"
        ),
        None => println!(
            "kennel: the local daemon found no agent CLI, so tasks will wait: install Claude Code \
             (`npm i -g @anthropic-ai/claude-code`) or Codex (`npm i -g @openai/codex`), or \
             add a `command` profile under [daemon.agents], then start again"
        ),
    }
    crate::commands::server::shutdown_signal().await;
    let again = crate::commands::server::next_shutdown_signal();
    announce_stop(&daemon, cfg.daemon.shutdown_grace);
    daemon.stop(again).await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), serving).await;
    if let Some(gw) = gateway {
        let _ = gw.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), gw.serving).await;
    }
    println!("kennel: stopped");
    Ok(ExitCode::SUCCESS)
}

/// What a clean stop is about to do, for the person who pressed Ctrl-C.
pub fn announce_stop(daemon: &kennel_daemon::daemon::DaemonHandle, grace: kennel_proto::Span) {
    let running = daemon.exec.running_now().len();
    if running == 0 {
        println!("kennel: stopping");
    } else {
        println!(
            "kennel: stopping: no new work; waiting up to {grace} for {running} running \
             agent(s) to finish, then their tasks go back to the queue (Ctrl-C again to stop now)"
        );
    }
}

/// The file in the data directory holding the key `kennel up`'s own agents present to its
/// gateway.
pub const AGENTS_KEY_FILE: &str = "agents.key";

/// A key `kennel up` keeps for one of its own parts in `path` (mode 0600): the one there if the
/// store still accepts it, else a new one with `scope`, minted and written there.
async fn local_key(
    state: &kennel_server::AppState,
    path: &Path,
    name: &str,
    scope: Scope,
) -> anyhow::Result<String> {
    let now = state.clock.now_ms();
    if let Ok(text) = std::fs::read_to_string(path) {
        let existing = text.trim();
        if let Some(found) = state
            .keys
            .verify(state.store.as_ref(), existing, now)
            .await?
        {
            if found.scopes.contains(&scope) {
                return Ok(existing.to_string());
            }
        }
    }
    let (key, rec) = state
        .keys
        .mint(name, vec![scope], kennel_store::rfc3339(now));
    state.store.insert_key(&rec).await?;
    kennel_server::auth::write_private(path, &key)?;
    Ok(key)
}

/// Points the `claude` and `codex` profiles at the gateway at `gateway_url` with `key`, unless
/// the user set where that agent sends its calls (the base URL variable, in the profile's
/// `env` or in this process's environment, as `is_set` reports) or made the profile another
/// kind. Returns the names of the profiles it changed.
fn wire_to_gateway(
    daemon: &mut kennel_daemon::config::DaemonConfig,
    gateway_url: &str,
    key: &str,
    is_set: impl Fn(&str) -> bool,
) -> Vec<String> {
    let wiring = [
        (
            AgentKind::Claude,
            ("ANTHROPIC_BASE_URL", gateway_url.to_string()),
            "ANTHROPIC_API_KEY",
        ),
        (
            AgentKind::Codex,
            ("OPENAI_BASE_URL", format!("{gateway_url}/v1")),
            "OPENAI_API_KEY",
        ),
    ];
    let profiles = daemon.profiles();
    let mut wired = Vec::new();
    for (kind, (base_var, base), key_var) in wiring {
        let name = kind.as_str();
        let Some(profile) = profiles.get(name) else {
            continue;
        };
        if profile.kind != kind || profile.env.contains_key(base_var) || is_set(base_var) {
            continue;
        }
        let mut profile = profile.clone();
        profile.env.insert(base_var.to_string(), base);
        profile.env.insert(key_var.to_string(), key.to_string());
        daemon.agents.insert(name.to_string(), profile);
        wired.push(name.to_string());
    }
    wired
}

/// What to add to the suggested submit command: nothing when the default agent is offered,
/// `--agent X` for another offered agent, `None` when the daemon offers none.
fn suggested_agent(offered: &[String], default_agent: &str) -> Option<String> {
    if offered.iter().any(|a| a == default_agent) {
        return Some(String::new());
    }
    offered.first().map(|a| format!(" --agent {a}"))
}

/// `word` as one shell word: as it is when it needs no quoting, else in single quotes.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:=@,".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claude_and_codex_are_pointed_at_the_gateway_unless_the_user_chose() {
        let mut d = kennel_daemon::config::DaemonConfig::default();
        let wired = wire_to_gateway(&mut d, "http://127.0.0.1:9", "kn_x", |_| false);
        assert_eq!(wired, ["claude", "codex"]);
        let claude = &d.agents["claude"];
        assert_eq!(claude.kind, AgentKind::Claude);
        assert_eq!(claude.env["ANTHROPIC_BASE_URL"], "http://127.0.0.1:9");
        assert_eq!(claude.env["ANTHROPIC_API_KEY"], "kn_x");
        assert_eq!(
            d.agents["codex"].env["OPENAI_BASE_URL"],
            "http://127.0.0.1:9/v1"
        );
        assert_eq!(d.agents["codex"].env["OPENAI_API_KEY"], "kn_x");
        assert!(!d.agents.contains_key("aider"));

        // The user's own choice stays: in the profile, or in the environment.
        let mut d = kennel_daemon::config::DaemonConfig::default();
        let mut own = kennel_daemon::agent::AgentProfile::default_for(AgentKind::Claude);
        own.env
            .insert("ANTHROPIC_BASE_URL".into(), "https://example.test".into());
        d.agents.insert("claude".into(), own.clone());
        let wired = wire_to_gateway(&mut d, "http://127.0.0.1:9", "kn_x", |v| {
            v == "OPENAI_BASE_URL"
        });
        assert!(wired.is_empty(), "{wired:?}");
        assert_eq!(d.agents["claude"], own);
        assert!(!d.agents.contains_key("codex"));
    }

    #[test]
    fn the_suggested_agent_is_one_the_daemon_offers() {
        let offered = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            suggested_agent(&offered(&["claude", "codex"]), "claude").as_deref(),
            Some("")
        );
        assert_eq!(
            suggested_agent(&offered(&["codex"]), "claude").as_deref(),
            Some(" --agent codex")
        );
        assert_eq!(suggested_agent(&[], "claude"), None);
    }

    #[test]
    fn paths_are_quoted_for_the_shell_only_when_needed() {
        assert_eq!(shell_word("/tmp/kennel-data"), "/tmp/kennel-data");
        assert_eq!(shell_word("/tmp/my data"), "'/tmp/my data'");
        assert_eq!(shell_word("/tmp/it's"), r"'/tmp/it'\''s'");
    }
}
