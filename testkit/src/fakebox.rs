//! A fake box: a real tonic client speaking `hive.v1.BoxAgent.Session`, driven step by step by a
//! test (or by the scheduler benchmark) instead of by cells.
//!
//! It keeps the box side of the protocol honest: every update and log chunk carries a per-box
//! increasing `BoxMessage.seq` (from 1, so `acked_seq == 0` means "nothing stored"), stays in the
//! unacked buffer until the control plane's `Ack` covers it, and is resent after a reconnect from
//! `Registered.acked_seq`. Heartbeats report the builds the box still runs, which is what renews
//! their leases; a test can silence them to play a box that hangs without disconnecting.
//!
//! A quiet box (`FakeBoxConfig::quiet`) sends nothing on its own: the test sends each message
//! (`send_acked`, `send_plain`, `send_raw`, `heartbeat_every`) and may read the raw stream, acks
//! included (`next_raw`), or not read it at all (`reads: false`, a box that stalls).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hive_proto::v1::box_agent_client::BoxAgentClient;
use hive_proto::v1::{
    box_message, control_message, Assignment, BoxMessage, BuildState, BuildUpdate, BuildUpdateKind,
    CancelBuild, CellInfo, ControlMessage, Heartbeat, LogChunk, LogStream, PoolState, Register,
    Registered,
};
use hive_proto::v1::{KeyExchangeReply, KeyExchangeRequest};
use hive_sys::now_ms;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

/// What can go wrong driving the fake box.
#[derive(Debug, thiserror::Error)]
pub enum FakeBoxError {
    #[error("connect to control plane at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("open BoxAgent.Session: {0}")]
    Session(#[source] tonic::Status),
    #[error("control plane closed the session before answering Register")]
    NoRegistered,
    #[error("first control message was not Registered but {0:?}")]
    UnexpectedFirst(Box<ControlMessage>),
    #[error("the session is not connected")]
    NotConnected,
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    #[error("session ended while waiting for {0}")]
    SessionEnded(&'static str),
}

/// How the fake box presents itself.
#[derive(Debug, Clone)]
pub struct FakeBoxConfig {
    pub box_id: String,
    pub hostname: String,
    pub backend: String,
    pub pools: Vec<PoolState>,
    /// Heartbeat period; `None` = use the interval the control plane sends in `Registered`.
    pub heartbeat_interval: Option<Duration>,
    /// Heartbeats on from the start (`set_heartbeats` turns them on and off later).
    pub heartbeats: bool,
    /// Reads what the control plane sends; `false` plays a box that never reads its stream
    /// (HTTP/2 flow control then backs up to the control plane's queue for it).
    pub reads: bool,
}

/// One pool of `class`: `warm` warm cells (the target) and room for `capacity`.
pub fn pool(class: &str, warm: u32, capacity: u32) -> PoolState {
    PoolState {
        size_class: class.to_string(),
        warm,
        booting: 0,
        busy: 0,
        target: warm,
        capacity,
    }
}

impl FakeBoxConfig {
    /// A sandbox box with `warm` warm cells (and room for `capacity`) of one size class.
    pub fn new(box_id: &str, size_class: &str, warm: u32, capacity: u32) -> Self {
        Self {
            box_id: box_id.to_string(),
            hostname: format!("{box_id}.test"),
            backend: "sandbox".to_string(),
            pools: vec![pool(size_class, warm, capacity)],
            heartbeat_interval: None,
            heartbeats: true,
            reads: true,
        }
    }

    /// A sandbox box reporting `pools` at registration that sends nothing on its own (no
    /// heartbeats): the test sends every message.
    pub fn quiet(box_id: &str, pools: Vec<PoolState>) -> Self {
        Self {
            pools,
            heartbeats: false,
            ..Self::new(box_id, "", 0, 0)
        }
    }
}

/// State shared between the test-facing handle and the connection's background tasks.
#[derive(Default)]
struct Shared {
    /// seq -> message, for every update/log not yet acknowledged.
    unacked: BTreeMap<u64, BoxMessage>,
    /// Highest seq the control plane acknowledged.
    acked: u64,
    /// Builds reported in heartbeats (leases the box keeps alive).
    running: BTreeSet<String>,
    heartbeats_on: bool,
    pools: Vec<PoolState>,
    /// Cells busy with a build, by build id (reported in heartbeats).
    cells: BTreeMap<String, CellInfo>,
}

enum Inbound {
    Msg(Box<ControlMessage>),
    Ended(u64),
}

struct Connection {
    /// `None` once the box closed its side (`close_send`).
    tx: Option<mpsc::Sender<BoxMessage>>,
    reader: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
        self.heartbeat.abort();
    }
}

/// One fake box. Not `Clone`: one test task drives it.
pub struct FakeBox {
    addr: String,
    cfg: FakeBoxConfig,
    shared: Arc<Mutex<Shared>>,
    acked_notify: Arc<Notify>,
    conn: Option<Connection>,
    inbox_tx: mpsc::UnboundedSender<Inbound>,
    inbox: mpsc::UnboundedReceiver<Inbound>,
    /// Connection generation, so the end of an old stream is not taken for the current one's.
    generation: u64,
    /// Messages received but not yet consumed by a typed `expect_*`/`next_*` call.
    pending: VecDeque<ControlMessage>,
    next_seq: u64,
    log_seq: HashMap<String, u64>,
    registered: Option<Registered>,
}

impl FakeBox {
    /// Connects to the control plane's gRPC address (`http://127.0.0.1:PORT`) and registers.
    pub async fn connect(addr: &str, cfg: FakeBoxConfig) -> Result<Self, FakeBoxError> {
        let (inbox_tx, inbox) = mpsc::unbounded_channel();
        let shared = Shared {
            heartbeats_on: cfg.heartbeats,
            pools: cfg.pools.clone(),
            ..Shared::default()
        };
        let mut fb = FakeBox {
            addr: addr.to_string(),
            cfg,
            shared: Arc::new(Mutex::new(shared)),
            acked_notify: Arc::new(Notify::new()),
            conn: None,
            inbox_tx,
            inbox,
            pending: VecDeque::new(),
            next_seq: 1,
            log_seq: HashMap::new(),
            registered: None,
            generation: 0,
        };
        fb.reconnect().await?;
        Ok(fb)
    }

