//! Issue 10: boxes are who their certificate says, and nobody else gets in. Each case plays the
//! attacker against a real control plane's TLS box listener, on SQLite and PostgreSQL: a
//! session with no certificate, a certificate from another CA, a box registering under
//! another box's id, a join token used twice / expired / from another control plane / for
//! another box, joining as a box that already has a certificate, a revoked box (its live
//! session ends, it cannot reconnect or renew), and the roles allowed to make tokens and revoke.

mod common;

use std::time::Duration;

use common::{api, api_as, pool, start_with};
use hive_control_plane::server::Handle;
use hive_proto::v1::box_agent_client::BoxAgentClient;
use hive_proto::v1::box_message::Msg as BoxMsg;
use hive_proto::v1::control_message::Msg as CtlMsg;
use hive_proto::v1::{
    BoxActionRequest, BoxMessage, ControlMessage, CreateJoinTokenRequest, CreateTokenRequest,
    JoinReply, JoinRequest, Register, RenewCertificateRequest,
};
use rcgen::{CertificateParams, DnType, KeyPair};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(10);

/// A control plane whose only way in for boxes is the TLS box listener.
async fn secure(url: &str) -> Handle {
    start_with(url, |c| c.insecure_boxes = false).await
}

/// A box's own key and a certificate signing request for it.
fn key_and_csr(cn: &str) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    let csr = p.serialize_request(&key).unwrap();
    (key, csr.der().to_vec())
}

