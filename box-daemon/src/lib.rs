//! Hive box daemon: keeps warm cells, runs assigned builds in them, reports back.
//!
//! Layout: [`agent`] talks to the control plane, [`pool`] keeps warm cells per size class,
//! [`backend`] is the trait cells are made through (one jailed core; `microvm`: one jailed
//! `hive-vmm` process per cell, `sandbox`: namespaces on the box's kernel), [`net`] the network a
//! cell gets, [`cell`] the handle and its CellAgent client, [`reaper`] the clean-up of a previous
//! run, [`config`] the flags' checks, [`health`] the `/healthz` and `/metrics` endpoints ([`metrics`]), [`identity`] the box id
//! and the host-global names derived from it, [`claim`] the host-wide record that keeps two boxes
//! on one host from sharing them. The jail recipe, cgroups and the VMM launch step are the
//! `hive-jail` crate; the VMM is `hive-vmm`.
pub mod agent;
pub mod backend;
pub mod cell;
pub mod claim;
pub mod config;
pub mod credentials;
pub mod health;
pub mod identity;
pub mod metrics;
pub mod net;
pub mod pool;
pub mod reaper;
