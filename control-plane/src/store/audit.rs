//! The audit log: who (the API token, by id and name) changed what (the RPC and its target)
//! and when. Each entry is written by [`insert_audit_tx`] inside the transaction of the change
//! it describes, so a change and its entry commit together or not at all. The audited variants
//! of writes whose plain form lives in another file (`insert_build`, `end_build`,
//! `set_box_state`) are here, built on those files' `*_tx` functions.

use hive_proto::v1::BuildState;
use sqlx::{Any, Transaction};

use super::boxes::{hold_off_placements_tx, set_box_state_tx};
use super::builds::{end_build_tx, insert_build_tx, BuildRow};
use super::{new_id, now_ms, q, Result, Store};

/// One change as the audit log records it (the time and id are added when it is written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    /// The token that made the change; empty for the control plane itself.
    pub token_id: String,
    pub token_name: String,
    /// The RPC, e.g. `CreateProject`.
    pub action: String,
    /// What it acted on: a project name, a build id, a box id, a token id.
    pub target: String,
    pub detail: String,
}

impl Audit {
    /// A change the control plane makes on its own (the first admin token).
    pub fn system(action: &str, target: &str) -> Audit {
        Audit {
            token_id: String::new(),
            token_name: "control-plane".to_string(),
            action: action.to_string(),
            target: target.to_string(),
            detail: String::new(),
        }
    }

    /// The same entry with `detail`.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Audit {
        self.detail = detail.into();
        self
    }
}

/// A stored audit entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub id: String,
    pub at_ms: i64,
    pub entry: Audit,
}

/// Writes `a` in the transaction of the change it describes.
pub(crate) async fn insert_audit_tx(tx: &mut Transaction<'_, Any>, a: &Audit) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_log (id, at_ms, token_id, token_name, action, target, detail) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(new_id())
    .bind(now_ms())
    .bind(&a.token_id)
    .bind(&a.token_name)
    .bind(&a.action)
    .bind(&a.target)
    .bind(&a.detail)
    .execute(&mut **tx)
    .await
    .map_err(q("insert audit entry"))?;
    Ok(())
}

/// Most entries one `list_audit` returns.
pub const MAX_AUDIT_PAGE: u32 = 1000;

impl Store {
    /// The newest `limit` entries (at most [`MAX_AUDIT_PAGE`]; 0 = 100), newest first.
    pub async fn list_audit(&self, limit: u32) -> Result<Vec<AuditRow>> {
        let limit = match limit {
            0 => 100,
            n => n.min(MAX_AUDIT_PAGE),
        };
        let rows = sqlx::query_as::<_, AuditRecord>(
            "SELECT id, at_ms, token_id, token_name, action, target, detail FROM audit_log \
             ORDER BY at_ms DESC, id DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await
        .map_err(q("list audit log"))?;
        Ok(rows.into_iter().map(AuditRow::from).collect())
    }

    /// Queues a build (as `insert_build`) and records who did.
    pub async fn insert_build_audited(
        &self,
        build: &BuildRow,
        reason: &str,
        audit: &Audit,
    ) -> Result<()> {
        in_tx!(self, "commit queued build", |tx| {
            insert_build_tx(tx, build, reason).await?;
            insert_audit_tx(tx, audit).await
        })
    }

    /// Queues an API build under an idempotency key (`request_id`, scoped to the build's
    /// project) with its audit entry, in one transaction: Ok(None) when queued, or the id of
    /// the build an earlier request with the same key made (nothing is written then). The key
    /// lives beside the webhook deliveries (`api:` prefix, which no forge's delivery id has), so
    /// it is kept as long as they are.
    pub async fn insert_build_once(
        &self,
        build: &BuildRow,
        request_id: &str,
        reason: &str,
        audit: &Audit,
    ) -> Result<Option<String>> {
        let key = format!("api:{request_id}");
        let mut tx = self.begin().await?;
        let res = sqlx::query(
            "INSERT INTO webhook_deliveries (delivery_id, project_id, build_id, outcome, at_ms) \
             VALUES ($1, $2, $3, 'build', $4) ON CONFLICT (project_id, delivery_id) DO NOTHING",
        )
        .bind(&key)
        .bind(&build.project_id)
        .bind(&build.id)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(q("insert api request id"))?;
        if res.rows_affected() == 0 {
            tx.rollback().await.map_err(q("rollback"))?;
            let (build_id,): (String,) = sqlx::query_as(
                "SELECT build_id FROM webhook_deliveries WHERE project_id = $1 AND delivery_id = $2",
            )
            .bind(&build.project_id)
            .bind(&key)
            .fetch_one(&self.pool)
            .await
            .map_err(q("select api request id"))?;
            return Ok(Some(build_id));
        }
        insert_build_tx(&mut tx, build, reason).await?;
        insert_audit_tx(&mut tx, audit).await?;
        tx.commit().await.map_err(q("commit queued build"))?;
        Ok(None)
    }

    /// Ends a build (as `end_build`) and, if it did end here, records who did.
    pub async fn end_build_audited(
        &self,
        build_id: &str,
        state: BuildState,
        reason: &str,
        audit: &Audit,
    ) -> Result<Option<BuildRow>> {
        in_tx!(self, "commit ended build", |tx| {
            let before = end_build_tx(tx, build_id, state, reason).await?;
            if before.is_some() {
                insert_audit_tx(tx, audit).await?;
            }
            Ok::<_, super::StoreError>(before)
        })
    }

    /// Sets a box's operator state (as `set_box_state`) and records who did.
    pub async fn set_box_state_audited(
        &self,
        id: &str,
        state: &str,
        audit: &Audit,
    ) -> Result<bool> {
        in_tx!(self, "commit box state", |tx| {
            let changed = set_box_state_tx(tx, self.kind, id, state).await?;
            if changed {
                insert_audit_tx(tx, audit).await?;
            }
            Ok::<_, super::StoreError>(changed)
        })
    }
}

/// What `forget_box_audited` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forgotten {
    /// The box and its cell rows are gone.
    Yes,
    /// No box has this id.
    NotFound,
    /// Builds hold live leases on it (they end, or their leases expire, first).
    LiveLeases(i64),
}

