//! Issue 5, end to end with real processes: a private network behind a real `hive-connector`
//! (boringtun WireGuard in the connector's netns, on a public test host 198.18.x.50), a
//! "customer network" netns behind it with a real `git daemon` (10.20.0.10) and an HTTP service
//! (10.20.0.11), the real control plane, `hive-box` (sandbox) and `hive-cell`.
//!
//! Checked: a private-network project's build clones from the customer git server and fetches
//! from the HTTP service and succeeds; the same builds without the network cannot reach either;
//! after a build the connector has no peer for its cell within seconds and the lease is revoked;
//! no private key of any issued cell key is in any file on the box, under /run, /tmp, or in the
//! database (the scanner is proven by a canary); every build had a distinct key; placed ->
//! tunnel passing traffic, median and p99. `two_hundred_secure_builds` (ignored: minutes) runs
//! 200 in a row. Needs root, the Debian build image, python3.
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hive_proto::v1::{
    AddConnectorRequest, BuildState, CreateNetworkRequest, CreateProjectRequest, GetBuildRequest,
    ListConnectorsRequest, ListTunnelLeasesRequest, SubmitBuildRequest,
};
use hive_tests::cluster::{self, BoxDaemon, BoxOptions, GitHost, Proxy};
use hive_tests::controlplane::{ControlPlane, ControlPlaneOptions, TestDb};
use hive_tests::privnet::{http_step, Connector, Customer};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Separates tests that run at once: names, subnets and addresses carry it.
use hive_tests::run_id;

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

struct Topology {
    // Order matters on drop: box, connector, customer, host.
    boxd: BoxDaemon,
    cp: ControlPlane,
    connector: Connector,
    customer: Customer,
    host: GitHost,
    _pg: Option<TestDb>,
    /// Between the box and the control plane, when the test cuts that link.
    proxy: Option<Proxy>,
}

impl Topology {
    async fn client(&self) -> hive_tests::controlplane::Api {
        hive_tests::controlplane::api(&self.cp.grpc_url())
            .await
            .unwrap()
    }

    fn context(&self) -> String {
        format!(
            "\n--- box log ---\n{}\n--- control plane log ---\n{}\n--- connector log ---\n{}",
            tail(&self.boxd.log(), 60),
            tail(&self.cp.log(), 40),
            tail(&self.connector.log(), 30)
        )
    }

    async fn project(&self, name: &str, repo: &str, network: &str, steps: &[&str]) {
        self.project_with_timeout(name, repo, network, steps, 120)
            .await
    }

    async fn project_with_timeout(
        &self,
        name: &str,
        repo: &str,
        network: &str,
        steps: &[&str],
        timeout_secs: u32,
    ) {
        self.client()
            .await
            .create_project(CreateProjectRequest {
                name: name.into(),
                repo_url: repo.into(),
                secret: "s".into(),
                branch: "main".into(),
                size_class: "small".into(),
                private_network: network.into(),
                steps: steps.iter().map(|s| s.to_string()).collect(),
                timeout_secs,
                ..Default::default()
            })
            .await
            .expect("CreateProject");
    }

    async fn build(&self, project: &str) -> hive_proto::v1::Build {
        let b = self
            .client()
            .await
            .submit_build(SubmitBuildRequest {
                project: project.into(),
                git_ref: "refs/heads/main".into(),
                ..Default::default()
            })
            .await
            .expect("SubmitBuild")
            .into_inner();
        cluster::wait_build(&self.cp.grpc_url(), &b.id, Duration::from_secs(120)).await
    }
}

/// The topology, its box's warm cells making their `hwg0` ahead (`--tunnel-ready-cells`).
async fn topology() -> Topology {
    topology_with(false, true).await
}

