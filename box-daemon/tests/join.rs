//! Issue 10, the box's side of joining: `Credentials::ensure` against a real control plane's
//! TLS box listener. A token that pins another CA is refused before anything is sent; a good
//! one buys a certificate kept in the data dir (key 0600) and used by the next start without a
//! token; a data dir joined as one box cannot be started as another; renewal replaces the
//! certificate and the box still gets in.

use std::os::unix::fs::PermissionsExt;

use hive_box::credentials::{Credentials, CredentialsError};
use hive_control_plane::server::{self, Config};
use hive_proto::auth::Bearer;
use hive_proto::v1::box_agent_client::BoxAgentClient;
use hive_proto::v1::control_plane_client::ControlPlaneClient;
use hive_proto::v1::{box_message, BoxMessage, CreateJoinTokenRequest, Register};

async fn token(cp: &server::Handle) -> String {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer = Bearer::new(cp.admin_token().unwrap()).unwrap();
    ControlPlaneClient::with_interceptor(ch, bearer)
        .create_join_token(CreateJoinTokenRequest::default())
        .await
        .unwrap()
        .into_inner()
        .token
}

async fn registers(creds: &Credentials, box_id: &str) -> bool {
    let ch = creds.endpoint().unwrap().connect().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(BoxMessage {
        seq: 0,
        msg: Some(box_message::Msg::Register(Register {
            box_id: box_id.into(),
            hostname: "t".into(),
            backend: "sandbox".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let r = BoxAgentClient::new(ch)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    match r {
        Ok(s) => {
            let mut s = s.into_inner();
            matches!(s.message().await, Ok(Some(_)))
        }
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_box_joins_once_keeps_its_certificate_and_trusts_only_the_pinned_ca() {
    let db = tempfile::tempdir().unwrap();
    let cp = server::start(Config {
        http_addr: "127.0.0.1:0".parse().unwrap(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        box_addr: "127.0.0.1:0".parse().unwrap(),
        data_dir: db.path().to_path_buf(),
        db: Some(format!("sqlite://{}/hive.db", db.path().display())),
        ..Config::default()
    })
    .await
    .expect("control plane starts");
    let url = format!("https://127.0.0.1:{}", cp.box_addr.port());
    let data = tempfile::tempdir().unwrap();

    // Plaintext URL: no certificate at all (only --insecure-boxes accepts that).
    let none = Credentials::ensure(&format!("http://{}", cp.grpc_addr), "b1", data.path(), None)
        .await
        .unwrap();
    assert!(none.is_none());
    // ... but only to this machine.
    let e = Credentials::ensure("http://10.0.0.9:50051", "b1", data.path(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("https://HOST:PORT"), "{e}");

    // No certificate and no token: says what to do.
    let e = Credentials::ensure(&url, "b1", data.path(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, CredentialsError::NoCertificate(_)), "{e}");
    assert!(e.to_string().contains("hivectl box join-token"), "{e}");

    // A token that pins another CA: the box refuses the server before sending the token.
    let good = token(&cp).await;
    let mut wrong: hive_types::JoinToken = good.parse().unwrap();
    wrong.ca_sha256 = "ab".repeat(32);
    let e = Credentials::ensure(&url, "b1", data.path(), Some(&wrong.to_string()))
        .await
        .unwrap_err();
    assert!(matches!(e, CredentialsError::Pin(..)), "{e}");
    assert!(!e.is_transient());
    // ... and the good token was not spent by that attempt.
    let creds = Credentials::ensure(&url, "b1", data.path(), Some(&good))
        .await
        .expect("join")
        .expect("https: credentials");
    assert_eq!(creds.box_id(), "b1");
    let key_mode = std::fs::metadata(data.path().join("tls/box.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    assert!(
        registers(&creds, "b1").await,
        "the certificate gets the box in"
    );

    // The next start needs no token (the used one would be refused anyway).
    let again = Credentials::ensure(&url, "b1", data.path(), Some(&good))
        .await
        .unwrap()
        .unwrap();
    assert!(registers(&again, "b1").await);
    // The data dir is box b1's: it cannot be started as b2.
    let e = Credentials::ensure(&url, "b2", data.path(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, CredentialsError::OtherBox { .. }), "{e}");

    // Renewal writes a new certificate that works, once due: too early it is refused (the
    // control plane renews when a third of the life is left).
    let before = std::fs::read_to_string(data.path().join("tls/box.pem")).unwrap();
    assert!(!again.due_for_renewal(), "a fresh certificate is not due");
    let e = again.renew().await.unwrap_err().to_string();
    assert!(e.contains("a third"), "{e}");
    {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}/hive.db", db.path().display());
        let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
        let now = hive_sys::now_ms() as i64;
        sqlx::query("UPDATE box_certs SET issued_at_ms = $1, not_after_ms = $2")
            .bind(now - 29 * 86_400_000)
            .bind(now + 86_400_000)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    again.renew().await.expect("renew when due");
    let after = std::fs::read_to_string(data.path().join("tls/box.pem")).unwrap();
    assert_ne!(before, after);
    let reloaded = Credentials::ensure(&url, "b1", data.path(), None)
        .await
        .unwrap()
        .unwrap();
    assert!(registers(&reloaded, "b1").await);

    // Nothing listening: transient (the daemon retries while the control plane comes up).
    let dead = tempfile::tempdir().unwrap();
    let e = Credentials::ensure(
        "https://127.0.0.1:1",
        "b3",
        dead.path(),
        Some(&token(&cp).await),
    )
    .await
    .unwrap_err();
    assert!(e.is_transient(), "{e}");
    cp.shutdown().await;
}
