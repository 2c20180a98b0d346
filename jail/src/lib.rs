//! How Hive shuts a cell's process in, for both cell backends of the box daemon.
//!
//! The box daemon (multi-threaded) never forks to build a jail: it re-executes its own binary as
//! `hive-box jail --spec FILE`, a single-threaded helper that follows [`recipe`] (cgroup, netns,
//! mount/pid/uts/ipc namespaces, overlay root, binds, minimal /dev, pivot_root, for a sandbox cell
//! its own user namespace ([`userns`]), a capability keep-list ([`caps`]), no_new_privs, a
//! [`seccomp`] profile, exec). [`devices`] is the cgroup v2 devices policy (a BPF program). [`cgroup`] makes and removes the cell's control group (v1 and
//! v2). For a microVM cell the jailed program is [`launch`] (`hive-box vmm-launch`), which gives
//! the jail its device nodes, drops to the cell's uid and execs the VMM; [`libs`] lists the shared
//! libraries the VMM binary needs bound into that otherwise empty root. Error chains for the
//! helpers' last words are `hive_sys::error_chain`.
//!
//! Neighbours: `hive-box` (the backends write the specs and spawn the helper), `hive-vmm` (the
//! program a microVM jail ends up running; it adds its own seccomp allow-list).

pub mod caps;
pub mod cgroup;
pub mod devices;
pub mod launch;
pub mod libs;
pub mod recipe;
pub mod seccomp;
pub mod userns;

pub use recipe::{BindSpec, JailError, JailSpec, RootSpec, SeccompProfile, TmpfsSpec};
