//! The gateway's typed configuration (`[gateway]` in `kennel.toml`): where it listens, its
//! upstreams, cooldowns, limits and the heartbeat watch. Parsed once at start and validated;
//! unknown keys are errors. API keys of upstreams are never stored here, only the name of the
//! environment variable that holds each one, so the config can be printed safely.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kennel_http::HttpConfig;
use kennel_proto::Span;
use serde::{Deserialize, Serialize};

/// Environment variable naming a single OpenAI-compatible upstream (ZeptoClaw compatibility).
pub const ZEPTOCLAW_URL_ENV: &str = "ZEPTOCLAW_GATEWAY_URL";
/// Environment variable holding the key of that upstream (ZeptoClaw compatibility).
pub const ZEPTOCLAW_KEY_ENV: &str = "ZEPTOCLAW_API_KEY";

/// The whole `[gateway]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address the gateway's HTTP listener binds to.
    pub listen: SocketAddr,
    /// Directory of the kennel store (API keys and the gateway's state); default: the server's.
    pub data_dir: Option<PathBuf>,
    /// Upstreams tried per request, at most (first try included).
    pub max_attempts: u32,
    /// Largest accepted request body, in bytes; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Largest body of `POST /heartbeat` and `POST /gateway/incident`, in bytes; larger ones
    /// get 413 and nothing is stored.
    pub max_report_bytes: usize,
    /// Bytes of heartbeats, and separately of incidents, that are kept (in memory, in the
    /// store and in `GET /state`), counted as stored JSON; the oldest go first. At most 100
    /// heartbeats and 1000 incidents are kept in any case.
    pub max_kept_report_bytes: usize,
    pub cooldowns: CooldownConfig,
    pub heartbeat: HeartbeatConfig,
    pub rate_limit: RateLimitConfig,
    /// Timeouts and connection limit of the gateway's HTTP listener.
    pub http: HttpConfig,
    /// The providers requests are routed to.
    pub upstreams: Vec<UpstreamConfig>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7071)),
            data_dir: None,
            max_attempts: 3,
            max_body_bytes: 32 * 1024 * 1024,
            max_report_bytes: 16 * 1024,
            max_kept_report_bytes: 256 * 1024,
            cooldowns: CooldownConfig::default(),
            heartbeat: HeartbeatConfig::default(),
            rate_limit: RateLimitConfig::default(),
            http: HttpConfig::default(),
            upstreams: Vec::new(),
        }
    }
}

/// How long an upstream is skipped after a failure, by class of failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CooldownConfig {
    /// After a 429 without `Retry-After`.
    pub rate_limit: Span,
    /// First cooldown after a 503/504; doubles per consecutive failure.
    pub overload_base: Span,
    /// First cooldown after a timeout or network error; doubles likewise.
    pub network_base: Span,
    /// After any other 5xx.
    pub server_error: Span,
    /// After a 401/403 (the provider refused the upstream's `api_key_env` key);
    /// flat, not doubled. Long, because waiting does not fix a key.
    pub auth: Span,
    /// First cooldown of one model on one upstream after a 404; doubles per
    /// consecutive 404 of that model. The upstream keeps serving its other models.
    pub not_found_base: Span,
    /// Upper bound of every cooldown (exponential ones and `Retry-After`).
    pub max: Span,
}

impl Default for CooldownConfig {
    fn default() -> Self {
        CooldownConfig {
            rate_limit: Span::from_millis(60_000),
            overload_base: Span::from_millis(60_000),
            network_base: Span::from_millis(60_000),
            server_error: Span::from_millis(10_000),
            auth: Span::from_secs(10 * 60),
            not_found_base: Span::from_millis(60_000),
            max: Span::from_secs(15 * 60),
        }
    }
}

/// The watch on the local agent's heartbeats ("takeover").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatConfig {
    /// Silence after the last heartbeat before a downtime incident is recorded;
    /// `"0s"` disables the watch.
    pub takeover_after: Span,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            takeover_after: Span::from_millis(120_000),
        }
    }
}

/// Per-API-key request rate limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Sustained requests per minute per key; 0 disables the limit.
    pub per_minute: u32,
    /// Requests a key may make at once above the sustained rate.
    pub burst: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            per_minute: 600,
            burst: 60,
        }
    }
}

