//! The test guest (vmm/guest) through the real VMM on the real /dev/kvm.
//!
//! The guest drives every device by polling and prints `OK <dev>` / `FAIL <dev> <why>`; these
//! tests give it real peers: a raw disk file, a Unix-socket host for vsock (both directions), a
//! TAP in a private network namespace with an AF_PACKET peer answering its ping frame, and the
//! host's getrandom. Without an openable /dev/kvm they say so loudly and skip.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hive_vmm::{self as vmm, VmConfig, VmExit};

/// Whether /dev/kvm opens; without it the test skips, loudly. Under `CI=true` it fails instead:
/// CI has KVM, and a skip there would pass an untested VMM.
fn kvm_or_skip(test: &str) -> bool {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
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

/// Builds the guest once per test binary with the project's script.
fn guest_elf() -> PathBuf {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        // One directory per process: nextest runs each test in its own process, and two builds
        // into one directory race (one moves the file the other is about to move).
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("hive-test-guest-{}", std::process::id()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build.sh");
        let o = std::process::Command::new("sh")
            .arg(&script)
            .arg(&out)
            .output()
            .expect("run guest/build.sh");
        assert!(
            o.status.success(),
            "guest build failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out.join("hive-test-guest.elf")
    })
    .clone()
}

fn config(v: serde_json::Value) -> VmConfig {
    let cfg: VmConfig = serde_json::from_value(v).expect("config parses");
    cfg.validate().expect("config valid");
    cfg
}

fn run_vm(cfg: &VmConfig) -> vmm::Report {
    vmm::run(
        cfg,
        Arc::new(AtomicBool::new(false)),
        vmm::RunOptions::default(),
    )
    .expect("VM runs")
}

fn console(path: &Path) -> String {
    std::fs::read_to_string(path).expect("console log")
}

/// Host side of the guest's vsock test: answers its connection to port 5000, then connects in
/// to guest port 1024 and checks the echo. Returns what it saw, for the assertions.
fn vsock_host(uds: PathBuf) -> std::thread::JoinHandle<Result<String, String>> {
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).expect("bind <uds>_5000");
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        let mut hello = [0u8; 21];
        s.read_exact(&mut hello)
            .map_err(|e| format!("read guest hello: {e}"))?;
        if &hello != b"HELLO from hive guest" {
            return Err(format!("guest said {:?}", String::from_utf8_lossy(&hello)));
        }
        s.write_all(b"REPLY from host")
            .map_err(|e| format!("reply: {e}"))?;

        // Host-initiated: CONNECT to the guest's listening port, Firecracker style.
        let mut c =
            UnixStream::connect(&uds).map_err(|e| format!("connect {}: {e}", uds.display()))?;
        c.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        c.write_all(b"CONNECT 1024\n").map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(c.try_clone().map_err(|e| e.to_string())?);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .map_err(|e| format!("read OK line: {e}"))?;
        if !line.starts_with("OK ") {
            return Err(format!("CONNECT answered {line:?}"));
        }
        c.write_all(b"ping-from-host").map_err(|e| e.to_string())?;
        let mut echo = [0u8; 19];
        reader
            .read_exact(&mut echo)
            .map_err(|e| format!("read echo: {e}"))?;
        if &echo != b"ECHO:ping-from-host" {
            return Err(format!("echo was {:?}", String::from_utf8_lossy(&echo)));
        }
        Ok(line.trim().to_owned())
    })
}

const ETH_HIVE: u16 = 0x88b5;

/// An AF_PACKET socket on `ifname` for the guest's ethertype.
fn packet_socket(ifname: &str) -> OwnedFd {
    // SAFETY: plain socket(2) call; the result is checked and owned immediately.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(ETH_HIVE.to_be())) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).expect("ifname");
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index > 0, "no interface {ifname}");
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_HIVE.to_be();
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a valid sockaddr_ll and the length passed matches it.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
    fd
}

/// The guest's TAP peer: waits for its HIVE-PING frame and answers HIVE-PONG to its MAC.
fn tap_peer(fd: OwnedFd) -> std::thread::JoinHandle<Result<[u8; 6], String>> {
    std::thread::spawn(move || {
        let tv = libc::timeval {
            tv_sec: 30,
            tv_usec: 0,
        };
        // SAFETY: setting SO_RCVTIMEO with a valid timeval of the right size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: `buf` is writable for its full length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(format!("recv on TAP: {}", std::io::Error::last_os_error()));
            }
            let f = &buf[..n as usize];
            if f.len() < 14 + 9 || &f[14..23] != b"HIVE-PING" {
                continue;
            }
            let mut guest_mac = [0u8; 6];
            guest_mac.copy_from_slice(&f[6..12]);
            let mut reply = [0u8; 60];
            reply[..6].copy_from_slice(&guest_mac);
            reply[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0xfe]);
            reply[12..14].copy_from_slice(&ETH_HIVE.to_be_bytes());
            reply[14..23].copy_from_slice(b"HIVE-PONG");
            // SAFETY: `reply` is readable for its full length; the socket is bound to the TAP.
            let sent = unsafe { libc::send(fd.as_raw_fd(), reply.as_ptr().cast(), reply.len(), 0) };
            if sent != reply.len() as isize {
                return Err(format!("send on TAP: {}", std::io::Error::last_os_error()));
            }
            return Ok(guest_mac);
        }
    })
}

fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("run ip");
    assert!(st.success(), "ip {args:?} failed");
}

#[test]
fn test_guest_reports_every_device_ok_through_the_vmm() {
    if !kvm_or_skip("test_guest_reports_every_device_ok_through_the_vmm") {
        return;
    }
    let elf = guest_elf();
    let dir = tempfile::tempdir().expect("tmp");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk");
    let uds = dir.path().join("v.sock");
    let log = dir.path().join("console.log");
    let host = vsock_host(uds.clone());

    // The VM and the TAP live in a private network namespace, made on this thread only.
    let (report, mac) = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare only affects this thread's network namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            );
            ip(&["tuntap", "add", "dev", "hvtap0", "mode", "tap"]);
            ip(&["link", "set", "hvtap0", "up"]);
            let peer = tap_peer(packet_socket("hvtap0"));
            let cfg = config(serde_json::json!({
                "kernel": elf,
                "memory_mib": 32,
                "serial": {"path": log},
                "block": [{"path": disk}],
                "net": [{"tap": "hvtap0", "mac": "02:48:49:56:45:01"}],
                "vsock": {"guest_cid": 3, "uds_path": uds},
                "rng": true,
            }));
            let report = run_vm(&cfg);
            (report, peer.join().expect("tap peer thread"))
        })
        .join()
        .expect("VM thread")
    });
    let out = console(&log);
    eprintln!("--- guest console ---\n{out}---");
    assert_eq!(
        report.exit,
        VmExit::Reset,
        "guest should stop via i8042 reset"
    );
    assert!(
        out.contains("HIVE-GUEST boot=pvh"),
        "booted through the PVH entry"
    );
    for dev in ["OK block rw", "OK rng", "OK vsock", "OK net"] {
        assert!(out.lines().any(|l| l.starts_with(dev)), "missing `{dev}`");
    }
    assert!(!out.contains("FAIL"), "a device failed");
    assert!(out.contains("DONE ok=4 fail=0"));
    assert_eq!(
        mac.expect("TAP peer saw the ping"),
        [0x02, 0x48, 0x49, 0x56, 0x45, 0x01]
    );
    let ok_line = host
        .join()
        .expect("vsock host thread")
        .expect("vsock host exchange");
    assert!(ok_line.starts_with("OK "), "{ok_line}");
    // The pattern the guest wrote is on the disk file (second-to-last sector).
    let data = std::fs::read(&disk).expect("disk");
    let sector = &data[data.len() - 1024..data.len() - 512];
    assert!(
        sector
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i as u32 * 7 + 0x5a) as u8),
        "sector pattern on disk"
    );
    assert!(report
        .cmdline
        .contains("virtio_mmio.device=4K@0xd0000000:5"));
}

#[test]
fn linux64_entry_and_read_only_disk() {
    if !kvm_or_skip("linux64_entry_and_read_only_disk") {
        return;
    }
    let elf = guest_elf();
    let dir = tempfile::tempdir().expect("tmp");
    let disk = dir.path().join("ro.img");
    std::fs::write(&disk, vec![0xa5u8; 64 * 1024]).expect("disk");
    let log = dir.path().join("console.log");
    let cfg = config(serde_json::json!({
        "kernel": elf,
        "boot": "linux64",
        "memory_mib": 16,
        "serial": {"path": log},
        "block": [{"path": disk, "read_only": true}],
        "rng": true,
    }));
    let report = run_vm(&cfg);
    let out = console(&log);
    eprintln!("--- guest console ---\n{out}---");
    assert_eq!(report.exit, VmExit::Reset);
    assert!(
        out.contains("HIVE-GUEST boot=linux64"),
        "entered through the 64-bit Linux protocol"
    );
    assert!(out
        .lines()
        .any(|l| l.starts_with("OK block ro sectors=128")));
    assert!(out.lines().any(|l| l.starts_with("OK rng")));
    assert!(out.contains("DONE ok=2 fail=0"));
    assert_eq!(
        std::fs::read(&disk).expect("disk"),
        vec![0xa5u8; 64 * 1024],
        "read-only disk unchanged"
    );
}

/// A guest bigger than the space below the MMIO hole: RAM in two KVM slots (0..3.25 GiB and
/// from 4 GiB), still booting and finishing, and costing only what it touches.
#[test]
fn a_six_gib_guest_gets_ram_on_both_sides_of_the_mmio_hole() {
    if !kvm_or_skip("a_six_gib_guest_gets_ram_on_both_sides_of_the_mmio_hole") {
        return;
    }
    let elf = guest_elf();
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("console.log");
    let cfg = config(serde_json::json!({
        "kernel": elf,
        "boot": "linux64",
        "memory_mib": 6 * 1024,
        "serial": {"path": log},
        "rng": true,
    }));
    let report = run_vm(&cfg);
    let out = console(&log);
    eprintln!("--- guest console ---\n{out}---");
    assert_eq!(report.exit, VmExit::Reset);
    assert!(out.lines().any(|l| l.starts_with("OK rng")), "{out}");
    assert!(out.contains("DONE ok=1 fail=0"), "{out}");
}