/// A TLS channel to the box listener, trusting `ca_pem`, with a client identity or none.
async fn channel(h: &Handle, ca_pem: &str, id: Option<Identity>) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(id) = id {
        tls = tls.identity(id);
    }
    Endpoint::from_shared(format!("https://127.0.0.1:{}", h.box_addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn join_token(h: &Handle, box_id: &str, ttl_secs: u64) -> String {
    api(h)
        .await
        .create_join_token(CreateJoinTokenRequest {
            ttl_secs,
            box_id: box_id.to_string(),
        })
        .await
        .expect("admin makes a join token")
        .into_inner()
        .token
}

async fn join(
    h: &Handle,
    token: &str,
    box_id: &str,
) -> Result<(KeyPair, JoinReply), tonic::Status> {
    let (key, csr_der) = key_and_csr(box_id);
    let ch = channel(h, h.ca_pem(), None)
        .await
        .expect("TLS to the box listener");
    let r = BoxAgentClient::new(ch)
        .join(JoinRequest {
            token: token.to_string(),
            box_id: box_id.to_string(),
            csr_der,
        })
        .await?
        .into_inner();
    Ok((key, r))
}

/// Opens a session with `identity` and registers as `box_id`: Ok(stream) once Registered.
async fn session(
    h: &Handle,
    identity: Option<Identity>,
    box_id: &str,
) -> Result<tonic::Streaming<ControlMessage>, tonic::Status> {
    let ch = channel(h, h.ca_pem(), identity)
        .await
        .map_err(tonic::Status::unavailable)?;
    let (tx, rx) = mpsc::channel(16);
    tx.send(BoxMessage {
        seq: 0,
        msg: Some(BoxMsg::Register(Register {
            box_id: box_id.to_string(),
            hostname: "attacker.test".into(),
            backend: "sandbox".into(),
            pools: vec![pool("small", 1, 2)],
            running_builds: vec![],
            version: "test".into(),
        })),
    })
    .await
    .unwrap();
    let mut inbound = BoxAgentClient::new(ch)
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    // Keep the sender alive with the stream: dropping it would end the session.
    std::mem::forget(tx);
    match tokio::time::timeout(WAIT, inbound.message()).await {
        Ok(Ok(Some(ControlMessage {
            msg: Some(CtlMsg::Registered(_)),
        }))) => Ok(inbound),
        Ok(Err(s)) => Err(s),
        other => panic!("no Registered: {other:?}"),
    }
}

fn identity(key: &KeyPair, reply: &JoinReply) -> Identity {
    Identity::from_pem(&reply.certificate_pem, key.serialize_pem())
}

hive_testkit::on_both!(db => a_joined_box_is_its_certificate_and_nobody_else);

async fn a_joined_box_is_its_certificate_and_nobody_else(url: String) {
    let h = secure(&url).await;

    // No certificate: refused, saying how to join.
    let e = session(&h, None, "box-a").await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("join-token"), "{}", e.message());

    // The API listener does not serve boxes at all without --insecure-boxes.
    let plain = Endpoint::from_shared(format!("http://{}", h.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(1);
    drop(tx);
    let e = BoxAgentClient::new(plain)
        .session(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");

    // Join: the certificate names the box the token was used for, not what the CSR says.
    let token = join_token(&h, "", 600).await;
    let (key_a, a) = join(&h, &token, "box-a").await.expect("join");
    assert_eq!(a.box_id, "box-a");
    assert_eq!(a.ca_pem, h.ca_pem());
    let id_a = identity(&key_a, &a);
    let s = session(&h, Some(id_a.clone()), "box-a")
        .await
        .expect("box-a registers as itself");

    // The same token again: one use only, whoever tries.
    let e = join(&h, &token, "box-b").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("already used"), "{}", e.message());

    // box-a's certificate cannot register as box-b (taking over its assignments).
    let e = session(&h, Some(id_a.clone()), "box-b").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("box-a") && e.message().contains("box-b"),
        "{}",
        e.message()
    );

    // A fresh token cannot be used to become box-a, which holds a certificate in force.
    let t2 = join_token(&h, "", 600).await;
    let e = join(&h, &t2, "box-a").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("revoke"), "{}", e.message());
    // ... and a token bound to box-c is for box-c only.
    let t3 = join_token(&h, "box-c", 600).await;
    let e = join(&h, &t3, "box-d").await.unwrap_err();
    assert!(e.message().contains("box-c"), "{}", e.message());
    let (key_c, c) = join(&h, &t3, "box-c")
        .await
        .expect("box-c joins with its own token");
    session(&h, Some(identity(&key_c, &c)), "box-c")
        .await
        .expect("box-c registers");
    // A second token made for box-c moves the id to a new machine: the old one is out.
    let t3b = join_token(&h, "box-c", 600).await;
    let (key_c2, c2) = join(&h, &t3b, "box-c").await.expect("box-c moves");
    let e = session(&h, Some(identity(&key_c, &c)), "box-c")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    session(&h, Some(identity(&key_c2, &c2)), "box-c")
        .await
        .expect("the new box-c registers");

    // Expired, malformed, and another control plane's tokens.
    let t4 = join_token(&h, "", 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let e = join(&h, &t4, "box-e").await.unwrap_err();
    assert!(e.message().contains("expired"), "{}", e.message());
    let e = join(&h, "hjt1.nonsense", "box-e").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut forged: hive_types::JoinToken = t2.parse().unwrap();
    forged.secret = "0".repeat(32);
    let e = join(&h, &forged.to_string(), "box-e").await.unwrap_err();
    assert!(
        e.message().contains("unknown join token"),
        "{}",
        e.message()
    );
    let other_db = if url.starts_with("sqlite:") {
        hive_testkit::TestDb::sqlite()
    } else {
        hive_testkit::TestDb::postgres("box_auth_other")
            .await
            .expect("the PostgreSQL this test runs on")
    };
    let other = secure(&other_db.url).await;
    let foreign = join_token(&other, "", 600).await;
    let e = join(&h, &foreign, "box-e").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("another CA"), "{}", e.message());

    // A certificate from another control plane's CA does not get through TLS.
    let t5 = join_token(&other, "", 600).await;
    let (key_x, x) = join(&other, &t5, "box-a")
        .await
        .expect("join the other control plane");
    let e = session(&h, Some(identity(&key_x, &x)), "box-a")
        .await
        .unwrap_err();
    // The TLS layer refuses it: the connection closes (how the client words that depends on
    // when in the handshake it notices), never Registered.
    assert!(
        matches!(
            e.code(),
            Code::Unavailable | Code::Unknown | Code::Unauthenticated | Code::Cancelled
        ),
        "{e:?}"
    );
    other.shutdown().await;
    other_db.drop_db().await;

    // Renewal: a new certificate for the same box, which works, once a third of the
    // certificate's life is left (here: its record made 29 of its 30 days old).
    age_certs(&url, "box-a").await;
    let (key_r, csr) = key_and_csr("whatever");
    let ch = channel(&h, h.ca_pem(), Some(id_a.clone())).await.unwrap();
    let renewed = BoxAgentClient::new(ch)
        .renew_certificate(RenewCertificateRequest { csr_der: csr })
        .await
        .expect("renew")
        .into_inner();
    assert_eq!(renewed.box_id, "box-a");
    let id_a2 = identity(&key_r, &renewed);

    // Revoke box-a (admin only): its live session ends; neither certificate gets back in.
    let mut s = s;
    let read_only = api(&h)
        .await
        .create_token(CreateTokenRequest {
            role: "operator".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let e = api_as(&h, &read_only)
        .await
        .revoke_box(BoxActionRequest {
            box_id: "box-a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = api_as(&h, &read_only)
        .await
        .create_join_token(CreateJoinTokenRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let n = api(&h)
        .await
        .revoke_box(BoxActionRequest {
            box_id: "box-a".into(),
        })
        .await
        .expect("admin revokes")
        .into_inner()
        .certificates;
    assert_eq!(n, 2, "the joined and the renewed certificate");
    let ended =
        tokio::time::timeout(WAIT, async { while let Ok(Some(_)) = s.message().await {} }).await;
    assert!(ended.is_ok(), "the revoked box's session did not end");
    for id in [id_a.clone(), id_a2] {
        let e = session(&h, Some(id), "box-a").await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("revoked"), "{}", e.message());
    }
    let ch = channel(&h, h.ca_pem(), Some(id_a)).await.unwrap();
    let (_, csr) = key_and_csr("box-a");
    let e = BoxAgentClient::new(ch)
        .renew_certificate(RenewCertificateRequest { csr_der: csr })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // The id can be given to a new machine only on purpose: a token bound to it.
    let t6 = join_token(&h, "box-a", 600).await;
    let (k, r) = join(&h, &t6, "box-a")
        .await
        .expect("rejoin with a bound token");
    session(&h, Some(identity(&k, &r)), "box-a")
        .await
        .expect("the new box-a registers");

    // Every step is in the audit log.
    let audit = api(&h)
        .await
        .list_audit(hive_proto::v1::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    for action in ["CreateJoinToken", "JoinBox", "RevokeBox"] {
        assert!(
            audit.iter().any(|e| e.action == action),
            "no {action} in the audit log"
        );
    }
    h.shutdown().await;
}

#[tokio::test]
async fn insecure_boxes_only_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let e = hive_control_plane::server::start(hive_control_plane::server::Config {
        data_dir: dir.path().to_path_buf(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        grpc_addr: "0.0.0.0:0".parse().unwrap(),
        box_addr: "127.0.0.1:0".parse().unwrap(),
        insecure_boxes: true,
        ..Default::default()
    })
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--insecure-boxes") && e.contains("loopback"),
        "{e}"
    );
}

hive_testkit::on_both!(db => a_plaintext_session_cannot_speak_for_a_joined_box);

/// With `--insecure-boxes` (loopback, tests), a plaintext session still cannot take the id of a
/// box that joined with a certificate.
async fn a_plaintext_session_cannot_speak_for_a_joined_box(url: String) {
    let h = start_with(&url, |c| c.insecure_boxes = true).await;
    let token = join_token(&h, "", 600).await;
    join(&h, &token, "box-p").await.expect("join");
    let plain = Endpoint::from_shared(format!("http://{}", h.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(BoxMessage {
        seq: 0,
        msg: Some(BoxMsg::Register(Register {
            box_id: "box-p".into(),
            hostname: "impostor".into(),
            backend: "sandbox".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let r = BoxAgentClient::new(plain)
        .session(ReceiverStream::new(rx))
        .await;
    let e = match r {
        Err(e) => e,
        Ok(s) => match s.into_inner().message().await {
            Err(e) => e,
            other => panic!("a plaintext session took a joined box's id: {other:?}"),
        },
    };
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    drop(tx);
    h.shutdown().await;
}

/// Makes `box_id`'s certificate records 29 days into a 30-day life (what the renewal check
/// reads), as if the box had run that long.
async fn age_certs(url: &str, box_id: &str) {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    let now = hive_sys::now_ms() as i64;
    let day = 86_400_000i64;
    sqlx::query("UPDATE box_certs SET issued_at_ms = $1, not_after_ms = $2 WHERE box_id = $3")
        .bind(now - 29 * day)
        .bind(now + day)
        .bind(box_id)
        .execute(&mut conn)
        .await
        .unwrap();
}

hive_testkit::on_both!(db => join_checks_the_token_first_and_renewal_waits_for_its_time);

/// A caller without a usable join token gets nothing parsed or signed (it is told about the
/// token, not about its request); a box cannot mint itself fresh certificates at will: a
/// renewal while more than a third of the life is left is refused, saying when it is due.
async fn join_checks_the_token_first_and_renewal_waits_for_its_time(url: String) {
    let h = secure(&url).await;
    let token = join_token(&h, "", 600).await;
    let (key, reply) = join(&h, &token, "box-r").await.expect("joins");
    // The token again (used), with a request that is not a CSR at all.
    let ch = channel(&h, h.ca_pem(), None).await.unwrap();
    let e = BoxAgentClient::new(ch)
        .join(JoinRequest {
            token: token.clone(),
            box_id: "box-r2".into(),
            csr_der: b"not a certificate request".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("already used"), "{}", e.message());

    // Renewing right after joining: refused, and no certificate recorded.
    let id = identity(&key, &reply);
    let ch = channel(&h, h.ca_pem(), Some(id.clone())).await.unwrap();
    let (_, csr) = key_and_csr("box-r");
    let e = BoxAgentClient::new(ch.clone())
        .renew_certificate(RenewCertificateRequest { csr_der: csr })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("a third") && e.message().contains("box-r"),
        "{}",
        e.message()
    );
    // When it is due, it is renewed.
    age_certs(&url, "box-r").await;
    let (_, csr) = key_and_csr("box-r");
    let renewed = BoxAgentClient::new(ch)
        .renew_certificate(RenewCertificateRequest { csr_der: csr })
        .await
        .expect("renewal when due")
        .into_inner();
    assert_eq!(renewed.box_id, "box-r");
    h.shutdown().await;
}

hive_testkit::on_both!(db => join_tokens_are_listed_revoked_and_purged);

/// An admin sees the join tokens (never a secret) and withdraws one that leaked before a box
/// used it: the box that tries it is refused. Only admins list or revoke, each revocation is
/// audited, and retention deletes used and expired tokens and expired or revoked certificates
/// (a purged revoked certificate stays refused).
async fn join_tokens_are_listed_revoked_and_purged(url: String) {
    use hive_proto::v1::{ListAuditRequest, ListJoinTokensRequest, RevokeJoinTokenRequest};
    let h = secure(&url).await;
    let mut admin = api(&h).await;
    let leaked = join_token(&h, "", 600).await;
    let good = join_token(&h, "box-j", 600).await;
    let listed = admin
        .list_join_tokens(ListJoinTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(listed.len(), 2);
    let shown = format!("{listed:?}");
    for t in [&leaked, &good] {
        let secret = t.split('.').nth(2).unwrap();
        assert!(!shown.contains(secret), "a token's secret was listed");
    }
    let leaked_id = leaked.split('.').nth(1).unwrap().to_string();
    assert!(listed
        .iter()
        .any(|t| t.id == leaked_id && t.used_at_ms == 0));

    // An operator may neither list nor revoke.
    let operator = admin
        .create_token(CreateTokenRequest {
            role: "operator".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut op = api_as(&h, &operator).await;
    let e = op
        .list_join_tokens(ListJoinTokensRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = op
        .revoke_join_token(RevokeJoinTokenRequest {
            id: leaked_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Revoked (by the whole token, as pasted): whoever holds it cannot join.
    admin
        .revoke_join_token(RevokeJoinTokenRequest { id: leaked.clone() })
        .await
        .expect("admin revokes");
    let Err(e) = join(&h, &leaked, "box-thief").await else {
        panic!("a revoked join token let a box in")
    };
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = admin
        .revoke_join_token(RevokeJoinTokenRequest {
            id: leaked_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // A used token: nothing to revoke, and the message says what would shut the box out.
    let (_, _) = join(&h, &good, "box-j").await.expect("box-j joins");
    let good_id = good.split('.').nth(1).unwrap().to_string();
    let e = admin
        .revoke_join_token(RevokeJoinTokenRequest { id: good_id })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("box revoke box-j"), "{}", e.message());
    let audit = admin
        .list_audit(ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        format!("{audit:?}").contains("RevokeJoinToken"),
        "revocation audited"
    );

    // Retention: box-j revoked; everything used, expired or revoked before the cutoff goes.
    admin
        .revoke_box(BoxActionRequest {
            box_id: "box-j".into(),
        })
        .await
        .unwrap();
    let unused = join_token(&h, "", 600).await;
    let future = hive_sys::now_ms() as i64 + 1000;
    let p = h.store().purge_credentials_before(future).await.unwrap();
    assert_eq!(p.join_tokens, 1, "the used token (the unused one is kept)");
    assert_eq!(p.box_certs, 1, "box-j's revoked certificate");
    let left = admin
        .list_join_tokens(ListJoinTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, unused.split('.').nth(1).unwrap());
    h.shutdown().await;
}

hive_testkit::on_both!(db => the_box_listener_bounds_connections_and_drops_silent_peers);

/// A peer that opens connections and says nothing cannot hold the box listener: one address
/// gets at most `BOX_MAX_PER_IP` connections (more are closed at once), and a connection that
/// has not finished its TLS handshake within the deadline is closed, freeing its slot.
async fn the_box_listener_bounds_connections_and_drops_silent_peers(url: String) {
    use hive_control_plane::tls::{BOX_MAX_PER_IP, HANDSHAKE_TIMEOUT};
    use tokio::io::AsyncReadExt;
    let h = secure(&url).await;
    let addr = format!("127.0.0.1:{}", h.box_addr.port());
    let mut held = Vec::new();
    for _ in 0..BOX_MAX_PER_IP {
        held.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let closed = |r: Result<std::io::Result<usize>, tokio::time::error::Elapsed>| {
        matches!(r, Ok(Ok(0)) | Ok(Err(_)))
    };
    let mut buf = [0u8; 1];
    let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(3), extra.read(&mut buf)).await;
    assert!(closed(r), "one connection past the limit is closed at once");
    let t0 = std::time::Instant::now();
    let r = tokio::time::timeout(
        HANDSHAKE_TIMEOUT + Duration::from_secs(5),
        held[0].read(&mut buf),
    )
    .await;
    assert!(
        closed(r),
        "a silent peer is dropped at the handshake deadline"
    );
    assert!(t0.elapsed() <= HANDSHAKE_TIMEOUT + Duration::from_secs(5));
    drop(held);
    // Their slots are free again: a box joins from the same address.
    // (The server sees them close on its next read.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    let token = join_token(&h, "", 600).await;
    join(&h, &token, "box-after")
        .await
        .expect("a box joins once the silent peers are gone");
    h.shutdown().await;
}