    /// Points later reconnects at another address (a restarted control plane's new port).
    pub fn set_addr(&mut self, addr: &str) {
        self.addr = addr.to_string();
    }

    pub fn box_id(&self) -> &str {
        &self.cfg.box_id
    }

    /// The `Registered` answer of the current (last) session.
    pub fn registered(&self) -> Option<&Registered> {
        self.registered.as_ref()
    }

    /// Drops the stream (as a crashed or partitioned box would). Unacked messages are kept.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// Opens a new session: Register (with the builds still running), wait for Registered, then
    /// resend every unacked message after `Registered.acked_seq`, in order.
    pub async fn reconnect(&mut self) -> Result<Registered, FakeBoxError> {
        self.conn = None;
        self.generation += 1;
        let generation = self.generation;
        let mut client = BoxAgentClient::connect(self.addr.clone())
            .await
            .map_err(|source| FakeBoxError::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        let (tx, rx) = mpsc::channel::<BoxMessage>(1024);
        let running: Vec<String> = self.lock().running.iter().cloned().collect();
        let pools = self.lock().pools.clone();
        let register = BoxMessage {
            seq: 0,
            msg: Some(box_message::Msg::Register(Register {
                box_id: self.cfg.box_id.clone(),
                hostname: self.cfg.hostname.clone(),
                backend: self.cfg.backend.clone(),
                pools,
                running_builds: running,
                version: "fakebox".to_string(),
            })),
        };
        tx.send(register)
            .await
            .map_err(|_| FakeBoxError::NotConnected)?;
        let mut inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .map_err(FakeBoxError::Session)?
            .into_inner();
        let registered = match inbound.next().await {
            Some(Ok(ControlMessage {
                msg: Some(control_message::Msg::Registered(r)),
            })) => r,
            Some(Ok(other)) => return Err(FakeBoxError::UnexpectedFirst(Box::new(other))),
            Some(Err(status)) => return Err(FakeBoxError::Session(status)),
            None => return Err(FakeBoxError::NoRegistered),
        };

        let resend: Vec<BoxMessage> = {
            let mut s = self.lock();
            let acked = registered.acked_seq;
            s.unacked.retain(|seq, _| *seq > acked);
            s.acked = s.acked.max(acked);
            s.unacked.values().cloned().collect()
        };
        // A box that kept nothing (a new FakeBox for a known id) goes on after what is stored.
        self.next_seq = self.next_seq.max(registered.acked_seq + 1);
        for m in resend {
            tx.send(m).await.map_err(|_| FakeBoxError::NotConnected)?;
        }
        self.acked_notify.notify_waiters();

        let reader = {
            let shared = self.shared.clone();
            let notify = self.acked_notify.clone();
            let inbox = self.inbox_tx.clone();
            let reads = self.cfg.reads;
            tokio::spawn(async move {
                if !reads {
                    // Holds the stream open and never reads it, until aborted.
                    std::future::pending::<()>().await;
                }
                while let Some(item) = inbound.next().await {
                    let Ok(msg) = item else { break };
                    if let Some(control_message::Msg::Ack(ack)) = &msg.msg {
                        let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                        s.acked = s.acked.max(ack.seq);
                        let acked = s.acked;
                        s.unacked.retain(|seq, _| *seq > acked);
                        drop(s);
                        notify.notify_waiters();
                    }
                    if inbox.send(Inbound::Msg(Box::new(msg))).is_err() {
                        break;
                    }
                }
                let _ = inbox.send(Inbound::Ended(generation));
            })
        };
        let interval = self.cfg.heartbeat_interval.unwrap_or_else(|| {
            Duration::from_millis(u64::from(registered.heartbeat_interval_ms.max(50)))
        });
        let heartbeat = {
            let shared = self.shared.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let hb = {
                        let s = shared.lock().unwrap_or_else(|e| e.into_inner());
                        if !s.heartbeats_on {
                            continue;
                        }
                        Heartbeat {
                            pools: s.pools.clone(),
                            running_builds: s.running.iter().cloned().collect(),
                            cells: s.cells.values().cloned().collect(),
                        }
                    };
                    let m = BoxMessage {
                        seq: 0,
                        msg: Some(box_message::Msg::Heartbeat(hb)),
                    };
                    if tx.send(m).await.is_err() {
                        break;
                    }
                }
            })
        };
        self.conn = Some(Connection {
            tx: Some(tx),
            reader,
            heartbeat,
        });
        self.registered = Some(registered.clone());
        Ok(registered)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops (false) or resumes (true) heartbeats while keeping the stream open.
    pub fn set_heartbeats(&self, on: bool) {
        self.lock().heartbeats_on = on;
    }

