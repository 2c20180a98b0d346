//! Builds and their transitions. Every state change is one transaction that writes the build
//! and its `build_transitions` row, conditional on the state (and lease, and box) it expects.
//! Each change has one write path, a `*_tx(&mut tx, ...)` function: the [`Store`] methods run
//! it in a transaction of their own, [`super::boxes::BoxBatch`] in the box session's.

use std::collections::BTreeMap;

use hive_proto::v1::{BuildState, LogStream};
use sqlx::{Any, Transaction};

use super::leases::{release_lease_tx, release_leases_of_build_tx};
use super::logs::insert_log_tx;
use super::projects::ProjectRow;
use super::{
    checked, from_json, new_id, now_ms, parse_state, q, to_i64, to_json, DbKind, Result, Store,
    StoreError,
};

/// A build as stored. Steps, env and timeout are a snapshot of the project at trigger time.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildRow {
    pub id: String,
    pub project_id: String,
    pub project_name: String,
    pub repo_url: String,
    pub revision: String,
    pub git_ref: String,
    pub state: BuildState,
    pub box_id: String,
    pub cell_id: String,
    pub lease_id: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub started_at_ms: i64,
    pub exit_code: i32,
    pub message: String,
    pub trigger: String,
    pub size_class: String,
    pub private_network: String,
    pub steps: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub timeout_secs: u32,
    pub warm_start: bool,
    pub attempt: u32,
    /// The cell backend of the box it was last placed on (`microvm`, `sandbox`; empty before).
    pub backend: String,
    /// Where the current attempt's log starts: its chunk n is the build's log seq
    /// `log_base + n`. Holes below it belong to attempts that are over and never fill.
    pub log_base: u64,
}

impl BuildRow {
    /// A fresh queued build of `project`.
    pub fn new_queued(project: &ProjectRow, revision: &str, git_ref: &str, trigger: &str) -> Self {
        let now = now_ms();
        BuildRow {
            id: new_id(),
            project_id: project.id.clone(),
            project_name: project.name.clone(),
            repo_url: project.repo_url.clone(),
            revision: revision.to_string(),
            git_ref: git_ref.to_string(),
            state: BuildState::Queued,
            box_id: String::new(),
            cell_id: String::new(),
            lease_id: String::new(),
            created_at_ms: now,
            updated_at_ms: now,
            started_at_ms: 0,
            exit_code: -1,
            message: "queued".to_string(),
            trigger: trigger.to_string(),
            size_class: project.size_class.clone(),
            private_network: project.private_network.clone(),
            steps: project.steps.clone(),
            env: project.env.clone(),
            timeout_secs: project.timeout_secs,
            warm_start: false,
            backend: String::new(),
            attempt: 1,
            log_base: 0,
        }
    }
}

/// One row of `build_transitions`.
#[derive(Debug, Clone, PartialEq)]
pub struct TransitionRow {
    pub state: BuildState,
    pub at_ms: i64,
    pub reason: String,
}

/// A placement the scheduler wants to make.
#[derive(Debug, Clone)]
pub struct Placement {
    pub build_id: String,
    pub lease_id: String,
    pub box_id: String,
    /// The box's cell backend, recorded with the build.
    pub backend: String,
    pub deadline_ms: i64,
}

/// Filters for `list_builds`.
#[derive(Debug, Clone, Default)]
pub struct BuildFilter {
    pub project_id: Option<String>,
    pub state: Option<BuildState>,
    pub limit: u32,
}

/// The columns of a build, in [`BuildRecord`]'s order (a macro so the SQL can be `concat!`ed
/// into `'static` strings that any executor accepts).
macro_rules! build_columns {
    () => {
        "id, project_id, project_name, repo_url, revision, git_ref, state, box_id, cell_id, \
         lease_id, created_at_ms, updated_at_ms, started_at_ms, exit_code, message, \
         trigger_source, size_class, private_network, steps_json, env_json, timeout_secs, \
         warm_start, attempt, backend, log_base"
    };
}
pub(crate) use build_columns;

const SELECT_BUILD: &str = concat!("SELECT ", build_columns!(), " FROM builds WHERE id = $1");

/// A `builds` row as the database holds it.
#[derive(sqlx::FromRow)]
pub(crate) struct BuildRecord {
    id: String,
    project_id: String,
    project_name: String,
    repo_url: String,
    revision: String,
    git_ref: String,
    state: String,
    box_id: String,
    cell_id: String,
    lease_id: String,
    created_at_ms: i64,
    updated_at_ms: i64,
    started_at_ms: i64,
    exit_code: i64,
    message: String,
    trigger_source: String,
    size_class: String,
    private_network: String,
    steps_json: String,
    env_json: String,
    timeout_secs: i64,
    warm_start: i64,
    attempt: i64,
    backend: String,
    log_base: i64,
}

impl TryFrom<BuildRecord> for BuildRow {
    type Error = StoreError;

    fn try_from(r: BuildRecord) -> Result<Self> {
        Ok(BuildRow {
            state: parse_state(&r.state)?,
            exit_code: checked("exit_code", r.exit_code)?,
            steps: from_json("steps_json", &r.steps_json)?,
            env: from_json::<BTreeMap<String, String>>("env_json", &r.env_json)?,
            timeout_secs: checked("timeout_secs", r.timeout_secs)?,
            warm_start: r.warm_start != 0,
            attempt: checked("attempt", r.attempt)?,
            log_base: checked("log_base", r.log_base)?,
            id: r.id,
            project_id: r.project_id,
            project_name: r.project_name,
            repo_url: r.repo_url,
            revision: r.revision,
            git_ref: r.git_ref,
            box_id: r.box_id,
            cell_id: r.cell_id,
            lease_id: r.lease_id,
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
            started_at_ms: r.started_at_ms,
            message: r.message,
            trigger: r.trigger_source,
            size_class: r.size_class,
            private_network: r.private_network,
            backend: r.backend,
        })
    }
}

