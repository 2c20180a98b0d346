//! Plays a git host: builds GitHub-shaped `push`/`ping` payloads, signs them with
//! `X-Hub-Signature-256` (HMAC-SHA256) and POSTs them over real HTTP/1.1 (keep-alive).

use hmac::{KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// What can go wrong sending a webhook.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("bad webhook URL {url}: {why}")]
    Url { url: String, why: String },
    #[error("POST {url}: {source}")]
    Send {
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("POST {url} over TLS: {why}")]
    Tls { url: String, why: String },
    #[error("read answer of {url}: {source}")]
    Body {
        url: String,
        #[source]
        source: hyper::Error,
    },
}

/// `sha256=<hex>` of `body` under `secret`, as GitHub sends it.
pub fn sign(secret: &str, body: &[u8]) -> String {
    // new_from_slice accepts keys of any length for HMAC.
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key size");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A push event for `repo_url` (used as `clone_url`; `html_url` without `.git`).
pub fn push_payload(repo_url: &str, git_ref: &str, after: &str, deleted: bool) -> Vec<u8> {
    let html = repo_url.trim_end_matches(".git");
    let name = html.rsplit('/').next().unwrap_or("repo");
    serde_json::json!({
        "ref": git_ref,
        "before": "0000000000000000000000000000000000000000",
        "after": after,
        "created": false,
        "deleted": deleted,
        "forced": false,
        "repository": {
            "id": 1,
            "name": name,
            "full_name": format!("hive-tests/{name}"),
            "clone_url": repo_url,
            "html_url": html,
            "git_url": html.replacen("http://", "git://", 1).replacen("https://", "git://", 1) + ".git",
            "ssh_url": format!("git@example.test:hive-tests/{name}.git"),
            "default_branch": "main",
        },
        "pusher": { "name": "tester", "email": "tester@example.test" },
        "head_commit": if deleted { serde_json::Value::Null } else { serde_json::json!({
            "id": after, "message": "test commit", "timestamp": "2026-11-27T00:00:00Z"
        }) },
    })
    .to_string()
    .into_bytes()
}

/// A ping event for `repo_url`.
pub fn ping_payload(repo_url: &str) -> Vec<u8> {
    serde_json::json!({
        "zen": "Keep it logically awesome.",
        "hook_id": 1,
        "hook": { "type": "Repository", "events": ["push"] },
        "repository": { "clone_url": repo_url, "html_url": repo_url.trim_end_matches(".git") },
    })
    .to_string()
    .into_bytes()
}

/// The HTTP answer to a webhook.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    /// The body parsed as JSON (Null if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One webhook delivery.
#[derive(Debug, Clone)]
pub struct Delivery<'a> {
    pub event: &'a str,
    pub delivery_id: &'a str,
    /// `None` = no signature header at all.
    pub signature: Option<String>,
    pub body: Vec<u8>,
}

/// A keep-alive HTTP client for webhooks (clone it freely).
#[derive(Clone)]
pub struct WebhookClient {
    client: Client<HttpConnector, Full<bytes::Bytes>>,
}

impl Default for WebhookClient {
    fn default() -> Self {
        Self::new()
    }
}

