//! `hive-cell` as a real PID 1, the way a sandbox cell runs it: new mount/pid/net/uts/ipc
//! namespaces, chrooted into an overlay of a Debian rootfs with the daemon at /sbin/hive-cell,
//! the box's /run/hive bind mount and /images/build (read-only) in place, a /dev the "box"
//! made. Checks the PID 1 mounts, a build, and that Shutdown powers the cell off. Needs root.

use hive_cell::client;
use hive_proto::v1::{
    BuildState, CellEventKind, CellEventsRequest, CellHealthRequest, RunBuildRequest,
    ShutdownRequest,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn build_image() -> PathBuf {
    if let Ok(p) = std::env::var("HIVE_BUILD_IMAGE") {
        return p.into();
    }
    let mut bases: Vec<PathBuf> = std::fs::read_dir("/var/cache/hive/images")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("base-"))
        .map(|e| e.path().join("rootfs"))
        .filter(|p| p.join("usr/bin/git").exists())
        .collect();
    bases.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    bases
        .pop()
        .unwrap_or_else(|| PathBuf::from("/var/cache/hive/dev-build-image"))
}

fn git(dir: &Path, args: &[&str]) {
    let st = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .status()
        .unwrap();
    assert!(st.success(), "git {args:?}");
}

/// Kills the cell if the test fails half way (unshare --kill-child takes the namespace along).
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const SCRIPT: &str = r#"set -e
D=$1 IMAGE=$2 BIN=$3 SRV=$4 NET=$5
mount --make-rprivate /
mkdir -p $D/upper $D/work $D/root $D/run
mount -t overlay overlay -o lowerdir=$IMAGE,upperdir=$D/upper,workdir=$D/work $D/root
mkdir -p $D/root/run/hive $D/root/images/build $D/root/var/lib/hive
touch $D/root/sbin/hive-cell
mount --bind $BIN $D/root/sbin/hive-cell
mount --bind $D/run $D/root/run/hive
mount --bind $IMAGE $D/root/images/build
mount -o remount,bind,ro $D/root/images/build
mount -t tmpfs -o mode=755 tmpfs $D/root/dev
for n in null zero full random urandom tty; do
    touch $D/root/dev/$n
    mount --bind /dev/$n $D/root/dev/$n
done
# The build container's network link is a TUN pair: the cell needs /dev/net/tun.
mkdir -p $D/root/dev/net
touch $D/root/dev/net/tun
mount --bind /dev/net/tun $D/root/dev/net/tun
ip link set lo up
ip addr add 198.18.0.2/32 dev lo
git daemon --listen=198.18.0.2 --base-path=$SRV --export-all --reuseaddr $SRV &
cd $D/root
exec chroot . /sbin/hive-cell --cell-id pid1-cell --container-net $NET
"#;

#[tokio::test]
async fn pid1_mounts_builds_and_powers_off() {
    let image = build_image();
    assert!(
        image.join("usr/bin/git").exists(),
        "no build image at {}",
        image.display()
    );
    let net = if image.join("usr/sbin/ip").exists() && image.join("usr/sbin/nft").exists() {
        "isolated"
    } else {
        "cell"
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let work = d.join("repo-work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("version"), "pid1\n").unwrap();
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "one"]);
    let srv = d.join("srv");
    std::fs::create_dir_all(&srv).unwrap();
    git(d, &["clone", "-q", "--bare", "repo-work", "srv/repo.git"]);

    let mut child = Guard(
        Command::new("unshare")
            .args([
                "--mount",
                "--pid",
                "--net",
                "--uts",
                "--ipc",
                "--fork",
                "--kill-child",
            ])
            .args(["sh", "-c", SCRIPT, "pid1-test"])
            .arg(d)
            .arg(&image)
            .arg(env!("CARGO_BIN_EXE_hive-cell"))
            .arg(&srv)
            .arg(net)
            // The daemon inside reads these as in-cell paths: a host path from the caller's
            // environment (test.sh, a developer shell) must not leak into the chroot.
            .env_remove("HIVE_BUILD_IMAGE")
            .env_remove("HIVE_CELL_LISTEN")
            .env_remove("HIVE_WORK_DIR")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn unshare (root needed)"),
    );
    let child = &mut child.0;

    let sock = d.join("run/agent.sock");
    let addr = format!("unix:{}", sock.display());
    let t0 = Instant::now();
    let mut c = loop {
        if let Ok(mut c) = client::connect(&addr).await {
            if c.health(CellHealthRequest {}).await.is_ok() {
                break c;
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("cell exited early: {st:?}");
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no Health in 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let h = c.health(CellHealthRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (h.cell_id.as_str(), h.state.as_str()),
        ("pid1-cell", "idle")
    );

    // The daemon is unshare's child; its mounts as PID 1 made them (paths relative to its root).
    let daemon_pid =
        std::fs::read_to_string(format!("/proc/{}/task/{}/children", child.id(), child.id()))
            .unwrap()
            .trim()
            .to_string();
    let mountinfo = std::fs::read_to_string(format!("/proc/{daemon_pid}/mountinfo")).unwrap();
    let points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .collect();
    for want in [
        "/proc",
        "/sys",
        "/tmp",
        "/run",
        "/run/hive",
        "/var/lib/hive",
        "/dev/pts",
    ] {
        assert!(points.contains(&want), "{want} not mounted: {points:?}");
    }
    // /run/hive (the box's bind mount) must sit on the /run tmpfs, not be hidden under it.
    let field = |l: &str, i: usize| l.split(' ').nth(i).unwrap_or("").to_string();
    let run = mountinfo.lines().rfind(|l| field(l, 4) == "/run").unwrap();
    let hive = mountinfo
        .lines()
        .rfind(|l| field(l, 4) == "/run/hive")
        .unwrap();
    assert_eq!(
        field(hive, 1),
        field(run, 0),
        "/run/hive not on /run:\n{mountinfo}"
    );
    assert!(run.contains(" - tmpfs "), "{run}");
    let hostname = Command::new("nsenter")
        .args(["-t", &daemon_pid, "-u", "hostname"])
        .output()
        .unwrap();
    let hostname = String::from_utf8_lossy(&hostname.stdout).to_string();
    assert_eq!(hostname.trim(), "pid1-cell");

    c.run_build(RunBuildRequest {
        build_id: "b-pid1".into(),
        repo_url: "git://198.18.0.2/repo.git".into(),
        steps: vec!["cat version; hostname".into()],
        timeout_secs: 60,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut s = c
        .events(CellEventsRequest {
            build_id: "b-pid1".into(),
            from_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    let mut all = Vec::new();
    let mut last = None;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(60), s.message())
        .await
        .unwrap()
        .unwrap()
    {
        if ev.step == 1 && ev.kind == CellEventKind::Log as i32 {
            out.extend_from_slice(&ev.data);
        }
        if ev.kind == CellEventKind::Log as i32 {
            all.extend_from_slice(&ev.data);
        }
        last = Some(ev);
    }
    let last = last.unwrap();
    assert_eq!(
        last.state,
        BuildState::Succeeded as i32,
        "{}\n{}",
        last.message,
        String::from_utf8_lossy(&all)
    );
    assert_eq!(
        String::from_utf8_lossy(&out),
        "$ cat version; hostname\npid1\npid1-cell\n"
    );

    // Shutdown: kill everything, sync, reboot(RB_POWER_OFF), which ends the pid namespace.
    c.shutdown(ShutdownRequest {}).await.unwrap();
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "cell still running after Shutdown"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