/// A `build_transitions` row as the database holds it.
#[derive(sqlx::FromRow)]
struct TransitionRecord {
    state: String,
    at_ms: i64,
    reason: String,
}

impl TryFrom<TransitionRecord> for TransitionRow {
    type Error = StoreError;

    fn try_from(r: TransitionRecord) -> Result<Self> {
        Ok(TransitionRow {
            state: parse_state(&r.state)?,
            at_ms: r.at_ms,
            reason: r.reason,
        })
    }
}

/// One build by id, through the read pool or inside a transaction (which then sees its own
/// earlier writes).
pub(crate) async fn fetch_build<'e>(
    e: impl sqlx::Executor<'e, Database = Any>,
    id: &'e str,
) -> Result<Option<BuildRow>> {
    sqlx::query_as::<_, BuildRecord>(SELECT_BUILD)
        .bind(id)
        .fetch_optional(e)
        .await
        .map_err(q("select build"))?
        .map(BuildRow::try_from)
        .transpose()
}

impl Store {
    /// Inserts a queued build with its first transition.
    pub async fn insert_build(&self, build: &BuildRow, reason: &str) -> Result<()> {
        in_tx!(self, "commit new build", |tx| {
            insert_build_tx(tx, build, reason).await
        })
    }

    pub async fn get_build(&self, id: &str) -> Result<Option<BuildRow>> {
        fetch_build(&self.reads, id).await
    }

    /// Newest first.
    pub async fn list_builds(&self, filter: &BuildFilter) -> Result<Vec<BuildRow>> {
        let mut sql = format!("SELECT {} FROM builds WHERE 1 = 1", build_columns!());
        let mut n = 0;
        if filter.project_id.is_some() {
            n += 1;
            sql.push_str(&format!(" AND project_id = ${n}"));
        }
        if filter.state.is_some() {
            n += 1;
            sql.push_str(&format!(" AND state = ${n}"));
        }
        n += 1;
        sql.push_str(&format!(" ORDER BY created_at_ms DESC, id DESC LIMIT ${n}"));
        let mut query = sqlx::query_as::<_, BuildRecord>(&sql);
        if let Some(p) = &filter.project_id {
            query = query.bind(p.clone());
        }
        if let Some(s) = filter.state {
            query = query.bind(s.short_name());
        }
        let limit = if filter.limit == 0 {
            100
        } else {
            filter.limit.min(10_000)
        };
        let rows = query
            .bind(i64::from(limit))
            .fetch_all(&self.reads)
            .await
            .map_err(q("list builds"))?;
        rows.into_iter().map(BuildRow::try_from).collect()
    }

    pub async fn transitions(&self, build_id: &str) -> Result<Vec<TransitionRow>> {
        let rows = sqlx::query_as::<_, TransitionRecord>(
            "SELECT state, at_ms, reason FROM build_transitions WHERE build_id = $1 ORDER BY id",
        )
        .bind(build_id)
        .fetch_all(&self.reads)
        .await
        .map_err(q("select build transitions"))?;
        rows.into_iter().map(TransitionRow::try_from).collect()
    }

    /// A build with its history, as one commit left them (None: no such build). The two reads
    /// are separate, so a transition committed between them would show a history one state
    /// ahead of the build (a watcher then prints a state twice); every state change writes its
    /// transition row in the same transaction, so the build is read again until its state is
    /// the last one's.
    pub async fn build_with_history(
        &self,
        id: &str,
    ) -> Result<Option<(BuildRow, Vec<TransitionRow>)>> {
        let Some(mut b) = self.get_build(id).await? else {
            return Ok(None);
        };
        for _ in 0..10 {
            let t = self.transitions(id).await?;
            if t.last().is_none_or(|last| last.state == b.state) {
                return Ok(Some((b, t)));
            }
            let Some(again) = self.get_build(id).await? else {
                return Ok(None);
            };
            b = again;
        }
        let t = self.transitions(id).await?;
        Ok(Some((b, t)))
    }

    /// Queued builds, oldest first (the queue order).
    ///
    /// `after` (created at, id) reads on from there: the scheduler reads its next batch while the
    /// last one's placements commit, before they leave the queue.
    pub async fn queued_builds(
        &self,
        limit: u32,
        after: Option<&(i64, String)>,
    ) -> Result<Vec<BuildRow>> {
        let rows = match after {
            None => {
                sqlx::query_as::<_, BuildRecord>(concat!(
                    "SELECT ",
                    build_columns!(),
                    " FROM builds WHERE state = 'queued' ORDER BY created_at_ms, id LIMIT $1"
                ))
                .bind(i64::from(limit))
                .fetch_all(&self.placing)
                .await
            }
            // On a SQLite file the read-only connections: the writer is busy committing.
            Some((at_ms, id)) => {
                sqlx::query_as::<_, BuildRecord>(concat!(
                    "SELECT ",
                    build_columns!(),
                    " FROM builds WHERE state = 'queued' AND (created_at_ms > $1 \
                     OR (created_at_ms = $1 AND id > $2)) ORDER BY created_at_ms, id LIMIT $3"
                ))
                .bind(at_ms)
                .bind(id)
                .bind(i64::from(limit))
                .fetch_all(match self.kind {
                    DbKind::Postgres => &self.placing,
                    DbKind::Sqlite => &self.reads,
                })
                .await
            }
        }
        .map_err(q("select queued builds"))?;
        rows.into_iter().map(BuildRow::try_from).collect()
    }

