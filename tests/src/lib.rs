//! Shared helpers for Hive's end-to-end tests (real processes, real servers).
pub mod chaos;
pub mod cluster;
pub mod controlplane;
pub mod github;
pub mod kvmhost;
pub mod pgserver;
pub mod privnet;