/// Which API an upstream speaks; a request is only sent to upstreams of its own format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    /// OpenAI chat completions; `base_url` is what `/chat/completions` is appended to
    /// (e.g. `https://api.openai.com/v1`, as `OPENAI_BASE_URL`).
    Openai,
    /// Anthropic Messages; `base_url` is what `/v1/messages` is appended to
    /// (e.g. `https://api.anthropic.com`, as `ANTHROPIC_BASE_URL`).
    Anthropic,
}

impl UpstreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamKind::Openai => "openai",
            UpstreamKind::Anthropic => "anthropic",
        }
    }
}

/// One provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Unique name, shown in `x-kennel-upstream`, `/health` and metrics.
    pub name: String,
    pub kind: UpstreamKind,
    /// Base URL (see [`UpstreamKind`] for what is appended).
    pub base_url: String,
    /// Name of the environment variable holding the upstream's API key (none: no key sent).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Lower is tried first.
    #[serde(default)]
    pub priority: i32,
    /// Tie-breaker among equally good upstreams; higher is tried first.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Models this upstream serves (client names); empty: any model.
    #[serde(default)]
    pub models: Vec<String>,
    /// Client model name → the name sent to this upstream.
    #[serde(default)]
    pub renames: BTreeMap<String, String>,
    /// TCP (and TLS) connect deadline.
    #[serde(default = "default_connect")]
    pub connect_timeout: Span,
    /// Streaming requests only: deadline for the response headers and the first body byte,
    /// and the longest silence allowed inside the stream.
    #[serde(default = "default_first_byte")]
    pub first_byte_timeout: Span,
    /// Deadline for a whole non-streaming response, headers included.
    /// Providers send the headers of a non-streamed completion only once it is finished, so
    /// `first_byte_timeout` does not apply to them.
    #[serde(default = "default_total")]
    pub total_timeout: Span,
}

fn default_weight() -> u32 {
    1
}
fn default_connect() -> Span {
    Span::from_secs(5)
}
fn default_first_byte() -> Span {
    Span::from_secs(60)
}
fn default_total() -> Span {
    Span::from_secs(600)
}

impl UpstreamConfig {
    /// Whether this upstream serves `model` (as the client names it).
    pub fn serves(&self, model: &str) -> bool {
        self.models.is_empty()
            || self.models.iter().any(|m| m == model)
            || self.renames.contains_key(model)
    }

    /// The model name to send upstream.
    pub fn upstream_model<'a>(&'a self, model: &'a str) -> &'a str {
        self.renames.get(model).map(String::as_str).unwrap_or(model)
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout.get()
    }
    pub fn first_byte_timeout(&self) -> Duration {
        self.first_byte_timeout.get()
    }
    pub fn total_timeout(&self) -> Duration {
        self.total_timeout.get()
    }
}

pub use kennel_proto::ConfigError;

/// `gateway.<key>` cannot work: `problem` says why and how to fix it.
fn bad(key: impl std::fmt::Display, problem: impl Into<String>) -> ConfigError {
    ConfigError::new(format!("gateway.{key}"), problem)
}

impl GatewayConfig {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_attempts == 0 {
            return Err(bad("max_attempts", "must be at least 1"));
        }
        if self.max_body_bytes < 1024 {
            return Err(bad("max_body_bytes", "must be at least 1024 bytes"));
        }
        if self.max_report_bytes < 256 {
            return Err(bad("max_report_bytes", "must be at least 256 bytes"));
        }
        if self.max_kept_report_bytes < self.max_report_bytes {
            return Err(bad(
                "max_kept_report_bytes",
                "must be at least max_report_bytes, so the newest report always fits",
            ));
        }
        if let Err(p) = self.http.check() {
            return Err(bad(format!("http.{}", p.field), p.problem));
        }
        let c = &self.cooldowns;
        if c.max.is_zero() {
            return Err(bad("cooldowns.max", "must be more than 0s"));
        }
        if self.rate_limit.per_minute > 0 && self.rate_limit.burst == 0 {
            return Err(bad(
                "rate_limit.burst",
                "must be at least 1 when rate_limit.per_minute is set",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let key = |f: &str| format!("upstreams[{i}].{f}");
            if u.name.is_empty()
                || !u
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            {
                return Err(bad(
                    key("name"),
                    "must be non-empty and use only letters, digits, '-', '_' and '.'",
                ));
            }
            if !names.insert(u.name.as_str()) {
                return Err(bad(
                    key("name"),
                    format!(
                        "{:?} is used by two upstreams; names must be unique",
                        u.name
                    ),
                ));
            }
            match reqwest::Url::parse(&u.base_url) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => {}
                _ => {
                    return Err(bad(
                        key("base_url"),
                        format!("{:?} is not an http(s) URL", u.base_url),
                    ))
                }
            }
            for (f, v) in [
                ("connect_timeout", u.connect_timeout),
                ("first_byte_timeout", u.first_byte_timeout),
                ("total_timeout", u.total_timeout),
            ] {
                if v.is_zero() {
                    return Err(bad(key(f), "must be more than 0s"));
                }
            }
        }
        Ok(())
    }

