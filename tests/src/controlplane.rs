//! Runs the real `hive-control-plane` binary (and the real `hivectl`) for tests and benchmarks.
//!
//! The binaries are built once per test process with
//! `cargo build -p hive-control-plane -p hivectl -p hive-connector --bins` (same profile as the running test), found in the workspace target dir, started on port 0
//! with `--ready-file`, and stopped with SIGTERM. A database is either a SQLite file in the
//! data dir or a fresh PostgreSQL database made through `HIVE_TEST_POSTGRES_URL`.
//!
//! The operator API needs a token (issue 10): a started control plane's admin token is read
//! from `<data-dir>/admin.token`, as an operator would, and every client and `hivectl` run made
//! here carries it ([`api`], [`hivectl`], [`ControlPlane::admin_token`]), so the tests keep
//! their meaning. The attack tests make other tokens with [`api_with`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hive_proto::auth::Bearer;
use hive_proto::v1::control_plane_client::ControlPlaneClient;
pub use hive_testkit::cargo::nested_cargo;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// What can go wrong running the control plane.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("cargo build -p hive-control-plane -p hivectl -p hive-connector failed ({0}); see its output above")]
    Build(String),
    #[error("run {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("hive-control-plane exited before it was ready ({status}); its log:\n{log}")]
    EarlyExit { status: String, log: String },
    #[error("hive-control-plane not ready after {0:?} (no ready file); its log:\n{1}")]
    NotReady(Duration, String),
    #[error("ready file {path}: {why}")]
    ReadyFile { path: PathBuf, why: String },
    #[error("temp dir: {0}")]
    TempDir(#[source] std::io::Error),
}

/// The operator API client the tests use: tonic's, carrying a token.
pub type Api = ControlPlaneClient<InterceptedService<Channel, Bearer>>;

/// The admin token of each control plane this process started, by its gRPC port: ports are
/// ephemeral, so one names one control plane while it runs, whichever address a test dials it
/// on (a listener on 0.0.0.0 is reached on 127.0.0.1).
static ADMIN_TOKENS: Mutex<BTreeMap<u16, String>> = Mutex::new(BTreeMap::new());

/// The box listener's port of each control plane this process started, by its gRPC port.
static BOX_PORTS: Mutex<BTreeMap<u16, u16>> = Mutex::new(BTreeMap::new());

/// The CA's SHA-256 of each control plane this process started, by its gRPC port.
static CA_PINS: Mutex<BTreeMap<u16, String>> = Mutex::new(BTreeMap::new());

/// The CA's SHA-256 of each gRPC or HTTP listener that serves TLS (off loopback, or
/// `--tls-on-loopback`), by its port.
static TLS_PINS: Mutex<BTreeMap<u16, String>> = Mutex::new(BTreeMap::new());

/// The pin a TLS gRPC/HTTP listener of a control plane started here is trusted by, from its
/// URL (`https://HOST:PORT[/...]`).
pub fn tls_pin(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    let port: u16 = authority.rsplit(':').next()?.parse().ok()?;
    TLS_PINS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&port)
        .cloned()
}

/// The CA (PEM) of the TLS listener at `url` (of a control plane started here), fetched
/// trusting its pin, as `hivectl --ca-sha256` does.
pub async fn pinned_ca(url: &str) -> String {
    let pin = tls_pin(url).unwrap_or_else(|| panic!("{url}: not a TLS listener started here"));
    hive_proto::pin::fetch_pinned_ca(url, &pin)
        .await
        .unwrap_or_else(|e| panic!("pinned CA of {url}: {e}"))
}

/// For a control plane this process started (by its gRPC URL): its agent listener's URL
/// (`https://127.0.0.1:PORT`) and its CA's SHA-256, what a connector is given.
pub fn agent_link(grpc_url: &str) -> Option<(String, String)> {
    let g = port_of(grpc_url)?;
    let b = *BOX_PORTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&g)?;
    let pin = CA_PINS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&g)?
        .clone();
    Some((format!("https://127.0.0.1:{b}"), pin))
}

