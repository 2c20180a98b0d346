//! Webhook deliveries: each `X-GitHub-Delivery` id once per project, with the build it made
//! (written in the build's own transaction), so a redelivery gets the same answer and no second
//! build. The id is scoped to its project: one push to a repository several projects build is
//! one delivery for each, and a sender who knows one project's delivery ids cannot use them to
//! suppress another project's builds.

use super::builds::{insert_build_tx, BuildRow};
use super::{now_ms, q, Result, Store};

/// What a webhook delivery turned into.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// First time this delivery id was seen; the build (if any) was inserted with it.
    New,
    /// Seen before: the stored answer.
    Duplicate { build_id: String, outcome: String },
}

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
            insert_build_tx(&mut tx, build, "webhook push").await?;
        }
        tx.commit().await.map_err(q("commit webhook delivery"))?;
        Ok(Delivery::New)
    }
}
