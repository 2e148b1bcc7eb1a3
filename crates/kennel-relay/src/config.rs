//! `[relay]` configuration: where the upstream is, who may connect downstream, where the
//! relay keeps its history. Parsed once at start, then [`RelayConfig::validate`]d; it holds
//! keys, so its `Debug` never prints them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use kennel_http::HttpConfig;
use kennel_proto::Span;
use serde::{Deserialize, Serialize};

pub use kennel_proto::link::DAEMON_PATH;
pub use kennel_proto::ConfigError;

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// The coordinator (or parent relay) to connect to; normalised to `ws(s)://…/ws/daemon`.
    pub upstream: String,
    /// Other coordinators sharing the same database, tried in order when `upstream` cannot be
    /// reached or turns the relay away (with several coordinators on one PostgreSQL).
    pub fallback_upstreams: Vec<String>,
    /// Key presented upstream; needs the daemon or relay scope there.
    pub api_key: Option<String>,
    /// Name (and machine id) the relay uses upstream; the coordinator lists it under this.
    pub agent_name: String,
    /// Address for the downstream hub and the admin endpoints.
    pub listen: SocketAddr,
    /// Directory for `relay.db` (history, queue, buffered messages, connection log).
    pub data_dir: PathBuf,
    /// Keys downstream daemons must present in `authenticate`.
    pub daemon_keys: Vec<String>,
    /// Keys that open the admin endpoints and `/metrics` (everything but `/health`).
    pub admin_keys: Vec<String>,
    /// Labels advertised upstream for the whole relay.
    pub labels: BTreeMap<String, String>,
    /// How long a downstream daemon has to send `authenticate`.
    pub auth_timeout: Span,
    /// Heartbeat interval announced to downstream daemons (whole seconds).
    pub heartbeat_interval: Span,
    /// Heartbeat intervals a downstream daemon may stay silent before its link is ended (as
    /// `server.protocol.missed_heartbeats`).
    pub missed_heartbeats: u32,
    /// How long a vanished daemon has to come back before its attempts are reported lost.
    pub reattach_grace: Span,
    /// Largest frame accepted from a downstream daemon, in bytes.
    pub max_frame_bytes: usize,
    /// Bytes a downstream daemon may send before it has authenticated; more ends the link.
    pub max_auth_frame_bytes: usize,
    /// Downstream links that may be waiting to authenticate at once; more get 503.
    pub max_unauthenticated: usize,
    /// How long the history keeps an attempt after it ended (checked hourly); `"0s"` keeps
    /// it forever.
    pub history_retention: Span,
    /// Unacknowledged reports kept in memory while the upstream link is up; beyond this they
    /// move to `relay.db` (an upstream that stays connected but stops acking).
    pub max_pending_messages: usize,
    /// Timeouts and connection limit of the relay's HTTP listener (downstream daemons
    /// included: each WebSocket holds a connection).
    pub http: HttpConfig,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            upstream: "ws://127.0.0.1:7070/ws/daemon".to_string(),
            fallback_upstreams: Vec::new(),
            api_key: None,
            agent_name: "kennel-relay".to_string(),
            listen: SocketAddr::from(([127, 0, 0, 1], 7072)),
            data_dir: PathBuf::from("kennel-relay-data"),
            daemon_keys: Vec::new(),
            admin_keys: Vec::new(),
            labels: BTreeMap::new(),
            auth_timeout: Span::from_secs(10),
            heartbeat_interval: Span::from_secs(10),
            missed_heartbeats: 3,
            reattach_grace: Span::from_secs(30),
            max_frame_bytes: kennel_proto::link::DEFAULT_MAX_FRAME_BYTES,
            max_auth_frame_bytes: 256 * 1024,
            max_unauthenticated: 128,
            history_retention: Span::from_secs(30 * 86_400),
            max_pending_messages: 100_000,
            http: HttpConfig::default(),
        }
    }
}

impl std::fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayConfig")
            .field("upstream", &self.upstream)
            .field("fallback_upstreams", &self.fallback_upstreams)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("agent_name", &self.agent_name)
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("daemon_keys", &format!("{} keys", self.daemon_keys.len()))
            .field("admin_keys", &format!("{} keys", self.admin_keys.len()))
            .field("labels", &self.labels)
            .field("auth_timeout", &self.auth_timeout)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("missed_heartbeats", &self.missed_heartbeats)
            .field("reattach_grace", &self.reattach_grace)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("history_retention", &self.history_retention)
            .field("max_pending_messages", &self.max_pending_messages)
            .field("http", &self.http)
            .finish()
    }
}

