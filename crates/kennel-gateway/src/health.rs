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

/// Why an attempt at an upstream failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// Connection refused or reset, DNS, TLS: nothing reached the upstream.
    Network,
    /// No headers or no first byte within `first_byte_timeout_ms` (or the total deadline).
    Timeout,
    /// 429.
    RateLimited,
    /// 503 or 504.
    Overloaded,
    /// Any other 5xx.
    ServerError,
    /// A stream that stalled or broke after its first byte reached the client.
    StreamBroken,
}

impl FailureClass {
    pub const ALL: [FailureClass; 6] = [
        FailureClass::Network,
        FailureClass::Timeout,
        FailureClass::RateLimited,
        FailureClass::Overloaded,
        FailureClass::ServerError,
        FailureClass::StreamBroken,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Network => "network",
            FailureClass::Timeout => "timeout",
            FailureClass::RateLimited => "rate_limited",
            FailureClass::Overloaded => "overloaded",
            FailureClass::ServerError => "server_error",
            FailureClass::StreamBroken => "stream_broken",
        }
    }

    /// The class of an upstream status that is a failure; `None` for success and for 4xx
    /// other than 429, which are the client's to see.
    pub fn of_status(status: u16) -> Option<FailureClass> {
        match status {
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
            .unwrap_or(cfg.rate_limit_ms),
        FailureClass::Overloaded => exp(cfg.overload_base_ms),
        FailureClass::Network | FailureClass::Timeout | FailureClass::StreamBroken => {
            exp(cfg.network_base_ms)
        }
        FailureClass::ServerError => cfg.server_error_ms,
    };
    Duration::from_millis(ms.min(cfg.max_ms))
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

/// What is known about one upstream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamHealth {
    /// Unix ms of the last failure.
    pub last_failure_ms: Option<i64>,
    pub last_failure_class: Option<FailureClass>,
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
}

impl UpstreamHealth {
    pub fn cooling(&self, now_ms: i64) -> bool {
        self.cooldown_until_ms.is_some_and(|t| t > now_ms)
    }

    pub fn record_success(&mut self, latency: Duration, now_ms: i64) {
        let ms = latency.as_secs_f64() * 1000.0;
        self.ewma_latency_ms = Some(match self.ewma_latency_ms {
            Some(prev) => EWMA_ALPHA * ms + (1.0 - EWMA_ALPHA) * prev,
            None => ms,
        });
        self.last_success_ms = Some(now_ms);
        self.consecutive_failures = 0;
        self.cooldown_until_ms = None;
    }

    /// Records a failure and returns the cooldown it started.
    pub fn record_failure(
        &mut self,
        cfg: &CooldownConfig,
        class: FailureClass,
        retry_after: Option<Duration>,
        now_ms: i64,
    ) -> Duration {
        self.failures += 1;
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.last_failure_ms = Some(now_ms);
        self.last_failure_class = Some(class);
        let d = cooldown(cfg, class, self.consecutive_failures, retry_after);
        self.cooldown_until_ms = Some(now_ms.saturating_add(d.as_millis() as i64));
        d
    }

    /// Clears the cooldown and the failure streak (`POST /reset`).
    pub fn reset(&mut self) {
        self.cooldown_until_ms = None;
        self.consecutive_failures = 0;
    }
}

/// The upstreams to try for one request, best first: those not cooling down ordered by
/// priority (lower first), then most recent success, then lowest average latency, then
/// weight. When every eligible upstream is cooling down, only the one whose cooldown ends
/// first is returned, rather than waking them all at once.
pub fn candidates<'a>(
    eligible: &[&'a UpstreamConfig],
    health: &BTreeMap<String, UpstreamHealth>,
    now_ms: i64,
) -> Vec<&'a UpstreamConfig> {
    let none = UpstreamHealth::default();
    let h = |u: &UpstreamConfig| health.get(&u.name).unwrap_or(&none).clone();
    let mut ready: Vec<&UpstreamConfig> = eligible
        .iter()
        .copied()
        .filter(|u| !h(u).cooling(now_ms))
        .collect();
    if ready.is_empty() {
        return eligible
            .iter()
            .copied()
            .min_by_key(|u| h(u).cooldown_until_ms.unwrap_or(i64::MIN))
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
            .record_success(Duration::from_millis(50), 10);
        h.entry("c".to_string())
            .or_insert_with(UpstreamHealth::default)
            .record_success(Duration::from_millis(5), 20);
        let all = [&a, &b, &c];
        let names = |v: Vec<&UpstreamConfig>| v.iter().map(|u| u.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(candidates(&all, &h, 100)), ["c", "b", "a"]);
        h.get_mut("c")
            .unwrap()
            .record_failure(&cfg, FailureClass::ServerError, None, 100);
        assert_eq!(names(candidates(&all, &h, 200)), ["b", "a"]);
        // All cooling: only the one whose cooldown ends first.
        h.get_mut("b")
            .unwrap()
            .record_failure(&cfg, FailureClass::Overloaded, None, 100);
        h.entry("a".to_string())
            .or_insert_with(UpstreamHealth::default)
            .record_failure(&cfg, FailureClass::RateLimited, None, 100);
        assert_eq!(names(candidates(&all, &h, 200)), ["c"]);
        // After the cooldown ends, the upstream is back.
        assert!(names(candidates(&all, &h, 100 + 10_001)).contains(&"c".to_string()));
    }
}