    /// Counts of builds per state, for `/metrics`.
    pub async fn count_builds_by_state(&self) -> Result<BTreeMap<String, i64>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) AS n FROM builds GROUP BY state")
                .fetch_all(&self.reads)
                .await
                .map_err(q("count builds by state"))?;
        Ok(rows.into_iter().collect())
    }

    /// Places queued builds: per placement, the build goes queued -> placed and a live lease is
    /// written, all in one transaction. Returns, per placement, whether it took (false when the
    /// build was no longer queued, or its box is not `active` in the store).
    ///
    /// On PostgreSQL a large round is split into up to [`PLACE_PARTS`] transactions that run side
    /// by side, each on one of the scheduler's own connections (so on its own server process):
    /// one transaction's statements use one core of the server. The parts hold disjoint builds, each locked in id order, so they cannot deadlock with each
    /// other or with another control plane's round. A part that fails leaves its builds queued
    /// (false, and the error is logged) while the parts that committed stand: their builds are
    /// leased and must be sent. Only when every part failed is the error returned.
    pub async fn place(&self, placements: &[Placement]) -> Result<Vec<bool>> {
        if self.kind != DbKind::Postgres || placements.len() <= PLACE_ROWS {
            let lock_rows = self.kind == DbKind::Postgres;
            let mut tx = self.placing.begin().await.map_err(q("begin placements"))?;
            let took = place_many_tx(&mut tx, placements, lock_rows).await?;
            tx.commit().await.map_err(q("commit placements"))?;
            return Ok(took);
        }
        let unique = first_of_each_build(placements);
        let parts = unique.len().div_ceil(PLACE_ROWS).min(PLACE_PARTS);
        // Whole statements per part (`pow2_chunks` would split a part of 250 into six).
        let per_part = unique.len().div_ceil(parts).next_multiple_of(PLACE_ROWS);
        let runs = unique.chunks(per_part).map(|part| async move {
            let own: Vec<Placement> = part.iter().map(|(_, p)| (*p).clone()).collect();
            let took = async {
                let mut tx = self.placing.begin().await.map_err(q("begin placements"))?;
                let took = place_many_tx(&mut tx, &own, true).await?;
                tx.commit().await.map_err(q("commit placements"))?;
                Ok::<_, StoreError>(took)
            };
            (part, took.await)
        });
        let mut took = vec![false; placements.len()];
        let mut first_error = None;
        let mut committed = 0;
        for (part, result) in futures::future::join_all(runs).await {
            match result {
                Ok(part_took) => {
                    committed += 1;
                    for ((at, _), ok) in part.iter().zip(part_took) {
                        took[*at] = ok;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, builds = part.len(),
                        "a part of the placements failed; its builds stay queued");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if committed == 0 => Err(e),
            _ => Ok(took),
        }
    }

    /// The box accepted the assignment: confirm the lease and record the cell.
    pub async fn confirm_lease(
        &self,
        build_id: &str,
        lease_id: &str,
        cell_id: &str,
        warm_start: bool,
        deadline_ms: i64,
    ) -> Result<bool> {
        in_tx!(self, "commit lease confirmation", |tx| {
            confirm_lease_tx(
                tx,
                None,
                build_id,
                lease_id,
                cell_id,
                warm_start,
                deadline_ms,
            )
            .await
        })
    }

    /// placed -> running (also confirms the lease: running implies accepted).
    pub async fn set_running(&self, build_id: &str, lease_id: &str, reason: &str) -> Result<bool> {
        in_tx!(self, "commit running", |tx| {
            set_running_tx(tx, None, build_id, lease_id, reason, 0).await
        })
    }

    /// The box reports the end of the build under `lease_id`: placed|running -> terminal.
    pub async fn finish_build(
        &self,
        build_id: &str,
        lease_id: &str,
        state: BuildState,
        exit_code: i32,
        reason: &str,
    ) -> Result<bool> {
        in_tx!(self, "commit finished build", |tx| {
            let f = Finish {
                state,
                exit_code,
                reason,
                at_ms: 0,
            };
            finish_build_tx(tx, None, build_id, lease_id, f).await
        })
    }

    /// Puts a placed/running build under `lease_id` back in the queue (attempt + 1), ending the
    /// lease as `lease_end` (`expired` or `released`). The log goes on after what is stored: the new
    /// attempt's chunks are stored after a system line saying why the last attempt ended. A build
    /// that has had its last attempt (`with_max_attempts`) fails instead, with the reason.
    /// True when the build changed (re-queued or failed).
    pub async fn requeue(
        &self,
        build_id: &str,
        lease_id: &str,
        lease_end: &str,
        reason: &str,
    ) -> Result<Requeued> {
        let max = self.max_attempts;
        in_tx!(self, "commit re-queue", |tx| {
            requeue_tx(tx, build_id, lease_id, lease_end, reason, max).await
        })
    }

    /// Ends a not-yet-terminal build as `state` (cancelled, timed_out, or failed when it cannot
    /// be run), releasing its lease. Returns the build as it was before, or None when it had
    /// already ended.
    pub async fn end_build(
        &self,
        build_id: &str,
        state: BuildState,
        reason: &str,
    ) -> Result<Option<BuildRow>> {
        in_tx!(self, "commit ended build", |tx| {
            end_build_tx(tx, build_id, state, reason).await
        })
    }

    /// Running builds whose timeout has passed.
    pub async fn overdue_builds(&self, now: i64) -> Result<Vec<BuildRow>> {
        let rows = sqlx::query_as::<_, BuildRecord>(concat!(
            "SELECT ",
            build_columns!(),
            " FROM builds WHERE state = 'running' AND started_at_ms > 0 \
             AND started_at_ms + timeout_secs * 1000 <= $1"
        ))
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(q("select overdue builds"))?;
        rows.into_iter().map(BuildRow::try_from).collect()
    }
}

/// Placements per statement of [`place_many_tx`] (7 bind parameters each at most).
const PLACE_ROWS: usize = 256;

/// PostgreSQL: transactions one placement round is split into at most (see [`Store::place`]).
const PLACE_PARTS: usize = 4;

/// `rows` groups of `pattern`, whose `?` are numbered bind parameters from `$1` on, `per_row` per
/// group (`(?, ?, 0, 'live')` -> `($1, $2, 0, 'live'), ($3, $4, 0, 'live')`).
pub(crate) fn pattern_rows(rows: usize, pattern: &str, per_row: usize) -> String {
    let mut out = String::with_capacity(rows * (pattern.len() + 8));
    let mut n = 0;
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        for ch in pattern.chars() {
            if ch == '?' {
                n += 1;
                out.push_str(&format!("${n}"));
            } else {
                out.push(ch);
            }
        }
    }
    debug_assert_eq!(n, rows * per_row);
    out
}

