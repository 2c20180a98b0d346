//! Issue 5, control-plane side, on SQLite and PostgreSQL: `hivectl network|connector` against
//! the real control plane, clear errors for bad input, the connector token shown once and
//! checked on `Connector.Session` (a bad token or a foreign public key is refused; a good one
//! gets its `SyncPeers` with the connector's tunnel address), and nothing secret in listings.
use std::time::Duration;

use hive_proto::v1::connector_client::ConnectorClient;
use hive_proto::v1::connector_command::Cmd;
use hive_proto::v1::connector_message::Msg;
use hive_proto::v1::{ConnectorHello, ConnectorMessage};
use hive_tests::controlplane::{Backend, ControlPlaneOptions, TestHive};
use serde_json::Value;

hive_testkit::on_both!(networks_and_connectors_through_hivectl_and_the_connector_session);

fn ctl(h: &TestHive, args: &[&str]) -> std::process::Output {
    h.cp.hivectl(args).expect("run hivectl")
}

fn ok_json(h: &TestHive, args: &[&str]) -> Value {
    let mut full = args.to_vec();
    full.push("--json");
    let out = ctl(h, &full);
    assert!(
        out.status.success(),
        "hivectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

fn fails_with(h: &TestHive, args: &[&str], needle: &str) {
    let out = ctl(h, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "hivectl {args:?} succeeded");
    assert!(
        err.contains(needle),
        "hivectl {args:?}: {err:?} lacks {needle:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

async fn session(
    h: &TestHive,
    hello: ConnectorHello,
) -> Result<tonic::Streaming<hive_proto::v1::ConnectorCommand>, tonic::Status> {
    let mut client =
        ConnectorClient::new(hive_tests::controlplane::agent_channel(&h.cp.grpc_url()).await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(ConnectorMessage {
        seq: 1,
        msg: Some(Msg::Hello(hello)),
    })
    .await
    .unwrap();
    // Keep the sender alive with the stream: the session ends when it is dropped.
    std::mem::forget(tx);
    client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(|r| r.into_inner())
}

async fn networks_and_connectors_through_hivectl_and_the_connector_session(backend: Backend) {
    let Some(h) =
        TestHive::start(backend, "private_networks", ControlPlaneOptions::default()).await
    else {
        return;
    };
    let n = ok_json(
        &h,
        &[
            "network",
            "add",
            "corp",
            "--prefix",
            "10.20.3.4/16",
            "--prefix",
            "192.168.7.0/24",
        ],
    );
    assert_eq!(
        n["prefixes"],
        serde_json::json!(["10.20.0.0/16", "192.168.7.0/24"])
    );
    assert_eq!(n["tunnel_subnet"], "10.250.0.0/24");
    fails_with(
        &h,
        &["network", "add", "corp", "--prefix", "10.1.0.0/16"],
        "already exists",
    );
    fails_with(
        &h,
        &["network", "add", "x", "--prefix", "10.1.0.0"],
        "10.1.0.0",
    );
    fails_with(&h, &["network", "add", "x", "--prefix", "0.0.0.0/0"], "/0");
    fails_with(
        &h,
        &[
            "network",
            "add",
            "x",
            "--prefix",
            "10.1.0.0/16",
            "--tunnel-subnet",
            "10.1.2.0/24",
        ],
        "overlaps",
    );
    let list = ok_json(&h, &["network", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);

    let key = hive_wg::KeyPair::generate().public().to_base64();
    fails_with(
        &h,
        &[
            "connector",
            "add",
            "nope",
            "--endpoint",
            "198.18.0.50:51820",
            "--public-key",
            &key,
        ],
        "\"nope\" not found",
    );
    fails_with(
        &h,
        &[
            "connector",
            "add",
            "corp",
            "--endpoint",
            "198.18.0.50",
            "--public-key",
            &key,
        ],
        "HOST:PORT",
    );
    fails_with(
        &h,
        &[
            "connector",
            "add",
            "corp",
            "--endpoint",
            "198.18.0.50:51820",
            "--public-key",
            "abc",
        ],
        "public key",
    );
    let added = ok_json(
        &h,
        &[
            "connector",
            "add",
            "corp",
            "--endpoint",
            "198.18.0.50:51820",
            "--public-key",
            &key,
        ],
    );
    let token = added["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("hct_"));
    let listed = ok_json(&h, &["connector", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["public_key"], key.as_str());
    assert_eq!(listed[0]["connected"], false);
    assert!(
        !listed.to_string().contains(&token),
        "token shown again: {listed}"
    );

    // Projects must name an existing network.
    fails_with(
        &h,
        &[
            "project",
            "add",
            "p",
            "--repo",
            "git://x/y.git",
            "--secret",
            "s",
            "--step",
            "true",
            "--private-network",
            "nope",
        ],
        "\"nope\" does not exist",
    );
    ok_json(
        &h,
        &[
            "project",
            "add",
            "p",
            "--repo",
            "git://x/y.git",
            "--secret",
            "s",
            "--step",
            "true",
            "--private-network",
            "corp",
        ],
    );
    fails_with(&h, &["network", "rm", "corp"], "used by project");

    // The session: wrong token, wrong key refused; the right pair gets its SyncPeers.
    let hello = |token: &str, key: &str| ConnectorHello {
        network: "corp".into(),
        public_key: key.into(),
        token: token.into(),
        ..Default::default()
    };
    // Over plaintext the connector service is not even there: its token never crosses the
    // network in the clear (issue 10).
    let mut plain = ConnectorClient::connect(h.cp.grpc_url()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(ConnectorMessage {
        seq: 1,
        msg: Some(Msg::Hello(hello(&token, &key))),
    })
    .await
    .unwrap();
    let e = plain
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
    let e = session(&h, hello("hct_wrong", &key)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let other = hive_wg::KeyPair::generate().public().to_base64();
    let e = session(&h, hello(&token, &other)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let mut s = session(&h, hello(&token, &key)).await.expect("session");
    let first = tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match first.cmd {
        Some(Cmd::Sync(sync)) => {
            assert_eq!(sync.connector_address, "10.250.0.1/24");
            assert!(sync.peers.is_empty());
            assert_eq!(sync.prefixes, vec!["10.20.0.0/16", "192.168.7.0/24"]);
        }
        other => panic!("first command {other:?}"),
    }
    let listed = ok_json(&h, &["connector", "list", "--network", "corp"]);
    assert_eq!(listed[0]["connected"], true);
    let id = listed[0]["id"].as_str().unwrap().to_string();
    ok_json(&h, &["connector", "rm", &id]);
    // Removing it ends its session.
    let ended = tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .unwrap();
    assert!(matches!(ended, Ok(None) | Err(_)), "{ended:?}");
    ok_json(&h, &["project", "rm", "p"]);
    ok_json(&h, &["network", "rm", "corp"]);
    assert!(ok_json(&h, &["network", "list"])
        .as_array()
        .unwrap()
        .is_empty());
}
