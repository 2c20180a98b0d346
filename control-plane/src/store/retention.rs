//! Retention: ended builds (with their transitions, log chunks, ended leases, and the delivery
//! and request ids that made them) and webhook deliveries older than a cutoff are deleted, a bounded batch per transaction so a large
//! purge never holds the write lock for long. Live work is never touched: a build that has not
//! ended stays whatever its age, and so do live leases. Tunnel leases stay forever (a public
//! key is never accepted twice, and that needs the record).

use super::{q, Result, Store};

/// What one purge deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    pub builds: u64,
    pub log_chunks: u64,
    pub deliveries: u64,
}

/// Ended builds whose last change is before `$1`, at most `$2` of them.
const OLD_BUILDS: &str = "SELECT id FROM builds \
     WHERE state IN ('succeeded', 'failed', 'cancelled', 'timed_out') AND updated_at_ms < $1 \
     ORDER BY updated_at_ms LIMIT $2";

impl Store {
    /// Deletes what ended before `cutoff_ms`, `batch` builds per transaction, until none is
    /// left.
    pub async fn purge_before(&self, cutoff_ms: i64, batch: u32) -> Result<Purged> {
        let mut purged = Purged::default();
        let batch = i64::from(batch.max(1));
        loop {
            let (builds, chunks, keys) = in_tx!(self, "commit purge", |tx| {
                let ids: Vec<String> = sqlx::query_scalar(OLD_BUILDS)
                    .bind(cutoff_ms)
                    .bind(batch)
                    .fetch_all(&mut **tx)
                    .await
                    .map_err(q("select builds to purge"))?;
                let (mut chunks, mut keys) = (0, 0);
                for id in &ids {
                    // The build's delivery ids and API request ids go with it, in this
                    // transaction: a retry sees either the build or no key (and makes a new
                    // build), never a key that names a purged build. Their own times do not
                    // matter here (another control plane's clock may be ahead).
                    keys += sqlx::query("DELETE FROM webhook_deliveries WHERE build_id = $1")
                        .bind(id)
                        .execute(&mut **tx)
                        .await
                        .map_err(q("purge the build's deliveries"))?
                        .rows_affected();
                    chunks += sqlx::query("DELETE FROM log_chunks WHERE build_id = $1")
                        .bind(id)
                        .execute(&mut **tx)
                        .await
                        .map_err(q("purge log chunks"))?
                        .rows_affected();
                    sqlx::query("DELETE FROM artifacts WHERE build_id = $1")
                        .bind(id)
                        .execute(&mut **tx)
                        .await
                        .map_err(q("purge artifacts"))?;
                    sqlx::query("DELETE FROM build_transitions WHERE build_id = $1")
                        .bind(id)
                        .execute(&mut **tx)
                        .await
                        .map_err(q("purge transitions"))?;
                    sqlx::query("DELETE FROM leases WHERE build_id = $1 AND state <> 'live'")
                        .bind(id)
                        .execute(&mut **tx)
                        .await
                        .map_err(q("purge leases"))?;
                    sqlx::query(
                        "DELETE FROM builds WHERE id = $1 AND state IN \
                         ('succeeded', 'failed', 'cancelled', 'timed_out')",
                    )
                    .bind(id)
                    .execute(&mut **tx)
                    .await
                    .map_err(q("purge build"))?;
                }
                Ok::<_, super::StoreError>((ids.len() as u64, chunks, keys))
            })?;
            purged.builds += builds;
            purged.log_chunks += chunks;
            purged.deliveries += keys;
            if builds < batch as u64 {
                break;
            }
        }
        // A delivery (or API request id) is kept while its build has not ended: a redelivery or
        // retry of a build still queued or running past the retention must not make another.
        let res = sqlx::query(
            "DELETE FROM webhook_deliveries WHERE at_ms < $1 AND NOT EXISTS (SELECT 1 FROM builds \
             WHERE builds.id = webhook_deliveries.build_id AND builds.state IN \
             ('queued', 'placed', 'running'))",
        )
        .bind(cutoff_ms)
        .execute(&self.pool)
        .await
        .map_err(q("purge deliveries"))?;
        purged.deliveries += res.rows_affected();
        Ok(purged)
    }
}
