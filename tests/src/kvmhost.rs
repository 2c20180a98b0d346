//! The emulated KVM host ("L1") for the microVM end-to-end tests: QEMU TCG with AMD SVM emulated
//! boots Debian's cloud kernel, in which `/dev/kvm` works, so the real `hive-box --backend
//! microvm` boots real guests on Hive's own VMM (see `deploy/kvm-host/kvm-host.sh`).
//!
//! The harness builds (or takes from the cache) the L1 image, a disk with the guest kernel and
//! cell disks, and a disk with this checkout's `hive-box`; boots L1 with QEMU user networking (L1
//! reaches this machine's loopback as 10.0.2.2, so the box dials a control plane started here and
//! cells fetch from test hosts here) and drives it through its control shell (`sh` on L1's second
//! serial port, a Unix socket here). Everything is killed and removed on drop.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cluster::ensure_box_built;
use crate::controlplane::{bin_dir, nested_cargo, workspace_root};

/// What the emulated host needs here, or why it cannot run.
#[derive(Debug, Clone)]
pub struct Prerequisites {
    pub image: PathBuf,
    pub assets: PathBuf,
    pub bin: PathBuf,
}

fn script() -> PathBuf {
    workspace_root().join("deploy/kvm-host/kvm-host.sh")
}

/// Runs a deploy script and returns the value of `KEY=` in its stdout.
fn script_value(cmd: &mut Command, key: &str) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?} failed ({})", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| format!("{cmd:?} printed no {key}= line: {text}"))
}

/// Builds (or finds cached) everything L1 boots: its image, the guest kernel and cell disks, and
/// this checkout's `hive-box`. Slow only the first time (the guest kernel takes minutes).
pub fn prepare() -> Result<Prerequisites, String> {
    static PREPARED: Mutex<Option<Prerequisites>> = Mutex::new(None);
    let mut slot = PREPARED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = slot.as_ref() {
        return Ok(p.clone());
    }
    if !nix::unistd::Uid::effective().is_root() {
        return Err("needs root".into());
    }
    for tool in ["qemu-system-x86_64", "debootstrap", "mkfs.ext4", "python3"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            return Err(format!(
                "{tool} not found (deploy/install-deps.sh installs it)"
            ));
        }
    }
    ensure_box_built();
    let root = workspace_root();
    let kernel = script_value(
        &mut Command::new(root.join("deploy/guest/build-kernel.sh")),
        "HIVE_GUEST_KERNEL",
    )?;
    let rootfs_disk;
    let build_disk;
    {
        let out = Command::new(root.join("deploy/images/build-images.sh"))
            .arg("--disk")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("run build-images.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!("build-images.sh --disk failed ({})", out.status));
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_string)
                .ok_or_else(|| format!("build-images.sh printed no {k}="))
        };
        rootfs_disk = get("HIVE_CELL_ROOTFS_DISK")?;
        build_disk = get("HIVE_BUILD_IMAGE_DISK")?;
    }
    let image = script_value(Command::new(script()).arg("image"), "HIVE_KVM_HOST_IMAGE")?;
    let assets = script_value(
        Command::new(script()).args([
            "assets",
            "--guest-kernel",
            &kernel,
            "--rootfs-disk",
            &rootfs_disk,
            "--build-disk",
            &build_disk,
        ]),
        "HIVE_KVM_HOST_ASSETS",
    )?;
    let bin = script_value(
        Command::new(script())
            .args(["bin", "--box-binary"])
            .arg(bin_dir().join("hive-box")),
        "HIVE_KVM_HOST_BIN",
    )?;
    let p = Prerequisites {
        image: image.into(),
        assets: assets.into(),
        bin: bin.into(),
    };
    *slot = Some(p.clone());
    Ok(p)
}

