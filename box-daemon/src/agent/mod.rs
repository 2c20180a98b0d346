//! The box's agent towards the control plane: the state the concerns below share, and the
//! operations every one of them needs (queue a message, report an update).
//!
//! Outbound, every build update and log chunk goes through the [`Outbox`] ([`outbox`]): it gets
//! a per-box sequence number and stays in memory until the control plane acknowledges it, so
//! nothing is lost or duplicated across reconnects. `link` keeps the `BoxAgent.Session` stream
//! (connect, register, reconnect with backoff, heartbeats) and hands inbound messages on; `run`
//! turns an assignment into a build task (take a cell, `CellAgent.RunBuild`, relay
//! `CellAgent.Events` as updates and logs, destroy the cell, top the pool up) and drains them on
//! a graceful stop; `keyx` brokers a private network's key exchange; `fence` cancels every build
//! when the control plane has been unreachable for longer than the lease (their leases are gone).
mod fence;
mod keyx;
mod link;
pub mod outbox;
mod run;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hive_proto::v1::{
    box_message, BuildState, BuildUpdate, BuildUpdateKind, KeyExchangeReply, KeyExchangeRequest,
};
use tokio::sync::{watch, Notify};

use crate::backend::CellBackend;
use crate::pool::Pool;
use hive_sys::now_ms;
use outbox::Outbox;

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
    #[error("box certificate")]
    Credentials(#[source] crate::credentials::CredentialsError),
}

/// The URLs of a `--control-plane` value: comma-separated, blanks dropped.
pub fn control_plane_urls(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// How the agent identifies itself and times things.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The control planes' URLs, comma-separated: sessions go to one at a time, the next
    /// after a failure.
    pub control_plane: String,
    /// The box's certificate for an `https://` control plane (None: plaintext, `http://`).
    pub credentials: Option<Arc<crate::credentials::Credentials>>,
    pub box_id: String,
    pub hostname: String,
    /// The control plane's lease time until Registered says otherwise (self-fence at two thirds).
    pub lease: Duration,
    /// Heartbeat period until Registered says otherwise.
    pub heartbeat: Duration,
    /// Least time between the extra heartbeats sent when the pool gains room the control plane
    /// cannot know of (a cell became warm, a used cell was released); None: only the periodic
    /// ones.
    pub room_heartbeat_gap: Option<Duration>,
    /// How long a cell may take to stop after a cancel before the box reports it stopped anyway.
    pub cancel_grace: Duration,
    /// How long a call into a cell (PrepareTunnel, RunBuild, Cancel) may take: a guest on a slow
    /// host (an emulated KVM host is 20-50x slower than hardware) needs more than the default.
    pub cell_call_timeout: Duration,
}

/// Why the box stops a build before its end.
#[derive(Debug, Clone)]
pub(super) struct Stop {
    /// The state the cell is told to end the build with.
    pub state: BuildState,
    pub reason: String,
    /// The stop is the box's own fault, not the build's (self-fence, shutdown): the attempt is
    /// reported LOST, so the control plane runs the build again (if the lease is still this
    /// box's and attempts are left) instead of failing it.
    pub give_back: bool,
}

impl Stop {
    /// A stop the control plane asked for (user cancel, timeout, lease moved).
    pub fn asked(state: BuildState, reason: String) -> Self {
        Stop {
            state,
            reason,
            give_back: false,
        }
    }

    /// A stop of the box's own making: the attempt goes back to the control plane. The cell is
    /// told `cancelled` (what it accepts besides `timed_out`); the control plane hears LOST.
    pub fn give_back(reason: &str) -> Self {
        Stop {
            state: BuildState::Cancelled,
            reason: reason.to_string(),
            give_back: true,
        }
    }
}

/// A build the box runs.
#[derive(Debug)]
struct RunningBuild {
    lease_id: String,
    cell_id: String,
    size_class: String,
    cancel: watch::Sender<Option<Stop>>,
}

pub struct Agent<B: CellBackend> {
    cfg: AgentConfig,
    pool: Arc<Pool<B>>,
    outbox: Mutex<Outbox>,
    outbox_changed: Notify,
    /// The control plane acknowledged more of the outbox (waiters: [`Agent::acked_within`]).
    outbox_acked: Notify,
    builds: Mutex<HashMap<String, RunningBuild>>,
    builds_changed: Notify,
    last_contact: Mutex<Instant>,
    connected: AtomicBool,
    draining: AtomicBool,
    heartbeat_ms: Mutex<u64>,
    /// The control plane's lease as it said at registration (ms; until then `cfg.lease`).
    lease_ms: std::sync::atomic::AtomicU64,
    /// Assignment received -> first build output line received from the cell, ms (the box's
    /// dispatch overhead plus the cell's start of the build; bounded sample for /healthz).
    dispatch_ms: Mutex<Vec<f64>>,
    /// `/metrics`: the same start by stage, as histograms.
    metrics: Arc<crate::metrics::Metrics>,
    /// Key exchanges waiting for the control plane's reply, by (build, lease).
    key_exchanges: Mutex<HashMap<(String, String), PendingExchange>>,
    /// Which of the control planes (`cfg.control_plane`, comma-separated) the next session
    /// dials: the next one after each failed or ended session.
    next_cp: std::sync::atomic::AtomicUsize,
}

/// A key exchange request sent and not yet answered.
#[derive(Debug)]
struct PendingExchange {
    request: KeyExchangeRequest,
    /// Outbox sequence number of the latest copy sent.
    seq: u64,
    reply: tokio::sync::oneshot::Sender<KeyExchangeReply>,
}