impl Store {
    /// Moves a box from state `from` to `to` only if it is in `from` now, and records who did;
    /// false when it was not (or there is no such box).
    pub async fn change_box_state_audited(
        &self,
        id: &str,
        from: &str,
        to: &str,
        audit: &Audit,
    ) -> Result<bool> {
        in_tx!(self, "commit box state change", |tx| {
            hold_off_placements_tx(tx, self.kind).await?;
            let res = sqlx::query("UPDATE boxes SET state = $1 WHERE id = $2 AND state = $3")
                .bind(to)
                .bind(id)
                .bind(from)
                .execute(&mut **tx)
                .await
                .map_err(q("update box state"))?;
            let changed = res.rows_affected() > 0;
            if changed {
                insert_audit_tx(tx, audit).await?;
            }
            Ok::<_, super::StoreError>(changed)
        })
    }

    /// Deletes a box that is gone for good with its cell rows (its builds keep its id as
    /// history), unless builds still hold live leases on it; records who did.
    pub async fn forget_box_audited(&self, id: &str, audit: &Audit) -> Result<Forgotten> {
        in_tx!(self, "commit forgotten box", |tx| {
            // A round in flight could be leasing a build to it as the count runs.
            hold_off_placements_tx(tx, self.kind).await?;
            let (live,): (i64,) =
                sqlx::query_as("SELECT COUNT(*) FROM leases WHERE box_id = $1 AND state = 'live'")
                    .bind(id)
                    .fetch_one(&mut **tx)
                    .await
                    .map_err(q("count live leases of box"))?;
            if live > 0 {
                return Ok::<_, super::StoreError>(Forgotten::LiveLeases(live));
            }
            let gone = sqlx::query("DELETE FROM boxes WHERE id = $1")
                .bind(id)
                .execute(&mut **tx)
                .await
                .map_err(q("delete box"))?;
            if gone.rows_affected() == 0 {
                return Ok(Forgotten::NotFound);
            }
            sqlx::query("DELETE FROM cells WHERE box_id = $1")
                .bind(id)
                .execute(&mut **tx)
                .await
                .map_err(q("delete cells of box"))?;
            insert_audit_tx(tx, audit).await?;
            Ok(Forgotten::Yes)
        })
    }
}

/// An `audit_log` row as the database holds it.
#[derive(sqlx::FromRow)]
struct AuditRecord {
    id: String,
    at_ms: i64,
    token_id: String,
    token_name: String,
    action: String,
    target: String,
    detail: String,
}

impl From<AuditRecord> for AuditRow {
    fn from(r: AuditRecord) -> Self {
        AuditRow {
            id: r.id,
            at_ms: r.at_ms,
            entry: Audit {
                token_id: r.token_id,
                token_name: r.token_name,
                action: r.action,
                target: r.target,
                detail: r.detail,
            },
        }
    }
}
