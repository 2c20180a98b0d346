//! A userspace veth: two TUN devices, one left in the cell's netns and one moved into the build
//! container's, with the daemon copying packets between their file descriptors.
//!
//! Why not a veth pair: the kernels Hive runs on here are built without `veth` (and `dummy`);
//! TUN is always there (`/dev/net/tun`), and so is everything a cell needs on top of a link
//! (routes, forwarding, nftables NAT). TUN is layer 3 (`IFF_TUN | IFF_NO_PI`): no MACs, no ARP,
//! each read is one IP packet. Where veth exists this could be swapped for it without changing
//! the addressing.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Errors making the pair.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("interface name {0:?} must be 1..=15 bytes")]
    Name(String),
    #[error("open /dev/net/tun")]
    Open(#[source] io::Error),
    #[error("create TUN device {name}")]
    Create {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("register TUN device {name} with the runtime")]
    Register {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// Creates a non-persistent TUN device `name` in the current netns; it lives while the fd does.
pub fn open_tun(name: &str) -> Result<OwnedFd, TunError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(TunError::Name(name.to_string()));
    }
    // SAFETY: open(2) of a constant NUL-terminated path; the result is checked.
    let raw = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(TunError::Open(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TUN | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq; IfReq has its layout (16-byte name,
    // then the flags union member, padded to the full 40 bytes).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if r < 0 {
        return Err(TunError::Create {
            name: name.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(fd)
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
