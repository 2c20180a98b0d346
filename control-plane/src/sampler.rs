//! The sampler task: every `every`, counts the queued builds and records the count in the
//! metrics' recent history (`metrics::Metrics::queue_sampled`), which the dashboard's fleet page
//! charts. Placements record their own wait as they happen (`domain::place`).

use std::sync::Arc;
use std::time::Duration;

use crate::state::Hive;
use crate::store::now_ms;

/// How often the queue is counted.
pub const EVERY: Duration = Duration::from_secs(10);

/// Runs until shutdown; the first sample right away.
pub async fn run(hive: Arc<Hive>, every: Duration) {
    let mut shutdown = hive.shutdown.clone();
    loop {
        match hive.store.count_builds_by_state().await {
            Ok(counts) => {
                let queued = counts.get("queued").copied().unwrap_or(0);
                hive.metrics.queue_sampled(now_ms(), queued);
            }
            Err(e) => tracing::debug!(error = %e, "queue sample failed; next time"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = crate::events::stopped(&mut shutdown) => return,
        }
    }
}
