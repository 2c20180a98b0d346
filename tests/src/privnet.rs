//! The private network of the private-network tests: a "customer network" (its own netns with a
//! git server and an HTTP service only it serves) behind a real `hive-connector` (userspace
//! WireGuard in the connector's netns). Both removed on drop.
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::controlplane::bin_dir;

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

/// The customer network: netns `hive-cu-<run>` with 10.20.0.10 (git) and 10.20.0.11 (HTTP),
/// joined by a veth to the connector's netns (10.20.0.1 there). It routes the tunnel subnet
/// back to the connector (the documented set-up: no NAT on the connector).
pub struct Customer {
    pub netns: String,
    veth: String,
    connector_netns: String,
    children: Vec<Child>,
    _root: tempfile::TempDir,
    /// Text only the customer network serves (`PRIVATE` in its git repository; `<marker>-http`
    /// from its HTTP service).
    pub marker: String,
}

impl Customer {
    /// Starts it for test run `run` (names carry it) behind the connector's netns.
    pub fn start(run: u32, connector_netns: &str) -> Self {
        let netns = format!("hive-cu-{run}");
        let veth = format!("hcu-{run}");
        let peer = format!("hcp-{run}");
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        let _ = Command::new("ip")
            .args(["-n", connector_netns, "link", "del", &veth])
            .output();
        sh(Command::new("ip").args(["netns", "add", &netns]));
        sh(Command::new("ip").args([
            "-n",
            connector_netns,
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &netns,
        ]));
        let cn = |args: &[&str]| sh(Command::new("ip").args(["-n", connector_netns]).args(args));
        cn(&["addr", "add", "10.20.0.1/24", "dev", &veth]);
        cn(&["link", "set", &veth, "up"]);
        let cu = |args: &[&str]| sh(Command::new("ip").args(["-n", &netns]).args(args));
        cu(&["addr", "add", "10.20.0.10/24", "dev", &peer]);
        cu(&["addr", "add", "10.20.0.11/24", "dev", &peer]);
        cu(&["link", "set", &peer, "up"]);
        cu(&["link", "set", "lo", "up"]);
        cu(&["route", "add", "10.250.0.0/24", "via", "10.20.0.1"]);

        let root = tempfile::Builder::new()
            .prefix("hive-cu-")
            .tempdir()
            .unwrap();
        let marker = format!("private-marker-{}", uuid::Uuid::new_v4());
        // git: a repository only the customer network serves.
        let work = root.path().join("work");
        std::fs::create_dir(&work).unwrap();
        std::fs::write(work.join("PRIVATE"), format!("{marker}\n")).unwrap();
        let git = |args: &[&str], dir: &Path| {
            sh(Command::new("git")
                .args(["-c", "user.name=Hive Test", "-c", "user.email=test@hive"])
                .args(args)
                .current_dir(dir))
        };
        git(&["init", "-q", "-b", "main"], &work);
        git(&["add", "."], &work);
        git(&["commit", "-q", "-m", "private"], &work);
        let srv = root.path().join("srv");
        std::fs::create_dir(&srv).unwrap();
        git(&["clone", "-q", "--bare", "../work", "private.git"], &srv);
        let www = root.path().join("www");
        std::fs::create_dir(&www).unwrap();
        std::fs::write(www.join("secret.txt"), format!("{marker}-http\n")).unwrap();
        let mut children = Vec::new();
        children.push(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &netns,
                    "git",
                    "daemon",
                    "--reuseaddr",
                    "--export-all",
                ])
                .arg(format!("--base-path={}", srv.display()))
                .args(["--listen=10.20.0.10", "--port=9418"])
                .arg(&srv)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                // `git daemon` runs git-daemon as a child: its own process group, so drop can
                // stop both (killing `git` alone left git-daemon running after every test).
                .process_group(0)
                .spawn()
                .expect("git daemon"),
        );
        children.push(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &netns,
                    "/usr/bin/python3",
                    "-m",
                    "http.server",
                    "8080",
                ])
                .args(["--bind", "10.20.0.11", "--directory"])
                .arg(&www)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("http server"),
        );
        // Wait until both answer inside the customer network.
        let t0 = Instant::now();
        loop {
            let ok = Command::new("ip")
                .args(["netns", "exec", &netns, "git", "ls-remote", "git://10.20.0.10/private.git"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
                && Command::new("ip")
                    .args(["netns", "exec", &netns, "/usr/bin/python3", "-c"])
                    .arg("import urllib.request as u; u.urlopen('http://10.20.0.11:8080/secret.txt', timeout=1)")
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false);
            if ok {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "customer services never came up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Customer {
            netns,
            veth,
            connector_netns: connector_netns.to_string(),
            children,
            _root: root,
            marker,
        }
    }
}

