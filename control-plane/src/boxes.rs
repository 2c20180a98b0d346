//! Boxes: the registry of box daemons (what each reported: pools, running builds, cells; its
//! open session) and the `BoxAgent.Session` stream itself. A session starts with `Register`,
//! is answered with `Registered` (size classes, heartbeat interval, the highest stored seq), then
//! carries heartbeats, build updates and log chunks up and assignments, cancels, acks and drain
//! down. Updates and logs are persisted before they are acked; the scheduler (`scheduler`) reads
//! this registry to place builds and writes assignments into the session's channel.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, Stream};
use hive_proto::v1::box_message::Msg as BoxMsg;
use hive_proto::v1::control_message::Msg as CtlMsg;
use hive_proto::v1::{
    Ack, BoxMessage, BoxState, BuildState, BuildUpdate, BuildUpdateKind, CancelBuild, CellInfo,
    ControlMessage, Drain, Heartbeat, LogChunk, PoolState, Register, Registered,
};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::server::Hive;
use crate::store::{now_ms, BoxBatch, BoxRow, CellRow, LogStored, StoreError};

/// How long a new session may take to send its `Register`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Most session messages stored in one transaction (group commit).
const MAX_BATCH: usize = 256;

/// Operator states of a box as stored.
pub const ACTIVE: &str = "active";
pub const CORDONED: &str = "cordoned";
pub const DRAINING: &str = "draining";
pub const LEFT: &str = "left";

/// One open session: where to send control messages, and how to end it.
#[derive(Debug, Clone)]
struct Conn {
    id: u64,
    tx: mpsc::Sender<Result<ControlMessage, Status>>,
    kill: Arc<Notify>,
}

/// A placement sent but not yet reflected in the box's pool report.
#[derive(Debug, Clone)]
struct Inflight {
    class: String,
    warm: bool,
}

/// What the control plane knows about one box right now.
#[derive(Debug)]
struct BoxEntry {
    hostname: String,
    backend: String,
    admin_state: String,
    registered_at_ms: i64,
    last_heartbeat_ms: i64,
    last_seen: Instant,
    pools: Vec<PoolState>,
    running_builds: Vec<String>,
    cells: Vec<CellInfo>,
    conn: Option<Conn>,
    /// Sent, not yet accepted.
    unconfirmed: HashMap<String, Inflight>,
    /// Accepted since the last heartbeat (the pools in hand do not show them yet).
    accepted: Vec<Inflight>,
    /// Classes the box rejected since its last heartbeat: treat as full until it reports again.
    rejected: HashSet<String>,
    /// When the box was last told to stop each build: a box keeps listing a build until its
    /// FINISHED, and one reminder per lease is enough.
    told_to_stop: HashMap<String, Instant>,
}

/// Free places of one size class on one box, as the scheduler sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Room {
    /// Warm cells not yet promised to a build.
    pub warm: i64,
    /// Cells that could still be booted.
    pub cold: i64,
    pub busy: i64,
}

/// A box the scheduler may place on.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub box_id: String,
    /// The box's cell backend (`microvm`, `sandbox`), recorded with each build placed there.
    pub backend: String,
    pub rooms: HashMap<String, Room>,
}

