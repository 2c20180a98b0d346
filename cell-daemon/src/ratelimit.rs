//! The daemon's own log, rate limited: whatever a build does must not flood the box's (or the
//! VM console's) log. Each tracing event is one `write`; a token bucket decides whether it goes
//! to stderr, and the next line that does go says how many were dropped.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    per_sec: f64,
    burst: f64,
    last: Instant,
    dropped: u64,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.dropped += 1;
            false
        }
    }
}

/// A `MakeWriter` for tracing-subscriber that drops lines past `per_sec` (burst `burst`).
#[derive(Debug, Clone)]
pub struct LimitedStderr {
    bucket: Arc<Mutex<Bucket>>,
}

impl LimitedStderr {
    pub fn new(per_sec: u32, burst: u32) -> Self {
        LimitedStderr {
            bucket: Arc::new(Mutex::new(Bucket {
                tokens: f64::from(burst),
                per_sec: f64::from(per_sec),
                burst: f64::from(burst.max(1)),
                last: Instant::now(),
                dropped: 0,
            })),
        }
    }
}

/// One event's writer.
#[derive(Debug)]
pub struct LimitedWriter {
    bucket: Arc<Mutex<Bucket>>,
}

impl Write for LimitedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        if b.take(Instant::now()) {
            let mut err = std::io::stderr().lock();
            if b.dropped > 0 {
                let _ = writeln!(
                    err,
                    "hive-cell: {} log lines dropped (rate limit)",
                    b.dropped
                );
                b.dropped = 0;
            }
            err.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LimitedStderr {
    type Writer = LimitedWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LimitedWriter {
            bucket: self.bucket.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = Bucket {
            tokens: 3.0,
            per_sec: 10.0,
            burst: 3.0,
            last: t0,
            dropped: 0,
        };
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        assert_eq!(b.dropped, 1);
        assert!(b.take(t0 + Duration::from_millis(100)));
        assert!(!b.take(t0 + Duration::from_millis(100)));
        // Refill is capped at the burst.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| b.take(later)));
        assert!(!b.take(later));
    }
}