impl Drop for Customer {
    fn drop(&mut self) {
        for c in &mut self.children {
            // The whole group (each child leads its own): `git` and the git-daemon it started.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["-n", &self.connector_netns, "link", "del", &self.veth])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

/// A running `hive-connector`, killed (SIGTERM first) on drop.
pub struct Connector {
    child: Option<Child>,
    iface: String,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
    pub public_key: String,
}

impl Connector {
    /// Makes (or reads) the connector key in `dir`; its public half.
    pub fn key(dir: &Path) -> String {
        sh(Command::new(bin_dir().join("hive-connector"))
            .arg("--key-file")
            .arg(dir.join("connector.key"))
            .arg("--print-public-key"))
    }

    /// Starts the connector in `netns` (its WireGuard device `iface`, UDP port 51820).
    pub fn start(
        cp: &str,
        network: &str,
        token: &str,
        netns: &str,
        iface: &str,
        dir: tempfile::TempDir,
    ) -> Self {
        let iface = iface.to_string();
        let log_path = dir.path().join("connector.log");
        let log = std::fs::File::create(&log_path).unwrap();
        // A control plane started here is reached as in production: its agent listener over
        // TLS, the CA pinned by the hash `hivectl connector add` prints.
        let (url, pin) = match crate::controlplane::agent_link(cp) {
            Some((url, pin)) => (url, Some(pin)),
            None => (cp.to_string(), None),
        };
        let mut cmd = Command::new(bin_dir().join("hive-connector"));
        if let Some(pin) = &pin {
            cmd.args(["--ca-sha256", pin]);
        }
        let child = cmd
            .args([
                "--control-plane",
                &url,
                "--network",
                network,
                "--token",
                token,
            ])
            .arg("--key-file")
            .arg(dir.path().join("connector.key"))
            .args(["--netns", &format!("/run/netns/{netns}"), "--iface", &iface])
            .args(["--listen-port", "51820"])
            .env("RUST_LOG", "info,boringtun=off")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start hive-connector");
        let public_key = Self::key(dir.path());
        Connector {
            child: Some(child),
            iface,
            log_path,
            _dir: dir,
            public_key,
        }
    }

    /// The connector process's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Peers on the connector's WireGuard device, read over its UAPI socket.
    pub fn peers(&self) -> Vec<String> {
        hive_wg::uapi::get(&self.iface)
            .map(|d| d.peers.iter().map(|p| p.public_key.to_base64()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The step that fetches the customer's HTTP service (no curl in the image: bash /dev/tcp).
pub fn http_step(expect_ok: bool) -> String {
    let fetch = "exec 3<>/dev/tcp/10.20.0.11/8080 && printf 'GET /secret.txt HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3";
    if expect_ok {
        format!(
            "timeout 10 bash -c \"{fetch}\" | tee /tmp/http.out && grep -q -- -http /tmp/http.out"
        )
    } else {
        format!(
            "if timeout 5 bash -c \"{fetch}\"; then echo REACHED-PRIVATE-HTTP; exit 1; fi; \
             if timeout 5 git ls-remote git://10.20.0.10/private.git; then echo REACHED-PRIVATE-GIT; exit 1; fi; \
             echo private network unreachable"
        )
    }
}
