//! The forges' HTTP client: one connection per call (statuses are few; a pooled connection
//! would outlive a forge's restart), HTTP/1.1 over TLS (webpki roots) or plain http, the whole
//! call under one timeout (connect, TLS, request, every body byte), the answer's body read up
//! to a cap, redirects never followed. Nothing is spawned: a call that times out leaves no
//! task behind.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

/// Why a call failed before the forge answered (all worth a retry).
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("URL {0:?} is not an http(s) URL with a host")]
    Url(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {host}: {source}")]
    Tls {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("the answer's body is over {0} bytes")]
    TooLarge(usize),
    #[error("the answer's body: {0}")]
    Body(String),
}

/// A forge's answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// The `Location` of a redirect (not followed).
    pub location: Option<String>,
    pub body: Bytes,
}

/// A client with its limits and its TLS trust.
#[derive(Debug, Clone)]
pub struct Client {
    pub timeout: Duration,
    pub max_body: usize,
    pub tls: Arc<rustls::ClientConfig>,
}

/// Why the forges' TLS trust could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("forge CA file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("forge CA file {0}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate(String),
    #[error("forge CA file {path}: {why}")]
    Bad { path: String, why: String },
}

/// The TLS client configuration: Mozilla's roots (webpki-roots), plus the certificates in
/// `ca_file` (a forge behind a private CA: GitHub Enterprise, a self-hosted GitLab or Gitea);
/// HTTP/1.1 by ALPN.
pub fn tls_config(
    ca_file: Option<&std::path::Path>,
) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| TlsSetupError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut added = 0;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| TlsSetupError::Bad {
                path: shown.clone(),
                why: e.to_string(),
            })?;
            roots.add(cert).map_err(|e| TlsSetupError::Bad {
                path: shown.clone(),
                why: e.to_string(),
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(TlsSetupError::NoCertificate(shown));
        }
    }
    // The provider tonic's own TLS (feature tls-ring) uses; deprecated in rustls 0.23.48 only
    // for lacking post-quantum key exchange.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Bad {
            path: "(none)".into(),
            why: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl Client {
    /// Sends one request: `method` to `url` with `headers` and `body` (JSON when given).
    pub async fn call(
        &self,
        method: http::Method,
        url: &str,
        headers: &[(&str, String)],
        body: Option<&serde_json::Value>,
    ) -> Result<Reply, CallError> {
        match tokio::time::timeout(self.timeout, self.call_inner(method, url, headers, body)).await
        {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout(self.timeout)),
        }
    }

    async fn call_inner(
        &self,
        method: http::Method,
        url: &str,
        headers: &[(&str, String)],
        body: Option<&serde_json::Value>,
    ) -> Result<Reply, CallError> {
        let uri: http::Uri = url.parse().map_err(|_| CallError::Url(url.to_string()))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(CallError::Url(url.to_string())),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| CallError::Url(url.to_string()))?
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let addr = format!("{host}:{port}");
        let tcp = tokio::net::TcpStream::connect((bare.as_str(), port))
            .await
            .map_err(|source| CallError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let path = uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str)
            .to_string();
        let authority = uri
            .authority()
            .map_or(host.clone(), |a| a.as_str().to_string());
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, authority)
            .header(http::header::USER_AGENT, "hive-control-plane")
            .header(http::header::CONNECTION, "close");
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let payload = match body {
            Some(v) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(v).unwrap_or_default())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|_| CallError::Url(url.to_string()))?;
        if https {
            let name = rustls::pki_types::ServerName::try_from(bare.clone())
                .map_err(|_| CallError::Url(url.to_string()))?;
            let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|source| CallError::Tls {
                    host: host.clone(),
                    source,
                })?;
            self.exchange(TokioIo::new(stream), req).await
        } else {
            self.exchange(TokioIo::new(tcp), req).await
        }
    }

    /// One request on a fresh connection, the connection driven in this future (no task).
    async fn exchange<T>(&self, io: T, req: http::Request<Full<Bytes>>) -> Result<Reply, CallError>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        let max = self.max_body;
        let exchange = async move {
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let location = resp
                .headers()
                .get(http::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(|s| super::truncate(s, 512));
            let body = Limited::new(resp.into_body(), max)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        CallError::TooLarge(max)
                    } else {
                        CallError::Body(e.to_string())
                    }
                })?
                .to_bytes();
            drop(sender);
            Ok::<_, CallError>(Reply {
                status,
                location,
                body,
            })
        };
        // The connection is polled only until the answer is read: a server that keeps it
        // open afterwards costs nothing.
        tokio::pin!(conn, exchange);
        let mut conn_done = false;
        loop {
            tokio::select! {
                reply = &mut exchange => return reply,
                _ = &mut conn, if !conn_done => conn_done = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_must_hold_certificates() {
        assert!(tls_config(None).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "hello").unwrap();
        let e = tls_config(Some(&path)).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = tls_config(Some(&dir.path().join("missing.pem")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
