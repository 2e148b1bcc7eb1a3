//! Health of each upstream and the decisions made from it: how a failure is classified, how
//! long the upstream then cools down, and in which order upstreams are tried.
//!
//! Everything here is a pure function of the recorded history and an injected `now` (Unix
//! milliseconds), so the cooldown schedule is tested without sleeping. It does no I/O; the
//! caller persists snapshots.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{CooldownConfig, UpstreamConfig};

/// Weight of the newest sample in the latency average.
const EWMA_ALPHA: f64 = 0.3;
/// Per-model cooldowns kept per upstream. Clients choose model names freely, so an upstream
/// that serves any model could otherwise collect one entry per invented name.
const MAX_MODEL_COOLDOWNS: usize = 64;

/// Why an attempt at an upstream failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// Connection refused or reset, DNS, TLS: nothing reached the upstream.
    Network,
    /// A streaming request without headers or first byte within `first_byte_timeout`, or
    /// a non-streaming one without its whole answer within `total_timeout`.
    Timeout,
    /// 429.
    RateLimited,
    /// 503 or 504.
    Overloaded,
    /// Any other 5xx.
    ServerError,
    /// A stream that stalled or broke after its first byte reached the client.
    StreamBroken,
    /// 401 or 403: the provider refused kennel's credentials for that upstream (its
    /// `api_key_env`), not the client's kennel key, which was already accepted.
    Auth,
    /// 404: the upstream does not serve this model (or this endpoint). Cools down only the
    /// model, see [`UpstreamHealth::model_cooldowns`].
    NotFound,
}

impl FailureClass {
    pub const ALL: [FailureClass; 8] = [
        FailureClass::Network,
        FailureClass::Timeout,
        FailureClass::RateLimited,
        FailureClass::Overloaded,
        FailureClass::ServerError,
        FailureClass::StreamBroken,
        FailureClass::Auth,
        FailureClass::NotFound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Network => "network",
            FailureClass::Timeout => "timeout",
            FailureClass::RateLimited => "rate_limited",
            FailureClass::Overloaded => "overloaded",
            FailureClass::ServerError => "server_error",
            FailureClass::StreamBroken => "stream_broken",
            FailureClass::Auth => "auth",
            FailureClass::NotFound => "not_found",
        }
    }

    /// The class of an upstream status that is a failure; `None` for success and for the
    /// other 4xx (400, 413, 422, ...), which say the client's request is wrong wherever it
    /// goes and so are the client's to see. 401/403/404 are about this upstream (its key,
    /// its model list), and another upstream may well answer.
    pub fn of_status(status: u16) -> Option<FailureClass> {
        match status {
            401 | 403 => Some(FailureClass::Auth),
            404 => Some(FailureClass::NotFound),
            429 => Some(FailureClass::RateLimited),
            503 | 504 => Some(FailureClass::Overloaded),
            500..=599 => Some(FailureClass::ServerError),
            _ => None,
        }
    }
}

/// How long to cool down after a failure of `class`, the `consecutive`-th in a row (≥ 1).
pub fn cooldown(
    cfg: &CooldownConfig,
    class: FailureClass,
    consecutive: u32,
    retry_after: Option<Duration>,
) -> Duration {
    let exp = |base: u64| {
        let shift = consecutive.saturating_sub(1).min(30);
        base.saturating_mul(1u64 << shift)
    };
    let ms = match class {
        FailureClass::RateLimited => retry_after
            .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64)
            .unwrap_or(cfg.rate_limit.as_millis()),
        FailureClass::Overloaded => exp(cfg.overload_base.as_millis()),
        FailureClass::Network | FailureClass::Timeout | FailureClass::StreamBroken => {
            exp(cfg.network_base.as_millis())
        }
        FailureClass::ServerError => cfg.server_error.as_millis(),
        // A refused key is fixed by a person editing config or the environment, not by
        // waiting, so the upstream stays out for long; doubling would only add surprise.
        FailureClass::Auth => cfg.auth.as_millis(),
        FailureClass::NotFound => exp(cfg.not_found_base.as_millis()),
    };
    Duration::from_millis(ms.min(cfg.max.as_millis()))
}

/// Parses `Retry-After`: delay seconds or an HTTP date (relative to `now_ms`).
pub fn parse_retry_after(value: &str, now_ms: i64) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    let at_ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_millis()
        .min(i64::MAX as u128) as i64;
    Some(Duration::from_millis(
        at_ms.saturating_sub(now_ms).max(0) as u64
    ))
}

