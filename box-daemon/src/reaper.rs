//! Start-up clean-up: cells left over by a previous run of the box daemon.
//!
//! A crashed or killed box daemon leaves cell directories, cgroups, network namespaces, veths and
//! firewall entries behind, and builds the control plane still thinks run here. The reaper destroys
//! every leftover cell the backend can find and returns the builds they held (from each cell's
//! record) so the agent reports them right after registering: `LOST` (the control plane runs the
//! build again as a new attempt) when the cell is destroyed, `FINISHED failed` when it could not be
//! (its process may still run the build, so the build must not run a second time elsewhere).
//! It sees only this box's leftovers: the backend looks in this box's data dir and cgroup parent,
//! which no other live box on the host shares ([`claim`](crate::claim)); other boxes' cells are
//! never found, so never destroyed.
use crate::backend::CellBackend;

/// A build that was running in a reaped cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostBuild {
    pub build_id: String,
    pub lease_id: String,
    pub cell_id: String,
    /// Whether the cell was destroyed (nothing of the attempt can run any more).
    pub destroyed: bool,
}

/// Destroys every leftover cell; returns the builds they were running.
pub async fn reap<B: CellBackend>(backend: &B) -> Vec<LostBuild> {
    let mut lost = Vec::new();
    for left in backend.inspect() {
        let destroyed = match backend.destroy(&left.id).await {
            Ok(()) => {
                tracing::info!(cell = %left.id, dir = %left.dir.display(), "reaped leftover cell");
                true
            }
            Err(e) => {
                tracing::warn!(cell = %left.id, error = %hive_sys::error_chain(&e), "could not reap leftover cell");
                false
            }
        };
        if let Some(rec) = &left.record {
            if !rec.build_id.is_empty() {
                lost.push(LostBuild {
                    build_id: rec.build_id.clone(),
                    lease_id: rec.lease_id.clone(),
                    cell_id: left.id.clone(),
                    destroyed,
                });
            }
        }
    }
    lost
}
