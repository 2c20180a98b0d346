//! The control plane's Prometheus metrics, on `prometheus-client`: counters and histograms
//! updated where things happen (webhooks by outcome, placements, lease expiries, how long builds
//! wait in the queue, how long a box session's group commit takes), and gauges set at scrape
//! time from the store and the registry (builds by state, queue depth, boxes). `http::metrics`
//! serves the OpenMetrics text.
//!
//! The last hour is also kept per minute in memory ([`Recent`]): the most builds seen queued
//! (sampled by the `sampler` task) and the placements with their time in the queue, for the
//! dashboard's chart (Prometheus keeps the long history; this is what a glance needs).

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The build states `hive_builds` always lists (0 when none).
const STATES: [&str; 7] = [
    "queued",
    "placed",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "timed_out",
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NameLabel {
    name: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

/// A histogram family with the stage buckets.
type StageFamily = Family<StageLabel, Histogram, fn() -> Histogram>;

/// 0.5 ms to 30 s, each at most 2x the last and 1.5x from 3 ms on (fine enough that a p99 read
/// from the buckets is within half of the truth).
const STAGE_BUCKETS: [f64; 28] = [
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
];

fn stage_histogram() -> Histogram {
    Histogram::new(STAGE_BUCKETS)
}

/// The steps of a build's start that this control plane sees after placing it, in order. Each
/// is timed from the one before on this process's monotonic clock, so clocks of boxes and cells
/// do not enter. Queued -> placed is `hive_build_queue_wait_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// The assignment was sent to the box.
    Placed,
    /// ... -> the box's ACCEPTED is written (in the transaction its messages commit in; the
    /// commit is `hive_box_commit_seconds`): the box took a cell (its pool, the stream there
    /// and back).
    Accepted,
    /// ... -> RUNNING is written: the cell took the build and its first event came back.
    Running,
    /// ... -> the first log chunk is written (and handed to this control plane's followers).
    FirstLog,
    /// ... -> a log follower (`StreamLogs`, `hivectl logs -f`) that was waiting for it sent it
    /// on ([`Metrics::followed`]).
    Followed,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Placed => "placed",
            Stage::Accepted => "accepted",
            Stage::Running => "running",
            Stage::FirstLog => "first_log",
            Stage::Followed => "followed",
        }
    }
}

/// Builds whose start is being timed, at most (a hive's worth of builds starting at once).
const STAGE_TRACKED: usize = 100_000;
/// A timed start not seen through (placed on another control plane's box session, or ended
/// without a follower) is forgotten after this when the table is full.
const STAGE_STALE: std::time::Duration = std::time::Duration::from_secs(600);

/// In-process metrics (counters reset on restart, as Prometheus counters may).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Gauges are set and encoded under this lock, so two scrapes do not interleave.
    scrape: Mutex<()>,
    builds: Family<StateLabel, Gauge>,
    queue_depth: Gauge,
    webhooks: Family<OutcomeLabel, Counter>,
    boxes_connected: Gauge,
    boxes_known: Gauge,
    placements: Counter,
    placed_at_once: Counter,
    heartbeats: Family<KindLabel, Counter>,
    lease_expiries: Counter,
    queue_wait: Histogram,
    box_commit: Histogram,
    webhook_batch: Histogram,
    webhook_commit: Histogram,
    box_violations: Family<KindLabel, Counter>,
    purged: Family<KindLabel, Counter>,
    box_queue_overflows: Gauge,
    webhook_queue_depth: Gauge,
    cluster_notes: Family<NameLabel, Gauge>,
    cluster_lag_ms: Gauge,
    cluster_listening: Gauge,
    limits: Family<NameLabel, Gauge>,
    forge_statuses: Family<OutcomeLabel, Counter>,
    forge_statuses_pending: Gauge,
    stages: StageFamily,
    /// Per build being started: the last stage seen and when.
    stage_clock: Mutex<std::collections::HashMap<String, (Stage, std::time::Instant)>>,
    recent: Mutex<std::collections::VecDeque<Minute>>,
}

/// Minutes of history kept in memory.
pub const RECENT_MINUTES: usize = 60;

