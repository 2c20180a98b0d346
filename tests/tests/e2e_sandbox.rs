//! Issue 3, end to end with real processes: a signed GitHub push reaches the real control plane,
//! which places the build on the real `hive-box`, which runs it in a warm sandbox cell with the
//! real `hive-cell` cloning from a real `git daemon` on a public test host. Checked: success with
//! the step output in order, the cell and all its resources gone afterwards, the pool back at its
//! target; a failing step's exit code; timeout; cancel; and that a build cannot reach the box,
//! the control plane, another cell or a private address. Needs root and the Debian build image.
use std::time::{Duration, Instant};

use hive_proto::v1::{BuildState, CancelBuildRequest, CreateProjectRequest, ListBoxesRequest};
use hive_tests::cluster::{self, BoxDaemon, BoxOptions, GitHost, Listener, PrivateHost, Proxy};
use hive_tests::controlplane::{ControlPlane, ControlPlaneOptions};
use hive_tests::github::{push_payload, WebhookClient};

/// The tests share the test-host bridge and CPU; one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SECRET: &str = "e2e-secret";

/// Separates tests that run at once: names, subnets and addresses carry it.
use hive_tests::run_id;

/// `198.18.<1 + run>.<host>`: a public test-host address of this run.
fn public_addr(host: u8) -> String {
    format!("198.18.{}.{host}", 1 + run_id())
}

struct Hive {
    cp_slot: Option<ControlPlane>,
    boxd: BoxDaemon,
    git: GitHost,
    proxy: Option<Proxy>,
}

async fn hive(tag: &str, octet: u8, git_addr: &str, block: Vec<String>) -> Hive {
    hive_with(tag, octet, git_addr, block, Shape::default()).await
}

/// How a test's hive differs from the usual one.
struct Shape {
    /// The box reaches the control plane through a proxy the test can cut.
    via_proxy: bool,
    /// The control plane listens on every address of the box.
    cp_on_all_addresses: bool,
    heartbeat_ms: u64,
    lease_secs: u64,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            via_proxy: false,
            cp_on_all_addresses: false,
            heartbeat_ms: 500,
            lease_secs: 10,
        }
    }
}

