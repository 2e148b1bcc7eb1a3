//! The daemon's typed configuration (`[daemon]` in kennel.toml), parsed once at start.
//! Unknown keys are refused; [`DaemonConfig::validate`] checks what serde cannot.

use std::collections::BTreeMap;
use std::path::PathBuf;

use kennel_proto::Span;
use serde::{Deserialize, Deserializer, Serialize};

use crate::agent::{AgentProfile, AgentProfileEntry};

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Coordinator or relay to connect to: `ws(s)://host:port[/ws/daemon]` or `http(s)://…`
    /// (normalised to the `/ws/daemon` endpoint).
    pub server: String,
    /// Other coordinators sharing the same database, tried in order when `server` cannot be
    /// reached or turns the daemon away (with several coordinators on one PostgreSQL).
    pub fallback_servers: Vec<String>,
    /// API key with the `daemon` scope.
    pub api_key: Option<String>,
    /// Directory for the outbox, repository caches, worktrees and status. Default:
    /// `<server.data_dir>/daemon`.
    pub data_dir: Option<PathBuf>,
    /// Stable identity; default: generated once and kept in `<data_dir>/machine-id`.
    pub machine_id: Option<String>,
    /// Name shown in lists; default: the host's name.
    pub hostname: Option<String>,
    /// Agents run at once.
    pub max_concurrent_tasks: u32,
    /// Labels tasks can require (`gpu = "a100"`).
    pub labels: BTreeMap<String, String>,
    /// Agent profiles by name; the defaults (claude, codex, aider) are added unless replaced.
    /// A profile named like a default may leave out `kind` and then adjusts that default.
    #[serde(deserialize_with = "deserialize_agents")]
    pub agents: BTreeMap<String, AgentProfile>,
    /// Per-repository setup, keyed by the repository URL as tasks give it.
    pub repos: BTreeMap<String, RepoSetup>,
    pub git: GitConfig,
    /// Keep worktrees after the task ends (for debugging).
    pub keep_worktrees: bool,
    /// How old a leftover worktree must be before the sweep removes it.
    pub worktree_retention: Span,
    /// Longest output line sent in one piece, in bytes; longer lines go in partial chunks.
    pub max_line_bytes: usize,
    /// Time between SIGINT, SIGTERM and SIGKILL when a task is interrupted or times out.
    pub interrupt_grace: Span,
    /// How long a clean stop (SIGINT/SIGTERM) gives running agents to finish before it
    /// interrupts them and hands their attempts back to be retried elsewhere.
    pub shutdown_grace: Span,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            server: "ws://127.0.0.1:7070/ws/daemon".into(),
            fallback_servers: Vec::new(),
            api_key: None,
            data_dir: None,
            machine_id: None,
            hostname: None,
            max_concurrent_tasks: 2,
            labels: BTreeMap::new(),
            agents: BTreeMap::new(),
            repos: BTreeMap::new(),
            git: GitConfig::default(),
            keep_worktrees: false,
            worktree_retention: Span::from_secs(24 * 3600),
            max_line_bytes: 16 * 1024,
            interrupt_grace: Span::from_secs(10),
            shutdown_grace: Span::from_secs(30),
        }
    }
}

impl std::fmt::Debug for DaemonConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonConfig")
            .field("server", &self.server)
            .field("fallback_servers", &self.fallback_servers)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("data_dir", &self.data_dir)
            .field("machine_id", &self.machine_id)
            .field("max_concurrent_tasks", &self.max_concurrent_tasks)
            .field("labels", &self.labels)
            .field("agents", &self.agents.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Files and a command to prepare a fresh worktree of one repository.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepoSetup {
    /// `[source, destination]` pairs: an absolute file copied to a path inside the worktree.
    pub copy: Vec<(PathBuf, PathBuf)>,
    /// Command (argument vector) run in the worktree before the agent.
    pub setup: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GitConfig {
    /// Branches are named `<prefix><task id>`.
    pub branch_prefix: String,
    pub author_name: String,
    pub author_email: String,
    /// Commit message for uncommitted changes; `{task_id}` and `{task_name}` are replaced.
    pub commit_message: String,
}

impl Default for GitConfig {
    fn default() -> Self {
        GitConfig {
            branch_prefix: "kennel/".into(),
            author_name: "kennel".into(),
            author_email: "kennel@localhost".into(),
            commit_message: "kennel: {task_name}\n\nTask {task_id}".into(),
        }
    }
}

pub use kennel_proto::ConfigError;

impl DaemonConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, problem: &str| Err(ConfigError::new(key, problem));
        if normalize_url(&self.server).is_none() {
            return bad(
                "daemon.server",
                "must be a ws://, wss://, http:// or https:// URL",
            );
        }
        for (i, u) in self.fallback_servers.iter().enumerate() {
            if normalize_url(u).is_none() {
                return Err(ConfigError::new(
                    format!("daemon.fallback_servers[{i}]"),
                    "must be a ws://, wss://, http:// or https:// URL",
                ));
            }
        }
        if self.max_concurrent_tasks == 0 || self.max_concurrent_tasks > 1000 {
            return bad("daemon.max_concurrent_tasks", "must be between 1 and 1000");
        }
        if let Some(m) = &self.machine_id {
            if kennel_proto::validate_id("machine id", m).is_err() {
                return bad(
                    "daemon.machine_id",
                    "must be letters, digits, `-`, `_`, `.` (at most 128)",
                );
            }
        }
        for (name, profile) in &self.agents {
            if kennel_proto::validate_id("agent", name).is_err() {
                return bad(
                    &format!("daemon.agents.{name}"),
                    "has an invalid profile name",
                );
            }
            if let Err(problem) = profile.validate(name) {
                return bad(&format!("daemon.agents.{name}"), &problem);
            }
        }
        if kennel_proto::validate_branch_name(&format!("{}x", self.git.branch_prefix)).is_err() {
            return bad(
                "daemon.git.branch_prefix",
                "does not make valid branch names",
            );
        }
        if self.max_line_bytes < 256 {
            return bad("daemon.max_line_bytes", "must be at least 256");
        }
        Ok(())
    }

    /// The profiles in effect: the built-in defaults, replaced or extended by config.
    pub fn profiles(&self) -> BTreeMap<String, AgentProfile> {
        let mut all = crate::agent::default_profiles();
        for (k, v) in &self.agents {
            all.insert(k.clone(), v.clone());
        }
        all
    }
}

