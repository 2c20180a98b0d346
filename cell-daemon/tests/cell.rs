//! The real `hive-cell` binary, in a fresh mount+pid+net namespace made with `unshare`, building
//! a real repository served by a real `git daemon` (on 198.18.0.2, a "public" address inside
//! that namespace), over a real Debian build image. Needs root.
//!
//! Build image: `HIVE_BUILD_IMAGE`, else the newest `deploy/images/build-images.sh` base under
//! /var/cache/hive/images, else /var/cache/hive/dev-build-image (see cell-daemon/README.md).

use hive_cell::client;
use hive_proto::v1::cell_agent_client::CellAgentClient;
use hive_proto::v1::{
    BuildState, CellCancelRequest, CellEvent, CellEventKind, CellEventsRequest, CellHealthRequest,
    LogStream, RunBuildRequest, ShutdownRequest,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const T: Duration = Duration::from_secs(60);

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
    if let Some(p) = bases.pop() {
        return p;
    }
    let dev = PathBuf::from("/var/cache/hive/dev-build-image");
    assert!(
        dev.join("usr/bin/git").exists(),
        "no build image: set HIVE_BUILD_IMAGE, run deploy/images/build-images.sh, or make {} \
         (debootstrap --variant=minbase --include=git,ca-certificates bookworm DIR, plus user \
         build 1000:1000)",
        dev.display()
    );
    dev
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A test repository with two commits; returns (dir holding repo.git, first commit, second).
fn make_repo(root: &Path) -> (PathBuf, String, String) {
    let work = root.join("repo-work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("version"), "one\n").unwrap();
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "one"]);
    let first = git(&work, &["rev-parse", "HEAD"]);
    std::fs::write(work.join("version"), "two\n").unwrap();
    git(&work, &["commit", "-q", "-am", "two"]);
    let second = git(&work, &["rev-parse", "HEAD"]);
    let srv = root.join("srv");
    std::fs::create_dir_all(&srv).unwrap();
    git(
        root,
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            srv.join("repo.git").to_str().unwrap(),
        ],
    );
    (srv, first, second)
}

/// One cell daemon in its own namespaces.
struct Cell {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    child: Child,
    first: String,
    second: String,
}

const REPO: &str = "git://198.18.0.2/repo.git";

