//! The sandbox backend against the real kernel: a real hive-cell boots as PID 1 of its own
//! namespaces with its cgroup, network and firewall entry, answers health, runs a build, and
//! every resource is gone after destroy.
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use hive_box::backend::{CellBackend, CellSpec};
use hive_box::net::{link_exists, CellNetNames};
use hive_proto::v1::{BuildState, CellEventKind, CellEventsRequest, RunBuildRequest};

fn status_field(pid: &str, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .map(|l| l[field.len()..].trim().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cell_boots_jailed_runs_a_build_and_is_destroyed_completely() {
    let tb = common::sandbox("life", 201);
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let start = Instant::now();
    let cell = tb
        .sandbox
        .create(CellSpec {
            id: id.clone(),
            size_class: common::small(),
            slot: 1,
        })
        .await
        .expect("create cell");
    tb.sandbox
        .wait_ready(&cell, Duration::from_secs(30))
        .await
        .expect("cell ready");
    eprintln!("cell ready after {:?}", start.elapsed());
    assert!(tb.sandbox.is_alive(&id));

    // Jail: PID 1 of its own namespaces, no new privileges, seccomp filter on.
    let cell_dir = tb.sandbox.cell_dir(&id);
    let pid = std::fs::read_to_string(cell_dir.join("pid")).unwrap();
    for ns in ["pid", "mnt", "net", "uts", "ipc"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(ours, theirs, "{ns} namespace is shared with the box");
    }
    assert_eq!(status_field(&pid, "NoNewPrivs:"), "1");
    assert_eq!(status_field(&pid, "Seccomp:"), "2");
    assert_eq!(
        status_field(&pid, "NSpid:").split_whitespace().last(),
        Some("1")
    );

    // Resources: cgroup with limits, netns, veth with its /30, firewall membership.
    let cg = tb.sandbox.cgroups().open("hive-test-life", &id);
    assert_eq!(cg.memory_limit().unwrap(), 512 * 1024 * 1024);
    assert!(cg.pids().unwrap().contains(&pid.trim().parse().unwrap()));
    if let Some(list) = cg.devices_list() {
        // v1 devices controller: only the cell's character devices, no block device.
        assert!(!list.contains("a *:*"), "devices: {list}");
        assert!(
            !list.lines().any(|l| l.starts_with("b ")),
            "devices: {list}"
        );
    }
    let names = CellNetNames::for_cell(&id);
    assert!(link_exists(&names.veth).await.unwrap());
    assert!(Path::new("/run/netns").join(&names.netns).exists());
    assert!(tb.net.has_cell(&names.veth));

    // A build through the real CellAgent: output comes back in order with the exit code.
    let mut client = cell.client();
    let reply = client
        .run_build(RunBuildRequest {
            build_id: "b-life".into(),
            steps: vec![
                "echo one; echo two".into(),
                "cat /proc/self/status | grep NoNewPrivs".into(),
                "exit 3".into(),
            ],
            timeout_secs: 60,
            ..Default::default()
        })
        .await
        .expect("RunBuild")
        .into_inner();
    assert!(reply.accepted);
    let mut events = client
        .events(CellEventsRequest {
            build_id: "b-life".into(),
            from_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = String::new();
    let mut finished = None;
    while let Some(ev) = events.message().await.unwrap() {
        match CellEventKind::try_from(ev.kind).unwrap() {
            CellEventKind::Log => out.push_str(&String::from_utf8_lossy(&ev.data)),
            CellEventKind::BuildFinished => {
                finished = Some((ev.state, ev.exit_code));
                break;
            }
            _ => {}
        }
    }
    eprintln!("build output:\n{out}");
    assert_eq!(finished, Some((BuildState::Failed as i32, 3)));
    let one = out.find("one").expect("step output");
    let two = out.find("two").expect("step output");
    assert!(one < two, "output out of order");
    assert!(
        out.contains("NoNewPrivs:\t1"),
        "build inherits no_new_privs"
    );

    // Destroy: nothing of the cell is left.
    tb.sandbox.destroy(&id).await.expect("destroy");
    assert!(!tb.sandbox.is_alive(&id));
    assert!(!cell_dir.exists(), "cell dir left");
    assert!(!link_exists(&names.veth).await.unwrap(), "veth left");
    assert!(
        !Path::new("/run/netns").join(&names.netns).exists(),
        "netns left"
    );
    assert!(!tb.net.has_cell(&names.veth), "firewall entry left");
    for d in cg.dirs() {
        assert!(!d.exists(), "cgroup {} left", d.display());
    }
    let left = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap_or_default();
    assert!(left.is_empty(), "cell process left: {left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_that_cannot_start_reports_why_and_leaves_nothing() {
    let mut tb = common::sandbox("bad", 202);
    // A cell binary that is not a program: the jail's exec fails.
    let bogus = tb.dir.path().join("not-a-program");
    std::fs::write(&bogus, "nothing").unwrap();
    let cfg = tb.sandbox.config().clone();
    let sandbox =
        hive_box::backend::sandbox::Sandbox::new(hive_box::backend::sandbox::SandboxConfig {
            cell_binary: Some(bogus),
            ..cfg
        })
        .unwrap();
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let cell = sandbox
        .create(CellSpec {
            id: id.clone(),
            size_class: common::small(),
            slot: 2,
        })
        .await
        .unwrap();
    let err = sandbox
        .wait_ready(&cell, Duration::from_secs(10))
        .await
        .unwrap_err();
    let msg = hive_sys::error_chain(&err);
    assert!(msg.contains("exec /sbin/hive-cell"), "{msg}");
    sandbox.destroy(&id).await.unwrap();
    assert!(!sandbox.cell_dir(&id).exists());
    assert!(!link_exists(&CellNetNames::for_cell(&id).veth)
        .await
        .unwrap());
    tb.dir = tempfile::tempdir().unwrap();
}
