//! Forge credentials per project and the outbox of commit statuses (issue 14). Credentials live
//! in `project_forges`, apart from the `projects` row, sealed (`crate::secrets`); no API
//! returns them. The outbox, `forge_statuses`, is written by a database trigger on
//! `build_transitions` in the transaction of each state change (see the migration
//! `0012_forge_statuses.sql`), and drained by the `forge::outbox` task: rows are claimed with a
//! conditional update, so two control planes never both send one, and a commit's statuses go
//! out one at a time in the order they were written.

use super::audit::{insert_audit_tx, Audit};
use super::{q, Result, Store};

/// A project's forge and its sealed credentials, as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ForgeRow {
    pub project_id: String,
    /// `github`, `gitlab` or `gitea`.
    pub kind: String,
    /// The API base URL, without a trailing `/`.
    pub api_url: String,
    /// The repository on the forge: `owner/repo` (GitLab: `group/.../project`).
    pub repo_path: String,
    /// The token, sealed (both empty with a GitHub App).
    pub token_nonce: String,
    pub token_sealed: String,
    /// A GitHub App's id (0: a token) and its private key (PEM), sealed.
    pub app_id: i64,
    pub app_key_nonce: String,
    pub app_key_sealed: String,
    pub updated_at_ms: i64,
}

/// One status to send (a row of the outbox).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StatusRow {
    pub id: i64,
    pub build_id: String,
    pub project_id: String,
    pub revision: String,
    /// The build state it reports (`queued`, `running`, or an end).
    pub state: String,
    /// The transition's reason (the description of an end).
    pub reason: String,
    pub at_ms: i64,
    /// `pending`, `sent`, `failed` (given up) or `skipped` (nothing to send it to).
    pub status: String,
    /// Sends tried so far, this one included once claimed.
    pub attempts: i64,
    pub last_error: String,
}

/// A project's outbox at a glance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxSummary {
    pub pending: i64,
    /// The last error of a status still pending or given up (empty: none).
    pub last_error: String,
}

const STATUS_COLUMNS: &str =
    "id, build_id, project_id, revision, state, reason, at_ms, status, attempts, last_error";

impl Store {
    /// Stores (or replaces) a project's forge, with its audit entry.
    pub async fn set_forge(&self, f: &ForgeRow, audit: &Audit) -> Result<()> {
        in_tx!(self, "commit forge", |tx| {
            sqlx::query(
                "INSERT INTO project_forges (project_id, kind, api_url, repo_path, token_nonce, \
                 token_sealed, app_id, app_key_nonce, app_key_sealed, updated_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT (project_id) DO UPDATE SET kind = excluded.kind, \
                 api_url = excluded.api_url, repo_path = excluded.repo_path, \
                 token_nonce = excluded.token_nonce, token_sealed = excluded.token_sealed, \
                 app_id = excluded.app_id, app_key_nonce = excluded.app_key_nonce, \
                 app_key_sealed = excluded.app_key_sealed, updated_at_ms = excluded.updated_at_ms",
            )
            .bind(&f.project_id)
            .bind(&f.kind)
            .bind(&f.api_url)
            .bind(&f.repo_path)
            .bind(&f.token_nonce)
            .bind(&f.token_sealed)
            .bind(f.app_id)
            .bind(&f.app_key_nonce)
            .bind(&f.app_key_sealed)
            .bind(f.updated_at_ms)
            .execute(&mut **tx)
            .await
            .map_err(q("upsert project forge"))?;
            insert_audit_tx(tx, audit).await
        })
    }

    /// A project's forge, if it has one.
    pub async fn get_forge(&self, project_id: &str) -> Result<Option<ForgeRow>> {
        sqlx::query_as::<_, ForgeRow>(
            "SELECT project_id, kind, api_url, repo_path, token_nonce, token_sealed, app_id, \
             app_key_nonce, app_key_sealed, updated_at_ms FROM project_forges \
             WHERE project_id = $1",
        )
        .bind(project_id)
        .fetch_optional(&self.reads)
        .await
        .map_err(q("select project forge"))
    }

    /// Forgets a project's forge (statuses already written stay, and are skipped), with its
    /// audit entry: false if it had none.
    pub async fn delete_forge(&self, project_id: &str, audit: &Audit) -> Result<bool> {
        in_tx!(self, "commit deleted forge", |tx| {
            let gone = sqlx::query("DELETE FROM project_forges WHERE project_id = $1")
                .bind(project_id)
                .execute(&mut **tx)
                .await
                .map_err(q("delete project forge"))?
                .rows_affected()
                > 0;
            if gone {
                insert_audit_tx(tx, audit).await?;
            }
            Ok::<_, super::StoreError>(gone)
        })
    }

