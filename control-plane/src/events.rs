//! Change announcements inside the control plane: after a build's state (or log) change is
//! committed, its id is broadcast here (new log chunks also just before); `WatchBuild` and
//! `StreamLogs` re-read the store when they hear about their build. Receivers that fall behind just re-read (the store is the truth).
//! News of log chunks may carry the chunks one transaction of a box session wrote (with their
//! stored seqs), sent before its commit, so a follower can send them on at once without reading
//! them back.

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
    /// New log chunks for a build: exactly those one transaction wrote, as stored, in seq
    /// order, announced before its commit; or none when the reader must look in the store
    /// (announced after the commit).
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

    /// `chunks` (in seq order) are all the chunks of `id` that one transaction wrote, before
    /// its commit: this control plane's followers send them on at once (a live tail does not
    /// wait for the fsync). The box keeps every chunk until the commit is acknowledged and sends
    /// it again after a failed one, under the same seq. Returns what was carried (empty over
    /// [`MAX_CARRIED_BYTES`]), to be passed to [`Events::logs_committed`] after the commit.
    pub fn logs_written(&self, id: &str, chunks: Vec<LogChunk>) -> Arc<[LogChunk]> {
        let bytes: usize = chunks.iter().map(|c| c.data.len()).sum();
        if bytes > MAX_CARRIED_BYTES {
            return Arc::from([]);
        }
        let carried: Arc<[LogChunk]> = chunks.into();
        let _ = self.tx.send(Event::Log(id.to_string(), carried.clone()));
        carried
    }

    /// The chunks [`Events::logs_written`] announced are committed. Announced again, locally
    /// with the same chunks: a follower that read the store before the commit (it subscribed,
    /// or fell behind, just then) did not find them and is behind them; one that sent them
    /// already finds nothing new in them. The other control planes hear of them now.
    pub fn logs_committed(&self, id: &str, carried: Arc<[LogChunk]>) {
        let _ = self.tx.send(Event::Log(id.to_string(), carried));
        self.bus.publish(Note::Log(id.to_string()));
    }
}

/// Resolves once the shutdown flag is set (or its sender is gone).
pub async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    // Drop the borrow guard here: callers hold this across other awaits.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}
