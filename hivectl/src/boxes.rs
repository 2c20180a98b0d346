//! `boxes`, `cells`, `box cordon|drain` and `classes`: the fleet and its cell shapes.

use hive_proto::v1::{
    BoxActionRequest, CreateJoinTokenRequest, JoinTokenInfo, ListBoxesRequest, ListCellsRequest,
    ListJoinTokensRequest, ListSizeClassesRequest, RevokeJoinTokenRequest,
};

use crate::cli::{BoxCommand, JoinTokenAction};
use crate::ctl::{CliError, Ctl};
use crate::render;

/// `boxes`.
pub(crate) async fn list(ctl: &mut Ctl, now: i64) -> Result<(), CliError> {
    let bs = ctl
        .client
        .list_boxes(ListBoxesRequest {})
        .await
        .map_err(|s| ctl.status("list boxes", s))?
        .into_inner()
        .boxes;
    if ctl.json {
        ctl.out_json(&serde_json::Value::Array(
            bs.iter().map(render::box_json).collect(),
        ))
    } else {
        ctl.out(&render::boxes_table(&bs, now))
    }
}

/// `cells`.
pub(crate) async fn cells(ctl: &mut Ctl, box_id: Option<String>, now: i64) -> Result<(), CliError> {
    let cs = ctl
        .client
        .list_cells(ListCellsRequest {
            box_id: box_id.unwrap_or_default(),
        })
        .await
        .map_err(|s| ctl.status("list cells", s))?
        .into_inner()
        .cells;
    if ctl.json {
        ctl.out_json(&serde_json::Value::Array(
            cs.iter().map(render::cell_json).collect(),
        ))
    } else {
        ctl.out(&render::cells_table(&cs, now))
    }
}

/// `box cordon|uncordon|drain|forget`.
pub(crate) async fn action(ctl: &mut Ctl, cmd: BoxCommand, now: i64) -> Result<(), CliError> {
    let (verb, id) = match &cmd {
        BoxCommand::Cordon { id } => ("cordon", id.clone()),
        BoxCommand::Uncordon { id } => ("uncordon", id.clone()),
        BoxCommand::Drain { id } => ("drain", id.clone()),
        BoxCommand::Forget { id } => ("forget", id.clone()),
        BoxCommand::Revoke { id } => ("revoke", id.clone()),
        BoxCommand::JoinToken {
            action: Some(JoinTokenAction::List),
            ..
        } => return list_join_tokens(ctl, now).await,
        BoxCommand::JoinToken {
            action: Some(JoinTokenAction::Revoke { id }),
            ..
        } => return revoke_join_token(ctl, id.clone()).await,
        BoxCommand::JoinToken {
            action: None,
            ttl,
            box_id,
        } => return join_token(ctl, *ttl, box_id.clone()).await,
    };
    let req = BoxActionRequest { box_id: id.clone() };
    let r = match cmd {
        BoxCommand::JoinToken { .. } => unreachable!("answered above"),
        BoxCommand::Revoke { .. } => {
            let n = ctl
                .client
                .revoke_box(req)
                .await
                .map_err(|s| ctl.status(format!("{verb} box {id}"), s))?
                .into_inner()
                .certificates;
            return if ctl.json {
                ctl.out_json(&serde_json::json!({ "revoked": id, "certificates": n }))
            } else {
                ctl.out(&format!(
                    "box {id} revoked ({n} certificate(s)); its session is ended and it cannot \
                     connect again until it joins with a new token\n"
                ))
            };
        }
        BoxCommand::Cordon { .. } => ctl.client.cordon_box(req).await,
        BoxCommand::Uncordon { .. } => ctl.client.uncordon_box(req).await,
        BoxCommand::Drain { .. } => ctl.client.drain_box(req).await,
        BoxCommand::Forget { .. } => {
            ctl.client
                .forget_box(req)
                .await
                .map_err(|s| ctl.status(format!("{verb} box {id}"), s))?;
            return if ctl.json {
                ctl.out_json(&serde_json::json!({ "forgotten": id }))
            } else {
                ctl.out(&format!("box {id} forgotten\n"))
            };
        }
    };
    let b = r
        .map_err(|s| ctl.status(format!("{verb} box {id}"), s))?
        .into_inner();
    if ctl.json {
        ctl.out_json(&render::box_json(&b))
    } else {
        ctl.out(&render::box_text(&b, now))
    }
}

