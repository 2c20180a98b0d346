//! A userspace veth: two TUN devices, one left in the cell's netns and one moved into the build
//! container's, with the daemon copying packets between their file descriptors.
//!
//! Why not a veth pair: the kernels Hive runs on here are built without `veth` (and `dummy`);
//! TUN is always there (`/dev/net/tun`), and so is everything a cell needs on top of a link
//! (routes, forwarding, nftables NAT). TUN is layer 3 (`IFF_TUN | IFF_NO_PI`): no MACs, no ARP,
//! each read is one IP packet. Where veth exists this could be swapped for it without changing
//! the addressing.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle;

/// Errors making the pair.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error(transparent)]
    Open(#[from] hive_sys::tun::Error),
    #[error("register TUN device {name} with the runtime")]
    Register {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// Creates a non-persistent TUN device `name` (layer 3, no packet information) in the current
/// netns; it lives while the fd does.
pub fn open_tun(name: &str) -> Result<OwnedFd, TunError> {
    Ok(hive_sys::tun::open(name, hive_sys::tun::Mode::Tun)?.into())
}

/// The two copy loops; dropping it stops them and closes both devices.
#[derive(Debug)]
pub struct Forwarder {
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn register(name: &str, fd: OwnedFd) -> Result<std::sync::Arc<AsyncFd<OwnedFd>>, TunError> {
    // SAFETY: an OwnedFd keeps its descriptor open and unchanged until dropped, and the
    // AsyncFd owns it from here on.
    unsafe { AsyncFd::register(fd) }
        .map(std::sync::Arc::new)
        .map_err(|e| TunError::Register {
            name: name.to_string(),
            source: e.into(),
        })
}

/// Starts copying packets both ways between `a` and `b`.
pub fn forward(a: (&str, OwnedFd), b: (&str, OwnedFd)) -> Result<Forwarder, TunError> {
    let fa = register(a.0, a.1)?;
    let fb = register(b.0, b.1)?;
    Ok(Forwarder {
        tasks: [
            tokio::spawn(copy(fa.clone(), fb.clone())),
            tokio::spawn(copy(fb, fa)),
        ],
    })
}

/// One direction. A packet that cannot be written at once is dropped, as a NIC would.
async fn copy(from: std::sync::Arc<AsyncFd<OwnedFd>>, to: std::sync::Arc<AsyncFd<OwnedFd>>) {
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok(mut guard) = from.readable().await else {
            return;
        };
        let r = guard.try_io(|fd| {
            // SAFETY: reads at most buf.len() bytes into a buffer we own.
            let n = unsafe {
                libc::read(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        let n = match r {
            Ok(Ok(0)) => return,
            Ok(Ok(n)) => n,
            // EIO: the other end's netns went away (device unregistered).
            Ok(Err(_)) => return,
            Err(_would_block) => continue,
        };
        // SAFETY: writes n bytes of the buffer we just filled.
        let _ = unsafe { libc::write(to.as_raw_fd(), buf.as_ptr() as *const libc::c_void, n) };
    }
}
