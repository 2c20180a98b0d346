//! The gRPC services: `api` (`hive.v1.ControlPlane`, for operators and hivectl), `boxes`
//! (`hive.v1.BoxAgent`, one session per box daemon) and `connector` (`hive.v1.Connector`, one
//! session per hive-connector). Each holds an `Arc` of the shared state and calls the domain
//! operations; `server` mounts them, with the standard health and reflection services.

pub mod api;
pub mod boxes;
pub mod connector;
