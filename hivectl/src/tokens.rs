//! `token create|list|revoke` and `audit`: API tokens and the audit log (admin only). A new
//! token is printed once, on stdout alone (so `$(hivectl token create ...)` captures just it);
//! nothing else ever shows a token. And `secret set|list|rm`: a secret's value is read from
//! stdin, never from the command line, and never shown.

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

/// `secret set`: the value from stdin (one trailing newline dropped).
pub(crate) async fn set_secret(
    ctl: &mut Ctl,
    project: String,
    name: String,
    refs: Option<String>,
) -> Result<(), CliError> {
    use std::io::{IsTerminal, Read};
    if std::io::stdin().is_terminal() {
        eprintln!("value of {name} (end with Ctrl-D; it is not echoed by hivectl, but your terminal may):");
    }
    let mut value = String::new();
    std::io::stdin()
        .read_to_string(&mut value)
        .map_err(|e| CliError::Refused {
            what: format!("read secret {name} from stdin"),
            message: e.to_string(),
        })?;
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    let r = ctl
        .client
        .set_secret(pb::SetSecretRequest {
            project: project.clone(),
            name: name.clone(),
            value,
            refs: refs.unwrap_or_default(),
        })
        .await
        .map_err(|s| ctl.status(format!("set secret {name} of project {project}"), s))?
        .into_inner();
    if ctl.json {
        ctl.out_json(&json!({ "project": r.project, "name": r.name, "refs": r.refs, "updated_at": time_json(r.updated_at_ms) }))
    } else {
        ctl.out(&format!(
            "secret {} of project {} set, for builds of {}\n",
            r.name, r.project, r.refs
        ))
    }
}

/// `secret list`.
pub(crate) async fn list_secrets(ctl: &mut Ctl, project: String, now: i64) -> Result<(), CliError> {
    let r = ctl
        .client
        .list_secrets(pb::ListSecretsRequest {
            project: project.clone(),
        })
        .await
        .map_err(|s| ctl.status(format!("list secrets of project {project}"), s))?
        .into_inner();
    if ctl.json {
        return ctl.out_json(&Value::Array(
            r.secrets
                .iter()
                .map(|s| json!({ "project": s.project, "name": s.name, "refs": s.refs, "updated_at": time_json(s.updated_at_ms) }))
                .collect(),
        ));
    }
    let rows: Vec<Vec<String>> = r
        .secrets
        .iter()
        .map(|s| vec![s.name.clone(), s.refs.clone(), ago(s.updated_at_ms, now)])
        .collect();
    ctl.out(&table(&["NAME", "REFS", "SET"], &rows))
}

/// `secret rm`.
pub(crate) async fn delete_secret(
    ctl: &mut Ctl,
    project: String,
    name: String,
) -> Result<(), CliError> {
    ctl.client
        .delete_secret(pb::DeleteSecretRequest {
            project: project.clone(),
            name: name.clone(),
        })
        .await
        .map_err(|s| ctl.status(format!("delete secret {name} of project {project}"), s))?;
    if ctl.json {
        ctl.out_json(&json!({ "deleted": name, "project": project }))
    } else {
        ctl.out(&format!("secret {name} of project {project} deleted\n"))
    }
}
