//! Project secrets as stored: sealed (`crate::secrets`), by project id and name. Names and
//! times are listed; the sealed values are read only to hand a build its secrets.

use super::audit::{insert_audit_tx, Audit};
use super::{q, Result, Store};

/// A secret's sealed value as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SealedSecret {
    pub project_id: String,
    pub name: String,
    pub nonce: String,
    pub sealed: String,
    pub updated_at_ms: i64,
    /// Which builds get it: comma-separated globs (`crate::refglob::ref_allowed`).
    pub refs: String,
}

impl Store {
    /// Stores (or replaces) a sealed secret, with its audit entry.
    pub async fn set_secret(&self, s: &SealedSecret, audit: &Audit) -> Result<()> {
        in_tx!(self, "commit secret", |tx| {
            sqlx::query(
                "INSERT INTO project_secrets (project_id, name, nonce, sealed, updated_at_ms, \
                 refs) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (project_id, name) DO UPDATE \
                 SET nonce = excluded.nonce, sealed = excluded.sealed, \
                 updated_at_ms = excluded.updated_at_ms, refs = excluded.refs",
            )
            .bind(&s.project_id)
            .bind(&s.name)
            .bind(&s.nonce)
            .bind(&s.sealed)
            .bind(s.updated_at_ms)
            .bind(&s.refs)
            .execute(&mut **tx)
            .await
            .map_err(q("upsert secret"))?;
            insert_audit_tx(tx, audit).await
        })
    }

    /// A project's secrets (names and times; the sealed values too, for the caller to drop).
    pub async fn list_secrets(&self, project_id: &str) -> Result<Vec<SealedSecret>> {
        sqlx::query_as::<_, SealedSecret>(
            "SELECT project_id, name, nonce, sealed, updated_at_ms, refs FROM project_secrets \
             WHERE project_id = $1 ORDER BY name",
        )
        .bind(project_id)
        .fetch_all(&self.reads)
        .await
        .map_err(q("list secrets"))
    }

    /// The secrets of several projects at once (one placement round's).
    pub async fn secrets_of(&self, project_ids: &[String]) -> Result<Vec<SealedSecret>> {
        if project_ids.is_empty() {
            return Ok(Vec::new());
        }
        let marks: Vec<String> = (1..=project_ids.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT project_id, name, nonce, sealed, updated_at_ms, refs FROM project_secrets \
             WHERE project_id IN ({})",
            marks.join(", ")
        );
        let mut query = sqlx::query_as::<_, SealedSecret>(&sql);
        for id in project_ids {
            query = query.bind(id);
        }
        query
            .fetch_all(&self.reads)
            .await
            .map_err(q("select secrets"))
    }

    /// How many secrets are stored, in all projects.
    pub async fn count_secrets(&self) -> Result<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM project_secrets")
            .fetch_one(&self.reads)
            .await
            .map_err(q("count secrets"))
    }

    /// Deletes a secret, with its audit entry: false if there was none.
    pub async fn delete_secret(&self, project_id: &str, name: &str, audit: &Audit) -> Result<bool> {
        in_tx!(self, "commit deleted secret", |tx| {
            let res =
                sqlx::query("DELETE FROM project_secrets WHERE project_id = $1 AND name = $2")
                    .bind(project_id)
                    .bind(name)
                    .execute(&mut **tx)
                    .await
                    .map_err(q("delete secret"))?;
            let gone = res.rows_affected() > 0;
            if gone {
                insert_audit_tx(tx, audit).await?;
            }
            Ok::<_, super::StoreError>(gone)
        })
    }
}
