//! Boxes (the operator's state, pools, the acked seq of their session), their cells as last
//! reported, and [`BoxBatch`]: one transaction over a run of box session messages.

use hive_proto::v1::{BuildState, LogChunk};
use sqlx::{Any, Transaction};

use std::collections::HashMap;

use super::builds::{
    confirm_lease_tx, confirm_leases_tx, fetch_build, finish_build_tx, numbered, pattern_rows,
    pow2_chunks, requeue_tx, set_running_tx, Acceptance, BuildRow, Finish, Requeued,
};
use super::logs::{store_log_tx, LogStored};

/// Cells per statement of a heartbeat's cell writes (a power of two).
const CELL_ROWS: usize = 256;
use super::{checked, q, to_i64, Result, Store, StoreError};

/// A box as stored. `state` is the operator's intent (active, cordoned, draining, left);
/// whether it is connected lives in memory (see `registry::boxes`).
#[derive(Debug, Clone, PartialEq)]
pub struct BoxRow {
    pub id: String,
    pub hostname: String,
    pub state: String,
    pub backend: String,
    pub pools_json: String,
    pub last_heartbeat_ms: i64,
    pub registered_at_ms: i64,
    pub acked_seq: u64,
    /// The session holding the box (`<control plane id>/<session>`), '' when none.
    pub session_owner: String,
}

/// A cell as last reported by its box (all its columns map as they are).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct CellRow {
    pub id: String,
    pub box_id: String,
    pub size_class: String,
    pub state: String,
    pub build_id: String,
    pub updated_at_ms: i64,
}

impl Store {
    pub async fn get_box(&self, id: &str) -> Result<Option<BoxRow>> {
        let row = sqlx::query_as::<_, BoxRecord>(
            "SELECT id, hostname, state, backend, pools_json, last_heartbeat_ms, \
             registered_at_ms, acked_seq, session_owner FROM boxes WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("select box"))?;
        row.map(BoxRow::try_from).transpose()
    }

    /// Of `ids`, the boxes whose operator state is not `active` now (with that state), or that
    /// have no row any more (`left`).
    pub async fn inactive_boxes(&self, ids: &[&str]) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for chunk in ids.chunks(500) {
            let sql = format!(
                "SELECT id, state FROM boxes WHERE id IN ({})",
                super::builds::pattern_rows(chunk.len(), "?", 1)
            );
            let mut query = sqlx::query_as::<_, (String, String)>(&sql);
            for id in chunk {
                query = query.bind(*id);
            }
            let rows = query
                .fetch_all(&self.pool)
                .await
                .map_err(q("select box states"))?;
            for id in chunk {
                match rows.iter().find(|(r, _)| r == id) {
                    Some((_, state)) if state == "active" => {}
                    Some((_, state)) => out.push((id.to_string(), state.clone())),
                    None => out.push((id.to_string(), "left".to_string())),
                }
            }
        }
        Ok(out)
    }

    pub async fn list_boxes(&self) -> Result<Vec<BoxRow>> {
        let rows = sqlx::query_as::<_, BoxRecord>(
            "SELECT id, hostname, state, backend, pools_json, last_heartbeat_ms, \
             registered_at_ms, acked_seq, session_owner FROM boxes ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(q("list boxes"))?;
        rows.into_iter().map(BoxRow::try_from).collect()
    }

    /// How many boxes are stored, read apart from the writer (`/metrics` does not wait behind
    /// a transaction in flight).
    pub async fn count_boxes(&self) -> Result<u64> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM boxes")
            .fetch_one(&self.reads)
            .await
            .map_err(q("count boxes"))?;
        checked("count of boxes", n)
    }

    /// Inserts or refreshes a box on register (keeps its acked seq), and returns the state it
    /// has now: an operator's cordon or drain stays, even one made after the caller read the
    /// box (its `b.state` may be older than that).
    pub async fn upsert_box(&self, b: &BoxRow) -> Result<String> {
        sqlx::query_scalar(
            "INSERT INTO boxes (id, hostname, state, backend, pools_json, last_heartbeat_ms, \
             registered_at_ms, acked_seq, session_owner) VALUES ($1, $2, $3, $4, $5, $6, $7, \
             $8, $9) ON CONFLICT (id) DO UPDATE SET hostname = $2, \
             state = CASE WHEN boxes.state IN ('cordoned', 'draining') THEN boxes.state \
             ELSE $3 END, backend = $4, \
             pools_json = $5, last_heartbeat_ms = $6, registered_at_ms = $7, session_owner = $9 \
             RETURNING state",
        )
        .bind(&b.id)
        .bind(&b.hostname)
        .bind(&b.state)
        .bind(&b.backend)
        .bind(&b.pools_json)
        .bind(b.last_heartbeat_ms)
        .bind(b.registered_at_ms)
        .bind(to_i64("acked_seq", b.acked_seq)?)
        .bind(&b.session_owner)
        .fetch_one(&self.pool)
        .await
        .map_err(q("upsert box"))
    }

