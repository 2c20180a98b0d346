//! Network namespaces: run code inside one (on a thread of its own), and named namespaces
//! pinned under `/run/netns` for the connector and the tests.
//!
//! A network namespace belongs to a thread, not a process, so work that must happen "inside"
//! (creating the TUN device, the UDP socket, netlink sockets) runs on a thread that `setns`-ed
//! first; threads it spawns (boringtun's workers) inherit the namespace.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::mount::{umount2, MntFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Where `ip netns` (and we) pin named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Errors entering or managing a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("enter network namespace {path}: {source}")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("create network namespace {path}: {step}: {source}")]
    Create {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("network namespace name {0:?}: use 1-64 of [A-Za-z0-9_.-]")]
    BadName(String),
    #[error("veth {iface}: {op}: {source}")]
    Veth {
        iface: String,
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("thread for network namespace {path} panicked")]
    ThreadPanicked { path: PathBuf },
}

/// Moves the calling thread into the namespace at `path`. Only call this on a thread you own.
pub fn enter(path: &Path) -> Result<(), NetnsError> {
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs `f` on a fresh thread inside the namespace at `path` and returns its result.
pub fn run_in<T, F>(path: &Path, f: F) -> Result<T, NetnsError>
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
        .map_err(|_| NetnsError::ThreadPanicked {
            path: path.to_path_buf(),
        })?
    })
}

/// A named network namespace, `/run/netns/<name>`; removed (unpinned) on drop.
#[derive(Debug)]
pub struct NetNs {
    path: PathBuf,
}

impl NetNs {
    /// Creates a new, empty namespace (only `lo`, down). A stale pin of the same name is
    /// replaced.
    pub fn create(name: &str) -> Result<Self, NetnsError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !valid {
            return Err(NetnsError::BadName(name.to_string()));
        }
        let path = Path::new(NETNS_DIR).join(name);
        let err = |step, source| NetnsError::Create {
            path: path.clone(),
            step,
            source,
        };
        std::fs::create_dir_all(NETNS_DIR).map_err(|e| err("create /run/netns", e))?;
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
            Ok(Ok(())) => Ok(Self { path }),
            Ok(Err((step, source))) => {
                let _ = std::fs::remove_file(&path);
                Err(err(step, source))
            }
            Err(_) => {
                let _ = std::fs::remove_file(&path);
                Err(NetnsError::ThreadPanicked { path })
            }
        }
    }

    /// The pin path, usable with [`run_in`] and `Tunnel::up`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        unpin(&self.path);
    }
}

/// Unmounts and removes a pin; the namespace itself goes when its last user does.
fn unpin(path: &Path) {
    if let Err(e) = umount2(path, MntFlags::MNT_DETACH) {
        tracing::debug!(path = %path.display(), error = %e, "unmount netns pin");
    }
    if let Err(e) = std::fs::remove_file(path) {
        tracing::debug!(path = %path.display(), error = %e, "remove netns pin");
    }
}

/// One end of a veth pair: its namespace, name and address.
#[derive(Debug, Clone)]
pub struct VethEnd<'a> {
    pub netns: &'a Path,
    pub iface: &'a str,
    pub address: crate::Prefix,
}

/// Joins two namespaces with a veth pair, addresses both ends and brings them (and `lo` in both
/// namespaces) up. The pair is made inside `a`'s namespace so the caller's is never touched; it
/// goes away with either namespace.
pub fn link_veth(a: &VethEnd<'_>, b: &VethEnd<'_>) -> Result<(), NetnsError> {
    use futures::TryStreamExt as _;
    use rtnetlink::{LinkUnspec, LinkVeth};

    let b_ns = File::open(b.netns).map_err(|source| NetnsError::Open {
        path: b.netns.to_path_buf(),
        source,
    })?;
    let err = |iface: &str, op: &str| {
        let iface = iface.to_string();
        let op = op.to_string();
        move |e: rtnetlink::Error| NetnsError::Veth {
            iface,
            op,
            source: io::Error::other(e.to_string()),
        }
    };
    let io_err = |iface: &str, op: &str| {
        let iface = iface.to_string();
        let op = op.to_string();
        move |source: io::Error| NetnsError::Veth { iface, op, source }
    };
    async fn index(nl: &rtnetlink::Handle, name: &str) -> Result<u32, rtnetlink::Error> {
        let mut links = nl.link().get().match_name(name.to_string()).execute();
        Ok(links
            .try_next()
            .await?
            .map(|l| l.header.index)
            .unwrap_or_default())
    }
    async fn bring_up(
        nl: &rtnetlink::Handle,
        name: &str,
        addr: Option<crate::Prefix>,
    ) -> Result<(), rtnetlink::Error> {
        let idx = index(nl, name).await?;
        if let Some(addr) = addr {
            nl.address()
                .add(idx, addr.addr(), addr.prefix_len())
                .execute()
                .await?;
        }
        nl.link()
            .set(LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
    }
    let runtime = |iface: &str| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io_err(iface, "start a netlink runtime"))
    };
    run_in(a.netns, || -> Result<(), NetnsError> {
        runtime(a.iface)?.block_on(async {
            let (conn, nl, _) =
                rtnetlink::new_connection().map_err(io_err(a.iface, "open netlink"))?;
            tokio::spawn(conn);
            nl.link()
                .add(LinkVeth::new(a.iface, b.iface).build())
                .execute()
                .await
                .map_err(err(a.iface, "create"))?;
            let peer = index(&nl, b.iface).await.map_err(err(b.iface, "look up"))?;
            nl.link()
                .set(
                    LinkUnspec::new_with_index(peer)
                        .setns_by_fd(std::os::fd::AsRawFd::as_raw_fd(&b_ns))
                        .build(),
                )
                .execute()
                .await
                .map_err(err(b.iface, "move into the other namespace"))?;
            bring_up(&nl, "lo", None)
                .await
                .map_err(err("lo", "bring up"))?;
            bring_up(&nl, a.iface, Some(a.address))
                .await
                .map_err(err(a.iface, "address and bring up"))
        })
    })??;
    run_in(b.netns, || -> Result<(), NetnsError> {
        runtime(b.iface)?.block_on(async {
            let (conn, nl, _) =
                rtnetlink::new_connection().map_err(io_err(b.iface, "open netlink"))?;
            tokio::spawn(conn);
            bring_up(&nl, "lo", None)
                .await
                .map_err(err("lo", "bring up"))?;
            bring_up(&nl, b.iface, Some(b.address))
                .await
                .map_err(err(b.iface, "address and bring up"))
        })
    })?
}
