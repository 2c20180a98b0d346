//! Placing queued builds: one round reads a batch of the queue, chooses a box for each build
//! ([`crate::placement::choose`]), writes every placement (build queued -> placed and a live lease
//! with a deadline) in one transaction, and only after that commit sends each assignment on its
//! box's session (the scheduler sends one round's while the next reads and commits). Order is
//! kept per size class: a build that cannot be placed holds back the later builds of its class,
//! not those of other classes.
//!
//! A webhook group may place its own new builds ([`choose_at_once`]) in its own transaction,
//! when a cell is free and no build of its size class is queued: the same choice, the same
//! store checks, one commit and the scheduler's hop less on a warm start.

use std::collections::{HashMap, HashSet};

use hive_proto::v1::control_message::Msg as CtlMsg;
use hive_proto::v1::{Assignment, BuildState};

use crate::domain::end::end_build;
use crate::placement::choose;
use crate::state::Hive;
use crate::store::{new_id, now_ms, BuildRow, Placement, StoreError};

/// Queued builds read per round.
const BATCH: u32 = 1000;

/// What one round did, and the next round's batch when it is worth one.
#[derive(Debug, Default)]
pub struct Round {
    pub placed: usize,
    /// Some when the whole batch was placed (or ended) and more may be queued: the queued builds
    /// after this batch, read while this round's placements were committing. Empty when the read
    /// found none or failed; the next round then reads for itself.
    pub next: Option<Vec<BuildRow>>,
    /// The committed placements, to be sent to their boxes ([`send_assignments`]). The
    /// scheduler sends them while the next round reads and commits: they are leased already,
    /// and the next round's choices already count them (`add_inflight`).
    pub assignments: Assignments,
}

/// Committed placements not sent yet, with the opened secrets of their projects.
#[derive(Debug, Default)]
pub struct Assignments {
    placed: Vec<(Placement, BuildRow, bool)>,
    secrets: HashMap<String, HashMap<String, (String, String)>>,
}

