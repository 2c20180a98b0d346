//! Several control planes on one PostgreSQL (issue 13): the news that one control plane's
//! change must reach the others, carried by PostgreSQL's `LISTEN/NOTIFY`.
//!
//! The database stays the only truth: every state change is a conditional write there (a
//! queued build is placed by exactly one control plane; a lease is re-queued once), so a note
//! lost here costs time, never correctness. Notes only make the others act at once instead of
//! on their next tick: a build changed (watchers, log followers and the scheduler re-read), a
//! log was stored, the projects changed (the webhook's project cache), a control message for a
//! box whose session another control plane holds (cancel, drain), a box's operator state, a
//! revoked box, a session taken over by another control plane.
//!
//! Each control plane has an id (`<host>-<random>`); a note carries its sender's id and time,
//! and a control plane skips its own notes (it acted on them locally already). Notes are sent
//! after the change committed (`pg_notify` outside the change's transaction), several per
//! `pg_notify` (one payload, one line each, below PostgreSQL's 8000-byte limit), from a
//! bounded queue: a flood that fills it drops notes (counted), never blocks the sender. The
//! listener reconnects with backoff; while it is down the control plane is not ready
//! (`/readyz`), and after it is back everyone re-reads (the scheduler wakes, the project cache
//! is dropped; log followers re-read on their own tick).
//!
//! On SQLite there is one control plane per database (the file is locked), and the bus is
//! local: publishing does nothing.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hive_proto::v1::ControlMessage;
use prost::Message as _;
use tokio::sync::mpsc;

use crate::state::Hive;

/// The PostgreSQL channel every control plane of a hive listens on.
pub const CHANNEL: &str = "hive_cluster";
/// Notes waiting to be sent; more are dropped (and counted).
const QUEUE: usize = 65_536;
/// Most bytes of one `pg_notify` payload (PostgreSQL allows just under 8000).
const PAYLOAD: usize = 7_000;

/// One piece of news for the other control planes.
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    /// A build row changed.
    Build(String),
    /// Log chunks of a build were stored.
    Log(String),
    /// A project was created, changed or deleted.
    Projects,
    /// A control message for a box, to whoever holds its session.
    ToBox {
        box_id: String,
        msg: Box<ControlMessage>,
    },
    /// A box's operator state (active, cordoned, draining, left).
    AdminState { box_id: String, state: String },
    /// A box was revoked: no session may hold it.
    Revoked(String),
    /// A revoked box joined again.
    Unrevoked(String),
    /// The box's session must end wherever it is (its id moved, its certificate was revoked).
    EndSession(String),
    /// The box was forgotten.
    Forget(String),
    /// The sender took the box's session: an older one elsewhere ends.
    SessionTaken(String),
    /// A command for a network's connector, to whoever holds its session (`call_id` empty:
    /// no answer wanted).
    ConnectorCall {
        call_id: String,
        network: String,
        cmd: Box<hive_proto::v1::ConnectorCommand>,
    },
    /// The answer to a `ConnectorCall`: `ok <connector id>`, `refused <why>`, `timeout`, `gone`.
    ConnectorAnswer { call_id: String, result: String },
}

impl Note {
    fn encode(&self) -> Option<String> {
        let (kind, a, b) = match self {
            Note::Build(id) => ("B", id.clone(), String::new()),
            Note::Log(id) => ("L", id.clone(), String::new()),
            Note::Projects => ("P", String::new(), String::new()),
            Note::ToBox { box_id, msg } => (
                "M",
                box_id.clone(),
                base64::engine::general_purpose::STANDARD.encode(msg.encode_to_vec()),
            ),
            Note::AdminState { box_id, state } => ("A", box_id.clone(), state.clone()),
            Note::Revoked(id) => ("R", id.clone(), String::new()),
            Note::Unrevoked(id) => ("U", id.clone(), String::new()),
            Note::EndSession(id) => ("E", id.clone(), String::new()),
            Note::Forget(id) => ("F", id.clone(), String::new()),
            Note::SessionTaken(id) => ("S", id.clone(), String::new()),
            Note::ConnectorCall {
                call_id,
                network,
                cmd,
            } => (
                "C",
                format!("{call_id} {network}"),
                base64::engine::general_purpose::STANDARD.encode(cmd.encode_to_vec()),
            ),
            Note::ConnectorAnswer { call_id, result } => {
                ("K", call_id.clone(), result.replace(['\t', '\n'], " "))
            }
        };
        // Ids are checked at the door (no control characters); a field that could break the
        // line format is not sent rather than sent wrong.
        if [&a, &b].iter().any(|f| f.contains(['\t', '\n'])) {
            return None;
        }
        Some(format!("{kind}\t{a}\t{b}"))
    }