    /// Sets the operator state of a box (active, cordoned, draining, left).
    pub async fn set_box_state(&self, id: &str, state: &str) -> Result<bool> {
        in_tx!(self, "commit box state", |tx| set_box_state_tx(
            tx, self.kind, id, state
        )
        .await)
    }

    /// A session ended: its acked seq is saved, and the box shows no pools and no session,
    /// unless a newer session (here or on another control plane) holds the box by now.
    pub async fn end_box_session(
        &self,
        id: &str,
        owner: &str,
        at_ms: i64,
        acked: u64,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE boxes SET last_heartbeat_ms = $1, pools_json = '[]', session_owner = '' \
             WHERE id = $2 AND session_owner = $3",
        )
        .bind(at_ms)
        .bind(id)
        .bind(owner)
        .execute(&mut *tx)
        .await
        .map_err(q("end box session"))?;
        set_acked_tx(&mut tx, id, acked).await?;
        tx.commit().await.map_err(q("commit box session end"))?;
        Ok(())
    }

    pub async fn list_cells(&self, box_id: Option<&str>) -> Result<Vec<CellRow>> {
        let mut sql = String::from(
            "SELECT id, box_id, size_class, state, build_id, updated_at_ms FROM cells",
        );
        if box_id.is_some() {
            sql.push_str(" WHERE box_id = $1");
        }
        sql.push_str(" ORDER BY box_id, id");
        let mut query = sqlx::query_as::<_, CellRow>(&sql);
        if let Some(b) = box_id {
            query = query.bind(b.to_string());
        }
        query.fetch_all(&self.pool).await.map_err(q("list cells"))
    }

    /// Opens one transaction for a run of `box_id`'s session messages (group commit). On
    /// SQLite the sessions of every box share it (see [`BoxGroup`]).
    pub async fn box_batch(&self, box_id: &str) -> Result<BoxBatch> {
        let tx = match self.kind {
            super::DbKind::Postgres => BatchTx::Own(self.begin().await?),
            super::DbKind::Sqlite => {
                let mut g = self.box_group.state.clone().lock_owned().await;
                if g.working {
                    // The last member stopped mid-way (its session ended, or a write failed):
                    // its half is in the transaction, so none of the group may commit.
                    g.poison();
                }
                if g.tx.is_none() {
                    g.tx = Some(self.begin().await?);
                }
                g.working = true;
                BatchTx::Shared {
                    guard: g,
                    group: self.box_group.clone(),
                }
            }
        };
        Ok(BoxBatch {
            tx: Some(tx),
            lock_rows: self.kind == super::DbKind::Postgres,
            box_id: box_id.to_string(),
            log_cap: self.log_cap,
            max_attempts: self.max_attempts,
        })
    }
}

/// One transaction over a run of box session messages that were already waiting on the stream
/// (group commit): build updates and log chunks are applied in stream order, the box's acked seq
/// is raised, and one commit makes them all durable together. Nothing in it may be acknowledged
/// to the box, or announced beyond this control plane's log followers (which get the new chunks
/// just before the commit, `Events::logs_written`), before [`BoxBatch::commit`] returns;
/// dropped uncommitted, it rolls back.
///
/// The updates are conditional on the lease *and* the box, so a current update needs no read
/// of the build first; callers read it ([`BoxBatch::get_build`]) only to explain a miss.
pub struct BoxBatch {
    /// None once committed.
    tx: Option<BatchTx>,
    /// PostgreSQL: multi-row writes lock their builds first, in id order.
    lock_rows: bool,
    box_id: String,
    log_cap: u64,
    max_attempts: u32,
}