#[test]
fn stop_flag_ends_a_guest_that_never_resets() {
    if !kvm_or_skip("stop_flag_ends_a_guest_that_never_resets") {
        return;
    }
    // The guest waits (polling) for a vsock host peer that never answers, so it is still running
    // when the stop flag is set; the VMM must kick the vCPU out of KVM_RUN and return.
    let elf = guest_elf();
    let dir = tempfile::tempdir().expect("tmp");
    let uds = dir.path().join("v.sock");
    let _listener = UnixListener::bind(format!("{}_5000", uds.display())).expect("silent host");
    let cfg = config(serde_json::json!({
        "kernel": elf,
        "memory_mib": 16,
        "serial": {"path": dir.path().join("console.log")},
        "vsock": {"guest_cid": 7, "uds_path": uds},
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            stop.store(true, std::sync::atomic::Ordering::Release);
        })
    };
    let t0 = std::time::Instant::now();
    let report = vmm::run(&cfg, stop, vmm::RunOptions::default()).expect("runs");
    stopper.join().expect("stopper");
    assert_eq!(report.exit, VmExit::Stopped);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t0.elapsed()
    );
}

#[test]
fn two_vcpus_boot_and_the_waiting_ap_is_kicked_out_at_the_end() {
    if !kvm_or_skip("two_vcpus_boot_and_the_waiting_ap_is_kicked_out_at_the_end") {
        return;
    }
    // vCPU 1 sits in KVM_RUN waiting for INIT/SIPI the whole time (the guest never starts it);
    // when vCPU 0 resets the VM, the VMM must get vCPU 1 out of the kernel and return.
    let elf = guest_elf();
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("console.log");
    let cfg = config(serde_json::json!({
        "kernel": elf,
        "vcpus": 2,
        "memory_mib": 16,
        "serial": {"path": log},
        "rng": true,
    }));
    let t0 = std::time::Instant::now();
    let report = run_vm(&cfg);
    assert_eq!(report.exit, VmExit::Reset);
    assert!(console(&log).contains("DONE ok=1 fail=0"));
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn block_rate_limit_paces_the_guest() {
    if !kvm_or_skip("block_rate_limit_paces_the_guest") {
        return;
    }
    // The guest's block test makes 4 requests (write, read, flush, read past the end). With an
    // ops bucket of 1 refilled every 150 ms, the last three each wait for a token.
    let elf = guest_elf();
    let dir = tempfile::tempdir().expect("tmp");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk");
    let log = dir.path().join("console.log");
    let cfg = config(serde_json::json!({
        "kernel": elf,
        "memory_mib": 16,
        "serial": {"path": log},
        "block": [{"path": disk, "rate_limit": {"ops": {"size": 1, "refill_time_ms": 150}}}],
    }));
    let report = run_vm(&cfg);
    let out = console(&log);
    assert_eq!(report.exit, VmExit::Reset, "{out}");
    assert!(out.lines().any(|l| l.starts_with("OK block rw")), "{out}");
    assert!(
        report.elapsed >= Duration::from_millis(400),
        "4 requests at 1 per 150 ms finished in {:?}",
        report.elapsed
    );
}

/// `vmm-bench` (issue 16) boots the test guest in our VMM and in QEMU side by side and prints
/// boots per second per core for both, with the ratio: the figures are there and not zero.
#[test]
fn vmm_bench_prints_boots_per_second_per_core() {
    if !kvm_or_skip("vmm_bench_prints_boots_per_second_per_core") {
        return;
    }
    // The baseline is QEMU's: on a KVM machine without it there is nothing to compare with.
    // CI installs it (deploy/install-deps.sh), so there a missing QEMU fails.
    let qemu = std::env::var("HIVE_BENCH_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    if std::process::Command::new(&qemu)
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "{qemu} not found, and CI=true requires the benchmark's QEMU baseline"
        );
        eprintln!("\n!!!!!!!! SKIPPING vmm_bench_prints_boots_per_second_per_core: {qemu} not found !!!!!!!!\n");
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmm-bench"))
        .args(["--rounds", "1", "--boots", "4"])
        .env("HIVE_BENCH_GUEST", guest_elf())
        .output()
        .expect("run vmm-bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "vmm-bench failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("boots/s/core"))
        .unwrap_or_else(|| panic!("no boots/s/core line:\n{text}"));
    let figures: Vec<f64> = line
        .split([' ', ','])
        .filter_map(|w| w.trim_end_matches('x').parse::<f64>().ok())
        .collect();
    // 4 boots, cores at once, then hive-vmm's rate, QEMU's, and the ratio.
    assert!(
        figures.len() >= 3 && figures[figures.len() - 3..].iter().all(|f| *f > 0.0),
        "figures missing in {line:?}"
    );
}
