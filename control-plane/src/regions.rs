//! Regional hives: each hive (its control planes, its database, its boxes) is its own failure
//! boundary, with a name (`--hive-name`) and a region (`--region`). A project may belong to
//! another hive (`hivectl project add --hive NAME`); a push for it that reaches this hive is
//! checked here (the signature, with this hive's copy of the project's secret, so nothing
//! unauthenticated is passed on) and then forwarded as received (body and forge headers) to that
//! hive's webhook listener, named by `--peer-hive NAME=URL`. The sender gets that hive's answer.
//!
//! Nothing is stored here for a forwarded push: the hive that builds it dedupes the delivery,
//! so a git host's redelivery after a failed forward (answered 502/504, the peer's 5xx passed
//! on) makes one build. A forwarded request carries `X-Hive-Forwarded-By`; a hive never forwards
//! such a request again (two hives that each think the other builds a project cannot loop).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

/// The header a forwarded delivery carries: the name of the hive that forwarded it.
pub const FORWARDED_BY: &str = "x-hive-forwarded-by";

/// How long a forward may take, connection and answer included.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest answer read back from a peer (a webhook answer is a few hundred bytes).
const MAX_ANSWER: usize = 64 * 1024;

/// Headers passed on with a forwarded delivery: the forges' own (event, delivery id, proof),
/// and the content type (a form-encoded GitHub delivery is verified over its raw body).
fn passed_on(name: &str) -> bool {
    name == "content-type"
        || name == "user-agent"
        || name == "idempotency-key"
        || name.starts_with("x-github-")
        || name.starts_with("x-hub-signature")
        || name.starts_with("x-gitea-")
        || name.starts_with("x-forgejo-")
        || name.starts_with("x-gitlab-")
}

/// What is wrong with a hive setting.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error(
        "hive name {0:?} must be 1-63 characters of lower-case letters, digits and '-', \
         starting with a letter"
    )]
    BadName(String),
    #[error("--peer-hive {0:?} is not NAME=URL (e.g. eu-west=https://cp.eu.example:8080)")]
    BadPeer(String),
    #[error("--peer-hive {name}: {why}")]
    BadPeerUrl { name: String, why: String },
    #[error("--peer-hive names {0:?} twice")]
    DuplicatePeer(String),
    #[error("--peer-hive {0:?} is this hive's own name (--hive-name)")]
    PeerIsSelf(String),
    #[error("--peer-ca-file {path}: {why}")]
    CaFile { path: String, why: String },
}

/// Checks a hive name (also what `--region` must look like, when given).
pub fn check_name(name: &str) -> Result<(), RegionError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(RegionError::BadName(name.to_string()))
    }
}

/// Where a peer hive takes webhooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    tls: bool,
    host: String,
    port: u16,
    /// Path prefix before `/webhooks/...` (no trailing slash; '' for none).
    base: String,
}

impl Peer {
    /// `http(s)://HOST[:PORT][/PREFIX]`. Plain `http://` only to a loopback host: a delivery
    /// carries its proof, which must not cross a network in the clear.
    pub fn parse(name: &str, url: &str) -> Result<Peer, RegionError> {
        let bad = |why: &str| RegionError::BadPeerUrl {
            name: name.to_string(),
            why: why.to_string(),
        };
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad(
                "the URL must start with https:// (or http:// to a loopback host)",
            ));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') || path.contains(['?', '#']) {
            return Err(bad("no user, query or fragment in the URL"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, p) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed [ in the host"))?;
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host in the URL"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad("the port is not a number"))?,
            None if tls => 443,
            None => 80,
        };
        if !tls && !is_loopback(&host) {
            return Err(bad(
                "plain http:// only to a loopback host; use https:// (a delivery's signature \
                 must not cross the network in the clear)",
            ));
        }
        Ok(Peer {
            tls,
            host,
            port,
            base: path.trim_end_matches('/').to_string(),
        })
    }

    fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{host}:{}{}{path}", self.port, self.base)
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// This hive's name and region, and the hives it forwards to.
pub struct Regions {
    pub name: String,
    pub region: String,
    peers: BTreeMap<String, Peer>,
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Regions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Regions")
            .field("name", &self.name)
            .field("region", &self.region)
            .field("peers", &self.peers)
            .finish()
    }
}

/// What came of a forward: the peer's status and JSON answer, or why there is none.
#[derive(Debug)]
pub enum Forwarded {
    Answer {
        status: StatusCode,
        body: serde_json::Value,
    },
    /// No answer (connection refused, TLS, timeout, not HTTP): the sender should retry.
    Failed(String),
}

impl Regions {
    /// `peers`: `NAME=URL` each; `ca_file`: PEM certificates trusted for `https://` peers
    /// (else the public web roots).
    pub fn new(
        name: &str,
        region: &str,
        peers: &[String],
        ca_file: Option<&std::path::Path>,
    ) -> Result<Regions, RegionError> {
        check_name(name)?;
        if !region.is_empty() {
            check_name(region)?;
        }
        let mut map = BTreeMap::new();
        for p in peers.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            let (n, url) = p
                .split_once('=')
                .ok_or_else(|| RegionError::BadPeer(p.to_string()))?;
            let n = n.trim();
            check_name(n)?;
            if n == name {
                return Err(RegionError::PeerIsSelf(n.to_string()));
            }
            let peer = Peer::parse(n, url.trim())?;
            if map.insert(n.to_string(), peer).is_some() {
                return Err(RegionError::DuplicatePeer(n.to_string()));
            }
        }
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let ca_err = |why: String| RegionError::CaFile {
                    path: path.display().to_string(),
                    why,
                };
                let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
                use rustls::pki_types::pem::PemObject;
                let mut n = 0;
                for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| ca_err(format!("not PEM certificates: {e}")))?;
                    roots
                        .add(cert)
                        .map_err(|e| ca_err(format!("a certificate is not usable: {e}")))?;
                    n += 1;
                }
                if n == 0 {
                    return Err(ca_err("holds no certificate".into()));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        // As `hive_proto::pin`: deprecated in rustls 0.23.48 only for lacking post-quantum key
        // exchange.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| RegionError::CaFile {
                path: String::new(),
                why: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Regions {
            name: name.to_string(),
            region: region.to_string(),
            peers: map,
            tls: Arc::new(tls),
        })
    }

    /// A hive of one name, no peers (tests, and the default).
    pub fn single(name: &str) -> Regions {
        Regions::new(name, "", &[], None).expect("a valid hive name")
    }

    /// Whether a project of `hive` builds here.
    pub fn builds_here(&self, hive: &str) -> bool {
        hive.is_empty() || hive == self.name
    }

    pub fn peer_names(&self) -> Vec<String> {
        self.peers.keys().cloned().collect()
    }

    pub fn has_peer(&self, hive: &str) -> bool {
        self.peers.contains_key(hive)
    }

    /// Where `hive` takes the webhook at `path` (`/webhooks/github`), if it is a peer.
    pub fn peer_url(&self, hive: &str, path: &str) -> Option<String> {
        self.peers.get(hive).map(|p| p.url(path))
    }

    /// Sends a delivery on to `hive`'s `path` as received (body and forge headers), marked as
    /// forwarded by this hive, and returns its answer.
    pub async fn forward(
        &self,
        hive: &str,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Forwarded {
        let Some(peer) = self.peers.get(hive) else {
            return Forwarded::Failed(format!(
                "hive {hive:?} is not a peer of this control plane (--peer-hive {hive}=URL)"
            ));
        };
        match tokio::time::timeout(FORWARD_TIMEOUT, self.send(peer, path, headers, body)).await {
            Ok(Ok(f)) => f,
            Ok(Err(why)) => Forwarded::Failed(format!("hive {hive} at {}: {why}", peer.url(path))),
            Err(_) => Forwarded::Failed(format!(
                "hive {hive} at {} gave no answer within {} s",
                peer.url(path),
                FORWARD_TIMEOUT.as_secs()
            )),
        }
    }

    async fn send(
        &self,
        peer: &Peer,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Forwarded, String> {
        let tcp = tokio::net::TcpStream::connect((peer.host.as_str(), peer.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{path}", peer.base))
            .header("host", host_header(peer))
            .header(FORWARDED_BY, self.name.as_str());
        for (name, value) in headers {
            if passed_on(name.as_str()) {
                req = req.header(name, value);
            }
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| format!("request: {e}"))?;
        let answer = if peer.tls {
            let name = rustls::pki_types::ServerName::try_from(peer.host.clone())
                .map_err(|e| format!("host name: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            exchange(TokioIo::new(tls), req).await?
        } else {
            exchange(TokioIo::new(tcp), req).await?
        };
        Ok(answer)
    }
}

fn host_header(peer: &Peer) -> HeaderValue {
    let host = if peer.host.contains(':') {
        format!("[{}]:{}", peer.host, peer.port)
    } else {
        format!("{}:{}", peer.host, peer.port)
    };
    HeaderValue::from_str(&host).unwrap_or_else(|_| HeaderValue::from_static("localhost"))
}

/// One HTTP/1.1 request on `io` and its (bounded) answer.
async fn exchange<I>(io: I, req: Request<Full<Bytes>>) -> Result<Forwarded, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let driver = tokio::spawn(conn);
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP: {e}"));
    let res = match res {
        Ok(r) => r,
        Err(e) => {
            driver.abort();
            return Err(e);
        }
    };
    let status = res.status();
    let body = Limited::new(res.into_body(), MAX_ANSWER).collect().await;
    driver.abort();
    let body = body
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    let body = serde_json::from_slice(&body).unwrap_or_else(
        |_| serde_json::json!({ "message": String::from_utf8_lossy(&body[..body.len().min(200)]) }),
    );
    Ok(Forwarded::Answer { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_peers_are_checked() {
        assert!(check_name("eu-west-1").is_ok());
        for bad in ["", "EU", "1eu", "eu_west", &"a".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let r = Regions::new(
            "us",
            "us-east",
            &[
                "eu=https://cp.eu.example:8443/hive/".into(),
                "ap=http://127.0.0.1:9".into(),
            ],
            None,
        )
        .unwrap();
        assert_eq!(
            r.peer_url("eu", "/webhooks/github").unwrap(),
            "https://cp.eu.example:8443/hive/webhooks/github"
        );
        assert_eq!(r.peer_url("ap", "/x").unwrap(), "http://127.0.0.1:9/x");
        assert!(r.builds_here("") && r.builds_here("us") && !r.builds_here("eu"));
        for (peers, says) in [
            (vec!["eu"], "NAME=URL"),
            (vec!["eu=http://cp.eu.example"], "loopback"),
            (vec!["eu=ftp://x"], "https://"),
            (vec!["us=https://x"], "own name"),
            (vec!["eu=https://a", "eu=https://b"], "twice"),
            (vec!["eu=https://u@a"], "no user"),
            (vec!["eu=https://a:x"], "port"),
        ] {
            let peers: Vec<String> = peers.into_iter().map(String::from).collect();
            let e = Regions::new("us", "", &peers, None)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{peers:?}: {e}");
        }
    }

    #[test]
    fn only_the_forge_headers_are_passed_on() {
        for h in [
            "content-type",
            "x-github-event",
            "x-hub-signature-256",
            "x-gitlab-token",
            "x-forgejo-signature",
            "idempotency-key",
        ] {
            assert!(passed_on(h), "{h}");
        }
        for h in [
            "host",
            "cookie",
            "authorization",
            "x-hive-forwarded-by",
            "connection",
        ] {
            assert!(!passed_on(h), "{h}");
        }
    }
}
