//! Key exchange (issue 5): brokers WireGuard public keys between cells and connectors.
//!
//! A box asks on its `BoxAgent` stream (`KeyExchangeRequest`: build, lease, the cell's public
//! key); we check the lease is the build's current one, refuse a key ever seen before, allocate
//! a tunnel address (`network`), push the peer to the network's connector (`connector` holds the
//! sessions) and answer only after the connector said `PeerApplied`, so the cell's first
//! handshake never races the connector. The revoker runs beside it: any active lease whose build
//! ended, was re-queued or lost its lease is marked revoked and its peer removed, within a
//! fraction of a second of the change.
//!
//! A box re-sends a request whose answer it never got (its link dropped after the request was
//! acked): the same build, lease and key get the same lease again instead of "key seen", and
//! the connector treats the repeated `AddPeer` as applied.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hive_proto::v1::connector_command::Cmd;
use hive_proto::v1::{
    AddPeer, ConnectorCommand, KeyExchangeReply, KeyExchangeRequest, RemovePeer, SyncPeers,
};
use tokio::sync::{mpsc, oneshot, Notify};
use tonic::Status;

use crate::network::{validate_public_key, Issued, NetworkError, NetworkRow, TunnelLeaseRow};
use crate::server::Hive;

/// How long the key exchange waits for the connector to apply a peer.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the cell waits for its first handshake (told to it in the reply).
pub const HANDSHAKE_TIMEOUT_SECS: u32 = 10;
/// Keepalive the cell keeps the path open with (NAT on the box side).
pub const KEEPALIVE_SECS: u32 = 25;
/// Revoker pass interval when no build change wakes it.
const REVOKE_TICK: Duration = Duration::from_millis(500);

