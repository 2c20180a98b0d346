//! The devices allow-list of a cell's cgroup against the real kernel (cgroup v1 here): a root
//! process inside the group can still use /dev/null and friends but cannot read a block device
//! of the box, even through a node it made itself. Hosts on cgroup v2 skip, loudly (the list
//! needs a BPF program there, which is not written yet).
use std::process::Command;

use hive_jail::cgroup::{Hierarchy, Limits, SANDBOX_DEVICES};

/// A 1 MiB file attached to a loop device; detached on drop.
struct Loop {
    dev: String,
    _file: tempfile::NamedTempFile,
}

impl Loop {
    fn new() -> Loop {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file.path())
            .output()
            .expect("run losetup (util-linux)");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop {
            dev: String::from_utf8(out.stdout).unwrap().trim().to_string(),
            _file: file,
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// Runs `script` under `sh` as root after the shell joined `procs` files; returns (status, output).
fn in_group(procs: &[std::path::PathBuf], script: &str) -> (bool, String) {
    let mut join = String::new();
    for p in procs {
        join.push_str(&format!("echo $$ > {} && ", p.display()));
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{join}{{ {script} ; }} 2>&1"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn a_cell_cgroup_allows_its_character_devices_and_no_block_device() {
    let h = Hierarchy::detect().expect("a cgroup hierarchy");
    if h.version() != 1 {
        eprintln!(
            "SKIP: cgroup v{} host; the devices allow-list is enforced on v1 only",
            h.version()
        );
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI runs on the cgroup v1 machine; this skip would hide the test"
        );
        return;
    }
    let blk = Loop::new();
    let name = format!("dev{}", std::process::id());
    let cg = h
        .create(
            "hive-test-devices",
            &name,
            Limits {
                vcpus: 1,
                memory_bytes: 64 << 20,
                pids_max: 32,
                devices: SANDBOX_DEVICES,
            },
        )
        .expect("create cgroup");
    // Removed even when an assertion fails (a retry must not find it).
    struct Cleanup(hive_jail::cgroup::Cgroup, Hierarchy);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for d in self.0.dirs() {
                let _ = std::fs::remove_dir(d);
            }
            self.1.remove_parent("hive-test-devices");
        }
    }
    let _cleanup = Cleanup(cg.clone(), h.clone());
    let list = cg.devices_list().expect("devices controller on this host");
    assert!(!list.contains("a *:*"), "still allows everything: {list}");
    assert!(list.contains("c 1:3 rwm"), "{list}");
    assert!(list.contains("c 10:200 rwm"), "{list}");
    assert!(!list.lines().any(|l| l.starts_with("b ")), "{list}");

    // Positive control: outside the group, root reads the loop device.
    let outside = Command::new("head")
        .args(["-c", "1", &blk.dev])
        .output()
        .unwrap();
    assert!(
        outside.status.success(),
        "control read of {} failed",
        blk.dev
    );

    // Inside: the character devices work...
    let (ok, out) = in_group(
        &cg.procs_files(),
        "echo x > /dev/null && head -c 4 /dev/urandom > /dev/null && echo fine",
    );
    assert!(ok && out.contains("fine"), "{out}");
    // ...the box's block device does not, nor a node made for it inside.
    let (ok, out) = in_group(&cg.procs_files(), &format!("head -c 1 {}", blk.dev));
    assert!(!ok, "read {} from inside the cell group: {out}", blk.dev);
    assert!(out.contains("Operation not permitted"), "{out}");
    let node = tempfile::tempdir().unwrap();
    let meta = std::fs::metadata(&blk.dev).unwrap();
    let rdev = std::os::unix::fs::MetadataExt::rdev(&meta);
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let (ok, out) = in_group(
        &cg.procs_files(),
        &format!(
            "if mknod {d}/disk b {major} {minor}; then head -c 1 {d}/disk; else echo NO-MKNOD; fi",
            d = node.path().display()
        ),
    );
    // The kernel refuses the mknod itself ('m' is not allowed); were it made, reading it fails.
    assert!(
        out.contains("NO-MKNOD") || (!ok && out.contains("Operation not permitted")),
        "made and read a block node: {out}"
    );

    cg.destroy().await.expect("destroy cgroup");
    h.remove_parent("hive-test-devices");
    for d in cg.dirs() {
        assert!(!d.exists(), "cgroup {} left", d.display());
    }
}
