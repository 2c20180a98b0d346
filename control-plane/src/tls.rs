//! TLS on the operator listeners: the gRPC API (`--grpc-addr`, hivectl's) and HTTP
//! (`--http-addr`: webhooks, dashboard, metrics). A listener on loopback is plaintext (only this
//! host's processes reach it, and the control plane says so in its log) unless the operator
//! gave a certificate or asked for TLS there too; any other address always gets TLS: there is
//! no way to serve plaintext off loopback. The certificate is the operator's (`--tls-cert`,
//! `--tls-key`) or one the hive's CA signs at every start for the `--tls-san` names (clients
//! pin the CA, as boxes and connectors do). The box listener's TLS is `server::serve_boxes`'.
//!
//! The HTTP side is served through [`TlsListener`]: handshakes run in their own tasks with a
//! deadline and a bound on how many are open, so a peer that connects and says nothing holds
//! one slot for [`HANDSHAKE_TIMEOUT`], never the accept loop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::server::TlsStream;

/// Longest a TLS handshake may take on any listener; a slower peer is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS handshakes open at once on the HTTP listener; more connections wait in the kernel's
/// backlog until one ends.
const MAX_HANDSHAKES: usize = 256;

/// Errors of the listeners' certificate.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path}: {why}")]
    Bad {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error(
        "--tls-cert and --tls-key go together: give both (a PEM certificate chain and its key), \
         or neither (the hive's CA signs one)"
    )]
    Half,
    #[error("TLS certificate and key: {0}")]
    Config(String),
}

/// Where a listener's certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertSource {
    /// `--tls-cert`/`--tls-key`.
    Operator,
    /// Signed by the hive's CA at this start.
    HiveCa,
}

/// A server certificate chain and its key, as PEM.
#[derive(Clone)]
pub struct ServerCert {
    pub chain_pem: String,
    pub key_pem: String,
    pub source: CertSource,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Whether a listener on `addr` serves TLS: always off loopback; on loopback when the operator
/// gave a certificate or asked for it.
pub fn wanted(addr: SocketAddr, operator_cert: bool, on_loopback: bool) -> bool {
    !addr.ip().is_loopback() || operator_cert || on_loopback
}

/// The operator's certificate chain and key (PEM files), checked to belong together.
pub fn operator_cert(cert: &Path, key: &Path) -> Result<ServerCert, TlsError> {
    let read = |what: &'static str, path: &Path| {
        std::fs::read_to_string(path).map_err(|source| TlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })
    };
    let chain_pem = read("--tls-cert", cert)?;
    let key_pem = read("--tls-key", key)?;
    let c = ServerCert {
        chain_pem,
        key_pem,
        source: CertSource::Operator,
    };
    rustls_config(&c).map_err(|e| match e {
        TlsError::Config(why) => TlsError::Config(format!(
            "{why} (--tls-cert {}, --tls-key {})",
            cert.display(),
            key.display()
        )),
        other => other,
    })?;
    Ok(c)
}

