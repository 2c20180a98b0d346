//! Counters the store does not already hold, and the Prometheus text rendering of `/metrics`
//! (builds by state from the store, webhooks by outcome, boxes connected, queue depth).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// In-process counters (reset on restart, as Prometheus counters may be).
#[derive(Debug, Default)]
pub struct Metrics {
    webhooks: Mutex<BTreeMap<&'static str, u64>>,
    placements: AtomicU64,
    lease_expiries: AtomicU64,
}

/// The numbers that come from elsewhere at scrape time.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub builds_by_state: BTreeMap<String, i64>,
    pub boxes_connected: usize,
    pub boxes_known: usize,
}

impl Metrics {
    /// Counts one webhook request by its outcome (`build`, `duplicate`, `bad_signature` ...).
    pub fn webhook(&self, outcome: &'static str) {
        let mut map = self.webhooks.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(outcome).or_insert(0) += 1;
    }

    pub fn placed(&self, n: u64) {
        self.placements.fetch_add(n, Ordering::Relaxed);
    }

    pub fn lease_expired(&self) {
        self.lease_expiries.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, snap: &Snapshot) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP hive_builds Builds by state.");
        let _ = writeln!(out, "# TYPE hive_builds gauge");
        for state in [
            "queued",
            "placed",
            "running",
            "succeeded",
            "failed",
            "cancelled",
            "timed_out",
        ] {
            let n = snap.builds_by_state.get(state).copied().unwrap_or(0);
            let _ = writeln!(out, "hive_builds{{state=\"{state}\"}} {n}");
        }
        let queued = snap.builds_by_state.get("queued").copied().unwrap_or(0);
        let _ = writeln!(out, "# HELP hive_queue_depth Builds waiting for a box.");
        let _ = writeln!(out, "# TYPE hive_queue_depth gauge");
        let _ = writeln!(out, "hive_queue_depth {queued}");
        let _ = writeln!(
            out,
            "# HELP hive_webhooks_total Webhook requests by outcome."
        );
        let _ = writeln!(out, "# TYPE hive_webhooks_total counter");
        let map = self.webhooks.lock().unwrap_or_else(|e| e.into_inner());
        for (outcome, n) in map.iter() {
            let _ = writeln!(out, "hive_webhooks_total{{outcome=\"{outcome}\"}} {n}");
        }
        drop(map);
        let _ = writeln!(
            out,
            "# HELP hive_boxes_connected Boxes with an open session."
        );
        let _ = writeln!(out, "# TYPE hive_boxes_connected gauge");
        let _ = writeln!(out, "hive_boxes_connected {}", snap.boxes_connected);
        let _ = writeln!(out, "# HELP hive_boxes_known Boxes ever registered.");
        let _ = writeln!(out, "# TYPE hive_boxes_known gauge");
        let _ = writeln!(out, "hive_boxes_known {}", snap.boxes_known);
        let _ = writeln!(out, "# HELP hive_placements_total Builds placed on a box.");
        let _ = writeln!(out, "# TYPE hive_placements_total counter");
        let _ = writeln!(
            out,
            "hive_placements_total {}",
            self.placements.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP hive_lease_expiries_total Leases that ran out.");
        let _ = writeln!(out, "# TYPE hive_lease_expiries_total counter");
        let _ = writeln!(
            out,
            "hive_lease_expiries_total {}",
            self.lease_expiries.load(Ordering::Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.webhook("build");
        m.webhook("build");
        m.webhook("bad_signature");
        let mut snap = Snapshot::default();
        snap.builds_by_state.insert("queued".into(), 3);
        snap.boxes_connected = 2;
        let text = m.render(&snap);
        assert!(text.contains("hive_builds{state=\"queued\"} 3\n"));
        assert!(text.contains("hive_builds{state=\"running\"} 0\n"));
        assert!(text.contains("hive_queue_depth 3\n"));
        assert!(text.contains("hive_webhooks_total{outcome=\"build\"} 2\n"));
        assert!(text.contains("hive_webhooks_total{outcome=\"bad_signature\"} 1\n"));
        assert!(text.contains("hive_boxes_connected 2\n"));
    }
}
