//! The link to the control plane: one `BoxAgent.Session` stream at a time, reconnected with
//! backoff. A session registers (the control plane answers with the size classes, the heartbeat
//! period and the last sequence number it stored), then loops: send what the outbox holds,
//! heartbeat, and hand each inbound message to its concern ([`run`](super::run) for assignments
//! and cancels, the outbox for acks, [`keyx`](super::keyx) for key exchange replies), until the
//! box is drained or told to stop.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hive_proto::v1::box_agent_client::BoxAgentClient;
use hive_proto::v1::{
    box_message, control_message, BoxMessage, CellInfo, ControlMessage, Heartbeat, Register,
    Registered,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tonic::Streaming;

use super::{Agent, AgentError};
use crate::backend::CellBackend;
use hive_sys::{now_ms, Backoff};

impl<B: CellBackend> Agent<B> {
    /// Runs the session loop until `shutdown` turns true (or a Drain finished).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let fence = tokio::spawn(Arc::clone(&self).fence_watch());
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            if *shutdown.borrow() {
                break;
            }
            let started = Instant::now();
            let ended = self.session(&mut shutdown).await;
            // A session that lasted a while was a working link: start again from short pauses.
            if started.elapsed() > Duration::from_secs(10) {
                backoff.reset();
            }
            let pause = backoff.next_delay();
            match ended {
                Ok(()) => break,
                Err(e) => {
                    self.connected.store(false, Ordering::SeqCst);
                    // Fail over: the next session dials the next control plane (all of them
                    // serve every box; with one, this is the same one again).
                    self.next_cp.fetch_add(1, Ordering::SeqCst);
                    tracing::warn!(error = %hive_sys::error_chain(&e), retry_in_ms = pause.as_millis() as u64, "control plane link down");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
        }
        self.connected.store(false, Ordering::SeqCst);
        fence.abort();
    }

    /// One session: connect, register, then pump until it ends.
    async fn session(
        self: &Arc<Self>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), AgentError> {
        let (tx, mut inbound, reg) = self.connect().await?;
        let mut sent_up_to = self.registered(&reg);
        let hb_ms = *self.heartbeat_ms.lock().unwrap_or_else(|p| p.into_inner());
        let mut heartbeat = tokio::time::interval(Duration::from_millis(hb_ms.max(50)));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Room the control plane does not know of (a cell became warm, a used one was
        // released) is told at once in an extra heartbeat, not at the next tick: until then
        // the control plane counts the box fuller than it is, and places the next build cold
        // or not here. `told` is the pool's count at the last heartbeat sent; extra
        // heartbeats are at least `room_heartbeat_gap` apart (a burst of boots is told in one).
        let mut told = self.pool.room_added();
        let mut last_sent = Instant::now();
        let mut due: Option<tokio::time::Instant> = None;
        loop {
            sent_up_to = self.flush(&tx, sent_up_to).await?;
            if self.drained() {
                tracing::info!("drained: no builds left, disconnecting");
                return Ok(());
            }
            // Listening before the count is read: a change in between still wakes the loop
            // (a `Notified` receives `notify_waiters` from its creation, polled or not).
            let changed = self.pool.changed();
            if let Some(gap) = self.cfg.room_heartbeat_gap {
                if due.is_none() && self.pool.room_added() != told {
                    due = Some((last_sent + gap).into());
                }
            }
            let at = due.unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                msg = inbound.message() => {
                    let msg = msg.map_err(AgentError::Stream)?.ok_or(AgentError::Closed)?;
                    *self.last_contact.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                    self.handle(msg.msg);
                }
                _ = self.outbox_changed.notified() => {}
                _ = self.builds_changed.notified() => {}
                _ = changed, if due.is_none() => {}
                _ = tokio::time::sleep_until(at), if due.is_some() => {
                    told = self.pool.room_added();
                    due = None;
                    last_sent = Instant::now();
                    self.heartbeat(&tx).await?;
                }
                _ = heartbeat.tick() => {
                    told = self.pool.room_added();
                    due = None;
                    last_sent = Instant::now();
                    self.heartbeat(&tx).await?;
                    if let Some(creds) = &self.cfg.credentials {
                        creds.renew_if_due();
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

    /// Opens the stream and sends Register; returns once the control plane answered Registered.
    async fn connect(
        &self,
    ) -> Result<
        (
            mpsc::Sender<BoxMessage>,
            Streaming<ControlMessage>,
            Registered,
        ),
        AgentError,
    > {
        let url = {
            let all = self.control_planes();
            let i = self.next_cp.load(Ordering::SeqCst) % all.len().max(1);
            all.get(i).copied().unwrap_or_default().to_string()
        };
        let endpoint = match &self.cfg.credentials {
            Some(creds) => {
                let endpoint = creds.endpoint_for(&url).map_err(AgentError::Credentials)?;
                if creds.due_for_renewal() {
                    // Failing to renew is no reason not to connect: the old certificate is
                    // still good, and the next session tries again.
                    if let Err(e) = creds.renew().await {
                        tracing::warn!(error = %e, "box certificate renewal failed; keeping the current one");
                    }
                    creds.endpoint_for(&url).map_err(AgentError::Credentials)?
                } else {
                    endpoint
                }
            }
            None => {
                Endpoint::from_shared(url.clone()).map_err(|e| AgentError::Url(url.clone(), e))?
            }
        };
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| AgentError::Connect(url.clone(), e))?;
        let mut client = BoxAgentClient::new(channel);
        let (tx, rx) = mpsc::channel::<BoxMessage>(1024);
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
        Ok((tx, inbound, reg))
    }

    /// Applies a registration (shapes, heartbeat period, what the control plane already has);
    /// returns the sequence number sending resumes after.
    fn registered(&self, reg: &Registered) -> u64 {
        for size in &reg.size_classes {
            self.pool.set_shape(size);
        }
        if reg.heartbeat_interval_ms > 0 {
            *self.heartbeat_ms.lock().unwrap_or_else(|p| p.into_inner()) =
                u64::from(reg.heartbeat_interval_ms);
        }
        if reg.lease_ms > 0 {
            let ms = u64::from(reg.lease_ms);
            if ms != self.cfg.lease.as_millis() as u64 {
                tracing::info!(
                    control_plane_lease_ms = ms,
                    box_lease_ms = self.cfg.lease.as_millis() as u64,
                    "using the control plane's lease"
                );
            }
            self.lease_ms.store(ms, Ordering::SeqCst);
        }
        self.outbox().registered(reg.acked_seq);
        // What the control plane already had counts as acknowledged (a refill waiting on the
        // first log line's ack goes on at once after a reconnect).
        self.outbox_acked.notify_waiters();
        self.resend_key_exchanges();
        *self.last_contact.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.connected.store(true, Ordering::SeqCst);
        let all = self.control_planes();
        let at = all
            .get(self.next_cp.load(Ordering::SeqCst) % all.len().max(1))
            .copied()
            .unwrap_or_default();
        tracing::info!(box_id = %self.cfg.box_id, control_plane = %at, acked_seq = reg.acked_seq, resend = self.unacked(), "registered");
        reg.acked_seq
    }

    /// Sends what the outbox holds after `sent_up_to`; returns the new high mark.
    async fn flush(
        &self,
        tx: &mpsc::Sender<BoxMessage>,
        mut sent_up_to: u64,
    ) -> Result<u64, AgentError> {
        let pending = self.outbox().pending_after(sent_up_to);
        for m in pending {
            let seq = m.seq;
            if tx.send(m).await.is_err() {
                return Err(AgentError::Closed);
            }
            sent_up_to = seq;
        }
        Ok(sent_up_to)
    }

    /// Draining, no build left and everything acknowledged: the session may end.
    fn drained(&self) -> bool {
        self.draining.load(Ordering::SeqCst) && self.builds().is_empty() && self.outbox().is_empty()
    }

    async fn heartbeat(&self, tx: &mpsc::Sender<BoxMessage>) -> Result<(), AgentError> {
        let (pools, cells) = self.pools_and_cells();
        let hb = BoxMessage {
            seq: 0,
            msg: Some(box_message::Msg::Heartbeat(Heartbeat {
                pools,
                running_builds: self.running_builds(),
                cells,
            })),
        };
        tx.send(hb).await.map_err(|_| AgentError::Closed)
    }

    fn handle(self: &Arc<Self>, msg: Option<control_message::Msg>) {
        match msg {
            Some(control_message::Msg::Assign(a)) => self.assign(a),
            Some(control_message::Msg::Cancel(c)) => self.cancel(c),
            Some(control_message::Msg::Ack(ack)) => {
                self.outbox().ack(ack.seq);
                self.outbox_acked.notify_waiters();
            }
            Some(control_message::Msg::Drain(_)) => {
                tracing::info!("drain requested: finishing running builds, taking no new ones");
                self.draining.store(true, Ordering::SeqCst);
            }
            Some(control_message::Msg::KeyExchange(r)) => self.key_exchange_reply(r),
            Some(control_message::Msg::Registered(_)) | None => {}
        }
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
        let mut pools = self.pool.states();
        if self.draining.load(Ordering::SeqCst) {
            // A stopping box has no room: the control plane places nothing more here (an
            // assignment would only be rejected, and cost the build an attempt).
            for p in &mut pools {
                p.warm = 0;
                p.capacity = p.busy + p.booting;
            }
        }
        (pools, cells)
    }
}
