//! Shared test helpers: a control plane on 127.0.0.1:0 over a `hive_testkit` database, a raw
//! HTTP client, and quiet `FakeBox` sessions (`fake_box`).
#![allow(dead_code)]

use std::time::Duration;

use hive_control_plane::server::{self, Config, Handle};
use hive_proto::auth::Bearer;
use hive_proto::v1::control_plane_client::ControlPlaneClient;
use hive_proto::v1::PoolState;
#[allow(unused_imports)] // each test file takes what it needs
pub use hive_testkit::fakebox::{pool, FakeBox, FakeBoxConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A control plane on ephemeral ports with short leases, for tests.
pub async fn start(db_url: &str) -> Handle {
    start_with(db_url, |_| {}).await
}

pub async fn start_with(db_url: &str, tweak: impl FnOnce(&mut Config)) -> Handle {
    // One data dir per database (admin.token, the CA, the secrets key): a control plane
    // started again on the same database is the same hive (another CA would be refused).
    let data_dir = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        db_url.hash(&mut h);
        std::env::temp_dir().join(format!("hive-test-data-{:016x}", h.finish()))
    };
    let mut config = Config {
        data_dir: data_dir.clone(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        box_addr: "127.0.0.1:0".parse().unwrap(),
        // The scheduling tests drive sessions with FakeBox over plaintext; box authentication
        // has its own tests (box_auth.rs) on the TLS box listener.
        insecure_boxes: true,
        db: Some(db_url.to_string()),
        lease: Duration::from_millis(1500),
        heartbeat_interval: Duration::from_millis(400),
        tick: Duration::from_millis(100),
        ..Config::default()
    };
    tweak(&mut config);
    server::start(config).await.expect("control plane starts")
}

/// The operator API as the control plane's admin (the token its first start made).
pub type Api = ControlPlaneClient<InterceptedService<Channel, Bearer>>;

pub async fn api(handle: &Handle) -> Api {
    let token = handle
        .admin_token()
        .expect("a fresh store: the control plane made an admin token");
    api_as(handle, token).await
}

/// The operator API with `token` (empty: none).
pub async fn api_as(handle: &Handle, token: &str) -> Api {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", handle.grpc_addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect ControlPlane");
    ControlPlaneClient::with_interceptor(channel, Bearer::new(token).expect("token"))
}

/// A minimal HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    /// The status line and headers.
    pub head: String,
    pub body: String,
}

impl HttpReply {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {}", self.body))
    }
}

/// Sends one HTTP/1.1 request over a fresh TCP connection and reads the whole reply.
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpReply {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write head");
    // The server may answer (413) and close before reading a large body; that is fine.
    let _ = s.write_all(body).await;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in reply: {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    HttpReply {
        status,
        head: head.to_string(),
        body,
    }
}

/// Posts `body` to `/webhooks/github` as GitHub does: JSON, event `event`, delivery id
/// `delivery`, and `signature` as `X-Hub-Signature-256` if given.
pub async fn post_github(
    addr: std::net::SocketAddr,
    event: &str,
    delivery: &str,
    signature: Option<&str>,
    body: &[u8],
) -> HttpReply {
    let mut headers = vec![
        ("Content-Type", "application/json"),
        ("X-GitHub-Event", event),
        ("X-GitHub-Delivery", delivery),
    ];
    if let Some(s) = signature {
        headers.push(("X-Hub-Signature-256", s));
    }
    http(addr, "POST", "/webhooks/github", &headers, body).await
}

/// A `push` delivery signed with `secret`, as GitHub sends it.
pub async fn push_signed(
    addr: std::net::SocketAddr,
    secret: &[u8],
    delivery: &str,
    body: &[u8],
) -> HttpReply {
    let sig = hive_control_plane::http::webhook::sign(secret, body);
    post_github(addr, "push", delivery, Some(&sig), body).await
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n.min(rest.len())]);
        s = rest.get(n + 2..).unwrap_or("");
    }
    out
}

/// A quiet [`FakeBox`] (nothing sent on its own: the test sends each message) registered as
/// `id` with `pools`; returns it and the `Registered` answer's acked seq.
pub async fn fake_box(handle: &Handle, id: &str, pools: Vec<PoolState>) -> (FakeBox, u64) {
    let fb = FakeBox::connect(
        &format!("http://{}", handle.grpc_addr),
        FakeBoxConfig::quiet(id, pools),
    )
    .await
    .unwrap_or_else(|e| panic!("box {id} registers: {e}"));
    let r = fb.registered().expect("registered");
    assert_eq!(r.box_id, id);
    assert!(r.size_classes.iter().any(|c| c.name == "small"));
    let acked = r.acked_seq;
    (fb, acked)
}

/// Polls `f` until it is true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {within:?} waiting for: {what}");
}