    fn decode(kind: &str, a: &str, b: &str) -> Option<Note> {
        let id = || a.to_string();
        Some(match kind {
            "B" => Note::Build(id()),
            "L" => Note::Log(id()),
            "P" => Note::Projects,
            "M" => {
                let bytes = base64::engine::general_purpose::STANDARD.decode(b).ok()?;
                Note::ToBox {
                    box_id: id(),
                    msg: Box::new(ControlMessage::decode(bytes.as_slice()).ok()?),
                }
            }
            "A" => Note::AdminState {
                box_id: id(),
                state: b.to_string(),
            },
            "R" => Note::Revoked(id()),
            "U" => Note::Unrevoked(id()),
            "E" => Note::EndSession(id()),
            "F" => Note::Forget(id()),
            "S" => Note::SessionTaken(id()),
            "C" => {
                let (call_id, network) = a.split_once(' ')?;
                let bytes = base64::engine::general_purpose::STANDARD.decode(b).ok()?;
                Note::ConnectorCall {
                    call_id: call_id.to_string(),
                    network: network.to_string(),
                    cmd: Box::new(hive_proto::v1::ConnectorCommand::decode(bytes.as_slice()).ok()?),
                }
            }
            "K" => Note::ConnectorAnswer {
                call_id: id(),
                result: b.to_string(),
            },
            _ => return None,
        })
    }
}

/// Where a control plane sends its notes. Cheap to clone; the local bus (SQLite, tests that
/// run one control plane) sends nothing.
#[derive(Debug, Clone)]
pub struct Bus {
    origin: Arc<str>,
    tx: Option<mpsc::Sender<Note>>,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    dropped: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    listening: AtomicBool,
    /// Milliseconds between a note's sending and its arrival here, last seen.
    lag_ms: AtomicI64,
}

impl Default for Bus {
    fn default() -> Self {
        Bus::local()
    }
}

impl Bus {
    /// A bus that goes nowhere: the only control plane of its database.
    pub fn local() -> Bus {
        Bus {
            origin: Arc::from(control_plane_id()),
            tx: None,
            shared: Arc::new(Shared {
                listening: AtomicBool::new(true),
                ..Default::default()
            }),
        }
    }

    /// A bus to the other control planes; the receiver goes to [`spawn`].
    pub fn shared() -> (Bus, mpsc::Receiver<Note>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Bus {
                origin: Arc::from(control_plane_id()),
                tx: Some(tx),
                shared: Arc::default(),
            },
            rx,
        )
    }

    /// This control plane's id (`<host>-<random>`, new at each start).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Whether other control planes may share the database.
    pub fn is_shared(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues a note for the others (never waits; a full queue drops it).
    pub fn publish(&self, note: Note) {
        if let Some(tx) = &self.tx {
            if tx.try_send(note).is_err() {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether this control plane hears the others (always, when there are none).
    pub fn listening(&self) -> bool {
        self.shared.listening.load(Ordering::Relaxed)
    }

    /// (sent, received, dropped, last lag in ms) since start, for `/metrics`.
    pub fn counts(&self) -> (u64, u64, u64, i64) {
        (
            self.shared.sent.load(Ordering::Relaxed),
            self.shared.received.load(Ordering::Relaxed),
            self.shared.dropped.load(Ordering::Relaxed),
            self.shared.lag_ms.load(Ordering::Relaxed),
        )
    }
}

fn control_plane_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty() && !h.contains(['\t', '\n']))
        .unwrap_or_else(|| "cp".to_string());
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &rand[..8])
}

/// Starts the sender and the listener of a shared bus. Both end on shutdown.
pub fn spawn(hive: Arc<Hive>, url: String, rx: mpsc::Receiver<Note>) {
    tokio::spawn(send_loop(hive.clone(), rx));
    tokio::spawn(listen_loop(hive, url));
}

