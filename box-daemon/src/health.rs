//! The box's `/healthz` endpoint: a tiny HTTP/1.1 responder for probes and the local tooling.
//!
//! Answers `GET /healthz` with a JSON object (control plane link, pools, running builds); anything
//! else is 404. Hand-written on purpose: one fixed route does not need a web framework.
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Produces the JSON body on each request.
pub type Report = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Binds `addr` and serves until the task is dropped. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    report: Report,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let report = Arc::clone(&report);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                let mut n = 0;
                // Read until the end of the request head (or give up on a slow/huge one).
                while n < buf.len() {
                    match tokio::time::timeout(
                        std::time::Duration::from_secs(2),
                        conn.read(&mut buf[n..]),
                    )
                    .await
                    {
                        Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                        Ok(Ok(k)) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let line = head.lines().next().unwrap_or("");
                let (status, body) = if line.starts_with("GET /healthz ") {
                    ("200 OK", report().to_string())
                } else {
                    (
                        "404 Not Found",
                        "{\"error\":\"not found; try GET /healthz\"}".to_string(),
                    )
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok((bound, task))
}
