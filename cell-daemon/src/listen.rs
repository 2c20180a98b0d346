//! The agent's listeners: a Unix socket (sandbox cells), vsock (microVM cells: the box reaches us
//! through the VMM's vsock device on port 1024), or TCP (QEMU boot checks, which have no
//! vhost-vsock). All three serve the same tonic service.

use crate::config::ListenAddr;
use hive_proto::v1::cell_agent_server::CellAgentServer;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Errors binding or serving.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("create directory {path} for the agent socket")]
    SocketDir {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bind {addr}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("serve gRPC on {addr}")]
    Serve {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Binds `addr`, calls `on_ready` once bound, serves until `shutdown` resolves.
pub async fn serve<S>(
    addr: &ListenAddr,
    agent: crate::agent::Agent,
    on_ready: impl FnOnce(),
    shutdown: S,
) -> Result<(), ListenError>
where
    S: Future<Output = ()> + Send,
{
    let name = addr.to_string();
    let bind_err = |source| ListenError::Bind {
        addr: name.clone(),
        source,
    };
    let serve_err = |source| ListenError::Serve {
        addr: name.clone(),
        source,
    };
    let server = tonic::transport::Server::builder().add_service(CellAgentServer::new(agent));
    match addr {
        ListenAddr::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|source| ListenError::SocketDir {
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
            // A socket file left by an earlier run would make bind fail with EADDRINUSE.
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
            on_ready();
            server
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(l),
                    shutdown,
                )
                .await
                .map_err(serve_err)
        }
        ListenAddr::Tcp(sa) => {
            let l = tokio::net::TcpListener::bind(sa).await.map_err(bind_err)?;
            on_ready();
            server
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(l),
                    shutdown,
                )
                .await
                .map_err(serve_err)
        }
        ListenAddr::Vsock(port) => {
            let l = VsockListener::bind(*port).map_err(bind_err)?;
            on_ready();
            let incoming = futures::stream::unfold(l, |l| async move {
                let r = l.accept().await;
                Some((r, l))
            });
            server
                .serve_with_incoming_shutdown(Box::pin(incoming), shutdown)
                .await
                .map_err(serve_err)
        }
    }
}

/// Registers an owned socket with the reactor.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd keeps its descriptor open and unchanged until dropped, and the
    // AsyncFd owns it from here on.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

/// A listening `AF_VSOCK` stream socket on any CID.
#[derive(Debug)]
pub struct VsockListener {
    fd: AsyncFd<OwnedFd>,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl VsockListener {
    /// Binds `port` on `VMADDR_CID_ANY` and listens.
    pub fn bind(port: u32) -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let raw = cvt(unsafe {
            libc::socket(
                libc::AF_VSOCK,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        })?;
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
        let mut sa: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        sa.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        sa.svm_cid = libc::VMADDR_CID_ANY;
        sa.svm_port = port;
        // SAFETY: `sa` is a valid sockaddr_vm and the length passed is its size.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_vm as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        // SAFETY: listen(2) on a descriptor we own.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
        Ok(VsockListener { fd: register(fd)? })
    }

    /// Accepts one connection.
    pub async fn accept(&self) -> io::Result<VsockStream> {
        loop {
            let mut guard = self.fd.readable().await?;
            let r = guard.try_io(|fd| {
                // SAFETY: accept4(2) with null address pointers is allowed; result checked.
                cvt(unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    )
                })
            });
            match r {
                Ok(Ok(raw)) => {
                    // SAFETY: accept4 returned a new descriptor that only we own.
                    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                    return Ok(VsockStream { fd: register(fd)? });
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// One accepted vsock connection.
#[derive(Debug)]
pub struct VsockStream {
    fd: AsyncFd<OwnedFd>,
}

impl tonic::transport::server::Connected for VsockStream {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let r = guard.try_io(|fd| {
                // SAFETY: reads at most `unfilled.len()` bytes into memory we own.
                let n = unsafe {
                    libc::read(
                        fd.as_raw_fd(),
                        unfilled.as_mut_ptr() as *mut libc::c_void,
                        unfilled.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let r = guard.try_io(|fd| {
                // SAFETY: writes at most `data.len()` bytes from a slice we borrow.
                let n = unsafe {
                    libc::write(
                        fd.as_raw_fd(),
                        data.as_ptr() as *const libc::c_void,
                        data.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown(2) on a descriptor we own.
        let r = unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) };
        Poll::Ready(cvt(r).map(|_| ()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn vsock_listener_binds_or_says_why() {
        // Without a vsock transport (no VM, no vsock_loopback) bind may fail; it must fail
        // with an error, and succeed where the kernel has AF_VSOCK.
        match VsockListener::bind(52_000) {
            Ok(l) => drop(l),
            Err(e) => assert!(e.raw_os_error().is_some(), "{e}"),
        }
    }
}
