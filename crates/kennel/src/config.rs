//! Configuration loading: defaults, then a TOML file, then `KENNEL_*` environment variables
//! (`__` separates nesting levels), then command-line flags, each overriding the one before.
//! Unknown keys are errors that name the key and where it came from.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use kennel_server::config::ServerConfig;
use serde::{Deserialize, Serialize};

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

/// Environment variables read directly by flags, not by the config tree.
const FLAG_ENV: [&str; 3] = ["url", "api_key", "config"];

/// The file to read: `--config`/`KENNEL_CONFIG`, else `./kennel.toml`, else
/// `$XDG_CONFIG_HOME/kennel/kennel.toml` (`~/.config/kennel/kennel.toml`), if present.
pub fn find_file(explicit: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!(
                "config file {} does not exist (given with --config or KENNEL_CONFIG)",
                p.display()
            );
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
    let path = find_file(file)?;
    let mut fig = Figment::from(Serialized::defaults(Config::default()));
    if let Some(p) = &path {
        fig = fig.merge(Toml::file_exact(p));
    }
    fig = fig.merge(Env::prefixed("KENNEL_").split("__").ignore(&FLAG_ENV));
    for (key, value) in overrides {
        fig = fig.merge(Serialized::global(key, value.clone()));
    }
    let cfg: Config = fig.extract().map_err(|e| {
        let msgs: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
        anyhow::anyhow!(
            "invalid configuration: {}\n(see `kennel config show` for the keys and their defaults)",
            msgs.join("; ")
        )
    })?;
    cfg.server.validate().with_context(|| match &path {
        Some(p) => format!("in {}", p.display()),
        None => "in the environment or flags".to_string(),
    })?;
    Ok((cfg, path))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(err.contains("scheduler.accept_timeout_secs"), "{err}");
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

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = load(Some(Path::new("/nonexistent/kennel.toml")), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
    }
}
