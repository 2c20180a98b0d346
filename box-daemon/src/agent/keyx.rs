//! Key exchange for private-network builds: the cell makes its WireGuard key pair and hands over
//! the public key, which goes to the control plane's key exchange through the outbox; the reply
//! (connector, addresses) becomes the RunBuild tunnel. Only public keys and addresses pass
//! through the box. A request whose answer a reconnect may have lost is sent again.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hive_proto::v1::{
    box_message, Assignment, KeyExchangeReply, KeyExchangeRequest, PrepareTunnelRequest,
    TunnelConfig,
};

use super::{Agent, PendingExchange};
use crate::backend::CellBackend;
use crate::cell::Cell;
use hive_sys::now_ms;

/// How long a private-network build waits for the key exchange (its connector applies the
/// peer first, up to 5 s).
const KEY_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);

impl<B: CellBackend> Agent<B> {
    pub(super) fn key_exchanges(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, String), PendingExchange>> {
        self.key_exchanges.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After a reconnect: a key exchange request the control plane acknowledged but did not
    /// answer on the old session may have lost its answer with that session (the control plane
    /// answers on whatever session the box has when it is done). Queue it again; the control
    /// plane answers a repeated request for the same build, lease and key with the same lease.
    /// Requests still unacknowledged go out again with the rest of the outbox.
    pub(super) fn resend_key_exchanges(&self) -> usize {
        let mut pending = self.key_exchanges();
        let mut outbox = self.outbox();
        let mut n = 0;
        for p in pending.values_mut() {
            if outbox.holds(p.seq) {
                continue;
            }
            p.seq = outbox.push(box_message::Msg::KeyExchange(p.request.clone()));
            n += 1;
            tracing::info!(build = %p.request.build_id, lease = %p.request.lease_id,
                "key exchange request sent again after a reconnect");
        }
        n
    }

    /// The control plane's answer to a key exchange request: to the build that waits for it.
    pub(super) fn key_exchange_reply(&self, r: KeyExchangeReply) {
        let waiter = self
            .key_exchanges()
            .remove(&(r.build_id.clone(), r.lease_id.clone()));
        match waiter {
            Some(w) => {
                let _ = w.reply.send(r);
            }
            None => {
                tracing::debug!(build = %r.build_id, "key exchange reply nobody waits for")
            }
        }
    }

    /// Private-network builds: the cell makes its key pair and hands over the public key, which
    /// goes to the control plane's key exchange; its reply (connector, addresses) becomes the
    /// RunBuild tunnel. Only public keys and addresses pass through the box.
    pub(super) async fn key_exchange(
        self: &Arc<Self>,
        client: &mut hive_proto::v1::cell_agent_client::CellAgentClient<tonic::transport::Channel>,
        cell: &Cell,
        a: &Assignment,
    ) -> Result<TunnelConfig, String> {
        let net = &a.private_network;
        let started_ms = now_ms();
        let prepared = tokio::time::timeout(
            self.cfg.cell_call_timeout,
            client.prepare_tunnel(PrepareTunnelRequest {
                build_id: a.build_id.clone(),
            }),
        )
        .await;
        let public_key = match prepared {
            Ok(Ok(r)) => r.into_inner().public_key,
            Ok(Err(s)) => {
                return Err(format!(
                    "private network {net}: cell PrepareTunnel: {}",
                    s.message()
                ))
            }
            Err(_) => {
                return Err(format!(
                    "private network {net}: cell did not answer PrepareTunnel within {:?} \
                     (--cell-call-timeout-secs)",
                    self.cfg.cell_call_timeout
                ))
            }
        };
        // The key goes into the outbox and on to the control plane, and is sent again after a
        // reconnect: an answer that cannot be a WireGuard public key (base64 of 32 bytes, 44
        // characters) is refused here. One of megabytes would pass the control plane's message
        // limit and end the box's session at every resend.
        let is_key = public_key.len() == 44
            && public_key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
        if !is_key {
            return Err(format!(
                "private network {net}: cell PrepareTunnel answered {} bytes that are not a \
                 public key",
                public_key.len()
            ));
        }
        let sent_ms = now_ms();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let key = (a.build_id.clone(), a.lease_id.clone());
        let request = KeyExchangeRequest {
            build_id: a.build_id.clone(),
            lease_id: a.lease_id.clone(),
            cell_id: cell.id.clone(),
            cell_public_key: public_key,
        };
        {
            // Waiter first, so the reply always finds it; lock order: exchanges, then outbox.
            let mut pending = self.key_exchanges();
            let seq = self
                .outbox()
                .push(box_message::Msg::KeyExchange(request.clone()));
            pending.insert(
                key.clone(),
                PendingExchange {
                    request,
                    seq,
                    reply: tx,
                },
            );
        }
        self.outbox_changed.notify_one();
        let reply = tokio::time::timeout(KEY_EXCHANGE_TIMEOUT, rx).await;
        self.key_exchanges().remove(&key);
        let r = match reply {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => return Err(format!("private network {net}: key exchange abandoned")),
            Err(_) => {
                return Err(format!(
                "private network {net}: no key exchange reply from the control plane within {}s",
                KEY_EXCHANGE_TIMEOUT.as_secs()
            ))
            }
        };
        if !r.error.is_empty() {
            return Err(format!("private network {net}: key exchange: {}", r.error));
        }
        // Epoch times, so a benchmark can line them up with the control plane's and the cell's.
        tracing::info!(build = %a.build_id, prepare_at_ms = started_ms, kx_sent_at_ms = sent_ms,
            kx_reply_at_ms = now_ms(), "key exchange answered");
        Ok(TunnelConfig {
            connector_public_key: r.connector_public_key,
            connector_endpoint: r.connector_endpoint,
            tunnel_address: r.tunnel_address,
            allowed_prefixes: r.allowed_prefixes,
            persistent_keepalive_secs: r.persistent_keepalive_secs,
            handshake_timeout_secs: r.handshake_timeout_secs,
            network: if r.network.is_empty() {
                net.clone()
            } else {
                r.network
            },
        })
    }
}
