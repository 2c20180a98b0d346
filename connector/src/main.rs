//! `hive-connector`: the customer-side WireGuard peer of one Hive private network.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use clap::Parser;
use hive_proto::v1::connector_client::ConnectorClient;
use hive_proto::v1::connector_command::Cmd;
use hive_proto::v1::connector_message::Msg;
use hive_proto::v1::{AddPeer, ConnectorHello, ConnectorMessage, PeerApplied};
use hive_sys::Backoff;
use hive_wg::{KeyPair, PeerSpec, Prefix, PublicKey, Tunnel, TunnelSpec};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing_subscriber::EnvFilter;
use zeroize::Zeroizing;

/// The connector of a Hive private network.
///
/// Runs at the edge of a customer network. Holds the connector's long-lived WireGuard key (in
/// --key-file, created 0600 if missing; the one secret of the system that is stored, and only
/// here, on the customer's side), keeps a stream open to the control plane's key exchange, and
/// adds or removes one WireGuard peer per running private-network build as it is told.
///
/// Setting up a connector:
///   1. hive-connector --key-file /etc/hive/connector.key --print-public-key
///   2. hivectl network add NET --prefix 10.20.0.0/16
///      hivectl connector add NET --endpoint PUBLIC_HOST:51820 --public-key <key from 1>
///      (prints the token, once)
///   3. hive-connector --control-plane https://CP:50052 --ca-sha256 <hash from 2> \
///      --network NET --token TOKEN --key-file /etc/hive/connector.key \
///      --endpoint PUBLIC_HOST:51820
///
/// Forwarding: the connector turns on IPv4 forwarding in its namespace and routes between the
/// tunnel and the private network without address translation, so builds are seen with their
/// own tunnel address (10.250.0.x by default). The customer network must route the network's
/// tunnel subnet back to this host (e.g. `ip route add 10.250.0.0/24 via <connector>`).
/// Peers are only ever accepted from keys the key exchange pushed, each for its one /32.
///
/// Logs go to stderr (RUST_LOG / HIVE_LOG). SIGTERM or SIGINT removes the tunnel and exits.
#[derive(Debug, Parser)]
#[command(name = "hive-connector", version, verbatim_doc_comment)]
struct Args {
    /// The control plane's agent listener (its --box-addr): https://HOST:PORT. The token is
    /// sent only over TLS to a server whose CA matches --ca-sha256. (http://127.0.0.1:PORT of a
    /// control plane with --insecure-boxes is accepted on loopback only: tests, development.)
    #[arg(
        long,
        env = "HIVE_CONTROL_PLANE",
        default_value = "https://127.0.0.1:50052"
    )]
    control_plane: String,

    /// SHA-256 (hex) of the control plane's CA certificate, as `hivectl connector add` prints
    /// it: the connector trusts only a server whose certificate chains to that CA.
    #[arg(long, env = "HIVE_CA_SHA256")]
    ca_sha256: Option<String>,

    /// Name of the private network this connector fronts.
    #[arg(long, env = "HIVE_CONNECTOR_NETWORK")]
    network: Option<String>,

    /// The token `hivectl connector add` printed.
    #[arg(long, env = "HIVE_CONNECTOR_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// UDP port of the WireGuard interface.
    #[arg(long, env = "HIVE_CONNECTOR_LISTEN_PORT", default_value_t = 51820)]
    listen_port: u16,

    /// The HOST:PORT cells reach this connector at (as registered with `connector add`).
    #[arg(long, env = "HIVE_CONNECTOR_ENDPOINT")]
    endpoint: Option<String>,

    /// Network namespace for the tunnel (e.g. /run/netns/edge); default: this process's.
    #[arg(long, env = "HIVE_CONNECTOR_NETNS")]
    netns: Option<PathBuf>,

    /// WireGuard interface name (unique on the host: it names the UAPI socket).
    #[arg(long, env = "HIVE_CONNECTOR_IFACE", default_value = "hwgc0")]
    iface: String,

    /// File with the connector's private key (base64, like `wg genkey`); created 0600 if missing.
    #[arg(long, env = "HIVE_CONNECTOR_KEY_FILE")]
    key_file: PathBuf,

    /// Print the public key of --key-file (creating it if missing) and exit.
    #[arg(long)]
    print_public_key: bool,

    /// Serve GET /healthz (JSON: connected, peers with handshakes and bytes) here.
    #[arg(long, env = "HIVE_CONNECTOR_HEALTH_ADDR")]
    health_addr: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
