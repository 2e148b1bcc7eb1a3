//! Configuration loading: defaults, then a TOML file, then `KENNEL_*` environment variables
//! (`__` separates nesting levels), then command-line flags, each overriding the one before.
//! Unknown keys are errors that name the key and where it came from.
//!
//! Environment variables are read by [`EnvVars`], not figment's `Env`, for two reasons: names
//! of struct fields and agent profiles are matched in lower case (as the file writes them),
//! while the keys of data maps (an agent's `env`, labels) keep the case they were written in;
//! and tests hand it variables directly instead of changing the process environment.

use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use kennel_server::config::ServerConfig;
use serde::{Deserialize, Serialize};

mod legacy;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Log filter (`info`, `kennel=debug`, ...); `RUST_LOG` wins when set.
    pub log: Option<String>,
    /// The coordinator (`kennel server`).
    pub server: ServerConfig,
    /// The worker (`kennel daemon`, and the local daemon of `kennel up`).
    pub daemon: kennel_daemon::config::DaemonConfig,
    /// The LLM gateway (`kennel gateway`).
    pub gateway: kennel_gateway::GatewayConfig,
    /// How the CLI reaches a coordinator.
    pub client: ClientConfig,
    /// The edge relay (`kennel relay`).
    pub relay: kennel_relay::RelayConfig,
}

#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// Coordinator base URL. Default: derived from `server.listen`.
    pub url: Option<String>,
    /// API key. Default: `<server.data_dir>/admin.key` when readable.
    pub api_key: Option<String>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("url", &self.url)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Environment variables read directly by flags, not by the config tree (after `KENNEL_`).
const FLAG_ENV: [&str; 3] = ["URL", "API_KEY", "CONFIG"];

/// Variables of kennel's own test suite and benchmarks (`KENNEL_TEST_POSTGRES_URL`,
/// `KENNEL_TEST_LOG`; after `KENNEL_`): a shell that runs the tests may also run kennel.
const TEST_ENV_PREFIX: &str = "TEST_";

/// The name of the environment's provider, for error messages.
const ENV_SOURCE: &str = "the environment variables";

/// The prefix of configuration variables (matched in any case, like the rest of the name).
const ENV_PREFIX: &str = "KENNEL_";

/// Map-typed keys whose own keys are data (the name of an environment variable, a label, a
/// repository URL) rather than names kennel defines: the segment right after one of these
/// keeps the case it was written in, so `KENNEL_DAEMON__AGENTS__CLAUDE__ENV__ANTHROPIC_API_KEY`
/// sets `ANTHROPIC_API_KEY`. `*` stands for any one key. Every other segment, struct fields
/// and agent profile names included, is lowercased. A map missing here only loses the case
/// of its keys when set from the environment.
const CASE_KEEPING_MAPS: [&str; 4] = [
    "daemon.labels",
    "daemon.agents.*.env",
    "daemon.repos",
    "relay.labels",
];

/// Whether the key right after `path` keeps its case (see [`CASE_KEEPING_MAPS`]).
fn keeps_case(path: &[String]) -> bool {
    CASE_KEEPING_MAPS.iter().any(|map| {
        let pattern: Vec<&str> = map.split('.').collect();
        pattern.len() == path.len()
            && pattern
                .iter()
                .zip(path)
                .all(|(want, have)| *want == "*" || want == have)
    })
}

/// The config path a `KENNEL_*` variable sets: its name after the prefix split at `__`, each
/// segment lowercased unless it keys a case-keeping map. `None` for a name with an empty
/// segment (`KENNEL_DAEMON____X`).
fn env_path(name: &str) -> Option<Vec<String>> {
    let mut path: Vec<String> = Vec::new();
    for segment in name.split("__") {
        let segment = segment.trim();
        if segment.is_empty() {
            return None;
        }
        let segment = if keeps_case(&path) {
            segment.to_owned()
        } else {
            segment.to_ascii_lowercase()
        };
        path.push(segment);
    }
    Some(path)
}

/// The variable that sets `path`, for error messages: the inverse of [`env_path`].
fn env_name(path: &[&str]) -> String {
    let mut name = ENV_PREFIX.to_owned();
    for (i, segment) in path.iter().enumerate() {
        if i > 0 {
            name.push_str("__");
        }
        let before: Vec<String> = path[..i].iter().map(|s| s.to_string()).collect();
        if keeps_case(&before) {
            name.push_str(segment);
        } else {
            name.push_str(&segment.to_ascii_uppercase());
        }
    }
    name
}

