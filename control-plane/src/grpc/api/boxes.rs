//! Boxes and what runs on them: list boxes and cells, cordon, uncordon, drain, forget and
//! revoke a box, make a join token, list the size classes.

use hive_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{store_err, ControlPlaneService};
use crate::auth::Right;
use crate::domain::drain;
use crate::registry::boxes::{CORDONED, DRAINING, LEFT};

impl ControlPlaneService {
    async fn box_info(&self, box_id: &str) -> Result<pb::BoxInfo, Status> {
        let row = self
            .hive
            .store
            .get_box(box_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| Status::not_found(format!("box {box_id:?} not found")))?;
        Ok(self.hive.registry.info(&row))
    }
}

pub(super) async fn list_boxes(
    svc: &ControlPlaneService,
    request: Request<pb::ListBoxesRequest>,
) -> Result<Response<pb::ListBoxesReply>, Status> {
    svc.caller(&request, "ListBoxes", Right::Read).await?;
    let rows = svc.hive.store.list_boxes().await.map_err(store_err)?;
    Ok(Response::new(pb::ListBoxesReply {
        boxes: rows.iter().map(|r| svc.hive.registry.info(r)).collect(),
    }))
}

/// The box actions that change a box's state and answer with the box as it is then.
#[derive(Clone, Copy)]
pub(super) enum BoxAction {
    Cordon,
    Drain,
    Uncordon,
}

/// Cordon, drain or uncordon: the caller's right, the box's state checked against the action,
/// the domain operation (audited), the box as it is now.
pub(super) async fn box_action(
    svc: &ControlPlaneService,
    request: Request<pb::BoxActionRequest>,
    action: BoxAction,
) -> Result<Response<pb::BoxInfo>, Status> {
    let rpc = match action {
        BoxAction::Cordon => "CordonBox",
        BoxAction::Drain => "DrainBox",
        BoxAction::Uncordon => "UncordonBox",
    };
    let caller = svc.caller(&request, rpc, Right::Operate).await?;
    let box_id = request.into_inner().box_id;
    let info = svc.box_info(&box_id).await?;
    let state = pb::BoxState::try_from(info.state).unwrap_or(pb::BoxState::Unspecified);
    let refuse = |why: String| Err(Status::failed_precondition(format!("box {box_id:?} {why}")));
    let audit = caller.audit(rpc, &box_id);
    match action {
        BoxAction::Cordon => {
            if matches!(state, pb::BoxState::Draining | pb::BoxState::Left) {
                return refuse("is draining or gone; cordon does not apply".into());
            }
            drain::cordon_box(&svc.hive, &box_id, &audit)
                .await
                .map_err(store_err)?;
            tracing::info!(%box_id, "box cordoned");
        }
        BoxAction::Drain => {
            if state == pb::BoxState::Left {
                return refuse("has already left".into());
            }
            drain::drain_box(&svc.hive, &box_id, &audit)
                .await
                .map_err(store_err)?;
            tracing::info!(%box_id, "box draining");
        }
        BoxAction::Uncordon => {
            let from = match state {
                pb::BoxState::Cordoned => CORDONED,
                // Back in service after a drain (maintenance done): a box daemon still draining
                // finishes and exits; started again, it takes builds.
                pb::BoxState::Draining => DRAINING,
                pb::BoxState::Left => LEFT,
                _ => {
                    return refuse(format!(
                        "is {}: uncordon applies to a cordoned, draining or left box",
                        state.short_name()
                    ))
                }
            };
            let changed = drain::uncordon_box(&svc.hive, &box_id, from, &audit)
                .await
                .map_err(store_err)?;
            if !changed {
                return refuse("changed state meanwhile; look again with `hivectl boxes`".into());
            }
            tracing::info!(%box_id, "box uncordoned");
        }
    }
    Ok(Response::new(svc.box_info(&box_id).await?))
}