/// One minute of the recent history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Minute {
    /// The minute's start, epoch ms.
    pub start_ms: i64,
    /// The most builds seen queued in it (-1: not sampled).
    pub queue_max: i64,
    pub placements: u64,
    /// Sum and most of the placed builds' time in the queue.
    pub wait_sum_ms: i64,
    pub wait_max_ms: i64,
}

impl Minute {
    /// Mean time in the queue of the minute's placements.
    pub fn wait_mean_ms(&self) -> Option<i64> {
        (self.placements > 0)
            .then(|| self.wait_sum_ms / i64::try_from(self.placements).unwrap_or(i64::MAX))
    }
}

/// The last hour, per minute, oldest first (minutes with nothing recorded are absent).
pub type Recent = Vec<Minute>;

/// The numbers that come from elsewhere at scrape time.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub builds_by_state: std::collections::BTreeMap<String, i64>,
    pub boxes_connected: usize,
    pub boxes_known: usize,
    /// Box sessions ended because the box did not read its control stream.
    pub box_queue_overflows: u64,
    /// Webhook deliveries queued for a group commit that has not started.
    pub webhook_queue_depth: usize,
    /// Notes to and from the other control planes: (sent, received, dropped, last lag ms).
    pub cluster_notes: (u64, u64, u64, i64),
    /// Whether this control plane hears the others.
    pub cluster_listening: bool,
    /// Commit statuses waiting in the outbox.
    pub forge_statuses_pending: i64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let builds = Family::<StateLabel, Gauge>::default();
        let queue_depth = Gauge::default();
        let webhooks = Family::<OutcomeLabel, Counter>::default();
        let boxes_connected = Gauge::default();
        let boxes_known = Gauge::default();
        let placements = Counter::default();
        let placed_at_once = Counter::default();
        let heartbeats = Family::<KindLabel, Counter>::default();
        let lease_expiries = Counter::default();
        // 10 ms to ~44 min, and 100 us to ~26 s.
        let queue_wait = Histogram::new(exponential_buckets(0.01, 4.0, 10));
        let box_commit = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        // 1 to 256 deliveries (the most in one group), and 100 us to ~26 s.
        let webhook_batch = Histogram::new(exponential_buckets(1.0, 2.0, 9));
        let webhook_commit = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        registry.register("hive_builds", "Builds by state", builds.clone());
        registry.register(
            "hive_queue_depth",
            "Builds waiting for a box",
            queue_depth.clone(),
        );
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "hive_webhooks",
            "Webhook requests by outcome",
            webhooks.clone(),
        );
        registry.register(
            "hive_boxes_connected",
            "Boxes with an open session",
            boxes_connected.clone(),
        );
        registry.register(
            "hive_boxes_known",
            "Boxes ever registered",
            boxes_known.clone(),
        );
        registry.register(
            "hive_placements",
            "Builds placed on a box",
            placements.clone(),
        );
        registry.register(
            "hive_placed_at_once",
            "Builds a webhook placed in its own transaction (a free cell, none of its class queued), of \
             hive_placements",
            placed_at_once.clone(),
        );
        registry.register(
            "hive_box_heartbeats",
            "Box heartbeat writes to the store (kind stored), and heartbeats applied to the live \
             view only at arrival, less than half an interval after the session's last stored one \
             (kind live: the last of them is stored when the gap has passed)",
            heartbeats.clone(),
        );
        registry.register(
            "hive_lease_expiries",
            "Leases that ran out",
            lease_expiries.clone(),
        );
        registry.register(
            "hive_build_queue_wait_seconds",
            "Time from queued to placed, per placement",
            queue_wait.clone(),
        );
        registry.register(
            "hive_box_commit_seconds",
            "Time to store one group of box session messages (one transaction)",
            box_commit.clone(),
        );
        registry.register(
            "hive_webhook_commit_batch_size",
            "Webhook deliveries stored per transaction (group commit)",
            webhook_batch.clone(),
        );
        registry.register(
            "hive_webhook_commit_seconds",
            "Time to store one group of webhook deliveries (one transaction)",
            webhook_commit.clone(),
        );
        let box_violations = Family::<KindLabel, Counter>::default();
        registry.register(
            "hive_box_violations",
            "Messages from boxes refused or cut as impossible, by kind (seq_ahead, log_seq_range, pool_report, heartbeat_lists, ...)",
            box_violations.clone(),
        );
        let purged = Family::<KindLabel, Counter>::default();
        registry.register(
            "hive_purged",
            "Rows deleted by retention, by kind (builds, log_chunks, deliveries)",
            purged.clone(),
        );
        let box_queue_overflows = Gauge::default();
        registry.register(
            "hive_box_queue_overflows",
            "Box sessions ended because the box stopped reading its control stream",
            box_queue_overflows.clone(),
        );
        let webhook_queue_depth = Gauge::default();
        registry.register(
            "hive_webhook_queue_depth",
            "Webhook deliveries waiting for a group commit to start",
            webhook_queue_depth.clone(),
        );
        let cluster_notes = Family::<NameLabel, Gauge>::default();
        registry.register(
            "hive_cluster_notes",
            "Notifications to and from the other control planes of the database since start \
             (name=sent|received|dropped; payloads, each several notes)",
            cluster_notes.clone(),
        );
        let cluster_lag_ms = Gauge::default();
        registry.register(
            "hive_cluster_notify_lag_ms",
            "Milliseconds between another control plane's notification and its arrival here \
             (the last one)",
            cluster_lag_ms.clone(),
        );
        let cluster_listening = Gauge::default();
        registry.register(
            "hive_cluster_listening",
            "1 while this control plane hears the others (always 1 on SQLite)",
            cluster_listening.clone(),
        );
        let limits = Family::<NameLabel, Gauge>::default();
        registry.register(
            "hive_limit",
            "The control plane's fixed and configured limits, by name",
            limits.clone(),
        );
        let forge_statuses = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "hive_forge_statuses",
            "Commit statuses to forges by outcome (sent, retried: failed for now, failed: given \
             up, skipped: nothing to send to)",
            forge_statuses.clone(),
        );
        let forge_statuses_pending = Gauge::default();
        registry.register(
            "hive_forge_statuses_pending",
            "Commit statuses in the outbox waiting to be sent",
            forge_statuses_pending.clone(),
        );
        let stages = StageFamily::new_with_constructor(stage_histogram);
        registry.register(
            "hive_build_start_stage_seconds",
            "A build's start by stage, each from the stage before, on this control plane's \
             clock (stage=accepted: assignment sent -> ACCEPTED written; running: -> RUNNING \
             written; first_log: -> first log chunk written; followed: -> sent to a log \
             follower; each written before its commit, which hive_box_commit_seconds times)",
            stages.clone(),
        );
        Metrics {
            registry,
            stages,
            stage_clock: Mutex::new(std::collections::HashMap::new()),
            forge_statuses,
            forge_statuses_pending,
            box_violations,
            purged,
            box_queue_overflows,
            webhook_queue_depth,
            cluster_notes,
            cluster_lag_ms,
            cluster_listening,
            limits,
            recent: Mutex::new(std::collections::VecDeque::new()),
            scrape: Mutex::new(()),
            builds,
            queue_depth,
            webhooks,
            boxes_connected,
            boxes_known,
            placements,
            placed_at_once,
            heartbeats,
            lease_expiries,
            queue_wait,
            box_commit,
            webhook_batch,
            webhook_commit,
        }
    }
}

