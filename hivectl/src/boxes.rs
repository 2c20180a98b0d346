//! `boxes`, `cells`, `box cordon|drain` and `classes`: the fleet and its cell shapes.

use hive_proto::v1::{
    BoxActionRequest, CreateJoinTokenRequest, ListBoxesRequest, ListCellsRequest,
    ListSizeClassesRequest,
};

use crate::cli::BoxCommand;
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
        BoxCommand::JoinToken { ttl, box_id } => {
            return join_token(ctl, *ttl, box_id.clone()).await
        }
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