pub(super) async fn forget_box(
    svc: &ControlPlaneService,
    request: Request<pb::BoxActionRequest>,
) -> Result<Response<pb::ForgetBoxReply>, Status> {
    let caller = svc.caller(&request, "ForgetBox", Right::Operate).await?;
    let box_id = request.into_inner().box_id;
    drain::forget_box(&svc.hive, &box_id, &caller.audit("ForgetBox", &box_id))
        .await
        .map_err(|e| match e {
            drain::ForgetError::NotFound(_) => Status::not_found(e.to_string()),
            drain::ForgetError::Store(e) => store_err(e),
            _ => Status::failed_precondition(e.to_string()),
        })?;
    tracing::info!(%box_id, "box forgotten");
    Ok(Response::new(pb::ForgetBoxReply {}))
}

pub(super) async fn create_join_token(
    svc: &ControlPlaneService,
    request: Request<pb::CreateJoinTokenRequest>,
) -> Result<Response<pb::CreateJoinTokenReply>, Status> {
    let caller = svc
        .caller(&request, "CreateJoinToken", Right::Admin)
        .await?;
    let req = request.into_inner();
    const MAX_TTL: u64 = 7 * 86_400;
    let ttl = match req.ttl_secs {
        0 => 3600,
        t if t > MAX_TTL => {
            return Err(Status::invalid_argument(format!(
                "--ttl {t}s is longer than 7 days: a join token is for joining a box now"
            )))
        }
        t => t,
    };
    let box_id = req.box_id.trim().to_string();
    if !box_id.is_empty() {
        crate::grpc::boxes::check_box_id(&box_id)?;
    }
    use rand::RngCore;
    let mut id = [0u8; 8];
    let mut secret = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut id);
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let token = hive_types::JoinToken {
        id: hex::encode(id),
        secret: hex::encode(secret),
        ca_sha256: svc.hive.ca.sha256().to_string(),
    };
    let now = crate::store::now_ms();
    let expires_at_ms = now.saturating_add(i64::try_from(ttl * 1000).unwrap_or(i64::MAX));
    let row = crate::store::JoinTokenRow {
        id: token.id.clone(),
        box_id: box_id.clone(),
        created_at_ms: now,
        created_by: caller.name.clone(),
        expires_at_ms,
        used_at_ms: 0,
        used_by: String::new(),
    };
    let audit = caller
        .audit("CreateJoinToken", &token.id)
        .with_detail(format!("ttl {ttl}s, box {box_id:?}"));
    svc.hive
        .store
        .create_join_token(&row, &crate::auth::token_hash(&token.secret), &audit)
        .await
        .map_err(store_err)?;
    tracing::info!(token = %token.id, ttl_secs = ttl, box_id = %box_id, by = %caller.name, "join token made");
    Ok(Response::new(pb::CreateJoinTokenReply {
        token: token.to_string(),
        expires_at_ms,
        ca_sha256: token.ca_sha256,
    }))
}

fn join_token_info(r: crate::store::JoinTokenRow) -> pb::JoinTokenInfo {
    pb::JoinTokenInfo {
        id: r.id,
        box_id: r.box_id,
        created_at_ms: r.created_at_ms,
        created_by: r.created_by,
        expires_at_ms: r.expires_at_ms,
        used_at_ms: r.used_at_ms,
        used_by: r.used_by,
    }
}

pub(super) async fn list_join_tokens(
    svc: &ControlPlaneService,
    request: Request<pb::ListJoinTokensRequest>,
) -> Result<Response<pb::ListJoinTokensReply>, Status> {
    svc.caller(&request, "ListJoinTokens", Right::Admin).await?;
    let rows = svc.hive.store.list_join_tokens().await.map_err(store_err)?;
    Ok(Response::new(pb::ListJoinTokensReply {
        tokens: rows.into_iter().map(join_token_info).collect(),
    }))
}

