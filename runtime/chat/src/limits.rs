//! Rate limits: token buckets, keyed (per visitor, per IP address), with
//! time passed in. A bucket holds `burst` tokens and gains `rate` a
//! second; a message takes one. Written here rather than taken from a
//! crate: it is twenty lines, and the keyed map needs pruning the chat
//! hub controls (idle, full buckets are dropped when the map grows).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by key.
#[derive(Debug)]
pub struct Limiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<String, Bucket>,
}

/// Buckets kept before idle ones are pruned.
pub(crate) const PRUNE_AT: usize = 50_000;

impl Limiter {
    /// `rate` tokens a second, at most `burst` at once.
    pub fn new(rate: f64, burst: u32) -> Limiter {
        Limiter {
            rate: rate.max(0.001),
            burst: f64::from(burst.max(1)),
            buckets: HashMap::new(),
        }
    }

    /// Buckets held.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Takes a token for `key` at `now`: `Ok` or `Err(how long until one
    /// is there)`.
    pub fn take(&mut self, key: &str, now: Instant) -> Result<(), Duration> {
        if self.buckets.len() >= PRUNE_AT && !self.buckets.contains_key(key) {
            let (rate, burst) = (self.rate, self.burst);
            self.buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
            // Still full of busy keys (a flood of new ones): a new key
            // waits, the table stays bounded.
            if self.buckets.len() >= PRUNE_AT {
                return Err(Duration::from_secs_f64(1.0 / rate));
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        let b = self.buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let mut l = Limiter::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.take("v", t0).is_ok());
        }
        let wait = l.take("v", t0).unwrap_err();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500));
        // Another key has its own bucket.
        assert!(l.take("w", t0).is_ok());
        // Half a second later, one more.
        assert!(l.take("v", t0 + Duration::from_millis(500)).is_ok());
        assert!(l.take("v", t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn a_flood_of_new_keys_stays_within_the_bound() {
        let mut l = Limiter::new(0.01, 2);
        let t0 = Instant::now();
        for i in 0..PRUNE_AT {
            assert!(l.take(&format!("k{i}"), t0).is_ok());
        }
        // All busy: a new key waits, a known one is served.
        assert!(l.take("new", t0).is_err());
        assert!(l.take("k1", t0).is_ok());
        assert_eq!(l.len(), PRUNE_AT);
        // Once they are idle again, they make room.
        let later = t0 + Duration::from_secs(1000);
        assert!(l.take("new", later).is_ok());
        assert_eq!(l.len(), 1);
    }
}
