//! Issue 10: TLS on the operator listeners. Off loopback the gRPC and HTTP listeners serve TLS
//! only (a plaintext client gets nothing: no answer, no token accepted in the clear), with a
//! certificate from the hive's CA that clients pin, or the operator's own (`--tls-cert`). On
//! SQLite and PostgreSQL.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::start_with;
use hive_proto::auth::Bearer;
use hive_proto::v1::control_plane_client::ControlPlaneClient;
use hive_proto::v1::ListBuildsRequest;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a plaintext HTTP/1.1 GET of `/healthz` at `addr` reads back (empty or TLS noise when
/// the listener is TLS).
async fn plaintext_get(addr: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = s
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await;
    String::from_utf8_lossy(&raw).to_string()
}

/// A GET of `/healthz` over TLS trusting only `ca_pem`; the status line.
async fn tls_get(addr: &str, ca_pem: &str) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    Ok(String::from_utf8_lossy(&raw)
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}

async fn list_builds_over(
    endpoint: tonic::transport::Endpoint,
    token: &str,
) -> Result<usize, String> {
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    let mut api = ControlPlaneClient::with_interceptor(channel, Bearer::new(token).unwrap());
    api.list_builds(ListBuildsRequest::default())
        .await
        .map(|r| r.into_inner().builds.len())
        .map_err(|s| format!("{s:?}"))
}

hive_testkit::on_both!(db => listeners_off_loopback_serve_only_tls);

async fn listeners_off_loopback_serve_only_tls(url: String) {
    let h = start_with(&url, |c| {
        c.grpc_addr = "0.0.0.0:0".parse().unwrap();
        c.http_addr = "0.0.0.0:0".parse().unwrap();
        // Plaintext boxes need a loopback gRPC listener; this test has no boxes.
        c.insecure_boxes = false;
    })
    .await;
    assert!(h.grpc_tls && h.http_tls, "off loopback: TLS on both");
    let token = h.admin_token().expect("a fresh store").to_string();
    let grpc = format!("127.0.0.1:{}", h.grpc_addr.port());
    let http = format!("127.0.0.1:{}", h.http_addr.port());

    // The attacker's (or a careless client's) plaintext: no answer, the token never accepted.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    let e = list_builds_over(plain, &token)
        .await
        .expect_err("plaintext gRPC off loopback must not be served");
    assert!(!e.contains("Unauthenticated"), "no gRPC answer at all: {e}");
    let answer = plaintext_get(&http).await;
    assert!(
        !answer.starts_with("HTTP/1."),
        "plaintext HTTP off loopback must not be served: {answer:?}"
    );

    // A client that pins the hive's CA gets through, on both listeners.
    let ca = hive_proto::pin::fetch_pinned_ca(&format!("https://{grpc}"), h.ca_sha256())
        .await
        .expect("the gRPC listener shows the hive's CA");
    let tls =
        hive_proto::pin::endpoint(&format!("https://{grpc}"), "127.0.0.1", &ca, None).unwrap();
    list_builds_over(tls, &token)
        .await
        .expect("over TLS with the admin token");
    assert_eq!(
        tls_get(&http, &ca).await.unwrap(),
        "HTTP/1.1 200 OK",
        "HTTPS with the hive's CA"
    );
    // A client that offers h2 in ALPN (curl does, and so does the pin fetch) is not cut off.
    hive_proto::pin::fetch_pinned_ca(&format!("https://{http}"), h.ca_sha256())
        .await
        .expect("the HTTP listener's handshake with a client offering h2");
    // A pin of another CA is refused before anything is sent.
    let other = "ab".repeat(32);
    let e = hive_proto::pin::fetch_pinned_ca(&format!("https://{grpc}"), &other)
        .await
        .unwrap_err();
    assert!(
        matches!(e, hive_proto::pin::PinError::Pin(_)),
        "wrong pin: {e:?}"
    );
    h.shutdown().await;
}

hive_testkit::on_both!(db => an_operator_certificate_is_served_on_both_listeners);

async fn an_operator_certificate_is_served_on_both_listeners(url: String) {
    // The operator's own CA and a certificate for 127.0.0.1 from it.
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "operator CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.pem"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, leaf.pem()).unwrap();
    std::fs::write(&key_path, leaf_key.serialize_pem()).unwrap();

    let h = start_with(&url, |c| {
        c.tls_cert = Some(cert_path.clone());
        c.tls_key = Some(key_path.clone());
    })
    .await;
    assert!(
        h.grpc_tls && h.http_tls,
        "an operator certificate means TLS, loopback or not"
    );
    let grpc = format!("127.0.0.1:{}", h.grpc_addr.port());
    let http = format!("127.0.0.1:{}", h.http_addr.port());
    assert!(!plaintext_get(&http).await.starts_with("HTTP/1."));
    assert_eq!(
        tls_get(&http, &ca_cert.pem()).await.unwrap(),
        "HTTP/1.1 200 OK"
    );
    // The hive's CA did not sign it: a client pinning that CA is told so.
    let e = hive_proto::pin::fetch_pinned_ca(&format!("https://{grpc}"), h.ca_sha256())
        .await
        .unwrap_err();
    assert!(matches!(e, hive_proto::pin::PinError::Pin(_)), "{e:?}");
    // With the operator's CA (hivectl --ca-file) the API answers (a token-less call is
    // refused by the API, not by TLS).
    let tls = hive_proto::pin::endpoint(
        &format!("https://{grpc}"),
        "127.0.0.1",
        &ca_cert.pem(),
        None,
    )
    .unwrap();
    let e = list_builds_over(tls, "").await.unwrap_err();
    assert!(e.contains("Unauthenticated"), "the API answered: {e}");
    h.shutdown().await;

    // A key that is not the certificate's: the control plane does not start, and says which
    // files.
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(&key_path, other.serialize_pem()).unwrap();
    let config = hive_control_plane::server::Config {
        tls_cert: Some(cert_path.clone()),
        tls_key: Some(key_path.clone()),
        data_dir: dir.path().join("data"),
        db: Some(url.clone()),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        box_addr: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    let e = hive_control_plane::server::start(config)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not fit") && e.contains("tls.key"), "{e}");
}
