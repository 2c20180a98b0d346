//! TUN and TAP devices through `/dev/net/tun` (`TUNSETIFF`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// Layer 3 (TUN: each read is one IP packet) or layer 2 (TAP: Ethernet frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `IFF_TUN`.
    Tun,
    /// `IFF_TAP`.
    Tap,
}

/// Errors opening a device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Interface names are at most 15 bytes (IFNAMSIZ with its NUL).
    #[error("interface name {0:?} must be 1..=15 bytes")]
    Name(String),
    /// `/dev/net/tun` could not be opened.
    #[error("open /dev/net/tun")]
    Open(#[source] io::Error),
    /// `TUNSETIFF` failed (name in use by another kind of link, no CAP_NET_ADMIN, ...).
    #[error("attach {mode:?} device {name} (TUNSETIFF)")]
    SetIff {
        /// Interface name.
        name: String,
        /// Kind asked for.
        mode: Mode,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Opens device `name` in the calling thread's network namespace, without packet information
/// headers (`IFF_NO_PI`), non-blocking and close-on-exec. A device that does not exist is
/// created and lives while the file does; a persistent one (`ip tuntap add`) is attached to.
pub fn open(name: &str, mode: Mode) -> Result<File, Error> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(Error::Name(name.to_string()));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(Error::Open)?;
    // SAFETY: `ifreq` is plain old data for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    let kind = match mode {
        Mode::Tun => libc::IFF_TUN,
        Mode::Tap => libc::IFF_TAP,
    };
    // The flags are a short in the kernel's struct; both constants fit in one.
    req.ifr_ifru.ifru_flags = (kind | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is and which outlives
    // the call; the descriptor is the tun control device opened above.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(Error::SetIff {
            name: name.to_string(),
            mode,
            source: io::Error::last_os_error(),
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_names() {
        for bad in ["", "0123456789abcdef"] {
            assert!(
                matches!(open(bad, Mode::Tun), Err(Error::Name(_))),
                "{bad:?}"
            );
        }
    }
}
