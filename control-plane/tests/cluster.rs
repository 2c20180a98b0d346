//! Several control planes on one database (issue 13), in process: two control planes on one
//! PostgreSQL with the scheduler's tick set long, so only the notes between them (LISTEN/NOTIFY)
//! can make one act on the other's change at once. A fake box holds its session on one; the
//! operator and the webhook talk to the other. Also the refusals: two control planes on one
//! SQLite file, and a control plane with another CA on a hive's PostgreSQL.

use std::path::Path;
use std::time::{Duration, Instant};

use hive_control_plane::server::{self, Config, Handle};
use hive_proto::auth::Bearer;
use hive_proto::v1::control_plane_client::ControlPlaneClient;
use hive_proto::v1::{
    BoxActionRequest, BoxState, BuildState, CancelBuildRequest, CreateProjectRequest,
    GetBuildRequest, ListBoxesRequest, SubmitBuildRequest,
};
use hive_testkit::fakebox::{FakeBox, FakeBoxConfig, FakeBoxError};
use hive_testkit::TestDb;
use hmac::{Hmac, KeyInit, Mac};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Api = ControlPlaneClient<InterceptedService<Channel, Bearer>>;

/// No scheduler tick or lease sweep gets in the way within a test: what happens at once was
/// caused by a note.
const SLOW_TICK: Duration = Duration::from_secs(60);
/// What "at once" means here.
const SOON: Duration = Duration::from_secs(3);

