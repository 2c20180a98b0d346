//! The box's link to the control plane: one `BoxAgent.Session` stream, kept open.
//!
//! Outbound, every build update and log chunk goes through the [`Outbox`]: it gets a per-box
//! sequence number and stays in memory until the control plane acknowledges it (`Ack{seq}`, or
//! `Registered.acked_seq` after a reconnect), so nothing is lost or duplicated across reconnects.
//! Inbound, assignments start a build task: take a cell from the pool, `CellAgent.RunBuild`, relay
//! `CellAgent.Events` as updates and logs (log `seq` dense per build), destroy the cell, top the
//! pool up. If the control plane is unreachable for longer than the lease, the box fences itself:
//! its builds' leases are gone, so it cancels them rather than run work nobody owns.
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hive_proto::v1::box_agent_client::BoxAgentClient;
use hive_proto::v1::{
    box_message, control_message, Assignment, BoxMessage, BuildState, BuildUpdate, BuildUpdateKind,
    CellCancelRequest, CellEventKind, CellEventsRequest, CellInfo, Heartbeat, KeyExchangeReply,
    KeyExchangeRequest, LogChunk, PrepareTunnelRequest, Register, RunBuildRequest, TunnelConfig,
};
use tokio::sync::{watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::backend::now_ms;
use crate::backend::CellBackend;
use crate::cell::Cell;
use crate::pool::Pool;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid control plane URL {0:?}")]
    Url(String, #[source] tonic::transport::Error),
    #[error("connect to control plane {0}")]
    Connect(String, #[source] tonic::transport::Error),
    #[error("open BoxAgent session")]
    Session(#[source] tonic::Status),
    #[error("control plane did not answer Register within {0:?}")]
    RegisterTimeout(Duration),
    #[error("control plane's first message was not Registered")]
    NotRegistered,
    #[error("BoxAgent stream failed")]
    Stream(#[source] tonic::Status),
    #[error("control plane closed the BoxAgent stream")]
    Closed,
}

/// How the agent identifies itself and times things.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub control_plane: String,
    pub box_id: String,
    pub hostname: String,
    /// The control plane's lease time: self-fence after this long without it.
    pub lease: Duration,
    /// Heartbeat period until Registered says otherwise.
    pub heartbeat: Duration,
    /// How long a cell may take to stop after a cancel before the box reports it stopped anyway.
    pub cancel_grace: Duration,
    /// How long a call into a cell (PrepareTunnel, RunBuild, Cancel) may take: a guest on a slow
    /// host (an emulated KVM host is 20-50x slower than hardware) needs more than the default.
    pub cell_call_timeout: Duration,
}

/// Messages waiting for an acknowledgement.
#[derive(Debug, Default)]
pub struct Outbox {
    next_seq: u64,
    unacked: BTreeMap<u64, BoxMessage>,
    registered_once: bool,
}

impl Outbox {
    pub fn new() -> Self {
        Outbox {
            next_seq: 1,
            ..Default::default()
        }
    }

    /// Queues a message; returns its sequence number.
    pub fn push(&mut self, msg: box_message::Msg) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unacked.insert(
            seq,
            BoxMessage {
                seq,
                msg: Some(msg),
            },
        );
        seq
    }

    /// Everything up to and including `seq` is stored by the control plane.
    pub fn ack(&mut self, seq: u64) {
        self.unacked = self.unacked.split_off(&(seq + 1));
    }

    /// After Registered: drop what the control plane already has. On the first registration of
    /// this process, the control plane may know sequence numbers from a previous run of the box;
    /// nothing queued so far was ever sent, so it is renumbered after them instead of dropped.
    pub fn registered(&mut self, acked_seq: u64) {
        if !self.registered_once {
            self.registered_once = true;
            let msgs: Vec<BoxMessage> = std::mem::take(&mut self.unacked).into_values().collect();
            self.next_seq = acked_seq + 1;
            for m in msgs {
                if let Some(msg) = m.msg {
                    self.push(msg);
                }
            }
            return;
        }
        self.ack(acked_seq);
    }

    /// Messages with seq > `after`, in order.
    pub fn pending_after(&self, after: u64) -> Vec<BoxMessage> {
        self.unacked
            .range(after + 1..)
            .map(|(_, m)| m.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.unacked.len()
    }

    /// Whether message `seq` still waits for its acknowledgement (it will be sent again).
    pub fn holds(&self, seq: u64) -> bool {
        self.unacked.contains_key(&seq)
    }

    pub fn is_empty(&self) -> bool {
        self.unacked.is_empty()
    }
}

/// A build the box runs.
#[derive(Debug)]
struct RunningBuild {
    lease_id: String,
    cell_id: String,
    size_class: String,
    cancel: watch::Sender<Option<(BuildState, String)>>,
}

pub struct Agent<B: CellBackend> {
    cfg: AgentConfig,
    pool: Arc<Pool<B>>,
    outbox: Mutex<Outbox>,
    outbox_changed: Notify,
    builds: Mutex<HashMap<String, RunningBuild>>,
    builds_changed: Notify,
    last_contact: Mutex<Instant>,
    connected: AtomicBool,
    draining: AtomicBool,
    heartbeat_ms: Mutex<u64>,
    /// Assignment received -> first build output line received from the cell, ms (the box's
    /// dispatch overhead plus the cell's start of the build; bounded sample for /healthz).
    dispatch_ms: Mutex<Vec<f64>>,
    /// Key exchanges waiting for the control plane's reply, by (build, lease).
    key_exchanges: Mutex<HashMap<(String, String), PendingExchange>>,
}

/// A key exchange request sent and not yet answered.
#[derive(Debug)]
struct PendingExchange {
    request: KeyExchangeRequest,
    /// Outbox sequence number of the latest copy sent.
    seq: u64,
    reply: tokio::sync::oneshot::Sender<KeyExchangeReply>,
}

/// How long a private-network build waits for the key exchange (its connector applies the
/// peer first, up to 5 s).
const KEY_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);

/// Most dispatch samples kept.
const DISPATCH_SAMPLES: usize = 10_000;

impl<B: CellBackend> std::fmt::Debug for Agent<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("cfg", &self.cfg).finish()
    }
}