/// Why a key exchange was refused; the text goes back to the box and into the build log.
#[derive(Debug, thiserror::Error)]
pub enum KeyExchangeError {
    #[error("build {0} not found")]
    NoBuild(String),
    #[error("build {build_id}: lease {lease_id} is not its current lease on this box")]
    StaleLease { build_id: String, lease_id: String },
    #[error("build {0} has no private network")]
    NoNetwork(String),
    #[error("private network {0:?} does not exist")]
    UnknownNetwork(String),
    #[error("no connector of private network {0:?} is connected")]
    NoConnector(String),
    #[error("public key {0} was issued before; a key is never accepted twice")]
    KeySeen(String),
    #[error("connector of network {network:?} did not apply the peer within {secs}s")]
    ApplyTimeout { network: String, secs: u64 },
    #[error("connector of network {network:?} refused the peer: {error}")]
    Refused { network: String, error: String },
    #[error("connector of network {0:?} went away")]
    ConnectorGone(String),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// One open connector session.
#[derive(Debug, Clone)]
pub struct ConnectorConn {
    pub id: u64,
    pub connector_id: String,
    pub public_key: String,
    pub endpoint: String,
    pub tx: mpsc::Sender<Result<ConnectorCommand, Status>>,
    pub kill: Arc<Notify>,
}

/// Connector sessions per network, and commands waiting for `PeerApplied`.
#[derive(Debug, Default)]
pub struct KeyExchange {
    conns: Mutex<HashMap<String, ConnectorConn>>,
    /// Commands waiting for `PeerApplied`: command id -> (the session it was sent on, waiter).
    pending: Mutex<HashMap<u64, (u64, oneshot::Sender<String>)>>,
    next_id: AtomicU64,
    next_conn: AtomicU64,
    /// One lock per public key being exchanged: a request the box re-sent after a reconnect
    /// waits for the first to finish instead of racing it (two AddPeers, or one exchange
    /// failing and revoking what the other just gave the cell).
    exchanging: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Wakes the revoker.
    pub revoke_now: Notify,
}

impl KeyExchange {
    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<String, ConnectorConn>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (u64, oneshot::Sender<String>)>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The exchange lock of `key` (made on first use; dropped by [`Self::release`]).
    fn key_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.exchanging.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key.to_string()).or_default().clone()
    }

    /// Forgets `key`'s lock once no exchange holds or waits for it.
    fn release(&self, key: &str, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut map = self.exchanging.lock().unwrap_or_else(|e| e.into_inner());
        // The map's reference and `lock` are the last two: nobody else waits.
        if Arc::strong_count(&lock) <= 2 {
            map.remove(key);
        }
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Installs a session for a network, ending an older one.
    pub fn connect(&self, network: &str, conn: ConnectorConn) {
        if let Some(old) = self.conns().insert(network.to_string(), conn) {
            old.kill.notify_one();
        }
    }

    /// Forgets the session unless a newer one replaced it.
    pub fn disconnect(&self, network: &str, conn_id: u64) {
        {
            let mut map = self.conns();
            if map.get(network).is_some_and(|c| c.id == conn_id) {
                map.remove(network);
            }
        }
        // Its unanswered commands never will be: fail them now (dropping the sender ends the
        // wait with "connector went away") rather than at the apply timeout.
        self.pending().retain(|_, (conn, _)| *conn != conn_id);
    }

    /// Whether this connector has an open session.
    pub fn is_connected(&self, connector_id: &str) -> bool {
        self.conns()
            .values()
            .any(|c| c.connector_id == connector_id)
    }

    /// Ends the session of a connector (it was removed).
    pub fn kick(&self, connector_id: &str) {
        let mut map = self.conns();
        map.retain(|_, c| {
            if c.connector_id == connector_id {
                c.kill.notify_one();
                false
            } else {
                true
            }
        });
    }

    fn conn(&self, network: &str) -> Option<ConnectorConn> {
        self.conns().get(network).cloned()
    }

    /// A fresh command id.
    pub fn command_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Session `conn_id` answered a command. Only the session a command was sent on can
    /// answer it: another connector (another network) naming the id is ignored.
    pub fn applied(&self, conn_id: u64, command_id: u64, error: String) {
        let mut pending = self.pending();
        match pending.get(&command_id) {
            Some((sent_on, _)) if *sent_on == conn_id => {
                if let Some((_, tx)) = pending.remove(&command_id) {
                    let _ = tx.send(error);
                }
            }
            Some(_) => {
                tracing::warn!(
                    conn_id,
                    command_id,
                    "PeerApplied for a command sent to another connector session ignored"
                );
            }
            None => {}
        }
    }

    /// Sends a command and waits for its `PeerApplied` (error text, empty = ok).
    async fn call(
        &self,
        network: &str,
        conn: &ConnectorConn,
        cmd: Cmd,
    ) -> Result<(), KeyExchangeError> {
        let id = self.command_id();
        let (tx, rx) = oneshot::channel();
        self.pending().insert(id, (conn.id, tx));
        let sent = conn
            .tx
            .send(Ok(ConnectorCommand { id, cmd: Some(cmd) }))
            .await
            .is_ok();
        if !sent {
            self.pending().remove(&id);
            return Err(KeyExchangeError::ConnectorGone(network.to_string()));
        }
        match tokio::time::timeout(APPLY_TIMEOUT, rx).await {
            Ok(Ok(e)) if e.is_empty() => Ok(()),
            Ok(Ok(error)) => Err(KeyExchangeError::Refused {
                network: network.to_string(),
                error,
            }),
            Ok(Err(_)) => Err(KeyExchangeError::ConnectorGone(network.to_string())),
            Err(_) => {
                self.pending().remove(&id);
                Err(KeyExchangeError::ApplyTimeout {
                    network: network.to_string(),
                    secs: APPLY_TIMEOUT.as_secs(),
                })
            }
        }
    }

    /// Tells the network's connector to drop a peer, without waiting (a connector that is
    /// offline gets the full set at its next `SyncPeers`, which no longer holds it).
    async fn remove_peer(&self, lease: &TunnelLeaseRow) {
        let Some(conn) = self.conn(&lease.network) else {
            return;
        };
        let id = self.command_id();
        let cmd = Cmd::RemovePeer(RemovePeer {
            build_id: lease.build_id.clone(),
            public_key: lease.public_key.clone(),
        });
        let _ = conn
            .tx
            .send(Ok(ConnectorCommand { id, cmd: Some(cmd) }))
            .await;
    }
}

