//! The operations every front end calls, written once below them: the gRPC API, the webhook,
//! the box sessions, the scheduler and the dashboard all submit, cancel, end, drain, place and
//! follow logs through here, so a rule (announce after commit, tell the box, wake the
//! scheduler) lives in one place.
//!
//! Each operation takes the shared [`crate::state::Hive`] and depends only downward (store,
//! registries, events); none knows which front end called it.

pub mod artifacts;
pub mod cancel;
pub mod clone_access;
pub mod drain;
pub mod end;
pub mod keyexchange;
pub mod logs;
pub mod network;
pub mod place;
pub mod submit;