/// How a build ended, as reported in FINISHED.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub state: BuildState,
    pub exit_code: i32,
    pub message: String,
}

impl<B: CellBackend> Agent<B> {
    pub fn new(cfg: AgentConfig, pool: Arc<Pool<B>>) -> Arc<Self> {
        let heartbeat_ms = cfg.heartbeat.as_millis() as u64;
        Arc::new(Agent {
            cfg,
            pool,
            outbox: Mutex::new(Outbox::new()),
            outbox_changed: Notify::new(),
            builds: Mutex::new(HashMap::new()),
            builds_changed: Notify::new(),
            last_contact: Mutex::new(Instant::now()),
            connected: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            heartbeat_ms: Mutex::new(heartbeat_ms),
            dispatch_ms: Mutex::new(Vec::new()),
            key_exchanges: Mutex::new(HashMap::new()),
        })
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn builds(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunningBuild>> {
        self.builds.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key_exchanges(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, String), PendingExchange>> {
        self.key_exchanges.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After a reconnect: a key exchange request the control plane acknowledged but did not
    /// answer on the old session may have lost its answer with that session (the control plane
    /// answers on whatever session the box has when it is done). Queue it again; the control
    /// plane answers a repeated request for the same build, lease and key with the same lease.
    /// Requests still unacknowledged go out again with the rest of the outbox.
    fn resend_key_exchanges(&self) -> usize {
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

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    pub fn running_builds(&self) -> Vec<String> {
        let mut v: Vec<String> = self.builds().keys().cloned().collect();
        v.sort();
        v
    }

    /// (samples, median, p99) of the dispatch latency in ms.
    pub fn dispatch_stats(&self) -> (usize, f64, f64) {
        let mut v = self
            .dispatch_ms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if v.is_empty() {
            return (0, 0.0, 0.0);
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let pick = |p: f64| v[(((v.len() - 1) as f64) * p).round() as usize];
        (v.len(), pick(0.5), pick(0.99))
    }

    pub fn unacked(&self) -> usize {
        self.outbox().len()
    }

    /// Queues an update or log for the control plane.
    pub fn send(&self, msg: box_message::Msg) {
        self.outbox().push(msg);
        self.outbox_changed.notify_one();
    }

    fn update(
        &self,
        build_id: &str,
        lease_id: &str,
        kind: BuildUpdateKind,
        f: impl FnOnce(&mut BuildUpdate),
    ) {
        let mut u = BuildUpdate {
            build_id: build_id.to_string(),
            lease_id: lease_id.to_string(),
            kind: kind as i32,
            at_ms: now_ms(),
            ..Default::default()
        };
        f(&mut u);
        self.send(box_message::Msg::Update(u));
    }

    /// Reports a build the box can no longer finish (reaper, after a restart).
    pub fn report_lost(&self, build_id: &str, lease_id: &str, message: &str) {
        self.update(build_id, lease_id, BuildUpdateKind::Finished, |u| {
            u.state = BuildState::Failed as i32;
            u.exit_code = -1;
            u.message = message.to_string();
        });
    }

    /// Runs the session loop until `shutdown` turns true (or a Drain finished).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let fence = tokio::spawn(Arc::clone(&self).fence_watch());
        let mut backoff = Duration::from_millis(100);
        loop {
            if *shutdown.borrow() {
                break;
            }
            let started = Instant::now();
            match self.session(&mut shutdown).await {
                Ok(()) => break,
                Err(e) => {
                    self.connected.store(false, Ordering::SeqCst);
                    tracing::warn!(error = %hive_jail::error_chain(&e), retry_in_ms = backoff.as_millis() as u64, "control plane link down");
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        self.connected.store(false, Ordering::SeqCst);
        fence.abort();
    }

    fn pools_and_cells(&self) -> (Vec<hive_proto::v1::PoolState>, Vec<CellInfo>) {
        let mut cells: Vec<CellInfo> = self
            .pool
            .warm_ids()
            .into_iter()
            .map(|(id, class)| CellInfo {
                id,
                box_id: self.cfg.box_id.clone(),
                size_class: class,
                state: "warm".into(),
                build_id: String::new(),
                updated_at_ms: now_ms(),
            })
            .collect();
        for (build_id, b) in self.builds().iter() {
            if !b.cell_id.is_empty() {
                cells.push(CellInfo {
                    id: b.cell_id.clone(),
                    box_id: self.cfg.box_id.clone(),
                    size_class: b.size_class.clone(),
                    state: "busy".into(),
                    build_id: build_id.clone(),
                    updated_at_ms: now_ms(),
                });
            }
        }
        (self.pool.states(), cells)
    }

    async fn session(
        self: &Arc<Self>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), AgentError> {
        let url = self.cfg.control_plane.clone();
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| AgentError::Url(url.clone(), e))?
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| AgentError::Connect(url.clone(), e))?;
        let mut client = BoxAgentClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel::<BoxMessage>(1024);
        let (pools, _) = self.pools_and_cells();
        let register = BoxMessage {
            seq: 0,
            msg: Some(box_message::Msg::Register(Register {
                box_id: self.cfg.box_id.clone(),
                hostname: self.cfg.hostname.clone(),
                backend: self.pool.backend().name().to_string(),
                pools,
                running_builds: self.running_builds(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            })),
        };
        let _ = tx.send(register).await;
        let mut inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .map_err(AgentError::Session)?
            .into_inner();
        let wait = Duration::from_secs(10);
        let first = tokio::time::timeout(wait, inbound.message())
            .await
            .map_err(|_| AgentError::RegisterTimeout(wait))?
            .map_err(AgentError::Stream)?
            .ok_or(AgentError::Closed)?;
        let Some(control_message::Msg::Registered(reg)) = first.msg else {
            return Err(AgentError::NotRegistered);
        };
        for size in &reg.size_classes {
            self.pool.set_shape(size);
        }
        if reg.heartbeat_interval_ms > 0 {
            *self.heartbeat_ms.lock().unwrap_or_else(|p| p.into_inner()) =
                u64::from(reg.heartbeat_interval_ms);
        }
        let mut sent_up_to = {
            let mut ob = self.outbox();
            ob.registered(reg.acked_seq);
            reg.acked_seq
        };
        self.resend_key_exchanges();
        *self.last_contact.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.connected.store(true, Ordering::SeqCst);
        tracing::info!(box_id = %self.cfg.box_id, control_plane = %url, acked_seq = reg.acked_seq, resend = self.unacked(), "registered");

        let hb_ms = *self.heartbeat_ms.lock().unwrap_or_else(|p| p.into_inner());
        let mut heartbeat = tokio::time::interval(Duration::from_millis(hb_ms.max(50)));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let pending = self.outbox().pending_after(sent_up_to);
            for m in pending {
                let seq = m.seq;
                if tx.send(m).await.is_err() {
                    return Err(AgentError::Closed);
                }
                sent_up_to = seq;
            }
            if self.draining.load(Ordering::SeqCst)
                && self.builds().is_empty()
                && self.outbox().is_empty()
            {
                tracing::info!("drained: no builds left, disconnecting");
                return Ok(());
            }
            tokio::select! {
                msg = inbound.message() => {
                    let msg = msg.map_err(AgentError::Stream)?.ok_or(AgentError::Closed)?;
                    *self.last_contact.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                    self.handle(msg.msg);
                }
                _ = self.outbox_changed.notified() => {}
                _ = self.builds_changed.notified() => {}
                _ = heartbeat.tick() => {
                    let (pools, cells) = self.pools_and_cells();
                    let hb = BoxMessage {
                        seq: 0,
                        msg: Some(box_message::Msg::Heartbeat(Heartbeat {
                            pools,
                            running_builds: self.running_builds(),
                            cells,
                        })),
                    };
                    if tx.send(hb).await.is_err() {
                        return Err(AgentError::Closed);
                    }
                }
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn handle(self: &Arc<Self>, msg: Option<control_message::Msg>) {
        match msg {
            Some(control_message::Msg::Assign(a)) => self.assign(a),
            Some(control_message::Msg::Cancel(c)) => {
                let state = BuildState::try_from(c.state).unwrap_or(BuildState::Cancelled);
                let builds = self.builds();
                match builds.get(&c.build_id) {
                    Some(b) => {
                        tracing::info!(build = %c.build_id, lease = %b.lease_id, state = state.short_name(), reason = %c.reason, "cancel requested");
                        let _ = b.cancel.send(Some((state, c.reason)));
                    }
                    None => {
                        tracing::debug!(build = %c.build_id, "cancel for a build this box does not run")
                    }
                }
            }
            Some(control_message::Msg::Ack(ack)) => self.outbox().ack(ack.seq),
            Some(control_message::Msg::Drain(_)) => {
                tracing::info!("drain requested: finishing running builds, taking no new ones");
                self.draining.store(true, Ordering::SeqCst);
            }
            Some(control_message::Msg::KeyExchange(r)) => {
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
            Some(control_message::Msg::Registered(_)) | None => {}
        }
    }

    fn assign(self: &Arc<Self>, a: Assignment) {
        if self.draining.load(Ordering::SeqCst) {
            self.update(&a.build_id, &a.lease_id, BuildUpdateKind::Rejected, |u| {
                u.message = "box is draining".into();
            });
            return;
        }
        let (tx, rx) = watch::channel(None);
        {
            let mut builds = self.builds();
            if let Some(running) = builds.get(&a.build_id) {
                if running.lease_id != a.lease_id {
                    // A new attempt while the old one still winds down here: refuse it, so the
                    // control plane places it afresh instead of waiting for a confirmation.
                    let old_lease = running.lease_id.clone();
                    drop(builds);
                    self.update(&a.build_id, &a.lease_id, BuildUpdateKind::Rejected, |u| {
                        u.message = format!("this box still runs lease {old_lease} of the build");
                    });
                }
                // The same lease re-sent: nothing new to do.
                return;
            }
            builds.insert(
                a.build_id.clone(),
                RunningBuild {
                    lease_id: a.lease_id.clone(),
                    cell_id: String::new(),
                    size_class: a
                        .size_class
                        .as_ref()
                        .map(|s| s.name.clone())
                        .unwrap_or_default(),
                    cancel: tx,
                },
            );
        }
        let agent = Arc::clone(self);
        let received = Instant::now();
        tokio::spawn(async move {
            let build_id = a.build_id.clone();
            agent.run_build(a, rx, received).await;
            agent.builds().remove(&build_id);
            agent.builds_changed.notify_one();
        });
    }

    async fn run_build(
        self: &Arc<Self>,
        a: Assignment,
        cancel: watch::Receiver<Option<(BuildState, String)>>,
        received: Instant,
    ) {
        let class = a.size_class.clone().unwrap_or_default();
        if !class.name.is_empty() && class.vcpus > 0 {
            self.pool.set_shape(&class);
        }
        let (cell, warm) = match self.pool.take(&class.name).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(build = %a.build_id, error = %hive_jail::error_chain(&e), "rejecting assignment");
                self.update(&a.build_id, &a.lease_id, BuildUpdateKind::Rejected, |u| {
                    u.message = hive_jail::error_chain(&e);
                });
                return;
            }
        };
        if let Some(b) = self.builds().get_mut(&a.build_id) {
            b.cell_id = cell.id.clone();
        }
        // The record only matters after a crash (the reaper reads it), so the disk write runs
        // beside the dispatch instead of in front of it.
        {
            let backend = Arc::clone(self.pool.backend());
            let (cell_id, build_id, lease_id) =
                (cell.id.clone(), a.build_id.clone(), a.lease_id.clone());
            tokio::task::spawn_blocking(move || {
                backend.record_build(&cell_id, &build_id, &lease_id)
            });
        }
        self.update(&a.build_id, &a.lease_id, BuildUpdateKind::Accepted, |u| {
            u.cell_id = cell.id.clone();
            u.warm_start = warm;
        });
        tracing::info!(build = %a.build_id, cell = %cell.id, warm, since_assignment_us = received.elapsed().as_micros() as u64, "build placed in cell");
        let outcome = self.relay(&cell, &a, cancel, received).await;
        tracing::info!(build = %a.build_id, cell = %cell.id, state = outcome.state.short_name(), exit_code = outcome.exit_code, "build finished");
        self.update(&a.build_id, &a.lease_id, BuildUpdateKind::Finished, |u| {
            u.cell_id = cell.id.clone();
            u.state = outcome.state as i32;
            u.exit_code = outcome.exit_code;
            u.message = outcome.message.clone();
        });
        self.pool.release(cell).await;
    }

    /// Private-network builds: the cell makes its key pair and hands over the public key, which
    /// goes to the control plane's key exchange; its reply (connector, addresses) becomes the
    /// RunBuild tunnel. Only public keys and addresses pass through the box.
    async fn key_exchange(
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

    /// Starts the build in the cell and relays its events until it ends.
    async fn relay(
        self: &Arc<Self>,
        cell: &Cell,
        a: &Assignment,
        mut cancel: watch::Receiver<Option<(BuildState, String)>>,
        received: Instant,
    ) -> Outcome {
        let failed = |message: String| Outcome {
            state: BuildState::Failed,
            exit_code: -1,
            message,
        };
        let mut client = cell.client();
        let tunnel = if a.private_network.is_empty() {
            None
        } else {
            match self.key_exchange(&mut client, cell, a).await {
                Ok(t) => Some(t),
                Err(message) => {
                    tracing::warn!(build = %a.build_id, %message, "private network set-up failed");
                    return failed(message);
                }
            }
        };
        let req = RunBuildRequest {
            build_id: a.build_id.clone(),
            repo_url: a.repo_url.clone(),
            revision: a.revision.clone(),
            git_ref: a.git_ref.clone(),
            steps: a.steps.clone(),
            env: a.env.clone(),
            timeout_secs: a.timeout_secs,
            tunnel,
        };
        match tokio::time::timeout(self.cfg.cell_call_timeout, client.run_build(req)).await {
            Ok(Ok(r)) if r.get_ref().accepted => {
                tracing::debug!(build = %a.build_id, since_assignment_us = received.elapsed().as_micros() as u64, "cell accepted the build");
            }
            Ok(Ok(_)) => return failed("cell daemon refused the build".into()),
            Ok(Err(s)) => return failed(format!("cell daemon RunBuild: {}", s.message())),
            Err(_) => {
                return failed(format!(
                    "cell daemon did not answer RunBuild within {:?} (--cell-call-timeout-secs)",
                    self.cfg.cell_call_timeout
                ))
            }
        }
        let mut next = 0u64;
        let mut log_seq = 0u64;
        let mut running = false;
        let mut stop: Option<(BuildState, String, tokio::time::Instant)> = None;
        // The cell enforces the timeout; this is the box's backstop if the cell stops answering.
        let backstop = (a.timeout_secs > 0).then(|| {
            tokio::time::Instant::now() + Duration::from_secs(u64::from(a.timeout_secs) + 30)
        });
        let mut failures = 0;
        loop {
            let stream = client
                .events(CellEventsRequest {
                    build_id: a.build_id.clone(),
                    from_seq: next,
                })
                .await;
            let mut stream = match stream {
                Ok(s) => s.into_inner(),
                Err(s) => {
                    failures += 1;
                    if failures > 5 || !self.pool.backend().is_alive(&cell.id) {
                        return failed(format!("lost the cell's event stream: {}", s.message()));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            loop {
                let deadline = match (&stop, backstop) {
                    (Some((_, _, d)), _) => Some(*d),
                    (None, b) => b,
                };
                tokio::select! {
                    ev = stream.message() => {
                        let ev = match ev {
                            Ok(Some(ev)) => ev,
                            Ok(None) | Err(_) => break,
                        };
                        if ev.seq < next {
                            continue;
                        }
                        next = ev.seq + 1;
                        failures = 0;
                        if !running {
                            running = true;
                            self.update(&a.build_id, &a.lease_id, BuildUpdateKind::Running, |u| u.cell_id = cell.id.clone());
                        }
                        match CellEventKind::try_from(ev.kind).unwrap_or(CellEventKind::Unspecified) {
                            CellEventKind::Log => {
                                if log_seq == 0 {
                                    let ms = received.elapsed().as_secs_f64() * 1000.0;
                                    tracing::debug!(build = %a.build_id, dispatch_ms = ms, "first output line from the cell");
                                    let mut d = self.dispatch_ms.lock().unwrap_or_else(|p| p.into_inner());
                                    if d.len() < DISPATCH_SAMPLES {
                                        d.push(ms);
                                    }
                                }
                                self.send(box_message::Msg::Log(LogChunk {
                                    build_id: a.build_id.clone(),
                                    seq: log_seq,
                                    stream: ev.stream,
                                    step: ev.step,
                                    data: ev.data,
                                    at_ms: if ev.at_ms > 0 { ev.at_ms } else { now_ms() },
                                }));
                                log_seq += 1;
                            }
                            CellEventKind::StepStarted => self.update(&a.build_id, &a.lease_id, BuildUpdateKind::StepStarted, |u| u.step = ev.step),
                            CellEventKind::StepFinished => self.update(&a.build_id, &a.lease_id, BuildUpdateKind::StepFinished, |u| {
                                u.step = ev.step;
                                u.exit_code = ev.exit_code;
                            }),
                            CellEventKind::BuildFinished => {
                                let mut state = BuildState::try_from(ev.state).unwrap_or(BuildState::Failed);
                                if !state.is_terminal() {
                                    state = BuildState::Failed;
                                }
                                return Outcome { state, exit_code: ev.exit_code, message: ev.message };
                            }
                            CellEventKind::Unspecified => {}
                        }
                    }
                    changed = cancel.changed(), if stop.is_none() => {
                        if changed.is_err() {
                            continue;
                        }
                        let req = cancel.borrow().clone();
                        if let Some((state, reason)) = req {
                            let _ = tokio::time::timeout(self.cfg.cell_call_timeout, client.cancel(CellCancelRequest {
                                build_id: a.build_id.clone(),
                                state: state as i32,
                                reason: reason.clone(),
                            })).await;
                            stop = Some((state, reason, tokio::time::Instant::now() + self.cfg.cancel_grace));
                        }
                    }
                    _ = sleep_until_opt(deadline) => {
                        return match stop {
                            Some((state, reason, _)) => Outcome {
                                state,
                                exit_code: -1,
                                message: format!("{reason} (the cell did not stop in time; destroyed)"),
                            },
                            None => Outcome {
                                state: BuildState::TimedOut,
                                exit_code: -1,
                                message: "build exceeded its timeout and the cell did not stop it".into(),
                            },
                        };
                    }
                }
            }
            if !self.pool.backend().is_alive(&cell.id) {
                return failed("the cell died during the build".into());
            }
            failures += 1;
            if failures > 5 {
                return failed("lost the cell's event stream".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Self-fencing: without the control plane for longer than the lease, cancel every build.
    async fn fence_watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut fenced = false;
        loop {
            tick.tick().await;
            let silent = self
                .last_contact
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed();
            if self.is_connected() {
                fenced = false;
                continue;
            }
            if silent > self.cfg.lease && !fenced {
                fenced = true;
                let builds = self.builds();
                if !builds.is_empty() {
                    tracing::warn!(
                        silent_ms = silent.as_millis() as u64,
                        builds = builds.len(),
                        "control plane unreachable past the lease: cancelling builds (self-fence)"
                    );
                }
                for b in builds.values() {
                    let _ = b.cancel.send(Some((
                        BuildState::Failed,
                        "box lost the control plane past its lease".into(),
                    )));
                }
            }
        }
    }

    /// Graceful stop: take no new builds, give running ones `grace` to finish, cancel the rest,
    /// wait (bounded) for their reports to be acknowledged.
    pub async fn drain(&self, grace: Duration) {
        self.draining.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + grace;
        while !self.builds().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let n = {
            let builds = self.builds();
            for b in builds.values() {
                let _ = b
                    .cancel
                    .send(Some((BuildState::Failed, "box is shutting down".into())));
            }
            builds.len()
        };
        if n > 0 {
            tracing::warn!(builds = n, "cancelled builds still running at shutdown");
        }
        let deadline = Instant::now() + self.cfg.cancel_grace + Duration::from_secs(2);
        while (!self.builds().is_empty() || (!self.outbox().is_empty() && self.is_connected()))
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: u64) -> box_message::Msg {
        box_message::Msg::Log(LogChunk {
            build_id: "b".into(),
            seq: n,
            ..Default::default()
        })
    }

    #[test]
    fn outbox_acks_and_resends_in_order() {
        let mut ob = Outbox::new();
        ob.registered(0);
        for i in 0..5 {
            assert_eq!(ob.push(log(i)), i + 1);
        }
        ob.ack(2);
        let p: Vec<u64> = ob.pending_after(0).iter().map(|m| m.seq).collect();
        assert_eq!(p, vec![3, 4, 5]);
        // Reconnect: the control plane stored up to 4 but the ack was lost.
        ob.registered(4);
        let p: Vec<u64> = ob.pending_after(4).iter().map(|m| m.seq).collect();
        assert_eq!(p, vec![5]);
        assert_eq!(ob.len(), 1);
    }

    #[test]
    fn outbox_holds_a_message_until_it_is_acked() {
        // A key exchange request the control plane acked is no longer held: after a reconnect
        // the agent queues it again itself (`resend_key_exchanges`); one still held is not.
        let mut ob = Outbox::new();
        ob.registered(0);
        let kx = ob.push(box_message::Msg::KeyExchange(KeyExchangeRequest::default()));
        let later = ob.push(log(1));
        assert!(ob.holds(kx) && ob.holds(later));
        ob.ack(kx);
        assert!(!ob.holds(kx) && ob.holds(later));
    }

    #[test]
    fn outbox_renumbers_after_a_previous_run() {
        let mut ob = Outbox::new();
        ob.push(log(0));
        ob.push(log(1));
        // The control plane knows 40 messages from the box's previous life.
        ob.registered(40);
        let p: Vec<u64> = ob.pending_after(40).iter().map(|m| m.seq).collect();
        assert_eq!(p, vec![41, 42]);
        assert_eq!(ob.push(log(2)), 43);
    }
}
