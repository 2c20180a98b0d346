//! Hive box daemon: keeps warm cells, runs assigned builds in them, reports back.
//!
//! Layout: [`agent`] talks to the control plane, [`pool`] keeps warm cells per size class,
//! [`backend`] is the trait cells are made through ([`microvm`]: one jailed [`vmm`] process per
//! cell; [`sandbox`]: namespaces on the box's kernel), [`jail`] is the namespace/cgroup/seccomp
//! recipe, [`cgroup`] and [`net`] the resources a cell gets, [`cell`] the handle and its CellAgent client, [`reaper`] the clean-up of
//! a previous run.
pub mod agent;
pub mod backend;
pub mod cell;
pub mod config;
pub mod health;
pub mod microvm;
pub mod net;
pub mod pool;
pub mod reaper;
pub mod sandbox;
