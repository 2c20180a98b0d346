//! The scheduler: one task, woken by new builds, box changes and a tick. Each pass it
//! 1. re-queues builds whose lease ran out (attempt + 1) and tells the box to stop them,
//! 2. ends running builds past their timeout as `timed_out` and tells the box,
//! 3. takes sessions of silent boxes offline and lets drained boxes leave,
//! 4. places queued builds, oldest first: on a box with a warm cell of the build's size class
//!    (the most warm cells under `spread`, the fewest under `binpack`), else on a box with room to
//!    boot one, else the build waits. Order is kept per size class: a build that cannot be placed
//!    holds back the later builds of its class, not those of other classes.
//!
//! A placement is a lease row with a deadline, written with the build's queued -> placed
//! transition; the assignment goes out on the box's session only after that commit.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use hive_proto::v1::control_message::Msg as CtlMsg;
use hive_proto::v1::{Assignment, BuildState};

use crate::boxes::{Candidate, DRAINING, LEFT};
use crate::server::Hive;
use crate::store::{new_id, now_ms, BuildRow, Placement, StoreError};

/// How the scheduler picks among boxes that could take a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Prefer the box with the most free (warm) cells: spreads load.
    Spread,
    /// Prefer the fullest box that still fits: packs builds onto few boxes.
    Binpack,
}

/// Queued builds read per round.
const BATCH: u32 = 1000;

/// What one pass did (tests and benchmarks read it).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassStats {
    pub placed: usize,
    pub requeued: usize,
    pub timed_out: usize,
}

/// Runs passes until shutdown.
pub async fn run(hive: Arc<Hive>, tick: Duration) {
    let mut shutdown = hive.shutdown.clone();
    // Lease and timeout sweeps run at most once a tick; wake-ups (a new build, a heartbeat)
    // only place. Under a webhook burst that keeps the database for the webhooks.
    let mut last_sweep: Option<std::time::Instant> = None;
    loop {
        let sweep = last_sweep.is_none_or(|t| t.elapsed() >= tick);
        if sweep {
            last_sweep = Some(std::time::Instant::now());
        }
        match run_pass(&hive, sweep).await {
            Ok(stats) if stats != PassStats::default() => {
                tracing::debug!(?stats, "scheduler pass");
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "scheduler pass failed; retrying next tick"),
        }
        tokio::select! {
            _ = hive.wake.notified() => {}
            _ = tokio::time::sleep(tick) => {}
            _ = crate::events::stopped(&mut shutdown) => break,
        }
    }
    tracing::info!("scheduler stopped");
}

/// One full scheduling pass (sweeps and placement).
pub async fn pass(hive: &Hive) -> Result<PassStats, StoreError> {
    run_pass(hive, true).await
}

async fn run_pass(hive: &Hive, sweep: bool) -> Result<PassStats, StoreError> {
    let mut stats = PassStats::default();
    if sweep {
        sweep_leases_and_boxes(hive, &mut stats).await?;
    }
    loop {
        let placed = place_round(hive).await?;
        stats.placed += placed.0;
        if placed.0 == 0 || !placed.1 {
            break;
        }
    }
    Ok(stats)
}