/// `$first, $first+1, ...`: `n` numbered bind parameters (for an `IN (...)` list).
pub(crate) fn numbered(n: usize, first: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Splits `len` rows into chunks of at most `max` (a power of two), each itself a power of two
/// (13 -> 8, 4, 1): (start, rows) pairs. Multi-row statements over these chunks have at most
/// log2(max) + 1 texts, so a connection's statement cache is not churned by one text per length.
pub(crate) fn pow2_chunks(len: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    debug_assert!(max.is_power_of_two());
    let mut at = 0;
    std::iter::from_fn(move || {
        let left = len - at;
        if left == 0 {
            return None;
        }
        let n = if left >= max {
            max
        } else {
            1 << (usize::BITS - 1 - left.leading_zeros())
        };
        let chunk = (at, n);
        at += n;
        Some(chunk)
    })
}

/// PostgreSQL: locks the `n` builds `ids` (in id order, `FOR UPDATE`) before a multi-row
/// statement changes them. Every writer takes a build before its lease, so two transactions
/// over the same builds wait for each other instead of deadlocking (a join's lock order is the
/// plan's, not the ids').
async fn lock_builds_tx<'a>(
    tx: &mut Transaction<'_, Any>,
    ids: impl IntoIterator<Item = &'a str>,
    n: usize,
    what: &'static str,
) -> Result<()> {
    let sql = format!(
        "SELECT id FROM builds WHERE id IN ({}) ORDER BY id FOR UPDATE",
        pattern_rows(n, "?", 1)
    );
    let mut query = sqlx::query(&sql);
    for id in ids {
        query = query.bind(id);
    }
    query.fetch_all(&mut **tx).await.map_err(q(what))?;
    Ok(())
}

/// Each build's first placement with its index, in build id order (the lock order). A build
/// named twice: only its first placement can take (two VALUES rows joined to one build would
/// update it with either, unpredictably).
fn first_of_each_build(placements: &[Placement]) -> Vec<(usize, &Placement)> {
    let mut seen = std::collections::HashSet::new();
    let mut unique: Vec<(usize, &Placement)> = placements
        .iter()
        .enumerate()
        .filter(|(_, p)| seen.insert(p.build_id.as_str()))
        .collect();
    unique.sort_by(|a, b| a.1.build_id.cmp(&b.1.build_id));
    unique
}

