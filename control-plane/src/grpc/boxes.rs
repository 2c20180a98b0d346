//! The `BoxAgent.Session` stream, one per box daemon (what the control plane knows of each box
//! lives in `registry::boxes`, which this session keeps current). A session starts with
//! `Register`, is answered with `Registered` (size classes, heartbeat interval, the highest
//! stored seq), then carries heartbeats, build updates and log chunks up and assignments,
//! cancels, acks and drain down. Updates and logs are persisted before they are acked, and the
//! acked seq before any ack; a heartbeat reaches the registry at once, and the store at once or,
//! soon after the last stored one, when half an interval has passed. The scheduler
//! (`domain::place`) reads the registry to place builds and writes assignments into the
//! session's channel. Key exchange requests are answered from their own task
//! (`domain::keyexchange`).

use std::collections::{BTreeSet, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, Stream};
use hive_proto::v1::box_message::Msg as BoxMsg;
use hive_proto::v1::control_message::Msg as CtlMsg;
use hive_proto::v1::{
    Ack, BoxMessage, BuildState, BuildUpdate, BuildUpdateKind, ControlMessage, Drain, Heartbeat,
    JoinReply, JoinRequest, LogChunk, PoolState, Registered, RenewCertificateRequest,
};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::Stage;
use crate::pki::PeerIdentity;
use crate::registry::boxes::{pools_json, Conn, ACTIVE, CORDONED, DRAINING};
use crate::state::{millis, Hive};
use crate::store::{
    now_ms, Acceptance, BoxBatch, BoxCertRow, BoxRow, CellRow, CellsWrite, LogStored, StoreError,
};

/// How long a new session may take to send its `Register`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Most session messages stored in one transaction (group commit).
const MAX_BATCH: usize = 256;

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

    /// Refuses a seq so far past the acked one that no box keeps that much unacked (a box
    /// numbers its messages one by one and resends from the ack): remembering it would let a
    /// box grow `ahead` without bound.
    fn check(&self, seq: u64) -> Result<(), SessionError> {
        if seq > self.acked.saturating_add(MAX_SEQ_AHEAD) {
            return Err(SessionError::SeqTooFarAhead {
                seq,
                acked: self.acked,
            });
        }
        Ok(())
    }
}

/// How far past the acked seq a box's message seq may be (its unacked messages in flight).
pub const MAX_SEQ_AHEAD: u64 = 1 << 16;

/// Errors that end a box session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("box {box_id}: the control channel closed")]
    ChannelClosed { box_id: String },
    #[error("box {box_id}: a newer session holds the box (or it was forgotten)")]
    Replaced { box_id: String },
    #[error(
        "message seq {seq} is more than {MAX_SEQ_AHEAD} past the acked seq {acked}: \
         a box numbers its messages one by one"
    )]
    SeqTooFarAhead { seq: u64, acked: u64 },
}

/// The gRPC `BoxAgent` service.
#[derive(Clone)]
pub struct BoxAgentService {
    hive: Arc<Hive>,
    /// Sessions must present a client certificate from the CA whose subject is the box id
    /// (the box listener); false only for `--insecure-boxes` on the loopback API listener.
    require_cert: bool,
}

impl BoxAgentService {
    /// The service of the box listener: boxes authenticated by their certificates.
    pub fn new(hive: Arc<Hive>) -> Self {
        BoxAgentService {
            hive,
            require_cert: true,
        }
    }

    /// The service without certificates (`--insecure-boxes`, loopback only).
    pub fn insecure(hive: Arc<Hive>) -> Self {
        BoxAgentService {
            hive,
            require_cert: false,
        }
    }

    /// The box a request's client certificate names, if the certificate is one the CA issued
    /// and not revoked. TLS has verified the chain and the dates already.
    async fn certified<T>(&self, request: &Request<T>, rpc: &str) -> Result<PeerIdentity, Status> {
        let refuse = |why: &str| {
            self.hive.metrics.box_violation("certificate");
            tracing::warn!(rpc, peer = ?request.remote_addr(), why, "box refused");
            Status::unauthenticated(format!(
                "{rpc} needs the box's client certificate: {why}; a new box joins with \
                 `hive-box --join-token` (from `hivectl box join-token`)"
            ))
        };
        let certs = request
            .peer_certs()
            .ok_or_else(|| refuse("none was presented"))?;
        let leaf = certs.first().ok_or_else(|| refuse("none was presented"))?;
        let who = crate::pki::peer_identity(leaf).map_err(|e| refuse(&e.to_string()))?;
        let row = self
            .hive
            .store
            .box_cert(&who.serial)
            .await
            .map_err(internal)?;
        match row {
            Some(r) if r.box_id == who.box_id && r.revoked_at_ms == 0 => Ok(who),
            Some(r) if r.revoked_at_ms != 0 => Err(refuse(&format!(
                "box {}'s certificate was revoked (`hivectl box revoke`)",
                who.box_id
            ))),
            _ => Err(refuse(
                "the certificate is not one this control plane issued",
            )),
        }
    }
}

/// Most cells of one class a box may report (a box that claims more would draw every build).
pub const MAX_CELLS_PER_CLASS: u32 = 1024;