impl RelayConfig {
    /// Checks the values serde cannot, without changing any (every command checks every
    /// section at load). What only running a relay needs is [`Self::check_runnable`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad =
            |key: &str, problem: String| Err(ConfigError::new(format!("relay.{key}"), problem));
        if let Err(problem) = self.upstream_endpoint() {
            return bad("upstream", problem);
        }
        for (i, u) in self.fallback_upstreams.iter().enumerate() {
            if let Err(problem) = kennel_proto::link::daemon_endpoint(u) {
                return bad(&format!("fallback_upstreams[{i}]"), problem);
            }
        }
        if let Err(e) = kennel_proto::validate_id("agent name", &self.agent_name) {
            return bad(
                "agent_name",
                format!("{e}; use letters, digits, `-` and `_`"),
            );
        }
        if self.daemon_keys.iter().any(String::is_empty) {
            return bad(
                "daemon_keys",
                "empty keys are not allowed; remove them".into(),
            );
        }
        if self.admin_keys.iter().any(String::is_empty) {
            return bad(
                "admin_keys",
                "empty keys are not allowed; remove them".into(),
            );
        }
        for (key, value) in [
            ("auth_timeout", self.auth_timeout),
            ("heartbeat_interval", self.heartbeat_interval),
        ] {
            if value.as_secs() == 0 {
                return bad(key, "must be at least 1s".into());
            }
        }
        for (key, value) in [
            ("missed_heartbeats", u64::from(self.missed_heartbeats)),
            ("max_pending_messages", self.max_pending_messages as u64),
        ] {
            if value == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if let Err(p) = self.http.check() {
            return bad(&format!("http.{}", p.field), p.problem.into());
        }
        if self.max_frame_bytes < 1024 {
            return bad("max_frame_bytes", "must be at least 1024".into());
        }
        Ok(())
    }

    /// What a running relay needs beyond valid values: a key for the upstream and at least one
    /// for downstream daemons.
    pub fn check_runnable(&self) -> Result<(), ConfigError> {
        self.validate()?;
        if self.api_key.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigError::new(
                "relay.api_key",
                "missing: set relay.api_key (or KENNEL_RELAY__API_KEY / MAKIMA_API_KEY) to a key \
                 with the daemon or relay scope",
            ));
        }
        if self.daemon_keys.is_empty() {
            return Err(ConfigError::new(
                "relay.daemon_keys",
                "downstream daemons need a key: list at least one non-empty key in \
                 relay.daemon_keys",
            ));
        }
        Ok(())
    }

    /// How long a downstream daemon may stay silent before its link is ended.
    pub fn silence_limit(&self) -> std::time::Duration {
        self.heartbeat_interval
            .get()
            .saturating_mul(self.missed_heartbeats)
    }

    /// The upstream's daemon link URL: `upstream` as written, normalised to
    /// `ws(s)://…/ws/daemon` by the rule daemons use too.
    pub fn upstream_endpoint(&self) -> Result<String, String> {
        kennel_proto::link::daemon_endpoint(&self.upstream)
    }

    /// Every upstream to try, in order: `upstream`, then `fallback_upstreams`, normalised.
    pub fn upstream_endpoints(&self) -> Result<Vec<String>, String> {
        std::iter::once(&self.upstream)
            .chain(&self.fallback_upstreams)
            .map(|u| kennel_proto::link::daemon_endpoint(u))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_upstreams_follow_the_upstream_by_the_same_rule_and_are_checked() {
        let c = RelayConfig {
            upstream: "http://a:7070".into(),
            fallback_upstreams: vec!["http://b:7070".into(), "wss://c/".into()],
            ..RelayConfig::default()
        };
        assert_eq!(
            c.upstream_endpoints().unwrap(),
            [
                "ws://a:7070/ws/daemon",
                "ws://b:7070/ws/daemon",
                "wss://c/ws/daemon"
            ]
        );
        let c = RelayConfig {
            fallback_upstreams: vec!["ftp://b".into()],
            ..RelayConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "relay.fallback_upstreams[0]");
    }

    #[test]
    fn upstream_urls_are_normalised() {
        for (given, want) in [
            ("http://a:7070", "ws://a:7070/ws/daemon"),
            ("https://a/", "wss://a/ws/daemon"),
            ("ws://a:1/ws/daemon", "ws://a:1/ws/daemon"),
            ("wss://a/base", "wss://a/base/ws/daemon"),
        ] {
            let c = RelayConfig {
                upstream: given.into(),
                ..RelayConfig::default()
            };
            assert_eq!(c.upstream_endpoint().unwrap(), want);
            assert_eq!(c.upstream, given, "validation never rewrites the setting");
        }
        for bad in ["ftp://a", "a:7070"] {
            let c = RelayConfig {
                upstream: bad.into(),
                ..RelayConfig::default()
            };
            assert!(c
                .validate()
                .unwrap_err()
                .to_string()
                .starts_with("relay.upstream: "));
        }
    }

    #[test]
    fn keys_are_required_to_run_and_not_printed() {
        let mut c = RelayConfig::default();
        // The defaults are valid values (every command checks them at load); a relay cannot
        // run on them.
        c.validate().unwrap();
        assert!(c
            .check_runnable()
            .unwrap_err()
            .to_string()
            .contains("api_key"));
        c.api_key = Some("kn_secret".into());
        assert!(c
            .check_runnable()
            .unwrap_err()
            .to_string()
            .contains("daemon_keys"));
        c.daemon_keys = vec!["dk_secret".into()];
        c.check_runnable().unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("secret"), "{dbg}");
    }
}
