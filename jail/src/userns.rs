//! User namespaces for sandbox cells: root in a cell is an unprivileged uid range on the box.
//!
//! A sandbox cell's user namespace maps its ids `0..count` to the box's `host_base..host_base +
//! count` (a range the box claimed for that cell alone). The box makes the namespace before the
//! cell's network namespace ([`create_netns`]), so that network namespace is owned by it: the cell
//! daemon, root only inside, can still configure its own links and firewall, and the box's code
//! that fills the netns (veth, addresses, routes) works unchanged as real root. The jail later
//! finds the user namespace again through the netns ([`owner_of`]) and enters it.
//!
//! Files the cell must see as its own (the shared read-only images) are bound through idmapped
//! mounts ([`idmapped_clone`]): host uid 0 shows as the cell's root without a copy or a chown.
//! Nothing here maps host root into a cell.
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Ids a sandbox cell's user namespace maps: 0..65535, the whole range a Debian image uses
/// (root, system users, the build user 1000, nobody 65534).
pub const CELL_IDS: u32 = 65536;

/// `ioctl(NS_GET_USERNS)`: the user namespace owning a namespace file (`_IO(0xb7, 0x1)`).
const NS_GET_USERNS: libc::c_ulong = 0xb701;

// The new mount API (open_tree, mount_setattr, move_mount); values from linux/mount.h.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// The id mapping of one cell: inside ids `0..count` are host ids `host_base..host_base+count`
/// (uids and gids alike).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IdMap {
    /// Host id of the cell's root.
    pub host_base: u32,
    /// How many ids are mapped.
    pub count: u32,
}

impl IdMap {
    /// The map of the cell in `slot` of a box whose cells' ranges start at `first`.
    pub fn for_slot(first: u32, slot: u32) -> Option<IdMap> {
        let host_base = slot.checked_mul(CELL_IDS)?.checked_add(first)?;
        let map = IdMap {
            host_base,
            count: CELL_IDS,
        };
        map.validate().ok().map(|()| map)
    }

    /// Never host root, never past the last uid.
    pub fn validate(&self) -> Result<(), String> {
        if self.host_base == 0 || self.count == 0 {
            return Err(format!(
                "id map {} +{}: must not map host root and must map at least one id",
                self.host_base, self.count
            ));
        }
        match self.host_base.checked_add(self.count) {
            Some(end) if end < u32::MAX => Ok(()),
            _ => Err(format!(
                "id map {} +{} runs past the last id",
                self.host_base, self.count
            )),
        }
    }

    /// The host id of inside id `id`.
    pub fn host(&self, id: u32) -> Option<u32> {
        (id < self.count).then(|| self.host_base + id)
    }

    /// The line for `/proc/PID/uid_map` and `gid_map`.
    pub fn line(&self) -> String {
        format!("0 {} {}\n", self.host_base, self.count)
    }
}

