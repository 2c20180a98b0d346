//! The microVM backend end to end, on a real KVM: this machine's KVM cannot boot Linux, so each
//! test boots an emulated KVM host ("L1", [`hive_tests::kvmhost`]) in which `/dev/kvm` works, and
//! runs the real `hive-box --backend microvm` there: our VMM, the real guest kernel, `hive-cell`
//! as PID 1 of the guest, the build container inside the guest. The control plane, the git host
//! and the private network's connector run here, outside L1, as they would on other machines.
//!
//! Slow by nature (TCG emulates L1 and, through it, the guest): each test boots its own L1 and
//! they run one at a time (`.config/nextest.toml`, group `microvm`). Run them alone with
//! `cargo nextest run -p hive-tests microvm_e2e`. Needs root, QEMU, the guest kernel and images
//! (built and cached on first use).
use std::time::{Duration, Instant};

use hive_proto::v1::{
    AddConnectorRequest, BuildState, CreateNetworkRequest, CreateProjectRequest,
    ListConnectorsRequest, SubmitBuildRequest,
};
use hive_tests::cluster::{self, GitHost};
use hive_tests::controlplane::{ControlPlane, ControlPlaneOptions};
use hive_tests::github::{push_payload, WebhookClient};
use hive_tests::kvmhost::{
    prepare_bench_or_skip, prepare_or_skip, KvmHost, KvmHostOptions, L1BoxOptions,
};
use hive_tests::privnet::{http_step, Connector, Customer};

const SECRET: &str = "microvm-e2e-secret";

/// Separates tests that run at once: names, subnets and addresses carry it.
use hive_tests::run_id;