fn config(db: &str, data_dir: &Path) -> Config {
    Config {
        data_dir: data_dir.to_path_buf(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        box_addr: "127.0.0.1:0".parse().unwrap(),
        insecure_boxes: true,
        db: Some(db.to_string()),
        lease: Duration::from_secs(30),
        heartbeat_interval: Duration::from_millis(300),
        tick: SLOW_TICK,
        ..Config::default()
    }
}

/// Two control planes of one hive (one data dir: the same CA and secrets key).
async fn two(db: &str, dir: &Path) -> (Handle, Handle, String) {
    let a = server::start(config(db, dir))
        .await
        .expect("first control plane");
    let token = a.admin_token().expect("admin token").to_string();
    let b = server::start(config(db, dir))
        .await
        .expect("second control plane");
    // Both hear each other before the test starts.
    for h in [&a, &b] {
        let t0 = Instant::now();
        loop {
            let (code, body) = get(&h.http_addr.to_string(), "/readyz").await;
            if code == 200 {
                break;
            }
            assert!(t0.elapsed() < SOON * 3, "not ready: {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    (a, b, token)
}

async fn api(h: &Handle, token: &str) -> Api {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", h.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    ControlPlaneClient::with_interceptor(channel, Bearer::new(token).unwrap())
}

async fn fake_box(h: &Handle, id: &str) -> FakeBox {
    FakeBox::connect(
        &format!("http://{}", h.grpc_addr),
        FakeBoxConfig::new(id, "small", 2, 2),
    )
    .await
    .expect("fake box connects")
}

/// A raw HTTP/1.1 request; (status, body).
async fn request(addr: &str, head: &str, body: &[u8]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

async fn get(addr: &str, path: &str) -> (u16, String) {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
        b"",
    )
    .await
}

/// A signed GitHub push for `repo` to `addr`.
async fn push(addr: &str, repo: &str, secret: &str) -> (u16, String) {
    let body = serde_json::json!({
        "ref": "refs/heads/main",
        "after": "0123456789abcdef0123456789abcdef01234567",
        "deleted": false,
        "repository": { "clone_url": repo, "html_url": repo, "full_name": "acme/x" },
        "head_commit": { "message": "m" },
        "pusher": { "name": "dev" }
    })
    .to_string();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    let sig = hex::encode(mac.finalize().into_bytes());
    let head = format!(
        "POST /webhooks/github HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
         Content-Type: application/json\r\nX-GitHub-Event: push\r\n\
         X-GitHub-Delivery: {}\r\nX-Hub-Signature-256: sha256={sig}\r\n\
         Content-Length: {}\r\n\r\n",
        uuid::Uuid::new_v4(),
        body.len()
    );
    request(addr, &head, body.as_bytes()).await
}

fn project(name: &str, secret: &str) -> CreateProjectRequest {
    CreateProjectRequest {
        name: name.into(),
        repo_url: format!("https://git.example.com/acme/{name}.git"),
        secret: secret.into(),
        branch: "main".into(),
        size_class: "small".into(),
        steps: vec!["true".into()],
        timeout_secs: 600,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_on_one_control_plane_reach_the_box_on_another_at_once() {
    let Some(db) = TestDb::postgres("changes_on_one_control_plane_reach_the_box").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b, token) = two(&db.url, dir.path()).await;
    let mut api_a = api(&a, &token).await;
    api_a.create_project(project("p1", "")).await.unwrap();

    // The box holds its session on B; the build is submitted on A.
    let mut fb = fake_box(&b, "box-on-b").await;
    let t0 = Instant::now();
    let build = api_a
        .submit_build(SubmitBuildRequest {
            project: "p1".into(),
            revision: "0123456789abcdef0123456789abcdef01234567".into(),
            git_ref: "refs/heads/main".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let asg = fb
        .next_assignment(SOON)
        .await
        .expect("B placed A's build at once (a note woke its scheduler)");
    assert_eq!(asg.build_id, build.id);
    let placed_in = t0.elapsed();
    fb.accept(&asg, "cell-1", true).await;
    fb.running(&asg).await;

    // A sees the box as B's, connected.
    let boxes = api_a
        .list_boxes(ListBoxesRequest {})
        .await
        .unwrap()
        .into_inner()
        .boxes;
    let info = boxes
        .iter()
        .find(|x| x.id == "box-on-b")
        .expect("box listed on A");
    assert_eq!(info.state, BoxState::Active as i32, "{info:?}");

    // Cancelled on A: B tells its box.
    api_a
        .cancel_build(CancelBuildRequest {
            id: build.id.clone(),
            reason: "cancelled on the other control plane".into(),
        })
        .await
        .unwrap();
    fb.expect_cancel(&build.id, SOON)
        .await
        .expect("the cancel reached the box through B");

    // Cordoned on A: B places nothing on it; uncordoned on A: B places again.
    api_a
        .cordon_box(BoxActionRequest {
            box_id: "box-on-b".into(),
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = api_a
        .submit_build(SubmitBuildRequest {
            project: "p1".into(),
            revision: "0123456789abcdef0123456789abcdef01234567".into(),
            git_ref: "refs/heads/main".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    if let Some(m) = fb.expect_silence(Duration::from_secs(1)).await {
        panic!("a box cordoned on another control plane was sent {m:?}");
    }
    api_a
        .uncordon_box(BoxActionRequest {
            box_id: "box-on-b".into(),
        })
        .await
        .unwrap();
    let asg2 = fb
        .next_assignment(SOON)
        .await
        .expect("placed after uncordon");
    assert_eq!(asg2.build_id, second.id);
    fb.accept(&asg2, "cell-2", true).await;
    fb.running(&asg2).await;
    fb.finish(&asg2, BuildState::Succeeded, 0).await;
    let mut api_b = api(&b, &token).await;
    let t1 = Instant::now();
    loop {
        let got = api_a
            .get_build(GetBuildRequest {
                id: second.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if got.state == BuildState::Succeeded as i32 {
            break;
        }
        assert!(t1.elapsed() < SOON, "A never saw B's box finish: {got:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A project made on A is known to B's webhook at once, though B's cache was warm: within
    // SOON, well before B's own re-read of the table (every 5 s on a shared database). The
    // note travels after A's answer, so a push sent the same instant may still miss it.
    for (name, secret) in [("p2", "s2"), ("p3", "s3")] {
        api_a.create_project(project(name, secret)).await.unwrap();
        let t0 = Instant::now();
        loop {
            let (code, body) = push(
                &b.http_addr.to_string(),
                &format!("https://git.example.com/acme/{name}.git"),
                secret,
            )
            .await;
            if code == 202 {
                break;
            }
            assert!(
                t0.elapsed() < SOON,
                "B's project cache missed A's new project {name}: {code} {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let _ = api_b.list_boxes(ListBoxesRequest {}).await.unwrap();
    println!("placed across control planes in {placed_in:?}");

    // The metrics say how many notes went each way.
    let (_, text) = get(&a.http_addr.to_string(), "/metrics").await;
    assert!(text.contains("hive_cluster_listening 1"), "{text}");
    assert!(text.contains("hive_cluster_notes{name=\"sent\"}"), "{text}");
    fb.disconnect();
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_box_that_moves_ends_its_old_session_and_keeps_its_row() {
    let Some(db) = TestDb::postgres("a_box_that_moves_ends_its_old_session").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b, token) = two(&db.url, dir.path()).await;
    let mut on_a = fake_box(&a, "mover").await;
    // The same box comes up on B (its link to A broke and it failed over, while A still
    // holds the old session): A's side of it goes silent; once that shows in the box's row
    // (three heartbeats), B takes the box, and A ends its old session when it hears of it.
    on_a.set_heartbeats(false);
    let _on_b = fake_box(&b, "mover").await;
    let t0 = Instant::now();
    loop {
        match on_a.next_message(Duration::from_millis(100)).await {
            Err(FakeBoxError::SessionEnded(_)) => break,
            _ if t0.elapsed() > SOON => panic!("A kept the moved box's old session"),
            _ => {}
        }
    }
    // A's old session ending does not mark the box gone: B holds it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for h in [&a, &b] {
        let boxes = api(h, &token)
            .await
            .list_boxes(ListBoxesRequest {})
            .await
            .unwrap()
            .into_inner()
            .boxes;
        let info = boxes.iter().find(|x| x.id == "mover").expect("listed");
        assert_eq!(info.state, BoxState::Active as i32, "{info:?}");
        assert!(
            !info.pools.is_empty(),
            "pools wiped by the old session's end: {info:?}"
        );
    }
    b.shutdown().await;
    a.shutdown().await;
}

/// Two boxes claiming one id on two control planes: the second is refused while the first's
/// control plane is alive and the first keeps its row fresh, with a message naming where it
/// is connected; once that control plane is gone (killed: its tasks end where they stand and
/// PostgreSQL drops its connections), the id is free at once (a box's failover does not wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_box_id_on_two_control_planes_is_refused_until_the_first_is_gone() {
    let Some(db) = TestDb::postgres("one_box_id_on_two_control_planes").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A runs on its own runtime, so the test can end it as `kill -9` would: every task dropped
    // where it stands, no shutdown code, its sockets closed. (Ending only A's database
    // connection is not that: A, alive, reconnects within 100 ms and rightly holds the id.)
    let rt_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let a = rt_a
        .spawn(server::start(config(&db.url, dir.path())))
        .await
        .unwrap()
        .expect("first control plane");
    let b = server::start(config(&db.url, dir.path()))
        .await
        .expect("second control plane");
    for h in [&a, &b] {
        let t0 = Instant::now();
        while get(&h.http_addr.to_string(), "/readyz").await.0 != 200 {
            assert!(t0.elapsed() < SOON * 3, "not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let _first = fake_box(&a, "twin").await;
    let t0 = Instant::now();
    let e = FakeBox::connect(
        &format!("http://{}", b.grpc_addr),
        FakeBoxConfig::new("twin", "small", 2, 2),
    )
    .await
    .err()
    .map(|e| e.to_string())
    .expect("a second box with a connected id is refused");
    assert!(
        e.contains("AlreadyExists") || e.contains("already connected"),
        "{e}"
    );
    assert!(e.contains("control plane"), "the message says where: {e}");
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "gave the holder its grace"
    );

    // A dies: B takes the id at once (PostgreSQL drops a dead process's connections, and
    // with them A's presence).
    let origin_a = a_origin(&a).await;
    rt_a.shutdown_background();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    let t0 = Instant::now();
    loop {
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
                .bind(hive_control_plane::cluster::presence_name(&origin_a))
                .fetch_one(&pool)
                .await
                .unwrap();
        if n == 0 {
            break;
        }
        assert!(t0.elapsed() < SOON, "A's listening connection outlived A");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t0 = Instant::now();
    let taken = FakeBox::connect(
        &format!("http://{}", b.grpc_addr),
        FakeBoxConfig::new("twin", "small", 2, 2),
    )
    .await;
    assert!(
        taken.is_ok(),
        "B takes the id once A is gone: {:?}",
        taken.err()
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    b.shutdown().await;
    drop(a);
}

/// A control plane's id, from its `/readyz`.
async fn a_origin(h: &Handle) -> String {
    let (_, body) = get(&h.http_addr.to_string(), "/readyz").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["control_plane"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn unsafe_set_ups_are_refused() {
    // Two control planes on one SQLite file.
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/hive.db", dir.path().display());
    let first = server::start(config(&db, dir.path())).await.expect("first");
    let second = server::start(config(&db, dir.path())).await;
    let err = second.expect_err("a second control plane on the same SQLite file started");
    assert!(
        err.to_string()
            .contains("another control plane is using the SQLite database"),
        "{err}"
    );
    first.shutdown().await;
    // Once the first is gone, the file is free again.
    server::start(config(&db, dir.path()))
        .await
        .expect("restart on the file")
        .shutdown()
        .await;

    // A control plane with another CA (its own data dir) on a hive's PostgreSQL.
    let Some(pg) = TestDb::postgres("unsafe_set_ups_are_refused").await else {
        return;
    };
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let first = server::start(config(&pg.url, d1.path()))
        .await
        .expect("first");
    let err = server::start(config(&pg.url, d2.path()))
        .await
        .expect_err("a control plane with another CA joined the hive");
    assert!(err.to_string().contains("same CA"), "{err}");
    // Same CA, another secrets key.
    std::fs::create_dir_all(d2.path().join("pki")).unwrap();
    for f in ["pki/ca.key", "pki/ca.pem"] {
        std::fs::copy(d1.path().join(f), d2.path().join(f)).unwrap();
    }
    let err = server::start(config(&pg.url, d2.path()))
        .await
        .expect_err("a control plane with another secrets key joined the hive");
    assert!(err.to_string().contains("same secrets key"), "{err}");
    first.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_exchange_reaches_the_connector_on_another_control_plane() {
    use base64::Engine as _;
    use hive_proto::v1::connector_client::ConnectorClient;
    use hive_proto::v1::connector_command::Cmd;
    use hive_proto::v1::connector_message::Msg;
    use hive_proto::v1::{
        AddConnectorRequest, ConnectorHello, ConnectorMessage, CreateNetworkRequest,
        KeyExchangeRequest, PeerApplied,
    };
    let Some(db) = TestDb::postgres("a_key_exchange_reaches_the_connector").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b, token) = two(&db.url, dir.path()).await;
    let mut api_a = api(&a, &token).await;
    let key = |n: u8| base64::engine::general_purpose::STANDARD.encode([n; 32]);
    api_a
        .create_network(CreateNetworkRequest {
            name: "corp".into(),
            prefixes: vec!["10.20.0.0/16".into()],
            tunnel_subnet: String::new(),
        })
        .await
        .unwrap();
    let added = api_a
        .add_connector(AddConnectorRequest {
            network: "corp".into(),
            endpoint: "198.18.0.50:51820".into(),
            public_key: key(7),
        })
        .await
        .unwrap()
        .into_inner();
    let mut p = project("priv", "");
    p.private_network = "corp".into();
    api_a.create_project(p).await.unwrap();

    // The connector's session is on A, the box's on B.
    let mut client = ConnectorClient::connect(format!("http://{}", a.grpc_addr))
        .await
        .unwrap();
    let (ctx, crx) = tokio::sync::mpsc::channel(16);
    ctx.send(ConnectorMessage {
        seq: 1,
        msg: Some(Msg::Hello(ConnectorHello {
            network: "corp".into(),
            public_key: key(7),
            endpoint: "198.18.0.50:51820".into(),
            token: added.token.clone(),
            version: "cluster-test".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut commands = client
        .session(tokio_stream::wrappers::ReceiverStream::new(crx))
        .await
        .expect("connector session on A")
        .into_inner();
    let first = commands.message().await.unwrap().unwrap();
    assert!(matches!(first.cmd, Some(Cmd::Sync(_))), "{first:?}");

    let mut fb = fake_box(&b, "kx-on-b").await;
    let build = api_a
        .submit_build(SubmitBuildRequest {
            project: "priv".into(),
            revision: "0123456789abcdef0123456789abcdef01234567".into(),
            git_ref: "refs/heads/main".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let asg = fb.next_assignment(SOON).await.expect("placed on B's box");
    fb.accept(&asg, "cell-kx", true).await;
    fb.key_exchange(KeyExchangeRequest {
        build_id: asg.build_id.clone(),
        lease_id: asg.lease_id.clone(),
        cell_id: "cell-kx".into(),
        cell_public_key: key(9),
    })
    .await;
    // The AddPeer reaches the connector on A through the notes; it is applied by hand.
    let cmd = tokio::time::timeout(SOON, commands.message())
        .await
        .expect("AddPeer reached the connector on A")
        .unwrap()
        .unwrap();
    let Some(Cmd::AddPeer(peer)) = &cmd.cmd else {
        panic!("expected AddPeer, got {cmd:?}");
    };
    assert_eq!(peer.public_key, key(9));
    ctx.send(ConnectorMessage {
        seq: 2,
        msg: Some(Msg::Applied(PeerApplied {
            command_id: cmd.id,
            error: String::new(),
        })),
    })
    .await
    .unwrap();
    let reply = fb
        .expect_key_exchange_reply(&build.id, SOON)
        .await
        .expect("B answered the box");
    assert!(reply.error.is_empty(), "{reply:?}");
    assert_eq!(reply.connector_public_key, key(7));
    assert_eq!(reply.connector_endpoint, "198.18.0.50:51820");

    // The build ends on B's box: the peer is removed from the connector on A.
    fb.running(&asg).await;
    fb.finish(&asg, BuildState::Succeeded, 0).await;
    let cmd = tokio::time::timeout(SOON, commands.message())
        .await
        .expect("RemovePeer reached the connector on A")
        .unwrap()
        .unwrap();
    match &cmd.cmd {
        Some(Cmd::RemovePeer(r)) => assert_eq!(r.public_key, key(9)),
        other => panic!("expected RemovePeer, got {other:?}"),
    }
    fb.disconnect();
    b.shutdown().await;
    a.shutdown().await;
}