/// A box's pool report made sane before anything uses it: classes the control plane does not
/// know are dropped, each class is counted once, every number is at most
/// [`MAX_CELLS_PER_CLASS`], and warm, booting and busy cells fit in the capacity. Anything
/// changed is a violation (`hive_box_violations_total{kind="pool_report"}`).
fn checked_pools(hive: &Hive, box_id: &str, pools: Vec<PoolState>) -> Vec<PoolState> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(pools.len().min(16));
    let mut bad = false;
    for mut p in pools {
        if hive.classes.get(&p.size_class).is_err() || !seen.insert(p.size_class.clone()) {
            bad = true;
            continue;
        }
        let before = p.clone();
        p.capacity = p.capacity.min(MAX_CELLS_PER_CLASS);
        p.target = p.target.min(MAX_CELLS_PER_CLASS);
        p.busy = p.busy.min(p.capacity);
        p.warm = p.warm.min(p.capacity - p.busy);
        p.booting = p.booting.min(p.capacity - p.busy - p.warm);
        bad |= p != before;
        out.push(p);
    }
    if bad {
        hive.metrics.box_violation("pool_report");
        tracing::warn!(%box_id, "pool report out of range: unknown or repeated classes dropped, numbers capped");
    }
    out
}

/// Most bytes of a build update's message kept (then cut, marked with `…`).
pub const MAX_UPDATE_MESSAGE: usize = 2048;

/// Most builds a box is told to stop in answer to one heartbeat (see `Session::renew`).
pub const MAX_STOPS_PER_HEARTBEAT: usize = 64;

/// Longest cell or build id a box may name; ids the control plane makes are far shorter.
pub const MAX_REPORTED_ID_BYTES: usize = 128;

/// A box's lists of cells and running builds made sane before they are stored: at most
/// [`MAX_CELLS_PER_CLASS`] per known class (a box cannot hold more cells, nor run more builds),
/// no id longer than [`MAX_REPORTED_ID_BYTES`], each running build once. A hostile box could
/// otherwise make every heartbeat write tens of thousands of rows (a 4 MiB message of short
/// ids). Anything dropped is a violation (`hive_box_violations_total{kind="heartbeat_lists"}`).
fn checked_lists(
    hive: &Hive,
    box_id: &str,
    cells: &mut Vec<hive_proto::v1::CellInfo>,
    running: &mut Vec<String>,
) {
    let cap = MAX_CELLS_PER_CLASS as usize * hive.classes.len().max(1);
    let (n_cells, n_running) = (cells.len(), running.len());
    cells.retain(|c| {
        [&c.id, &c.build_id, &c.size_class, &c.state]
            .iter()
            .all(|s| s.len() <= MAX_REPORTED_ID_BYTES)
    });
    cells.truncate(cap);
    let mut seen = std::collections::HashSet::new();
    running.retain(|id| id.len() <= MAX_REPORTED_ID_BYTES && seen.insert(id.clone()));
    running.truncate(cap);
    if cells.len() != n_cells || running.len() != n_running {
        hive.metrics.box_violation("heartbeat_lists");
        tracing::warn!(
            %box_id, cells = n_cells, running = n_running, kept_cells = cells.len(),
            kept_running = running.len(),
            "box reported impossible cell or build lists: long ids, repeats and the excess dropped"
        );
    }
}

/// How long a Register waits for an older session of the same box id to end (a box that
/// restarts opens its new session while the control plane is still closing the old one).
const HOLDER_GRACE: Duration = Duration::from_secs(2);

