//! The registry of box daemons: what each reported (pools, running builds, cells), its open
//! session's channel, and the placements it has been sent but not yet reported. The scheduler
//! reads it to place builds (`candidates`), the box session (`grpc::boxes`) keeps it current,
//! and everyone sends to a box through it. In memory only: the store keeps what must outlive
//! a restart (the operator's state, the acked seq).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hive_proto::v1::control_message::Msg as CtlMsg;
use hive_proto::v1::{
    BoxState, BuildState, CancelBuild, CellInfo, ControlMessage, Heartbeat, PoolState, Register,
};
use tokio::sync::{mpsc, Notify};
use tonic::Status;

use crate::cluster::{Bus, Note};
use crate::store::{now_ms, BoxRow};

/// Operator states of a box as stored.
pub const ACTIVE: &str = "active";
pub const CORDONED: &str = "cordoned";
pub const DRAINING: &str = "draining";
pub const LEFT: &str = "left";

/// One open session: where to send control messages, and how to end it.
#[derive(Debug, Clone)]
pub(crate) struct Conn {
    pub(crate) id: u64,
    pub(crate) tx: mpsc::Sender<Result<ControlMessage, Status>>,
    pub(crate) kill: Arc<Notify>,
    /// Where the session comes from, for messages about it.
    pub(crate) peer: String,
}

/// The open session that holds a box id.
#[derive(Debug, Clone)]
pub struct Holder {
    pub peer: String,
    pub hostname: String,
    /// Since the box last sent anything on it.
    pub silent_for: Duration,
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
    /// Box ids revoked while this control plane runs: `connect` refuses them, so a session
    /// that passed its certificate check just before a revoke cannot connect just after it.
    revoked: Mutex<HashSet<String>>,
    next_conn: AtomicU64,
    overflows: AtomicU64,
    /// To the other control planes of the database: changes made here, and messages for
    /// boxes whose sessions they hold.
    bus: Bus,
    /// Boxes whose row shows a heartbeat this recent are connected to another control plane
    /// (0: one control plane, no such boxes).
    remote_live_ms: AtomicI64,
}