/// The boxes, keyed by id.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<HashMap<String, BoxEntry>>,
    next_conn: std::sync::atomic::AtomicU64,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BoxEntry>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session channel of a connected box.
    fn sender(&self, box_id: &str) -> Option<mpsc::Sender<Result<ControlMessage, Status>>> {
        self.lock()
            .get(box_id)
            .and_then(|e| e.conn.as_ref().map(|c| c.tx.clone()))
    }

    /// Sends a control message to a box if it is connected. False if it is not (or went away).
    pub async fn send(&self, box_id: &str, msg: CtlMsg) -> bool {
        match self.sender(box_id) {
            Some(tx) => tx.send(Ok(ControlMessage { msg: Some(msg) })).await.is_ok(),
            None => false,
        }
    }

    /// Whether the box was told to stop `build_id` less than `within` ago.
    fn told_recently(&self, box_id: &str, build_id: &str, within: Duration) -> bool {
        self.lock()
            .get(box_id)
            .and_then(|e| e.told_to_stop.get(build_id))
            .is_some_and(|t| t.elapsed() < within)
    }

    /// Tells a box to stop a build.
    pub async fn cancel(&self, box_id: &str, build_id: &str, state: BuildState, reason: &str) {
        if let Some(e) = self.lock().get_mut(box_id) {
            e.told_to_stop.insert(build_id.to_string(), Instant::now());
        }
        let sent = self
            .send(
                box_id,
                CtlMsg::Cancel(CancelBuild {
                    build_id: build_id.to_string(),
                    state: state as i32,
                    reason: reason.to_string(),
                }),
            )
            .await;
        if !sent {
            tracing::info!(
                box_id,
                build_id,
                "box not connected; cancel not sent (its lease ends it)"
            );
        }
    }

    /// Boxes that may get new builds now: connected, active, with their free places per class.
    pub fn candidates(&self) -> Vec<Candidate> {
        let map = self.lock();
        let mut out: Vec<Candidate> = map
            .iter()
            .filter(|(_, e)| e.conn.is_some() && e.admin_state == ACTIVE)
            .map(|(id, e)| Candidate {
                box_id: id.clone(),
                backend: e.backend.clone(),
                rooms: e
                    .pools
                    .iter()
                    .map(|p| {
                        let mut room = Room {
                            warm: p.warm as i64,
                            cold: p.capacity as i64
                                - p.busy as i64
                                - p.booting as i64
                                - p.warm as i64,
                            busy: p.busy as i64,
                        };
                        for f in e.unconfirmed.values().chain(e.accepted.iter()) {
                            if f.class == p.size_class {
                                if f.warm {
                                    room.warm -= 1;
                                } else {
                                    room.cold -= 1;
                                }
                                room.busy += 1;
                            }
                        }
                        if e.rejected.contains(&p.size_class) {
                            room.warm = 0;
                            room.cold = 0;
                        }
                        (p.size_class.clone(), room)
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| a.box_id.cmp(&b.box_id));
        out
    }

    /// Remembers a placement until the box's reports include it.
    pub fn add_inflight(&self, box_id: &str, lease_id: &str, class: &str, warm: bool) {
        if let Some(e) = self.lock().get_mut(box_id) {
            e.unconfirmed.insert(
                lease_id.to_string(),
                Inflight {
                    class: class.to_string(),
                    warm,
                },
            );
        }
    }

    /// Drops a placement that will not happen (lease ended, rejected).
    pub fn forget_inflight(&self, box_id: &str, lease_id: &str) {
        if let Some(e) = self.lock().get_mut(box_id) {
            e.unconfirmed.remove(lease_id);
        }
    }

    fn accepted(&self, box_id: &str, lease_id: &str) {
        if let Some(e) = self.lock().get_mut(box_id) {
            if let Some(f) = e.unconfirmed.remove(lease_id) {
                e.accepted.push(f);
            }
        }
    }

    fn rejected(&self, box_id: &str, lease_id: &str) {
        if let Some(e) = self.lock().get_mut(box_id) {
            if let Some(f) = e.unconfirmed.remove(lease_id) {
                e.rejected.insert(f.class);
            }
        }
    }

    /// Number of boxes with an open session.
    pub fn connected(&self) -> usize {
        self.lock().values().filter(|e| e.conn.is_some()).count()
    }

    pub fn is_connected(&self, box_id: &str) -> bool {
        self.lock().get(box_id).is_some_and(|e| e.conn.is_some())
    }

    /// Sets the operator state in memory (the store holds it too).
    pub fn set_admin_state(&self, box_id: &str, state: &str) {
        if let Some(e) = self.lock().get_mut(box_id) {
            e.admin_state = state.to_string();
        }
    }

    /// Ends sessions whose box has been silent for longer than `silence`.
    pub fn reap_silent(&self, silence: Duration) -> Vec<String> {
        let mut reaped = Vec::new();
        for (id, e) in self.lock().iter_mut() {
            if e.conn.is_some() && e.last_seen.elapsed() > silence {
                if let Some(c) = e.conn.take() {
                    c.kill.notify_one();
                }
                reaped.push(id.clone());
            }
        }
        reaped
    }

    /// Ids of boxes that are draining and not connected.
    pub fn draining_disconnected(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, e)| e.conn.is_none() && e.admin_state == DRAINING)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Ends every session (shutdown).
    pub fn close_all(&self) {
        for e in self.lock().values_mut() {
            if let Some(c) = e.conn.take() {
                c.kill.notify_one();
            }
        }
    }

    /// The live view of a box for `ListBoxes`, merged over its stored row.
    pub fn info(&self, row: &BoxRow) -> hive_proto::v1::BoxInfo {
        let map = self.lock();
        let entry = map.get(&row.id);
        let admin = entry.map(|e| e.admin_state.as_str()).unwrap_or(&row.state);
        let connected = entry.is_some_and(|e| e.conn.is_some());
        let state = match admin {
            LEFT => BoxState::Left,
            DRAINING => BoxState::Draining,
            CORDONED => BoxState::Cordoned,
            _ if connected => BoxState::Active,
            _ => BoxState::Offline,
        };
        let pools = match entry {
            Some(e) => e.pools.clone(),
            None => serde_json::from_str::<Vec<PoolJson>>(&row.pools_json)
                .unwrap_or_default()
                .into_iter()
                .map(PoolState::from)
                .collect(),
        };
        hive_proto::v1::BoxInfo {
            id: row.id.clone(),
            hostname: entry
                .map(|e| e.hostname.clone())
                .unwrap_or(row.hostname.clone()),
            state: state as i32,
            backend: entry
                .map(|e| e.backend.clone())
                .unwrap_or(row.backend.clone()),
            pools,
            last_heartbeat_ms: entry
                .map(|e| e.last_heartbeat_ms)
                .unwrap_or(row.last_heartbeat_ms),
            running_builds: entry.map(|e| e.running_builds.clone()).unwrap_or_default(),
            registered_at_ms: entry
                .map(|e| e.registered_at_ms)
                .unwrap_or(row.registered_at_ms),
        }
    }

    /// Installs a new session for a box, ending any older one. Returns the session's id.
    fn connect(&self, reg: &Register, admin_state: &str, conn: Conn) {
        let now = now_ms();
        let mut map = self.lock();
        let entry = map.entry(reg.box_id.clone()).or_insert_with(|| BoxEntry {
            hostname: String::new(),
            backend: String::new(),
            admin_state: ACTIVE.to_string(),
            registered_at_ms: now,
            last_heartbeat_ms: now,
            last_seen: Instant::now(),
            pools: Vec::new(),
            running_builds: Vec::new(),
            cells: Vec::new(),
            conn: None,
            unconfirmed: HashMap::new(),
            accepted: Vec::new(),
            rejected: HashSet::new(),
            told_to_stop: HashMap::new(),
        });
        if let Some(old) = entry.conn.replace(conn) {
            old.kill.notify_one();
        }
        entry.hostname = reg.hostname.clone();
        entry.backend = reg.backend.clone();
        entry.admin_state = admin_state.to_string();
        entry.registered_at_ms = now;
        entry.last_heartbeat_ms = now;
        entry.last_seen = Instant::now();
        entry.pools = reg.pools.clone();
        entry.running_builds = reg.running_builds.clone();
        entry.accepted.clear();
        entry.rejected.clear();
    }

    /// Marks the session gone, unless a newer one already replaced it.
    fn disconnect(&self, box_id: &str, conn_id: u64) -> bool {
        let mut map = self.lock();
        match map.get_mut(box_id) {
            Some(e) if e.conn.as_ref().is_some_and(|c| c.id == conn_id) => {
                e.conn = None;
                e.unconfirmed.clear();
                e.accepted.clear();
                true
            }
            _ => false,
        }
    }

    /// Applies a heartbeat; returns whether the reported cells changed.
    fn heartbeat(&self, box_id: &str, hb: &Heartbeat) -> bool {
        let mut map = self.lock();
        let Some(e) = map.get_mut(box_id) else {
            return false;
        };
        e.last_seen = Instant::now();
        e.last_heartbeat_ms = now_ms();
        e.pools = hb.pools.clone();
        e.running_builds = hb.running_builds.clone();
        e.accepted.clear();
        e.rejected.clear();
        // Builds the box no longer lists have stopped; forget that they were told to.
        e.told_to_stop
            .retain(|b, _| hb.running_builds.iter().any(|r| r == b));
        if e.cells != hb.cells {
            e.cells = hb.cells.clone();
            true
        } else {
            false
        }
    }

    fn seen(&self, box_id: &str) {
        if let Some(e) = self.lock().get_mut(box_id) {
            e.last_seen = Instant::now();
        }
    }
}

/// Pool state as kept in the `boxes.pools_json` column.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PoolJson {
    size_class: String,
    warm: u32,
    booting: u32,
    busy: u32,
    target: u32,
    capacity: u32,
}