    /// Replaces the pool state reported from the next heartbeat on.
    pub fn set_pools(&self, pools: Vec<PoolState>) {
        self.lock().pools = pools;
    }

    /// Stops reporting a build as running (its lease is then no longer renewed).
    pub fn forget_build(&self, build_id: &str) {
        self.lock().running.remove(build_id);
    }

    /// The pool state the next heartbeat reports.
    pub fn pools(&self) -> Vec<PoolState> {
        self.lock().pools.clone()
    }

    /// Highest seq the control plane acknowledged so far.
    pub fn acked_seq(&self) -> u64 {
        self.lock().acked
    }

    /// Number of messages sent but not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.lock().unacked.len()
    }

    /// The seq the next acked message will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Sends a raw message (no seq bookkeeping). For tests of malformed sessions.
    pub async fn send_raw(&self, m: BoxMessage) -> Result<(), FakeBoxError> {
        let tx = self.sender().ok_or(FakeBoxError::NotConnected)?;
        tx.send(m).await.map_err(|_| FakeBoxError::NotConnected)
    }

    /// Sends `msg` without a seq (a heartbeat, say): nothing to ack or resend.
    pub async fn send_plain(&self, msg: box_message::Msg) -> Result<(), FakeBoxError> {
        self.send_raw(BoxMessage {
            seq: 0,
            msg: Some(msg),
        })
        .await
    }

    fn sender(&self) -> Option<&mpsc::Sender<BoxMessage>> {
        self.conn.as_ref().and_then(|c| c.tx.as_ref())
    }

    /// Closes the box's side of the stream (stops heartbeats too) and keeps reading: the
    /// control plane handles what was sent, then ends the session (`next_raw` gives `None`).
    pub fn close_send(&mut self) {
        if let Some(conn) = &mut self.conn {
            conn.tx = None;
            conn.heartbeat.abort();
        }
    }

    /// Heartbeats with exactly `pools` and `running` every `period`, beside the box's own, until
    /// the returned task is aborted or the session ends. Panics if not connected.
    pub fn heartbeat_every(
        &self,
        period: Duration,
        pools: Vec<PoolState>,
        running: Vec<String>,
    ) -> JoinHandle<()> {
        let tx = self.sender().expect("heartbeat_every: connected").clone();
        tokio::spawn(async move {
            loop {
                let m = BoxMessage {
                    seq: 0,
                    msg: Some(box_message::Msg::Heartbeat(Heartbeat {
                        pools: pools.clone(),
                        running_builds: running.clone(),
                        cells: vec![],
                    })),
                };
                if tx.send(m).await.is_err() {
                    return;
                }
                tokio::time::sleep(period).await;
            }
        })
    }

    /// Gives `msg` the next seq, keeps it until acked and sends it if connected. While
    /// disconnected the message only queues (it goes out on reconnect), as a real box's would.
    /// Returns the seq.
    pub async fn send_acked(&mut self, msg: box_message::Msg) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let m = BoxMessage {
            seq,
            msg: Some(msg),
        };
        self.lock().unacked.insert(seq, m.clone());
        if let Some(tx) = self.sender() {
            if tx.send(m).await.is_err() {
                self.conn = None;
            }
        }
        seq
    }

    /// Waits until the control plane acknowledged `seq` (or a later one).
    pub async fn wait_ack(&self, seq: u64, timeout: Duration) -> Result<(), FakeBoxError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.acked_notify.notified();
            if self.lock().acked >= seq {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(FakeBoxError::Timeout(timeout, "an ack"));
            }
        }
    }

    /// Waits until every message sent so far is acknowledged.
    pub async fn wait_all_acked(&self, timeout: Duration) -> Result<(), FakeBoxError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.acked_notify.notified();
            if self.lock().unacked.is_empty() {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(FakeBoxError::Timeout(timeout, "all messages acknowledged"));
            }
        }
    }

    /// The next control message that is not an Ack, within `timeout`; `None` if none came or
    /// the session ended.
    pub async fn next_non_ack(&mut self, timeout: Duration) -> Option<control_message::Msg> {
        self.next_message(timeout).await.ok().and_then(|m| m.msg)
    }

    /// The next message on the stream as it came, Acks included; `Ok(None)` once the session
    /// ended. Messages kept by earlier typed waits come first.
    pub async fn next_raw(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<ControlMessage>, FakeBoxError> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(Some(m));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.inbox.recv()).await {
                Err(_) => return Err(FakeBoxError::Timeout(timeout, "a message")),
                Ok(None) => return Ok(None),
                Ok(Some(Inbound::Ended(g))) => {
                    if g == self.generation {
                        self.conn = None;
                        return Ok(None);
                    }
                }
                Ok(Some(Inbound::Msg(m))) => return Ok(Some(*m)),
            }
        }
    }

    /// Next control message (of any kind), Acks excluded.
    pub async fn next_message(
        &mut self,
        timeout: Duration,
    ) -> Result<ControlMessage, FakeBoxError> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(m);
        }
        self.recv(timeout, "a control message").await
    }

    async fn recv(
        &mut self,
        timeout: Duration,
        what: &'static str,
    ) -> Result<ControlMessage, FakeBoxError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.conn.is_none() {
                // Messages that arrived before the disconnect are still worth reading.
                match self.inbox.try_recv() {
                    Ok(Inbound::Msg(m)) if !matches!(m.msg, Some(control_message::Msg::Ack(_))) => {
                        return Ok(*m)
                    }
                    Ok(_) => continue,
                    Err(_) => return Err(FakeBoxError::NotConnected),
                }
            }
            match tokio::time::timeout_at(deadline, self.inbox.recv()).await {
                Err(_) => return Err(FakeBoxError::Timeout(timeout, what)),
                Ok(None) => return Err(FakeBoxError::SessionEnded(what)),
                Ok(Some(Inbound::Ended(g))) => {
                    if g == self.generation {
                        self.conn = None;
                        return Err(FakeBoxError::SessionEnded(what));
                    }
                }
                Ok(Some(Inbound::Msg(m))) => {
                    if matches!(m.msg, Some(control_message::Msg::Ack(_))) {
                        continue;
                    }
                    return Ok(*m);
                }
            }
        }
    }

    /// Waits for a control message matching `pick`, keeping the others for later calls.
    async fn expect<T>(
        &mut self,
        timeout: Duration,
        what: &'static str,
        mut pick: impl FnMut(&ControlMessage) -> Option<T>,
    ) -> Result<T, FakeBoxError> {
        if let Some(i) = self.pending.iter().position(|m| pick(m).is_some()) {
            let m = self.pending.remove(i).expect("index from position");
            return Ok(pick(&m).expect("matched above"));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = match self.recv(left, what).await {
                Err(FakeBoxError::Timeout(..)) => return Err(FakeBoxError::Timeout(timeout, what)),
                other => other?,
            };
            if let Some(t) = pick(&m) {
                return Ok(t);
            }
            self.pending.push_back(m);
        }
    }

    /// Waits for the next assignment.
    pub async fn next_assignment(&mut self, timeout: Duration) -> Result<Assignment, FakeBoxError> {
        self.expect(timeout, "an Assignment", |m| match &m.msg {
            Some(control_message::Msg::Assign(a)) => Some(a.clone()),
            _ => None,
        })
        .await
    }

    /// Waits for a CancelBuild for `build_id`.
    pub async fn expect_cancel(
        &mut self,
        build_id: &str,
        timeout: Duration,
    ) -> Result<CancelBuild, FakeBoxError> {
        self.expect(timeout, "a CancelBuild", |m| match &m.msg {
            Some(control_message::Msg::Cancel(c)) if c.build_id == build_id => Some(c.clone()),
            _ => None,
        })
        .await
    }

    /// Waits for a Drain.
    pub async fn expect_drain(&mut self, timeout: Duration) -> Result<(), FakeBoxError> {
        self.expect(timeout, "a Drain", |m| match &m.msg {
            Some(control_message::Msg::Drain(_)) => Some(()),
            _ => None,
        })
        .await
    }

    /// Asserts nothing but acks and heartbeat-level chatter arrives for `quiet`; returns what
    /// did arrive otherwise.
    pub async fn expect_silence(&mut self, quiet: Duration) -> Option<ControlMessage> {
        if let Some(m) = self.pending.pop_front() {
            return Some(m);
        }
        self.recv(quiet, "silence").await.ok()
    }

    async fn update(
        &mut self,
        a: &Assignment,
        kind: BuildUpdateKind,
        f: impl FnOnce(&mut BuildUpdate),
    ) -> u64 {
        let mut u = BuildUpdate {
            build_id: a.build_id.clone(),
            lease_id: a.lease_id.clone(),
            kind: kind as i32,
            at_ms: now_ms(),
            exit_code: -1,
            ..BuildUpdate::default()
        };
        f(&mut u);
        self.send_acked(box_message::Msg::Update(u)).await
    }

    /// ACCEPTED: confirms the lease; the build is then reported in heartbeats, and the pool of
    /// its size class shows one cell more busy (taken from the warm ones if any), as a real
    /// box's would.
    pub async fn accept(&mut self, a: &Assignment, cell_id: &str, warm_start: bool) -> u64 {
        {
            let mut s = self.lock();
            if s.running.insert(a.build_id.clone()) {
                let class = a.size_class.as_ref().map(|c| c.name.as_str()).unwrap_or("");
                let cell = CellInfo {
                    id: cell_id.to_string(),
                    box_id: self.cfg.box_id.clone(),
                    size_class: class.to_string(),
                    state: "busy".to_string(),
                    build_id: a.build_id.clone(),
                    updated_at_ms: now_ms(),
                };
                s.cells.insert(a.build_id.clone(), cell);
                if let Some(p) = s.pools.iter_mut().find(|p| p.size_class == class) {
                    p.warm = p.warm.saturating_sub(1);
                    p.busy += 1;
                }
            }
        }
        self.update(a, BuildUpdateKind::Accepted, |u| {
            u.cell_id = cell_id.to_string();
            u.warm_start = warm_start;
        })
        .await
    }

    /// REJECTED: the build goes back to the queue.
    pub async fn reject(&mut self, a: &Assignment, why: &str) -> u64 {
        self.update(a, BuildUpdateKind::Rejected, |u| {
            u.message = why.to_string()
        })
        .await
    }

    /// RUNNING: the cell started the first step.
    pub async fn running(&mut self, a: &Assignment) -> u64 {
        self.update(a, BuildUpdateKind::Running, |_| {}).await
    }

    /// STEP_STARTED / STEP_FINISHED.
    pub async fn step(&mut self, a: &Assignment, step: u32, finished: Option<i32>) -> u64 {
        let kind = if finished.is_some() {
            BuildUpdateKind::StepFinished
        } else {
            BuildUpdateKind::StepStarted
        };
        self.update(a, kind, |u| {
            u.step = step;
            u.exit_code = finished.unwrap_or(-1);
        })
        .await
    }

    /// A log chunk with the build's next dense log seq (from 0).
    pub async fn log(&mut self, a: &Assignment, stream: LogStream, step: u32, data: &[u8]) -> u64 {
        let next = self.log_seq.entry(a.build_id.clone()).or_insert(0);
        let seq = *next;
        *next += 1;
        let chunk = LogChunk {
            build_id: a.build_id.clone(),
            seq,
            stream: stream as i32,
            step,
            data: data.to_vec(),
            at_ms: now_ms(),
        };
        self.send_acked(box_message::Msg::Log(chunk)).await
    }

    /// FINISHED with a terminal state; the build stops being reported as running.
    /// The cell is destroyed and the pool topped up again at once.
    pub async fn finish(&mut self, a: &Assignment, state: BuildState, exit_code: i32) -> u64 {
        {
            let mut s = self.lock();
            s.cells.remove(&a.build_id);
            if s.running.remove(&a.build_id) {
                let class = a.size_class.as_ref().map(|c| c.name.as_str()).unwrap_or("");
                if let Some(p) = s.pools.iter_mut().find(|p| p.size_class == class) {
                    p.busy = p.busy.saturating_sub(1);
                    if p.warm < p.target {
                        p.warm += 1;
                    }
                }
            }
        }
        self.update(a, BuildUpdateKind::Finished, |u| {
            u.state = state as i32;
            u.exit_code = exit_code;
            u.message = format!("fake box: {}", state.short_name());
        })
        .await
    }

    /// Sends a `KeyExchangeRequest` as a box does: with the next seq, kept until acked.
    pub async fn key_exchange(&mut self, req: KeyExchangeRequest) -> u64 {
        self.send_acked(box_message::Msg::KeyExchange(req)).await
    }

    /// Waits for a `KeyExchangeReply` for `build_id`, keeping other messages for later calls.
    pub async fn expect_key_exchange_reply(
        &mut self,
        build_id: &str,
        timeout: Duration,
    ) -> Result<KeyExchangeReply, FakeBoxError> {
        self.expect(timeout, "a KeyExchangeReply", |m| match &m.msg {
            Some(control_message::Msg::KeyExchange(r)) if r.build_id == build_id => Some(r.clone()),
            _ => None,
        })
        .await
    }
}