/// Places what it can of one batch of queued builds: `batch` when the last round read it
/// ahead, else the head of the queue.
pub async fn place_round(hive: &Hive, batch: Option<Vec<BuildRow>>) -> Result<Round, StoreError> {
    let has_room = |candidates: &[crate::registry::boxes::Candidate]| {
        candidates
            .iter()
            .any(|c| c.rooms.values().any(|r| r.warm > 0 || r.cold > 0))
    };
    // No box with a free place: do not read the queue at all (this pass runs on every
    // heartbeat, and a long queue is the normal state of a busy hive).
    if !has_room(&hive.registry.candidates()) {
        return Ok(Round::default());
    }
    let round = std::time::Instant::now();
    let queued = match batch {
        Some(b) if !b.is_empty() => b,
        _ => hive.store.queued_builds(BATCH, None).await?,
    };
    let read_us = micros_since(round);
    if queued.is_empty() {
        hive.choosing.saw_waiting(false, []);
        return Ok(Round::default());
    }
    // The boxes as they are now that the batch is read, not as they were before: a box
    // cordoned (or drained) before a build was submitted must not get that build, and the
    // read that found the build began after the submit, so after the cordon too. Taken
    // before the read, a cordon and a submit in between (a few milliseconds while the read
    // waited for its connection) put the new build on the cordoned box.
    // Until this round's choices are in the registry (after its commit), no other chooser
    // reads the registry's free cells (`Hive::choosing`).
    let choosing = hive.choosing.lock.lock().await;
    let mut candidates = hive.registry.candidates();
    let full_batch = u32::try_from(queued.len()) == Ok(BATCH);
    let deadline = hive.lease_deadline_ms();
    let mut blocked: HashSet<String> = HashSet::new();
    let mut plan: Vec<(Placement, usize, bool)> = Vec::new();
    for (at, build) in queued.iter().enumerate() {
        if blocked.contains(&build.size_class) {
            continue;
        }
        if let Err(e) = hive.classes.get(&build.size_class) {
            end_build(hive, &build.id, BuildState::Failed, &e.to_string(), None).await?;
            continue;
        }
        match choose(&mut candidates, &build.size_class, hive.placement) {
            Some((box_id, warm)) => plan.push((
                Placement {
                    build_id: build.id.clone(),
                    lease_id: new_id(),
                    backend: candidates
                        .iter()
                        .find(|c| c.box_id == box_id)
                        .map(|c| c.backend.clone())
                        .unwrap_or_default(),
                    box_id,
                    deadline_ms: deadline,
                },
                at,
                warm,
            )),
            None => {
                blocked.insert(build.size_class.clone());
            }
        }
    }
    if plan.is_empty() {
        hive.choosing.saw_waiting(full_batch, blocked);
        return Ok(Round::default());
    }
    // Read before the placements commit: a failure here leaves the builds queued, not leased
    // to a box that never hears of them.
    let plan_us = micros_since(round);
    let secrets = secrets_for(hive, plan.iter().map(|(_, at, _)| &queued[*at])).await?;
    let placements: Vec<Placement> = plan.iter().map(|(p, _, _)| p.clone()).collect();
    let started = std::time::Instant::now();
    // Every build of the batch was given a box or ended: the builds after it are read while
    // this round's placements commit (the read was a fifth of a round on PostgreSQL under load).
    // Read after the batch's last (created at, id), so a build of this batch whose placement
    // did not take, or one re-queued meanwhile (it keeps its created at), is not in it: the
    // next pass, which a re-queue wakes, reads from the head again. Within the pass such a
    // build may go after newer ones of its class. Reading the head instead (2,000 rows less
    // this batch) kept that order but cost SQLite a third of its rate here.
    let more = full_batch && blocked.is_empty();
    let after = queued
        .last()
        .map(|b| (b.created_at_ms, b.id.clone()))
        .filter(|_| more);
    let (took, next) = tokio::join!(hive.store.place(&placements), async {
        match &after {
            Some(key) => Some(hive.store.queued_builds(BATCH, Some(key)).await),
            None => None,
        }
    });
    let took = took?;
    let store_us = micros_since(started);
    let next = match next {
        Some(Ok(rows)) => Some(rows),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "reading the queue ahead failed; the next round reads again");
            Some(Vec::new())
        }
        None => None,
    };
    let mut queued: Vec<Option<BuildRow>> = queued.into_iter().map(Some).collect();
    let mut placed = Vec::with_capacity(plan.len());
    let mut refused: Vec<String> = Vec::new();
    for ((p, at, warm), ok) in plan.into_iter().zip(took) {
        let Some(build) = queued[at].take() else {
            continue;
        };
        if !ok {
            // Left queued: webhook groups leave the later builds of its class to the rounds.
            blocked.insert(build.size_class);
            if !refused.contains(&p.box_id) {
                refused.push(p.box_id);
            }
            continue;
        }
        hive.metrics.waited_in_queue(now_ms() - build.created_at_ms);
        // Before the next round chooses: it counts this build in its box's room.
        hive.registry
            .add_inflight(&p.box_id, &p.lease_id, &build.size_class, warm);
        placed.push((p, build, warm));
    }
    drop(choosing);
    // Builds left in the queue (a class with no room, a full batch, a placement that did not
    // take): webhook groups leave theirs, of those classes, behind them.
    hive.choosing.saw_waiting(full_batch, blocked);
    // A placement that did not take: its build was placed elsewhere or ended meanwhile, or
    // its box is not active in the store (a cordon this registry has not heard of yet). The
    // latter's builds stay queued; once the registry is corrected, they go elsewhere at once.
    if !refused.is_empty() {
        let ids: Vec<&str> = refused.iter().map(String::as_str).collect();
        if super::drain::reload_box_states(hive, &ids).await {
            hive.wake.notify_one();
        }
    }
    hive.metrics.placed(placed.len());
    tracing::debug!(
        placed = placed.len(),
        read_us,
        plan_us,
        store_us,
        round_us = micros_since(round),
        "placed builds"
    );
    Ok(Round {
        placed: placed.len(),
        next,
        assignments: Assignments { placed, secrets },
    })
}

/// A webhook group's new builds, each given a box from the registry's free cells as a round
/// would choose, and those cells already taken in the registry (`add_inflight`), so the
/// scheduler's rounds count them while the group commits and never wait for it.
/// `domain::submit` writes these placements in the group's own transaction (the store takes
/// them only when no other build of their class is queued), then [`AtOnce::settle`]s them, or
/// [`AtOnce::abandon`]s them if the transaction failed.
#[derive(Debug)]
pub struct AtOnce {
    plan: Vec<(Placement, BuildRow, bool)>,
    secrets: HashMap<String, HashMap<String, (String, String)>>,
}

