//! The cell backend trait: what the pool and the agent need from "something that runs cells".
//!
//! Both implementations are one [`jailed::Jailed`] core (cell directory, on-disk record, cgroup,
//! network namespace, the `hive-box jail` helper, readiness polling, destroy) around a
//! [`jailed::CellKind`] that adds what differs: [`sandbox`] (the cell daemon itself in the jail,
//! on the box's kernel, for hosts without usable KVM) and [`microvm`] (one jailed embedded VMM per
//! cell: VM config, TAP, `hive-box vmm-launch`). Pool and agent code is generic over
//! [`CellBackend`] and never looks past it; the only backend-specific thing they hold is the
//! [`Connector`](crate::cell::Connector) inside a [`Cell`](crate::cell::Cell).
pub mod jailed;
pub mod microvm;
pub mod sandbox;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hive_proto::v1::SizeClass;
use serde::{Deserialize, Serialize};

use crate::cell::Cell;

/// What to create.
#[derive(Debug, Clone)]
pub struct CellSpec {
    /// 12 lowercase hex characters (names of netns, veth, cgroup derive from it).
    pub id: String,
    pub size_class: SizeClass,
    /// Index of the cell's /30 in the box's cell subnet.
    pub slot: u32,
}

/// The per-cell record kept on disk next to the cell's files, so a restarted box daemon knows
/// which build a leftover cell was running and can report it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CellRecord {
    pub id: String,
    pub size_class: String,
    pub slot: u32,
    #[serde(default)]
    pub build_id: String,
    #[serde(default)]
    pub lease_id: String,
    pub created_at_ms: i64,
}

/// Name of the record file inside a cell directory.
pub const RECORD_FILE: &str = "cell.json";

impl CellRecord {
    pub fn load(cell_dir: &Path) -> Option<CellRecord> {
        let text = std::fs::read_to_string(cell_dir.join(RECORD_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Written to a temp file and renamed so a crash never leaves half a record.
    pub fn store(&self, cell_dir: &Path) -> std::io::Result<()> {
        let tmp = cell_dir.join(format!("{RECORD_FILE}.tmp"));
        std::fs::write(
            &tmp,
            serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, cell_dir.join(RECORD_FILE))
    }
}

/// A cell found on disk that no running daemon owns.
#[derive(Debug, Clone, PartialEq)]
pub struct Leftover {
    pub id: String,
    pub dir: PathBuf,
    /// The record, when it was readable.
    pub record: Option<CellRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("prepare cell directory {path}")]
    CellDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cell cgroup")]
    Cgroup(#[from] hive_jail::cgroup::CgroupError),
    #[error("cell network")]
    Net(#[from] crate::net::NetError),
    #[error("start jail helper {helper}")]
    Spawn {
        helper: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cell agent")]
    Cell(#[from] crate::cell::CellError),
    #[error("{backend} backend is not available on this host: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
}

/// A way to run cells. All methods take `&self`: the backend is shared by the pool's tasks.
pub trait CellBackend: Send + Sync + 'static {
    /// `sandbox` or `microvm`, as reported to the control plane.
    fn name(&self) -> &'static str;

    /// Creates and starts the cell; returns once its process runs (not necessarily ready).
    fn create(&self, spec: CellSpec) -> impl Future<Output = Result<Cell, BackendError>> + Send;

    /// Waits until the cell daemon answers health (or the cell dies, or `timeout` passes).
    fn wait_ready(
        &self,
        cell: &Cell,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Whether the cell's process still runs (a dead cell is replaced by the pool).
    fn is_alive(&self, cell_id: &str) -> bool;

    /// Stops the cell and removes every resource it had. Idempotent.
    fn destroy(&self, cell_id: &str) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Cells found on disk (for the reaper at start-up).
    fn inspect(&self) -> Vec<Leftover>;

    /// Records which build and lease a cell runs (kept with the cell, read back by the reaper).
    fn record_build(&self, cell_id: &str, build_id: &str, lease_id: &str);

    /// The end of the cell's console, for an error that says why a cell stopped answering.
    fn last_words(&self, _cell_id: &str) -> String {
        String::new()
    }
}
