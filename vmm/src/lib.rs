//! The embedded VMM: one microVM per process, on KVM through the rust-vmm crates.
//!
//! `hive-box vmm --config <file.json>` ([`cli::run`]) runs [`builder::run`] for one cell; the box
//! daemon (`hive-box`, which calls into this crate) starts that process inside the cell's jail
//! (`hive-jail`). The VM description is [`VmConfig`], which the box writes with serde.
//!
//! Layout: `config` (what the box asks for) -> `builder` (straight-line set-up and run) over
//! `kvm` (hypervisor trait + KVM), `memory`, `boot`, `cpuid`, and the devices: `serial`,
//! `i8042`, `boottimer`, `virtio::{mmio, block, net, vsock, rng}`, paced by `ratelimit`; `bus`
//! routes exits, `eventloop` is the device thread, `seccomp` the process's allow-list once the VM
//! is built. `cli` is the subcommand; `src/bin/vmm-bench.rs` compares boot times with QEMU.
//!
//! On the development machines KVM is nested and cannot boot Linux; the VMM is proved there with
//! the freestanding test guest in `vmm/guest/` (see `tests/vmm_guest.rs`).

#![deny(missing_docs)]

pub mod boot;
pub mod boottimer;
pub mod builder;
pub mod bus;
pub mod cli;
pub mod config;
pub mod cpuid;
pub mod eventloop;
pub mod i8042;
pub mod kvm;
pub mod memory;
pub mod ratelimit;
pub mod seccomp;
pub mod serial;
pub mod virtio;

pub use builder::{run, Report, RunOptions, VmExit};
pub use config::VmConfig;

/// When this VMM process started (the first call fixes it): the boot timer counts from here, so
/// call it first thing in `main` of a process that runs a VM.
pub fn process_start() -> std::time::Instant {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}