/// Chooses boxes for `builds` (oldest first, as the queue orders them) when that is worth a
/// try: builds of their size class were not last seen waiting, no round is choosing now (this
/// does not wait for one), and a box has a free place. Order per size class as in a round: a
/// build with no place holds back the later builds of its class. None leaves every build to
/// the scheduler.
pub async fn choose_at_once(hive: &Hive, builds: &[&BuildRow]) -> Option<AtOnce> {
    if builds.is_empty() || hive.choosing.all_waiting() {
        return None;
    }
    let mut builds = builds.to_vec();
    builds.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    let plan = {
        let _choosing = hive.choosing.lock.try_lock().ok()?;
        let mut candidates = hive.registry.candidates();
        let deadline = hive.lease_deadline_ms();
        let mut blocked: HashSet<&str> = HashSet::new();
        let mut plan = Vec::new();
        for build in builds {
            if blocked.contains(build.size_class.as_str()) {
                continue;
            }
            // Read per build, so a round may clear it meanwhile: a class skipped here stays
            // skipped for the group's later builds, or a newer one would pass the older.
            if hive.choosing.waiting(&build.size_class)
                || hive.classes.get(&build.size_class).is_err()
            {
                blocked.insert(&build.size_class);
                continue;
            }
            let Some((box_id, warm)) = choose(&mut candidates, &build.size_class, hive.placement)
            else {
                blocked.insert(&build.size_class);
                continue;
            };
            let backend = candidates
                .iter()
                .find(|c| c.box_id == box_id)
                .map(|c| c.backend.clone())
                .unwrap_or_default();
            let p = Placement {
                build_id: build.id.clone(),
                lease_id: new_id(),
                box_id,
                backend,
                deadline_ms: deadline,
            };
            // Taken now: the next round's choice counts it; settled or given back below.
            hive.registry
                .add_inflight(&p.box_id, &p.lease_id, &build.size_class, warm);
            plan.push((p, build.clone(), warm));
        }
        plan
    };
    if plan.is_empty() {
        return None;
    }
    // Read before the commit, as a round does: a failure leaves the builds queued.
    let at_once = AtOnce {
        secrets: HashMap::new(),
        plan,
    };
    match secrets_for(hive, at_once.plan.iter().map(|(_, b, _)| b)).await {
        Ok(secrets) => Some(AtOnce { secrets, ..at_once }),
        Err(e) => {
            tracing::warn!(error = %e, "reading secrets for builds placed at once failed; the scheduler places them");
            at_once.abandon(hive);
            None
        }
    }
}

impl AtOnce {
    /// The placements to write with the group.
    pub fn placements(&self) -> Vec<Placement> {
        self.plan.iter().map(|(p, _, _)| p.clone()).collect()
    }

    /// The group's transaction failed: the cells taken for it are free again.
    pub fn abandon(self, hive: &Hive) {
        for (p, _, _) in &self.plan {
            hive.registry.forget_inflight(&p.box_id, &p.lease_id);
        }
    }

    /// After the group's commit. `took` says which placements took (None: the store did not
    /// try it, builds of its class were queued or the queue was longer than it reads); `new`
    /// are the builds the group inserted (a copy of an earlier delivery inserts none). The
    /// cells of placements that did not take are free again; the others are to be sent with
    /// [`send_assignments`]. Ids of the builds placed.
    pub async fn settle(
        self,
        hive: &Hive,
        took: &[Option<bool>],
        new: &HashSet<&str>,
    ) -> (Assignments, HashSet<String>) {
        let AtOnce { plan, secrets } = self;
        debug_assert_eq!(took.len(), plan.len());
        let mut placed = Vec::new();
        let mut refused: Vec<String> = Vec::new();
        for (i, (p, build, warm)) in plan.into_iter().enumerate() {
            let ok = took.get(i).copied().flatten();
            if ok != Some(true) {
                hive.registry.forget_inflight(&p.box_id, &p.lease_id);
                // Tried and refused, though the group inserted it: its box is not active in
                // the store (a cordon this registry has not heard of yet).
                if ok == Some(false)
                    && new.contains(build.id.as_str())
                    && !refused.contains(&p.box_id)
                {
                    refused.push(p.box_id);
                }
                continue;
            }
            hive.metrics.waited_in_queue(now_ms() - build.created_at_ms);
            placed.push((p, build, warm));
        }
        if !refused.is_empty() {
            let ids: Vec<&str> = refused.iter().map(String::as_str).collect();
            super::drain::reload_box_states(hive, &ids).await;
        }
        hive.metrics.placed(placed.len());
        hive.metrics.placed_at_once(placed.len());
        let ids = placed.iter().map(|(p, _, _)| p.build_id.clone()).collect();
        if !placed.is_empty() {
            tracing::debug!(placed = placed.len(), "webhook builds placed at once");
        }
        (Assignments { placed, secrets }, ids)
    }
}

