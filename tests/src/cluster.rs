//! A whole local hive for end-to-end tests: the real `hive-box` (sandbox backend, real
//! `hive-cell` in real namespaces) next to the real control plane ([`crate::controlplane`]), a
//! real `git daemon` on a "public internet" test host (its own netns on 198.18.0.0/15, made by
//! `deploy/test-hosts/test-host.sh`), and helpers to stand up listeners a build must not reach.
//! Needs root. Every piece is removed on drop, also when a test fails half-way.
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hive_proto::v1::{Build, GetBuildRequest, StreamLogsRequest};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::controlplane::{bin_dir, nested_cargo, workspace_root};

static BOX_BUILT: OnceLock<Result<(), String>> = OnceLock::new();

/// Builds `hive-box` and `hive-cell` once per test process (skipped with HIVE_TEST_NO_BUILD=1).
pub fn ensure_box_built() {
    let r = BOX_BUILT.get_or_init(|| {
        if std::env::var_os("HIVE_TEST_NO_BUILD").is_some() {
            return Ok(());
        }
        let mut cmd = nested_cargo();
        cmd.args(["build", "-p", "hive-box", "-p", "hive-cell", "--bins"]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        match cmd.status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(s.to_string()),
            Err(e) => Err(e.to_string()),
        }
    });
    if let Err(e) = r {
        panic!("cargo build -p hive-box -p hive-cell failed: {e}");
    }
}

/// The Debian image from `deploy/images/build-images.sh` (HIVE_BUILD_IMAGE, else the cache).
pub fn build_image() -> PathBuf {
    if let Ok(p) = std::env::var("HIVE_BUILD_IMAGE") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("HIVE_CACHE").unwrap_or_else(|_| "/var/cache/hive".into());
    let images = Path::new(&cache).join("images");
    // Of the cached bases with git, one with an ssh client (ssh clones) first, then the newest.
    std::fs::read_dir(&images)
        .ok()
        .and_then(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("base-"))
                .map(|e| e.path().join("rootfs"))
                .filter(|p| p.join("usr/bin/git").exists())
                .max_by_key(|p| {
                    let mtime = std::fs::metadata(p).and_then(|m| m.modified()).ok();
                    (p.join("usr/bin/ssh").exists(), mtime)
                })
        })
        .unwrap_or_else(|| {
            panic!(
                "no build image under {}: run deploy/images/build-images.sh or set HIVE_BUILD_IMAGE",
                images.display()
            )
        })
}

/// Options for one `hive-box` process.
#[derive(Debug, Clone)]
pub struct BoxOptions {
    /// Short unique tag: names the nft table, cgroup parent, box id.
    pub tag: String,
    /// Third octet of the box's cell subnet 100.96.N.0/24.
    pub subnet_octet: u8,
    pub pool: String,
    pub lease_secs: u64,
    /// Extra addresses cells must not reach (`--block`).
    pub block: Vec<String>,
    /// More command-line words for `hive-box`.
    pub extra: Vec<String>,
}

/// A running `hive-box`. Killed (and its cells reaped by a SIGTERM first) on drop.
pub struct BoxDaemon {
    child: Option<Child>,
    pub data_dir: tempfile::TempDir,
    pub health_addr: String,
    pub opts: BoxOptions,
    log_path: PathBuf,
}

impl BoxDaemon {
    pub fn start(control_plane: &str, opts: BoxOptions) -> Self {
        let data_dir = tempfile::Builder::new()
            .prefix(&format!("hive-box-{}-", opts.tag))
            .tempdir()
            .expect("temp dir");
        Self::start_in(control_plane, opts, data_dir)
    }

    /// SIGKILL (a crash): the box's cells stay behind, as after a power cut of the daemon only.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a new `hive-box` on the same data dir (after [`BoxDaemon::crash`] or a stop).
    pub fn restart(&mut self, control_plane: &str) {
        self.crash();
        let data_dir =
            std::mem::replace(&mut self.data_dir, tempfile::tempdir().expect("temp dir"));
        *self = Self::start_in(control_plane, self.opts.clone(), data_dir);
    }