/// `box join-token`: the token alone on stdout (for `$(...)`), how to use it on stderr.
async fn join_token(ctl: &mut Ctl, ttl: u64, box_id: Option<String>) -> Result<(), CliError> {
    let r = ctl
        .client
        .create_join_token(CreateJoinTokenRequest {
            ttl_secs: ttl,
            box_id: box_id.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| ctl.status("make a join token", s))?
        .into_inner();
    if ctl.json {
        return ctl.out_json(&serde_json::json!({
            "token": r.token,
            "expires_at_ms": r.expires_at_ms,
            "ca_sha256": r.ca_sha256,
            "box_id": box_id,
        }));
    }
    eprintln!(
        "one-time join token for {}, valid until {} (CA sha256 {}); on the new box:\n  \
         hive-box --control-plane https://CONTROL-PLANE:50052 --join-token TOKEN ...",
        box_id.map_or_else(|| "any new box id".to_string(), |b| format!("box {b} only")),
        render::iso(r.expires_at_ms),
        r.ca_sha256.get(..16).unwrap_or(&r.ca_sha256),
    );

    ctl.out(&format!("{}\n", r.token))
}

fn join_token_state(t: &JoinTokenInfo, now: i64) -> String {
    if t.used_at_ms != 0 {
        format!("used by {}", t.used_by)
    } else if t.expires_at_ms <= now {
        "expired".to_string()
    } else {
        "unused".to_string()
    }
}

fn join_token_json(t: &JoinTokenInfo, now: i64) -> serde_json::Value {
    serde_json::json!({
        "id": t.id,
        "box_id": t.box_id,
        "state": join_token_state(t, now).split(' ').next().unwrap_or_default(),
        "used_by": t.used_by,
        "created_at": render::time_json(t.created_at_ms),
        "created_by": t.created_by,
        "expires_at": render::time_json(t.expires_at_ms),
        "used_at": render::time_json(t.used_at_ms),
    })
}

/// `box join-token list`.
async fn list_join_tokens(ctl: &mut Ctl, now: i64) -> Result<(), CliError> {
    let ts = ctl
        .client
        .list_join_tokens(ListJoinTokensRequest {})
        .await
        .map_err(|s| ctl.status("list join tokens", s))?
        .into_inner()
        .tokens;
    if ctl.json {
        return ctl.out_json(&serde_json::Value::Array(
            ts.iter().map(|t| join_token_json(t, now)).collect(),
        ));
    }
    let rows: Vec<Vec<String>> = ts
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                render::dash(&t.box_id),
                join_token_state(t, now),
                render::ago(t.created_at_ms, now),
                render::iso(t.expires_at_ms),
                t.created_by.clone(),
            ]
        })
        .collect();
    ctl.out(&render::table(
        &["ID", "FOR BOX", "STATE", "MADE", "EXPIRES", "BY"],
        &rows,
    ))
}

/// `box join-token revoke ID`.
async fn revoke_join_token(ctl: &mut Ctl, id: String) -> Result<(), CliError> {
    let t = ctl
        .client
        .revoke_join_token(RevokeJoinTokenRequest { id: id.clone() })
        .await
        .map_err(|s| ctl.status(format!("revoke join token {id}"), s))?
        .into_inner();
    if ctl.json {
        ctl.out_json(&serde_json::json!({ "revoked": t.id }))
    } else {
        ctl.out(&format!(
            "join token {} revoked: no box can join with it\n",
            t.id
        ))
    }
}

/// `classes`.
pub(crate) async fn classes(ctl: &mut Ctl) -> Result<(), CliError> {
    let cs = ctl
        .client
        .list_size_classes(ListSizeClassesRequest {})
        .await
        .map_err(|s| ctl.status("list size classes", s))?
        .into_inner()
        .classes;
    if ctl.json {
        ctl.out_json(&serde_json::Value::Array(
            cs.iter().map(render::class_json).collect(),
        ))
    } else {
        ctl.out(&render::classes_table(&cs))
    }
}