/// As [`prepare`], with `vmm-bench` built in release (a benchmark of a debug VMM measures the
/// debug build) on the binaries disk as `/hive/bin/vmm-bench`.
pub fn prepare_bench() -> Result<Prerequisites, String> {
    let mut p = prepare()?;
    let status = nested_cargo()
        .args(["build", "--release", "-p", "hive-vmm", "--bin", "vmm-bench"])
        .status()
        .map_err(|e| format!("cargo build --release vmm-bench: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build --release vmm-bench failed ({status})"));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    p.bin = script_value(
        Command::new(script())
            .args(["bin", "--box-binary"])
            .arg(bin_dir().join("hive-box"))
            .arg("--bench-binary")
            .arg(target.join("release/vmm-bench")),
        "HIVE_KVM_HOST_BIN",
    )?
    .into();
    Ok(p)
}

/// The prerequisites, or a loud skip (a failure under `CI=true`, where nothing may be skipped).
pub fn prepare_or_skip(test: &str) -> Option<Prerequisites> {
    skip_unless(test, prepare())
}

/// [`prepare_bench`], or a loud skip (a failure under `CI=true`).
pub fn prepare_bench_or_skip(test: &str) -> Option<Prerequisites> {
    skip_unless(test, prepare_bench())
}

fn skip_unless(test: &str, p: Result<Prerequisites, String>) -> Option<Prerequisites> {
    match p {
        Ok(p) => Some(p),
        Err(why) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: the emulated KVM host cannot run here: {why}");
            }
            eprintln!("SKIPPED {test}: the emulated KVM host cannot run here: {why}");
            None
        }
    }
}

/// How to boot L1.
#[derive(Debug, Clone)]
pub struct KvmHostOptions {
    pub memory_mib: u32,
    pub smp: u32,
    /// `v1` (the default, as on this machine) or `v2` (as Debian 12 hosts mount it).
    pub cgroup: &'static str,
    /// L1 TCP ports forwarded to 127.0.0.1:<free port> here.
    pub forward: Vec<u16>,
}

impl Default for KvmHostOptions {
    fn default() -> Self {
        KvmHostOptions {
            memory_mib: 4096,
            // One vCPU: with two, L1 hung under host load (kvm-host.sh says more);
            // HIVE_L1_SMP=2 tries two again.
            smp: std::env::var("HIVE_L1_SMP")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&n| n > 0)
                .unwrap_or(1),
            // HIVE_L1_CGROUP=v2 runs a test's box on cgroup v2 instead.
            cgroup: if std::env::var("HIVE_L1_CGROUP").as_deref() == Ok("v2") {
                "v2"
            } else {
                "v1"
            },
            forward: vec![8081],
        }
    }
}