/// A batch's transaction: its own (PostgreSQL, where sessions write in parallel), or its turn in
/// the group's (SQLite, one writer: a commit per box session was most of the write cost).
enum BatchTx {
    Own(Transaction<'static, Any>),
    Shared {
        guard: tokio::sync::OwnedMutexGuard<GroupState>,
        group: std::sync::Arc<BoxGroup>,
    },
}

/// SQLite's group commit for box sessions. The first session to store messages begins a
/// transaction; sessions that arrive meanwhile take their turns in it. The first to finish
/// spawns the commit, which waits its turn behind every session already waiting (the mutex is
/// fair), makes them all durable in one go and only then tells each; each acknowledges its
/// box's messages after that. A member that stops half-way (an error, or its session dropped)
/// poisons the group as its batch is dropped: it is rolled back whole, every member hears so,
/// and their boxes send the unacknowledged messages again.
#[derive(Debug, Default)]
pub(crate) struct BoxGroup {
    state: std::sync::Arc<tokio::sync::Mutex<GroupState>>,
}

#[derive(Default)]
pub(crate) struct GroupState {
    tx: Option<Transaction<'static, Any>>,
    /// A member has the transaction and has not finished.
    working: bool,
    /// A commit task is on its way: it takes whatever group it finds.
    committing: bool,
    /// The members that finished, told once the group commits (true) or is rolled back.
    done: Vec<tokio::sync::oneshot::Sender<bool>>,
}

impl std::fmt::Debug for GroupState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupState")
            .field("open", &self.tx.is_some())
            .field("working", &self.working)
            .field("members", &self.done.len())
            .finish()
    }
}

impl GroupState {
    /// Rolls the group back (the dropped transaction) and tells its members.
    fn poison(&mut self) {
        tracing::warn!(
            members = self.done.len(),
            "a box session stopped inside the shared transaction; its group is rolled back"
        );
        self.tx = None;
        self.working = false;
        for m in self.done.drain(..) {
            let _ = m.send(false);
        }
    }
}

impl BoxGroup {
    /// The group's commit, in a task of its own so that no session's end can lose it.
    async fn commit(group: std::sync::Arc<BoxGroup>) {
        let mut g = group.state.clone().lock_owned().await;
        if g.working {
            g.poison();
        }
        g.committing = false;
        let (tx, done) = (g.tx.take(), std::mem::take(&mut g.done));
        // The next group may begin now; its BEGIN waits for this commit (one connection).
        drop(g);
        let Some(tx) = tx else { return };
        let ok = match tx.commit().await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, members = done.len(), "box sessions' group commit failed");
                false
            }
        };
        for m in done {
            let _ = m.send(ok);
        }
    }
}

