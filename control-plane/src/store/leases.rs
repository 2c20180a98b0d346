//! Placement leases: one live lease per placed build, with a deadline the box's heartbeats push
//! on; a lease that runs out re-queues its build (the scheduler's sweep).

use sqlx::{Any, Transaction};

use super::builds::{numbered, pow2_chunks};
use super::{q, Result, Store};

/// Builds per statement of [`Store::renew_leases`] (a power of two).
const RENEW_ROWS: usize = 256;

/// A live lease.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseRow {
    pub id: String,
    pub build_id: String,
    pub box_id: String,
    pub deadline_ms: i64,
    pub confirmed: bool,
}

impl Store {
    /// Pushes the deadline of `box_id`'s live leases on `build_ids`. Returns the ids among
    /// `build_ids` that have no live lease on this box (the box should stop them).
    pub async fn renew_leases(
        &self,
        box_id: &str,
        build_ids: &[String],
        deadline_ms: i64,
    ) -> Result<Vec<String>> {
        if build_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin().await?;
        let orphans = renew_leases_tx(&mut tx, box_id, build_ids, deadline_ms).await?;
        tx.commit().await.map_err(q("commit lease renewal"))?;
        Ok(orphans)
    }

    /// Gives every live lease at least until `deadline_ms` (at start-up: boxes get one lease
    /// to reconnect before their builds are re-queued for the control plane's own downtime).
    pub async fn extend_live_leases(&self, deadline_ms: i64) -> Result<u64> {
        let res = sqlx::query(
            "UPDATE leases SET deadline_ms = $1 WHERE state = 'live' AND deadline_ms < $1",
        )
        .bind(deadline_ms)
        .execute(&self.pool)
        .await
        .map_err(q("extend live leases"))?;
        Ok(res.rows_affected())
    }

    /// Live leases past their deadline.
    pub async fn expired_leases(&self, now: i64) -> Result<Vec<LeaseRow>> {
        let rows = sqlx::query_as::<_, LeaseRecord>(
            "SELECT id, build_id, box_id, deadline_ms, confirmed FROM leases \
             WHERE state = 'live' AND deadline_ms < $1 ORDER BY deadline_ms",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(q("select expired leases"))?;
        Ok(rows.into_iter().map(LeaseRow::from).collect())
    }

    /// Live leases held by a box.
    pub async fn live_leases(&self, box_id: &str) -> Result<Vec<LeaseRow>> {
        let rows = sqlx::query_as::<_, LeaseRecord>(
            "SELECT id, build_id, box_id, deadline_ms, confirmed FROM leases \
             WHERE state = 'live' AND box_id = $1",
        )
        .bind(box_id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("select live leases"))?;
        Ok(rows.into_iter().map(LeaseRow::from).collect())
    }

    /// Live leases of a build (never more than one: a unique index says so).
    pub async fn live_leases_of_build(&self, build_id: &str) -> Result<Vec<LeaseRow>> {
        let rows = sqlx::query_as::<_, LeaseRecord>(
            "SELECT id, build_id, box_id, deadline_ms, confirmed FROM leases \
             WHERE state = 'live' AND build_id = $1",
        )
        .bind(build_id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("select live leases of build"))?;
        Ok(rows.into_iter().map(LeaseRow::from).collect())
    }
}

/// Ends a live lease as `end` (`released`, `expired`).
pub(crate) async fn release_lease_tx(
    tx: &mut Transaction<'_, Any>,
    lease_id: &str,
    end: &str,
) -> Result<()> {
    sqlx::query("UPDATE leases SET state = $1 WHERE id = $2 AND state = 'live'")
        .bind(end)
        .bind(lease_id)
        .execute(&mut **tx)
        .await
        .map_err(q("end lease"))?;
    Ok(())
}

/// Ends whatever live lease a build holds (the build ended).
pub(crate) async fn release_leases_of_build_tx(
    tx: &mut Transaction<'_, Any>,
    build_id: &str,
) -> Result<()> {
    sqlx::query("UPDATE leases SET state = 'released' WHERE build_id = $1 AND state = 'live'")
        .bind(build_id)
        .execute(&mut **tx)
        .await
        .map_err(q("release lease"))?;
    Ok(())
}

/// A `leases` row as the database holds it.
#[derive(sqlx::FromRow)]
struct LeaseRecord {
    id: String,
    build_id: String,
    box_id: String,
    deadline_ms: i64,
    confirmed: i64,
}

impl From<LeaseRecord> for LeaseRow {
    fn from(r: LeaseRecord) -> Self {
        LeaseRow {
            id: r.id,
            build_id: r.build_id,
            box_id: r.box_id,
            deadline_ms: r.deadline_ms,
            confirmed: r.confirmed != 0,
        }
    }
}

/// [`Store::renew_leases`] inside `tx` (a box session's heartbeat batch, see
/// [`super::BoxBatch::heartbeat`]).
pub(crate) async fn renew_leases_tx(
    tx: &mut Transaction<'_, Any>,
    box_id: &str,
    build_ids: &[String],
    deadline_ms: i64,
) -> Result<Vec<String>> {
    if build_ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids: Vec<&str> = build_ids.iter().map(String::as_str).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut orphans = std::collections::HashSet::new();
    // Two statements per chunk, whatever the number of builds: which of them hold a live
    // lease on this box, then those leases renewed.
    for (at, n) in pow2_chunks(ids.len(), RENEW_ROWS) {
        let chunk = &ids[at..at + n];
        let sql = format!(
            "SELECT id, build_id FROM leases WHERE box_id = $1 AND state = 'live' \
                 AND build_id IN ({})",
            numbered(n, 2)
        );
        let mut query = sqlx::query_as::<_, (String, String)>(&sql).bind(box_id);
        for b in chunk {
            query = query.bind(*b);
        }
        let live = query
            .fetch_all(&mut **tx)
            .await
            .map_err(q("select live leases"))?;
        let held: std::collections::HashSet<&str> = live.iter().map(|(_, b)| b.as_str()).collect();
        orphans.extend(chunk.iter().copied().filter(|b| !held.contains(*b)));
        // By lease id (the primary key) alone, the rest in the CASE: given `state` and
        // `deadline_ms` in the WHERE, SQLite (no statistics) scanned every live lease by
        // its deadline index instead, 3 ms a statement with 10,000 leases.
        for (from, m) in pow2_chunks(live.len(), RENEW_ROWS) {
            let sql = format!(
                "UPDATE leases SET deadline_ms = CASE WHEN state = 'live' \
                     AND deadline_ms < $1 THEN $1 ELSE deadline_ms END WHERE id IN ({})",
                numbered(m, 2)
            );
            let mut query = sqlx::query(&sql).bind(deadline_ms);
            for (id, _) in &live[from..from + m] {
                query = query.bind(id);
            }
            query.execute(&mut **tx).await.map_err(q("renew leases"))?;
        }
    }
    // In the order the box named them, once each.
    Ok(build_ids
        .iter()
        .filter(|b| orphans.remove(b.as_str()))
        .cloned()
        .collect())
}
