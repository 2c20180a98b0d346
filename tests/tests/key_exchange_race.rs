//! Issue 5, key exchange races (f89d89f), against the real control plane over real gRPC on
//! SQLite and PostgreSQL. The test is both sides of the exchange: the box (`FakeBox` on
//! `BoxAgent.Session`, sending `KeyExchangeRequest`s) and the connector (its own
//! `Connector.Session`, answering every `AddPeer` with `PeerApplied` by hand), so it decides
//! when a peer is "applied" and sees every command the control plane sends down.
//!
//! - a re-sent request (same build, lease and key) waits for the first exchange: the connector
//!   sees one `AddPeer` until it answers it, then the second; both replies carry the same
//!   tunnel address and the lease stays active;
//! - the repeated request's `AddPeer` failing answers that request with an error but leaves
//!   the lease active and sends no `RemovePeer` (only a freshly issued lease is burnt);
//! - a build cancelled while the connector holds the `AddPeer`: once the peer is applied the
//!   control plane removes it again and the box gets an error, not a tunnel.

use std::time::Duration;

use hive_proto::v1::connector_client::ConnectorClient;
use hive_proto::v1::connector_command::Cmd;
use hive_proto::v1::connector_message::Msg;
use hive_proto::v1::{
    AddPeer, Assignment, BuildState, CancelBuildRequest, ConnectorCommand, ConnectorHello,
    ConnectorMessage, KeyExchangeRequest, ListTunnelLeasesRequest, PeerApplied, RemovePeer,
    TunnelLease,
};
use hive_testkit::fakebox::{FakeBox, FakeBoxConfig};
use hive_tests::controlplane::{Backend, ControlPlaneOptions, TestHive};
use serde_json::Value;
use tokio::sync::mpsc;

/// Generous wait for something that must happen.
const T: Duration = Duration::from_secs(5);
/// How long "nothing more arrives" is watched for. A command the control plane sends without
/// waiting for anything (a raced second `AddPeer`, a `RemovePeer`) is on the stream within a
/// few milliseconds; the revoker's pass is every 500 ms, so this covers it too.
const QUIET: Duration = Duration::from_millis(1200);
const REV: &str = "9fceb02d0ae598e95dc970b74767f19372d61af8";

hive_testkit::on_both!(
    a_resent_request_waits_for_the_first_exchange,
    a_failed_repeat_leaves_the_active_lease_alone,
    a_peer_applied_after_its_build_ended_is_removed_again,
);

fn ctl_json(h: &TestHive, args: &[&str]) -> Value {
    let mut full = args.to_vec();
    full.push("--json");
    let out = h.cp.hivectl(&full).expect("run hivectl");
    assert!(
        out.status.success(),
        "hivectl {args:?}: {}\ncontrol plane log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        h.cp.log()
    );
    serde_json::from_slice(&out.stdout).expect("hivectl printed JSON")
}

/// The test's own connector: a `Connector.Session` whose commands the test reads one by one
/// and answers by hand.
struct HandConnector {
    tx: mpsc::Sender<ConnectorMessage>,
    rx: tonic::Streaming<ConnectorCommand>,
    seq: u64,
}

impl HandConnector {
    async fn connect(h: &TestHive, token: &str, public_key: &str) -> Self {
        let mut client = ConnectorClient::connect(h.cp.grpc_url())
            .await
            .expect("connect Connector");
        let (tx, rx) = mpsc::channel(16);
        tx.send(ConnectorMessage {
            seq: 1,
            msg: Some(Msg::Hello(ConnectorHello {
                network: "corp".into(),
                public_key: public_key.into(),
                endpoint: "198.18.0.50:51820".into(),
                token: token.into(),
                version: "key_exchange_race".into(),
                ..Default::default()
            })),
        })
        .await
        .expect("send hello");
        let rx = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("Connector.Session")
            .into_inner();
        let mut c = Self { tx, rx, seq: 1 };
        match c.next(T).await {
            Some(Cmd::Sync(s)) => assert!(s.peers.is_empty(), "{s:?}"),
            other => panic!("first connector command {other:?}"),
        }
        c
    }