/// A TLS channel to the agent listener of the control plane at `grpc_url` (started here),
/// trusting its CA the way a connector does: by the pinned SHA-256.
pub async fn agent_channel(grpc_url: &str) -> Channel {
    let (url, pin) = agent_link(grpc_url).expect("a control plane this process started");
    let ca = hive_proto::pin::fetch_pinned_ca(&url, &pin)
        .await
        .unwrap_or_else(|e| panic!("pinned CA of {url}: {e}"));
    hive_proto::pin::endpoint(&url, "127.0.0.1", &ca, None)
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

/// Proxies in front of a control plane's box listener: proxy port -> that control plane's
/// gRPC URL (for its join tokens).
static BOX_PROXIES: Mutex<BTreeMap<u16, String>> = Mutex::new(BTreeMap::new());

/// Says that boxes told `http://HOST:proxy_port` reach the box listener of the control plane at
/// `grpc_url` through a proxy there ([`box_endpoint`] then joins them to it, via the proxy).
pub fn proxy_boxes(proxy_port: u16, grpc_url: &str) {
    BOX_PROXIES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(proxy_port, grpc_url.to_string());
}

/// The port of `http://HOST:PORT[/]`.
fn port_of(url: &str) -> Option<u16> {
    url.trim_end_matches('/').rsplit(':').next()?.parse().ok()
}

/// The admin token of the control plane at `grpc_url`, if this process started it.
pub fn admin_token_for(grpc_url: &str) -> Option<String> {
    let port = port_of(grpc_url)?;
    ADMIN_TOKENS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&port)
        .cloned()
}

/// For a control plane this process started (named by its gRPC URL): the port of its box
/// listener and a fresh one-time join token, made with the real `hivectl box join-token` as its
/// admin, as an operator would. None for a control plane started elsewhere.
pub fn join_box(grpc_url: &str) -> Option<(u16, String)> {
    let box_port = *BOX_PORTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&port_of(grpc_url)?)?;
    // Callers name the control plane as a URL or as a bare HOST:PORT.
    let grpc_url = if grpc_url.contains("://") {
        grpc_url.to_string()
    } else if tls_pin(&format!("https://{grpc_url}")).is_some() {
        format!("https://{grpc_url}")
    } else {
        format!("http://{grpc_url}")
    };
    let out = hivectl(&grpc_url, &["box", "join-token", "--ttl", "1h"])
        .unwrap_or_else(|e| panic!("hivectl box join-token: {e}"));
    assert!(
        out.status.success(),
        "hivectl box join-token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Some((box_port, token))
}

/// The box listener URL (`https://HOST:BOXPORT`) and a join token for a box that was told the
/// control plane's gRPC URL `http://HOST:PORT`; for a control plane not started here, the URL
/// as given and no token.
///
/// Several control planes of one hive, comma-separated: their box listener URLs in the same
/// order, and one token (from the first; any control plane of a hive accepts it).
pub fn box_endpoint(control_plane: &str) -> (String, Option<String>) {
    if control_plane.contains(',') {
        let mut urls = Vec::new();
        let mut token = None;
        for cp in control_plane.split(',').map(str::trim) {
            let (url, t) = box_endpoint(cp);
            urls.push(url);
            token = token.or(t);
        }
        return (urls.join(","), token);
    }
    let proxied = port_of(control_plane).and_then(|p| {
        let cp = BOX_PROXIES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&p)
            .cloned()?;
        Some((p, cp))
    });
    let joined = match proxied {
        Some((proxy_port, cp)) => join_box(&cp).map(|(_, token)| (proxy_port, token)),
        None => join_box(control_plane),
    };
    match joined {
        Some((port, token)) => {
            let rest = control_plane
                .split("://")
                .nth(1)
                .unwrap_or(control_plane)
                .trim_end_matches('/');
            let host = rest.rsplit_once(':').map_or(rest, |(h, _)| h);
            (format!("https://{host}:{port}"), Some(token))
        }
        None => (control_plane.to_string(), None),
    }
}