enum ConnectorError {
    #[error("--{0} is required (or its HIVE_CONNECTOR_* variable)")]
    Missing(&'static str),
    #[error("read key file {path}: {source}")]
    ReadKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("create key file {path}: {source}")]
    WriteKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("key file {path} does not hold a base64 32-byte WireGuard private key")]
    KeyFormat { path: PathBuf },
    #[error("control plane {url}: {reason}")]
    ControlPlane { url: String, reason: String },
    #[error("control plane {url}: {reason}")]
    Insecure { url: String, reason: String },
    #[error("tunnel: {0}")]
    Tunnel(#[from] hive_wg::TunnelError),
    #[error("bad peer from the key exchange: {0}")]
    Peer(String),
    #[error("enable IP forwarding: {0}")]
    Forwarding(String),
    #[error("health listener {addr}: {source}")]
    Health {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Loads the key file, or creates it (0600) with a fresh key.
fn load_or_create_key(path: &Path) -> Result<KeyPair, ConnectorError> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(ConnectorError::KeyMode {
                    path: path.into(),
                    mode,
                });
            }
            let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
                ConnectorError::ReadKey {
                    path: path.into(),
                    source,
                }
            })?);
            let bytes = Zeroizing::new(
                BASE64
                    .decode(text.trim())
                    .map_err(|_| ConnectorError::KeyFormat { path: path.into() })?,
            );
            let arr: Zeroizing<[u8; 32]> = Zeroizing::new(
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| ConnectorError::KeyFormat { path: path.into() })?,
            );
            Ok(KeyPair::from_secret_bytes(&arr))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let keys = KeyPair::generate();
            let text = Zeroizing::new(format!("{}\n", BASE64.encode(*keys.secret_bytes())));
            let write_err = |source| ConnectorError::WriteKey {
                path: path.into(),
                source,
            };
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(write_err)?;
            f.write_all(text.as_bytes()).map_err(write_err)?;
            f.sync_all().map_err(write_err)?;
            tracing::info!(path = %path.display(), public_key = %keys.public(), "new connector key created");
            Ok(keys)
        }
        Err(source) => Err(ConnectorError::ReadKey {
            path: path.into(),
            source,
        }),
    }
}

