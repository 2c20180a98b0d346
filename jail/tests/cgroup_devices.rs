//! The devices allow-list of a cell's cgroup against the real kernel (cgroup v1 here): a root
//! process inside the group can still use /dev/null and friends but cannot read a block device
//! of the box, even through a node it made itself. The same for the cgroup v2 BPF device program
//! (`hive_jail::devices`), on a v2 hierarchy: this host's hybrid `unified` mount (no controllers,
//! but device programs work on any v2 group) or a v2 host's root.
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
                devices_v2: true,
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

/// The v2 devices policy: the BPF program attached to a real cgroup2 group, a root shell in it.
#[test]
fn a_v2_group_with_the_bpf_program_allows_its_character_devices_and_no_block_device() {
    let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(std::path::Path::new)
        .find(|p| {
            nix::sys::statfs::statfs(*p)
                .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
                .unwrap_or(false)
        });
    let Some(root) = root else {
        eprintln!("SKIP: no cgroup2 mount on this host");
        return;
    };
    let blk = Loop::new();
    let dir = root.join(format!("hive-test-bpf-{}", std::process::id()));
    std::fs::create_dir(&dir).expect("make a cgroup2 group");
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for _ in 0..50 {
                if std::fs::remove_dir(&self.0).is_ok() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let procs = vec![dir.join("cgroup.procs")];
    // Without the program the group lets root read the block device (the control).
    let (ok, out) = in_group(&procs, &format!("head -c 1 {} > /dev/null", blk.dev));
    assert!(ok, "control read in the group failed: {out}");

    hive_jail::devices::enforce(SANDBOX_DEVICES, &dir).expect("attach the device program");
    let (ok, out) = in_group(
        &procs,
        "echo x > /dev/null && head -c 4 /dev/urandom > /dev/null && : < /dev/zero && echo fine",
    );
    assert!(ok && out.contains("fine"), "{out}");
    let (ok, out) = in_group(&procs, &format!("head -c 1 {}", blk.dev));
    assert!(!ok, "read {} from inside the group: {out}", blk.dev);
    assert!(out.contains("Operation not permitted"), "{out}");
    let node = tempfile::tempdir().unwrap();
    let meta = std::fs::metadata(&blk.dev).unwrap();
    let rdev = std::os::unix::fs::MetadataExt::rdev(&meta);
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let (_, out) = in_group(
        &procs,
        &format!(
            "if mknod {d}/disk b {major} {minor}; then head -c 1 {d}/disk; else echo NO-MKNOD; fi",
            d = node.path().display()
        ),
    );
    assert!(
        out.contains("NO-MKNOD") || out.contains("Operation not permitted"),
        "made and read a block node: {out}"
    );
    // A character device off the list (/dev/mem is 1:1) is refused too.
    let (ok, out) = in_group(
        &procs,
        &format!(
            "mknod {d}/mem c 1 1 2>/dev/null; head -c 1 {d}/mem",
            d = node.path().display()
        ),
    );
    assert!(!ok, "read /dev/mem's node from inside the group: {out}");
}
