//! The web dashboard (issue 15), under `/ui/` on the HTTP listener: server-rendered pages
//! (maud: compile-time templates that escape every interpolated value unless told otherwise),
//! a stylesheet and a small script embedded in the binary, and Server-Sent Events for the live
//! parts (the builds list, a build's state and log).
//!
//! - `session`: sign-in with an API token, the cookie session and its CSRF token;
//! - `pages`: the pages (builds, a build, fleet, projects, networks), the raw log, the
//!   cancel and rebuild forms;
//! - `live`: the event streams, fed by `events::Events` and `domain::logs::follow`;
//! - `ansi`: a build log as numbered, escaped HTML lines with its colours.
//!
//! Every page and stream needs a session (else a redirect to the sign-in page); what a session
//! may do is its token's role, checked with the same rights as the gRPC API (`auth::Right`:
//! cancel and rebuild need `Submit`, bound to a submitter's project). Each answer carries a
//! Content-Security-Policy that allows only this server's own script and style, so even markup
//! that slipped through escaping could not run.

pub mod ansi;
pub mod live;
pub mod pages;
pub mod session;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequestParts, Request};
use axum::http::header::{self, HeaderValue};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::Semaphore;

use crate::auth::{self, Caller};
use crate::state::Hive;
use session::{Session, Sessions};

/// Largest form body the dashboard reads (a token, a CSRF token).
pub const MAX_FORM_BYTES: usize = 16 * 1024;
/// Most event streams open at once (they hold no request slot once answered).
pub const MAX_LIVE_STREAMS: usize = 256;

/// What the dashboard's handlers share.
#[derive(Debug)]
pub struct Ui {
    pub hive: Arc<Hive>,
    pub sessions: Sessions,
    /// One permit per open event stream.
    pub live: Arc<Semaphore>,
}

/// The dashboard's routes, to merge into the HTTP router.
pub fn router<S>(hive: Arc<Hive>) -> Router<S> {
    let ui = Arc::new(Ui {
        hive,
        sessions: Sessions::default(),
        live: Arc::new(Semaphore::new(MAX_LIVE_STREAMS)),
    });
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/builds") }))
        .route("/ui/", get(|| async { Redirect::to("/ui/builds") }))
        .route("/ui/signin", get(pages::signin_form).post(pages::signin))
        .route("/ui/signout", post(pages::signout))
        .route("/ui/static/ui.css", get(pages::css))
        .route("/ui/static/ui.js", get(pages::js))
        .route("/ui/builds", get(pages::builds))
        .route("/ui/builds/events", get(live::builds))
        .route("/ui/builds/{id}", get(pages::build))
        .route("/ui/builds/{id}/events", get(live::build))
        .route("/ui/builds/{id}/log.txt", get(pages::raw_log))
        .route("/ui/builds/{id}/artifacts/{*path}", get(pages::artifact))
        .route("/ui/builds/{id}/cancel", post(pages::cancel))
        .route("/ui/builds/{id}/rebuild", post(pages::rebuild))
        .route("/ui/boxes", get(pages::boxes))
        .route("/ui/projects", get(pages::projects))
        .route("/ui/projects/{name}", get(pages::project))
        .route("/ui/networks", get(pages::networks))
        .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
        .layer(middleware::from_fn(security_headers))
        .with_state(ui)
}

/// Whether a POST came from another site, by the browser's own word (`Sec-Fetch-Site`, which
/// a page cannot forge and a proxy does not rewrite, unlike `Origin` against `Host`). Clients
/// that send no such header (scripts, old browsers) are judged by the CSRF token alone.
fn cross_site_post(req: &Request) -> bool {
    req.method() == axum::http::Method::POST
        && req
            .headers()
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v != "same-origin" && v != "none")
}

/// Refuses cross-site POSTs (the sign-in form too, which has no session to hold a CSRF token
/// yet), then adds the headers every dashboard answer carries.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = if cross_site_post(&req) {
        tracing::debug!(path = %req.uri().path(), "dashboard: cross-site POST refused");
        UiError::Forbidden("this form was sent from another site".to_string()).into_response()
    } else {
        next.run(req).await
    };
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

/// A request with a live session: its caller (looked up again from the token's hash) and the
/// session (for its CSRF token).
#[derive(Debug, Clone)]
pub struct Signed {
    pub caller: Caller,
    pub session: Session,
    pub session_id: String,
}

impl FromRequestParts<Arc<Ui>> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, ui: &Arc<Ui>) -> Result<Self, Response> {
        let to_signin = || {
            // Back to the page after signing in (a path of ours only: never an open redirect).
            let next = parts.uri.path();
            let target = if next.starts_with("/ui/")
                && !next.contains("/events")
                && next
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b))
            {
                format!("/ui/signin?next={next}")
            } else {
                "/ui/signin".to_string()
            };
            Redirect::to(&target).into_response()
        };
        let Some(id) = session::session_id(&parts.headers) else {
            return Err(to_signin());
        };
        let Some(session) = ui.sessions.get(&id) else {
            return Err(to_signin());
        };
        match auth::authenticate_hash(&ui.hive.store, &session.token_hash).await {
            Ok(caller) => Ok(Signed {
                caller,
                session,
                session_id: id,
            }),
            Err(status) if status.code() == tonic::Code::Unauthenticated => {
                // Revoked since sign-in: the session is over.
                ui.sessions.remove(&id);
                Err(to_signin())
            }
            Err(status) => Err(UiError::Internal(status.message().to_string()).into_response()),
        }
    }
}

/// What a dashboard request can fail with; each becomes a small page with its status.
#[derive(Debug, thiserror::Error)]
pub enum UiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error("too many live streams open; try again later")]
    Busy,
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<crate::store::StoreError> for UiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::warn!(error = %e, "dashboard: store error");
        UiError::Internal(e.to_string())
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let status = match &self {
            UiError::NotFound(_) => StatusCode::NOT_FOUND,
            UiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            UiError::Forbidden(_) => StatusCode::FORBIDDEN,
            UiError::Conflict(_) => StatusCode::CONFLICT,
            UiError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            UiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, pages::error_page(status, &self.to_string())).into_response()
    }
}