/// Places builds (queued -> placed, a live lease, a transition each) in a few multi-row
/// statements per [`PLACE_ROWS`]: one conditional UPDATE that says which builds were still
/// queued and go to a box still `active` (RETURNING), then the leases and transitions of those.
/// A build another control plane placed (or someone cancelled) meanwhile, or one for a box
/// cordoned, draining, left or forgotten meanwhile, is not touched: false in its place.
///
/// With `lock_rows` (PostgreSQL, where several control planes place from one queue) each chunk
/// first locks its builds in id order, and the chunks go in id order: two rounds over the same
/// queue head wait for each other instead of deadlocking (a join's lock order is the plan's).
pub(crate) async fn place_many_tx(
    tx: &mut Transaction<'_, Any>,
    placements: &[Placement],
    lock_rows: bool,
) -> Result<Vec<bool>> {
    let now = now_ms();
    let unique = first_of_each_build(placements);
    let mut took = vec![false; placements.len()];
    if lock_rows {
        // Shared with other rounds; a box state change waits for it (`BOX_STATE_LOCK`).
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)::text")
            .bind(super::boxes::BOX_STATE_LOCK)
            .execute(&mut **tx)
            .await
            .map_err(q("hold box states for placements"))?;
    }
    for (at, n) in pow2_chunks(unique.len(), PLACE_ROWS) {
        let chunk = &unique[at..at + n];
        if lock_rows {
            let ids = chunk.iter().map(|(_, p)| p.build_id.as_str());
            lock_builds_tx(tx, ids, chunk.len(), "lock builds to place").await?;
        }
        // WITH ... UPDATE ... FROM ... RETURNING: PostgreSQL, and SQLite since 3.35.
        let sql = format!(
            "WITH v(id, box_id, lease_id, message, backend) AS (VALUES {}) \
             UPDATE builds SET state = 'placed', box_id = v.box_id, lease_id = v.lease_id, \
             cell_id = '', updated_at_ms = ${}, message = v.message, backend = v.backend \
             FROM v WHERE builds.id = v.id AND builds.state = 'queued' AND EXISTS \
             (SELECT 1 FROM boxes WHERE boxes.id = v.box_id AND boxes.state = 'active') \
             RETURNING builds.id",
            pattern_rows(chunk.len(), "(?, ?, ?, ?, ?)", 5),
            chunk.len() * 5 + 1
        );
        let mut query = sqlx::query_as::<_, (String,)>(&sql);
        for (_, p) in chunk {
            query = query
                .bind(&p.build_id)
                .bind(&p.box_id)
                .bind(&p.lease_id)
                .bind(format!("placed on box {}", p.box_id))
                .bind(&p.backend);
        }
        let placed = query
            .bind(now)
            .fetch_all(&mut **tx)
            .await
            .map_err(q("update builds to placed"))?;
        let placed: std::collections::HashSet<String> =
            placed.into_iter().map(|(id,)| id).collect();
        let done: Vec<&Placement> = chunk
            .iter()
            .filter(|(_, p)| placed.contains(&p.build_id))
            .map(|(i, p)| {
                took[*i] = true;
                *p
            })
            .collect();
        for (from, m) in pow2_chunks(done.len(), PLACE_ROWS) {
            let done = &done[from..from + m];
            let sql = format!(
                "INSERT INTO leases (id, build_id, box_id, deadline_ms, confirmed, state, \
                 created_at_ms) VALUES {}",
                pattern_rows(m, "(?, ?, ?, ?, 0, 'live', ?)", 5)
            );
            let mut query = sqlx::query(&sql);
            for p in done {
                query = query
                    .bind(&p.lease_id)
                    .bind(&p.build_id)
                    .bind(&p.box_id)
                    .bind(p.deadline_ms)
                    .bind(now);
            }
            query.execute(&mut **tx).await.map_err(q("insert leases"))?;
            let sql = format!(
                "INSERT INTO build_transitions (build_id, state, at_ms, reason) VALUES {}",
                pattern_rows(m, "(?, 'placed', ?, ?)", 3)
            );
            let mut query = sqlx::query(&sql);
            for p in done {
                query = query
                    .bind(&p.build_id)
                    .bind(now)
                    .bind(format!("placed on box {} (lease {})", p.box_id, p.lease_id));
            }
            query
                .execute(&mut **tx)
                .await
                .map_err(q("insert placed transitions"))?;
        }
    }
    Ok(took)
}

/// Ends a build that has not ended yet; None (and nothing written) when it is unknown or over.
/// A build that moved on meanwhile (placed -> running, written by a box session on this or
/// another control plane) is read again and ended from its new state.
pub(crate) async fn end_build_tx(
    tx: &mut Transaction<'_, Any>,
    build_id: &str,
    state: BuildState,
    reason: &str,
) -> Result<Option<BuildRow>> {
    debug_assert!(state.is_terminal());
    let now = now_ms();
    // A build goes through at most queued, placed, running: a few reads cover every move.
    for _ in 0..4 {
        let Some(before) = fetch_build(&mut **tx, build_id).await? else {
            return Ok(None);
        };
        if before.state.is_terminal() {
            return Ok(None);
        }
        let res = sqlx::query(
            "UPDATE builds SET state = $1, message = $2, updated_at_ms = $3 \
             WHERE id = $4 AND state = $5",
        )
        .bind(state.short_name())
        .bind(reason)
        .bind(now)
        .bind(build_id)
        .bind(before.state.short_name())
        .execute(&mut **tx)
        .await
        .map_err(q("update build to ended"))?;
        if res.rows_affected() == 0 {
            continue;
        }
        release_leases_of_build_tx(tx, build_id).await?;
        add_transition(tx, build_id, state, now, reason).await?;
        return Ok(Some(before));
    }
    Ok(None)
}

/// `AND box_id = $n` when the caller names a box, so an update names the box it comes from.
fn box_clause(box_id: Option<&str>, n: usize) -> String {
    match box_id {
        Some(_) => format!(" AND box_id = ${n}"),
        None => String::new(),
    }
}

/// One ACCEPTED of a run that [`confirm_leases_tx`] confirms together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acceptance {
    pub build_id: String,
    pub lease_id: String,
    pub cell_id: String,
    pub warm_start: bool,
}

/// ACCEPTEDs per statement of [`confirm_leases_tx`] (a power of two).
const CONFIRM_ROWS: usize = 256;