impl BoxBatch {
    fn tx(&mut self) -> Result<&mut Transaction<'static, Any>> {
        match &mut self.tx {
            Some(BatchTx::Own(tx)) => Ok(tx),
            None => Err(StoreError::GroupCommit("the batch was committed already")),
            Some(BatchTx::Shared { guard: g, .. }) => {
                g.tx.as_mut()
                    .ok_or(StoreError::GroupCommit("the shared transaction is gone"))
            }
        }
    }

    /// The build as this transaction sees it (earlier messages of the batch included).
    pub async fn get_build(&mut self, id: &str) -> Result<Option<BuildRow>> {
        fetch_build(&mut **self.tx()?, id).await
    }

    /// ACCEPTED: see [`Store::confirm_lease`]; false unless the live lease is this box's.
    pub async fn confirm_lease(
        &mut self,
        build_id: &str,
        lease_id: &str,
        cell_id: &str,
        warm_start: bool,
        deadline_ms: i64,
    ) -> Result<bool> {
        let box_id = self.box_id.clone();
        confirm_lease_tx(
            self.tx()?,
            Some(&box_id),
            build_id,
            lease_id,
            cell_id,
            warm_start,
            deadline_ms,
        )
        .await
    }

    /// A run of ACCEPTEDs for distinct builds, in a few statements: per acceptance, whether
    /// its live lease (this box's) was confirmed. See [`confirm_leases_tx`].
    pub async fn confirm_leases(
        &mut self,
        runs: &[Acceptance],
        deadline_ms: i64,
    ) -> Result<Vec<bool>> {
        let (box_id, lock_rows) = (self.box_id.clone(), self.lock_rows);
        confirm_leases_tx(self.tx()?, &box_id, runs, deadline_ms, lock_rows).await
    }

    /// RUNNING: see [`Store::set_running`]; false unless the build is placed on this box.
    pub async fn set_running(
        &mut self,
        build_id: &str,
        lease_id: &str,
        reason: &str,
        at_ms: i64,
    ) -> Result<bool> {
        let box_id = self.box_id.clone();
        set_running_tx(self.tx()?, Some(&box_id), build_id, lease_id, reason, at_ms).await
    }

    /// FINISHED: see [`Store::finish_build`]; false unless the build is on this box.
    pub async fn finish_build(
        &mut self,
        build_id: &str,
        lease_id: &str,
        state: BuildState,
        exit_code: i32,
        reason: &str,
        at_ms: i64,
    ) -> Result<bool> {
        let f = Finish {
            state,
            exit_code,
            reason,
            at_ms,
        };
        let box_id = self.box_id.clone();
        finish_build_tx(self.tx()?, Some(&box_id), build_id, lease_id, f).await
    }

    /// REJECTED and LOST: see [`Store::requeue`] (the caller has checked the lease is this
    /// box's).
    pub async fn requeue(
        &mut self,
        build_id: &str,
        lease_id: &str,
        reason: &str,
    ) -> Result<Requeued> {
        let max_attempts = self.max_attempts;
        requeue_tx(
            self.tx()?,
            build_id,
            lease_id,
            "released",
            reason,
            max_attempts,
        )
        .await
    }

    /// A heartbeat: the leases of the builds the box runs pushed to `deadline_ms` (see
    /// [`Store::renew_leases`]; returns those it holds no live lease for), then its pools and
    /// time seen. Committed with the batch: on SQLite one heartbeat per box every two seconds
    /// was a commit each, and at 1,000 boxes those commits took most of the writer's time.
    pub async fn heartbeat(
        &mut self,
        owner: &str,
        running: &[String],
        deadline_ms: i64,
        cells: &CellsWrite,
        pools_json: &str,
        at_ms: i64,
    ) -> Result<Option<Vec<String>>> {
        let box_id = self.box_id.clone();
        // Leases, then the box's row, then its cells: the order of every other batch of a
        // session (leases before the box row) and of forgetting a box (its row before its
        // cells), so that PostgreSQL's row locks cannot deadlock them.
        let orphans =
            super::leases::renew_leases_tx(self.tx()?, &box_id, running, deadline_ms).await?;
        let res = sqlx::query(
            "UPDATE boxes SET last_heartbeat_ms = $1, pools_json = $2 \
             WHERE id = $3 AND session_owner = $4",
        )
        .bind(at_ms)
        .bind(pools_json)
        .bind(&box_id)
        .bind(owner)
        .execute(&mut **self.tx()?)
        .await
        .map_err(q("update box heartbeat"))?;
        if res.rows_affected() == 0 {
            // A newer session holds the box (here or on another control plane), or it was
            // forgotten: this one writes no cells over that session's.
            return Ok(None);
        }
        write_cells_tx(self.tx()?, &box_id, cells).await?;
        Ok(Some(orphans))
    }

    /// A log chunk: see [`Store::store_log`].
    pub async fn store_log(&mut self, chunk: &LogChunk) -> Result<LogStored> {
        let (box_id, log_cap) = (self.box_id.clone(), self.log_cap);
        store_log_tx(self.tx()?, &box_id, chunk, log_cap).await
    }

    /// Raises the box's acked seq to `acked` and commits everything in one go.
    /// On SQLite: returns once the group that holds them has committed.
    pub async fn commit(mut self, acked: u64) -> Result<()> {
        let box_id = std::mem::take(&mut self.box_id);
        set_acked_tx(self.tx()?, &box_id, acked).await?;
        match self.tx.take() {
            None => Err(StoreError::GroupCommit("the batch was committed already")),
            Some(BatchTx::Own(tx)) => tx.commit().await.map_err(q("commit box messages")),
            Some(BatchTx::Shared {
                guard: mut g,
                group,
            }) => {
                let (told, heard) = tokio::sync::oneshot::channel();
                g.working = false;
                g.done.push(told);
                if !g.committing {
                    g.committing = true;
                    tokio::spawn(BoxGroup::commit(group));
                }
                drop(g);
                match heard.await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(StoreError::GroupCommit(
                        "their group commit failed or another session in it stopped half-way",
                    )),
                    Err(_) => Err(StoreError::GroupCommit("their group commit was dropped")),
                }
            }
        }
    }
}

impl Drop for BoxBatch {
    /// Dropped uncommitted: its own transaction rolls back; a shared one is poisoned at once,
    /// so that no other member's commit carries half of this one's messages.
    fn drop(&mut self) {
        if let Some(BatchTx::Shared { guard, .. }) = &mut self.tx {
            if guard.working {
                guard.poison();
            }
        }
    }
}