    /// Statuses due at `now`, oldest first, each the first pending one of its commit (project
    /// and revision), so a commit's statuses are sent one at a time, in order.
    pub async fn due_statuses(&self, now: i64, limit: u32) -> Result<Vec<StatusRow>> {
        let sql = format!(
            "SELECT {STATUS_COLUMNS} FROM forge_statuses f \
             WHERE status = 'pending' AND next_at_ms <= $1 AND claim_until_ms < $1 \
             AND NOT EXISTS (SELECT 1 FROM forge_statuses o WHERE o.project_id = f.project_id \
             AND o.revision = f.revision AND o.status = 'pending' AND o.id < f.id) \
             ORDER BY id LIMIT $2"
        );
        // The read connections: on SQLite the one writer stays the box sessions'.
        sqlx::query_as::<_, StatusRow>(&sql)
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&self.reads)
            .await
            .map_err(q("select due forge statuses"))
    }

    /// Claims a status for `me` until `until` (one more attempt): false when another control
    /// plane holds it, it is no longer due, or an earlier status of its commit is pending.
    pub async fn claim_status(&self, id: i64, me: &str, now: i64, until: i64) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE forge_statuses SET claimed_by = $1, claim_until_ms = $2, \
             attempts = attempts + 1 \
             WHERE id = $3 AND status = 'pending' AND claim_until_ms < $4 AND next_at_ms <= $4 \
             AND NOT EXISTS (SELECT 1 FROM forge_statuses o \
             WHERE o.project_id = forge_statuses.project_id \
             AND o.revision = forge_statuses.revision AND o.status = 'pending' \
             AND o.id < forge_statuses.id)",
        )
        .bind(me)
        .bind(until)
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(q("claim forge status"))?;
        Ok(res.rows_affected() == 1)
    }

    /// Ends a claimed status as `status` (`sent`, `failed`, `skipped`): false when the claim
    /// was lost.
    pub async fn end_status(
        &self,
        id: i64,
        me: &str,
        status: &str,
        error: &str,
        now: i64,
    ) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE forge_statuses SET status = $1, last_error = $2, done_at_ms = $3, \
             claim_until_ms = 0 WHERE id = $4 AND claimed_by = $5 AND status = 'pending'",
        )
        .bind(status)
        .bind(error)
        .bind(now)
        .bind(id)
        .bind(me)
        .execute(&self.pool)
        .await
        .map_err(q("end forge status"))?;
        Ok(res.rows_affected() == 1)
    }

    /// A claimed status failed for now: tried again at `next_at`.
    pub async fn retry_status(&self, id: i64, me: &str, next_at: i64, error: &str) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE forge_statuses SET next_at_ms = $1, last_error = $2, claim_until_ms = 0 \
             WHERE id = $3 AND claimed_by = $4 AND status = 'pending'",
        )
        .bind(next_at)
        .bind(error)
        .bind(id)
        .bind(me)
        .execute(&self.pool)
        .await
        .map_err(q("retry forge status"))?;
        Ok(res.rows_affected() == 1)
    }

    /// Statuses waiting to be sent, in all projects (for `/metrics`).
    pub async fn count_pending_statuses(&self) -> Result<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM forge_statuses WHERE status = 'pending'")
            .fetch_one(&self.reads)
            .await
            .map_err(q("count pending forge statuses"))
    }

    /// A project's statuses waiting, and the last error.
    pub async fn outbox_summary(&self, project_id: &str) -> Result<OutboxSummary> {
        let pending: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM forge_statuses WHERE project_id = $1 AND status = 'pending'",
        )
        .bind(project_id)
        .fetch_one(&self.reads)
        .await
        .map_err(q("count pending forge statuses"))?;
        let last_error: Option<String> = sqlx::query_scalar(
            "SELECT last_error FROM forge_statuses WHERE project_id = $1 \
             AND status IN ('pending', 'failed') AND last_error <> '' ORDER BY id DESC LIMIT 1",
        )
        .bind(project_id)
        .fetch_optional(&self.reads)
        .await
        .map_err(q("select last forge status error"))?;
        Ok(OutboxSummary {
            pending,
            last_error: last_error.unwrap_or_default(),
        })
    }

    /// A build's statuses, in the order they were written (tests and inspection).
    pub async fn statuses_of_build(&self, build_id: &str) -> Result<Vec<StatusRow>> {
        let sql =
            format!("SELECT {STATUS_COLUMNS} FROM forge_statuses WHERE build_id = $1 ORDER BY id");
        sqlx::query_as::<_, StatusRow>(&sql)
            .bind(build_id)
            .fetch_all(&self.reads)
            .await
            .map_err(q("select forge statuses of build"))
    }

    /// Deletes statuses sent, given up or skipped before `cutoff_ms` (retention).
    pub async fn purge_statuses_before(&self, cutoff_ms: i64) -> Result<u64> {
        let res =
            sqlx::query("DELETE FROM forge_statuses WHERE status <> 'pending' AND done_at_ms < $1")
                .bind(cutoff_ms)
                .execute(&self.pool)
                .await
                .map_err(q("purge forge statuses"))?;
        Ok(res.rows_affected())
    }
}