/// [`confirm_lease_tx`] for a run of ACCEPTEDs from one box, in two multi-row statements per
/// chunk instead of three statements each: the live leases named (this box's) are confirmed
/// (RETURNING says which took), then those builds record their cell. Returns, per acceptance,
/// whether its lease was confirmed. Distinct builds only (a build named twice is the caller's
/// to split: two VALUES rows joined to one row would apply either).
///
/// Chunks are [`pow2_chunks`]. With `lock_rows` (PostgreSQL) each chunk first
/// locks its builds in id order: every writer of a build and its lease takes the build first.
pub(crate) async fn confirm_leases_tx(
    tx: &mut Transaction<'_, Any>,
    box_id: &str,
    runs: &[Acceptance],
    deadline_ms: i64,
    lock_rows: bool,
) -> Result<Vec<bool>> {
    debug_assert!({
        let mut ids: Vec<&str> = runs.iter().map(|a| a.build_id.as_str()).collect();
        ids.sort_unstable();
        ids.windows(2).all(|w| w[0] != w[1])
    });
    let mut took = vec![false; runs.len()];
    // Chunks in build id order: on PostgreSQL each chunk locks its builds, and two transactions
    // over the same builds must take the locks in one global order (see `lock_builds_tx`).
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|&a, &b| runs[a].build_id.cmp(&runs[b].build_id));
    for (at, n) in pow2_chunks(order.len(), CONFIRM_ROWS) {
        let picked = &order[at..at + n];
        let chunk: Vec<&Acceptance> = picked.iter().map(|&i| &runs[i]).collect();
        if lock_rows {
            let ids = chunk.iter().map(|a| a.build_id.as_str());
            lock_builds_tx(tx, ids, n, "lock accepted builds").await?;
        }
        let sql = format!(
            "WITH v(build_id, lease_id) AS (VALUES {}) \
             UPDATE leases SET confirmed = 1, deadline_ms = ${} FROM v \
             WHERE leases.id = v.lease_id AND leases.build_id = v.build_id \
             AND leases.state = 'live' AND leases.box_id = ${} RETURNING leases.build_id",
            pattern_rows(n, "(?, ?)", 2),
            n * 2 + 1,
            n * 2 + 2
        );
        let mut query = sqlx::query_as::<_, (String,)>(&sql);
        for a in &chunk {
            query = query.bind(&a.build_id).bind(&a.lease_id);
        }
        let confirmed: std::collections::HashSet<String> = query
            .bind(deadline_ms)
            .bind(box_id)
            .fetch_all(&mut **tx)
            .await
            .map_err(q("confirm leases"))?
            .into_iter()
            .map(|(id,)| id)
            .collect();
        let done: Vec<&Acceptance> = picked
            .iter()
            .filter(|&&i| confirmed.contains(&runs[i].build_id))
            .map(|&i| {
                took[i] = true;
                &runs[i]
            })
            .collect();
        // The cells, in as few texts: the same power-of-two split over what took.
        for (from, m) in pow2_chunks(done.len(), CONFIRM_ROWS) {
            let part = &done[from..from + m];
            let sql = format!(
                "WITH v(id, lease_id, cell_id, warm, message) AS (VALUES {}) \
                 UPDATE builds SET cell_id = v.cell_id, warm_start = v.warm, \
                 updated_at_ms = ${}, message = v.message \
                 FROM v WHERE builds.id = v.id AND builds.lease_id = v.lease_id",
                pattern_rows(m, "(?, ?, ?, ?, ?)", 5),
                m * 5 + 1
            );
            let mut query = sqlx::query(&sql);
            for a in part {
                query = query
                    .bind(&a.build_id)
                    .bind(&a.lease_id)
                    .bind(&a.cell_id)
                    .bind(i64::from(a.warm_start))
                    .bind(format!(
                        "accepted in {} cell {}",
                        if a.warm_start { "warm" } else { "cold" },
                        a.cell_id
                    ));
            }
            query
                .bind(now_ms())
                .execute(&mut **tx)
                .await
                .map_err(q("record build cells"))?;
        }
    }
    Ok(took)
}

pub(crate) async fn confirm_lease_tx(
    tx: &mut Transaction<'_, Any>,
    box_id: Option<&str>,
    build_id: &str,
    lease_id: &str,
    cell_id: &str,
    warm_start: bool,
    deadline_ms: i64,
) -> Result<bool> {
    // The build's row first, as every other writer of a build and its leases takes them (end,
    // finish, re-queue: build, then leases): on PostgreSQL an operator's cancel racing a box's
    // accept would otherwise deadlock.
    sqlx::query("UPDATE builds SET updated_at_ms = updated_at_ms WHERE id = $1")
        .bind(build_id)
        .execute(&mut **tx)
        .await
        .map_err(q("lock build"))?;
    let sql = format!(
        "UPDATE leases SET confirmed = 1, deadline_ms = $1 \
         WHERE id = $2 AND build_id = $3 AND state = 'live'{}",
        box_clause(box_id, 4)
    );
    let mut query = sqlx::query(&sql)
        .bind(deadline_ms)
        .bind(lease_id)
        .bind(build_id);
    if let Some(b) = box_id {
        query = query.bind(b);
    }
    let res = query.execute(&mut **tx).await.map_err(q("confirm lease"))?;
    if res.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query(
        "UPDATE builds SET cell_id = $1, warm_start = $2, updated_at_ms = $3, message = $4 \
         WHERE id = $5 AND lease_id = $6",
    )
    .bind(cell_id)
    .bind(i64::from(warm_start))
    .bind(now_ms())
    .bind(format!(
        "accepted in {} cell {cell_id}",
        if warm_start { "warm" } else { "cold" }
    ))
    .bind(build_id)
    .bind(lease_id)
    .execute(&mut **tx)
    .await
    .map_err(q("record build cell"))?;
    Ok(true)
}

/// The time of a change the box reports: the box's own clock (`at_ms`, when the cell started
/// or finished, which may be long before the control plane hears of it after a reconnect) when
/// it is no earlier than the build's last transition and no later than now; else now (0, a
/// skewed clock or a hostile box). As SQL over `builds`, with `$at` and `$now` the two values.
fn reported_time(at: &str, now: &str) -> String {
    format!(
        "CASE WHEN {at} >= COALESCE((SELECT MAX(t.at_ms) FROM build_transitions t \
         WHERE t.build_id = builds.id), 0) AND {at} <= {now} THEN {at} ELSE {now} END"
    )
}