/// The tunnel once the first `SyncPeers` told us our address.
#[derive(Default)]
struct State {
    tunnel: Option<Tunnel>,
    /// The connector's own tunnel address with its subnet's length (from the first sync).
    address: Option<Prefix>,
    connected: bool,
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// The peer the key exchange asks for, if it is one this connector may accept: a single address
/// (a /32) inside its own tunnel subnet and not its own address. Anything wider would route a
/// whole range, or the customer's own network, to whoever holds that key.
fn peer_spec(p: &AddPeer, own: &Prefix) -> Result<PeerSpec, ConnectorError> {
    let public_key: PublicKey = p
        .public_key
        .parse()
        .map_err(|e: hive_wg::keys::KeyError| ConnectorError::Peer(e.to_string()))?;
    let addr: Prefix = p
        .tunnel_address
        .parse()
        .map_err(|e: hive_wg::prefix::PrefixError| ConnectorError::Peer(e.to_string()))?;
    let single = if addr.addr().is_ipv4() { 32 } else { 128 };
    if addr.prefix_len() != single || !own.network().contains(&addr) || addr.addr() == own.addr() {
        return Err(ConnectorError::Peer(format!(
            "peer {} asks for {}: a peer gets one address of this connector's tunnel subnet {} \
             (not its own {}); refused",
            p.public_key,
            p.tunnel_address,
            own.network(),
            own.addr()
        )));
    }
    Ok(PeerSpec {
        public_key,
        endpoint: None,
        allowed_ips: vec![addr],
        persistent_keepalive: None,
    })
}

struct Runner {
    args: Args,
    network: String,
    token: String,
    /// The control plane's CA (PEM), once fetched and checked against --ca-sha256.
    ca_pem: Option<String>,
    keys: Option<KeyPair>,
    public_key: PublicKey,
    state: Shared,
}

impl Runner {
    /// Applies one command; the error text goes back in `PeerApplied`.
    fn apply(&mut self, cmd: Cmd) -> Result<(), ConnectorError> {
        let mut st = lock(&self.state);
        match cmd {
            Cmd::Sync(sync) => {
                if st.tunnel.is_none() {
                    let address: Prefix = sync.connector_address.parse().map_err(
                        |e: hive_wg::prefix::PrefixError| ConnectorError::Peer(e.to_string()),
                    )?;
                    let mut spec = TunnelSpec::new(self.args.iface.clone());
                    spec.netns = self.args.netns.clone();
                    spec.listen_port = Some(self.args.listen_port);
                    spec.addresses = vec![address];
                    let keys = self.keys.take().ok_or_else(|| {
                        ConnectorError::Peer("tunnel key already consumed".into())
                    })?;
                    let tunnel = Tunnel::up(spec, keys)?;
                    enable_forwarding(self.args.netns.as_deref())?;
                    tracing::info!(iface = %tunnel.iface(), address = %address,
                        listen_port = tunnel.listen_port(), prefixes = ?sync.prefixes,
                        "connector tunnel up; forwarding on");
                    st.tunnel = Some(tunnel);
                    st.address = Some(address);
                }
                let (Some(tunnel), Some(own)) = (st.tunnel.as_ref(), st.address) else {
                    return Ok(());
                };
                // A peer this connector may not accept is left out (and said), not the sync.
                let wanted: Vec<PeerSpec> = sync
                    .peers
                    .iter()
                    .filter_map(|p| match peer_spec(p, &own) {
                        Ok(spec) => Some(spec),
                        Err(e) => {
                            tracing::warn!(error = %e, "peer in sync refused");
                            None
                        }
                    })
                    .collect();
                let want_keys: BTreeSet<PublicKey> = wanted.iter().map(|p| p.public_key).collect();
                let have = tunnel.peers()?;
                for p in &have {
                    if !want_keys.contains(&p.public_key) {
                        tunnel.remove_peer(&p.public_key)?;
                        tracing::info!(peer = %p.public_key, "peer removed (not in sync)");
                    }
                }
                let have_keys: BTreeSet<PublicKey> = have.iter().map(|p| p.public_key).collect();
                for p in wanted {
                    if !have_keys.contains(&p.public_key) {
                        tracing::info!(peer = %p.public_key, "peer added (sync)");
                        tunnel.add_peer(p)?;
                    }
                }
                Ok(())
            }
            Cmd::AddPeer(p) => {
                let own = st
                    .address
                    .ok_or_else(|| ConnectorError::Peer("AddPeer before SyncPeers".into()))?;
                let spec = peer_spec(&p, &own)?;
                let tunnel = st
                    .tunnel
                    .as_ref()
                    .ok_or_else(|| ConnectorError::Peer("AddPeer before SyncPeers".into()))?;
                match tunnel.add_peer(spec.clone()) {
                    // The key exchange sends the same AddPeer again when it answers a box's
                    // repeated request (the first answer was lost in a reconnect): a peer with
                    // the same key and address is already applied; another address replaces it.
                    Err(hive_wg::TunnelError::PeerExists { .. }) => {
                        let have = tunnel.peers()?;
                        let same = have.iter().any(|h| {
                            h.public_key == spec.public_key && h.allowed_ips == spec.allowed_ips
                        });
                        if same {
                            tracing::info!(build_id = %p.build_id, peer = %p.public_key,
                                "peer already present");
                            return Ok(());
                        }
                        tunnel.remove_peer(&spec.public_key)?;
                        tunnel.add_peer(spec)?;
                    }
                    other => other?,
                }
                tracing::info!(build_id = %p.build_id, peer = %p.public_key,
                    address = %p.tunnel_address, "peer added");
                Ok(())
            }
            Cmd::RemovePeer(p) => {
                let key: PublicKey = p
                    .public_key
                    .parse()
                    .map_err(|e: hive_wg::keys::KeyError| ConnectorError::Peer(e.to_string()))?;
                if let Some(tunnel) = st.tunnel.as_ref() {
                    let had = tunnel.remove_peer(&key)?;
                    tracing::info!(build_id = %p.build_id, peer = %p.public_key, had, "peer removed");
                }
                Ok(())
            }
        }
    }

    fn current_peers(&self) -> Vec<String> {
        lock(&self.state)
            .tunnel
            .as_ref()
            .and_then(|t| t.peers().ok())
            .map(|ps| ps.iter().map(|p| p.public_key.to_base64()).collect())
            .unwrap_or_default()
    }