impl Metrics {
    /// Counts one webhook request by its outcome (`build`, `duplicate`, `bad_signature` ...).
    pub fn webhook(&self, outcome: &'static str) {
        self.webhooks
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Counts one message a box sent that was refused as impossible.
    pub fn box_violation(&self, kind: &'static str) {
        self.box_violations
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Counts what one retention purge deleted.
    pub fn purged(&self, builds: u64, log_chunks: u64, deliveries: u64) {
        for (kind, n) in [
            ("builds", builds),
            ("log_chunks", log_chunks),
            ("deliveries", deliveries),
        ] {
            self.purged
                .get_or_create(&KindLabel {
                    kind: kind.to_string(),
                })
                .inc_by(n);
        }
    }

    /// Counts one commit status send by its outcome (`sent`, `retried`, `failed`, `skipped`).
    pub fn forge_status(&self, outcome: &'static str) {
        self.forge_statuses
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Publishes a limit (`box_queue`, `box_seq_ahead`, ...) as `hive_limit{name}`.
    pub fn limit(&self, name: &str, value: u64) {
        self.limits
            .get_or_create(&NameLabel {
                name: name.to_string(),
            })
            .set(i64::try_from(value).unwrap_or(i64::MAX));
    }

    pub fn placed(&self, n: usize) {
        self.placements.inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// `n` of the builds counted by [`Metrics::placed`] were placed by their webhook's group.
    pub fn placed_at_once(&self, n: usize) {
        self.placed_at_once
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// One box heartbeat written to the store (`stored`), or applied to the live view only.
    pub fn heartbeat(&self, stored: bool) {
        self.heartbeats
            .get_or_create(&KindLabel {
                kind: (if stored { "stored" } else { "live" }).to_string(),
            })
            .inc();
    }

    pub fn lease_expired(&self) {
        self.lease_expiries.inc();
    }

    /// A build waited `ms` milliseconds in the queue before it was placed.
    pub fn waited_in_queue(&self, ms: i64) {
        let ms = ms.max(0);
        self.queue_wait.observe(seconds(ms));
        self.minute(crate::store::now_ms(), |m| {
            m.placements += 1;
            m.wait_sum_ms = m.wait_sum_ms.saturating_add(ms);
            m.wait_max_ms = m.wait_max_ms.max(ms);
        });
    }

    /// `n` builds were queued at `at_ms` (the `sampler` task's reading).
    pub fn queue_sampled(&self, at_ms: i64, n: i64) {
        self.minute(at_ms, |m| m.queue_max = m.queue_max.max(n));
    }

    /// Changes the minute of `at_ms` (made if new; minutes older than an hour dropped).
    fn minute(&self, at_ms: i64, f: impl FnOnce(&mut Minute)) {
        let start_ms = at_ms - at_ms.rem_euclid(60_000);
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.back().is_none_or(|m| m.start_ms < start_ms) {
            recent.push_back(Minute {
                start_ms,
                queue_max: -1,
                ..Minute::default()
            });
        }
        let cutoff = start_ms - 60_000 * (RECENT_MINUTES as i64 - 1);
        while recent.front().is_some_and(|m| m.start_ms < cutoff) {
            recent.pop_front();
        }
        // A reading from a minute already past (a clock step) changes that minute, if kept.
        if let Some(m) = recent.iter_mut().rev().find(|m| m.start_ms == start_ms) {
            f(m);
        }
    }

    /// The last hour, per minute, as of `now_ms`.
    pub fn recent(&self, now_ms: i64) -> Recent {
        let cutoff = now_ms - now_ms.rem_euclid(60_000) - 60_000 * (RECENT_MINUTES as i64 - 1);
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent
            .iter()
            .filter(|m| m.start_ms >= cutoff)
            .copied()
            .collect()
    }

    /// `build_id` reached `stage`: observes the time since the stage before, when this control
    /// plane saw that one (a stage seen again, or out of order, is not observed). `Placed`
    /// starts the clock (again, for a new attempt); `Followed` ends it.
    pub fn stage(&self, build_id: &str, stage: Stage) {
        let now = std::time::Instant::now();
        let mut clock = self.stage_clock.lock().unwrap_or_else(|e| e.into_inner());
        if stage == Stage::Placed {
            if clock.len() >= STAGE_TRACKED && !clock.contains_key(build_id) {
                clock.retain(|_, (_, at)| now.duration_since(*at) < STAGE_STALE);
                if clock.len() >= STAGE_TRACKED {
                    return;
                }
            }
            clock.insert(build_id.to_string(), (Stage::Placed, now));
            return;
        }
        let Some((last, at)) = clock.get_mut(build_id) else {
            return;
        };
        if *last >= stage || stage == Stage::Followed {
            // (A follower's timing needs to know when it began: `followed`.)
            return;
        }
        if stage_before(stage) == Some(*last) {
            self.stages
                .get_or_create(&StageLabel {
                    stage: stage.name(),
                })
                .observe(now.duration_since(*at).as_secs_f64());
        }
        *last = stage;
        *at = now;
    }

    /// A log follower that began at `since` sent `build_id`'s first chunk. Timed only when it
    /// was already waiting as the chunk was written: one that came later (`hivectl logs` a
    /// minute on) says nothing of the path. The first follower ends the build's clock.
    pub fn followed(&self, build_id: &str, since: std::time::Instant) {
        let mut clock = self.stage_clock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(&(last, at)) = clock.get(build_id) else {
            return;
        };
        if last != Stage::FirstLog {
            return;
        }
        if since <= at {
            self.stages
                .get_or_create(&StageLabel {
                    stage: Stage::Followed.name(),
                })
                .observe(at.elapsed().as_secs_f64());
        }
        clock.remove(build_id);
    }

    /// `build_id` ended: its start is no longer timed.
    pub fn stage_ended(&self, build_id: &str) {
        let mut clock = self.stage_clock.lock().unwrap_or_else(|e| e.into_inner());
        clock.remove(build_id);
    }

    /// One group commit of a box session took `us` microseconds.
    pub fn box_commit(&self, us: u64) {
        self.box_commit.observe(seconds_us(us));
    }

    /// One group commit of `deliveries` webhook deliveries took `us` microseconds.
    #[allow(clippy::cast_precision_loss)]
    pub fn webhook_commit(&self, deliveries: usize, us: u64) {
        self.webhook_batch.observe(deliveries as f64);
        self.webhook_commit.observe(seconds_us(us));
    }

    /// The OpenMetrics text exposition, with the gauges set from `snap`.
    pub fn render(&self, snap: &Snapshot) -> String {
        let _one_scrape = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        for state in STATES {
            let n = snap.builds_by_state.get(state).copied().unwrap_or(0);
            self.builds
                .get_or_create(&StateLabel {
                    state: state.to_string(),
                })
                .set(n);
        }
        self.queue_depth
            .set(snap.builds_by_state.get("queued").copied().unwrap_or(0));
        self.boxes_connected
            .set(i64::try_from(snap.boxes_connected).unwrap_or(i64::MAX));
        self.boxes_known
            .set(i64::try_from(snap.boxes_known).unwrap_or(i64::MAX));
        self.box_queue_overflows
            .set(i64::try_from(snap.box_queue_overflows).unwrap_or(i64::MAX));
        self.webhook_queue_depth
            .set(i64::try_from(snap.webhook_queue_depth).unwrap_or(i64::MAX));
        let (sent, received, dropped, lag) = snap.cluster_notes;
        for (name, n) in [("sent", sent), ("received", received), ("dropped", dropped)] {
            self.cluster_notes
                .get_or_create(&NameLabel {
                    name: name.to_string(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.cluster_lag_ms.set(lag);
        self.cluster_listening
            .set(i64::from(snap.cluster_listening));
        self.forge_statuses_pending.set(snap.forge_statuses_pending);
        for outcome in ["sent", "retried", "failed"] {
            // Listed from the start (0), so a dashboard sees the series before the first send.
            let _ = self.forge_statuses.get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            });
        }
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            // Writing into a String does not fail; say so rather than serve half a page.
            return format!("# metrics encoding failed: {e}\n");
        }
        out
    }
}

fn stage_before(stage: Stage) -> Option<Stage> {
    match stage {
        Stage::Placed => None,
        Stage::Accepted => Some(Stage::Placed),
        Stage::Running => Some(Stage::Accepted),
        Stage::FirstLog => Some(Stage::Running),
        Stage::Followed => Some(Stage::FirstLog),
    }
}

/// Milliseconds as seconds for a histogram (precision past 2^53 ms is not needed).
#[allow(clippy::cast_precision_loss)]
fn seconds(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

#[allow(clippy::cast_precision_loss)]
fn seconds_us(us: u64) -> f64 {
    us as f64 / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_keeps_an_hour_per_minute() {
        let m = Metrics::default();
        let t0 = 1_000 * 60_000;
        m.queue_sampled(t0 + 1_000, 3);
        m.queue_sampled(t0 + 30_000, 7);
        m.queue_sampled(t0 + 30_000, 5);
        m.queue_sampled(t0 + 61_000, 2);
        let r = m.recent(t0 + 61_000);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].start_ms, r[0].queue_max), (t0, 7));
        assert_eq!((r[1].start_ms, r[1].queue_max), (t0 + 60_000, 2));
        assert_eq!(r[0].wait_mean_ms(), None);
        // An hour later the first minutes are gone.
        m.queue_sampled(t0 + 60 * 60_000 + 5, 1);
        let r = m.recent(t0 + 60 * 60_000 + 5);
        assert_eq!(r.first().unwrap().start_ms, t0 + 60_000);
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.webhook("build");
        m.webhook("build");
        m.webhook("bad_signature");
        m.placed(2);
        m.waited_in_queue(1500);
        m.box_violation("seq_ahead");
        m.limit("box_queue", 4096);
        m.webhook_commit(3, 1500);
        let mut snap = Snapshot::default();
        snap.builds_by_state.insert("queued".into(), 3);
        snap.boxes_connected = 2;
        let text = m.render(&snap);
        assert!(text.contains("hive_builds{state=\"queued\"} 3\n"), "{text}");
        assert!(text.contains("hive_builds{state=\"running\"} 0\n"));
        assert!(text.contains("hive_queue_depth 3\n"));
        assert!(text.contains("hive_webhooks_total{outcome=\"build\"} 2\n"));
        assert!(text.contains("hive_webhooks_total{outcome=\"bad_signature\"} 1\n"));
        assert!(text.contains("hive_boxes_connected 2\n"));
        assert!(text.contains("hive_placements_total 2\n"));
        assert!(text.contains("hive_lease_expiries_total 0\n"));
        assert!(text.contains("# TYPE hive_build_queue_wait_seconds histogram\n"));
        assert!(text.contains("hive_build_queue_wait_seconds_count 1\n"));
        assert!(text.contains("hive_build_queue_wait_seconds_bucket{le=\"2.56\"} 1\n"));
        assert!(text.contains("hive_box_violations_total{kind=\"seq_ahead\"} 1\n"));
        assert!(
            text.contains("hive_limit{name=\"box_queue\"} 4096\n"),
            "{text}"
        );
        assert!(text.contains("hive_box_queue_overflows 0\n"));
        assert!(text.contains("hive_webhook_commit_batch_size_bucket{le=\"2.0\"} 0\n"));
        assert!(text.contains("hive_webhook_commit_batch_size_bucket{le=\"4.0\"} 1\n"));
        assert!(text.contains("hive_webhook_commit_seconds_count 1\n"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn start_stages_are_timed_in_order_once() {
        let m = Metrics::default();
        let count = |m: &Metrics, stage: &str| -> u64 {
            let text = m.render(&Snapshot::default());
            let key = format!("hive_build_start_stage_seconds_count{{stage=\"{stage}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(key.as_str()))
                .map_or(0, |n| n.parse().unwrap())
        };
        // Nothing before Placed is timed: this control plane did not place it.
        m.stage("b1", Stage::Accepted);
        assert_eq!(count(&m, "accepted"), 0);
        m.stage("b1", Stage::Placed);
        m.stage("b1", Stage::Accepted);
        m.stage("b1", Stage::Accepted);
        assert_eq!(
            count(&m, "accepted"),
            1,
            "a repeated ACCEPTED is timed once"
        );
        // A stage skipped (RUNNING not seen) times neither it nor the next.
        m.stage("b1", Stage::FirstLog);
        assert_eq!((count(&m, "running"), count(&m, "first_log")), (0, 0));
        m.stage("b1", Stage::Running);
        assert_eq!(
            count(&m, "running"),
            0,
            "a stage after a later one is not timed"
        );
        // A follower that began after the chunk was stored is not timed, and ends the clock.
        m.followed("b1", std::time::Instant::now());
        assert_eq!(count(&m, "followed"), 0);
        assert!(m.stage_clock.lock().unwrap().is_empty());
        // One that was waiting is timed, once.
        let waiting = std::time::Instant::now();
        m.stage("b3", Stage::Placed);
        m.stage("b3", Stage::Accepted);
        m.stage("b3", Stage::Running);
        m.stage("b3", Stage::FirstLog);
        assert_eq!(count(&m, "first_log"), 1);
        m.followed("b3", waiting);
        m.followed("b3", waiting);
        assert_eq!(count(&m, "followed"), 1);
        // A new attempt starts the clock again; an ended build forgets it.
        m.stage("b2", Stage::Placed);
        m.stage("b2", Stage::Accepted);
        m.stage_ended("b2");
        m.stage("b2", Stage::Running);
        assert_eq!((count(&m, "accepted"), count(&m, "running")), (3, 1));
        assert!(m.stage_clock.lock().unwrap().is_empty());
        let text = m.render(&Snapshot::default());
        assert!(
            text.contains(
                "hive_build_start_stage_seconds_bucket{le=\"0.0075\",stage=\"accepted\"} "
            ),
            "{text}"
        );
    }
}
