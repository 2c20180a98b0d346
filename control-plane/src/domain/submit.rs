//! Queuing a build: written with its first transition (and, from a webhook, with its delivery
//! record in the same transaction), then announced and the scheduler woken, after the commit.
//!
//! Webhook deliveries are group-committed: the handlers queue them on the bounded
//! [`crate::intake`] queue and [`commit_deliveries`] writes what is waiting as one transaction
//! (one fsync for the group), then answers each handler. The group is what queued while the
//! previous one committed (plus, with the operator's window, what arrives within it), at most
//! [`MAX_GROUP`]. No store waits on its own: on PostgreSQL a wait of an eighth of the last
//! commit made groups larger (12 deliveries, not 7) but every delivery waited for it, and
//! `hive-bench webhooks` measured 25-35% fewer webhooks/s with it. If the group's
//! transaction fails, its deliveries are recorded one by one, so
//! one that cannot be stored (a constraint, a value the database refuses) fails alone. On
//! shutdown the queue closes (new deliveries are refused, 503) and what it holds is committed
//! and answered before the task ends.
//!
//! A rebuild ([`rebuild_of`]) is a new build of the old one's code with its project as it is now.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::domain::place::{choose_at_once, send_assignments, AtOnce};
use crate::intake::{IntakeError, Job, Queue};
use crate::state::Hive;
use crate::store::{Audit, BuildRow, DbKind, Delivery, NewDelivery, ProjectRow, StoreError};

/// Most deliveries in one group commit.
pub const MAX_GROUP: usize = 256;

/// Groups committing at once: one on both stores. SQLite has one writer; on PostgreSQL a
/// second group in flight was measured to halve the group size and cost more than the overlap
/// saves (`hive-bench webhooks`, control-plane/README.md): each group is a statement the
/// server executes and a commit record it flushes.
pub fn groups_in_flight(kind: DbKind) -> usize {
    match kind {
        DbKind::Sqlite | DbKind::Postgres => 1,
    }
}