    /// One session: hello, then commands until the stream ends.
    async fn session(&mut self) -> Result<(), ConnectorError> {
        let url = self.args.control_plane.clone();
        let cp_err = |reason: String| ConnectorError::ControlPlane {
            url: url.clone(),
            reason,
        };
        let endpoint = match self.args.ca_sha256.as_deref() {
            Some(pin) if url.starts_with("https://") => {
                if self.ca_pem.is_none() {
                    let ca = hive_proto::pin::fetch_pinned_ca(&url, pin)
                        .await
                        .map_err(|e| cp_err(e.to_string()))?;
                    self.ca_pem = Some(ca);
                }
                let (host, _) = hive_proto::pin::host_port(&url).map_err(cp_err)?;
                hive_proto::pin::endpoint(
                    &url,
                    &host,
                    self.ca_pem.as_deref().unwrap_or_default(),
                    None,
                )
                .map_err(cp_err)?
            }
            _ => tonic::transport::Endpoint::from_shared(url.clone())
                .map_err(|e| cp_err(e.to_string()))?,
        };
        let channel = endpoint
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| cp_err(format!("connect: {e}")))?;
        let mut client = ConnectorClient::new(channel);
        let (tx, rx) = mpsc::channel::<ConnectorMessage>(256);
        let mut seq = 0u64;
        let mut next = |msg| {
            seq += 1;
            ConnectorMessage {
                seq,
                msg: Some(msg),
            }
        };
        let hello = ConnectorHello {
            network: self.network.clone(),
            public_key: self.public_key.to_base64(),
            endpoint: self.args.endpoint.clone().unwrap_or_default(),
            token: self.token.clone(),
            peers: self.current_peers(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        tx.send(next(Msg::Hello(hello)))
            .await
            .map_err(|_| cp_err("session channel closed".into()))?;
        let mut inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .map_err(|s| cp_err(format!("session refused: {}", s.message())))?
            .into_inner();
        lock(&self.state).connected = true;
        tracing::info!(network = %self.network, control_plane = %url, "connected to the key exchange");
        loop {
            let cmd = match inbound.message().await {
                Ok(Some(c)) => c,
                Ok(None) => return Err(cp_err("stream ended".into())),
                Err(s) => return Err(cp_err(format!("stream: {}", s.message()))),
            };
            let Some(body) = cmd.cmd else { continue };
            let result = tokio::task::block_in_place(|| self.apply(body));
            let error = match result {
                Ok(()) => String::new(),
                Err(e) => {
                    tracing::warn!(command_id = cmd.id, error = %e, "command failed");
                    e.to_string()
                }
            };
            let applied = next(Msg::Applied(PeerApplied {
                command_id: cmd.id,
                error,
            }));
            if tx.send(applied).await.is_err() {
                return Err(cp_err("session channel closed".into()));
            }
        }
    }
}

/// Turns on IPv4 forwarding in the tunnel's namespace (where the private network is routed).
fn enable_forwarding(netns: Option<&Path>) -> Result<(), ConnectorError> {
    let write = || std::fs::write("/proc/sys/net/ipv4/ip_forward", "1\n");
    let res = match netns {
        Some(p) => hive_wg::netns::run_in(p, write)
            .map_err(|e| ConnectorError::Forwarding(e.to_string()))?,
        None => write(),
    };
    res.map_err(|e| ConnectorError::Forwarding(format!("/proc/sys/net/ipv4/ip_forward: {e}")))
}

async fn serve_health(
    addr: SocketAddr,
    state: Shared,
    network: String,
    public_key: String,
) -> Result<(), ConnectorError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ConnectorError::Health { addr, source })?;
    let app = axum::Router::new().route(
        "/healthz",
        axum::routing::get(move || {
            let state = state.clone();
            let network = network.clone();
            let public_key = public_key.clone();
            async move {
                let body = tokio::task::spawn_blocking(move || {
                    let st = lock(&state);
                    let peers: Vec<serde_json::Value> = st
                        .tunnel
                        .as_ref()
                        .and_then(|t| t.peers().ok())
                        .unwrap_or_default()
                        .iter()
                        .map(|p| {
                            serde_json::json!({
                                "public_key": p.public_key.to_base64(),
                                "allowed_ips": p.allowed_ips.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                                "last_handshake_ms": p.last_handshake
                                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                                    .map(|d| d.as_millis() as i64).unwrap_or(0),
                                "rx_bytes": p.rx_bytes,
                                "tx_bytes": p.tx_bytes,
                            })
                        })
                        .collect();
                    serde_json::json!({
                        "network": network,
                        "public_key": public_key,
                        "connected": st.connected,
                        "tunnel_up": st.tunnel.is_some(),
                        "peers": peers,
                    })
                })
                .await
                .unwrap_or_else(|_| serde_json::json!({"error": "health task failed"}));
                axum::Json(body)
            }
        }),
    );
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %bound, "health endpoint listening");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "health server failed");
        }
    });
    Ok(())
}

