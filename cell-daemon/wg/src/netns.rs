//! Network namespaces for tunnels: the namespace plumbing itself is `hive_sys::netns`
//! (re-exported here, as the connector and the tests reach it through this crate); this module
//! adds the veth pair that joins two namespaces in the tests and benches.
//!
//! A network namespace belongs to a thread, not a process, so work that must happen "inside"
//! (creating the TUN device, the UDP socket, netlink sockets) runs on a thread that `setns`-ed
//! first; threads it spawns (boringtun's workers) inherit the namespace.

use std::fs::File;
use std::io;
use std::path::Path;

pub use hive_sys::netns::{enter, run_in, NetNs, NETNS_DIR};

/// Errors entering or managing a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(transparent)]
    Sys(#[from] hive_sys::netns::Error),
    #[error("veth {iface}: {op}: {source}")]
    Veth {
        iface: String,
        op: String,
        #[source]
        source: io::Error,
    },
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
    use rtnetlink::{LinkUnspec, LinkVeth};

    let b_ns = File::open(b.netns).map_err(|source| hive_sys::netns::Error::Open {
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
        // A missing link answers as index 0, which the next request then refuses.
        Ok(hive_sys::netlink::link_index(nl, name)
            .await?
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