/// The `KENNEL_*` layer of the configuration, from the given `(name, value)` pairs. Values
/// are read like figment's `Env` reads them (`true`, `42`, `[a, b]` become typed values),
/// except entries of the maps in [`CASE_KEEPING_MAPS`], which are strings as written.
pub struct EnvVars {
    vars: Vec<(String, String)>,
}

impl EnvVars {
    /// The variables of this process.
    pub fn from_process() -> Self {
        Self::from_pairs(std::env::vars_os().map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        }))
    }

    pub fn from_pairs(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut vars: Vec<(String, String)> = vars.into_iter().collect();
        // A fixed order, so that `KENNEL_A=1` with `KENNEL_A__B=2` always ends the same way.
        vars.sort();
        EnvVars { vars }
    }
}

impl Provider for EnvVars {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV_SOURCE).interpolater(|_: &Profile, path: &[&str]| env_name(path))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (name, value) in &self.vars {
            let name = name.trim();
            let Some(rest) = name
                .get(..ENV_PREFIX.len())
                .filter(|p| p.eq_ignore_ascii_case(ENV_PREFIX))
                .map(|_| &name[ENV_PREFIX.len()..])
            else {
                continue;
            };
            let test_var = rest
                .get(..TEST_ENV_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(TEST_ENV_PREFIX));
            if test_var || FLAG_ENV.iter().any(|f| f.eq_ignore_ascii_case(rest)) {
                continue;
            }
            let Some(path) = env_path(rest) else {
                continue;
            };
            // An entry of a data map is a string whatever it looks like (`DISABLE_TELEMETRY=1`
            // is the string "1"); the rest is read as figment reads it.
            let value = if keeps_case(&path[..path.len() - 1]) {
                Value::from(value.clone())
            } else {
                let Ok(value) = value.parse::<Value>();
                value
            };
            insert(&mut dict, &path, value);
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// Sets `path` in `dict` to `value`, making the tables on the way (a value in their place
/// gives way to them).
fn insert(dict: &mut Dict, path: &[String], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let child = dict
                .entry(first.clone())
                .or_insert_with(|| Dict::new().into());
            if child.as_dict().is_none() {
                *child = Dict::new().into();
            }
            if let Value::Dict(_, child) = child {
                insert(child, rest, value);
            }
        }
    }
}