/// The token goes only over TLS to the pinned CA, or in the clear to this machine itself.
fn check_link(args: &Args) -> Result<(), ConnectorError> {
    let url = &args.control_plane;
    let insecure = |reason: &str| ConnectorError::Insecure {
        url: url.clone(),
        reason: reason.to_string(),
    };
    if url.starts_with("https://") {
        let pin = args.ca_sha256.as_deref().ok_or_else(|| {
            insecure("--ca-sha256 is required (`hivectl connector add` printed it): without it the connector cannot tell the control plane from an impostor")
        })?;
        if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(insecure("--ca-sha256 must be 64 hex digits"));
        }
        hive_proto::pin::host_port(url).map_err(|e| insecure(&e))?;
        return Ok(());
    }
    let host = url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .map(|a| a.rsplit_once(':').map_or(a, |(h, _)| h))
        .ok_or_else(|| insecure("use https://HOST:PORT (the control plane's --box-addr)"))?;
    if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
        return Err(insecure(
            "plaintext would send the connector's token in the clear: use https://HOST:PORT \
             (the control plane's --box-addr) with --ca-sha256",
        ));
    }
    tracing::warn!(control_plane = %url, "plaintext link on loopback (a control plane with --insecure-boxes): tests and development only");
    Ok(())
}

async fn run(args: Args) -> Result<(), ConnectorError> {
    let keys = load_or_create_key(&args.key_file)?;
    if args.print_public_key {
        println!("{}", keys.public());
        return Ok(());
    }
    let network = args
        .network
        .clone()
        .ok_or(ConnectorError::Missing("network"))?;
    let token = args.token.clone().ok_or(ConnectorError::Missing("token"))?;
    let state: Shared = Arc::default();
    let public_key = keys.public();
    if let Some(addr) = args.health_addr {
        serve_health(addr, state.clone(), network.clone(), public_key.to_base64()).await?;
    }
    check_link(&args)?;
    let mut runner = Runner {
        args,
        network,
        token,
        ca_pem: None,
        keys: Some(keys),
        public_key,
        state: state.clone(),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| ConnectorError::Forwarding(format!("SIGTERM handler: {e}")))?;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let ended = tokio::select! {
            r = runner.session() => r,
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        lock(&state).connected = false;
        if ended.is_ok() {
            backoff.reset();
        }
        let pause = backoff.next_delay();
        match ended {
            Ok(()) => {}
            Err(e @ ConnectorError::ControlPlane { .. }) => {
                tracing::warn!(error = %e, retry_in = ?pause, "key exchange session ended");
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("shutting down: removing the tunnel");
    let tunnel = lock(&state).tunnel.take();
    if let Some(t) = tunnel {
        tokio::task::spawn_blocking(move || t.down())
            .await
            .map_err(|e| ConnectorError::Forwarding(format!("tunnel down task: {e}")))??;
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = std::env::var("HIVE_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info,boringtun=off".to_string());
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hive-connector: start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hive-connector: {}", hive_sys::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_single_addresses_of_the_tunnel_subnet_are_accepted_as_peers() {
        let own: Prefix = "10.250.0.1/24".parse().unwrap();
        let key = KeyPair::generate().public().to_base64();
        let peer = |addr: &str| AddPeer {
            build_id: "b".into(),
            public_key: key.clone(),
            tunnel_address: addr.into(),
        };
        let spec = peer_spec(&peer("10.250.0.7/32"), &own).expect("a /32 of the subnet");
        assert_eq!(spec.allowed_ips, vec!["10.250.0.7/32".parse().unwrap()]);
        for bad in [
            "10.250.0.0/24", // the whole subnet
            "0.0.0.0/0",     // everything
            "10.20.0.5/32",  // the customer's network, not the tunnel subnet
            "10.250.1.7/32", // next door
            "10.250.0.1/32", // the connector itself
            "10.250.0.8/31", // two addresses
            "not an address",
        ] {
            let e = peer_spec(&peer(bad), &own).unwrap_err().to_string();
            assert!(!e.is_empty(), "{bad} accepted");
        }
        let e = peer_spec(&peer("10.20.0.5/32"), &own)
            .unwrap_err()
            .to_string();
        assert!(e.contains("10.250.0.0/24") && e.contains("refused"), "{e}");
    }
}