impl From<PoolJson> for PoolState {
    fn from(p: PoolJson) -> Self {
        PoolState {
            size_class: p.size_class,
            warm: p.warm,
            booting: p.booting,
            busy: p.busy,
            target: p.target,
            capacity: p.capacity,
        }
    }
}

fn pools_json(pools: &[PoolState]) -> String {
    let v: Vec<PoolJson> = pools
        .iter()
        .map(|p| PoolJson {
            size_class: p.size_class.clone(),
            warm: p.warm,
            booting: p.booting,
            busy: p.busy,
            target: p.target,
            capacity: p.capacity,
        })
        .collect();
    serde_json::to_string(&v).unwrap_or_else(|_| "[]".to_string())
}

/// Tracks the highest contiguous BoxMessage.seq stored, across out-of-order arrivals.
#[derive(Debug, Clone)]
struct AckTracker {
    acked: u64,
    ahead: BTreeSet<u64>,
}

impl AckTracker {
    /// What `acked` would become once `seq` is stored.
    #[cfg(test)]
    fn with(&self, seq: u64) -> u64 {
        if seq != self.acked + 1 {
            return self.acked;
        }
        let mut a = seq;
        while self.ahead.contains(&(a + 1)) {
            a += 1;
        }
        a
    }

    fn stored(&mut self, seq: u64) {
        if seq <= self.acked {
            return;
        }
        self.ahead.insert(seq);
        while self.ahead.remove(&(self.acked + 1)) {
            self.acked += 1;
        }
    }
}