/// What a heartbeat changes in a box's `cells` rows.
#[derive(Debug, Default, PartialEq)]
pub enum CellsWrite {
    /// Nothing changed.
    #[default]
    Nothing,
    /// The box's rows become exactly these (a session's first report: rows another session
    /// wrote may be out of date).
    All(Vec<CellRow>),
    /// These rows are new or changed, and the cells of these ids are gone. A busy box changes a
    /// few of its cells between heartbeats; writing them all again was, at 1,000 boxes of 100
    /// cells, 50,000 rows a second.
    Changes {
        upsert: Vec<CellRow>,
        removed: Vec<String>,
    },
}

impl CellsWrite {
    /// From the rows last written (`None`: none by this session) to `now`. A cell whose size
    /// class, state and build are as written is left alone (its `updated_at_ms` says when it
    /// last changed).
    pub fn between(written: Option<&HashMap<String, CellRow>>, now: &[CellRow]) -> CellsWrite {
        let Some(written) = written else {
            return CellsWrite::All(now.to_vec());
        };
        let same = |a: &CellRow, b: &CellRow| {
            a.size_class == b.size_class && a.state == b.state && a.build_id == b.build_id
        };
        let mut seen = std::collections::HashSet::new();
        let mut upsert = Vec::new();
        // The last report of an id wins, as in `All`.
        for c in now.iter().rev() {
            if seen.insert(c.id.as_str()) && !written.get(&c.id).is_some_and(|w| same(w, c)) {
                upsert.push(c.clone());
            }
        }
        upsert.reverse();
        let mut removed: Vec<String> = written
            .keys()
            .filter(|id| !seen.contains(id.as_str()))
            .cloned()
            .collect();
        removed.sort();
        if upsert.is_empty() && removed.is_empty() {
            CellsWrite::Nothing
        } else {
            CellsWrite::Changes { upsert, removed }
        }
    }
}

/// Applies `cells` to `box_id`'s rows.
async fn write_cells_tx(
    tx: &mut Transaction<'_, Any>,
    box_id: &str,
    cells: &CellsWrite,
) -> Result<()> {
    let (rows, removed): (&[CellRow], &[String]) = match cells {
        CellsWrite::Nothing => return Ok(()),
        CellsWrite::All(rows) => {
            sqlx::query("DELETE FROM cells WHERE box_id = $1")
                .bind(box_id)
                .execute(&mut **tx)
                .await
                .map_err(q("delete cells"))?;
            (rows, &[])
        }
        CellsWrite::Changes { upsert, removed } => (upsert, removed),
    };
    for (at, n) in pow2_chunks(removed.len(), CELL_ROWS) {
        let sql = format!(
            "DELETE FROM cells WHERE box_id = $1 AND id IN ({})",
            numbered(n, 2)
        );
        let mut query = sqlx::query(&sql).bind(box_id);
        for id in &removed[at..at + n] {
            query = query.bind(id);
        }
        query
            .execute(&mut **tx)
            .await
            .map_err(q("delete gone cells"))?;
    }
    // A cell id named twice: the last report of it, as one insert after another would
    // leave it (and one multi-row upsert may not touch a row twice). Another box's cell of the
    // same id is left as it is (a box cannot take over another's rows).
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (i, c) in rows.iter().enumerate() {
        last.insert(c.id.as_str(), i);
    }
    let rows: Vec<&CellRow> = rows
        .iter()
        .enumerate()
        .filter(|(i, c)| last.get(c.id.as_str()) == Some(i))
        .map(|(_, c)| c)
        .collect();
    for (at, n) in pow2_chunks(rows.len(), CELL_ROWS) {
        let sql = format!(
            "INSERT INTO cells (id, box_id, size_class, state, build_id, updated_at_ms) \
             VALUES {} ON CONFLICT (id) DO UPDATE SET \
             size_class = excluded.size_class, state = excluded.state, \
             build_id = excluded.build_id, updated_at_ms = excluded.updated_at_ms \
             WHERE cells.box_id = excluded.box_id",
            pattern_rows(n, "(?, ?, ?, ?, ?, ?)", 6)
        );
        let mut query = sqlx::query(&sql);
        for c in &rows[at..at + n] {
            query = query
                .bind(&c.id)
                .bind(box_id)
                .bind(&c.size_class)
                .bind(&c.state)
                .bind(&c.build_id)
                .bind(c.updated_at_ms);
        }
        query.execute(&mut **tx).await.map_err(q("insert cells"))?;
    }
    Ok(())
}

