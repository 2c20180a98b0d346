//! Token-bucket rate limiting for device I/O (block, net) and the serial console.
//!
//! A [`RateLimiter`] holds up to two buckets: bandwidth (bytes) and operations. An I/O is allowed
//! only if both buckets can pay for it; otherwise nothing is taken and the device parks the request
//! until [`RateLimiter::wait`] says tokens are back. Time is passed in so tests need no sleeping.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Configuration of one bucket: `size` tokens, refilled from empty to full in `refill_time_ms`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    /// Capacity in tokens (bytes or operations); also the burst.
    pub size: u64,
    /// Time to refill an empty bucket, in milliseconds.
    pub refill_time_ms: u64,
}

/// Configuration of a limiter: either bucket may be absent (unlimited).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Bytes.
    #[serde(default)]
    pub bandwidth: Option<BucketConfig>,
    /// Operations (requests or frames).
    #[serde(default)]
    pub ops: Option<BucketConfig>,
}

/// What is wrong with a rate-limit configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A bucket of zero tokens would block forever.
    #[error("rate limit {0} bucket: size must be > 0")]
    ZeroSize(&'static str),
    /// A zero refill time would mean an unlimited bucket; leave the bucket out instead.
    #[error("rate limit {0} bucket: refill_time_ms must be > 0")]
    ZeroRefill(&'static str),
}

impl RateLimitConfig {
    /// Checks both buckets.
    pub fn validate(&self) -> Result<(), Error> {
        for (name, bucket) in [("bandwidth", self.bandwidth), ("ops", self.ops)] {
            if let Some(b) = bucket {
                if b.size == 0 {
                    return Err(Error::ZeroSize(name));
                }
                if b.refill_time_ms == 0 {
                    return Err(Error::ZeroRefill(name));
                }
            }
        }
        Ok(())
    }
}

/// One token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    refill: Duration,
    tokens: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `size` tokens that refills completely in `refill`.
    pub fn new(size: u64, refill: Duration, now: Instant) -> Self {
        Self {
            size,
            refill,
            tokens: size,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        let refill_ns = self.refill.as_nanos().max(1);
        let added = elapsed * u128::from(self.size) / refill_ns;
        if added == 0 {
            return;
        }
        let added = u64::try_from(added).unwrap_or(u64::MAX);
        self.tokens = self.tokens.saturating_add(added).min(self.size);
        if self.tokens == self.size {
            self.last = now;
        } else {
            // Advance only by the time those tokens cost, so fractions are not lost.
            let used_ns = u128::from(added) * refill_ns / u128::from(self.size);
            self.last += Duration::from_nanos(u64::try_from(used_ns).unwrap_or(u64::MAX));
        }
    }

    /// Whether `n` tokens are available now (after refill). A request larger than the whole
    /// bucket is allowed once the bucket is full, so oversized I/O slows down instead of hanging.
    fn can_pay(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= n.min(self.size)
    }

    fn pay(&mut self, n: u64) {
        self.tokens = self.tokens.saturating_sub(n.min(self.size));
    }

    /// Time until `n` tokens will be available.
    fn wait(&self, n: u64, now: Instant) -> Duration {
        let need = n.min(self.size).saturating_sub(self.tokens);
        if need == 0 {
            return Duration::ZERO;
        }
        let ns = u128::from(need) * self.refill.as_nanos() / u128::from(self.size);
        let since = now.saturating_duration_since(self.last);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)).saturating_sub(since)
    }

    /// Tokens currently in the bucket (without refilling).
    pub fn tokens(&self) -> u64 {
        self.tokens
    }
}

/// Bandwidth and ops buckets paid together.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    /// Bytes of the request that was refused last, so `wait` knows what to wait for.
    blocked_on: Option<u64>,
}

impl RateLimiter {
    /// A limiter from (validated) configuration; `None` buckets are unlimited.
    pub fn new(cfg: &RateLimitConfig, now: Instant) -> Self {
        let bucket = |b: &BucketConfig| {
            TokenBucket::new(b.size, Duration::from_millis(b.refill_time_ms), now)
        };
        Self {
            bandwidth: cfg.bandwidth.as_ref().map(bucket),
            ops: cfg.ops.as_ref().map(bucket),
            blocked_on: None,
        }
    }