/// A running L1. QEMU is killed on drop.
pub struct KvmHost {
    child: Option<Child>,
    dir: tempfile::TempDir,
    ctl: Mutex<Option<UnixStream>>,
    /// L1 port -> the loopback address here that reaches it.
    forwards: Vec<(u16, String)>,
    pub booted_in: Duration,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Output of one control-shell command.
#[derive(Debug, Clone)]
pub struct Exec {
    pub status: i32,
    pub output: String,
}

impl KvmHost {
    /// Boots L1 and waits until its control shell answers (up to 5 minutes: TCG is slow and the
    /// machine may be loaded).
    pub fn boot(p: &Prerequisites, opts: &KvmHostOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("hive-l1-")
            .tempdir()
            .expect("temp dir");
        let ctl = dir.path().join("ctl.sock");
        let console = dir.path().join("console.log");
        let mut cmd = Command::new(script());
        cmd.arg("boot")
            .arg("--image")
            .arg(&p.image)
            .arg("--assets")
            .arg(&p.assets)
            .arg("--bin")
            .arg(&p.bin)
            .arg("--ctl")
            .arg(&ctl)
            .arg("--console")
            .arg(&console)
            .args(["--memory", &opts.memory_mib.to_string()])
            .args(["--smp", &opts.smp.to_string()])
            .args(["--cgroup", opts.cgroup]);
        let mut forwards = Vec::new();
        for port in &opts.forward {
            let here = free_port();
            cmd.args(["--hostfwd", &format!("tcp:127.0.0.1:{here}-:{port}")]);
            forwards.push((*port, format!("127.0.0.1:{here}")));
        }
        let qemu_log = std::fs::File::create(dir.path().join("qemu.log")).expect("qemu log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(qemu_log.try_clone().expect("dup"))
            .stderr(qemu_log)
            .spawn()
            .expect("start kvm-host.sh boot");
        let mut host = KvmHost {
            child: Some(child),
            dir,
            ctl: Mutex::new(None),
            forwards,
            booted_in: Duration::ZERO,
        };
        let t0 = Instant::now();
        loop {
            if let Some(c) = host.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "L1 QEMU exited during boot ({status});\nqemu: {}\nconsole:\n{}",
                        host.qemu_log(),
                        host.console()
                    );
                }
            }
            // Probing before init is up only queues bytes on a port nobody reads yet.
            if host.console().contains("hive-l1: up") && host.try_connect() {
                if let Ok(e) = host.exec_timeout("echo l1-ready", Duration::from_secs(2)) {
                    if e.output.contains("l1-ready") {
                        break;
                    }
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "L1 did not answer on its control shell within 300 s; console:\n{}",
                host.console()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        host.booted_in = t0.elapsed();
        host
    }

    fn try_connect(&self) -> bool {
        let mut g = self.ctl.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_some() {
            return true;
        }
        match UnixStream::connect(self.dir.path().join("ctl.sock")) {
            Ok(s) => {
                *g = Some(s);
                true
            }
            Err(_) => false,
        }
    }

    /// L1's serial console so far (kernel messages, init's `hive-l1:` lines).
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    /// The last `lines` lines of L1's console.
    pub fn console_tail(&self, lines: usize) -> String {
        tail_lines(&self.console(), lines)
    }

    /// Why L1 is gone, when its QEMU (the `kvm-host.sh boot` process) has exited: then every
    /// call into L1 fails, and waiting on it is pointless.
    pub fn gone(&self) -> Option<String> {
        let pid = self.child.as_ref()?.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Field 3 (after the parenthesised name) is the state; Z once it has exited.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?");
        (stat.is_empty() || state == "Z" || state == "X").then(|| {
            format!(
                "L1's QEMU (pid {pid}) has exited; its log (tail):\n{}",
                tail_lines(&self.qemu_log(), 20)
            )
        })
    }

    fn qemu_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qemu.log")).unwrap_or_default()
    }