pub(crate) async fn set_running_tx(
    tx: &mut Transaction<'_, Any>,
    box_id: Option<&str>,
    build_id: &str,
    lease_id: &str,
    reason: &str,
    at_ms: i64,
) -> Result<bool> {
    let now = now_ms();
    let when = reported_time("$5", "$1");
    let sql = format!(
        "UPDATE builds SET state = 'running', started_at_ms = {when}, updated_at_ms = {when}, \
         message = $2 WHERE id = $3 AND lease_id = $4 AND state = 'placed'{} \
         RETURNING updated_at_ms",
        box_clause(box_id, 6)
    );
    let mut query = sqlx::query_scalar::<_, i64>(&sql)
        .bind(now)
        .bind(reason)
        .bind(build_id)
        .bind(lease_id)
        .bind(at_ms);
    if let Some(b) = box_id {
        query = query.bind(b);
    }
    let Some(at) = query
        .fetch_optional(&mut **tx)
        .await
        .map_err(q("update build to running"))?
    else {
        return Ok(false);
    };
    sqlx::query("UPDATE leases SET confirmed = 1 WHERE id = $1 AND state = 'live'")
        .bind(lease_id)
        .execute(&mut **tx)
        .await
        .map_err(q("confirm lease"))?;
    add_transition(tx, build_id, BuildState::Running, at, reason).await?;
    Ok(true)
}

/// How a build ended, as its box reports it.
pub(crate) struct Finish<'a> {
    pub state: BuildState,
    pub exit_code: i32,
    pub reason: &'a str,
    /// The box's time of the end (0: unknown); see [`reported_time`].
    pub at_ms: i64,
}

pub(crate) async fn finish_build_tx(
    tx: &mut Transaction<'_, Any>,
    box_id: Option<&str>,
    build_id: &str,
    lease_id: &str,
    f: Finish<'_>,
) -> Result<bool> {
    let Finish {
        state,
        exit_code,
        reason,
        at_ms,
    } = f;
    debug_assert!(state.is_terminal());
    let now = now_ms();
    let when = reported_time("$7", "$4");
    let sql = format!(
        "UPDATE builds SET state = $1, exit_code = $2, message = $3, updated_at_ms = {when} \
         WHERE id = $5 AND lease_id = $6 AND state IN ('placed', 'running'){} \
         RETURNING updated_at_ms",
        box_clause(box_id, 8)
    );
    let mut query = sqlx::query_scalar::<_, i64>(&sql)
        .bind(state.short_name())
        .bind(i64::from(exit_code))
        .bind(reason)
        .bind(now)
        .bind(build_id)
        .bind(lease_id)
        .bind(at_ms);
    if let Some(b) = box_id {
        query = query.bind(b);
    }
    let Some(at) = query
        .fetch_optional(&mut **tx)
        .await
        .map_err(q("update build to finished"))?
    else {
        return Ok(false);
    };
    release_lease_tx(tx, lease_id, "released").await?;
    add_transition(tx, build_id, state, at, reason).await?;
    Ok(true)
}

/// What a re-queue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeued {
    /// Back in the queue for its next attempt.
    Queued,
    /// That was its last attempt: it failed, saying why.
    OutOfAttempts,
    /// It had moved on (finished, cancelled, another lease): nothing changed but the lease.
    Moved,
}

impl Requeued {
    /// Whether the build changed (its watchers should hear of it).
    pub fn changed(self) -> bool {
        self != Requeued::Moved
    }
}

pub(crate) async fn requeue_tx(
    tx: &mut Transaction<'_, Any>,
    build_id: &str,
    lease_id: &str,
    lease_end: &str,
    reason: &str,
    max_attempts: u32,
) -> Result<Requeued> {
    let now = now_ms();
    // The log goes on after everything stored so far: one system line at `next`, the next
    // attempt's chunk n at `next + 1 + n`. Holes the lost attempt left stay holes (followers
    // skip holes below `log_base`): filling them would let a box that sent a far-ahead seq
    // make this transaction write rows for as long as it liked.
    let next: i64 = sqlx::query_scalar(
        "SELECT COALESCE(MAX(seq) + 1, 0) AS next FROM log_chunks WHERE build_id = $1",
    )
    .bind(build_id)
    .fetch_one(&mut **tx)
    .await
    .map_err(q("select next log seq"))?;
    // Conditional on the state and lease it re-queues from, re-checked by the write itself:
    // on PostgreSQL a FINISHED or cancel committed after this transaction began must win, not
    // be overwritten with `queued` (a read-then-write here re-ran finished builds).
    let attempt: Option<i64> = sqlx::query_scalar(
        "UPDATE builds SET state = 'queued', box_id = '', cell_id = '', lease_id = '', \
         started_at_ms = 0, warm_start = 0, attempt = attempt + 1, log_base = $1, \
         updated_at_ms = $2, message = $3 \
         WHERE id = $4 AND lease_id = $5 AND state IN ('placed', 'running') AND attempt < $6 \
         RETURNING attempt",
    )
    .bind(next + 1)
    .bind(now)
    .bind(reason)
    .bind(build_id)
    .bind(lease_id)
    .bind(i64::from(max_attempts))
    .fetch_optional(&mut **tx)
    .await
    .map_err(q("update build to queued"))?;
    let Some(attempt) = attempt else {
        // Its last attempt (the write locks the row on PostgreSQL, so the end below is
        // decided on what this transaction saw): the build fails, saying why, and is never
        // bounced between boxes forever.
        let last: Option<i64> = sqlx::query_scalar(
            "UPDATE builds SET updated_at_ms = $1 \
             WHERE id = $2 AND lease_id = $3 AND state IN ('placed', 'running') \
             RETURNING attempt",
        )
        .bind(now)
        .bind(build_id)
        .bind(lease_id)
        .fetch_optional(&mut **tx)
        .await
        .map_err(q("check last attempt"))?;
        if let Some(n) = last {
            let why = format!("gave up after {n} attempts; the last ended: {reason}");
            insert_log_tx(
                tx,
                build_id,
                next,
                LogStream::System,
                0,
                format!("hive: {why}\n").as_bytes(),
                now,
            )
            .await?;
            release_lease_tx(tx, lease_id, lease_end).await?;
            let ended = end_build_tx(tx, build_id, BuildState::Failed, &why).await?;
            return Ok(if ended.is_some() {
                Requeued::OutOfAttempts
            } else {
                Requeued::Moved
            });
        }
        // The build moved on (finished, cancelled); the lease still must not stay live.
        release_lease_tx(tx, lease_id, lease_end).await?;
        return Ok(Requeued::Moved);
    };
    let line = format!(
        "hive: attempt {} ended ({reason}); build re-queued as attempt {attempt}\n",
        attempt - 1
    );
    insert_log_tx(
        tx,
        build_id,
        next,
        LogStream::System,
        0,
        line.as_bytes(),
        now,
    )
    .await?;
    release_lease_tx(tx, lease_id, lease_end).await?;
    add_transition(tx, build_id, BuildState::Queued, now, reason).await?;
    Ok(Requeued::Queued)
}

