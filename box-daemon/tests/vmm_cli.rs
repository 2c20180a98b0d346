//! `hive-box vmm --config FILE` as a process: exit codes, error messages, SIGTERM.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn hive_box() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hive-box"))
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

fn guest_elf() -> PathBuf {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        // One directory per process (nextest runs each test in its own process; builds race).
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("hive-test-guest-cli-{}", std::process::id()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmm/guest/build.sh");
        let o = Command::new("sh")
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

/// The host side of the guest's vsock test (see vmm_guest.rs): answer port 5000, then CONNECT
/// to guest port 1024 and check the echo.
fn vsock_host(uds: PathBuf) -> std::thread::JoinHandle<Result<(), String>> {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).expect("bind <uds>_5000");
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        let mut hello = [0u8; 21];
        s.read_exact(&mut hello).map_err(|e| e.to_string())?;
        s.write_all(b"REPLY from host").map_err(|e| e.to_string())?;
        let mut c = UnixStream::connect(&uds).map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        c.write_all(b"CONNECT 1024\n").map_err(|e| e.to_string())?;
        let mut r = BufReader::new(c.try_clone().map_err(|e| e.to_string())?);
        let mut line = String::new();
        r.read_line(&mut line).map_err(|e| e.to_string())?;
        c.write_all(b"ping-from-host").map_err(|e| e.to_string())?;
        let mut echo = [0u8; 19];
        r.read_exact(&mut echo).map_err(|e| e.to_string())?;
        if &echo == b"ECHO:ping-from-host" && line.starts_with("OK ") {
            Ok(())
        } else {
            Err(format!(
                "line {line:?} echo {:?}",
                String::from_utf8_lossy(&echo)
            ))
        }
    })
}

#[test]
fn help_explains_the_subcommand() {
    let o = hive_box().args(["vmm", "--help"]).output().expect("run");
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("--config") && text.contains("HIVE_VMM_CONFIG"),
        "{text}"
    );
}

#[test]
fn bad_config_exits_2_naming_the_problem() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("vm.json");
    std::fs::write(
        &cfg,
        r#"{"kernel": "/nonexistent/vmlinux", "memory_mib": 64}"#,
    )
    .expect("write");
    let o = hive_box()
        .arg("vmm")
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("kernel = /nonexistent/vmlinux"), "{err}");

    std::fs::write(
        &cfg,
        r#"{"kernel": "/bin/true", "memory_mib": 64, "vcpu": 2}"#,
    )
    .expect("write");
    let o = hive_box()
        .arg("vmm")
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown field `vcpu`"));

    // A file that is not a kernel: refused at load, with its path.
    std::fs::write(&cfg, r#"{"kernel": "/etc/hostname", "memory_mib": 64}"#).expect("write");
    let o = hive_box()
        .arg("vmm")
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/etc/hostname"));
}

#[test]
fn guest_reset_exits_0_and_sigterm_exits_143() {
    if !kvm_or_skip("guest_reset_exits_0_and_sigterm_exits_143") {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("vm.json");
    let log = dir.path().join("console.log");
    // Every device path but the TAP, under the process's seccomp allow-list: block, rng, and
    // vsock in both directions with a real host peer.
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk");
    let uds = dir.path().join("h.sock");
    let host = vsock_host(uds.clone());
    std::fs::write(
        &cfg,
        serde_json::json!({"kernel": guest_elf(), "memory_mib": 16, "rng": true, "serial": {"path": log},
                           "block": [{"path": disk}], "vsock": {"guest_cid": 5, "uds_path": uds}})
        .to_string(),
    )
    .expect("write");
    let o = hive_box()
        .arg("vmm")
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run");
    let console = std::fs::read_to_string(&log).expect("console");
    assert_eq!(
        o.status.code(),
        Some(0),
        "stderr: {}\nconsole: {console}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(console.contains("DONE ok=3 fail=0"), "{console}");
    host.join()
        .expect("host thread")
        .expect("vsock exchange under seccomp");

    // A guest waiting forever for a vsock peer that never answers, then SIGTERM.
    let uds = dir.path().join("v.sock");
    let _silent =
        std::os::unix::net::UnixListener::bind(format!("{}_5000", uds.display())).expect("bind");
    std::fs::write(
        &cfg,
        serde_json::json!({"kernel": guest_elf(), "memory_mib": 16, "serial": {"path": log},
                           "vsock": {"guest_cid": 9, "uds_path": uds}})
        .to_string(),
    )
    .expect("write");
    let mut child = hive_box()
        .arg("vmm")
        .arg("--config")
        .arg(&cfg)
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().expect("poll").is_none(),
        "guest should still be running"
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(143));
    assert!(t0.elapsed() < Duration::from_secs(5));
}
