//! Draining a box: it gets nothing new, is told to drain, and leaves once it is empty and
//! disconnected (the scheduler's sweep); and cordoning one (nothing new, nothing stopped).

use hive_proto::v1::control_message::Msg as CtlMsg;

use crate::registry::boxes::{CORDONED, DRAINING};
use crate::state::Hive;
use crate::store::{Audit, StoreError};

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
        .send(box_id, CtlMsg::Drain(hive_proto::v1::Drain {}))
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