    /// The next command within `within` (its id kept for [`Self::applied`]), or `None`.
    async fn next_cmd(&mut self, within: Duration) -> Option<ConnectorCommand> {
        match tokio::time::timeout(within, self.rx.message()).await {
            Err(_) => None,
            Ok(Ok(Some(c))) => Some(c),
            Ok(other) => panic!("connector session ended: {other:?}"),
        }
    }

    async fn next(&mut self, within: Duration) -> Option<Cmd> {
        self.next_cmd(within).await.and_then(|c| c.cmd)
    }

    /// The next command, which must be an `AddPeer`: (command id, peer).
    async fn expect_add(&mut self, h: &TestHive) -> (u64, AddPeer) {
        match self.next_cmd(T).await {
            Some(ConnectorCommand {
                id,
                cmd: Some(Cmd::AddPeer(p)),
            }) => (id, p),
            other => panic!(
                "expected an AddPeer, got {other:?}\ncontrol plane log:\n{}",
                h.cp.log()
            ),
        }
    }

    /// The next command, which must be a `RemovePeer`.
    async fn expect_remove(&mut self, h: &TestHive) -> RemovePeer {
        match self.next(T).await {
            Some(Cmd::RemovePeer(p)) => p,
            other => panic!(
                "expected a RemovePeer, got {other:?}\ncontrol plane log:\n{}",
                h.cp.log()
            ),
        }
    }

    /// Asserts that no command arrives for [`QUIET`].
    async fn expect_quiet(&mut self, h: &TestHive, why: &str) {
        if let Some(c) = self.next_cmd(QUIET).await {
            panic!("{why}: got {c:?}\ncontrol plane log:\n{}", h.cp.log());
        }
    }

    /// `PeerApplied` for command `id` (`error` empty = applied).
    async fn applied(&mut self, id: u64, error: &str) {
        self.seq += 1;
        self.tx
            .send(ConnectorMessage {
                seq: self.seq,
                msg: Some(Msg::Applied(PeerApplied {
                    command_id: id,
                    error: error.into(),
                })),
            })
            .await
            .expect("send PeerApplied");
    }
}

/// A control plane with network `corp`, its (hand-driven) connector connected, a fake box,
/// and one private-network build accepted by that box.
struct Setup {
    h: TestHive,
    fb: FakeBox,
    conn: HandConnector,
    a: Assignment,
}

async fn setup(backend: Backend, test: &str) -> Option<Setup> {
    // The box side is a FakeBox without a certificate: on the loopback gRPC listener.
    let opts = ControlPlaneOptions {
        extra_args: vec!["--insecure-boxes".into()],
        ..ControlPlaneOptions::default()
    };
    let h = TestHive::start(backend, test, opts).await?;
    ctl_json(&h, &["network", "add", "corp", "--prefix", "10.20.0.0/16"]);
    let connector_key = hive_wg::KeyPair::generate().public().to_base64();
    let added = ctl_json(
        &h,
        &[
            "connector",
            "add",
            "corp",
            "--endpoint",
            "198.18.0.50:51820",
            "--public-key",
            &connector_key,
        ],
    );
    let token = added["token"].as_str().expect("token").to_string();
    let conn = HandConnector::connect(&h, &token, &connector_key).await;
    ctl_json(
        &h,
        &[
            "project",
            "add",
            "p",
            "--repo",
            "git://10.20.0.10/private.git",
            "--secret",
            "s",
            "--step",
            "true",
            "--private-network",
            "corp",
        ],
    );
    let mut fb = FakeBox::connect(
        &h.cp.grpc_url(),
        FakeBoxConfig::new("box-kx", "small", 1, 1),
    )
    .await
    .unwrap_or_else(|e| panic!("fake box: {e}\nlog:\n{}", h.cp.log()));
    let b = ctl_json(
        &h,
        &["submit", "p", "--rev", REV, "--ref", "refs/heads/main"],
    );
    let id = b["id"].as_str().expect("build id").to_string();
    let a = fb
        .next_assignment(T)
        .await
        .unwrap_or_else(|e| panic!("assignment: {e}\nlog:\n{}", h.cp.log()));
    assert_eq!(a.build_id, id);
    assert_eq!(a.private_network, "corp");
    fb.accept(&a, "cell-kx", true).await;
    fb.wait_all_acked(T).await.expect("accept acked");
    Some(Setup { h, fb, conn, a })
}

