//! Shared test helpers: a control plane on 127.0.0.1:0 over a `hive_testkit` database, a raw
//! HTTP client, and a box session driven through a real tonic client.
#![allow(dead_code)]

use std::time::Duration;

use hive_control_plane::server::{self, Config, Handle};
use hive_proto::auth::Bearer;
use hive_proto::v1::box_agent_client::BoxAgentClient;
use hive_proto::v1::box_message::Msg as BoxMsg;
use hive_proto::v1::control_message::Msg as CtlMsg;
use hive_proto::v1::control_plane_client::ControlPlaneClient;
use hive_proto::v1::{BoxMessage, ControlMessage, PoolState, Register};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
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
        // The scheduling tests drive sessions with TestBox over plaintext; box authentication
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

/// A box daemon stand-in speaking the real BoxAgent protocol over a real tonic channel.
pub struct TestBox {
    pub id: String,
    pub tx: mpsc::Sender<BoxMessage>,
    pub rx: tonic::Streaming<ControlMessage>,
    pub seq: u64,
}

pub fn pool(class: &str, warm: u32, capacity: u32) -> PoolState {
    PoolState {
        size_class: class.to_string(),
        warm,
        booting: 0,
        busy: 0,
        target: warm,
        capacity,
    }
}

impl TestBox {
    /// Connects and registers; returns the box and the `Registered` answer's acked seq.
    pub async fn connect(handle: &Handle, id: &str, pools: Vec<PoolState>) -> (TestBox, u64) {
        Self::connect_running(handle, id, pools, vec![]).await
    }

    pub async fn connect_running(
        handle: &Handle,
        id: &str,
        pools: Vec<PoolState>,
        running: Vec<String>,
    ) -> (TestBox, u64) {
        let mut client = BoxAgentClient::connect(format!("http://{}", handle.grpc_addr))
            .await
            .expect("connect BoxAgent");
        let (tx, rx) = mpsc::channel(1024);
        tx.send(BoxMessage {
            seq: 0,
            msg: Some(BoxMsg::Register(Register {
                box_id: id.to_string(),
                hostname: format!("{id}.test"),
                backend: "sandbox".into(),
                pools,
                running_builds: running,
                version: "test".into(),
            })),
        })
        .await
        .unwrap();
        let mut rx = client
            .session(ReceiverStream::new(rx))
            .await
            .expect("session opens")
            .into_inner();
        let first = rx.message().await.expect("stream ok").expect("a message");
        let acked = match first.msg {
            Some(CtlMsg::Registered(r)) => {
                assert_eq!(r.box_id, id);
                assert!(r.size_classes.iter().any(|c| c.name == "small"));
                r.acked_seq
            }
            other => panic!("expected Registered, got {other:?}"),
        };
        (
            TestBox {
                id: id.to_string(),
                tx,
                rx,
                seq: acked,
            },
            acked,
        )
    }

    /// Sends an acked message (update or log) with the next seq; returns that seq.
    pub async fn send_acked(&mut self, msg: BoxMsg) -> u64 {
        self.seq += 1;
        self.tx
            .send(BoxMessage {
                seq: self.seq,
                msg: Some(msg),
            })
            .await
            .expect("send");
        self.seq
    }

    pub async fn send_plain(&mut self, msg: BoxMsg) {
        self.tx
            .send(BoxMessage {
                seq: 0,
                msg: Some(msg),
            })
            .await
            .expect("send");
    }

    /// Heartbeats in the background (as a live box does) until the returned task is aborted.
    pub fn heartbeat_every(
        &self,
        period: Duration,
        pools: Vec<PoolState>,
        running: Vec<String>,
    ) -> tokio::task::JoinHandle<()> {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            loop {
                let m = BoxMessage {
                    seq: 0,
                    msg: Some(BoxMsg::Heartbeat(hive_proto::v1::Heartbeat {
                        pools: pools.clone(),
                        running_builds: running.clone(),
                        cells: vec![],
                    })),
                };
                if tx.send(m).await.is_err() {
                    return;
                }
                tokio::time::sleep(period).await;
            }
        })
    }

    /// The next control message that is not an Ack, within `within`.
    pub async fn next_non_ack(&mut self, within: Duration) -> Option<CtlMsg> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let m = tokio::time::timeout_at(deadline, self.rx.message())
                .await
                .ok()?
                .ok()??;
            match m.msg {
                Some(CtlMsg::Ack(_)) => continue,
                other => return other,
            }
        }
    }

    /// Waits for an Ack of at least `seq`.
    pub async fn wait_ack(&mut self, seq: u64, within: Duration) -> Vec<CtlMsg> {
        let deadline = tokio::time::Instant::now() + within;
        let mut others = Vec::new();
        loop {
            let m = tokio::time::timeout_at(deadline, self.rx.message())
                .await
                .unwrap_or_else(|_| panic!("no ack of {seq} in {within:?}"))
                .expect("stream ok")
                .expect("stream open");
            match m.msg {
                Some(CtlMsg::Ack(a)) if a.seq >= seq => return others,
                Some(CtlMsg::Ack(_)) => {}
                Some(other) => others.push(other),
                None => {}
            }
        }
    }
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
