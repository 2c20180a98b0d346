//! Ending a build that has not ended: cancel (API), timeout (scheduler) or a build that cannot
//! run (unknown size class). The store writes the end with its transition; then the change is
//! announced and the box that holds the build, if any, is told to stop it.

use hive_proto::v1::BuildState;

use crate::state::Hive;
use crate::store::{Audit, BuildRow, StoreError};

/// Ends a build that has not ended (cancel, timeout, or a build that cannot run), then tells
/// its box if it had one. `audit` (an operator's cancel) is recorded with the change. Returns
/// the build as it was, or None if it had already ended.
pub async fn end_build(
    hive: &Hive,
    build_id: &str,
    state: BuildState,
    reason: &str,
    audit: Option<&Audit>,
) -> Result<Option<BuildRow>, StoreError> {
    let ended = match audit {
        Some(audit) => {
            hive.store
                .end_build_audited(build_id, state, reason, audit)
                .await?
        }
        None => hive.store.end_build(build_id, state, reason).await?,
    };
    let Some(before) = ended else {
        return Ok(None);
    };
    tracing::info!(%build_id, from = before.state.short_name(), to = state.short_name(), %reason,
        "build ended by the control plane");
    hive.events.build_changed(build_id);
    if matches!(before.state, BuildState::Placed | BuildState::Running) && !before.box_id.is_empty()
    {
        hive.registry
            .forget_inflight(&before.box_id, &before.lease_id);
        let told = if state == BuildState::Failed {
            BuildState::Cancelled
        } else {
            state
        };
        hive.registry
            .cancel(&before.box_id, build_id, told, reason)
            .await;
    }
    hive.wake.notify_one();
    Ok(Some(before))
}
