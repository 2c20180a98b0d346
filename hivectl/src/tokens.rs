//! `token create|list|revoke` and `audit`: API tokens and the audit log (admin only). A new
//! token is printed once, on stdout alone (so `$(hivectl token create ...)` captures just it);
//! nothing else ever shows a token.

use hive_proto::v1 as pb;
use serde_json::{json, Value};

use crate::ctl::{CliError, Ctl};
use crate::render::{ago, dash, table, time_json};

fn token_json(t: &pb::TokenInfo) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "role": t.role,
        "project": t.project,
        "project_id": t.project_id,
        "created_by": t.created_by,
        "created_at_ms": t.created_at_ms,
        "created_at": time_json(t.created_at_ms),
        "revoked": t.revoked_at_ms != 0,
        "revoked_at": time_json(t.revoked_at_ms),
    })
}

/// `token create`.
pub(crate) async fn create(
    ctl: &mut Ctl,
    role: String,
    project: Option<String>,
    name: Option<String>,
    now: i64,
) -> Result<(), CliError> {
    let reply = ctl
        .client
        .create_token(pb::CreateTokenRequest {
            role: role.clone(),
            project: project.unwrap_or_default(),
            name: name.unwrap_or_default(),
        })
        .await
        .map_err(|s| ctl.status(format!("create {role} token"), s))?
        .into_inner();
    let info = reply.info.unwrap_or_default();
    if ctl.json {
        let mut v = token_json(&info);
        v["token"] = Value::String(reply.token);
        return ctl.out_json(&v);
    }
    eprintln!(
        "token {} ({}, role {}{}) created {}; it is shown this once:",
        info.name,
        info.id,
        info.role,
        if info.project.is_empty() {
            String::new()
        } else {
            format!(", project {}", info.project)
        },
        ago(info.created_at_ms, now)
    );
    ctl.out(&format!("{}\n", reply.token))
}

/// `token list`.
pub(crate) async fn list(ctl: &mut Ctl, now: i64) -> Result<(), CliError> {
    let tokens = ctl
        .client
        .list_tokens(pb::ListTokensRequest {})
        .await
        .map_err(|s| ctl.status("list tokens", s))?
        .into_inner()
        .tokens;
    if ctl.json {
        return ctl.out_json(&Value::Array(tokens.iter().map(token_json).collect()));
    }
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.name.clone(),
                t.role.clone(),
                dash(&t.project),
                t.created_by.clone(),
                ago(t.created_at_ms, now),
                if t.revoked_at_ms == 0 {
                    "-".to_string()
                } else {
                    ago(t.revoked_at_ms, now)
                },
            ]
        })
        .collect();
    ctl.out(&table(
        &["ID", "NAME", "ROLE", "PROJECT", "BY", "CREATED", "REVOKED"],
        &rows,
    ))
}

/// `token revoke`.
pub(crate) async fn revoke(ctl: &mut Ctl, id: String, now: i64) -> Result<(), CliError> {
    let t = ctl
        .client
        .revoke_token(pb::RevokeTokenRequest { id: id.clone() })
        .await
        .map_err(|s| ctl.status(format!("revoke token {id:?}"), s))?
        .into_inner();
    if ctl.json {
        ctl.out_json(&token_json(&t))
    } else {
        ctl.out(&format!(
            "token {} ({}) revoked {}\n",
            t.name,
            t.id,
            ago(t.revoked_at_ms, now)
        ))
    }
}

/// `audit`.
pub(crate) async fn audit(ctl: &mut Ctl, limit: u32, now: i64) -> Result<(), CliError> {
    let entries = ctl
        .client
        .list_audit(pb::ListAuditRequest { limit })
        .await
        .map_err(|s| ctl.status("audit log", s))?
        .into_inner()
        .entries;
    if ctl.json {
        return ctl.out_json(&Value::Array(
            entries
                .iter()
                .map(|e| {
                    json!({
                        "id": e.id,
                        "at_ms": e.at_ms,
                        "at": time_json(e.at_ms),
                        "token_id": e.token_id,
                        "token_name": e.token_name,
                        "action": e.action,
                        "target": e.target,
                        "detail": e.detail,
                    })
                })
                .collect(),
        ));
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                ago(e.at_ms, now),
                e.token_name.clone(),
                e.action.clone(),
                e.target.clone(),
                dash(&e.detail),
            ]
        })
        .collect();
    ctl.out(&table(
        &["WHEN", "WHO", "ACTION", "TARGET", "DETAIL"],
        &rows,
    ))
}