/// Expired leases, overdue builds, silent and drained boxes.
async fn sweep_leases_and_boxes(hive: &Hive, stats: &mut PassStats) -> Result<(), StoreError> {
    let now = now_ms();

    for lease in hive.store.expired_leases(now).await? {
        let reason = format!(
            "lease {} on box {} expired ({})",
            lease.id,
            lease.box_id,
            if lease.confirmed {
                "box went silent"
            } else {
                "assignment not confirmed in time"
            }
        );
        hive.registry.forget_inflight(&lease.box_id, &lease.id);
        if hive
            .store
            .requeue(&lease.build_id, &lease.id, "expired", &reason)
            .await?
        {
            tracing::warn!(build_id = %lease.build_id, %reason, "build re-queued");
            hive.metrics.lease_expired();
            hive.events.build_changed(&lease.build_id);
            hive.events.log_appended(&lease.build_id);
            stats.requeued += 1;
            hive.registry
                .cancel(
                    &lease.box_id,
                    &lease.build_id,
                    BuildState::Cancelled,
                    &reason,
                )
                .await;
        }
    }

    for build in hive.store.overdue_builds(now).await? {
        let reason = format!("timed out after {}s", build.timeout_secs);
        if end_build(hive, &build.id, BuildState::TimedOut, &reason)
            .await?
            .is_some()
        {
            stats.timed_out += 1;
        }
    }

    let silence = hive.heartbeat * 3;
    for box_id in hive.registry.reap_silent(silence) {
        tracing::warn!(%box_id, silent_ms = silence.as_millis() as u64, "box silent; offline");
    }
    for box_id in hive.registry.draining_disconnected() {
        if hive.store.live_leases(&box_id).await?.is_empty() {
            hive.store.set_box_state(&box_id, LEFT).await?;
            hive.registry.set_admin_state(&box_id, LEFT);
            tracing::info!(%box_id, "drained box left");
        }
    }
    Ok(())
}

