//! Webhook deliveries: each `X-GitHub-Delivery` id once per project, with the build it made
//! (written in the build's own transaction), so a redelivery gets the same answer and no second
//! build. The id is scoped to its project: one push to a repository several projects build is
//! one delivery for each, and a sender who knows one project's delivery ids cannot use them to
//! suppress another project's builds.
//!
//! [`Store::record_deliveries`] writes a group of deliveries (the webhook's group commit, see
//! `domain::submit`) in one transaction with multi-row statements; [`Store::record_delivery`]
//! writes one, and is what a group falls back to, item by item, when the group's transaction
//! fails. [`Store::record_deliveries_placing`] also places the group's new builds in the same
//! transaction when no older build of their size class is queued (a webhook's build placed at
//! once).

use std::collections::{HashMap, HashSet};

use super::builds::{
    build_columns, insert_build_tx, insert_builds_tx, place_many_tx, value_rows, BuildRow,
    Placement,
};
use super::{now_ms, q, to_i64, to_json, DbKind, Result, Store};
use sqlx::Row;

/// What a webhook delivery turned into.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// First time this delivery id was seen; the build (if any) was inserted with it.
    New,
    /// Seen before: the stored answer.
    Duplicate { build_id: String, outcome: String },
}

/// One delivery of a group to record: what [`Store::record_delivery`] takes, as a value.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub delivery_id: String,
    pub project_id: String,
    pub build: Option<BuildRow>,
    /// `build`, or why there is none.
    pub outcome: String,
}

/// Most deliveries per INSERT statement (5 bind parameters each).
const INSERT_ROWS: usize = 256;

impl Store {
    /// Records a webhook delivery for one project and, in the same transaction, its build (if
    /// any). A delivery id this project has seen before changes nothing and returns the stored
    /// answer.
    pub async fn record_delivery(
        &self,
        delivery_id: &str,
        project_id: &str,
        build: Option<&BuildRow>,
        outcome: &str,
    ) -> Result<Delivery> {
        let mut tx = self.begin().await?;
        let res = sqlx::query(
            "INSERT INTO webhook_deliveries (delivery_id, project_id, build_id, outcome, at_ms) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (project_id, delivery_id) DO NOTHING",
        )
        .bind(delivery_id)
        .bind(project_id)
        .bind(build.map(|b| b.id.as_str()).unwrap_or(""))
        .bind(outcome)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(q("insert webhook delivery"))?;
        if res.rows_affected() == 0 {
            tx.rollback().await.map_err(q("rollback"))?;
            let (build_id, outcome): (String, String) = sqlx::query_as(
                "SELECT build_id, outcome FROM webhook_deliveries \
                 WHERE project_id = $1 AND delivery_id = $2",
            )
            .bind(project_id)
            .bind(delivery_id)
            .fetch_one(&self.pool)
            .await
            .map_err(q("select webhook delivery"))?;
            return Ok(Delivery::Duplicate { build_id, outcome });
        }
        if let Some(build) = build {
            insert_build_tx(&mut tx, build, WEBHOOK_REASON).await?;
        }
        tx.commit().await.map_err(q("commit webhook delivery"))?;
        Ok(Delivery::New)
    }

    /// Records a group of deliveries, and the builds of the new ones, in one transaction: the
    /// answer of each item, in order, as [`Store::record_delivery`] would give it had they been
    /// recorded one after another (a copy of an earlier item is its duplicate). Any error fails
    /// the whole group and writes nothing; the caller may then record the items one by one.
    pub async fn record_deliveries(&self, items: &[NewDelivery]) -> Result<Vec<Delivery>> {
        Ok(self.record_deliveries_placing(items, &[]).await?.0)
    }

