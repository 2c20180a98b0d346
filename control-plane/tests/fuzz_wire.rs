//! Issue 11, fuzzing on stable Rust with a fixed number of iterations (seeded, so a failure
//! repeats): what strangers send the control plane, over its real listeners against a real
//! database. Webhook bodies and headers — random bytes, and valid pushes mutated field by field,
//! signed with the project's secret half the time so the parser past the signature is reached —
//! and every message a box can send on its session, including ones naming leases, builds and
//! sequence numbers it does not own; and every message a private network's connector can send.
//! Nothing may answer 5xx, stop the control plane, change a
//! build the sender does not hold, or keep a well-behaved box from finishing its build.
//! (The VMM's guest-facing parsers have their own seeded runs in `hive-vmm`, and cargo-fuzz
//! targets in `vmm/fuzz/` for long runs.)

mod common;

use std::time::Duration;

use common::{api, fake_box, http, pool, start, start_with};
use hive_control_plane::http::webhook::sign;
use hive_proto::v1::box_message::Msg as BoxMsg;
use hive_proto::v1::control_message::Msg as CtlMsg;
use hive_proto::v1::{
    BoxMessage, BuildState, BuildUpdate, BuildUpdateKind, CellInfo, CreateProjectRequest,
    GetBuildRequest, Heartbeat, ListBuildsRequest, LogChunk, LogStream, PoolState,
    StreamLogsRequest, SubmitBuildRequest,
};
use serde_json::{json, Value};

const SECRET: &str = "fuzz-secret";
const WAIT: Duration = Duration::from_secs(15);

/// xorshift64*: small, seeded, good enough to pick mutations.
struct Rand(u64);

impl Rand {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, max: u64) -> Vec<u8> {
        (0..self.below(max)).map(|_| self.next() as u8).collect()
    }
    fn text(&mut self, max: u64) -> String {
        const PIECES: &[&str] = &[
            "a",
            "Z",
            "0",
            "/",
            ".",
            "..",
            "-",
            " ",
            "\t",
            "\n",
            "\0",
            "\u{7f}",
            "é",
            "😀",
            "\u{202e}",
            "%00",
            "refs/heads/",
            "refs/tags/",
            "@{",
            "~",
            "^",
            ":",
            "\\",
            "\"",
            "git@",
            "https://",
            "://",
            "github.example",
            "acme/widget",
            ".git",
        ];
        (0..self.below(max))
            .map(|_| PIECES[self.below(PIECES.len() as u64) as usize])
            .collect()
    }
    fn value(&mut self, depth: u32) -> Value {
        match self.below(if depth > 3 { 6 } else { 8 }) {
            0 => Value::Null,
            1 => json!(self.next().is_multiple_of(2)),
            2 => json!(self.next() as i64),
            3 => json!(f64::from(self.next() as u32) / 7.0),
            4 | 5 => json!(self.text(40)),
            6 => Value::Array((0..self.below(4)).map(|_| self.value(depth + 1)).collect()),
            _ => {
                let mut m = serde_json::Map::new();
                for _ in 0..self.below(4) {
                    m.insert(self.text(8), self.value(depth + 1));
                }
                Value::Object(m)
            }
        }
    }
}

fn valid_push(after: &str) -> Value {
    json!({
        "ref": "refs/heads/main",
        "before": "0".repeat(40),
        "after": after,
        "deleted": false,
        "repository": {
            "full_name": "acme/widget",
            "clone_url": "https://github.example/acme/widget.git",
            "html_url": "https://github.example/acme/widget",
            "ssh_url": "git@github.example:acme/widget.git",
        },
        "head_commit": { "id": after, "message": "change" },
        "project": { "git_http_url": "https://github.example/acme/widget.git" },
    })
}