    /// The loopback address here that reaches TCP `port` of L1 (one of the forwarded ones).
    pub fn forwarded(&self, port: u16) -> &str {
        self.forwards
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, a)| a.as_str())
            .unwrap_or_else(|| panic!("L1 port {port} is not forwarded"))
    }

    /// Runs `cmd` in L1's shell (as a script: stdin /dev/null, stderr into the output), up to
    /// `timeout`. The output comes when the command ends. In L1 a command given 20 s or more is
    /// killed 8 s before `timeout` (`timeout(1)`: status 124, or 137 if it ignored SIGTERM), so a
    /// command stuck in the kernel (an `ip` waiting for a network namespace's teardown under
    /// TCG) answers with its status instead of leaving the shell busy for the next command.
    pub fn exec_timeout(&self, cmd: &str, timeout: Duration) -> Result<Exec, String> {
        use base64::Engine as _;
        let mut g = self.ctl.lock().unwrap_or_else(|p| p.into_inner());
        let s = g.as_mut().ok_or("control shell not connected")?;
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let marker = format!("@@hive-rc-{nonce}@@ ");
        // One line, the command base64-encoded: the control shell runs each line on its own, so
        // nothing in `cmd` can garble the next command. The marker is split in the line, so a
        // port that still echoes (before L1 set it raw) is never taken for the answer.
        let b64 = base64::engine::general_purpose::STANDARD.encode(cmd);
        let f = format!("/tmp/hive-ctl-{nonce}");
        // Short probes (the readiness echo) run bare: TCG may take a second to start one.
        let limit = match timeout.as_secs() {
            s @ 20.. => format!("timeout -k 3 {} ", s - 8),
            _ => String::new(),
        };
        let line = format!(
            "printf %s {b64} | base64 -d >{f} && {limit}sh {f} >{f}.out 2>&1 </dev/null; \
             s=$?; cat {f}.out; rm -f {f} {f}.out; echo \"@@hive-rc-\"{nonce}\"@@ $s\"\n"
        );
        s.write_all(line.as_bytes())
            .map_err(|e| format!("write to the control shell: {e}"))?;
        let deadline = Instant::now() + timeout;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16384];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // A late answer carries this nonce, so it is never taken for another's.
                return Err(format!(
                    "no answer from L1 within {timeout:?} to {cmd:?}; so far: {}",
                    String::from_utf8_lossy(&buf)
                ));
            }
            s.set_read_timeout(Some(left.min(Duration::from_millis(500))))
                .map_err(|e| e.to_string())?;
            match s.read(&mut chunk) {
                Ok(0) => {
                    *g = None;
                    return Err("the control shell closed".into());
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => {
                    *g = None;
                    return Err(format!("read the control shell: {e}"));
                }
            }
            let text = String::from_utf8_lossy(&buf);
            if let Some(at) = text.find(&marker) {
                if let Some(end) = text[at..].find('\n') {
                    let status = text[at + marker.len()..at + end]
                        .trim()
                        .parse()
                        .map_err(|_| format!("bad status line from L1: {}", &text[at..at + end]))?;
                    // Output of earlier commands that timed out may precede this one's; it
                    // ends with their markers.
                    let start = text[..at]
                        .rfind("@@ ")
                        .and_then(|p| text[p..at].find('\n').map(|n| p + n + 1))
                        .unwrap_or(0);
                    return Ok(Exec {
                        status,
                        output: text[start..at].to_string(),
                    });
                }
            }
        }
    }

    /// Runs `cmd` in L1 and returns its output; panics when it fails.
    pub fn sh(&self, cmd: &str) -> String {
        let e = self.run(cmd);
        assert_eq!(e.status, 0, "L1: {cmd:?} exited {}: {}", e.status, e.output);
        e.output
    }

    /// Runs `cmd` in L1; its status and output, whatever they are.
    pub fn run(&self, cmd: &str) -> Exec {
        // The console says why when L1 itself is stuck (RCU stalls, a panic): a lost control
        // shell alone does not.
        self.exec_timeout(cmd, Duration::from_secs(120))
            .unwrap_or_else(|e| {
                panic!(
                    "L1: {e}\n--- L1 console (tail) ---\n{}",
                    self.console_tail(60)
                )
            })
    }

    /// A file of L1 (empty when missing).
    pub fn read(&self, path: &str) -> String {
        self.run(&format!("cat {path} 2>/dev/null")).output
    }

    /// Where this host's logs are kept for the test (console, QEMU's own).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for KvmHost {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // `kvm-host.sh boot` execs QEMU, so this is QEMU itself.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Options of the `hive-box` started in L1.
#[derive(Debug, Clone)]
pub struct L1BoxOptions {
    pub box_id: String,
    /// `microvm`, `auto` or `sandbox`.
    pub backend: String,
    pub pool: String,
    pub lease_secs: u64,
    pub ready_timeout_secs: u64,
    pub extra: Vec<String>,
}

