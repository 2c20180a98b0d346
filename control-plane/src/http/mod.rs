//! The HTTP side: `router` (the routes and `GET /healthz`), `webhook` (`POST /webhooks/github`),
//! `metrics` (`GET /metrics`, OpenMetrics text) and `ui` (the web dashboard under `/ui/`).

pub mod metrics;
pub mod router;
pub mod ui;
pub mod webhook;

pub use router::router;