/// The topology; with `proxy` the box reaches the control plane through a [`Proxy`].
/// Without `tunnel_ready`, a cell makes `hwg0` at PrepareTunnel.
async fn topology_with(proxy: bool, tunnel_ready: bool) -> Topology {
    let run = run_id();
    let addr = format!("198.18.{}.50", 1 + run);
    let host = GitHost::start(&format!("cn{run}"), &addr);
    let customer = Customer::start(run, &host.netns());
    // HIVE_E2E_PRIVATE_DB=postgres runs the same on PostgreSQL (HIVE_TEST_POSTGRES_URL).
    let pg = if std::env::var("HIVE_E2E_PRIVATE_DB").as_deref() == Ok("postgres") {
        let admin = std::env::var("HIVE_TEST_POSTGRES_URL")
            .expect("HIVE_E2E_PRIVATE_DB=postgres needs HIVE_TEST_POSTGRES_URL");
        Some(
            TestDb::postgres_from(&admin)
                .await
                .expect("create test database"),
        )
    } else {
        None
    };
    let db = pg.as_ref().map(|p| p.url.clone());
    let cp = tokio::task::spawn_blocking(move || {
        ControlPlane::start(ControlPlaneOptions {
            db,
            lease_secs: 10,
            heartbeat_interval_ms: 500,
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .expect("control plane");
    let mut client = hive_tests::controlplane::api(&cp.grpc_url()).await.unwrap();
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
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("connector.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "connector key file mode");
    let added = client
        .add_connector(AddConnectorRequest {
            network: "corp".into(),
            endpoint: format!("{addr}:51820"),
            public_key: public_key.clone(),
        })
        .await
        .expect("AddConnector")
        .into_inner();
    assert!(added.token.starts_with("hct_"));
    let connector = Connector::start(
        &cp.grpc_url(),
        "corp",
        &added.token,
        &host.netns(),
        &format!("hwgc{run}"),
        dir,
    );
    assert_eq!(connector.public_key, public_key);
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
            t0.elapsed() < Duration::from_secs(20),
            "connector never connected; log:\n{}\ncp:\n{}",
            connector.log(),
            tail(&cp.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let proxy = if proxy {
        Some(Proxy::start_boxes(&cp).await)
    } else {
        None
    };
    let url = proxy
        .as_ref()
        .map(Proxy::url)
        .unwrap_or_else(|| cp.grpc_url());
    let octet = (run * 20 + 15) as u8;
    let boxd = tokio::task::spawn_blocking(move || {
        BoxDaemon::start(
            &url,
            BoxOptions {
                tag: format!("pn{run}"),
                subnet_octet: octet,
                pool: "small=2".into(),
                lease_secs: 10,
                block: vec![],
                extra: vec!["--tunnel-ready-cells".into(), tunnel_ready.to_string()],
            },
        )
    })
    .await
    .unwrap();
    assert!(
        boxd.wait_connected(Duration::from_secs(30)).await,
        "box never connected:\n{}",
        boxd.log()
    );
    assert!(
        boxd.wait_pool("small", 2, Duration::from_secs(60)).await,
        "pool never warm:\n{}",
        boxd.log()
    );
    Topology {
        boxd,
        cp,
        connector,
        customer,
        host,
        _pg: pg,
        proxy,
    }
}

/// Placed -> "tunnel up" (the handshake through the tunnel completed), from the stored times.
async fn placed_to_tunnel_ms(t: &Topology, build_id: &str) -> Option<i64> {
    let b = t
        .client()
        .await
        .get_build(GetBuildRequest {
            id: build_id.into(),
        })
        .await
        .ok()?
        .into_inner();
    let placed = b
        .transitions
        .iter()
        .find(|x| x.state == BuildState::Placed as i32)?
        .at_ms;
    let mut stream = t
        .client()
        .await
        .stream_logs(hive_proto::v1::StreamLogsRequest {
            build_id: build_id.into(),
            from_seq: 0,
            follow: false,
        })
        .await
        .ok()?
        .into_inner();
    while let Ok(Some(c)) = stream.message().await {
        if String::from_utf8_lossy(&c.data).contains("first handshake after") {
            return Some(c.at_ms - placed);
        }
    }
    None
}

/// One build's way from "placed" to a tunnel passing traffic, as epoch ms from the control
/// plane (placed, lease issued), the box (key exchange sent / answered, from its log) and the
/// cell (its build log lines), plus the cell's own split of the last part.
#[derive(Debug, Default, Clone)]
struct Timeline {
    placed: i64,
    prepare: i64,
    kx_sent: i64,
    issued: i64,
    kx_reply: i64,
    cell_start: i64,
    tunnel_start: i64,
    tunnel_up: i64,
    interface_ms: i64,
    handshake_ms: i64,
    rearms: i64,
    /// With the interface made ahead (with the warm cell, or at PrepareTunnel): how long that
    /// took on its thread, and how much of "interface up" waited for it (0 without one).
    early_made_ms: i64,
    early_wait_ms: i64,
    /// The build got a warm cell (else it waited for one to boot).
    warm: bool,
}

impl Timeline {
    /// (name, ms) for each step, in order.
    fn steps(&self) -> Vec<(&'static str, i64)> {
        vec![
            ("placed -> box took a cell", self.prepare - self.placed),
            (
                "PrepareTunnel (cell makes the key)",
                self.kx_sent - self.prepare,
            ),
            (
                "key exchange request -> lease issued",
                self.issued - self.kx_sent,
            ),
            (
                "lease issued -> connector applied -> reply at box",
                self.kx_reply - self.issued,
            ),
            (
                "reply -> cell starts the build (RunBuild)",
                self.cell_start - self.kx_reply,
            ),
            ("cell: container ready", self.tunnel_start - self.cell_start),
            ("cell: interface up", self.interface_ms),
            (
                "  of it: waiting for the one made ahead",
                self.early_wait_ms,
            ),
            ("  (making that one, ahead)", self.early_made_ms),
            ("cell: first handshake", self.handshake_ms),
            ("total placed -> tunnel up", self.tunnel_up - self.placed),
        ]
    }
}

/// `key=value` out of a log line (ANSI colours stripped).
fn field(line: &str, key: &str) -> Option<String> {
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let at = plain.find(&format!(" {key}="))?;
    let rest = &plain[at + key.len() + 2..];
    Some(
        rest.split_whitespace()
            .next()?
            .trim_matches('"')
            .to_string(),
    )
}

/// The number right after the last `after` in `text` that is followed by `unit`
/// ("(interface 3 ms, handshake 12 ms, 0 re-arms)": ", handshake ", " ms" -> 12).
fn number_before(text: &str, after: &str, unit: &str) -> Option<i64> {
    text.rmatch_indices(after).find_map(|(i, _)| {
        let rest = &text[i + after.len()..];
        let end = rest.find(unit)?;
        rest[..end].trim().parse().ok()
    })
}

async fn timeline(t: &Topology, build_id: &str) -> Option<Timeline> {
    let b = t
        .client()
        .await
        .get_build(GetBuildRequest {
            id: build_id.into(),
        })
        .await
        .ok()?
        .into_inner();
    let mut tl = Timeline {
        placed: b
            .transitions
            .iter()
            .find(|x| x.state == BuildState::Placed as i32)?
            .at_ms,
        warm: b.warm_start,
        ..Default::default()
    };
    tl.issued = leases(t)
        .await
        .iter()
        .find(|l| l.build_id == build_id)?
        .issued_at_ms;
    let box_log = t.boxd.log();
    let line = box_log
        .lines()
        .find(|l| l.contains("key exchange answered") && l.contains(build_id))?;
    let ms = |k: &str| field(line, k).and_then(|v| v.parse::<i64>().ok());
    tl.prepare = ms("prepare_at_ms")?;
    tl.kx_sent = ms("kx_sent_at_ms")?;
    tl.kx_reply = ms("kx_reply_at_ms")?;
    let mut stream = t
        .client()
        .await
        .stream_logs(hive_proto::v1::StreamLogsRequest {
            build_id: build_id.into(),
            from_seq: 0,
            follow: false,
        })
        .await
        .ok()?
        .into_inner();
    while let Ok(Some(c)) = stream.message().await {
        let text = String::from_utf8_lossy(&c.data).to_string();
        if text.starts_with("hive: build ") && tl.cell_start == 0 {
            tl.cell_start = c.at_ms;
        } else if text.contains("first handshake after") {
            tl.tunnel_up = c.at_ms;
            tl.interface_ms = number_before(&text, "(interface ", " ms")?;
            tl.handshake_ms = number_before(&text, ", handshake ", " ms")?;
            tl.rearms = number_before(&text, " ms, ", " re-arms")?;
            tl.early_made_ms = number_before(&text, " in ", " ms, ").unwrap_or(0);
            tl.early_wait_ms = number_before(&text, " ms, ", " ms of it waited").unwrap_or(0);
            return Some(tl);
        } else if text.contains(": tunnel ") && tl.tunnel_start == 0 {
            tl.tunnel_start = c.at_ms;
        }
    }
    None
}

/// Median and p99 of each step over `tls`, printed one line per step, and the builds with
/// the three slowest totals in full.
fn print_breakdown(tls: &[Timeline]) {
    if tls.is_empty() {
        return;
    }
    let names: Vec<&str> = tls[0].steps().iter().map(|(n, _)| *n).collect();
    println!("breakdown over {} builds (ms):", tls.len());
    for (i, name) in names.iter().enumerate() {
        let mut v: Vec<i64> = tls.iter().map(|t| t.steps()[i].1).collect();
        v.sort_unstable();
        println!(
            "  {name:<52} median {:>5}  p99 {:>5}  max {:>5}",
            percentile(&v, 0.5),
            percentile(&v, 0.99),
            v.last().copied().unwrap_or(0)
        );
    }
    let rearmed = tls.iter().filter(|t| t.rearms > 0).count();
    println!("  builds whose handshake was re-armed: {rearmed}");
    let cold = tls.iter().filter(|t| !t.warm).count();
    println!("  builds that waited for a cold cell: {cold}");
    let mut slow: Vec<&Timeline> = tls.iter().collect();
    slow.sort_by_key(|t| std::cmp::Reverse(t.tunnel_up - t.placed));
    for t in slow.iter().take(3) {
        println!(
            "  slow: {:?} re-arms {} warm {}",
            t.steps(),
            t.rearms,
            t.warm
        );
    }
}

#[test]
fn tunnel_line_parses() {
    let t = "hive: private network corp: tunnel up (userspace WireGuard), first handshake \
             after 45 ms (interface 3 ms, handshake 42 ms, 1 re-arms)\n";
    assert_eq!(number_before(t, "(interface ", " ms"), Some(3));
    assert_eq!(number_before(t, ", handshake ", " ms"), Some(42));
    assert_eq!(number_before(t, " ms, ", " re-arms"), Some(1));
    assert_eq!(number_before(t, " in ", " ms, "), None);
    let t = "hive: private network corp: tunnel up (userspace WireGuard), first handshake \
             after 45 ms (interface 13 ms, handshake 32 ms, 0 re-arms); interface made with \
             the warm cell in 21 ms, 9 ms of it waited for\n";
    assert_eq!(number_before(t, "(interface ", " ms"), Some(13));
    assert_eq!(number_before(t, " ms, ", " re-arms"), Some(0));
    assert_eq!(number_before(t, " in ", " ms, "), Some(21));
    assert_eq!(number_before(t, " ms, ", " ms of it waited"), Some(9));
    let line = "\x1b[2m2026-11-27T08:40:00Z\x1b[0m \x1b[32m INFO\x1b[0m key exchange answered \
                \x1b[3mbuild\x1b[0m\x1b[2m=\x1b[0mabc \x1b[3mkx_sent_at_ms\x1b[0m\x1b[2m=\x1b[0m17";
    assert_eq!(field(line, "build").as_deref(), Some("abc"));
    assert_eq!(field(line, "kx_sent_at_ms").as_deref(), Some("17"));
}

/// This machine's I/O pressure (`/proc/pressure/io`, "some" avg10/avg60), for the benchmark
/// lines: every placed -> tunnel step that waits on a durable commit grows with it.
fn io_pressure() -> String {
    std::fs::read_to_string("/proc/pressure/io")
        .ok()
        .and_then(|t| t.lines().next().map(str::to_string))
        .unwrap_or_else(|| "n/a".into())
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Waits until the connector has none of `keys` as a peer; returns how long it took.
async fn wait_peers_gone(t: &Topology, keys: &BTreeSet<String>, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let peers = t.connector.peers();
        if !peers.iter().any(|p| keys.contains(p)) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "connector still has peers {peers:?} after {within:?}{}",
            t.context()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every tunnel lease (public keys only) the control plane issued.
async fn leases(t: &Topology) -> Vec<hive_proto::v1::TunnelLease> {
    t.client()
        .await
        .list_tunnel_leases(ListTunnelLeasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .leases
}

/// Candidate 32-byte secrets in a file: base64 (44 chars) and hex (64 chars) tokens.
fn candidates(bytes: &[u8]) -> Vec<[u8; 32]> {
    let mut out = Vec::new();
    let is_b64 = |c: u8| c.is_ascii_alphanumeric() || c == b'+' || c == b'/' || c == b'=';
    let mut i = 0;
    while i < bytes.len() {
        if is_b64(bytes[i]) {
            let start = i;
            while i < bytes.len() && is_b64(bytes[i]) {
                i += 1;
            }
            let tok = &bytes[start..i];
            for w in tok.windows(44).filter(|w| w[43] == b'=') {
                if let Ok(v) = BASE64.decode(w) {
                    if let Ok(a) = <[u8; 32]>::try_from(v.as_slice()) {
                        out.push(a);
                    }
                }
            }
            for w in tok.windows(64) {
                if w.iter().all(u8::is_ascii_hexdigit) {
                    if let Ok(v) = hex::decode(w) {
                        if let Ok(a) = <[u8; 32]>::try_from(v.as_slice()) {
                            out.push(a);
                        }
                    }
                }
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Files under `dirs` (not following links; skipping huge files; in shared directories only
/// those written since `since`) that hold the private key of any of `publics`.
fn scan_for_private_keys(
    dirs: &[PathBuf],
    shared: &[PathBuf],
    since: std::time::SystemTime,
    publics: &BTreeSet<[u8; 32]>,
) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack: Vec<PathBuf> = dirs.iter().chain(shared).cloned().collect();
    let mut checked = std::collections::HashSet::new();
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
            continue;
        }
        if !meta.is_file() || meta.len() > 64 << 20 {
            continue;
        }
        let in_shared =
            shared.iter().any(|d| p.starts_with(d)) && !dirs.iter().any(|d| p.starts_with(d));
        if in_shared && meta.modified().map(|m| m < since).unwrap_or(false) {
            continue;
        }
        let Ok(bytes) = std::fs::read(&p) else {
            continue;
        };
        for c in candidates(&bytes) {
            if !checked.insert(c) {
                continue;
            }
            let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(c));
            if publics.contains(public.as_bytes()) {
                found.push(p.display().to_string());
            }
        }
    }
    found
}

/// Every row of every table of the database at `url`, as JSON lines.
async fn pg_dump(url: &str) -> String {
    use sqlx::Row;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url)
        .await
        .unwrap();
    let tables: Vec<String> = sqlx::query(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .iter()
    .map(|r| r.get::<String, _>(0))
    .collect();
    assert!(tables.iter().any(|t| t == "tunnel_leases"), "{tables:?}");
    let mut out = String::new();
    for t in tables {
        let rows = sqlx::query(&format!("SELECT row_to_json(x)::text FROM \"{t}\" x"))
            .fetch_all(&mut conn)
            .await
            .unwrap();
        for r in rows {
            out.push_str(&r.get::<String, _>(0));
            out.push('\n');
        }
    }
    out
}

fn public_bytes(keys: &[String]) -> BTreeSet<[u8; 32]> {
    keys.iter()
        .map(|k| <[u8; 32]>::try_from(BASE64.decode(k).unwrap().as_slice()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn private_network_builds_reach_the_customer_network_only_through_their_tunnel() {
    let _serial = SERIAL.lock().await;
    let test_start = std::time::SystemTime::now();
    let t = topology().await;
    let private_repo = "git://10.20.0.10/private.git";
    let ok_step = http_step(true);
    t.project(
        "priv",
        private_repo,
        "corp",
        &["cat PRIVATE", ok_step.as_str(), "ip -o addr show hwg0"],
    )
    .await;
    let no_step = http_step(false);
    // Packets to private ranges are dropped (not refused) by the box: the clone hangs until
    // the build's timeout.
    t.project_with_timeout("open-same-repo", private_repo, "", &["cat PRIVATE"], 15)
        .await;
    // A build without a network does not keep the warm cell's stand-by interface.
    let no_iface = "if grep -q hwg0: /proc/net/dev; then echo HWG0-SEEN; else echo no-hwg0; fi";
    t.project("open", &t.host.repo_url, "", &[no_step.as_str(), no_iface])
        .await;

    // A project naming a network that does not exist is refused with a clear error.
    let err = t
        .client()
        .await
        .create_project(CreateProjectRequest {
            name: "bad".into(),
            repo_url: private_repo.into(),
            private_network: "nope".into(),
            steps: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("\"nope\""), "{err:?}");

    let mut placed_ms = Vec::new();
    let mut timelines = Vec::new();
    let mut keys = Vec::new();
    for i in 0..5 {
        let b = t.build("priv").await;
        let (log, _) = cluster::build_log(&t.cp.grpc_url(), &b.id).await;
        assert_eq!(
            b.state,
            BuildState::Succeeded as i32,
            "private build {i} did not succeed: {}\nlog:\n{log}{}",
            b.message,
            t.context()
        );
        assert!(
            log.contains(&t.customer.marker),
            "no git marker in log:\n{log}"
        );
        assert!(
            log.contains(&format!("{}-http", t.customer.marker)),
            "no HTTP marker:\n{log}"
        );
        assert!(
            log.contains("hwg0"),
            "no tunnel interface in the build:\n{log}"
        );
        assert!(
            log.contains("interface made with the warm cell"),
            "the warm cell's interface was not used:\n{log}"
        );
        let ls = leases(&t).await;
        let mine: Vec<_> = ls.iter().filter(|l| l.build_id == b.id).collect();
        assert_eq!(mine.len(), 1, "one lease per build attempt: {mine:?}");
        let key = mine[0].public_key.clone();
        let gone =
            wait_peers_gone(&t, &BTreeSet::from([key.clone()]), Duration::from_secs(5)).await;
        println!("build {i}: peer removed from the connector {gone:?} after the build ended");
        // Revoked in the store too.
        let t0 = Instant::now();
        loop {
            let l = leases(&t)
                .await
                .into_iter()
                .find(|l| l.public_key == key)
                .unwrap();
            if l.state == "revoked" {
                let ended = b.transitions.last().map(|x| x.at_ms).unwrap_or(0);
                println!(
                    "build {i}: lease revoked {} ms after the build ended",
                    l.revoked_at_ms - ended
                );
                assert!(l.revoked_at_ms - ended < 2000, "revoked too late: {l:?}");
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "lease not revoked: {l:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        keys.push(key);
        if let Some(ms) = placed_to_tunnel_ms(&t, &b.id).await {
            placed_ms.push(ms);
        }
        if let Some(tl) = timeline(&t, &b.id).await {
            timelines.push(tl);
        }
    }
    let distinct: BTreeSet<_> = keys.iter().collect();
    assert_eq!(distinct.len(), keys.len(), "a key was reused: {keys:?}");

    // Without the network: the private repository cannot even be cloned ...
    let b = t.build("open-same-repo").await;
    let (log, _) = cluster::build_log(&t.cp.grpc_url(), &b.id).await;
    assert!(
        b.state == BuildState::Failed as i32 || b.state == BuildState::TimedOut as i32,
        "clone of the private repo worked without the network: {}\n{log}",
        b.message
    );
    assert!(
        b.message.contains("clone") || b.message.contains("timed out"),
        "{}",
        b.message
    );
    assert!(!log.contains(&t.customer.marker), "{log}");
    // ... and neither the HTTP service nor the git server is reachable from a build.
    let b = t.build("open").await;
    let (log, _) = cluster::build_log(&t.cp.grpc_url(), &b.id).await;
    assert_eq!(
        b.state,
        BuildState::Succeeded as i32,
        "open build: {}\n{log}{}",
        b.message,
        t.context()
    );
    // Output lines only (the `$ step` echo holds the words too).
    let said = |w: &str| log.lines().any(|l| l.trim() == w);
    assert!(said("private network unreachable"), "{log}");
    assert!(said("no-hwg0"), "{log}");
    assert!(
        !said("REACHED-PRIVATE-HTTP") && !said("REACHED-PRIVATE-GIT"),
        "{log}"
    );
    assert!(leases(&t).await.iter().all(|l| l.state == "revoked"));

    // A public key seen once is never accepted again: the connector keeps no peer, and nothing
    // anywhere holds a private key of an issued cell key.
    assert!(
        t.connector.peers().is_empty(),
        "peers left: {:?}",
        t.connector.peers()
    );
    let all_keys: Vec<String> = leases(&t).await.into_iter().map(|l| l.public_key).collect();
    let mut publics = public_bytes(&all_keys);
    // Everything of the box and the control plane (database included); of the shared /run and
    // /tmp what was written during this test.
    let dirs = vec![t.boxd.data_dir.path().to_path_buf(), t.cp.data_dir.clone()];
    let shared = vec![PathBuf::from("/run"), PathBuf::from("/tmp")];
    // The scanner finds a planted key (canary), then nothing real.
    let canary = hive_wg::KeyPair::generate();
    publics.insert(*canary.public().as_bytes());
    let canary_file = t.boxd.data_dir.path().join("canary.txt");
    std::fs::write(
        &canary_file,
        format!("x {} y\n", BASE64.encode(*canary.secret_bytes())),
    )
    .unwrap();
    // On PostgreSQL the tables are not files here: dump every row as JSON and scan that too.
    if let Some(pg) = &t._pg {
        let dump = t.cp.data_dir.join("pg-dump.txt");
        std::fs::write(&dump, pg_dump(&pg.url).await).unwrap();
    }
    let hits = scan_for_private_keys(&dirs, &shared, test_start, &publics);
    assert_eq!(
        hits,
        vec![canary_file.display().to_string()],
        "private key material found"
    );
    std::fs::remove_file(&canary_file).unwrap();
    // The database holds public keys only (the raw file scan above covered it; the API view
    // agrees: every stored key is a valid public key of a cell).
    assert!(all_keys
        .iter()
        .all(|k| BASE64.decode(k).map(|v| v.len() == 32).unwrap_or(false)));

    placed_ms.sort_unstable();
    println!(
        "placed -> tunnel passing traffic over {} builds: median {} ms, p99 {} ms, max {} ms",
        placed_ms.len(),
        percentile(&placed_ms, 0.5),
        percentile(&placed_ms, 0.99),
        placed_ms.last().copied().unwrap_or(0)
    );
    print_breakdown(&timelines);
    assert_eq!(
        placed_ms.len(),
        5,
        "tunnel timing missing from some build logs"
    );
    assert_eq!(timelines.len(), 5, "timeline missing for some builds");
}

/// 200 secure builds in a row: each a fresh key, none reused, each peer gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "takes minutes; run with --ignored"]
async fn two_hundred_secure_builds() {
    let _serial = SERIAL.lock().await;
    let t = topology().await;
    let step = http_step(true);
    t.project(
        "priv",
        "git://10.20.0.10/private.git",
        "corp",
        &["cat PRIVATE", step.as_str()],
    )
    .await;
    let n: usize = std::env::var("HIVE_SECURE_BUILDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mut placed_ms = Vec::new();
    let mut timelines = Vec::new();
    let pressure_before = io_pressure();
    let started = Instant::now();
    for i in 0..n {
        let b = t.build("priv").await;
        assert_eq!(
            b.state,
            BuildState::Succeeded as i32,
            "build {i}: {}{}",
            b.message,
            t.context()
        );
        if let Some(ms) = placed_to_tunnel_ms(&t, &b.id).await {
            placed_ms.push(ms);
        }
        if let Some(tl) = timeline(&t, &b.id).await {
            timelines.push(tl);
        }
    }
    let ls = leases(&t).await;
    let keys: BTreeSet<_> = ls.iter().map(|l| l.public_key.clone()).collect();
    assert_eq!(ls.len(), n, "one lease per build");
    assert_eq!(keys.len(), n, "{n} builds, {} distinct keys", keys.len());
    wait_peers_gone(&t, &keys, Duration::from_secs(5)).await;
    assert!(
        ls.iter().all(|l| l.state == "revoked") || {
            tokio::time::sleep(Duration::from_secs(2)).await;
            leases(&t).await.iter().all(|l| l.state == "revoked")
        }
    );
    placed_ms.sort_unstable();
    println!(
        "{n} secure builds in {:?}: {} distinct keys; placed -> tunnel passing traffic: median {} ms, p99 {} ms, max {} ms",
        started.elapsed(),
        keys.len(),
        percentile(&placed_ms, 0.5),
        percentile(&placed_ms, 0.99),
        placed_ms.last().copied().unwrap_or(0)
    );
    print_breakdown(&timelines);
    println!(
        "I/O pressure before: {pressure_before}; after: {}",
        io_pressure()
    );
}

/// Issue 5, no public egress: a private-network project whose policy (`HIVE_EGRESS=none`)
/// gives its builds no public egress still clones and fetches through its tunnel, but reaches
/// no public host, not even the connector's own address on another port; the same public
/// host is reachable from a build of a project without the policy (positive control).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_build_without_public_egress_reaches_only_its_private_network() {
    let _serial = SERIAL.lock().await;
    let t = topology().await;
    let public_repo = t.host.repo_url.clone();
    let probe = format!(
        "if timeout 5 git ls-remote {public_repo}; then echo REACHED-PUBLIC; exit 1; fi; \
         echo public host unreachable"
    );
    let http = http_step(true);
    let mut env = std::collections::HashMap::new();
    env.insert("HIVE_EGRESS".to_string(), "none".to_string());
    t.client()
        .await
        .create_project(CreateProjectRequest {
            name: "sealed".into(),
            repo_url: "git://10.20.0.10/private.git".into(),
            secret: "s".into(),
            branch: "main".into(),
            size_class: "small".into(),
            private_network: "corp".into(),
            steps: vec!["cat PRIVATE".into(), http.clone(), probe.clone()],
            timeout_secs: 60,
            env,
            ..Default::default()
        })
        .await
        .expect("CreateProject");
    let reach = format!("timeout 10 git ls-remote {public_repo} && echo PUBLIC-OK");
    t.project("public", &public_repo, "", &[reach.as_str()])
        .await;

    let b = t.build("public").await;
    let (log, _) = cluster::build_log(&t.cp.grpc_url(), &b.id).await;
    assert_eq!(
        b.state,
        BuildState::Succeeded as i32,
        "positive control: {}\n{log}{}",
        b.message,
        t.context()
    );
    assert!(log.lines().any(|l| l.trim() == "PUBLIC-OK"), "{log}");

    let b = t.build("sealed").await;
    let (log, _) = cluster::build_log(&t.cp.grpc_url(), &b.id).await;
    assert_eq!(
        b.state,
        BuildState::Succeeded as i32,
        "sealed build: {}\n{log}{}",
        b.message,
        t.context()
    );
    assert!(log.contains("no public egress"), "{log}");
    assert!(log.contains(&t.customer.marker), "no git marker:\n{log}");
    assert!(
        log.contains(&format!("{}-http", t.customer.marker)),
        "no HTTP marker:\n{log}"
    );
    assert!(
        log.lines().any(|l| l.trim() == "public host unreachable"),
        "{log}"
    );
    assert!(!log.lines().any(|l| l.trim() == "REACHED-PUBLIC"), "{log}");

    // A typo in the policy fails the build instead of leaving it open.
    let mut env = std::collections::HashMap::new();
    env.insert("HIVE_EGRESS".to_string(), "nnone".to_string());
    t.client()
        .await
        .create_project(CreateProjectRequest {
            name: "typo".into(),
            repo_url: public_repo.clone(),
            secret: "s".into(),
            branch: "main".into(),
            size_class: "small".into(),
            steps: vec!["echo RAN".into()],
            timeout_secs: 60,
            env,
            ..Default::default()
        })
        .await
        .expect("CreateProject");
    let b = t.build("typo").await;
    assert_eq!(b.state, BuildState::Failed as i32, "{}", b.message);
    assert!(b.message.contains("\"nnone\""), "{}", b.message);
}

/// Issue 5, a key exchange across a box reconnect: the control plane acks the request, the
/// connector is held (SIGSTOP) so the exchange is in the middle of waiting for `PeerApplied`,
/// the box's link is cut and kept down while the answer goes out (so it is lost), then the
/// link comes back. The box asks again on its new session, the control plane answers the
/// same build, lease and key with the same lease, and the build succeeds well inside the
/// box's 15 s key exchange wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_exchange_answer_lost_in_a_reconnect_is_asked_again() {
    let _serial = SERIAL.lock().await;
    let t = topology_with(true, false).await;
    let proxy = t.proxy.as_ref().unwrap();
    t.project(
        "priv",
        "git://10.20.0.10/private.git",
        "corp",
        &["cat PRIVATE"],
    )
    .await;
    let connector_pid =
        nix::unistd::Pid::from_raw(t.connector.pid().expect("connector runs") as i32);
    let signal = |s| nix::sys::signal::kill(connector_pid, s).unwrap();
    signal(nix::sys::signal::Signal::SIGSTOP);
    let b = t
        .client()
        .await
        .submit_build(SubmitBuildRequest {
            project: "priv".into(),
            git_ref: "refs/heads/main".into(),
            ..Default::default()
        })
        .await
        .expect("SubmitBuild")
        .into_inner();
    // The lease is issued before AddPeer goes to the (stopped) connector.
    let t0 = Instant::now();
    let issued = loop {
        if let Some(l) = leases(&t).await.into_iter().find(|l| l.build_id == b.id) {
            break l;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            signal(nix::sys::signal::Signal::SIGCONT);
            panic!("no lease issued{}", t.context());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let sent_at = Instant::now();
    // Link down, and it stays down: new connections go nowhere.
    proxy.set_upstream("127.0.0.1:1");
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(nix::sys::signal::Signal::SIGCONT);
    // The answer goes out while the box is away.
    let t0 = Instant::now();
    while !t
        .cp
        .log()
        .contains("box gone before its key exchange reply")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(8),
            "the answer was not lost as planned{}",
            t.context()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.set_upstream(&t.cp.box_addr);
    let b = cluster::wait_build(&t.cp.grpc_url(), &b.id, Duration::from_secs(60)).await;
    let (log, _) = cluster::build_log(&t.cp.grpc_url(), &b.id).await;
    assert_eq!(
        b.state,
        BuildState::Succeeded as i32,
        "build after the lost answer: {}\n{log}{}",
        b.message,
        t.context()
    );
    assert!(log.contains(&t.customer.marker), "{log}");
    let took = sent_at.elapsed();
    assert!(
        t.boxd
            .log()
            .contains("key exchange request sent again after a reconnect"),
        "{}",
        t.context()
    );
    assert!(
        t.cp.log()
            .contains("repeated key exchange request answered again"),
        "{}",
        t.context()
    );
    // The connector got the same AddPeer twice and took the second as applied.
    assert!(
        t.connector.log().contains("peer already present"),
        "{}",
        t.context()
    );
    // One lease, the same key and address, revoked after the build; no peer left.
    let mine: Vec<_> = leases(&t)
        .await
        .into_iter()
        .filter(|l| l.build_id == b.id)
        .collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(mine[0].public_key, issued.public_key);
    assert_eq!(mine[0].tunnel_address, issued.tunnel_address);
    wait_peers_gone(
        &t,
        &BTreeSet::from([issued.public_key.clone()]),
        Duration::from_secs(5),
    )
    .await;
    println!("build done {took:?} after the link was cut mid-exchange");
}