impl Default for L1BoxOptions {
    fn default() -> Self {
        L1BoxOptions {
            box_id: "l1-box".into(),
            backend: "microvm".into(),
            pool: "small=1".into(),
            lease_secs: 60,
            // A guest boots to ready in ~8 s here (15 s under load). One that is not ready
            // in 120 s has stalled (an RCU stall of a nested guest under TCG was seen): the box
            // destroys it and boots another, well inside the tests' 300 s waits for the pool.
            ready_timeout_secs: 120,
            // TCG is 20-50x slower than hardware: more time for each call into a guest.
            extra: [
                "--health-timeout-secs",
                "10",
                "--cell-call-timeout-secs",
                "60",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// The URL a box in L1 uses for a control plane listening on `127.0.0.1:PORT` here.
pub fn control_plane_from_l1(grpc_addr: &str) -> String {
    let port = grpc_addr.rsplit(':').next().unwrap_or("50051");
    format!("http://10.0.2.2:{port}")
}

impl KvmHost {
    /// Starts `hive-box` in L1 in the background (log `/var/log/hive-box.log`, data dir
    /// `/var/lib/hive-box`, health on L1's port 8081) and waits until it is up.
    pub fn start_box(&self, control_plane_grpc: &str, o: &L1BoxOptions) {
        // The box joins the control plane (started by this process) with a fresh token and
        // dials its box listener over TLS; 10.0.2.2 is in that listener's certificate.
        let (url, token) = match crate::controlplane::join_box(control_plane_grpc) {
            Some((port, token)) => (format!("https://10.0.2.2:{port}"), Some(token)),
            None => (control_plane_from_l1(control_plane_grpc), None),
        };
        let mut args = vec!["--control-plane".to_string(), url];
        if let Some(t) = token {
            args.extend(["--join-token".to_string(), t]);
        }
        args.extend([
            "--backend".to_string(),
            o.backend.clone(),
            "--pool".into(),
            o.pool.clone(),
            "--box-id".into(),
            o.box_id.clone(),
            "--data-dir".into(),
            "/var/lib/hive-box".into(),
            "--guest-kernel".into(),
            "/hive/assets/vmlinux".into(),
            "--guest-rootfs-disk".into(),
            "/hive/assets/cell-rootfs.ext4".into(),
            "--build-image-disk".into(),
            "/hive/assets/build-image.ext4".into(),
            "--health-addr".into(),
            "0.0.0.0:8081".into(),
            "--lease-secs".into(),
            o.lease_secs.to_string(),
            "--ready-timeout-secs".into(),
            o.ready_timeout_secs.to_string(),
            "--shutdown-grace-secs".into(),
            "10".into(),
            "--ready-file".into(),
            "/run/hive-box.ready".into(),
        ]);
        args.extend(o.extra.iter().cloned());
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        self.sh("rm -f /run/hive-box.ready");
        self.sh(&format!(
            "HIVE_LOG=info,hive_box=debug setsid /hive/bin/hive-box {} \
             >>/var/log/hive-box.log 2>&1 </dev/null & echo $! >/run/hive-box.pid",
            quoted.join(" ")
        ));
        let t0 = Instant::now();
        loop {
            if self.run("test -s /run/hive-box.ready").status == 0 {
                return;
            }
            let alive = self.run("kill -0 $(cat /run/hive-box.pid)").status == 0;
            assert!(alive, "hive-box in L1 exited; its log:\n{}", self.box_log());
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "hive-box in L1 not up in 120 s; its log:\n{}",
                self.box_log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The box daemon's log in L1 (or why it cannot be read: this is used in failure reports,
    /// which must not panic themselves).
    pub fn box_log(&self) -> String {
        if let Some(why) = self.gone() {
            return format!("(box log unreadable: {why})");
        }
        match self.exec_timeout(
            "cat /var/log/hive-box.log 2>/dev/null",
            Duration::from_secs(60),
        ) {
            Ok(e) => e.output,
            Err(e) => format!("(box log unreadable: L1: {e})"),
        }
    }

    /// SIGKILL of the box daemon (its cells stay behind, as after a crash of the daemon alone).
    pub fn crash_box(&self) {
        self.sh("kill -9 $(cat /run/hive-box.pid); sleep 0.2");
    }

    /// SIGTERM, and wait up to `timeout` for it to exit; whether it did.
    pub fn stop_box(&self, timeout: Duration) -> bool {
        self.run("kill -TERM $(cat /run/hive-box.pid)");
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self
                .run("kill -0 $(cat /run/hive-box.pid) 2>/dev/null")
                .status
                != 0
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        false
    }

    /// `GET /healthz` of the box in L1 (through the forwarded port), as JSON.
    pub async fn box_health(&self) -> serde_json::Value {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(self.forwarded(8081)).await else {
            return serde_json::Value::Null;
        };
        if s.write_all(b"GET /healthz HTTP/1.1\r\nhost: box\r\n\r\n")
            .await
            .is_err()
        {
            return serde_json::Value::Null;
        }
        let mut buf = String::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut buf)).await;
        if read.is_err() {
            return serde_json::Value::Null;
        }
        let body = buf.split("\r\n\r\n").nth(1).unwrap_or("{}");
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
    }

    /// (warm, busy, booting) of a class in the box's pool.
    pub async fn pool(&self, class: &str) -> (u64, u64, u64) {
        let h = self.box_health().await;
        h["pools"]
            .as_array()
            .and_then(|pools| pools.iter().find(|p| p["size_class"] == class))
            .map(|p| {
                (
                    p["warm"].as_u64().unwrap_or(0),
                    p["busy"].as_u64().unwrap_or(0),
                    p["booting"].as_u64().unwrap_or(0),
                )
            })
            .unwrap_or((0, 0, 0))
    }

    /// Waits for `warm` warm cells, whatever is busy; false on timeout.
    pub async fn wait_pool_warm(&self, class: &str, warm: u64, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.pool(class).await.0 == warm {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        false
    }

    /// Pids of the VMM processes (`hive-box vmm`) running in L1, sorted.
    pub fn vmm_pids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .run("pgrep -f '^/bin/hive-box vmm ' || true")
            .output
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        v.sort_unstable();
        v
    }

    /// Waits for `warm` warm cells and none busy; false on timeout.
    pub async fn wait_pool(&self, class: &str, warm: u64, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            let (w, b, _) = self.pool(class).await;
            if w == warm && b == 0 {
                return true;
            }
            if self.gone().is_some() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        false
    }

    /// Names of what is left of microVM cells in L1: VMM processes, TAPs and veths, network
    /// namespaces, cgroups and cell directories. Empty when the box cleaned up after itself.
    pub fn cell_leftovers(&self, cgroup_parent: &str) -> Vec<String> {
        let script = format!(
            "pgrep -a -f 'hive-box (vmm|jail)' | sed 's/^/process /'; \
             ls /run/netns 2>/dev/null | sed 's/^/netns /'; \
             ip -o link show | awk -F': ' '$2 ~ /^(hv-|tap)/ {{print \"link \" $2}}'; \
             for c in /sys/fs/cgroup/*/{cgroup_parent}/* /sys/fs/cgroup/{cgroup_parent}/*; do \
               [ -d \"$c\" ] && echo \"cgroup $c\"; done; \
             ls /var/lib/hive-box/cells 2>/dev/null | sed 's/^/cell-dir /'; true"
        );
        // Under TCG a namespace or cgroup teardown can hold a kernel lock `ip` or `pgrep`
        // waits on for tens of seconds: such a check is killed in L1 and tried again.
        for _ in 0..3 {
            let e = self
                .exec_timeout(&script, Duration::from_secs(40))
                .unwrap_or_else(|e| panic!("L1: {e}"));
            match e.status {
                0 => {
                    return e
                        .output
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_string)
                        .collect()
                }
                124 | 137 => continue,
                s => panic!("L1: the leftover check exited {s}: {}", e.output),
            }
        }
        vec![
            "check: the leftover check in L1 timed out 3 times (a teardown holds a kernel lock)"
                .into(),
        ]
    }
}

/// The last `n` lines of `s`.
pub(crate) fn tail_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