/// The operator API at `grpc_url` as its admin (for a control plane this process started; with
/// no token otherwise).
pub async fn api(grpc_url: &str) -> Result<Api, tonic::transport::Error> {
    api_with(grpc_url, &admin_token_for(grpc_url).unwrap_or_default()).await
}

/// The operator API at `grpc_url` with `token` (empty: none).
pub async fn api_with(grpc_url: &str, token: &str) -> Result<Api, tonic::transport::Error> {
    let endpoint = if grpc_url.starts_with("https://") {
        let ca = pinned_ca(grpc_url).await;
        let host = grpc_url
            .trim_start_matches("https://")
            .rsplit_once(':')
            .map_or("127.0.0.1", |(h, _)| h)
            .to_string();
        hive_proto::pin::endpoint(grpc_url, &host, &ca, None)
            .unwrap_or_else(|e| panic!("TLS endpoint {grpc_url}: {e}"))
    } else {
        Endpoint::from_shared(grpc_url.to_string())?
    };
    let channel = endpoint.connect().await?;
    // A test's token is ours: it has the shape Bearer accepts.
    let bearer = Bearer::new(token).unwrap_or_else(|e| panic!("test token: {e}"));
    Ok(ControlPlaneClient::with_interceptor(channel, bearer))
}

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The cargo profile directory this process was built into (`debug` or `release`).
fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// `<target>/<profile>/`, honouring `CARGO_TARGET_DIR`.
pub fn bin_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join(profile())
}

static BUILT: OnceLock<Result<(), String>> = OnceLock::new();

/// Builds `hive-control-plane`, `hivectl` and `hive-connector` once per process. `HIVE_TEST_NO_BUILD=1` skips it
/// (the binaries must then already be in the target dir).
pub fn ensure_built() -> Result<(), HarnessError> {
    let r = BUILT.get_or_init(|| {
        if std::env::var_os("HIVE_TEST_NO_BUILD").is_some() {
            return Ok(());
        }
        let mut cmd = nested_cargo();
        cmd.args(["build", "-p", "hive-control-plane", "-p", "hivectl"])
            .args(["-p", "hive-connector", "--bins"]);
        if profile() == "release" {
            cmd.arg("--release");
        }
        match cmd.status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(s.to_string()),
            Err(e) => Err(e.to_string()),
        }
    });
    r.clone().map_err(HarnessError::Build)
}

/// Path of the `hive-control-plane` binary.
pub fn control_plane_bin() -> PathBuf {
    std::env::var_os("HIVE_CONTROL_PLANE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir().join("hive-control-plane"))
}

/// Path of the `hivectl` binary.
pub fn hivectl_bin() -> PathBuf {
    std::env::var_os("HIVECTL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir().join("hivectl"))
}

/// Which store a control plane runs on.
pub use hive_testkit::{Backend, TestDb};

/// Options for one control-plane process.
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// `--db`; `None` = the default SQLite file in the data dir.
    pub db: Option<String>,
    pub lease_secs: u64,
    pub heartbeat_interval_ms: u64,
    pub extra_args: Vec<String>,
    /// `RUST_LOG` for the process: `HIVE_TEST_CP_LOG` when set (e.g.
    /// `info,hive_control_plane=debug` for a test's timings), else `info`.
    pub log_filter: String,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self {
            db: None,
            lease_secs: 30,
            heartbeat_interval_ms: 2000,
            extra_args: Vec::new(),
            log_filter: std::env::var("HIVE_TEST_CP_LOG").unwrap_or_else(|_| "info".into()),
        }
    }
}

