//! `GET /metrics`: the gauges that live elsewhere (builds by state from the store, boxes from
//! the registry and the store) are read at scrape time, then `crate::metrics` encodes everything.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::metrics::Snapshot;
use crate::state::Hive;

/// The OpenMetrics text format (Prometheus reads it, as it read the plain text before).
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub async fn metrics(State(hive): State<Arc<Hive>>) -> Response {
    let builds_by_state = match hive.store.count_builds_by_state().await {
        Ok(m) => m,
        Err(e) => {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("metrics: {e}\n")).into_response();
        }
    };
    let boxes_known = hive
        .store
        .count_boxes()
        .await
        .ok()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0);
    let snap = Snapshot {
        builds_by_state,
        boxes_connected: hive.registry.connected(),
        boxes_known,
        box_queue_overflows: hive.registry.overflows(),
        webhook_queue_depth: hive.intake.queued(),
        cluster_notes: hive.bus.counts(),
        cluster_listening: hive.bus.listening(),
        forge_statuses_pending: hive.store.count_pending_statuses().await.unwrap_or(0),
    };
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        hive.metrics.render(&snap),
    )
        .into_response()
}
