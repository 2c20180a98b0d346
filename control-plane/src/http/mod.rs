//! The HTTP side: `router` (the routes and `GET /healthz`), `webhook` (`POST /webhooks/github`)
//! and `metrics` (`GET /metrics`, OpenMetrics text).

pub mod metrics;
pub mod router;
pub mod webhook;

pub use router::router;