async fn send_loop(hive: Arc<Hive>, mut rx: mpsc::Receiver<Note>) {
    let bus = hive.bus.clone();
    let mut shutdown = hive.shutdown.clone();
    loop {
        let first = tokio::select! {
            n = rx.recv() => n,
            _ = crate::events::stopped(&mut shutdown) => None,
        };
        let Some(first) = first else { break };
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(n) => batch.push(n),
                Err(_) => break,
            }
        }
        for payload in payloads(&bus, batch) {
            match hive.store.notify(CHANNEL, &payload).await {
                Ok(()) => {
                    bus.shared.sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if *shutdown.borrow() => {
                    // The database closes as this control plane stops: the others catch up
                    // on their next tick, as below.
                    tracing::debug!(error = %e, "notifying the other control planes at shutdown");
                }
                Err(e) => {
                    // The others catch up on their next tick; nothing is lost in the store.
                    tracing::warn!(error = %e, "notifying the other control planes failed");
                }
            }
        }
    }
}

/// The batch as payloads: duplicates dropped, order kept, each payload below the limit.
fn payloads(bus: &Bus, batch: Vec<Note>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let head = format!("{}\t{}", bus.origin, hive_sys::now_ms());
    let mut out: Vec<String> = Vec::new();
    let mut cur = head.clone();
    for note in batch {
        let Some(line) = note.encode() else { continue };
        if !seen.insert(line.clone()) {
            continue;
        }
        if line.len() + head.len() + 1 > PAYLOAD {
            tracing::warn!(
                len = line.len(),
                "note too large for a notification; dropped"
            );
            bus.shared.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if cur.len() + 1 + line.len() > PAYLOAD {
            out.push(std::mem::replace(&mut cur, head.clone()));
        }
        cur.push('\n');
        cur.push_str(&line);
    }
    if cur.len() > head.len() {
        out.push(cur);
    }
    out
}

async fn listen_loop(hive: Arc<Hive>, url: String) {
    let mut shutdown = hive.shutdown.clone();
    let mut backoff = hive_sys::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match listener(&url, &hive.bus.origin).await {
            Ok(mut l) => {
                backoff.reset();
                hive.bus.shared.listening.store(true, Ordering::Relaxed);
                tracing::info!(origin = %hive.bus.origin, "listening to the other control planes");
                resync(&hive);
                loop {
                    let r = tokio::select! {
                        r = l.try_recv() => r,
                        _ = crate::events::stopped(&mut shutdown) => return,
                    };
                    match r {
                        Ok(Some(n)) => receive(&hive, n.payload()),
                        // The connection dropped and was made again: notes may be lost.
                        Ok(None) => {
                            tracing::warn!("notification connection lost; re-reading");
                            resync(&hive);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "notification listener failed");
                            break;
                        }
                    }
                }
                hive.bus.shared.listening.store(false, Ordering::Relaxed);
            }
            Err(e) => {
                hive.bus.shared.listening.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, "cannot listen to the other control planes yet");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = crate::events::stopped(&mut shutdown) => return,
        }
    }
}

async fn listener(url: &str, origin: &str) -> Result<sqlx::postgres::PgListener, sqlx::Error> {
    use std::str::FromStr;
    // Named after this control plane, so the others can tell it is alive
    // ([`presence_name`], `Store::control_plane_present`): its connection goes with it.
    let options =
        sqlx::postgres::PgConnectOptions::from_str(url)?.application_name(&presence_name(origin));
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    let mut l = sqlx::postgres::PgListener::connect_with(&pool).await?;
    l.listen(CHANNEL).await?;
    Ok(l)
}

/// The `application_name` of a control plane's listening connection: how the others see
/// that it is alive (PostgreSQL drops a dead process's connection at once). A digest of
/// the id, as application names are cut at 63 bytes.
pub fn presence_name(origin: &str) -> String {
    use sha2::Digest as _;
    format!(
        "hive-cp-{}",
        &hex::encode(sha2::Sha256::digest(origin.as_bytes()))[..24]
    )
}

/// After notes may have been lost: whatever waits on one looks at the store again.
fn resync(hive: &Arc<Hive>) {
    hive.store.invalidate_projects_here();
    // Box states changed meanwhile (a cordon elsewhere) are read back from the store.
    let again = hive.clone();
    tokio::spawn(async move {
        let ids: Vec<String> = again
            .registry
            .candidates()
            .into_iter()
            .map(|c| c.box_id)
            .collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        crate::domain::drain::reload_box_states(&again, &ids).await;
        again.wake.notify_one();
    });
}