    /// [`Store::record_deliveries`], and in the same transaction `placements` of the group's
    /// builds (a webhook's build placed at once, `domain::submit`): the answers, and per
    /// placement whether it took, or None when it was not tried because a build of its size
    /// class not of this group is queued (so no older build of its class is passed over), or
    /// the queue is longer than the head it reads (see `place_at_once_tx`). A placement takes
    /// only for a build this group inserted and only as [`Store::place`] takes one (the build
    /// still queued, its box `active`); otherwise its build stays queued for the scheduler.
    /// With placements the group is written statement by statement on PostgreSQL too (as on
    /// SQLite), on a pool connection, not as the one statement on the kept connection.
    pub async fn record_deliveries_placing(
        &self,
        items: &[NewDelivery],
        placements: &[Placement],
    ) -> Result<(Vec<Delivery>, Vec<Option<bool>>)> {
        // The first of each (project, delivery id) is the one written; copies answer after it.
        let mut first: HashMap<(&str, &str), usize> = HashMap::with_capacity(items.len());
        let mut leaders = Vec::with_capacity(items.len());
        for (i, it) in items.iter().enumerate() {
            first
                .entry((it.project_id.as_str(), it.delivery_id.as_str()))
                .or_insert_with(|| {
                    leaders.push(i);
                    i
                });
        }
        // One lock order for every group: two groups committing at once (control planes that
        // share a PostgreSQL database) that share deliveries wait for each other instead of
        // deadlocking (tests/store.rs has the race). Byte order, as the one-statement path's
        // `COLLATE "C"`, so a placing group (statement by statement) and a plain one agree.
        leaders.sort_by(|&a, &b| {
            (&items[a].project_id, &items[a].delivery_id)
                .cmp(&(&items[b].project_id, &items[b].delivery_id))
        });

        let (answers, took) = match self.kind {
            DbKind::Postgres if placements.is_empty() => {
                (self.record_leaders_pg(items, &leaders).await?, Vec::new())
            }
            _ => self.record_leaders_tx(items, &leaders, placements).await?,
        };
        let answers: HashMap<usize, Delivery> = leaders.iter().copied().zip(answers).collect();
        let answers = items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                let lead = first[&(it.project_id.as_str(), it.delivery_id.as_str())];
                match &answers[&lead] {
                    Delivery::New if lead != i => {
                        let l = &items[lead];
                        Delivery::Duplicate {
                            build_id: l.build.as_ref().map(|b| b.id.clone()).unwrap_or_default(),
                            outcome: l.outcome.clone(),
                        }
                    }
                    answer => answer.clone(),
                }
            })
            .collect();
        Ok((answers, took))
    }

    /// SQLite: the group in one transaction, a few multi-row statements (round trips are
    /// in-process; the commit is the cost). The answers of `leaders`, in their order, and which
    /// of `placements` took (both stores: see [`Store::record_deliveries_placing`]).
    async fn record_leaders_tx(
        &self,
        items: &[NewDelivery],
        leaders: &[usize],
        placements: &[Placement],
    ) -> Result<(Vec<Delivery>, Vec<Option<bool>>)> {
        let now = now_ms();
        let mut tx = self.begin().await?;
        let mut inserted: HashSet<(String, String)> = HashSet::with_capacity(leaders.len());
        for chunk in leaders.chunks(INSERT_ROWS) {
            let sql = format!(
                "INSERT INTO webhook_deliveries (delivery_id, project_id, build_id, outcome, at_ms) \
                 VALUES {} ON CONFLICT (project_id, delivery_id) DO NOTHING \
                 RETURNING project_id, delivery_id",
                value_rows(chunk.len(), 5)
            );
            let mut query = sqlx::query_as::<_, (String, String)>(&sql);
            for &i in chunk {
                let it = &items[i];
                query = query
                    .bind(&it.delivery_id)
                    .bind(&it.project_id)
                    .bind(it.build.as_ref().map(|b| b.id.as_str()).unwrap_or(""))
                    .bind(&it.outcome)
                    .bind(now);
            }
            inserted.extend(
                query
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(q("insert webhook deliveries"))?,
            );
        }
        let mut answers = Vec::with_capacity(leaders.len());
        let mut builds = Vec::new();
        for &i in leaders {
            let it = &items[i];
            if inserted.contains(&(it.project_id.clone(), it.delivery_id.clone())) {
                builds.extend(it.build.as_ref());
                answers.push(Delivery::New);
            } else {
                answers.push(stored_answer(&mut tx, it).await?);
            }
        }
        insert_builds_tx(&mut tx, &builds, WEBHOOK_REASON).await?;
        let took = place_at_once_tx(&mut tx, &builds, placements, self.kind).await?;
        tx.commit().await.map_err(q("commit webhook deliveries"))?;
        Ok((answers, took))
    }

    /// PostgreSQL: the group as one statement (deliveries, their new builds and the builds'
    /// first transitions in data-modifying CTEs), so one round trip makes it durable instead of
    /// five (BEGIN, three INSERTs, COMMIT). The rows go as two JSON parameters, so the
    /// statement's text is the same for every group and each connection prepares it once.
    ///
    /// The statement runs on a connection the store keeps between groups (`intake_conn`): one
    /// taken from the pool for each group cost two more round trips on the group's path, the
    /// pool's test before it is handed out and its test as it comes back (the next group
    /// waited for that one too). Kept, it is not tested: one idle longer than
    /// [`INTAKE_CONN_IDLE`] goes back to the pool first, and a group that fails on it (or gets
    /// no answer in [`INTAKE_STATEMENT_LIMIT`]) is tried once more on a tested connection, so
    /// a restarted server or a dropped connection costs no delivery. A second group at once
    /// (another caller) uses the pool. The answers of `leaders`, in their order.
    async fn record_leaders_pg(
        &self,
        items: &[NewDelivery],
        leaders: &[usize],
    ) -> Result<Vec<Delivery>> {
        const SQL: &str = concat!(
            "WITH d AS (SELECT * FROM json_to_recordset($1::json) AS x \
               (delivery_id TEXT, project_id TEXT, build_id TEXT, outcome TEXT)), \
             ins AS (INSERT INTO webhook_deliveries \
                     (delivery_id, project_id, build_id, outcome, at_ms) \
                     SELECT delivery_id, project_id, build_id, outcome, $3 FROM d \
                     ORDER BY project_id COLLATE \"C\", delivery_id COLLATE \"C\" \
                     ON CONFLICT (project_id, delivery_id) DO NOTHING \
                     RETURNING project_id, delivery_id, build_id), \
             b AS (SELECT * FROM json_to_recordset($2::json) AS y \
               (id TEXT, project_id TEXT, project_name TEXT, repo_url TEXT, revision TEXT, \
                git_ref TEXT, state TEXT, box_id TEXT, cell_id TEXT, lease_id TEXT, \
                created_at_ms BIGINT, updated_at_ms BIGINT, started_at_ms BIGINT, \
                exit_code BIGINT, message TEXT, trigger_source TEXT, size_class TEXT, \
                private_network TEXT, steps_json TEXT, env_json TEXT, timeout_secs BIGINT, \
                warm_start BIGINT, attempt BIGINT, backend TEXT, log_base BIGINT)), \
             nb AS (INSERT INTO builds (",
            build_columns!(),
            ") SELECT b.* FROM b JOIN ins ON ins.build_id = b.id \
                    RETURNING id, state, created_at_ms), \
             tr AS (INSERT INTO build_transitions (build_id, state, at_ms, reason) \
                    SELECT id, state, created_at_ms, $4 FROM nb) \
             SELECT project_id, delivery_id FROM ins"
        );
        let now = now_ms();
        let mut inserted: HashSet<(String, String)> = HashSet::with_capacity(leaders.len());
        for chunk in leaders.chunks(INSERT_ROWS) {
            let deliveries: Vec<serde_json::Value> = chunk
                .iter()
                .map(|&i| {
                    let it = &items[i];
                    serde_json::json!({
                        "delivery_id": it.delivery_id,
                        "project_id": it.project_id,
                        "build_id": it.build.as_ref().map(|b| b.id.as_str()).unwrap_or(""),
                        "outcome": it.outcome,
                    })
                })
                .collect();
            let builds = chunk
                .iter()
                .filter_map(|&i| items[i].build.as_ref())
                .map(build_json)
                .collect::<Result<Vec<_>>>()?;
            let op = "insert webhook deliveries and their builds";
            let (deliveries, builds) = (
                serde_json::Value::Array(deliveries).to_string(),
                serde_json::Value::Array(builds).to_string(),
            );
            let query = || {
                sqlx::query(SQL)
                    .bind(deliveries.as_str())
                    .bind(builds.as_str())
                    .bind(now)
                    .bind(WEBHOOK_REASON)
            };
            let rows = match self.intake_conn.try_lock() {
                Ok(mut held) => {
                    // A connection idle for a while goes back to the pool, which tests it
                    // before handing it out again: the server may have restarted, or a proxy
                    // dropped the connection, meanwhile.
                    let kept = held
                        .take()
                        .filter(|(_, used)| used.elapsed() < INTAKE_CONN_IDLE)
                        .map(|(c, _)| c);
                    let reused = kept.is_some();
                    let mut conn = match kept {
                        Some(c) => c,
                        None => self.pool.acquire().await.map_err(q("acquire connection"))?,
                    };
                    let ran =
                        tokio::time::timeout(INTAKE_STATEMENT_LIMIT, query().fetch_all(&mut *conn))
                            .await;
                    match ran {
                        Ok(Ok(rows)) => {
                            if !self.closing.load(std::sync::atomic::Ordering::SeqCst) {
                                *held = Some((conn, std::time::Instant::now()));
                            }
                            rows
                        }
                        Ok(Err(e)) if !reused => return Err(q(op)(e)),
                        // The kept connection failed or hung: it goes back to the pool (which
                        // drops it if it is broken), not to `held`, and the group is tried once
                        // more on a tested one. What a first run stored, the second finds
                        // stored (`ON CONFLICT DO NOTHING`) and answers as stored before.
                        failed => {
                            drop(conn);
                            let error = match failed {
                                Ok(Err(e)) => e.to_string(),
                                _ => format!("no answer in {INTAKE_STATEMENT_LIMIT:?}"),
                            };
                            tracing::warn!(%error, reused,
                                "webhook group statement failed on the kept connection; once more on another");
                            query().fetch_all(&self.pool).await.map_err(q(op))?
                        }
                    }
                }
                Err(_) => query().fetch_all(&self.pool).await.map_err(q(op))?,
            };
            for row in rows {
                inserted.insert((
                    row.try_get(0).map_err(q(op))?,
                    row.try_get(1).map_err(q(op))?,
                ));
            }
        }
        let mut answers = Vec::with_capacity(leaders.len());
        for &i in leaders {
            let it = &items[i];
            if inserted.contains(&(it.project_id.clone(), it.delivery_id.clone())) {
                answers.push(Delivery::New);
            } else {
                let mut conn = self.pool.acquire().await.map_err(q("acquire connection"))?;
                answers.push(stored_answer(&mut conn, it).await?);
            }
        }
        Ok(answers)
    }
}

