//! The control plane end to end with fake boxes: the real `hive-control-plane` binary, the real
//! `hivectl`, and `FakeBox` speaking `BoxAgent.Session` over real gRPC. Covers placement, leases
//! (unconfirmed, rejected, box silent or gone), cancel and timeout reaching the box, log
//! streaming with ack/resend across reconnects, cordon/drain, and restarts that lose nothing.
//! Every test runs on SQLite and on PostgreSQL (`HIVE_TEST_POSTGRES_URL`, else loudly skipped).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hive_proto::v1::{Build, BuildState, GetBuildRequest, LogStream};
use hive_testkit::fakebox::{FakeBox, FakeBoxConfig};
use hive_tests::controlplane::{hivectl_bin, Backend, ControlPlaneOptions, TestHive};
use serde_json::Value;

const T: Duration = Duration::from_secs(10);
const REV: &str = "9fceb02d0ae598e95dc970b74767f19372d61af8";

hive_testkit::on_both!(
    assignment_runs_to_success_with_logs_and_history,
    logs_follow_and_watch_stream_live_in_order,
    rejected_and_unconfirmed_leases_requeue_and_stale_updates_are_ignored,
    silent_or_vanished_box_loses_its_build_to_another_box,
    cancel_and_timeout_tell_the_box,
    reconnect_resends_unacked_messages_and_duplicates_are_stored_once,
    restart_loses_nothing,
    cordon_and_drain,
    hivectl_reports_errors_clearly,
    submit_wait_shows_progress_and_tells_the_outcome,
    session_without_register_is_refused_clearly,
    hivectl_needs_a_token_and_a_role,
    rebuild_runs_the_same_revision_again,
    hivectl_speaks_tls_with_the_ca_pinned_and_never_plaintext_off_loopback,
);

/// Short leases and a fast scheduler so expiry tests take seconds.
fn fast() -> ControlPlaneOptions {
    ControlPlaneOptions {
        lease_secs: 2,
        heartbeat_interval_ms: 300,
        // The boxes here are FakeBoxes without certificates, on the loopback gRPC listener;
        // real boxes join with tokens in the e2e tests, and box_auth.rs attacks the TLS side.
        extra_args: vec![
            "--scheduler-tick-ms".into(),
            "100".into(),
            "--insecure-boxes".into(),
        ],
        ..ControlPlaneOptions::default()
    }
}

fn ctl(h: &TestHive, args: &[&str]) -> std::process::Output {
    h.cp.hivectl(args).expect("run hivectl")
}