/// Refuses a Register for a box id that another live session holds: two boxes claiming one id
/// would otherwise knock each other off in a loop, each taking the other's assignments. An
/// older session that ends within [`HOLDER_GRACE`] (a restart) or has gone silent for three
/// heartbeats (a half-open link) gives way; the new one then replaces it.
async fn refuse_a_second_holder(
    hive: &Hive,
    reg: &hive_proto::v1::Register,
    peer: Option<std::net::SocketAddr>,
) -> Result<(), Status> {
    let deadline = tokio::time::Instant::now() + HOLDER_GRACE;
    loop {
        let Some(h) = holder(hive, &reg.box_id).await? else {
            return Ok(());
        };
        if h.silent_for > hive.heartbeat * 3 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            hive.metrics.box_violation("duplicate_id");
            tracing::warn!(
                box_id = %reg.box_id, holder = %h.peer, holder_host = %h.hostname, ?peer,
                hostname = %reg.hostname, "second box with a connected box's id refused"
            );
            return Err(Status::already_exists(format!(
                "box id {:?} is already connected from {} (host {:?}): each box needs its own \
                 id; start this one with another --box-id (HIVE_BOX_ID)",
                reg.box_id, h.peer, h.hostname
            )));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Who holds a box id's session: a session here, or (with other control planes) one whose
/// control plane is alive and keeps the box's row fresh.
async fn holder(
    hive: &Hive,
    box_id: &str,
) -> Result<Option<crate::registry::boxes::Holder>, Status> {
    if let Some(h) = hive.registry.holder(box_id) {
        return Ok(Some(h));
    }
    if !hive.bus.is_shared() {
        return Ok(None);
    }
    let Some(row) = hive.store.get_box(box_id).await.map_err(internal)? else {
        return Ok(None);
    };
    let owner = row.session_owner.split('/').next().unwrap_or_default();
    if owner.is_empty() || owner == hive.bus.origin() {
        return Ok(None);
    }
    let silent_ms = now_ms().saturating_sub(row.last_heartbeat_ms).max(0);
    let silent_for = Duration::from_millis(u64::try_from(silent_ms).unwrap_or(0));
    // A control plane that died (kill -9) left its row fresh: its connection tells.
    if silent_for > hive.heartbeat * 3
        || !hive
            .store
            .control_plane_present(owner)
            .await
            .map_err(internal)?
    {
        return Ok(None);
    }
    Ok(Some(crate::registry::boxes::Holder {
        peer: format!("control plane {owner}"),
        hostname: row.hostname,
        silent_for,
    }))
}
/// How much earlier than at a third of its life left a renewal is still taken (the box's
/// clock and its idea of the issue time differ a little from ours).
const RENEW_SLACK_MS: i64 = 10 * 60 * 1000;

type ControlStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl hive_proto::v1::box_agent_server::BoxAgent for BoxAgentService {
    type SessionStream = ControlStream;

    async fn session(
        &self,
        request: Request<Streaming<BoxMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request.remote_addr();
        let certified = if self.require_cert {
            Some(self.certified(&request, "Session").await?)
        } else {
            None
        };
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no Register within {}s of opening the session",
                    REGISTER_TIMEOUT.as_secs()
                ))
            })??;
        let mut reg = match first.and_then(|m| m.msg) {
            Some(BoxMsg::Register(reg)) => reg,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "first message of a session must be Register",
                ))
            }
            None => return Err(Status::invalid_argument("session closed before Register")),
        };
        validate_box_id(&reg.box_id)?;
        if certified.is_none()
            && self
                .hive
                .store
                .box_has_cert(&reg.box_id, now_ms())
                .await
                .map_err(internal)?
        {
            self.hive.metrics.box_violation("identity");
            return Err(Status::permission_denied(format!(
                "box {:?} joined with a certificate: only that certificate speaks for it, on the \
                 TLS agent listener, not a plaintext session",
                reg.box_id
            )));
        }
        if let Some(who) = &certified {
            if who.box_id != reg.box_id {
                self.hive.metrics.box_violation("identity");
                tracing::warn!(cert_box = %who.box_id, claimed = %reg.box_id, ?peer,
                    "box registered under another box's id: refused");
                return Err(Status::permission_denied(format!(
                    "this certificate is box {:?}'s; it cannot register as {:?} (a box's id is \
                     the one it joined with: start it with --box-id {})",
                    who.box_id, reg.box_id, who.box_id
                )));
            }
        }
        let hive = self.hive.clone();
        reg.pools = checked_pools(&hive, &reg.box_id, std::mem::take(&mut reg.pools));
        checked_lists(&hive, &reg.box_id, &mut Vec::new(), &mut reg.running_builds);
        refuse_a_second_holder(&hive, &reg, peer).await?;
        let stored = hive.store.get_box(&reg.box_id).await.map_err(internal)?;
        let admin_state = match stored.as_ref().map(|b| b.state.as_str()) {
            Some(s @ (CORDONED | DRAINING)) => s.to_string(),
            _ => ACTIVE.to_string(),
        };
        let acked_seq = stored.as_ref().map(|b| b.acked_seq).unwrap_or(0);
        let now = now_ms();
        let (tx, rx) = mpsc::channel(hive.box_queue);
        let conn = Conn {
            id: hive.registry.next_conn_id(),
            tx: tx.clone(),
            kill: Arc::new(Notify::new()),
            peer: peer.map_or_else(|| "unknown".to_string(), |p| p.to_string()),
        };
        let owner = format!("{}/{}", hive.bus.origin(), conn.id);
        // The state as written: a cordon or drain made since the read above stays, and the
        // session starts with it (writing the state read above made a box cordoned meanwhile
        // active again, in the store and here).
        let admin_state = hive
            .store
            .upsert_box(&BoxRow {
                id: reg.box_id.clone(),
                hostname: reg.hostname.clone(),
                state: admin_state.clone(),
                backend: reg.backend.clone(),
                pools_json: pools_json(&reg.pools),
                last_heartbeat_ms: now,
                registered_at_ms: now,
                acked_seq,
                session_owner: owner.clone(),
            })
            .await
            .map_err(internal)?;

        let send = |msg| {
            tx.try_send(Ok(ControlMessage { msg: Some(msg) }))
                .map_err(|_| Status::internal("control channel full at registration"))
        };
        send(CtlMsg::Registered(Registered {
            box_id: reg.box_id.clone(),
            heartbeat_interval_ms: u32::try_from(millis(hive.heartbeat)).unwrap_or(u32::MAX),
            size_classes: hive.classes.all(),
            acked_seq,
            lease_ms: u32::try_from(millis(hive.lease)).unwrap_or(u32::MAX),
        }))?;
        if admin_state == DRAINING {
            send(CtlMsg::Drain(Drain {}))?;
        }
        if !hive.registry.connect(&reg, &admin_state, conn.clone()) {
            return Err(Status::unauthenticated(format!(
                "box {} was revoked (`hivectl box revoke`): join again with a token made for \
                 its id",
                reg.box_id
            )));
        }
        // A session of this box on another control plane (its link broke, it failed over)
        // ends there.
        hive.bus
            .publish(crate::cluster::Note::SessionTaken(reg.box_id.clone()));
        tracing::info!(
            box_id = %reg.box_id, hostname = %reg.hostname, backend = %reg.backend,
            ?peer, acked_seq, state = %admin_state, pools = reg.pools.len(),
            running = reg.running_builds.len(), "box registered"
        );
        let mut session = Session {
            hive: hive.clone(),
            box_id: reg.box_id.clone(),
            conn_id: conn.id,
            owner,
            acks: AckTracker {
                acked: acked_seq,
                ahead: BTreeSet::new(),
            },
            renewed: None,
            cells: None,
            heartbeat_written: None,
            acked_written: acked_seq,
            unwritten: None,
            cells_unwritten: false,
        };
        if let Err(e) = session.renew(&reg.running_builds).await {
            tracing::warn!(box_id = %reg.box_id, error = %e, "renewing leases at register failed");
        }
        hive.wake.notify_one();
        hive.sessions.spawn(async move {
            let result = session.run(inbound, conn.kill.clone()).await;
            session.end(result).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        if !self.require_cert {
            return Err(Status::failed_precondition(
                "join on the box listener (--box-addr, TLS), not the gRPC API listener",
            ));
        }
        let peer = request.remote_addr();
        let req = request.into_inner();
        let token: hive_types::JoinToken = req
            .token
            .parse()
            .map_err(|e: hive_types::JoinTokenError| Status::invalid_argument(e.to_string()))?;
        if token.ca_sha256 != self.hive.ca.sha256() {
            return Err(Status::failed_precondition(
                "this join token pins another CA than this control plane's: it was made by \
                 another control plane (or before its data dir was replaced)",
            ));
        }
        validate_box_id(&req.box_id)?;
        let hash = crate::auth::token_hash(&token.secret);
        // The token first: without a usable one nothing is parsed or signed.
        match self
            .hive
            .store
            .check_join_token(&token.id, &hash, &req.box_id, now_ms())
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(refused)) => {
                self.hive.metrics.box_violation("join");
                tracing::warn!(box_id = %req.box_id, token = %token.id, ?peer, %refused, "join refused");
                return Err(Status::permission_denied(refused.to_string()));
            }
            Err(e) => return Err(internal(e)),
        }
        let issued = self
            .hive
            .ca
            .issue_box(&req.box_id, &req.csr_der, self.hive.box_cert_validity)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let now = now_ms();
        let row = BoxCertRow {
            serial: issued.serial.clone(),
            box_id: req.box_id.clone(),
            issued_at_ms: now,
            not_after_ms: issued.not_after_ms,
            revoked_at_ms: 0,
        };
        match self.hive.store.join_box(&token.id, &hash, &row, now).await {
            Ok(Ok(())) => {}
            Ok(Err(refused)) => {
                self.hive.metrics.box_violation("join");
                tracing::warn!(box_id = %req.box_id, token = %token.id, ?peer, %refused, "join refused");
                return Err(Status::permission_denied(refused.to_string()));
            }
            Err(e) => return Err(internal(e)),
        }
        self.hive.registry.unmark_revoked(&req.box_id);
        // The id is the new certificate's now: a session of an earlier holder (whose
        // certificates a token made for this id just ended) ends too.
        self.hive.registry.end_session(&req.box_id);
        tracing::info!(box_id = %req.box_id, token = %token.id, serial = %issued.serial, ?peer,
            "box joined: certificate issued");
        Ok(Response::new(JoinReply {
            box_id: req.box_id,
            certificate_pem: issued.pem,
            ca_pem: self.hive.ca.cert_pem().to_string(),
            not_after_ms: issued.not_after_ms,
        }))
    }

    async fn renew_certificate(
        &self,
        request: Request<RenewCertificateRequest>,
    ) -> Result<Response<JoinReply>, Status> {
        if !self.require_cert {
            return Err(Status::failed_precondition(
                "renew on the box listener (--box-addr, TLS), not the gRPC API listener",
            ));
        }
        let who = self.certified(&request, "RenewCertificate").await?;
        // A box renews when a third of its certificate's life is left; earlier is a box (or a
        // stolen key) minting certificates: refused while more than a third is left (with a
        // little slack for the box's clock).
        if let Some(current) = self
            .hive
            .store
            .box_cert(&who.serial)
            .await
            .map_err(internal)?
        {
            let now = now_ms();
            let life = (current.not_after_ms - current.issued_at_ms).max(1);
            let left = current.not_after_ms - now;
            if left > life / 3 + RENEW_SLACK_MS {
                self.hive.metrics.box_violation("renew");
                let due_in_s = (left - life / 3) / 1000;
                tracing::warn!(box_id = %who.box_id, serial = %who.serial, due_in_s,
                    "certificate renewal refused: too early");
                return Err(Status::failed_precondition(format!(
                    "box {}'s certificate has {}h of its {}h left: it is renewed when a third \
                     is left, in {}h; nothing to do until then",
                    who.box_id,
                    left / 3_600_000,
                    life / 3_600_000,
                    due_in_s / 3600
                )));
            }
        }
        let req = request.into_inner();
        let issued = self
            .hive
            .ca
            .issue_box(&who.box_id, &req.csr_der, self.hive.box_cert_validity)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let row = BoxCertRow {
            serial: issued.serial.clone(),
            box_id: who.box_id.clone(),
            issued_at_ms: now_ms(),
            not_after_ms: issued.not_after_ms,
            revoked_at_ms: 0,
        };
        if !self
            .hive
            .store
            .renew_box_cert(&who.serial, &row)
            .await
            .map_err(internal)?
        {
            return Err(Status::unauthenticated(format!(
                "box {}'s certificate was revoked meanwhile",
                who.box_id
            )));
        }
        tracing::info!(box_id = %who.box_id, old = %who.serial, new = %issued.serial, "box certificate renewed");
        Ok(Response::new(JoinReply {
            box_id: who.box_id,
            certificate_pem: issued.pem,
            ca_pem: self.hive.ca.cert_pem().to_string(),
            not_after_ms: issued.not_after_ms,
        }))
    }
}

