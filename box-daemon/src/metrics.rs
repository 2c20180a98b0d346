//! The box's Prometheus metrics, served at `GET /metrics` beside `/healthz` ([`crate::health`]).
//!
//! A build's start on this box, by stage: `hive_box_dispatch_stage_seconds{stage}`, each stage
//! timed from the one before on the box's monotonic clock (the cell's clock does not enter):
//!
//! | stage | from the stage before to |
//! | --- | --- |
//! | `cell` | (the assignment received) a cell taken from the pool: at once when warm |
//! | `tunnel` | the private network's keys exchanged with the cell (private builds only) |
//! | `run_build` | the cell answered RunBuild |
//! | `events` | the cell's Events stream opened |
//! | `first_event` | its first event (the box reports RUNNING) |
//! | `first_output` | its first output line |
//!
//! and the whole of it, assignment received -> first output line, as
//! `hive_box_dispatch_seconds` (the `dispatch_ms` of `/healthz`, as a histogram).
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// 0.5 ms to 30 s, each at most 2x the last and 1.5x from 3 ms on (the control plane's
/// `hive_build_start_stage_seconds` has the same, so the two read side by side).
const BUCKETS: [f64; 28] = [
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
];

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

/// The stages of a build's start on the box, in order (see the module's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Cell,
    Tunnel,
    RunBuild,
    Events,
    FirstEvent,
    FirstOutput,
}

impl Stage {
    const ALL: [Stage; 6] = [
        Stage::Cell,
        Stage::Tunnel,
        Stage::RunBuild,
        Stage::Events,
        Stage::FirstEvent,
        Stage::FirstOutput,
    ];

    fn name(self) -> &'static str {
        match self {
            Stage::Cell => "cell",
            Stage::Tunnel => "tunnel",
            Stage::RunBuild => "run_build",
            Stage::Events => "events",
            Stage::FirstEvent => "first_event",
            Stage::FirstOutput => "first_output",
        }
    }
}

/// The box's metrics.
pub struct Metrics {
    registry: Registry,
    stages: Family<StageLabel, Histogram, fn() -> Histogram>,
    dispatch: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let stages: Family<StageLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(histogram);
        registry.register(
            "hive_box_dispatch_stage_seconds",
            "A build's start on this box by stage, each from the stage before: cell (taken from \
             the pool), tunnel (private builds), run_build, events (stream opened), first_event, \
             first_output",
            stages.clone(),
        );
        let dispatch = histogram();
        registry.register(
            "hive_box_dispatch_seconds",
            "Assignment received -> the cell's first output line",
            dispatch.clone(),
        );
        // Every stage shows, at 0 samples, before the first build.
        for stage in Stage::ALL {
            let _ = stages.get_or_create(&StageLabel {
                stage: stage.name(),
            });
        }
        Metrics {
            registry,
            stages,
            dispatch,
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// A clock for one build's start, from `received` (its assignment).
    pub fn start_clock(self: &Arc<Self>, received: Instant) -> StartClock {
        StartClock {
            metrics: Arc::clone(self),
            received,
            last: received,
            marked: [false; Stage::ALL.len()],
        }
    }
}

/// Times one build's start: each stage once, from the stage marked before it.
#[derive(Debug)]
pub struct StartClock {
    metrics: Arc<Metrics>,
    received: Instant,
    last: Instant,
    marked: [bool; Stage::ALL.len()],
}

impl StartClock {
    /// `stage` has ended now. A stage is timed once: an Events stream opened again after a
    /// retry is not a second sample.
    pub fn mark(&mut self, stage: Stage) {
        let i = Stage::ALL.iter().position(|s| *s == stage).unwrap_or(0);
        if self.marked[i] {
            return;
        }
        self.marked[i] = true;
        let now = Instant::now();
        self.metrics
            .stages
            .get_or_create(&StageLabel {
                stage: stage.name(),
            })
            .observe(now.duration_since(self.last).as_secs_f64());
        self.last = now;
        if stage == Stage::FirstOutput {
            self.metrics
                .dispatch
                .observe(now.duration_since(self.received).as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The count of `family`'s samples with `label` in `text` (its `_count` line).
    fn count(text: &str, family: &str, label: &str) -> u64 {
        text.lines()
            .find(|l| l.starts_with(&format!("{family}_count")) && l.contains(label))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {family}_count with {label} in\n{text}"))
    }

    #[test]
    fn each_stage_is_timed_once_and_the_whole_at_the_first_output() {
        let m = Arc::new(Metrics::new());
        let before = m.encode();
        assert_eq!(
            count(
                &before,
                "hive_box_dispatch_stage_seconds",
                "stage=\"run_build\""
            ),
            0
        );
        let mut clock = m.start_clock(Instant::now());
        clock.mark(Stage::Cell);
        clock.mark(Stage::RunBuild);
        clock.mark(Stage::Events);
        // The stream opened again after a retry: not a second sample.
        clock.mark(Stage::Events);
        clock.mark(Stage::FirstEvent);
        clock.mark(Stage::FirstOutput);
        let text = m.encode();
        for (stage, n) in [
            ("cell", 1),
            ("tunnel", 0),
            ("run_build", 1),
            ("events", 1),
            ("first_event", 1),
            ("first_output", 1),
        ] {
            assert_eq!(
                count(
                    &text,
                    "hive_box_dispatch_stage_seconds",
                    &format!("stage=\"{stage}\"")
                ),
                n,
                "{stage}"
            );
        }
        assert!(text.contains("hive_box_dispatch_seconds_count 1"), "{text}");
    }
}