/// Errors that end a box session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("box {box_id}: the control channel closed")]
    ChannelClosed { box_id: String },
}

/// The gRPC `BoxAgent` service.
#[derive(Clone)]
pub struct BoxAgentService {
    pub hive: Arc<Hive>,
}

type ControlStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl hive_proto::v1::box_agent_server::BoxAgent for BoxAgentService {
    type SessionStream = ControlStream;

    async fn session(
        &self,
        request: Request<Streaming<BoxMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no Register within {}s of opening the session",
                    REGISTER_TIMEOUT.as_secs()
                ))
            })??;
        let reg = match first.and_then(|m| m.msg) {
            Some(BoxMsg::Register(reg)) => reg,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "first message of a session must be Register",
                ))
            }
            None => return Err(Status::invalid_argument("session closed before Register")),
        };
        validate_box_id(&reg.box_id)?;
        let hive = self.hive.clone();
        let stored = hive.store.get_box(&reg.box_id).await.map_err(internal)?;
        let admin_state = match stored.as_ref().map(|b| b.state.as_str()) {
            Some(s @ (CORDONED | DRAINING)) => s.to_string(),
            _ => ACTIVE.to_string(),
        };
        let acked_seq = stored.as_ref().map(|b| b.acked_seq).unwrap_or(0);
        let now = now_ms();
        hive.store
            .upsert_box(&BoxRow {
                id: reg.box_id.clone(),
                hostname: reg.hostname.clone(),
                state: admin_state.clone(),
                backend: reg.backend.clone(),
                pools_json: pools_json(&reg.pools),
                last_heartbeat_ms: now,
                registered_at_ms: now,
                acked_seq,
            })
            .await
            .map_err(internal)?;

        let (tx, rx) = mpsc::channel(4096);
        let conn = Conn {
            id: hive
                .registry
                .next_conn
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            tx: tx.clone(),
            kill: Arc::new(Notify::new()),
        };
        let send = |msg| {
            tx.try_send(Ok(ControlMessage { msg: Some(msg) }))
                .map_err(|_| Status::internal("control channel full at registration"))
        };
        send(CtlMsg::Registered(Registered {
            box_id: reg.box_id.clone(),
            heartbeat_interval_ms: hive.heartbeat.as_millis() as u32,
            size_classes: hive.classes.all(),
            acked_seq,
        }))?;
        if admin_state == DRAINING {
            send(CtlMsg::Drain(Drain {}))?;
        }
        hive.registry.connect(&reg, &admin_state, conn.clone());
        tracing::info!(
            box_id = %reg.box_id, hostname = %reg.hostname, backend = %reg.backend,
            ?peer, acked_seq, state = %admin_state, pools = reg.pools.len(),
            running = reg.running_builds.len(), "box registered"
        );
        let mut session = Session {
            hive: hive.clone(),
            box_id: reg.box_id.clone(),
            conn_id: conn.id,
            acks: AckTracker {
                acked: acked_seq,
                ahead: BTreeSet::new(),
            },
        };
        if let Err(e) = session.renew(&reg.running_builds).await {
            tracing::warn!(box_id = %reg.box_id, error = %e, "renewing leases at register failed");
        }
        hive.wake.notify_one();
        tokio::spawn(async move {
            let result = session.run(inbound, conn.kill.clone()).await;
            session.end(result).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Session {
    hive: Arc<Hive>,
    box_id: String,
    conn_id: u64,
    acks: AckTracker,
}

impl Session {
    async fn run(
        &mut self,
        mut inbound: Streaming<BoxMessage>,
        kill: Arc<Notify>,
    ) -> Result<&'static str, SessionError> {
        let mut shutdown = self.hive.shutdown.clone();
        loop {
            let next = tokio::select! {
                m = inbound.message() => m,
                _ = kill.notified() => return Ok("session replaced or box silent"),
                _ = crate::events::stopped(&mut shutdown) => return Ok("control plane shutting down"),
            };
            let first = match next {
                Ok(Some(m)) => m,
                Ok(None) => return Ok("box closed the stream"),
                Err(status) => {
                    tracing::info!(box_id = %self.box_id, %status, "box stream error");
                    return Ok("stream error");
                }
            };
            // Group commit: whatever else already waits on the stream (never waiting for
            // more) goes into the same transaction and is answered by one ack.
            let mut msgs = vec![first];
            let mut ended = None;
            while msgs.len() < MAX_BATCH {
                match inbound.message().now_or_never() {
                    None => break,
                    Some(Ok(Some(m))) => msgs.push(m),
                    Some(Ok(None)) => {
                        ended = Some("box closed the stream");
                        break;
                    }
                    Some(Err(status)) => {
                        tracing::info!(box_id = %self.box_id, %status, "box stream error");
                        ended = Some("stream error");
                        break;
                    }
                }
            }
            self.hive.registry.seen(&self.box_id);
            self.handle(msgs).await?;
            if let Some(why) = ended {
                return Ok(why);
            }
        }
    }

    /// Handles messages in stream order. Consecutive updates and log chunks are stored in one
    /// transaction; a heartbeat or key exchange first stores what came before it. One ack
    /// answers the lot, sent only after everything it covers is committed.
    async fn handle(&mut self, msgs: Vec<BoxMessage>) -> Result<(), SessionError> {
        let mut group: Vec<(u64, Item)> = Vec::new();
        let mut answer = false;
        for msg in msgs {
            let seq = msg.seq;
            match msg.msg {
                Some(BoxMsg::Update(u)) => group.push((seq, Item::Update(u))),
                Some(BoxMsg::Log(chunk)) => group.push((seq, Item::Log(chunk))),
                Some(BoxMsg::Heartbeat(hb)) => {
                    self.store_group(&mut group).await?;
                    self.heartbeat(hb).await?;
                    // Answer every heartbeat (with the current ack): the box counts the
                    // control plane as reachable only while it hears from it, and fences
                    // itself after a lease of silence.
                    answer = true;
                }
                Some(BoxMsg::KeyExchange(req)) => {
                    self.store_group(&mut group).await?;
                    // Acked on receipt (the box's acks are contiguous; a lost request just
                    // times out on the box and fails that build).
                    self.acks.stored(seq);
                    self.ack().await?;
                    answer = false;
                    // Answered from its own task: it waits on the connector, and the session
                    // must keep reading heartbeats meanwhile.
                    let hive = self.hive.clone();
                    let box_id = self.box_id.clone();
                    tokio::spawn(async move {
                        let reply = crate::keyexchange::exchange(&hive, &box_id, &req).await;
                        if !hive
                            .registry
                            .send(&box_id, CtlMsg::KeyExchange(reply))
                            .await
                        {
                            tracing::info!(box_id, build_id = %req.build_id,
                                "box gone before its key exchange reply");
                            hive.keyexchange.revoke_now.notify_one();
                        }
                    });
                }
                Some(BoxMsg::Register(_)) => {
                    tracing::warn!(box_id = %self.box_id, "second Register on one session ignored");
                }
                None => {
                    tracing::warn!(box_id = %self.box_id, seq, "empty BoxMessage ignored");
                }
            }
        }
        answer |= self.store_group(&mut group).await?;
        if answer {
            self.ack().await?;
        }
        Ok(())
    }

    /// Stores `group` (updates and log chunks, in order) and the acked seq it reaches in one
    /// transaction, then announces what changed. Returns whether there was anything to store.
    async fn store_group(&mut self, group: &mut Vec<(u64, Item)>) -> Result<bool, SessionError> {
        if group.is_empty() {
            return Ok(false);
        }
        let started = Instant::now();
        let (mut updates, mut logs, mut log_lag_ms) = (0usize, 0usize, 0i64);
        let mut batch = self.hive.store.box_batch(&self.box_id).await?;
        let mut after = Vec::new();
        // Chunks stored now, per build in order of first appearance.
        let mut new_logs: Vec<(String, Vec<LogChunk>)> = Vec::new();
        let mut acks = self.acks.clone();
        for (seq, item) in group.drain(..) {
            match item {
                Item::Update(u) => {
                    updates += 1;
                    self.update(&mut batch, u, &mut after).await?;
                }
                Item::Log(chunk) => {
                    logs += 1;
                    if chunk.at_ms > 0 {
                        log_lag_ms = log_lag_ms.max(now_ms() - chunk.at_ms);
                    }
                    match batch.store_log(&chunk).await? {
                        LogStored::New(stored) => {
                            match new_logs.iter_mut().find(|(b, _)| *b == stored.build_id) {
                                Some((_, chunks)) => chunks.push(stored),
                                None => new_logs.push((stored.build_id.clone(), vec![stored])),
                            }
                        }
                        LogStored::Duplicate => {}
                        LogStored::NotThisBox => {
                            tracing::debug!(box_id = %self.box_id, build_id = %chunk.build_id,
                                seq = chunk.seq, "log chunk for a build not on this box dropped");
                        }
                    }
                }
            }
            acks.stored(seq);
        }
        batch.commit(acks.acked).await?;
        self.acks = acks;
        tracing::debug!(box_id = %self.box_id, updates, logs, acked = self.acks.acked,
            store_us = started.elapsed().as_micros() as u64, log_lag_ms,
            "box messages stored in one transaction");
        // Announced only now, after the commit; the new chunks first, so a follower can send
        // them on before it re-reads a build that changed with them.
        for (build_id, mut chunks) in new_logs {
            chunks.sort_by_key(|c| c.seq);
            self.hive.events.logs_stored(&build_id, chunks);
        }
        for a in after {
            match a {
                After::Changed(id) => self.hive.events.build_changed(&id),
                After::Wake => self.hive.wake.notify_one(),
                After::StopStale { build_id, lease_id } => {
                    if !self
                        .hive
                        .registry
                        .told_recently(&self.box_id, &build_id, self.hive.lease)
                    {
                        self.hive
                            .registry
                            .cancel(
                                &self.box_id,
                                &build_id,
                                BuildState::Cancelled,
                                &format!("lease {lease_id} is no longer valid"),
                            )
                            .await;
                    }
                }
            }
        }
        Ok(true)
    }

    async fn end(&mut self, result: Result<&'static str, SessionError>) {
        let why = match &result {
            Ok(why) => why.to_string(),
            Err(e) => e.to_string(),
        };
        // Save the acked seq before the box shows as offline: a quick reconnect must be told
        // everything this session stored.
        if let Err(e) = self
            .hive
            .store
            .touch_box(&self.box_id, "[]", now_ms(), self.acks.acked)
            .await
        {
            tracing::warn!(box_id = %self.box_id, error = %e, "saving box state at disconnect");
        }
        if self.hive.registry.disconnect(&self.box_id, self.conn_id) {
            tracing::info!(box_id = %self.box_id, why, "box offline");
            self.hive.wake.notify_one();
        }
    }

    async fn ack(&self) -> Result<(), SessionError> {
        let ok = self
            .hive
            .registry
            .send(
                &self.box_id,
                CtlMsg::Ack(Ack {
                    seq: self.acks.acked,
                }),
            )
            .await;
        if ok {
            Ok(())
        } else {
            Err(SessionError::ChannelClosed {
                box_id: self.box_id.clone(),
            })
        }
    }

    async fn heartbeat(&mut self, hb: Heartbeat) -> Result<(), SessionError> {
        let cells_changed = self.hive.registry.heartbeat(&self.box_id, &hb);
        self.hive
            .store
            .touch_box(
                &self.box_id,
                &pools_json(&hb.pools),
                now_ms(),
                self.acks.acked,
            )
            .await?;
        if cells_changed {
            let now = now_ms();
            let cells: Vec<CellRow> = hb
                .cells
                .iter()
                .map(|c| CellRow {
                    id: c.id.clone(),
                    box_id: self.box_id.clone(),
                    size_class: c.size_class.clone(),
                    state: c.state.clone(),
                    build_id: c.build_id.clone(),
                    updated_at_ms: if c.updated_at_ms > 0 {
                        c.updated_at_ms
                    } else {
                        now
                    },
                })
                .collect();
            self.hive.store.replace_cells(&self.box_id, &cells).await?;
        }
        self.renew(&hb.running_builds).await?;
        self.hive.wake.notify_one();
        Ok(())
    }

    /// Renews the leases of the builds the box says it runs; tells it to stop any it holds
    /// without a lease (ended, re-queued elsewhere, unknown).
    async fn renew(&self, running: &[String]) -> Result<(), SessionError> {
        let deadline = now_ms() + self.hive.lease.as_millis() as i64;
        let orphans = self
            .hive
            .store
            .renew_leases(&self.box_id, running, deadline)
            .await?;
        for build_id in orphans {
            if self
                .hive
                .registry
                .told_recently(&self.box_id, &build_id, self.hive.lease)
            {
                continue;
            }
            let build = self.hive.store.get_build(&build_id).await?;
            let (state, reason) = match build {
                None => (BuildState::Cancelled, "unknown build".to_string()),
                Some(b) if matches!(b.state, BuildState::Cancelled | BuildState::TimedOut) => {
                    (b.state, b.message)
                }
                Some(b) if b.state.is_terminal() => continue,
                Some(_) => (
                    BuildState::Cancelled,
                    "this box holds no lease for the build".to_string(),
                ),
            };
            tracing::info!(box_id = %self.box_id, %build_id, %reason, "telling box to stop build");
            self.hive
                .registry
                .cancel(&self.box_id, &build_id, state, &reason)
                .await;
        }
        Ok(())
    }

    /// Applies one build update inside `batch`. The conditional write comes first (it names
    /// the lease and this box); the build is read only when it did not apply, to say why.
    async fn update(
        &self,
        batch: &mut BoxBatch,
        u: BuildUpdate,
        after: &mut Vec<After>,
    ) -> Result<(), SessionError> {
        let hive = &self.hive;
        let kind = BuildUpdateKind::try_from(u.kind).unwrap_or(BuildUpdateKind::Unspecified);
        let changed = match kind {
            BuildUpdateKind::Accepted => {
                let deadline = now_ms() + hive.lease.as_millis() as i64;
                let ok = batch
                    .confirm_lease(&u.build_id, &u.lease_id, &u.cell_id, u.warm_start, deadline)
                    .await?;
                if !ok && !self.current(batch, &u, kind, after).await? {
                    return Ok(());
                }
                hive.registry.accepted(&self.box_id, &u.lease_id);
                ok
            }
            BuildUpdateKind::Rejected => {
                if !self.current(batch, &u, kind, after).await? {
                    return Ok(());
                }
                hive.registry.rejected(&self.box_id, &u.lease_id);
                let reason = format!("rejected by box {}: {}", self.box_id, u.message);
                let ok = batch.requeue(&u.build_id, &u.lease_id, &reason).await?;
                after.push(After::Wake);
                ok
            }
            BuildUpdateKind::Running => {
                let cell_id = if u.cell_id.is_empty() {
                    // An older box names the cell only in ACCEPTED.
                    batch
                        .get_build(&u.build_id)
                        .await?
                        .map(|b| b.cell_id)
                        .unwrap_or_default()
                } else {
                    u.cell_id.clone()
                };
                let reason = format!("running on box {} cell {cell_id}", self.box_id);
                let ok = batch.set_running(&u.build_id, &u.lease_id, &reason).await?;
                if !ok && !self.current(batch, &u, kind, after).await? {
                    return Ok(());
                }
                hive.registry.accepted(&self.box_id, &u.lease_id);
                ok
            }
            BuildUpdateKind::StepStarted | BuildUpdateKind::StepFinished => {
                // Informational only: nothing is stored, so nothing is read either (a stale
                // attempt is stopped through its other updates and the heartbeats).
                tracing::debug!(build_id = %u.build_id, step = u.step, ?kind, "step event");
                false
            }
            BuildUpdateKind::Finished => {
                let state = BuildState::try_from(u.state).unwrap_or(BuildState::Unspecified);
                let (state, reason) = if state.is_terminal() {
                    let reason = if u.message.is_empty() {
                        format!("{} (exit code {})", state.short_name(), u.exit_code)
                    } else {
                        u.message.clone()
                    };
                    (state, reason)
                } else {
                    (
                        BuildState::Failed,
                        format!(
                            "box reported FINISHED with non-terminal state {}",
                            state.short_name()
                        ),
                    )
                };
                let ok = batch
                    .finish_build(&u.build_id, &u.lease_id, state, u.exit_code, &reason)
                    .await?;
                if !ok && !self.current(batch, &u, kind, after).await? {
                    return Ok(());
                }
                hive.registry.forget_inflight(&self.box_id, &u.lease_id);
                after.push(After::Wake);
                ok
            }
            BuildUpdateKind::Unspecified => {
                tracing::warn!(box_id = %self.box_id, build_id = %u.build_id,
                    kind = u.kind, "update of unknown kind ignored");
                false
            }
        };
        if changed {
            after.push(After::Changed(u.build_id));
        }
        Ok(())
    }

    /// Whether `u` belongs to the build's current attempt on this box (known, not ended, same
    /// lease and box). If not, says why, and for a stale lease on another box queues a stop.
    async fn current(
        &self,
        batch: &mut BoxBatch,
        u: &BuildUpdate,
        kind: BuildUpdateKind,
        after: &mut Vec<After>,
    ) -> Result<bool, SessionError> {
        let Some(build) = batch.get_build(&u.build_id).await? else {
            tracing::warn!(box_id = %self.box_id, build_id = %u.build_id, ?kind,
                "update for an unknown build ignored");
            return Ok(false);
        };
        if build.state.is_terminal() {
            tracing::debug!(box_id = %self.box_id, build_id = %u.build_id, ?kind,
                state = build.state.short_name(), "update for an ended build ignored");
            return Ok(false);
        }
        if build.lease_id != u.lease_id || build.box_id != self.box_id {
            tracing::info!(box_id = %self.box_id, build_id = %u.build_id, lease_id = %u.lease_id,
                current_lease = %build.lease_id, ?kind, "update under a stale lease ignored");
            // Stop the stale attempt, unless the build now runs on this same box again (the
            // cancel names only the build and would stop the new attempt too).
            if build.box_id != self.box_id && kind != BuildUpdateKind::Finished {
                after.push(After::StopStale {
                    build_id: u.build_id.clone(),
                    lease_id: u.lease_id.clone(),
                });
            }
            return Ok(false);
        }
        Ok(true)
    }
}

/// A stored session message, waiting in a group for its transaction.
enum Item {
    Update(BuildUpdate),
    Log(LogChunk),
}

/// What a group announces or sends once its transaction has committed.
#[derive(Debug)]
enum After {
    Changed(String),
    Wake,
    StopStale { build_id: String, lease_id: String },
}

fn validate_box_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 128 {
        return Err(Status::invalid_argument(
            "Register.box_id must be 1-128 characters",
        ));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(Status::invalid_argument(format!(
            "Register.box_id {id:?} may only hold letters, digits, '-', '_', '.'"
        )));
    }
    Ok(())
}

fn internal(e: StoreError) -> Status {
    Status::internal(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_contiguous() {
        let mut t = AckTracker {
            acked: 0,
            ahead: BTreeSet::new(),
        };
        assert_eq!(t.with(1), 1);
        t.stored(1);
        assert_eq!(t.acked, 1);
        // 3 arrives before 2: nothing new is contiguous.
        assert_eq!(t.with(3), 1);
        t.stored(3);
        assert_eq!(t.acked, 1);
        assert_eq!(t.with(2), 3);
        t.stored(2);
        assert_eq!(t.acked, 3);
        // A resend of an old one changes nothing.
        t.stored(2);
        assert_eq!(t.acked, 3);
    }

    #[test]
    fn box_ids_are_checked() {
        assert!(validate_box_id("box-1.eu_west").is_ok());
        assert!(validate_box_id("").is_err());
        assert!(validate_box_id("a b").is_err());
    }
}
