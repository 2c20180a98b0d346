//! API tokens: a name, a role (kept as text; `auth` gives it meaning), for a submitter the
//! project it is bound to, and the SHA-256 of the token. The token itself is never stored. A
//! revoked token keeps its row with `revoked_at_ms` set, so the audit log's names stay
//! readable and the token is refused from then on.

use super::audit::{insert_audit_tx, Audit};
use super::{q, Result, Store};

/// A token as stored (without its hash).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TokenRow {
    pub id: String,
    pub name: String,
    pub role: String,
    /// A submitter's project; empty = every project.
    pub project_id: String,
    pub project_name: String,
    pub created_at_ms: i64,
    /// Name of the token that made this one.
    pub created_by: String,
    /// 0 while in force.
    pub revoked_at_ms: i64,
}

impl TokenRow {
    pub fn is_revoked(&self) -> bool {
        self.revoked_at_ms != 0
    }
}

const TOKEN_COLUMNS: &str = "id, name, role, project_id, project_name, created_at_ms, \
    created_by, revoked_at_ms";

/// The id of the admin token the control plane makes on its first start. A fixed id, so two
/// replicas starting on one fresh PostgreSQL database cannot both make one.
pub const BOOTSTRAP_TOKEN_ID: &str = "admin-bootstrap";

impl Store {
    /// Stores a new token (by the hash of its secret) and its audit entry.
    pub async fn create_token(&self, row: &TokenRow, hash: &str, audit: &Audit) -> Result<()> {
        in_tx!(self, "commit new token", |tx| {
            insert_token_tx(tx, row, hash, Insert::Always).await?;
            insert_audit_tx(tx, audit).await
        })
    }

    /// Stores the first admin token, unless any token was ever made: true if it was stored.
    pub async fn bootstrap_admin_token(&self, row: &TokenRow, hash: &str) -> Result<bool> {
        let audit = Audit::system("BootstrapAdminToken", &row.id);
        in_tx!(self, "commit first admin token", |tx| {
            let made = insert_token_tx(tx, row, hash, Insert::IfNoneEver).await?;
            if made {
                insert_audit_tx(tx, &audit).await?;
            }
            Ok::<_, super::StoreError>(made)
        })
    }

    /// The token whose secret hashes to `hash`, revoked or not.
    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRow>> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_hash = $1");
        sqlx::query_as::<_, TokenRow>(&sql)
            .bind(hash)
            .fetch_optional(&self.reads)
            .await
            .map_err(q("select token"))
    }

    /// Every token, revoked ones too, oldest first.
    pub async fn list_tokens(&self) -> Result<Vec<TokenRow>> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at_ms, id");
        sqlx::query_as::<_, TokenRow>(&sql)
            .fetch_all(&self.reads)
            .await
            .map_err(q("list tokens"))
    }

    /// Revokes a token by id (a second revoke changes nothing) and records who did. None when
    /// there is no such token; else the token as it is now.
    pub async fn revoke_token(
        &self,
        id: &str,
        at_ms: i64,
        audit: &Audit,
    ) -> Result<Option<TokenRow>> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1");
        in_tx!(self, "commit revoked token", |tx| {
            let res = sqlx::query(
                "UPDATE tokens SET revoked_at_ms = $1 WHERE id = $2 AND revoked_at_ms = 0",
            )
            .bind(at_ms)
            .bind(id)
            .execute(&mut **tx)
            .await
            .map_err(q("revoke token"))?;
            if res.rows_affected() > 0 {
                insert_audit_tx(tx, audit).await?;
            }
            sqlx::query_as::<_, TokenRow>(&sql)
                .bind(id)
                .fetch_optional(&mut **tx)
                .await
                .map_err(q("select token"))
        })
    }
}

/// When [`insert_token_tx`] stores its row.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Insert {
    Always,
    /// Only while the table never held a token (the first admin token), and not twice.
    IfNoneEver,
}

/// Stores a token row in force with `hash`; true if stored.
async fn insert_token_tx(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    row: &TokenRow,
    hash: &str,
    when: Insert,
) -> Result<bool> {
    let (sql, what) = match when {
        Insert::Always => (
            "INSERT INTO tokens (id, name, role, project_id, project_name, token_hash, \
             created_at_ms, created_by, revoked_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0)",
            "insert token",
        ),
        Insert::IfNoneEver => (
            "INSERT INTO tokens (id, name, role, project_id, project_name, token_hash, \
             created_at_ms, created_by, revoked_at_ms) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, 0 \
             WHERE NOT EXISTS (SELECT 1 FROM tokens) ON CONFLICT (id) DO NOTHING",
            "insert first admin token",
        ),
    };
    let res = sqlx::query(sql)
        .bind(&row.id)
        .bind(&row.name)
        .bind(&row.role)
        .bind(&row.project_id)
        .bind(&row.project_name)
        .bind(hash)
        .bind(row.created_at_ms)
        .bind(&row.created_by)
        .execute(&mut **tx)
        .await
        .map_err(q(what))?;
    Ok(res.rows_affected() > 0)
}
