//! Queuing a build: written with its first transition (and, from a webhook, with its delivery
//! record in the same transaction), then announced and the scheduler woken, after the commit.
//! A rebuild ([`rebuild_of`]) is a new build of the old one's code with its project as it is now.

use crate::state::Hive;
use crate::store::{Audit, BuildRow, Delivery, ProjectRow, StoreError};

/// Why a build cannot be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("build {0:?} not found")]
    NotFound(String),
    #[error("build {id}'s project {project:?} has been deleted; nothing to rebuild")]
    ProjectGone { id: String, project: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The build that re-runs `old_id` (the project as it is now: steps, env, class; the code as
/// it was), not yet queued, with its project (for the caller's project check) and the reason
/// its first transition gives. Queue it with [`submit`].
pub async fn rebuild_of(
    hive: &Hive,
    old_id: &str,
) -> Result<(ProjectRow, BuildRow, String), RebuildError> {
    let old = hive
        .store
        .get_build(old_id)
        .await?
        .ok_or_else(|| RebuildError::NotFound(old_id.to_string()))?;
    let p = hive
        .store
        .get_project(&old.project_id)
        .await?
        .ok_or_else(|| RebuildError::ProjectGone {
            id: old.id.clone(),
            project: old.project_name.clone(),
        })?;
    let build = BuildRow::new_queued(
        &p,
        &old.revision,
        &old.git_ref,
        &format!("rebuild:{}", old.id),
    );
    Ok((p, build, format!("rebuild of {}", old.id)))
}

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
