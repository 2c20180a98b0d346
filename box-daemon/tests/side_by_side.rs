//! Boxes side by side on one host: real `hive-box` processes (sandbox backend, real hive-cell
//! cells) against a real control plane, each given only its own `--data-dir` and
//! `--health-addr` (plus the images and a ready file). They must get their own id, nftables
//! table, cgroup parent and cell subnet; restarting one must leave the other's warm cells and
//! table alone and bring the same box back; two boxes asked for the same table must not share
//! it; and a box whose cell boots keep failing says so on /healthz. Needs root and the Debian
//! image.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hive_control_plane::server::{self, Config};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One `hive-box` process on its own data dir.
struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
    health: String,
}

impl Daemon {
    /// Starts `hive-box` with `extra` flags and waits for its ready file (panics with its log
    /// if it exits first).
    fn start(dir: &Path, control_plane: &str, cell_binary: &Path, extra: &[&str]) -> Daemon {
        let child = spawn(dir, control_plane, cell_binary, extra);
        let ready = dir.join("ready.json");
        let t0 = Instant::now();
        let mut d = Daemon {
            child: Some(child),
            dir: dir.to_path_buf(),
            health: String::new(),
        };
        loop {
            if let Ok(Some(status)) = d.child.as_mut().unwrap().try_wait() {
                d.child = None;
                panic!("hive-box exited early ({status}); log:\n{}", d.log());
            }
            if let Some(h) = std::fs::read_to_string(&ready)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v["health"].as_str().map(str::to_string))
            {
                d.health = h;
                return d;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "not ready: {}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("hive-box.log")).unwrap_or_default()
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// (HTTP status, body) of `GET /healthz`.
    async fn health(&self) -> (u16, serde_json::Value) {
        let mut s = tokio::net::TcpStream::connect(&self.health).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: box\r\n\r\n")
            .await
            .unwrap();
        let mut buf = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut buf))
            .await
            .expect("health answers")
            .unwrap();
        let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, "{}"));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, serde_json::from_str(body).unwrap_or_default())
    }

    /// Waits until `ok(status, body)` holds; panics with the last answer and the log.
    async fn wait_health(&self, what: &str, ok: impl Fn(u16, &serde_json::Value) -> bool) {
        let t0 = Instant::now();
        loop {
            let (status, body) = self.health().await;
            if ok(status, &body) {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "{what}: last answer {status} {body}\nlog:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for one warm `small` cell and the control plane link.
    async fn wait_warm(&self) {
        self.wait_health("one warm cell and connected", |_, h| {
            h["control_plane_connected"] == true
                && h["pools"]
                    .as_array()
                    .and_then(|p| p.iter().find(|p| p["size_class"] == "small"))
                    .is_some_and(|p| p["warm"] == 1)
        })
        .await
    }

    /// SIGTERM, then waits for the exit (the graceful path: drain, reap, remove table).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(status)) = child.try_wait() {
                    assert!(status.success(), "hive-box stop: {status}\n{}", self.log());
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("hive-box did not stop on SIGTERM:\n{}", self.log());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn(dir: &Path, control_plane: &str, cell_binary: &Path, extra: &[&str]) -> Child {
    let image = common::base_rootfs();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("hive-box.log"))
        .unwrap();
    let ready = dir.join("ready.json");
    let _ = std::fs::remove_file(&ready);
    Command::new(env!("CARGO_BIN_EXE_hive-box"))
        .args(["--control-plane", control_plane])
        .args(["--backend", "sandbox", "--pool", "small=1"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--health-addr", "127.0.0.1:0"])
        .arg("--cell-rootfs")
        .arg(&image)
        .arg("--build-image")
        .arg(&image)
        .arg("--cell-binary")
        .arg(cell_binary)
        .arg("--ready-file")
        .arg(&ready)
        .args(["--shutdown-grace-secs", "2"])
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("HIVE_BOX_ID")
        .env_remove("HIVE_BOX_NFT_TABLE")
        .env_remove("HIVE_BOX_CGROUP_PARENT")
        .env_remove("HIVE_BOX_CELL_SUBNET")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start hive-box")
}

/// Runs `hive-box` to its end (it is expected to refuse to start); (success, log).
fn run_refused(dir: &Path, control_plane: &str, cell_binary: &Path, extra: &[&str]) -> String {
    let mut child = spawn(dir, control_plane, cell_binary, extra);
    let t0 = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let _ = child.wait();
            panic!(
                "hive-box with {extra:?} did not refuse to start:\n{}",
                std::fs::read_to_string(dir.join("hive-box.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(dir.join("hive-box.log")).unwrap_or_default();
    assert!(!status.success(), "hive-box with {extra:?} started:\n{log}");
    log
}

fn table_exists(table: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", table])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Each cell in the data dir with its PID 1, which must be alive.
fn live_cells(data: &Path) -> Vec<(String, i32)> {
    let mut cells: Vec<(String, i32)> = std::fs::read_dir(data.join("cells"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let id = e.file_name().into_string().unwrap();
                    let pid = std::fs::read_to_string(e.path().join("pid"))
                        .ok()
                        .and_then(|p| p.trim().parse().ok())
                        .unwrap_or(0);
                    (id, pid)
                })
                .collect()
        })
        .unwrap_or_default();
    cells.sort();
    for (id, pid) in &cells {
        assert!(
            *pid > 0 && Path::new(&format!("/proc/{pid}")).exists(),
            "cell {id}: PID 1 ({pid}) is gone"
        );
    }
    cells
}

async fn control_plane() -> (server::Handle, tempfile::TempDir) {
    let db_dir = tempfile::tempdir().unwrap();
    let cp = server::start(Config {
        http_addr: "127.0.0.1:0".parse().unwrap(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        box_addr: "127.0.0.1:0".parse().unwrap(),
        // These tests are about names on one host; joining with certificates is tested by the
        // end-to-end tests (tests/) and control-plane/tests/box_auth.rs.
        insecure_boxes: true,
        data_dir: db_dir.path().to_path_buf(),
        db: Some(format!("sqlite://{}/hive.db", db_dir.path().display())),
        ..Config::default()
    })
    .await
    .expect("control plane starts");
    (cp, db_dir)
}

fn names(h: &serde_json::Value) -> (String, String, String, String) {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    (
        s(&h["box_id"]),
        s(&h["names"]["nft_table"]),
        s(&h["names"]["cgroup_parent"]),
        s(&h["names"]["cell_subnet"]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_boxes_keep_apart_and_a_restart_leaves_the_other_alone() {
    let (cp, _db) = control_plane().await;
    let url = format!("http://{}", cp.grpc_addr);
    let cell = common::hive_cell();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Daemon::start(dir_a.path(), &url, &cell, &[]);
    let mut b = Daemon::start(dir_b.path(), &url, &cell, &[]);
    a.wait_warm().await;
    b.wait_warm().await;
    let (_, ha) = a.health().await;
    let (_, hb) = b.health().await;
    let (id_a, table_a, cgroup_a, subnet_a) = names(&ha);
    let (id_b, table_b, ..) = names(&hb);
    eprintln!("A: {:?}\nB: {:?}", names(&ha), names(&hb));
    let cells_a = live_cells(&a.data());
    assert_eq!(cells_a.len(), 1, "A's warm cell on disk");
    assert!(table_exists(&table_a), "A's table {table_a}");

    // B stops (drain, reap, table and cgroup removed) and starts again on its data dir.
    b.stop();
    assert!(!table_exists(&table_b), "B left its table {table_b}");
    assert!(live_cells(&b.data()).is_empty(), "B left cells");
    assert_eq!(live_cells(&a.data()), cells_a, "B's stop touched A's cells");
    assert!(table_exists(&table_a), "B's stop removed A's table");
    let b = Daemon::start(dir_b.path(), &url, &cell, &[]);
    b.wait_warm().await;
    // B's start-up reaper has run: A's cell, table and health are as they were.
    assert_eq!(
        live_cells(&a.data()),
        cells_a,
        "B's reaper touched A's cells"
    );
    assert!(table_exists(&table_a), "B's start replaced A's table");
    let (status, ha2) = a.health().await;
    assert_eq!(status, 200, "{ha2}");
    assert_eq!(names(&ha2), names(&ha));
    let (_, hb2) = b.health().await;
    assert_eq!(names(&hb2), names(&hb), "B came back as the same box");

    // Two different boxes, in every host-global name.
    let (a_, b_) = (names(&ha), names(&hb));
    assert!(!id_a.is_empty() && !table_a.is_empty() && !cgroup_a.is_empty());
    assert_ne!(a_.0, b_.0, "box ids");
    assert_ne!(a_.1, b_.1, "nft tables");
    assert_ne!(a_.2, b_.2, "cgroup parents");
    assert_ne!(a_.3, b_.3, "cell subnets");
    let subnet: hive_box::net::Subnet = subnet_a.parse().unwrap();
    assert!(!hive_box::identity::overlaps(subnet, b_.3.parse().unwrap()));
    assert_eq!(
        std::fs::read_to_string(b.data().join("box-id"))
            .unwrap()
            .trim(),
        id_b
    );
    // Both still hold their claims, and both cells are still A's and B's.
    assert!(Path::new(hive_box::claim::CLAIMS_DIR)
        .join(format!("{id_a}.box"))
        .exists());
    assert_eq!(live_cells(&a.data()).len(), 1);
    assert_eq!(live_cells(&b.data()).len(), 1);
    drop(a);
    drop(b);
    assert!(!table_exists(&table_a));
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_box_asked_for_a_taken_name_refuses_to_start() {
    let (cp, _db) = control_plane().await;
    let url = format!("http://{}", cp.grpc_addr);
    let cell = common::hive_cell();
    let dir_a = tempfile::tempdir().unwrap();
    let table = format!("hive_t_same_{}", std::process::id());
    let a = Daemon::start(
        dir_a.path(),
        &url,
        &cell,
        &["--nft-table", &table, "--cell-subnet", "100.96.207.0/24"],
    );
    let (_, ha) = a.health().await;
    let (id_a, _, cgroup_a, _) = names(&ha);

    let dir_b = tempfile::tempdir().unwrap();
    let log = run_refused(dir_b.path(), &url, &cell, &["--nft-table", &table]);
    assert!(
        log.contains(&format!(
            "nftables table {table} is already used by a live box {id_a}"
        )) && log.contains("--nft-table"),
        "{log}"
    );
    for (flags, says) in [
        (
            vec!["--cgroup-parent", cgroup_a.as_str()],
            format!("cgroup parent {cgroup_a} is already used"),
        ),
        (
            vec!["--cell-subnet", "100.96.0.0/16"],
            "cell subnet (or part of it) 100.96.0.0/16 is already used".to_string(),
        ),
        (
            vec!["--box-id", id_a.as_str()],
            format!("box id {id_a} is already used"),
        ),
        (
            vec!["--box-id", "no/slash"],
            "invalid box id \"no/slash\"".to_string(),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let log = run_refused(dir.path(), &url, &cell, &flags);
        assert!(log.contains(&says), "{flags:?}: want {says:?} in\n{log}");
    }
    // A was left alone by all of them.
    assert!(table_exists(&table));
    let (status, _) = a.health().await;
    assert_eq!(status, 200);
    drop(a);
    assert!(!table_exists(&table));
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_box_whose_cells_fail_to_boot_is_unhealthy_until_one_boots() {
    let (cp, _db) = control_plane().await;
    let url = format!("http://{}", cp.grpc_addr);
    let real_cell = common::hive_cell();
    let dir = tempfile::tempdir().unwrap();
    // Not a program: every cell's exec of /sbin/hive-cell fails.
    let cell = dir.path().join("hive-cell");
    std::fs::write(&cell, "nothing").unwrap();
    let d = Daemon::start(dir.path(), &url, &cell, &["--unhealthy-boot-failures", "2"]);
    d.wait_health("503 after failed boots", |status, h| {
        status == 503
            && h["ok"] == false
            && h["unhealthy"]
                .as_str()
                .is_some_and(|r| r.contains("cell boots in a row failed") && r.contains("exec"))
    })
    .await;
    // The binary is fixed: the next boot succeeds and the box is healthy again.
    let tmp = dir.path().join("hive-cell.new");
    std::fs::copy(&real_cell, &tmp).unwrap();
    std::fs::rename(&tmp, &cell).unwrap();
    d.wait_health("200 after a boot succeeded", |status, h| {
        status == 200 && h["ok"] == true && h["boot_failures_in_a_row"] == 0
    })
    .await;
    drop(d);
    cp.shutdown().await;
}

/// Issue 11: a control plane whose host name does not resolve leaves cells with no block on
/// it; the box keeps trying for --resolve-timeout-secs, then refuses to start, saying why.
#[test]
fn a_control_plane_that_does_not_resolve_stops_the_box_from_starting() {
    let cell = common::hive_cell();
    let dir = tempfile::tempdir().unwrap();
    let log = run_refused(
        dir.path(),
        "https://no-such-control-plane.invalid:50052",
        &cell,
        &["--resolve-timeout-secs", "1"],
    );
    assert!(
        log.contains("cannot resolve the control plane's host \"no-such-control-plane.invalid\"")
            && log.contains("--resolve-timeout-secs"),
        "{log}"
    );
}

/// A `git daemon` on a public test host (`deploy/test-hosts/test-host.sh`) serving one
/// repository; removed on drop.
struct GitHost {
    name: String,
    _root: tempfile::TempDir,
    url: String,
    head: String,
}

impl GitHost {
    fn start(name: &str, addr: &str) -> GitHost {
        let root = tempfile::tempdir().unwrap();
        let work = root.path().join("work");
        std::fs::create_dir(&work).unwrap();
        std::fs::write(work.join("README"), "side by side\n").unwrap();
        let git = |args: &[&str], dir: &Path| {
            let out = Command::new("git")
                .args(["-c", "user.name=Hive Test", "-c", "user.email=test@hive"])
                .args(args)
                .current_dir(dir)
                .output()
                .unwrap();
            assert!(out.status.success(), "git {args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        git(&["init", "-q", "-b", "main"], &work);
        git(&["add", "."], &work);
        git(&["commit", "-q", "-m", "sbs"], &work);
        let head = git(&["rev-parse", "HEAD"], &work);
        git(&["clone", "-q", "--bare", "work", "repo.git"], root.path());
        let out = Command::new(test_host_script())
            .args(["up", "--name", name, "--addr", addr, "--git-root"])
            .arg(root.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "test-host up: {out:?}");
        GitHost {
            name: name.into(),
            _root: root,
            url: format!("git://{addr}/repo.git"),
            head,
        }
    }
}

impl Drop for GitHost {
    fn drop(&mut self) {
        let _ = Command::new(test_host_script())
            .args(["down", "--name", &self.name])
            .output();
    }
}

fn test_host_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/test-hosts/test-host.sh")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_spread_over_two_boxes_on_one_host() {
    use hive_proto::auth::Bearer;
    use hive_proto::v1::control_plane_client::ControlPlaneClient;
    use hive_proto::v1::{BuildState, CreateProjectRequest, GetBuildRequest, SubmitBuildRequest};

    let (cp, _db) = control_plane().await;
    let url = format!("http://{}", cp.grpc_addr);
    let run = std::process::id() % 50;
    let git = GitHost::start(&format!("sbs{run}"), &format!("198.18.20.{}", 2 + run));
    let cell = common::hive_cell();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Only --data-dir and --health-addr tell them apart (`spawn`).
    let box_a = Daemon::start(dir_a.path(), &url, &cell, &[]);
    let box_b = Daemon::start(dir_b.path(), &url, &cell, &[]);
    box_a.wait_warm().await;
    box_b.wait_warm().await;
    let ids = [
        names(&box_a.health().await.1).0,
        names(&box_b.health().await.1).0,
    ];
    let ch = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut api =
        ControlPlaneClient::with_interceptor(ch, Bearer::new(cp.admin_token().unwrap()).unwrap());
    api.create_project(CreateProjectRequest {
        name: "spread".into(),
        repo_url: git.url.clone(),
        size_class: "small".into(),
        steps: vec!["cat README; sleep 1".into()],
        timeout_secs: 120,
        ..Default::default()
    })
    .await
    .expect("CreateProject");
    let mut builds = Vec::new();
    for _ in 0..6 {
        let b = api
            .submit_build(SubmitBuildRequest {
                project: "spread".into(),
                revision: git.head.clone(),
                ..Default::default()
            })
            .await
            .expect("SubmitBuild")
            .into_inner();
        builds.push(b.id);
    }
    let t0 = Instant::now();
    let mut ended = Vec::new();
    for id in &builds {
        loop {
            let b = api
                .get_build(GetBuildRequest { id: id.clone() })
                .await
                .unwrap()
                .into_inner();
            if b.state().is_terminal() {
                ended.push(b);
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(180),
                "build {id} did not end: {b:?}\nA:\n{}\nB:\n{}",
                box_a.log(),
                box_b.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for b in &ended {
        assert_eq!(
            b.state(),
            BuildState::Succeeded,
            "{b:?}\nA:\n{}\nB:\n{}",
            box_a.log(),
            box_b.log()
        );
    }
    let on = |id: &str| ended.iter().filter(|b| b.box_id == id).count();
    let (on_a, on_b) = (on(&ids[0]), on(&ids[1]));
    eprintln!("6 builds: {on_a} on {}, {on_b} on {}", ids[0], ids[1]);
    assert_eq!(
        on_a + on_b,
        6,
        "builds ran on boxes other than A and B: {ended:?}"
    );
    assert!(
        on_a >= 1 && on_b >= 1,
        "builds did not spread: {on_a} on A, {on_b} on B"
    );
    drop(box_a);
    drop(box_b);
    cp.shutdown().await;
}