/// Places what it can of one batch of queued builds. Returns (placed, worth another round).
async fn place_round(hive: &Hive) -> Result<(usize, bool), StoreError> {
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
    let full_batch = queued.len() as u32 == BATCH;
    let deadline = now_ms() + hive.lease.as_millis() as i64;
    let mut blocked: HashSet<String> = HashSet::new();
    let mut plan: Vec<(Placement, &BuildRow, bool)> = Vec::new();
    for build in &queued {
        if blocked.contains(&build.size_class) {
            continue;
        }
        if let Err(e) = hive.classes.get(&build.size_class) {
            end_build(hive, &build.id, BuildState::Failed, &e.to_string()).await?;
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
    let placements: Vec<Placement> = plan.iter().map(|(p, _, _)| p.clone()).collect();
    let started = std::time::Instant::now();
    let took = hive.store.place(&placements).await?;
    let store_us = started.elapsed().as_micros() as u64;
    let mut placed = 0;
    for ((p, build, warm), ok) in plan.into_iter().zip(took) {
        if !ok {
            continue;
        }
        placed += 1;
        tracing::debug!(build_id = %p.build_id, box_id = %p.box_id, warm,
            queued_ms = now_ms() - build.created_at_ms, "build placed");
        hive.registry
            .add_inflight(&p.box_id, &p.lease_id, &build.size_class, warm);
        hive.events.build_changed(&p.build_id);
        let assignment = assignment(hive, build, &p);
        if !hive
            .registry
            .send(&p.box_id, CtlMsg::Assign(assignment))
            .await
        {
            tracing::warn!(build_id = %p.build_id, box_id = %p.box_id,
                "box went away before its assignment was sent; the lease will expire");
        }
    }
    hive.metrics.placed(placed as u64);
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
    }
}

/// Picks a box for one build of `class` and takes the place from `candidates`.
/// Returns the box and whether a warm cell was taken.
pub fn choose(candidates: &mut [Candidate], class: &str, policy: Policy) -> Option<(String, bool)> {
    // Warm cells first: the build starts at once.
    let warm = best(candidates, class, policy, |r| r.warm);
    let (idx, is_warm) = match warm {
        Some(i) => (i, true),
        None => (best(candidates, class, policy, |r| r.cold)?, false),
    };
    let room = candidates[idx].rooms.get_mut(class)?;
    if is_warm {
        room.warm -= 1;
    } else {
        room.cold -= 1;
    }
    room.busy += 1;
    Some((candidates[idx].box_id.clone(), is_warm))
}

fn best(
    candidates: &[Candidate],
    class: &str,
    policy: Policy,
    free: impl Fn(&crate::boxes::Room) -> i64,
) -> Option<usize> {
    let mut best: Option<(usize, i64, i64)> = None;
    for (i, c) in candidates.iter().enumerate() {
        let Some(room) = c.rooms.get(class) else {
            continue;
        };
        let n = free(room);
        if n <= 0 {
            continue;
        }
        let better = match (policy, best) {
            (_, None) => true,
            // Most free, then least busy.
            (Policy::Spread, Some((_, bn, bb))) => n > bn || (n == bn && room.busy < bb),
            // Least free, then most busy.
            (Policy::Binpack, Some((_, bn, bb))) => n < bn || (n == bn && room.busy > bb),
        };
        if better {
            best = Some((i, n, room.busy));
        }
    }
    best.map(|(i, _, _)| i)
}

/// Ends a build that has not ended (cancel, timeout, or a build that cannot run), then tells
/// its box if it had one. Returns the build as it was, or None if it had already ended.
pub async fn end_build(
    hive: &Hive,
    build_id: &str,
    state: BuildState,
    reason: &str,
) -> Result<Option<BuildRow>, StoreError> {
    let Some(before) = hive.store.end_build(build_id, state, reason).await? else {
        return Ok(None);
    };
    tracing::info!(%build_id, from = before.state.short_name(), to = state.short_name(), %reason,
        "build ended by the control plane");
    hive.events.build_changed(build_id);
    if matches!(before.state, BuildState::Placed | BuildState::Running) && !before.box_id.is_empty()
    {
        hive.registry
            .forget_inflight(&before.box_id, &before.lease_id);
        let told = if state == BuildState::Failed {
            BuildState::Cancelled
        } else {
            state
        };
        hive.registry
            .cancel(&before.box_id, build_id, told, reason)
            .await;
    }
    hive.wake.notify_one();
    Ok(Some(before))
}

/// Marks a box draining: it gets nothing new, is told to drain, and leaves once it is empty and
/// disconnected.
pub async fn drain_box(hive: &Hive, box_id: &str) -> Result<bool, StoreError> {
    if !hive.store.set_box_state(box_id, DRAINING).await? {
        return Ok(false);
    }
    hive.registry.set_admin_state(box_id, DRAINING);
    hive.registry
        .send(box_id, CtlMsg::Drain(hive_proto::v1::Drain {}))
        .await;
    hive.wake.notify_one();
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boxes::Room;
    use std::collections::HashMap;

    fn cand(id: &str, warm: i64, cold: i64, busy: i64) -> Candidate {
        let mut rooms = HashMap::new();
        rooms.insert("small".to_string(), Room { warm, cold, busy });
        Candidate {
            box_id: id.to_string(),
            backend: "sandbox".into(),
            rooms,
        }
    }

    #[test]
    fn warm_first_then_room_then_nothing() {
        let mut c = vec![cand("a", 0, 1, 0), cand("b", 1, 0, 3)];
        assert_eq!(
            choose(&mut c, "small", Policy::Spread),
            Some(("b".into(), true))
        );
        assert_eq!(
            choose(&mut c, "small", Policy::Spread),
            Some(("a".into(), false))
        );
        assert_eq!(choose(&mut c, "small", Policy::Spread), None);
        assert_eq!(choose(&mut c, "large", Policy::Spread), None);
    }

    #[test]
    fn spread_versus_binpack() {
        let mut c = vec![cand("a", 3, 0, 0), cand("b", 1, 0, 0)];
        assert_eq!(choose(&mut c, "small", Policy::Spread).unwrap().0, "a");
        let mut c = vec![cand("a", 3, 0, 0), cand("b", 1, 0, 0)];
        assert_eq!(choose(&mut c, "small", Policy::Binpack).unwrap().0, "b");
        // Spread keeps balancing as it takes places.
        let mut c = vec![cand("a", 2, 0, 0), cand("b", 2, 0, 0)];
        let picks: Vec<String> = (0..4)
            .map(|_| choose(&mut c, "small", Policy::Spread).unwrap().0)
            .collect();
        assert_eq!(picks, vec!["a", "b", "a", "b"]);
    }
}
