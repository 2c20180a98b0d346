//! Box join tokens and box certificates. A join token is stored by id with the SHA-256 of its
//! secret, used at most once: the use, the certificate it bought and the audit entry are one
//! transaction, so two boxes racing with one token get one certificate. Certificates are kept
//! by serial; revoking a box marks all of its certificates, and a session or renewal with a
//! revoked (or unknown) serial is refused although TLS verified it. Joins, renewals and
//! revocations of one box id first lock its `box_guard` row, so they never interleave.

use super::audit::{insert_audit_tx, Audit};
use super::{q, Result, Store};

/// A join token as stored (without its secret's hash).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct JoinTokenRow {
    pub id: String,
    /// Only this box id may join with it; empty = any id without a certificate in force.
    pub box_id: String,
    pub created_at_ms: i64,
    pub created_by: String,
    pub expires_at_ms: i64,
    pub used_at_ms: i64,
    pub used_by: String,
}

/// A box certificate as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct BoxCertRow {
    pub serial: String,
    pub box_id: String,
    pub issued_at_ms: i64,
    pub not_after_ms: i64,
    pub revoked_at_ms: i64,
}

/// What revoking a join token found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinTokenRevoke {
    /// It was unused; it is gone now.
    Revoked(JoinTokenRow),
    /// A box already used it: nothing to revoke (the box is revoked with `box revoke`).
    Used(JoinTokenRow),
    Unknown,
}

/// What one retention pass deleted of join tokens and box certificates.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PurgedCredentials {
    pub join_tokens: u64,
    pub box_certs: u64,
}

/// Why a join was refused (each says what to do; none says more than the caller may know).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefused {
    #[error("unknown join token: make one with `hivectl box join-token`")]
    Unknown,
    #[error("this join token was already used (by box {0}): make a new one with `hivectl box join-token`")]
    Used(String),
    #[error("this join token expired: make a new one with `hivectl box join-token`")]
    Expired,
    #[error("this join token is for box {0:?} only: start the box with --box-id {0}")]
    WrongBox(String),
    #[error(
        "box {0:?} already has a certificate in force: a box keeps its certificate in its data \
         dir; to give the id to a new box, `hivectl box revoke {0}` first, or make a join token \
         for that id (`hivectl box join-token --box-id {0}`)"
    )]
    Taken(String),
}

const TOKEN_COLUMNS: &str =
    "id, box_id, created_at_ms, created_by, expires_at_ms, used_at_ms, used_by";
const CERT_COLUMNS: &str = "serial, box_id, issued_at_ms, not_after_ms, revoked_at_ms";

impl Store {
    /// Stores a new join token (by the hash of its secret) and its audit entry.
    pub async fn create_join_token(
        &self,
        row: &JoinTokenRow,
        secret_hash: &str,
        audit: &Audit,
    ) -> Result<()> {
        in_tx!(self, "commit join token", |tx| {
            sqlx::query(
                "INSERT INTO join_tokens (id, secret_hash, box_id, created_at_ms, created_by, \
                 expires_at_ms, used_at_ms, used_by) VALUES ($1, $2, $3, $4, $5, $6, 0, '')",
            )
            .bind(&row.id)
            .bind(secret_hash)
            .bind(&row.box_id)
            .bind(row.created_at_ms)
            .bind(&row.created_by)
            .bind(row.expires_at_ms)
            .execute(&mut **tx)
            .await
            .map_err(q("insert join token"))?;
            insert_audit_tx(tx, audit).await
        })
    }