/// Acts on one payload from another control plane (own payloads are skipped).
pub(crate) fn receive(hive: &Hive, payload: &str) {
    let mut lines = payload.split('\n');
    let Some(head) = lines.next() else { return };
    let mut head = head.split('\t');
    let (Some(origin), Some(at)) = (head.next(), head.next()) else {
        return;
    };
    if origin == &*hive.bus.origin {
        return;
    }
    if let Ok(at) = at.parse::<i64>() {
        hive.bus
            .shared
            .lag_ms
            .store((hive_sys::now_ms() - at).max(0), Ordering::Relaxed);
    }
    hive.bus.shared.received.fetch_add(1, Ordering::Relaxed);
    for line in lines {
        let mut f = line.splitn(3, '\t');
        let (kind, a, b) = (
            f.next().unwrap_or(""),
            f.next().unwrap_or(""),
            f.next().unwrap_or(""),
        );
        let Some(note) = Note::decode(kind, a, b) else {
            tracing::warn!(%origin, line, "unknown note from another control plane");
            continue;
        };
        apply(hive, note);
    }
}

fn apply(hive: &Hive, note: Note) {
    let reg = &hive.registry;
    match note {
        Note::Build(id) => {
            hive.events.build_changed_here(&id);
            // It may be a new queued build, or room freed on a box held here.
            hive.wake.notify_one();
        }
        Note::Log(id) => hive.events.log_appended_here(&id),
        Note::Projects => hive.store.invalidate_projects_here(),
        Note::ToBox { box_id, msg } => {
            if let Some(m) = msg.msg {
                reg.send_here(&box_id, m);
            }
        }
        Note::AdminState { box_id, state } => {
            reg.set_admin_state_here(&box_id, &state);
            hive.wake.notify_one();
        }
        Note::Revoked(id) => {
            reg.mark_revoked_here(&id);
            reg.end_session_here(&id);
        }
        Note::Unrevoked(id) => reg.unmark_revoked_here(&id),
        Note::EndSession(id) | Note::SessionTaken(id) => {
            if reg.end_session_here(&id) {
                tracing::info!(box_id = %id, "box session moved to another control plane");
            }
        }
        Note::Forget(id) => reg.forget_here(&id),
        Note::ConnectorCall {
            call_id,
            network,
            cmd,
        } => {
            if let Some(c) = cmd.cmd {
                hive.connectors.call_here(call_id, network, c);
            }
        }
        Note::ConnectorAnswer { call_id, result } => hive.connectors.answered(&call_id, &result),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hive_proto::v1::control_message::Msg as CtlMsg;

    #[test]
    fn notes_round_trip_and_batches_stay_below_the_limit() {
        let notes = vec![
            Note::Build("b1".into()),
            Note::Log("b1".into()),
            Note::Projects,
            Note::ToBox {
                box_id: "box-1".into(),
                msg: Box::new(ControlMessage {
                    msg: Some(CtlMsg::Cancel(hive_proto::v1::CancelBuild {
                        build_id: "b1".into(),
                        state: 5,
                        reason: "a reason\twith\ttabs\nand lines".into(),
                    })),
                }),
            },
            Note::AdminState {
                box_id: "box-1".into(),
                state: "cordoned".into(),
            },
            Note::Revoked("box-2".into()),
            Note::Unrevoked("box-2".into()),
            Note::EndSession("box-3".into()),
            Note::Forget("box-4".into()),
            Note::SessionTaken("box-5".into()),
            Note::ConnectorCall {
                call_id: "c1".into(),
                network: "corp".into(),
                cmd: Box::new(hive_proto::v1::ConnectorCommand {
                    id: 0,
                    cmd: Some(hive_proto::v1::connector_command::Cmd::RemovePeer(
                        hive_proto::v1::RemovePeer {
                            build_id: "b1".into(),
                            public_key: "k".into(),
                        },
                    )),
                }),
            },
            Note::ConnectorAnswer {
                call_id: "c1".into(),
                result: "refused no such peer".into(),
            },
        ];
        for n in &notes {
            let line = n.encode().expect("encodes");
            let mut f = line.splitn(3, '\t');
            let back = Note::decode(
                f.next().unwrap(),
                f.next().unwrap_or(""),
                f.next().unwrap_or(""),
            );
            assert_eq!(back.as_ref(), Some(n), "{line}");
        }
        assert_eq!(Note::Build("a\tb".into()).encode(), None);

        let (bus, _rx) = Bus::shared();
        let many: Vec<Note> = (0..2000)
            .map(|i| Note::Build(format!("0190-build-{i:06}")))
            .chain(std::iter::repeat_n(Note::Projects, 50))
            .collect();
        let out = payloads(&bus, many);
        assert!(out.len() > 1);
        assert!(out.iter().all(|p| p.len() <= PAYLOAD));
        let lines: usize = out.iter().map(|p| p.lines().count() - 1).sum();
        assert_eq!(lines, 2001, "duplicates dropped, nothing else");
    }
}
