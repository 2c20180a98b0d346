//! One WireGuard interface in one network namespace: kernel WireGuard where the kernel has it,
//! else boringtun in this process, configured the same way (wireguard-control, plus `uapi` for
//! the private key and for reading state), with addresses, routes and link state set over
//! rtnetlink.
//!
//! Everything that must live in the target namespace (the TUN device, boringtun's UDP socket and
//! threads, the netlink sockets) is created on a worker thread that entered the namespace first
//! and stays there; the [`Tunnel`] handle sends it commands. The cell daemon uses one tunnel with
//! one peer (the connector); the connector uses one tunnel with a peer per running build.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use boringtun::device::{DeviceConfig, DeviceHandle};
use hive_sys::Backoff;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, LinkWireguard, RouteMessageBuilder};
use wireguard_control::{DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};
use zeroize::{Zeroize, Zeroizing};

use crate::keys::{KeyPair, PublicKey};
use crate::netns::{self, NetnsError};
use crate::prefix::Prefix;
use crate::uapi::{self, PeerState, UapiError};

/// Which WireGuard implementation to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// Kernel WireGuard if `ip link add type wireguard` works in the namespace, else boringtun.
    #[default]
    Auto,
    Kernel,
    Userspace,
}

/// The implementation a tunnel ended up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Kernel,
    /// boringtun, in this process, behind `/var/run/wireguard/<iface>.sock`.
    Userspace,
}

/// A peer of the interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub public_key: PublicKey,
    /// Where to send the first handshake; `None` for peers that call in (cells, seen from the
    /// connector).
    pub endpoint: Option<SocketAddr>,
    /// Source addresses accepted from the peer, and (outside the interface's own subnets)
    /// routed to it.
    pub allowed_ips: Vec<Prefix>,
    /// Seconds; keeps NAT state open and starts the handshake without waiting for traffic.
    pub persistent_keepalive: Option<u16>,
}

/// What [`Tunnel::up`] builds.
#[derive(Debug, Clone)]
pub struct TunnelSpec {
    /// Where the interface lives: `/run/netns/<name>` or `/proc/<pid>/ns/net`; `None`: the
    /// namespace of the calling process.
    pub netns: Option<PathBuf>,
    /// Where the encrypted side lives (the UDP socket; boringtun's threads), if not in `netns`.
    /// The interface is created here and moved into `netns`, so code in `netns` (a build) sees
    /// only the tunnel and has no route to the peer's endpoint or anything else outside.
    pub underlay_netns: Option<PathBuf>,
    /// Interface name. It also names boringtun's control socket, which is global to the machine
    /// (`/var/run/wireguard/<iface>.sock`), so it must be unique across namespaces.
    pub iface: String,
    /// UDP port; `None` picks a free one.
    pub listen_port: Option<u16>,
    /// Interface addresses with their subnet, e.g. `10.250.0.2/24`.
    pub addresses: Vec<Prefix>,
    pub peers: Vec<PeerSpec>,
    /// 1420 leaves room for WireGuard over IPv4/IPv6 on a 1500-byte path.
    pub mtu: u32,
    pub backend: BackendChoice,
}

impl TunnelSpec {
    /// A spec with no addresses or peers, MTU 1420, any port, automatic backend.
    pub fn new(iface: impl Into<String>) -> Self {
        Self {
            netns: None,
            underlay_netns: None,
            iface: iface.into(),
            listen_port: None,
            addresses: Vec::new(),
            peers: Vec::new(),
            mtu: 1420,
            backend: BackendChoice::Auto,
        }
    }

    /// Checks what the kernel or boringtun would reject less clearly.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_iface(&self.iface)?;
        if !(1280..=65535).contains(&self.mtu) {
            return Err(SpecError::Mtu(self.mtu));
        }
        if self.listen_port == Some(0) {
            return Err(SpecError::ListenPortZero);
        }
        let mut seen = std::collections::BTreeSet::new();
        for peer in &self.peers {
            validate_peer(peer)?;
            if !seen.insert(peer.public_key) {
                return Err(SpecError::DuplicatePeer(peer.public_key));
            }
        }
        Ok(())
    }
}

fn validate_iface(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SpecError::Iface(name.to_string()))
    }
}

fn validate_peer(peer: &PeerSpec) -> Result<(), SpecError> {
    if peer.allowed_ips.is_empty() {
        return Err(SpecError::NoAllowedIps(peer.public_key));
    }
    if let Some(p) = peer.allowed_ips.iter().find(|p| p.is_default()) {
        return Err(SpecError::DefaultRoute {
            peer: peer.public_key,
            prefix: *p,
        });
    }
    if peer.persistent_keepalive == Some(0) {
        return Err(SpecError::KeepaliveZero(peer.public_key));
    }
    Ok(())
}

