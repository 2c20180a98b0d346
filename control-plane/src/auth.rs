//! Who may call what on the operator API (`hive.v1.ControlPlane`): API tokens with roles.
//!
//! A caller sends `authorization: Bearer <token>`. The token is 32 random bytes (hex, with a
//! `hvt_` prefix so it is recognisable in a leaked file or log); the store keeps only its SHA-256.
//! A fast hash is enough because the secret is not a password: with 256 bits of entropy there is
//! no dictionary to try, and a slow hash (bcrypt, argon2) would only cost time on every call
//! without making a stolen hash any easier or harder to reverse.
//!
//! Roles, each including the rights of the ones before it:
//! - `read-only`: everything that reads (builds, logs, projects without env values, boxes,
//!   cells, size classes, networks, connectors);
//! - `submitter`: + submit and cancel builds; bound with `--project` to one project's builds;
//! - `operator`: + cordon and drain boxes, add and delete projects (not on a private network:
//!   that is the admin's, like the network itself), cancel any build, list tunnel leases;
//! - `admin`: + private networks, connectors, tokens and the audit log.
//!
//! On its first start (no token ever made) the control plane makes an admin token and writes
//! it to `<data-dir>/admin.token` (mode 0600): [`bootstrap`].
//!
//! Neighbours: `store::tokens` and `store::audit` hold the rows; `grpc::api` calls
//! [`authenticate`] first in every RPC, then [`Caller::require`] with the RPC's [`Right`]; the
//! dashboard (`http::ui`) signs in with [`authenticate_token`] and checks each request's session
//! with [`authenticate_hash`], against the same rights.

use std::io::Write;
use std::path::{Path, PathBuf};

use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::store::{now_ms, Audit, Store, StoreError, TokenRow, BOOTSTRAP_TOKEN_ID};

/// The file in the data dir the first admin token is written to.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// What to tell a caller who sent no usable token.
const HOW_TO_AUTHENTICATE: &str = "set HIVE_TOKEN or pass --token (on its first start the \
    control plane wrote an admin token to admin.token in its --data-dir)";

/// A token's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    ReadOnly,
    Submitter,
    Operator,
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::ReadOnly, Role::Submitter];

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::ReadOnly => "read-only",
            Role::Submitter => "submitter",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }

    /// Whether a token of this role holds `right`.
    pub fn grants(self, right: Right) -> bool {
        match right {
            Right::Read => true,
            Right::Submit => self >= Role::Submitter,
            Right::Operate => self >= Role::Operator,
            Right::Admin => self == Role::Admin,
        }
    }
}

/// What an RPC needs (see the module doc for which role holds which).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    Read,
    Submit,
    Operate,
    Admin,
}

impl Right {
    /// The least role that holds it, for messages.
    fn least_role(self) -> Role {
        match self {
            Right::Read => Role::ReadOnly,
            Right::Submit => Role::Submitter,
            Right::Operate => Role::Operator,
            Right::Admin => Role::Admin,
        }
    }
}

/// An authenticated caller: the token's id, name, role and (submitter) project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub token_id: String,
    pub name: String,
    pub role: Role,
    /// A submitter's project; empty = any.
    pub project_id: String,
    pub project_name: String,
}

impl Caller {
    /// PERMISSION_DENIED unless this caller's role holds `right`.
    pub fn require(&self, rpc: &str, right: Right) -> Result<(), Status> {
        if self.role.grants(right) {
            return Ok(());
        }
        let need = right.least_role();
        tracing::warn!(rpc, token_id = %self.token_id, token = %self.name,
            role = self.role.name(), needs = need.name(), "API call refused");
        Err(Status::permission_denied(format!(
            "{rpc} needs a token with role {} or above; token {:?} has role {}: ask an admin \
             for one (hivectl token create --role {})",
            need.name(),
            self.name,
            self.role.name(),
            need.name()
        )))
    }

    /// PERMISSION_DENIED when this caller is bound to another project than `project_id`.
    pub fn require_project(
        &self,
        rpc: &str,
        project_id: &str,
        project_name: &str,
    ) -> Result<(), Status> {
        if self.project_id.is_empty() || self.project_id == project_id {
            return Ok(());
        }
        tracing::warn!(rpc, token_id = %self.token_id, token = %self.name,
            project = %project_name, bound_to = %self.project_name, "API call refused");
        Err(Status::permission_denied(format!(
            "{rpc}: token {:?} may only submit and cancel builds of project {:?}, not of \
             {project_name:?}: use a token for that project, or one without --project",
            self.name, self.project_name
        )))
    }

    /// The audit entry of a change this caller makes.
    pub fn audit(&self, action: &str, target: impl Into<String>) -> Audit {
        Audit {
            token_id: self.token_id.clone(),
            token_name: self.name.clone(),
            action: action.to_string(),
            target: target.into(),
            detail: String::new(),
        }
    }
}

/// A new token: `hvt_` and 64 hex digits (32 bytes from the OS).
pub fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("hvt_{}", hex::encode(b))
}