    /// A limiter that allows everything.
    pub fn unlimited() -> Self {
        Self::default()
    }

    /// Pays for one operation of `bytes` if both buckets allow it; otherwise takes nothing.
    pub fn consume(&mut self, bytes: u64, now: Instant) -> bool {
        let bw_ok = self
            .bandwidth
            .as_mut()
            .is_none_or(|b| b.can_pay(bytes, now));
        let ops_ok = self.ops.as_mut().is_none_or(|b| b.can_pay(1, now));
        if bw_ok && ops_ok {
            if let Some(b) = self.bandwidth.as_mut() {
                b.pay(bytes);
            }
            if let Some(b) = self.ops.as_mut() {
                b.pay(1);
            }
            self.blocked_on = None;
            true
        } else {
            self.blocked_on = Some(bytes);
            false
        }
    }

    /// `None` if nothing is blocked; else how long until the refused operation would pass.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        let bytes = self.blocked_on?;
        let bw = self
            .bandwidth
            .as_ref()
            .map_or(Duration::ZERO, |b| b.wait(bytes, now));
        let ops = self.ops.as_ref().map_or(Duration::ZERO, |b| b.wait(1, now));
        Some(bw.max(ops).max(Duration::from_millis(1)))
    }

    /// Whether an operation was refused and is waiting for tokens.
    pub fn is_blocked(&self) -> bool {
        self.blocked_on.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(bw: Option<(u64, u64)>, ops: Option<(u64, u64)>) -> RateLimitConfig {
        RateLimitConfig {
            bandwidth: bw.map(|(size, refill_time_ms)| BucketConfig {
                size,
                refill_time_ms,
            }),
            ops: ops.map(|(size, refill_time_ms)| BucketConfig {
                size,
                refill_time_ms,
            }),
        }
    }

    #[test]
    fn bandwidth_bucket_refills_at_configured_rate() {
        let t0 = Instant::now();
        // 1000 bytes per 100 ms.
        let mut rl = RateLimiter::new(&cfg(Some((1000, 100)), None), t0);
        assert!(rl.consume(600, t0));
        assert!(!rl.consume(600, t0), "only 400 tokens left");
        let wait = rl.wait(t0).expect("blocked");
        assert!(
            wait >= Duration::from_millis(19) && wait <= Duration::from_millis(21),
            "{wait:?}"
        );
        assert!(!rl.consume(600, t0 + Duration::from_millis(10)));
        assert!(rl.consume(600, t0 + Duration::from_millis(20)));
        assert!(rl.wait(t0 + Duration::from_millis(20)).is_none());
    }

    #[test]
    fn ops_and_bandwidth_are_paid_together_or_not_at_all() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(&cfg(Some((1000, 1000)), Some((2, 1000))), t0);
        assert!(rl.consume(100, t0));
        assert!(rl.consume(100, t0));
        // ops exhausted: the bandwidth bucket must not be charged for the refused op
        assert!(!rl.consume(100, t0));
        assert_eq!(rl.bandwidth.as_ref().map(TokenBucket::tokens), Some(800));
        assert!(rl.consume(100, t0 + Duration::from_millis(500)));
    }

    #[test]
    fn oversized_request_passes_when_bucket_is_full() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(&cfg(Some((100, 10)), None), t0);
        assert!(rl.consume(10_000, t0));
        assert!(!rl.consume(1, t0));
        assert!(rl.consume(10_000, t0 + Duration::from_millis(10)));
    }

    #[test]
    fn unlimited_never_blocks() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::unlimited();
        for _ in 0..1000 {
            assert!(rl.consume(1 << 30, t0));
        }
        assert!(!rl.is_blocked());
    }

    #[test]
    fn validate_rejects_zero_buckets() {
        assert_eq!(
            cfg(Some((0, 10)), None).validate(),
            Err(Error::ZeroSize("bandwidth"))
        );
        assert_eq!(
            cfg(None, Some((5, 0))).validate(),
            Err(Error::ZeroRefill("ops"))
        );
        assert_eq!(cfg(Some((5, 5)), Some((5, 5))).validate(), Ok(()));
    }
}