    /// Uses join token `id` (whose secret hashes to `secret_hash`) for `box_id` and records the
    /// certificate it bought, in one transaction: `Ok(Err(_))` when the token may not be used.
    /// Whether a join with token `id` (its secret hashed to `secret_hash`) by `box_id` would
    /// be let in now, as far as the token goes: read before anything is signed, so a caller
    /// without a usable token costs the CA nothing. [`Store::join_box`] checks again, in the
    /// transaction that uses the token.
    pub async fn check_join_token(
        &self,
        id: &str,
        secret_hash: &str,
        box_id: &str,
        now_ms: i64,
    ) -> Result<std::result::Result<(), JoinRefused>> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM join_tokens WHERE id = $1");
        let row = sqlx::query_as::<_, JoinTokenRow>(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("select join token"))?;
        let hash: Option<String> =
            sqlx::query_scalar("SELECT secret_hash FROM join_tokens WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(q("select join token hash"))?;
        let (Some(row), Some(hash)) = (row, hash) else {
            return Ok(Err(JoinRefused::Unknown));
        };
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            hash.as_bytes(),
            secret_hash.as_bytes(),
        )) {
            return Ok(Err(JoinRefused::Unknown));
        }
        if row.used_at_ms != 0 {
            return Ok(Err(JoinRefused::Used(row.used_by)));
        }
        if row.expires_at_ms <= now_ms {
            return Ok(Err(JoinRefused::Expired));
        }
        if !row.box_id.is_empty() && row.box_id != box_id {
            return Ok(Err(JoinRefused::WrongBox(row.box_id)));
        }
        Ok(Ok(()))
    }

    /// Every join token kept, newest first (never a secret's hash).
    pub async fn list_join_tokens(&self) -> Result<Vec<JoinTokenRow>> {
        let sql =
            format!("SELECT {TOKEN_COLUMNS} FROM join_tokens ORDER BY created_at_ms DESC, id");
        sqlx::query_as::<_, JoinTokenRow>(&sql)
            .fetch_all(&self.reads)
            .await
            .map_err(q("list join tokens"))
    }

    /// Deletes join token `id` if no box used it, with the audit entry, in one transaction (a
    /// join racing it either used it first or finds it gone).
    pub async fn revoke_join_token(&self, id: &str, audit: &Audit) -> Result<JoinTokenRevoke> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM join_tokens WHERE id = $1");
        in_tx!(self, "commit join token revocation", |tx| {
            let row = sqlx::query_as::<_, JoinTokenRow>(&sql)
                .bind(id)
                .fetch_optional(&mut **tx)
                .await
                .map_err(q("select join token"))?;
            let Some(row) = row else {
                return Ok(JoinTokenRevoke::Unknown);
            };
            let res = sqlx::query("DELETE FROM join_tokens WHERE id = $1 AND used_at_ms = 0")
                .bind(id)
                .execute(&mut **tx)
                .await
                .map_err(q("delete join token"))?;
            if res.rows_affected() == 0 {
                return Ok(JoinTokenRevoke::Used(row));
            }
            insert_audit_tx(tx, audit).await?;
            Ok::<_, super::StoreError>(JoinTokenRevoke::Revoked(row))
        })
    }

    /// Deletes join tokens that expired, or were used, before `cutoff_ms`, and box
    /// certificates that expired, or were revoked, before it. Safe for revoked ones: a
    /// certificate whose serial is not on record is refused like a revoked one.
    pub async fn purge_credentials_before(&self, cutoff_ms: i64) -> Result<PurgedCredentials> {
        let tokens = sqlx::query(
            "DELETE FROM join_tokens WHERE expires_at_ms < $1 \
             OR (used_at_ms <> 0 AND used_at_ms < $1)",
        )
        .bind(cutoff_ms)
        .execute(&self.pool)
        .await
        .map_err(q("purge join tokens"))?
        .rows_affected();
        let certs = sqlx::query(
            "DELETE FROM box_certs WHERE not_after_ms < $1 \
             OR (revoked_at_ms <> 0 AND revoked_at_ms < $1)",
        )
        .bind(cutoff_ms)
        .execute(&self.pool)
        .await
        .map_err(q("purge box certificates"))?
        .rows_affected();
        Ok(PurgedCredentials {
            join_tokens: tokens,
            box_certs: certs,
        })
    }

    pub async fn join_box(
        &self,
        id: &str,
        secret_hash: &str,
        cert: &BoxCertRow,
        now_ms: i64,
    ) -> Result<std::result::Result<(), JoinRefused>> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM join_tokens WHERE id = $1");
        in_tx!(self, "commit box join", |tx| {
            // First: two joins for one id then run one after the other, each reading the
            // token and the id's certificates as the other left them.
            guard_tx(tx, &cert.box_id).await?;
            let row = sqlx::query_as::<_, JoinTokenRow>(&sql)
                .bind(id)
                .fetch_optional(&mut **tx)
                .await
                .map_err(q("select join token"))?;
            let hash: Option<String> =
                sqlx::query_scalar("SELECT secret_hash FROM join_tokens WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut **tx)
                    .await
                    .map_err(q("select join token hash"))?;
            let (Some(row), Some(hash)) = (row, hash) else {
                return Ok(Err(JoinRefused::Unknown));
            };
            // Constant time: the id is not secret, the secret is.
            if !bool::from(subtle::ConstantTimeEq::ct_eq(
                hash.as_bytes(),
                secret_hash.as_bytes(),
            )) {
                return Ok(Err(JoinRefused::Unknown));
            }
            if row.used_at_ms != 0 {
                return Ok(Err(JoinRefused::Used(row.used_by)));
            }
            if row.expires_at_ms <= now_ms {
                return Ok(Err(JoinRefused::Expired));
            }
            if !row.box_id.is_empty() && row.box_id != cert.box_id {
                return Ok(Err(JoinRefused::WrongBox(row.box_id)));
            }
            if !row.box_id.is_empty() {
                // A token made for this id gives it to the new machine: the old one's
                // certificates end here.
                sqlx::query(
                    "UPDATE box_certs SET revoked_at_ms = $1 WHERE box_id = $2 AND revoked_at_ms = 0",
                )
                .bind(now_ms)
                .bind(&cert.box_id)
                .execute(&mut **tx)
                .await
                .map_err(q("revoke earlier box certificates"))?;
            } else {
                let held: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM box_certs WHERE box_id = $1 AND revoked_at_ms = 0 \
                     AND not_after_ms > $2",
                )
                .bind(&cert.box_id)
                .bind(now_ms)
                .fetch_one(&mut **tx)
                .await
                .map_err(q("count box certificates"))?;
                if held > 0 {
                    return Ok(Err(JoinRefused::Taken(cert.box_id.clone())));
                }
            }
            let res = sqlx::query(
                "UPDATE join_tokens SET used_at_ms = $1, used_by = $2 \
                 WHERE id = $3 AND used_at_ms = 0",
            )
            .bind(now_ms)
            .bind(&cert.box_id)
            .bind(id)
            .execute(&mut **tx)
            .await
            .map_err(q("use join token"))?;
            if res.rows_affected() != 1 {
                return Ok(Err(JoinRefused::Used(String::new())));
            }
            insert_cert_tx(tx, cert).await?;
            let audit = Audit::system("JoinBox", &cert.box_id)
                .with_detail(format!("join token {id}, certificate {}", cert.serial));
            insert_audit_tx(tx, &audit).await?;
            Ok::<_, super::StoreError>(Ok(()))
        })
    }

    /// Records a renewed certificate of the box of `old_serial`, if that one is still in force.
    pub async fn renew_box_cert(&self, old_serial: &str, cert: &BoxCertRow) -> Result<bool> {
        in_tx!(self, "commit renewed box certificate", |tx| {
            guard_tx(tx, &cert.box_id).await?;
            let ok: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM box_certs WHERE serial = $1 AND box_id = $2 \
                 AND revoked_at_ms = 0",
            )
            .bind(old_serial)
            .bind(&cert.box_id)
            .fetch_one(&mut **tx)
            .await
            .map_err(q("select box certificate"))?;
            if ok == 0 {
                return Ok(false);
            }
            insert_cert_tx(tx, cert).await?;
            Ok::<_, super::StoreError>(true)
        })
    }

    /// Whether `box_id` holds a certificate in force (then only that certificate speaks for it).
    pub async fn box_has_cert(&self, box_id: &str, now_ms: i64) -> Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM box_certs WHERE box_id = $1 AND revoked_at_ms = 0 \
             AND not_after_ms > $2",
        )
        .bind(box_id)
        .bind(now_ms)
        .fetch_one(&self.reads)
        .await
        .map_err(q("count box certificates"))?;
        Ok(n > 0)
    }

    /// The certificate of `serial`, revoked or not.
    pub async fn box_cert(&self, serial: &str) -> Result<Option<BoxCertRow>> {
        let sql = format!("SELECT {CERT_COLUMNS} FROM box_certs WHERE serial = $1");
        sqlx::query_as::<_, BoxCertRow>(&sql)
            .bind(serial)
            .fetch_optional(&self.reads)
            .await
            .map_err(q("select box certificate"))
    }

    /// Revokes every certificate of `box_id` not yet revoked: how many.
    pub async fn revoke_box_certs(&self, box_id: &str, now_ms: i64, audit: &Audit) -> Result<u64> {
        in_tx!(self, "commit box revocation", |tx| {
            guard_tx(tx, box_id).await?;
            sqlx::query("UPDATE box_guard SET revoked_at_ms = $1 WHERE box_id = $2")
                .bind(now_ms)
                .bind(box_id)
                .execute(&mut **tx)
                .await
                .map_err(q("mark box revoked"))?;
            // Unused tokens made for this id die with it.
            sqlx::query(
                "UPDATE join_tokens SET expires_at_ms = $1 WHERE box_id = $2 AND used_at_ms = 0 \
                 AND expires_at_ms > $1",
            )
            .bind(now_ms)
            .bind(box_id)
            .execute(&mut **tx)
            .await
            .map_err(q("expire join tokens of a revoked box"))?;
            let res = sqlx::query(
                "UPDATE box_certs SET revoked_at_ms = $1 WHERE box_id = $2 AND revoked_at_ms = 0",
            )
            .bind(now_ms)
            .bind(box_id)
            .execute(&mut **tx)
            .await
            .map_err(q("revoke box certificates"))?;
            insert_audit_tx(tx, audit).await?;
            Ok::<_, super::StoreError>(res.rows_affected())
        })
    }
}

/// Takes the box's guard row lock for the rest of the transaction (made on first use).
async fn guard_tx(tx: &mut sqlx::Transaction<'_, sqlx::Any>, box_id: &str) -> Result<()> {
    sqlx::query("INSERT INTO box_guard (box_id, revoked_at_ms) VALUES ($1, 0) ON CONFLICT (box_id) DO NOTHING")
        .bind(box_id)
        .execute(&mut **tx)
        .await
        .map_err(q("insert box guard"))?;
    sqlx::query("UPDATE box_guard SET revoked_at_ms = revoked_at_ms WHERE box_id = $1")
        .bind(box_id)
        .execute(&mut **tx)
        .await
        .map_err(q("lock box guard"))?;
    Ok(())
}

async fn insert_cert_tx(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    cert: &BoxCertRow,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO box_certs (serial, box_id, issued_at_ms, not_after_ms, revoked_at_ms) \
         VALUES ($1, $2, $3, $4, 0)",
    )
    .bind(&cert.serial)
    .bind(&cert.box_id)
    .bind(cert.issued_at_ms)
    .bind(cert.not_after_ms)
    .execute(&mut **tx)
    .await
    .map_err(q("insert box certificate"))?;
    Ok(())
}
