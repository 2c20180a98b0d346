//! `hive-box vmm --config <file.json>`: run one microVM in this process.
//!
//! Exit codes: 0 the guest reset itself (normal end), 2 bad config or set-up failure, 3 a vCPU
//! shut down (triple fault), 4 a vCPU failed, 143 stopped by SIGTERM/SIGINT. The box daemon
//! runs this inside the cell's jail and destroys the cell whatever the code.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};

use super::builder;
use super::config::VmConfig;

/// Arguments of the `vmm` subcommand.
#[derive(Debug, Clone, clap::Args)]
#[command(about = "Run one microVM (a cell) in this process until the guest resets or a vCPU dies")]
pub struct VmmArgs {
    /// VM description (JSON): kernel, cmdline, boot, vcpus, memory_mib, serial, block[], net[],
    /// vsock, rng. Unknown fields are rejected.
    #[arg(long, env = "HIVE_VMM_CONFIG")]
    pub config: PathBuf,
    /// Do not install the VMM's seccomp allow-list (diagnosis only: a guest-reachable bug is
    /// then not contained by it).
    #[arg(long, env = "HIVE_VMM_NO_SECCOMP")]
    pub no_seccomp: bool,
}

/// Exit code for configuration and set-up errors.
pub const EXIT_SETUP: i32 = 2;

/// Runs the subcommand; returns the process exit code. Must be called before any other thread
/// exists (it blocks SIGTERM/SIGINT so a dedicated thread can wait for them).
pub fn run(args: &VmmArgs) -> i32 {
    super::process_start();
    let cfg = match VmConfig::from_file(&args.config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %hive_sys::error_chain(&e), "invalid VM config");
            eprintln!("hive-box vmm: {}", hive_sys::error_chain(&e));
            return EXIT_SETUP;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    if let Err(e) = signals.thread_block() {
        eprintln!("hive-box vmm: block SIGTERM/SIGINT: {e}");
        return EXIT_SETUP;
    }
    {
        let stop = stop.clone();
        // The builder installs the seccomp allow-list on every thread (TSYNC) once the VM is
        // built. A thread that is still starting then (glibc registers rseq, the robust futex
        // list and its signal mask; std sets its name and alternate signal stack) makes syscalls
        // the list does not allow and the whole VMM is killed with SIGSYS: on a loaded host this
        // thread may not have run yet when the VM is ready. So wait until it has started.
        let (started_tx, started_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let spawned = std::thread::Builder::new()
            .name("vmm-signals".into())
            .spawn(move || {
                let _ = started_tx.send(());
                drop(started_tx);
                if let Ok(sig) = signals.wait() {
                    tracing::info!(signal = %sig, "stopping VM");
                    stop.store(true, Ordering::Release);
                }
            });
        if let Err(e) = spawned {
            eprintln!("hive-box vmm: spawn signal thread: {e}");
            return EXIT_SETUP;
        }
        if started_rx.recv().is_err() {
            eprintln!("hive-box vmm: signal thread ended before it started waiting");
            return EXIT_SETUP;
        }
    }
    let opts = builder::RunOptions {
        seccomp: !args.no_seccomp,
    };
    if args.no_seccomp {
        tracing::warn!("seccomp allow-list disabled (--no-seccomp)");
    }
    match builder::run(&cfg, stop, opts) {
        Ok(report) => {
            tracing::info!(
                exit = ?report.exit,
                guest_resident_kib = report.guest_resident_bytes / 1024,
                elapsed_ms = report.elapsed.as_millis() as u64,
                "VM ended"
            );
            report.exit.exit_code()
        }
        Err(e) => {
            tracing::error!(error = %hive_sys::error_chain(&e), "VM set-up failed");
            eprintln!("hive-box vmm: {}", hive_sys::error_chain(&e));
            EXIT_SETUP
        }
    }
}
