//! Hive control plane: turns webhooks into builds, stores them, places them on boxes.
//!
//! Layers, each depending only on those below it:
//! - leaves: `store` (SQLite or PostgreSQL), `events` (change announcements), `metrics`,
//!   `sizeclass`, `placement` (the placement policy), `registry` (boxes and connectors in memory),
//!   `auth` (API tokens and their roles, over the store);
//! - `state`: the [`state::Hive`] every service shares;
//! - `domain`: the operations every front end calls (submit, cancel, end, drain, place, key
//!   exchange, network input checks);
//! - services: `grpc` (`api`, `boxes`, `connector`), `http` (`router`, `webhook`, `metrics`) and
//!   the `scheduler`, `retention` and `sampler` tasks, and `forge` (commit statuses back to the
//!   forges: the outbox task and its HTTP client);
//! - `server`: the only module that wires the services together (`start(Config) -> Handle`).
#![forbid(unsafe_code)]

pub mod artifacts;
pub mod auth;
pub mod cluster;
pub mod domain;
pub mod events;
pub mod forge;
pub mod grpc;
pub mod http;
pub mod intake;
pub mod metrics;
pub mod pki;
pub mod placement;
pub mod refglob;
pub mod regions;
pub mod registry;
pub mod repo_url;
pub mod retention;
pub mod sampler;
pub mod scheduler;
pub mod secrets;
pub mod server;
pub mod sizeclass;
pub mod state;
pub mod store;
pub mod tls;
