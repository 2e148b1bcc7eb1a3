//! The coordinator's typed configuration, parsed once at start. Loading (file, `KENNEL_*` env,
//! flags) happens in the binary; this module only says what the keys are, their defaults and
//! which values are acceptable. Unknown keys are refused (`deny_unknown_fields`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kennel_proto::Span;
use serde::{Deserialize, Serialize};

pub use kennel_auth::AuthConfig;
pub use kennel_http::{HttpConfig, HttpConfigProblem};

/// Everything `kennel server` needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the HTTP and WebSocket listener binds to.
    pub listen: SocketAddr,
    /// Directory for the SQLite database, the hash key and the first admin key.
    pub data_dir: PathBuf,
    /// A PostgreSQL URL (`postgres://user:password@host/db`, `?options=-c%20search_path%3Dx`
    /// for a schema): several coordinators share it, daemons connect to any of them. Unset:
    /// SQLite in `data_dir`, one coordinator.
    pub database_url: Option<String>,
    pub auth: AuthConfig,
    pub scheduler: SchedulerConfig,
    pub protocol: ProtocolConfig,
    pub api: ApiConfig,
    pub http: HttpConfig,
    pub cluster: ClusterConfig,
    pub agents: AgentsConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir: default_data_dir(),
            database_url: None,
            auth: AuthConfig::default(),
            scheduler: SchedulerConfig::default(),
            protocol: ProtocolConfig::default(),
            api: ApiConfig::default(),
            http: HttpConfig::default(),
            cluster: ClusterConfig::default(),
            agents: AgentsConfig::default(),
        }
    }
}

/// `$XDG_DATA_HOME/kennel`, else `~/.local/share/kennel`, else `./kennel-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("kennel");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join(".local/share/kennel");
    }
    PathBuf::from("kennel-data")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// How long a daemon has to answer `spawnTask` before the attempt expires and is retried.
    pub accept_timeout: Span,
    /// How long a disconnected daemon keeps its tasks, waiting for it to reconnect.
    pub reattach_grace: Span,
    /// Attempts per task when the submitter does not say.
    pub default_max_attempts: u32,
    /// Agent profile for tasks that do not name one.
    pub default_agent: String,
    /// Time between SIGINT and SIGTERM asked of a daemon when a task is cancelled.
    pub cancel_grace: Span,
    /// How long a queued task may wait while no connected daemon can run it (no daemon offers
    /// its agent or labels, none connected, all draining) before it fails with that reason.
    /// `"0s"` (the default) waits forever; the reason is shown meanwhile.
    pub unschedulable_timeout: Span,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            accept_timeout: Span::from_secs(30),
            reattach_grace: Span::from_secs(60),
            default_max_attempts: 3,
            default_agent: "claude".into(),
            cancel_grace: Span::from_secs(10),
            unschedulable_timeout: Span::from_secs(0),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtocolConfig {
    /// Largest daemon frame accepted, in bytes.
    pub max_frame_bytes: usize,
    /// Time between daemon heartbeats (whole seconds; the link carries seconds); a daemon
    /// silent for `missed_heartbeats` intervals is lost.
    pub heartbeat_interval: Span,
    /// Heartbeats a daemon may miss before it is considered lost.
    pub missed_heartbeats: u32,
    /// How long a new connection has to send `authenticate`.
    pub auth_timeout: Span,
    /// Frames that may wait to be sent to one daemon (at least twice its slots); a daemon that
    /// lets more pile up is not reading and is disconnected (close 4006).
    pub max_queued_frames: usize,
    /// Bytes a daemon link may send before it has authenticated (its `authenticate` frame,
    /// whose `runningTasks` grows with the attempts it holds); more ends the connection.
    pub max_auth_frame_bytes: usize,
    /// Daemon links that may be waiting to authenticate at once; more are refused with 503.
    pub max_unauthenticated: usize,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        ProtocolConfig {
            max_frame_bytes: kennel_proto::DEFAULT_MAX_FRAME_BYTES,
            heartbeat_interval: Span::from_secs(10),
            missed_heartbeats: 3,
            auth_timeout: Span::from_secs(10),
            max_queued_frames: 4096,
            max_auth_frame_bytes: 256 * 1024,
            max_unauthenticated: 128,
        }
    }
}

/// Long-lived agents: what the lifecycle manager compares and waits for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsConfig {
    /// The release policies with `restartOnUpdate` follow: when it differs from the one their
    /// agent was started under, the agent is restarted once idle. Unset: kennel's own version.
    /// Set it to roll such agents on a deploy of your own (new tools on the daemons, say).
    pub release: Option<String>,
    /// An agent that registered itself and sent no heartbeat for this long is offline.
    pub stale_after: Span,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        AgentsConfig {
            release: None,
            stale_after: Span::from_secs(60),
        }
    }
}