impl WebhookClient {
    pub fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// POSTs `d` to `url` and reads the whole answer.
    pub async fn send(&self, url: &str, d: &Delivery<'_>) -> Result<Answer, WebhookError> {
        let mut req = hyper::Request::post(url)
            .header("content-type", "application/json")
            .header("user-agent", "GitHub-Hookshot/hive-tests")
            .header("x-github-event", d.event)
            .header("x-github-delivery", d.delivery_id);
        if let Some(sig) = &d.signature {
            req = req.header("x-hub-signature-256", sig);
        }
        let req = req
            .body(Full::new(bytes::Bytes::from(d.body.clone())))
            .map_err(|e| WebhookError::Url {
                url: url.to_string(),
                why: e.to_string(),
            })?;
        let resp = if url.starts_with("https://") {
            send_tls(url, req).await?
        } else {
            self.client
                .request(req)
                .await
                .map_err(|source| WebhookError::Send {
                    url: url.to_string(),
                    source,
                })?
        };
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|source| WebhookError::Body {
                url: url.to_string(),
                source,
            })?
            .to_bytes();
        Ok(Answer {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// GETs `url` (health and metrics endpoints).
    pub async fn get(&self, url: &str) -> Result<Answer, WebhookError> {
        let req = hyper::Request::get(url)
            .body(Full::new(bytes::Bytes::new()))
            .map_err(|e| WebhookError::Url {
                url: url.to_string(),
                why: e.to_string(),
            })?;
        let resp = if url.starts_with("https://") {
            send_tls(url, req).await?
        } else {
            self.client
                .request(req)
                .await
                .map_err(|source| WebhookError::Send {
                    url: url.to_string(),
                    source,
                })?
        };
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|source| WebhookError::Body {
                url: url.to_string(),
                source,
            })?
            .to_bytes();
        Ok(Answer {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// Signs `body` with `secret` and sends it as event `event`.
    pub async fn send_signed(
        &self,
        url: &str,
        secret: &str,
        event: &str,
        delivery_id: &str,
        body: Vec<u8>,
    ) -> Result<Answer, WebhookError> {
        let signature = Some(sign(secret, &body));
        self.send(
            url,
            &Delivery {
                event,
                delivery_id,
                signature,
                body,
            },
        )
        .await
    }
}

/// POSTs `d` over a fresh raw HTTP/1.1 connection, reading the answer while the body is still
/// being written. For bodies the server refuses on their headers alone (413 on Content-Length):
/// it answers and closes early, and a client that only reads after writing everything (hyper)
/// sees a reset instead of the answer. curl and git hosts read early; so does this.
pub async fn send_raw(http_addr: &str, d: &Delivery<'_>) -> Result<Answer, std::io::Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(http_addr).await?;
    let (mut rd, mut wr) = stream.into_split();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    });
    let mut head = format!(
        "POST /webhooks/github HTTP/1.1\r\nHost: {http_addr}\r\nContent-Type: application/json\r\n\
         User-Agent: GitHub-Hookshot/hive-tests\r\nX-GitHub-Event: {}\r\nX-GitHub-Delivery: {}\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        d.event,
        d.delivery_id,
        d.body.len()
    );
    if let Some(sig) = &d.signature {
        head.push_str(&format!("X-Hub-Signature-256: {sig}\r\n"));
    }
    head.push_str("\r\n");
    if wr.write_all(head.as_bytes()).await.is_ok() {
        for chunk in d.body.chunks(64 * 1024) {
            // The server may close once it has answered; the answer is what matters.
            if wr.write_all(chunk).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    }
    let got = tokio::time::timeout(std::time::Duration::from_secs(30), reader)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 30 s"))?
        .map_err(std::io::Error::other)?;
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("no HTTP status line in answer {text:?}"),
            )
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok(Answer { status, body })
}

/// One request over a fresh TLS connection to an HTTP listener of a control plane started here,
/// trusting its CA by the pin (as a webhook sender told the hive's CA would).
async fn send_tls(
    url: &str,
    req: hyper::Request<Full<bytes::Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, WebhookError> {
    use std::sync::Arc;
    let tls = |why: String| WebhookError::Tls {
        url: url.to_string(),
        why,
    };
    let ca = crate::controlplane::pinned_ca(url).await;
    let (host, port) = hive_proto::pin::host_port(url).map_err(tls)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots
            .add(cert.map_err(|e| tls(e.to_string()))?)
            .map_err(|e| tls(e.to_string()))?;
    }
    #[allow(deprecated)] // ring: what tonic's TLS uses too
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name =
        rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| tls(e.to_string()))?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| tls(e.to_string()))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| tls(e.to_string()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| tls(e.to_string()))?;
    tokio::spawn(conn);
    sender
        .send_request(req)
        .await
        .map_err(|e| tls(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::sign;

    /// GitHub's documented test vector ("Validating webhook deliveries").
    #[test]
    fn github_test_vector() {
        assert_eq!(
            sign("It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }
}
