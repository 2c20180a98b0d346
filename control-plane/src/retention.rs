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
        remove_orphan_artifacts(&hive).await;
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

/// Removes the artefact directories of builds that are gone (purged above, or never stored).
async fn remove_orphan_artifacts(hive: &Hive) {
    let files = hive.artifacts.clone();
    let dirs = tokio::task::spawn_blocking(move || files.build_dirs(10_000))
        .await
        .unwrap_or_default();
    if dirs.is_empty() {
        return;
    }
    let existing = match hive.store.existing_builds(&dirs).await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "retention: listing builds with artifacts failed");
            return;
        }
    };
    let gone: Vec<String> = dirs.into_iter().filter(|d| !existing.contains(d)).collect();
    if gone.is_empty() {
        return;
    }
    let files = hive.artifacts.clone();
    let n = gone.len();
    let _ = tokio::task::spawn_blocking(move || {
        for id in gone {
            if let Err(e) = files.remove_build(&id) {
                tracing::warn!(build_id = %id, error = %hive_sys::error_chain(&e), "retention: removing artifacts failed");
            }
        }
    })
    .await;
    tracing::info!(
        builds = n,
        "retention: removed the artifacts of purged builds"
    );
}