struct Session {
    hive: Arc<Hive>,
    box_id: String,
    conn_id: u64,
    /// This session in the box's row (`session_owner`).
    owner: String,
    acks: AckTracker,
    /// When this session last renewed the box's leases, and the builds the box named then (those
    /// found live and those it was told to stop).
    renewed: Option<(Instant, HashSet<String>)>,
    /// The box's `cells` rows as this session last wrote them (None: not yet).
    cells: Option<std::collections::HashMap<String, CellRow>>,
    /// When this session last wrote a heartbeat to the store.
    heartbeat_written: Option<Instant>,
    /// The acked seq the store holds (as this session last committed it).
    acked_written: u64,
    /// The last heartbeat applied to the registry only, and when it came; written when the gap
    /// has passed, if no other heartbeat was written first.
    unwritten: Option<(Heartbeat, i64)>,
    /// A heartbeat left to the registry changed the cells: the next written one writes them
    /// (the registry's copy is already current, so it would not see them as changed).
    cells_unwritten: bool,
}

/// A heartbeat that comes less than this part of the heartbeat interval after the session's
/// last written one (a box's extra heartbeat when it gains room, or a box sending them as fast
/// as it can) updates the registry only: placement sees the room at once, and the store gets
/// the last such heartbeat when the gap has passed. Unless it has leases to renew (a build not
/// named at the last renewal, or a renewal due) or an acked seq the store lacks. A box flooding
/// heartbeats costs the store one write per half interval.
const WRITE_HEARTBEAT_PART_OF_INTERVAL: u32 = 2;

