//! Counters and the added-latency histogram behind `GET /metrics`, rendered in the
//! Prometheus text format. Kept local (not the process-wide `metrics` recorder) so that a
//! gateway embedded next to the coordinator reports only its own numbers.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::health::{FailureClass, UpstreamHealth};

/// Upper bounds of the added-latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

#[derive(Default)]
struct Inner {
    requests: BTreeMap<&'static str, u64>,
    failures: BTreeMap<(String, &'static str), u64>,
    failovers: u64,
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// The gateway's metrics.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A client request in `format` (`openai`, `anthropic`).
    pub fn request(&self, format: &'static str) {
        *self.lock().requests.entry(format).or_default() += 1;
    }

    pub fn failure(&self, upstream: &str, class: FailureClass) {
        *self
            .lock()
            .failures
            .entry((upstream.to_string(), class.as_str()))
            .or_default() += 1;
    }

    pub fn failover(&self) {
        self.lock().failovers += 1;
    }

    /// Time the gateway added on top of the upstream's own time.
    pub fn added_latency(&self, d: Duration) {
        let s = d.as_secs_f64();
        let mut m = self.lock();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                m.buckets[i] += 1;
            }
        }
        m.count += 1;
        m.sum += s;
    }

    /// The Prometheus text for these metrics plus per-upstream health and `takeovers`.
    pub fn render(
        &self,
        health: &BTreeMap<String, UpstreamHealth>,
        takeovers: u64,
        now_ms: i64,
    ) -> String {
        let m = self.lock();
        let mut out = String::new();
        let _ = writeln!(out, "# TYPE kennel_gateway_requests_total counter");
        for (f, n) in &m.requests {
            let _ = writeln!(out, "kennel_gateway_requests_total{{format=\"{f}\"}} {n}");
        }
        let _ = writeln!(out, "# TYPE kennel_gateway_failures_total counter");
        for ((u, c), n) in &m.failures {
            let _ = writeln!(
                out,
                "kennel_gateway_failures_total{{upstream=\"{u}\",class=\"{c}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# TYPE kennel_gateway_failovers_total counter");
        let _ = writeln!(out, "kennel_gateway_failovers_total {}", m.failovers);
        let _ = writeln!(out, "# TYPE kennel_gateway_takeovers_total counter");
        let _ = writeln!(out, "kennel_gateway_takeovers_total {takeovers}");
        let _ = writeln!(out, "# TYPE kennel_gateway_added_latency_seconds histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "kennel_gateway_added_latency_seconds_bucket{{le=\"{b}\"}} {}",
                m.buckets[i]
            );
        }
        let _ = writeln!(
            out,
            "kennel_gateway_added_latency_seconds_bucket{{le=\"+Inf\"}} {}",
            m.count
        );
        let _ = writeln!(out, "kennel_gateway_added_latency_seconds_sum {}", m.sum);
        let _ = writeln!(
            out,
            "kennel_gateway_added_latency_seconds_count {}",
            m.count
        );
        let _ = writeln!(out, "# TYPE kennel_gateway_upstream_cooling gauge");
        for (u, h) in health {
            let _ = writeln!(
                out,
                "kennel_gateway_upstream_cooling{{upstream=\"{u}\"}} {}",
                u8::from(h.cooling(now_ms))
            );
        }
        let _ = writeln!(
            out,
            "# TYPE kennel_gateway_upstream_consecutive_failures gauge"
        );
        for (u, h) in health {
            let _ = writeln!(
                out,
                "kennel_gateway_upstream_consecutive_failures{{upstream=\"{u}\"}} {}",
                h.consecutive_failures
            );
        }
        let _ = writeln!(out, "# TYPE kennel_gateway_upstream_latency_ewma_ms gauge");
        for (u, h) in health {
            if let Some(l) = h.ewma_latency_ms {
                let _ = writeln!(
                    out,
                    "kennel_gateway_upstream_latency_ewma_ms{{upstream=\"{u}\"}} {l}"
                );
            }
        }
        let _ = writeln!(out, "# TYPE kennel_gateway_upstream_requests_total counter");
        for (u, h) in health {
            let _ = writeln!(
                out,
                "kennel_gateway_upstream_requests_total{{upstream=\"{u}\"}} {}",
                h.requests
            );
        }
        out
    }
}
