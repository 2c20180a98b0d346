//! Hive control plane: turns webhooks into builds, stores them, places them on boxes.
//!
//! `server` composes the parts: the `store` (SQLite or PostgreSQL), the HTTP side (`http`,
//! `webhook`, `metrics`), the gRPC side (`api` for operators, `boxes` for box daemons), the
//! `scheduler` task, `sizeclass` configuration and `events` (change announcements); private
//! networks (`network`, `keyexchange`, `connector`: issue 5).
#![forbid(unsafe_code)]

pub mod api;
pub mod boxes;
pub mod connector;
pub mod events;
pub mod http;
pub mod keyexchange;
pub mod metrics;
pub mod network;
pub mod scheduler;
pub mod server;
pub mod sizeclass;
pub mod store;
pub mod webhook;