impl Registry {
    /// A registry whose changes also go out on `bus`; a box whose stored heartbeat is less
    /// than `live_within` old is taken as connected to another control plane.
    pub fn with_bus(bus: Bus, live_within: Duration) -> Registry {
        let r = Registry {
            bus,
            ..Default::default()
        };
        r.remote_live_ms
            .store(crate::state::millis(live_within), Ordering::Relaxed);
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BoxEntry>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh session id.
    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// The session of a connected box.
    fn conn(&self, box_id: &str) -> Option<Conn> {
        self.lock().get(box_id).and_then(|e| e.conn.clone())
    }

    /// Sends a control message to a box wherever its session is: here, or through the control
    /// plane that holds it (which drops it when it does not hold it either). True if it was
    /// sent from here.
    pub async fn tell(&self, box_id: &str, msg: CtlMsg) -> bool {
        if self.is_connected(box_id) {
            return self.send(box_id, msg).await;
        }
        self.bus.publish(Note::ToBox {
            box_id: box_id.to_string(),
            msg: Box::new(ControlMessage { msg: Some(msg) }),
        });
        false
    }

    /// A control message from another control plane for a box whose session may be here.
    pub(crate) fn send_here(&self, box_id: &str, msg: CtlMsg) {
        if self.is_connected(box_id) {
            if let CtlMsg::Cancel(c) = &msg {
                if let Some(e) = self.lock().get_mut(box_id) {
                    e.told_to_stop.insert(c.build_id.clone(), Instant::now());
                }
            }
            let _ = self.try_send(box_id, msg);
        }
    }

    /// Sends a control message to a box if it is connected here. False if it is not, went
    /// away, or does not keep up: a box whose session queue is full (it stopped reading its stream)
    /// loses its session, and never makes the sender wait (the scheduler sends to every box
    /// from one task). The box reconnects and is told again what it missed.
    pub async fn send(&self, box_id: &str, msg: CtlMsg) -> bool {
        self.try_send(box_id, msg)
    }

    fn try_send(&self, box_id: &str, msg: CtlMsg) -> bool {
        let Some(conn) = self.conn(box_id) else {
            return false;
        };
        match conn.tx.try_send(Ok(ControlMessage { msg: Some(msg) })) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(
                    box_id,
                    queue = conn.tx.max_capacity(),
                    "box does not read its control stream (queue full): ending its session"
                );
                self.overflows.fetch_add(1, Ordering::Relaxed);
                conn.kill.notify_one();
                false
            }
        }
    }

    /// Sessions ended because their box's queue was full (since start).
    pub fn overflows(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }

    /// Whether the box was told to stop `build_id` less than `within` ago.
    pub(crate) fn told_recently(&self, box_id: &str, build_id: &str, within: Duration) -> bool {
        self.lock()
            .get(box_id)
            .and_then(|e| e.told_to_stop.get(build_id))
            .is_some_and(|t| t.elapsed() < within)
    }

    /// Remembers that `build_id` on `box_id` needs no stop order for now (it ended: the box
    /// only has not heard yet), so the next heartbeats do not read it again.
    pub(crate) fn note_told(&self, box_id: &str, build_id: &str) {
        if let Some(e) = self.lock().get_mut(box_id) {
            e.told_to_stop.insert(build_id.to_string(), Instant::now());
        }
    }

    /// Tells a box to stop a build.
    pub async fn cancel(&self, box_id: &str, build_id: &str, state: BuildState, reason: &str) {
        if let Some(e) = self.lock().get_mut(box_id) {
            e.told_to_stop.insert(build_id.to_string(), Instant::now());
        }
        let sent = self
            .tell(
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
                "box not connected here; cancel passed to the other control planes (its lease ends it otherwise)"
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

    pub(crate) fn accepted(&self, box_id: &str, lease_id: &str) {
        if let Some(e) = self.lock().get_mut(box_id) {
            if let Some(f) = e.unconfirmed.remove(lease_id) {
                e.accepted.push(f);
            }
        }
    }

    pub(crate) fn rejected(&self, box_id: &str, lease_id: &str) {
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

    /// The open session holding `box_id`, if any.
    pub fn holder(&self, box_id: &str) -> Option<Holder> {
        let map = self.lock();
        let e = map.get(box_id)?;
        let c = e.conn.as_ref()?;
        Some(Holder {
            peer: c.peer.clone(),
            hostname: e.hostname.clone(),
            silent_for: e.last_seen.elapsed(),
        })
    }

    pub fn is_connected(&self, box_id: &str) -> bool {
        self.lock().get(box_id).is_some_and(|e| e.conn.is_some())
    }

    /// Sets the operator state in memory (the store holds it too).
    pub fn set_admin_state(&self, box_id: &str, state: &str) {
        self.set_admin_state_here(box_id, state);
        self.bus.publish(Note::AdminState {
            box_id: box_id.to_string(),
            state: state.to_string(),
        });
    }

    pub(crate) fn set_admin_state_here(&self, box_id: &str, state: &str) {
        if let Some(e) = self.lock().get_mut(box_id) {
            e.admin_state = state.to_string();
        }
    }

    /// Drops a forgotten box (`box forget`, its row already deleted) from memory. Should it
    /// have connected in between, its session is ended: it registers again, as a new box.
    pub fn forget(&self, box_id: &str) {
        self.forget_here(box_id);
        self.bus.publish(Note::Forget(box_id.to_string()));
    }

    pub(crate) fn forget_here(&self, box_id: &str) {
        if let Some(mut e) = self.lock().remove(box_id) {
            if let Some(c) = e.conn.take() {
                c.kill.notify_one();
            }
        }
    }

    /// Ends the box's session, here or on another control plane (a revoked box, an id that
    /// moved): true if it had one here.
    pub fn end_session(&self, box_id: &str) -> bool {
        self.bus.publish(Note::EndSession(box_id.to_string()));
        self.end_session_here(box_id)
    }

    /// Ends the box's session if this control plane holds it.
    pub(crate) fn end_session_here(&self, box_id: &str) -> bool {
        match self.lock().get_mut(box_id).and_then(|e| e.conn.as_ref()) {
            Some(c) => {
                c.kill.notify_one();
                true
            }
            None => false,
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
        let remote_live = self.remote_live_ms.load(Ordering::Relaxed);
        // With other control planes, a box not connected here is as its row says (they keep
        // the row current while they hold its session).
        let entry = map
            .get(&row.id)
            .filter(|e| remote_live == 0 || e.conn.is_some());
        let admin = entry.map(|e| e.admin_state.as_str()).unwrap_or(&row.state);
        let connected = entry.is_some_and(|e| e.conn.is_some())
            || (remote_live > 0
                && !row.session_owner.is_empty()
                && row.last_heartbeat_ms >= now_ms() - remote_live);
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
    /// Marks a box revoked (before the revocation is committed; see `revoked`).
    pub fn mark_revoked(&self, box_id: &str) {
        self.mark_revoked_here(box_id);
        self.bus.publish(Note::Revoked(box_id.to_string()));
    }

    pub(crate) fn mark_revoked_here(&self, box_id: &str) {
        self.revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(box_id.to_string());
    }

    /// A box joined again (a token bound to its id): it may connect.
    pub fn unmark_revoked(&self, box_id: &str) {
        self.unmark_revoked_here(box_id);
        self.bus.publish(Note::Unrevoked(box_id.to_string()));
    }

    pub(crate) fn unmark_revoked_here(&self, box_id: &str) {
        self.revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(box_id);
    }

    /// Makes `conn` the box's session; false (nothing changed) when the box was revoked.
    #[must_use]
    pub(crate) fn connect(&self, reg: &Register, admin_state: &str, conn: Conn) -> bool {
        let now = now_ms();
        let mut map = self.lock();
        if self
            .revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&reg.box_id)
        {
            return false;
        }
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
        true
    }

    /// Marks the session gone, unless a newer one already replaced it.
    pub(crate) fn disconnect(&self, box_id: &str, conn_id: u64) -> bool {
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
    pub(crate) fn heartbeat(&self, box_id: &str, hb: &Heartbeat) -> bool {
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

    pub(crate) fn seen(&self, box_id: &str) {
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

pub(crate) fn pools_json(pools: &[PoolState]) -> String {
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
