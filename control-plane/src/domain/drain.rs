//! Draining a box: it gets nothing new, is told to drain, and leaves once it is empty and
//! disconnected (the scheduler's sweep); and cordoning one (nothing new, nothing stopped).

use hive_proto::v1::control_message::Msg as CtlMsg;

use crate::registry::boxes::{CORDONED, DRAINING};
use crate::state::Hive;
use crate::store::StoreError;

/// Marks a box draining: it gets nothing new, is told to drain, and leaves once it is empty and
/// disconnected.
pub async fn drain_box(hive: &Hive, box_id: &str) -> Result<bool, StoreError> {
    if !hive.store.set_box_state(box_id, DRAINING).await? {
        return Ok(false);
    }
    hive.registry.set_admin_state(box_id, DRAINING);
    hive.registry
        .send(box_id, CtlMsg::Drain(hive_proto::v1::Drain {}))
        .await;
    hive.wake.notify_one();
    Ok(true)
}

/// Cordons a box: the scheduler places nothing new on it; what runs there goes on.
pub async fn cordon_box(hive: &Hive, box_id: &str) -> Result<bool, StoreError> {
    if !hive.store.set_box_state(box_id, CORDONED).await? {
        return Ok(false);
    }
    hive.registry.set_admin_state(box_id, CORDONED);
    Ok(true)
}
