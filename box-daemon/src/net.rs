//! Box networking: one network namespace per cell, a veth to the box, NAT for public egress and a
//! firewall that keeps cells away from the box, each other, the control plane and private ranges.
//!
//! Links, addresses and routes go through rtnetlink (a netlink socket opened inside the cell's
//! namespace configures its side); the firewall is one nftables table per box, loaded by running
//! `nft -f -` with a ruleset text. Each cell's box-side veth is an element of the table's `cells`
//! set, so a cell is covered by the rules exactly while it exists. Each cell gets a /30 out of the
//! cell subnet: the box side is .1, the cell's `eth0` .2, the cell's default route points at .1.
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;

use hive_types::Prefix;
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

pub use hive_sys::netns::NETNS_DIR;

/// Destinations no cell may reach (besides the box itself, which the input chain covers).
pub const PRIVATE_RANGES: [&str; 7] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "127.0.0.0/8",
    "224.0.0.0/4",
];

/// Whether `ip` lies in one of [`PRIVATE_RANGES`] (blocked for cells already).
pub fn in_private_range(ip: Ipv4Addr) -> bool {
    PRIVATE_RANGES.iter().any(|r| {
        let Some((net, len)) = r.split_once('/') else {
            return false;
        };
        match (net.parse::<Ipv4Addr>(), len.parse::<u32>()) {
            (Ok(net), Ok(len)) => {
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                u32::from(ip) & mask == u32::from(net) & mask
            }
            _ => false,
        }
    })
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid IPv4 subnet {0:?} (want A.B.C.D/N with N between 8 and 30)")]
    Subnet(String),
    #[error("open a netlink socket{}", ns.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    Netlink {
        ns: Option<PathBuf>,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Netns(#[from] hive_sys::netns::Error),
    #[error("make the cell's user and network namespaces")]
    Userns(#[source] hive_jail::userns::UsernsError),
    #[error("enter network namespace {path}")]
    EnterNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} (link {link})")]
    Link {
        what: &'static str,
        link: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("link {0} not found")]
    NoLink(String),
    #[error(transparent)]
    Nft(#[from] hive_sys::nft::Error),
    #[error("enable IPv4 forwarding")]
    Forwarding(#[source] io::Error),
    #[error("run ip tuntap (TAP {tap})")]
    TapSpawn {
        tap: String,
        #[source]
        source: io::Error,
    },
    #[error("create TAP {tap}: {stderr}")]
    Tap { tap: String, stderr: String },
}

fn link_err(what: &'static str, link: &str) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let link = link.to_string();
    move |source| NetError::Link { what, link, source }
}

/// An IPv4 prefix (`100.96.0.0/16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl FromStr for Subnet {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = || NetError::Subnet(s.to_string());
        let p: Prefix = s.parse().map_err(|_| bad())?;
        let (IpAddr::V4(base), prefix) = (p.addr(), p.prefix_len()) else {
            return Err(bad());
        };
        if !(8..=30).contains(&prefix) || p.network() != p {
            return Err(bad());
        }
        Ok(Subnet { base, prefix })
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl Subnet {
    /// How many /30 cell links fit.
    pub fn slots(&self) -> u32 {
        1 << (30 - self.prefix)
    }

    /// (box side, cell side) addresses of slot `i`.
    pub fn slot(&self, i: u32) -> Option<(Ipv4Addr, Ipv4Addr)> {
        if i >= self.slots() {
            return None;
        }
        let net = u32::from(self.base) + i * 4;
        Some((Ipv4Addr::from(net + 1), Ipv4Addr::from(net + 2)))
    }
}

/// Opens an rtnetlink connection whose socket lives in the namespace at `ns` (None: the box's).
///
/// A socket belongs to the namespace of the thread that created it, so a short-lived thread enters
/// the namespace, creates the socket and exits; pooled threads are never moved between namespaces.
pub async fn netlink(ns: Option<&Path>) -> Result<Handle, NetError> {
    let err = |source| NetError::Netlink {
        ns: ns.map(Path::to_path_buf),
        source,
    };
    let Some(ns) = ns else {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(err)?;
        tokio::spawn(conn);
        return Ok(handle);
    };
    let path = ns.to_path_buf();
    let rt = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let res = hive_sys::netns::enter(&path)
            .map_err(io::Error::other)
            .and_then(|()| {
                let _guard = rt.enter();
                rtnetlink::new_connection()
            });
        let _ = tx.send(res);
    });
    let (conn, handle, _) = rx
        .await
        .map_err(|_| err(io::Error::other("netlink thread died")))?
        .map_err(err)?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Creates a named network namespace at `<NETNS_DIR>/<name>`, pinned by a bind mount.
pub async fn create_netns(name: &str) -> Result<PathBuf, NetError> {
    let name = name.to_string();
    // Making a namespace can take the kernel a while: not on a runtime thread.
    tokio::task::spawn_blocking(move || hive_sys::netns::create(&name))
        .await
        .map_err(|e| {
            NetError::Netns(hive_sys::netns::Error::Create {
                path: Path::new(NETNS_DIR).to_path_buf(),
                step: "join the set-up task",
                source: io::Error::other(e),
            })
        })?
        .map_err(NetError::from)
}

/// Unpins and removes a named network namespace; missing is fine.
pub fn delete_netns(path: &Path) {
    hive_sys::netns::unpin(path);
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, NetError> {
    hive_sys::netlink::link_index(handle, name)
        .await
        .map_err(link_err("look up link", name))
}

/// Whether a link by that name exists in the box's namespace.
pub async fn link_exists(name: &str) -> Result<bool, NetError> {
    let handle = netlink(None).await?;
    Ok(link_index(&handle, name).await?.is_some())
}

/// Box-wide network set-up: forwarding, the nftables table and its rules.
#[derive(Debug, Clone)]
pub struct BoxNet {
    pub table: String,
    pub subnet: Subnet,
    /// Extra addresses cells must not reach (the control plane's, when it is not private).
    pub blocked: Vec<Ipv4Addr>,
}

impl BoxNet {
    /// The ruleset text (one table, replaced atomically on load).
    pub fn ruleset(&self) -> String {
        let mut blocked: Vec<String> = PRIVATE_RANGES.iter().map(|s| s.to_string()).collect();
        blocked.extend(self.blocked.iter().map(|a| a.to_string()));
        let t = &self.table;
        format!(
            "table inet {t} {{}}\n\
             delete table inet {t}\n\
             table inet {t} {{\n\
             \tset cells {{ type ifname; }}\n\
             \tset blocked {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {blocked} }} }}\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\tiifname @cells drop\n\
             \t}}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tiifname @cells oifname @cells drop\n\
             \t\toifname @cells ct state established,related accept\n\
             \t\toifname @cells drop\n\
             \t\tiifname @cells meta nfproto ipv6 drop\n\
             \t\tiifname @cells ip daddr @blocked drop\n\
             \t\tiifname @cells accept\n\
             \t}}\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {subnet} oifname != @cells masquerade\n\
             \t}}\n\
             }}\n",
            blocked = blocked.join(", "),
            subnet = self.subnet,
        )
    }

    pub fn setup(&self) -> Result<(), NetError> {
        fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(NetError::Forwarding)?;
        nft(&self.ruleset(), &format!("load table inet {}", self.table))
    }

    pub fn teardown(&self) -> Result<(), NetError> {
        nft(
            &format!(
                "table inet {t} {{}}\ndelete table inet {t}\n",
                t = self.table
            ),
            &format!("delete table inet {}", self.table),
        )
    }

    /// Adds addresses to the set cells must not reach, in the running table (the control
    /// plane's name now resolves to a new address). Only ever adds: an address that was the
    /// control plane's stays blocked.
    pub fn block(&self, addrs: &[Ipv4Addr]) -> Result<(), NetError> {
        if addrs.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = addrs.iter().map(Ipv4Addr::to_string).collect();
        nft(
            &format!(
                "add element inet {} blocked {{ {} }}\n",
                self.table,
                list.join(", ")
            ),
            &format!("block {}", list.join(", ")),
        )
    }

    /// Whether cells are blocked from `addr` (tests).
    pub fn is_blocked(&self, addr: Ipv4Addr) -> bool {
        std::process::Command::new("nft")
            .args([
                "get",
                "element",
                "inet",
                &self.table,
                "blocked",
                &format!("{{ {addr} }}"),
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn add_cell(&self, veth: &str) -> Result<(), NetError> {
        nft(
            &format!("add element inet {} cells {{ \"{veth}\" }}\n", self.table),
            &format!("add {veth} to cells"),
        )
    }

    fn remove_cell(&self, veth: &str) -> Result<(), NetError> {
        nft(
            &format!(
                "delete element inet {} cells {{ \"{veth}\" }}\n",
                self.table
            ),
            &format!("remove {veth} from cells"),
        )
    }

    /// Whether `veth` is in the table's cells set (tests, reaper).
    pub fn has_cell(&self, veth: &str) -> bool {
        hive_sys::nft::set_contains("inet", &self.table, "cells", veth)
    }

    /// Builds one cell's network: netns, veth pair, addresses, routes, firewall membership.
    pub async fn create_cell(&self, names: &CellNetNames, slot: u32) -> Result<CellNet, NetError> {
        self.create_cell_owned(names, slot, None).await
    }

    /// [`BoxNet::create_cell`] with the cell's netns owned by a new user namespace mapped by
    /// `owner` (a sandbox cell's: its root then configures its own network, root of nothing
    /// else). None: the box's own user namespace owns it.
    pub async fn create_cell_owned(
        &self,
        names: &CellNetNames,
        slot: u32,
        owner: Option<hive_jail::userns::IdMap>,
    ) -> Result<CellNet, NetError> {
        let (box_ip, cell_ip) = self
            .subnet
            .slot(slot)
            .ok_or_else(|| NetError::Subnet(format!("{} has no slot {slot}", self.subnet)))?;
        let net = CellNet {
            names: names.clone(),
            box_ip,
            cell_ip,
            netns: Path::new(NETNS_DIR).join(&names.netns),
        };
        match self.build_cell(&net, owner).await {
            Ok(()) => Ok(net),
            Err(e) => {
                self.destroy_cell(&net.names).await;
                Err(e)
            }
        }
    }

    async fn build_cell(
        &self,
        net: &CellNet,
        owner: Option<hive_jail::userns::IdMap>,
    ) -> Result<(), NetError> {
        let names = &net.names;
        match owner {
            None => {
                create_netns(&names.netns).await?;
            }
            Some(map) => {
                let pin = net.netns.clone();
                tokio::task::spawn_blocking(move || hive_jail::userns::create_netns(&pin, map))
                    .await
                    .map_err(|e| {
                        NetError::Userns(hive_jail::userns::UsernsError::Fork(io::Error::other(e)))
                    })?
                    .map_err(NetError::Userns)?;
            }
        }
        let host = netlink(None).await?;
        let ns_file = fs::File::open(&net.netns).map_err(|source| NetError::EnterNetns {
            path: net.netns.clone(),
            source,
        })?;
        // The peer is made inside the cell's netns: moving a link there afterwards costs the
        // kernel a network-wide synchronisation under its global netlink lock (15-50 ms here),
        // which every other cell's and build's link changes would wait behind.
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(names.peer.clone())
            .setns_by_fd(std::os::fd::AsRawFd::as_raw_fd(&ns_file))
            .build();
        host.link()
            .add(
                LinkVeth::new(&names.veth, &names.peer)
                    .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                    .build(),
            )
            .execute()
            .await
            .map_err(link_err(
                "create veth pair (its peer inside the cell's netns)",
                &format!("{} / {} in {}", names.veth, names.peer, net.netns.display()),
            ))?;
        let veth = link_index(&host, &names.veth)
            .await?
            .ok_or_else(|| NetError::NoLink(names.veth.clone()))?;
        host.address()
            .add(veth, IpAddr::V4(net.box_ip), 30)
            .execute()
            .await
            .map_err(link_err("add box-side address", &names.veth))?;
        host.link()
            .set(LinkUnspec::new_with_index(veth).up().build())
            .execute()
            .await
            .map_err(link_err("bring up", &names.veth))?;

        let cell = netlink(Some(&net.netns)).await?;
        let lo = link_index(&cell, "lo")
            .await?
            .ok_or_else(|| NetError::NoLink("lo".into()))?;
        cell.link()
            .set(LinkUnspec::new_with_index(lo).up().build())
            .execute()
            .await
            .map_err(link_err("bring up", "lo"))?;
        let eth = link_index(&cell, &names.peer)
            .await?
            .ok_or_else(|| NetError::NoLink(names.peer.clone()))?;
        cell.link()
            .set(
                LinkUnspec::new_with_index(eth)
                    .name("eth0".to_string())
                    .build(),
            )
            .execute()
            .await
            .map_err(link_err("rename to eth0", &names.peer))?;
        cell.address()
            .add(eth, IpAddr::V4(net.cell_ip), 30)
            .execute()
            .await
            .map_err(link_err("add cell address", "eth0"))?;
        cell.link()
            .set(LinkUnspec::new_with_index(eth).up().build())
            .execute()
            .await
            .map_err(link_err("bring up", "eth0"))?;
        cell.route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(net.box_ip)
                    .build(),
            )
            .execute()
            .await
            .map_err(link_err("add default route", "eth0"))?;
        self.add_cell(&names.veth)
    }

    /// Removes everything `create_cell` may have made; each part may already be gone.
    pub async fn destroy_cell(&self, names: &CellNetNames) {
        if self.has_cell(&names.veth) {
            if let Err(e) = self.remove_cell(&names.veth) {
                tracing::warn!(error = %hive_sys::error_chain(&e), "firewall cleanup");
            }
        }
        if let Ok(host) = netlink(None).await {
            for name in [&names.veth, &names.peer] {
                if let Ok(Some(idx)) = link_index(&host, name).await {
                    // Deleting one end of a veth deletes the other.
                    let _ = host.link().del(idx).execute().await;
                }
            }
        }
        delete_netns(&Path::new(NETNS_DIR).join(&names.netns));
    }
}

/// The TAP a microVM cell's VMM attaches to, inside the cell's network namespace (one per netns,
/// so the name is the same in every cell).
pub const CELL_TAP: &str = "tap0";
/// The microVM guest's link: a /30 on the TAP, netns side `.1` (the guest's gateway), guest `.2`.
/// Link-local, so it never collides with a destination a build may want; every cell uses the same
/// one because each lives in its own namespace. (The cell daemon's build container link inside
/// the guest is 169.254.200.0/30, so this must differ from that.)
pub const GUEST_LINK_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 100, 1);
/// The guest's address on [`CELL_TAP`] (see [`GUEST_LINK_GATEWAY`]).
pub const GUEST_LINK_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 100, 2);
/// Prefix length of the guest link.
pub const GUEST_LINK_PREFIX: u8 = 30;

/// nftables table inside a microVM cell's netns: forward the guest's traffic out of `eth0` under
/// the cell's own address (masquerade), answer nothing to the guest on the netns itself. The box's
/// table then treats that traffic exactly like a sandbox cell's (same veth, same /30 source).
fn guest_link_ruleset(tap: &str) -> String {
    format!(
        "table ip hive_cell {{}}\n\
         delete table ip hive_cell\n\
         table ip hive_cell {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"{tap}\" drop\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy drop;\n\
         \t\tiifname \"{tap}\" oifname \"eth0\" accept\n\
         \t\tiifname \"eth0\" oifname \"{tap}\" ct state established,related accept\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"eth0\" masquerade\n\
         \t}}\n\
         }}\n"
    )
}

/// Runs `f` on a throw-away thread inside the network namespace at `ns` (pooled threads are never
/// moved between namespaces; processes `f` spawns inherit the namespace).
async fn in_netns<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce() -> Result<T, NetError> + Send + 'static,
) -> Result<T, NetError> {
    let path = ns.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let res = hive_sys::netns::enter(&path)
            .map_err(NetError::from)
            .and_then(|()| f());
        let _ = tx.send(res);
    });
    rx.await.map_err(|_| NetError::EnterNetns {
        path: ns.to_path_buf(),
        source: io::Error::other("netns thread died"),
    })?
}

