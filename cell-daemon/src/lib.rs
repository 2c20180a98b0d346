//! Hive cell daemon: PID 1 inside a cell; serves `hive.v1.CellAgent` and runs the cell's one build
//! in a container (own mount, pid, uts, ipc and net namespaces over a copy-on-write overlay of the
//! read-only build image, as the unprivileged `build` user).
//!
//! The binary (`src/main.rs`) is thin: it parses flags, does the PID 1 duties ([`init`]), starts the
//! zombie [`reaper`], and serves the [`agent`]. The [`container`] module also holds the two small
//! helper modes the daemon re-executes itself in (`__container-init`, `__container-exec`), because a
//! multi-threaded tokio process must not set up namespaces after `fork` itself.

pub mod agent;
pub mod artifacts;
pub mod build;
pub mod client;
pub mod config;
pub mod container;
pub mod init;
pub mod listen;
pub mod log;
pub mod mask;
pub mod pipeline;
pub mod privnet;
pub mod ratelimit;
pub mod reaper;
pub mod source;
pub mod tunpair;

/// The version string reported by Health.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
