//! Change announcements inside the control plane: after a build's state (or log) change is
//! committed, its id is broadcast here; `WatchBuild` and `StreamLogs` re-read the store when they
//! hear about their build. Receivers that fall behind just re-read (the store is the truth).

use tokio::sync::broadcast;

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A build row changed (state, box, cell ...).
    Build(String),
    /// New log chunks were stored for a build.
    Log(String),
}

/// The broadcast hub.
#[derive(Debug, Clone)]
pub struct Events {
    tx: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(4096);
        Events { tx }
    }

    /// Subscribe before reading the current state, so no change falls in between.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    pub fn build_changed(&self, id: &str) {
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(Event::Build(id.to_string()));
    }

    pub fn log_appended(&self, id: &str) {
        let _ = self.tx.send(Event::Log(id.to_string()));
    }
}

/// Resolves once the shutdown flag is set (or its sender is gone).
pub async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    // Drop the borrow guard here: callers hold this across other awaits.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}