/// A cooldown of one model on one upstream, after a 404.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ModelCooldown {
    /// Unix ms until which the upstream is skipped for this model.
    pub until_ms: i64,
    /// 404s for this model in a row; the cooldown doubles with each.
    pub consecutive_failures: u32,
}

/// What is known about one upstream. Every field has a default so that state stored by an
/// older kennel still loads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UpstreamHealth {
    /// Unix ms of the last failure.
    pub last_failure_ms: Option<i64>,
    pub last_failure_class: Option<FailureClass>,
    /// What the last failure was, for people reading `/health` (`HTTP 401 Unauthorized`, a
    /// connection error). Never the provider's response body: `/health` is open.
    pub last_error: Option<String>,
    /// Failures of the upstream as a whole in a row (404s are the model's, not counted).
    pub consecutive_failures: u32,
    /// Unix ms until which the upstream is skipped.
    pub cooldown_until_ms: Option<i64>,
    /// Unix ms of the last success.
    pub last_success_ms: Option<i64>,
    /// Moving average of the time to the first byte, in ms.
    pub ewma_latency_ms: Option<f64>,
    /// Attempts sent to this upstream.
    pub requests: u64,
    /// Attempts that failed.
    pub failures: u64,
    /// Client model name → its cooldown after a 404. A 404 says the upstream lacks one
    /// model, not that it is unwell: its other models keep being served, so the cooldown is
    /// per model rather than per upstream.
    pub model_cooldowns: BTreeMap<String, ModelCooldown>,
}

impl UpstreamHealth {
    /// Whether the upstream as a whole is cooling down.
    pub fn cooling(&self, now_ms: i64) -> bool {
        self.cooldown_until_ms.is_some_and(|t| t > now_ms)
    }

    /// Until when the upstream is skipped for `model` (its own or the model's cooldown,
    /// whichever ends later); `None` when it is not.
    pub fn cooling_until(&self, model: &str, now_ms: i64) -> Option<i64> {
        let own = self.cooldown_until_ms;
        let for_model = self.model_cooldowns.get(model).map(|m| m.until_ms);
        own.max(for_model).filter(|t| *t > now_ms)
    }

    /// Records an answer from the upstream for `model`.
    pub fn record_success(&mut self, model: &str, latency: Duration, now_ms: i64) {
        let ms = latency.as_secs_f64() * 1000.0;
        self.ewma_latency_ms = Some(match self.ewma_latency_ms {
            Some(prev) => EWMA_ALPHA * ms + (1.0 - EWMA_ALPHA) * prev,
            None => ms,
        });
        self.last_success_ms = Some(now_ms);
        self.consecutive_failures = 0;
        self.cooldown_until_ms = None;
        self.model_cooldowns.remove(model);
    }

    /// Records a failure of a request for `model` and returns the cooldown it started.
    pub fn record_failure(
        &mut self,
        failure: Failure<'_>,
        cfg: &CooldownConfig,
        now_ms: i64,
    ) -> Duration {
        let Failure {
            class,
            model,
            retry_after,
            error,
        } = failure;
        self.failures += 1;
        self.last_failure_ms = Some(now_ms);
        self.last_failure_class = Some(class);
        self.last_error = Some(error.to_string());
        if class == FailureClass::NotFound {
            // Expired entries are kept, not pruned: they hold the streak that doubles the
            // next cooldown if the model is still missing when its cooldown ends. They are
            // the soonest-ending, so they are the first evicted at the bound.
            if !self.model_cooldowns.contains_key(model)
                && self.model_cooldowns.len() >= MAX_MODEL_COOLDOWNS
            {
                let soonest = self
                    .model_cooldowns
                    .iter()
                    .min_by_key(|(_, m)| m.until_ms)
                    .map(|(k, _)| k.clone());
                if let Some(k) = soonest {
                    self.model_cooldowns.remove(&k);
                }
            }
            let m = self.model_cooldowns.entry(model.to_string()).or_default();
            m.consecutive_failures = m.consecutive_failures.saturating_add(1);
            let d = cooldown(cfg, class, m.consecutive_failures, None);
            m.until_ms = now_ms.saturating_add(d.as_millis() as i64);
            return d;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let d = cooldown(cfg, class, self.consecutive_failures, retry_after);
        self.cooldown_until_ms = Some(now_ms.saturating_add(d.as_millis() as i64));
        d
    }

    /// Clears the cooldowns and the failure streak (`POST /reset`).
    pub fn reset(&mut self) {
        self.cooldown_until_ms = None;
        self.consecutive_failures = 0;
        self.model_cooldowns.clear();
    }
}

/// One failed attempt, as [`UpstreamHealth::record_failure`] needs it.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    pub class: FailureClass,
    /// The model the client asked for.
    pub model: &'a str,
    /// The upstream's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
    /// What went wrong, in words (no provider body, no secret).
    pub error: &'a str,
}

