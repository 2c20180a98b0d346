//! Network namespaces: named ones pinned under [`NETNS_DIR`] (the `ip netns` convention, so
//! operators can inspect them), and running code inside one.
//!
//! A network namespace belongs to a thread, not a process: work that must happen "inside"
//! (a TUN device, a socket, a netlink connection) runs on a thread of its own that entered the
//! namespace first, and pooled threads are never moved between namespaces.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::mount::{umount2, MntFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Where named namespaces are pinned.
pub const NETNS_DIR: &str = "/run/netns";

/// Errors entering or managing a namespace.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The namespace file could not be opened.
    #[error("open network namespace {path}")]
    Open {
        /// The namespace file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `setns` refused it.
    #[error("enter network namespace {path}")]
    Enter {
        /// The namespace file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// One step of making a named namespace failed.
    #[error("create network namespace {path}: {step}")]
    Create {
        /// The pin.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The name is not one `ip netns` would accept as a file name.
    #[error("network namespace name {0:?}: use 1-64 of [A-Za-z0-9_.-]")]
    BadName(String),
    /// The thread working inside the namespace panicked or vanished.
    #[error("thread for network namespace {path} died")]
    ThreadDied {
        /// The namespace file.
        path: PathBuf,
    },
}

/// Moves the calling thread into the namespace at `path`. Only call this on a thread you own.
pub fn enter(path: &Path) -> Result<(), Error> {
    let file = File::open(path).map_err(|source| Error::Open {
        path: path.to_path_buf(),
        source,
    })?;
    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| Error::Enter {
        path: path.to_path_buf(),
        source: e.into(),
    })
}

/// Runs `f` on a fresh thread inside the namespace at `path` and returns its result. Threads
/// and processes `f` starts inherit the namespace.
pub fn run_in<T, F>(path: &Path, f: F) -> Result<T, Error>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(path)?;
            Ok(f())
        })
        .join()
        .map_err(|_| Error::ThreadDied {
            path: path.to_path_buf(),
        })?
    })
}

/// Creates a new, empty namespace (only `lo`, down) pinned at `<NETNS_DIR>/<name>` and returns
/// the pin. A stale pin of the same name (from a crashed run) is replaced. Blocks for as long as
/// the kernel takes to make a namespace.
pub fn create(name: &str) -> Result<PathBuf, Error> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !valid {
        return Err(Error::BadName(name.to_string()));
    }
    let path = Path::new(NETNS_DIR).join(name);
    let err = |step, source| Error::Create {
        path: path.clone(),
        step,
        source,
    };
    std::fs::create_dir_all(NETNS_DIR).map_err(|e| err("create /run/netns", e))?;
    // A stale pin would make the bind mount below fail with EPERM.
    if path.exists() {
        unpin(&path);
    }
    File::create(&path).map_err(|e| err("create the pin file", e))?;
    let target = path.clone();
    // unshare() moves the calling thread, so a throw-away thread makes the namespace and
    // bind-mounts its own ns file onto the pin before it ends.
    let res = std::thread::spawn(move || -> Result<(), (&'static str, io::Error)> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(|e| ("unshare(CLONE_NEWNET)", e.into()))?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| ("bind mount /proc/thread-self/ns/net", e.into()))
    })
    .join();
    match res {
        Ok(Ok(())) => Ok(path),
        Ok(Err((step, source))) => {
            let _ = std::fs::remove_file(&path);
            Err(err(step, source))
        }
        Err(_) => {
            let _ = std::fs::remove_file(&path);
            Err(Error::ThreadDied { path })
        }
    }
}

/// Unmounts and removes a pin; missing is fine. The namespace itself goes when its last user
/// does.
pub fn unpin(path: &Path) {
    if let Err(e) = umount2(path, MntFlags::MNT_DETACH) {
        tracing::debug!(path = %path.display(), error = %e, "unmount netns pin");
    }
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::debug!(path = %path.display(), error = %e, "remove netns pin");
        }
    }
}

/// A named namespace that is unpinned when dropped.
#[derive(Debug)]
pub struct NetNs {
    path: PathBuf,
}

impl NetNs {
    /// Creates it (see [`create`]).
    pub fn create(name: &str) -> Result<Self, Error> {
        create(name).map(|path| Self { path })
    }

    /// The pin path, usable with [`run_in`] and [`enter`].
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        unpin(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_names_that_are_not_file_names() {
        for bad in ["", ".", "..", "a/b", "x y", &"n".repeat(65)] {
            assert!(matches!(create(bad), Err(Error::BadName(_))), "{bad:?}");
        }
    }

    #[test]
    fn creates_enters_and_unpins() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIPPED: creating a network namespace needs root");
            return;
        }
        let name = format!("hsys-t-{}", std::process::id());
        let ns = NetNs::create(&name).expect("create");
        let path = ns.path().to_path_buf();
        assert!(path.exists());
        let inside = run_in(&path, || {
            std::fs::read_link("/proc/thread-self/ns/net").unwrap()
        })
        .expect("run inside");
        let outside = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        assert_ne!(inside, outside, "the closure ran in the caller's namespace");
        drop(ns);
        assert!(!path.exists());
    }
}