/// A [`TunnelSpec`] or [`PeerSpec`] that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("interface name {0:?}: use 1-15 of [A-Za-z0-9_-]")]
    Iface(String),
    #[error("MTU {0}: must be 1280-65535")]
    Mtu(u32),
    #[error("listen port 0: leave it unset to pick a free port")]
    ListenPortZero,
    #[error("peer {0} is listed twice")]
    DuplicatePeer(PublicKey),
    #[error("peer {0} has no allowed IPs: it could never send anything")]
    NoAllowedIps(PublicKey),
    #[error(
        "peer {peer}: allowed IP {prefix} would route the tunnel's own packets into itself; \
         name the private prefixes instead"
    )]
    DefaultRoute { peer: PublicKey, prefix: Prefix },
    #[error("peer {0}: persistent keepalive 0; leave it unset to turn it off")]
    KeepaliveZero(PublicKey),
}

impl From<hive_sys::netns::Error> for TunnelError {
    fn from(e: hive_sys::netns::Error) -> Self {
        Self::Netns(e.into())
    }
}

/// Errors bringing up, changing or tearing down a tunnel; each names the interface.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("start the worker thread for {iface}: {source}")]
    Thread {
        iface: String,
        #[source]
        source: io::Error,
    },
    #[error("{iface}: start the netlink runtime: {source}")]
    Runtime {
        iface: String,
        #[source]
        source: io::Error,
    },
    #[error("{iface}: open a netlink socket: {source}")]
    NetlinkSocket {
        iface: String,
        #[source]
        source: io::Error,
    },
    #[error("{iface}: {op}: {source}")]
    Netlink {
        iface: String,
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{0}: an interface of that name already exists in the namespace")]
    Exists(String),
    #[error(
        "{iface}: {path} is the live control socket of another userspace tunnel of that name \
         (in some namespace); interface names must be unique on the machine"
    )]
    SocketInUse { iface: String, path: PathBuf },
    #[error("{iface}: kernel WireGuard is not available here: {source}")]
    NoKernelWireguard {
        iface: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{iface}: start boringtun: {source}")]
    Boringtun {
        iface: String,
        #[source]
        source: boringtun::device::Error,
    },
    #[error("{iface}: the interface vanished after it was created")]
    NoLink { iface: String },
    #[error("{iface}: {op} (wireguard-control): {source}")]
    Configure {
        iface: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Uapi(#[from] UapiError),
    #[error("{iface}: route {prefix} already exists in the namespace (another interface owns it)")]
    RouteExists { iface: String, prefix: Prefix },
    #[error("{iface}: peer {peer} is already configured")]
    PeerExists { iface: String, peer: PublicKey },
    #[error("{iface}: no handshake with {peer} within {waited:?}")]
    HandshakeTimeout {
        iface: String,
        peer: String,
        waited: Duration,
    },
    #[error("{iface}: the tunnel has no peer")]
    NoPeer { iface: String },
    #[error("{iface}: the tunnel's worker thread is gone (it panicked or the tunnel is down)")]
    Gone { iface: String },
}

type Reply<T> = mpsc::SyncSender<Result<T, TunnelError>>;

enum Command {
    AddPeer(PeerSpec, Reply<()>),
    RemovePeer(PublicKey, Reply<bool>),
    Peers(Reply<Vec<PeerState>>),
    Rearm(PublicKey, Reply<()>),
    AddAddress(Prefix, Reply<()>),
    SetKey(Zeroizing<[u8; 32]>, Reply<()>),
    Down(Reply<()>),
}

/// A WireGuard interface that is up. Dropping it tears it down (errors are logged); call
/// [`Tunnel::down`] to see them.
///
/// All methods block briefly (a round trip to the worker thread); from async code call them
/// through `spawn_blocking`.
pub struct Tunnel {
    iface: String,
    backend: Backend,
    listen_port: u16,
    keys: KeyPair,
    commands: Option<mpsc::Sender<Command>>,
    worker: Option<JoinHandle<()>>,
    /// New handshakes started by [`Tunnel::wait_handshake`] because none had completed yet.
    rearms: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("iface", &self.iface)
            .field("backend", &self.backend)
            .field("listen_port", &self.listen_port)
            .field("public_key", &self.keys.public())
            .finish()
    }
}

impl Tunnel {
    /// Creates the interface in `spec.netns` with `keys` and brings it up with its addresses,
    /// peers and routes. On error nothing is left behind.
    pub fn up(spec: TunnelSpec, keys: KeyPair) -> Result<Tunnel, TunnelError> {
        spec.validate()?;
        let iface = spec.iface.clone();
        let secret = keys.secret_bytes();
        let (commands, inbox) = mpsc::channel();
        let (ready_tx, ready) = mpsc::sync_channel(1);
        let worker = std::thread::Builder::new()
            .name(format!("wg-{iface}"))
            .spawn(move || worker(spec, secret, inbox, ready_tx))
            .map_err(|source| TunnelError::Thread {
                iface: iface.clone(),
                source,
            })?;
        match ready.recv() {
            Ok(Ok((backend, listen_port))) => {
                tracing::info!(%iface, ?backend, listen_port, public_key = %keys.public(), "tunnel up");
                Ok(Tunnel {
                    iface,
                    backend,
                    listen_port,
                    keys,
                    commands: Some(commands),
                    worker: Some(worker),
                    rearms: std::sync::atomic::AtomicU32::new(0),
                })
            }
            Ok(Err(e)) => {
                let _ = worker.join();
                Err(e)
            }
            Err(_) => {
                let _ = worker.join();
                Err(TunnelError::Gone { iface })
            }
        }
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// How many times waiting for a handshake started a new one (0: the first went through).
    pub fn rearms(&self) -> u32 {
        self.rearms.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The UDP port peers send to (in the tunnel's namespace).
    pub fn listen_port(&self) -> u16 {
        self.listen_port
    }

    /// This end's public key, the one thing about the key pair that may leave the process.
    pub fn public_key(&self) -> PublicKey {
        self.keys.public()
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, TunnelError> {
        let gone = || TunnelError::Gone {
            iface: self.iface.clone(),
        };
        let (tx, rx) = mpsc::sync_channel(1);
        self.commands
            .as_ref()
            .ok_or_else(gone)?
            .send(make(tx))
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }

    /// Adds a peer (the connector adds one per build) and routes to its allowed IPs.
    pub fn add_peer(&self, peer: PeerSpec) -> Result<(), TunnelError> {
        validate_peer(&peer)?;
        self.call(|r| Command::AddPeer(peer, r))
    }

    /// Adds an interface address (with its subnet, e.g. `10.250.0.7/24`) to a tunnel that is
    /// up; peers added later get no routes for prefixes inside that subnet. Lets a caller make
    /// the interface before it knows its address (the cell, while its key exchange runs).
    pub fn add_address(&self, addr: Prefix) -> Result<(), TunnelError> {
        self.call(|r| Command::AddAddress(addr, r))
    }

    /// Gives a tunnel that has no peer yet a new key pair; the old one is wiped. Lets a caller
    /// make the interface long before it makes the key (a warm cell makes `hwg0` with a key
    /// nobody ever learns, and sets the build's own key when the build asks for a tunnel).
    pub fn replace_key(&mut self, keys: KeyPair) -> Result<(), TunnelError> {
        let secret = keys.secret_bytes();
        self.call(|r| Command::SetKey(secret, r))?;
        self.keys = keys;
        Ok(())
    }

    /// Removes a peer and its routes; its sessions end at once and a handshake from its key is
    /// refused from then on. `Ok(false)` if there was no such peer.
    pub fn remove_peer(&self, key: &PublicKey) -> Result<bool, TunnelError> {
        let key = *key;
        self.call(|r| Command::RemovePeer(key, r))
    }

    /// The peers as the WireGuard device reports them.
    pub fn peers(&self) -> Result<Vec<PeerState>, TunnelError> {
        self.call(Command::Peers)
    }

    /// Waits until the first configured peer has completed a handshake; returns how long that
    /// took from the call. This is the cell's "tunnel is up" check.
    pub fn wait_handshake(&self, timeout: Duration) -> Result<Duration, TunnelError> {
        self.wait_for(None, timeout)
    }

    /// Waits for a handshake with one peer.
    pub fn wait_peer_handshake(
        &self,
        peer: &PublicKey,
        timeout: Duration,
    ) -> Result<Duration, TunnelError> {
        self.wait_for(Some(peer), timeout)
    }

    fn wait_for(
        &self,
        peer: Option<&PublicKey>,
        timeout: Duration,
    ) -> Result<Duration, TunnelError> {
        let start = Instant::now();
        let mut armed = start;
        let mut rearm = Backoff::new(REARM_FIRST, REARM_MAX);
        let mut rearm_after = rearm.next_delay();
        loop {
            let peers = self.peers()?;
            let state = match peer {
                Some(k) => peers.iter().find(|p| p.public_key == *k),
                None => peers.first(),
            };
            if peer.is_none() && state.is_none() {
                return Err(TunnelError::NoPeer {
                    iface: self.iface.clone(),
                });
            }
            if state.is_some_and(|p| p.last_handshake.is_some()) {
                return Ok(start.elapsed());
            }
            if let Some(p) = state {
                if armed.elapsed() >= rearm_after {
                    let key = p.public_key;
                    tracing::debug!(iface = %self.iface, peer = %key, after = ?rearm_after, "no handshake yet, starting a new one");
                    self.call(|r| Command::Rearm(key, r))?;
                    self.rearms
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    armed = Instant::now();
                    rearm_after = rearm.next_delay();
                }
            }
            if start.elapsed() >= timeout {
                return Err(TunnelError::HandshakeTimeout {
                    iface: self.iface.clone(),
                    peer: peer.map_or_else(|| "its peer".to_string(), |k| k.to_string()),
                    waited: start.elapsed(),
                });
            }
            // A handshake over a short path takes well under a millisecond: poll finely at
            // first, then back off.
            let pause = if start.elapsed() < Duration::from_millis(100) {
                Duration::from_micros(250)
            } else {
                Duration::from_millis(5)
            };
            std::thread::sleep(pause);
        }
    }

    /// Removes the interface (with its addresses and routes), stops boringtun and wipes the
    /// private key.
    pub fn down(mut self) -> Result<(), TunnelError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), TunnelError> {
        self.keys.wipe();
        let Some(commands) = self.commands.take() else {
            return Ok(());
        };
        let (tx, rx) = mpsc::sync_channel(1);
        let res = match commands.send(Command::Down(tx)) {
            Ok(()) => rx.recv().unwrap_or_else(|_| {
                Err(TunnelError::Gone {
                    iface: self.iface.clone(),
                })
            }),
            Err(_) => Err(TunnelError::Gone {
                iface: self.iface.clone(),
            }),
        };
        drop(commands);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
        tracing::info!(iface = %self.iface, ok = res.is_ok(), "tunnel down");
        res
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(iface = %self.iface, error = %e, "tearing down tunnel");
        }
    }
}

/// The worker thread: enter the namespace, build the device, then serve commands until `Down`
/// (or until the [`Tunnel`] is gone).
fn worker(
    spec: TunnelSpec,
    secret: Zeroizing<[u8; 32]>,
    inbox: mpsc::Receiver<Command>,
    ready: mpsc::SyncSender<Result<(Backend, u16), TunnelError>>,
) {
    let iface = spec.iface.clone();
    if let Some(ns) = spec.underlay_netns.as_ref().or(spec.netns.as_ref()) {
        if let Err(e) = netns::enter(ns) {
            let _ = ready.send(Err(e.into()));
            return;
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(source) => {
            let _ = ready.send(Err(TunnelError::Runtime { iface, source }));
            return;
        }
    };
    let created = rt.block_on(Device::create(&spec, secret));
    let mut dev = match created {
        Ok(dev) => dev,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if ready.send(Ok((dev.backend, dev.listen_port))).is_err() {
        let _ = rt.block_on(dev.teardown());
        return;
    }
    for command in inbox {
        match command {
            Command::AddPeer(peer, reply) => {
                let _ = reply.send(rt.block_on(dev.add_peer(peer)));
            }
            Command::RemovePeer(key, reply) => {
                let _ = reply.send(rt.block_on(dev.remove_peer(&key)));
            }
            Command::Peers(reply) => {
                let _ = reply.send(dev.peers());
            }
            Command::Rearm(key, reply) => {
                let _ = reply.send(dev.rearm(&key));
            }
            Command::AddAddress(addr, reply) => {
                let _ = reply.send(rt.block_on(dev.add_address(&addr)));
            }
            Command::SetKey(secret, reply) => {
                let _ = reply.send(dev.set_key(secret));
            }
            Command::Down(reply) => {
                let _ = reply.send(rt.block_on(dev.teardown()));
                return;
            }
        }
    }
    if let Err(e) = rt.block_on(dev.teardown()) {
        tracing::warn!(%iface, error = %e, "tearing down tunnel");
    }
}

/// The interface as the worker thread holds it.
struct Device {
    iface: String,
    name: InterfaceName,
    index: u32,
    backend: Backend,
    boringtun: Option<DeviceHandle>,
    nl: Handle,
    listen_port: u16,
    /// Subnets of the interface addresses: the kernel routes these itself.
    subnets: Vec<Prefix>,
    /// Routes we added, with how many peers need each.
    routes: BTreeMap<Prefix, usize>,
    peers: BTreeMap<PublicKey, PeerSpec>,
}

/// The UDP discard service: where handshake kicks go.
const DISCARD_PORT: u16 = 9;

/// How long a waiting cell lets its first handshake attempt run before it starts a new one;
/// doubled (and jittered) after each attempt (up to [`REARM_MAX`]) so that a path slower than this still
/// gets a handshake through.
const REARM_FIRST: Duration = Duration::from_millis(250);
const REARM_MAX: Duration = Duration::from_secs(2);

/// How long boringtun's threads get to let go of the TUN device before we delete it ourselves.
const USERSPACE_EXIT_WAIT: Duration = Duration::from_secs(2);

impl Device {
    async fn create(spec: &TunnelSpec, secret: Zeroizing<[u8; 32]>) -> Result<Device, TunnelError> {
        let iface = spec.iface.clone();
        let name: InterfaceName = iface.parse().map_err(|_| SpecError::Iface(iface.clone()))?;
        let (conn, nl, _) =
            rtnetlink::new_connection().map_err(|source| TunnelError::NetlinkSocket {
                iface: iface.clone(),
                source,
            })?;
        tokio::spawn(conn);
        if link_index(&nl, &iface).await?.is_some() {
            return Err(TunnelError::Exists(iface));
        }
        let (backend, boringtun) = match spec.backend {
            BackendChoice::Userspace => (Backend::Userspace, Some(start_boringtun(&iface)?)),
            BackendChoice::Kernel => {
                add_kernel_link(&nl, &iface).await.map_err(|source| {
                    TunnelError::NoKernelWireguard {
                        iface: iface.clone(),
                        source,
                    }
                })?;
                (Backend::Kernel, None)
            }
            BackendChoice::Auto => match add_kernel_link(&nl, &iface).await {
                Ok(()) => (Backend::Kernel, None),
                Err(e) if errno(&e) == Some(libc_eopnotsupp()) => {
                    tracing::debug!(%iface, "no kernel WireGuard, using boringtun");
                    (Backend::Userspace, Some(start_boringtun(&iface)?))
                }
                Err(source) => {
                    return Err(TunnelError::Netlink {
                        iface,
                        op: "create WireGuard link".into(),
                        source,
                    })
                }
            },
        };
        let mut dev = Device {
            iface: iface.clone(),
            name,
            index: 0,
            backend,
            boringtun,
            nl,
            listen_port: 0,
            subnets: spec.addresses.iter().map(Prefix::network).collect(),
            routes: BTreeMap::new(),
            peers: BTreeMap::new(),
        };
        let mut configured = dev.move_to_interface_netns(spec).await;
        if configured.is_ok() {
            configured = dev.configure(spec, secret).await;
        }
        match configured {
            Ok(()) => Ok(dev),
            Err(e) => {
                if let Err(te) = dev.teardown().await {
                    tracing::warn!(%iface, error = %te, "cleanup after a failed tunnel up");
                }
                Err(e)
            }
        }
    }

    /// With an underlay namespace: moves the new link into the interface namespace and moves
    /// this worker thread after it, so that all later configuration (netlink, kernel WireGuard
    /// genetlink, handshake kicks) happens where the interface is. Sockets made so far (the
    /// WireGuard UDP socket, boringtun's threads) stay in the underlay.
    async fn move_to_interface_netns(&mut self, spec: &TunnelSpec) -> Result<(), TunnelError> {
        let (Some(_), Some(inner)) = (&spec.underlay_netns, &spec.netns) else {
            return Ok(());
        };
        let target = std::fs::File::open(inner).map_err(|source| {
            NetnsError::from(hive_sys::netns::Error::Open {
                path: inner.clone(),
                source,
            })
        })?;
        let index =
            link_index(&self.nl, &self.iface)
                .await?
                .ok_or_else(|| TunnelError::NoLink {
                    iface: self.iface.clone(),
                })?;
        self.nl
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .setns_by_fd(std::os::fd::AsRawFd::as_raw_fd(&target))
                    .build(),
            )
            .execute()
            .await
            .map_err(self.netlink_err(format!("move into {}", inner.display())))?;
        netns::enter(inner)?;
        let (conn, nl, _) =
            rtnetlink::new_connection().map_err(|source| TunnelError::NetlinkSocket {
                iface: self.iface.clone(),
                source,
            })?;
        tokio::spawn(conn);
        self.nl = nl;
        Ok(())
    }

    fn wc_backend(&self) -> wireguard_control::Backend {
        match self.backend {
            Backend::Kernel => wireguard_control::Backend::Kernel,
            Backend::Userspace => wireguard_control::Backend::Userspace,
        }
    }

    fn configure_err(&self, op: &'static str) -> impl FnOnce(io::Error) -> TunnelError {
        let iface = self.iface.clone();
        move |source| TunnelError::Configure { iface, op, source }
    }

    fn netlink_err(&self, op: String) -> impl FnOnce(rtnetlink::Error) -> TunnelError {
        let iface = self.iface.clone();
        move |source| TunnelError::Netlink { iface, op, source }
    }

    async fn configure(
        &mut self,
        spec: &TunnelSpec,
        secret: Zeroizing<[u8; 32]>,
    ) -> Result<(), TunnelError> {
        self.index =
            link_index(&self.nl, &self.iface)
                .await?
                .ok_or_else(|| TunnelError::NoLink {
                    iface: self.iface.clone(),
                })?;
        self.write_key(&secret)?;
        drop(secret);
        if let Some(port) = spec.listen_port {
            DeviceUpdate::new()
                .set_listen_port(port)
                .apply(&self.name, self.wc_backend())
                .map_err(self.configure_err("set listen port"))?;
        }
        // One peer per request: boringtun 0.7 carries `remove`, `endpoint` and keepalive over
        // from one peer section of a UAPI request into the next.
        for peer in &spec.peers {
            DeviceUpdate::new()
                .add_peer(peer_config(peer))
                .apply(&self.name, self.wc_backend())
                .map_err(self.configure_err("add peer"))?;
        }
        self.nl
            .link()
            .set(
                LinkUnspec::new_with_index(self.index)
                    .mtu(spec.mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(self.netlink_err(format!("set MTU {} and bring up", spec.mtu)))?;
        for addr in &spec.addresses {
            self.add_address(addr).await?;
        }
        for peer in &spec.peers {
            self.add_routes(&peer.allowed_ips).await?;
            self.peers.insert(peer.public_key, peer.clone());
        }
        self.listen_port = match spec.listen_port {
            Some(port) => port,
            None => self.read_listen_port()?,
        };
        for peer in &spec.peers {
            self.kick(peer);
        }
        Ok(())
    }

    fn write_key(&self, secret: &[u8; 32]) -> Result<(), TunnelError> {
        match self.backend {
            Backend::Userspace => uapi::set_private_key(&self.iface, secret)?,
            // wireguard-control keeps its own copy of the key inside the update it consumes and
            // does not wipe it; the netlink route is the only one it offers.
            Backend::Kernel => DeviceUpdate::new()
                .set_private_key(Key(*secret))
                .apply(&self.name, wireguard_control::Backend::Kernel)
                .map_err(self.configure_err("set private key"))?,
        }
        Ok(())
    }

    /// A new private key, before any peer: a peer's sessions would belong to the old one.
    fn set_key(&mut self, secret: Zeroizing<[u8; 32]>) -> Result<(), TunnelError> {
        if !self.peers.is_empty() {
            return Err(TunnelError::Configure {
                iface: self.iface.clone(),
                op: "replace the key",
                source: io::Error::other(
                    "the tunnel already has peers; a key is replaced only before the first",
                ),
            });
        }
        self.write_key(&secret)
    }

    async fn add_address(&mut self, addr: &Prefix) -> Result<(), TunnelError> {
        let mut req = self
            .nl
            .address()
            .add(self.index, addr.addr(), addr.prefix_len());
        // A tunnel has one peer per address and no link layer: duplicate address detection
        // would only leave a fresh IPv6 address "tentative" (unbindable) for a second or so
        // after `up` returns.
        use rtnetlink::packet_route::address::{
            AddressAttribute, AddressFlags, AddressHeaderFlags,
        };
        let msg = req.message_mut();
        msg.header.flags |= AddressHeaderFlags::Nodad;
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        req.execute()
            .await
            .map_err(self.netlink_err(format!("add address {addr}")))?;
        let subnet = addr.network();
        if !self.subnets.contains(&subnet) {
            self.subnets.push(subnet);
        }
        Ok(())
    }

    fn read_listen_port(&self) -> Result<u16, TunnelError> {
        let port = match self.backend {
            Backend::Userspace => uapi::get(&self.iface)?.listen_port,
            Backend::Kernel => {
                let mut dev =
                    wireguard_control::Device::get(&self.name, wireguard_control::Backend::Kernel)
                        .map_err(self.configure_err("read the device"))?;
                if let Some(k) = dev.private_key.as_mut() {
                    k.0.zeroize();
                }
                dev.listen_port
            }
        };
        Ok(port.unwrap_or(0))
    }

    async fn add_peer(&mut self, peer: PeerSpec) -> Result<(), TunnelError> {
        if self.peers.contains_key(&peer.public_key) {
            return Err(TunnelError::PeerExists {
                iface: self.iface.clone(),
                peer: peer.public_key,
            });
        }
        DeviceUpdate::new()
            .add_peer(peer_config(&peer))
            .apply(&self.name, self.wc_backend())
            .map_err(self.configure_err("add peer"))?;
        if let Err(e) = self.add_routes(&peer.allowed_ips).await {
            let _ = DeviceUpdate::new()
                .remove_peer_by_key(&Key(*peer.public_key.as_bytes()))
                .apply(&self.name, self.wc_backend());
            return Err(e);
        }
        tracing::debug!(iface = %self.iface, peer = %peer.public_key, "peer added");
        self.kick(&peer);
        self.peers.insert(peer.public_key, peer);
        Ok(())
    }

    async fn remove_peer(&mut self, key: &PublicKey) -> Result<bool, TunnelError> {
        let Some(allowed) = self.peers.get(key).map(|p| p.allowed_ips.clone()) else {
            return Ok(false);
        };
        DeviceUpdate::new()
            .remove_peer_by_key(&Key(*key.as_bytes()))
            .apply(&self.name, self.wc_backend())
            .map_err(self.configure_err("remove peer"))?;
        self.peers.remove(key);
        self.remove_routes(&allowed).await?;
        tracing::debug!(iface = %self.iface, peer = %key, "peer removed");
        Ok(true)
    }

    /// Starts a handshake with a peer we call (one with an endpoint) now, instead of at its
    /// first packet: boringtun, unlike kernel WireGuard, sends nothing on its own until the
    /// first persistent-keepalive interval has passed. Any packet routed to the peer starts the
    /// handshake, so an empty UDP datagram goes to the discard port (9) of the network address
    /// of its first allowed prefix; it is delivered (and dropped) once the session is up.
    fn kick(&self, peer: &PeerSpec) {
        if peer.endpoint.is_none() {
            return;
        }
        let Some(target) = peer.allowed_ips.first().map(Prefix::network) else {
            return;
        };
        let bind: SocketAddr = match target.addr() {
            IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sent = std::net::UdpSocket::bind(bind)
            .and_then(|s| s.send_to(&[], (target.addr(), DISCARD_PORT)));
        if let Err(e) = sent {
            tracing::debug!(iface = %self.iface, peer = %peer.public_key, error = %e, "handshake kick");
        }
    }

    /// Drops a peer's half-done handshake and starts a new one. WireGuard retries a lost
    /// initiation only after 5 s (REKEY_TIMEOUT); a cell waiting for its tunnel does not wait
    /// that long when the first initiation raced the connector being told about it.
    fn rearm(&mut self, key: &PublicKey) -> Result<(), TunnelError> {
        // Only the side that calls (has an endpoint) re-arms: on the answering side this would
        // throw away the caller's handshake in progress.
        let Some(peer) = self
            .peers
            .get(key)
            .filter(|p| p.endpoint.is_some())
            .cloned()
        else {
            return Ok(());
        };
        // Two requests: in one, boringtun would apply `remove` to the re-added peer too.
        DeviceUpdate::new()
            .remove_peer_by_key(&Key(*key.as_bytes()))
            .apply(&self.name, self.wc_backend())
            .map_err(self.configure_err("re-arm peer (remove)"))?;
        DeviceUpdate::new()
            .add_peer(peer_config(&peer))
            .apply(&self.name, self.wc_backend())
            .map_err(self.configure_err("re-arm peer (add)"))?;
        self.kick(&peer);
        Ok(())
    }

    fn peers(&self) -> Result<Vec<PeerState>, TunnelError> {
        match self.backend {
            Backend::Userspace => Ok(uapi::get(&self.iface)?.peers),
            Backend::Kernel => {
                let mut dev =
                    wireguard_control::Device::get(&self.name, wireguard_control::Backend::Kernel)
                        .map_err(self.configure_err("read the device"))?;
                if let Some(k) = dev.private_key.as_mut() {
                    k.0.zeroize();
                }
                Ok(dev
                    .peers
                    .into_iter()
                    .map(|p| PeerState {
                        public_key: PublicKey::from_bytes(p.config.public_key.0),
                        endpoint: p.config.endpoint,
                        allowed_ips: p
                            .config
                            .allowed_ips
                            .iter()
                            .filter_map(|a| Prefix::new(a.address, a.cidr))
                            .collect(),
                        persistent_keepalive: p.config.persistent_keepalive_interval,
                        last_handshake: p
                            .stats
                            .last_handshake_time
                            .filter(|t| *t > SystemTime::UNIX_EPOCH),
                        rx_bytes: p.stats.rx_bytes,
                        tx_bytes: p.stats.tx_bytes,
                    })
                    .collect())
            }
        }
    }

    /// Routes the prefixes that the interface's own subnets do not already cover.
    async fn add_routes(&mut self, prefixes: &[Prefix]) -> Result<(), TunnelError> {
        let mut added = Vec::new();
        for prefix in prefixes.iter().map(Prefix::network) {
            if self.subnets.iter().any(|s| s.contains(&prefix)) {
                continue;
            }
            if let Some(n) = self.routes.get_mut(&prefix) {
                *n += 1;
                continue;
            }
            let res = self
                .nl
                .route()
                .add(route_message(prefix, self.index))
                .execute()
                .await;
            match res {
                Ok(()) => {
                    self.routes.insert(prefix, 1);
                    added.push(prefix);
                }
                Err(e) => {
                    // Leave no half-routed peer behind.
                    self.remove_routes(&added).await.ok();
                    return Err(if errno(&e) == Some(nix::errno::Errno::EEXIST as i32) {
                        TunnelError::RouteExists {
                            iface: self.iface.clone(),
                            prefix,
                        }
                    } else {
                        TunnelError::Netlink {
                            iface: self.iface.clone(),
                            op: format!("add route {prefix}"),
                            source: e,
                        }
                    });
                }
            }
        }
        Ok(())
    }

    async fn remove_routes(&mut self, prefixes: &[Prefix]) -> Result<(), TunnelError> {
        for prefix in prefixes.iter().map(Prefix::network) {
            let Some(n) = self.routes.get_mut(&prefix) else {
                continue;
            };
            *n -= 1;
            if *n > 0 {
                continue;
            }
            self.routes.remove(&prefix);
            let res = self
                .nl
                .route()
                .del(route_message(prefix, self.index))
                .execute()
                .await;
            match res {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(nix::errno::Errno::ESRCH as i32) => {}
                Err(source) => {
                    return Err(TunnelError::Netlink {
                        iface: self.iface.clone(),
                        op: format!("delete route {prefix}"),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Removes the interface; addresses and routes go with it. For boringtun, its threads are
    /// told to exit and the TUN device disappears when they let go of it.
    async fn teardown(&mut self) -> Result<(), TunnelError> {
        self.peers.clear();
        self.routes.clear();
        if let Some(handle) = self.boringtun.take() {
            // Dropping the handle signals exit and removes the UAPI socket; waiting for the
            // device to vanish means its UDP port is free again when we return.
            drop(handle);
            let deadline = Instant::now() + USERSPACE_EXIT_WAIT;
            while Instant::now() < deadline {
                if link_index(&self.nl, &self.iface).await?.is_none() {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tracing::warn!(iface = %self.iface, "boringtun did not release the TUN device; deleting it");
        }
        let Some(index) = link_index(&self.nl, &self.iface).await? else {
            return Ok(());
        };
        match self.nl.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(nix::errno::Errno::ENODEV as i32) => Ok(()),
            Err(source) => Err(TunnelError::Netlink {
                iface: self.iface.clone(),
                op: "delete the interface".into(),
                source,
            }),
        }
    }
}

fn start_boringtun(iface: &str) -> Result<DeviceHandle, TunnelError> {
    // boringtun replaces whatever sits at the socket path, which would silently take over the
    // control socket of a same-named tunnel in another namespace. A stale file is fine.
    let path = uapi::socket_path(iface);
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        return Err(TunnelError::SocketInUse {
            iface: iface.to_string(),
            path,
        });
    }
    let config = DeviceConfig {
        // One build's traffic: two threads are plenty and keep 50 tunnels cheap.
        n_threads: 2,
        use_connected_socket: true,
        use_multi_queue: false,
        uapi_fd: -1,
    };
    DeviceHandle::new(iface, config).map_err(|source| TunnelError::Boringtun {
        iface: iface.to_string(),
        source,
    })
}

async fn add_kernel_link(nl: &Handle, iface: &str) -> Result<(), rtnetlink::Error> {
    nl.link()
        .add(LinkWireguard::new(iface).build())
        .execute()
        .await
}

fn libc_eopnotsupp() -> i32 {
    nix::errno::Errno::EOPNOTSUPP as i32
}

fn peer_config(peer: &PeerSpec) -> PeerConfigBuilder {
    let mut b = PeerConfigBuilder::new(&Key(*peer.public_key.as_bytes())).replace_allowed_ips();
    if let Some(ep) = peer.endpoint {
        b = b.set_endpoint(ep);
    }
    if let Some(k) = peer.persistent_keepalive {
        b = b.set_persistent_keepalive_interval(k);
    }
    for ip in &peer.allowed_ips {
        let net = ip.network();
        b = b.add_allowed_ip(net.addr(), net.prefix_len());
    }
    b
}

fn route_message(prefix: Prefix, index: u32) -> rtnetlink::packet_route::route::RouteMessage {
    match prefix.addr() {
        IpAddr::V4(a) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
            .destination_prefix(a, prefix.prefix_len())
            .output_interface(index)
            .scope(RouteScope::Link)
            .build(),
        IpAddr::V6(a) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
            .destination_prefix(a, prefix.prefix_len())
            .output_interface(index)
            .scope(RouteScope::Link)
            .build(),
    }
}

/// The positive errno of a netlink error reply.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

async fn link_index(nl: &Handle, iface: &str) -> Result<Option<u32>, TunnelError> {
    hive_sys::netlink::link_index(nl, iface)
        .await
        .map_err(|source| TunnelError::Netlink {
            iface: iface.to_string(),
            op: "look up the link".into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerSpec {
        PeerSpec {
            public_key: KeyPair::generate().public(),
            endpoint: None,
            allowed_ips: vec!["10.20.0.0/16".parse().unwrap()],
            persistent_keepalive: Some(25),
        }
    }

    #[test]
    fn spec_validation_names_the_problem() {
        let mut s = TunnelSpec::new("wg-cell-0123456789");
        assert!(matches!(s.validate(), Err(SpecError::Iface(_))));
        s.iface = "wg/../x".into();
        assert!(matches!(s.validate(), Err(SpecError::Iface(_))));
        s.iface = "hwg0".into();
        s.validate().unwrap();
        s.mtu = 100;
        assert!(s.validate().unwrap_err().to_string().contains("MTU 100"));
        s.mtu = 1420;
        let p = peer();
        s.peers = vec![p.clone(), p.clone()];
        assert!(matches!(s.validate(), Err(SpecError::DuplicatePeer(_))));
        let mut bad = p.clone();
        bad.allowed_ips.clear();
        s.peers = vec![bad];
        assert!(matches!(s.validate(), Err(SpecError::NoAllowedIps(_))));
        let mut bad = p.clone();
        bad.allowed_ips.push("0.0.0.0/0".parse().unwrap());
        s.peers = vec![bad];
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("0.0.0.0/0"), "{e}");
        let mut bad = p;
        bad.persistent_keepalive = Some(0);
        s.peers = vec![bad];
        assert!(matches!(s.validate(), Err(SpecError::KeepaliveZero(_))));
        s.peers.clear();
        s.listen_port = Some(0);
        assert!(matches!(s.validate(), Err(SpecError::ListenPortZero)));
    }
}