/// What failed making or using a cell's user namespace.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum UsernsError {
    #[error("invalid id map: {0}")]
    Map(String),
    #[error("make a pipe")]
    Pipe(#[source] io::Error),
    #[error("fork the namespace holder")]
    Fork(#[source] io::Error),
    #[error("unshare a user and network namespace")]
    Unshare(#[source] io::Error),
    #[error("write {path}")]
    WriteMap {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pin the network namespace at {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("find the user namespace owning {path}")]
    Owner {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("clone the mount of {path}")]
    OpenTree {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("idmap the mount of {path}")]
    SetAttr {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("attach the mount at {path}")]
    MoveMount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn pipe() -> Result<(OwnedFd, OwnedFd), UsernsError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given, which has room for two.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(UsernsError::Pipe(io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just made by pipe2 and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Makes a network namespace owned by a new user namespace with `map`, and pins it at `pin`
/// (a bind mount of its ns file, as `ip netns add` does). Blocking; fine from a multi-threaded
/// process: the forked child makes only raw system calls and never returns into Rust code.
pub fn create_netns(pin: &Path, map: IdMap) -> Result<(), UsernsError> {
    map.validate().map_err(UsernsError::Map)?;
    let pin_err = |source| UsernsError::Pin {
        path: pin.to_path_buf(),
        source,
    };
    if let Some(dir) = pin.parent() {
        fs::create_dir_all(dir).map_err(pin_err)?;
    }
    if pin.exists() {
        let _ = nix::mount::umount2(pin, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_file(pin);
    }
    fs::File::create(pin).map_err(pin_err)?;
    // child -> parent: the errno of unshare (0: done); parent -> child: EOF means "exit now".
    let (ready_r, ready_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    // SAFETY: the child only calls async-signal-safe system calls (unshare, write, read, _exit)
    // on descriptors made above, then exits without unwinding or allocating; the parent keeps
    // running normally.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let _ = fs::remove_file(pin);
        return Err(UsernsError::Fork(io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: raw system calls in the forked child on descriptors it inherited; see above.
        unsafe {
            // Every descriptor but its own two pipe ends, duplicated by fork: the parent's
            // ends, and those of any other create_netns under way on another thread (whose
            // child would then never see EOF while this one waits, nor this one while that
            // one waits: both hang for good, holding the box's claim lock too).
            let (a, b) = {
                let (x, y) = (ready_w.as_raw_fd() as u32, go_r.as_raw_fd() as u32);
                (x.min(y), x.max(y))
            };
            let close_range = |first: u32, last: u32| {
                if first <= last {
                    libc::syscall(libc::SYS_close_range, first, last, 0u32);
                }
            };
            close_range(3, a.saturating_sub(1));
            close_range(a + 1, b - 1);
            close_range(b + 1, u32::MAX);
            let rc = libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET);
            let errno: i32 = if rc == 0 {
                0
            } else {
                *libc::__errno_location()
            };
            let bytes = errno.to_ne_bytes();
            libc::write(ready_w.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
            let mut b = 0u8;
            libc::read(go_r.as_raw_fd(), (&mut b as *mut u8).cast(), 1);
            libc::_exit(0);
        }
    }
    drop(ready_w);
    drop(go_r);
    let result = (|| {
        let mut buf = [0u8; 4];
        let mut reader = fs::File::from(ready_r);
        io::Read::read_exact(&mut reader, &mut buf).map_err(UsernsError::Unshare)?;
        let errno = i32::from_ne_bytes(buf);
        if errno != 0 {
            return Err(UsernsError::Unshare(io::Error::from_raw_os_error(errno)));
        }
        for file in ["uid_map", "gid_map"] {
            let path = PathBuf::from(format!("/proc/{pid}/{file}"));
            fs::write(&path, map.line())
                .map_err(|source| UsernsError::WriteMap { path, source })?;
        }
        nix::mount::mount(
            Some(Path::new(&format!("/proc/{pid}/ns/net"))),
            pin,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| pin_err(e.into()))
    })();
    drop(go_w);
    let mut status = 0;
    // SAFETY: waits for the child forked above, which exits as soon as its pipe closed.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if result.is_err() {
        let _ = nix::mount::umount2(pin, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_file(pin);
    }
    result
}

/// The user namespace owning the namespace file `ns`.
pub fn owner_of(ns: &Path) -> Result<OwnedFd, UsernsError> {
    let err = |source| UsernsError::Owner {
        path: ns.to_path_buf(),
        source,
    };
    let f = fs::File::open(ns).map_err(err)?;
    // SAFETY: NS_GET_USERNS takes no argument and returns a new descriptor or -1.
    let fd = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_USERNS) };
    if fd < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: the descriptor was just returned by the kernel and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The `(inside, outside, count)` lines of a `/proc/PID/uid_map` text.
pub fn parse_map(text: &str) -> Vec<(u32, u32, u32)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace().map(|w| w.parse::<u32>().ok());
            Some((it.next()??, it.next()??, it.next()??))
        })
        .collect()
}

/// A detached copy of the mount tree at `source` whose files appear through `userns`'s mapping
/// (host uid 0 is the namespace's root), read-only, nosuid and nodev when `readonly`. Attach it
/// with [`attach`].
pub fn idmapped_clone(
    source: &Path,
    userns: BorrowedFd<'_>,
    readonly: bool,
) -> Result<OwnedFd, UsernsError> {
    let c = std::ffi::CString::new(source.as_os_str().as_encoded_bytes()).map_err(|_| {
        UsernsError::OpenTree {
            path: source.to_path_buf(),
            source: io::Error::from_raw_os_error(libc::EINVAL),
        }
    })?;
    // SAFETY: open_tree reads the NUL-terminated path and returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_RECURSIVE,
        )
    };
    if fd < 0 {
        return Err(UsernsError::OpenTree {
            path: source.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: the descriptor was just returned by the kernel and is owned by nothing else.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut set = MOUNT_ATTR_IDMAP;
    if readonly {
        set |= MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    }
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: mount_setattr reads `attr` (size given) and the empty path; both outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        return Err(UsernsError::SetAttr {
            path: source.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(tree)
}

/// Attaches a detached mount (from [`idmapped_clone`]) at `target`, an existing file or directory.
pub fn attach(tree: impl AsFd, target: &Path) -> Result<(), UsernsError> {
    let err = |source| UsernsError::MoveMount {
        path: target.to_path_buf(),
        source,
    };
    let c = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|_| err(io::Error::from_raw_os_error(libc::EINVAL)))?;
    let empty = c"";
    // SAFETY: move_mount reads two NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_fd().as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_maps_are_disjoint_and_never_root() {
        let a = IdMap::for_slot(1 << 28, 0).unwrap();
        let b = IdMap::for_slot(1 << 28, 1).unwrap();
        assert_eq!(a.host_base + a.count, b.host_base);
        assert_eq!(b.host(1000), Some((1 << 28) + CELL_IDS + 1000));
        assert_eq!(b.host(CELL_IDS), None);
        assert!(
            IdMap::for_slot(0, 0).is_none(),
            "host root must never be mapped"
        );
        assert!(IdMap::for_slot(u32::MAX - 10, 0).is_none());
        assert!(IdMap::for_slot(1 << 28, u32::MAX).is_none());
        assert_eq!(a.line(), format!("0 {} 65536\n", 1u32 << 28));
        assert_eq!(
            parse_map("         0  268435456      65536\n"),
            vec![(0, 1 << 28, 65536)]
        );
    }
}
