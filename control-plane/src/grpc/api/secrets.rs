//! Project secrets: set (sealed with the secrets key before it is stored), list (names and
//! times only) and delete. No RPC ever returns a secret's value.

use hive_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{store_err, ControlPlaneService};
use crate::auth::Right;

pub(super) async fn set_secret(
    svc: &ControlPlaneService,
    request: Request<pb::SetSecretRequest>,
) -> Result<Response<pb::SecretInfo>, Status> {
    let caller = svc.caller(&request, "SetSecret", Right::Operate).await?;
    let req = request.into_inner();
    let p = svc.project(req.project.trim()).await?;
    check_secret_name(&req.name)?;
    let len = req.value.len();
    if !(4..=65_536).contains(&len) {
        return Err(Status::invalid_argument(format!(
            "secret {} is {len} bytes: a value is 4 bytes to 64 KiB (a shorter one would be \
             masked all over the log)",
            req.name
        )));
    }
    if req.value.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "secret {}: a value cannot hold a NUL byte (it goes into an environment variable)",
            req.name
        )));
    }
    // Default: the project's branch pattern (GitHub's protected-branch model: a build of some
    // other branch, which anyone who can push may make, does not get it).
    let refs = match req.refs.trim() {
        "" if p.branch.trim().is_empty() => "main".to_string(),
        "" => p.branch.trim().to_string(),
        given => given.to_string(),
    };
    crate::refglob::check_refs(&refs).map_err(|why| {
        Status::invalid_argument(format!(
            "secret {} refs {refs:?}: {why} (expected e.g. main,release/*,refs/tags/v* or *)",
            req.name
        ))
    })?;
    let (nonce, sealed) = svc.hive.sealer.seal(&p.id, &req.name, req.value.as_bytes());
    let row = crate::store::SealedSecret {
        project_id: p.id.clone(),
        name: req.name.clone(),
        nonce,
        sealed,
        updated_at_ms: crate::store::now_ms(),
        refs,
    };
    let audit = caller.audit(
        "SetSecret",
        format!("{}/{} refs={}", p.name, req.name, row.refs),
    );
    svc.hive
        .store
        .set_secret(&row, &audit)
        .await
        .map_err(store_err)?;
    tracing::info!(project = %p.name, name = %req.name, by = %caller.name, "secret set");
    Ok(Response::new(pb::SecretInfo {
        project: p.name,
        name: row.name,
        updated_at_ms: row.updated_at_ms,
        refs: row.refs,
    }))
}

pub(super) async fn list_secrets(
    svc: &ControlPlaneService,
    request: Request<pb::ListSecretsRequest>,
) -> Result<Response<pb::ListSecretsReply>, Status> {
    svc.caller(&request, "ListSecrets", Right::Read).await?;
    let p = svc.project(request.into_inner().project.trim()).await?;
    let rows = svc
        .hive
        .store
        .list_secrets(&p.id)
        .await
        .map_err(store_err)?;
    Ok(Response::new(pb::ListSecretsReply {
        secrets: rows
            .into_iter()
            .map(|r| pb::SecretInfo {
                project: p.name.clone(),
                name: r.name,
                updated_at_ms: r.updated_at_ms,
                refs: r.refs,
            })
            .collect(),
    }))
}

pub(super) async fn delete_secret(
    svc: &ControlPlaneService,
    request: Request<pb::DeleteSecretRequest>,
) -> Result<Response<pb::DeleteSecretReply>, Status> {
    let caller = svc.caller(&request, "DeleteSecret", Right::Operate).await?;
    let req = request.into_inner();
    let p = svc.project(req.project.trim()).await?;
    let audit = caller.audit("DeleteSecret", format!("{}/{}", p.name, req.name));
    if !svc
        .hive
        .store
        .delete_secret(&p.id, &req.name, &audit)
        .await
        .map_err(store_err)?
    {
        return Err(Status::not_found(format!(
            "project {} has no secret {:?} (see `hivectl secret list {}`)",
            p.name, req.name, p.name
        )));
    }
    Ok(Response::new(pb::DeleteSecretReply {}))
}

/// A secret's name is an environment variable's: `[A-Za-z_][A-Za-z0-9_]*`, at most 128, and not
/// `HIVE_*` (Hive's own settings ride in the environment).
fn check_secret_name(name: &str) -> Result<(), Status> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("HIVE_");
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "secret name {name:?}: an environment variable name ([A-Za-z_][A-Za-z0-9_]*, at most \
             128), not starting with HIVE_"
        )))
    }
}

/// A project's clone access (issue 12): its ssh deploy key, known hosts, https token; the
/// work is `domain::clone_access`'s.
pub(super) async fn clone_access(
    svc: &ControlPlaneService,
    request: Request<pb::CloneAccessRequest>,
) -> Result<Response<pb::CloneAccessReply>, Status> {
    let caller = svc.caller(&request, "CloneAccess", Right::Operate).await?;
    let req = request.into_inner();
    let p = svc.project(req.project.trim()).await?;
    let target = p.name.clone();
    crate::domain::clone_access::clone_access(&svc.hive, &p, &req, |what| {
        let mut a = caller.audit("CloneAccess", target.clone());
        a.detail = what.to_string();
        a
    })
    .await
    .map(Response::new)
    .map_err(|e| match e {
        crate::domain::clone_access::CloneAccessError::Store(e) => store_err(e),
        e => Status::invalid_argument(e.to_string()),
    })
}
