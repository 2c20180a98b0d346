//! Self-fencing: a box that has not heard from the control plane for longer than the lease no
//! longer owns its builds (the control plane has placed them again), so it cancels them rather
//! than run work nobody owns.
use std::sync::Arc;
use std::time::Duration;

use hive_proto::v1::BuildState;

use super::Agent;
use crate::backend::CellBackend;

impl<B: CellBackend> Agent<B> {
    /// Self-fencing: without the control plane for longer than the lease, cancel every build.
    pub(super) async fn fence_watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut fenced = false;
        loop {
            tick.tick().await;
            let silent = self
                .last_contact
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed();
            if self.is_connected() {
                fenced = false;
                continue;
            }
            if silent > self.lease() && !fenced {
                fenced = true;
                let builds = self.builds();
                if !builds.is_empty() {
                    tracing::warn!(
                        silent_ms = silent.as_millis() as u64,
                        builds = builds.len(),
                        "control plane unreachable past the lease: cancelling builds (self-fence)"
                    );
                }
                for b in builds.values() {
                    let _ = b.cancel.send(Some((
                        BuildState::Failed,
                        "box lost the control plane past its lease".into(),
                    )));
                }
            }
        }
    }
}