/// A running `hive-control-plane` process. Killed on drop; [`ControlPlane::stop`] is graceful.
pub struct ControlPlane {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub http_addr: String,
    pub grpc_addr: String,
    /// The box listener (TLS; boxes join with a token from `hivectl box join-token`).
    pub box_addr: String,
    /// Whether the gRPC and HTTP listeners serve TLS (off loopback, or `--tls-on-loopback`):
    /// [`ControlPlane::grpc_url`] and [`ControlPlane::webhook_url`] are then `https://`.
    pub grpc_tls: bool,
    pub http_tls: bool,
    pub opts: ControlPlaneOptions,
    log_path: PathBuf,
    // Keeps the temp dir alive for the life of the harness (across restarts).
    _tmp: Option<std::sync::Arc<tempfile::TempDir>>,
}

impl ControlPlane {
    /// Starts a control plane with a fresh data dir.
    pub fn start(opts: ControlPlaneOptions) -> Result<Self, HarnessError> {
        let tmp = tempfile::Builder::new()
            .prefix("hive-cp-")
            .tempdir()
            .map_err(HarnessError::TempDir)?;
        let data_dir = tmp.path().to_path_buf();
        Self::start_in(data_dir, opts, Some(std::sync::Arc::new(tmp)))
    }

    /// Starts another control plane of `first`'s hive: a fresh data dir holding a copy of
    /// `first`'s CA (`pki/`) and secrets key, as an operator sets up a second control plane on
    /// the same PostgreSQL (`opts.db` must name `first`'s database).
    pub fn start_sharing(
        first: &ControlPlane,
        opts: ControlPlaneOptions,
    ) -> Result<Self, HarnessError> {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::Builder::new()
            .prefix("hive-cp-")
            .tempdir()
            .map_err(HarnessError::TempDir)?;
        let data_dir = tmp.path().to_path_buf();
        let copy = |rel: &str, mode: u32| -> Result<(), HarnessError> {
            let to = data_dir.join(rel);
            let spawn = |what: String| move |source| HarnessError::Spawn { what, source };
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(spawn(format!("create {}", parent.display())))?;
                std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))
                    .map_err(spawn(format!("chmod {}", parent.display())))?;
            }
            std::fs::copy(first.data_dir.join(rel), &to)
                .map_err(spawn(format!("copy {rel} from the first control plane")))?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
                .map_err(spawn(format!("chmod {}", to.display())))?;
            Ok(())
        };
        copy("pki/ca.key", 0o600)?;
        copy("pki/ca.pem", 0o644)?;
        copy("secrets.key", 0o600)?;
        let cp = Self::start_in(data_dir, opts, Some(std::sync::Arc::new(tmp)))?;
        // One hive, one admin: the first control plane's token works on every one.
        if let (Some(token), Some(port)) = (first.admin_token(), port_of(&cp.grpc_url())) {
            ADMIN_TOKENS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(port, token);
        }
        Ok(cp)
    }

    fn start_in(
        data_dir: PathBuf,
        opts: ControlPlaneOptions,
        tmp: Option<std::sync::Arc<tempfile::TempDir>>,
    ) -> Result<Self, HarnessError> {
        ensure_built()?;
        let ready = data_dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log_path = data_dir.join(format!(
            "control-plane-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let log = std::fs::File::create(&log_path).map_err(|source| HarnessError::Spawn {
            what: format!("create {}", log_path.display()),
            source,
        })?;
        let log2 = log.try_clone().map_err(|source| HarnessError::Spawn {
            what: "dup log file".to_string(),
            source,
        })?;
        let bin = control_plane_bin();
        let mut cmd = Command::new(&bin);
        cmd.arg("--http-addr")
            .arg("127.0.0.1:0")
            .arg("--grpc-addr")
            .arg("127.0.0.1:0")
            // Boxes join with a token and then use their certificate, as in production; a box
            // in the emulated KVM host dials it as 10.0.2.2 (QEMU's address of this host).
            .arg("--box-addr")
            .arg("127.0.0.1:0")
            .arg("--tls-san")
            .arg("10.0.2.2")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--lease-secs")
            .arg(opts.lease_secs.to_string())
            .arg("--heartbeat-interval-ms")
            .arg(opts.heartbeat_interval_ms.to_string())
            .arg("--ready-file")
            .arg(&ready)
            .args(&opts.extra_args)
            .env("RUST_LOG", &opts.log_filter)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        if let Some(db) = &opts.db {
            cmd.arg("--db").arg(db);
        }
        let mut child = cmd.spawn().map_err(|source| HarnessError::Spawn {
            what: bin.display().to_string(),
            source,
        })?;
        let limit = Duration::from_secs(60);
        let t0 = Instant::now();
        let (http_addr, grpc_addr, box_addr) = loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(HarnessError::EarlyExit {
                    status: status.to_string(),
                    log: std::fs::read_to_string(&log_path).unwrap_or_default(),
                });
            }
            if let Ok(text) = std::fs::read_to_string(&ready) {
                // The file may be seen half-written; retry until it parses.
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    let get = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
                    match (get("http"), get("grpc"), get("box")) {
                        (Some(h), Some(g), Some(b)) => break (h, g, b),
                        _ => {
                            let _ = child.kill();
                            return Err(HarnessError::ReadyFile {
                                path: ready,
                                why: format!("missing \"http\"/\"grpc\"/\"box\" in {text}"),
                            });
                        }
                    }
                }
            }
            if t0.elapsed() > limit {
                let _ = child.kill();
                return Err(HarnessError::NotReady(
                    limit,
                    std::fs::read_to_string(&log_path).unwrap_or_default(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let (Some(g), Some(b)) = (port_of(&grpc_addr), port_of(&box_addr)) {
            BOX_PORTS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(g, b);
            if let Some(pin) = std::fs::read_to_string(&ready)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v["ca_sha256"].as_str().map(str::to_string))
            {
                CA_PINS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(g, pin);
            }
        }
        let ready_json = std::fs::read_to_string(&ready)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .unwrap_or_default();
        let flag = |k: &str| ready_json[k].as_bool().unwrap_or(false);
        let (grpc_tls, http_tls) = (flag("grpc_tls"), flag("http_tls"));
        if let Some(pin) = ready_json["ca_sha256"].as_str() {
            for (tls, addr) in [(grpc_tls, &grpc_addr), (http_tls, &http_addr)] {
                if let (true, Some(port)) = (tls, port_of(addr)) {
                    TLS_PINS
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(port, pin.to_string());
                }
            }
        }
        let cp = Self {
            child: Some(child),
            data_dir,
            http_addr,
            grpc_addr,
            box_addr,
            grpc_tls,
            http_tls,
            opts,
            log_path,
            _tmp: tmp,
        };
        if let (Some(token), Some(port)) = (cp.admin_token(), port_of(&cp.grpc_url())) {
            ADMIN_TOKENS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(port, token);
        }
        Ok(cp)
    }

    /// The admin token the control plane wrote to `<data-dir>/admin.token` on its first start.
    /// (Another control plane of the hive: the first one's, see [`ControlPlane::start_sharing`].)
    pub fn admin_token(&self) -> Option<String> {
        std::fs::read_to_string(self.data_dir.join("admin.token"))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .or_else(|| admin_token_for(&self.grpc_url()))
    }

    /// The operator API as this control plane's admin.
    pub async fn api(&self) -> Api {
        api(&self.grpc_url())
            .await
            .unwrap_or_else(|e| panic!("connect to the control plane at {}: {e}", self.grpc_url()))
    }

    /// `http://127.0.0.1:PORT` for gRPC clients (`https://` when it serves TLS).
    pub fn grpc_url(&self) -> String {
        let scheme = if self.grpc_tls { "https" } else { "http" };
        format!("{scheme}://{}", self.grpc_addr)
    }

    /// `http://127.0.0.1:PORT/webhooks/github` (`https://` when it serves TLS).
    pub fn webhook_url(&self) -> String {
        let scheme = if self.http_tls { "https" } else { "http" };
        format!("{scheme}://{}/webhooks/github", self.http_addr)
    }

    /// The process's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGTERM, then waits up to 20 s for a clean exit; returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// SIGKILL (a crash).
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops (gracefully) and starts again on the same data dir and database. The ports change.
    pub fn restart(mut self) -> Result<Self, HarnessError> {
        self.stop();
        let tmp = self._tmp.take();
        Self::start_in(self.data_dir.clone(), self.opts.clone(), tmp)
    }

    /// Runs the real `hivectl` against this control plane, as its admin.
    pub fn hivectl(&self, args: &[&str]) -> Result<Output, HarnessError> {
        hivectl_with(
            &self.grpc_url(),
            &self.admin_token().unwrap_or_default(),
            args,
        )
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.crash();
    }
}

/// Runs `hivectl` with `HIVE_ADDR=addr`, as the admin of that control plane if this process
/// started it (else with no token).
pub fn hivectl(addr: &str, args: &[&str]) -> Result<Output, HarnessError> {
    hivectl_with(addr, &admin_token_for(addr).unwrap_or_default(), args)
}

/// Runs `hivectl` with `HIVE_ADDR=addr` and `HIVE_TOKEN=token` (empty: no token at all).
pub fn hivectl_with(addr: &str, token: &str, args: &[&str]) -> Result<Output, HarnessError> {
    ensure_built()?;
    let bin = hivectl_bin();
    let mut cmd = Command::new(&bin);
    cmd.env_remove("HIVE_TOKEN")
        .env_remove("HIVE_TOKEN_FILE")
        .env_remove("HIVE_CA_SHA256")
        .env_remove("HIVE_CA_FILE");
    if !token.is_empty() {
        cmd.env("HIVE_TOKEN", token);
    }
    // A TLS control plane started here is trusted by its pin, as an operator would.
    if let Some(pin) = addr.split(',').find_map(|a| tls_pin(a.trim())) {
        cmd.env("HIVE_CA_SHA256", pin);
    }
    cmd.args(args)
        .env("HIVE_ADDR", addr)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| HarnessError::Spawn {
            what: bin.display().to_string(),
            source,
        })
}