async fn hive_with(tag: &str, octet: u8, git_addr: &str, block: Vec<String>, shape: Shape) -> Hive {
    let Shape {
        via_proxy,
        cp_on_all_addresses,
        heartbeat_ms,
        lease_secs,
    } = shape;
    let tag = &format!("{tag}{}", run_id());
    // Box subnets 100.96.<n>.0/24: 20 per run, 12 runs.
    let octet = (run_id() * 20 + u32::from(octet) - 200) as u8;
    let git = GitHost::start(tag, git_addr);
    // On all addresses, the control plane listens on every address of the box, as one run next
    // to the box would; the later `--*-addr` replaces the harness's 127.0.0.1:0.
    let extra_args = if cp_on_all_addresses {
        ["--http-addr", "0.0.0.0:0", "--grpc-addr", "0.0.0.0:0"]
            .map(String::from)
            .to_vec()
    } else {
        Vec::new()
    };
    let mut cp = tokio::task::spawn_blocking(move || {
        ControlPlane::start(ControlPlaneOptions {
            lease_secs,
            heartbeat_interval_ms: heartbeat_ms,
            extra_args,
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .expect("control plane");
    // Clients (the box, the test) reach it on loopback either way.
    for addr in [&mut cp.http_addr, &mut cp.grpc_addr] {
        *addr = addr.replace("0.0.0.0:", "127.0.0.1:");
    }
    let proxy = if via_proxy {
        Some(Proxy::start_boxes(&cp).await)
    } else {
        None
    };
    let url = proxy
        .as_ref()
        .map(Proxy::url)
        .unwrap_or_else(|| cp.grpc_url());
    let tag2 = tag.to_string();
    let boxd = tokio::task::spawn_blocking(move || {
        BoxDaemon::start(
            &url,
            BoxOptions {
                tag: tag2,
                subnet_octet: octet,
                pool: "small=2".into(),
                lease_secs,
                block,
                extra: vec![],
            },
        )
    })
    .await
    .unwrap();
    assert!(
        boxd.wait_connected(Duration::from_secs(30)).await,
        "box never connected; box log:\n{}\ncontrol plane log:\n{}",
        boxd.log(),
        cp.log()
    );
    assert!(
        boxd.wait_pool("small", 2, Duration::from_secs(60)).await,
        "pool never warm; box log:\n{}",
        boxd.log()
    );
    Hive {
        cp_slot: Some(cp),
        boxd,
        git,
        proxy,
    }
}

impl Hive {
    fn cp(&self) -> &ControlPlane {
        self.cp_slot.as_ref().expect("control plane")
    }

    /// The URL the box uses for the control plane.
    fn box_cp_url(&self) -> String {
        self.proxy
            .as_ref()
            .map(Proxy::url)
            .unwrap_or_else(|| self.cp().grpc_url())
    }

    async fn project(&self, name: &str, steps: &[&str], timeout_secs: u32) {
        let mut client = hive_tests::controlplane::api(&self.cp().grpc_url())
            .await
            .unwrap();
        client
            .create_project(CreateProjectRequest {
                name: name.into(),
                repo_url: self.git.add_repo(name),
                secret: SECRET.into(),
                branch: "main".into(),
                size_class: "small".into(),
                steps: steps.iter().map(|s| s.to_string()).collect(),
                timeout_secs,
                ..Default::default()
            })
            .await
            .expect("CreateProject");
    }

    /// Sends a signed push for project `name`; returns the build id.
    async fn push(&self, name: &str) -> String {
        let body = push_payload(
            &format!("git://{}/{name}.git", self.git.addr),
            "refs/heads/main",
            &self.git.head,
            false,
        );
        let delivery = uuid::Uuid::new_v4().to_string();
        let answer = WebhookClient::new()
            .send_signed(&self.cp().webhook_url(), SECRET, "push", &delivery, body)
            .await
            .expect("webhook");
        assert_eq!(answer.status, 202, "webhook answer: {}", answer.body);
        answer.json()["build_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no build id in {}", answer.body))
            .to_string()
    }

    async fn logs(&self, build: &str) -> String {
        let (text, seqs) = cluster::build_log(&self.cp().grpc_url(), build).await;
        let dense: Vec<u64> = (0..seqs.len() as u64).collect();
        assert_eq!(seqs, dense, "log seqs not dense from 0");
        text
    }

    fn context(&self) -> String {
        format!(
            "\n--- box log (tail) ---\n{}\n--- control plane log (tail) ---\n{}",
            tail(&self.boxd.log(), 60),
            tail(&self.cp().log(), 40)
        )
    }

    async fn assert_cell_gone(&self, cell_id: &str) {
        assert!(!cell_id.is_empty());
        let t0 = Instant::now();
        while self.boxd.cells_on_disk().contains(&cell_id.to_string())
            && t0.elapsed() < Duration::from_secs(20)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !self.boxd.cells_on_disk().contains(&cell_id.to_string()),
            "cell dir of {cell_id} still there"
        );
        let veth = format!("hv-{cell_id}");
        let links = std::process::Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&links.stdout).contains(&veth),
            "veth {veth} still there"
        );
        assert!(
            !std::path::Path::new(&format!("/run/netns/hive-{cell_id}")).exists(),
            "netns of {cell_id} still there"
        );
        for ctrl in ["cpu", "memory", "pids"] {
            let cg = format!(
                "/sys/fs/cgroup/{ctrl}/hive-e2e-{}/{cell_id}",
                self.boxd.opts.tag
            );
            assert!(
                !std::path::Path::new(&cg).exists(),
                "cgroup {cg} still there"
            );
        }
        let set = std::process::Command::new("nft")
            .args([
                "list",
                "set",
                "inet",
                &format!("hive_e2e_{}", self.boxd.opts.tag),
                "cells",
            ])
            .output()
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&set.stdout).contains(&veth),
            "firewall still lists {veth}"
        );
    }

    async fn finish(mut self) {
        assert!(
            self.boxd.stop(),
            "hive-box did not exit cleanly:{}",
            self.context()
        );
        assert!(
            self.boxd.cells_on_disk().is_empty(),
            "cells left after SIGTERM: {:?}",
            self.boxd.cells_on_disk()
        );
        if let Some(mut cp) = self.cp_slot.take() {
            cp.stop();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cuts_and_a_control_plane_restart_lose_no_log_line() {
    let _serial = SERIAL.lock().await;
    let mut h = hive_with(
        "link",
        215,
        &public_addr(6),
        vec![],
        Shape {
            via_proxy: true,
            ..Shape::default()
        },
    )
    .await;
    h.project(
        "chatty",
        &["for i in $(seq 1 400); do echo line-$i; sleep 0.005; done"],
        120,
    )
    .await;
    let id = h.push("chatty").await;
    let grpc = h.cp().grpc_url();
    cluster::wait_build_until(&grpc, &id, Duration::from_secs(60), |b| {
        state(b) == BuildState::Running
    })
    .await;
    let proxy = h.proxy.take().unwrap();
    // Cut the link twice while logs stream, then restart the control plane (new port).
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        proxy.cut();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cp = h.cp_slot.take().unwrap();
    let cp = tokio::task::spawn_blocking(move || cp.restart())
        .await
        .unwrap()
        .expect("restart control plane");
    proxy.set_upstream(&cp.box_addr);
    proxy.cut();
    h.cp_slot = Some(cp);
    h.proxy = Some(proxy);
    let b = cluster::wait_build(&h.cp().grpc_url(), &id, Duration::from_secs(120)).await;
    let log = h.logs(&id).await;
    assert_eq!(state(&b), BuildState::Succeeded, "{b:?}{}", h.context());
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("line-")).collect();
    let want: Vec<String> = (1..=400).map(|i| format!("line-{i}")).collect();
    assert_eq!(
        lines,
        want,
        "log lines lost, duplicated or reordered{}",
        h.context()
    );
    assert!(
        h.boxd.log().matches("registered").count() >= 3,
        "the box did not reconnect as expected{}",
        h.context()
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_box_reaps_its_leftover_cells_and_runs_the_build_again() {
    let _serial = SERIAL.lock().await;
    let mut h = hive("reap", 216, &public_addr(7), vec![]).await;
    h.project("long", &["echo started; sleep 600"], 600).await;
    let id = h.push("long").await;
    let grpc = h.cp().grpc_url();
    let b = cluster::wait_build_until(&grpc, &id, Duration::from_secs(60), |b| {
        state(b) == BuildState::Running && !b.cell_id.is_empty()
    })
    .await;
    let cell = b.cell_id.clone();
    let pid_file = h
        .boxd
        .data_dir
        .path()
        .join("data/cells")
        .join(&cell)
        .join("pid");
    let cell_pid = std::fs::read_to_string(&pid_file)
        .expect("cell pid")
        .trim()
        .to_string();

    // The daemon dies; its cells keep running without it.
    h.boxd.crash();
    assert!(std::path::Path::new(&format!("/proc/{cell_pid}")).exists());
    let url = h.box_cp_url();
    tokio::task::block_in_place(|| h.boxd.restart(&url));

    // The restarted box destroys the leftover cell, then gives the attempt back: the build
    // runs again as attempt 2 in a new cell, and never alongside the first run.
    let again = cluster::wait_build_until(&grpc, &id, Duration::from_secs(60), |b| {
        b.attempt >= 2 && state(b) == BuildState::Running && b.cell_id != cell
    })
    .await;
    // (A zombie has stopped running; whoever inherited it reaps it in its own time.)
    let status = std::fs::read_to_string(format!("/proc/{cell_pid}/status")).unwrap_or_default();
    let running = status
        .lines()
        .find(|l| l.starts_with("State:"))
        .is_some_and(|l| !l.contains("Z (zombie)") && !l.contains("X (dead)"));
    assert!(
        !running,
        "the first attempt's cell still runs beside the second: {status}{}",
        h.context()
    );
    h.assert_cell_gone(&cell).await;
    assert_eq!(again.attempt, 2, "{again:?}");
    // (Not `h.logs`: the lost attempt may leave holes in the log's numbering.)
    let (log, _) = cluster::build_log(&grpc, &id).await;
    assert!(
        log.contains("attempt lost on box") && log.contains("box restarted while it ran"),
        "the log does not say why the build ran again:\n{log}"
    );
    let b = cluster::cancel_and_wait(&grpc, &id, "done", Duration::from_secs(60)).await;
    assert_eq!(state(&b), BuildState::Cancelled, "{b:?}{}", h.context());
    assert_eq!(b.attempt, 2, "{b:?}");
    h.assert_cell_gone(&again.cell_id).await;
    assert!(h.boxd.wait_pool("small", 2, Duration::from_secs(60)).await);
    h.finish().await;
}

/// Processes of this host whose command line is exactly `cmd`.
fn processes_running(cmd: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let line = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let line: Vec<String> = line
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if line.join(" ") == cmd {
            pids.push(pid);
        }
    }
    pids
}

/// The box daemon is killed and stays dead while its cell runs a build. The cell notices that no
/// box follows the build any more and stops it (fencing) before the control plane's lease runs
/// out, so when the build is placed again the first run is over: it never runs twice at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_box_s_cell_stops_its_build_before_the_build_is_placed_again() {
    let _serial = SERIAL.lock().await;
    let mut h = hive("orphan", 217, &public_addr(11), vec![]).await;
    // A command line no other test runs, to find the step's process on this host.
    let marker = format!("sleep {}", 600 + run_id() * 7 + 3);
    h.project("orphan", &[&format!("echo started; {marker}")], 600)
        .await;
    let id = h.push("orphan").await;
    let grpc = h.cp().grpc_url();
    let first = cluster::wait_build_until(&grpc, &id, Duration::from_secs(60), |b| {
        state(b) == BuildState::Running && !b.cell_id.is_empty()
    })
    .await;
    let t0 = Instant::now();
    while processes_running(&marker).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the step never started{}",
            h.context()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The box dies and is not restarted: nothing but the cell itself can stop the build now.
    h.boxd.crash();
    let crashed = Instant::now();
    while !processes_running(&marker).is_empty() {
        let b = cluster::wait_build_until(&grpc, &id, Duration::from_secs(10), |_| true).await;
        assert_eq!(
            b.attempt,
            1,
            "the build was placed again while its first run still ran: {b:?}{}",
            h.context()
        );
        assert!(
            crashed.elapsed() < Duration::from_secs(30),
            "the orphaned cell kept running the build{}",
            h.context()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped_after = crashed.elapsed();
    eprintln!("the orphaned cell stopped its build {stopped_after:?} after its box died");
    // The cell's fence is two thirds of the 10 s lease; the control plane re-queues at the lease.
    assert!(
        stopped_after < Duration::from_secs(10),
        "stopped after {stopped_after:?}: not before the 10 s lease ran out"
    );
    let b =
        cluster::wait_build_until(&grpc, &id, Duration::from_secs(60), |b| b.attempt >= 2).await;
    assert!(b.attempt == 2, "{b:?}");

    // The box comes back: it reaps the fenced cell (its stale LOST report changes nothing) and
    // runs the build's second attempt, once.
    let url = h.box_cp_url();
    tokio::task::block_in_place(|| h.boxd.restart(&url));
    let again = cluster::wait_build_until(&grpc, &id, Duration::from_secs(60), |b| {
        state(b) == BuildState::Running && b.cell_id != first.cell_id
    })
    .await;
    assert_eq!(again.attempt, 2, "{again:?}");
    h.assert_cell_gone(&first.cell_id).await;
    let t0 = Instant::now();
    while processes_running(&marker).len() != 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the second attempt is not running once: {:?}{}",
            processes_running(&marker),
            h.context()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b = cluster::cancel_and_wait(&grpc, &id, "done", Duration::from_secs(60)).await;
    assert_eq!(state(&b), BuildState::Cancelled, "{b:?}{}", h.context());
    assert_eq!(b.attempt, 2, "{b:?}");
    h.assert_cell_gone(&again.cell_id).await;
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_box_cut_off_past_its_lease_fences_itself_and_the_build_is_placed_again() {
    let _serial = SERIAL.lock().await;
    let mut h = hive_with(
        "fence",
        218,
        &public_addr(8),
        vec![],
        Shape {
            via_proxy: true,
            ..Shape::default()
        },
    )
    .await;
    h.project("fenced", &["echo running; sleep 600"], 600).await;
    let id = h.push("fenced").await;
    let grpc = h.cp().grpc_url();
    let first = cluster::wait_build_until(&grpc, &id, Duration::from_secs(60), |b| {
        state(b) == BuildState::Running && !b.cell_id.is_empty()
    })
    .await;
    // Cut the box off: every connection dropped, reconnects land on a closed port.
    let proxy = h.proxy.take().unwrap();
    proxy.set_upstream("127.0.0.1:9");
    proxy.cut();
    let t0 = Instant::now();
    while h.boxd.cells_on_disk().contains(&first.cell_id) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the box kept running a build it no longer holds a lease for{}",
            h.context()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fenced_after = t0.elapsed();
    // The box fences at two thirds of the 10 s lease after it last heard the control plane (a
    // heartbeat or less before the cut), so its cell is gone before the lease runs out and the
    // control plane places the build again.
    assert!(
        fenced_after >= Duration::from_secs(4),
        "fenced after {fenced_after:?}, well before two thirds of the 10 s lease"
    );
    assert!(
        fenced_after < Duration::from_secs(10),
        "fenced after {fenced_after:?}: the cell still ran when the 10 s lease ran out{}",
        h.context()
    );
    assert!(h.boxd.log().contains("self-fence"), "{}", h.context());
    h.assert_cell_gone(&first.cell_id).await;

    // Back online: the control plane re-queued the build; it runs again in a new cell, and the
    // fenced attempt's late report does not end it.
    proxy.set_upstream(&h.cp().box_addr);
    h.proxy = Some(proxy);
    let again = cluster::wait_build_until(&grpc, &id, Duration::from_secs(60), |b| {
        b.attempt >= 2 && state(b) == BuildState::Running && b.cell_id != first.cell_id
    })
    .await;
    let b = cluster::cancel_and_wait(&grpc, &id, "done", Duration::from_secs(60)).await;
    assert_eq!(state(&b), BuildState::Cancelled, "{b:?}{}", h.context());
    h.assert_cell_gone(&again.cell_id).await;
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_box_finishes_its_build_and_a_stopped_one_gives_its_build_back() {
    let _serial = SERIAL.lock().await;
    let mut h = hive("drain", 219, &public_addr(10), vec![]).await;
    h.project(
        "short",
        &["echo draining-soon; sleep 2; echo done-here"],
        60,
    )
    .await;
    let id = h.push("short").await;
    let grpc = h.cp().grpc_url();
    cluster::wait_build_until(&grpc, &id, Duration::from_secs(60), |b| {
        state(b) == BuildState::Running
    })
    .await;
    let mut client = hive_tests::controlplane::api(&grpc).await.unwrap();
    client
        .drain_box(hive_proto::v1::BoxActionRequest {
            box_id: format!("box-{}", h.boxd.opts.tag),
        })
        .await
        .expect("DrainBox");
    let status = tokio::task::block_in_place(|| h.boxd.wait_exit(Duration::from_secs(60)));
    assert!(
        status.is_some_and(|s| s.success()),
        "drained box did not exit cleanly: {status:?}{}",
        h.context()
    );
    let b = cluster::wait_build(&grpc, &id, Duration::from_secs(10)).await;
    assert_eq!(state(&b), BuildState::Succeeded, "{b:?}{}", h.context());
    assert!(h.logs(&id).await.contains("done-here"));
    assert!(
        h.boxd.cells_on_disk().is_empty(),
        "cells left: {:?}",
        h.boxd.cells_on_disk()
    );

    // Stopped (SIGTERM) with a build that outlasts its 5 s grace: the box stops the build and
    // gives the attempt back instead of failing it, and the build runs again (here on the same
    // box once it is back).
    // Uncordoned first, as an operator does: a drained box that registers again while still
    // marked draining is told to drain again (and, empty, exits at once).
    client
        .uncordon_box(hive_proto::v1::BoxActionRequest {
            box_id: format!("box-{}", h.boxd.opts.tag),
        })
        .await
        .expect("UncordonBox after the drain");
    let url = h.box_cp_url();
    tokio::task::block_in_place(|| h.boxd.restart(&url));
    h.project("long", &["echo long-running; sleep 600"], 600)
        .await;
    let id = h.push("long").await;
    let first = cluster::wait_build_until(&grpc, &id, Duration::from_secs(60), |b| {
        state(b) == BuildState::Running && !b.cell_id.is_empty()
    })
    .await;
    let t0 = Instant::now();
    let clean = tokio::task::block_in_place(|| h.boxd.stop());
    assert!(clean, "the box did not stop cleanly{}", h.context());
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "stopping took {:?} (grace 5 s){}",
        t0.elapsed(),
        h.context()
    );
    let b = cluster::wait_build_until(&grpc, &id, Duration::from_secs(30), |b| {
        b.attempt == 2 && state(b) == BuildState::Queued
    })
    .await;
    assert!(b.message.contains("box shut down"), "{b:?}");
    tokio::task::block_in_place(|| h.boxd.restart(&url));
    let again = cluster::wait_build_until(&grpc, &id, Duration::from_secs(60), |b| {
        state(b) == BuildState::Running && b.cell_id != first.cell_id
    })
    .await;
    assert_eq!(again.attempt, 2, "{again:?}");
    let b = cluster::cancel_and_wait(&grpc, &id, "done", Duration::from_secs(60)).await;
    assert_eq!(state(&b), BuildState::Cancelled, "{b:?}{}", h.context());
    h.assert_cell_gone(&first.cell_id).await;
    h.assert_cell_gone(&again.cell_id).await;
    h.finish().await;
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn state(b: &hive_proto::v1::Build) -> BuildState {
    BuildState::try_from(b.state).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_builds_in_a_warm_cell_logs_in_order_and_cleans_up() {
    let _serial = SERIAL.lock().await;
    let h = hive("ok", 211, &public_addr(2), vec![]).await;
    h.project(
        "demo",
        &[
            "echo first-step-out; echo first-step-err >&2",
            "sh ./build.sh",
            "cat README; echo last-line",
        ],
        120,
    )
    .await;
    // The control plane has heard of a warm cell (the box's heartbeat carries its pool), so the
    // webhook's own transaction can place the build (asserted below).
    let mut api = h.cp().api().await;
    let heard = Instant::now();
    while !api
        .list_boxes(ListBoxesRequest {})
        .await
        .unwrap()
        .into_inner()
        .boxes
        .iter()
        .any(|b| {
            b.pools
                .iter()
                .any(|p| p.size_class == "small" && p.warm > 0)
        })
    {
        assert!(
            heard.elapsed() < Duration::from_secs(30),
            "the control plane never heard of a warm cell{}",
            h.context()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id = h.push("demo").await;
    let b = cluster::wait_build(&h.cp().grpc_url(), &id, Duration::from_secs(120)).await;
    let log = h.logs(&id).await;
    assert_eq!(
        state(&b),
        BuildState::Succeeded,
        "{b:?}\nlog:\n{log}{}",
        h.context()
    );
    assert!(b.warm_start, "build did not get a warm cell: {b:?}");
    assert_eq!(b.exit_code, 0);
    // Clone phase, then each step's output, in order.
    let order = [
        &format!("checked out {}", h.git.head)[..],
        "first-step-out",
        "build line 1",
        "build line 2",
        "build line 3",
        "hive demo repository",
        "last-line",
    ];
    let mut at = 0;
    for needle in order {
        let pos = log[at..]
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} missing or out of order in log:\n{log}"));
        at += pos + needle.len();
    }
    assert!(log.contains("first-step-err"), "stderr missing:\n{log}");
    // Issue 16: the control plane timed the build's start, stage by stage, in /metrics.
    let metrics = WebhookClient::new()
        .get(&format!("http://{}/metrics", h.cp().http_addr))
        .await
        .expect("metrics");
    for stage in ["accepted", "running", "first_log"] {
        let timed = hive_tests::controlplane::histogram_quantile(
            &metrics.body,
            "hive_build_start_stage_seconds",
            &format!("stage=\"{stage}\""),
            1.0,
        );
        assert!(
            timed.is_some_and(|(n, worst)| n == 1 && worst < 120.0),
            "stage {stage} not timed once: {timed:?}\n{}",
            metrics.body
        );
    }
    // An idle hive with a warm cell: the webhook's own transaction placed the build.
    assert_eq!(
        metric_value(&metrics.body, "hive_placed_at_once_total"),
        1.0,
        "the build was not placed by its webhook's transaction"
    );
    // And on the box's clock (a sandbox build without a private network: no tunnel stage).
    let box_metrics = h.boxd.metrics().await;
    for (stage, n) in [
        ("cell", 1),
        ("tunnel", 0),
        ("run_build", 1),
        ("events", 1),
        ("first_event", 1),
        ("first_output", 1),
    ] {
        let timed = hive_tests::controlplane::histogram_quantile(
            &box_metrics,
            "hive_box_dispatch_stage_seconds",
            &format!("stage=\"{stage}\""),
            1.0,
        );
        assert_eq!(
            timed.map_or(0, |(count, _)| count),
            n,
            "box stage {stage}: {timed:?}\n{box_metrics}"
        );
    }

    h.assert_cell_gone(&b.cell_id).await;
    assert!(
        h.boxd.wait_pool("small", 2, Duration::from_secs(30)).await,
        "pool not back at target: {:?}",
        h.boxd.health().await
    );

    // Issue 10: a project secret is in the steps' environment and nowhere in the log, on
    // stdout or stderr, whole or written in pieces.
    const VALUE: &str = "s3cr3t-v4lue-xyz";
    h.project(
        "masked",
        &[
            "echo token=$API_TOKEN; printf '%s\\n' \"$API_TOKEN\" >&2",
            "printf 's3cr3t-'; sleep 0.2; printf 'v4lue-xyz tail\\n'",
            "test \"$API_TOKEN\" = \"$(printf 's3cr3t-%s' v4lue-xyz)\" && echo secret-seen",
            "echo the step line is masked too: s3cr3t-v4lue-xyz",
        ],
        120,
    )
    .await;
    hive_tests::controlplane::api(&h.cp().grpc_url())
        .await
        .unwrap()
        .set_secret(hive_proto::v1::SetSecretRequest {
            project: "masked".into(),
            name: "API_TOKEN".into(),
            value: VALUE.into(),
            ..Default::default()
        })
        .await
        .expect("set secret");
    let id = h.push("masked").await;
    let b = cluster::wait_build(&h.cp().grpc_url(), &id, Duration::from_secs(120)).await;
    let log = h.logs(&id).await;
    assert_eq!(
        state(&b),
        BuildState::Succeeded,
        "{b:?}\nlog:\n{log}{}",
        h.context()
    );
    assert!(
        log.contains("secret-seen"),
        "the step did not see the secret:\n{log}"
    );
    assert!(
        log.contains("token=***") && log.contains("*** tail"),
        "not masked:\n{log}"
    );
    assert!(!log.contains(VALUE), "the secret reached the log:\n{log}");
    h.finish().await;
}

/// The control plane's view of the box's `small` pool: (warm, busy) as last told.
async fn told_pool(h: &Hive) -> Option<(u32, u32)> {
    let boxes = h
        .cp()
        .api()
        .await
        .list_boxes(ListBoxesRequest {})
        .await
        .ok()?
        .into_inner()
        .boxes;
    let p = boxes
        .iter()
        .flat_map(|b| b.pools.iter())
        .find(|p| p.size_class == "small")?;
    Some((p.warm, p.busy))
}

/// Polls the control plane's view of the pool until it is `want`, for at most `within`.
async fn wait_told(h: &Hive, want: (u32, u32), within: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut last = None;
    while t0.elapsed() < within {
        last = told_pool(h).await;
        if last == Some(want) {
            return Ok(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("(warm, busy) still {last:?}, not {want:?}"))
}

/// A box tells the control plane of room it gained (a cell became warm, a used cell was
/// released) at once, not at its next heartbeat: with heartbeats 30 s apart, the control plane
/// hears of the first warm cells, of the refilled cell beside a running build, and of the
/// released cell after it, each within seconds. Until it hears, it counts the box fuller than
/// it is (and places the next build cold, or elsewhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_box_tells_the_room_it_gains_before_its_next_heartbeat() {
    let _serial = SERIAL.lock().await;
    let h = hive_with(
        "room",
        210,
        &public_addr(12),
        vec![],
        Shape {
            heartbeat_ms: 30_000,
            lease_secs: 120,
            ..Shape::default()
        },
    )
    .await;
    let within = Duration::from_secs(5);
    let warm = wait_told(&h, (2, 0), within).await;
    h.project("slow", &["sleep 6", "echo slept"], 120).await;
    let id = h.push("slow").await;
    // The build holds a cell; its replacement boots beside it and is told.
    let refilled = wait_told(&h, (2, 1), within).await;
    let b = cluster::wait_build(&h.cp().grpc_url(), &id, Duration::from_secs(120)).await;
    assert_eq!(state(&b), BuildState::Succeeded, "{b:?}{}", h.context());
    // The used cell is destroyed and told.
    let released = wait_told(&h, (2, 0), within).await;
    eprintln!("told: first warm cells {warm:?}, refill {refilled:?}, release {released:?}");
    for (what, r) in [
        ("the first warm cells", warm),
        ("the refilled cell", refilled),
        ("the released cell", released),
    ] {
        if let Err(e) = r {
            panic!(
                "the control plane did not hear of {what} within {within:?}: {e}{}",
                h.context()
            );
        }
    }
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_step_timeout_and_cancel_end_the_build() {
    let _serial = SERIAL.lock().await;
    let h = hive("stop", 212, &public_addr(3), vec![]).await;
    h.project("fails", &["echo before", "exit 7", "echo never-runs"], 60)
        .await;
    h.project("slow", &["echo sleeping; sleep 600"], 3).await;
    h.project("cancelme", &["echo waiting; sleep 600"], 600)
        .await;

    // A failing step fails the build with its exit code; later steps do not run.
    let id = h.push("fails").await;
    let b = cluster::wait_build(&h.cp().grpc_url(), &id, Duration::from_secs(120)).await;
    let log = h.logs(&id).await;
    assert_eq!(state(&b), BuildState::Failed, "{b:?}{}", h.context());
    assert_eq!(b.exit_code, 7, "{b:?}");
    assert!(
        log.contains("before") && !log.contains("never-runs"),
        "{log}"
    );
    h.assert_cell_gone(&b.cell_id).await;

    // Timeout: the 3 s limit stops `sleep 600`.
    let t0 = Instant::now();
    let id = h.push("slow").await;
    let b = cluster::wait_build(&h.cp().grpc_url(), &id, Duration::from_secs(60)).await;
    assert_eq!(state(&b), BuildState::TimedOut, "{b:?}{}", h.context());
    assert!(
        t0.elapsed() < Duration::from_secs(40),
        "timeout took {:?}",
        t0.elapsed()
    );
    h.assert_cell_gone(&b.cell_id).await;

    // Cancel: once the step runs, CancelBuild stops it.
    let id = h.push("cancelme").await;
    let grpc = h.cp().grpc_url();
    cluster::wait_build_until(&grpc, &id, Duration::from_secs(60), |b| {
        state(b) == BuildState::Running
    })
    .await;
    let t0 = Instant::now();
    while !h.logs(&id).await.contains("waiting") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "step never started{}",
            h.context()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = hive_tests::controlplane::api(&grpc).await.unwrap();
    client
        .cancel_build(CancelBuildRequest {
            id: id.clone(),
            reason: "e2e cancel".into(),
        })
        .await
        .expect("CancelBuild");
    let t0 = Instant::now();
    let b = cluster::wait_build(&grpc, &id, Duration::from_secs(60)).await;
    assert_eq!(state(&b), BuildState::Cancelled, "{b:?}{}", h.context());
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "cancel took {:?}",
        t0.elapsed()
    );
    h.assert_cell_gone(&b.cell_id).await;

    assert!(h.boxd.wait_pool("small", 2, Duration::from_secs(30)).await);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_cannot_reach_the_box_the_control_plane_other_cells_or_private_addresses() {
    let _serial = SERIAL.lock().await;
    // A stand-in for a control-plane replica on a public-looking address, blocked with --block.
    let cp_stand_in = &public_addr(9);
    // The real control plane listens on every address of the box.
    let h = hive_with(
        "net",
        213,
        &public_addr(4),
        vec![cp_stand_in.into()],
        Shape {
            cp_on_all_addresses: true,
            ..Shape::default()
        },
    )
    .await;
    let cp_host = GitHost::start(&format!("ncp{}", run_id()), cp_stand_in);
    let cp_listener = Listener::start(Some(&cp_host.netns()), &format!("{cp_stand_in}:7000"));
    // A service on the box itself (every address of the box) and one on a private network.
    let box_listener = Listener::start(None, "0.0.0.0:0");
    let private = PrivateHost::start(&format!("e{}", run_id()), 7 + run_id() as u8);
    let private_listener = Listener::start(Some(&private.netns), &format!("{}:7001", private.addr));
    let box_port = box_listener.addr.port();
    let port = |addr: &str| addr.rsplit(':').next().unwrap().to_string();
    let (cp_grpc, cp_http) = (port(&h.cp().grpc_addr), port(&h.cp().http_addr));

    // Another cell: a running build occupies one; its address comes from the box's record, and
    // a listener waits on that address in its network namespace. (Not in the build: a build sits
    // in a container behind the cell's NAT, which forwards nothing inwards, so a listener there
    // would be unreachable whatever the box's firewall says.) The box's end of the occupant's
    // veth (slot * 4 + 1) is one more address of the box.
    h.project("occupant", &["echo occupying; sleep 600"], 600)
        .await;
    let occupant = h.push("occupant").await;
    let grpc = h.cp().grpc_url();
    let ob = cluster::wait_build_until(&grpc, &occupant, Duration::from_secs(60), |b| {
        state(b) == BuildState::Running && !b.cell_id.is_empty()
    })
    .await;
    let slot = h.boxd.cell_slot(&ob.cell_id).expect("occupant cell record");
    let other_cell = h.boxd.cell_ip(slot);
    let box_veth_addr = format!("100.96.{}.{}", h.boxd.opts.subnet_octet, slot * 4 + 1);
    let occupant_netns = format!("hive-{}", ob.cell_id);
    let cell_listener = Listener::start(Some(&occupant_netns), &format!("{other_cell}:7002"));
    let occupant_target = format!("{other_cell}:7002");

    // Positive controls, so a refusal from a cell is the box's firewall, not a dead listener.
    // The other cell's listener from inside that cell: the box's firewall drops whatever a cell
    // sends the box, the answers to the box's own connections too, so no place outside the
    // cells can reach a cell.
    cluster::connect_in_netns(&occupant_netns, cell_listener.addr, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("positive control {occupant_target} from its own cell: {e}"));
    // ... and everything else from the box, outside any cell.
    // The box's own address on its uplink (the source of its default route), when it has one.
    let uplink = uplink_addr();
    let mut box_addrs = vec!["198.18.0.1", box_veth_addr.as_str()];
    if let Some(a) = uplink.as_deref() {
        box_addrs.push(a);
    }
    let mut targets = vec![
        format!("{cp_stand_in}:7000"),
        format!("{}:7001", private.addr),
    ];
    for &addr in &box_addrs {
        for port in [box_port.to_string(), cp_grpc.clone(), cp_http.clone()] {
            targets.push(format!("{addr}:{port}"));
        }
    }
    for target in &targets {
        std::net::TcpStream::connect_timeout(&target.parse().unwrap(), Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("positive control {target}: {e}"));
    }
    // The listeners count on their own threads: let the control connections land first.
    let t0 = Instant::now();
    while [
        cp_listener.count(),
        private_listener.count(),
        cell_listener.count(),
    ]
    .contains(&0)
        || box_listener.count() < box_addrs.len()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "positive controls not accepted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (cp_before, private_before, box_before, cell_before) = (
        cp_listener.count(),
        private_listener.count(),
        box_listener.count(),
        cell_listener.count(),
    );

    let probe = "probe() { if timeout 3 bash -c \"exec 3<>/dev/tcp/$1/$2\" 2>/dev/null; then echo \"REACHED $1:$2\"; else echo \"BLOCKED $1:$2\"; fi; }";
    let mut step = format!("{probe}; probe {} 9418", h.git.addr);
    for target in targets.iter().chain([&occupant_target]) {
        let (addr, port) = target.rsplit_once(':').unwrap();
        step.push_str(&format!("; probe {addr} {port}"));
    }
    h.project("prober", &[&step], 120).await;
    let id = h.push("prober").await;
    let b = cluster::wait_build(&grpc, &id, Duration::from_secs(120)).await;
    let log = h.logs(&id).await;
    eprintln!("probe log:\n{log}");
    assert_eq!(
        state(&b),
        BuildState::Succeeded,
        "{b:?}\n{log}{}",
        h.context()
    );
    // Public egress works (through the box's NAT) ...
    assert!(
        log.contains(&format!("REACHED {}:9418", h.git.addr)),
        "{log}"
    );
    // ... and nothing else does.
    for blocked in targets.iter().chain([&occupant_target]) {
        assert!(
            log.contains(&format!("BLOCKED {blocked}")),
            "{blocked} not blocked:\n{log}"
        );
    }
    assert_eq!(
        cp_listener.count(),
        cp_before,
        "control-plane stand-in was reached"
    );
    assert_eq!(
        private_listener.count(),
        private_before,
        "private host was reached"
    );
    assert_eq!(box_listener.count(), box_before, "box service was reached");
    assert_eq!(
        cell_listener.count(),
        cell_before,
        "the other cell was reached"
    );
    // A late connection would count too: the listener still answers from its own cell.
    cluster::connect_in_netns(&occupant_netns, cell_listener.addr, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("{occupant_target} gone after the probes: {e}"));
    drop(cell_listener);

    cluster::cancel_and_wait(&grpc, &occupant, "done", Duration::from_secs(60)).await;
    drop(cp_host);
    h.finish().await;
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// The floor: time from spawning `unshare` + `chroot` on the same image to the step's first
/// output line.
fn floor_once(image: &std::path::Path) -> f64 {
    time_to_first_line(
        std::process::Command::new("unshare")
            .args([
                "--mount", "--pid", "--fork", "--net", "--uts", "--ipc", "chroot",
            ])
            .arg(image)
            .args(["/bin/sh", "-c", "echo first-line"]),
    )
}

/// Ms from spawning `cmd` to its first line of output, which must be `first-line`.
fn time_to_first_line(cmd: &mut std::process::Command) -> f64 {
    use std::io::BufRead;
    let t0 = Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the floor's command");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let dt = t0.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(line.trim(), "first-line", "{cmd:?} failed");
    let _ = child.wait();
    dt
}

/// A metric's value in a `/metrics` text (0 when absent).
fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Prints p50 and p99 of each `(stage, what)` of a histogram family in a `/metrics` text (bucket
/// upper bounds, so up to 1.5x over).
fn print_stages(whose: &str, text: &str, family: &str, stages: &[(&str, &str)]) {
    for (stage, what) in stages {
        let label = format!("stage=\"{stage}\"");
        let q = |q| hive_tests::controlplane::histogram_quantile(text, family, &label, q);
        match (q(0.5), q(0.99)) {
            (Some((count, p50)), Some((_, p99))) => println!(
                "BENCH {whose} stage {stage} ({what}) over {count}: p50 <= {:.1} ms, p99 <= {:.1} ms",
                p50 * 1e3,
                p99 * 1e3
            ),
            _ => println!("BENCH {whose} stage {stage}: no samples"),
        }
    }
}

/// The same work by hand, to compare the step's first line with: the cell's own clone script
/// (`hive_cell::source`), run with the image's git in a chroot on this host's network against the
/// same git server, then the floor's `echo`. The clone goes to a tmpfs over the image's /tmp in
/// a private mount namespace, so the image stays as it was.
fn clone_floor_once(image: &std::path::Path, url: &str, rev: &str) -> f64 {
    let source = hive_cell::source::Source {
        repo_url: url.into(),
        revision: rev.into(),
        git_ref: "refs/heads/main".into(),
        auth: Default::default(),
    };
    time_to_first_line(
        std::process::Command::new("unshare")
            .args([
                "--mount", "--pid", "--fork", "--uts", "--ipc", "/bin/sh", "-c",
            ])
            .arg(
                "img=$1; shift; mount -t tmpfs hive-bench \"$img/tmp\" \
                 && chroot \"$img\" \"$@\" >/dev/null \
                 && exec chroot \"$img\" /bin/sh -c 'echo first-line'",
            )
            .arg("hive-clone-floor")
            .arg(image)
            .args(source.clone_argv_into("/tmp/src")),
    )
}

/// Benchmark (issue 3): webhook received -> first log line over N builds with a warm pool, next
/// to the unshare+chroot floor. Run with
/// `cargo test -p hive-tests --test e2e_sandbox bench -- --ignored --nocapture` (HIVE_BENCH_N).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: minutes long; run explicitly"]
async fn bench_webhook_to_first_log_line() {
    let _serial = SERIAL.lock().await;
    let n: usize = std::env::var("HIVE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let h = hive("bench", 214, &public_addr(5), vec![]).await;
    h.project("bench", &["echo first-line"], 60).await;
    let grpc = h.cp().grpc_url();
    let mut client = hive_tests::controlplane::api(&grpc).await.unwrap();
    let mut lat = Vec::with_capacity(n);
    // To the step's own first line (`first-line`), the same work as the floor's: the first
    // chunk above is the cell's `hive: build ...`, written before the container starts.
    let mut step_lat = Vec::with_capacity(n);
    // Between the two, on the cell's clock: its first line -> the clone's `checked out` -> the
    // step's line.
    let mut cell_phases: Vec<[f64; 2]> = Vec::with_capacity(n);
    let mut warm = 0;
    // Where the time goes: sent->queued, queued->placed, placed->running, running->first chunk
    // (stamped in the cell), first chunk->seen by the client.
    let mut phases: Vec<[f64; 5]> = Vec::with_capacity(n);
    let now_ms = hive_sys::now_ms;
    for i in 0..n {
        // Each build starts from a pool at target, as in steady state with spare capacity.
        assert!(h.boxd.wait_pool("small", 2, Duration::from_secs(60)).await);
        let sent_ms = now_ms();
        let t0 = Instant::now();
        let id = h.push("bench").await;
        // The first chunk of the log as a `hivectl logs -f` client sees it.
        let (first_at, seen_ms, observed) = loop {
            let mut s = client
                .stream_logs(hive_proto::v1::StreamLogsRequest {
                    build_id: id.clone(),
                    from_seq: 0,
                    follow: true,
                })
                .await
                .unwrap()
                .into_inner();
            if let Some(chunk) = s.message().await.unwrap() {
                let first = (chunk.at_ms, now_ms(), t0.elapsed().as_secs_f64() * 1000.0);
                // On to the step's line (the clone's lines come between).
                let mut checked_at = first.0;
                let mut chunk = Some(chunk);
                while let Some(c) = chunk {
                    let text = String::from_utf8_lossy(&c.data);
                    if text.contains("checked out") {
                        checked_at = c.at_ms;
                    }
                    if text.contains("first-line") {
                        step_lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                        cell_phases
                            .push([(checked_at - first.0) as f64, (c.at_ms - checked_at) as f64]);
                        break;
                    }
                    chunk = s.message().await.unwrap();
                }
                break first;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no log for build {i}"
            );
        };
        let b = cluster::wait_build(&grpc, &id, Duration::from_secs(60)).await;
        assert_eq!(state(&b), BuildState::Succeeded, "{b:?}");
        warm += usize::from(b.warm_start);
        lat.push(observed);
        let at = |st: BuildState| {
            b.transitions
                .iter()
                .find(|t| t.state == st as i32)
                .map(|t| t.at_ms)
                .unwrap_or(0)
        };
        let (q, p, r) = (
            at(BuildState::Queued),
            at(BuildState::Placed),
            at(BuildState::Running),
        );
        phases.push([
            (q - sent_ms) as f64,
            (p - q) as f64,
            (r - p) as f64,
            (first_at - r) as f64,
            (seen_ms - first_at) as f64,
        ]);
    }
    let names = [
        "sent->queued",
        "queued->placed",
        "placed->running",
        "running->first line",
        "first line->client",
    ];
    for (k, name) in names.iter().enumerate() {
        let mut v: Vec<f64> = phases.iter().map(|p| p[k]).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "BENCH phase {name}: median {:.0} ms, p99 {:.0} ms",
            percentile(&v, 0.5),
            percentile(&v, 0.99)
        );
    }
    // The same path as the control plane's histograms see it (its own clock, each stage from
    // the one before; bucket bounds, so up to 1.5x over).
    let metrics = WebhookClient::new()
        .get(&format!("http://{}/metrics", h.cp().http_addr))
        .await
        .expect("metrics");
    print_stages(
        "/metrics",
        &metrics.body,
        "hive_build_start_stage_seconds",
        &[
            ("accepted", "assignment sent -> ACCEPTED written"),
            ("running", "ACCEPTED -> RUNNING written"),
            ("first_log", "RUNNING -> first chunk written"),
            ("followed", "first chunk written -> sent to the follower"),
        ],
    );
    println!(
        "BENCH placed by their webhook's own transaction (a free cell, nothing queued): {} of {} \
         placements",
        metric_value(&metrics.body, "hive_placed_at_once_total"),
        metric_value(&metrics.body, "hive_placements_total"),
    );
    // The box's side of the same start (its clock, each stage from the one before).
    print_stages(
        "box /metrics",
        &h.boxd.metrics().await,
        "hive_box_dispatch_stage_seconds",
        &[
            ("cell", "assignment received -> a cell taken from the pool"),
            ("run_build", "-> RunBuild answered"),
            ("events", "-> the Events stream opened"),
            ("first_event", "-> its first event"),
            ("first_output", "-> its first output line"),
        ],
    );
    let health = h.boxd.health().await;
    println!(
        "BENCH box dispatch (assignment received -> first output line from the cell) over {}: median {:.1} ms, p99 {:.1} ms",
        health["dispatch_ms"]["n"], health["dispatch_ms"]["median"].as_f64().unwrap_or(0.0),
        health["dispatch_ms"]["p99"].as_f64().unwrap_or(0.0)
    );
    let image = cluster::build_image();
    let mut floor: Vec<f64> = (0..n).map(|_| floor_once(&image)).collect();
    let url = format!("git://{}/bench.git", h.git.addr);
    let mut clone_floor: Vec<f64> = (0..n)
        .map(|_| clone_floor_once(&image, &url, &h.git.head))
        .collect();
    clone_floor.sort_by(|a, b| a.partial_cmp(b).unwrap());
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    step_lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    floor.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "BENCH webhook->first log line over {n} builds ({warm} warm): median {:.1} ms, p99 {:.1} ms",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    println!(
        "BENCH floor unshare+chroot -> first line over {n}: median {:.1} ms, p99 {:.1} ms",
        percentile(&floor, 0.5),
        percentile(&floor, 0.99)
    );
    assert_eq!(step_lat.len(), n, "a build's log had no `first-line`");
    for (k, name) in [
        "cell's first line -> clone checked out",
        "checked out -> step's line",
    ]
    .iter()
    .enumerate()
    {
        let mut v: Vec<f64> = cell_phases.iter().map(|p| p[k]).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "BENCH in the cell, {name}: median {:.0} ms, p99 {:.0} ms",
            percentile(&v, 0.5),
            percentile(&v, 0.99)
        );
    }
    println!(
        "BENCH webhook->the step's first line (`first-line`) over {n}: median {:.1} ms, p99 {:.1} ms; / floor: median {:.2}x, p99 {:.2}x",
        percentile(&step_lat, 0.5),
        percentile(&step_lat, 0.99),
        percentile(&step_lat, 0.5) / percentile(&floor, 0.5),
        percentile(&step_lat, 0.99) / percentile(&floor, 0.99)
    );
    println!(
        "BENCH the same by hand (the cell's clone script in a chroot, then the echo) over {n}: median {:.1} ms, p99 {:.1} ms; webhook->the step's first line / that: median {:.2}x, p99 {:.2}x",
        percentile(&clone_floor, 0.5),
        percentile(&clone_floor, 0.99),
        percentile(&step_lat, 0.5) / percentile(&clone_floor, 0.5),
        percentile(&step_lat, 0.99) / percentile(&clone_floor, 0.99)
    );
    println!(
        "BENCH ratio webhook->first line / floor: median {:.2}x, p99 {:.2}x; box dispatch / floor: median {:.2}x",
        percentile(&lat, 0.5) / percentile(&floor, 0.5),
        percentile(&lat, 0.99) / percentile(&floor, 0.99),
        health["dispatch_ms"]["median"].as_f64().unwrap_or(0.0) / percentile(&floor, 0.5)
    );
    h.finish().await;
}

/// The source address of this machine's default route (`ip route get`), if it has one: one more
/// address of the box that cells must not reach.
fn uplink_addr() -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "route", "get", "198.51.100.1"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "src" {
            return words.next().map(str::to_string);
        }
    }
    None
}