/// Sends committed placements (a round's, or a webhook group's) to their boxes, each with the
/// secrets its ref may see.
pub async fn send_assignments(hive: &Hive, sent: Assignments) {
    let Assignments { placed, secrets } = sent;
    for (p, build, warm) in placed {
        tracing::debug!(build_id = %p.build_id, box_id = %p.box_id, warm, "build placed");
        hive.events.build_changed(&p.build_id);
        let mut assignment = assignment(hive, &build, &p);
        // The clone's credentials go to the clone only, never into the steps' secrets.
        // Only the secrets this build's ref may see (`refglob::ref_allowed`).
        let visible: HashMap<String, String> = secrets
            .get(&build.project_id)
            .map(|all| {
                all.iter()
                    .filter(|(_, (_, refs))| crate::refglob::ref_allowed(refs, &build.git_ref))
                    .map(|(name, (value, _))| (name.clone(), value.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let (steps_secrets, clone_auth) = super::clone_access::split(visible);
        assignment.secrets = steps_secrets;
        assignment.clone_auth = Some(clone_auth);
        hive.metrics
            .stage(&p.build_id, crate::metrics::Stage::Placed);
        if !hive
            .registry
            .send(&p.box_id, CtlMsg::Assign(assignment))
            .await
        {
            tracing::warn!(build_id = %p.build_id, box_id = %p.box_id,
                "box went away before its assignment was sent; the lease will expire");
        }
    }
}

fn micros_since(t: std::time::Instant) -> u64 {
    u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn assignment(hive: &Hive, build: &BuildRow, p: &Placement) -> Assignment {
    Assignment {
        build_id: build.id.clone(),
        lease_id: p.lease_id.clone(),
        lease_deadline_ms: p.deadline_ms,
        project_id: build.project_id.clone(),
        project_name: build.project_name.clone(),
        repo_url: build.repo_url.clone(),
        revision: build.revision.clone(),
        git_ref: build.git_ref.clone(),
        steps: build.steps.clone(),
        env: build.env.clone().into_iter().collect(),
        timeout_secs: build.timeout_secs,
        size_class: hive.classes.get(&build.size_class).ok().cloned(),
        private_network: build.private_network.clone(),
        secrets: Default::default(),
        clone_auth: None,
        artifact_cap_bytes: hive.artifacts.cap_bytes,
    }
}

/// The opened secrets of the projects of this round's builds (one read for the round), each
/// with the refs it is limited to. A secret that does not open (the key was replaced) is left
/// out and said; the build runs without it, as it would have before the secret was set.
pub(crate) async fn secrets_for(
    hive: &Hive,
    builds: impl Iterator<Item = &BuildRow>,
) -> Result<HashMap<String, HashMap<String, (String, String)>>, StoreError> {
    let mut ids: Vec<String> = builds.map(|b| b.project_id.clone()).collect();
    ids.sort();
    ids.dedup();
    let mut out: HashMap<String, HashMap<String, (String, String)>> = HashMap::new();
    for s in hive.store.secrets_of(&ids).await? {
        match hive
            .sealer
            .open(&s.project_id, &s.name, &s.nonce, &s.sealed)
        {
            Ok(v) => {
                out.entry(s.project_id)
                    .or_default()
                    .insert(s.name, (String::from_utf8_lossy(&v).into_owned(), s.refs));
            }
            Err(e) => {
                tracing::error!(project_id = %s.project_id, name = %s.name, error = %e, "secret left out of the build");
            }
        }
    }
    Ok(out)
}