/// Why a build cannot be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("build {0:?} not found")]
    NotFound(String),
    #[error("build {id}'s project {project:?} has been deleted; nothing to rebuild")]
    ProjectGone { id: String, project: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The build that re-runs `old_id` (the project as it is now: steps, env, class; the code as
/// it was), not yet queued, with its project (for the caller's project check) and the reason
/// its first transition gives. Queue it with [`submit`].
pub async fn rebuild_of(
    hive: &Hive,
    old_id: &str,
) -> Result<(ProjectRow, BuildRow, String), RebuildError> {
    let old = hive
        .store
        .get_build(old_id)
        .await?
        .ok_or_else(|| RebuildError::NotFound(old_id.to_string()))?;
    let p = hive
        .store
        .get_project(&old.project_id)
        .await?
        .ok_or_else(|| RebuildError::ProjectGone {
            id: old.id.clone(),
            project: old.project_name.clone(),
        })?;
    let build = BuildRow::new_queued(
        &p,
        &old.revision,
        &old.git_ref,
        &format!("rebuild:{}", old.id),
    );
    Ok((p, build, format!("rebuild of {}", old.id)))
}

/// Queues a build submitted through the API, with the audit entry of who did.
pub async fn submit(
    hive: &Hive,
    build: &BuildRow,
    reason: &str,
    audit: &Audit,
) -> Result<(), StoreError> {
    hive.store
        .insert_build_audited(build, reason, audit)
        .await?;
    queued(hive, &build.id);
    Ok(())
}

/// Queues an API build under its idempotency key: Ok(None) when queued now, or the id of the
/// build an earlier request with the same key (same project) made, which is left as it is.
pub async fn submit_once(
    hive: &Hive,
    build: &BuildRow,
    request_id: &str,
    reason: &str,
    audit: &Audit,
) -> Result<Option<String>, StoreError> {
    let earlier = hive
        .store
        .insert_build_once(build, request_id, reason, audit)
        .await?;
    if earlier.is_none() {
        queued(hive, &build.id);
    }
    Ok(earlier)
}

/// Records a webhook delivery and, in the same transaction, the build it makes (if any),
/// through the group commit; returns once it is durable. A delivery id seen before changes
/// nothing and returns the stored answer; only a new build is announced.
pub async fn submit_delivery(hive: &Hive, delivery: NewDelivery) -> Result<Delivery, IntakeError> {
    hive.intake.record(delivery).await
}

/// The group commit task for webhook deliveries: runs until shutdown, then commits and answers
/// what is still queued; up to [`groups_in_flight`] groups commit at once.
pub async fn commit_deliveries(hive: Arc<Hive>, mut queue: Queue, window: Duration) {
    let kind = hive.store.kind();
    let parallel = groups_in_flight(kind);
    let mut in_flight = JoinSet::new();
    let mut shutdown = hive.shutdown.clone();
    let mut closing = false;
    loop {
        // While every slot commits, deliveries queue up for the next group.
        while in_flight.len() >= parallel {
            let _ = in_flight.join_next().await;
        }
        let first = if closing {
            queue.recv().await
        } else {
            tokio::select! {
                job = queue.recv() => job,
                _ = shutdown.wait_for(|s| *s) => {
                    // Handlers that have not queued yet are refused from now on; what is
                    // queued is still received, committed and answered.
                    queue.close();
                    closing = true;
                    continue;
                }
            }
        };
        let Some(first) = first else { break };
        let mut group = vec![first];
        gather(&mut queue, &mut group, window).await;
        let hive = hive.clone();
        in_flight.spawn(async move { commit_group(&hive, group).await });
    }
    while in_flight.join_next().await.is_some() {}
    tracing::debug!("webhook commit queue drained");
}

/// Adds what is waiting on the queue to `group` (up to [`MAX_GROUP`]), and with a `window`,
/// what arrives within it.
async fn gather(queue: &mut Queue, group: &mut Vec<Job>, window: Duration) {
    while group.len() < MAX_GROUP {
        match queue.try_recv() {
            Ok(job) => group.push(job),
            Err(_) => break,
        }
    }
    if window.is_zero() {
        return;
    }
    let until = tokio::time::Instant::now() + window;
    while group.len() < MAX_GROUP {
        match tokio::time::timeout_at(until, queue.recv()).await {
            Ok(Some(job)) => group.push(job),
            _ => break,
        }
    }
}

/// Commits one group and answers each of its handlers; on failure, records them one by one.
async fn commit_group(hive: &Hive, group: Vec<Job>) {
    let started = Instant::now();
    let (items, replies): (Vec<NewDelivery>, Vec<_>) =
        group.into_iter().map(|j| (j.delivery, j.reply)).unzip();
    // With a free cell and none of their class queued, the new builds are placed in this same
    // transaction: one commit and the scheduler's hop less before a warm start.
    // The first of each delivery id only: a copy's build is never inserted.
    let mut seen = HashSet::new();
    let builds: Vec<&BuildRow> = items
        .iter()
        .filter(|i| seen.insert((i.project_id.as_str(), i.delivery_id.as_str())))
        .filter_map(|i| i.build.as_ref())
        .collect();
    let at_once = choose_at_once(hive, &builds).await;
    let placements = at_once.as_ref().map(AtOnce::placements).unwrap_or_default();
    match hive
        .store
        .record_deliveries_placing(&items, &placements)
        .await
    {
        Ok((answers, took)) => {
            let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            hive.metrics.webhook_commit(items.len(), us);
            tracing::debug!(
                deliveries = items.len(),
                store_us = us,
                "webhook deliveries stored in one transaction"
            );
            let new: HashSet<&str> = items
                .iter()
                .zip(&answers)
                .filter_map(|(item, answer)| match (answer, &item.build) {
                    (Delivery::New, Some(build)) => Some(build.id.as_str()),
                    _ => None,
                })
                .collect();
            let (assignments, placed) = match at_once {
                Some(a) => a.settle(hive, &took, &new).await,
                None => Default::default(),
            };
            for id in &new {
                hive.events.build_changed(id);
            }
            if new.len() > placed.len() {
                // Builds wait now: later groups leave theirs of those classes to the
                // scheduler too, until a round finds none of them waiting.
                for item in &items {
                    if let Some(b) = &item.build {
                        if new.contains(b.id.as_str()) && !placed.contains(&b.id) {
                            hive.choosing.left_waiting(&b.size_class);
                        }
                    }
                }
                hive.wake.notify_one();
            }
            for (reply, answer) in replies.into_iter().zip(answers) {
                // A handler that gave up (its client left) needs no answer: the delivery is
                // stored, and a redelivery gets the same build.
                let _ = reply.send(Ok(answer));
            }
            send_assignments(hive, assignments).await;
        }
        Err(e) if items.len() == 1 => {
            if let Some(a) = at_once {
                a.abandon(hive);
            }
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(e));
            }
        }
        Err(e) => {
            if let Some(a) = at_once {
                a.abandon(hive);
            }
            tracing::warn!(deliveries = items.len(), error = %e,
                "group commit of webhook deliveries failed; recording them one by one");
            for (item, reply) in items.iter().zip(replies) {
                let recorded = hive
                    .store
                    .record_delivery(
                        &item.delivery_id,
                        &item.project_id,
                        item.build.as_ref(),
                        &item.outcome,
                    )
                    .await;
                if let (Ok(Delivery::New), Some(build)) = (&recorded, &item.build) {
                    queued(hive, &build.id);
                }
                let _ = reply.send(recorded);
            }
        }
    }
}

/// A build was queued: watchers hear of it and the scheduler looks at the queue.
fn queued(hive: &Hive, build_id: &str) {
    hive.events.build_changed(build_id);
    hive.wake.notify_one();
}
