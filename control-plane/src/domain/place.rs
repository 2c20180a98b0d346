//! Placing queued builds: one round reads a batch of the queue, chooses a box for each build
//! ([`crate::placement::choose`]), writes every placement (build queued -> placed and a live lease
//! with a deadline) in one transaction, and only after that commit sends each assignment on its
//! box's session. Order is kept per size class: a build that cannot be placed holds back the
//! later builds of its class, not those of other classes.

use std::collections::{HashMap, HashSet};

use hive_proto::v1::control_message::Msg as CtlMsg;
use hive_proto::v1::{Assignment, BuildState};

use crate::domain::end::end_build;
use crate::placement::choose;
use crate::state::Hive;
use crate::store::{new_id, now_ms, BuildRow, Placement, StoreError};

/// Queued builds read per round.
const BATCH: u32 = 1000;

/// Places what it can of one batch of queued builds. Returns (placed, worth another round).
pub async fn place_round(hive: &Hive) -> Result<(usize, bool), StoreError> {
    let mut candidates = hive.registry.candidates();
    // No box with a free place: do not read the queue at all (this pass runs on every
    // heartbeat, and a long queue is the normal state of a busy hive).
    if !candidates
        .iter()
        .any(|c| c.rooms.values().any(|r| r.warm > 0 || r.cold > 0))
    {
        return Ok((0, false));
    }
    let queued = hive.store.queued_builds(BATCH).await?;
    if queued.is_empty() {
        return Ok((0, false));
    }
    let full_batch = u32::try_from(queued.len()) == Ok(BATCH);
    let deadline = hive.lease_deadline_ms();
    let mut blocked: HashSet<String> = HashSet::new();
    let mut plan: Vec<(Placement, &BuildRow, bool)> = Vec::new();
    for build in &queued {
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
                build,
                warm,
            )),
            None => {
                blocked.insert(build.size_class.clone());
            }
        }
    }
    if plan.is_empty() {
        return Ok((0, false));
    }
    // Read before the placements commit: a failure here leaves the builds queued, not leased
    // to a box that never hears of them.
    let secrets = secrets_for(hive, &plan).await?;
    let placements: Vec<Placement> = plan.iter().map(|(p, _, _)| p.clone()).collect();
    let started = std::time::Instant::now();
    let took = hive.store.place(&placements).await?;
    let store_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let mut placed = 0;
    for ((p, build, warm), ok) in plan.into_iter().zip(took) {
        if !ok {
            continue;
        }
        placed += 1;
        let queued_ms = now_ms() - build.created_at_ms;
        hive.metrics.waited_in_queue(queued_ms);
        tracing::debug!(build_id = %p.build_id, box_id = %p.box_id, warm, queued_ms,
            "build placed");
        hive.registry
            .add_inflight(&p.box_id, &p.lease_id, &build.size_class, warm);
        hive.events.build_changed(&p.build_id);
        let mut assignment = assignment(hive, build, &p);
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
    hive.metrics.placed(placed);
    tracing::debug!(placed, store_us, "placed builds");
    Ok((placed, full_batch && blocked.is_empty()))
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
async fn secrets_for(
    hive: &Hive,
    plan: &[(Placement, &BuildRow, bool)],
) -> Result<HashMap<String, HashMap<String, (String, String)>>, StoreError> {
    let mut ids: Vec<String> = plan.iter().map(|(_, b, _)| b.project_id.clone()).collect();
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
