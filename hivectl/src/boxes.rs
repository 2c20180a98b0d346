//! `boxes`, `cells`, `box cordon|drain` and `classes`: the fleet and its cell shapes.

use hive_proto::v1::{
    BoxActionRequest, ListBoxesRequest, ListCellsRequest, ListSizeClassesRequest,
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
    };
    let req = BoxActionRequest { box_id: id.clone() };
    let r = match cmd {
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