/// What the store keeps of a token: its SHA-256, hex.
pub fn token_hash(token: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The token a call carries, or UNAUTHENTICATED saying what to do.
fn bearer(meta: &MetadataMap) -> Result<&str, Status> {
    let Some(value) = meta.get(hive_proto::auth::METADATA_KEY) else {
        return Err(Status::unauthenticated(format!(
            "no API token: {HOW_TO_AUTHENTICATE}"
        )));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    token.ok_or_else(|| {
        Status::unauthenticated(format!(
            "authorization is not \"Bearer <token>\": {HOW_TO_AUTHENTICATE}"
        ))
    })
}

/// The caller a call's token names: UNAUTHENTICATED for none, an unknown or a revoked token.
pub async fn authenticate(store: &Store, meta: &MetadataMap) -> Result<Caller, Status> {
    authenticate_token(store, bearer(meta)?).await
}

/// The caller `token` names (the dashboard's sign-in): UNAUTHENTICATED for an unknown or a
/// revoked token.
pub async fn authenticate_token(store: &Store, token: &str) -> Result<Caller, Status> {
    // Tokens are ASCII of a fixed shape; anything much longer is not one (and is not hashed).
    if token.len() > 256 {
        return Err(Status::unauthenticated(format!(
            "token not recognised: {HOW_TO_AUTHENTICATE}"
        )));
    }
    authenticate_hash(store, &token_hash(token)).await
}

/// The caller whose token has SHA-256 `hash` (a dashboard session keeps only the hash, and
/// looks it up on every request, so a revoked token's sessions end at once).
pub async fn authenticate_hash(store: &Store, hash: &str) -> Result<Caller, Status> {
    let row = store
        .token_by_hash(hash)
        .await
        .map_err(|e| Status::internal(format!("look up token: {e}")))?;
    let Some(row) = row else {
        tracing::debug!("API call with an unknown token refused");
        return Err(Status::unauthenticated(format!(
            "token not recognised (mistyped, or not from this control plane): \
             {HOW_TO_AUTHENTICATE}"
        )));
    };
    if row.is_revoked() {
        tracing::debug!(token_id = %row.id, token = %row.name, "API call with a revoked token refused");
        return Err(Status::unauthenticated(format!(
            "token {:?} ({}) was revoked; ask an admin for a new one (hivectl token create)",
            row.name, row.id
        )));
    }
    let Some(role) = Role::parse(&row.role) else {
        return Err(Status::internal(format!(
            "token {} has unknown role {:?} in the store",
            row.id, row.role
        )));
    };
    Ok(Caller {
        token_id: row.id,
        name: row.name,
        role,
        project_id: row.project_id,
        project_name: row.project_name,
    })
}

/// Errors making the first admin token.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("write admin token file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store first admin token: {0}")]
    Store(#[from] StoreError),
}

/// Makes the first admin token if no token was ever made: written to
/// `<data_dir>/admin.token` (0600) before it is stored, so a token in the store always has its
/// file. Returns the token when this call made it.
pub async fn bootstrap(store: &Store, data_dir: &Path) -> Result<Option<String>, BootstrapError> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let tmp = data_dir.join(format!("{ADMIN_TOKEN_FILE}.tmp"));
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BootstrapError::Write { path, source }
    };
    if !store.list_tokens().await?.is_empty() {
        return Ok(None);
    }
    let token = new_token();
    std::fs::create_dir_all(data_dir).map_err(write_err(data_dir))?;
    write_private(&tmp, &format!("{token}\n")).map_err(write_err(&tmp))?;
    let row = TokenRow {
        id: BOOTSTRAP_TOKEN_ID.to_string(),
        name: "admin".to_string(),
        role: Role::Admin.name().to_string(),
        project_id: String::new(),
        project_name: String::new(),
        created_at_ms: now_ms(),
        created_by: "control-plane".to_string(),
        revoked_at_ms: 0,
    };
    let made = match store.bootstrap_admin_token(&row, &token_hash(&token)).await {
        Ok(made) => made,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
    };
    if !made {
        // Another replica on the same database made it first.
        let _ = std::fs::remove_file(&tmp);
        return Ok(None);
    }
    std::fs::rename(&tmp, &path).map_err(write_err(&path))?;
    tracing::info!(path = %path.display(),
        "first start: wrote an admin token (use it as HIVE_TOKEN; make others with hivectl token create)");
    Ok(Some(token))
}

/// Creates (or replaces) `path` with `text`, readable by its owner only.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_grant_their_rights_and_the_ones_below() {
        use Right::*;
        let table = [
            (Role::ReadOnly, [true, false, false, false]),
            (Role::Submitter, [true, true, false, false]),
            (Role::Operator, [true, true, true, false]),
            (Role::Admin, [true, true, true, true]),
        ];
        for (role, want) in table {
            for (right, w) in [Read, Submit, Operate, Admin].into_iter().zip(want) {
                assert_eq!(role.grants(right), w, "{role:?} {right:?}");
            }
        }
        for r in Role::ALL {
            assert_eq!(Role::parse(r.name()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn tokens_are_long_random_and_hashed() {
        let a = new_token();
        assert!(a.starts_with("hvt_") && a.len() == 68, "{a}");
        assert_ne!(a, new_token());
        assert_eq!(token_hash(&a).len(), 64);
        assert_ne!(token_hash(&a), a);
    }

    #[test]
    fn bearer_needs_the_scheme_and_a_token() {
        let mut m = MetadataMap::new();
        assert_eq!(bearer(&m).unwrap_err().code(), tonic::Code::Unauthenticated);
        m.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer(&m).unwrap_err().code(), tonic::Code::Unauthenticated);
        m.insert("authorization", "Bearer ".parse().unwrap());
        assert_eq!(bearer(&m).unwrap_err().code(), tonic::Code::Unauthenticated);
        m.insert("authorization", "Bearer hvt_x".parse().unwrap());
        assert_eq!(bearer(&m).unwrap(), "hvt_x");
    }
}
