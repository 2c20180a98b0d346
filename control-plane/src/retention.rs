//! The retention task: every `every`, deletes what ended more than `keep` ago (see
//! `store::Store::purge_before`), so logs, builds and deliveries do not grow without bound.

use std::sync::Arc;
use std::time::Duration;

use crate::state::{millis, Hive};
use crate::store::now_ms;

/// Builds purged per transaction.
const BATCH: u32 = 500;

/// Runs until shutdown; the first purge right away.
pub async fn run(hive: Arc<Hive>, keep: Duration, every: Duration) {
    let mut shutdown = hive.shutdown.clone();
    loop {
        let cutoff = now_ms().saturating_sub(millis(keep));
        match hive.store.purge_before(cutoff, BATCH).await {
            Ok(p) => {
                hive.metrics.purged(p.builds, p.log_chunks, p.deliveries);
                if p.builds > 0 || p.deliveries > 0 {
                    tracing::info!(
                        builds = p.builds,
                        log_chunks = p.log_chunks,
                        deliveries = p.deliveries,
                        keep_days = keep.as_secs() / 86_400,
                        "retention: purged what ended before the cutoff"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "retention purge failed; retrying later"),
        }
        match hive.store.purge_credentials_before(cutoff).await {
            Ok(p) if p.join_tokens > 0 || p.box_certs > 0 => tracing::info!(
                join_tokens = p.join_tokens,
                box_certs = p.box_certs,
                "retention: purged expired or used join tokens and expired or revoked box \
                 certificates"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "retention purge of credentials failed; retrying later")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = crate::events::stopped(&mut shutdown) => return,
        }
    }
}
