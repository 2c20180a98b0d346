//! Build runs: an assignment becomes a task that takes a cell from the pool, starts the build in
//! it (after the key exchange for a private network), relays the cell's events as updates and
//! logs (log `seq` dense per build), reports FINISHED, and gives the cell back to be destroyed.
//! Cancels reach the task through its watch channel; a graceful stop drains the tasks.
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hive_proto::v1::{
    box_message, ArtifactChunk, ArtifactFile, Assignment, BuildState, BuildUpdate, BuildUpdateKind,
    CancelBuild, CellCancelRequest, CellEventKind, CellEventsRequest, LogChunk,
    ReadArtifactRequest, RunBuildRequest,
};
use tokio::sync::watch;

use super::{new_update, outbox, Agent, RunningBuild, Stop};
use crate::backend::CellBackend;
use crate::cell::Cell;
use crate::metrics::{Stage, StartClock};
use hive_sys::now_ms;

/// How long the artefacts of one build may take to move from the cell into the outbox.
const ARTIFACT_TIME: Duration = Duration::from_secs(600);
/// How long a live cell may leave its event stream unreachable before the build is failed.
const STREAM_PATIENCE: Duration = Duration::from_secs(20);

/// Longest a build's ACCEPTED is held back waiting for its RUNNING (see [`HeldAccept`]). A warm
/// start's RUNNING follows in a few milliseconds (p99 ~15 ms on a 2-core box); past this the
/// ACCEPTED goes alone, as it always did.
const ACCEPT_WINDOW: Duration = Duration::from_millis(50);

/// A build's ACCEPTED, held back until its RUNNING (or [`ACCEPT_WINDOW`], or anything else the
/// attempt reports, whichever comes first). The control plane stores each batch of a box's
/// messages in one durable transaction and reads the next batch only after it commits: an
/// ACCEPTED sent alone took one commit (1-4 ms of fsync here), and the RUNNING and first output
/// that followed a millisecond later waited for it and then paid their own. Sent together, the
/// three are stored in one commit. The update keeps the time it was made (`at_ms`), and is
/// always sent before any later update of the attempt: whoever releases it first sends it under
/// the lock, so a release that finds it gone knows it is already in the outbox.
struct HeldAccept(Mutex<Option<BuildUpdate>>);

impl HeldAccept {
    fn release<B: CellBackend>(&self, agent: &Agent<B>) {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = held.take() {
            agent.send(box_message::Msg::Update(u));
        }
    }
}

/// Most dispatch samples kept.
const DISPATCH_SAMPLES: usize = 10_000;

/// Most bytes of output, or of an artefact, the box puts in one message to the control plane.
/// A cell may send an event (or an artefact piece) as large as gRPC allows, 4 MiB; with the
/// build id and the rest around it the box's message would pass the control plane's own 4 MiB
/// limit. The control plane refuses such a message by ending the session, and the outbox sends
/// it again after every reconnect: one event would cut the box off for good.
const PIECE_BYTES: usize = 1024 * 1024;
/// Longest artefact path passed on (the control plane refuses more than 1 KiB; this only keeps
/// a path of megabytes out of every piece of its file, see [`PIECE_BYTES`]).
const MAX_ARTIFACT_PATH: usize = 4096;
/// Most messages the outbox may hold before the next artefact piece is queued. The control
/// plane stores artefact pieces one at a time (a few statements each), far slower than log
/// chunks, and everything queued goes before the box's next heartbeat on the one stream: a cell
/// listing thousands of artefacts delayed the heartbeats past the lease, and every build on the
/// box lost its lease while still running here.
const ARTIFACT_BACKLOG: usize = 256;
/// Most artefacts of one build passed on: as many as the control plane keeps of a build
/// (`MAX_FILES` in its `artifacts`). Each costs it a few statements even when refused, and a
/// cell's list of empty files may name a hundred thousand.
const MAX_ARTIFACT_FILES: usize = 1000;
/// Most bytes of a build's FINISHED message (the control plane keeps 2 KiB of it); the cell's
/// text in it (its end message, an error's) could otherwise make the update pass the message
/// limit, and updates are never dropped from the outbox.
const MAX_MESSAGE: usize = 4096;