    /// The configured upstreams or, when none are configured and `ZEPTOCLAW_GATEWAY_URL` is
    /// set, a single OpenAI-compatible upstream named `zeptoclaw` built from it (its key from
    /// `ZEPTOCLAW_API_KEY`).
    pub fn resolved_upstreams(&self, env: impl Fn(&str) -> Option<String>) -> Vec<UpstreamConfig> {
        if !self.upstreams.is_empty() {
            return self.upstreams.clone();
        }
        let Some(url) = env(ZEPTOCLAW_URL_ENV).filter(|u| !u.is_empty()) else {
            return Vec::new();
        };
        vec![UpstreamConfig {
            name: "zeptoclaw".to_string(),
            kind: UpstreamKind::Openai,
            base_url: url,
            api_key_env: env(ZEPTOCLAW_KEY_ENV).map(|_| ZEPTOCLAW_KEY_ENV.to_string()),
            priority: 0,
            weight: default_weight(),
            models: Vec::new(),
            renames: BTreeMap::new(),
            connect_timeout: default_connect(),
            first_byte_timeout: default_first_byte(),
            total_timeout: default_total(),
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstreams_and_rejects_unknown_keys() {
        let cfg: GatewayConfig = toml::from_str(
            r#"
            max_attempts = 2
            [[upstreams]]
            name = "local"
            kind = "openai"
            base_url = "http://127.0.0.1:8000/v1"
            renames = { "gpt-4o" = "llama3" }
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.upstreams[0].upstream_model("gpt-4o"), "llama3");
        assert!(cfg.upstreams[0].serves("anything"));
        let err = toml::from_str::<GatewayConfig>(
            "[[upstreams]]\nname='a'\nkind='openai'\nbase_url='http://x'\nprio=1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("prio"), "{err}");
    }

    #[test]
    fn validation_names_the_key() {
        let cfg = toml::from_str::<GatewayConfig>(
            "[[upstreams]]\nname='a'\nkind='anthropic'\nbase_url='ftp://x'\n",
        )
        .unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("upstreams[0].base_url"), "{err}");
    }

    #[test]
    fn the_http_section_is_checked_and_closed() {
        let cfg = toml::from_str::<GatewayConfig>(
            "max_report_bytes = 4096\n[http]\nheader_read_timeout = \"1s\"\nidle_timeout = \"0s\"\n",
        )
        .unwrap();
        assert_eq!(cfg.max_report_bytes, 4096);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("gateway.http.idle_timeout"), "{err}");
        // A duration needs its unit.
        let err = toml::from_str::<GatewayConfig>("[http]\nidle_timeout = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 has no unit"), "{err}");
        let mut cfg = GatewayConfig::default();
        cfg.validate().unwrap();
        cfg.max_kept_report_bytes = cfg.max_report_bytes - 1;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("max_kept_report_bytes"), "{err}");
    }

    #[test]
    fn zeptoclaw_env_is_an_alias_for_one_upstream() {
        let cfg = GatewayConfig::default();
        let env = |k: &str| match k {
            ZEPTOCLAW_URL_ENV => Some("http://127.0.0.1:9/v1".to_string()),
            ZEPTOCLAW_KEY_ENV => Some("secret".to_string()),
            _ => None,
        };
        let ups = cfg.resolved_upstreams(env);
        assert_eq!(ups.len(), 1);
        assert_eq!(ups[0].kind, UpstreamKind::Openai);
        assert_eq!(ups[0].api_key_env.as_deref(), Some(ZEPTOCLAW_KEY_ENV));
        assert!(cfg.resolved_upstreams(|_| None).is_empty());
    }
}