/// Queued builds read past the group's own to see which size classes wait
/// (`place_at_once_tx`): a queue longer than that places nothing at once.
const AT_ONCE_HEAD: usize = 64;

/// Places those of `placements` whose builds are in `new` (inserted by this transaction) and
/// whose size class has no other build queued: an older queued build of its class leaves it
/// queued for the scheduler, which keeps each class's order, as a round does (a round lets a
/// class with room pass one without). Per placement, whether it took, or None when not tried.
/// The head of the queue is read (index on state, created at, id), [`AT_ONCE_HEAD`] rows past
/// the group's own; when the queue is longer than that, nothing is tried.
async fn place_at_once_tx(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    new: &[&BuildRow],
    placements: &[Placement],
    kind: DbKind,
) -> Result<Vec<Option<bool>>> {
    let mut took = vec![None; placements.len()];
    let class_of: HashMap<&str, &str> = new
        .iter()
        .map(|b| (b.id.as_str(), b.size_class.as_str()))
        .collect();
    let mine: Vec<usize> = (0..placements.len())
        .filter(|&i| class_of.contains_key(placements[i].build_id.as_str()))
        .collect();
    if mine.is_empty() {
        // Copies of earlier deliveries only: their builds are not this group's to place.
        return Ok(placements.iter().map(|_| Some(false)).collect());
    }
    // One row past what is allowed: more rows than `limit` means the queue goes on.
    let limit = class_of.len() + AT_ONCE_HEAD;
    let head: Vec<(String, String)> = sqlx::query_as(
        "SELECT id, size_class FROM builds WHERE state = 'queued' \
         ORDER BY created_at_ms, id LIMIT $1",
    )
    .bind(to_i64("queue head", limit + 1)?)
    .fetch_all(&mut **tx)
    .await
    .map_err(q("read the head of the queue"))?;
    if head.len() > limit {
        return Ok(took);
    }
    let waiting: HashSet<&str> = head
        .iter()
        .filter(|(id, _)| !class_of.contains_key(id.as_str()))
        .map(|(_, class)| class.as_str())
        .collect();
    let tried: Vec<usize> = mine
        .into_iter()
        .filter(|&i| !waiting.contains(class_of[placements[i].build_id.as_str()]))
        .collect();
    for (i, t) in took.iter_mut().enumerate() {
        if !class_of.contains_key(placements[i].build_id.as_str()) {
            *t = Some(false);
        }
    }
    if tried.is_empty() {
        return Ok(took);
    }
    let own: Vec<Placement> = tried.iter().map(|&i| placements[i].clone()).collect();
    let placed = place_many_tx(tx, &own, kind == DbKind::Postgres).await?;
    for (&i, ok) in tried.iter().zip(placed) {
        took[i] = Some(ok);
    }
    Ok(took)
}