/// The upstreams to try for one request for `model`, best first: those not cooling down
/// (as a whole or for `model`) ordered by priority (lower first), then most recent success,
/// then lowest average latency, then weight. When every eligible upstream is cooling down,
/// only the one whose cooldown ends first is returned, rather than waking them all at once.
pub fn candidates<'a>(
    eligible: &[&'a UpstreamConfig],
    health: &BTreeMap<String, UpstreamHealth>,
    model: &str,
    now_ms: i64,
) -> Vec<&'a UpstreamConfig> {
    let none = UpstreamHealth::default();
    let h = |u: &UpstreamConfig| health.get(&u.name).unwrap_or(&none);
    let mut ready: Vec<&UpstreamConfig> = eligible
        .iter()
        .copied()
        .filter(|u| h(u).cooling_until(model, now_ms).is_none())
        .collect();
    if ready.is_empty() {
        return eligible
            .iter()
            .copied()
            .min_by_key(|u| h(u).cooling_until(model, now_ms).unwrap_or(i64::MIN))
            .into_iter()
            .collect();
    }
    ready.sort_by(|a, b| {
        let (ha, hb) = (h(a), h(b));
        a.priority
            .cmp(&b.priority)
            .then_with(|| hb.last_success_ms.cmp(&ha.last_success_ms))
            .then_with(|| {
                let la = ha.ewma_latency_ms.unwrap_or(0.0);
                let lb = hb.ewma_latency_ms.unwrap_or(0.0);
                la.total_cmp(&lb)
            })
            .then_with(|| b.weight.cmp(&a.weight))
    });
    ready
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(class: FailureClass) -> Failure<'static> {
        Failure {
            class,
            model: "m",
            retry_after: None,
            error: "scripted",
        }
    }

    fn up(name: &str, priority: i32) -> UpstreamConfig {
        toml::from_str::<UpstreamConfig>(&format!(
            "name='{name}'\nkind='openai'\nbase_url='http://x'\npriority={priority}"
        ))
        .unwrap()
    }

    #[test]
    fn overload_cooldown_doubles_and_is_capped() {
        let cfg = CooldownConfig::default();
        let secs: Vec<u64> = (1..=6)
            .map(|n| cooldown(&cfg, FailureClass::Overloaded, n, None).as_secs())
            .collect();
        assert_eq!(secs, vec![60, 120, 240, 480, 900, 900]);
        assert_eq!(
            cooldown(&cfg, FailureClass::ServerError, 5, None).as_secs(),
            10
        );
        assert_eq!(
            cooldown(&cfg, FailureClass::RateLimited, 1, None).as_secs(),
            60
        );
        assert_eq!(
            cooldown(
                &cfg,
                FailureClass::RateLimited,
                1,
                Some(Duration::from_secs(7))
            )
            .as_secs(),
            7
        );
    }

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        assert_eq!(parse_retry_after("3", 0), Some(Duration::from_secs(3)));
        let now = 1_700_000_000_000;
        let at = std::time::UNIX_EPOCH + Duration::from_millis(now as u64 + 5_000);
        let d = parse_retry_after(&httpdate::fmt_http_date(at), now).unwrap();
        assert_eq!(d.as_secs(), 5);
        assert_eq!(parse_retry_after("soon", 0), None);
    }

    #[test]
    fn order_is_priority_then_success_then_latency_and_skips_cooling() {
        let (a, b, c) = (up("a", 1), up("b", 0), up("c", 0));
        let mut h = BTreeMap::new();
        let cfg = CooldownConfig::default();
        h.entry("b".to_string())
            .or_insert_with(UpstreamHealth::default)
            .record_success("m", Duration::from_millis(50), 10);
        h.entry("c".to_string())
            .or_insert_with(UpstreamHealth::default)
            .record_success("m", Duration::from_millis(5), 20);
        let all = [&a, &b, &c];
        let names = |v: Vec<&UpstreamConfig>| v.iter().map(|u| u.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(candidates(&all, &h, "m", 100)), ["c", "b", "a"]);
        h.get_mut("c")
            .unwrap()
            .record_failure(fail(FailureClass::ServerError), &cfg, 100);
        assert_eq!(names(candidates(&all, &h, "m", 200)), ["b", "a"]);
        // All cooling: only the one whose cooldown ends first.
        h.get_mut("b")
            .unwrap()
            .record_failure(fail(FailureClass::Overloaded), &cfg, 100);
        h.entry("a".to_string())
            .or_insert_with(UpstreamHealth::default)
            .record_failure(fail(FailureClass::RateLimited), &cfg, 100);
        assert_eq!(names(candidates(&all, &h, "m", 200)), ["c"]);
        // After the cooldown ends, the upstream is back.
        assert!(names(candidates(&all, &h, "m", 100 + 10_001)).contains(&"c".to_string()));
    }

    #[test]
    fn refused_credentials_cool_down_long_and_flat() {
        let cfg = CooldownConfig::default();
        assert_eq!(FailureClass::of_status(401), Some(FailureClass::Auth));
        assert_eq!(FailureClass::of_status(403), Some(FailureClass::Auth));
        assert_eq!(FailureClass::of_status(404), Some(FailureClass::NotFound));
        for s in [400, 413, 422] {
            assert_eq!(FailureClass::of_status(s), None, "{s} is the client's");
        }
        let mins: Vec<u64> = (1..=3)
            .map(|n| cooldown(&cfg, FailureClass::Auth, n, None).as_secs() / 60)
            .collect();
        assert_eq!(mins, vec![10, 10, 10]);
        let capped = CooldownConfig {
            max: kennel_proto::Span::from_millis(1_000),
            ..CooldownConfig::default()
        };
        assert_eq!(
            cooldown(&capped, FailureClass::Auth, 1, None),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn a_404_cools_down_only_that_model_and_doubles() {
        let cfg = CooldownConfig::default();
        let a = up("a", 0);
        let b = up("b", 1);
        let all = [&a, &b];
        let names = |v: Vec<&UpstreamConfig>| v.iter().map(|u| u.name.clone()).collect::<Vec<_>>();
        let mut h = BTreeMap::new();
        let ha = h
            .entry("a".to_string())
            .or_insert_with(UpstreamHealth::default);
        let not_found = Failure {
            model: "gone",
            ..fail(FailureClass::NotFound)
        };
        assert_eq!(ha.record_failure(not_found, &cfg, 0).as_secs(), 60);
        // Tried again once the cooldown ended, and still missing: twice as long.
        assert_eq!(ha.record_failure(not_found, &cfg, 60_001).as_secs(), 120);
        assert!(!ha.cooling(1), "the upstream itself is fine");
        assert_eq!(ha.consecutive_failures, 0);
        assert_eq!(ha.last_failure_class, Some(FailureClass::NotFound));
        assert_eq!(names(candidates(&all, &h, "gone", 1)), ["b"]);
        assert_eq!(names(candidates(&all, &h, "other", 1)), ["a", "b"]);
        // An answer for the model ends its cooldown.
        if let Some(ha) = h.get_mut("a") {
            ha.record_success("gone", Duration::from_millis(1), 2);
        }
        assert_eq!(names(candidates(&all, &h, "gone", 3)), ["a", "b"]);
    }

    #[test]
    fn model_cooldowns_are_bounded() {
        let cfg = CooldownConfig::default();
        let mut h = UpstreamHealth::default();
        for i in 0..(MAX_MODEL_COOLDOWNS + 10) {
            let model = format!("m{i}");
            let f = Failure {
                model: &model,
                ..fail(FailureClass::NotFound)
            };
            h.record_failure(f, &cfg, i as i64);
        }
        assert_eq!(h.model_cooldowns.len(), MAX_MODEL_COOLDOWNS);
        assert!(h
            .model_cooldowns
            .contains_key(&format!("m{}", MAX_MODEL_COOLDOWNS + 9)));
        assert!(
            !h.model_cooldowns.contains_key("m0"),
            "the soonest to end goes first"
        );
    }

    #[test]
    fn health_stored_by_an_older_kennel_still_loads() {
        let h: UpstreamHealth =
            serde_json::from_str(r#"{"consecutiveFailures":2,"requests":5,"failures":2}"#).unwrap();
        assert_eq!(h.requests, 5);
        assert!(h.model_cooldowns.is_empty());
    }
}
