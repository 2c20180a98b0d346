//! What every part of a running control plane shares: the store, the box and connector
//! registries, change announcements, metrics and the settings the services read. It depends
//! only on those leaf modules, never on a service: `server` builds one [`Hive`] and hands an
//! `Arc` of it to each service it starts.

use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::events::Events;
use crate::intake::Intake;
use crate::metrics::Metrics;
use crate::placement::Policy;
use crate::registry::boxes::Registry;
use crate::registry::connectors::Connectors;
use crate::sizeclass::SizeClasses;
use crate::store::Store;

/// State shared by every part of a running control plane.
#[derive(Debug)]
pub struct Hive {
    pub store: Store,
    pub classes: SizeClasses,
    pub events: Events,
    /// Box daemons and their sessions.
    pub registry: Registry,
    /// Connector sessions and key exchanges in flight (issue 5).
    pub connectors: std::sync::Arc<Connectors>,
    pub metrics: Metrics,
    /// Wakes the scheduler (new build, box change).
    pub wake: Notify,
    /// Who may choose boxes now, and whether builds were seen waiting (`Choosing`).
    pub choosing: Choosing,
    pub lease: Duration,
    pub heartbeat: Duration,
    pub placement: Policy,
    /// Control messages queued per box session (`registry::boxes::Registry::send`).
    pub box_queue: usize,
    /// Webhook deliveries waiting for their group commit (`domain::submit`).
    pub intake: Intake,
    /// Becomes true when shutting down; long streams end on it.
    pub shutdown: watch::Receiver<bool>,
    /// Box sessions' tasks and what they spawn: shutdown waits for them (each saves its box's
    /// state as it ends) before it closes the database.
    pub sessions: tokio_util::task::TaskTracker,
    /// The CA that signs box certificates.
    pub ca: std::sync::Arc<crate::pki::Ca>,
    /// How long a box certificate is valid.
    pub box_cert_validity: Duration,
    /// Seals and opens project secrets.
    pub sealer: crate::secrets::Sealer,
    /// News to and from the other control planes of the database (`cluster`).
    pub bus: crate::cluster::Bus,
    /// This hive's name and region, and the hives it forwards pushes to.
    pub regions: crate::regions::Regions,
    /// Artefact files under `<data-dir>/artifacts` and the per-build cap.
    pub artifacts: crate::artifacts::ArtifactStore,
}

/// Placement's two choosers, the scheduler's rounds and a webhook group that places its new
/// builds at once (`domain::submit`, `domain::place::choose_at_once`).
#[derive(Debug, Default)]
pub struct Choosing {
    /// Held from reading the boxes' free cells out of the registry to writing the choices back
    /// (`Registry::add_inflight`), so two choosers never take the same free cell: by a round
    /// across its placements' commit; by a webhook group only while it chooses (it writes its
    /// choices back at once and gives back those that did not take after its commit). A group
    /// only tries it: while a round holds it, the group's builds go through the queue.
    pub lock: tokio::sync::Mutex<()>,
    /// The size classes whose builds were last seen waiting in the queue (a round left some,
    /// or a group's placement found some ahead): webhook groups leave their builds of those
    /// classes to the scheduler without asking the store. A hint only; the store's check is
    /// the rule.
    backlog: std::sync::Mutex<Backlog>,
}

/// What [`Choosing`] last saw waiting.
#[derive(Debug, Default)]
struct Backlog {
    /// Builds of any class may wait (a round read a whole batch: the queue goes on past it).
    all: bool,
    classes: std::collections::HashSet<String>,
}

impl Choosing {
    fn backlog(&self) -> std::sync::MutexGuard<'_, Backlog> {
        self.backlog.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether builds of `class` were last seen waiting.
    pub fn waiting(&self, class: &str) -> bool {
        let b = self.backlog();
        b.all || b.classes.contains(class)
    }

    /// Whether builds of every class may be waiting.
    pub fn all_waiting(&self) -> bool {
        self.backlog().all
    }

    /// What a round saw, replacing what was known: `all` when the queue went on past its
    /// batch, else the classes it left builds of (none: the queue is empty of waiting builds).
    pub fn saw_waiting(&self, all: bool, classes: impl IntoIterator<Item = String>) {
        let mut b = self.backlog();
        b.all = all;
        b.classes = classes.into_iter().collect();
    }

    /// A build of `class` was left queued (a webhook group could not place it).
    pub fn left_waiting(&self, class: &str) {
        let mut b = self.backlog();
        if !b.classes.contains(class) {
            b.classes.insert(class.to_string());
        }
    }
}

impl Hive {
    /// A deadline one lease from now, in epoch milliseconds.
    pub fn lease_deadline_ms(&self) -> i64 {
        crate::store::now_ms().saturating_add(millis(self.lease))
    }
}

/// A duration in whole milliseconds as i64 (saturating: settings are far below the limit).
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