/// Makes the microVM guest's link in a cell's namespace (built by [`BoxNet::create_cell`]): a
/// persistent TAP `tap` (IFF_TAP | IFF_NO_PI, what the VMM attaches to) owned by `owner_uid`,
/// so the VMM running as that uid attaches without CAP_NET_ADMIN; [`GUEST_LINK_GATEWAY`]/30 on
/// it, forwarding on and the masquerade table of [`guest_link_ruleset`].
pub async fn create_guest_link(ns: &Path, tap: &str, owner_uid: u32) -> Result<(), NetError> {
    let tap_name = tap.to_string();
    in_netns(ns, move || {
        let owner = owner_uid.to_string();
        let out = Command::new("ip")
            .args([
                "tuntap", "add", "dev", &tap_name, "mode", "tap", "user", &owner,
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|source| NetError::TapSpawn {
                tap: tap_name.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(NetError::Tap {
                tap: tap_name,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        // Per namespace: this thread is in the cell's, so this is the cell's ip_forward.
        fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(NetError::Forwarding)?;
        nft(
            &guest_link_ruleset(&tap_name),
            &format!("guest link table for {tap_name}"),
        )
    })
    .await?;
    let handle = netlink(Some(ns)).await?;
    let idx = link_index(&handle, tap)
        .await?
        .ok_or_else(|| NetError::NoLink(tap.to_string()))?;
    handle
        .address()
        .add(idx, IpAddr::V4(GUEST_LINK_GATEWAY), GUEST_LINK_PREFIX)
        .execute()
        .await
        .map_err(link_err("add guest link address", tap))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await
        .map_err(link_err("bring up", tap))?;
    Ok(())
}

/// Deletes the TAP `tap` in the namespace at `ns`; a missing namespace or TAP is fine (the TAP
/// also goes when its namespace does, once no process holds it).
pub async fn delete_tap(ns: &Path, tap: &str) {
    if !ns.exists() {
        return;
    }
    if let Ok(handle) = netlink(Some(ns)).await {
        if let Ok(Some(idx)) = link_index(&handle, tap).await {
            let _ = handle.link().del(idx).execute().await;
        }
    }
}

/// Whether a link named `name` exists in the namespace at `ns` (tests, inspection).
pub async fn link_exists_in(ns: &Path, name: &str) -> Result<bool, NetError> {
    let handle = netlink(Some(ns)).await?;
    Ok(link_index(&handle, name).await?.is_some())
}

/// Names of one cell's network objects, derived from the cell id so the reaper can find them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CellNetNames {
    pub netns: String,
    /// Box side, `hv-<id>` (an interface name has at most 15 bytes; cell ids are 12).
    pub veth: String,
    /// Cell side before it is moved and renamed `eth0`.
    pub peer: String,
}

impl CellNetNames {
    pub fn for_cell(cell_id: &str) -> Self {
        CellNetNames {
            netns: format!("hive-{cell_id}"),
            veth: format!("hv-{cell_id}"),
            peer: format!("hc-{cell_id}"),
        }
    }
}

/// A cell's network as built.
#[derive(Debug, Clone)]
pub struct CellNet {
    pub names: CellNetNames,
    pub box_ip: Ipv4Addr,
    pub cell_ip: Ipv4Addr,
    pub netns: PathBuf,
}

fn nft(ruleset: &str, what: &str) -> Result<(), NetError> {
    Ok(hive_sys::nft::apply(ruleset, what)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_parses_and_slots() {
        let s: Subnet = "100.96.0.0/16".parse().unwrap();
        assert_eq!(s.slots(), 16384);
        assert_eq!(
            s.slot(0),
            Some((Ipv4Addr::new(100, 96, 0, 1), Ipv4Addr::new(100, 96, 0, 2)))
        );
        assert_eq!(
            s.slot(65),
            Some((Ipv4Addr::new(100, 96, 1, 5), Ipv4Addr::new(100, 96, 1, 6)))
        );
        assert_eq!(s.slot(16384), None);
    }

    #[test]
    fn subnet_rejects_bad_input() {
        for bad in [
            "100.96.0.0",
            "100.96.0.1/16",
            "x/16",
            "10.0.0.0/31",
            "10.0.0.0/4",
        ] {
            let e = bad.parse::<Subnet>().unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn private_ranges_are_recognised() {
        for ip in [
            "10.1.2.3",
            "127.0.0.1",
            "192.168.9.9",
            "100.96.0.5",
            "172.31.255.255",
        ] {
            assert!(in_private_range(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["203.0.113.7", "8.8.8.8", "172.32.0.1", "100.128.0.1"] {
            assert!(!in_private_range(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn names_fit_interface_limit() {
        let n = CellNetNames::for_cell("0123456789ab");
        assert!(n.veth.len() <= 15 && n.peer.len() <= 15);
    }

    #[test]
    fn ruleset_mentions_every_private_range() {
        let b = BoxNet {
            table: "hive_t".into(),
            subnet: "100.96.0.0/16".parse().unwrap(),
            blocked: vec![Ipv4Addr::new(198, 18, 5, 5)],
        };
        let r = b.ruleset();
        for range in PRIVATE_RANGES {
            assert!(r.contains(range));
        }
        assert!(r.contains("198.18.5.5"));
        assert!(r.contains("ip saddr 100.96.0.0/16"));
    }

    /// A new address of the control plane is added to the running table's block set, beside
    /// what was there (real nftables; needs root).
    #[test]
    fn block_adds_to_the_running_table() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIPPED block_adds_to_the_running_table: needs root (nftables)");
            return;
        }
        let b = BoxNet {
            table: format!("hive_t_blk{}", std::process::id()),
            subnet: "100.96.250.0/24".parse().unwrap(),
            blocked: vec![Ipv4Addr::new(198, 18, 5, 5)],
        };
        b.setup().expect("load the table");
        let new = Ipv4Addr::new(203, 0, 113, 77);
        assert!(b.is_blocked(Ipv4Addr::new(198, 18, 5, 5)));
        assert!(!b.is_blocked(new), "not blocked before");
        b.block(&[new]).expect("block");
        assert!(b.is_blocked(new), "blocked after");
        assert!(
            b.is_blocked(Ipv4Addr::new(198, 18, 5, 5)),
            "the old one stays"
        );
        b.block(&[new]).expect("blocking again is harmless");
        b.teardown().expect("teardown");
    }
}