/// A control plane on a chosen backend for one test: SQLite in its data dir, or a fresh
/// PostgreSQL database (dropped by [`TestHive::finish`]).
pub struct TestHive {
    pub cp: ControlPlane,
    pub pg: Option<TestDb>,
    pub backend: Backend,
}

impl TestHive {
    /// Starts one; `None` (after a loud SKIPPED line) for PostgreSQL without
    /// `HIVE_TEST_POSTGRES_URL`. Panics with the process log if it cannot start: this is for tests.
    pub async fn start(
        backend: Backend,
        test: &str,
        mut opts: ControlPlaneOptions,
    ) -> Option<Self> {
        let pg = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(TestDb::postgres(test).await?),
        };
        if let Some(pg) = &pg {
            opts.db = Some(pg.url.clone());
        }
        let cp = tokio::task::spawn_blocking(move || ControlPlane::start(opts))
            .await
            .expect("start task")
            .unwrap_or_else(|e| panic!("{test} ({backend}): start control plane: {e}"));
        Some(Self { cp, pg, backend })
    }

    /// Graceful restart on the same store.
    pub async fn restart(self) -> Self {
        let Self { cp, pg, backend } = self;
        let cp = tokio::task::spawn_blocking(move || cp.restart())
            .await
            .expect("restart task")
            .unwrap_or_else(|e| panic!("restart control plane ({backend}): {e}"));
        Self { cp, pg, backend }
    }

    /// Stops gracefully (asserting a clean exit) and drops the PostgreSQL database.
    pub async fn finish(mut self) {
        let ok = self.cp.stop();
        let log = self.cp.log();
        if let Some(pg) = self.pg.take() {
            pg.drop_db().await;
        }
        assert!(
            ok,
            "control plane did not exit cleanly on SIGTERM; log:\n{log}"
        );
    }
}

