//! The HTTP routes: `POST /webhooks/{github,gitea,gitlab}` (see `webhook`), `GET /healthz` (answers 200 only
//! when the database answers), `GET /metrics` (see `metrics`) and the dashboard under `/ui/`
//! (see `ui`). Every request, body included, must be answered within the configured timeout
//! (408 otherwise: a sender trickling its body holds nothing for long), and only so many are
//! handled at once; the dashboard's event streams go on after their answer, bounded by their
//! own limit (`ui::MAX_LIVE_STREAMS`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::http::{metrics, ui, webhook};
use crate::state::Hive;

/// The HTTP routes.
pub fn router(hive: Arc<Hive>, timeout: Duration, concurrency: usize) -> Router {
    Router::new()
        .route("/webhooks/github", post(webhook::github))
        .route("/webhooks/gitea", post(webhook::gitea))
        .route("/webhooks/gitlab", post(webhook::gitlab))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics::metrics))
        // The dashboard (`/ui/...`): its own state (sessions) and a small body limit.
        .merge(ui::router(hive.clone()))
        // The webhook reads its body itself, with its own 5 MiB limit and 413.
        .layer(DefaultBodyLimit::disable())
        // Shared by all connections (a per-connection limit would bound nothing).
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(concurrency))
        // Outermost: time spent waiting for a turn counts too.
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
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