/// The file to read: `--config`/`KENNEL_CONFIG`, else `./kennel.toml`, else
/// `$XDG_CONFIG_HOME/kennel/kennel.toml` (`~/.config/kennel/kennel.toml`), if present.
pub fn find_file(explicit: Option<&Path>) -> Result<Option<PathBuf>, LoadError> {
    if let Some(p) = explicit {
        if !p.is_file() {
            return Err(LoadError::MissingFile(p.to_path_buf()));
        }
        return Ok(Some(p.to_path_buf()));
    }
    let local = PathBuf::from("kennel.toml");
    if local.is_file() {
        return Ok(Some(local));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    Ok(base
        .map(|b| b.join("kennel/kennel.toml"))
        .filter(|p| p.is_file()))
}

/// Loads the configuration; `overrides` are flag values as dotted keys.
pub fn load(
    file: Option<&Path>,
    overrides: &[(&str, figment::value::Value)],
) -> anyhow::Result<(Config, Option<PathBuf>)> {
    load_with_env(file, overrides, EnvVars::from_process())
}

/// [`load`] with the given environment variables instead of the process's. Deprecated keys
/// are reported on stderr.
pub fn load_with_env(
    file: Option<&Path>,
    overrides: &[(&str, figment::value::Value)],
    env: EnvVars,
) -> anyhow::Result<(Config, Option<PathBuf>)> {
    let warnings = legacy::Warnings::default();
    let loaded = load_noting(file, overrides, env, &warnings);
    // Said even when the configuration is refused: the old key may be what is wrong.
    for w in warnings.take() {
        eprintln!("kennel: warning: {w}");
    }
    loaded
}

/// [`load_with_env`], noting deprecated keys in `warnings` instead of printing them.
fn load_noting(
    file: Option<&Path>,
    overrides: &[(&str, figment::value::Value)],
    env: EnvVars,
    warnings: &legacy::Warnings,
) -> anyhow::Result<(Config, Option<PathBuf>)> {
    let path = find_file(file)?;
    let mut fig = Figment::from(Serialized::defaults(Config::default()));
    if let Some(p) = &path {
        let origin = legacy::Origin::File(p.display().to_string());
        fig = fig.merge(legacy::Durations::new(
            Toml::file_exact(p),
            origin,
            warnings,
        ));
    }
    fig = fig.merge(legacy::Durations::new(env, legacy::Origin::Env, warnings));
    for (key, value) in overrides {
        fig = fig.merge(legacy::Durations::new(
            Serialized::global(key, value.clone()),
            legacy::Origin::Flag,
            warnings,
        ));
    }
    let cfg: Config = fig.extract().map_err(|e| {
        let msgs: Vec<String> = e.into_iter().map(|e| describe(&e)).collect();
        LoadError::Parse(msgs.join("; "))
    })?;
    // Every section, whichever command runs: a mistake in one is found the first time any
    // command reads the file, not when the part it configures first starts.
    let checked = cfg
        .server
        .validate()
        .and_then(|()| cfg.daemon.validate())
        .and_then(|()| cfg.relay.validate())
        .and_then(|()| cfg.gateway.validate());
    if let Err(source) = checked {
        let origin = match &path {
            Some(p) => format!("in {}", p.display()),
            None => "in the environment or flags".to_string(),
        };
        return Err(LoadError::Invalid { origin, source }.into());
    }
    Ok((cfg, path))
}

/// One figment error as a person reads it: the key, what is wrong with it and where it was set
/// (`server.protocol.heartbeat_interval: "15" has no unit; write e.g. "15s" or "500ms" (in
/// kennel.toml)`), instead of figment's `for key "default.server…" in kennel.toml TOML file`.
fn describe(e: &figment::Error) -> String {
    let path = &e.path;
    let mut out = if path.is_empty() {
        e.kind.to_string()
    } else {
        format!("{}: {}", path.join("."), e.kind)
    };
    if let Some(md) = &e.metadata {
        let place = match &md.source {
            Some(source) => format!("in {source}"),
            None if md.name == ENV_SOURCE && !path.is_empty() => format!(
                "set by the environment variable {}",
                md.interpolate(&Profile::Default, path)
            ),
            None => format!("from {}", md.name),
        };
        out.push_str(&format!(" ({place})"));
    }
    out
}

/// A configuration that cannot be used as given: the person must change a file, a variable
/// or a flag. The binary exits with code 2 for these (see `main`).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("config file {} does not exist (given with --config or KENNEL_CONFIG)", .0.display())]
    MissingFile(PathBuf),
    #[error(
        "invalid configuration: {0}\n(see `kennel config show` for the keys and their defaults)"
    )]
    Parse(String),
    #[error("invalid configuration {origin}")]
    Invalid {
        origin: String,
        #[source]
        source: kennel_proto::ConfigError,
    },
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn unknown_keys_name_the_key_and_the_file() {
        let dir = std::env::temp_dir().join(format!("kennel-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("k.toml");
        std::fs::write(&file, "[server]\nlisten = \"127.0.0.1:1\"\nlistn = 3\n").unwrap();
        let err = load(Some(&file), &[]).unwrap_err().to_string();
        assert!(err.contains("listn"), "{err}");
        assert!(err.contains("k.toml"), "{err}");
        std::fs::write(&file, "[server.scheduler]\naccept_timeout_secs = 0\n").unwrap();
        let err = format!("{:#}", load(Some(&file), &[]).unwrap_err());
        // The old key is read as the new one, and the error names the new one.
        assert!(
            err.contains("scheduler.accept_timeout: must be at least 1s"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("kennel-cfg-prec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("k.toml");
        std::fs::write(
            &file,
            "[server]\nlisten = \"127.0.0.1:1111\"\n[server.scheduler]\ndefault_agent = \"codex\"\n",
        )
        .unwrap();
        let (cfg, path) = load(Some(&file), &[]).unwrap();
        assert_eq!(path.as_deref(), Some(file.as_path()));
        assert_eq!(cfg.server.listen.port(), 1111);
        assert_eq!(cfg.server.scheduler.default_agent, "codex");
        let over = [(
            "server.listen",
            figment::value::Value::from("127.0.0.1:2222"),
        )];
        let (cfg, _) = load(Some(&file), &over).unwrap();
        assert_eq!(cfg.server.listen.port(), 2222, "a flag beats the file");
        assert_eq!(
            cfg.server.scheduler.default_agent, "codex",
            "the rest of the file stays"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn vars(pairs: &[(&str, &str)]) -> EnvVars {
        EnvVars::from_pairs(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    /// Loads `toml` (from a file of its own) under the variables `pairs` only.
    fn load_toml(toml: &str, pairs: &[(&str, &str)]) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("kennel.toml");
        std::fs::write(&file, toml)?;
        Ok(load_with_env(Some(&file), &[], vars(pairs))?.0)
    }

    #[test]
    fn env_map_keys_keep_their_case_and_field_names_do_not() {
        let cfg = load_toml(
            "",
            &[
                ("KENNEL_DAEMON__AGENTS__CLAUDE__ENV__ANTHROPIC_API_KEY", "x"),
                ("KENNEL_DAEMON__AGENTS__CLAUDE__ENV__Mixed_Case", "y"),
                ("KENNEL_DAEMON__LABELS__GPU", "a100"),
                ("KENNEL_DAEMON__LABELS__zone", "eu"),
                ("KENNEL_DAEMON__LABELS__GPUS", "2"),
                ("KENNEL_DAEMON__AGENTS__CLAUDE__ENV__DISABLE_TELEMETRY", "1"),
                ("KENNEL_DAEMON__MAX_CONCURRENT_TASKS", "3"),
                ("kennel_daemon__keep_worktrees", "true"),
                ("KENNEL_RELAY__LABELS__Site", "berlin"),
                ("KENNEL_URL", "http://not-a-config-key"),
                ("KENNEL_API_KEY", "not-a-config-key"),
                ("KENNEL_TEST_POSTGRES_URL", "postgres://tests-only"),
                ("kennel_test_log", "debug"),
                ("NOT_KENNEL_X", "1"),
            ],
        )
        .unwrap();
        let claude = &cfg.daemon.agents["claude"];
        assert_eq!(claude.kind, kennel_daemon::agent::AgentKind::Claude);
        assert_eq!(
            claude.env,
            BTreeMap::from([
                ("ANTHROPIC_API_KEY".to_string(), "x".to_string()),
                ("DISABLE_TELEMETRY".to_string(), "1".to_string()),
                ("Mixed_Case".to_string(), "y".to_string()),
            ])
        );
        assert_eq!(
            cfg.daemon.labels,
            BTreeMap::from([
                ("GPU".to_string(), "a100".to_string()),
                ("GPUS".to_string(), "2".to_string()),
                ("zone".to_string(), "eu".to_string()),
            ])
        );
        assert_eq!(cfg.relay.labels["Site"], "berlin");
        assert_eq!(cfg.daemon.max_concurrent_tasks, 3);
        assert!(cfg.daemon.keep_worktrees);
        assert_eq!(cfg.client.url, None, "KENNEL_URL is a flag's variable");
        assert_eq!(
            cfg.daemon.profiles()["claude"].command_template(),
            kennel_daemon::agent::AgentProfile::default_for(
                kennel_daemon::agent::AgentKind::Claude
            )
            .command_template(),
            "an env-only profile is the built-in plus its env"
        );
    }

    #[test]
    fn env_adds_to_a_profile_from_the_file() {
        let cfg = load_toml(
            "[daemon.agents.claude]\npermission_mode = \"plan\"\n\
             [daemon.agents.claude.env]\nANTHROPIC_BASE_URL = \"http://127.0.0.1:7071\"\n\
             [daemon.agents.tests]\nkind = \"command\"\ncommand = [\"make\"]\n",
            &[
                ("KENNEL_DAEMON__AGENTS__CLAUDE__ENV__ANTHROPIC_API_KEY", "k"),
                ("KENNEL_DAEMON__AGENTS__TESTS__TIMEOUT_SECS", "60"),
            ],
        )
        .unwrap();
        let claude = &cfg.daemon.agents["claude"];
        assert_eq!(claude.permission_mode.as_deref(), Some("plan"));
        assert_eq!(claude.env["ANTHROPIC_BASE_URL"], "http://127.0.0.1:7071");
        assert_eq!(claude.env["ANTHROPIC_API_KEY"], "k");
        // The old spelling of a duration still loads (see `legacy`).
        assert_eq!(
            cfg.daemon.agents["tests"].timeout,
            Some(kennel_proto::Span::from_secs(60))
        );
        assert_eq!(cfg.daemon.agents["tests"].command, ["make"]);
    }

    #[test]
    fn env_errors_name_the_variable() {
        let err = format!(
            "{:#}",
            load_toml("", &[("KENNEL_DAEMON__MAX_CONCURENT_TASKS", "3")]).unwrap_err()
        );
        assert!(err.contains("max_concurent_tasks"), "{err}");
        assert!(err.contains("environment variable"), "{err}");
        let err = format!(
            "{:#}",
            load_toml("", &[("KENNEL_DAEMON__AGENTS__MINE__ENV__X", "y")]).unwrap_err()
        );
        assert!(err.contains("agent profile `mine` has no kind"), "{err}");
    }

    #[test]
    fn variable_names_map_to_paths_and_back() {
        let path = env_path("DAEMON__AGENTS__Claude__ENV__Api_Key").unwrap();
        assert_eq!(path, ["daemon", "agents", "claude", "env", "Api_Key"]);
        let path: Vec<&str> = path.iter().map(String::as_str).collect();
        assert_eq!(
            env_name(&path),
            "KENNEL_DAEMON__AGENTS__CLAUDE__ENV__Api_Key"
        );
        assert_eq!(
            env_path("DAEMON__REPOS__Https://H/R__SETUP").unwrap(),
            ["daemon", "repos", "Https://H/R", "setup"]
        );
        assert_eq!(env_path("DAEMON____X"), None);
        assert_eq!(env_path("DAEMON__"), None);
    }

    /// Every duration key as it was spelled before durations had units: its table, the old key
    /// and a value for it (none of them the default), then the new key and the same value.
    #[rustfmt::skip]
    const OLD_AND_NEW: [(&str, &str, u64, &str, &str); 31] = [
        ("server.scheduler", "accept_timeout_secs", 45, "accept_timeout", "45s"),
        ("server.scheduler", "reattach_grace_secs", 90, "reattach_grace", "1m30s"),
        ("server.scheduler", "cancel_grace_secs", 5, "cancel_grace", "5s"),
        ("server.scheduler", "unschedulable_timeout_secs", 600, "unschedulable_timeout", "10m"),
        ("server.protocol", "heartbeat_interval_secs", 15, "heartbeat_interval", "15s"),
        ("server.protocol", "auth_timeout_secs", 20, "auth_timeout", "20s"),
        ("server.http", "header_read_timeout_ms", 2500, "header_read_timeout", "2s500ms"),
        ("server.http", "idle_timeout_secs", 120, "idle_timeout", "2m"),
        ("daemon", "worktree_retention_hours", 48, "worktree_retention", "2d"),
        ("daemon", "interrupt_grace_secs", 3, "interrupt_grace", "3s"),
        ("daemon", "shutdown_grace_secs", 45, "shutdown_grace", "45s"),
        ("daemon.agents.claude", "timeout_secs", 1800, "timeout", "30m"),
        ("relay", "auth_timeout_secs", 7, "auth_timeout", "7s"),
        ("relay", "heartbeat_interval_secs", 5, "heartbeat_interval", "5s"),
        ("relay", "reattach_grace_secs", 45, "reattach_grace", "45s"),
        ("relay", "history_retention_days", 7, "history_retention", "7d"),
        ("relay.http", "header_read_timeout_ms", 5000, "header_read_timeout", "5s"),
        ("relay.http", "idle_timeout_secs", 30, "idle_timeout", "30s"),
        ("gateway.http", "header_read_timeout_ms", 1500, "header_read_timeout", "1s500ms"),
        ("gateway.http", "idle_timeout_secs", 90, "idle_timeout", "1m30s"),
        ("gateway.cooldowns", "rate_limit_ms", 30_000, "rate_limit", "30s"),
        ("gateway.cooldowns", "overload_base_ms", 45_000, "overload_base", "45s"),
        ("gateway.cooldowns", "network_base_ms", 5_000, "network_base", "5s"),
        ("gateway.cooldowns", "server_error_ms", 2_000, "server_error", "2s"),
        ("gateway.cooldowns", "auth_ms", 120_000, "auth", "2m"),
        ("gateway.cooldowns", "not_found_base_ms", 90_000, "not_found_base", "1m30s"),
        ("gateway.cooldowns", "max_ms", 3_600_000, "max", "1h"),
        ("gateway.heartbeat", "takeover_after_ms", 0, "takeover_after", "0s"),
        ("gateway.upstreams", "connect_timeout_ms", 2_000, "connect_timeout", "2s"),
        ("gateway.upstreams", "first_byte_timeout_ms", 30_000, "first_byte_timeout", "30s"),
        ("gateway.upstreams", "total_timeout_ms", 5_400_000, "total_timeout", "1h30m"),
    ];

    /// The one table of [`OLD_AND_NEW`] that is an array (`[[gateway.upstreams]]`).
    const UPSTREAMS: &str = "gateway.upstreams";

    /// A TOML file setting every key of [`OLD_AND_NEW`], old or new spelling, and the
    /// upstream's other keys.
    fn every_duration_toml(old: bool, tables: &[&str]) -> String {
        let mut out = String::new();
        let mut seen: Vec<&str> = Vec::new();
        for (table, old_key, n, new_key, new) in OLD_AND_NEW {
            if !tables.contains(&table) {
                continue;
            }
            if !seen.contains(&table) {
                seen.push(table);
                if table == UPSTREAMS {
                    out.push_str(&format!(
                        "[[{table}]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://h\"\n"
                    ));
                } else {
                    out.push_str(&format!("[{table}]\n"));
                }
            }
            if old {
                out.push_str(&format!("{old_key} = {n}\n"));
            } else {
                out.push_str(&format!("{new_key} = \"{new}\"\n"));
            }
        }
        out
    }

    fn all_tables() -> Vec<&'static str> {
        OLD_AND_NEW.iter().map(|(t, ..)| *t).collect()
    }

    /// Loads `toml` from a file called `name` with the given variables and flags, and returns
    /// the configuration as JSON with the deprecation warnings.
    fn load_noted(
        dir: &Path,
        toml: &str,
        env: &[(String, String)],
        flags: &[(&str, Value)],
    ) -> anyhow::Result<(serde_json::Value, Vec<String>)> {
        let file = dir.join("kennel.toml");
        std::fs::write(&file, toml)?;
        let warnings = legacy::Warnings::default();
        let env = EnvVars::from_pairs(env.iter().cloned());
        let (cfg, _) = load_noting(Some(&file), flags, env, &warnings)?;
        Ok((serde_json::to_value(cfg)?, warnings.take()))
    }

    /// The JSON pointer of a new key of [`OLD_AND_NEW`] in the loaded configuration.
    fn pointer(table: &str, key: &str) -> String {
        let table = table.replace('.', "/");
        if table == UPSTREAMS.replace('.', "/") {
            format!("/{table}/0/{key}")
        } else {
            format!("/{table}/{key}")
        }
    }

    /// The JSON pointers of the values under `v` that are durations.
    fn spans(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) if kennel_proto::Span::parse(s).is_ok() => out.push(at),
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    spans(v, format!("{at}/{k}"), out);
                }
            }
            serde_json::Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    spans(v, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn every_old_duration_key_loads_as_its_new_spelling_with_one_warning_each() {
        let dir = tempfile::tempdir().unwrap();
        let tables = all_tables();
        let (new, w) =
            load_noted(dir.path(), &every_duration_toml(false, &tables), &[], &[]).unwrap();
        assert!(w.is_empty(), "{w:?}");
        let default = serde_json::to_value(Config::default()).unwrap();
        for (table, _, _, key, value) in OLD_AND_NEW {
            let at = pointer(table, key);
            assert_eq!(new.pointer(&at), Some(&serde_json::json!(value)), "{at}");
            assert_ne!(
                default.pointer(&at),
                new.pointer(&at),
                "{at} is its default"
            );
        }
        // The table is complete: every duration the configuration holds is in it, but for
        // those that came after the change and never had an old spelling.
        const NEVER_OLD: [&str; 4] = [
            "/server/agents/stale_after",
            "/server/api/event_retention",
            "/server/cluster/beat",
            "/server/cluster/dead_after",
        ];
        let mut durations = Vec::new();
        spans(&new, String::new(), &mut durations);
        durations.retain(|d| !NEVER_OLD.contains(&d.as_str()));
        let mut listed: Vec<String> = OLD_AND_NEW
            .iter()
            .map(|(table, _, _, key, _)| pointer(table, key))
            .collect();
        durations.sort();
        listed.sort();
        assert_eq!(durations, listed);

        // From the file.
        let (old, w) =
            load_noted(dir.path(), &every_duration_toml(true, &tables), &[], &[]).unwrap();
        assert_eq!(old, new);
        let file = dir.path().join("kennel.toml").display().to_string();
        assert_eq!(w.len(), OLD_AND_NEW.len(), "{w:#?}");
        for (table, old_key, _, new_key, value) in OLD_AND_NEW {
            let table = match table {
                UPSTREAMS => format!("{table}[0]"),
                _ => table.to_string(),
            };
            let want =
                format!("{table}.{old_key} in {file} is deprecated; write {new_key} = \"{value}\"");
            assert!(w.contains(&want), "{want}\nnot in {w:#?}");
        }

        // From the environment and from flags (everything but the upstream, an array entry
        // neither can set, which comes from the file in the new spelling).
        let scalars: Vec<_> = OLD_AND_NEW
            .iter()
            .filter(|(table, ..)| *table != UPSTREAMS)
            .collect();
        let upstream_only = every_duration_toml(false, &[UPSTREAMS]);
        let env: Vec<(String, String)> = scalars
            .iter()
            .map(|(table, old_key, n, ..)| {
                let path = format!("{table}.{old_key}").replace('.', "__");
                (
                    format!("KENNEL_{}", path.to_ascii_uppercase()),
                    n.to_string(),
                )
            })
            .collect();
        let (old, w) = load_noted(dir.path(), &upstream_only, &env, &[]).unwrap();
        assert_eq!(old, new);
        assert_eq!(w.len(), scalars.len(), "{w:#?}");
        assert!(
            w.contains(
                &"server.protocol.heartbeat_interval_secs \
                  (KENNEL_SERVER__PROTOCOL__HEARTBEAT_INTERVAL_SECS) is deprecated; write \
                  heartbeat_interval = \"15s\""
                    .to_string()
            ),
            "{w:#?}"
        );
        let keys: Vec<String> = scalars
            .iter()
            .map(|(table, old_key, ..)| format!("{table}.{old_key}"))
            .collect();
        let flags: Vec<(&str, Value)> = keys
            .iter()
            .zip(&scalars)
            .map(|(key, (_, _, n, ..))| (key.as_str(), Value::from(*n)))
            .collect();
        let (old, w) = load_noted(dir.path(), &upstream_only, &[], &flags).unwrap();
        assert_eq!(old, new);
        assert_eq!(w.len(), scalars.len(), "{w:#?}");
        assert!(
            w.contains(
                &"daemon.worktree_retention_hours (a flag) is deprecated; write \
                  worktree_retention = \"2d\""
                    .to_string()
            ),
            "{w:#?}"
        );
    }

    #[test]
    fn a_duration_without_a_unit_names_its_key_and_shows_how_to_write_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kennel.toml").display().to_string();
        let err = |toml: &str, env: &[(String, String)]| {
            format!("{:#}", load_noted(dir.path(), toml, env, &[]).unwrap_err())
        };
        for (value, shown) in [("\"15\"", "\"15\""), ("15", "15")] {
            let e = err(
                &format!("[server.protocol]\nheartbeat_interval = {value}\n"),
                &[],
            );
            let want = format!(
                "server.protocol.heartbeat_interval: {shown} has no unit; write e.g. \"15s\" or \
                 \"500ms\" (in {file})"
            );
            assert!(e.contains(&want), "{want}\nnot in {e}");
        }
        let e = err("[relay]\nhistory_retention = \"2w\"\n", &[]);
        assert!(
            e.contains("relay.history_retention: \"2w\" has an unknown unit \"w\""),
            "{e}"
        );
        let e = err("", &[("KENNEL_DAEMON__SHUTDOWN_GRACE".into(), "30".into())]);
        assert!(
            e.contains(
                "daemon.shutdown_grace: 30 has no unit; write e.g. \"30s\" or \"500ms\" \
                 (set by the environment variable KENNEL_DAEMON__SHUTDOWN_GRACE)"
            ),
            "{e}"
        );
        // Both spellings in one place: which one is meant cannot be guessed.
        let e = err("[gateway.cooldowns]\nauth_ms = 1000\nauth = \"1s\"\n", &[]);
        assert!(
            e.contains(
                "gateway.cooldowns.auth_ms and gateway.cooldowns.auth are both set; keep only auth"
            ),
            "{e}"
        );
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = load(Some(Path::new("/nonexistent/kennel.toml")), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
    }
}
