//! The scheduler: one task, woken by new builds, box changes and a tick. Each pass it
//! 1. re-queues builds whose lease ran out (attempt + 1) and tells the box to stop them,
//! 2. ends running builds past their timeout as `timed_out` and tells the box,
//! 3. takes sessions of silent boxes offline and lets drained boxes leave,
//! 4. places queued builds, oldest first (`domain::place`): on a box with a warm cell of the
//!    build's size class (the most warm cells under `spread`, the fewest under `binpack`), else on
//!    a box with room to boot one, else the build waits. Order is kept per size class. (A
//!    webhook's build, when a cell is free and none of its class is queued, was placed by its
//!    webhook's own transaction already: `domain::place::choose_at_once`.)
//!
//! The loop and the sweeps are this module's; what a placement or an end writes and announces is
//! the domain's, shared with the API and the box sessions.

use std::sync::Arc;
use std::time::Duration;

use hive_proto::v1::BuildState;

use crate::domain::end::end_build;
use crate::domain::place::{place_round, send_assignments};
use crate::registry::boxes::LEFT;
use crate::state::{millis, Hive};
use crate::store::{now_ms, Requeued, StoreError};

/// What one pass did (tests and benchmarks read it).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassStats {
    pub placed: usize,
    pub requeued: usize,
    pub timed_out: usize,
}

/// Runs passes until shutdown.
pub async fn run(hive: Arc<Hive>, tick: Duration) {
    let mut shutdown = hive.shutdown.clone();
    // Lease and timeout sweeps run at most once a tick; wake-ups (a new build, a heartbeat)
    // only place. Under a webhook burst that keeps the database for the webhooks.
    let mut last_sweep: Option<std::time::Instant> = None;
    loop {
        let sweep = last_sweep.is_none_or(|t| t.elapsed() >= tick);
        if sweep {
            last_sweep = Some(std::time::Instant::now());
        }
        match run_pass(&hive, sweep).await {
            Ok(stats) if stats != PassStats::default() => {
                tracing::debug!(?stats, "scheduler pass");
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "scheduler pass failed; retrying next tick"),
        }
        tokio::select! {
            _ = hive.wake.notified() => {}
            _ = tokio::time::sleep(tick) => {}
            _ = crate::events::stopped(&mut shutdown) => break,
        }
    }
    tracing::info!("scheduler stopped");
}

/// One full scheduling pass (sweeps and placement).
pub async fn pass(hive: &Hive) -> Result<PassStats, StoreError> {
    run_pass(hive, true).await
}

async fn run_pass(hive: &Hive, sweep: bool) -> Result<PassStats, StoreError> {
    let mut stats = PassStats::default();
    if sweep {
        sweep_leases_and_boxes(hive, &mut stats).await?;
    }
    // Each round's assignments are sent while the next round reads and commits (one task:
    // the sends run while the next round waits on the database). A failed round returns only
    // once the last round's assignments are sent.
    let mut batch = None;
    let mut unsent = None;
    loop {
        let (round, ()) = tokio::join!(place_round(hive, batch.take()), async {
            if let Some(a) = unsent.take() {
                send_assignments(hive, a).await;
            }
        });
        let round = round?;
        stats.placed += round.placed;
        unsent = Some(round.assignments);
        match round.next {
            Some(next) if round.placed > 0 => batch = Some(next),
            _ => break,
        }
    }
    if let Some(a) = unsent {
        send_assignments(hive, a).await;
    }
    Ok(stats)
}

/// Expired leases, overdue builds, silent and drained boxes.
async fn sweep_leases_and_boxes(hive: &Hive, stats: &mut PassStats) -> Result<(), StoreError> {
    let now = now_ms();

    for lease in hive.store.expired_leases(now).await? {
        let reason = format!(
            "lease {} on box {} expired ({})",
            lease.id,
            lease.box_id,
            if lease.confirmed {
                "box went silent"
            } else {
                "assignment not confirmed in time"
            }
        );
        hive.registry.forget_inflight(&lease.box_id, &lease.id);
        let done = hive
            .store
            .requeue(&lease.build_id, &lease.id, "expired", &reason)
            .await?;
        if done.changed() {
            if done == Requeued::Queued {
                tracing::warn!(build_id = %lease.build_id, %reason, "build re-queued");
                stats.requeued += 1;
            } else {
                tracing::warn!(build_id = %lease.build_id, %reason, "build failed: that was its last attempt");
            }
            hive.metrics.lease_expired();
            hive.events.build_changed(&lease.build_id);
            hive.events.log_appended(&lease.build_id);
            hive.registry
                .cancel(
                    &lease.box_id,
                    &lease.build_id,
                    BuildState::Cancelled,
                    &reason,
                )
                .await;
        }
    }

    for build in hive.store.overdue_builds(now).await? {
        let reason = format!("timed out after {}s", build.timeout_secs);
        if end_build(hive, &build.id, BuildState::TimedOut, &reason, None)
            .await?
            .is_some()
        {
            stats.timed_out += 1;
        }
    }

    let silence = hive.heartbeat * 3;
    for box_id in hive.registry.reap_silent(silence) {
        tracing::warn!(%box_id, silent_ms = millis(silence), "box silent; offline");
    }
    for box_id in hive.registry.draining_disconnected() {
        if hive.store.live_leases(&box_id).await?.is_empty() {
            hive.store.set_box_state(&box_id, LEFT).await?;
            hive.registry.set_admin_state(&box_id, LEFT);
            tracing::info!(%box_id, "drained box left");
        }
    }
    Ok(())
}