/// A build's columns as a JSON object for PostgreSQL's `json_to_recordset`.
fn build_json(b: &BuildRow) -> Result<serde_json::Value> {
    Ok(serde_json::json!({
        "id": b.id,
        "project_id": b.project_id,
        "project_name": b.project_name,
        "repo_url": b.repo_url,
        "revision": b.revision,
        "git_ref": b.git_ref,
        "state": b.state.short_name(),
        "box_id": b.box_id,
        "cell_id": b.cell_id,
        "lease_id": b.lease_id,
        "created_at_ms": b.created_at_ms,
        "updated_at_ms": b.updated_at_ms,
        "started_at_ms": b.started_at_ms,
        "exit_code": i64::from(b.exit_code),
        "message": b.message,
        "trigger_source": b.trigger,
        "size_class": b.size_class,
        "private_network": b.private_network,
        "steps_json": to_json(&b.steps),
        "env_json": to_json(&b.env),
        "timeout_secs": i64::from(b.timeout_secs),
        "warm_start": i64::from(b.warm_start),
        "attempt": i64::from(b.attempt),
        "backend": b.backend,
        "log_base": to_i64("log_base", b.log_base)?,
    }))
}

/// PostgreSQL: a connection the webhook group commit kept longer idle than this goes back to
/// the pool (to be tested) instead of being used.
const INTAKE_CONN_IDLE: std::time::Duration = std::time::Duration::from_secs(5);
/// PostgreSQL: how long a group's statement may take on the kept connection before the group
/// is tried on another (a peer that vanished without a reset leaves a socket silent for
/// minutes; the pool's test before use bounded that, the kept connection is not tested).
const INTAKE_STATEMENT_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The transition reason of a build a webhook made.
const WEBHOOK_REASON: &str = "webhook push";

/// The stored answer of a delivery seen before.
async fn stored_answer(conn: &mut sqlx::AnyConnection, it: &NewDelivery) -> Result<Delivery> {
    let (build_id, outcome): (String, String) = sqlx::query_as(
        "SELECT build_id, outcome FROM webhook_deliveries \
         WHERE project_id = $1 AND delivery_id = $2",
    )
    .bind(&it.project_id)
    .bind(&it.delivery_id)
    .fetch_one(conn)
    .await
    .map_err(q("select webhook delivery"))?;
    Ok(Delivery::Duplicate { build_id, outcome })
}
