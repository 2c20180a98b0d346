//! The connectors' side of the key exchange: one open `Connector.Session` per private network
//! (`grpc::connector` installs it) and the commands sent on it that wait for `PeerApplied`.
//! `domain::keyexchange` decides what to send; this table only carries it and matches answers
//! to the session a command went to.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hive_proto::v1::connector_command::Cmd;
use hive_proto::v1::{ConnectorCommand, RemovePeer};
use tokio::sync::{mpsc, oneshot, Notify};
use tonic::Status;

use crate::cluster::{Bus, Note};
use crate::store::TunnelLeaseRow;

/// Why a command to a connector did not apply.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the connector did not apply it within {secs}s")]
    Timeout { secs: u64 },
    #[error("the connector refused it: {0}")]
    Refused(String),
    #[error("the connector went away")]
    Gone,
    #[error("no control plane holds a session of the connector")]
    NoAnswer,
}

/// Most bytes of a connector's `PeerApplied.error` kept (then cut, marked with `…`).
pub const MAX_APPLY_ERROR: usize = 1024;

/// How long the key exchange waits for the connector to apply a peer.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Connector sessions per network, commands waiting for `PeerApplied`, and the per-key locks
/// of exchanges in flight.
#[derive(Debug, Default)]
pub struct Connectors {
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
    /// To the other control planes: commands for a connector whose session one of them holds.
    bus: Bus,
    /// Commands passed to the other control planes, waiting for their answer: call id -> waiter
    /// (the id of the connector that applied it, or why not).
    remote: Mutex<HashMap<String, oneshot::Sender<Result<String, CallError>>>>,
}