/// The `SyncPeers` a (re)connected connector starts from: every active lease of its network.
pub async fn sync_for(hive: &Hive, net: &NetworkRow) -> Result<SyncPeers, KeyExchangeError> {
    let leases = hive.store.list_tunnel_leases(&net.name, "", true).await?;
    Ok(SyncPeers {
        peers: leases
            .iter()
            .map(|l| AddPeer {
                build_id: l.build_id.clone(),
                public_key: l.public_key.clone(),
                tunnel_address: host_route(&l.tunnel_address),
            })
            .collect(),
        connector_address: net.connector_address(),
        prefixes: net.prefixes.clone(),
    })
}

/// "10.250.0.7/24" -> "10.250.0.7/32": the connector routes one address to each peer.
fn host_route(addr: &str) -> String {
    let ip = addr.split('/').next().unwrap_or(addr);
    format!("{ip}/32")
}

/// Answers one request from a box. Errors become `KeyExchangeReply.error`.
pub async fn exchange(hive: &Hive, box_id: &str, req: &KeyExchangeRequest) -> KeyExchangeReply {
    let mut reply = KeyExchangeReply {
        build_id: req.build_id.clone(),
        lease_id: req.lease_id.clone(),
        ..Default::default()
    };
    match exchange_inner(hive, box_id, req).await {
        Ok((net, conn, lease)) => {
            let mut allowed = net.prefixes.clone();
            allowed.push(net.tunnel_subnet.clone());
            reply.connector_public_key = conn.public_key;
            reply.connector_endpoint = conn.endpoint;
            reply.tunnel_address = lease.tunnel_address;
            reply.allowed_prefixes = allowed;
            reply.persistent_keepalive_secs = KEEPALIVE_SECS;
            reply.handshake_timeout_secs = HANDSHAKE_TIMEOUT_SECS;
            reply.network = net.name;
        }
        Err(e) => {
            tracing::warn!(box_id, build_id = %req.build_id, error = %e, "key exchange refused");
            reply.error = e.to_string();
        }
    }
    reply
}

async fn exchange_inner(
    hive: &Hive,
    box_id: &str,
    req: &KeyExchangeRequest,
) -> Result<(NetworkRow, ConnectorConn, TunnelLeaseRow), KeyExchangeError> {
    let build = hive
        .store
        .get_build(&req.build_id)
        .await?
        .ok_or_else(|| KeyExchangeError::NoBuild(req.build_id.clone()))?;
    if build.lease_id != req.lease_id || build.box_id != box_id || build.state.is_terminal() {
        return Err(KeyExchangeError::StaleLease {
            build_id: req.build_id.clone(),
            lease_id: req.lease_id.clone(),
        });
    }
    if build.private_network.is_empty() {
        return Err(KeyExchangeError::NoNetwork(build.id));
    }
    let net = hive
        .store
        .get_network(&build.private_network)
        .await?
        .ok_or_else(|| KeyExchangeError::UnknownNetwork(build.private_network.clone()))?;
    let key = validate_public_key(&req.cell_public_key)?;
    if hive.keyexchange.conn(&net.name).is_none() {
        return Err(KeyExchangeError::NoConnector(net.name.clone()));
    }
    let lock = hive.keyexchange.key_lock(&key);
    let result = {
        let _one_at_a_time = lock.lock().await;
        // Looked up under the lock: the wait can outlast a connector reconnect, and the
        // command must go to the session that is open now.
        match hive.keyexchange.conn(&net.name) {
            Some(conn) => issue_and_apply(hive, box_id, req, &net, &conn, &key)
                .await
                .map(|lease| (conn, lease)),
            None => Err(KeyExchangeError::NoConnector(net.name.clone())),
        }
    };
    hive.keyexchange.release(&key, lock);
    let (conn, lease) = result?;
    Ok((net, conn, lease))
}

