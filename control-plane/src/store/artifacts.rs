//! Artefact rows (migration 0013): one per (build, path), what the cell reported and how much
//! of it arrived. The bytes live in files (`crate::artifacts`); `domain::artifacts` writes both.

use super::{checked, q, Result, Store};

/// An artefact as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactRow {
    pub build_id: String,
    pub path: String,
    pub size: u64,
    pub stored_bytes: u64,
    pub complete: bool,
    pub sha256: String,
    pub created_at_ms: i64,
}

#[derive(sqlx::FromRow)]
struct Record {
    build_id: String,
    path: String,
    size: i64,
    stored_bytes: i64,
    complete: i64,
    sha256: String,
    created_at_ms: i64,
}

impl TryFrom<Record> for ArtifactRow {
    type Error = super::StoreError;
    fn try_from(r: Record) -> Result<Self> {
        Ok(ArtifactRow {
            build_id: r.build_id,
            path: r.path,
            size: checked("size", r.size)?,
            stored_bytes: checked("stored_bytes", r.stored_bytes)?,
            complete: r.complete != 0,
            sha256: r.sha256,
            created_at_ms: r.created_at_ms,
        })
    }
}

const COLUMNS: &str = "build_id, path, size, stored_bytes, complete, sha256, created_at_ms";

/// Where a box's artefact chunk may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactTarget {
    /// The build runs on this box under this lease.
    Ok,
    /// Not this box's build, not under this lease, or no longer running.
    NotThisBox,
}

impl Store {
    /// Whether `box_id` may send artefacts of `build_id` under `lease_id` now.
    pub async fn artifact_target(
        &self,
        build_id: &str,
        box_id: &str,
        lease_id: &str,
    ) -> Result<ArtifactTarget> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT id FROM builds WHERE id = $1 AND box_id = $2 AND lease_id = $3 \
             AND state IN ('placed', 'running')",
        )
        .bind(build_id)
        .bind(box_id)
        .bind(lease_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("select build of artifact"))?;
        Ok(if row.is_some() {
            ArtifactTarget::Ok
        } else {
            ArtifactTarget::NotThisBox
        })
    }

    /// The build's artefact count and the sum of their sizes.
    pub async fn artifact_totals(&self, build_id: &str) -> Result<(u64, u64)> {
        let (n, bytes): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM artifacts \
             WHERE build_id = $1",
        )
        .bind(build_id)
        .fetch_one(&self.pool)
        .await
        .map_err(q("count artifacts"))?;
        Ok((checked("count", n)?, checked("bytes", bytes)?))
    }

    /// Records a new artefact (nothing stored yet); false when the row already exists.
    pub async fn insert_artifact(
        &self,
        build_id: &str,
        path: &str,
        size: u64,
        now_ms: i64,
    ) -> Result<bool> {
        let res = sqlx::query(
            "INSERT INTO artifacts (build_id, path, size, stored_bytes, complete, sha256, \
             created_at_ms) VALUES ($1, $2, $3, 0, 0, '', $4) \
             ON CONFLICT (build_id, path) DO NOTHING",
        )
        .bind(build_id)
        .bind(path)
        .bind(super::to_i64("size", size)?)
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .map_err(q("insert artifact"))?;
        Ok(res.rows_affected() == 1)
    }

    /// How much of the artefact arrived; with `sha256` once all of it did.
    pub async fn set_artifact_stored(
        &self,
        build_id: &str,
        path: &str,
        stored: u64,
        sha256: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE artifacts SET stored_bytes = $1, complete = $2, sha256 = $3 \
             WHERE build_id = $4 AND path = $5",
        )
        .bind(super::to_i64("stored_bytes", stored)?)
        .bind(i64::from(sha256.is_some()))
        .bind(sha256.unwrap_or(""))
        .bind(build_id)
        .bind(path)
        .execute(&self.pool)
        .await
        .map_err(q("update artifact"))?;
        Ok(())
    }

    /// Removes an artefact's row (one whose first piece could not be written).
    pub async fn delete_artifact(&self, build_id: &str, path: &str) -> Result<()> {
        sqlx::query("DELETE FROM artifacts WHERE build_id = $1 AND path = $2")
            .bind(build_id)
            .bind(path)
            .execute(&self.pool)
            .await
            .map_err(q("delete artifact"))?;
        Ok(())
    }

    pub async fn artifact(&self, build_id: &str, path: &str) -> Result<Option<ArtifactRow>> {
        let sql = format!("SELECT {COLUMNS} FROM artifacts WHERE build_id = $1 AND path = $2");
        sqlx::query_as::<_, Record>(&sql)
            .bind(build_id)
            .bind(path)
            .fetch_optional(&self.reads)
            .await
            .map_err(q("select artifact"))?
            .map(ArtifactRow::try_from)
            .transpose()
    }

    pub async fn list_artifacts(&self, build_id: &str) -> Result<Vec<ArtifactRow>> {
        let sql = format!("SELECT {COLUMNS} FROM artifacts WHERE build_id = $1 ORDER BY path");
        sqlx::query_as::<_, Record>(&sql)
            .bind(build_id)
            .fetch_all(&self.reads)
            .await
            .map_err(q("list artifacts"))?
            .into_iter()
            .map(ArtifactRow::try_from)
            .collect()
    }

    /// Which of these builds still exist (retention removes the artefact files of the rest).
    pub async fn existing_builds(&self, ids: &[String]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for chunk in ids.chunks(200) {
            let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!("SELECT id FROM builds WHERE id IN ({})", marks.join(", "));
            let mut query = sqlx::query_scalar::<_, String>(&sql);
            for id in chunk {
                query = query.bind(id);
            }
            out.extend(
                query
                    .fetch_all(&self.pool)
                    .await
                    .map_err(q("select existing builds"))?,
            );
        }
        Ok(out)
    }
}