/// `s` cut to at most `max` bytes on a character boundary, marked with `…` when cut.
fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// How a build ended, as reported in FINISHED.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub state: BuildState,
    pub exit_code: i32,
    pub message: String,
    /// The artefacts the cell collected (read from it before FINISHED is reported).
    pub artifacts: Vec<ArtifactFile>,
}

impl<B: CellBackend> Agent<B> {
    pub(super) fn assign(self: &Arc<Self>, a: Assignment) {
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

    /// The control plane cancels a build (user, timeout, lease moved): its task stops the cell.
    pub(super) fn cancel(&self, c: CancelBuild) {
        let state = BuildState::try_from(c.state).unwrap_or(BuildState::Cancelled);
        let builds = self.builds();
        match builds.get(&c.build_id) {
            Some(b) => {
                tracing::info!(build = %c.build_id, lease = %b.lease_id, state = state.short_name(), reason = %c.reason, "cancel requested");
                let _ = b.cancel.send(Some(Stop::asked(state, c.reason)));
            }
            None => {
                tracing::debug!(build = %c.build_id, "cancel for a build this box does not run")
            }
        }
    }

    async fn run_build(
        self: &Arc<Self>,
        a: Assignment,
        cancel: watch::Receiver<Option<Stop>>,
        received: Instant,
    ) {
        let mut clock = self.metrics.start_clock(received);
        let class = a.size_class.clone().unwrap_or_default();
        if !class.name.is_empty() && class.vcpus > 0 {
            self.pool.set_shape(&class);
        }
        let (cell, warm) = match self.pool.take(&class.name).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(build = %a.build_id, error = %hive_sys::error_chain(&e), "rejecting assignment");
                self.update(&a.build_id, &a.lease_id, BuildUpdateKind::Rejected, |u| {
                    u.message = hive_sys::error_chain(&e);
                });
                return;
            }
        };
        clock.mark(Stage::Cell);
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
        let held = Arc::new(HeldAccept(Mutex::new(Some(new_update(
            &a.build_id,
            &a.lease_id,
            BuildUpdateKind::Accepted,
            |u| {
                u.cell_id = cell.id.clone();
                u.warm_start = warm;
            },
        )))));
        {
            let (agent, held) = (Arc::clone(self), Arc::clone(&held));
            tokio::spawn(async move {
                tokio::time::sleep(ACCEPT_WINDOW).await;
                held.release(&agent);
            });
        }
        tracing::info!(build = %a.build_id, cell = %cell.id, warm, since_assignment_us = received.elapsed().as_micros() as u64, "build placed in cell");
        let outcome = self
            .relay(&cell, &a, cancel.clone(), received, &mut clock, &held)
            .await;
        // Every way out of `relay` reports the attempt next: its ACCEPTED goes first.
        held.release(self);
        if !outcome.artifacts.is_empty() {
            self.relay_artifacts(&cell, &a, &outcome.artifacts, &cancel)
                .await;
        }
        // Only a build our stop ended (the cell says cancelled, or it was destroyed after the
        // grace) goes back; one that ended on its own meanwhile reports its real outcome.
        let given_back = cancel
            .borrow()
            .as_ref()
            .filter(|s| s.give_back && outcome.state == BuildState::Cancelled)
            .map(|s| s.reason.clone());
        if let Some(reason) = given_back {
            // The cell has stopped (or was destroyed after the grace): nothing of this attempt
            // runs on. The control plane re-queues it if the lease is still this box's; if it
            // has placed the build again already, the report is stale and changes nothing.
            tracing::info!(build = %a.build_id, cell = %cell.id, %reason, "attempt given back (LOST)");
            self.report_lost(
                &a.build_id,
                &a.lease_id,
                &format!("{reason}; the build was stopped before it ended"),
            );
            self.pool.release(cell).await;
            return;
        }
        tracing::info!(build = %a.build_id, cell = %cell.id, state = outcome.state.short_name(), exit_code = outcome.exit_code, "build finished");
        self.update(&a.build_id, &a.lease_id, BuildUpdateKind::Finished, |u| {
            u.cell_id = cell.id.clone();
            u.state = outcome.state as i32;
            u.exit_code = outcome.exit_code;
            u.message = bounded(&outcome.message, MAX_MESSAGE);
        });
        self.pool.release(cell).await;
    }

    /// Starts the build in the cell and relays its events until it ends.
    async fn relay(
        self: &Arc<Self>,
        cell: &Cell,
        a: &Assignment,
        mut cancel: watch::Receiver<Option<Stop>>,
        received: Instant,
        clock: &mut StartClock,
        held: &HeldAccept,
    ) -> Outcome {
        let failed = |message: String| Outcome {
            state: BuildState::Failed,
            exit_code: -1,
            message,
            artifacts: Vec::new(),
        };
        let mut client = cell.client();
        let tunnel = if a.private_network.is_empty() {
            None
        } else {
            // The key exchange is answered only after everything before it is stored.
            held.release(self);
            match self.key_exchange(&mut client, cell, a).await {
                Ok(t) => {
                    clock.mark(Stage::Tunnel);
                    Some(t)
                }
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
            secrets: a.secrets.clone(),
            clone_auth: a.clone_auth.clone(),
            artifact_cap_bytes: a.artifact_cap_bytes,
            fence_after_secs: u32::try_from(self.fence_after().as_secs()).unwrap_or(u32::MAX),
        };
        match tokio::time::timeout(self.cfg.cell_call_timeout, client.run_build(req)).await {
            Ok(Ok(r)) if r.get_ref().accepted => {
                clock.mark(Stage::RunBuild);
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
        // Since when the cell's event stream has been unreachable (None while it delivers). A
        // live cell gets STREAM_PATIENCE to answer again: a guest under load (an emulated host,
        // a busy box) may refuse a connection or two.
        let mut lost_since: Option<tokio::time::Instant> = None;
        let mut failures = 0u32;
        loop {
            // Bounded like every other call into the cell: a cell daemon that never answers
            // Events (not even its headers) would otherwise hold this task, its cell and the
            // build forever (the stop and the backstop below are only watched once it answers,
            // and the control plane never times out a build that has not started).
            let stream = match tokio::time::timeout(
                self.cfg.cell_call_timeout,
                client.events(CellEventsRequest {
                    build_id: a.build_id.clone(),
                    from_seq: next,
                }),
            )
            .await
            {
                Ok(s) => s,
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "no answer to Events within {:?} (--cell-call-timeout-secs)",
                    self.cfg.cell_call_timeout
                ))),
            };
            let mut stream = match stream {
                Ok(s) => {
                    clock.mark(Stage::Events);
                    s.into_inner()
                }
                Err(s) => {
                    failures += 1;
                    let since = *lost_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() > STREAM_PATIENCE || !self.pool.backend().is_alive(&cell.id)
                    {
                        let alive = self.pool.backend().is_alive(&cell.id);
                        let words = self.pool.backend().last_words(&cell.id);
                        tracing::warn!(build = %a.build_id, cell = %cell.id, alive, failures, last_words = %words, error = %s.message(), "lost the cell's event stream");
                        return failed(format!(
                            "lost the cell's event stream: {} (cell {}; {words})",
                            s.message(),
                            if alive { "still running" } else { "exited" }
                        ));
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
                        // saturating: a cell that numbers an event u64::MAX (its
                        // daemon is the build's neighbour) must not overflow the box.
                        next = ev.seq.saturating_add(1);
                        failures = 0;
                        lost_since = None;
                        if !running {
                            running = true;
                            clock.mark(Stage::FirstEvent);
                            held.release(self);
                            self.update(&a.build_id, &a.lease_id, BuildUpdateKind::Running, |u| u.cell_id = cell.id.clone());
                        }
                        match CellEventKind::try_from(ev.kind).unwrap_or(CellEventKind::Unspecified) {
                            CellEventKind::Log => {
                                if log_seq == 0 {
                                    clock.mark(Stage::FirstOutput);
                                    let ms = received.elapsed().as_secs_f64() * 1000.0;
                                    tracing::debug!(build = %a.build_id, dispatch_ms = ms, "first output line from the cell");
                                    let mut d = self.dispatch_ms.lock().unwrap_or_else(|p| p.into_inner());
                                    if d.len() < DISPATCH_SAMPLES {
                                        d.push(ms);
                                    }
                                }
                                let at_ms = if ev.at_ms > 0 { ev.at_ms } else { now_ms() };
                                // Big output goes on in pieces, each its own log chunk.
                                let pieces = if ev.data.len() <= PIECE_BYTES {
                                    vec![ev.data]
                                } else {
                                    ev.data.chunks(PIECE_BYTES).map(<[u8]>::to_vec).collect()
                                };
                                for data in pieces {
                                    let seq = self.send(box_message::Msg::Log(LogChunk {
                                        build_id: a.build_id.clone(),
                                        seq: log_seq,
                                        stream: ev.stream,
                                        step: ev.step,
                                        data,
                                        at_ms,
                                    }));
                                    if log_seq == 0 {
                                        // Once the control plane has stored the first line
                                        // (and sent it to followers), the taken cell's
                                        // replacement may boot without slowing this start.
                                        let agent = Arc::clone(self);
                                        tokio::spawn(async move {
                                            agent.acked_within(seq, crate::pool::REFILL_AFTER).await;
                                            agent.pool.top_up();
                                        });
                                    }
                                    log_seq += 1;
                                }
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
                                return Outcome { state, exit_code: ev.exit_code, message: ev.message, artifacts: ev.artifacts };
                            }
                            CellEventKind::Unspecified => {}
                        }
                    }
                    changed = cancel.changed(), if stop.is_none() => {
                        if changed.is_err() {
                            continue;
                        }
                        let req = cancel.borrow().clone();
                        if let Some(Stop { state, reason, give_back }) = req {
                            // A given-back build must be gone before the lease runs out: the
                            // cancel call and the grace both fit in what is left of it.
                            let grace = if give_back { self.give_back_grace() } else { self.cfg.cancel_grace };
                            let until = tokio::time::Instant::now() + grace;
                            let told = tokio::time::timeout(self.cfg.cell_call_timeout.min(grace), client.cancel(CellCancelRequest {
                                build_id: a.build_id.clone(),
                                state: state as i32,
                                reason: reason.clone(),
                            })).await;
                            match told {
                                Ok(Ok(_)) => {}
                                Ok(Err(s)) => tracing::warn!(build = %a.build_id, error = %s.message(), "the cell refused the cancel; it is destroyed after the grace"),
                                Err(_) => tracing::warn!(build = %a.build_id, "the cell did not answer the cancel; it is destroyed after the grace"),
                            }
                            stop = Some((state, reason, until));
                        }
                    }
                    _ = sleep_until_opt(deadline) => {
                        return match stop {
                            Some((state, reason, _)) => Outcome {
                                state,
                                exit_code: -1,
                                message: format!("{reason} (the cell did not stop in time; destroyed)"),
                                artifacts: Vec::new(),
                            },
                            None => Outcome {
                                state: BuildState::TimedOut,
                                exit_code: -1,
                                message: "build exceeded its timeout and the cell did not stop it".into(),
                                artifacts: Vec::new(),
                            },
                        };
                    }
                }
            }
            if !self.pool.backend().is_alive(&cell.id) {
                return failed(format!(
                    "the cell died during the build ({})",
                    self.pool.backend().last_words(&cell.id)
                ));
            }
            failures += 1;
            let since = *lost_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() > STREAM_PATIENCE {
                return failed(format!(
                    "lost the cell's event stream ({failures} attempts in {:?}; {})",
                    since.elapsed(),
                    self.pool.backend().last_words(&cell.id)
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Reads the build's artefacts from the cell and queues them for the control plane, one
    /// piece at a time, before the build's FINISHED (so the control plane has them when the
    /// build ends). Bounded: the cell's list is checked against the assignment's cap, the
    /// outbox is given room before each piece, and a cell that stops answering loses the rest.
    async fn relay_artifacts(
        &self,
        cell: &Cell,
        a: &Assignment,
        files: &[ArtifactFile],
        cancel: &watch::Receiver<Option<Stop>>,
    ) {
        let mut client = cell.client();
        let deadline = tokio::time::Instant::now() + ARTIFACT_TIME;
        let mut total = 0u64;
        if files.len() > MAX_ARTIFACT_FILES {
            tracing::warn!(build = %a.build_id, listed = files.len(), kept = MAX_ARTIFACT_FILES, "the cell listed more artifacts than the control plane keeps; the rest is dropped");
        }
        for f in files.iter().take(MAX_ARTIFACT_FILES) {
            if cancel.borrow().is_some() {
                tracing::info!(build = %a.build_id, "build stopped; its remaining artifacts are dropped");
                return;
            }
            total = total.saturating_add(f.size);
            if total > a.artifact_cap_bytes {
                tracing::warn!(build = %a.build_id, path = %f.path, "the cell listed artifacts past the cap; the rest is dropped");
                return;
            }
            if f.path.len() > MAX_ARTIFACT_PATH {
                tracing::warn!(build = %a.build_id, path_bytes = f.path.len(), "the cell listed an artifact with an absurd path; skipped");
                continue;
            }
            let chunk = |offset: u64, data: Vec<u8>| {
                box_message::Msg::Artifact(ArtifactChunk {
                    build_id: a.build_id.clone(),
                    lease_id: a.lease_id.clone(),
                    path: f.path.clone(),
                    size: f.size,
                    offset,
                    data,
                })
            };
            if f.size == 0 {
                if !self.artifact_room(a, deadline, cancel).await {
                    return;
                }
                self.send(chunk(0, Vec::new()));
                continue;
            }
            let mut offset = 0u64;
            let mut failures = 0;
            while offset < f.size {
                if cancel.borrow().is_some() {
                    // Cancelled, timed out, or the lease moved: the control plane would
                    // refuse the rest.
                    tracing::info!(build = %a.build_id, "build stopped; its remaining artifacts are dropped");
                    return;
                }
                if tokio::time::Instant::now() >= deadline || failures > 3 {
                    tracing::warn!(build = %a.build_id, path = %f.path, offset, "artifact not read in full from the cell; the rest is dropped");
                    return;
                }
                let stream = tokio::time::timeout(
                    self.cfg.cell_call_timeout,
                    client.read_artifact(ReadArtifactRequest {
                        build_id: a.build_id.clone(),
                        path: f.path.clone(),
                        offset,
                    }),
                )
                .await;
                let mut stream = match stream {
                    Ok(Ok(s)) => s.into_inner(),
                    _ => {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                loop {
                    let piece =
                        tokio::time::timeout(self.cfg.cell_call_timeout, stream.message()).await;
                    let piece = match piece {
                        Ok(Ok(Some(p))) => p,
                        _ => break,
                    };
                    if piece.offset != offset || piece.data.is_empty() {
                        break;
                    }
                    let room = f.size - offset;
                    let mut data = piece.data;
                    data.truncate(usize::try_from(room).unwrap_or(usize::MAX));
                    for part in data.chunks(PIECE_BYTES) {
                        if !self.artifact_room(a, deadline, cancel).await {
                            return;
                        }
                        self.send(chunk(offset, part.to_vec()));
                        offset += part.len() as u64;
                    }
                    if offset >= f.size {
                        break;
                    }
                }
                if offset < f.size {
                    failures += 1;
                }
            }
        }
    }

    /// Waits for room in the outbox for another artefact piece: it keeps everything until it
    /// is acked, so artefacts wait rather than push log output out of it, and at most
    /// [`ARTIFACT_BACKLOG`] messages queue in front of the next heartbeat. False when the rest
    /// is to be dropped: the build was stopped (a self-fence while the control plane is away
    /// ends the wait too) or `deadline` passed.
    async fn artifact_room(
        &self,
        a: &Assignment,
        deadline: tokio::time::Instant,
        cancel: &watch::Receiver<Option<Stop>>,
    ) -> bool {
        loop {
            let (bytes, held) = {
                let ob = self.outbox();
                (ob.bytes(), ob.len())
            };
            if bytes <= outbox::OUTBOX_CAP_BYTES / 2 && held <= ARTIFACT_BACKLOG {
                return true;
            }
            if cancel.borrow().is_some() || tokio::time::Instant::now() >= deadline {
                tracing::warn!(build = %a.build_id, "no room in the outbox for the build's artifacts; the rest is dropped");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
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
                let _ = b.cancel.send(Some(Stop::give_back(
                    "box shut down before the build ended",
                )));
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
