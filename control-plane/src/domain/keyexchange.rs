//! Key exchange (issue 5): brokers WireGuard public keys between cells and connectors.
//!
//! A box asks on its `BoxAgent` stream (`KeyExchangeRequest`: build, lease, the cell's public
//! key); we check the lease is the build's current one, refuse a key ever seen before, allocate
//! a tunnel address (`store::networks`), push the peer to the network's connector
//! (`registry::connectors` holds the sessions) and answer only after the connector said `PeerApplied`, so the cell's first
//! handshake never races the connector. The revoker runs beside it: any active lease whose build
//! ended, was re-queued or lost its lease is marked revoked and its peer removed, within a
//! fraction of a second of the change.
//!
//! A box re-sends a request whose answer it never got (its link dropped after the request was
//! acked): the same build, lease and key get the same lease again instead of "key seen", and
//! the connector treats the repeated `AddPeer` as applied.

use std::sync::Arc;
use std::time::Duration;

use hive_proto::v1::connector_command::Cmd;
use hive_proto::v1::{AddPeer, KeyExchangeReply, KeyExchangeRequest, SyncPeers};
use hive_types::Prefix;

use crate::domain::network::validate_public_key;
use crate::events::Event;
use crate::registry::connectors::CallError;
use crate::state::Hive;
use crate::store::{Issued, NetworkError, NetworkRow, TunnelLeaseRow};

/// How long the cell waits for its first handshake (told to it in the reply).
pub const HANDSHAKE_TIMEOUT_SECS: u32 = 10;
/// Keepalive the cell keeps the path open with (NAT on the box side).
pub const KEEPALIVE_SECS: u32 = 25;
/// Revoker pass interval when no build change wakes it.
const REVOKE_TICK: Duration = Duration::from_millis(500);
/// How long the revoker lets a burst of build changes gather before its pass: a pass per
/// webhook group commit (hundreds a second) was a query each on the database the commits wait
/// on; a revocation waits at most this much longer.
const REVOKE_GATHER: Duration = Duration::from_millis(10);

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
    match addr.parse::<Prefix>() {
        Ok(p) => format!("{}/32", p.addr()),
        // Stored by us as a prefix; a bare address (older rows) is its own host route.
        Err(_) => format!("{addr}/32"),
    }
}

/// Answers one request from a box. Errors become `KeyExchangeReply.error`.
pub async fn exchange(hive: &Hive, box_id: &str, req: &KeyExchangeRequest) -> KeyExchangeReply {
    let mut reply = KeyExchangeReply {
        build_id: req.build_id.clone(),
        lease_id: req.lease_id.clone(),
        ..Default::default()
    };
    match exchange_inner(hive, box_id, req).await {
        Ok((net, (public_key, endpoint), lease)) => {
            let mut allowed = net.prefixes.clone();
            allowed.push(net.tunnel_subnet.clone());
            reply.connector_public_key = public_key;
            reply.connector_endpoint = endpoint;
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
) -> Result<(NetworkRow, (String, String), TunnelLeaseRow), KeyExchangeError> {
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
    // With other control planes, the connector's session may be on one of them.
    if !hive.bus.is_shared() && hive.connectors.conn(&net.name).is_none() {
        return Err(KeyExchangeError::NoConnector(net.name.clone()));
    }
    let lock = hive.connectors.key_lock(&key);
    let result = {
        let _one_at_a_time = lock.lock().await;
        // The session is looked up when the command goes: the wait can outlast a connector
        // reconnect, and the command must go to the session that is open now.
        issue_and_apply(hive, box_id, req, &net, &key).await
    };
    hive.connectors.release(&key, lock);
    let (connector_id, lease) = result?;
    let who = match hive.connectors.conn(&net.name) {
        Some(c) if c.connector_id == connector_id => (c.public_key, c.endpoint),
        _ => hive
            .store
            .list_connectors(Some(&net.name))
            .await?
            .into_iter()
            .find(|c| c.id == connector_id)
            .map(|c| (c.public_key, c.endpoint))
            .ok_or_else(|| KeyExchangeError::ConnectorGone(net.name.clone()))?,
    };
    Ok((net, who, lease))
}

/// Issues (or finds again) the lease of `key` and has the connector apply it. Runs under the
/// key's exchange lock.
async fn issue_and_apply(
    hive: &Hive,
    box_id: &str,
    req: &KeyExchangeRequest,
    net: &NetworkRow,
    key: &str,
) -> Result<(String, TunnelLeaseRow), KeyExchangeError> {
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
    let applied = hive.connectors.call_anywhere(&net.name, add).await;
    if let Err(e) = &applied {
        let network = net.name.clone();
        let e = match e {
            CallError::Timeout { secs } => KeyExchangeError::ApplyTimeout {
                network,
                secs: *secs,
            },
            CallError::Refused(error) => KeyExchangeError::Refused {
                network,
                error: error.clone(),
            },
            CallError::Gone => KeyExchangeError::ConnectorGone(network),
            CallError::NoAnswer => KeyExchangeError::NoConnector(network),
        };
        // A lease issued just now is burnt: make sure no connector keeps it. A lease found
        // again belongs to an exchange that succeeded; the revoker ends it with its build.
        if fresh {
            let _ = hive.store.revoke_lease(key).await;
            hive.connectors.remove_peer(&lease).await;
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
        hive.connectors.remove_peer(&lease).await;
        return Err(KeyExchangeError::StaleLease {
            build_id: req.build_id.clone(),
            lease_id: req.lease_id.clone(),
        });
    }
    tracing::info!(box_id, build_id = %req.build_id, network = %net.name,
        tunnel_address = %lease.tunnel_address, public_key = %key, "tunnel peer issued");
    Ok((applied.unwrap_or_default(), lease))
}

/// Revokes leases whose build attempt is over, until shutdown.
pub async fn run_revoker(hive: Arc<Hive>) {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    let mut events = hive.events.subscribe();
    let mut shutdown = hive.shutdown.clone();
    loop {
        if let Err(e) = revoke_pass(&hive).await {
            tracing::warn!(error = %e, "tunnel lease revocation pass failed");
        }
        let tick = tokio::time::sleep(REVOKE_TICK);
        tokio::pin!(tick);
        // Only a build's change can end its attempt; log chunks (many a second per running
        // build) wake nothing.
        loop {
            tokio::select! {
                _ = &mut tick => break,
                _ = hive.connectors.revoke_now.notified() => break,
                r = events.recv() => match r {
                    Ok(Event::Build(_)) | Err(RecvError::Lagged(_)) => {
                        // A burst of changes (a placement round, a stream of webhooks) is one
                        // pass: wait a moment for the rest of it, then take all that came.
                        tokio::time::sleep(REVOKE_GATHER).await;
                        loop {
                            match events.try_recv() {
                                Ok(_) | Err(TryRecvError::Lagged(_)) => {}
                                Err(TryRecvError::Empty) => break,
                                Err(TryRecvError::Closed) => return,
                            }
                        }
                        break;
                    }
                    Ok(Event::Log(..)) => {}
                    Err(RecvError::Closed) => return,
                },
                _ = crate::events::stopped(&mut shutdown) => return,
            }
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
            hive.connectors.remove_peer(lease).await;
        }
    }
    Ok(n)
}