impl Cell {
    async fn start(extra: &[&str]) -> (Cell, CellAgentClient<Channel>) {
        let dir = tempfile::tempdir().unwrap();
        let (srv, first, second) = make_repo(dir.path());
        let sock = dir.path().join("agent.sock");
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        let script = format!(
            "set -e\n\
             ip link set lo up\n\
             ip addr add 198.18.0.2/32 dev lo\n\
             git daemon --listen=198.18.0.2 --base-path={srv} --export-all --reuseaddr {srv} &\n\
             exec \"$@\"\n",
            srv = srv.display()
        );
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--pid",
                "--net",
                "--fork",
                "--mount-proc",
                "--kill-child",
            ])
            .args(["sh", "-c", &script, "cell-test"])
            .arg(env!("CARGO_BIN_EXE_hive-cell"))
            .args(["--init", "no", "--cell-id", "test-cell"])
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--build-image")
            .arg(build_image())
            .arg("--work-dir")
            .arg(&work)
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn unshare (root needed)");
        let addr = format!("unix:{}", sock.display());
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = loop {
            if sock.exists() {
                if let Ok(mut c) = client::connect(&addr).await {
                    // ready = listening and the build container set up ahead (warm).
                    if let Ok(h) = c.health(CellHealthRequest {}).await {
                        if h.into_inner().ready {
                            break c;
                        }
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "cell daemon did not answer Health ready=true in 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        (
            Cell {
                _dir: dir,
                sock,
                child,
                first,
                second,
            },
            client,
        )
    }

    fn image_path(&self) -> PathBuf {
        build_image()
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        // unshare --kill-child takes the daemon (PID 1 of the namespace) and so everything in it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn req(id: &str, steps: &[&str]) -> RunBuildRequest {
    RunBuildRequest {
        build_id: id.into(),
        repo_url: REPO.into(),
        steps: steps.iter().map(|s| s.to_string()).collect(),
        timeout_secs: 120,
        ..Default::default()
    }
}

async fn events(c: &mut CellAgentClient<Channel>, id: &str, from: u64) -> Vec<CellEvent> {
    let mut s = c
        .events(CellEventsRequest {
            build_id: id.into(),
            from_seq: from,
        })
        .await
        .expect("Events")
        .into_inner();
    let mut out = Vec::new();
    tokio::time::timeout(T, async {
        while let Some(ev) = s.message().await.expect("event stream") {
            out.push(ev);
        }
    })
    .await
    .expect("build did not finish in time");
    out
}

fn output(evs: &[CellEvent], step: u32, stream: LogStream) -> String {
    let bytes: Vec<u8> = evs
        .iter()
        .filter(|e| {
            e.kind == CellEventKind::Log as i32 && e.step == step && e.stream == stream as i32
        })
        .flat_map(|e| e.data.clone())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn finished(evs: &[CellEvent]) -> (BuildState, i32, String) {
    let last = evs.last().expect("no events");
    assert_eq!(
        last.kind,
        CellEventKind::BuildFinished as i32,
        "last event: {last:?}"
    );
    (
        BuildState::try_from(last.state).unwrap(),
        last.exit_code,
        last.message.clone(),
    )
}

#[tokio::test]
async fn build_runs_steps_in_order_as_build_user_and_replays() {
    let (cell, mut c) = Cell::start(&[]).await;
    let mut r = req(
        "b-ok",
        &[
            "for i in $(seq 1 300); do echo line $i; done",
            "cat version; git rev-parse HEAD",
            "id -u; id -g; hostname; echo \"HOME=$HOME FOO=$FOO\"",
            "touch /usr/bin/hive-was-here 2>/dev/null && echo wrote-image || echo cannot-write-image",
            "grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status; grep NoNewPrivs /proc/self/status",
            "ls /proc | grep -cE '^[0-9]+$'; echo to-stderr >&2",
        ],
    );
    r.revision = cell.first.clone();
    r.env = [("FOO".to_string(), "bar baz".to_string())].into();
    c.run_build(r.clone()).await.expect("RunBuild");

    // Two live subscribers and, afterwards, a replay from an offset all see the same log.
    let mut c2 = c.clone();
    let (a, b) = tokio::join!(events(&mut c, "b-ok", 0), events(&mut c2, "", 0));
    assert_eq!(a, b);
    let (state, code, msg) = finished(&a);
    assert_eq!(
        state,
        BuildState::Succeeded,
        "{msg}\n{}",
        output(&a, 0, LogStream::System)
    );
    assert_eq!(code, 0);
    for (i, e) in a.iter().enumerate() {
        assert_eq!(e.seq, i as u64, "seqs must be dense from 0");
    }
    let expect: String = (1..=300).map(|i| format!("line {i}\n")).collect();
    assert_eq!(output(&a, 1, LogStream::Stdout), expect);
    assert_eq!(
        output(&a, 2, LogStream::Stdout),
        format!("one\n{}\n", cell.first),
        "checked out the requested revision, not the tip {}",
        cell.second
    );
    assert_eq!(
        output(&a, 3, LogStream::Stdout),
        "1000\n1000\ntest-cell\nHOME=/work FOO=bar baz\n"
    );
    assert_eq!(output(&a, 4, LogStream::Stdout), "cannot-write-image\n");
    assert!(!cell.image_path().join("usr/bin/hive-was-here").exists());
    let caps = output(&a, 5, LogStream::Stdout);
    assert!(caps.contains("CapEff:\t0000000000000000"), "{caps}");
    assert!(caps.contains("CapBnd:\t0000000000000000"), "{caps}");
    assert!(caps.contains("NoNewPrivs:\t1"), "{caps}");
    let pids: u32 = output(&a, 6, LogStream::Stdout).trim().parse().unwrap();
    assert!(
        pids <= 5,
        "the container sees only its own processes, saw {pids}"
    );
    assert_eq!(output(&a, 6, LogStream::Stderr), "to-stderr\n");
    let clone_log = output(&a, 0, LogStream::System);
    assert!(
        clone_log.contains(&format!("checked out {}", cell.first)),
        "{clone_log}"
    );
    let started: Vec<u32> = a
        .iter()
        .filter(|e| e.kind == CellEventKind::StepStarted as i32)
        .map(|e| e.step)
        .collect();
    assert_eq!(started, vec![0, 1, 2, 3, 4, 5, 6]);

    let replay = events(&mut c, "b-ok", 17).await;
    assert_eq!(replay, a[17..].to_vec());

    let again = c.run_build(req("b-two", &["true"])).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    let h = c.health(CellHealthRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (h.state.as_str(), h.cell_id.as_str()),
        ("finished", "test-cell")
    );
    drop(cell);
}

#[tokio::test]
async fn failing_step_fails_the_build_with_its_exit_code() {
    let (_cell, mut c) = Cell::start(&[]).await;
    c.run_build(req(
        "b-fail",
        &[
            "echo first",
            "make test 2>/dev/null || exit 3",
            "echo never",
        ],
    ))
    .await
    .unwrap();
    let evs = events(&mut c, "b-fail", 0).await;
    let (state, code, msg) = finished(&evs);
    assert_eq!(state, BuildState::Failed);
    assert_eq!(code, 3);
    assert_eq!(
        msg,
        "step 2 `make test 2>/dev/null || exit 3` exited with 3"
    );
    assert_eq!(output(&evs, 3, LogStream::Stdout), "");
    let fin: Vec<(u32, i32)> = evs
        .iter()
        .filter(|e| e.kind == CellEventKind::StepFinished as i32)
        .map(|e| (e.step, e.exit_code))
        .collect();
    assert_eq!(fin, vec![(0, 0), (1, 0), (2, 3)]);
}

#[tokio::test]
async fn timeout_stops_the_running_step() {
    let (_cell, mut c) = Cell::start(&["--kill-grace-ms", "1000"]).await;
    let mut r = req("b-slow", &["echo start; sleep 100; echo never"]);
    r.repo_url.clear(); // no clone phase: an empty /work/src
    r.timeout_secs = 2;
    let t0 = Instant::now();
    c.run_build(r).await.unwrap();
    let evs = events(&mut c, "b-slow", 0).await;
    let took = t0.elapsed();
    let (state, _code, msg) = finished(&evs);
    assert_eq!(state, BuildState::TimedOut, "{msg}");
    assert!(msg.contains("timed out after 2 s"), "{msg}");
    assert_eq!(output(&evs, 1, LogStream::Stdout), "start\n");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert!(output(&evs, 0, LogStream::System).contains("empty /work/src"));
}

#[tokio::test]
async fn cancel_stops_the_step_and_escalates_to_sigkill() {
    let (_cell, mut c) = Cell::start(&["--kill-grace-ms", "1000"]).await;
    // The shell ignores SIGTERM and keeps restarting sleeps: only SIGKILL ends it.
    c.run_build(req(
        "b-cancel",
        &["trap '' TERM; echo started; while :; do sleep 0.2; done"],
    ))
    .await
    .unwrap();
    let mut s = c
        .events(CellEventsRequest {
            build_id: "b-cancel".into(),
            from_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    tokio::time::timeout(T, async {
        while let Some(ev) = s.message().await.unwrap() {
            let started = ev.step == 1 && ev.data == b"started\n";
            seen.push(ev);
            if started {
                return;
            }
        }
        panic!("stream ended before the step started");
    })
    .await
    .unwrap();
    let t0 = Instant::now();
    c.cancel(CellCancelRequest {
        build_id: "b-cancel".into(),
        state: BuildState::Cancelled as i32,
        reason: "cancelled by test".into(),
    })
    .await
    .unwrap();
    tokio::time::timeout(T, async {
        while let Some(ev) = s.message().await.unwrap() {
            seen.push(ev);
        }
    })
    .await
    .unwrap();
    let took = t0.elapsed();
    let (state, code, msg) = finished(&seen);
    assert_eq!(state, BuildState::Cancelled);
    assert_eq!(msg, "cancelled by test");
    assert_eq!(code, 128 + 9, "killed by SIGKILL after the grace period");
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let bad = c
        .cancel(CellCancelRequest {
            build_id: "b-cancel".into(),
            state: BuildState::Succeeded as i32,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let (_cell, mut c) = Cell::start(&[]).await;
    let e = c
        .events(CellEventsRequest {
            build_id: "x".into(),
            from_seq: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    let e = c.run_build(req("", &["true"])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("build_id"), "{}", e.message());
    let mut r = req("b1", &["true"]);
    r.repo_url = "--upload-pack=touch /tmp/x".into();
    let e = c.run_build(r).await.unwrap_err();
    assert!(e.message().contains("repo_url"), "{}", e.message());
    // A clone that fails (no such repository) fails the build at phase 0.
    let mut r = req("b2", &["echo never"]);
    r.repo_url = "git://198.18.0.2/missing.git".into();
    c.run_build(r).await.unwrap();
    let evs = events(&mut c, "b2", 0).await;
    let (state, _, msg) = finished(&evs);
    assert_eq!(state, BuildState::Failed);
    assert!(
        msg.starts_with("clone of git://198.18.0.2/missing.git"),
        "{msg}"
    );
    let e = c
        .events(CellEventsRequest {
            build_id: "other".into(),
            from_seq: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn shutdown_cancels_the_build_and_ends_the_daemon() {
    let (mut cell, mut c) = Cell::start(&["--kill-grace-ms", "500"]).await;
    let mut r = req("b-long", &["sleep 100"]);
    r.repo_url.clear();
    c.run_build(r).await.unwrap();
    let mut follower = c.clone();
    let evs = tokio::spawn(async move { events(&mut follower, "b-long", 0).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.shutdown(ShutdownRequest {}).await.unwrap();
    let evs = evs.await.unwrap();
    let (state, _, msg) = finished(&evs);
    assert_eq!(state, BuildState::Cancelled);
    assert!(msg.contains("Shutdown rpc"), "{msg}");
    let t0 = Instant::now();
    loop {
        if let Some(st) = cell.child.try_wait().unwrap() {
            assert!(st.success(), "daemon exit: {st:?}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "daemon still running after Shutdown"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !cell.sock.exists()
            || client::connect(&format!("unix:{}", cell.sock.display()))
                .await
                .is_err()
    );
}

#[tokio::test]
async fn probe_subcommand_runs_one_step() {
    let (cell, _c) = Cell::start(&[]).await;
    let addr = format!("unix:{}", cell.sock.display());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_hive-cell"))
            .args([
                "probe",
                "--connect",
                &addr,
                "--repo",
                REPO,
                "--run-step",
                "cat version",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("cell test-cell ready=true state=idle"),
        "{stdout}"
    );
    assert!(stdout.contains("two\n"), "{stdout}");
    assert!(
        stdout.contains("build finished: succeeded exit_code=0"),
        "{stdout}"
    );
    // A second build is refused: probe says so and exits non-zero.
    let addr = format!("unix:{}", cell.sock.display());
    let out = Command::new(env!("CARGO_BIN_EXE_hive-cell"))
        .args(["probe", "--connect", &addr, "--run-step", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("RunBuild"));
}

/// Benchmark (ignored by default; `cargo test -p hive-cell --test cell bench -- --ignored
/// --nocapture`): RunBuild -> first stdout chunk of step 1 (no clone), and RunBuild -> clone +
/// one step finished, over `HIVE_CELL_BENCH_N` fresh cells (default 30), next to the floor:
/// `unshare --mount --pid --fork chroot IMAGE /bin/sh -c 'echo x'` on the same image.
#[tokio::test]
#[ignore]
async fn bench_first_log_line() {
    let n: usize = std::env::var("HIVE_CELL_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let mut first_line = Vec::new();
    let mut with_clone = Vec::new();
    for i in 0..n {
        let (_cell, mut c) = Cell::start(&[]).await;
        let mut r = req(&format!("bench-{i}"), &["echo x"]);
        if i % 2 == 0 {
            r.repo_url.clear();
        }
        let t0 = Instant::now();
        c.run_build(r).await.unwrap();
        let mut s = c
            .events(CellEventsRequest {
                build_id: String::new(),
                from_seq: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut first = None;
        while let Some(ev) = s.message().await.unwrap() {
            if first.is_none() && ev.step == 1 && ev.stream == LogStream::Stdout as i32 {
                first = Some(t0.elapsed());
            }
        }
        if i % 2 == 0 {
            first_line.push(first.unwrap());
        } else {
            with_clone.push(t0.elapsed());
        }
    }
    let image = build_image();
    let mut floor = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        let out = Command::new("unshare")
            .args(["--mount", "--pid", "--fork", "chroot"])
            .arg(&image)
            .args(["/bin/sh", "-c", "echo x"])
            .output()
            .unwrap();
        assert_eq!(out.stdout, b"x\n");
        floor.push(t0.elapsed());
    }
    let stats = |mut v: Vec<Duration>| {
        v.sort();
        let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1000.0;
        format!(
            "median {:.1} ms  p99 {:.1} ms  (n={})",
            p(0.5),
            p(0.99),
            v.len()
        )
    };
    println!(
        "RunBuild -> first line of step 1 (no clone): {}",
        stats(first_line)
    );
    println!(
        "RunBuild -> clone + 1 step finished:         {}",
        stats(with_clone)
    );
    println!(
        "floor: unshare + chroot + sh -c 'echo x':    {}",
        stats(floor)
    );
}

/// `--listen tcp:` (the QEMU boot check's transport): the probe, run inside the cell's netns
/// with nsenter, gets Health and a one-step build without a repository.
#[tokio::test]
async fn tcp_listener_serves_the_probe() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let child = Command::new("unshare")
        .args([
            "--mount",
            "--pid",
            "--net",
            "--fork",
            "--mount-proc",
            "--kill-child",
        ])
        .args(["sh", "-c", "ip link set lo up && exec \"$@\"", "tcp-test"])
        .arg(env!("CARGO_BIN_EXE_hive-cell"))
        .args([
            "--init",
            "no",
            "--cell-id",
            "tcp-cell",
            "--listen",
            "tcp:127.0.0.1:7000",
        ])
        .arg("--build-image")
        .arg(build_image())
        .arg("--work-dir")
        .arg(&work)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Kill(child);
    let pid = child.0.id();
    let t0 = Instant::now();
    loop {
        let daemon = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .trim()
            .to_string();
        if !daemon.is_empty() {
            let out = Command::new("nsenter")
                .args(["-t", &daemon, "-n"])
                .arg(env!("CARGO_BIN_EXE_hive-cell"))
                .args([
                    "probe",
                    "--connect",
                    "tcp:127.0.0.1:7000",
                    "--run-step",
                    "echo tcp-ok",
                ])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            if out.status.success() {
                assert!(stdout.contains("cell tcp-cell ready=true"), "{stdout}");
                assert!(stdout.contains("tcp-ok\n"), "{stdout}");
                assert!(
                    stdout.contains("[hive] hive: no repository given"),
                    "{stdout}"
                );
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "probe over tcp never succeeded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `--tunnel-ready`: the warm cell's stand-by `hwg0`, and one a PrepareTunnel made, are gone
/// before the first step of a build that has no tunnel, even one with no clone to hide behind.
#[tokio::test]
async fn a_build_without_a_tunnel_never_sees_the_tunnel_interface() {
    let step = "grep -c 'hwg0:' /proc/net/dev || true";
    for prepare in [false, true] {
        let (_cell, mut c) = Cell::start(&["--tunnel-ready", "true"]).await;
        // The stand-by is made once the container is ready: give it the time.
        tokio::time::sleep(Duration::from_millis(500)).await;
        if prepare {
            let key = c
                .prepare_tunnel(hive_proto::v1::PrepareTunnelRequest {
                    build_id: "b-notun".into(),
                })
                .await
                .expect("PrepareTunnel")
                .into_inner()
                .public_key;
            assert_eq!(key.len(), 44, "{key}");
        }
        let mut r = req("b-notun", &[step]);
        r.repo_url = String::new();
        c.run_build(r).await.expect("RunBuild");
        let evs = events(&mut c, "b-notun", 0).await;
        let (state, _, msg) = finished(&evs);
        assert_eq!(state, BuildState::Succeeded, "{msg}");
        assert_eq!(
            output(&evs, 1, LogStream::Stdout).trim(),
            "0",
            "the step saw hwg0 (PrepareTunnel first: {prepare})"
        );
    }
}