/// Reads `[daemon.agents]`: each entry resolved under its name (see
/// [`AgentProfileEntry::resolve`]), so a built-in's `kind` need not be repeated.
fn deserialize_agents<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, AgentProfile>, D::Error> {
    BTreeMap::<String, AgentProfileEntry>::deserialize(deserializer)?
        .into_iter()
        .map(|(name, entry)| entry.resolve(&name).map(|profile| (name, profile)))
        .collect::<Result<_, _>>()
        .map_err(serde::de::Error::custom)
}

/// The daemon link URL for what users write in `daemon.server`: the one rule the relay uses
/// too ([`kennel_proto::link::daemon_endpoint`]).
pub fn normalize_url(url: &str) -> Option<String> {
    kennel_proto::link::daemon_endpoint(url).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::agent::AgentKind;
    use serde_json::json;

    #[test]
    fn urls_are_normalised() {
        assert_eq!(
            normalize_url("http://h:7070").as_deref(),
            Some("ws://h:7070/ws/daemon")
        );
        assert_eq!(
            normalize_url("https://h/").as_deref(),
            Some("wss://h/ws/daemon")
        );
        assert_eq!(
            normalize_url("ws://h:1/ws/daemon").as_deref(),
            Some("ws://h:1/ws/daemon")
        );
        assert_eq!(
            normalize_url("https://h/base").as_deref(),
            Some("wss://h/base/ws/daemon"),
            "a base path keeps the daemon path, as for relays"
        );
        assert_eq!(normalize_url("ftp://h"), None);
        assert_eq!(normalize_url("h:7070"), None);
    }

    fn parse(value: serde_json::Value) -> Result<DaemonConfig, serde_json::Error> {
        serde_json::from_value(value)
    }

    #[test]
    fn a_profile_named_like_a_built_in_inherits_its_kind() {
        let cfg = parse(json!({ "agents": {
            "claude": { "env": { "ANTHROPIC_API_KEY": "x" } },
            "codex": { "timeout": "1m" },
        }}))
        .unwrap();
        cfg.validate().unwrap();
        let claude = &cfg.agents["claude"];
        assert_eq!(claude.kind, AgentKind::Claude);
        assert_eq!(claude.env["ANTHROPIC_API_KEY"], "x");
        assert_eq!(
            claude.command_template(),
            AgentProfile::default_for(AgentKind::Claude).command_template(),
            "only env changed; the built-in's command and permission mode stay"
        );
        assert_eq!(cfg.agents["codex"].kind, AgentKind::Codex);
        assert_eq!(cfg.agents["codex"].timeout, Some(Span::from_secs(60)));
        let all = cfg.profiles();
        assert_eq!(all["claude"].env.len(), 1);
        assert_eq!(all["aider"], AgentProfile::default_for(AgentKind::Aider));

        // A kind given explicitly replaces the built-in under that name.
        let cfg = parse(json!({ "agents": {
            "claude": { "kind": "command", "command": ["sh"] },
        }}))
        .unwrap();
        assert_eq!(cfg.agents["claude"].kind, AgentKind::Command);
        assert_eq!(cfg.agents["claude"].permission_mode, None);
    }

    #[test]
    fn a_new_profile_without_kind_is_an_error_naming_it() {
        let err = parse(json!({ "agents": { "mine": { "command": ["run"] } } }))
            .unwrap_err()
            .to_string();
        assert!(err.contains("agent profile `mine` has no kind"), "{err}");
        assert!(err.contains("agents.mine.kind"), "{err}");
        let err = parse(json!({ "agents": { "claude": { "knd": "claude" } } }))
            .unwrap_err()
            .to_string();
        assert!(err.contains("knd"), "unknown keys are still refused: {err}");
    }

    #[test]
    fn every_profile_field_is_accepted_in_the_config() {
        // What `kennel config show` prints must read back: the entry form knows every field.
        let full = AgentProfile {
            command: vec!["claude".into(), "{prompt}".into()],
            env: BTreeMap::from([("A".into(), "b".into())]),
            timeout: Some(Span::from_secs(5)),
            permission_mode: Some("plan".into()),
            stream_input: true,
            ..AgentProfile::default_for(AgentKind::Claude)
        };
        let read = parse(json!({ "agents": { "x": full } })).unwrap();
        assert_eq!(read.agents["x"], full);
    }
}