pub(crate) async fn set_acked_tx(
    tx: &mut Transaction<'_, Any>,
    box_id: &str,
    acked: u64,
) -> Result<()> {
    sqlx::query("UPDATE boxes SET acked_seq = $1 WHERE id = $2 AND acked_seq < $1")
        .bind(to_i64("acked_seq", acked)?)
        .bind(box_id)
        .execute(&mut **tx)
        .await
        .map_err(q("update box acked seq"))?;
    Ok(())
}

/// A `boxes` row as the database holds it.
#[derive(sqlx::FromRow)]
struct BoxRecord {
    id: String,
    hostname: String,
    state: String,
    backend: String,
    pools_json: String,
    last_heartbeat_ms: i64,
    registered_at_ms: i64,
    acked_seq: i64,
    session_owner: String,
}

impl TryFrom<BoxRecord> for BoxRow {
    type Error = StoreError;

    fn try_from(r: BoxRecord) -> Result<Self> {
        Ok(BoxRow {
            acked_seq: checked("acked_seq", r.acked_seq)?,
            id: r.id,
            hostname: r.hostname,
            state: r.state,
            backend: r.backend,
            pools_json: r.pools_json,
            last_heartbeat_ms: r.last_heartbeat_ms,
            registered_at_ms: r.registered_at_ms,
            session_owner: r.session_owner,
        })
    }
}

/// The PostgreSQL advisory lock that orders box state changes against placement rounds: a round
/// holds it shared from before its placements' statement to its commit, a state change holds it
/// alone. So a cordon (drain, forget) waits for the rounds in flight, and every round after it
/// reads the new state: once `hivectl box cordon` has answered, no placement onto the box
/// commits, whichever control plane places. (A round's statement places only onto boxes the
/// store has active; without this lock one that began just before a cordon's commit could
/// still commit after it.) SQLite runs one writer at a time, which orders them already.
pub const BOX_STATE_LOCK: i64 = 0x6869_7665_6278; // "hiveb" "x"

/// On PostgreSQL, waits until no placement round is in flight and holds new ones off until
/// this transaction ends ([`BOX_STATE_LOCK`]); nothing on SQLite.
pub(crate) async fn hold_off_placements_tx(
    tx: &mut Transaction<'_, Any>,
    kind: super::DbKind,
) -> Result<()> {
    if kind == super::DbKind::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock($1)::text")
            .bind(BOX_STATE_LOCK)
            .execute(&mut **tx)
            .await
            .map_err(q("wait for placement rounds"))?;
    }
    Ok(())
}

/// Sets the operator state of a box; false when there is no such box.
pub(crate) async fn set_box_state_tx(
    tx: &mut Transaction<'_, Any>,
    kind: super::DbKind,
    id: &str,
    state: &str,
) -> Result<bool> {
    hold_off_placements_tx(tx, kind).await?;
    let res = sqlx::query("UPDATE boxes SET state = $1 WHERE id = $2")
        .bind(state)
        .bind(id)
        .execute(&mut **tx)
        .await
        .map_err(q("update box state"))?;
    Ok(res.rows_affected() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(id: &str, state: &str, build: &str, at: i64) -> CellRow {
        CellRow {
            id: id.into(),
            box_id: "b".into(),
            size_class: "small".into(),
            state: state.into(),
            build_id: build.into(),
            updated_at_ms: at,
        }
    }

    #[test]
    fn a_heartbeat_writes_only_the_cells_that_changed() {
        let now = vec![cell("a", "warm", "", 1), cell("b", "warm", "", 1)];
        // A session's first report is written whole.
        assert_eq!(
            CellsWrite::between(None, &now),
            CellsWrite::All(now.clone())
        );
        let written: HashMap<String, CellRow> =
            now.iter().map(|c| (c.id.clone(), c.clone())).collect();
        // The same cells (a later time only): nothing.
        let later = vec![cell("b", "warm", "", 9), cell("a", "warm", "", 9)];
        assert_eq!(
            CellsWrite::between(Some(&written), &later),
            CellsWrite::Nothing
        );
        // a changed, b gone, c new; c named twice: its last report.
        let next = vec![
            cell("a", "busy", "x", 5),
            cell("c", "warm", "", 5),
            cell("c", "booting", "", 6),
        ];
        assert_eq!(
            CellsWrite::between(Some(&written), &next),
            CellsWrite::Changes {
                upsert: vec![cell("a", "busy", "x", 5), cell("c", "booting", "", 6)],
                removed: vec!["b".into()],
            }
        );
    }
}