/// The operator's pair when both are given, None when neither is.
pub fn operator_pair(
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Option<ServerCert>, TlsError> {
    match (cert, key) {
        (Some(c), Some(k)) => operator_cert(c, k).map(Some),
        (None, None) => Ok(None),
        _ => Err(TlsError::Half),
    }
}

/// A rustls server configuration (no client certificates, no ALPN: HTTP/1.1) for `cert`.
pub fn rustls_config(cert: &ServerCert) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Config(format!("the certificate is not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError::Config(
            "no CERTIFICATE block in the certificate file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
        .map_err(|e| TlsError::Config(format!("the key is not a PEM private key: {e}")))?;
    // The provider tonic's own TLS (feature tls-ring) uses; deprecated in rustls 0.23.48 only
    // for lacking post-quantum key exchange.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("the key does not fit the certificate: {e}")))?;
    // No ALPN: the HTTP server speaks HTTP/1.1, and a client that offers h2 too (curl,
    // hive_proto::pin) must still get through the handshake rather than a fatal alert.
    config.alpn_protocols = Vec::new();
    Ok(Arc::new(config))
}

/// The HTTP listener with TLS: an [`axum::serve::Listener`] that yields connections whose
/// handshake finished.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `listener` until `stop`, each handshake in its own task with a deadline.
    pub fn new(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        mut stop: watch::Receiver<bool>,
    ) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let accepted = tokio::select! {
                    _ = stop.wait_for(|s| *s) => None,
                    accepted = listener.accept() => Some(accepted),
                };
                let (tcp, peer) = match accepted {
                    None => return,
                    Some(Ok(a)) => a,
                    Some(Err(e)) => {
                        // Out of file descriptors and the like: wait, as axum does.
                        tracing::warn!(error = %e, "HTTP listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            drop(slot);
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "HTTP listener: TLS handshake failed")
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "HTTP listener: TLS handshake timed out")
                        }
                    }
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop ended (shutdown): no more connections.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Connections the box listener holds at once; past it, new ones wait in the kernel's backlog.
pub const BOX_MAX_CONNECTIONS: usize = 8192;
/// Connections one address may hold on the box listener (several boxes may share a host);
/// past it a new one from there is closed at once.
pub const BOX_MAX_PER_IP: usize = 256;

/// A TCP connection holding its slots on the listener until it closes.
pub struct Slotted {
    tcp: TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
    _peer: PeerSlot,
}

/// One connection of an address, counted until dropped.
struct PeerSlot {
    ip: std::net::IpAddr,
    counts: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = c.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

impl tokio::io::AsyncRead for Slotted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Slotted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// The same connection info as a plain TCP stream, so TLS on top of it gives tonic's
/// `TlsConnectInfo<TcpConnectInfo>` (peer certificates, remote address).
impl tonic::transport::server::Connected for Slotted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.tcp.local_addr().ok(),
            remote_addr: self.tcp.peer_addr().ok(),
        }
    }
}

/// Accepts on `listener` until `stop`: at most `max` connections at once (then it stops
/// accepting until one closes), at most `per_ip` from one address (more are closed at once).
pub fn limited_incoming(
    listener: TcpListener,
    max: usize,
    per_ip: usize,
    mut stop: watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Slotted>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(max));
    let counts = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                _ = stop.wait_for(|s| *s) => None,
                accepted = listener.accept() => Some(accepted),
            };
            let (tcp, peer) = match accepted {
                None => return,
                Some(Ok(a)) => a,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "box listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let ip = peer.ip();
            {
                let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
                let n = c.entry(ip).or_insert(0);
                if *n >= per_ip {
                    // Dropping `tcp` closes it; the log line is debug, or a flood would fill it.
                    tracing::debug!(%peer, per_ip, "box listener: too many connections from this address; closed");
                    continue;
                }
                *n += 1;
            }
            let _ = tcp.set_nodelay(true);
            let conn = Slotted {
                tcp,
                _slot: slot,
                _peer: PeerSlot {
                    ip,
                    counts: counts.clone(),
                },
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_may_be_plaintext() {
        let lo: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let lo6: SocketAddr = "[::1]:1".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:1".parse().unwrap();
        let lan: SocketAddr = "10.0.0.10:1".parse().unwrap();
        assert!(!wanted(lo, false, false));
        assert!(!wanted(lo6, false, false));
        assert!(wanted(lo, true, false) && wanted(lo, false, true));
        assert!(wanted(any, false, false) && wanted(lan, false, false));
    }

    #[test]
    fn a_half_pair_or_a_foreign_key_is_refused_with_the_files_named() {
        assert!(matches!(
            operator_pair(Some(Path::new("/x.pem")), None),
            Err(TlsError::Half)
        ));
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, other.serialize_pem()).unwrap();
        let e = operator_cert(&c, &k).unwrap_err().to_string();
        assert!(e.contains("does not fit") && e.contains("k.pem"), "{e}");
        std::fs::write(&k, key.serialize_pem()).unwrap();
        assert_eq!(operator_cert(&c, &k).unwrap().source, CertSource::Operator);
        let e = operator_cert(&dir.path().join("none.pem"), &k)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--tls-cert") && e.contains("none.pem"), "{e}");
    }
}
