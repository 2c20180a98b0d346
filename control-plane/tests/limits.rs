//! The HTTP listener's limits against a real server: a sender that trickles its body is
//! answered 408 once the request timeout passes, instead of holding a connection and a
//! handler for as long as it likes; the limits in force are published in /metrics.

mod common;

use std::time::Duration;

use common::{http, start_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_webhook_body_gets_408_at_the_timeout() {
    let db = hive_testkit::TestDb::sqlite();
    let handle = start_with(&db.url, |c| c.http_timeout = Duration::from_secs(1)).await;
    let mut s = tokio::net::TcpStream::connect(handle.http_addr)
        .await
        .unwrap();
    s.write_all(
        b"POST /webhooks/github HTTP/1.1\r\nHost: hive\r\nContent-Type: application/json\r\n\
          X-GitHub-Event: push\r\nContent-Length: 1000\r\n\r\n{\"ref\":",
    )
    .await
    .unwrap();
    // The rest of the body never comes.
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await;
    assert!(read.is_ok(), "no answer 10 s after a 1 s timeout");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");

    // A normal request still gets through, and the limits are published.
    let m = http(handle.http_addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(m.status, 200);
    assert!(
        m.body
            .contains("hive_limit{name=\"http_timeout_ms\"} 1000\n"),
        "{}",
        m.body
    );
    assert!(m
        .body
        .contains("hive_limit{name=\"http_concurrency\"} 512\n"));
    assert!(m
        .body
        .contains("hive_limit{name=\"grpc_message_bytes\"} 4194304\n"));
    handle.shutdown().await;
    db.drop_db().await;
}
