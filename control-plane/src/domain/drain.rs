//! Draining a box: it gets nothing new, is told to drain, and leaves once it is empty and
//! disconnected (the scheduler's sweep); cordoning one (nothing new, nothing stopped) and
//! undoing that; forgetting one that is gone for good.

use hive_proto::v1::control_message::Msg as CtlMsg;

use crate::registry::boxes::{ACTIVE, CORDONED, DRAINING};
use crate::state::Hive;
use crate::store::{Audit, Forgotten, StoreError};

/// Marks a box draining (recording `audit` with it): it gets nothing new, is told to drain, and
/// leaves once it is empty and disconnected.
pub async fn drain_box(hive: &Hive, box_id: &str, audit: &Audit) -> Result<bool, StoreError> {
    if !hive
        .store
        .set_box_state_audited(box_id, DRAINING, audit)
        .await?
    {
        return Ok(false);
    }
    hive.registry.set_admin_state(box_id, DRAINING);
    hive.registry
        .tell(box_id, CtlMsg::Drain(hive_proto::v1::Drain {}))
        .await;
    hive.wake.notify_one();
    Ok(true)
}

/// Cordons a box (recording `audit` with it): the scheduler places nothing new on it; what runs
/// there goes on.
pub async fn cordon_box(hive: &Hive, box_id: &str, audit: &Audit) -> Result<bool, StoreError> {
    if !hive
        .store
        .set_box_state_audited(box_id, CORDONED, audit)
        .await?
    {
        return Ok(false);
    }
    hive.registry.set_admin_state(box_id, CORDONED);
    Ok(true)
}

/// Puts a box back in service from state `from` (cordoned, draining or left; recording `audit`
/// with it): placement may use it again, and a drained box that registers again is not told to
/// drain. False when its state was no longer `from`.
pub async fn uncordon_box(
    hive: &Hive,
    box_id: &str,
    from: &str,
    audit: &Audit,
) -> Result<bool, StoreError> {
    if !hive
        .store
        .change_box_state_audited(box_id, from, ACTIVE, audit)
        .await?
    {
        return Ok(false);
    }
    hive.registry.set_admin_state(box_id, ACTIVE);
    hive.wake.notify_one();
    Ok(true)
}

/// Corrects this control plane's registry from the store for `ids` that are not `active` there
/// (cordoned, draining, left; no row: left). The registry learns of another control plane's
/// box state changes through the cluster bus, which can lag, lose notes while its listener
/// reconnects, or lose a note when a control plane dies between its commit and the note; the
/// store refuses placements onto such a box, and without this the scheduler would choose it
/// again on every pass. True when the registry had one of them wrong.
pub async fn reload_box_states(hive: &Hive, ids: &[&str]) -> bool {
    match hive.store.inactive_boxes(ids).await {
        Ok(inactive) => {
            let candidates = hive.registry.candidates();
            let mut corrected = false;
            for (id, state) in inactive {
                if candidates.iter().any(|c| c.box_id == id) {
                    tracing::info!(box_id = %id, %state,
                        "box no longer active in the store; its state here was stale");
                    hive.registry.set_admin_state_here(&id, &state);
                    corrected = true;
                }
            }
            corrected
        }
        Err(e) => {
            tracing::warn!(error = %e, "reading box states failed");
            false
        }
    }
}

/// Why a box could not be forgotten.
#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    #[error("box {0:?} is connected: stop it (or `hivectl box drain` it) first")]
    Connected(String),
    #[error("box {0:?} not found")]
    NotFound(String),
    #[error(
        "box {id:?} still holds {n} build lease(s): wait for those builds to end or be re-queued \
         (within the lease time), or cancel them"
    )]
    LiveLeases { id: String, n: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Forgets a box gone for good (recording `audit` with it): its row and cells are deleted; if
/// it ever connects again it registers as a new box.
pub async fn forget_box(hive: &Hive, box_id: &str, audit: &Audit) -> Result<(), ForgetError> {
    if hive.registry.is_connected(box_id) {
        return Err(ForgetError::Connected(box_id.to_string()));
    }
    match hive.store.forget_box_audited(box_id, audit).await? {
        Forgotten::Yes => {}
        Forgotten::NotFound => return Err(ForgetError::NotFound(box_id.to_string())),
        Forgotten::LiveLeases(n) => {
            return Err(ForgetError::LiveLeases {
                id: box_id.to_string(),
                n,
            })
        }
    }
    hive.registry.forget(box_id);
    Ok(())
}