fn request(a: &Assignment, key: &str) -> KeyExchangeRequest {
    KeyExchangeRequest {
        build_id: a.build_id.clone(),
        lease_id: a.lease_id.clone(),
        cell_id: "cell-kx".into(),
        cell_public_key: key.into(),
    }
}

async fn leases(h: &TestHive, build_id: &str) -> Vec<TunnelLease> {
    hive_tests::controlplane::api(&h.cp.grpc_url())
        .await
        .expect("connect ControlPlane")
        .list_tunnel_leases(ListTunnelLeasesRequest {
            network: String::new(),
            build_id: build_id.into(),
        })
        .await
        .expect("ListTunnelLeases")
        .into_inner()
        .leases
}

/// The build's one lease, which must be for `key` and in `state`.
async fn assert_one_lease(h: &TestHive, build_id: &str, key: &str, state: &str) -> TunnelLease {
    let mine = leases(h, build_id).await;
    assert_eq!(
        mine.len(),
        1,
        "{mine:?}\ncontrol plane log:\n{}",
        h.cp.log()
    );
    assert_eq!(mine[0].public_key, key);
    assert_eq!(
        mine[0].state,
        state,
        "{mine:?}\ncontrol plane log:\n{}",
        h.cp.log()
    );
    mine[0].clone()
}

/// (a) Two identical requests back to back: the second exchange waits for the first, so the
/// connector never has two `AddPeer`s for one key outstanding.
async fn a_resent_request_waits_for_the_first_exchange(backend: Backend) {
    let Some(Setup {
        h,
        mut fb,
        mut conn,
        a,
    }) = setup(backend, "kx_resent_request_waits").await
    else {
        return;
    };
    let key = hive_wg::KeyPair::generate().public().to_base64();
    let req = request(&a, &key);
    fb.key_exchange(req.clone()).await;
    fb.key_exchange(req).await;
    fb.wait_all_acked(T).await.expect("both requests acked");

    let (first_id, first) = conn.expect_add(&h).await;
    assert_eq!(first.public_key, key);
    assert_eq!(first.build_id, a.build_id);
    assert_eq!(first.tunnel_address, "10.250.0.2/32");
    // Held: the re-sent request must not reach the connector meanwhile.
    conn.expect_quiet(
        &h,
        "a second command (AddPeer) came while the first AddPeer was unanswered: \
         the two exchanges of one key raced",
    )
    .await;
    let e = fb
        .expect_key_exchange_reply(&a.build_id, Duration::from_millis(10))
        .await;
    assert!(e.is_err(), "answered before the connector applied: {e:?}");

    conn.applied(first_id, "").await;
    let r1 = fb
        .expect_key_exchange_reply(&a.build_id, T)
        .await
        .unwrap_or_else(|e| panic!("first reply: {e}\nlog:\n{}", h.cp.log()));
    assert_eq!(r1.error, "", "{r1:?}");
    assert_eq!(r1.tunnel_address, "10.250.0.2/24");

    // Now the second exchange runs: the same lease found again, the same peer re-applied.
    let (second_id, second) = conn.expect_add(&h).await;
    assert_ne!(second_id, first_id);
    assert_eq!(second, first);
    conn.applied(second_id, "").await;
    let r2 = fb
        .expect_key_exchange_reply(&a.build_id, T)
        .await
        .unwrap_or_else(|e| panic!("second reply: {e}\nlog:\n{}", h.cp.log()));
    assert_eq!(r2.error, "", "{r2:?}");
    assert_eq!(r2.tunnel_address, r1.tunnel_address);
    assert_eq!(r2.connector_public_key, r1.connector_public_key);
    assert_eq!(r2.lease_id, a.lease_id);

    let lease = assert_one_lease(&h, &a.build_id, &key, "active").await;
    assert_eq!(lease.tunnel_address, "10.250.0.2/24");
    assert!(
        h.cp.log()
            .contains("repeated key exchange request answered again"),
        "{}",
        h.cp.log()
    );
    conn.expect_quiet(&h, "nothing more after both exchanges")
        .await;
    assert_one_lease(&h, &a.build_id, &key, "active").await;
    h.finish().await;
}

