//! Per-key request rate limits: a token bucket per API key id, `per_minute` tokens a minute up
//! to `burst` saved. Keys are the ids of a kennel store's API keys, so the map stays as small as
//! the set of keys that call the gateway.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One key's bucket: tokens left as of `at`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
pub struct KeyedLimiter {
    /// Tokens added per second.
    rate: f64,
    /// Most tokens a bucket holds.
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl KeyedLimiter {
    /// `None` when either number is 0 (no limit).
    pub fn new(per_minute: u32, burst: u32) -> Option<KeyedLimiter> {
        (per_minute > 0 && burst > 0).then(|| KeyedLimiter {
            rate: f64::from(per_minute) / 60.0,
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a token for `key` at `now`; when there is none, how long until there is.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        // A poisoned lock only means a panic elsewhere mid-update; the map is still usable.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        // A key seen before is found without allocating its name again.
        if !buckets.contains_key(key) {
            buckets.insert(
                key.to_string(),
                Bucket {
                    tokens: self.burst,
                    at: now,
                },
            );
        }
        let Some(bucket) = buckets.get_mut(key) else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_key() {
        assert!(KeyedLimiter::new(0, 5).is_none());
        assert!(KeyedLimiter::new(60, 0).is_none());
        // One a second, three saved.
        let l = KeyedLimiter::new(60, 3).unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.check("a", t0), Ok(()));
        }
        let wait = l.check("a", t0).unwrap_err();
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}");
        // Another key has its own bucket.
        assert_eq!(l.check("b", t0), Ok(()));
        // Half a second later half a token is there: wait the other half.
        let wait = l.check("a", t0 + Duration::from_millis(500)).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert_eq!(l.check("a", t0 + Duration::from_secs(1)), Ok(()));
        // A long pause refills to the burst, no more.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(l.check("a", later), Ok(()));
        }
        assert!(l.check("a", later).is_err());
    }
}