pub(crate) async fn insert_build_tx(
    tx: &mut Transaction<'_, Any>,
    b: &BuildRow,
    reason: &str,
) -> Result<()> {
    insert_builds_tx(tx, &[b], reason).await
}

/// Columns of `builds`, hence bind parameters per row of [`insert_builds_tx`].
const BUILD_COLUMNS: usize = 25;

/// Most rows per INSERT statement: 25 columns each stay far below SQLite's 32,766 and
/// PostgreSQL's 65,535 bind parameters.
const INSERT_ROWS: usize = 256;

/// Inserts new builds, each with its first transition, in multi-row statements (a webhook group
/// commit writes a batch in a few round trips rather than two per build). The one write path
/// of a new build.
pub(crate) async fn insert_builds_tx(
    tx: &mut Transaction<'_, Any>,
    builds: &[&BuildRow],
    reason: &str,
) -> Result<()> {
    for chunk in builds.chunks(INSERT_ROWS) {
        let sql = format!(
            "INSERT INTO builds ({}) VALUES {}",
            build_columns!(),
            value_rows(chunk.len(), BUILD_COLUMNS)
        );
        let mut query = sqlx::query(&sql);
        for b in chunk {
            query = bind_build(query, b)?;
        }
        query.execute(&mut **tx).await.map_err(q("insert build"))?;
        let sql = format!(
            "INSERT INTO build_transitions (build_id, state, at_ms, reason) VALUES {}",
            value_rows(chunk.len(), 4)
        );
        let mut query = sqlx::query(&sql);
        for b in chunk {
            query = query
                .bind(&b.id)
                .bind(b.state.short_name())
                .bind(b.created_at_ms)
                .bind(reason);
        }
        query
            .execute(&mut **tx)
            .await
            .map_err(q("insert build transition"))?;
    }
    Ok(())
}

/// A query taking a build's columns in [`build_columns!`] order, with `b`'s bound next.
fn bind_build<'q>(
    query: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    b: &'q BuildRow,
) -> Result<sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>> {
    Ok(query
        .bind(&b.id)
        .bind(&b.project_id)
        .bind(&b.project_name)
        .bind(&b.repo_url)
        .bind(&b.revision)
        .bind(&b.git_ref)
        .bind(b.state.short_name())
        .bind(&b.box_id)
        .bind(&b.cell_id)
        .bind(&b.lease_id)
        .bind(b.created_at_ms)
        .bind(b.updated_at_ms)
        .bind(b.started_at_ms)
        .bind(i64::from(b.exit_code))
        .bind(&b.message)
        .bind(&b.trigger)
        .bind(&b.size_class)
        .bind(&b.private_network)
        .bind(to_json(&b.steps))
        .bind(to_json(&b.env))
        .bind(i64::from(b.timeout_secs))
        .bind(i64::from(b.warm_start))
        .bind(i64::from(b.attempt))
        .bind(&b.backend)
        .bind(to_i64("log_base", b.log_base)?))
}

/// `($1, $2), ($3, $4)` for `rows` rows of `cols` placeholders each.
pub(crate) fn value_rows(rows: usize, cols: usize) -> String {
    let mut out = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for c in 0..cols {
            if c > 0 {
                out.push_str(", ");
            }
            out.push_str(&format!("${}", r * cols + c + 1));
        }
        out.push(')');
    }
    out
}

async fn add_transition(
    tx: &mut Transaction<'_, Any>,
    build_id: &str,
    state: BuildState,
    at_ms: i64,
    reason: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO build_transitions (build_id, state, at_ms, reason) VALUES ($1, $2, $3, $4)",
    )
    .bind(build_id)
    .bind(state.short_name())
    .bind(at_ms)
    .bind(reason)
    .execute(&mut **tx)
    .await
    .map_err(q("insert build transition"))?;
    Ok(())
}