/// A quantile of a Prometheus histogram in `/metrics` text: `family` (without `_bucket`) with
/// exactly `labels` besides `le` (`stage="running"`, or "" for none). Returns the count and the
/// upper bound of the bucket the quantile falls in (an over-estimate by at most one bucket's
/// width), None when the histogram is absent or empty. For benches that read the control
/// plane's own histograms rather than sort samples.
pub fn histogram_quantile(text: &str, family: &str, labels: &str, q: f64) -> Option<(u64, f64)> {
    let prefix = format!("{family}_bucket{{");
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(prefix.as_str()) else {
            continue;
        };
        let Some((inside, value)) = rest.split_once("} ") else {
            continue;
        };
        // `le="0.5",a="x"` (or in another order): the labels other than `le` must be
        // `labels`. (Label values here have no commas.)
        let mut le = None;
        let mut others = Vec::new();
        for pair in inside.split(',') {
            match pair.strip_prefix("le=") {
                Some(v) => le = Some(v.trim_matches('"')),
                None => others.push(pair),
            }
        }
        if others.join(",") != labels {
            continue;
        }
        let le = le?;
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        buckets.push((bound, value.trim().parse().ok()?));
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let count = buckets.last()?.1;
    if count == 0 {
        return None;
    }
    // Cumulative counts: the first bucket holding at least q of the samples.
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let rank = ((q * count as f64).ceil() as u64).max(1);
    buckets
        .iter()
        .find(|(_, n)| *n >= rank)
        .map(|(bound, _)| (count, *bound))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ports_name_control_planes() {
        assert_eq!(super::port_of("http://127.0.0.1:50051"), Some(50051));
        assert_eq!(super::port_of("http://0.0.0.0:7/"), Some(7));
        assert_eq!(super::port_of("http://h"), None);
    }

    #[test]
    fn histogram_quantile_reads_the_bucket_of_the_rank() {
        let text = "\
# TYPE x_seconds histogram
x_seconds_bucket{stage=\"a\",le=\"0.1\"} 50
x_seconds_bucket{le=\"0.2\",stage=\"a\"} 98
x_seconds_bucket{stage=\"a\",le=\"0.4\"} 100
x_seconds_bucket{stage=\"a\",le=\"+Inf\"} 100
x_seconds_bucket{stage=\"b\",le=\"0.1\"} 0
x_seconds_bucket{stage=\"b\",le=\"+Inf\"} 0
y_bucket{le=\"1.0\"} 1
y_bucket{le=\"+Inf\"} 2
";
        assert_eq!(
            super::histogram_quantile(text, "x_seconds", "stage=\"a\"", 0.5),
            Some((100, 0.1))
        );
        assert_eq!(
            super::histogram_quantile(text, "x_seconds", "stage=\"a\"", 0.51),
            Some((100, 0.2))
        );
        assert_eq!(
            super::histogram_quantile(text, "x_seconds", "stage=\"a\"", 0.99),
            Some((100, 0.4))
        );
        assert_eq!(
            super::histogram_quantile(text, "x_seconds", "stage=\"b\"", 0.5),
            None
        );
        assert_eq!(
            super::histogram_quantile(text, "x_seconds", "stage=\"c\"", 0.5),
            None
        );
        assert_eq!(
            super::histogram_quantile(text, "y", "", 0.5),
            Some((2, 1.0))
        );
        assert_eq!(
            super::histogram_quantile(text, "y", "", 0.99),
            Some((2, f64::INFINITY))
        );
    }
}