    fn start_in(control_plane: &str, opts: BoxOptions, data_dir: tempfile::TempDir) -> Self {
        ensure_box_built();
        let ready = data_dir.path().join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log_path = data_dir.path().join("hive-box.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("log file");
        let log2 = log.try_clone().expect("dup log");
        let image = build_image();
        let bin = bin_dir().join("hive-box");
        // A control plane started by this process is joined with a fresh token, as an operator
        // would; a restarted box has its certificate in its data dir and ignores the token.
        let (url, token) = crate::controlplane::box_endpoint(control_plane);
        let mut cmd = Command::new(&bin);
        if let Some(t) = &token {
            cmd.env("HIVE_BOX_JOIN_TOKEN", t);
        }
        cmd.args(["--control-plane", &url])
            .args(["--backend", "sandbox"])
            .args(["--pool", &opts.pool])
            .arg("--data-dir")
            .arg(data_dir.path().join("data"))
            .args(["--box-id", &format!("box-{}", opts.tag)])
            .arg("--cell-rootfs")
            .arg(&image)
            .arg("--build-image")
            .arg(&image)
            .arg("--cell-binary")
            .arg(bin_dir().join("hive-cell"))
            .args(["--health-addr", "127.0.0.1:0"])
            .args([
                "--cell-subnet",
                &format!("100.96.{}.0/24", opts.subnet_octet),
            ])
            .args(["--nft-table", &format!("hive_e2e_{}", opts.tag)])
            .args(["--cgroup-parent", &format!("hive-e2e-{}", opts.tag)])
            .args(["--lease-secs", &opts.lease_secs.to_string()])
            .args(["--shutdown-grace-secs", "5"])
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "info,hive_box=debug")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        for b in &opts.block {
            cmd.args(["--block", b]);
        }
        cmd.args(&opts.extra);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let t0 = Instant::now();
        let health_addr = loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "hive-box exited early ({status}); log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if let Ok(text) = std::fs::read_to_string(&ready) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    if let Some(h) = v.get("health").and_then(|h| h.as_str()) {
                        break h.to_string();
                    }
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "hive-box not ready in 60s; log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        BoxDaemon {
            child: Some(child),
            data_dir,
            health_addr,
            opts,
            log_path,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `GET /healthz` as JSON.
    pub async fn health(&self) -> serde_json::Value {
        let body = self.get("/healthz").await;
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
    }