/// A heartbeat that names only builds whose live leases this session renewed less than this
/// part of a lease ago leaves them as they are: they are renewed at the first heartbeat after
/// that, so a lease never runs below three quarters of its length less one heartbeat interval.
/// Renewing every build on every heartbeat was, at 1,000 boxes holding 100 builds each, 50,000
/// lease rows read and written a second. A build the heartbeat names that the box did not name
/// at this session's last renewal is checked (and everything renewed) at once.
const RENEW_EVERY_PART_OF_LEASE: u32 = 4;

impl Session {
    async fn run(
        &mut self,
        mut inbound: Streaming<BoxMessage>,
        kill: Arc<Notify>,
    ) -> Result<&'static str, SessionError> {
        let mut shutdown = self.hive.shutdown.clone();
        loop {
            // A heartbeat left to the registry is written once the gap since the last written
            // one has passed, if none was written meanwhile.
            let write_at = match (&self.unwritten, self.heartbeat_written) {
                (Some(_), Some(at)) => {
                    Some(at + self.hive.heartbeat / WRITE_HEARTBEAT_PART_OF_INTERVAL)
                }
                _ => None,
            };
            let next = tokio::select! {
                m = inbound.message() => m,
                () = tokio::time::sleep_until(write_at.unwrap_or_else(Instant::now).into()),
                    if write_at.is_some() =>
                {
                    if let Some((hb, seen_ms)) = self.unwritten.take() {
                        self.write_heartbeat(hb, seen_ms).await?;
                    }
                    continue;
                }
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
        // A heartbeat is the box's whole state: of several waiting at once only the last is
        // applied (the others are answered with it). A control plane that fell behind catches
        // up instead of storing each stale one in turn.
        let last_heartbeat = msgs
            .iter()
            .rposition(|m| matches!(m.msg, Some(BoxMsg::Heartbeat(_))));
        for (i, msg) in msgs.into_iter().enumerate() {
            let seq = msg.seq;
            if let Err(e) = self.acks.check(seq) {
                self.hive.metrics.box_violation("seq_ahead");
                return Err(e);
            }
            match msg.msg {
                Some(BoxMsg::Heartbeat(_)) if Some(i) != last_heartbeat => answer = true,
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
                    // Answered from its own task: it waits on the connector, and the session
                    // must keep reading heartbeats meanwhile. Started before the ack's store
                    // write (a repeat of a request still unacked gets the same lease).
                    let hive = self.hive.clone();
                    let box_id = self.box_id.clone();
                    self.hive.sessions.spawn(async move {
                        let reply =
                            crate::domain::keyexchange::exchange(&hive, &box_id, &req).await;
                        if !hive
                            .registry
                            .send(&box_id, CtlMsg::KeyExchange(reply))
                            .await
                        {
                            tracing::info!(box_id, build_id = %req.build_id,
                                "box gone before its key exchange reply");
                            hive.connectors.revoke_now.notify_one();
                        }
                    });
                    // Acked on receipt (the box's acks are contiguous; a lost request just
                    // times out on the box and fails that build).
                    self.acks.stored(seq);
                    self.ack().await?;
                    answer = false;
                }
                Some(BoxMsg::Artifact(chunk)) => {
                    // What came before it is stored first (the build must still be running
                    // when its artefacts arrive; its FINISHED comes after them).
                    self.store_group(&mut group).await?;
                    if let Err(why) =
                        crate::domain::artifacts::store_chunk(&self.hive, &self.box_id, &chunk)
                            .await
                    {
                        tracing::warn!(box_id = %self.box_id, build_id = %chunk.build_id,
                            path = %chunk.path.chars().take(200).collect::<String>(), %why,
                            "artifact chunk refused");
                        self.hive.metrics.box_violation("artifact");
                    }
                    // Acked either way: a refused chunk sent again would be refused again.
                    self.acks.stored(seq);
                    answer = true;
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
        let mut items = group.drain(..).peekable();
        while let Some((seq, item)) = items.next() {
            match item {
                Item::Update(u) if is_accepted(&u) => {
                    // A run of ACCEPTEDs (a busy box accepting a round's assignments) is
                    // confirmed in a few multi-row statements, not three each.
                    let mut run = vec![(seq, u)];
                    // (Only updates pass the test, so the pattern always matches.)
                    while let Some((seq, Item::Update(next))) = items.next_if(|(_, it)| {
                        matches!(it, Item::Update(n) if is_accepted(n)
                            && !run.iter().any(|(_, r)| r.build_id == n.build_id))
                    }) {
                        run.push((seq, next));
                    }
                    updates += run.len();
                    let seqs: Vec<u64> = run.iter().map(|(s, _)| *s).collect();
                    self.accept_run(
                        &mut batch,
                        run.into_iter().map(|(_, u)| u).collect(),
                        &mut after,
                    )
                    .await?;
                    for seq in seqs {
                        acks.stored(seq);
                    }
                    continue;
                }
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
                        LogStored::OverCap => {}
                        LogStored::OutOfRange => {
                            tracing::warn!(box_id = %self.box_id, build_id = %chunk.build_id,
                                seq = chunk.seq, "log chunk with an impossible seq dropped");
                            self.hive.metrics.box_violation("log_seq_range");
                        }
                    }
                }
            }
            acks.stored(seq);
        }
        // The start's stages are timed as they are written, before the first chunks (a RUNNING
        // written with the first chunk came before it); the commit's time is
        // `hive_box_commit_seconds`.
        for a in &after {
            match a {
                After::Stage(id, Some(stage)) => self.hive.metrics.stage(id, *stage),
                After::Stage(id, None) => self.hive.metrics.stage_ended(id),
                _ => {}
            }
        }
        // The new chunks go to this control plane's followers now, not after the commit: the
        // commit's fsync was half of a warm start's first line -> follower (p50 3.2 ms, p90 6
        // ms here). Only chunks the box may write (`LogStored::New`: its own build, in range)
        // are announced; until the commit is acknowledged the box keeps them and sends them
        // again after a failure (same seqs; a follower skips what it has).
        let mut carried = Vec::with_capacity(new_logs.len());
        for (build_id, mut chunks) in new_logs {
            self.hive.metrics.stage(&build_id, Stage::FirstLog);
            chunks.sort_by_key(|c| c.seq);
            carried.push((self.hive.events.logs_written(&build_id, chunks), build_id));
        }
        batch.commit(acks.acked).await?;
        self.acks = acks;
        self.acked_written = self.acks.acked;
        let store_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.hive.metrics.box_commit(store_us);
        tracing::debug!(box_id = %self.box_id, updates, logs, acked = self.acks.acked,
            store_us, log_lag_ms,
            "box messages stored in one transaction");
        // The rest is announced only now, after the commit; the chunks first, so a follower
        // reading the store for them finds them before it re-reads a build that changed with
        // them.
        for (chunks, build_id) in carried {
            self.hive.events.logs_committed(&build_id, chunks);
        }
        for a in after {
            match a {
                After::Changed(id) => self.hive.events.build_changed(&id),
                After::Stage(..) => {}
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
            .end_box_session(&self.box_id, &self.owner, now_ms(), self.acks.acked)
            .await
        {
            tracing::warn!(box_id = %self.box_id, error = %e, "saving box state at disconnect");
        }
        if let Err(e @ SessionError::Store(_)) = &result {
            tracing::warn!(box_id = %self.box_id, error = %e, "box session ended by an error; the box reconnects and sends what was not acknowledged again");
        }
        if self.hive.registry.disconnect(&self.box_id, self.conn_id) {
            tracing::info!(box_id = %self.box_id, why, "box offline");
            self.hive.wake.notify_one();
        }
    }

    /// Tells the box every message up to the acked seq is stored; first stores the acked seq
    /// itself if a message acked on receipt (a key exchange, an artefact chunk) moved it past
    /// the stored one. Otherwise a control plane killed after the ack would tell the box's next
    /// session the older seq, and the box, which dropped the acked messages, would resend from
    /// past a gap the session's acks never get over.
    async fn ack(&mut self) -> Result<(), SessionError> {
        if self.acks.acked != self.acked_written {
            let batch = self.hive.store.box_batch(&self.box_id).await?;
            batch.commit(self.acks.acked).await?;
            self.acked_written = self.acks.acked;
        }
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

    async fn heartbeat(&mut self, mut hb: Heartbeat) -> Result<(), SessionError> {
        hb.pools = checked_pools(&self.hive, &self.box_id, std::mem::take(&mut hb.pools));
        checked_lists(
            &self.hive,
            &self.box_id,
            &mut hb.cells,
            &mut hb.running_builds,
        );
        let cells_changed = self.hive.registry.heartbeat(&self.box_id, &hb);
        self.cells_unwritten |= cells_changed;
        let recent = self.heartbeat_written.is_some_and(|at| {
            at.elapsed() < self.hive.heartbeat / WRITE_HEARTBEAT_PART_OF_INTERVAL
        });
        if recent
            && !self.renew_due(&hb.running_builds)
            && self.cells.is_some()
            && self.acked_written == self.acks.acked
        {
            self.hive.metrics.heartbeat(false);
            self.unwritten = Some((hb, now_ms()));
            // Room it reports (cells or pools) is for the scheduler now.
            self.hive.wake.notify_one();
            return Ok(());
        }
        self.write_heartbeat(hb, now_ms()).await
    }

    /// Whether a heartbeat naming `running` renews the box's leases.
    fn renew_due(&self, running: &[String]) -> bool {
        match &self.renewed {
            Some((at, live)) => {
                at.elapsed() >= self.hive.lease / RENEW_EVERY_PART_OF_LEASE
                    || running.iter().any(|b| !live.contains(b))
            }
            None => true,
        }
    }

    /// Writes a heartbeat (already applied to the registry) that came at `seen_ms` to the store:
    /// lease renewals when due, the cells that changed since the last written one, pools, time
    /// seen, acked seq.
    async fn write_heartbeat(&mut self, hb: Heartbeat, seen_ms: i64) -> Result<(), SessionError> {
        self.unwritten = None;
        let renew = self.renew_due(&hb.running_builds);
        let running: &[String] = if renew { &hb.running_builds } else { &[] };
        let cells = if self.cells_unwritten || self.cells.is_none() {
            let now = now_ms();
            let rows: Vec<CellRow> = hb
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
            Some(rows)
        } else {
            None
        };
        let write = match &cells {
            Some(rows) => CellsWrite::between(self.cells.as_ref(), rows),
            None => CellsWrite::Nothing,
        };
        // Lease renewals, cells, pools, time seen and acked seq: one batch (on SQLite, a turn in
        // the box sessions' shared commit rather than commits of its own).
        // The renewal's clock starts before its deadline is set (and before any wait for the
        // group's commit), so the lease left at the next renewal is never under-counted.
        let renewed_at = Instant::now();
        let deadline = self.hive.lease_deadline_ms();
        let mut batch = self.hive.store.box_batch(&self.box_id).await?;
        let orphans = batch
            .heartbeat(
                &self.owner,
                running,
                deadline,
                &write,
                &pools_json(&hb.pools),
                seen_ms,
            )
            .await?;
        batch.commit(self.acks.acked).await?;
        self.heartbeat_written = Some(renewed_at);
        self.acked_written = self.acks.acked;
        let Some(orphans) = orphans else {
            return Err(SessionError::Replaced {
                box_id: self.box_id.clone(),
            });
        };
        self.hive.metrics.heartbeat(true);
        if renew {
            // The builds found without a live lease too: a box that keeps naming one (its
            // stop on the way, or a made-up id) is not checked again, everything renewed and
            // stored, on each heartbeat, only at the next renewal.
            self.renewed = Some((renewed_at, hb.running_builds.iter().cloned().collect()));
        }
        if let Some(rows) = cells {
            // What the store holds now. A row keeps the time it was written with while it
            // stays the same.
            let mut written = self.cells.take().unwrap_or_default();
            match write {
                CellsWrite::Nothing => {}
                CellsWrite::All(_) => {
                    written = rows.into_iter().map(|c| (c.id.clone(), c)).collect();
                }
                CellsWrite::Changes { upsert, removed } => {
                    for id in removed {
                        written.remove(&id);
                    }
                    for c in upsert {
                        written.insert(c.id.clone(), c);
                    }
                }
            }
            self.cells = Some(written);
            self.cells_unwritten = false;
        }
        self.stop_orphans(orphans).await?;
        self.hive.wake.notify_one();
        Ok(())
    }

    /// Renews the leases of the builds the box says it runs at registration, and tells it to
    /// stop any it holds without one.
    async fn renew(&self, running: &[String]) -> Result<(), SessionError> {
        let orphans = self
            .hive
            .store
            .renew_leases(&self.box_id, running, self.hive.lease_deadline_ms())
            .await?;
        self.stop_orphans(orphans).await
    }

    /// Tells the box to stop the builds its heartbeat named that it holds no live lease for
    /// (ended, re-queued elsewhere, unknown).
    async fn stop_orphans(&self, orphans: Vec<String>) -> Result<(), SessionError> {
        let mut told = 0;
        for build_id in orphans {
            if self
                .hive
                .registry
                .told_recently(&self.box_id, &build_id, self.hive.lease)
            {
                continue;
            }
            // Each is a store read and a message: bounded per heartbeat, so a box naming
            // thousands of builds it holds no lease for cannot hold its session (and its
            // renewals) up for seconds. The rest come again with the next heartbeat.
            if told == MAX_STOPS_PER_HEARTBEAT {
                break;
            }
            told += 1;
            let build = self.hive.store.get_build(&build_id).await?;
            let (state, reason) = match build {
                None => (BuildState::Cancelled, "unknown build".to_string()),
                Some(b) if matches!(b.state, BuildState::Cancelled | BuildState::TimedOut) => {
                    (b.state, b.message)
                }
                Some(b) if b.state.is_terminal() => {
                    // Ended: its FINISHED crossed this heartbeat. Not read again for a lease,
                    // so ended builds do not use up the stop orders' budget every heartbeat.
                    self.hive.registry.note_told(&self.box_id, &build_id);
                    continue;
                }
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
        mut u: BuildUpdate,
        after: &mut Vec<After>,
    ) -> Result<(), SessionError> {
        let hive = &self.hive;
        // The text becomes the build's message and a transition's reason: a box (or the build
        // that reached its cell daemon) cannot make it megabytes.
        if u.message.len() > MAX_UPDATE_MESSAGE {
            u.message = format!(
                "{}…",
                crate::forge::truncate(&u.message, MAX_UPDATE_MESSAGE)
            );
        }
        let kind = BuildUpdateKind::try_from(u.kind).unwrap_or(BuildUpdateKind::Unspecified);
        let changed = match kind {
            BuildUpdateKind::Accepted => {
                let deadline = hive.lease_deadline_ms();
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
                let ok = batch
                    .requeue(&u.build_id, &u.lease_id, &reason)
                    .await?
                    .changed();
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
                let ok = batch
                    .set_running(&u.build_id, &u.lease_id, &reason, u.at_ms)
                    .await?;
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
                    .finish_build(
                        &u.build_id,
                        &u.lease_id,
                        state,
                        u.exit_code,
                        &reason,
                        u.at_ms,
                    )
                    .await?;
                if !ok && !self.current(batch, &u, kind, after).await? {
                    return Ok(());
                }
                hive.registry.forget_inflight(&self.box_id, &u.lease_id);
                after.push(After::Wake);
                ok
            }
            BuildUpdateKind::Lost => {
                // Conditional on this box's lease like every update: a box can only give back
                // what it holds, and a build that ended meanwhile stays ended.
                let why = if u.message.is_empty() {
                    "the box lost it".to_string()
                } else {
                    u.message.chars().take(200).collect()
                };
                // The box says why (restarted and destroyed the cell, fenced, stopped); whether
                // the build runs again or has had its last attempt is the re-queue's to say.
                let reason = format!("attempt lost on box {}: {why}", self.box_id);
                if !self.current(batch, &u, kind, after).await? {
                    return Ok(());
                }
                let res = batch.requeue(&u.build_id, &u.lease_id, &reason).await?;
                tracing::warn!(box_id = %self.box_id, build_id = %u.build_id, ?res, %why,
                    "box lost a running attempt; re-queued");
                hive.registry.forget_inflight(&self.box_id, &u.lease_id);
                after.push(After::Wake);
                res.changed()
            }
            BuildUpdateKind::Unspecified => {
                tracing::warn!(box_id = %self.box_id, build_id = %u.build_id,
                    kind = u.kind, "update of unknown kind ignored");
                false
            }
        };
        if changed {
            let stage = match kind {
                BuildUpdateKind::Accepted => Some(Some(Stage::Accepted)),
                BuildUpdateKind::Running => Some(Some(Stage::Running)),
                BuildUpdateKind::Finished | BuildUpdateKind::Lost | BuildUpdateKind::Rejected => {
                    Some(None)
                }
                _ => None,
            };
            if let Some(stage) = stage {
                after.push(After::Stage(u.build_id.clone(), stage));
            }
            after.push(After::Changed(u.build_id));
        }
        Ok(())
    }

    /// Applies a run of ACCEPTEDs for distinct builds inside `batch`, as [`Self::update`]
    /// would one by one: each confirmed lease is announced; a miss is explained (and a stale
    /// attempt elsewhere stopped) from the build's row.
    async fn accept_run(
        &self,
        batch: &mut BoxBatch,
        run: Vec<BuildUpdate>,
        after: &mut Vec<After>,
    ) -> Result<(), SessionError> {
        let accs: Vec<Acceptance> = run
            .iter()
            .map(|u| Acceptance {
                build_id: u.build_id.clone(),
                lease_id: u.lease_id.clone(),
                cell_id: u.cell_id.clone(),
                warm_start: u.warm_start,
            })
            .collect();
        let took = batch
            .confirm_leases(&accs, self.hive.lease_deadline_ms())
            .await?;
        for (u, ok) in run.into_iter().zip(took) {
            if !ok
                && !self
                    .current(batch, &u, BuildUpdateKind::Accepted, after)
                    .await?
            {
                continue;
            }
            self.hive.registry.accepted(&self.box_id, &u.lease_id);
            if ok {
                after.push(After::Stage(u.build_id.clone(), Some(Stage::Accepted)));
                after.push(After::Changed(u.build_id));
            }
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

fn is_accepted(u: &BuildUpdate) -> bool {
    BuildUpdateKind::try_from(u.kind) == Ok(BuildUpdateKind::Accepted)
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
    /// A step of the build's start took effect (`None`: the attempt ended), for
    /// `hive_build_start_stage_seconds`: timed at the commit, when it is durable.
    Stage(String, Option<Stage>),
    Wake,
    StopStale {
        build_id: String,
        lease_id: String,
    },
}

/// Checks a box id given to an RPC (the same rules as a box's Register).
pub fn check_box_id(id: &str) -> Result<(), Status> {
    validate_box_id(id)
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
