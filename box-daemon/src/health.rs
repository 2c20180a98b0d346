//! The box's `/healthz` endpoint for probes and the local tooling, and its `/metrics` for
//! Prometheus ([`crate::metrics`]), on axum.
//!
//! `GET /healthz` answers the JSON object the daemon's [`Report`] makes on each request (control
//! plane link, pools, running builds, dispatch latency); 200 when its `ok` is true, 503 when it
//! is false (the report says why), so a plain HTTP probe sees a box that cannot boot cells. Any
//! other path or method is 404 with a JSON hint. Every answer says `connection: close` and the connection ends after it: probes and
//! the test harnesses send one raw request and read to EOF. Accept errors (out of descriptors)
//! are axum's to pace, not a busy loop here.
use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;

/// Produces the JSON body on each request.
pub type Report = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Produces `/metrics` (the text exposition format) on each request.
pub type MetricsText = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds `addr` and serves until the task is dropped or aborted. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    report: Report,
    metrics: MetricsText,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(report, metrics);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "health endpoint stopped");
        }
    });
    Ok((bound, task))
}

fn router(report: Report, metrics: MetricsText) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = Arc::clone(&metrics);
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let report = Arc::clone(&report);
                async move {
                    let body = report();
                    let status = if body["ok"] == false {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    };
                    (status, Json(body))
                }
            }),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .layer(axum::middleware::map_response(close_after))
}

async fn not_found() -> (StatusCode, Json<serde_json::Value>) {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({ "error": "not found; try GET /healthz or GET /metrics" })),
    )
}

/// One request per connection: hyper closes the connection after a response saying so.
async fn close_after(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn no_metrics() -> MetricsText {
        Arc::new(|| "# EOF\n".to_string())
    }

    /// What the test harnesses do: one raw request, read to EOF (which only comes if the server
    /// closes), split head from body.
    async fn raw(addr: SocketAddr, request: &str) -> (String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut buf))
            .await
            .expect("the server closes the connection after answering")
            .unwrap();
        let (head, body) = buf.split_once("\r\n\r\n").expect("a head");
        (head.to_string(), body.to_string())
    }

    #[tokio::test]
    async fn healthz_answers_json_and_closes() {
        let report: Report = Arc::new(|| serde_json::json!({ "ok": true, "pools": [] }));
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), report, no_metrics())
            .await
            .unwrap();

        let (head, body) = raw(addr, "GET /healthz HTTP/1.1\r\nhost: box\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head
            .to_ascii_lowercase()
            .contains("content-type: application/json"));
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
        assert_eq!(v["ok"], true);

        for request in [
            "GET /nope HTTP/1.1\r\nhost: box\r\n\r\n",
            "POST /healthz HTTP/1.1\r\nhost: box\r\ncontent-length: 0\r\n\r\n",
        ] {
            let (head, body) = raw(addr, request).await;
            assert!(head.starts_with("HTTP/1.1 404"), "{request}: {head}");
            assert!(body.contains("try GET /healthz"), "{body}");
        }
        let (head, body) = raw(addr, "GET /metrics HTTP/1.1\r\nhost: box\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains("openmetrics-text"),
            "{head}"
        );
        assert_eq!(body, "# EOF\n");
        // A client that sends garbage does not stop the server.
        let _ = raw(addr, "\x00\x01 nonsense\r\n\r\n").await;
        let (head, _) = raw(addr, "GET /healthz HTTP/1.1\r\nhost: box\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        task.abort();
    }

    #[tokio::test]
    async fn not_ok_is_503_with_the_reason() {
        let ok = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let report: Report = {
            let ok = Arc::clone(&ok);
            Arc::new(move || {
                let ok = ok.load(std::sync::atomic::Ordering::SeqCst);
                serde_json::json!({ "ok": ok, "unhealthy": (!ok).then_some("boots fail") })
            })
        };
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), report, no_metrics())
            .await
            .unwrap();
        let (head, body) = raw(addr, "GET /healthz HTTP/1.1\r\nhost: box\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        assert!(body.contains("boots fail"), "{body}");
        ok.store(true, std::sync::atomic::Ordering::SeqCst);
        let (head, _) = raw(addr, "GET /healthz HTTP/1.1\r\nhost: box\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        task.abort();
    }
}
