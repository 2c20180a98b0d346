//! Self-fencing: a box that has not heard from the control plane for two thirds of the lease
//! is about to lose its builds (the control plane places them again once the lease runs out), so
//! it stops them first and gives the attempts back (LOST) rather than run work nobody will own.
use std::sync::Arc;
use std::time::Duration;

use super::{Agent, Stop};
use crate::backend::CellBackend;

impl<B: CellBackend> Agent<B> {
    /// Self-fencing: without the control plane for [`Agent::fence_after`], stop every build.
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
            if silent > self.fence_after() && !fenced {
                fenced = true;
                let builds = self.builds();
                if !builds.is_empty() {
                    tracing::warn!(
                        silent_ms = silent.as_millis() as u64,
                        builds = builds.len(),
                        "control plane unreachable for two thirds of the lease: stopping builds (self-fence)"
                    );
                }
                for b in builds.values() {
                    let _ = b.cancel.send(Some(Stop::give_back(
                        "box lost the control plane for two thirds of its lease",
                    )));
                }
            }
        }
    }
}
