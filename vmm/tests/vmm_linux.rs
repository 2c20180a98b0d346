//! A real Linux kernel (the project's guest kernel, built by deploy/guest from Debian's
//! linux-source and cached under ${HIVE_CACHE:-/var/cache/hive}/kernel/<hash>/vmlinux) entered
//! through our VMM's PVH path on this machine's KVM.
//!
//! The nested KVM here runs guest code at about a microsecond per instruction, so Linux does not
//! get to init in test time; what this checks is the boot contract: the kernel takes our PVH
//! start info (command line, e820 map) and finds our MP table. Skips loudly without /dev/kvm or
//! without a built kernel (set HIVE_GUEST_KERNEL to point at one).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hive_vmm::{self as vmm, VmConfig, VmExit};

fn kernel() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("HIVE_GUEST_KERNEL") {
        // The directory build-kernel.sh prints (meaning `<dir>/vmlinux`), or the file itself.
        let p = PathBuf::from(p);
        return Some(if p.is_dir() { p.join("vmlinux") } else { p });
    }
    let cache = std::env::var("HIVE_CACHE").unwrap_or_else(|_| "/var/cache/hive".into());
    let dir = std::fs::read_dir(PathBuf::from(cache).join("kernel")).ok()?;
    dir.filter_map(|e| e.ok())
        .map(|e| e.path().join("vmlinux"))
        .find(|p| p.exists())
}

/// Whether /dev/kvm opens; without it the test skips, loudly. Under `CI=true` it fails instead:
/// CI has KVM, and a skip there would pass an untested VMM.
fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => panic!(
            "{test}: cannot open /dev/kvm ({e}), and CI=true requires the VMM tests to run \
             (a skip there would pass an untested VMM)"
        ),
        Err(e) => {
            eprintln!("\n!!!!!!!! SKIPPING {test}: cannot open /dev/kvm ({e}); the VMM was NOT tested !!!!!!!!\n");
            false
        }
    }
}

#[test]
fn linux_takes_our_pvh_start_info_and_mp_table() {
    if !kvm_or_skip("linux PVH boot test") {
        return;
    }
    let Some(kernel) = kernel() else {
        eprintln!(
            "\n!!!!!!!! SKIPPING linux PVH boot test: no guest kernel built \
             (deploy/guest, or set HIVE_GUEST_KERNEL) !!!!!!!!\n"
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("console.log");
    let cfg: VmConfig = serde_json::from_value(serde_json::json!({
        "kernel": kernel,
        "memory_mib": 256,
        "vcpus": 2,
        "cmdline": "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 hive.cell_id=t1",
        "serial": {"path": log},
        "rng": true,
    }))
    .expect("config");
    cfg.validate().expect("valid");

    // Watch the console; stop the VM once the MP table line is out (or after the budget).
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let log = log.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(90) {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("found SMP MP-table") {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            stop.store(true, Ordering::Release);
        })
    };
    let report = vmm::run(&cfg, stop, vmm::RunOptions::default()).expect("VM runs");
    watcher.join().expect("watcher");
    let out = std::fs::read_to_string(&log).expect("console");
    eprintln!("--- linux console ---\n{out}---");
    assert_eq!(
        report.exit,
        VmExit::Stopped,
        "the kernel must still be running when stopped"
    );
    assert!(out.contains("Linux version"), "kernel printed its banner");
    assert!(
        out.contains("hive.cell_id=t1 virtio_mmio.device=4K@0xd0000000:5"),
        "command line from the PVH start info"
    );
    assert!(
        out.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"),
        "e820 map from the PVH memory map"
    );
    assert!(
        out.contains("found SMP MP-table at [mem 0x0009fc00"),
        "our MP table"
    );
}