fn state(b: &hive_proto::v1::Build) -> BuildState {
    BuildState::try_from(b.state).unwrap_or_default()
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A control plane and a git host here, L1 with a microVM box that dials the control plane.
struct Hive {
    cp: ControlPlane,
    git: GitHost,
    l1: KvmHost,
    started: Instant,
}

async fn hive(test: &str, tag: &str, host: u8, box_opts: L1BoxOptions) -> Option<Hive> {
    hive_on(test, tag, host, box_opts, KvmHostOptions::default()).await
}

async fn hive_on(
    test: &str,
    tag: &str,
    host: u8,
    box_opts: L1BoxOptions,
    l1_opts: KvmHostOptions,
) -> Option<Hive> {
    let p = tokio::task::spawn_blocking({
        let test = test.to_string();
        move || prepare_or_skip(&test)
    })
    .await
    .unwrap()?;
    let started = Instant::now();
    let git_addr = format!("198.18.{}.{host}", 1 + run_id());
    let git = GitHost::start(&format!("{tag}{}", run_id()), &git_addr);
    let cp = tokio::task::spawn_blocking(|| {
        ControlPlane::start(ControlPlaneOptions {
            // The emulated host is 20-50x slower than hardware: the box's lease renewals and
            // heartbeats still arrive in time, but give them room.
            lease_secs: 60,
            heartbeat_interval_ms: 1000,
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .expect("control plane");
    let grpc = cp.grpc_addr.clone();
    let l1 = tokio::task::spawn_blocking(move || {
        let l1 = KvmHost::boot(&p, &l1_opts);
        eprintln!("L1 up in {:?} (cgroup {})", l1.booted_in, l1_opts.cgroup);
        l1.start_box(&grpc, &box_opts);
        l1
    })
    .await
    .unwrap();
    let h = Hive {
        cp,
        git,
        l1,
        started,
    };
    let t0 = Instant::now();
    let warm = h.l1.wait_pool("small", 1, Duration::from_secs(300)).await;
    assert!(warm, "pool never warm in L1{}", h.context());
    eprintln!(
        "microVM pool warm {:?} after the box started ({:?} since the test began)",
        t0.elapsed(),
        h.started.elapsed()
    );
    Some(h)
}

impl Hive {
    fn context(&self) -> String {
        format!(
            "\n--- L1 ---\n{}\n--- box log in L1 (tail) ---\n{}\n--- control plane log (tail) ---\n{}\n--- L1 console (tail) ---\n{}",
            self.l1.gone().unwrap_or_else(|| "L1's QEMU is running".into()),
            tail(&self.l1.box_log(), 80),
            tail(&self.cp.log(), 40),
            tail(&self.l1.console(), 60),
        )
    }

    async fn project(&self, name: &str, steps: &[&str], timeout_secs: u32, env: &[(&str, &str)]) {
        let mut client = hive_tests::controlplane::api(&self.cp.grpc_url())
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
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            })
            .await
            .expect("CreateProject");
    }

    /// A signed push for project `name`; the build id.
    async fn push(&self, name: &str) -> String {
        let body = push_payload(
            &format!("git://{}/{name}.git", self.git.addr),
            "refs/heads/main",
            &self.git.head,
            false,
        );
        let delivery = uuid::Uuid::new_v4().to_string();
        let answer = WebhookClient::new()
            .send_signed(&self.cp.webhook_url(), SECRET, "push", &delivery, body)
            .await
            .expect("webhook");
        assert_eq!(answer.status, 202, "webhook answer: {}", answer.body);
        answer.json()["build_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no build id in {}", answer.body))
            .to_string()
    }

    async fn logs(&self, build: &str) -> String {
        let (text, seqs) = cluster::build_log(&self.cp.grpc_url(), build).await;
        let dense: Vec<u64> = (0..seqs.len() as u64).collect();
        assert_eq!(seqs, dense, "log seqs not dense from 0");
        text
    }

    /// The build's log as stored, holes allowed (a lost attempt may leave some).
    async fn logs_loose(&self, build: &str) -> String {
        cluster::build_log(&self.cp.grpc_url(), build).await.0
    }

    /// Waits for the pool to be back to one warm cell and none busy; on timeout fails with the
    /// box's own view of its pool and the logs.
    async fn wait_pool_back(&self) {
        if !self
            .l1
            .wait_pool("small", 1, Duration::from_secs(300))
            .await
        {
            panic!(
                "pool not back to 1 warm / 0 busy in 300 s; box health: {}{}",
                self.l1.box_health().await,
                self.context()
            );
        }
    }

    /// Waits until nothing of `cell` is left in L1: VMM process, TAP, veth, netns, cgroup, dir.
    async fn assert_cell_gone(&self, cell: &str) {
        assert!(!cell.is_empty());
        let t0 = Instant::now();
        loop {
            let left: Vec<String> = self
                .l1
                .cell_leftovers("hive-box")
                .into_iter()
                .filter(|l| l.contains(cell))
                .collect();
            if left.is_empty() {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "cell {cell} not cleaned up in L1: {left:?}{}",
                self.context()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn finish(self) {
        let stopped = self.l1.stop_box(Duration::from_secs(120));
        assert!(
            stopped,
            "hive-box in L1 did not stop on SIGTERM{}",
            self.context()
        );
        let left = self.l1.cell_leftovers("hive-box");
        assert!(
            left.is_empty(),
            "left in L1 after the box stopped: {left:?}{}",
            self.context()
        );
        eprintln!("test took {:?}", self.started.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_e2e_push_builds_in_a_warm_microvm_cell() {
    let test = "microvm_e2e_push_builds_in_a_warm_microvm_cell";
    // `auto`: L1 shows svm and /dev/kvm opens, so the box must choose the microVM backend.
    let Some(h) = hive(
        test,
        "mvok",
        20,
        L1BoxOptions {
            backend: "auto".into(),
            ..Default::default()
        },
    )
    .await
    else {
        return;
    };
    let health = h.l1.box_health().await;
    assert_eq!(health["backend"], "microvm", "{health}{}", h.context());

    h.project(
        "demo",
        &[
            "echo first-step-out; echo first-step-err >&2",
            "sh ./build.sh",
            "cat README; uname -r; echo last-line",
        ],
        600,
        &[],
    )
    .await;
    let t0 = Instant::now();
    let id = h.push("demo").await;
    let b = cluster::wait_build(&h.cp.grpc_url(), &id, Duration::from_secs(600)).await;
    let log = h.logs(&id).await;
    eprintln!(
        "build took {:?} (webhook to terminal state); log:\n{log}",
        t0.elapsed()
    );
    assert_eq!(
        state(&b),
        BuildState::Succeeded,
        "{b:?}\nlog:\n{log}{}",
        h.context()
    );
    assert!(b.warm_start, "build did not get a warm cell: {b:?}");
    assert_eq!(b.backend, "microvm", "{b:?}");
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
    // The step ran on the guest kernel (ours, 6.1 built from linux-source), not L1's cloud kernel.
    assert!(!log.contains("cloud-amd64"), "ran on L1's kernel?\n{log}");

    // `hivectl build` says where it ran.
    let out = h.cp.hivectl(&["build", &id]).expect("hivectl build");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("microvm"), "{text}");

    h.assert_cell_gone(&b.cell_id).await;
    let back = h.l1.wait_pool("small", 1, Duration::from_secs(300)).await;
    assert!(back, "pool did not boot a replacement{}", h.context());
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_e2e_failing_step_timeout_and_cancel() {
    let test = "microvm_e2e_failing_step_timeout_and_cancel";
    // On cgroup v2, as Debian 12 hosts mount it (the other tests use v1, as this machine does).
    let l1 = KvmHostOptions {
        cgroup: "v2",
        ..Default::default()
    };
    let Some(h) = hive_on(test, "mvstop", 21, L1BoxOptions::default(), l1).await else {
        return;
    };
    assert!(
        h.l1.run("test -f /sys/fs/cgroup/cgroup.controllers").status == 0,
        "L1 is not on cgroup v2"
    );
    assert!(
        h.l1.box_log().contains("cgroup=2") || h.l1.box_log().contains("cgroup=v2"),
        "the box did not detect cgroup v2:\n{}",
        tail(&h.l1.box_log(), 20)
    );
    h.project(
        "fails",
        &["echo before", "exit 7", "echo never-runs"],
        600,
        &[],
    )
    .await;
    h.project("slow", &["echo sleeping; sleep 600"], 20, &[])
        .await;
    h.project("cancelme", &["echo waiting; sleep 600"], 600, &[])
        .await;
    let grpc = h.cp.grpc_url();

    let id = h.push("fails").await;
    let b = cluster::wait_build(&grpc, &id, Duration::from_secs(600)).await;
    let log = h.logs(&id).await;
    assert_eq!(state(&b), BuildState::Failed, "{b:?}{}", h.context());
    assert_eq!(b.exit_code, 7, "{b:?}");
    assert!(
        log.contains("before") && !log.contains("never-runs"),
        "{log}"
    );
    h.assert_cell_gone(&b.cell_id).await;
    h.wait_pool_back().await;

    // The 20 s limit stops `sleep 600` (counted from the build's start in the cell).
    let id = h.push("slow").await;
    let b = cluster::wait_build(&grpc, &id, Duration::from_secs(600)).await;
    assert_eq!(state(&b), BuildState::TimedOut, "{b:?}{}", h.context());
    h.assert_cell_gone(&b.cell_id).await;
    h.wait_pool_back().await;

    let id = h.push("cancelme").await;
    let t0 = Instant::now();
    while !h.logs(&id).await.contains("waiting") {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "step never started{}",
            h.context()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let b =
        cluster::cancel_and_wait(&grpc, &id, "microvm e2e cancel", Duration::from_secs(300)).await;
    assert_eq!(state(&b), BuildState::Cancelled, "{b:?}{}", h.context());
    h.assert_cell_gone(&b.cell_id).await;
    h.wait_pool_back().await;
    h.finish().await;
}

/// A private-network build in a microVM: the cell's tunnel is the guest kernel's WireGuard (the
/// host here has only userspace WireGuard, so this is the only place the kernel path runs), to a
/// connector here in front of a customer network; with `HIVE_EGRESS=none` the build reaches the
/// customer's git and HTTP services and nothing public.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_e2e_private_network_over_kernel_wireguard() {
    let test = "microvm_e2e_private_network_over_kernel_wireguard";
    let run = run_id();
    let Some(h) = hive(test, "mvpn", 50, L1BoxOptions::default()).await else {
        return;
    };
    let customer = Customer::start(run, &h.git.netns());
    let mut client = hive_tests::controlplane::api(&h.cp.grpc_url())
        .await
        .unwrap();
    client
        .create_network(CreateNetworkRequest {
            name: "corp".into(),
            prefixes: vec!["10.20.0.0/16".into()],
            tunnel_subnet: "10.250.0.0/24".into(),
        })
        .await
        .expect("CreateNetwork");
    let dir = tempfile::Builder::new()
        .prefix("hive-conn-")
        .tempdir()
        .unwrap();
    let public_key = Connector::key(dir.path());
    let added = client
        .add_connector(AddConnectorRequest {
            network: "corp".into(),
            endpoint: format!("{}:51820", h.git.addr),
            public_key,
        })
        .await
        .expect("AddConnector")
        .into_inner();
    let connector = Connector::start(
        &h.cp.grpc_url(),
        "corp",
        &added.token,
        &h.git.netns(),
        &format!("hwgm{run}"),
        dir,
    );
    let t0 = Instant::now();
    loop {
        let cs = client
            .list_connectors(ListConnectorsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .connectors;
        if cs.iter().any(|c| c.connected) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "connector never connected; log:\n{}",
            connector.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let public_repo = h.git.repo_url.clone();
    let probe = format!(
        "if timeout 20 git ls-remote {public_repo}; then echo REACHED-PUBLIC; exit 1; fi; \
         echo public host unreachable"
    );
    let steps = [
        "cat PRIVATE".to_string(),
        // The interface the build sees is a kernel WireGuard device.
        "ip -d link show hwg0".to_string(),
        http_step(true),
        probe,
    ];
    let mut env = std::collections::HashMap::new();
    env.insert("HIVE_EGRESS".to_string(), "none".to_string());
    client
        .create_project(CreateProjectRequest {
            name: "sealed".into(),
            repo_url: "git://10.20.0.10/private.git".into(),
            secret: SECRET.into(),
            branch: "main".into(),
            size_class: "small".into(),
            private_network: "corp".into(),
            steps: steps.to_vec(),
            timeout_secs: 600,
            env,
            ..Default::default()
        })
        .await
        .expect("CreateProject");
    let b = client
        .submit_build(SubmitBuildRequest {
            project: "sealed".into(),
            git_ref: "refs/heads/main".into(),
            ..Default::default()
        })
        .await
        .expect("SubmitBuild")
        .into_inner();
    let b = cluster::wait_build(&h.cp.grpc_url(), &b.id, Duration::from_secs(600)).await;
    let log = h.logs(&b.id).await;
    eprintln!("private-network build log:\n{log}");
    assert_eq!(
        state(&b),
        BuildState::Succeeded,
        "{b:?}\n{log}{}\n--- connector ---\n{}",
        h.context(),
        tail(&connector.log(), 30)
    );
    assert_eq!(b.backend, "microvm");
    assert!(log.contains("tunnel up (kernel WireGuard)"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("hwg0") && l.contains("wireguard"))
            || log.contains("\n    wireguard"),
        "hwg0 is not a kernel WireGuard link:\n{log}"
    );
    assert!(log.contains(&customer.marker), "no git marker:\n{log}");
    assert!(
        log.contains(&format!("{}-http", customer.marker)),
        "no HTTP marker:\n{log}"
    );
    assert!(
        log.lines().any(|l| l.trim() == "public host unreachable"),
        "{log}"
    );
    h.assert_cell_gone(&b.cell_id).await;
    // The key exchange revoked the cell's key: the connector holds no peer for it any more.
    let t0 = Instant::now();
    while !connector.peers().is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "connector still has peers {:?}",
            connector.peers()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.wait_pool_back().await;
    h.finish().await;
    drop(connector);
    drop(customer);
}

/// The box daemon in L1 dies (SIGKILL) while a build runs in a microVM cell; the cell's jailed
/// VMM and the warm cell's keep running without it. The restarted box reaps every leftover
/// microVM cell (VMM, TAP, netns, cgroup, directory), gives the lost attempt back (the build runs
/// again as attempt 2, never beside the first), and warms its pool again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_e2e_restarted_box_reaps_leftover_cells() {
    let test = "microvm_e2e_restarted_box_reaps_leftover_cells";
    let opts = L1BoxOptions::default();
    let Some(h) = hive(test, "mvreap", 51, opts.clone()).await else {
        return;
    };
    h.project("long", &["echo started; sleep 600"], 600, &[])
        .await;
    let id = h.push("long").await;
    let grpc = h.cp.grpc_url();
    let t0 = Instant::now();
    while !h.logs(&id).await.contains("started") {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "step never started{}",
            h.context()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let b = cluster::wait_build_until(&grpc, &id, Duration::from_secs(60), |b| {
        !b.cell_id.is_empty()
    })
    .await;
    let cell = b.cell_id.clone();
    // Wait for the replacement warm cell too, so two VMMs are left behind.
    assert!(
        h.l1.wait_pool_warm("small", 1, Duration::from_secs(300))
            .await,
        "no replacement warm cell; box health: {}{}",
        h.l1.box_health().await,
        h.context()
    );
    let vmms_before = h.l1.vmm_pids();
    assert_eq!(
        vmms_before.len(),
        2,
        "VMMs before the crash: {vmms_before:?}{}",
        h.context()
    );

    h.l1.crash_box();
    // The cells outlive their daemon (their VMMs are not its threads).
    assert_eq!(h.l1.vmm_pids(), vmms_before, "VMMs died with the daemon");
    let left = h.l1.cell_leftovers("hive-box");
    assert!(
        left.iter().any(|l| l.contains(&cell)),
        "the running cell should be left behind: {left:?}"
    );

    let grpc_addr = h.cp.grpc_addr.clone();
    tokio::task::block_in_place(|| h.l1.start_box(&grpc_addr, &opts));
    // The restarted box destroys the leftover cells, then gives the attempt back: the build
    // is re-queued as attempt 2, by then nothing of the first attempt runs.
    let b =
        cluster::wait_build_until(&grpc, &id, Duration::from_secs(300), |b| b.attempt >= 2).await;
    assert!(
        b.transitions
            .iter()
            .any(|t| t.reason.contains("box restarted while it ran")),
        "the re-queue does not say why: {b:?}"
    );
    let now = h.l1.vmm_pids();
    assert!(
        now.iter().all(|p| !vmms_before.contains(p)),
        "old VMMs still alive when the build was re-queued: {now:?} (before: {vmms_before:?}){}",
        h.context()
    );
    h.assert_cell_gone(&cell).await;
    // The second attempt runs in a new cell; cancelling it ends the build.
    let t0 = Instant::now();
    while h
        .logs_loose(&id)
        .await
        .lines()
        .filter(|l| l.trim() == "started")
        .count()
        < 2
    {
        let now = cluster::wait_build_until(&grpc, &id, Duration::from_secs(60), |_| true).await;
        assert!(
            !state(&now).is_terminal(),
            "the build ended before its second attempt started: {now:?}{}",
            h.context()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "the second attempt never started{}",
            h.context()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let b = cluster::cancel_and_wait(
        &grpc,
        &id,
        "microvm e2e: second attempt seen",
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(state(&b), BuildState::Cancelled, "{b:?}{}", h.context());
    // Attempt 2 is the re-queue after the restart. Any attempt beyond it must be a cold cell
    // that died or stalled booting (the box rejects the build and says so): in the emulated KVM
    // host nested guests sometimes triple-fault or stall at boot (see the note on vmm-bench). Anything else
    // re-queueing the build is a failure.
    let restarted = b
        .transitions
        .iter()
        .position(|t| t.reason.contains("box restarted while it ran"))
        .expect("the restart's re-queue is in the history");
    let extra: Vec<&str> = b.transitions[restarted + 1..]
        .iter()
        .filter(|t| t.state == BuildState::Queued as i32)
        .map(|t| t.reason.as_str())
        .collect();
    assert!(
        extra.iter().all(|r| r.contains("rejected by box")
            && (r.contains("exited before it became ready")
                || r.contains("did not answer health"))),
        "the build was re-queued again for another reason: {extra:?}"
    );
    assert_eq!(b.attempt as usize, 2 + extra.len(), "{b:?}");
    assert_ne!(b.cell_id, cell, "{b:?}");
    h.assert_cell_gone(&b.cell_id).await;
    h.wait_pool_back().await;
    h.finish().await;
}

/// Boot time of the real cell guest, our VMM against QEMU `-M microvm -accel kvm`, in the same
/// emulated KVM host and the same run (`vmm-bench --linux-kernel`): exec -> init, exec -> cell
/// daemon ready (from the serial console for both, and from our boot-timer device), and the
/// VMM's memory overhead. Absolute times under TCG mean nothing; the ratios do. Rounds:
/// HIVE_BENCH_ROUNDS (default 3). The test fails if either VMM cannot boot the guest or the
/// boot timer saw no marks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_e2e_boot_time_bench() {
    let test = "microvm_e2e_boot_time_bench";
    let Some(p) = tokio::task::spawn_blocking(move || prepare_bench_or_skip(test))
        .await
        .unwrap()
    else {
        return;
    };
    let rounds: u32 = std::env::var("HIVE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let out = tokio::task::spawn_blocking(move || {
        let l1 = KvmHost::boot(&p, &KvmHostOptions::default());
        let cmd = format!(
            "/hive/bin/vmm-bench --linux-kernel /hive/assets/vmlinux \
             --rootfs-disk /hive/assets/cell-rootfs.ext4 \
             --build-disk /hive/assets/build-image.ext4 --memory-mib 512 --rounds {rounds}"
        );
        // Generous: TCG's pace halves when the machine's other core is busy (CI runs builds
        // beside this test); at 60 + 60 s per round it once ran out under load.
        l1.exec_timeout(&cmd, Duration::from_secs(180 + 120 * u64::from(rounds)))
            .unwrap_or_else(|e| panic!("vmm-bench in L1: {e}\nconsole:\n{}", l1.console()))
    })
    .await
    .unwrap();
    println!("{}", out.output);
    assert_eq!(out.status, 0, "vmm-bench failed:\n{}", out.output);
    let row = |name: &str| {
        out.output
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name:?} row:\n{}", out.output))
            .to_string()
    };
    for name in [
        "exec -> init exec'd, serial",
        "exec -> cell daemon ready, serial",
        "VMM overhead",
        "cells ready/s/core",
    ] {
        let line = row(name);
        assert!(
            line.split_whitespace()
                .last()
                .is_some_and(|r| r.ends_with('x')),
            "no ratio in {line:?}"
        );
    }
    // Our VMM's own timestamps of the guest's marks (QEMU has no such device).
    for name in ["exec -> init, boot timer", "exec -> ready, boot timer"] {
        let line = row(name);
        let ours = line
            .split_whitespace()
            .find_map(|w| w.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(ours > 0.0, "no boot-timer figure in {line:?}");
    }
    // Boots that failed in the emulated host (triple faults and stalls, seen with both VMMs,
    // more often with ours when L1 had two vCPUs; none in 100 boots of ours since it has one)
    // were tried again and are counted, not hidden.
    let failed = row("failed boots, tried again");
    assert!(
        failed
            .split_whitespace()
            .filter(|w| w.parse::<u32>().is_ok())
            .count()
            == 2,
        "no failed-boot counts in {failed:?}"
    );
    assert!(
        !out.output.contains("saw no 'ready' mark"),
        "the boot timer missed marks:\n{}",
        out.output
    );
}