/// Issues (or finds again) the lease of `key` and has the connector apply it. Runs under the
/// key's exchange lock.
async fn issue_and_apply(
    hive: &Hive,
    box_id: &str,
    req: &KeyExchangeRequest,
    net: &NetworkRow,
    conn: &ConnectorConn,
    key: &str,
) -> Result<TunnelLeaseRow, KeyExchangeError> {
    let (lease, fresh) = match hive
        .store
        .issue_lease(net, &req.build_id, &req.lease_id, key)
        .await?
    {
        Issued::Lease(l) => (l, true),
        Issued::Again(l) => {
            // The box asked again (a reconnect lost our answer, or the request crossed it):
            // same build attempt, same key, lease still active. Make sure the connector has
            // the peer (AddPeer is idempotent there) and answer the same way.
            tracing::info!(box_id, build_id = %req.build_id, public_key = %key,
                "repeated key exchange request answered again");
            (l, false)
        }
        Issued::KeySeen => return Err(KeyExchangeError::KeySeen(key.to_string())),
    };
    let add = Cmd::AddPeer(AddPeer {
        build_id: lease.build_id.clone(),
        public_key: key.to_string(),
        tunnel_address: host_route(&lease.tunnel_address),
    });
    if let Err(e) = hive.keyexchange.call(&net.name, conn, add).await {
        // A lease issued just now is burnt: make sure no connector keeps it. A lease found
        // again belongs to an exchange that succeeded; the revoker ends it with its build.
        if fresh {
            let _ = hive.store.revoke_lease(key).await;
            hive.keyexchange.remove_peer(&lease).await;
        }
        return Err(e);
    }
    // The build may have ended (and the revoker passed) while the connector applied the peer:
    // the peer must not outlive its lease.
    let still_active = hive
        .store
        .list_tunnel_leases(&net.name, &req.build_id, true)
        .await?
        .iter()
        .any(|l| l.public_key == key);
    if !still_active {
        hive.keyexchange.remove_peer(&lease).await;
        return Err(KeyExchangeError::StaleLease {
            build_id: req.build_id.clone(),
            lease_id: req.lease_id.clone(),
        });
    }
    tracing::info!(box_id, build_id = %req.build_id, network = %net.name,
        tunnel_address = %lease.tunnel_address, public_key = %key, "tunnel peer issued");
    Ok(lease)
}

/// Revokes leases whose build attempt is over, until shutdown.
pub async fn run_revoker(hive: Arc<Hive>) {
    let mut events = hive.events.subscribe();
    let mut shutdown = hive.shutdown.clone();
    loop {
        if let Err(e) = revoke_pass(&hive).await {
            tracing::warn!(error = %e, "tunnel lease revocation pass failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(REVOKE_TICK) => {}
            _ = hive.keyexchange.revoke_now.notified() => {}
            r = events.recv() => {
                if let Err(tokio::sync::broadcast::error::RecvError::Closed) = r {
                    return;
                }
            }
            _ = crate::events::stopped(&mut shutdown) => return,
        }
    }
}

/// One pass: revoke in the store first (so a sync never re-adds the key), then remove the peer.
pub async fn revoke_pass(hive: &Hive) -> Result<usize, KeyExchangeError> {
    let stale = hive.store.stale_tunnel_leases().await?;
    let mut n = 0;
    for lease in &stale {
        if hive.store.revoke_lease(&lease.public_key).await? {
            n += 1;
            tracing::info!(build_id = %lease.build_id, network = %lease.network,
                public_key = %lease.public_key, "tunnel peer revoked");
            hive.keyexchange.remove_peer(lease).await;
        }
    }
    Ok(n)
}
