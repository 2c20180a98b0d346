//! Queuing a build: written with its first transition (and, from a webhook, with its delivery
//! record in the same transaction), then announced and the scheduler woken, after the commit.

use crate::state::Hive;
use crate::store::{Audit, BuildRow, Delivery, StoreError};

/// Queues a build submitted through the API, with the audit entry of who did.
pub async fn submit(
    hive: &Hive,
    build: &BuildRow,
    reason: &str,
    audit: &Audit,
) -> Result<(), StoreError> {
    hive.store
        .insert_build_audited(build, reason, audit)
        .await?;
    queued(hive, &build.id);
    Ok(())
}

/// Records a webhook delivery and, in the same transaction, the build it makes (if any). A
/// delivery id seen before changes nothing and returns the stored answer; only a new build is
/// announced.
pub async fn submit_delivery(
    hive: &Hive,
    delivery_id: &str,
    project_id: &str,
    build: Option<&BuildRow>,
    outcome: &str,
) -> Result<Delivery, StoreError> {
    let recorded = hive
        .store
        .record_delivery(delivery_id, project_id, build, outcome)
        .await?;
    if let (Delivery::New, Some(build)) = (&recorded, build) {
        queued(hive, &build.id);
    }
    Ok(recorded)
}

/// A build was queued: watchers hear of it and the scheduler looks at the queue.
fn queued(hive: &Hive, build_id: &str) {
    hive.events.build_changed(build_id);
    hive.wake.notify_one();
}
