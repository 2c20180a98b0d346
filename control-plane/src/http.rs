//! The HTTP side: `POST /webhooks/github` (see `webhook`), `GET /healthz` (answers 200 only when
//! the database answers) and `GET /metrics` (Prometheus text, see `metrics`).

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::metrics::Snapshot;
use crate::server::Hive;
use crate::webhook;

/// The HTTP routes.
pub fn router(hive: Arc<Hive>) -> Router {
    Router::new()
        .route("/webhooks/github", post(webhook::handle))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        // The webhook reads its body itself, with its own 5 MiB limit and 413.
        .layer(DefaultBodyLimit::disable())
        .with_state(hive)
}

async fn healthz(State(hive): State<Arc<Hive>>) -> Response {
    match hive.store.ping().await {
        Ok(()) => (
            StatusCode::OK,
            Json(json!({ "ok": true, "db": hive.store.kind().name() })),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "health check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "ok": false, "error": e.to_string() })),
            )
                .into_response()
        }
    }
}

async fn metrics(State(hive): State<Arc<Hive>>) -> Response {
    let builds_by_state = match hive.store.count_builds_by_state().await {
        Ok(m) => m,
        Err(e) => {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("metrics: {e}\n")).into_response();
        }
    };
    let boxes_known = hive.store.list_boxes().await.map(|b| b.len()).unwrap_or(0);
    let snap = Snapshot {
        builds_by_state,
        boxes_connected: hive.registry.connected(),
        boxes_known,
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        hive.metrics.render(&snap),
    )
        .into_response()
}