/// (b) The first exchange succeeded; the repeated one's `AddPeer` fails. That request gets an
/// error, but the lease the cell already uses is not revoked and no `RemovePeer` goes out.
async fn a_failed_repeat_leaves_the_active_lease_alone(backend: Backend) {
    let Some(Setup {
        h,
        mut fb,
        mut conn,
        a,
    }) = setup(backend, "kx_failed_repeat").await
    else {
        return;
    };
    let key = hive_wg::KeyPair::generate().public().to_base64();
    let req = request(&a, &key);
    fb.key_exchange(req.clone()).await;
    let (id1, add1) = conn.expect_add(&h).await;
    assert_eq!(add1.public_key, key);
    conn.applied(id1, "").await;
    let r1 = fb
        .expect_key_exchange_reply(&a.build_id, T)
        .await
        .unwrap_or_else(|e| panic!("first reply: {e}\nlog:\n{}", h.cp.log()));
    assert_eq!(r1.error, "", "{r1:?}");
    assert_one_lease(&h, &a.build_id, &key, "active").await;

    fb.key_exchange(req).await;
    let (id2, add2) = conn.expect_add(&h).await;
    assert_eq!(add2, add1);
    conn.applied(id2, "wg: device busy").await;
    let r2 = fb
        .expect_key_exchange_reply(&a.build_id, T)
        .await
        .unwrap_or_else(|e| panic!("second reply: {e}\nlog:\n{}", h.cp.log()));
    assert!(
        r2.error.contains("refused the peer") && r2.error.contains("wg: device busy"),
        "{r2:?}"
    );
    assert_eq!(r2.tunnel_address, "");

    conn.expect_quiet(
        &h,
        "the failed repeat removed the peer of a lease the first exchange gave the cell",
    )
    .await;
    let lease = assert_one_lease(&h, &a.build_id, &key, "active").await;
    assert_eq!(lease.tunnel_address, r1.tunnel_address);
    h.finish().await;
}

/// (c) The build is cancelled while the connector holds the `AddPeer`. The revoker ends the
/// lease meanwhile; once the connector answers "applied", the exchange sees the lease is gone,
/// sends a `RemovePeer` for the key and answers the box with an error.
async fn a_peer_applied_after_its_build_ended_is_removed_again(backend: Backend) {
    let Some(Setup {
        h,
        mut fb,
        mut conn,
        a,
    }) = setup(backend, "kx_applied_after_end").await
    else {
        return;
    };
    let key = hive_wg::KeyPair::generate().public().to_base64();
    fb.key_exchange(request(&a, &key)).await;
    let (id, add) = conn.expect_add(&h).await;
    assert_eq!(add.public_key, key);

    let b = hive_tests::controlplane::api(&h.cp.grpc_url())
        .await
        .expect("connect ControlPlane")
        .cancel_build(CancelBuildRequest {
            id: a.build_id.clone(),
            reason: "key exchange race test".into(),
        })
        .await
        .expect("CancelBuild")
        .into_inner();
    assert_eq!(b.state, BuildState::Cancelled as i32);
    fb.expect_cancel(&a.build_id, T)
        .await
        .expect("cancel reaches the box");
    // The revoker ends the lease and removes the peer (which the connector is still adding).
    let removed = conn.expect_remove(&h).await;
    assert_eq!(removed.public_key, key);
    assert_one_lease(&h, &a.build_id, &key, "revoked").await;

    conn.applied(id, "").await;
    // The peer just applied must not outlive its lease.
    let again = conn.expect_remove(&h).await;
    assert_eq!(again.public_key, key);
    assert_eq!(again.build_id, a.build_id);
    let r = fb
        .expect_key_exchange_reply(&a.build_id, T)
        .await
        .unwrap_or_else(|e| panic!("reply: {e}\nlog:\n{}", h.cp.log()));
    assert!(r.error.contains("not its current lease"), "{r:?}");
    assert_eq!(r.tunnel_address, "");
    conn.expect_quiet(&h, "nothing more after the removal")
        .await;
    assert_one_lease(&h, &a.build_id, &key, "revoked").await;
    h.finish().await;
}