    /// The box's `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.get("/metrics").await
    }

    /// The body of GET `path` on the box's health address (one request per connection).
    async fn get(&self, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&self.health_addr)
            .await
            .expect("connect health");
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: box\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        buf.split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default()
    }

    /// (warm, busy) of a class.
    pub async fn pool(&self, class: &str) -> (u64, u64) {
        let h = self.health().await;
        h["pools"]
            .as_array()
            .and_then(|pools| pools.iter().find(|p| p["size_class"] == class))
            .map(|p| {
                (
                    p["warm"].as_u64().unwrap_or(0),
                    p["busy"].as_u64().unwrap_or(0),
                )
            })
            .unwrap_or((0, 0))
    }

    /// Waits for `warm` warm and no busy cells; false on timeout.
    pub async fn wait_pool(&self, class: &str, warm: u64, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.pool(class).await == (warm, 0) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Waits until the box says it is connected to the control plane.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.health().await["control_plane_connected"] == true {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Cell directories on disk.
    pub fn cells_on_disk(&self) -> Vec<String> {
        std::fs::read_dir(self.data_dir.path().join("data/cells"))
            .map(|e| {
                e.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The cell's slot (from its record) while it exists.
    pub fn cell_slot(&self, cell_id: &str) -> Option<u32> {
        let text = std::fs::read_to_string(
            self.data_dir
                .path()
                .join("data/cells")
                .join(cell_id)
                .join("cell.json"),
        )
        .ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v["slot"].as_u64().map(|s| s as u32)
    }

    /// The cell-side address of slot `slot` in this box's subnet.
    pub fn cell_ip(&self, slot: u32) -> String {
        format!("100.96.{}.{}", self.opts.subnet_octet, slot * 4 + 2)
    }

    /// Waits for the process to exit by itself; its status, or None on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGTERM and wait (up to 60 s); returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for BoxDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A git repository served by a real `git daemon` on a public test host.
pub struct GitHost {
    pub name: String,
    pub addr: String,
    pub root: tempfile::TempDir,
    pub repo_url: String,
    /// Commit at the tip of `main`.
    pub head: String,
}

fn test_host_script() -> PathBuf {
    workspace_root().join("deploy/test-hosts/test-host.sh")
}

impl GitHost {
    /// A repo `base.git` with a README and `build.sh`, served at git://ADDR/base.git; more
    /// copies with [`GitHost::add_repo`].
    pub fn start(name: &str, addr: &str) -> Self {
        let root = tempfile::Builder::new()
            .prefix("hive-git-")
            .tempdir()
            .unwrap();
        let work = root.path().join("work");
        std::fs::create_dir(&work).unwrap();
        std::fs::write(work.join("README"), "hive demo repository\n").unwrap();
        std::fs::write(
            work.join("build.sh"),
            "#!/bin/sh\nfor i in 1 2 3; do echo \"build line $i\"; done\n",
        )
        .unwrap();
        let git = |args: &[&str], dir: &Path| {
            sh(Command::new("git")
                .args(["-c", "user.name=Hive Test", "-c", "user.email=test@hive"])
                .args(args)
                .current_dir(dir))
        };
        git(&["init", "-q", "-b", "main"], &work);
        git(&["add", "."], &work);
        git(&["commit", "-q", "-m", "demo"], &work);
        let head = git(&["rev-parse", "HEAD"], &work);
        git(&["clone", "-q", "--bare", "work", "base.git"], root.path());
        sh(Command::new(test_host_script())
            .args(["up", "--name", name, "--addr", addr, "--git-root"])
            .arg(root.path()));
        GitHost {
            name: name.to_string(),
            addr: addr.to_string(),
            repo_url: format!("git://{addr}/base.git"),
            root,
            head,
        }
    }

    /// Serves another copy of the repository as `<name>.git`; returns its URL.
    pub fn add_repo(&self, name: &str) -> String {
        sh(Command::new("git")
            .args(["clone", "-q", "--bare", "work", &format!("{name}.git")])
            .current_dir(self.root.path()));
        format!("git://{}/{name}.git", self.addr)
    }

    /// Serves `<name>.git`: the base repository plus one commit adding `files` (path,
    /// contents); returns its URL and that commit.
    pub fn add_repo_with(&self, name: &str, files: &[(&str, &[u8])]) -> (String, String) {
        let work = self.root.path().join(format!("work-{name}"));
        sh(Command::new("git")
            .args(["clone", "-q", "work"])
            .arg(&work)
            .current_dir(self.root.path()));
        for (path, contents) in files {
            let p = work.join(path);
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir).unwrap();
            }
            std::fs::write(&p, contents).unwrap();
        }
        let git = |args: &[&str]| {
            sh(Command::new("git")
                .args(["-c", "user.name=Hive Test", "-c", "user.email=test@hive"])
                .args(args)
                .current_dir(&work))
        };
        git(&["add", "-A"]);
        git(&["commit", "-q", "-m", "pipeline"]);
        let head = git(&["rev-parse", "HEAD"]);
        sh(Command::new("git")
            .args(["clone", "-q", "--bare"])
            .arg(&work)
            .arg(format!("{name}.git"))
            .current_dir(self.root.path()));
        (format!("git://{}/{name}.git", self.addr), head)
    }

    /// Network namespace of the host.
    pub fn netns(&self) -> String {
        format!("hive-th-{}", self.name)
    }
}

impl Drop for GitHost {
    fn drop(&mut self) {
        let _ = Command::new(test_host_script())
            .args(["down", "--name", &self.name])
            .output();
    }
}

/// A TCP listener (in a given network namespace, or the box's) that counts connections. Closed
/// on drop, so it does not keep a cell's namespace alive after the cell is gone.
pub struct Listener {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    /// Binds `addr` inside `/run/netns/<netns>` (None: the current namespace). A dedicated thread
    /// enters the namespace, so the socket lives there; it then serves until dropped.
    pub fn start(netns: Option<&str>, addr: &str) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let netns = netns.map(|n| PathBuf::from("/run/netns").join(n));
        let addr = addr.to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            if let Some(ns) = netns {
                let f = std::fs::File::open(&ns).expect("open netns");
                nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            }
            let l = TcpListener::bind(&addr).expect("bind listener");
            // Polled, so the thread sees `stop` without a connection to wake it.
            l.set_nonblocking(true).expect("nonblocking listener");
            tx.send(l.local_addr().unwrap()).unwrap();
            while !stopped.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        let _ = c.set_nonblocking(false);
                        let _ = std::io::Write::write_all(&mut c, b"hello\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        let addr = rx.recv().expect("listener address");
        Listener {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    pub fn count(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Opens a TCP connection to `addr` from inside `/run/netns/<netns>` (a cell's, say) and closes
/// it again: whether something listens there, seen from that namespace. A thread of its own
/// enters the namespace, so the caller's stays as it was.
pub fn connect_in_netns(netns: &str, addr: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let ns = PathBuf::from("/run/netns").join(netns);
    std::thread::spawn(move || {
        let f = std::fs::File::open(&ns)?;
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        std::net::TcpStream::connect_timeout(&addr, timeout).map(drop)
    })
    .join()
    .expect("connect thread panicked")
}

/// A "private network" host: netns `hive-pv-<tag>` at 10.254.<n>.2, linked to the box's
/// namespace by a veth (10.254.<n>.1 on the box side), so the box itself can reach it.
pub struct PrivateHost {
    pub netns: String,
    pub addr: String,
    veth: String,
}

impl PrivateHost {
    pub fn start(tag: &str, n: u8) -> Self {
        let netns = format!("hive-pv-{tag}");
        let veth = format!("hpv-{tag}");
        let peer = format!("hpp-{tag}");
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        let _ = Command::new("ip").args(["link", "del", &veth]).output();
        sh(Command::new("ip").args(["netns", "add", &netns]));
        sh(Command::new("ip").args([
            "link", "add", &veth, "type", "veth", "peer", "name", &peer, "netns", &netns,
        ]));
        sh(Command::new("ip").args(["addr", "add", &format!("10.254.{n}.1/30"), "dev", &veth]));
        sh(Command::new("ip").args(["link", "set", &veth, "up"]));
        let ns = |args: &[&str]| sh(Command::new("ip").args(["-n", &netns]).args(args));
        ns(&["addr", "add", &format!("10.254.{n}.2/30"), "dev", &peer]);
        ns(&["link", "set", &peer, "up"]);
        ns(&["link", "set", "lo", "up"]);
        ns(&["route", "add", "default", "via", &format!("10.254.{n}.1")]);
        PrivateHost {
            netns,
            addr: format!("10.254.{n}.2"),
            veth,
        }
    }
}

impl Drop for PrivateHost {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

/// Polls GetBuild until the build is terminal.
pub async fn wait_build(grpc_url: &str, id: &str, timeout: Duration) -> Build {
    let mut client = crate::controlplane::api(grpc_url)
        .await
        .expect("connect control plane");
    let t0 = Instant::now();
    loop {
        let b = client
            .get_build(GetBuildRequest { id: id.to_string() })
            .await
            .expect("GetBuild")
            .into_inner();
        let state = hive_proto::v1::BuildState::try_from(b.state).unwrap_or_default();
        if state.is_terminal() {
            return b;
        }
        assert!(
            t0.elapsed() < timeout,
            "build {id} still {} after {timeout:?}: {b:?}",
            state.short_name()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Cancels the build through the API, then waits (up to `timeout`) for it to end; the ended
/// build, whatever its state (the caller checks it).
pub async fn cancel_and_wait(grpc_url: &str, id: &str, reason: &str, timeout: Duration) -> Build {
    crate::controlplane::api(grpc_url)
        .await
        .expect("connect control plane")
        .cancel_build(hive_proto::v1::CancelBuildRequest {
            id: id.to_string(),
            reason: reason.to_string(),
        })
        .await
        .expect("CancelBuild");
    wait_build(grpc_url, id, timeout).await
}

/// Polls GetBuild until `pred` holds.
pub async fn wait_build_until(
    grpc_url: &str,
    id: &str,
    timeout: Duration,
    pred: impl Fn(&Build) -> bool,
) -> Build {
    let mut client = crate::controlplane::api(grpc_url)
        .await
        .expect("connect control plane");
    let t0 = Instant::now();
    loop {
        let b = client
            .get_build(GetBuildRequest { id: id.to_string() })
            .await
            .expect("GetBuild")
            .into_inner();
        if pred(&b) {
            return b;
        }
        assert!(
            t0.elapsed() < timeout,
            "build {id} condition not met: {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The build's whole log, concatenated in seq order (and the seqs seen).
pub async fn build_log(grpc_url: &str, id: &str) -> (String, Vec<u64>) {
    let mut client = crate::controlplane::api(grpc_url)
        .await
        .expect("connect control plane");
    let mut stream = client
        .stream_logs(StreamLogsRequest {
            build_id: id.to_string(),
            from_seq: 0,
            follow: false,
        })
        .await
        .expect("StreamLogs")
        .into_inner();
    let mut text = String::new();
    let mut seqs = Vec::new();
    while let Some(chunk) = stream.message().await.expect("log chunk") {
        seqs.push(chunk.seq);
        text.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    (text, seqs)
}

/// A TCP proxy between the box and the control plane, so a test can cut the link (every
/// connection dropped at once) and point it at a restarted control plane on a new port.
pub struct Proxy {
    pub addr: SocketAddr,
    upstream: Arc<std::sync::Mutex<String>>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    /// A proxy in front of `cp`'s box listener; a [`BoxDaemon`] given [`Proxy::url`] joins `cp`
    /// through it.
    pub async fn start_boxes(cp: &crate::controlplane::ControlPlane) -> Self {
        let p = Proxy::start(&cp.box_addr).await;
        crate::controlplane::proxy_boxes(p.addr.port(), &cp.grpc_url());
        p
    }

    pub async fn start(upstream: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = Arc::new(std::sync::Mutex::new(upstream.to_string()));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let up = Arc::clone(&upstream);
        let cut_rx = cut.subscribe();
        tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    continue;
                };
                let target = up.lock().unwrap().clone();
                let mut cut_rx = cut_rx.clone();
                cut_rx.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut upc) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut upc) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            upstream,
            cut,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every proxied connection now.
    pub fn cut(&self) {
        self.cut.send_modify(|g| *g += 1);
    }

    /// New connections go to `upstream` (host:port).
    pub fn set_upstream(&self, upstream: &str) {
        *self.upstream.lock().unwrap() = upstream.to_string();
    }
}
