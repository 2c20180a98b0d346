//! A cell as the pool and the agent see it: its id, class, where its agent listens, and a gRPC
//! client for the `CellAgent` service of the cell daemon inside.
//!
//! How bytes reach the cell daemon depends on the backend: a Unix socket in the sandbox, or the
//! microVM's vsock muxer socket with a Firecracker-style `CONNECT <port>\n` / `OK ...\n` greeting.
//! [`Connector`] covers both so the pool and the agent never care which backend made the cell.
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hive_proto::v1::cell_agent_client::CellAgentClient;
use hive_proto::v1::CellHealthRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Debug, thiserror::Error)]
pub enum CellError {
    #[error("connect to cell agent at {0}")]
    Connect(String, #[source] tonic::transport::Error),
    #[error("cell {cell} did not answer health within {waited:?}: {last}")]
    NotReady {
        cell: String,
        waited: Duration,
        last: String,
    },
    #[error("cell {cell} exited before it became ready: {detail}")]
    Died { cell: String, detail: String },
}

/// How to open a byte stream to the cell daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connector {
    /// A Unix socket the cell daemon listens on (sandbox: `<cell-dir>/run/agent.sock`).
    Unix(PathBuf),
    /// A Firecracker-style vsock muxer: connect to `path`, send `CONNECT <port>\n`, expect `OK`.
    VsockMux { path: PathBuf, port: u32 },
}

impl std::fmt::Display for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connector::Unix(p) => write!(f, "unix:{}", p.display()),
            Connector::VsockMux { path, port } => write!(f, "vsock:{}:{port}", path.display()),
        }
    }
}

impl Connector {
    pub async fn open(&self) -> io::Result<UnixStream> {
        match self {
            Connector::Unix(p) => UnixStream::connect(p).await,
            Connector::VsockMux { path, port } => {
                // The VMM's (unprivileged) uid owns the directory of its socket: never follow
                // a link it may have put there to some other socket on the box.
                let meta = tokio::fs::symlink_metadata(path).await?;
                if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "vsock muxer {} is not a socket (a link or file was put there)",
                            path.display()
                        ),
                    ));
                }
                let mut s = UnixStream::connect(path).await?;
                s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
                // Read the greeting byte by byte: anything after the newline belongs to gRPC.
                let mut line = Vec::new();
                let mut reader = BufReader::with_capacity(1, &mut s);
                reader.read_until(b'\n', &mut line).await?;
                if !line.starts_with(b"OK ") && line != b"OK\n" {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!(
                            "vsock muxer refused port {port}: {:?}",
                            String::from_utf8_lossy(&line)
                        ),
                    ));
                }
                Ok(s)
            }
        }
    }

    /// A lazily connecting gRPC channel (HTTP/2 over the stream; the URI is a placeholder).
    pub fn channel(&self) -> Channel {
        Endpoint::from_static("http://cell.hive")
            .connect_timeout(Duration::from_secs(2))
            .connect_with_connector_lazy(self.clone())
    }
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<UnixStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.open().await.map(TokioIo::new) })
    }
}

/// A cell the pool holds or a build uses. Cloning shares the gRPC channel.
#[derive(Debug, Clone)]
pub struct Cell {
    pub id: String,
    pub size_class: String,
    pub connector: Connector,
    pub booted_at: Instant,
    /// Boot to first health answer.
    pub boot_time: Duration,
    channel: Channel,
}

impl Cell {
    pub fn new(id: String, size_class: String, connector: Connector) -> Self {
        let channel = connector.channel();
        Cell {
            id,
            size_class,
            connector,
            booted_at: Instant::now(),
            boot_time: Duration::ZERO,
            channel,
        }
    }

    pub fn client(&self) -> CellAgentClient<Channel> {
        CellAgentClient::new(self.channel.clone())
    }

    /// One health probe with a deadline.
    pub async fn health(&self, timeout: Duration) -> Result<bool, String> {
        let mut client = self.client();
        match tokio::time::timeout(timeout, client.health(CellHealthRequest {})).await {
            Ok(Ok(reply)) => Ok(reply.into_inner().ready),
            Ok(Err(status)) => Err(format!("health: {}", status.message())),
            Err(_) => Err(format!("health: no answer within {timeout:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn vsock_mux_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 1024\n");
            s.write_all(b"OK 1073741824\nhello").await.unwrap();
        });
        let mut s = Connector::VsockMux {
            path: path.clone(),
            port: 1024,
        }
        .open()
        .await
        .unwrap();
        let mut rest = String::new();
        s.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "hello");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn vsock_mux_refusal_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 11];
            let _ = s.read_exact(&mut buf).await;
            let _ = s.write_all(b"NO\n").await;
        });
        let err = Connector::VsockMux { path, port: 52 }
            .open()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("refused port 52"), "{err}");
    }

    #[tokio::test]
    async fn vsock_mux_never_follows_a_link_to_another_socket() {
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("someone-elses.sock");
        let listener = tokio::net::UnixListener::bind(&other).unwrap();
        let link = dir.path().join("v.sock");
        std::os::unix::fs::symlink(&other, &link).unwrap();
        let err = Connector::VsockMux {
            path: link,
            port: 1024,
        }
        .open()
        .await
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        assert!(err.to_string().contains("not a socket"), "{err}");
        // Nothing connected to the socket the link pointed at.
        let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        assert!(accepted.is_err(), "connected through the link");
    }
}