/// Several coordinators on one database: how they tell each other they are alive.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// How often a coordinator records that it is alive (and the rescuer looks for work).
    pub beat: Span,
    /// A coordinator not seen for this long is dead: the links of its daemons are recorded as
    /// ended, and their attempts are retried after the reattach grace.
    pub dead_after: Span,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            beat: Span::from_secs(2),
            dead_after: Span::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Largest REST request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest page a list endpoint returns.
    pub max_page: u32,
    /// How long the event log keeps an event (what SSE resumes from with `Last-Event-ID`).
    /// Tasks, attempts and output are kept regardless.
    pub event_retention: Span,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            max_body_bytes: 4 << 20,
            max_page: 1000,
            event_retention: Span::from_secs(30 * 24 * 3600),
        }
    }
}

pub use kennel_proto::ConfigError;

impl ServerConfig {
    /// Checks values serde cannot: ranges and relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad =
            |key: &str, problem: &str| Err(ConfigError::new(format!("server.{key}"), problem));
        if self.protocol.max_frame_bytes < 1024 {
            return bad("protocol.max_frame_bytes", "must be at least 1024");
        }
        if self.protocol.heartbeat_interval.as_secs() == 0 {
            return bad("protocol.heartbeat_interval", "must be at least 1s");
        }
        if self.protocol.missed_heartbeats == 0 {
            return bad("protocol.missed_heartbeats", "must be at least 1");
        }
        if self.protocol.auth_timeout.as_secs() == 0 {
            return bad("protocol.auth_timeout", "must be at least 1s");
        }
        if self.scheduler.accept_timeout.as_secs() == 0 {
            return bad("scheduler.accept_timeout", "must be at least 1s");
        }
        if self.scheduler.default_max_attempts == 0 {
            return bad("scheduler.default_max_attempts", "must be at least 1");
        }
        if kennel_proto::validate_id("agent", &self.scheduler.default_agent).is_err() {
            return bad(
                "scheduler.default_agent",
                "must be a profile name of letters, digits, `-`, `_`",
            );
        }
        if let Some(k) = &self.auth.admin_key {
            if k.len() < 24 {
                return bad("auth.admin_key", "must be at least 24 characters");
            }
        }
        if let Some(k) = &self.auth.hash_key {
            if k.len() < 32 {
                return bad("auth.hash_key", "must be at least 32 characters");
            }
        }
        if let Some(url) = &self.database_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return bad(
                    "database_url",
                    "must be a postgres:// or postgresql:// URL (leave it unset for SQLite in data_dir)",
                );
            }
            if self.auth.hash_key.is_none() {
                return bad(
                    "auth.hash_key",
                    "must be set when database_url is: every coordinator on one database must \
                     hash API keys with the same secret (at least 32 characters)",
                );
            }
        }
        if self.api.event_retention.as_millis() < 3_600_000 {
            return bad("api.event_retention", "must be at least 1h");
        }
        if self.cluster.beat.as_millis() < 100 {
            return bad("cluster.beat", "must be at least 100ms");
        }
        if self.cluster.dead_after.as_millis() < 3 * self.cluster.beat.as_millis() {
            return bad(
                "cluster.dead_after",
                "must be at least three beats (cluster.beat), or a slow beat reads as a death",
            );
        }
        if self.api.max_page == 0 {
            return bad("api.max_page", "must be at least 1");
        }
        if let Err(p) = self.http.check() {
            let key = match p.field {
                "header_read_timeout" => "http.header_read_timeout",
                "idle_timeout" => "http.idle_timeout",
                _ => "http.max_connections",
            };
            return bad(key, p.problem);
        }
        Ok(())
    }

    pub fn heartbeat_interval(&self) -> Duration {
        self.protocol.heartbeat_interval.get()
    }

    /// How long a daemon may stay silent before it is lost.
    pub fn silence_limit(&self) -> Duration {
        self.heartbeat_interval() * self.protocol.missed_heartbeats
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_event_retention_under_an_hour_is_refused() {
        let mut cfg = ServerConfig::default();
        cfg.api.event_retention = Span::from_secs(59 * 60);
        let e = cfg.validate().unwrap_err();
        assert_eq!(e.key, "server.api.event_retention");
        cfg.api.event_retention = Span::from_secs(3600);
        cfg.validate().unwrap();
    }

    #[test]
    fn a_dead_after_shorter_than_three_beats_is_refused() {
        let mut cfg = ServerConfig::default();
        cfg.validate().unwrap();
        cfg.cluster.beat = Span::from_secs(5);
        let e = cfg.validate().unwrap_err();
        assert_eq!(e.key, "server.cluster.dead_after");
        cfg.cluster.dead_after = Span::from_secs(15);
        cfg.validate().unwrap();
        cfg.cluster.beat = Span::from_millis(50);
        assert_eq!(cfg.validate().unwrap_err().key, "server.cluster.beat");
    }

    #[test]
    fn a_database_url_must_be_postgres_and_comes_with_a_shared_hash_key() {
        let mut cfg = ServerConfig {
            database_url: Some("mysql://h/db".into()),
            ..ServerConfig::default()
        };
        assert_eq!(cfg.validate().unwrap_err().key, "server.database_url");
        cfg.database_url = Some("postgres://root@127.0.0.1/test".into());
        let e = cfg.validate().unwrap_err();
        assert_eq!(e.key, "server.auth.hash_key");
        assert!(e.problem.contains("same secret"), "{e}");
        cfg.auth.hash_key = Some("x".repeat(32));
        cfg.validate().unwrap();
    }
}
