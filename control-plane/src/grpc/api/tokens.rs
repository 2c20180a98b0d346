//! API tokens (create, list, revoke) and the audit log: the admin's.

use hive_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{store_err, ControlPlaneService};
use crate::auth::{self, Right, Role};
use crate::store::{AuditRow, TokenRow};

/// A token as the API shows it (never its secret or hash).
fn token_to_proto(t: &TokenRow) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id.clone(),
        name: t.name.clone(),
        role: t.role.clone(),
        project: t.project_name.clone(),
        project_id: t.project_id.clone(),
        created_at_ms: t.created_at_ms,
        created_by: t.created_by.clone(),
        revoked_at_ms: t.revoked_at_ms,
    }
}

fn audit_to_proto(a: AuditRow) -> pb::AuditEntry {
    pb::AuditEntry {
        id: a.id,
        at_ms: a.at_ms,
        token_id: a.entry.token_id,
        token_name: a.entry.token_name,
        action: a.entry.action,
        target: a.entry.target,
        detail: a.entry.detail,
    }
}

pub(super) async fn create_token(
    svc: &ControlPlaneService,
    request: Request<pb::CreateTokenRequest>,
) -> Result<Response<pb::CreateTokenReply>, Status> {
    let caller = svc.caller(&request, "CreateToken", Right::Admin).await?;
    let req = request.into_inner();
    let Some(role) = Role::parse(req.role.trim()) else {
        return Err(Status::invalid_argument(format!(
            "role {:?} is not one of admin, operator, read-only, submitter",
            req.role
        )));
    };
    let (project_id, project_name) = match req.project.trim() {
        "" => (String::new(), String::new()),
        p if role == Role::Submitter => {
            let p = svc.project(p).await?;
            (p.id, p.name)
        }
        _ => {
            return Err(Status::invalid_argument(format!(
                "--project binds a submitter token to one project; a {} token is not bound",
                role.name()
            )))
        }
    };
    let name = req.name.trim();
    if name.len() > 64 || name.chars().any(|c| c.is_control()) {
        return Err(Status::invalid_argument(format!(
            "token name {name:?} must be at most 64 printable characters"
        )));
    }
    let id = crate::store::new_id();
    let row = TokenRow {
        name: if name.is_empty() {
            format!("{}-{}", role.name(), &id[id.len() - 8..])
        } else {
            name.to_string()
        },
        id,
        role: role.name().to_string(),
        project_id,
        project_name,
        created_at_ms: crate::store::now_ms(),
        created_by: caller.name.clone(),
        revoked_at_ms: 0,
    };
    let token = auth::new_token();
    let audit = caller.audit("CreateToken", &row.id).with_detail(format!(
        "name {} role {}{}",
        row.name,
        row.role,
        if row.project_name.is_empty() {
            String::new()
        } else {
            format!(" project {}", row.project_name)
        }
    ));
    svc.hive
        .store
        .create_token(&row, &auth::token_hash(&token), &audit)
        .await
        .map_err(store_err)?;
    tracing::info!(token_id = %row.id, name = %row.name, role = %row.role,
        project = %row.project_name, by = %caller.name, "API token created");
    Ok(Response::new(pb::CreateTokenReply {
        info: Some(token_to_proto(&row)),
        token,
    }))
}

pub(super) async fn list_tokens(
    svc: &ControlPlaneService,
    request: Request<pb::ListTokensRequest>,
) -> Result<Response<pb::ListTokensReply>, Status> {
    svc.caller(&request, "ListTokens", Right::Admin).await?;
    let rows = svc.hive.store.list_tokens().await.map_err(store_err)?;
    Ok(Response::new(pb::ListTokensReply {
        tokens: rows.iter().map(token_to_proto).collect(),
    }))
}

pub(super) async fn revoke_token(
    svc: &ControlPlaneService,
    request: Request<pb::RevokeTokenRequest>,
) -> Result<Response<pb::TokenInfo>, Status> {
    let caller = svc.caller(&request, "RevokeToken", Right::Admin).await?;
    let id = request.into_inner().id;
    let id = id.trim();
    if id.is_empty() {
        return Err(Status::invalid_argument("token id is required"));
    }
    let row = svc
        .hive
        .store
        .revoke_token(id, crate::store::now_ms(), &caller.audit("RevokeToken", id))
        .await
        .map_err(store_err)?
        .ok_or_else(|| Status::not_found(format!("token {id:?} not found")))?;
    tracing::info!(token_id = %row.id, name = %row.name, by = %caller.name, "API token revoked");
    Ok(Response::new(token_to_proto(&row)))
}

pub(super) async fn list_audit(
    svc: &ControlPlaneService,
    request: Request<pb::ListAuditRequest>,
) -> Result<Response<pb::ListAuditReply>, Status> {
    svc.caller(&request, "ListAudit", Right::Admin).await?;
    let limit = request.into_inner().limit;
    let rows = svc.hive.store.list_audit(limit).await.map_err(store_err)?;
    Ok(Response::new(pb::ListAuditReply {
        entries: rows.into_iter().map(audit_to_proto).collect(),
    }))
}