pub(super) async fn revoke_join_token(
    svc: &ControlPlaneService,
    request: Request<pb::RevokeJoinTokenRequest>,
) -> Result<Response<pb::JoinTokenInfo>, Status> {
    let caller = svc
        .caller(&request, "RevokeJoinToken", Right::Admin)
        .await?;
    let given = request.into_inner().id.trim().to_string();
    // The id, or the whole token (whose id it takes).
    let id = match given.parse::<hive_types::JoinToken>() {
        Ok(t) => t.id,
        Err(_) => given,
    };
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Status::invalid_argument(format!(
            "join token id {id:?}: expected the hex id `hivectl box join-token list` shows"
        )));
    }
    let audit = caller.audit("RevokeJoinToken", &id);
    match svc
        .hive
        .store
        .revoke_join_token(&id, &audit)
        .await
        .map_err(store_err)?
    {
        crate::store::JoinTokenRevoke::Revoked(row) => {
            tracing::info!(token = %id, by = %caller.name, "join token revoked");
            Ok(Response::new(join_token_info(row)))
        }
        crate::store::JoinTokenRevoke::Used(row) => Err(Status::failed_precondition(format!(
            "join token {id} was already used by box {}: nothing to revoke; to shut that box \
             out, `hivectl box revoke {}`",
            row.used_by, row.used_by
        ))),
        crate::store::JoinTokenRevoke::Unknown => Err(Status::not_found(format!(
            "no join token {id} (`hivectl box join-token list` shows them; used and expired \
             ones are purged by retention)"
        ))),
    }
}

pub(super) async fn revoke_box(
    svc: &ControlPlaneService,
    request: Request<pb::BoxActionRequest>,
) -> Result<Response<pb::RevokeBoxReply>, Status> {
    let caller = svc.caller(&request, "RevokeBox", Right::Admin).await?;
    let box_id = request.into_inner().box_id;
    crate::grpc::boxes::check_box_id(&box_id)?;
    let audit = caller.audit("RevokeBox", &box_id);
    // First in memory, so no session can connect between the commit and the end below.
    svc.hive.registry.mark_revoked(&box_id);
    let n = svc
        .hive
        .store
        .revoke_box_certs(&box_id, crate::store::now_ms(), &audit)
        .await
        .map_err(store_err)?;
    let ended = svc.hive.registry.end_session(&box_id);
    if n == 0 && !ended {
        return Err(Status::not_found(format!(
            "box {box_id:?} has no certificate in force and no session (see `hivectl boxes`)"
        )));
    }
    tracing::warn!(%box_id, certificates = n, session_ended = ended, by = %caller.name, "box revoked");
    Ok(Response::new(pb::RevokeBoxReply {
        certificates: u32::try_from(n).unwrap_or(u32::MAX),
    }))
}

pub(super) async fn list_cells(
    svc: &ControlPlaneService,
    request: Request<pb::ListCellsRequest>,
) -> Result<Response<pb::ListCellsReply>, Status> {
    svc.caller(&request, "ListCells", Right::Read).await?;
    let box_id = request.into_inner().box_id;
    let filter = if box_id.is_empty() {
        None
    } else {
        Some(box_id.as_str())
    };
    let rows = svc.hive.store.list_cells(filter).await.map_err(store_err)?;
    Ok(Response::new(pb::ListCellsReply {
        cells: rows
            .into_iter()
            .map(|c| pb::CellInfo {
                id: c.id,
                box_id: c.box_id,
                size_class: c.size_class,
                state: c.state,
                build_id: c.build_id,
                updated_at_ms: c.updated_at_ms,
            })
            .collect(),
    }))
}

pub(super) async fn list_size_classes(
    svc: &ControlPlaneService,
    request: Request<pb::ListSizeClassesRequest>,
) -> Result<Response<pb::ListSizeClassesReply>, Status> {
    svc.caller(&request, "ListSizeClasses", Right::Read).await?;
    Ok(Response::new(pb::ListSizeClassesReply {
        classes: svc.hive.classes.all(),
    }))
}
