//! Cancelling a build on an operator's request: refused once it has ended (also when it ends
//! between the check and the write); otherwise it ends as `cancelled` (see [`super::end`]).

use hive_proto::v1::BuildState;

use crate::domain::end::end_build;
use crate::state::Hive;
use crate::store::{Audit, BuildRow, StoreError};

/// Why a cancel did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("build {0:?} not found")]
    NotFound(String),
    #[error("build {id:?} already ended ({})", state.short_name())]
    AlreadyEnded { id: String, state: BuildState },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Cancels `build_id` with `reason`, recording `audit` with the change; returns the build as it
/// was before.
pub async fn cancel(
    hive: &Hive,
    build_id: &str,
    reason: &str,
    audit: &Audit,
) -> Result<BuildRow, CancelError> {
    let ended = |b: BuildRow| CancelError::AlreadyEnded {
        id: b.id,
        state: b.state,
    };
    let b = hive
        .store
        .get_build(build_id)
        .await?
        .ok_or_else(|| CancelError::NotFound(build_id.to_string()))?;
    if b.state.is_terminal() {
        return Err(ended(b));
    }
    match end_build(hive, build_id, BuildState::Cancelled, reason, Some(audit)).await? {
        Some(before) => Ok(before),
        None => {
            // It ended between the read and the cancel.
            let now = hive
                .store
                .get_build(build_id)
                .await?
                .ok_or_else(|| CancelError::NotFound(build_id.to_string()))?;
            Err(ended(now))
        }
    }
}