/// Replaces, removes or adds one field somewhere in `v`.
fn mutate(r: &mut Rand, v: &mut Value) {
    let paths: &[&[&str]] = &[
        &["ref"],
        &["after"],
        &["before"],
        &["deleted"],
        &["repository"],
        &["repository", "clone_url"],
        &["repository", "html_url"],
        &["repository", "ssh_url"],
        &["repository", "full_name"],
        &["project", "git_http_url"],
        &["head_commit"],
        &["head_commit", "id"],
    ];
    let path = paths[r.below(paths.len() as u64) as usize];
    let mut at = &mut *v;
    for key in &path[..path.len() - 1] {
        if !at.is_object() {
            return;
        }
        at = at
            .as_object_mut()
            .expect("object")
            .entry(key.to_string())
            .or_insert_with(|| json!({}));
    }
    let Some(obj) = at.as_object_mut() else {
        return;
    };
    let last = path[path.len() - 1].to_string();
    match r.below(4) {
        0 => {
            obj.remove(&last);
        }
        1 => {
            obj.insert(last, json!("a".repeat(r.below(70_000) as usize)));
        }
        _ => {
            let new = r.value(0);
            obj.insert(last, new);
        }
    }
}

/// Webhook: 600 hostile deliveries to the three forges' endpoints, on both databases, then a
/// valid one still builds.
async fn webhook_survives_hostile_deliveries(url: String) {
    let handle = start(&url).await;
    let mut client = api(&handle).await;
    client
        .create_project(CreateProjectRequest {
            name: "widget".into(),
            repo_url: "https://github.example/acme/widget".into(),
            secret: SECRET.into(),
            steps: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    // Found by review: a URL with a NUL byte (PostgreSQL refuses NUL in text) from a sender
    // with no secret must be a 401 like any unknown repository, not a 500.
    let nul = br#"{"ref":"refs/heads/main","after":"x","repository":{"clone_url":"a\u0000b"}}"#;
    let reply = http(
        handle.http_addr,
        "POST",
        "/webhooks/github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-GitHub-Delivery", "nul"),
            ("X-Hub-Signature-256", &sign(b"not the secret", nul)),
        ],
        nul,
    )
    .await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    let mut r = Rand(0x05ee_d0f1_17e5_u64);
    let events = [
        "push",
        "ping",
        "PUSH",
        "",
        "push\n",
        "release",
        "x".repeat(300).leak(),
    ];
    let mut accepted = std::collections::BTreeSet::new();
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..600u32 {
        let body: Vec<u8> = match r.below(4) {
            0 => r.bytes(2000),
            1 => serde_json::to_vec(&r.value(0)).unwrap(),
            _ => {
                let mut v = valid_push(&format!("{:040x}", r.next()));
                for _ in 0..=r.below(3) {
                    mutate(&mut r, &mut v);
                }
                serde_json::to_vec(&v).unwrap()
            }
        };
        let forge = r.below(3);
        let event = match (forge, r.below(3)) {
            (2, 0 | 1) => "Push Hook".to_string(),
            (2, _) => "Tag Push Hook".to_string(),
            _ => events[r.below(events.len() as u64) as usize].to_string(),
        };
        let delivery = match r.below(5) {
            0 => String::new(),
            1 => r.text(300),
            _ => format!("d-{i}"),
        };
        let signature = match (forge, r.below(4)) {
            (_, 0) => String::new(),
            (_, 1) => format!("sha256={}", r.text(64)),
            (0, _) => sign(SECRET.as_bytes(), &body),
            (1, _) => sign(SECRET.as_bytes(), &body)[7..].to_string(),
            _ => SECRET.to_string(),
        };
        // Header values must be visible ASCII to be sent at all; others are what a proxy drops.
        let clean = |s: &str| -> String { s.chars().filter(|c| c.is_ascii_graphic()).collect() };
        let (event, delivery, signature) = (clean(&event), clean(&delivery), clean(&signature));
        let (path, names) = match forge {
            0 => (
                "/webhooks/github",
                ["X-GitHub-Event", "X-GitHub-Delivery", "X-Hub-Signature-256"],
            ),
            1 => (
                "/webhooks/gitea",
                ["X-Gitea-Event", "X-Gitea-Delivery", "X-Gitea-Signature"],
            ),
            _ => (
                "/webhooks/gitlab",
                ["X-Gitlab-Event", "Idempotency-Key", "X-Gitlab-Token"],
            ),
        };
        let mut headers = vec![("Content-Type", "application/json")];
        for (name, value) in names.iter().zip([&event, &delivery, &signature]) {
            if !value.is_empty() {
                headers.push((name, value.as_str()));
            }
        }
        let reply = http(handle.http_addr, "POST", path, &headers, &body).await;
        assert!(
            (200..500).contains(&reply.status),
            "case {i}: {} {}\nbody: {:?}",
            reply.status,
            reply.body,
            String::from_utf8_lossy(&body)
        );
        *statuses.entry(reply.status).or_insert(0u32) += 1;
        if reply.status == 202 {
            if let Some(id) = reply.json()["build_id"].as_str() {
                accepted.insert(id.to_string());
            }
        }
    }
    eprintln!("fuzz: webhook answers by status: {statuses:?}");
    // The run means something only if hostile input got past the signature check.
    assert!(
        statuses.get(&400).copied().unwrap_or(0) >= 30
            && statuses.get(&202).copied().unwrap_or(0) >= 30,
        "too few deliveries reached the parser: {statuses:?}"
    );
    // Every build there is was answered 202 with its id: none made behind a refusal.
    let builds = client
        .list_builds(ListBuildsRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .builds;
    for b in &builds {
        assert!(
            accepted.contains(&b.id),
            "build {} made without a 202",
            b.id
        );
        assert!(b.git_ref.len() <= 256, "{b:?}");
    }
    // And a valid push still builds.
    let body = serde_json::to_vec(&valid_push(&"c".repeat(40))).unwrap();
    let reply = common::push_signed(handle.http_addr, SECRET.as_bytes(), "final", &body).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    handle.shutdown().await;
}
hive_testkit::on_both!(db => webhook_survives_hostile_deliveries);

fn random_box_message(r: &mut Rand, seq: u64, known: &[(String, String)]) -> BoxMessage {
    let (build_id, lease_id) = match r.below(3) {
        0 if !known.is_empty() => known[r.below(known.len() as u64) as usize].clone(),
        1 => (r.text(40), r.text(40)),
        _ => (String::new(), String::new()),
    };
    let msg = match r.below(40) {
        0..=12 => BoxMsg::Update(BuildUpdate {
            build_id,
            lease_id,
            kind: r.below(8) as i32,
            state: r.below(10) as i32,
            exit_code: r.next() as i32,
            message: r.text(200),
            cell_id: r.text(30),
            warm_start: r.next().is_multiple_of(2),
            ..Default::default()
        }),
        13..=25 => BoxMsg::Log(LogChunk {
            build_id,
            seq: if r.next().is_multiple_of(2) {
                r.below(100)
            } else {
                r.next()
            },
            stream: r.below(6) as i32,
            data: r.bytes(5000),
            ..Default::default()
        }),
        26..=38 => BoxMsg::Heartbeat(Heartbeat {
            pools: (0..r.below(4))
                .map(|_| PoolState {
                    size_class: r.text(10),
                    warm: r.next() as u32,
                    busy: r.next() as u32,
                    capacity: r.next() as u32,
                    ..Default::default()
                })
                .collect(),
            running_builds: (0..r.below(3)).map(|_| r.text(30)).collect(),
            cells: (0..r.below(3))
                .map(|_| CellInfo {
                    id: r.text(20),
                    size_class: r.text(10),
                    state: r.text(10),
                    build_id: r.text(20),
                    ..Default::default()
                })
                .collect(),
        }),
        _ => BoxMsg::Register(Default::default()),
    };
    // Heartbeats (and a Register out of place) are not numbered: a box sends them with 0.
    let numbered = matches!(msg, BoxMsg::Update(_) | BoxMsg::Log(_));
    BoxMessage {
        // (A seq far ahead ends the session at once: `hostile_box` covers it; here the
        // messages should get through to the handlers.)
        seq: match r.below(40) {
            _ if !numbered => 0,
            0..=3 => 0,
            4 => seq + 1000,
            _ => seq,
        },
        msg: Some(msg),
    }
}

/// Box session: a hostile box sends 400 random messages (some naming a good box's build and
/// lease) over several sessions; the good box's build is untouched by them and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn box_sessions_survive_hostile_messages() {
    let db = hive_testkit::TestDb::sqlite();
    // A long lease: the good box's build must not expire while the attackers talk.
    let handle = start_with(&db.url, |c| c.lease = Duration::from_secs(60)).await;
    let mut client = api(&handle).await;
    client
        .create_project(CreateProjectRequest {
            name: "widget".into(),
            repo_url: "https://github.example/acme/widget".into(),
            secret: SECRET.into(),
            steps: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let (mut good, _) = fake_box(&handle, "good", vec![pool("small", 1, 1)]).await;
    let _beat = good.heartbeat_every(
        Duration::from_millis(100),
        vec![pool("small", 1, 1)],
        vec![],
    );
    let id = client
        .submit_build(SubmitBuildRequest {
            project: "widget".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let a = match good.next_non_ack(WAIT).await {
        Some(CtlMsg::Assign(a)) => a,
        other => panic!("no assignment: {other:?}"),
    };
    let update = |kind: BuildUpdateKind| {
        BoxMsg::Update(BuildUpdate {
            build_id: a.build_id.clone(),
            lease_id: a.lease_id.clone(),
            kind: kind as i32,
            cell_id: "cell-1".into(),
            ..Default::default()
        })
    };
    let s = good.send_acked(update(BuildUpdateKind::Accepted)).await;
    good.wait_ack(s, WAIT).await.unwrap();
    let s = good.send_acked(update(BuildUpdateKind::Running)).await;
    good.wait_ack(s, WAIT).await.unwrap();

    // The attacker knows the good box's build and lease ids (the worst case).
    let known = vec![(a.build_id.clone(), a.lease_id.clone())];
    let mut r = Rand(0xbad_b0c5);
    let mut handled = 0;
    for session in 0..8 {
        let (mut evil, acked) = fake_box(
            &handle,
            &format!("evil-{session}"),
            vec![pool("small", 0, 0)],
        )
        .await;
        let mut seq = acked;
        for _ in 0..50 {
            // The acked seq moves only along an unbroken run: only a message that takes the
            // next number uses it up.
            let m = random_box_message(&mut r, seq + 1, &known);
            if m.seq == seq + 1 {
                seq += 1;
            }
            if evil.send_raw(m).await.is_err() {
                break; // the control plane ended this session: fine
            }
        }
        // Closing its side lets the control plane read every message, in order, then end the
        // session: once the stream ends here, all of them have been handled.
        evil.close_send();
        let ended = tokio::time::timeout(WAIT, async {
            let mut acked = 0;
            while let Ok(Some(m)) = evil.next_raw(WAIT).await {
                if let Some(CtlMsg::Ack(a)) = m.msg {
                    acked = a.seq;
                }
            }
            acked
        })
        .await;
        let last = ended.unwrap_or_else(|_| panic!("session evil-{session} never ended"));
        handled += last.saturating_sub(acked);
    }
    eprintln!("fuzz: {handled} of 400 hostile box messages were acked (reached the handlers)");
    // The run means something only if most messages got past the session's own checks.
    assert!(
        handled >= 150,
        "only {handled} of 400 messages were handled"
    );
    // The good build is where the good box left it.
    let b = client
        .get_build(GetBuildRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.state, BuildState::Running as i32, "{b:?}");
    assert_eq!(b.box_id, "good");
    // The good box finishes it.
    let mut fin = match update(BuildUpdateKind::Finished) {
        BoxMsg::Update(u) => u,
        _ => unreachable!(),
    };
    fin.state = BuildState::Succeeded as i32;
    let s = good.send_acked(BoxMsg::Update(fin)).await;
    good.wait_ack(s, WAIT).await.unwrap();
    let b = client
        .get_build(GetBuildRequest { id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.state, BuildState::Succeeded as i32, "{b:?}");
    // No log chunk of the attackers' reached the good build (the good box sent none).
    let mut logs = client
        .stream_logs(StreamLogsRequest {
            build_id: b.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(chunk) = logs.message().await.unwrap() {
        // Only the control plane's own lines (an attacker may label a chunk System too).
        assert!(
            chunk.stream == LogStream::System as i32 && chunk.data.starts_with(b"hive: "),
            "{chunk:?}"
        );
    }
    let health = client
        .health(hive_proto::v1::HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(health.ok, "{health:?}");
    handle.shutdown().await;
    db.drop_db().await;
}

/// A hello for network `corp`: the real one, or one field of it broken.
fn random_hello(r: &mut Rand, token: &str, key: &str) -> hive_proto::v1::ConnectorHello {
    let mut h = hive_proto::v1::ConnectorHello {
        network: "corp".into(),
        public_key: key.into(),
        endpoint: "198.18.0.50:51820".into(),
        token: token.into(),
        peers: (0..r.below(3)).map(|_| r.text(50)).collect(),
        version: r.text(20),
    };
    match r.below(8) {
        0 => h.token = r.text(60),
        1 => h.token.push_str(&r.text(4)),
        2 => h.network = r.text(20),
        3 => h.public_key = r.text(60),
        4 => h.token = String::new(),
        5 => h.peers = (0..r.below(2000)).map(|_| r.text(60)).collect(),
        _ => {}
    }
    h
}

/// One random message a connector might send once its session is open.
fn random_connector_message(
    r: &mut Rand,
    token: &str,
    key: &str,
) -> hive_proto::v1::ConnectorMessage {
    use hive_proto::v1::connector_message::Msg;
    use hive_proto::v1::{ConnectorStatus, PeerApplied, PeerStatus};
    let msg = match r.below(10) {
        0..=3 => Some(Msg::Applied(PeerApplied {
            command_id: if r.next().is_multiple_of(2) {
                r.below(50)
            } else {
                r.next()
            },
            error: r.text(300),
        })),
        4..=7 => Some(Msg::Status(ConnectorStatus {
            peers: (0..r.below(50))
                .map(|_| PeerStatus {
                    public_key: r.text(60),
                    last_handshake_ms: r.next() as i64,
                    rx_bytes: r.next(),
                    tx_bytes: r.next(),
                })
                .collect(),
        })),
        8 => Some(Msg::Hello(random_hello(r, token, key))),
        _ => None,
    };
    hive_proto::v1::ConnectorMessage { seq: r.next(), msg }
}

/// Opens a connector session whose first message is `first`: the commands, or the refusal.
async fn connector_session(
    handle: &hive_control_plane::server::Handle,
    first: hive_proto::v1::ConnectorMessage,
) -> (
    tokio::sync::mpsc::Sender<hive_proto::v1::ConnectorMessage>,
    Result<tonic::Streaming<hive_proto::v1::ConnectorCommand>, tonic::Status>,
) {
    use hive_proto::v1::connector_client::ConnectorClient;
    let mut client = ConnectorClient::connect(format!("http://{}", handle.grpc_addr))
        .await
        .expect("connect Connector");
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(first).await.unwrap();
    let r = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(tonic::Response::into_inner);
    (tx, r)
}

/// Connector sessions (the customer's side of a private network, as hostile as any caller):
/// 60 sessions open with a hello that is real or broken one field at a time, or with no hello
/// at all, then send random applies (unknown and foreign command ids), statuses (thousands of
/// junk keys, extreme counters), second hellos and empty messages. A refusal names the
/// problem and is never an internal error; the control plane stays healthy; and at the end the
/// real connector opens its session and gets its peer set first, as always.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_sessions_survive_hostile_messages() {
    use base64::Engine as _;
    use hive_proto::v1::connector_command::Cmd;
    use hive_proto::v1::connector_message::Msg;
    use hive_proto::v1::{AddConnectorRequest, CreateNetworkRequest, HealthRequest};
    let db = hive_testkit::TestDb::sqlite();
    let handle = start(&db.url).await;
    let mut client = api(&handle).await;
    client
        .create_network(CreateNetworkRequest {
            name: "corp".into(),
            prefixes: vec!["10.20.0.0/16".into()],
            tunnel_subnet: String::new(),
        })
        .await
        .unwrap();
    let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let token = client
        .add_connector(AddConnectorRequest {
            network: "corp".into(),
            endpoint: "198.18.0.50:51820".into(),
            public_key: key.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut r = Rand(0x6b65_7973);
    let (mut opened, mut refused) = (0, 0);
    for round in 0..60 {
        let first = match r.below(6) {
            0 => random_connector_message(&mut r, &token, &key),
            _ => hive_proto::v1::ConnectorMessage {
                seq: r.next(),
                msg: Some(Msg::Hello(random_hello(&mut r, &token, &key))),
            },
        };
        let (tx, session) = connector_session(&handle, first.clone()).await;
        match session {
            Ok(mut commands) => {
                opened += 1;
                let sync = tokio::time::timeout(WAIT, commands.message())
                    .await
                    .expect("a command within the wait");
                assert!(
                    matches!(sync, Ok(Some(ref c)) if matches!(c.cmd, Some(Cmd::Sync(_)))),
                    "round {round}: an open session's first command is not the peer set: {sync:?}"
                );
                for _ in 0..r.below(20) {
                    if tx
                        .send(random_connector_message(&mut r, &token, &key))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
            Err(status) => {
                refused += 1;
                assert!(
                    !matches!(status.code(), tonic::Code::Internal | tonic::Code::Unknown),
                    "round {round}: {first:?} got an internal error: {status}"
                );
                assert!(
                    !status.message().is_empty(),
                    "round {round}: a refusal without a reason"
                );
            }
        }
        drop(tx);
        client
            .health(HealthRequest {})
            .await
            .unwrap_or_else(|e| panic!("round {round}: control plane unhealthy: {e}"));
    }
    println!("connector fuzz: {opened} sessions opened, {refused} refused");
    assert!(
        opened >= 10 && refused >= 10,
        "the rounds should both open and be refused: {opened} opened, {refused} refused"
    );
    // The real connector is still welcome, and gets its network's peer set first.
    let (_tx, session) = connector_session(
        &handle,
        hive_proto::v1::ConnectorMessage {
            seq: 1,
            msg: Some(Msg::Hello(hive_proto::v1::ConnectorHello {
                network: "corp".into(),
                public_key: key.clone(),
                endpoint: "198.18.0.50:51820".into(),
                token: token.clone(),
                ..Default::default()
            })),
        },
    )
    .await;
    let first = tokio::time::timeout(
        WAIT,
        session.expect("the real connector's session").message(),
    )
    .await
    .expect("the peer set within the wait")
    .expect("the stream")
    .expect("a command");
    match first.cmd {
        Some(Cmd::Sync(s)) => assert_eq!(s.prefixes, vec!["10.20.0.0/16".to_string()]),
        other => panic!("first command is not the peer set: {other:?}"),
    }
    handle.shutdown().await;
    db.drop_db().await;
}
