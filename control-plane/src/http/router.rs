//! The HTTP routes: `POST /webhooks/{github,gitea,gitlab}` (see `webhook`), `GET /healthz` (answers 200 only
//! when the database answers: the process is alive), `GET /readyz` (200 only when it may take
//! work: database answers, it hears the other control planes, it is not shutting down), `GET /metrics` (see `metrics`) and the dashboard under `/ui/`
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
        .route("/readyz", get(readyz))
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
            Json(json!({
                "ok": true,
                "db": hive.store.kind().name(),
                "hive": hive.regions.name,
                "region": hive.regions.region,
            })),
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

/// Ready to take work: what a load balancer in front of several control planes asks. 503 while
/// the database does not answer, while this control plane cannot hear the others (it would not
/// learn of their changes at once), and once it is shutting down.
async fn readyz(State(hive): State<Arc<Hive>>) -> Response {
    let (sent, received, dropped, lag_ms) = hive.bus.counts();
    let mut why: Option<String> = None;
    if *hive.shutdown.borrow() {
        why = Some("shutting down".into());
    } else if let Err(e) = hive.store.ping().await {
        why = Some(e.to_string());
    } else if !hive.bus.listening() {
        why = Some("not listening to the other control planes (database notifications)".into());
    }
    let body = json!({
        "ready": why.is_none(),
        "control_plane": hive.bus.origin(),
        "hive": hive.regions.name,
        "region": hive.regions.region,
        "peer_hives": hive.regions.peer_names(),
        "db": hive.store.kind().name(),
        "shared_db": hive.bus.is_shared(),
        "box_sessions": hive.registry.connected(),
        "notes": { "sent": sent, "received": received, "dropped": dropped, "last_lag_ms": lag_ms },
        "error": why,
    });
    let code = if why.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}