impl Connectors {
    /// Connectors whose commands may also go through the other control planes on `bus`.
    pub fn with_bus(bus: Bus) -> Connectors {
        Connectors {
            bus,
            ..Default::default()
        }
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<String, ConnectorConn>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (u64, oneshot::Sender<String>)>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The exchange lock of `key` (made on first use; dropped by [`Self::release`]).
    pub(crate) fn key_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.exchanging.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key.to_string()).or_default().clone()
    }

    /// Forgets `key`'s lock once no exchange holds or waits for it.
    pub(crate) fn release(&self, key: &str, lock: Arc<tokio::sync::Mutex<()>>) {
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

    pub(crate) fn conn(&self, network: &str) -> Option<ConnectorConn> {
        self.conns().get(network).cloned()
    }

    /// A fresh command id.
    pub fn command_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Session `conn_id` answered a command. Only the session a command was sent on can
    /// answer it: another connector (another network) naming the id is ignored.
    pub fn applied(&self, conn_id: u64, command_id: u64, error: String) {
        // The connector's text goes on into the key exchange's answer and the build's
        // message: a connector cannot make it megabytes.
        let error = if error.len() > MAX_APPLY_ERROR {
            format!("{}…", crate::forge::truncate(&error, MAX_APPLY_ERROR))
        } else {
            error
        };
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
    pub(crate) async fn call(&self, conn: &ConnectorConn, cmd: Cmd) -> Result<(), CallError> {
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
            return Err(CallError::Gone);
        }
        match tokio::time::timeout(APPLY_TIMEOUT, rx).await {
            Ok(Ok(e)) if e.is_empty() => Ok(()),
            Ok(Ok(error)) => Err(CallError::Refused(error)),
            Ok(Err(_)) => Err(CallError::Gone),
            Err(_) => {
                self.pending().remove(&id);
                Err(CallError::Timeout {
                    secs: APPLY_TIMEOUT.as_secs(),
                })
            }
        }
    }

    /// Sends a command to the network's connector wherever its session is, and waits for it
    /// to be applied; returns the id of the connector that applied it. With no session here,
    /// the other control planes are asked; none holding it looks like a timeout.
    pub(crate) async fn call_anywhere(&self, network: &str, cmd: Cmd) -> Result<String, CallError> {
        if let Some(conn) = self.conn(network) {
            return self.call(&conn, cmd).await.map(|()| conn.connector_id);
        }
        if !self.bus.is_shared() {
            return Err(CallError::NoAnswer);
        }
        let call_id = uuid::Uuid::new_v4().simple().to_string();
        let (tx, rx) = oneshot::channel();
        self.remote_lock().insert(call_id.clone(), tx);
        self.bus.publish(Note::ConnectorCall {
            call_id: call_id.clone(),
            network: network.to_string(),
            cmd: Box::new(ConnectorCommand {
                id: 0,
                cmd: Some(cmd),
            }),
        });
        // The holder waits up to APPLY_TIMEOUT itself; a second more covers the notes.
        let out = tokio::time::timeout(APPLY_TIMEOUT + Duration::from_secs(1), rx).await;
        self.remote_lock().remove(&call_id);
        match out {
            Ok(Ok(r)) => r,
            Ok(Err(_)) | Err(_) => Err(CallError::NoAnswer),
        }
    }

    fn remote_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Result<String, CallError>>>>
    {
        self.remote.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Another control plane passed a command for `network`'s connector: if its session is
    /// here, apply it and answer (`call_id` empty: no answer wanted).
    pub(crate) fn call_here(self: &Arc<Self>, call_id: String, network: String, cmd: Cmd) {
        let Some(conn) = self.conn(&network) else {
            return;
        };
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let result = me
                .call(&conn, cmd)
                .await
                .map(|()| conn.connector_id.clone());
            if !call_id.is_empty() {
                me.bus.publish(Note::ConnectorAnswer {
                    call_id,
                    result: match result {
                        Ok(id) => format!("ok {id}"),
                        Err(CallError::Refused(e)) => format!("refused {e}"),
                        Err(CallError::Timeout { .. }) => "timeout".to_string(),
                        Err(CallError::Gone | CallError::NoAnswer) => "gone".to_string(),
                    },
                });
            }
        });
    }

    /// The answer to a command passed to the other control planes.
    pub(crate) fn answered(&self, call_id: &str, result: &str) {
        let Some(tx) = self.remote_lock().remove(call_id) else {
            return;
        };
        let r = match result.split_once(' ').unwrap_or((result, "")) {
            ("ok", id) => Ok(id.to_string()),
            ("refused", e) => Err(CallError::Refused(e.to_string())),
            ("gone", _) => Err(CallError::Gone),
            _ => Err(CallError::Timeout {
                secs: APPLY_TIMEOUT.as_secs(),
            }),
        };
        let _ = tx.send(r);
    }

    /// Tells the network's connector to drop a peer, without waiting (a connector that is
    /// offline gets the full set at its next `SyncPeers`, which no longer holds it). With no
    /// session here, the control plane that holds it is asked to.
    pub(crate) async fn remove_peer(&self, lease: &TunnelLeaseRow) {
        let Some(conn) = self.conn(&lease.network) else {
            self.bus.publish(Note::ConnectorCall {
                call_id: String::new(),
                network: lease.network.clone(),
                cmd: Box::new(ConnectorCommand {
                    id: 0,
                    cmd: Some(Cmd::RemovePeer(RemovePeer {
                        build_id: lease.build_id.clone(),
                        public_key: lease.public_key.clone(),
                    })),
                }),
            });
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

#[cfg(test)]
mod tests {
    use super::*;
    use hive_proto::v1::RemovePeer;

    #[tokio::test]
    async fn a_connectors_refusal_is_cut_to_a_kilobyte() {
        let connectors = Arc::new(Connectors::default());
        let (tx, mut rx) = mpsc::channel(4);
        let conn = ConnectorConn {
            id: 1,
            connector_id: "c1".into(),
            public_key: "k".into(),
            endpoint: "198.18.0.1:51820".into(),
            tx,
            kill: Arc::new(Notify::new()),
        };
        let call = {
            let connectors = connectors.clone();
            tokio::spawn(async move {
                connectors
                    .call(&conn, Cmd::RemovePeer(RemovePeer::default()))
                    .await
            })
        };
        let sent = rx.recv().await.expect("a command").expect("not a status");
        // A 3-byte character: 1024 is not a multiple of 3, so the cut must step back.
        connectors.applied(1, sent.id, "€".repeat(1 << 20));
        match call.await.expect("call task") {
            Err(CallError::Refused(text)) => {
                assert!(
                    text.len() <= MAX_APPLY_ERROR + '…'.len_utf8(),
                    "{}",
                    text.len()
                );
                assert!(text.starts_with("€€") && text.ends_with('…'));
            }
            other => panic!("not refused: {other:?}"),
        }
    }
}
