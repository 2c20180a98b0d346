//! `hive-box vmm` inside the box's jail (`hive-box jail --spec`): overlay root from the Debian
//! base image, pivot_root, new mount/pid/uts/ipc namespaces, no-new-privileges, the jail's
//! seccomp deny-list and then the VMM's own allow-list, with /dev/kvm bound in. The test guest
//! reports block, rng and vsock (both directions, host peer outside the jail) through it.
//! Skips loudly without /dev/kvm or without the base image (deploy/images/build-images.sh).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hive_jail::{BindSpec, JailSpec, RootSpec};

fn base_rootfs() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("HIVE_BUILD_IMAGE") {
        return Some(PathBuf::from(p));
    }
    let cache = std::env::var("HIVE_CACHE").unwrap_or_else(|_| "/var/cache/hive".into());
    std::fs::read_dir(Path::new(&cache).join("images"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("base-"))
        .map(|e| e.path().join("rootfs"))
        .find(|p| p.join("lib").exists() || p.join("usr/lib").exists())
}

fn vsock_host(uds: PathBuf) -> std::thread::JoinHandle<Result<(), String>> {
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
fn vmm_runs_the_test_guest_inside_the_jail() {
    if !kvm_or_skip("VMM-in-jail test") {
        return;
    }
    let Some(rootfs) = base_rootfs() else {
        eprintln!(
            "\n!!!!!!!! SKIPPING VMM-in-jail test: no base image (deploy/images/build-images.sh) !!!!!!!!\n"
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let cell = dir.path().join("cell");
    std::fs::create_dir_all(&cell).expect("cell dir");
    // The guest, disk and config live in the cell directory, bound at /cell inside the jail.
    let out = dir.path().join("guest-build");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmm/guest/build.sh");
    let o = Command::new("sh")
        .arg(&script)
        .arg(&out)
        .output()
        .expect("build guest");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::copy(out.join("hive-test-guest.elf"), cell.join("guest.elf")).expect("copy guest");
    std::fs::File::create(cell.join("disk.img"))
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk");
    std::fs::write(
        cell.join("vm.json"),
        serde_json::json!({
            "kernel": "/cell/guest.elf",
            "memory_mib": 16,
            "kvm_device": "/run/kvm",
            "serial": {"path": "/cell/console.log"},
            "block": [{"path": "/cell/disk.img"}],
            "vsock": {"guest_cid": 3, "uds_path": "/cell/v.sock"},
            "rng": true,
        })
        .to_string(),
    )
    .expect("config");
    // The host side talks to the same socket files through the host path of the cell dir.
    let host = vsock_host(cell.join("v.sock"));

    for d in ["upper", "work", "merged"] {
        std::fs::create_dir_all(dir.path().join(d)).expect("overlay dir");
    }
    let spec = JailSpec {
        hostname: "vmm-jail-test".into(),
        root: RootSpec {
            lower: rootfs,
            upper: dir.path().join("upper"),
            work: dir.path().join("work"),
            merged: dir.path().join("merged"),
            idmapped_lower: None,
        },
        binds: vec![
            BindSpec {
                source: PathBuf::from(env!("CARGO_BIN_EXE_hive-box")),
                target: PathBuf::from("/usr/local/bin/hive-box"),
                readonly: true,
                idmap: false,
            },
            BindSpec {
                source: PathBuf::from("/dev/kvm"),
                target: PathBuf::from("/run/kvm"),
                readonly: false,
                idmap: false,
            },
            BindSpec {
                source: cell.clone(),
                target: PathBuf::from("/cell"),
                readonly: false,
                idmap: false,
            },
        ],
        netns: None,
        cgroup_procs: vec![],
        pid_file: dir.path().join("vmm.pid"),
        program: PathBuf::from("/usr/local/bin/hive-box"),
        args: vec!["vmm".into(), "--config".into(), "/cell/vm.json".into()],
        env: BTreeMap::new(),
        seccomp: true,
        seccomp_profile: hive_jail::SeccompProfile::DenyList,
        userns: None,
        keep_caps: None,
        sysfs: false,
        tmpfs: Vec::new(),
    };
    let spec_path = dir.path().join("jail.json");
    std::fs::write(&spec_path, serde_json::to_string(&spec).expect("json")).expect("spec");
    let o = Command::new(env!("CARGO_BIN_EXE_hive-box"))
        .arg("jail")
        .arg("--spec")
        .arg(&spec_path)
        .output()
        .expect("run jail helper");
    let console = std::fs::read_to_string(cell.join("console.log")).unwrap_or_default();
    eprintln!("--- guest console (jailed VMM) ---\n{console}---");
    assert_eq!(
        o.status.code(),
        Some(0),
        "jailed VMM failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for dev in ["OK block rw", "OK rng", "OK vsock"] {
        assert!(console.lines().any(|l| l.starts_with(dev)), "missing {dev}");
    }
    assert!(console.contains("DONE ok=3 fail=0"));
    host.join()
        .expect("host thread")
        .expect("vsock through the jail");
}
