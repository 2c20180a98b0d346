//! Placement leases: one live lease per placed build, with a deadline the box's heartbeats push
//! on; a lease that runs out re-queues its build (the scheduler's sweep).

use sqlx::{Any, Transaction};

use super::{q, Result, Store};

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
        let mut orphans = Vec::new();
        for b in build_ids {
            let res = sqlx::query(
                "UPDATE leases SET deadline_ms = $1 \
                 WHERE box_id = $2 AND build_id = $3 AND state = 'live' AND deadline_ms < $1",
            )
            .bind(deadline_ms)
            .bind(box_id)
            .bind(b)
            .execute(&mut *tx)
            .await
            .map_err(q("renew lease"))?;
            if res.rows_affected() == 0 {
                let live = sqlx::query(
                    "SELECT id FROM leases WHERE box_id = $1 AND build_id = $2 AND state = 'live'",
                )
                .bind(box_id)
                .bind(b)
                .fetch_optional(&mut *tx)
                .await
                .map_err(q("select lease"))?;
                if live.is_none() {
                    orphans.push(b.clone());
                }
            }
        }
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