impl<B: CellBackend> std::fmt::Debug for Agent<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("cfg", &self.cfg).finish()
    }
}

impl<B: CellBackend> Agent<B> {
    /// The lease in force: the control plane's when it said, else this box's `--lease-secs`.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms.load(Ordering::SeqCst).max(1000))
    }

    /// How long a build may run unowned before it is stopped: two thirds of the lease (at least
    /// 5 s), so it has stopped before the control plane places it again (a lease after the box's
    /// last renewal). A box fences itself this long after it last heard the control plane; a cell
    /// this long after its box last followed its build.
    pub fn fence_after(&self) -> Duration {
        (self.lease() * 2 / 3).max(Duration::from_secs(5))
    }

    /// How long a build the box gives back (fence, shutdown) may take to stop before its cell
    /// is destroyed: half of what is left of the lease after the fence (at most the cancel
    /// grace), so a fenced build is gone before the control plane can place it again.
    pub fn give_back_grace(&self) -> Duration {
        (self.lease().saturating_sub(self.fence_after()) / 2)
            .min(self.cfg.cancel_grace)
            .max(Duration::from_millis(500))
    }

    pub fn new(cfg: AgentConfig, pool: Arc<Pool<B>>) -> Arc<Self> {
        let heartbeat_ms = cfg.heartbeat.as_millis() as u64;
        let lease_ms = cfg.lease.as_millis() as u64;
        Arc::new(Agent {
            cfg,
            pool,
            outbox: Mutex::new(Outbox::new()),
            outbox_changed: Notify::new(),
            outbox_acked: Notify::new(),
            builds: Mutex::new(HashMap::new()),
            builds_changed: Notify::new(),
            last_contact: Mutex::new(Instant::now()),
            connected: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            heartbeat_ms: Mutex::new(heartbeat_ms),
            lease_ms: std::sync::atomic::AtomicU64::new(lease_ms),
            dispatch_ms: Mutex::new(Vec::new()),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            key_exchanges: Mutex::new(HashMap::new()),
            next_cp: Default::default(),
        })
    }

    /// The control plane the session is with (None while not connected).
    pub fn current_control_plane(&self) -> Option<String> {
        if !self.is_connected() {
            return None;
        }
        let all = self.control_planes();
        let i = self.next_cp.load(Ordering::SeqCst) % all.len().max(1);
        all.get(i).map(|u| (*u).to_string())
    }

    /// The control plane URLs in the order given.
    pub fn control_planes(&self) -> Vec<&str> {
        control_plane_urls(&self.cfg.control_plane)
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn builds(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunningBuild>> {
        self.builds.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    pub fn running_builds(&self) -> Vec<String> {
        let mut v: Vec<String> = self.builds().keys().cloned().collect();
        v.sort();
        v
    }

    /// The box's metrics (`/metrics`).
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
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

    /// The outbox's bytes held, its cap, and the log output dropped at the cap.
    pub fn outbox_state(&self) -> serde_json::Value {
        let ob = self.outbox();
        serde_json::json!({
            "bytes": ob.bytes(),
            "cap_bytes": outbox::OUTBOX_CAP_BYTES,
            "dropped_log_bytes": ob.dropped_bytes(),
        })
    }

    /// Queues an update or log for the control plane; returns its seq.
    pub fn send(&self, msg: box_message::Msg) -> u64 {
        let seq = self.outbox().push(msg);
        self.outbox_changed.notify_one();
        seq
    }

    /// Waits until the control plane has acknowledged (stored) message `seq`, or `within` has
    /// passed. (A reconnect may number the outbox afresh; the wait is then only the bound.)
    async fn acked_within(&self, seq: u64, within: Duration) {
        let end = tokio::time::Instant::now() + within;
        loop {
            let acked = self.outbox_acked.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            if !self.outbox().holds(seq) {
                return;
            }
            if tokio::time::timeout_at(end, acked).await.is_err() {
                return;
            }
        }
    }

    fn update(
        &self,
        build_id: &str,
        lease_id: &str,
        kind: BuildUpdateKind,
        f: impl FnOnce(&mut BuildUpdate),
    ) {
        self.send(box_message::Msg::Update(new_update(
            build_id, lease_id, kind, f,
        )));
    }

    /// Reports a build failed that the box can no longer finish or give back.
    pub fn report_failed(&self, build_id: &str, lease_id: &str, message: &str) {
        self.update(build_id, lease_id, BuildUpdateKind::Finished, |u| {
            u.state = BuildState::Failed as i32;
            u.exit_code = -1;
            u.message = message.to_string();
        });
    }

    /// Reports an attempt the box lost (reaper, after a restart: its cell is destroyed before
    /// this is sent, so the attempt can never run alongside the next one). The control plane
    /// re-queues the build as a new attempt; a lost attempt is not the build's failure.
    pub fn report_lost(&self, build_id: &str, lease_id: &str, message: &str) {
        self.update(build_id, lease_id, BuildUpdateKind::Lost, |u| {
            u.message = message.to_string();
        });
    }
}

/// An update of `kind` for the build's attempt, stamped now.
fn new_update(
    build_id: &str,
    lease_id: &str,
    kind: BuildUpdateKind,
    f: impl FnOnce(&mut BuildUpdate),
) -> BuildUpdate {
    let mut u = BuildUpdate {
        build_id: build_id.to_string(),
        lease_id: lease_id.to_string(),
        kind: kind as i32,
        at_ms: now_ms(),
        ..Default::default()
    };
    f(&mut u);
    u
}