/// Runs hivectl with --json, asserts exit 0, parses stdout.
fn ctl_json(h: &TestHive, args: &[&str]) -> Value {
    let mut full = args.to_vec();
    full.push("--json");
    let out = ctl(h, &full);
    assert!(
        out.status.success(),
        "hivectl {args:?} failed ({}): {}\ncontrol plane log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        h.cp.log()
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "hivectl {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn add_project(h: &TestHive, name: &str, extra: &[&str]) {
    let repo = format!("http://198.18.0.2/{name}.git");
    let mut args = vec![
        "project",
        "add",
        name,
        "--repo",
        &repo,
        "--secret",
        "s3cret",
        "--step",
        "make",
        "--step",
        "make test",
        "--env",
        "CI=true",
    ];
    args.extend_from_slice(extra);
    ctl_json(h, &args);
}

/// `hivectl submit` -> build id.
fn submit(h: &TestHive, project: &str) -> String {
    let b = ctl_json(
        h,
        &["submit", project, "--rev", REV, "--ref", "refs/heads/main"],
    );
    assert_eq!(b["state"], "queued", "{b}");
    b["id"].as_str().expect("build id").to_string()
}

async fn client(h: &TestHive) -> hive_tests::controlplane::Api {
    hive_tests::controlplane::api(&h.cp.grpc_url())
        .await
        .expect("connect ControlPlane")
}

async fn get(h: &TestHive, id: &str) -> Build {
    client(h)
        .await
        .get_build(GetBuildRequest { id: id.to_string() })
        .await
        .expect("GetBuild")
        .into_inner()
}

/// Polls until the build is in `want` (panics with its history and the log otherwise).
async fn wait_state(h: &TestHive, id: &str, want: BuildState, within: Duration) -> Build {
    let t0 = Instant::now();
    let mut c = client(h).await;
    loop {
        let b = c
            .get_build(GetBuildRequest { id: id.to_string() })
            .await
            .expect("GetBuild")
            .into_inner();
        if b.state == want as i32 {
            return b;
        }
        if t0.elapsed() > within {
            panic!(
                "build {id} not {} within {within:?}: {b:?}\nlog:\n{}",
                want.short_name(),
                h.cp.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fake_box(h: &TestHive, id: &str, warm: u32) -> FakeBox {
    FakeBox::connect(
        &h.cp.grpc_url(),
        FakeBoxConfig::new(id, "small", warm, warm.max(1)),
    )
    .await
    .unwrap_or_else(|e| panic!("fake box {id}: {e}\nlog:\n{}", h.cp.log()))
}

fn states(b: &Value) -> Vec<String> {
    b["transitions"]
        .as_array()
        .expect("transitions")
        .iter()
        .map(|t| t["state"].as_str().unwrap_or_default().to_string())
        .collect()
}

async fn assignment_runs_to_success_with_logs_and_history(backend: Backend) {
    let Some(h) = TestHive::start(backend, "assignment_runs_to_success", fast()).await else {
        return;
    };
    add_project(&h, "demo", &["--timeout", "600"]);
    let mut fb = fake_box(&h, "box-a", 2).await;
    let reg = fb.registered().expect("registered").clone();
    assert!(
        reg.size_classes.iter().any(|c| c.name == "small"),
        "{reg:?}"
    );
    assert_eq!(reg.acked_seq, 0);

    let id = submit(&h, "demo");
    let a = fb.next_assignment(T).await.expect("assignment");
    assert_eq!(a.build_id, id);
    assert_eq!(a.project_name, "demo");
    assert_eq!(a.repo_url, "http://198.18.0.2/demo.git");
    assert_eq!(a.revision, REV);
    assert_eq!(a.git_ref, "refs/heads/main");
    assert_eq!(a.steps, vec!["make".to_string(), "make test".to_string()]);
    assert_eq!(a.env.get("CI").map(String::as_str), Some("true"));
    assert_eq!(a.timeout_secs, 600);
    assert_eq!(
        a.size_class.as_ref().map(|c| c.name.as_str()),
        Some("small")
    );
    assert!(!a.lease_id.is_empty());
    assert!(a.lease_deadline_ms > 0);
    assert_eq!(get(&h, &id).await.state, BuildState::Placed as i32);

    fb.accept(&a, "cell-1", true).await;
    fb.running(&a).await;
    wait_state(&h, &id, BuildState::Running, T).await;
    // Leases are renewed by heartbeats: well past the 2 s lease it still runs.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        get(&h, &id).await.state,
        BuildState::Running as i32,
        "lease renewal failed"
    );
    // The box's heartbeats carried its busy cell.
    let cells = ctl_json(&h, &["cells", "--box", "box-a"]);
    let cell = cells
        .as_array()
        .and_then(|v| v.iter().find(|c| c["id"] == "cell-1"))
        .unwrap_or_else(|| panic!("cell-1 not listed: {cells}"));
    assert_eq!(cell["build_id"], id.as_str());
    assert_eq!(cell["state"], "busy");
    assert_eq!(
        ctl_json(&h, &["cells", "--box", "box-zzz"]),
        serde_json::json!([])
    );

    let mut expect = Vec::new();
    for i in 0..20u32 {
        let line = format!("step output line {i}\n");
        let stream = if i % 3 == 0 {
            LogStream::Stderr
        } else {
            LogStream::Stdout
        };
        fb.log(&a, stream, i / 10, line.as_bytes()).await;
        expect.extend_from_slice(line.as_bytes());
    }
    fb.finish(&a, BuildState::Succeeded, 0).await;
    fb.wait_all_acked(T).await.expect("everything acked");
    wait_state(&h, &id, BuildState::Succeeded, T).await;

    let b = ctl_json(&h, &["build", &id]);
    assert_eq!(b["state"], "succeeded");
    assert_eq!(b["box_id"], "box-a");
    assert_eq!(b["cell_id"], "cell-1");
    assert_eq!(b["warm_start"], true);
    assert_eq!(b["exit_code"], 0);
    assert_eq!(states(&b), ["queued", "placed", "running", "succeeded"]);

    let out = ctl(&h, &["logs", &id]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&expect)
    );
    // From an offset.
    let out = ctl(&h, &["logs", &id, "--from", "19"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "step output line 19\n"
    );

    let boxes = ctl_json(&h, &["boxes"]);
    assert_eq!(boxes[0]["id"], "box-a", "{boxes}");
    assert_eq!(boxes[0]["state"], "active");
    assert_eq!(boxes[0]["backend"], "sandbox");
    let listed = ctl_json(&h, &["builds", "--state", "succeeded", "--project", "demo"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    // Human output is a table with a header.
    let table = String::from_utf8_lossy(&ctl(&h, &["builds"]).stdout).into_owned();
    assert!(table.starts_with("ID "), "{table}");
    assert!(table.contains("succeeded"), "{table}");
    h.finish().await;
}

/// Spawns hivectl with piped stdout; returns the child and a thread collecting its output.
fn spawn_ctl(
    h: &TestHive,
    args: &[&str],
) -> (std::process::Child, std::thread::JoinHandle<Vec<u8>>) {
    let mut child = Command::new(hivectl_bin())
        .args(args)
        .env("HIVE_ADDR", h.cp.grpc_url())
        .env("HIVE_TOKEN", h.cp.admin_token().expect("admin token"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn hivectl");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    (child, reader)
}

fn wait_child(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait hivectl") {
            return s;
        }
        if t0.elapsed() > within {
            let _ = child.kill();
            panic!("hivectl did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn logs_follow_and_watch_stream_live_in_order(backend: Backend) {
    let Some(h) = TestHive::start(backend, "logs_follow", fast()).await else {
        return;
    };
    add_project(&h, "demo", &[]);
    let mut fb = fake_box(&h, "box-a", 1).await;
    let id = submit(&h, "demo");
    let (mut watch, watch_out) = spawn_ctl(&h, &["watch", &id]);
    let a = fb.next_assignment(T).await.expect("assignment");
    fb.accept(&a, "cell-1", true).await;
    fb.running(&a).await;
    wait_state(&h, &id, BuildState::Running, T).await;

    // Follow from before the first chunk; chunks arrive while it is attached.
    let (mut follow, follow_out) = spawn_ctl(&h, &["logs", "-f", &id]);
    let mut expect = Vec::new();
    for i in 0..300u32 {
        let line = format!("line {i:04} {}\n", "x".repeat((i % 50) as usize));
        fb.log(&a, LogStream::Stdout, 0, line.as_bytes()).await;
        expect.extend_from_slice(line.as_bytes());
        if i % 30 == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Binary data passes through untouched.
    let raw: Vec<u8> = (0u8..=255).collect();
    fb.log(&a, LogStream::Stderr, 1, &raw).await;
    expect.extend_from_slice(&raw);
    fb.finish(&a, BuildState::Failed, 3).await;

    let status = wait_child(&mut follow, T);
    let got = follow_out.join().expect("reader");
    assert_eq!(got.len(), expect.len(), "logs -f length");
    assert!(
        got == expect,
        "logs -f output differs from what the box sent"
    );
    assert_eq!(
        status.code(),
        Some(10),
        "logs -f of a failed build exits 10"
    );

    let status = wait_child(&mut watch, T);
    assert_eq!(status.code(), Some(10), "watch of a failed build exits 10");
    let text = String::from_utf8_lossy(&watch_out.join().expect("reader")).into_owned();
    let seen: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    // However late watch attached, it shows the whole history, in order, each state once.
    assert_eq!(seen, ["queued", "placed", "running", "failed"], "{text}");
    assert!(text.contains("exit=3"), "{text}");

    // Following an ended build prints everything and exits at once.
    let out = ctl(&h, &["logs", "-f", &id]);
    assert_eq!(out.stdout, expect);
    assert_eq!(out.status.code(), Some(10));
    h.finish().await;
}

async fn rejected_and_unconfirmed_leases_requeue_and_stale_updates_are_ignored(backend: Backend) {
    let Some(h) = TestHive::start(backend, "leases_requeue", fast()).await else {
        return;
    };
    add_project(&h, "demo", &[]);
    let mut fb = fake_box(&h, "box-a", 1).await;
    let id = submit(&h, "demo");

    // 1. Rejected: back to the queue, placed again with a new lease.
    let a1 = fb.next_assignment(T).await.expect("first assignment");
    fb.reject(&a1, "no room after all").await;
    let a2 = fb.next_assignment(T).await.expect("second assignment");
    assert_eq!(a2.build_id, id);
    assert_ne!(a2.lease_id, a1.lease_id);

    // 2. Not confirmed: after the 2 s lease the build is re-queued and the box told to drop it.
    let cancel = fb
        .expect_cancel(&id, T)
        .await
        .expect("cancel of the expired lease");
    let now_ms = hive_sys::now_ms();
    assert!(
        now_ms >= a2.lease_deadline_ms,
        "lease re-queued {} ms before its deadline",
        a2.lease_deadline_ms - now_ms
    );
    assert_eq!(cancel.build_id, id);
    let a3 = fb.next_assignment(T).await.expect("third assignment");
    assert_ne!(a3.lease_id, a2.lease_id);
    let b = get(&h, &id).await;
    assert!(b.attempt >= 2, "attempt should count re-queues: {b:?}");

    // 3. Updates for the expired lease are ignored; the current lease's count.
    fb.accept(&a2, "stale-cell", false).await;
    fb.finish(&a2, BuildState::Failed, 99).await;
    fb.accept(&a3, "cell-3", true).await;
    fb.running(&a3).await;
    wait_state(&h, &id, BuildState::Running, T).await;
    fb.finish(&a3, BuildState::Succeeded, 0).await;
    fb.wait_all_acked(T).await.expect("acked");
    let b = wait_state(&h, &id, BuildState::Succeeded, T).await;
    assert_eq!(b.cell_id, "cell-3");
    assert_eq!(b.exit_code, 0);
    let hist = states(&ctl_json(&h, &["build", &id]));
    assert_eq!(
        hist.iter().filter(|s| *s == "placed").count(),
        3,
        "{hist:?}"
    );
    assert!(!hist.contains(&"failed".to_string()), "{hist:?}");
    h.finish().await;
}

async fn silent_or_vanished_box_loses_its_build_to_another_box(backend: Backend) {
    let Some(h) = TestHive::start(backend, "silent_box", fast()).await else {
        return;
    };
    add_project(&h, "demo", &[]);
    // Only box A has a warm cell; box B has room but no warm cell.
    let mut a_box = fake_box(&h, "box-a", 1).await;
    let mut b_box = FakeBox::connect(&h.cp.grpc_url(), FakeBoxConfig::new("box-b", "small", 0, 1))
        .await
        .expect("box-b");

    // Silent: connection open, heartbeats stop.
    let id = submit(&h, "demo");
    let a = a_box.next_assignment(T).await.expect("A gets it (warm)");
    a_box.accept(&a, "a-cell", true).await;
    a_box.running(&a).await;
    wait_state(&h, &id, BuildState::Running, T).await;
    a_box.set_heartbeats(false);
    let b = b_box
        .next_assignment(T)
        .await
        .expect("B gets it after A went silent");
    assert_eq!(b.build_id, id);
    let boxes = ctl_json(&h, &["boxes"]);
    let a_state = boxes
        .as_array()
        .and_then(|v| v.iter().find(|x| x["id"] == "box-a"))
        .map(|x| x["state"].clone());
    assert_eq!(a_state, Some(Value::from("offline")), "{boxes}");
    b_box.accept(&b, "b-cell", false).await;
    b_box.running(&b).await;
    // A late word from the silent box's old lease changes nothing.
    a_box.finish(&a, BuildState::Failed, 1).await;
    b_box.finish(&b, BuildState::Succeeded, 0).await;
    let done = wait_state(&h, &id, BuildState::Succeeded, T).await;
    assert_eq!(done.box_id, "box-b");
    assert!(!done.warm_start);
    drop(a_box);

    // Vanished: the connection drops (box crashed).
    let id2 = submit(&h, "demo");
    let b2 = b_box
        .next_assignment(T)
        .await
        .expect("B gets the next build");
    b_box.accept(&b2, "b-cell-2", true).await;
    b_box.disconnect();
    let mut c_box = fake_box(&h, "box-c", 1).await;
    let c = c_box
        .next_assignment(T)
        .await
        .expect("C gets it after B vanished");
    assert_eq!(c.build_id, id2);
    c_box.accept(&c, "c-cell", true).await;
    c_box.finish(&c, BuildState::Succeeded, 0).await;
    wait_state(&h, &id2, BuildState::Succeeded, T).await;
    assert!(get(&h, &id2).await.attempt >= 1);
    h.finish().await;
}

async fn cancel_and_timeout_tell_the_box(backend: Backend) {
    let Some(h) = TestHive::start(backend, "cancel_and_timeout", fast()).await else {
        return;
    };
    add_project(&h, "demo", &[]);
    add_project(&h, "slow", &["--timeout", "2"]);
    let mut fb = fake_box(&h, "box-a", 2).await;

    // Cancel while running.
    let id = submit(&h, "demo");
    let a = fb.next_assignment(T).await.expect("assignment");
    fb.accept(&a, "cell-1", true).await;
    fb.running(&a).await;
    wait_state(&h, &id, BuildState::Running, T).await;
    let out = ctl(&h, &["cancel", &id, "--reason", "test says stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = fb.expect_cancel(&id, T).await.expect("box told to cancel");
    assert_eq!(c.state, BuildState::Cancelled as i32);
    fb.finish(&a, BuildState::Cancelled, -1).await;
    let b = wait_state(&h, &id, BuildState::Cancelled, T).await;
    assert!(b.message.contains("test says stop"), "{b:?}");
    // Cancelling again is refused, clearly.
    let again = ctl(&h, &["cancel", &id]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("cancelled"));

    // Timeout while running: the control plane ends it and tells the box.
    let id2 = submit(&h, "slow");
    let a2 = fb.next_assignment(T).await.expect("assignment");
    assert_eq!(a2.timeout_secs, 2);
    fb.accept(&a2, "cell-2", true).await;
    fb.running(&a2).await;
    let c2 = fb
        .expect_cancel(&id2, T)
        .await
        .expect("box told of the timeout");
    assert_eq!(c2.state, BuildState::TimedOut as i32);
    fb.finish(&a2, BuildState::TimedOut, -1).await;
    wait_state(&h, &id2, BuildState::TimedOut, T).await;
    let w = ctl(&h, &["watch", &id2]);
    assert_eq!(
        w.status.code(),
        Some(12),
        "watch of a timed-out build exits 12"
    );
    assert_eq!(ctl_json(&h, &["build", &id2])["state"], "timed_out");

    // Cancel while queued (no box has room: cordon it): ends at once, no box involved.
    ctl_json(&h, &["box", "cordon", "box-a"]);
    let id3 = submit(&h, "demo");
    let out = ctl_json(&h, &["cancel", &id3]);
    assert_eq!(out["state"], "cancelled");
    assert!(fb
        .expect_silence(Duration::from_millis(500))
        .await
        .is_none());
    fb.wait_all_acked(T).await.expect("acked");
    h.finish().await;
}

async fn reconnect_resends_unacked_messages_and_duplicates_are_stored_once(backend: Backend) {
    let Some(h) = TestHive::start(backend, "reconnect_resends", fast()).await else {
        return;
    };
    add_project(&h, "demo", &[]);
    let mut fb = fake_box(&h, "box-a", 1).await;
    let id = submit(&h, "demo");
    let a = fb.next_assignment(T).await.expect("assignment");
    fb.accept(&a, "cell-1", true).await;
    fb.running(&a).await;
    let mut expect = Vec::new();
    for i in 0..10 {
        let l = format!("before {i}\n");
        fb.log(&a, LogStream::Stdout, 0, l.as_bytes()).await;
        expect.extend_from_slice(l.as_bytes());
    }
    fb.wait_all_acked(T).await.expect("acked before the cut");
    let acked_before = fb.acked_seq();
    assert_eq!(acked_before, fb.next_seq() - 1);

    // Cut the link; the box goes on producing (queued locally), then reconnects.
    fb.disconnect();
    for i in 0..10 {
        let l = format!("during {i}\n");
        fb.log(&a, LogStream::Stdout, 0, l.as_bytes()).await;
        expect.extend_from_slice(l.as_bytes());
    }
    fb.finish(&a, BuildState::Succeeded, 0).await;
    assert_eq!(fb.unacked(), 11);
    let reg = fb.reconnect().await.expect("reconnect");
    assert_eq!(
        reg.acked_seq, acked_before,
        "Registered.acked_seq is the stored high mark"
    );
    fb.wait_all_acked(T).await.expect("resent messages acked");
    wait_state(&h, &id, BuildState::Succeeded, T).await;

    // A duplicate of an already stored chunk (a resend race) is stored once.
    let dup = hive_proto::v1::BoxMessage {
        seq: 3,
        msg: Some(hive_proto::v1::box_message::Msg::Log(
            hive_proto::v1::LogChunk {
                build_id: id.clone(),
                seq: 0,
                stream: LogStream::Stdout as i32,
                step: 0,
                data: b"DUPLICATE\n".to_vec(),
                at_ms: 1,
            },
        )),
    };
    fb.send_raw(dup).await.expect("send duplicate");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = ctl(&h, &["logs", &id]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&expect),
        "every chunk exactly once, in order"
    );
    h.finish().await;
}

async fn restart_loses_nothing(backend: Backend) {
    // Leases long enough to outlive the restart: the running build must carry on, not re-queue.
    let opts = ControlPlaneOptions {
        lease_secs: 15,
        ..fast()
    };
    let Some(h) = TestHive::start(backend, "restart_loses_nothing", opts).await else {
        return;
    };
    add_project(&h, "demo", &["--branch", "main", "--env", "A=1"]);
    let mut fb = fake_box(&h, "box-a", 1).await;
    let done = submit(&h, "demo");
    let a = fb.next_assignment(T).await.expect("assignment");
    fb.accept(&a, "cell-1", true).await;
    fb.running(&a).await;
    fb.log(&a, LogStream::Stdout, 0, b"hello\n").await;
    fb.finish(&a, BuildState::Succeeded, 0).await;
    fb.wait_all_acked(T).await.expect("acked");
    wait_state(&h, &done, BuildState::Succeeded, T).await;

    let running = submit(&h, "demo");
    let r = fb.next_assignment(T).await.expect("assignment");
    fb.accept(&r, "cell-2", true).await;
    fb.running(&r).await;
    fb.log(&r, LogStream::Stdout, 0, b"part one\n").await;
    fb.wait_all_acked(T).await.expect("acked");
    wait_state(&h, &running, BuildState::Running, T).await;
    // Box full: this one stays queued.
    let queued = submit(&h, "demo");

    let snapshot = |h: &TestHive| {
        (
            ctl_json(h, &["projects"]),
            ctl_json(h, &["builds"]),
            String::from_utf8_lossy(&ctl(h, &["logs", &done]).stdout).into_owned(),
        )
    };
    let before = snapshot(&h);
    // The box loses its link while the control plane restarts, then finds it again (new port).
    fb.disconnect();
    let h = h.restart().await;
    let after = snapshot(&h);
    assert_eq!(before.0, after.0, "projects changed across restart");
    assert_eq!(before.2, after.2, "logs changed across restart");
    assert_eq!(before.1, after.1, "builds changed across restart");
    assert_eq!(get(&h, &queued).await.state, BuildState::Queued as i32);

    fb.set_addr(&h.cp.grpc_url());
    let reg = fb.reconnect().await.expect("reconnect after restart");
    assert_eq!(
        reg.acked_seq,
        fb.next_seq() - 1,
        "the stored high mark survived the restart"
    );
    fb.log(&r, LogStream::Stdout, 0, b"part two\n").await;
    fb.finish(&r, BuildState::Succeeded, 0).await;
    fb.wait_all_acked(T).await.expect("acked");
    wait_state(&h, &running, BuildState::Succeeded, T).await;
    let out = ctl(&h, &["logs", &running]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "part one\npart two\n");
    // The box is free again: the queued build goes out.
    let q = fb
        .next_assignment(T)
        .await
        .expect("queued build placed after restart");
    assert_eq!(q.build_id, queued);

    // A hard kill right after a webhook was answered 202 loses nothing either.
    let client = hive_tests::github::WebhookClient::new();
    let ans = client
        .send_signed(
            &h.cp.webhook_url(),
            "s3cret",
            "push",
            "crash-1",
            hive_tests::github::push_payload(
                "http://198.18.0.2/demo.git",
                "refs/heads/main",
                REV,
                false,
            ),
        )
        .await
        .expect("push");
    assert_eq!(ans.status, 202, "{}", ans.body);
    let bid = ans.json()["build_id"]
        .as_str()
        .expect("build id")
        .to_string();
    let TestHive {
        mut cp,
        pg,
        backend,
    } = h;
    cp.crash();
    let h = TestHive { cp, pg, backend }.restart().await;
    let b = ctl_json(&h, &["build", &bid]);
    assert_eq!(b["trigger"], "webhook:crash-1");
    h.finish().await;
}

async fn cordon_and_drain(backend: Backend) {
    let Some(h) = TestHive::start(backend, "cordon_and_drain", fast()).await else {
        return;
    };
    add_project(&h, "demo", &[]);
    let mut fb = fake_box(&h, "box-a", 2).await;
    let running = submit(&h, "demo");
    let a = fb.next_assignment(T).await.expect("assignment");
    fb.accept(&a, "cell-1", true).await;
    fb.running(&a).await;

    let b = ctl_json(&h, &["box", "cordon", "box-a"]);
    assert_eq!(b["state"], "cordoned");
    let waiting = submit(&h, "demo");
    assert!(
        fb.expect_silence(Duration::from_millis(800))
            .await
            .is_none(),
        "a cordoned box got new work"
    );
    assert_eq!(get(&h, &waiting).await.state, BuildState::Queued as i32);
    assert_eq!(get(&h, &running).await.state, BuildState::Running as i32);
    // Uncordon and cordon again (issue 12: cordon has an undo).
    let b = ctl_json(&h, &["box", "uncordon", "box-a"]);
    assert_eq!(b["state"], "active");
    let b = ctl_json(&h, &["box", "cordon", "box-a"]);
    assert_eq!(b["state"], "cordoned");

    let b = ctl_json(&h, &["box", "drain", "box-a"]);
    assert_eq!(b["state"], "draining");
    fb.expect_drain(T).await.expect("box told to drain");
    fb.finish(&a, BuildState::Succeeded, 0).await;
    fb.wait_all_acked(T).await.expect("acked");
    wait_state(&h, &running, BuildState::Succeeded, T).await;
    fb.disconnect();
    let t0 = Instant::now();
    loop {
        let boxes = ctl_json(&h, &["boxes"]);
        if boxes[0]["state"] == "left" {
            break;
        }
        assert!(t0.elapsed() < T, "drained box never left: {boxes}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A fresh box picks up the waiting build.
    let mut other = fake_box(&h, "box-b", 1).await;
    let w = other.next_assignment(T).await.expect("assignment on box-b");
    assert_eq!(w.build_id, waiting);
    // The box that left is forgotten; the connected one cannot be.
    let out = ctl(&h, &["box", "forget", "box-b"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is connected"),
        "{out:?}"
    );
    let gone = ctl_json(&h, &["box", "forget", "box-a"]);
    assert_eq!(gone["forgotten"], "box-a");
    let boxes = ctl_json(&h, &["boxes"]);
    assert_eq!(boxes.as_array().map(Vec::len), Some(1), "{boxes}");
    assert_eq!(boxes[0]["id"], "box-b");
    h.finish().await;
}

async fn hivectl_reports_errors_clearly(backend: Backend) {
    let Some(h) = TestHive::start(backend, "hivectl_errors", fast()).await else {
        return;
    };
    let err = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();

    let out = ctl(&h, &["build", "no-such-build"]);
    assert_eq!(out.status.code(), Some(4), "{}", err(&out));
    assert!(
        err(&out).starts_with("hivectl: build no-such-build: not found"),
        "{}",
        err(&out)
    );
    assert_eq!(err(&out).lines().count(), 1, "one line: {}", err(&out));

    add_project(&h, "demo", &[]);
    let dup = ctl(
        &h,
        &[
            "project",
            "add",
            "demo",
            "--repo",
            "http://x/y.git",
            "--secret",
            "s",
            "--step",
            "true",
        ],
    );
    assert_eq!(dup.status.code(), Some(1), "{}", err(&dup));
    assert!(err(&dup).contains("demo"), "{}", err(&dup));

    // The webhook secret from a file (out of `ps`); an empty one is refused before any call.
    let dir = tempfile::tempdir().unwrap();
    let (good, empty) = (dir.path().join("secret"), dir.path().join("empty"));
    std::fs::write(&good, "from-a-file\n").unwrap();
    std::fs::write(&empty, "\n").unwrap();
    for (file, ok) in [(&empty, false), (&good, true)] {
        let out = ctl(
            &h,
            &[
                "project",
                "add",
                "filed",
                "--repo",
                "http://x/filed.git",
                "--secret-file",
                file.to_str().unwrap(),
                "--step",
                "true",
            ],
        );
        assert_eq!(out.status.success(), ok, "{}", err(&out));
        if !ok {
            assert!(
                err(&out).contains("--secret-file") && err(&out).contains("empty"),
                "{}",
                err(&out)
            );
        }
    }
    let rm = ctl(&h, &["project", "rm", "filed"]);
    assert!(rm.status.success(), "{}", err(&rm));

    let bad_class = ctl(
        &h,
        &[
            "project",
            "add",
            "other",
            "--repo",
            "http://x/z.git",
            "--secret",
            "s",
            "--size",
            "enormous",
            "--step",
            "true",
        ],
    );
    assert_eq!(bad_class.status.code(), Some(1), "{}", err(&bad_class));
    assert!(err(&bad_class).contains("enormous"), "{}", err(&bad_class));

    let no_steps = ctl(&h, &["project", "add", "x", "--repo", "r", "--secret", "s"]);
    assert_eq!(no_steps.status.code(), Some(2));

    let missing = ctl(&h, &["submit", "nope"]);
    assert_eq!(missing.status.code(), Some(4), "{}", err(&missing));

    // Issue 12: refused at the door, each with what to do instead.
    let add = |extra: &[&str]| {
        let mut args = vec!["project", "add", "door", "--step", "true"];
        args.extend_from_slice(extra);
        ctl(&h, &args)
    };
    for (extra, code, needle) in [
        (
            &["--repo", "http://x/d.git", "--secret", ""][..],
            2,
            "leave --secret out for a project built only through the API",
        ),
        (
            &["--repo", "http://x/d.git", "--timeout", "0"][..],
            2,
            "--timeout",
        ),
        (&["--repo", "not-a-url"][..], 1, "is not one Hive can fetch"),
        (
            &["--repo", "https://me:t0ken@x/d.git"][..],
            1,
            "carries credentials",
        ),
    ] {
        let out = add(extra);
        assert_eq!(out.status.code(), Some(code), "{extra:?}: {}", err(&out));
        assert!(err(&out).contains(needle), "{extra:?}: {}", err(&out));
        assert!(!err(&out).contains("t0ken"), "{}", err(&out));
    }
    let bad_rev = ctl(&h, &["submit", "demo", "--rev", "nothex"]);
    assert_eq!(bad_rev.status.code(), Some(1), "{}", err(&bad_rev));
    assert!(
        err(&bad_rev).contains("is not a commit id"),
        "{}",
        err(&bad_rev)
    );
    // A submission retried with its request id is answered with the first build.
    let once = |rid: &str| {
        ctl_json(
            &h,
            &[
                "submit",
                "demo",
                "--ref",
                "refs/heads/main",
                "--request-id",
                rid,
            ],
        )
    };
    let first = once("release-42");
    let again = once("release-42");
    assert_eq!(first["id"], again["id"], "{first} / {again}");
    assert_eq!(first["trigger"], "api:release-42", "{first}");
    let bad_rid = ctl(&h, &["submit", "demo", "--request-id", "no spaces"]);
    assert_eq!(bad_rid.status.code(), Some(1), "{}", err(&bad_rid));
    assert!(err(&bad_rid).contains("request_id"), "{}", err(&bad_rid));
    // A project without a secret is for API builds; `project show` says so.
    let out = add(&["--repo", "git@x:acme/d.git"]);
    assert!(out.status.success(), "{}", err(&out));
    let shown = String::from_utf8_lossy(&ctl(&h, &["project", "show", "door"]).stdout).into_owned();
    assert!(
        shown.contains("secret:          none (built only through the API"),
        "{shown}"
    );
    assert!(shown.contains("private network: none\n"), "{shown}");
    assert!(ctl(&h, &["project", "rm", "door"]).status.success());

    let unreachable =
        hive_tests::controlplane::hivectl("http://127.0.0.1:1", &["projects"]).expect("run");
    assert_eq!(unreachable.status.code(), Some(3));
    assert!(
        err(&unreachable).contains("cannot reach control plane at http://127.0.0.1:1"),
        "{}",
        err(&unreachable)
    );

    let classes = ctl_json(&h, &["classes"]);
    let names: Vec<&str> = classes
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(
        names.contains(&"small") && names.contains(&"large"),
        "{classes}"
    );

    let shown = ctl_json(&h, &["project", "show", "demo"]);
    // The env's names; its values never leave the control plane (issue 10).
    assert_eq!(shown["env_names"], serde_json::json!(["CI"]));
    assert_eq!(shown["steps"][1], "make test");
    let text = String::from_utf8_lossy(&ctl(&h, &["project", "show", "demo"]).stdout).into_owned();
    assert!(
        text.contains("step 2:") && text.contains("make test"),
        "{text}"
    );
    let rm = ctl(&h, &["project", "rm", "demo"]);
    assert!(rm.status.success(), "{}", err(&rm));
    assert_eq!(
        ctl_json(&h, &["projects"]).as_array().map(Vec::len),
        Some(0)
    );
    let gone = ctl(&h, &["project", "show", "demo"]);
    assert_eq!(gone.status.code(), Some(4));

    let cells = ctl_json(&h, &["cells"]);
    assert!(cells.is_array());
    h.finish().await;
}

async fn submit_wait_shows_progress_and_tells_the_outcome(backend: Backend) {
    let Some(h) = TestHive::start(backend, "submit_wait", fast()).await else {
        return;
    };
    add_project(&h, "demo", &[]);
    let mut fb = fake_box(&h, "box-a", 1).await;
    let mut child = Command::new(hivectl_bin())
        .args(["submit", "demo", "--rev", REV, "--wait"])
        .env("HIVE_ADDR", h.cp.grpc_url())
        .env("HIVE_TOKEN", h.cp.admin_token().expect("admin token"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hivectl");
    let a = fb.next_assignment(T).await.expect("assignment");
    fb.accept(&a, "cell-1", true).await;
    fb.running(&a).await;
    wait_state(&h, &a.build_id, BuildState::Running, T).await;
    fb.finish(&a, BuildState::Succeeded, 0).await;
    let status = wait_child(&mut child, T);
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("read");
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read");
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(stdout.trim(), format!("build {} succeeded", a.build_id));
    // Not a terminal: plain progress lines, one per state, no spinner escapes.
    assert!(stderr.contains(": running"), "{stderr}");
    assert!(stderr.contains(": succeeded"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "{stderr:?}");

    // On a terminal (util-linux `script` gives it one) the wait is a redrawn spinner line.
    let cmd = format!(
        "HIVE_ADDR={} {} submit demo --rev {REV} --wait",
        h.cp.grpc_url(),
        hivectl_bin().display()
    );
    let mut tty = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("HIVE_TOKEN", h.cp.admin_token().expect("admin token"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn script");
    let a = fb.next_assignment(T).await.expect("second assignment");
    fb.accept(&a, "cell-2", true).await;
    fb.running(&a).await;
    wait_state(&h, &a.build_id, BuildState::Running, T).await;
    // Long enough for several spinner frames.
    tokio::time::sleep(Duration::from_millis(600)).await;
    fb.finish(&a, BuildState::Failed, 2).await;
    let status = wait_child(&mut tty, T);
    let mut screen = String::new();
    tty.stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut screen)
        .expect("read");
    assert!(
        screen.contains("\r\x1b[2K"),
        "no redrawn line on a tty: {screen:?}"
    );
    assert!(screen.contains(": running"), "{screen:?}");
    assert!(
        screen.contains(&format!("build {} failed", a.build_id)),
        "{screen:?}"
    );
    assert_eq!(
        status.code(),
        Some(10),
        "script passes on hivectl's exit code: {screen:?}"
    );
    h.finish().await;
}

/// A session that does not start with Register, or an update for a build the box was never
/// given, gets a clear refusal, and the control plane carries on.
async fn session_without_register_is_refused_clearly(backend: Backend) {
    use hive_proto::v1::box_agent_client::BoxAgentClient;
    use hive_proto::v1::{box_message, BoxMessage, BuildUpdate, BuildUpdateKind, Heartbeat};
    use tokio_stream::StreamExt;

    let Some(h) = TestHive::start(backend, "session_without_register", fast()).await else {
        return;
    };
    let mut c = BoxAgentClient::connect(h.cp.grpc_url())
        .await
        .expect("connect");
    let first = BoxMessage {
        seq: 0,
        msg: Some(box_message::Msg::Heartbeat(Heartbeat::default())),
    };
    let r = c.session(tokio_stream::iter(vec![first])).await;
    let status = match r {
        Err(s) => s,
        Ok(resp) => {
            let mut inbound = resp.into_inner();
            match tokio::time::timeout(T, inbound.next())
                .await
                .expect("an answer")
            {
                Some(Err(s)) => s,
                other => panic!("a session without Register was not refused: {other:?}"),
            }
        }
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().to_lowercase().contains("register"),
        "{status:?}"
    );

    // An update for a build this box does not hold is ignored (and still acked: it is handled).
    add_project(&h, "demo", &[]);
    // No warm cell and no room: nothing may be placed on it.
    let fb = FakeBox::connect(&h.cp.grpc_url(), FakeBoxConfig::new("box-a", "small", 0, 0))
        .await
        .expect("fake box");
    let bogus = BoxMessage {
        seq: fb.next_seq(),
        msg: Some(box_message::Msg::Update(BuildUpdate {
            build_id: "no-such-build".into(),
            lease_id: "no-such-lease".into(),
            kind: BuildUpdateKind::Finished as i32,
            state: BuildState::Succeeded as i32,
            ..Default::default()
        })),
    };
    fb.send_raw(bogus).await.expect("send");
    let id = submit(&h, "demo");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get(&h, &id).await.state, BuildState::Queued as i32);
    let out = ctl(&h, &["build", "no-such-build"]);
    assert_eq!(out.status.code(), Some(4));
    h.finish().await;
}

/// Issue 10, as a newcomer meets it: `hivectl builds` without a token fails saying what to do;
/// with the admin token from `<data-dir>/admin.token` it works; a read-only token lists builds
/// and cannot add a project; tokens are made, listed (never shown again) and revoked with
/// hivectl, and the audit log says who did what.
async fn hivectl_needs_a_token_and_a_role(backend: Backend) {
    use hive_tests::controlplane::hivectl_with;
    let Some(h) = TestHive::start(backend, "hivectl_tokens", fast()).await else {
        return;
    };
    let err = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();
    let out_text = |out: &std::process::Output| String::from_utf8_lossy(&out.stdout).into_owned();
    let addr = h.cp.grpc_url();
    let run = |token: &str, args: &[&str]| hivectl_with(&addr, token, args).expect("run hivectl");

    let anonymous = run("", &["builds"]);
    assert_eq!(anonymous.status.code(), Some(5), "{}", err(&anonymous));
    assert!(
        err(&anonymous).contains("HIVE_TOKEN") && err(&anonymous).contains("admin.token"),
        "{}",
        err(&anonymous)
    );
    let admin = std::fs::read_to_string(h.cp.data_dir.join("admin.token")).expect("admin.token");
    let admin = admin.trim();
    let listed = run(admin, &["builds"]);
    assert!(listed.status.success(), "{}", err(&listed));

    // A read-only token: printed once on stdout, alone.
    let made = run(
        admin,
        &["token", "create", "--role", "read-only", "--name", "dash"],
    );
    assert!(made.status.success(), "{}", err(&made));
    let viewer = out_text(&made).trim().to_string();
    assert!(viewer.starts_with("hvt_"), "{viewer}");
    assert!(
        !err(&made).contains(&viewer),
        "the token went to stderr too"
    );
    let listed = run(&viewer, &["builds"]);
    assert!(listed.status.success(), "{}", err(&listed));
    let refused = run(
        &viewer,
        &[
            "project",
            "add",
            "x",
            "--repo",
            "git://h/x",
            "--secret",
            "s",
            "--step",
            "true",
        ],
    );
    assert_eq!(refused.status.code(), Some(5), "{}", err(&refused));
    assert!(
        err(&refused).contains("read-only") && err(&refused).contains("operator"),
        "{}",
        err(&refused)
    );

    // The list never shows a secret; revoke ends the token.
    let list = run(admin, &["token", "list", "--json"]);
    assert!(list.status.success(), "{}", err(&list));
    let text = out_text(&list);
    assert!(!text.contains(&viewer) && !text.contains(admin), "{text}");
    let tokens: Value = serde_json::from_str(&text).expect("json");
    let id = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "dash")
        .expect("the read-only token is listed")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let revoked = run(admin, &["token", "revoke", &id]);
    assert!(revoked.status.success(), "{}", err(&revoked));
    let after = run(&viewer, &["builds"]);
    assert_eq!(after.status.code(), Some(5), "{}", err(&after));
    assert!(err(&after).contains("revoked"), "{}", err(&after));

    let audit = run(admin, &["audit", "--json"]);
    assert!(audit.status.success(), "{}", err(&audit));
    let entries: Value = serde_json::from_str(&out_text(&audit)).expect("json");
    let actions: Vec<&str> = entries
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        ["RevokeToken", "CreateToken", "BootstrapAdminToken"],
        "{entries}"
    );
    let denied = run(&viewer, &["audit"]);
    assert_eq!(denied.status.code(), Some(5));
    h.finish().await;
}

/// Issue 14: `hivectl rebuild ID` makes a new build of the same revision and ref, recorded as a
/// rebuild, which a box then runs like any other; an unknown build is named in the error.
async fn rebuild_runs_the_same_revision_again(backend: Backend) {
    let Some(h) = TestHive::start(backend, "rebuild", fast()).await else {
        return;
    };
    add_project(&h, "demo", &[]);
    let first = submit(&h, "demo");
    let again = ctl_json(&h, &["rebuild", &first]);
    let again_id = again["id"].as_str().expect("id").to_string();
    assert_ne!(again_id, first);
    assert_eq!(again["revision"], REV);
    assert_eq!(again["ref"], "refs/heads/main");
    assert_eq!(again["state"], "queued");
    assert_eq!(again["trigger"], format!("rebuild:{first}"));
    // A box gets both, the rebuild with the same revision.
    let mut fb = fake_box(&h, "box-r", 2).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let a = fb.next_assignment(T).await.expect("assignment");
        assert_eq!(a.revision, REV);
        got.push(a.build_id);
    }
    got.sort();
    let mut want = vec![first.clone(), again_id];
    want.sort();
    assert_eq!(got, want);
    let missing = ctl(&h, &["rebuild", "no-such-build"]);
    assert_eq!(missing.status.code(), Some(4), "{missing:?}");
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no-such-build"),
        "{missing:?}"
    );
    h.finish().await;
}

/// Issue 10: the operator API over TLS. A control plane with TLS on its listeners (here on
/// loopback, `--tls-on-loopback`; off loopback it is always so) is reached with
/// `https://` and the CA pinned (`--ca-sha256`) or given (`--ca-file`); without either, or with
/// another CA's pin, hivectl says what to set; and a plain `http://` to another host is refused
/// before anything is sent (the token would cross the network in the clear). A loopback
/// listener without TLS says so in the log.
async fn hivectl_speaks_tls_with_the_ca_pinned_and_never_plaintext_off_loopback(backend: Backend) {
    let mut opts = fast();
    opts.extra_args.push("--tls-on-loopback".into());
    let Some(h) = TestHive::start(backend, "hivectl_tls", opts).await else {
        return;
    };
    assert!(h.cp.grpc_tls && h.cp.http_tls, "TLS asked for on loopback");
    let url = h.cp.grpc_url();
    assert!(url.starts_with("https://"), "{url}");
    let admin = h.cp.admin_token().expect("admin token");
    let pin = hive_tests::controlplane::tls_pin(&url).expect("pin");
    let run = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = Command::new(hivectl_bin());
        for k in [
            "HIVE_CA_SHA256",
            "HIVE_CA_FILE",
            "HIVE_TOKEN_FILE",
            "RUST_LOG",
        ] {
            cmd.env_remove(k);
        }
        cmd.env("HIVE_TOKEN", &admin).env("HIVE_ADDR", &url);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run hivectl")
    };
    let err = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    let pinned = run(&[("HIVE_CA_SHA256", &pin)], &["builds"]);
    assert!(pinned.status.success(), "{}", err(&pinned));
    let ca_file = h.cp.data_dir.join("pki/ca.pem");
    let by_file = run(&[], &["--ca-file", ca_file.to_str().unwrap(), "builds"]);
    assert!(by_file.status.success(), "{}", err(&by_file));

    let no_ca = run(&[], &["builds"]);
    assert_eq!(no_ca.status.code(), Some(2), "{}", err(&no_ca));
    assert!(
        err(&no_ca).contains("--ca-sha256") && err(&no_ca).contains("--ca-file"),
        "{}",
        err(&no_ca)
    );
    let other = "ab".repeat(32);
    let wrong = run(&[("HIVE_CA_SHA256", &other)], &["builds"]);
    assert_eq!(wrong.status.code(), Some(2), "{}", err(&wrong));
    assert!(err(&wrong).contains("pinned CA"), "{}", err(&wrong));

    // Plaintext to the TLS listener gets no answer.
    let port = url.rsplit(':').next().unwrap();
    let plain_url = format!("http://127.0.0.1:{port}");
    let plain = run(&[("HIVE_ADDR", &plain_url)], &["builds"]);
    assert!(!plain.status.success(), "plaintext answered");
    // Plaintext to another host: refused before dialling (the .invalid name resolves nowhere,
    // so nothing leaves this machine either way).
    let remote = run(
        &[("HIVE_ADDR", "http://hive-cp.invalid:50051")],
        &["builds"],
    );
    assert_eq!(remote.status.code(), Some(2), "{}", err(&remote));
    assert!(
        err(&remote).contains("in the clear") && err(&remote).contains("https://hive-cp.invalid"),
        "{}",
        err(&remote)
    );
    h.finish().await;

    // The default loopback listeners are plaintext, and the log says so.
    let Some(h) = TestHive::start(backend, "hivectl_plain", fast()).await else {
        return;
    };
    assert!(!h.cp.grpc_tls && h.cp.grpc_url().starts_with("http://"));
    let log = h.cp.log();
    assert!(
        log.contains("gRPC listener: PLAINTEXT") && log.contains("HTTP listener: PLAINTEXT"),
        "{log}"
    );
    h.finish().await;
}

/// SQLite: a control plane under a stream of submissions copies its WAL back into the database
/// file as it goes, and the WAL stays small. (It did not: under `hive-bench schedule` a control
/// plane's WAL reached 14 GB in 7 minutes while its database file stayed one page long, and
/// every query slowed as the WAL grew.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_wal_is_checkpointed_under_a_stream_of_submissions() {
    let opts = ControlPlaneOptions {
        extra_args: vec!["--insecure-boxes".into()],
        log_filter: "warn".into(),
        ..ControlPlaneOptions::default()
    };
    let h = TestHive::start(Backend::Sqlite, "sqlite_wal_checkpointed", opts)
        .await
        .expect("sqlite");
    add_project(&h, "walproj", &[]);
    let db = h.cp.data_dir.join("hive.db");
    let wal = h.cp.data_dir.join("hive.db-wal");
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mut clients = Vec::new();
    for _ in 0..16 {
        let mut c = client(&h).await;
        clients.push(tokio::spawn(async move {
            for _ in 0..250 {
                c.submit_build(hive_proto::v1::SubmitBuildRequest {
                    project: "walproj".into(),
                    revision: String::new(),
                    git_ref: "refs/heads/main".into(),
                    ..Default::default()
                })
                .await
                .expect("SubmitBuild");
            }
        }));
    }
    let mut peak_wal = 0;
    while clients.iter().any(|c| !c.is_finished()) {
        peak_wal = peak_wal.max(size(&wal));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for c in clients {
        c.await.unwrap();
    }
    // The checkpointer runs on its own clock: give it a moment after the last commit.
    let t0 = Instant::now();
    while size(&db) < 1 << 20 && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let written = size(&db);
    eprintln!("database file {written} B, WAL peak {peak_wal} B");
    assert!(
        written >= 1 << 20,
        "the database file is {written} B after 4000 builds: the WAL is not copied back"
    );
    assert!(
        peak_wal < 48 << 20,
        "the WAL reached {peak_wal} B: it is not restarted"
    );
    h.finish().await;
}
