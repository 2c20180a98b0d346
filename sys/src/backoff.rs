//! Jittered exponential backoff: how long to wait before the next reconnect, retry or poll.
//!
//! Each pause doubles up to a cap; the pause actually taken is drawn uniformly from the upper
//! half of it (`[d/2, d]`), so many boxes or connectors that lost the same control plane at
//! the same moment do not all come back in the same millisecond, while no pause exceeds the
//! cap and none is shorter than half the un-jittered one.

use std::time::Duration;

use rand::Rng;

/// A doubling pause from `first` up to `max`, jittered.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `first`, doubles after each [`Backoff::next_delay`], never above `max`.
    pub const fn new(first: Duration, max: Duration) -> Self {
        let first = if first.as_nanos() > max.as_nanos() {
            max
        } else {
            first
        };
        Self {
            first,
            max,
            next: first,
        }
    }

    /// The pause to take now (jittered); the one after it is twice as long (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        jitter(d)
    }

    /// Back to the first pause (after a success).
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// The pause after `failures` failures in a row, for a counter kept elsewhere: none after
    /// none, `first` after one, doubling from there up to the cap; jittered.
    pub fn after_failures(&self, failures: u32) -> Duration {
        let Some(doublings) = failures.checked_sub(1) else {
            return Duration::ZERO;
        };
        let factor = 1u32.checked_shl(doublings.min(31)).unwrap_or(u32::MAX);
        jitter(self.first.saturating_mul(factor).min(self.max))
    }
}

/// Uniform in `[d/2, d]`.
fn jitter(d: Duration) -> Duration {
    if d.is_zero() {
        return d;
    }
    let half = d / 2;
    half + (d - half).mul_f64(rand::thread_rng().gen::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doubles_up_to_the_cap_within_jitter() {
        let mut b = Backoff::new(ms(100), ms(1000));
        for want in [100, 200, 400, 800, 1000, 1000] {
            let d = b.next_delay();
            assert!(d >= ms(want) / 2 && d <= ms(want), "{d:?} for {want} ms");
        }
        b.reset();
        assert!(b.next_delay() <= ms(100));
    }

    #[test]
    fn after_failures_matches_the_sequence() {
        let b = Backoff::new(ms(100), ms(5000));
        assert_eq!(b.after_failures(0), Duration::ZERO);
        for (n, want) in [(1, 100), (2, 200), (3, 400), (7, 5000), (1000, 5000)] {
            let d = b.after_failures(n);
            assert!(d >= ms(want) / 2 && d <= ms(want), "{d:?} after {n}");
        }
    }

    #[test]
    fn jitter_spreads() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            seen.insert(Backoff::new(ms(1000), ms(1000)).next_delay());
        }
        assert!(seen.len() > 1, "no jitter: {seen:?}");
    }
}
