//! Change announcements inside the control plane: after a build's state (or log) change is
//! committed, its id is broadcast here; `WatchBuild` and `StreamLogs` re-read the store when they
//! hear about their build. Receivers that fall behind just re-read (the store is the truth).
//! News of log chunks may carry the chunks one commit stored (with their stored seqs), so a
//! follower can send them on without reading them back.

use std::sync::Arc;

use hive_proto::v1::LogChunk;
use tokio::sync::broadcast;

use crate::cluster::{Bus, Note};

/// Most bytes of log data one announcement carries; more is announced without the chunks (the
/// ring of recent events must not hold a flood of output).
pub const MAX_CARRIED_BYTES: usize = 64 * 1024;

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A build row changed (state, box, cell ...).
    Build(String),
    /// New log chunks were stored for a build: exactly those of one commit, as stored, in seq
    /// order; or none when the reader must look in the store.
    Log(String, Arc<[LogChunk]>),
}

/// The broadcast hub. Changes announced here also go to the other control planes of the
/// database (`cluster`); theirs arrive through the `*_here` methods.
#[derive(Debug, Clone)]
pub struct Events {
    tx: broadcast::Sender<Event>,
    bus: Bus,
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    pub fn new() -> Self {
        Events::with_bus(Bus::local())
    }

    /// A hub whose announcements also go out on `bus`.
    pub fn with_bus(bus: Bus) -> Self {
        let (tx, _) = broadcast::channel(4096);
        Events { tx, bus }
    }

    /// Subscribe before reading the current state, so no change falls in between.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    pub fn build_changed(&self, id: &str) {
        self.build_changed_here(id);
        self.bus.publish(Note::Build(id.to_string()));
    }

    /// Another control plane changed a build.
    pub(crate) fn build_changed_here(&self, id: &str) {
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(Event::Build(id.to_string()));
    }

    /// Log chunks were stored; readers look in the store.
    pub fn log_appended(&self, id: &str) {
        self.log_appended_here(id);
        self.bus.publish(Note::Log(id.to_string()));
    }

    /// Another control plane stored log chunks.
    pub(crate) fn log_appended_here(&self, id: &str) {
        let _ = self.tx.send(Event::Log(id.to_string(), Arc::from([])));
    }

    /// `chunks` (as stored, in seq order) are all the chunks of `id` that one commit stored.
    pub fn logs_stored(&self, id: &str, chunks: Vec<LogChunk>) {
        let bytes: usize = chunks.iter().map(|c| c.data.len()).sum();
        let carried: Arc<[LogChunk]> = if bytes <= MAX_CARRIED_BYTES {
            chunks.into()
        } else {
            Arc::from([])
        };
        let _ = self.tx.send(Event::Log(id.to_string(), carried));
        self.bus.publish(Note::Log(id.to_string()));
    }
}

/// Resolves once the shutdown flag is set (or its sender is gone).
pub async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    // Drop the borrow guard here: callers hold this across other awaits.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}
